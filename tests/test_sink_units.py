"""The unit writer (``aimss_dask.sink.units``): one way every whole-unit path stores a unit.

Pure unit tests on real Zarr stores; the paths that use it (aligned and
push ``to_zarr``, the streaming sink) are tested on real clusters in their
own files, and ``test_stream_sink_writes_whole_units_directly`` below shows
the streaming sink goes through it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from conftest import unique_name

from aimss_dask.api.streams import create_stream, destroy_stream
from aimss_dask.sink.chunkfiles import ChunkWriter
from aimss_dask.sink.shards import ShardWriter
from aimss_dask.sink.units import ZarrUnits, unit_writer, whole_region


def _files(root: str) -> set[str]:
    out = set()
    for d, _, fs in os.walk(root):
        out.update(os.path.relpath(os.path.join(d, f), root) for f in fs if f not in ("zarr.json", ".zarray"))
    return out


@pytest.mark.parametrize("fmt", [2, 3])
def test_a_local_store_gets_the_direct_writer_and_zarr_reads_it_back(tmp_path, fmt):
    x = np.arange(60, dtype="f8").reshape(10, 6)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=x.shape, chunks=(4, 4), dtype="f8", zarr_format=fmt)
    put = unit_writer(z)
    assert isinstance(put, ChunkWriter)
    assert put.prepare([whole_region(x.shape, 0, 0, 10)]) >= 0
    assert put(whole_region(x.shape, 0, 0, 8), x[:8]) == x[:8].nbytes
    assert put(whole_region(x.shape, 0, 8, 2), x[8:]) == x[8:].nbytes  # the edge: whole units
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[:], x)


def test_a_sharded_array_gets_the_shard_writer(tmp_path):
    x = np.arange(32, dtype="i8").reshape(16, 2)
    z = zarr.create_array(str(tmp_path / "s.zarr"), shape=x.shape, chunks=(2, 2), shards=(8, 2), dtype="i8")
    put = unit_writer(z)
    assert isinstance(put, ShardWriter)
    put(whole_region(x.shape, 0, 0, 16), x)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "s.zarr"), mode="r")[:], x)


def test_other_stores_and_layouts_fall_back_to_zarr(tmp_path):
    x = np.arange(12, dtype="f4").reshape(6, 2)
    mem = zarr.create_array(zarr.storage.MemoryStore(), shape=x.shape, chunks=(3, 2), dtype="f4")
    big_endian = zarr.create_array(str(tmp_path / "b.zarr"), shape=x.shape, chunks=(3, 2), dtype=">f4")
    for z in (mem, big_endian):
        put = unit_writer(z)
        assert isinstance(put, ZarrUnits)
        assert put.prepare([whole_region(x.shape, 0, 0, 6)]) == 0
        assert put(whole_region(x.shape, 0, 0, 6), x) == x.nbytes
        np.testing.assert_array_equal(z[:], x)


def test_part_of_a_unit_is_refused_and_the_unit_is_left_as_it_was(tmp_path):
    """A direct writer never pads over the rows of a unit it was not given."""
    path = str(tmp_path / "p.zarr")
    z = zarr.create_array(path, shape=(8, 2), chunks=(4, 2), dtype="i8")
    z[:] = 7
    before = {f: open(os.path.join(path, f), "rb").read() for f in _files(path)}
    put = unit_writer(zarr.open_array(path, mode="r+"))
    with pytest.raises(ValueError, match="holds only part of chunk"):
        put(whole_region((8, 2), 0, 0, 2), np.zeros((2, 2), dtype="i8"))
    with pytest.raises(ValueError, match="does not start on a chunk edge"):
        put(whole_region((8, 2), 0, 2, 2), np.zeros((2, 2), dtype="i8"))
    assert {f: open(os.path.join(path, f), "rb").read() for f in _files(path)} == before
    assert (zarr.open_array(path, mode="r")[:] == 7).all()


def test_stream_sink_writes_whole_units_directly(client, tmp_path):
    """The streaming sink's rounds and its tail go through the unit writer.

    Zarr skips a chunk equal to the fill value (``write_empty_chunks`` is
    off by default); the direct writer stores every unit it is given. So
    all-zero records leave a file for every chunk, the tail's included,
    only if the owners and the driver wrote through the direct writer.
    """
    path = str(tmp_path / "z.zarr")
    zarr.create_array(path, shape=(0, 3), chunks=(4, 3), dtype="f8", compressors=None)
    s = create_stream(unique_name("units"), partitions=2)
    try:
        sink = s.to_zarr(path)
        for p in range(2):
            for _ in range(5):
                s.write(np.zeros((3, 3)), partition=p)  # 15 rows each: 3 full chunks + 3 rows
        s.seal()
        sink.wait(timeout=60)
        arr = zarr.open_array(path, mode="r")
        assert arr.shape == (30, 3) and not arr[:].any()
        assert sink.info()["chunks_written"] == 6  # six rounds' chunks; the tail is 6 rows
        chunk_files = {f for f in _files(path) if f.startswith("c")}
        assert len(chunk_files) == 8, sorted(chunk_files)  # ceil(30 / 4): the tail's two too
    finally:
        destroy_stream(s.name)


def test_whole_region_names_every_other_axis():
    assert whole_region((5, 2, 3), 1, 1, 1) == (slice(0, 5), slice(1, 2), slice(0, 3))
