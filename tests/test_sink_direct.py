"""Direct chunk writes must produce exactly what ``zarr.open_array`` reads back."""

from __future__ import annotations

import fcntl
import itertools
import os
import threading
import time

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from aimss_dask.core.errors import SinkError
from aimss_dask.sink import shards
from aimss_dask.sink.assembler import RowSlabs, row_slabs
from aimss_dask.sink.direct import direct_writer


def _slabs(data, cuts):
    """``data`` cut along axis 0 at ``cuts``, as the records a unit receives (shuffled)."""
    edges = sorted({0, data.shape[0], *(c % (data.shape[0] + 1) for c in cuts)})
    records = [
        (((a, b), *((0, n) for n in data.shape[1:])), np.ascontiguousarray(data[a:b]))
        for a, b in zip(edges, edges[1:])
    ]
    slabs = row_slabs(records[::-1], data.shape, data.dtype)
    assert isinstance(slabs, RowSlabs)
    return slabs


def _write_units(z, x, unit, cuts=None):
    w = direct_writer(z)
    assert w is not None, z.metadata
    for idx in itertools.product(*(range(0, n, u) for n, u in zip(x.shape, unit))):
        region = tuple(slice(i, min(i + u, n)) for i, u, n in zip(idx, unit, x.shape))
        data = x[region] if cuts is None else _slabs(x[region], cuts)
        assert w(region, data) == x[region].nbytes
    return w


@st.composite
def layout(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 13), min_size=ndim, max_size=ndim)))
    chunks = tuple(draw(st.integers(1, n)) for n in shape)
    fmt = draw(st.sampled_from([2, 3]))
    shards = None
    if fmt == 3 and draw(st.booleans()):
        shards = tuple(c * draw(st.integers(1, 3)) for c in chunks)
    dtype = draw(st.sampled_from(["f8", "f4", "i8", "i2", "u1", "bool", "c16"]))
    compressed = draw(st.booleans())
    # Where a unit's data is cut into row slabs (None: one array).
    cuts = draw(st.none() | st.lists(st.integers(1, 13), max_size=4))
    return shape, chunks, shards, fmt, dtype, compressed, cuts


@settings(max_examples=80, deadline=None)
@given(layout())
def test_direct_writes_read_back_identical(tmp_path_factory, case):
    shape, chunks, shards, fmt, dtype, compressed, cuts = case
    x = (np.random.default_rng(1).random(shape) * 100).astype(dtype)
    path = str(tmp_path_factory.mktemp("d") / "a.zarr")
    kwargs = {} if compressed else {"compressors": None}
    z = zarr.create_array(path, shape=shape, chunks=chunks, shards=shards, zarr_format=fmt, dtype=dtype, **kwargs)
    _write_units(z, x, shards or chunks, cuts)
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], x)
    # The very chunks Zarr writes (zstd frames included: ours come from
    # zstd_into). In a shard Zarr lays chunks out in Morton order and we in C
    # order, so shards are compared chunk by chunk through their indexes.
    ref = str(tmp_path_factory.mktemp("ref") / "a.zarr")
    with zarr.config.set({"array.write_empty_chunks": True}):
        zarr.create_array(ref, shape=shape, chunks=chunks, shards=shards, zarr_format=fmt, dtype=dtype, **kwargs)[...] = x
    ours, theirs = _chunk_files(path), _chunk_files(ref)
    if shards is None:
        assert ours == theirs
    else:
        size = direct_writer(z).index_size
        assert set(ours) == set(theirs)
        for name in ours:
            assert _shard_chunks(ours[name], size, False) == _shard_chunks(theirs[name], size, False)


