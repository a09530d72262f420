"""Shards written directly: whole shards, rows in place, or inner chunks appended.

:class:`ShardWriter` writes a sharded array's units: a whole shard with its
index (``bytes`` + ``crc32c``), rows of uncompressed full-width inner chunks
in place, or whole inner chunks appended (``O_APPEND``, under ``flock``) to
a shard's partial file by several writers, whose index is written once all
are in (:meth:`ShardWriter.close_shards`).
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import numpy as np

from aimss_dask.core.errors import SinkError
from aimss_dask.sink.chunkfiles import (
    APPEND_MAX,
    IOV_MAX,
    MAX_UINT_64,
    SEALED_SUFFIX,
    Data,
    Encoder,
    RowsInPlace,
    as_data,
    chunk_parts,
    fcntl,
    parent_dir,
    partial_path,
    prepare_units,
    put_file,
    pwrite_all,
    raw,
    region_nbytes,
    unit_coords,
)
from aimss_dask.sink.zstd_into import arena


class ShardWriter(RowsInPlace):
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
        return self.encode is raw and self.inner[1:] == self.shards[1:]

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
        return prepare_units(self.root, self.key, self.shards, regions, self.made)

    def __call__(self, region: tuple[slice, ...], data: Data) -> int:
        starts = self._aligned_starts(region, "shard")
        data = as_data(data, self.dtype)
        written = 0
        for scoords in unit_coords(region, self.shards):
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
                enc = self.encode(chunk_parts(data, sel, self.inner, self.fill), into)
                nbytes = sum(memoryview(e).nbytes for e in enc)
                index[icoords] = (offset, nbytes)
                pieces.extend(enc)
                offset += nbytes
                written += region_nbytes(sel, self.dtype)
            if not pieces:
                continue
            index_bytes = self._index_bytes(index)
            parts = [index_bytes, *pieces] if self.at_start else [*pieces, index_bytes]
            put_file(os.path.join(self.root, self.key(scoords)), parts, self.made)
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
        into = arena()
        encoded = self._encode(scoords, chunks, into)
        if not encoded:
            return []
        path = os.path.join(self.root, self.key(scoords))
        parent_dir(path, self.made)
        partial = partial_path(path, token)
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
                    nbufs + len(encoded[end][1]) <= IOV_MAX and total + encoded[end][2] <= APPEND_MAX
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

    def chunk_bound(self) -> int:
        """The most bytes one inner chunk takes encoded (the direct writer's codecs: raw or zstd)."""
        n = math.prod(self.inner) * self.dtype.itemsize
        if self.encode is raw:
            return n
        # ZSTD_COMPRESSBOUND, and room for the frame's checksum.
        return n + (n >> 8) + ((((128 << 10) - n) >> 11) if n < (128 << 10) else 0) + 16

    def first_offset(self) -> int:
        """Where chunks may start in a shard's file: after the index's room where it comes first."""
        return self.index_size if self.at_start else 0

    def write_chunks_at(
        self, scoords: tuple[int, ...], chunks: list[tuple[tuple[int, ...], np.ndarray]], token: str,
        offset: int, limit: int, sync: bool = False,
    ) -> list[tuple[int, int, int]]:
        """As :meth:`append_chunks`, into the byte range ``[offset, offset + limit)`` reserved for them.

        For writers on several hosts of a shared file system, where
        ``O_APPEND`` and ``flock`` do not keep writers apart: the run's graph
        gave each job of a shard a range of its own, sized by
        :meth:`chunk_bound`, so no byte is written twice by different jobs
        and nothing is negotiated at run time. A job run again writes the
        same bytes at the same place. Between ranges the file has holes
        (sparse; the index says where each chunk is). ``sync``: fsync the
        file before returning (the last task's fsync reaches only its host).
        """
        into = arena()
        encoded = self._encode(scoords, chunks, into)
        try:
            total = sum(n for _, _, n in encoded)
            if total > limit:
                raise SinkError(
                    f"inner chunks of shard {scoords} took {total} bytes encoded, more than the {limit} "
                    "reserved for them; this is a bug, please report it"
                )
            if not encoded:
                return []
            path = os.path.join(self.root, self.key(scoords))
            parent_dir(path, self.made)
            fd = os.open(partial_path(path, token), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                pwrite_all(fd, [b for _, bufs, _ in encoded for b in bufs], offset)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            out = []
            for flat, _, nbytes in encoded:
                out.append((flat, offset, nbytes))
                offset += nbytes
            return out
        finally:
            into.reset()

    def _encode(
        self, scoords: tuple[int, ...], chunks: list[tuple[tuple[int, ...], np.ndarray]], into: Any
    ) -> list[tuple[int, list[Any], int]]:
        """Each inner chunk encoded: ``(flat index in the shard, buffers, nbytes)``."""
        encoded: list[tuple[int, list[Any], int]] = []  # (flat index, buffers, nbytes) per chunk
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
            enc = [memoryview(e).cast("B") for e in self.encode(chunk_parts(data, whole, self.inner, self.fill), into)]
            nbytes = sum(e.nbytes for e in enc)
            if nbytes > APPEND_MAX:
                raise ValueError(
                    f"inner chunk {icoords} of shard {scoords} is {nbytes} bytes encoded, more than one "
                    f"append writes ({APPEND_MAX}); use smaller inner chunks"
                )
            if len(enc) > IOV_MAX:
                enc = [memoryview(b"".join(enc))]
            encoded.append((int(np.ravel_multi_index(icoords, self.per_shard)), enc, nbytes))
        return encoded

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
        sealed_token = f"{token}{SEALED_SUFFIX}"
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
            sealed = partial_path(path, sealed_token)
            if not os.path.exists(sealed):  # else sealed by an earlier attempt: never replace it
                os.replace(partial_path(path, token), sealed)
            fd = os.open(sealed, os.O_WRONLY | os.O_CLOEXEC)
            try:
                # Appends that got their lock before the seal end first; any
                # later one sees the name gone and refuses (_open_for_append).
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._check_spans(scoords, ents, os.fstat(fd).st_size)
                end = max(o + n for _, o, n in ents)
                if self.at_start:
                    pwrite_all(fd, [memoryview(data)], 0)
                    os.ftruncate(fd, end)
                else:
                    pwrite_all(fd, [memoryview(data)], end)
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
