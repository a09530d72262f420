"""Direct chunk writes: encode whole chunks (or shards) and store them as files.

A sink writes whole units, so it needs none of Zarr's general machinery
(selections, read-modify-write merges, the fill-value comparison of every
chunk); on this machine Zarr 3.1's write path moves uncompressed chunks at
about a third of the speed of a plain file write. For the layouts that cover
almost every array written in practice, this module writes the very bytes
Zarr would have written:

- a local directory store (``LocalStore``);
- C order, a little-endian (or single-byte) numeric or boolean dtype;
- codecs ``bytes`` plus, optionally, ``zstd`` (Zarr v3), or compressor
  ``None``/``Zstd`` without filters (Zarr v2);
- optionally one ``sharding_indexed`` codec over such inner codecs, with the
  default index codecs (``bytes`` + ``crc32c``), index at the start or end.

Anything else returns ``None`` from :func:`direct_writer`, and the sink uses
Zarr's own path. The tests read every layout back with ``zarr.open_array``.
"""

from __future__ import annotations

import itertools
import math
import os
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from aimss_dask.core.errors import SinkError
from aimss_dask.sink.assembler import RowSlabs, joined
from aimss_dask.sink.zstd_into import Arena, arena, zstd_into

try:
    import fcntl
except ImportError:  # not POSIX: no appends in place (see in_place_writers)
    fcntl = None  # type: ignore[assignment]

#: What a region is written from: an array, or a unit's row slabs.
Data = np.ndarray | RowSlabs

#: Stores whole units: ``put(region, data) -> bytes written``.
Put = Callable[[tuple[slice, ...], Data], int]

MAX_UINT_64 = np.uint64(2**64 - 1)

#: A chunk's parts (in C order) to the buffers that store it. Buffers may
#: live in the arena: valid until its next ``reset``, so each unit's writer
#: resets the thread's arena before it encodes and writes before the next.
Encoder = Callable[[list[np.ndarray], Arena], list[Any]]


def direct_writer(array: Any) -> Put | None:
    """A function that writes whole-unit regions of ``array``, or None if unsupported."""
    try:
        return _build(array)
    except Exception:  # an unexpected Zarr version or layout: use Zarr's own path
        return None


def _build(array: Any) -> Put | None:
    import zarr

    if not isinstance(array.store, zarr.storage.LocalStore):
        return None
    meta = array.metadata
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biufc" or (dtype.byteorder == ">") or array.order != "C":
        return None
    root = os.path.join(str(array.store.root), array.path) if array.path else str(array.store.root)
    fill = meta.fill_value
    if meta.zarr_format == 2:
        if meta.filters or meta.order != "C":
            return None
        encode = _compressor_v2(meta.compressor)
        if encode is None:
            return None
        return _ChunkWriter(root, meta.encode_chunk_key, tuple(array.chunks), array.shape, dtype, fill, encode)
    codecs = list(meta.codecs)
    if len(codecs) == 1 and type(codecs[0]).__name__ == "ShardingCodec":
        sharding = codecs[0]
        inner = _codecs_v3(list(sharding.codecs))
        index_ok = [type(c).__name__ for c in sharding.index_codecs] == ["BytesCodec", "Crc32cCodec"]
        if inner is None or not index_ok or not _little(sharding.index_codecs[0]):
            return None
        at_start = getattr(sharding.index_location, "value", sharding.index_location) == "start"
        return _ShardWriter(
            root, meta.encode_chunk_key, tuple(array.shards), tuple(sharding.chunk_shape),
            array.shape, dtype, fill, inner, at_start,
        )
    encode = _codecs_v3(codecs)
    if encode is None:
        return None
    return _ChunkWriter(root, meta.encode_chunk_key, tuple(array.chunks), array.shape, dtype, fill, encode)


def _little(codec: Any) -> bool:
    endian = getattr(codec, "endian", None)
    return endian is None or getattr(endian, "value", endian) == "little"