def test_row_slabs_are_written_without_a_copy(tmp_path, monkeypatch):
    """Uncompressed: the file is the slabs' bytes in order, each slab handed to write() as is."""
    from aimss_dask.sink import chunkfiles

    x = np.arange(8 * 3, dtype="f8").reshape(8, 3)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(8, 3), chunks=(8, 3), dtype="f8", compressors=None)
    slabs = _slabs(x, [3, 5])
    written = []
    real = chunkfiles.put_file
    monkeypatch.setattr(chunkfiles, "put_file", lambda path, parts, made: (written.append(parts), real(path, parts, made)))
    direct_writer(z)((slice(0, 8), slice(0, 3)), slabs)
    [parts] = written
    assert [np.frombuffer(p, "f8").size for p in parts] == [9, 6, 9]
    assert np.shares_memory(np.frombuffer(parts[1], "f8"), slabs.parts(3, 5)[0])
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"))[...], x)


@pytest.mark.parametrize(
    "records",
    [
        [(((0, 2), (0, 3)), np.zeros((2, 3)))],  # a gap: rows 2..4 missing
        [(((0, 2), (0, 3)), np.zeros((2, 3))), (((1, 4), (0, 3)), np.zeros((3, 3)))],  # an overlap
        [(((0, 4), (0, 2)), np.zeros((4, 2))), (((0, 4), (2, 3)), np.zeros((4, 1)))],  # column pieces
        [(((0, 4), (0, 3)), np.zeros((4, 3), dtype="f4"))],  # another dtype
    ],
)
def test_pieces_that_are_not_row_slabs_are_assembled_instead(records):
    assert row_slabs(records, (4, 3), np.dtype("f8")) is None


def test_index_at_the_start_of_a_shard(tmp_path):
    import json

    path = tmp_path / "a.zarr"
    zarr.create_array(str(path), shape=(17, 7), dtype="i4", chunks=(4, 3), shards=(8, 6))
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    meta["codecs"][0]["configuration"]["index_location"] = "start"
    (path / "zarr.json").write_text(json.dumps(meta))
    x = np.arange(17 * 7, dtype="i4").reshape(17, 7)
    _write_units(zarr.open_array(str(path), mode="r+"), x, (8, 6))
    np.testing.assert_array_equal(zarr.open_array(str(path))[...], x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"filters": [zarr.codecs.TransposeCodec(order=(1, 0))]},
        {"compressors": [zarr.codecs.BloscCodec()]},
        {"order": "F", "zarr_format": 2},
    ],
)
def test_other_layouts_fall_back_to_zarr(tmp_path, kwargs):
    try:
        z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(8, 8), chunks=(4, 4), dtype="f8", **kwargs)
    except Exception as e:  # a layout this zarr version refuses: nothing to fall back from
        pytest.skip(f"zarr refuses {kwargs}: {e}")
    assert direct_writer(z) is None


def test_other_stores_fall_back_to_zarr():
    z = zarr.create_array(zarr.storage.MemoryStore(), shape=(8,), chunks=(4,), dtype="f8")
    assert direct_writer(z) is None


def test_a_region_that_splits_a_unit_is_refused(tmp_path):
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(16,), chunks=(4,), dtype="f8")
    w = direct_writer(z)
    with pytest.raises(ValueError, match="does not start on a chunk edge"):
        w((slice(2, 6),), np.zeros(4))
    with pytest.raises(ValueError, match="only part of chunk"):
        w((slice(0, 6),), np.zeros(6))


