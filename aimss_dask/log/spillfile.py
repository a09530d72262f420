"""Spilled segments on disk: a self-describing file, verified when read back.

A spill file is one sealed segment::

    b"AIMSSEG1" | header length (u32, little-endian) | header (JSON) | records

The header names what the file holds: stream, epoch, partition, the offset of
its first record, the number of records, their bytes, and the length and a
CRC32C of each. A file is complete in itself: a worker that takes over the
spill folder of one that died (:mod:`aimss_dask.log.salvage`) rebuilds its
index from the header (:func:`read_index`) and checks every record
(:func:`verify`) before the log trusts it.
The log keeps the same facts in memory, so a read compares what it expects
with what the file says, then checks the checksum of every record it returns.
A file of another worker, another partition or an older epoch, a truncated
file or flipped bits raise :class:`SpillCorruptionError`: never wrong data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed.protocol import deserialize_bytes
from distributed.protocol.serialize import serialize_bytelist

from aimss_dask.core.errors import SpillCorruptionError
from aimss_dask.log.records import SERIALIZERS, freeze

MAGIC = b"AIMSSEG1"
_LEN = struct.Struct("<I")
_PREFIX = len(MAGIC) + _LEN.size

try:  # zarr depends on it; hardware CRC32C runs at several GB/s
    from google_crc32c import extend as _crc_extend

    CHECKSUM = "crc32c"

    def _crc(data: Any, crc: int = 0) -> int:
        # Its argument parser refuses memoryviews and bytearrays but takes a
        # NumPy array over the same memory: no copy.
        return int(_crc_extend(crc, np.frombuffer(_bytes_view(data), dtype=np.uint8)))

except ImportError:  # pragma: no cover - a zarr without google-crc32c
    import zlib

    CHECKSUM = "crc32"

    def _crc(data: Any, crc: int = 0) -> int:
        return zlib.crc32(_bytes_view(data), crc)


def _bytes_view(data: Any) -> memoryview:
    """``data`` (any contiguous buffer) as a flat view of bytes."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


@dataclass(frozen=True)
class SegmentId:
    """Which records a spill file must hold: what a read expects to find."""

    stream: str
    epoch: int
    partition: int
    base: int  # offset of the first record


@dataclass(frozen=True)
class SpillIndex:
    """Where each record of one spill file lies, and its checksum."""

    data_start: int  # first byte after the header
    spans: tuple[tuple[int, int], ...]  # (start, length) relative to data_start
    crcs: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.spans)


def dump(records: Sequence[Any], path: str, seg: SegmentId) -> SpillIndex:
    """Write ``records`` as the spill file of ``seg`` at ``path``.

    Written to ``path + ".tmp"`` and renamed, so a crash leaves no truncated
    file under the final name; the ``.tmp`` is removed if the write fails.
    """
    # "raise": by default Dask would write an error message in place of the record.
    blobs = [serialize_bytelist(r, serializers=SERIALIZERS, on_error="raise") for r in records]
    spans: list[tuple[int, int]] = []
    crcs: list[int] = []
    pos = 0
    for frames in blobs:
        crc, n = 0, 0
        for fr in frames:
            crc = _crc(fr, crc)
            n += memoryview(fr).nbytes
        spans.append((pos, n))
        crcs.append(crc)
        pos += n
    header = json.dumps(
        {
            "stream": seg.stream,
            "epoch": seg.epoch,
            "partition": seg.partition,
            "base": seg.base,
            "count": len(spans),
            "nbytes": pos,
            "checksum": CHECKSUM,
            "crcs": crcs,
            "lengths": [n for _, n in spans],
        }
    ).encode()
    tmp = path + ".tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(MAGIC)
            f.write(_LEN.pack(len(header)))
            f.write(header)
            for frames in blobs:
                for fr in frames:
                    f.write(fr)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return SpillIndex(_PREFIX + len(header), tuple(spans), tuple(crcs))


def load(path: str, seg: SegmentId, index: SpillIndex, first: int, stop: int) -> list[Any]:
    """Records ``first .. stop - 1`` of the spill file of ``seg``, verified.

    Raises :class:`SpillCorruptionError` when the file is not the one the log
    wrote (another stream, partition, epoch or offset), is shorter than its
    index says, or a record's checksum differs.
    """
    if first >= stop:
        return []
    with open(path, "rb") as f:
        _check_header(f, path, seg, index)
        start = index.spans[first][0]
        end = index.spans[stop - 1][0] + index.spans[stop - 1][1]
        # Writable memory: NumPy's deserializer copies an array whose buffer
        # is read-only (``bytes``), which doubled a reload's memory.
        buf = bytearray(end - start)
        f.seek(index.data_start + start)
        got = f.readinto(buf)
    if got != len(buf):
        raise SpillCorruptionError(
            f"spill file {path} of {_what(seg)} holds {index.data_start + start + got} "
            f"bytes where its index needs {index.data_start + end}: it was truncated; "
            "these records are lost"
        )
    view = memoryview(buf)
    out: list[Any] = []
    for i in range(first, stop):
        a, n = index.spans[i]
        piece = view[a - start : a - start + n]
        if _crc(piece) != index.crcs[i]:
            raise SpillCorruptionError(
                f"spill file {path}: record at offset {seg.base + i} of {_what(seg)} "
                f"fails its {CHECKSUM} check; the file was changed on disk and this "
                "record is lost"
            )
        # Arrays come back as views into ``buf``: one read, no further copies.
        out.append(freeze(deserialize_bytes(piece)))
    return out


