"""``aimss_dask.to_zarr`` against NumPy and plain ``zarr.open_array``, on a real cluster."""

from __future__ import annotations

import os
import signal

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import assert_workers_clean as _clean
from conftest import chunking, count_fsyncs, wait_until
from distributed import Client, LocalCluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.sink.plan import aligned as _aligned


def assert_workers_clean() -> None:
    _clean(aimss_dask.status())


@st.composite
def case(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 12), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(["f8", "i4", "u1", "bool", "c8", "f4"]))
    zchunks = tuple(draw(st.integers(1, n)) for n in shape)
    shards = None
    if draw(st.booleans()):
        shards = tuple(c * draw(st.integers(1, 3)) for c in zchunks)
    # Uncompressed: blocks cut along the first axis only are written in place.
    raw = draw(st.booleans())
    return shape, dtype, draw(chunking(shape, max_cuts=3)), zchunks, shards, raw


def _partials(path):
    """Partial chunk files left under ``path``."""
    return [f for _, _, fs in os.walk(path) for f in fs if f.endswith(".partial")]


def _kind(delayed):
    """Which run a to_zarr graph is: each block written whole, rows in place,
    inner chunks appended in place, or pushed."""
    names = {k[0] if isinstance(k, tuple) else k for k in delayed.dask}
    prefixes = (
        ("aligned", "aimss-sink-write-"), ("rows", "aimss-sink-rows-"),
        ("chunks", "aimss-sink-chunks-"), ("push", "aimss-push-"),
    )
    kinds = {kind for kind, prefix in prefixes if any(str(n).startswith(prefix) for n in names)}
    assert len(kinds) == 1, names
    return kinds.pop()


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 100).astype(dtype)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case())
def test_to_zarr_equals_numpy(client, tmp_path_factory, c):
    shape, dtype, chunks, zchunks, shards, raw = c
    data = _data(shape, dtype)
    path = str(tmp_path_factory.mktemp("z") / "a.zarr")
    kw = {"compressors": None} if raw else {}
    aimss_dask.to_zarr(da.from_array(data, chunks=chunks), path, chunks=zchunks, shards=shards, **kw)
    assert not _partials(path)
    z = zarr.open_array(path, mode="r")
    assert z.shape == shape and z.dtype == data.dtype
    assert z.chunks == zchunks
    assert (z.shards if shards else None) == shards
    np.testing.assert_array_equal(z[...], data)
    assert_workers_clean()


@pytest.mark.parametrize("persist", [False, True])
@pytest.mark.parametrize(
    "blocks, zchunks, shards, raw, kind",
    [
        ((1000, 64), (1024, 64), None, False, "push"),  # misaligned rows, compressed
        ((1000, 64), (1024, 64), None, True, "rows"),  # ... uncompressed: written in place
        ((1000, 32), (1024, 32), None, True, "rows"),  # ... two chunks across, edge padding
        ((2048, 32), (1024, 64), None, False, "push"),  # misaligned columns
        ((2048, 32), (1024, 64), None, True, "push"),  # ... even uncompressed
        ((2048, 64), (1024, 64), None, False, "aligned"),  # each block is two whole chunks
        ((1024, 64), (256, 64), (4096, 64), False, "chunks"),  # four blocks per shard: chunks appended
        ((1024, 32), (256, 32), (4096, 64), False, "chunks"),  # ... two shards across, edge chunks
        ((1000, 64), (256, 64), (4096, 64), False, "push"),  # blocks that cut inner chunks: pushed
        ((1000, 64), (256, 64), (4096, 64), True, "rows"),  # shards of full-width chunks: in place
        ((1000, 64), (256, 32), (4096, 64), True, "push"),  # ... of narrower chunks, cut: pushed
        ((1024, 64), (256, 32), (4096, 64), True, "chunks"),  # ... not cut: appended
        ((4096, 64), (256, 32), (4096, 64), False, "aligned"),  # one block per shard
    ],
)
def test_paths_and_units(client, tmp_path, blocks, zchunks, shards, raw, kind, persist):
    unit = shards or zchunks
    assert _aligned(da.zeros((10_000, 70), chunks=blocks).chunks, unit) is (kind == "aligned")
    x = da.random.default_rng(3).random((10_000, 70), chunks=blocks)
    want = x.compute()
    if persist:  # blocks in memory: grouped by the worker that holds them
        x = x.persist()
    path = str(tmp_path / "a.zarr")
    kw = {"compressors": None} if raw else {}
    delayed = aimss_dask.to_zarr(x, path, chunks=zchunks, shards=shards, compute=False, **kw)
    assert _kind(delayed) == kind
    assert delayed.compute() == want.nbytes
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], want)
    assert not _partials(path)
    assert_workers_clean()


