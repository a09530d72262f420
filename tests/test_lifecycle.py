"""Restarting and closing the cluster leaves no AIMSS state behind."""

from __future__ import annotations

import os

import numpy as np
import pytest
from distributed import Client, LocalCluster

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.core.errors import error_to_wire


def test_restart_forgets_streams_and_keeps_working():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit="32MiB"))
        s = aimss_dask.create_stream("before", partitions=2, persist=True)
        for i in range(128):
            s.write(np.full(2**17, i, dtype="f8"), partition=i % 2)  # 128 MiB: spills
        s.flush()
        old = aimss_dask.status()
        spill_dirs = [w["spill_directory"] for w in old.values()]
        assert sum(w["spilled_bytes"] for w in old.values()) > 0
        assert any(os.listdir(d) for d in spill_dirs)

        client.restart()

        with pytest.raises(aimss_dask.StreamNotFoundError, match="'before'"):
            aimss_dask.get_stream("before")
        new = aimss_dask.status()
        assert len(new) == 2 and set(new).isdisjoint(old)
        assert all(w["streams"] == [] and w["memory_bytes"] == 0 for w in new.values())
        # The old workers' spill files went with them.
        assert not any(os.path.isdir(d) and os.listdir(d) for d in spill_dirs)
        # The plugin reached the restarted workers: streams work again.
        t = aimss_dask.create_stream("after", partitions=2)
        t.write(b"hello", partition=1)
        t.seal()
        assert list(t.read()) == [b"hello"]
        aimss_dask.destroy_stream("after")


def test_worker_teardown_removes_its_spill_files():
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit="16MiB"))
        s = aimss_dask.create_stream("spilly", partitions=1, persist=True)
        for i in range(16):
            s.write(np.full(2**18, i, dtype="f8"))
        s.flush()
        (st,) = aimss_dask.status().values()
        d = st["spill_directory"]
        assert st["spilled_bytes"] > 0 and os.listdir(d)
        client.unregister_worker_plugin("aimss")
        assert not os.path.isdir(d)


@pytest.mark.parametrize(
    "reply, level",
    [
        (OSError("in <TCP (closed)>: Stream is closed"), "INFO"),  # CommClosedError is one
        (RuntimeError("handler raised"), "WARNING"),
        # A closing worker's torn-down plugin answers instead of its comm.
        (error_to_wire(aimss_dask.WorkerClosingError("torn down")), "INFO"),
    ],
)
def test_a_broadcast_to_a_worker_that_is_leaving_too_is_not_a_warning(caplog, reply, level):
    """At a cluster's shutdown, telling a closing peer that a worker left fails:
    that is expected (info); any other failure of a broadcast stays a warning."""
    import asyncio
    import logging

    from aimss_dask.coordinator.cluster import ClusterOps

    class _Scheduler:
        workers = {"tcp://a:1": None}

        async def broadcast(self, msg, workers, on_error):
            assert on_error == "return"
            return {w: reply for w in workers}

    ops = ClusterOps()
    ops.scheduler = _Scheduler()
    with caplog.at_level(logging.INFO, logger="aimss_dask"):
        replies = asyncio.run(ops.broadcast({"op": "aimss_owner_lost", "address": "tcp://b:2"}))
    [record] = [r for r in caplog.records if "aimss_owner_lost failed" in r.getMessage()]
    assert record.levelname == level
    # Callers read a leaving worker's reply as an exception, never as an answer.
    assert isinstance(replies["tcp://a:1"], BaseException)


def test_a_worker_listed_after_its_teardown_does_not_fail_destroy_or_status():
    """Dask lists a closing worker (its plugin already torn down) until its comm closes: a
    drop or a status request sent to every worker meanwhile still succeeds."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        s = aimss_dask.create_stream("closing", partitions=2)
        for i in range(10):
            s.write(i, partition=i % 2)
        s.flush()
        a, b = sorted(listed_workers(client))

        async def teardown(dask_worker):
            await dask_worker.plugin_remove("aimss")

        client.run(teardown, workers=[b])
        assert list(aimss_dask.status()) == [a]
        aimss_dask.destroy_stream("closing")
        with pytest.raises(aimss_dask.StreamNotFoundError, match="'closing'"):
            aimss_dask.get_stream("closing")


def _slow_frame(i: int):
    import time

    import pandas as pd

    if i >= 4:
        time.sleep(6)  # the graph is cancelled before
    return pd.DataFrame({"key": np.arange(1000) + i * 1000, "v": np.ones(1000)})


def test_a_cancelled_shuffle_frees_its_streams():
    """Its graph gone, a run's streams go too: nothing waits in the workers' memory."""
    import dask.dataframe as dd
    from conftest import make_cluster, wait_until

    with make_cluster(2) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        df = dd.from_map(_slow_frame, range(8), meta=_slow_frame(0).iloc[:0])
        fut = client.compute(aimss_dask.shuffle(df, "key", npartitions=4))
        wait_until(lambda: any(w["memory_bytes"] for w in aimss_dask.status().values()), timeout=60,
                   what="the shuffle pushing")
        assert aimss_dask.status().streams, "the run's stream should exist while it runs"
        fut.cancel()
        wait_until(
            lambda: not aimss_dask.status().streams
            and all(not w["streams"] and not w["memory_bytes"] for w in aimss_dask.status().values()),
            timeout=30, what="the cancelled run's streams freed",
        )
        assert [r["state"] for r in aimss_dask.status().runs] == ["closed"]
