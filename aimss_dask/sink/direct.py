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

import os
from typing import Any

import numpy as np

from aimss_dask.sink.assembler import joined
from aimss_dask.sink.chunkfiles import (
    ChunkWriter,
    Data,
    Encoder,
    RowsInPlace,
    fcntl,
    raw,
)
from aimss_dask.sink.shards import ShardWriter
from aimss_dask.sink.zstd_into import zstd_into

__all__ = ["Data", "direct_writer", "in_place_writers", "remove_partials"]


def direct_writer(array: Any) -> ChunkWriter | ShardWriter | None:
    """The direct writer of whole-unit regions of ``array`` (a ``UnitWriter``), or None if unsupported."""
    try:
        return _build(array)
    except Exception:  # an unexpected Zarr version or layout: use Zarr's own path
        return None


def _build(array: Any) -> ChunkWriter | ShardWriter | None:
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
        return ChunkWriter(root, meta.encode_chunk_key, tuple(array.chunks), array.shape, dtype, fill, encode)
    codecs = list(meta.codecs)
    if len(codecs) == 1 and type(codecs[0]).__name__ == "ShardingCodec":
        sharding = codecs[0]
        inner = _codecs_v3(list(sharding.codecs))
        index_ok = [type(c).__name__ for c in sharding.index_codecs] == ["BytesCodec", "Crc32cCodec"]
        if inner is None or not index_ok or not _little(sharding.index_codecs[0]):
            return None
        at_start = getattr(sharding.index_location, "value", sharding.index_location) == "start"
        return ShardWriter(
            root, meta.encode_chunk_key, tuple(array.shards), tuple(sharding.chunk_shape),
            array.shape, dtype, fill, inner, at_start,
        )
    encode = _codecs_v3(codecs)
    if encode is None:
        return None
    return ChunkWriter(root, meta.encode_chunk_key, tuple(array.chunks), array.shape, dtype, fill, encode)


def _little(codec: Any) -> bool:
    endian = getattr(codec, "endian", None)
    return endian is None or getattr(endian, "value", endian) == "little"


def _codecs_v3(codecs: list[Any]) -> Encoder | None:
    names = [type(c).__name__ for c in codecs]
    if names == ["BytesCodec"] and _little(codecs[0]):
        return raw
    if names == ["BytesCodec", "ZstdCodec"] and _little(codecs[0]):
        return _zstd(codecs[1].level, codecs[1].checksum)
    return None


def _compressor_v2(compressor: Any) -> Encoder | None:
    if compressor is None:
        return raw
    if type(compressor).__name__ == "Zstd" and compressor.codec_id == "zstd":
        cfg = compressor.get_config()
        return _zstd(cfg.get("level", 0), cfg.get("checksum", False))
    return None


def _zstd(level: int, checksum: bool) -> Encoder:
    into = zstd_into(level, checksum)
    if into is not None:  # the same frames, into reused memory
        return into
    from numcodecs import Zstd

    codec = Zstd(level=level, checksum=checksum)
    return lambda parts, _: [codec.encode(np.ascontiguousarray(joined(parts)))]


def in_place_writers(array: Any) -> tuple[RowsInPlace | None, ShardWriter | None]:
    """``array``'s writers in place, each None where ``array`` does not allow it.

    First, the writer of rows of its units in place
    (:meth:`RowsInPlace.write_rows`): uncompressed chunks, or, for a sharded
    array, uncompressed inner chunks that span the shard whole on every axis
    but the first. Second, the writer that appends whole inner chunks to its
    shards (:meth:`ShardWriter.append_chunks`): any codecs the direct writer
    supports, compressed or not, on a POSIX system.
    """
    w = direct_writer(array)
    rows = w if isinstance(w, RowsInPlace) and w.raw else None
    appender = w if isinstance(w, ShardWriter) and fcntl is not None else None
    return rows, appender


def remove_partials(array: Any, token: str) -> int:
    """Delete the partial files run ``token`` left in ``array`` (a local store); how many.

    For a run that failed before its commit, once its writers stopped.
    """
    w = direct_writer(array)
    return w.discard(token) if isinstance(w, RowsInPlace) else 0