def test_rows_in_place_move_nothing_between_workers(tmp_path):
    """A rows run creates no stream: no worker's log ever holds a byte of it,
    where a push run of the same blocks (compressed) goes through the logs."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, Client(cl) as client:
        client.register_plugin(aimss_dask.AIMSS())
        x = da.random.default_rng(5).random((20_000, 16), chunks=(999, 16)).persist()
        want = x.compute()
        delayed = aimss_dask.to_zarr(x, str(tmp_path / "rows.zarr"), chunks=(1024, 16), compressors=None, compute=False)
        assert _kind(delayed) == "rows"
        delayed.compute()
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "rows.zarr"))[:], want)
        assert [s["peak_memory"] for s in aimss_dask.status().values()] == [0, 0]
        aimss_dask.to_zarr(x, str(tmp_path / "push.zarr"), chunks=(1024, 16))
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "push.zarr"))[:], want)
        assert all(s["peak_memory"] > 0 for s in aimss_dask.status().values())
        _clean(aimss_dask.status())


def test_misaligned_write_pushes_then_writes_on_owners(client, tmp_path):
    """Each unit is written once, by the worker that owns its partition."""
    x = da.arange(12_000, chunks=1000).reshape(12_000, 1).rechunk((1000, 1))
    path = str(tmp_path / "a.zarr")
    delayed = aimss_dask.to_zarr(x, path, chunks=(1024, 1), compute=False)
    assert not os.path.exists(os.path.join(path, "c"))  # nothing written yet
    assert delayed.compute() == 12_000 * 8
    np.testing.assert_array_equal(zarr.open_array(path)[:, 0], np.arange(12_000))
    assert_workers_clean()


def test_zarr_v2_and_irregular_chunks(client, tmp_path):
    data = _data((37, 11), "f8")
    x = da.from_array(data, chunks=((5, 20, 12), (3, 8)))
    path = str(tmp_path / "v2.zarr")
    aimss_dask.to_zarr(x, path, chunks=(8, 4), zarr_format=2, compressors=None)
    z = zarr.open_array(path, mode="r")
    assert z.metadata.zarr_format == 2
    np.testing.assert_array_equal(z[:], data)


def test_default_chunks_follow_the_first_block(client, tmp_path):
    x = da.ones((100, 7), chunks=(30, 7))
    path = str(tmp_path / "a.zarr")
    aimss_dask.to_zarr(x, path)
    z = zarr.open_array(path)
    assert z.chunks == (30, 7)
    assert z[:].sum() == 700


def test_component_and_fsspec_url(client, tmp_path):
    data = _data((50, 3), "i4")
    aimss_dask.to_zarr(da.from_array(data, chunks=7), f"file://{tmp_path}/g.zarr", component="inner/a", chunks=(8, 3),
        storage_options={"auto_mkdir": True},
    )
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "g.zarr"), path="inner/a")[:], data)


def test_existing_array_is_written_into(client, tmp_path):
    path = str(tmp_path / "a.zarr")
    zarr.create_array(path, shape=(40, 4), chunks=(10, 4), dtype="f8", attributes={"keep": 1})
    data = _data((40, 4), "f8")
    aimss_dask.to_zarr(da.from_array(data, chunks=(7, 4)), path)
    z = zarr.open_array(path)
    np.testing.assert_array_equal(z[:], data)
    assert z.attrs["keep"] == 1


@pytest.mark.parametrize(
    "shape, dtype, kwargs, match",
    [
        ((41, 4), "f8", {}, r"shape \(40, 4\).*x has shape \(41, 4\)"),
        ((40, 4), "i4", {}, r"dtype float64.*dtype int32"),
        ((40, 4), "f8", {"chunks": (5, 4)}, r"chunks=\(5, 4\) differ.*\(10, 4\)"),
        ((40, 4), "f8", {"compressors": None}, r"\['compressors'\] apply to a new array"),
    ],
)
def test_mismatch_with_existing_array_overwrites_nothing(client, tmp_path, shape, dtype, kwargs, match):
    path = str(tmp_path / "a.zarr")
    old = _data((40, 4), "f8", seed=9)
    zarr.create_array(path, shape=(40, 4), chunks=(10, 4), dtype="f8")[:] = old
    with pytest.raises(aimss_dask.InvalidArgumentError, match=match):
        aimss_dask.to_zarr(da.zeros(shape, dtype=dtype, chunks=10), path, **kwargs)
    np.testing.assert_array_equal(zarr.open_array(path)[:], old)
    assert_workers_clean()


def test_an_existing_array_of_the_other_zarr_format_is_not_shadowed_by_a_new_one(client, tmp_path):
    """A v2 array at the path is not "nothing" to a v3 write: creating a v3 array beside it would leave
    readers a second array of fill values, and the shape and dtype checks skipped."""
    path = str(tmp_path / "v2.zarr")
    old = _data((40, 4), "f8", seed=3)
    zarr.create_array(path, shape=(40, 4), chunks=(10, 4), dtype="f8", zarr_format=2)[:] = old
    with pytest.raises(aimss_dask.InvalidArgumentError, match="holds a Zarr v2 array, and zarr_format=3.*zarr_format=2"):
        aimss_dask.to_zarr(da.zeros((40, 4), chunks=10), path)
    assert "zarr.json" not in os.listdir(path)  # no v3 array beside it
    np.testing.assert_array_equal(zarr.open_array(path)[:], old)
    data = _data((40, 4), "f8")
    aimss_dask.to_zarr(da.from_array(data, chunks=(7, 4)), path, zarr_format=2)
    np.testing.assert_array_equal(zarr.open_array(path, zarr_format=2)[:], data)


def test_a_relative_path_is_the_callers_not_each_workers(client, tmp_path, monkeypatch):
    """Workers need not share the client's working directory (an SSH or batch cluster starts them
    elsewhere): a relative path is made absolute where the caller gave it."""
    workdir = tmp_path / "mine"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    assert client.run(os.getcwd) != {a: str(workdir) for a in client.run(os.getcwd)}  # elsewhere
    data = _data((20, 3), "f8")
    aimss_dask.to_zarr(da.from_array(data, chunks=(6, 3)), "rel.zarr")
    np.testing.assert_array_equal(zarr.open_array(str(workdir / "rel.zarr"), mode="r")[:], data)
    for cwd in set(client.run(os.getcwd).values()):
        assert not os.path.exists(os.path.join(cwd, "rel.zarr"))


def test_overwrite_replaces_an_array_of_another_shape(client, tmp_path):
    path = str(tmp_path / "a.zarr")
    zarr.create_array(path, shape=(3,), chunks=(3,), dtype="i1")
    aimss_dask.to_zarr(da.arange(10, chunks=4), path, overwrite=True)
    np.testing.assert_array_equal(zarr.open_array(path)[:], np.arange(10))


def test_bad_inputs_raise_clear_errors(client, tmp_path):
    x = da.ones((10, 10), chunks=5)
    with pytest.raises(aimss_dask.StoreReadOnlyError, match="read-only"):
        zarr.create_array(str(tmp_path / "ro.zarr"), shape=(10, 10), dtype="f8")
        aimss_dask.to_zarr(x, zarr.storage.LocalStore(str(tmp_path / "ro.zarr"), read_only=True))
    with pytest.raises(aimss_dask.InvalidArgumentError, match="MemoryStore"):
        aimss_dask.to_zarr(x, zarr.storage.MemoryStore())
    with pytest.raises(aimss_dask.InvalidArgumentError, match="zarr_format=4"):
        aimss_dask.to_zarr(x, str(tmp_path / "a.zarr"), zarr_format=4)
    with pytest.raises(aimss_dask.InvalidArgumentError, match="need zarr_format=3"):
        aimss_dask.to_zarr(x, str(tmp_path / "a.zarr"), shards=(10, 10), zarr_format=2)
    with pytest.raises(aimss_dask.InvalidArgumentError, match=r"\(5,\) is not a shape for a 2-d"):
        aimss_dask.to_zarr(x, str(tmp_path / "a.zarr"), chunks=(5,))
    with pytest.raises(aimss_dask.InvalidArgumentError, match="shards="):
        aimss_dask.to_zarr(x, str(tmp_path / "b.zarr"), chunks=(3, 3), shards=(5, 5))
    with pytest.raises(aimss_dask.InvalidArgumentError, match="dask.array.Array"):
        aimss_dask.to_zarr(np.ones(3), str(tmp_path / "c.zarr"))
    assert not os.path.exists(tmp_path / "a.zarr")
    assert not os.path.exists(tmp_path / "b.zarr")  # the invalid shards made no folder
    assert_workers_clean()


def test_a_failing_write_fails_the_run_loudly(client, tmp_path):
    """A write error on a worker is raised by to_zarr, naming the worker."""
    path = tmp_path / "a.zarr"
    aimss_dask.to_zarr(da.ones((20, 4), chunks=(5, 4)), str(path))
    # Replace the array's metadata by garbage after the check on the client:
    # the workers' writes then fail when they open the array.
    x = da.ones((20, 4), chunks=(5, 4)).map_blocks(_corrupt_then, str(path), dtype="f8", meta=np.empty((0, 0)))
    with pytest.raises(aimss_dask.SinkError, match="to_zarr into .* failed"):
        aimss_dask.to_zarr(x, str(path))
    assert_workers_clean()


def _corrupt_then(block, path):
    with open(os.path.join(path, "zarr.json"), "w") as f:
        f.write("{not json")
    return block


def test_writes_stay_in_their_memory_bounds(tmp_path):
    """256 MiB through 64 MiB budgets: the write-behind queue (aligned blocks)
    and the log (misaligned pieces) stay in their bounds, and the data lands."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, Client(cl) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit="64MiB"))  # queue bound: 64 MiB
        # Aligned, rows written in place, and pushed (columns misaligned).
        for blocks in ((1024, 512), (1000, 512), (1024, 256)):
            x = da.random.default_rng(0).random((64 * 1024, 512), chunks=blocks)  # 256 MiB
            path = str(tmp_path / f"{blocks[0]}-{blocks[1]}.zarr")
            aimss_dask.to_zarr(x, path, chunks=(1024, 512), compressors=None)
            z = zarr.open_array(path)
            np.testing.assert_array_equal(z[-5000:], x[-5000:].compute())
            np.testing.assert_array_equal(z[:3000], x[:3000].compute())
        st = aimss_dask.status()
        for addr, s in st.items():
            assert s["sink_peak_queued_bytes"] <= 64 * 2**20 + 4 * 2**20, (addr, s)
            assert s["sink_queued_bytes"] == 0
            # The log spills past its budget rather than grow (one segment of slack).
            assert s["peak_memory"] <= 64 * 2**20 + 8 * 2**20, (addr, s)
        assert any(s["sink_peak_queued_bytes"] > 0 for s in st.values())
        _clean(st)


