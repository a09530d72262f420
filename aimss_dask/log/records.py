"""How a record becomes bytes and back, without pickling array data.

We lean on Dask's own serialisation families: NumPy arrays travel as their
buffer plus a small header, pandas objects as pickle protocol 5 with
out-of-band buffers, anything else as (cloud)pickle.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from distributed.protocol import Serialized, deserialize, serialize

from aimss_dask._compat import frame_blocks
from aimss_dask.core.errors import RecordNotSerializableError

#: Dask serialiser families every record goes through (arrays without pickling).
SERIALIZERS = ("dask", "pickle")


def encode(record: Any, stream: str = "?") -> tuple[Serialized, int]:
    """Serialise ``record`` now (views, no copy of array data) and size it.

    Serialising eagerly is what lets a bad record fail in the caller's
    ``write`` with a clear error, instead of deep inside a comm later.
    """
    try:
        header, frames = serialize(record, serializers=SERIALIZERS, on_error="raise")
    except Exception as e:
        raise RecordNotSerializableError(
            f"record of type {type(record).__name__} written to stream {stream!r} "
            f"cannot be serialised ({type(e).__name__}: {e}); write NumPy arrays, "
            "pandas objects, bytes or picklable objects"
        ) from e
    nbytes = sum(memoryview(f).nbytes for f in frames)
    return Serialized(header, frames), nbytes


def local_nbytes(record: Any) -> int | None:
    """Size of a record that stays in this process, if it needs no checking.

    Arrays, pandas objects and bytes always serialise, so a record stored on
    its own owner skips ``encode`` (a pickle of every DataFrame shard).
    """
    if isinstance(record, np.ndarray) and record.dtype != object:
        return int(record.nbytes)
    if isinstance(record, (bytes, bytearray)):
        return len(record)
    if isinstance(record, tuple) and len(record) <= 8:
        # An operator's (coordinates, array piece): plain parts plus known
        # records, sized without pickling the piece. Every part counts,
        # nested ones too: a budget that undercounts lets the log outgrow it.
        total = 0
        for part in record:
            if isinstance(part, (int, float, bool, type(None))):
                total += 32
                continue
            if isinstance(part, str):
                total += sys.getsizeof(part)
                continue
            n = local_nbytes(part)
            if n is None:
                return None
            total += n
        return total
    import pandas as pd

    if isinstance(record, pd.DataFrame):
        # The blocks' buffers: dask's sizeof builds Series per call.
        values = frame_blocks(record)
        if values is not None and all(getattr(v, "dtype", None) != object for v in values):
            return int(sum(v.nbytes for v in values) + record.index.nbytes)
    if isinstance(record, (pd.DataFrame, pd.Series, pd.Index)):
        from dask.sizeof import sizeof

        return int(sizeof(record))
    return None


#: A view is copied once its buffer holds this many bytes more than itself
#: (and over twice its size): below that, what it pins hardly counts.
PIN_SLACK = 64 * 2**10


def _buffer_nbytes(arr: np.ndarray) -> int | None:
    """Bytes of the buffer a NumPy view keeps alive (None: not known)."""
    base = arr.base
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, np.ndarray):
        return int(base.nbytes)
    try:
        return memoryview(base).nbytes  # bytes, bytearray, mmap, other buffers
    except TypeError:
        return None


def _pins_more(arr: Any) -> bool:
    """Whether ``arr`` is a view whose buffer is much larger than itself."""
    if not isinstance(arr, np.ndarray) or arr.base is None:
        return False
    held = _buffer_nbytes(arr)
    return held is not None and held > 2 * arr.nbytes and held - arr.nbytes > PIN_SLACK


def owned(record: Any) -> Any:
    """``record``, or a copy of it where it is a small view of a large buffer.

    A record its owner's process writes is stored as it is and counted by
    its own bytes: a slice of a large array (``big[:10]``, ``df.iloc[:5]``)
    would keep the whole array alive while the log counts the slice, and
    the memory budget would not hold. Such a view is copied; arrays that
    own their data, and views of most of their buffer, are not.

    >>> big = np.zeros(2**20)
    >>> owned(big) is big, owned(big[:10]).base is None, owned(big[1:]).base is big
    (True, True, True)
    """
    if isinstance(record, np.ndarray):
        return record.copy() if _pins_more(record) else record
    pd = sys.modules.get("pandas")  # a pandas object means pandas is imported
    if pd is not None and isinstance(record, pd.DataFrame):
        blocks = frame_blocks(record)
        if blocks is not None and any(_pins_more(b) for b in blocks):
            return record.copy(deep=True)
    elif pd is not None and isinstance(record, pd.Series) and isinstance(record.dtype, np.dtype):
        if _pins_more(record.to_numpy(copy=False)):  # a NumPy dtype: its own buffer, no copy
            return record.copy(deep=True)
    return record


def decoded(records: list[Any], lo: int, hi: int, stream: str = "?", p: int = -1, base: int = 0) -> list[Any]:
    """``records[lo:hi]`` of a segment, those stored serialised decoded (once: kept decoded).

    A replica stores the copies its owner sends as they arrived
    (``Serialized``): most are never read, since readers go to the owner.
    The first read after it took over decodes them; the list keeps the
    result, so later reads, and other readers, share it as they would a
    record stored decoded. ``stream``, ``p`` and ``base`` (the segment's
    first offset) name a record that cannot be decoded.

    >>> from distributed.protocol import serialize
    >>> stored = [Serialized(*serialize(b"abc")), b"def"]
    >>> decoded(stored, 0, 2), type(stored[0]).__name__
    ([b'abc', b'def'], 'bytes')
    """
    out = records[lo:hi]
    for i, r in enumerate(out):
        if type(r) is Serialized:
            try:
                value = freeze(deserialize(r.header, r.frames))
            except Exception as e:
                raise RecordNotSerializableError(
                    f"record {base + lo + i} of stream {stream!r} partition {p} could not be read back here "
                    f"({type(e).__name__}: {e}); install the modules its type needs on every worker"
                ) from e
            # One item of the list, replaced in place: a reader holding the
            # list sees either form, and both read the same. A list a trim
            # or a spill has swapped out meanwhile is simply not read again.
            out[i] = records[lo + i] = value
    return out


def freeze(record: Any) -> Any:
    """Return what the log stores for ``record``: arrays as read-only views.

    Readers get the stored object without a copy, so a read-only view is what
    keeps one reader's in-place edit from corrupting what others will read.
    """
    if isinstance(record, np.ndarray) and record.flags.writeable:
        view = record.view()
        view.flags.writeable = False
        return view
    return record

