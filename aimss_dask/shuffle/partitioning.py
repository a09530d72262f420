"""Splitting and joining partitions: pure functions over pandas objects."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.ops.local import Alloc

if TYPE_CHECKING:
    # pandas and dask.dataframe are imported where a frame is handled, not
    # with aimss_dask: every worker imports aimss_dask at start.
    import pandas as pd


def check_columns(columns: Sequence[str], on: str | Sequence[str], what: str = "on") -> list[str]:
    """``on`` as a list of column names, every one of them present."""
    keys = [on] if isinstance(on, (str, int)) or not isinstance(on, Sequence) else list(on)
    if not keys:
        raise InvalidArgumentError(f"{what}={on!r}: give at least one column name")
    missing = [k for k in keys if k not in columns]
    if missing:
        raise InvalidArgumentError(
            f"{what}={on!r}: column(s) {missing} not in the frame; its columns are "
            f"{list(columns)}"
        )
    return keys


#: Fibonacci hashing's multiplier (2**64 / golden ratio).
_FIB = np.uint64(0x9E3779B97F4A7C15)


def partition_index(
    df: pd.DataFrame,
    on: list[str],
    npartitions: int,
    cast: dict[str, str] | None = None,
    alloc: Alloc | None = None,
) -> np.ndarray:
    """The output partition of every row.

    One 8-byte integer key column takes a multiplicative (Fibonacci) hash,
    about a tenth of the cost of pandas' hashing, computed in place in one
    buffer from ``alloc`` (a worker's scratch pool; see :func:`split_packed`);
    anything else uses Dask's own ``partitioning_index``. Both sides of a
    join take the same branch: they have the same key columns and, after
    ``cast``, the same dtypes.
    """
    if len(on) == 1 and not cast:
        col = df[on[0]]
        dt = col.dtype
        if isinstance(dt, np.dtype) and dt.kind in "iu" and dt.itemsize == 8:
            h = (alloc or np.empty)((len(col),), np.uint64)
            np.multiply(col.to_numpy().view(np.uint64), _FIB, out=h)
            np.right_shift(h, np.uint64(32), out=h)
            np.remainder(h, np.uint64(npartitions), out=h)
            small = np.int8 if npartitions <= 127 else np.int16 if npartitions <= 32767 else np.int64
            return h.astype(small)
    keys = df[on]
    if cast:
        keys = keys.astype(cast)
    from dask.dataframe.shuffle import partitioning_index

    # Dask returns the smallest int dtype that fits, which lets the stable
    # argsort in split() use a radix sort: keep it.
    return np.asarray(partitioning_index(keys, npartitions))


def split(
    df: pd.DataFrame, index: np.ndarray, npartitions: int, only: Collection[int] | None = None
) -> list[tuple[int, pd.DataFrame]]:
    """``[(partition, rows of df for it), ...]`` for the non-empty partitions.

    One stable sort, then one ``take`` per shard: every row is copied once,
    and every shard owns its memory. Slices of one big copy would keep all of
    it alive while any shard of it sits in the log, twice what the log counts.
    Each shard keeps the input's row order. ``only``: the partitions wanted
    (None: all).
    """
    if len(df) == 0:
        return []
    counts = np.bincount(index, minlength=npartitions)
    order = np.argsort(index, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [
        (j, df.take(order[bounds[j] : bounds[j + 1]]))
        for j in range(npartitions)
        if counts[j] and (only is None or j in only)
    ]


def combine(shards: list[pd.DataFrame], meta: pd.DataFrame) -> pd.DataFrame:
    """Concatenate shards; the empty ``meta`` stands in when there are none.

    Dask's ``concat`` unions categoricals whose categories differ by shard.
    """
    if not shards:
        return meta
    if len(shards) == 1:
        return shards[0].copy()  # a read-only view from the log: hand out our own
    from dask.dataframe.dispatch import concat

    return concat(shards)


# -- the packed fast path: frames whose columns and index are all 8-byte NumPy
# dtypes travel as one (rows, columns + 1) uint64 array per shard. One row
# gather of 64-byte rows instead of a gather per column, one NumPy buffer to
# serialise instead of a pickled DataFrame, and one DataFrame built per output
# partition instead of one per shard: pandas' per-object overhead was most of
# a shuffle's CPU.


def packable(meta: pd.DataFrame) -> bool:
    """Whether frames like ``meta`` can take the packed path."""
    import pandas as pd

    if isinstance(meta.index, pd.MultiIndex) or not meta.columns.is_unique:
        return False
    dtypes = [*meta.dtypes, meta.index.dtype]
    return all(isinstance(d, np.dtype) and d.kind in "iufMm" and d.itemsize == 8 for d in dtypes)


def pack_signature(frame: pd.DataFrame) -> tuple[Any, ...] | None:
    """What a packed shard's reader must agree on with its writer: columns, dtypes, index dtype; None if not packable.

    A packed shard carries raw 8-byte values and no dtypes: it is read as
    the run's meta says. A partition that differs from its meta (a column
    float where meta says int, columns in another order: Dask allows it)
    goes as a frame instead, or its values would be read as other numbers.
    """
    if not packable(frame):
        return None
    return (tuple(frame.columns), tuple(str(d) for d in frame.dtypes), str(frame.index.dtype))


def packed_row_bytes(meta: pd.DataFrame) -> int:
    """Bytes of one row of a packed shard: a uint64 per column, plus the index."""
    return (meta.shape[1] + 1) * 8


def split_packed(
    df: pd.DataFrame,
    index: np.ndarray,
    npartitions: int,
    alloc: Alloc = np.empty,
    lean: bool = False,
    only: Collection[int] | None = None,
) -> list[tuple[int, np.ndarray]]:
    """Like :func:`split`, each shard a contiguous ``(rows, k + 1)`` uint64 array.

    The shards are views of one array from ``alloc`` (a worker's scratch
    pool: fresh pages cost more than the gather itself on this kind of VM).
    ``lean``: gather column by column through one column of scratch instead
    of through a packed copy of the whole input: about half the scratch
    (one partition's rows, not two), at about twice the gather's cost. For
    workers whose memory is tight. ``only``: the partitions wanted (None:
    all); only their rows are gathered.
    """
    if len(df) == 0:
        return []
    k = df.shape[1]
    counts = np.bincount(index, minlength=npartitions)
    order = np.argsort(index, kind="stable")
    if only is not None:
        # A push run again for a few re-created partitions: gather their
        # rows alone, column by column (packing every row first would cost
        # more than the gather it saves).
        bounds = np.concatenate([[0], np.cumsum(counts)])
        wanted = [j for j in range(npartitions) if j in only and counts[j]]
        order = np.concatenate([order[bounds[j] : bounds[j + 1]] for j in wanted]) if wanted else order[:0]
        kept = np.zeros_like(counts)
        kept[wanted] = counts[wanted]
        counts = kept
        lean = True
    # Pack the rows first (a sequential copy per column), then gather whole
    # 8-byte-column rows: one random access per row instead of one per value,
    # 2-3x faster than gathering column by column. Both buffers come from
    # ``alloc``: under Dask's MALLOC_TRIM_THRESHOLD_ every temporary NumPy
    # array is new pages, and 4 KiB faults cost more than the gather.
    # ``mode="clip"`` (``order`` is in range) lets ``take`` write into
    # ``out`` unbuffered.
    n = len(order)
    if not n:
        return []
    import pandas as pd

    ranged = isinstance(df.index, pd.RangeIndex)
    columns = [df.iloc[:, i].to_numpy().view(np.uint64) for i in range(k)]
    if not ranged:
        columns.append(np.asarray(df.index).view(np.uint64))
    if lean:
        ordered = alloc((n, k + 1), np.uint64)
        column = alloc((n,), np.uint64)
        for i, values in enumerate(columns):
            np.take(values, order, out=column, mode="clip")
            ordered[:, i] = column
        del column
    else:
        packed = alloc((len(df), k + 1), np.uint64)
        for i, values in enumerate(columns):
            packed[:, i] = values
        ordered = alloc((n, k + 1), np.uint64)
        np.take(packed, order, axis=0, out=ordered, mode="clip")
        del packed
    if ranged:
        _take_range(df.index, order, ordered[:, k])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [(j, ordered[bounds[j] : bounds[j + 1]]) for j in range(npartitions) if counts[j]]


def _take_range(index: pd.RangeIndex, order: np.ndarray, out: np.ndarray) -> None:
    """``index[order]`` into the uint64 column ``out``, computed from start and step.

    ``np.asarray`` of a RangeIndex builds its whole int64 array and caches
    it on the index, which belongs to the input partition. For a persisted
    input that is 8 bytes a row held for as long as the input lives (300 MiB
    a worker at 4 GiB of input).
    """
    values = out.view(np.int64)
    np.multiply(order, index.step, out=values)
    values += index.start


def unpack(shards: list[np.ndarray], meta: pd.DataFrame) -> pd.DataFrame:
    """The output partition from packed shards, with ``meta``'s dtypes.

    Columns are copied straight from the shards into one 2-D block per dtype,
    the layout pandas keeps: one pass over the data, and the result owns its
    memory (it no longer points into the log).
    """
    if not shards:
        return meta
    out = PackedOutput(meta, sum(len(s) for s in shards))
    for s in shards:
        if not out.add(s):
            raise ValueError(
                f"a shard of shape {getattr(s, 'shape', None)} and dtype {getattr(s, 'dtype', type(s))} "
                f"is not a packed shard of a frame with {out.k} columns; this is a bug, please report it"
            )
    return out.frame()


class PackedOutput:
    """An output partition filled shard by shard, for ``rows`` rows at most.

    A reader that knows the partition's size up front adds each shard as it
    arrives and lets it go: the read then holds the output plus one batch
    of shards, not the whole partition twice.
    """

    def __init__(self, meta: pd.DataFrame, rows: int) -> None:
        self.meta = meta
        self.k = meta.shape[1]
        self.rows = rows
        self.filled = 0
        groups: dict[np.dtype, list[int]] = {}
        for i, dt in enumerate(meta.dtypes):
            groups.setdefault(dt, []).append(i)
        self._blocks = [(dt, cols, np.empty((len(cols), rows), dtype=np.uint64)) for dt, cols in groups.items()]
        self._index = np.empty((1, rows), dtype=np.uint64)

    def add(self, shard: Any) -> bool:
        """Copy ``shard`` in; False (and nothing copied) if it is not a packed
        shard of this layout or does not fit."""
        if not (
            isinstance(shard, np.ndarray)
            and shard.dtype == np.uint64
            and shard.ndim == 2
            and shard.shape[1] == self.k + 1
            and self.filled + len(shard) <= self.rows
        ):
            return False
        lo, hi = self.filled, self.filled + len(shard)
        for _, cols, block in self._blocks:
            for r, c in enumerate(cols):
                block[r, lo:hi] = shard[:, c]
        self._index[0, lo:hi] = shard[:, self.k]
        self.filled = hi
        return True

    def frame(self) -> pd.DataFrame:
        """The rows added so far, as a DataFrame with ``meta``'s dtypes."""
        import pandas as pd

        n = self.filled
        meta = self.meta
        parts = [
            pd.DataFrame(block[:, :n].view(dt).T, columns=meta.columns[cols], copy=False)
            for dt, cols, block in self._blocks
        ]
        out = pd.concat(parts, axis=1) if len(parts) > 1 else parts[0]
        out.index = pd.Index(self._index[0, :n].view(meta.index.dtype), name=meta.index.name)
        return out[meta.columns] if len(parts) > 1 else out