def _codecs_v3(codecs: list[Any]) -> Encoder | None:
    names = [type(c).__name__ for c in codecs]
    if names == ["BytesCodec"] and _little(codecs[0]):
        return _raw
    if names == ["BytesCodec", "ZstdCodec"] and _little(codecs[0]):
        return _zstd(codecs[1].level, codecs[1].checksum)
    return None


def _compressor_v2(compressor: Any) -> Encoder | None:
    if compressor is None:
        return _raw
    if type(compressor).__name__ == "Zstd" and compressor.codec_id == "zstd":
        cfg = compressor.get_config()
        return _zstd(cfg.get("level", 0), cfg.get("checksum", False))
    return None


def _raw(parts: list[np.ndarray], into: Arena | None = None) -> list[Any]:
    # Uncompressed: the chunk's bytes are its parts' bytes in order, so the
    # parts are written as they are (no concatenation copy).
    return [memoryview(np.ascontiguousarray(p)).cast("B") for p in parts]


def _zstd(level: int, checksum: bool) -> Encoder:
    into = zstd_into(level, checksum)
    if into is not None:  # the same frames, into reused memory
        return into
    from numcodecs import Zstd

    codec = Zstd(level=level, checksum=checksum)
    return lambda parts, _: [codec.encode(np.ascontiguousarray(joined(parts)))]


def _parent(path: str, made: set[str]) -> None:
    """Make ``path``'s directory once per writer (Zarr v3 keys ``c/i/j`` need one per row)."""
    parent = os.path.dirname(path)
    if parent not in made:
        os.makedirs(parent, exist_ok=True)
        made.add(parent)