def test_worker_killed_mid_write_still_writes_everything(tmp_path):
    """SIGKILL a worker during a misaligned write: the run restarts and completes."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, Client(cl) as client:
        client.register_plugin(aimss_dask.AIMSS())
        x = da.arange(40 * 1000, chunks=1000).map_blocks(_slow, dtype=np.int64)
        path = str(tmp_path / "a.zarr")
        fut = client.compute(aimss_dask.to_zarr(x, path, chunks=(1024,), compute=False))
        # Kill a worker once the run is underway.
        import time

        time.sleep(1.0)
        victim = sorted(listed_workers(client))[0]
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        fut.result(timeout=120)
        np.testing.assert_array_equal(zarr.open_array(path)[:], np.arange(40_000))


#: (blocks, to_zarr arguments) of a rows run and of a chunks run of a 1-d array.
IN_PLACE = {
    "rows": (1000, {"chunks": (1024,), "compressors": None}),
    "chunks": (1024, {"chunks": (256,), "shards": (4096,)}),
}


@pytest.mark.parametrize("kind", sorted(IN_PLACE))
def test_worker_killed_mid_rows_run_still_writes_everything(tmp_path, kind):
    """SIGKILL a worker that has written blocks in place, before the run's
    last task: Dask runs its write tasks again elsewhere, they are written
    again (rows: the same bytes at the same offsets; chunks: appended again,
    and only the surviving task's copy is indexed), and every unit gets its
    key once, whole."""
    blocks, kwargs = IN_PLACE[kind]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, Client(cl) as client:
        client.register_plugin(aimss_dask.AIMSS())
        x = da.arange(40 * 1000, chunks=blocks).map_blocks(_slow, dtype=np.int64)
        path = str(tmp_path / "a.zarr")
        delayed = aimss_dask.to_zarr(x, path, compute=False, **kwargs)
        assert _kind(delayed) == kind
        fut = client.compute(delayed)
        prefix = f"aimss-sink-{kind}-"
        # Wait until a worker holds a finished write task (its bytes are on disk).
        held = wait_until(
            lambda: client.run_on_scheduler(_write_tasks_held, prefix), timeout=30, interval=0.01,
            what="a finished write task",
        )
        victim, keys = sorted(held.items())[0]
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        assert fut.result(timeout=120) == 40_000 * 8
        np.testing.assert_array_equal(zarr.open_array(path)[:], np.arange(40_000))
        assert not _partials(path)
        # The victim's finished writes were done again ...
        assert max(client.run_on_scheduler(_times_in_memory, keys)) >= 2
    if kind == "chunks":  # ... and the first copies are dead bytes, never indexed
        assert _unindexed_bytes(path, per_shard=4096 // 256) > 0


class _DieInCommit:
    """Stands in for ``os`` in :mod:`aimss_dask.sink.chunkfiles`: the first process of the cluster to give a
    run's second unit its key dies right there (``os._exit``), as a worker killed mid-commit."""

    def __init__(self, flag: str) -> None:
        self._flag, self._renamed = flag, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        if ".aimss-sink-" in str(src) and str(src).endswith(".partial") and not str(dst).endswith((".partial", ".json")):
            self._renamed += 1
            if self._renamed == 2:
                try:
                    os.close(os.open(self._flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass  # another process died already: this one goes on
                else:
                    os._exit(1)
        return os.replace(src, dst)


def _die_in_commit(flag: str) -> None:
    from aimss_dask.sink import chunkfiles

    chunkfiles.os = _DieInCommit(flag)


@pytest.mark.parametrize("kind", sorted(IN_PLACE))
def test_a_last_task_killed_between_two_renames_is_finished_by_its_next_attempt(tmp_path, kind):
    """The run's last task dies after giving one unit its key: its next attempt (Dask runs it again, with
    the write tasks whose results died with it) finishes that commit from what it wrote down, and no
    unit is left old, or replaced by a partial file a write task made again. Before, the next attempt
    found its writers gone, called it a bug and deleted the partial files the array still needed."""
    blocks, kwargs = IN_PLACE[kind]
    flag = str(tmp_path / "died")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, Client(cl) as client:
        client.register_plugin(aimss_dask.AIMSS())
        client.run(_die_in_commit, flag)
        path = str(tmp_path / "a.zarr")
        x = da.arange(40 * 1000, chunks=blocks)
        delayed = aimss_dask.to_zarr(x, path, compute=False, **kwargs)
        assert _kind(delayed) == kind
        assert client.compute(delayed).result(timeout=120) == 40_000 * 8
        assert os.path.exists(flag), "no worker died in the commit"
        np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], np.arange(40_000))
        assert not _partials(path)
        assert not [f for f in os.listdir(path) if f.startswith(".aimss-commit-")]


def _write_tasks_held(prefix, dask_scheduler=None):
    """The finished write tasks of a run (keys starting ``prefix``) by the worker holding them."""
    out: dict[str, list[str]] = {}
    for ts in dask_scheduler.tasks.values():
        if isinstance(ts.key, tuple) and str(ts.key[0]).startswith(prefix) and ts.state == "memory":
            for ws in ts.who_has:
                out.setdefault(ws.address, []).append(repr(ts.key))
    return out


def _times_in_memory(keys, dask_scheduler=None):
    """How many times each task (``repr`` of its key) reached memory."""
    by_repr = {repr(k): k for k in dask_scheduler.tasks}
    return [sum(1 for t in dask_scheduler.story(by_repr[k]) if t[2] == "memory") for k in keys]


def _unindexed_bytes(path, per_shard):
    """Bytes of the shard files of a 1-d sharded array (index at the end) that no index entry points at."""
    dead = 0
    for root, _, files in os.walk(os.path.join(path, "c")):
        for f in files:
            data = open(os.path.join(root, f), "rb").read()
            index = np.frombuffer(data[-(16 * per_shard + 4) : -4], dtype="<u8").reshape(-1, 2)
            used = index[index[:, 0] != np.uint64(2**64 - 1), 1].sum()
            dead += len(data) - (16 * per_shard + 4) - int(used)
    return dead


@pytest.mark.parametrize("kind", sorted(IN_PLACE))
def test_a_failed_rows_run_changes_no_chunk_and_leaves_no_partial_file(client, tmp_path, kind):
    """A block that fails after others were written in place: to_zarr raises
    its error, the array keeps its old data, and no partial file is left."""
    blocks, kwargs = IN_PLACE[kind]
    path = str(tmp_path / "a.zarr")
    old = np.arange(30_000, dtype="f8")
    zarr.create_array(path, shape=old.shape, dtype="f8", **kwargs)[:] = old
    x = da.ones(30_000, chunks=blocks).map_blocks(_fail_block, 20, dtype="f8")
    assert _kind(aimss_dask.to_zarr(x, path, compute=False)) == kind
    with pytest.raises(ValueError, match="block 20 fails"):
        aimss_dask.to_zarr(x, path)
    np.testing.assert_array_equal(zarr.open_array(path)[:], old)
    assert not _partials(path)
    assert_workers_clean()


def _fail_block(block, bad, block_info=None):
    import time

    i = block_info[0]["chunk-location"][0]
    if i == bad:
        time.sleep(0.5)  # let the others write first
        raise ValueError(f"block {bad} fails")
    return block


def _slow(block):
    import time

    time.sleep(0.05)
    return block


def test_local_scheduler_without_a_cluster(tmp_path):
    """Without distributed, the blocks are written synchronously (aligned only)."""
    with dask.config.set(scheduler="sync"):
        x = da.arange(20, chunks=5)
        aimss_dask.to_zarr(x, str(tmp_path / "a.zarr"), chunks=(5,))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"))[:], np.arange(20))


def test_blocks_in_memory_make_one_task_per_worker_thread(client, tmp_path):
    """A persisted array is written by one task per thread of each worker that
    holds blocks, each task taking only blocks its worker holds."""
    from distributed import wait

    from aimss_dask.sink.graphs import held_groups as _held_groups
    from aimss_dask.sink.plan import split_by_bytes as _split

    x = da.random.default_rng(2).random((40_000, 8), chunks=(1000, 8)).persist()
    wait(x)
    groups = _held_groups(x)
    who = client.who_has(client.futures_of(x))
    nthreads = client.nthreads()
    holders = {next(iter(who[(x.name, *idx)])) for g in groups for idx in g}
    assert len(groups) == sum(nthreads[w] for w in holders)
    for g in groups:
        assert len({next(iter(who[(x.name, *idx)])) for idx in g}) == 1
    assert sorted(idx for g in groups for idx in g) == [(i, 0) for i in range(40)]
    # Runs of about equal bytes, in order, never more than asked.
    assert _split([((i,), 10) for i in range(10)], 3) == [[(0,), (1,), (2,), (3,)], [(4,), (5,), (6,)], [(7,), (8,), (9,)]]
    assert _split([((0,), 5), ((1,), 100), ((2,), 5)], 2) == [[(0,), (1,)], [(2,)]]
    assert _split([((0,), 1)], 4) == [[(0,)]]
    path = str(tmp_path / "a.zarr")
    delayed = aimss_dask.to_zarr(x, path, chunks=(1024, 8), compressors=None, compute=False)
    assert len([k for k in delayed.dask if "aimss-sink-rows" in str(k)]) == len(groups)
    delayed.compute()
    np.testing.assert_array_equal(zarr.open_array(path)[:], x.compute())


def test_jobs_table_gives_back_every_piece():
    """A task's jobs packed into one table of integers come back as they went
    in: ids in order, each job's pieces with their block, slices and place."""
    import pickle

    from aimss_dask.sink.plan import Jobs as _Jobs

    by_unit = {
        (3, 0): [(0, ((0, 0), (24, 64)), (1000, 1024)), (1, ((0, 0), (1000, 64)), (0, 1000))],
        (4, 1): [(1, ((1000, 64), (1024, 128)), (0, 24))],
    }
    jobs, nxt = _Jobs.pack(by_unit, 7, 2, 2)
    assert nxt == 9
    back = list(pickle.loads(pickle.dumps(jobs)))
    assert back == [
        (7, (3, 0), [(0, (slice(0, 24), slice(0, 64)), (1000, 1024)), (1, (slice(0, 1000), slice(0, 64)), (0, 1000))]),
        (8, (4, 1), [(1, (slice(1000, 1024), slice(64, 128)), (0, 24))]),
    ]
    assert list(_Jobs.pack({}, 0, 2, 2)[0]) == []


# -- clear errors, and nothing created or deleted that should not be (issue 17, items 4 and 7) --


def test_s3_url_without_s3fs_names_the_package(client, tmp_path, monkeypatch):
    """fsspec's ImportError for a protocol is translated: the message names the
    package to install, not overwrite=True. s3fs is not installed in the test
    environment; the ``None`` in ``sys.modules`` keeps it so where it is."""
    import sys

    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.chdir(tmp_path)
    x = da.ones(10, chunks=5)
    with pytest.raises(aimss_dask.MissingDependencyError, match=r"needs the package 's3fs' for s3:// URLs.*pip install s3fs \(or pip install 'aimss-dask\[s3\]'\)") as info:
        aimss_dask.to_zarr(x, "s3://bucket/out.zarr")
    assert "overwrite" not in str(info.value)
    assert isinstance(info.value, ImportError) and isinstance(info.value.__cause__, ImportError)
    with pytest.raises(aimss_dask.InvalidArgumentError, match="fsspec knows no protocol 'nosuchproto'"):
        aimss_dask.to_zarr(x, "nosuchproto://bucket/out.zarr")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_at_the_path_is_named_and_kept(client, tmp_path, overwrite):
    path = tmp_path / "out.zarr"
    path.write_text("not a store")
    x = da.ones(10, chunks=5)
    with pytest.raises(aimss_dask.InvalidArgumentError, match=rf"{path}' is a file, not a folder.*Give another path"):
        aimss_dask.to_zarr(x, str(path), overwrite=overwrite)
    with pytest.raises(aimss_dask.InvalidArgumentError, match=rf"{path}' is a file, not a folder"):
        aimss_dask.to_zarr(x, str(path), component="a/b", dims=("k",))
    assert path.read_text() == "not a store"


def test_overwrite_never_deletes_a_folder_zarr_did_not_write(client, tmp_path):
    """Zarr's overwrite clears the target folder: one holding files but no Zarr
    array or group is refused, and its files stay."""
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(aimss_dask.InvalidArgumentError, match=r"overwrite=True would delete the contents of .*mydata.*\['notes.txt'\] but no Zarr array or group"):
        aimss_dask.to_zarr(da.ones(10, chunks=5), str(folder), overwrite=True)
    assert (folder / "notes.txt").read_text() == "precious"
    assert os.listdir(folder) == ["notes.txt"]
    # A Zarr array there is replaced, as asked.
    aimss_dask.to_zarr(da.ones(10, chunks=5), str(tmp_path / "z.zarr"))
    aimss_dask.to_zarr(da.zeros(4, chunks=2), str(tmp_path / "z.zarr"), overwrite=True)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "z.zarr"))[:], np.zeros(4))