@pytest.mark.parametrize(
    "shape, chunks, shards, fmt, sep",
    [
        ((10, 6), (4, 3), None, 3, "/"),  # v3 default keys c/i/j: a directory per row of chunks
        ((10, 6), (2, 3), (4, 6), 3, "/"),  # sharded: one per row of shards
        ((10, 6), (4, 3), None, 2, "."),  # v2 keys i.j: no directories
    ],
)
def test_prepare_makes_every_directory_the_writes_need_and_no_more(tmp_path, monkeypatch, shape, chunks, shards, fmt, sep):
    """Directories made ahead (at attach) are exactly those of the units' files,
    and the writes that follow make none of their own."""
    import os

    from aimss_dask.sink import chunkfiles

    path = str(tmp_path / "a.zarr")
    z = zarr.create_array(path, shape=shape, chunks=chunks, shards=shards, zarr_format=fmt, dtype="f8")
    w = direct_writer(z)
    unit = shards or chunks
    regions = [
        tuple(slice(i, min(i + u, n)) for i, u, n in zip(idx, unit, shape))
        for idx in itertools.product(*(range(0, n, u) for n, u in zip(shape, unit)))
    ]
    made = w.prepare(regions)
    dirs = sorted(os.path.relpath(r, path) for r, _, _ in os.walk(path) if r != path)
    if sep == "/":
        rows = -(-shape[0] // unit[0])
        assert made == rows
        assert dirs == ["c", *(f"c/{i}" for i in range(rows))]
    else:
        assert made == 1 and dirs == []  # the array's own directory, which exists
    calls = []
    real = os.makedirs
    monkeypatch.setattr(chunkfiles.os, "makedirs", lambda *a, **k: (calls.append(a), real(*a, **k)))
    x = np.arange(np.prod(shape), dtype="f8").reshape(shape)
    for region in regions:
        w(region, x[region])
    assert calls == []
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], x)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=4), min_size=1, max_size=3),
    st.data(),
)
def test_unit_regions_match_the_units_cut_one_by_one(chunks, data):
    """The owner's vectorised lookup gives every unit the region its chunks span,
    zero-length chunks included, for any subset of units in any order."""
    from aimss_dask.sink.assembler import unit_regions

    chunks = tuple(tuple(c) for c in chunks)
    units = list(itertools.product(*(range(len(c)) for c in chunks)))
    want = {}
    for p, idx in enumerate(units):
        want[p] = tuple(slice(sum(c[:i]), sum(c[: i + 1])) for c, i in zip(chunks, idx))
    asked = data.draw(st.lists(st.sampled_from(sorted(want)), unique=True))
    got = unit_regions(asked, chunks)
    assert list(got) == asked
    assert got == {p: want[p] for p in asked}


def _chunk_files(path):
    """Every chunk file under ``path`` (relative name -> bytes); metadata left out."""
    import os

    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            if f not in ("zarr.json", ".zarray", ".zattrs", ".zgroup"):
                with open(os.path.join(root, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(root, f), path)] = fh.read()
    return out


@st.composite
def row_layout(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 11), min_size=ndim, max_size=ndim)))
    chunks = tuple(draw(st.integers(1, n)) for n in shape)
    fmt = draw(st.sampled_from([2, 3]))
    dtype = draw(st.sampled_from(["f8", "i2", "u1", "bool", "c8"]))
    fill = draw(st.sampled_from([0, 1, 7]))
    # Shards of inner chunks that span them whole on every axis but the first.
    shards = None
    if fmt == 3 and draw(st.booleans()):
        shards = (chunks[0] * draw(st.integers(1, 4)), *chunks[1:])
    # Where each unit's rows are cut into pieces, and which of two writers writes each.
    cuts = draw(st.lists(st.integers(1, 30), max_size=3))
    seed = draw(st.integers(0, 2**16))
    return shape, chunks, shards, fmt, dtype, fill, cuts, seed


@settings(max_examples=60, deadline=None)
@given(row_layout())
def test_rows_written_in_place_are_the_bytes_zarr_writes(tmp_path_factory, case):
    """Pieces of rows from two writers, in any order, then a commit: every chunk
    (or shard) file is byte for byte the file Zarr writes for the same data,
    edge padding (with the fill value) and shard index included, and no
    partial file is left."""
    shape, chunks, shards, fmt, dtype, fill, cuts, seed = case
    rng = np.random.default_rng(seed)
    x = (rng.random(shape) * 100).astype(dtype)
    kwargs = dict(shape=shape, chunks=chunks, zarr_format=fmt, dtype=dtype, fill_value=fill, compressors=None)
    if shards:
        kwargs["shards"] = shards
    unit = shards or chunks
    ref = str(tmp_path_factory.mktemp("ref") / "a.zarr")
    with zarr.config.set({"array.write_empty_chunks": True}):
        zarr.create_array(ref, **kwargs)[...] = x
    path = str(tmp_path_factory.mktemp("rows") / "a.zarr")
    z = zarr.create_array(path, **kwargs)
    writers = [direct_writer(z), direct_writer(zarr.open_array(path, mode="r+"))]
    assert all(w.raw for w in writers)
    grid = [range(-(-n // c)) for n, c in zip(shape, unit)]
    jobs = []
    for coords in itertools.product(*grid):
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, unit, shape))
        rows = region[0].stop - region[0].start
        edges = sorted({0, rows, *(c for c in cuts if c < rows)})
        for lo, hi in zip(edges, edges[1:]):
            piece = x[(slice(region[0].start + lo, region[0].start + hi), *region[1:])]
            jobs.append((int(rng.integers(2)), coords, [((lo, hi), piece)]))
    for j in rng.permutation(len(jobs)):
        w, coords, pieces = jobs[j]
        assert writers[w].write_rows(coords, pieces, "run1") == pieces[0][1].nbytes
    units = list(itertools.product(*grid))
    writers[0].commit(units, "run1")
    assert _chunk_files(path) == _chunk_files(ref)
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], x)


