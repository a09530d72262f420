"""A slow sink writer hands its queue over, on a real cluster with one worker's disk slowed.

One worker's unit writes each wait first (``aimss_dask.testing.slow_writes``,
a slow disk on one node). The coordinator judges each ``to_zarr`` run's
writers from their heartbeats, tells the slow one to hand part of its queue
to a fast worker, and the array is the same as the input: each unit written
once, by the writer or by its helper.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import speculation_client, wait_until
from distributed import Client, wait

import aimss_dask
from aimss_dask.core.names import STRAGGLER_TOPIC
from aimss_dask.testing import slow_writes

#: Seconds each unit write waits on the slow worker (the others take milliseconds).
DELAY = 0.25


@pytest.fixture(scope="module")
def client():
    # Writers are judged once they wrote for 0.2 s; one hand-over at a time on 3 threads.
    with speculation_client(min_runtime=0.2, interval="100ms", max_fraction=0.34) as c:
        yield c


def _events(client: Client, since: float) -> list[dict[str, Any]]:
    return [m for t, m in client.get_events(STRAGGLER_TOPIC) if t >= since and isinstance(m, dict)]


def _array(client: Client) -> da.Array:
    x = da.random.default_rng(3).random((9600, 1200), chunks=(800, 1200))
    x = client.persist(x)
    wait(x)
    return x


def _files(path: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs if "zarr.json" not in f
    )


def test_a_slow_writer_hands_its_queue_over_and_every_unit_is_written_once(client, tmp_path):
    x = _array(client)
    want = x.compute()
    slow = sorted(client.scheduler_info()["workers"])[-1]
    path = str(tmp_path / "a.zarr")
    t0 = time.time()
    # Chunks of 300 rows straddle the blocks: pieces are pushed to each unit's owner.
    with slow_writes(client, slow, DELAY):
        aimss_dask.to_zarr(x, path, chunks=(300, 1200))
    got = zarr.open_array(path, mode="r")
    np.testing.assert_array_equal(got[:], want)
    assert _files(path) == sorted(f"c/{i}/0" for i in range(32))  # no partial or stray file
    copies = [m for m in _events(client, t0) if m["action"] == "copy" and m["kind"] == "sink-writer"]
    assert copies, _events(client, t0)
    assert all(c["worker"] == slow and c["dest"] != slow and c["bytes"] > 0 for c in copies)
    ends = wait_until(lambda: [
        m for m in _events(client, t0)
        if m["action"] == "straggler" and m["kind"] == "sink-writer" and m["outcome"] != "running"
    ], timeout=10, what="the slow writer's report closed")
    assert any(e["outcome"].startswith("helper on ") and " wrote 0 " not in e["outcome"] for e in ends), ends


def test_writers_at_equal_speed_hand_nothing_over(client, tmp_path):
    x = _array(client)
    t0 = time.time()
    path = str(tmp_path / "b.zarr")
    aimss_dask.to_zarr(x, path, chunks=(300, 1200))
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], x.compute())
    time.sleep(0.5)  # a last check after the run
    assert not [m for m in _events(client, t0) if m.get("kind") == "sink-writer"], _events(client, t0)