def read_index(path: str) -> tuple[SegmentId, SpillIndex]:
    """What the spill file at ``path`` says it holds, and where each record lies, from its header alone.

    Raises :class:`SpillCorruptionError` when the file is not a complete
    segment file of this format: bad magic, an unreadable or inconsistent
    header, or fewer bytes than the header lists (a truncated file).
    """
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX)
            if len(prefix) != _PREFIX or prefix[: len(MAGIC)] != MAGIC:
                raise ValueError("bad magic")
            (hlen,) = _LEN.unpack(prefix[len(MAGIC) :])
            h = json.loads(f.read(hlen))
            size = os.fstat(f.fileno()).st_size
        seg = SegmentId(str(h["stream"]), int(h["epoch"]), int(h["partition"]), int(h["base"]))
        lengths = [int(n) for n in h["lengths"]]
        crcs = tuple(int(c) for c in h["crcs"])
        if h.get("checksum") != CHECKSUM or len(lengths) != int(h["count"]) or len(crcs) != len(lengths):
            raise ValueError("inconsistent header")
        if sum(lengths) != int(h["nbytes"]) or min(lengths, default=0) < 0:
            raise ValueError("inconsistent header")
    except (ValueError, KeyError, TypeError) as e:
        raise SpillCorruptionError(f"{path} is not a readable AIMSS segment file ({e})") from None
    spans, pos = [], 0
    for n in lengths:
        spans.append((pos, n))
        pos += n
    index = SpillIndex(_PREFIX + hlen, tuple(spans), crcs)
    if size != index.data_start + pos:
        raise SpillCorruptionError(
            f"spill file {path} of {_what(seg)} holds {size} bytes where its header lists "
            f"{index.data_start + pos}: it was cut short or appended to"
        )
    return seg, index


def verify(path: str, seg: SegmentId, index: SpillIndex, chunk: int = 16 * 2**20) -> None:
    """Check every record of the spill file at ``path`` against its checksum, without decoding it.

    Raises :class:`SpillCorruptionError` naming the first record that fails.
    Reads the file once, ``chunk`` bytes at a time (a record larger than
    that is read whole).
    """
    with open(path, "rb") as f:
        _check_header(f, path, seg, index)
        f.seek(index.data_start)
        i = 0
        while i < len(index.spans):
            j, n = i, 0
            while j < len(index.spans) and (j == i or n + index.spans[j][1] <= chunk):
                n += index.spans[j][1]
                j += 1
            buf = f.read(n)
            if len(buf) != n:
                raise SpillCorruptionError(f"spill file {path} of {_what(seg)} was truncated")
            view, pos = memoryview(buf), 0
            for k in range(i, j):
                ln = index.spans[k][1]
                if _crc(view[pos : pos + ln]) != index.crcs[k]:
                    raise SpillCorruptionError(
                        f"spill file {path}: record at offset {seg.base + k} of {_what(seg)} "
                        f"fails its {CHECKSUM} check"
                    )
                pos += ln
            i = j


def _check_header(f: Any, path: str, seg: SegmentId, index: SpillIndex) -> None:
    prefix = f.read(_PREFIX)
    if len(prefix) != _PREFIX or prefix[: len(MAGIC)] != MAGIC:
        raise SpillCorruptionError(
            f"spill file {path} of {_what(seg)} is not an AIMSS segment file "
            "(bad magic): something else wrote to it; these records are lost"
        )
    (hlen,) = _LEN.unpack(prefix[len(MAGIC) :])
    try:
        # Read as much as the file says (bounded), so a file of other records
        # is named as such rather than as a header of the wrong length.
        h = json.loads(f.read(min(hlen, 2 * index.data_start + 4096)))
        if not isinstance(h, dict):
            raise ValueError("not a mapping")
    except ValueError:
        raise SpillCorruptionError(
            f"spill file {path} of {_what(seg)} has an unreadable header; "
            "these records are lost"
        ) from None
    found = (h.get("stream"), h.get("epoch"), h.get("partition"), h.get("base"))
    if found != (seg.stream, seg.epoch, seg.partition, seg.base):
        raise SpillCorruptionError(
            f"spill file {path} holds stream {found[0]!r} epoch {found[1]} partition "
            f"{found[2]} from offset {found[3]}, not {_what(seg)}: another process "
            "wrote to this worker's spill folder; refusing to return its records"
        )
    if _PREFIX + hlen != index.data_start or (h.get("count"), h.get("nbytes"), h.get("crcs")) != (
        len(index.spans),
        index.nbytes,
        list(index.crcs),
    ):
        raise SpillCorruptionError(
            f"spill file {path} of {_what(seg)} lists {h.get('count')} records of "
            f"{h.get('nbytes')} bytes where the log wrote {len(index.spans)} of "
            f"{index.nbytes}; refusing to return its records"
        )


def _what(seg: SegmentId) -> str:
    return (
        f"stream {seg.stream!r} epoch {seg.epoch} partition {seg.partition} "
        f"(offsets from {seg.base})"
    )