def test_adjacent_rows_of_one_job_take_one_write(tmp_path, monkeypatch):
    from aimss_dask.sink import chunkfiles

    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(10, 3), chunks=(8, 3), dtype="f8", compressors=None)
    x = np.arange(30, dtype="f8").reshape(10, 3)
    calls = []
    real = chunkfiles.os.pwritev
    monkeypatch.setattr(chunkfiles.os, "pwritev", lambda fd, bufs, off: (calls.append((len(bufs), off)), real(fd, bufs, off))[1])
    w = direct_writer(z)
    # Rows 5..8 and 0..3 of chunk 0 (not adjacent: two writes), then rows 3..5 alone.
    assert w.write_rows((0, 0), [((5, 8), x[5:8]), ((0, 3), x[0:3])], "r") == 6 * 3 * 8
    assert calls == [(1, 0), (1, 5 * 3 * 8)]
    calls.clear()
    w.write_rows((0, 0), [((3, 5), x[3:5])], "r")
    # Chunk 1 holds rows 8..10 of the array: its data then the padding, one write.
    w.write_rows((1, 0), [((0, 2), x[8:10])], "r")
    assert calls == [(1, 3 * 3 * 8), (2, 0)]
    w.commit([(0, 0), (1, 0)], "r")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"))[...], x)


def test_a_discarded_run_changes_no_chunk(tmp_path):
    path = str(tmp_path / "a.zarr")
    z = zarr.create_array(path, shape=(8,), chunks=(4,), dtype="i4", compressors=None)
    z[...] = np.arange(8)
    before = _chunk_files(path)
    w = direct_writer(z)
    w.write_rows((0,), [((0, 2), np.full(2, -1, "i4"))], "bad")
    assert any(k.endswith(".bad.partial") for k in _chunk_files(path))
    assert w.discard("bad") == 1
    assert _chunk_files(path) == before
    np.testing.assert_array_equal(zarr.open_array(path)[...], np.arange(8))


def test_rows_that_do_not_fit_their_chunk_are_refused(tmp_path):
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(10, 4), chunks=(8, 4), dtype="f8", compressors=None)
    w = direct_writer(z)
    with pytest.raises(ValueError, match=r"rows \(6, 9\) of unit \(0, 0\) \(extent \(8, 4\)\)"):
        w.write_rows((0, 0), [((6, 9), np.zeros((3, 4)))], "r")
    with pytest.raises(ValueError, match=r"cannot hold data of shape \(2, 3\)"):
        w.write_rows((1, 0), [((0, 2), np.zeros((2, 3)))], "r")
    zc = zarr.create_array(str(tmp_path / "c.zarr"), shape=(8,), chunks=(4,), dtype="f8")
    with pytest.raises(ValueError, match="compress"):
        direct_writer(zc).write_rows((0,), [((0, 4), np.zeros(4))], "r")
    assert not _chunk_files(str(tmp_path / "a.zarr"))


