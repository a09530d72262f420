"""Pure planning of the streaming Zarr sink: positions, chunk slots, commits.

No I/O and no Dask here: plain data in, plain data out, so every rule of
:mod:`aimss_dask.sink.stream_sink` is tested without a cluster (see
``tests/test_stream_sink.py``, with ``hypothesis`` for the invariants).

Vocabulary
----------
row
    One index along the sink's ``axis``. A record (a NumPy array) holds
    ``record.shape[axis]`` rows.
position
    ``(offset, row)`` in one partition: every record below ``offset`` is
    durable, and so are the first ``row`` rows of record ``offset``. A
    position never points at the end of a record: ``(o, len(o))`` is written
    ``(o + 1, 0)``.
chunk rows (``C``)
    The length along ``axis`` of the unit that has exactly one writer: the
    Zarr shard when the array is sharded, else the chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aimss_dask.core.errors import InvalidArgumentError

#: Version of the ``aimss`` attribute document; bumped if its meaning changes.
DOC_VERSION = 1

#: Default size of one chunk when ``chunks`` is not given: large enough that a
#: chunk write amortises the store's per-object cost, small enough that a
#: partition does not hold much in its log before a chunk is full (the range
#: object stores and file systems both handle well is a few MiB).
TARGET_CHUNK_BYTES = 8 * 2**20

#: At most this many bytes of one partition are written per round, so a round
#: (and the work lost if it fails) stays short and a task never loads a large
#: spilled backlog at once.
MAX_ROUND_BYTES = 256 * 2**20

Position = tuple[int, int]


# -- arguments -------------------------------------------------------------------------


def check_axis_arg(axis: object) -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise InvalidArgumentError(f"axis={axis!r} must be an int (the axis the array grows along)")
    return int(axis)


def normalize_axis(axis: int, ndim: int, what: str = "records") -> int:
    """``axis`` as a non-negative index into ``ndim`` axes."""
    if ndim < 1:
        raise InvalidArgumentError(
            f"axis={axis} is out of range for 0-d {what}: the sink needs arrays with at "
            "least one axis to grow along"
        )
    if not -ndim <= axis < ndim:
        raise InvalidArgumentError(
            f"axis={axis} is out of range for {what} with {ndim} dimension(s); use an "
            f"axis in {-ndim} .. {ndim - 1}"
        )
    return axis % ndim


def check_chunks_arg(chunks: object) -> int | tuple[int | None, ...] | None:
    """``None``, a positive int (rows along ``axis``), or one entry per axis.

    In a tuple, ``None`` or ``-1`` means "the full extent of that axis"; along
    ``axis`` it means "the default".
    """
    if chunks is None:
        return None
    if isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
        if chunks < 1:
            raise InvalidArgumentError(f"chunks={chunks!r} must be a positive number of rows")
        return int(chunks)
    if isinstance(chunks, (tuple, list)):
        out: list[int | None] = []
        for c in chunks:
            if c is None or (isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c == -1):
                out.append(None)
            elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 1:
                out.append(int(c))
            else:
                raise InvalidArgumentError(
                    f"chunks={chunks!r}: every entry must be a positive int, or None/-1 "
                    "for the full extent"
                )
        return tuple(out)
    raise InvalidArgumentError(
        f"chunks={chunks!r} must be None, a positive int (rows per chunk along the "
        "axis) or a tuple with one entry per axis"
    )


# -- the record template ---------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """What every record must look like: dtype, and shape but for ``axis``."""

    dtype: str  # np.dtype(...).str, comparable across processes
    shape: tuple[int | None, ...]  # None at ``axis``
    axis: int

    @classmethod
    def of(cls, dtype: Any, shape: Sequence[int], axis: int) -> Template:
        ax = normalize_axis(axis, len(shape))
        return cls(dtype_key(dtype), tuple(None if i == ax else int(n) for i, n in enumerate(shape)), ax)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def row_bytes(self) -> int:
        n = np.dtype(self.dtype).itemsize
        for s in self.shape:
            if s is not None:
                n *= s
        return n

    def array_shape(self, rows: int) -> tuple[int, ...]:
        return tuple(rows if s is None else s for s in self.shape)

    def describe(self) -> str:
        dims = ", ".join("*" if s is None else str(s) for s in self.shape)
        return f"{np.dtype(self.dtype).name} arrays of shape ({dims}{',' if len(self.shape) == 1 else ''})"

    def mismatch(self, dtype: Any, shape: Sequence[int]) -> str | None:
        """Why a record of ``dtype`` and ``shape`` does not fit, or ``None``."""
        if len(shape) != len(self.shape):
            return f"it has {len(shape)} dimension(s), not {len(self.shape)}"
        if dtype_key(dtype) != self.dtype:
            return f"its dtype is {np.dtype(dtype).name}, not {np.dtype(self.dtype).name}"
        for i, (n, want) in enumerate(zip(shape, self.shape)):
            if want is not None and n != want:
                return f"its axis {i} has length {n}, not {want}"
        return None


def dtype_key(dtype: Any) -> str:
    """A dtype as comparable text; byte order aside (Zarr stores either)."""
    return np.dtype(dtype).newbyteorder("=").str


def choose_chunks(
    template: Template,
    chunks: int | tuple[int | None, ...] | None,
    first_rows: int,
    target_bytes: int = TARGET_CHUNK_BYTES,
) -> tuple[int, ...]:
    """The chunk shape of a new array.

    Along ``axis``: ``chunks`` if given, else enough rows for about
    ``target_bytes`` and never fewer than the first record's rows (so a
    typical record fills at most one chunk). Other axes: the full extent
    (at least 1, Zarr's minimum), unless given.
    """
    if isinstance(chunks, tuple) and len(chunks) != template.ndim:
        raise InvalidArgumentError(
            f"chunks={chunks!r} has {len(chunks)} entries but the records have "
            f"{template.ndim} dimension(s)"
        )
    out = []
    for i, extent in enumerate(template.shape):
        given = chunks if (isinstance(chunks, int) and i == template.axis) else (
            chunks[i] if isinstance(chunks, tuple) else None
        )
        if extent is None:  # the axis
            out.append(given if given is not None else default_chunk_rows(template.row_bytes, first_rows, target_bytes))
        else:
            out.append(given if given is not None else max(1, extent))
    return tuple(out)


def default_chunk_rows(row_bytes: int, first_rows: int, target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """Rows per chunk: about ``target_bytes``, at least one record's rows."""
    by_size = target_bytes // max(1, row_bytes)
    return max(1, first_rows, by_size)


def rows_per_round(chunk_rows: int, row_bytes: int, max_bytes: int = MAX_ROUND_BYTES) -> int:
    """Most chunks one partition writes per round (at least one)."""
    return max(1, max_bytes // max(1, chunk_rows * max(1, row_bytes)))


# -- positions ---------------------------------------------------------------------------


def advance(pos: Position, lengths: Sequence[int], n: int) -> Position:
    """The position ``n`` rows after ``pos``; ``lengths[i]`` is record ``pos[0] + i``'s rows."""
    offset, row = pos
    i = 0
    left = n
    while left > 0:
        if i >= len(lengths):
            raise ValueError(f"advance by {n} rows runs past the {len(lengths)} records given")
        take = min(left, lengths[i] - row)
        left -= take
        row += take
        if row >= lengths[i]:
            i, row = i + 1, 0
    return offset + i, row


def cut(pos: Position, lengths: Sequence[int], n: int, chunk_rows: int) -> list[list[tuple[int, int, int]]]:
    """Split the ``n`` rows after ``pos`` into chunks of ``chunk_rows`` (the last may be short).

    Each chunk is a list of pieces ``(i, lo, hi)``: rows ``lo:hi`` of the
    ``i``-th record from ``pos[0]``. Concatenated, the pieces are exactly the
    ``n`` rows, in order.
    """
    out: list[list[tuple[int, int, int]]] = []
    i, row = 0, pos[1]
    left = n
    while left > 0:
        want = min(chunk_rows, left)
        pieces: list[tuple[int, int, int]] = []
        while want > 0:
            if i >= len(lengths):
                raise ValueError(f"cut of {n} rows runs past the {len(lengths)} records given")
            take = min(want, lengths[i] - row)
            if take > 0:
                pieces.append((i, row, row + take))
            want -= take
            left -= take
            row += take
            if row >= lengths[i]:
                i, row = i + 1, 0
        out.append(pieces)
    return out


# -- slots -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """``nchunks`` whole chunks of the array, from row ``start``, for partition ``p``."""

    p: int
    start: int
    nchunks: int


def allocate(rows: int, chunk_rows: int, avail: Sequence[int], max_chunks: int) -> list[Slot]:
    """Give every partition with a full chunk a run of chunk slots after ``rows``.

    Partitions are served in partition order, each with all its full chunks
    (at most ``max_chunks``): one contiguous run per partition per round. Only
    whole chunks are handed out, so each chunk has exactly one writer.
    """
    if rows % chunk_rows:
        raise ValueError(f"rows={rows} is not a multiple of chunk_rows={chunk_rows}")
    slots = []
    start = rows
    for p, a in enumerate(avail):
        k = min(max(0, a) // chunk_rows, max_chunks)
        if k:
            slots.append(Slot(p, start, k))
            start += k * chunk_rows
    return slots


def extend_layout(layout: list[list[int]], runs: Iterable[Sequence[int]]) -> list[list[int]]:
    """Append runs ``[p, offset, row, start, nrows]``, merging contiguous ones.

    Two runs merge when they are of the same partition and the second starts
    in the array where the first ends (a partition's rows are always written
    in order, so its positions are then contiguous too).
    """
    out = [list(r) for r in layout]
    for r in runs:
        p, offset, row, start, n = (int(v) for v in r)
        if n <= 0:
            continue
        if out and out[-1][0] == p and out[-1][3] + out[-1][4] == start:
            out[-1][4] += n
        else:
            out.append([p, offset, row, start, n])
    return out


def locate(layout: Sequence[Sequence[int]], p: int, partition_row: int) -> int | None:
    """Array row of partition ``p``'s ``partition_row``-th durable row (for readers).

    ``partition_row`` counts rows of ``p`` from its first run; ``None`` if it
    is not durable.
    """
    seen = 0
    for q, _, _, start, n in layout:
        if q != p:
            continue
        if partition_row < seen + n:
            return start + partition_row - seen
        seen += n
    return None


# -- the commit document -----------------------------------------------------------------


@dataclass(frozen=True)
class Committed:
    """What the array's ``aimss`` attribute says is durable."""

    offsets: tuple[Position, ...]
    rows: int
    base_rows: int
    chunk_rows: int
    axis: int
    complete: bool
    layout: tuple[tuple[int, ...], ...]
    run: str | None
    stream: str | None

    @classmethod
    def fresh(cls, partitions: int, rows: int, chunk_rows: int, axis: int) -> Committed:
        """Nothing of the stream durable yet; ``rows`` rows already in the array."""
        return cls(((0, 0),) * partitions, rows, rows, chunk_rows, axis, False, (), None, None)

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": DOC_VERSION,
            "stream": self.stream,
            "run": self.run,
            "axis": self.axis,
            "chunk_rows": self.chunk_rows,
            "partitions": len(self.offsets),
            "offsets": {str(p): [o, r] for p, (o, r) in enumerate(self.offsets)},
            "rows": self.rows,
            "base_rows": self.base_rows,
            "complete": self.complete,
            "layout": [list(r) for r in self.layout],
        }


def parse_doc(doc: Any, where: str) -> Committed:
    """The :class:`Committed` an ``aimss`` attribute holds; InvalidArgumentError if malformed."""

    def bad(why: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"attribute 'aimss' of {where} is malformed ({why}); it was not written by "
            "this sink version: sink into a new array, or delete the attribute to start over"
        )

    if not isinstance(doc, dict):
        raise bad(f"a {type(doc).__name__}, not a dict")
    if doc.get("version") != DOC_VERSION:
        raise bad(f"version {doc.get('version')!r}, expected {DOC_VERSION}")
    try:
        parts = int(doc["partitions"])
        raw = doc["offsets"]
        offsets = tuple((int(raw[str(p)][0]), int(raw[str(p)][1])) for p in range(parts))
        layout = tuple(tuple(int(v) for v in r) for r in doc.get("layout", []))
        out = Committed(
            offsets=offsets,
            rows=int(doc["rows"]),
            base_rows=int(doc.get("base_rows", 0)),
            chunk_rows=int(doc["chunk_rows"]),
            axis=int(doc["axis"]),
            complete=bool(doc.get("complete", False)),
            layout=layout,
            run=doc.get("run"),
            stream=doc.get("stream"),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    if any(o < 0 or r < 0 for o, r in out.offsets) or out.rows < out.base_rows or out.chunk_rows < 1:
        raise bad("negative offsets or rows")
    if any(len(r) != 5 for r in out.layout) or sum(r[4] for r in out.layout) != out.rows - out.base_rows:
        raise bad("its layout does not add up to its rows")
    return out


def tail_runs(
    positions: Sequence[Position], remainders: Sequence[int], start: int
) -> Iterator[tuple[int, int, int, int, int]]:
    """Layout runs of the tail: each partition's remainder, in partition order."""
    for p, ((o, r), n) in enumerate(zip(positions, remainders)):
        if n > 0:
            yield (p, o, r, start, n)
            start += n


def worth_scanning(new_records: int, avail: int, seen_records: int, seen_rows: int, chunk_rows: int) -> bool:
    """Whether the records that arrived may complete a chunk (then an owner task scans them).

    The estimate uses the rows per record seen so far in this partition;
    with none seen yet, or no chunk size known yet, always scan. A trickling
    stream then costs one task per chunk rather than one per poll.
    """
    if new_records <= 0:
        return False
    if seen_records == 0 or chunk_rows <= 0:
        return True
    return avail + new_records * seen_rows / seen_records >= chunk_rows