def _units(region: tuple[slice, ...], unit: tuple[int, ...]) -> Any:
    """The grid coordinates of the units (chunks or shards) that ``region`` touches."""
    return itertools.product(*(range(r.start // u, -(-r.stop // u)) for r, u in zip(region, unit)))


def _prepare(root: str, key: Any, unit: tuple[int, ...], regions: list[tuple[slice, ...]], made: set[str]) -> int:
    """Make the directories that the files of ``regions`` (whole units) go in; how many distinct ones."""
    before = len(made)
    for region in regions:
        for coords in _units(region, unit):
            _parent(os.path.join(root, key(coords)), made)
    return len(made) - before


#: Temporary names: unique to this process (and host) once, then a counter.
#: A fresh ``uuid4`` per chunk cost a ``getrandom`` call per file.
_TMP_PREFIX = uuid.uuid4().hex
_tmp_count = itertools.count()


def _private(path: str) -> str:
    """A name next to ``path`` that no other writer (process or call) uses."""
    return f"{path}.{_TMP_PREFIX}-{os.getpid()}-{next(_tmp_count)}"


def _put(path: str, parts: list[Any], made: set[str]) -> None:
    """Write ``parts`` to ``path`` atomically (a reader never sees half a chunk)."""
    _parent(path, made)
    tmp = f"{_private(path)}.partial"
    with open(tmp, "wb") as f:
        for part in parts:
            f.write(part)
    os.replace(tmp, path)


def _partial(path: str, token: str) -> str:
    """The file a run's rows of the chunk at ``path`` are written into before :meth:`_RowsInPlace.commit`."""
    return f"{path}.{token}.partial"


#: Most buffers one ``pwritev`` takes (Linux: 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16

#: Marks the partial files of shards whose index is being written (:meth:`_ShardWriter.close_shards`).
_SEALED = "-sealed"

#: Most bytes one append writes (Linux writes at most ~2 GiB per call).
_APPEND_MAX = 2**30


def _pwrite_all(fd: int, parts: list[memoryview], offset: int) -> None:
    """Write ``parts`` back to back from ``offset``, however short each ``pwritev`` falls."""
    todo = [p for p in parts if p.nbytes]
    while todo:
        n = os.pwritev(fd, todo[:_IOV_MAX], offset)
        if n <= 0:
            raise OSError(f"pwritev wrote {n} bytes at offset {offset}")
        offset += n
        while todo and n >= todo[0].nbytes:
            n -= todo[0].nbytes
            todo.pop(0)
        if n:
            todo[0] = todo[0][n:]


def in_place_writers(array: Any) -> tuple[_RowsInPlace | None, _ShardWriter | None]:
    """``array``'s writers in place, each None where ``array`` does not allow it.

    First, the writer of rows of its units in place
    (:meth:`_RowsInPlace.write_rows`): uncompressed chunks, or, for a sharded
    array, uncompressed inner chunks that span the shard whole on every axis
    but the first. Second, the writer that appends whole inner chunks to its
    shards (:meth:`_ShardWriter.append_chunks`): any codecs the direct writer
    supports, compressed or not, on a POSIX system.
    """
    w = direct_writer(array)
    rows = w if isinstance(w, _RowsInPlace) and w.raw else None
    appender = w if isinstance(w, _ShardWriter) and fcntl is not None else None
    return rows, appender


def remove_partials(array: Any, token: str) -> int:
    """Delete the partial files run ``token`` left in ``array`` (a local store); how many.

    For a run that failed before its commit, once its writers stopped.
    """
    w = direct_writer(array)
    return w.discard(token) if isinstance(w, _RowsInPlace) else 0


def _chunk(data: Data, sel: tuple[slice, ...], shape: tuple[int, ...], fill: Any) -> list[np.ndarray]:
    """The chunk at ``sel`` of ``data`` as parts in C order, padded with ``fill`` to ``shape``.

    From :class:`RowSlabs`, a full chunk that spans every axis but the first
    whole is the slabs' own rows: views, no copy.
    """
    if isinstance(data, RowSlabs):
        rows = sel[0]
        whole = all(s.start == 0 and s.stop == n for s, n in zip(sel[1:], data.shape[1:]))
        if whole and tuple(s.stop - s.start for s in sel) == shape:  # no padding either
            return data.parts(rows.start, rows.stop)
        part = data.rows(rows.start, rows.stop)[(slice(None), *sel[1:])]
    else:
        part = data[sel]
    if part.shape == shape:
        return [part]
    out = np.full(shape, fill, dtype=data.dtype)
    out[tuple(slice(0, n) for n in part.shape)] = part
    return [out]


def _nbytes(sel: tuple[slice, ...], dtype: np.dtype) -> int:
    return math.prod(s.stop - s.start for s in sel) * dtype.itemsize


def _as_data(data: Any, dtype: np.dtype) -> Data:
    if isinstance(data, RowSlabs):
        return data if data.dtype == dtype else data.materialize().astype(dtype)
    return np.asarray(data, dtype=dtype)


class _RowsInPlace:
    """Rows of a unit's file written in place, by several writers, then committed.

    In an uncompressed chunk (or a shard of uncompressed chunks that span
    it whole on every axis but the first) the rows ``[lo, hi)`` of the unit
    are one byte range of its file. Subclasses say where the unit's rows
    start, how far its padded rows go and what else the file holds
    (:meth:`_layout`).
    """

    root: str
    key: Any
    unit: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    fill: Any
    made: set[str]
    raw: bool

    def _layout(self, coords: tuple[int, ...]) -> tuple[tuple[int, ...], int, int, bytes | None, bytes | None]:
        """``(extent in the array, byte offset of row 0, rows stored, bytes before row 0, bytes after the last row)``."""
        raise NotImplementedError

    def write_rows(
        self, coords: tuple[int, ...], pieces: list[tuple[tuple[int, int], np.ndarray]], token: str
    ) -> int:
        """Write row ranges ``[lo, hi)`` of unit ``coords`` into the run's partial file of it.

        Each piece is ``((lo, hi), data)``, ``data`` spanning the unit whole
        on every axis but the first, as far as the array goes. Those rows are
        one byte range of the file, so several writers (processes of one
        host) fill one unit without moving its rows between them, and none
        reads or rewrites another's bytes. Pieces that follow each other are
        written by one ``pwritev``. The file keeps its partial name until
        :meth:`commit` (a reader never sees a half-written unit). Padding past
        the array's edge is written with the fill value, and a shard's index
        by the piece that holds its first (index at the start) or last rows,
        as Zarr writes them. Writing the same rows again writes the same
        bytes: a recomputed task is harmless. Returns the array bytes written
        (padding excluded).

        >>> w.write_rows((3, 0), [((0, 24), a[3072:3096]), ((24, 1024), b[:1000])], run)  # doctest: +SKIP
        4194304
        """
        if not self.raw:
            raise ValueError("write_rows needs uncompressed units; this array's codecs compress them")
        ext, base, end_rows, head, tail = self._layout(coords)
        row_shape = tuple(self.unit[1:])
        row_bytes = math.prod(row_shape) * self.dtype.itemsize
        runs: list[tuple[int, list[Any]]] = []  # (offset, buffers) of adjacent pieces
        end = -1
        written = 0
        for (lo, hi), data in sorted(pieces, key=lambda t: t[0][0]):
            data = np.asarray(data, dtype=self.dtype)
            if data.shape != (hi - lo, *ext[1:]) or not 0 <= lo < hi <= ext[0]:
                raise ValueError(
                    f"rows {(lo, hi)} of unit {coords} (extent {ext}) cannot hold data of shape {data.shape}"
                )
            if ext[1:] != row_shape:  # an edge unit on a later axis: pad each row
                padded = np.full((hi - lo, *row_shape), self.fill, dtype=self.dtype)
                padded[(slice(None), *(slice(0, n) for n in ext[1:]))] = data
                buf = padded
            else:
                buf = np.ascontiguousarray(data)
            bufs: list[Any] = [memoryview(buf).cast("B")]
            if hi == ext[0]:  # the unit's last rows: its padding, then what follows them
                if end_rows > ext[0]:
                    tail_rows = np.full((end_rows - ext[0], *row_shape), self.fill, dtype=self.dtype)
                    bufs.append(memoryview(tail_rows).cast("B"))
                if tail is not None:
                    bufs.append(memoryview(tail))
            offset = base + lo * row_bytes
            if offset == end:
                runs[-1][1].extend(bufs)
            else:
                runs.append((offset, bufs))
            end = base + hi * row_bytes
            written += data.nbytes
        if head is not None and any(lo == 0 for (lo, _), _ in pieces):
            runs.insert(0, (0, [memoryview(head)]))
        path = os.path.join(self.root, self.key(coords))
        _parent(path, self.made)
        fd = os.open(_partial(path, token), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            for offset, bufs in runs:
                _pwrite_all(fd, bufs, offset)
        finally:
            os.close(fd)
        return int(written)

    def commit(self, coords: list[tuple[int, ...]], token: str) -> None:
        """Give each unit's partial file (see :meth:`write_rows`) its Zarr key, atomically."""
        for c in coords:
            path = os.path.join(self.root, self.key(c))
            os.replace(_partial(path, token), path)

    def discard(self, token: str) -> int:
        """Remove the partial files run ``token`` left; the units themselves stay as they were.

        Returns how many were removed.
        """
        suffixes = (_partial("", token), _partial("", f"{token}{_SEALED}"))
        n = 0
        for root, _, files in os.walk(self.root):
            for f in files:
                if f.endswith(suffixes):
                    try:
                        os.unlink(os.path.join(root, f))
                        n += 1
                    except FileNotFoundError:
                        pass
        return n

    def _extent(self, coords: tuple[int, ...]) -> tuple[int, ...]:
        """Unit ``coords``'s shape inside the array (smaller than a unit at the edges)."""
        return tuple(min(u, n - i * u) for i, u, n in zip(coords, self.unit, self.shape))


class _ChunkWriter(_RowsInPlace):
    """Writes regions made of whole chunks, one file per chunk."""

    def __init__(self, root: str, key: Any, chunks: tuple[int, ...], shape: tuple[int, ...],
                 dtype: np.dtype, fill: Any, encode: Encoder) -> None:
        self.root, self.key, self.chunks, self.shape = root, key, chunks, tuple(shape)
        self.unit = chunks
        self.dtype, self.fill, self.encode = dtype, fill, encode
        self.made: set[str] = set()

    def prepare(self, regions: list[tuple[slice, ...]]) -> int:
        """Make the directories of these regions' chunk files ahead of the writes."""
        return _prepare(self.root, self.key, self.chunks, regions, self.made)

    @property
    def raw(self) -> bool:
        """Whether rows can be written in place: a chunk's file is its elements' bytes in C order."""
        return self.encode is _raw

    def _layout(self, coords: tuple[int, ...]) -> tuple[tuple[int, ...], int, int, bytes | None, bytes | None]:
        ext = self._extent(coords)
        return ext, 0, self.chunks[0], None, None

    def __call__(self, region: tuple[slice, ...], data: Data) -> int:
        starts = [r.start for r in region]
        if any(s % c for s, c in zip(starts, self.chunks)):
            raise ValueError(f"region {region} does not start on a chunk edge")
        data = _as_data(data, self.dtype)
        written = 0
        for coords in _units(region, self.chunks):
            sel = tuple(
                slice(i * c - s, min((i + 1) * c, r.stop) - s)
                for i, c, s, r in zip(coords, self.chunks, starts, region)
            )
            if any(i * c + (sl.stop - sl.start) < min((i + 1) * c, n)
                   for i, c, sl, n in zip(coords, self.chunks, sel, self.shape)):
                raise ValueError(f"region {region} holds only part of chunk {coords}")
            into = arena()
            into.reset()
            parts = self.encode(_chunk(data, sel, self.chunks, self.fill), into)
            _put(os.path.join(self.root, self.key(coords)), parts, self.made)
            del parts
            into.reset()  # written: a large arena goes now
            written += _nbytes(sel, self.dtype)
        return written


class _ShardWriter(_RowsInPlace):
    """Writes regions made of whole shards: inner chunks then the index, as Zarr does."""

    def __init__(self, root: str, key: Any, shards: tuple[int, ...], inner: tuple[int, ...],
                 shape: tuple[int, ...], dtype: np.dtype, fill: Any, encode: Encoder, at_start: bool) -> None:
        self.root, self.key, self.shards, self.inner = root, key, shards, inner
        self.shape, self.dtype, self.fill, self.encode = tuple(shape), dtype, fill, encode
        self.at_start = at_start
        self.per_shard = tuple(s // c for s, c in zip(shards, inner))
        self.index_size = math.prod(self.per_shard) * 16 + 4  # (offset, nbytes) per chunk, CRC32C
        self.unit = shards
        self.made: set[str] = set()

    @property
    def raw(self) -> bool:
        """Whether rows can be written in place: uncompressed inner chunks spanning the shard
        on every axis but the first, so the shard's rows follow each other in its file."""
        return self.encode is _raw and self.inner[1:] == self.shards[1:]

    def _layout(self, coords: tuple[int, ...]) -> tuple[tuple[int, ...], int, int, bytes | None, bytes | None]:
        # The inner chunks that reach into the array are stored, in order,
        # each padded to its full shape; the index says where each one is.
        ext = self._extent(coords)
        stored = -(-ext[0] // self.inner[0])
        chunk_bytes = math.prod(self.inner) * self.dtype.itemsize
        index = np.full((*self.per_shard, 2), MAX_UINT_64, dtype="<u8")
        for i in range(stored):
            index[(i, *(0 for _ in self.per_shard[1:]))] = (i * chunk_bytes, chunk_bytes)
        index_bytes = self._index_bytes(index)
        if self.at_start:
            return ext, self.index_size, stored * self.inner[0], index_bytes, None
        return ext, 0, stored * self.inner[0], None, index_bytes

    def _index_bytes(self, index: np.ndarray, absolute: bool = False) -> bytes:
        """The shard's index as stored, then its CRC32C.

        Offsets are of the chunks' bytes; when the index comes first they are
        moved past it, unless they are ``absolute`` (file offsets already).
        """
        import google_crc32c

        if self.at_start and not absolute:
            used = index[..., 0] != MAX_UINT_64
            index[..., 0][used] += np.uint64(self.index_size)
        raw = index.tobytes()
        return raw + np.uint32(google_crc32c.value(raw)).tobytes()

    def prepare(self, regions: list[tuple[slice, ...]]) -> int:
        """Make the directories of these regions' shard files ahead of the writes."""
        return _prepare(self.root, self.key, self.shards, regions, self.made)

    def __call__(self, region: tuple[slice, ...], data: Data) -> int:
        starts = [r.start for r in region]
        if any(s % c for s, c in zip(starts, self.shards)):
            raise ValueError(f"region {region} does not start on a shard edge")
        data = _as_data(data, self.dtype)
        written = 0
        for scoords in _units(region, self.shards):
            origin = [i * c - s for i, c, s in zip(scoords, self.shards, starts)]
            pieces: list[Any] = []
            index = np.full((*self.per_shard, 2), MAX_UINT_64, dtype="<u8")
            offset = 0
            into = arena()
            into.reset()
            for icoords in itertools.product(*(range(n) for n in self.per_shard)):
                lo = [o + j * c for o, j, c in zip(origin, icoords, self.inner)]
                absolute = [s + l for s, l in zip(starts, lo)]
                if any(a >= n for a, n in zip(absolute, self.shape)):
                    continue  # wholly outside the array: not stored
                sel = tuple(slice(l, min(l + c, n - s)) for l, c, n, s in zip(lo, self.inner, self.shape, starts))
                if any(sl.stop > r.stop - s for sl, r, s in zip(sel, region, starts)):
                    raise ValueError(f"region {region} holds only part of shard {scoords}")
                enc = self.encode(_chunk(data, sel, self.inner, self.fill), into)
                nbytes = sum(memoryview(e).nbytes for e in enc)
                index[icoords] = (offset, nbytes)
                pieces.extend(enc)
                offset += nbytes
                written += _nbytes(sel, self.dtype)
            if not pieces:
                continue
            index_bytes = self._index_bytes(index)
            parts = [index_bytes, *pieces] if self.at_start else [*pieces, index_bytes]
            _put(os.path.join(self.root, self.key(scoords)), parts, self.made)
            del parts, pieces
            into.reset()  # written: a large arena goes now
        return written

    def append_chunks(
        self, scoords: tuple[int, ...], chunks: list[tuple[tuple[int, ...], np.ndarray]], token: str
    ) -> list[tuple[int, int, int]]:
        """Encode whole inner chunks of shard ``scoords`` and append them to the run's partial file of it.

        Each chunk is ``(inner coords in the shard, data)``, ``data`` as far
        as the array goes (padded here with the fill value). A compressed
        chunk's size is known only once it is encoded, so writers that fill
        one shard cannot agree on offsets ahead; instead each appends its
        chunks with one ``O_APPEND`` write (more only past a ``writev``'s
        limits, each of whole chunks), which POSIX makes atomic against the
        other writers of the file (processes of one host), and learns where
        they landed. No byte moves between workers and none is read
        back. The index is written last, from every writer's entries
        (:meth:`close_shards`); until :meth:`commit` the file keeps its
        partial name. A recomputed task appends its chunks again: the
        earlier copy is never indexed, so it costs space, not correctness.

        Returns ``(flat inner index, file offset, nbytes)`` per chunk.

        >>> w.append_chunks((2, 0), [((0, 0), a[8192:8448]), ((1, 0), a[8448:8704])], run)  # doctest: +SKIP
        [(0, 0, 1986512), (1, 1986512, 1986871)]
        """
        encoded: list[tuple[int, list[Any], int]] = []  # (flat index, buffers, nbytes) per chunk
        into = arena()
        into.reset()
        for icoords, data in chunks:
            if any(not 0 <= i < n for i, n in zip(icoords, self.per_shard)) or len(icoords) != len(self.per_shard):
                raise ValueError(f"inner chunk {icoords} is not in a shard of {self.per_shard} chunks")
            start = [s * u + i * c for s, u, i, c in zip(scoords, self.shards, icoords, self.inner)]
            ext = tuple(min(c, n - a) for c, n, a in zip(self.inner, self.shape, start))
            data = np.asarray(data, dtype=self.dtype)
            if data.shape != ext or min(ext) <= 0:
                raise ValueError(
                    f"inner chunk {icoords} of shard {scoords} (extent {ext}) cannot hold data of shape {data.shape}"
                )
            whole = tuple(slice(0, n) for n in ext)
            enc = [memoryview(e).cast("B") for e in self.encode(_chunk(data, whole, self.inner, self.fill), into)]
            nbytes = sum(e.nbytes for e in enc)
            if nbytes > _APPEND_MAX:
                raise ValueError(
                    f"inner chunk {icoords} of shard {scoords} is {nbytes} bytes encoded, more than one "
                    f"append writes ({_APPEND_MAX}); use smaller inner chunks"
                )
            if len(enc) > _IOV_MAX:
                enc = [memoryview(b"".join(enc))]
            encoded.append((int(np.ravel_multi_index(icoords, self.per_shard)), enc, nbytes))
        if not encoded:
            return []
        path = os.path.join(self.root, self.key(scoords))
        _parent(path, self.made)
        partial = _partial(path, token)
        out: list[tuple[int, int, int]] = []
        fd = self._open_for_append(partial, scoords)
        try:
            # Each append is whole chunks, so another writer's appends may
            # fall between two of them but never inside a chunk. Batches stay
            # within what one writev takes (buffers, and Linux's ~2 GiB).
            k = 0
            while k < len(encoded):
                end, nbufs, total = k, 0, 0
                while end < len(encoded) and (end == k or (
                    nbufs + len(encoded[end][1]) <= _IOV_MAX and total + encoded[end][2] <= _APPEND_MAX
                )):
                    nbufs += len(encoded[end][1])
                    total += encoded[end][2]
                    end += 1
                n = os.writev(fd, [b for _, bufs, _ in encoded[k:end] for b in bufs])
                if n != total:  # a full disk: the run fails, nothing is committed
                    raise OSError(f"appending {total} bytes to {partial!r} wrote {n}")
                # This descriptor's own position: the end of this write,
                # whatever the other writers of the file appended since.
                offset = os.lseek(fd, 0, os.SEEK_CUR) - total
                for flat, _, nbytes in encoded[k:end]:
                    out.append((flat, offset, nbytes))
                    offset += nbytes
                k = end
        finally:
            os.close(fd)
            into.reset()  # let a large arena go now, not at this thread's next unit
        return out

    def _open_for_append(self, partial: str, scoords: tuple[int, ...]) -> int:
        """Open the run's partial file of shard ``scoords`` to append to, holding a shared lock until it is closed.

        The lock and the check after it make an append and the shard's seal
        (:meth:`close_shards`) exclusive: an append that began before the
        seal ends before the index is written, and one that would begin
        after it (a task Dask gave up on, still running on a worker it
        declared dead) is refused, even with the file opened before the
        seal, instead of landing after the index. Where the index comes
        first, its room is made here, under an exclusive lock, before any
        chunk is appended (no hard links needed).
        """
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if self.at_start and os.fstat(fd).st_size < self.index_size:
                # Converting a flock is not atomic (the shared lock goes
                # first), so the size is checked again under the exclusive one.
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_size < self.index_size:
                    os.ftruncate(fd, self.index_size)
                fcntl.flock(fd, fcntl.LOCK_SH)
            mine = os.fstat(fd)
            try:
                named = os.stat(partial)
            except FileNotFoundError:
                named = None
            if named is None or (named.st_dev, named.st_ino) != (mine.st_dev, mine.st_ino):
                raise SinkError(
                    f"shard {scoords} of this to_zarr run was sealed before this append: the task is a stale "
                    "copy of one Dask already ran again elsewhere; its chunks were not written"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close_shards(self, entries: dict[tuple[int, ...], list[tuple[int, int, int]]], token: str) -> str:
        """Seal each shard whose chunks were appended (:meth:`append_chunks`) and write its index.

        ``entries`` holds every writer's entries of each shard; every inner
        chunk that reaches into the array must be there exactly once. Call
        once every append is done. Each partial file is first renamed to a
        sealed name, then locked exclusively: a late append (from a task
        Dask gave up on and ran again elsewhere) either ended before the
        lock or is refused after it (:meth:`_open_for_append`); one that
        opens the partial name anew makes a new partial file, never
        committed. None lands after the index. The index goes right after
        the last indexed chunk (or in the room at the start) and the file is
        cut there. Returns the token to :meth:`commit` the sealed files with.
        """
        sealed_token = f"{token}{_SEALED}"
        for scoords, ents in entries.items():
            index = np.full((*self.per_shard, 2), MAX_UINT_64, dtype="<u8")
            flat = index.reshape(-1, 2)
            for i, offset, nbytes in ents:
                if flat[i, 0] != MAX_UINT_64:
                    raise ValueError(f"inner chunk {i} of shard {scoords} was appended twice in one run")
                flat[i] = (offset, nbytes)
            if (flat[:, 0] != MAX_UINT_64).sum() != self._stored(scoords):
                raise ValueError(
                    f"shard {scoords} got {len(ents)} of its {self._stored(scoords)} inner chunks; this is a bug"
                )
            data = self._index_bytes(index, absolute=True)
            path = os.path.join(self.root, self.key(scoords))
            sealed = _partial(path, sealed_token)
            if not os.path.exists(sealed):  # else sealed by an earlier attempt: never replace it
                os.replace(_partial(path, token), sealed)
            fd = os.open(sealed, os.O_WRONLY | os.O_CLOEXEC)
            try:
                # Appends that got their lock before the seal end first; any
                # later one sees the name gone and refuses (_open_for_append).
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._check_spans(scoords, ents, os.fstat(fd).st_size)
                end = max(o + n for _, o, n in ents)
                if self.at_start:
                    _pwrite_all(fd, [memoryview(data)], 0)
                    os.ftruncate(fd, end)
                else:
                    _pwrite_all(fd, [memoryview(data)], end)
                    os.ftruncate(fd, end + len(data))
            finally:
                os.close(fd)
        return sealed_token

    def _check_spans(self, scoords: tuple[int, ...], ents: list[tuple[int, int, int]], size: int) -> None:
        """Refuse chunks that overlap, reach past the file or into the index's room.

        Appends are atomic on a local file system; where they are not (a
        shared file system across hosts), chunks would overlap silently.
        """
        low = self.index_size if self.at_start else 0
        end = low
        for offset, nbytes in sorted((o, n) for _, o, n in ents):
            if offset < end or offset + nbytes > size:
                raise ValueError(
                    f"shard {scoords}: a chunk at bytes [{offset}, {offset + nbytes}) overlaps another, "
                    f"the index's room or the file's end ({size}); appends were not atomic"
                )
            end = offset + nbytes

    def _stored(self, scoords: tuple[int, ...]) -> int:
        """How many inner chunks of shard ``scoords`` reach into the array (are stored)."""
        return math.prod(
            -(-min(u, n - s * u) // c) for s, u, c, n in zip(scoords, self.shards, self.inner, self.shape)
        )