def test_pwrite_all_survives_short_writes_and_many_buffers(tmp_path, monkeypatch):
    import os

    from aimss_dask.sink import chunkfiles

    real = os.pwritev
    asked = []

    def short(fd, bufs, off):
        # The kernel may write less than asked (here: half of it, a prefix),
        # and takes at most IOV_MAX buffers.
        asked.append(len(bufs))
        data = b"".join(bytes(b) for b in bufs)
        return real(fd, [data[: max(1, len(data) // 2)]], off)

    monkeypatch.setattr(chunkfiles.os, "pwritev", short)
    bufs = [memoryview(bytes([i % 251]) * (1 + i % 3)) for i in range(3000)]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        chunkfiles.pwrite_all(fd, bufs, 5)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"\0" * 5 + b"".join(bytes(b) for b in bufs)
    assert max(asked) <= chunkfiles.IOV_MAX and len(asked) > 3


def test_shard_rows_in_place_with_the_index_at_the_start(tmp_path):
    import json

    path = tmp_path / "a.zarr"
    zarr.create_array(str(path), shape=(19, 3), dtype="i4", chunks=(4, 3), shards=(12, 3), compressors=None)
    meta = json.loads((path / "zarr.json").read_text())
    meta["codecs"][0]["configuration"]["index_location"] = "start"
    (path / "zarr.json").write_text(json.dumps(meta))
    z = zarr.open_array(str(path), mode="r+")
    w = direct_writer(z)
    assert w.raw
    x = np.arange(19 * 3, dtype="i4").reshape(19, 3)
    w.write_rows((1, 0), [((5, 7), x[17:19]), ((0, 5), x[12:17])], "r")
    w.write_rows((0, 0), [((3, 12), x[3:12])], "r")
    w.write_rows((0, 0), [((0, 3), x[0:3])], "r")
    w.commit([(0, 0), (1, 0)], "r")
    np.testing.assert_array_equal(zarr.open_array(str(path))[...], x)


def test_shards_of_narrower_chunks_are_not_written_in_place(tmp_path):
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(8, 6), chunks=(2, 3), shards=(4, 6), dtype="f8", compressors=None)
    assert not direct_writer(z).raw


def _shard_meta_index_at_start(path):
    import json

    meta = json.loads((path / "zarr.json").read_text())
    meta["codecs"][0]["configuration"]["index_location"] = "start"
    (path / "zarr.json").write_text(json.dumps(meta))


@st.composite
def chunk_layout(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 11), min_size=ndim, max_size=ndim)))
    inner = tuple(draw(st.integers(1, n)) for n in shape)
    shards = tuple(c * draw(st.integers(1, 3)) for c in inner)
    dtype = draw(st.sampled_from(["f8", "i2", "u1", "bool", "c8"]))
    fill = draw(st.sampled_from([0, 1, 7]))
    compressed = draw(st.booleans())
    at_start = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return shape, inner, shards, dtype, fill, compressed, at_start, seed


@settings(max_examples=60, deadline=None)
@given(chunk_layout())
def test_inner_chunks_appended_by_two_writers_read_back_identical(tmp_path_factory, case):
    """Whole inner chunks of each shard appended in random jobs by two writers,
    in any order, then each shard's index from their entries and a commit:
    Zarr reads back the data, the partial names are gone, and every stored
    chunk decodes to what Zarr itself would store."""
    _two_writers(tmp_path_factory, case, reserved=False)


@settings(max_examples=60, deadline=None)
@given(chunk_layout())
def test_inner_chunks_written_at_reserved_offsets_read_back_identical(tmp_path_factory, case):
    """As above, with each job writing into the byte range of its shard
    reserved for it (writers on several hosts): never past it, the same
    stored chunks, whatever order the jobs run in."""
    _two_writers(tmp_path_factory, case, reserved=True)


