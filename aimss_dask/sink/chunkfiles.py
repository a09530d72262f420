"""Unit files: how a whole unit (a chunk, or a shard) is written, in place or whole.

A unit is encoded into buffers and written as one file next to Zarr's, first
under a private name, then renamed (:func:`put_file`); rows of uncompressed
units may be written in place by several writers into a partial file named
for the run, then committed (:class:`RowsInPlace`). :class:`ChunkWriter`
writes chunks; :mod:`aimss_dask.sink.shards` writes shards.
"""

from __future__ import annotations

import itertools
import math
import os
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from aimss_dask.sink.assembler import RowSlabs
from aimss_dask.sink.fsync import fsync_dir, fsync_file
from aimss_dask.sink.zstd_into import Arena, arena

try:
    import fcntl
except ImportError:  # not POSIX: no appends in place (see direct.in_place_writers)
    fcntl = None  # type: ignore[assignment]

#: What a region is written from: an array, or a unit's row slabs.
Data = np.ndarray | RowSlabs


MAX_UINT_64 = np.uint64(2**64 - 1)


#: A chunk's parts (in C order) to the buffers that store it. Buffers may
#: live in the arena: valid until its next ``reset``, so each unit's writer
#: resets the thread's arena before it encodes and writes before the next.
Encoder = Callable[[list[np.ndarray], Arena], list[Any]]


def raw(parts: list[np.ndarray], into: Arena | None = None) -> list[Any]:
    # Uncompressed: the chunk's bytes are its parts' bytes in order, so the
    # parts are written as they are (no concatenation copy).
    return [memoryview(np.ascontiguousarray(p)).cast("B") for p in parts]


def parent_dir(path: str, made: set[str]) -> None:
    """Make ``path``'s directory once per writer (Zarr v3 keys ``c/i/j`` need one per row)."""
    parent = os.path.dirname(path)
    if parent not in made:
        os.makedirs(parent, exist_ok=True)
        made.add(parent)


