"""``aimss_dask.to_zarr`` on cluster shapes other than the suite's default
(two one-thread workers on one host): workers with several threads, and
workers on two hosts (two loopback addresses of this machine)."""

from __future__ import annotations

import os
import threading

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import assert_workers_clean
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, wait
from test_sink_array import _kind, _partials

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.sink import array as sink_array
from aimss_dask.sink import fstype

#: (blocks, to_zarr arguments, run) for each way of writing in place, and a push run.
LAYOUTS = {
    "rows": ((1000, 64), {"chunks": (1024, 64), "compressors": None}),
    "chunks": ((1024, 64), {"chunks": (256, 64), "shards": (4096, 64)}),
    "chunks-raw": ((1024, 64), {"chunks": (256, 32), "shards": (4096, 64), "compressors": None}),
    "push": ((1000, 64), {"chunks": (1024, 64)}),
}


@pytest.fixture(scope="module")
def threaded():
    """Two worker processes with two threads each."""
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0") as cl, Client(cl) as c:
        c.register_plugin(aimss_dask.AIMSS())
        yield c


@pytest.mark.parametrize("persist", [False, True])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_workers_with_several_threads_write_every_block_once(threaded, tmp_path, layout, persist):
    """Threads of one worker append to one shard file at once (each through
    its own descriptor), encode with their own zstd contexts and arenas, and
    persisted blocks make two write tasks per worker: the array is NumPy's."""
    blocks, kw = LAYOUTS[layout]
    x = da.random.default_rng(11).random((17_000, 64), chunks=blocks)
    want = x.compute()
    if persist:
        x = x.persist()
        wait(x)
    path = str(tmp_path / "a.zarr")
    delayed = aimss_dask.to_zarr(x, path, compute=False, **kw)
    assert _kind(delayed) == layout.split("-")[0]
    if persist and layout != "push":
        prefix = f"aimss-sink-{layout.split('-')[0]}-"
        ntasks = len([k for k in delayed.dask if isinstance(k, tuple) and str(k[0]).startswith(prefix)])
        assert ntasks == 4  # one per thread of each worker holding blocks
    assert delayed.compute() == want.nbytes
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], want)
    assert not _partials(path)
    assert_workers_clean(aimss_dask.status())


