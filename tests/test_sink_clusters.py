"""``aimss_dask.to_zarr`` on cluster shapes other than the suite's default
(two one-thread workers on one host): workers with several threads, and
workers on two hosts (two loopback addresses of this machine)."""

from __future__ import annotations

import os

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import assert_workers_clean
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, wait
from test_sink_array import _kind, _partials

import aimss_dask
from aimss_dask.sink import graphs

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
    addrs = sorted(client.scheduler_info()["workers"])
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
    hosts = {w["host"] for w in two_hosts.scheduler_info()["workers"].values()}
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

    monkeypatch.setattr(graphs, "one_host", lambda: True)
    x = _spread(two_hosts, -old, blocks[0])
    delayed = aimss_dask.to_zarr(x, path, compute=False)  # into the array as it is
    assert _kind(delayed) == layout
    with pytest.raises(aimss_dask.SinkError, match=r"several hosts \['127\.0\.0\.1', '127\.0\.0\.2'\]"):
        delayed.compute()
    after = {f: open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(path) for f in fs}
    assert after == before
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], old)