def unit_coords(region: tuple[slice, ...], unit: tuple[int, ...]) -> Any:
    """The grid coordinates of the units (chunks or shards) that ``region`` touches."""
    return itertools.product(*(range(r.start // u, -(-r.stop // u)) for r, u in zip(region, unit)))


def prepare_units(root: str, key: Any, unit: tuple[int, ...], regions: list[tuple[slice, ...]], made: set[str]) -> int:
    """Make the directories that the files of ``regions`` (whole units) go in; how many distinct ones."""
    before = len(made)
    for region in regions:
        for coords in unit_coords(region, unit):
            parent_dir(os.path.join(root, key(coords)), made)
    return len(made) - before


#: Temporary names: unique to this process (and host) once, then a counter.
#: A fresh ``uuid4`` per chunk cost a ``getrandom`` call per file.
_TMP_PREFIX = uuid.uuid4().hex


_tmp_count = itertools.count()


def _private(path: str) -> str:
    """A name next to ``path`` that no other writer (process or call) uses."""
    return f"{path}.{_TMP_PREFIX}-{os.getpid()}-{next(_tmp_count)}"


def put_file(path: str, parts: list[Any], made: set[str]) -> None:
    """Write ``parts`` to ``path`` atomically (a reader never sees half a chunk)."""
    parent_dir(path, made)
    tmp = f"{_private(path)}.partial"
    with open(tmp, "wb") as f:
        for part in parts:
            f.write(part)
    os.replace(tmp, path)


def partial_path(path: str, token: str) -> str:
    """The file a run's rows of the chunk at ``path`` are written into before :meth:`RowsInPlace.commit`."""
    return f"{path}.{token}.partial"


#: Most buffers one ``pwritev`` takes (Linux: 1024).
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


#: Marks the partial files of shards whose index is being written (:meth:`ShardWriter.close_shards`).
SEALED_SUFFIX = "-sealed"


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def commit_marker(root: str, token: str) -> str:
    """The file that lists the units a commit of ``token`` renames, in the array's folder, while it runs."""
    return os.path.join(root, f".aimss-commit-{token}.json")


def _write_json(path: str, doc: Any, durable: bool) -> None:
    """``doc`` at ``path``, whole or not at all (written aside, then renamed); on disk if ``durable``."""
    import json

    tmp = f"{_private(path)}.partial"
    with open(tmp, "w") as f:
        json.dump(doc, f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


#: Most bytes one append writes (Linux writes at most ~2 GiB per call).
APPEND_MAX = 2**30


def pwrite_all(fd: int, parts: list[memoryview], offset: int) -> None:
    """Write ``parts`` back to back from ``offset``, however short each ``pwritev`` falls."""
    todo = [p for p in parts if p.nbytes]
    while todo:
        n = os.pwritev(fd, todo[:IOV_MAX], offset)
        if n <= 0:
            raise OSError(f"pwritev wrote {n} bytes at offset {offset}")
        offset += n
        while todo and n >= todo[0].nbytes:
            n -= todo[0].nbytes
            todo.pop(0)
        if n:
            todo[0] = todo[0][n:]


def chunk_parts(data: Data, sel: tuple[slice, ...], shape: tuple[int, ...], fill: Any) -> list[np.ndarray]:
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


def region_nbytes(sel: tuple[slice, ...], dtype: np.dtype) -> int:
    return math.prod(s.stop - s.start for s in sel) * dtype.itemsize


def as_data(data: Any, dtype: np.dtype) -> Data:
    if isinstance(data, RowSlabs):
        return data if data.dtype == dtype else data.materialize().astype(dtype)
    return np.asarray(data, dtype=dtype)


class RowsInPlace:
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

    def sync_partial(self, coords: tuple[int, ...], token: str) -> None:
        """fsync the run's partial file of unit ``coords``: what this process wrote there is on disk."""
        fsync_file(partial_path(os.path.join(self.root, self.key(coords)), token))

    def write_rows(
        self, coords: tuple[int, ...], pieces: list[tuple[tuple[int, int], np.ndarray]], token: str
    ) -> int:
        """Write row ranges ``[lo, hi)`` of unit ``coords`` into the run's partial file of it.

        Each piece is ``((lo, hi), data)``, ``data`` spanning the unit whole
        on every axis but the first, as far as the array goes. Those rows are
        one byte range of the file, so several writers (processes of one
        host, or of several on a shared parallel file system) fill one unit
        without moving its rows between them, and none
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
        parent_dir(path, self.made)
        fd = os.open(partial_path(path, token), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            for offset, bufs in runs:
                pwrite_all(fd, bufs, offset)
        finally:
            os.close(fd)
        return int(written)

    def commit(self, coords: list[tuple[int, ...]], token: str, durable: bool = False, nbytes: int = 0) -> None:
        """Give each unit's partial file (see :meth:`write_rows`) its Zarr key, atomically.

        The units to commit, with their checked partial files' inode
        numbers, are written down first (:func:`commit_marker`), so that a
        commit cut short (its worker died between two renames) is finished
        by the task's next attempt (:meth:`resume_commit`) instead of
        leaving the array half old and half new. ``nbytes``: what the run
        wrote, for that attempt to report.
        """
        paths = [os.path.join(self.root, self.key(c)) for c in coords]
        inodes = [os.stat(partial_path(p, token)).st_ino for p in paths]
        marker = commit_marker(self.root, token)
        units = [[*c, i] for c, i in zip(coords, inodes)]
        _write_json(marker, {"token": token, "units": units, "nbytes": int(nbytes)}, durable)
        for n, path in enumerate(paths):
            try:
                os.replace(partial_path(path, token), path)
            except Exception as e:  # not a crash: nobody will finish it, say what it left
                os.unlink(marker)
                raise OSError(
                    f"committing the run's units into the array at {self.root} failed after {n} of "
                    f"{len(paths)} ({type(e).__name__}: {e}): the array holds both old and new units; "
                    "write it again"
                ) from e
        os.unlink(marker)

    def resume_commit(self, run: str) -> tuple[int, int] | None:
        """Finish a commit of run ``run`` that was cut short: ``(units renamed now, bytes the run wrote)``; None if none was begun.

        A unit is done when its key names the partial file the commit
        checked (the same inode); otherwise that partial file gets the
        key. A partial file made after the commit began (a write task Dask
        ran again, into a unit already committed) is never committed: the
        caller discards it. A unit with neither file is lost: raised.
        """
        import json

        for token in (run, f"{run}{SEALED_SUFFIX}"):
            marker = commit_marker(self.root, token)
            try:
                with open(marker, "rb") as f:
                    doc = json.load(f)
            except FileNotFoundError:
                continue
            done = 0
            for *c, inode in doc["units"]:
                path = os.path.join(self.root, self.key(tuple(c)))
                if _inode(path) == inode:
                    continue  # renamed before the cut
                partial = partial_path(path, doc["token"])
                if _inode(partial) != inode:
                    raise FileNotFoundError(
                        f"unit {tuple(c)} of the array at {self.root} lost its checked partial file "
                        f"{partial} while its commit was cut short: the array holds both old and new units"
                    )
                os.replace(partial, path)
                done += 1
            os.unlink(marker)
            return done, int(doc.get("nbytes", 0))
        return None

    def discard(self, token: str) -> int:
        """Remove the partial files run ``token`` left; the units themselves stay as they were.

        Returns how many were removed.
        """
        suffixes = (partial_path("", token), partial_path("", f"{token}{SEALED_SUFFIX}"))
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

    def _aligned_starts(self, region: tuple[slice, ...], what: str) -> list[int]:
        """``region``'s first index on each axis; raises unless each is on a unit's edge."""
        starts = [r.start for r in region]
        if any(s % c for s, c in zip(starts, self.unit)):
            raise ValueError(f"region {region} does not start on a {what} edge")
        return starts

    def _extent(self, coords: tuple[int, ...]) -> tuple[int, ...]:
        """Unit ``coords``'s shape inside the array (smaller than a unit at the edges)."""
        return tuple(min(u, n - i * u) for i, u, n in zip(coords, self.unit, self.shape))


class ChunkWriter(RowsInPlace):
    """Writes regions made of whole chunks, one file per chunk."""

    def __init__(self, root: str, key: Any, chunks: tuple[int, ...], shape: tuple[int, ...],
                 dtype: np.dtype, fill: Any, encode: Encoder) -> None:
        self.root, self.key, self.chunks, self.shape = root, key, chunks, tuple(shape)
        self.unit = chunks
        self.dtype, self.fill, self.encode = dtype, fill, encode
        self.made: set[str] = set()

    def prepare(self, regions: list[tuple[slice, ...]]) -> int:
        """Make the directories of these regions' chunk files ahead of the writes."""
        return prepare_units(self.root, self.key, self.chunks, regions, self.made)

    @property
    def raw(self) -> bool:
        """Whether rows can be written in place: a chunk's file is its elements' bytes in C order."""
        return self.encode is raw

    def _layout(self, coords: tuple[int, ...]) -> tuple[tuple[int, ...], int, int, bytes | None, bytes | None]:
        ext = self._extent(coords)
        return ext, 0, self.chunks[0], None, None

    def __call__(self, region: tuple[slice, ...], data: Data) -> int:
        starts = self._aligned_starts(region, "chunk")
        data = as_data(data, self.dtype)
        written = 0
        for coords in unit_coords(region, self.chunks):
            sel = tuple(
                slice(i * c - s, min((i + 1) * c, r.stop) - s)
                for i, c, s, r in zip(coords, self.chunks, starts, region)
            )
            if any(i * c + (sl.stop - sl.start) < min((i + 1) * c, n)
                   for i, c, sl, n in zip(coords, self.chunks, sel, self.shape)):
                raise ValueError(f"region {region} holds only part of chunk {coords}")
            into = arena()
            into.reset()
            parts = self.encode(chunk_parts(data, sel, self.chunks, self.fill), into)
            put_file(os.path.join(self.root, self.key(coords)), parts, self.made)
            del parts
            into.reset()  # written: a large arena goes now
            written += region_nbytes(sel, self.dtype)
        return written
