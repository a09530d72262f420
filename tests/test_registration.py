"""What registration refuses: a log budget a worker cannot hold (clamped on
workers that join later), and a spill folder a worker cannot make.

Real worker processes with a 1 GiB Dask memory limit. The budget rule
(config.py, ``BudgetCheck``): with Dask's default thresholds a worker's log
may hold at most half its memory limit.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from distributed import Client, LocalCluster

import aimss_dask
from aimss_dask import InvalidArgumentError, NotRegisteredError
from aimss_dask._compat import listed_workers

GiB = 2**30
WORKER_LIMIT = "1GiB"
LARGEST = GiB // 2  # target 0.6 / 1.2


def _cluster(n_workers: int) -> LocalCluster:
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=WORKER_LIMIT,
        dashboard_address=":0",
    )


def test_a_budget_no_worker_can_hold_is_refused_at_registration(caplog):
    with _cluster(2) as cluster, Client(cluster) as client:
        with pytest.raises(InvalidArgumentError) as e:
            client.register_plugin(aimss_dask.AIMSS(memory_limit="64GiB"))
        msg = str(e.value)
        # Both numbers, the worker, the rule and the largest budget that fits.
        assert "68719476736 bytes (64.00 GiB)" in msg
        assert "1.00 GiB" in msg and "tcp://" in msg
        assert f"{LARGEST} bytes" in msg and "memory_limit='512.00MiB'" in msg
        assert "distributed.worker.memory.target=0.6" in msg
        assert "1 more worker" in msg

        # Nothing was registered: the API says so, and only that (no
        # "No handler" traceback from Dask on the side).
        with caplog.at_level(logging.INFO):
            with pytest.raises(NotRegisteredError, match="register_plugin"):
                aimss_dask.create_stream("s", partitions=2)
        assert not [r for r in caplog.records if "No handler" in r.getMessage()]
        assert client.run(lambda dask_worker: "aimss" in dask_worker.plugins) == {
            w: False for w in listed_workers(client)
        }

        # The fraction route is refused too.
        with pytest.raises(InvalidArgumentError, match=r"memory-fraction=0\.9"):
            client.register_plugin(aimss_dask.AIMSS(memory_fraction=0.9))

        # A budget that fits registers, and the workers hold exactly it.
        client.register_plugin(aimss_dask.AIMSS(memory_limit=LARGEST))
        st = aimss_dask.status()
        assert [w["budget"] for w in st.values()] == [LARGEST, LARGEST]
        assert not any("budget_warning" in w for w in st.values())


def _fill(name: str, partition: int, n: int, size: int) -> int:
    for i in range(n):
        aimss_dask.write_to(name, np.full(size // 8, partition * 100_000 + i, dtype="i8"), partition=partition)
    return n


def _check(records: list) -> list[int]:
    return [int(r[0]) for r in records if np.all(r == r[0])]


def test_a_worker_that_joins_later_clamps_and_is_not_killed():
    """The dask-jobqueue flow: register first, workers come later. A budget too
    large for them is clamped with a warning; writing twice the clamped budget
    spills instead of getting the worker killed."""
    with _cluster(0) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit="64GiB", segment_size="4MiB"))
        cluster.scale(1)
        client.wait_for_workers(1)
        (addr, ws), = aimss_dask.status().items()
        assert ws["budget"] == LARGEST
        assert "68719476736 bytes (64.00 GiB) does not fit" in ws["budget_warning"]
        assert "using 512.00 MiB" in ws["budget_warning"]

        pid_before = client.run(lambda: __import__("os").getpid())[addr]
        stream = aimss_dask.create_stream("big", partitions=2)
        size, n = 4 * 2**20, 2 * LARGEST // (4 * 2**20) // 2  # 2x the budget in all
        assert client.gather(client.map(_fill, ["big"] * 2, [0, 1], [n] * 2, [size] * 2)) == [n, n]
        stream.seal()
        st = aimss_dask.status()[addr]
        assert st["memory_bytes"] <= LARGEST and st["spilled_bytes"] >= LARGEST - 8 * 2**20
        assert st["peak_memory"] <= LARGEST + 8 * 2**20
        # Same process: never restarted by its nanny.
        assert client.run(lambda: __import__("os").getpid())[addr] == pid_before
        got = client.gather(stream.map_partitions(_check))
        assert got == [list(range(n)), [100_000 + i for i in range(n)]]
        aimss_dask.destroy_stream("big")


def test_a_spill_directory_workers_cannot_use_is_refused_at_registration(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("the user's file\n")
    with _cluster(2) as cluster, Client(cluster) as client:
        with pytest.raises(InvalidArgumentError) as e:
            client.register_plugin(aimss_dask.AIMSS(spill_directory=str(blocker / "spill")))
        msg = str(e.value)
        assert "could not start on 2 of 2 worker(s)" in msg
        assert str(blocker) in msg and "Nothing was registered" in msg
        assert blocker.read_text() == "the user's file\n"
        # Undone everywhere: no worker keeps a half-set-up plugin.
        assert set(client.run(lambda dask_worker: "aimss" in dask_worker.plugins).values()) == {False}
        with pytest.raises(NotRegisteredError):
            aimss_dask.create_stream("s")
        # A corrected registration works.
        client.register_plugin(aimss_dask.AIMSS(spill_directory=str(tmp_path / "spill")))
        s = aimss_dask.create_stream("s", partitions=2)
        s.write(np.arange(3))
        s.seal()
        assert sum(len(r) for r in client.gather(s.map_partitions(list))) == 1