@pytest.fixture(scope="module")
def two_hosts():
    """One worker on 127.0.0.1 and one on 127.0.0.2: two hosts to Dask, one file system."""
    workers = {
        name: {"cls": Nanny, "options": {"host": host, "nthreads": 1}}
        for name, host in (("a", "127.0.0.1"), ("b", "127.0.0.2"))
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    with SpecCluster(scheduler=scheduler, workers=workers) as cl, Client(cl) as c:
        c.wait_for_workers(2)
        c.register_plugin(aimss_dask.AIMSS())
        yield c


def _spread(client, data, rows):
    """``data`` as a Dask array of ``rows``-row blocks held alternately by the two workers."""
    addrs = sorted(listed_workers(client))
    parts = [
        client.scatter(data[i : i + rows], workers=[addrs[(i // rows) % 2]], broadcast=False)
        for i in range(0, len(data), rows)
    ]
    x = da.concatenate([
        da.from_delayed(dask.delayed(p), shape=(min(rows, len(data) - i * rows), *data.shape[1:]), dtype=data.dtype)
        for i, p in enumerate(parts)
    ])
    x = x.persist()
    wait(x)
    holders = {next(iter(ws)) for ws in client.who_has(client.futures_of(x)).values()}
    assert holders == set(addrs), "the blocks are not held on both hosts"
    return x


def test_two_hosts_get_a_push_run_not_writes_in_place(two_hosts, tmp_path):
    """Appends are atomic on one host's file system only: with workers on two
    hosts, blocks of whole inner chunks are pushed to each shard's owner."""
    hosts = {w["host"] for w in listed_workers(two_hosts).values()}
    assert hosts == {"127.0.0.1", "127.0.0.2"}
    data = np.random.default_rng(1).random((16_384, 8))
    x = _spread(two_hosts, data, 1024)
    path = str(tmp_path / "a.zarr")
    delayed = aimss_dask.to_zarr(x, path, chunks=(256, 8), shards=(4096, 8), compute=False)
    assert _kind(delayed) == "push"
    delayed.compute()
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], data)
    assert not _partials(path)
    assert_workers_clean(aimss_dask.status())


@pytest.mark.parametrize("layout", ["rows", "chunks"])
def test_writes_in_place_from_two_hosts_are_refused_at_the_commit(two_hosts, tmp_path, monkeypatch, layout):
    """A cluster that looked like one host when the graph was built (here:
    the check bypassed) but whose writers turn out to be on two hosts: the
    last task refuses to commit, naming the hosts, and the array keeps every
    byte it had; no partial file is left."""
    blocks, kw = LAYOUTS[layout]
    kw = {k: (v[0],) if isinstance(v, tuple) else v for k, v in kw.items()}  # 1-d
    old = np.arange(16_384, dtype="f8")
    path = str(tmp_path / "a.zarr")
    aimss_dask.to_zarr(da.from_array(old, chunks=4096), path, **kw)
    before = {f: open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(path) for f in fs}

    monkeypatch.setattr(sink_array, "worker_hosts", lambda: 1)
    x = _spread(two_hosts, -old, blocks[0])
    delayed = aimss_dask.to_zarr(x, path, compute=False)  # into the array as it is
    assert _kind(delayed) == layout
    with pytest.raises(aimss_dask.SinkError, match=r"several hosts \['127\.0\.0\.1', '127\.0\.0\.2'\]"):
        delayed.compute()
    after = {f: open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(path) for f in fs}
    assert after == before
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], old)


# -- two hosts sharing a parallel file system ---------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("durable", [False, True])
def test_two_hosts_on_a_shared_file_system_write_rows_in_place(two_hosts, tmp_path, caplog, layout, durable):
    """``shared_filesystem=True`` (what Lustre, GPFS or BeeGFS would be found to be):
    rows in place from both hosts, and inner chunks written into byte ranges
    of their shards reserved for each task (no ``O_APPEND``, no ``flock``);
    the rest pushed. Every array is byte-equal to what Zarr itself writes
    from the same data."""
    blocks, kw = LAYOUTS[layout]
    data = np.random.default_rng(5).random((16_384, 64))
    x = _spread(two_hosts, data, blocks[0])
    path, plain = str(tmp_path / "a.zarr"), str(tmp_path / "zarr.zarr")
    with caplog.at_level("INFO", logger="aimss_dask"):
        delayed = aimss_dask.to_zarr(x, path, compute=False, shared_filesystem=True, durable=durable, **kw)
    assert _kind(delayed) == layout.split("-")[0]
    if layout.startswith("chunks"):
        # Every task was given byte ranges of its own, one after the other per shard.
        tasks = [v for k, v in dict(delayed.dask).items() if str(k[0] if isinstance(k, tuple) else k).startswith("aimss-sink-chunks-")]
        ranges = [r for t in tasks for r in t.args[-1].tolist()]
        assert ranges and all(limit > 0 for _, limit in ranges)
    assert delayed.compute() == data.nbytes
    z = zarr.create_array(plain, shape=data.shape, dtype=data.dtype, **{k: v for k, v in kw.items()})
    z[...] = data
    ours, theirs = zarr.open_array(path, mode="r"), zarr.open_array(plain, mode="r")
    np.testing.assert_array_equal(ours[...], theirs[...])
    assert ours.metadata == theirs.metadata
    if layout == "rows":  # uncompressed: the unit files themselves are Zarr's, byte for byte
        for root, _, files in os.walk(plain):
            for f in files:
                if f != "zarr.json":
                    rel = os.path.relpath(os.path.join(root, f), plain)
                    with open(os.path.join(plain, rel), "rb") as a, open(os.path.join(path, rel), "rb") as b:
                        assert a.read() == b.read(), rel
    assert not _partials(path)
    assert_workers_clean(aimss_dask.status())


def test_the_hosts_are_counted_from_the_scheduler_not_the_clients_cache(two_hosts):
    """The client refreshes its cached identity without workers now and then: the count must not see that.

    Counted from ``scheduler_info()``, a refresh landing between its fetch
    and its return made two hosts look like one, and writes in place from
    both were then refused at the commit.
    """
    from aimss_dask.sink.graphs import worker_hosts

    stop = threading.Event()

    def refresh() -> None:  # what the client's periodic callback does, often
        while not stop.is_set():
            two_hosts.sync(two_hosts._update_scheduler_info)

    t = threading.Thread(target=refresh, daemon=True)
    t.start()
    try:
        counts = [worker_hosts() for _ in range(200)]
    finally:
        stop.set()
        t.join(10)
    assert set(counts) == {2}


def test_two_hosts_without_a_shared_file_system_push_and_say_why(two_hosts, tmp_path, caplog):
    """Not known to be shared (this disk is no parallel file system) and not declared: pushed, logged once."""
    blocks, kw = LAYOUTS["rows"]
    data = np.random.default_rng(6).random((8192, 64))
    x = _spread(two_hosts, data, blocks[0])
    path = str(tmp_path / "a.zarr")
    assert fstype.fs_kind(path) not in fstype.PARALLEL
    with caplog.at_level("INFO", logger="aimss_dask"):
        delayed = aimss_dask.to_zarr(x, path, compute=False, **kw)
    assert _kind(delayed) == "push"
    assert caplog.text.count("pass shared_filesystem=True") == 1
    delayed.compute()
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], data)