def _mount_read_only(folder) -> bool:
    """A read-only tmpfs on ``folder``, where this process may mount (root with CAP_SYS_ADMIN)."""
    import subprocess

    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@pytest.mark.parametrize("how", ["mount", "simulated"])
def test_a_read_only_file_system_raises_store_read_only(client, tmp_path, monkeypatch, how):
    """Tests run as root, for whom chmod does not make a folder read-only.
    ``mount``: a real read-only tmpfs (skipped where this process may not
    mount). ``simulated``: ``Path.mkdir`` under the folder raises EROFS, as
    the kernel does, where Zarr's LocalStore creates the store's folder (and
    os.access says yes, as it does for root on a chmod-ed folder)."""
    import errno
    import pathlib
    import subprocess

    ro = tmp_path / "ro"
    if how == "mount":
        if not _mount_read_only(ro):
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        ro.mkdir()
        real_mkdir = pathlib.Path.mkdir

        def mkdir(self, *args, **kwargs):
            if str(self).startswith(str(ro)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    try:
        target = str(ro / "out.zarr")
        x = da.ones(10, chunks=5)
        with pytest.raises(aimss_dask.StoreReadOnlyError, match=rf"cannot write '{target}'.*(Read-only file system|not writable).*this user can write"):
            aimss_dask.to_zarr(x, target)
        with pytest.raises(aimss_dask.StoreReadOnlyError, match=rf"{ro}"):
            aimss_dask.to_zarr(x, target, dims=("k",))
        assert os.listdir(ro) == []
    finally:
        if how == "mount":
            subprocess.run(["umount", str(ro)], check=True, timeout=30)
    assert_workers_clean()


def test_invalid_shards_create_no_folder(client, tmp_path):
    """Every argument is checked (by a rehearsal in memory) before the store's
    folder is made: nothing is left behind, at any depth."""
    x = da.ones((10, 10), chunks=5)
    root = tmp_path / "new.zarr"
    for kwargs in (
        {"chunks": (3, 3), "shards": (5, 5)},
        {"component": "g/a", "chunks": (3, 3), "shards": (5, 5)},
        {"component": "g/a", "compressors": "not-a-codec"},
        {"dims": ("a", "b"), "chunks": (3, 3), "shards": (5, 5)},
    ):
        with pytest.raises(aimss_dask.InvalidArgumentError):
            aimss_dask.to_zarr(x, str(root), **kwargs)
        assert not root.exists(), kwargs
    # Inside an existing store, the array's folder is not made either.
    zarr.create_group(str(root))
    with pytest.raises(aimss_dask.InvalidArgumentError, match="shards="):
        aimss_dask.to_zarr(x, str(root), component="a", chunks=(3, 3), shards=(5, 5))
    assert sorted(os.listdir(root)) == ["zarr.json"]


@pytest.mark.parametrize(
    "blocks, zchunks, shards, raw, kind, durable",
    [
        ((1000, 64), (1024, 64), None, False, "push", True),
        ((2048, 64), (1024, 64), None, False, "aligned", True),
        ((1000, 64), (1024, 64), None, True, "rows", True),
        ((1024, 64), (256, 64), (4096, 64), False, "chunks", True),
        ((1000, 64), (1024, 64), None, False, "push", False),
        ((1000, 64), (1024, 64), None, True, "rows", False),
    ],
)
def test_durable_to_zarr_syncs_every_unit_it_wrote(client, tmp_path, blocks, zchunks, shards, raw, kind, durable):
    """``durable=True``: every unit file, and the metadata, synced before the run returns; else none."""
    client.run(count_fsyncs)
    count_fsyncs()
    x = da.random.default_rng(5).random((6000, 64), chunks=blocks)
    path = str(tmp_path / "d.zarr")
    kw = {"compressors": None} if raw else {}
    delayed = aimss_dask.to_zarr(x, path, chunks=zchunks, shards=shards, compute=False, durable=durable, **kw)
    assert _kind(delayed) == kind
    delayed.compute()
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], x.compute())
    synced = set(count_fsyncs()).union(*client.run(count_fsyncs).values())
    root = os.path.realpath(path)
    units = {os.path.realpath(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "c")) for f in fs}
    assert units, "no unit file written"
    meta = os.path.join(root, "zarr.json")
    # Every folder the run made is a new entry of its parent, up to the store's own folder.
    folders = {os.path.join(d, "") for d, _, _ in os.walk(root)} | {os.path.join(os.path.dirname(root), "")}
    if durable:
        assert units <= synced, f"not synced: {sorted(units - synced)[:3]}"
        assert meta in synced
        assert folders <= synced, f"folders not synced: {sorted(folders - synced)[:3]}"
    else:
        assert not synced & (units | {meta} | folders)


def test_durable_to_zarr_of_a_dataset_syncs_its_coordinates(client, tmp_path):
    xr = pytest.importorskip("xarray")
    client.run(count_fsyncs)
    count_fsyncs()
    ds = xr.Dataset(
        {"t": (("time", "x"), da.ones((100, 8), chunks=(25, 8)))}, coords={"time": np.arange(100)}
    )
    path = str(tmp_path / "ds.zarr")
    aimss_dask.to_zarr(ds, path, durable=True)
    synced = set(count_fsyncs()).union(*client.run(count_fsyncs).values())
    root = os.path.realpath(path)
    files = {
        os.path.realpath(os.path.join(d, f))
        for d, _, fs in os.walk(root) for f in fs if f != "zarr.json" or d != root
    }
    assert files <= synced, f"not synced: {sorted(files - synced)[:3]}"
    xr.testing.assert_identical(xr.open_zarr(path).load(), ds.load())


def test_durable_must_be_a_bool(client, tmp_path):
    with pytest.raises(aimss_dask.InvalidArgumentError, match="durable='yes' must be True or False"):
        aimss_dask.to_zarr(da.ones(4, chunks=2), str(tmp_path / "x.zarr"), durable="yes")
    assert not os.path.exists(tmp_path / "x.zarr")