def _two_writers(tmp_path_factory, case, reserved: bool) -> None:
    shape, inner, shards, dtype, fill, compressed, at_start, seed = case
    rng = np.random.default_rng(seed)
    x = (rng.random(shape) * 100).astype(dtype)
    base = tmp_path_factory.mktemp("app")
    path = base / "a.zarr"
    kwargs = dict(shape=shape, chunks=inner, shards=shards, dtype=dtype, fill_value=fill)
    if not compressed:
        kwargs["compressors"] = None
    zarr.create_array(str(path), **kwargs)
    if at_start:
        _shard_meta_index_at_start(path)
    writers = [direct_writer(zarr.open_array(str(path), mode="r+")) for _ in range(2)]
    per_shard = tuple(s // c for s, c in zip(shards, inner))
    jobs = []
    for scoords in itertools.product(*(range(-(-n // s)) for n, s in zip(shape, shards))):
        chunks = []
        for icoords in itertools.product(*(range(p) for p in per_shard)):
            start = [s * u + i * c for s, u, i, c in zip(scoords, shards, icoords, inner)]
            if any(a >= n for a, n in zip(start, shape)):
                continue
            chunks.append((icoords, x[tuple(slice(a, min(a + c, n)) for a, c, n in zip(start, inner, shape))]))
        order = rng.permutation(len(chunks))
        cuts = sorted(set(rng.integers(0, len(chunks) + 1, size=2).tolist()) | {0, len(chunks)})
        for a, b in zip(cuts, cuts[1:]):
            jobs.append((int(rng.integers(2)), scoords, [chunks[i] for i in order[a:b]]))
    ranges, ends = [], {}
    for _, scoords, chunks in jobs:  # as the graph gives them, in job order
        at = ends.get(scoords, writers[0].first_offset())
        ranges.append((at, len(chunks) * writers[0].chunk_bound()))
        ends[scoords] = at + ranges[-1][1]
    entries: dict = {}
    for j in rng.permutation(len(jobs)):
        w, scoords, chunks = jobs[j]
        if reserved:
            got = writers[w].write_chunks_at(scoords, chunks, "run1", *ranges[j], sync=bool(j % 2))
            assert all(ranges[j][0] <= o and o + n <= sum(ranges[j]) for _, o, n in got)
        else:
            got = writers[w].append_chunks(scoords, chunks, "run1")
        assert sorted(e[0] for e in got) == sorted(int(np.ravel_multi_index(i, per_shard)) for i, _ in chunks)
        entries.setdefault(scoords, []).extend(got)
    sealed = writers[1].close_shards(entries, "run1")
    writers[0].commit(list(entries), sealed)
    assert not [k for k in _chunk_files(str(path)) if k.endswith(".partial")]
    np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[...], x)
    # Every stored chunk is the very frame Zarr stores (edge padding included),
    # though the chunks lie in the file in another order.
    ref = base / "ref.zarr"
    zarr.create_array(str(ref), **kwargs)
    if at_start:
        _shard_meta_index_at_start(ref)
    with zarr.config.set({"array.write_empty_chunks": True}):
        zarr.open_array(str(ref), mode="r+")[...] = x
    ours, theirs = _chunk_files(str(path)), _chunk_files(str(ref))
    assert set(ours) == set(theirs)
    size = writers[0].index_size
    for name in ours:
        assert _shard_chunks(ours[name], size, at_start) == _shard_chunks(theirs[name], size, at_start)


def _shard_chunks(data, index_size, at_start):
    """A shard file's chunks, by position in the shard, as stored (``None``: absent)."""
    raw = data[:index_size] if at_start else data[-index_size:]
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
    return [None if o == 2**64 - 1 else data[o : o + n] for o, n in index.tolist()]


def _append_many(path, worker, n, barrier):
    """One process's appends of ``n`` single-chunk jobs to shard (0,): entries."""
    w = direct_writer(zarr.open_array(path, mode="r+"))
    x = np.arange(2 * n * 16, dtype="f8").reshape(-1, 4)
    out = []
    barrier.wait()
    for k in range(worker, 2 * n, 2):
        out.extend(w.append_chunks((0, 0), [((k, 0), x[k * 4:(k + 1) * 4])], "mp"))
    return out


def test_appends_from_two_processes_never_interleave(tmp_path):
    """Two worker processes append one shard's chunks at the same time:
    every chunk lands whole at the offset its writer was told."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    path = str(tmp_path / "a.zarr")
    n = 2048
    zarr.create_array(path, shape=(4 * 2 * n, 4), chunks=(4, 4), shards=(4 * 2 * n, 4), dtype="f8")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as m, ProcessPoolExecutor(2, mp_context=ctx) as pool:
        barrier = m.Barrier(2)
        futs = [pool.submit(_append_many, path, i, n, barrier) for i in range(2)]
        entries = [e for f in futs for e in f.result()]
    assert len(entries) == 2 * n
    spans = sorted((off, off + nb) for _, off, nb in entries)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two chunks overlap
    w = direct_writer(zarr.open_array(path, mode="r+"))
    w.commit([(0, 0)], w.close_shards({(0, 0): entries}, "mp"))
    want = np.arange(2 * n * 16, dtype="f8").reshape(-1, 4)
    np.testing.assert_array_equal(zarr.open_array(path)[...], want)


def test_an_incomplete_or_doubled_shard_is_refused_and_discarded(tmp_path):
    path = str(tmp_path / "a.zarr")
    z = zarr.create_array(path, shape=(10,), chunks=(2,), shards=(6,), dtype="i4")
    z[...] = np.arange(10)
    before = _chunk_files(path)
    w = direct_writer(z)
    x = np.full(10, -1, "i4")
    ents = w.append_chunks((0,), [((0,), x[0:2]), ((2,), x[4:6])], "bad")
    with pytest.raises(ValueError, match=r"shard \(0,\) got 2 of its 3 inner chunks"):
        w.close_shards({(0,): ents}, "bad")
    again = w.append_chunks((0,), [((0,), x[0:2])], "bad")  # chunk 0 once more, elsewhere
    with pytest.raises(ValueError, match="appended twice"):
        w.close_shards({(0,): ents + again}, "bad")
    # Entries that overlap (appends that were not atomic) or run past the file.
    (i, off, nb), rest = ents[0], ents[1:]
    with pytest.raises(ValueError, match="overlaps another.*not atomic"):
        w.close_shards({(0,): [(i, off, nb), (1, off + 1, nb), *rest]}, "bad")
    with pytest.raises(ValueError, match="file's end"):
        w.close_shards({(0,): [(i, off, nb), (1, 10**6, nb), *rest]}, "bad")
    with pytest.raises(ValueError, match=r"inner chunk \(1,\) of shard \(1,\) \(extent \(2,\)\) cannot hold"):
        w.append_chunks((1,), [((1,), x[:1])], "bad")
    with pytest.raises(ValueError, match=r"inner chunk \(3,\) is not in a shard of \(3,\) chunks"):
        w.append_chunks((0,), [((3,), x[:2])], "bad")
    assert w.discard("bad") == 1
    assert _chunk_files(path) == before
    np.testing.assert_array_equal(zarr.open_array(path)[...], np.arange(10))


def test_a_shard_with_its_index_first_is_reserved_once(tmp_path, monkeypatch):
    """Index at the start: the first writer makes room for the index; a
    writer that finds the file made appends after it, and no private file is
    left. No hard link is needed (some FUSE and SMB mounts have none)."""

    def no_links(*args, **kwargs):
        raise PermissionError("this file system has no hard links")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "a.zarr"
    zarr.create_array(str(path), shape=(12,), chunks=(2,), shards=(12,), dtype="i4")
    _shard_meta_index_at_start(path)
    ws = [direct_writer(zarr.open_array(str(path), mode="r+")) for _ in range(2)]
    x = np.arange(12, dtype="i4")
    ents = ws[0].append_chunks((0,), [((5,), x[10:12])], "r") + ws[1].append_chunks((0,), [((0,), x[0:2])], "r")
    assert min(off for _, off, _ in ents) == ws[0].index_size
    ents += ws[1].append_chunks((0,), [((i,), x[2 * i:2 * i + 2]) for i in (3, 1, 2, 4)], "r")
    assert sorted(os.listdir(path / "c")) == ["0.r.partial"]
    ws[0].commit([(0,)], ws[0].close_shards({(0,): ents}, "r"))
    np.testing.assert_array_equal(zarr.open_array(str(path))[...], x)


def _one_appended_shard(tmp_path, at_start):
    """An array of one shard of four 2-element chunks, every chunk appended by run "r", not yet sealed."""
    path = tmp_path / "a.zarr"
    zarr.create_array(str(path), shape=(8,), chunks=(2,), shards=(8,), dtype="i4")
    if at_start:
        _shard_meta_index_at_start(path)
    w = direct_writer(zarr.open_array(str(path), mode="r+"))
    x = np.arange(8, dtype="i4")
    return path, w, x, w.append_chunks((0,), [((i,), x[2 * i : 2 * i + 2]) for i in range(4)], "r")


@pytest.mark.parametrize("at_start", [False, True])
def test_a_late_append_never_reaches_a_sealed_shard(tmp_path, at_start):
    """A writer Dask gave up on appends after the shard was sealed: its bytes
    go to a new partial file that is never committed, the shard stays
    readable, and discard removes the stray."""
    path, w, x, ents = _one_appended_shard(tmp_path, at_start)
    ents += w.append_chunks((0,), [((0,), x[:2])], "r")[:0]  # a recomputed task's dead copy
    sealed = w.close_shards({(0,): ents}, "r")
    w.append_chunks((0,), [((1,), np.full(2, -9, "i4"))], "r")  # too late
    w.commit([(0,)], sealed)
    np.testing.assert_array_equal(zarr.open_array(str(path))[...], x)
    assert sorted(os.listdir(path / "c")) == ["0", "0.r.partial"]
    assert w.discard("r") == 1
    assert sorted(os.listdir(path / "c")) == ["0"]


@pytest.mark.parametrize("at_start", [False, True])
def test_an_append_opened_before_the_seal_is_refused_after_it(tmp_path, monkeypatch, at_start):
    """A writer Dask gave up on opened the shard's file, then stalled while
    the run sealed and committed the shard: when it goes on, its append is
    refused (the file it holds is no longer the partial file), nothing lands
    after the index, and no stray file is made."""
    path, w, x, ents = _one_appended_shard(tmp_path, at_start)
    real = fcntl.flock

    class Stall:
        """fcntl whose first shared lock comes only after the shard was sealed and committed."""

        LOCK_SH, LOCK_EX = fcntl.LOCK_SH, fcntl.LOCK_EX
        stalled = False

        def flock(self, fd, op):
            if op == self.LOCK_SH and not self.stalled:
                self.stalled = True
                w.commit([(0,)], w.close_shards({(0,): ents}, "r"))
            real(fd, op)

    monkeypatch.setattr(shards, "fcntl", Stall())
    with pytest.raises(SinkError, match=r"shard \(0,\) .* was sealed before this append"):
        w.append_chunks((0,), [((1,), np.full(2, -9, "i4"))], "r")
    assert sorted(os.listdir(path / "c")) == ["0"]
    np.testing.assert_array_equal(zarr.open_array(str(path))[...], x)


def test_the_seal_waits_for_an_append_under_way(tmp_path):
    """An append that got its lock before the seal ends before the index is
    written: the seal waits for it, and its bytes (never indexed) are cut."""
    path, w, x, ents = _one_appended_shard(tmp_path, at_start=False)
    partial = os.path.join(str(path), "c", "0.r.partial")
    fd = w._open_for_append(partial, (0,))  # a late writer, mid-append
    sealer = threading.Thread(target=lambda: w.commit([(0,)], w.close_shards({(0,): ents}, "r")))
    sealer.start()
    time.sleep(0.3)
    assert sealer.is_alive(), "the seal did not wait for the append under way"
    os.write(fd, b"late bytes after the chunks")
    os.close(fd)
    sealer.join(10)
    assert not sealer.is_alive()
    assert sorted(os.listdir(path / "c")) == ["0"]
    np.testing.assert_array_equal(zarr.open_array(str(path))[...], x)