def test_the_config_key_declares_a_shared_file_system(two_hosts, tmp_path):
    blocks, kw = LAYOUTS["rows"]
    data = np.random.default_rng(7).random((8192, 64))
    x = _spread(two_hosts, data, blocks[0])
    with dask.config.set({"aimss.sink.shared-filesystem": True}):
        delayed = aimss_dask.to_zarr(x, str(tmp_path / "a.zarr"), compute=False, **kw)
    assert _kind(delayed) == "rows"
    delayed.compute()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[...], data)
    with pytest.raises(aimss_dask.InvalidArgumentError, match=r"shared_filesystem='yes' must be True, False or None"):
        aimss_dask.to_zarr(x, str(tmp_path / "b.zarr"), shared_filesystem="yes", **kw)
    with dask.config.set({"aimss.sink.shared-filesystem": "yes"}), pytest.raises(
        aimss_dask.InvalidArgumentError, match=r"sink.shared-filesystem='yes' must be true, false or null"
    ):
        aimss_dask.to_zarr(x, str(tmp_path / "c.zarr"), **kw)
    assert not os.path.exists(tmp_path / "b.zarr")


def test_file_system_kinds_decide_where_units_are_written():
    assert fstype.decide(None, None, hosts=1) == (True, None)
    for kind in ("lustre", "gpfs", "beegfs"):
        assert fstype.decide(None, kind, hosts=4) == (True, None)
    ok, why = fstype.decide(None, "nfs", hosts=2)
    assert not ok and "NFS" in why
    ok, why = fstype.decide(True, "nfs", hosts=2)  # a declaration never makes NFS shared
    assert not ok and "NFS" in why
    assert fstype.decide(True, None, hosts=2) == (True, None)
    assert fstype.decide(False, "lustre", hosts=2)[0] is False
    assert fstype.decide(None, None, hosts=2)[0] is False
    assert fstype.kind_of(0x47504653) == "gpfs" and fstype.kind_of(0x19830326) == "beegfs"
    # This machine's own disk: a known local kind or none, never a parallel one.
    assert fstype.fs_kind(os.getcwd()) not in fstype.PARALLEL
    assert fstype.fs_kind("s3://bucket/a.zarr") is None


def test_fs_kind_reads_statfs_magic_of_the_nearest_existing_folder(tmp_path, monkeypatch):
    seen = []

    def fake(path):
        seen.append(path)
        return 0x0BD00BD0

    monkeypatch.setattr(fstype, "_statfs_magic", fake)
    assert fstype.fs_kind(str(tmp_path / "not" / "yet" / "a.zarr")) == "lustre"
    assert seen == [str(tmp_path)]


def test_fstype_docstring_examples():
    import doctest

    assert doctest.testmod(fstype).failed == 0


def test_fsync_docstring_examples():
    import doctest

    from aimss_dask.sink import fsync

    result = doctest.testmod(fsync)
    assert result.attempted > 0 and result.failed == 0
