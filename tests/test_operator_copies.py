"""Copies of AIMSS operators' straggling pushes, on a real cluster with one worker throttled.

The slow worker runs a fortieth of the time (``aimss_dask.testing.throttled``,
a CPU-share limit): its pushes straggle, the coordinator starts copies on
fast workers, the first copy of each record to reach its owner wins, and the
outputs are exactly-once: a shuffle has every row once, a rechunk and a Zarr
array equal the input. Once found slow, the worker gets no partitions of the
runs that follow, and none of their pushes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import speculation_client, wait_until
from distributed import Client, get_task_stream, wait

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.core.names import STRAGGLER_TOPIC
from aimss_dask.testing import throttled

#: The slow worker's share of time: 40x slower than the others. Pushes are
#: short, and the scheduler sees a task running only from its worker's
#: heartbeats: slow enough that one is seen before it ends.
SHARE = 0.025


@pytest.fixture(scope="module")
def client():
    # Short pushes: judge them after 0.2 s, once half of them are done,
    # and look often; one copy at a time on 3 threads.
    with speculation_client(min_runtime=0.2, interval="100ms", max_fraction=0.34, quantile=0.5) as c:
        yield c


@pytest.fixture
def fresh():
    """A cluster of its own: no worker found slow yet, whatever the module's tests did."""
    with speculation_client(min_runtime=0.2, interval="100ms", max_fraction=0.34, quantile=0.5) as c:
        yield c


@pytest.fixture
def slow(client):
    """The throttled worker's address; throttle it with ``throttled(pid(slow), SHARE)``."""
    return sorted(listed_workers(client))[-1]


def _pid(client: Client, worker: str) -> int:
    return client.run(os.getpid, workers=[worker])[worker]


def _events(client: Client, since: float) -> list[dict[str, Any]]:
    return [m for t, m in client.get_events(STRAGGLER_TOPIC) if t >= since and isinstance(m, dict)]


def _push_copies(client: Client, since: float) -> list[dict[str, Any]]:
    return [m for m in _events(client, since) if m["action"] == "copy" and "aimss-push-" in m["key"]]


def _part(i: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(i)
    return pd.DataFrame({"id": np.arange(i * n, (i + 1) * n), "k": rng.integers(0, 500, n), "v": rng.random(n)})


def _frame(nparts: int = 18, rows: int = 100_000) -> dd.DataFrame:
    return dd.from_delayed([dask.delayed(_part)(i, rows) for i in range(nparts)], meta=_part(0, 1))


def test_a_shuffles_straggling_pushes_get_copies_and_every_row_arrives_once(client, slow):
    # The inputs on the slow worker: it surely runs pushes of its own (Dask
    # steals queued ones for the others, never the running one).
    df = client.persist(_frame(), workers=[slow])
    wait(df)
    want = pd.concat([_part(i, 100_000) for i in range(18)]).sort_values("id").reset_index(drop=True)
    t0 = time.time()
    with throttled(_pid(client, slow), SHARE):
        got = aimss_dask.shuffle(df, on="k").compute()
    got = got.sort_values("id").reset_index(drop=True)
    # Exactly once: every row, none twice.
    assert got["id"].is_unique and len(got) == len(want)
    pd.testing.assert_frame_equal(got, want)
    copies = _push_copies(client, t0)
    assert any(c["worker"] == slow for c in copies), _events(client, t0)
    # Copies of other workers' stragglers may come too, where a busy machine
    # slows another worker: each runs elsewhere than its original.
    assert all(c["dest"] != c["worker"] for c in copies), copies
    # Each copied push's report closes with who won.
    wait_until(lambda: all(
        any(r["action"] == "straggler" and r["key"] == c["key"] and r["outcome"] != "running"
            for r in _events(client, t0))
        for c in copies
    ), timeout=10, what="the copied pushes' outcomes")
    ends = [r for r in _events(client, t0) if r["action"] == "straggler" and r["key"] in {c["key"] for c in copies}
            and r["outcome"] != "running"]
    assert {r["outcome"] for r in ends} <= {"copy won", "original won"}, ends
    # Once found slow, the pushes still queued there (not started) may move
    # to the others: only off a worker the coordinator said is slow (the
    # throttled one; on a busy machine another may be found slow too), and
    # every row still once.
    events = _events(client, t0)
    moved = [m for m in events if m["action"] == "steer" and m.get("moved")]
    flagged = {m["worker"] for m in events if m["action"] == "slow-worker"}
    assert all(len(m["avoid"]) == 1 and m["avoid"][0] in flagged and 1 <= m["tasks"] <= 18 for m in moved), (
        moved, flagged)


def test_a_slow_worker_owns_no_partition_of_the_next_run_and_runs_none_of_its_pushes(client, slow):
    wait_until(lambda: slow in aimss_dask.status().stragglers["slow_workers"], timeout=20,
               what="the throttled worker flagged slow")
    # The inputs on the slow worker: Dask would run their pushes there.
    df = client.persist(_frame(nparts=6, rows=10_000), workers=[slow])
    wait(df)
    t0 = time.time()
    with throttled(_pid(client, slow), SHARE), get_task_stream() as stream:
        out = aimss_dask.shuffle(df, on="k", npartitions=6).persist()
        wait(out)
    # Each partition is read where it lives (the read is pinned to its owner).
    reads = {str(t["key"]): t["worker"] for t in stream.data if "aimss-partition-" in str(t["key"])}
    assert len(reads) == 6 and slow not in reads.values(), reads
    # The pushes were placed elsewhere before they started: their inputs moved.
    pushes = {str(t["key"]): t["worker"] for t in stream.data if "aimss-push-" in str(t["key"])}
    assert len(pushes) == 6 and slow not in pushes.values(), pushes
    steered = [m for m in _events(client, t0) if m["action"] == "steer"]
    assert steered and all(list(m["avoid"]) == [slow] for m in steered) and sum(m["tasks"] for m in steered) >= 6
    assert sorted(out.compute()["id"]) == list(range(60_000))


def test_a_rechunk_and_a_zarr_write_whose_pushes_are_copied_or_moved_equal_their_input(fresh, tmp_path):
    # A worker that turns slow while its pushes are placed there already:
    # the running ones get copies, the queued ones move once it is found
    # slow (which comes first depends on which evidence does); a run
    # submitted once it is known slow places no push there.
    client = fresh
    slow = sorted(listed_workers(client))[-1]
    # The blocks on the slow worker: it surely runs pushes of its own.
    x = client.persist(da.random.default_rng(7).random((4800, 2400), chunks=(400, 2400)), workers=[slow])
    wait(x)
    want = x.compute()
    t0 = time.time()
    with throttled(_pid(client, slow), SHARE):
        y = aimss_dask.rechunk(x, (4800, 200)).compute()
        path = str(tmp_path / "a.zarr")
        aimss_dask.to_zarr(x, path, chunks=(500, 2400))
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], want)
    events = _events(client, t0)
    copies = _push_copies(client, t0)
    steered = [m for m in events if m["action"] == "steer"]
    assert copies or steered, events
    assert all(c["worker"] == slow and c["dest"] != slow for c in copies)
    assert all(list(m["avoid"]) == [slow] for m in steered)
