"""Background work of a slow worker gets help: sink writers and a loader's reads, on a real cluster.

Sinks: one worker's unit writes each wait first
(``aimss_dask.testing.slow_writes``, a slow disk on one node). The
coordinator judges each ``to_zarr`` run's writers from their heartbeats,
tells the slow one to hand part of its queue to a fast worker, and the array
is the same as the input: each unit written once, by the writer or by its
helper.

Loaders: one owner of a Zarr source runs a fortieth of the time
(``aimss_dask.testing.throttled``). The loader backs its late takes up on a
fast owner, which reads the same slabs from Zarr; every batch is right.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import forget_slow_workers, speculation_client, wait_until
from distributed import Client, wait

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.core.names import STRAGGLER_TOPIC
from aimss_dask.source import from_zarr
from aimss_dask.testing import slow_writes, throttled

#: Seconds each unit write waits on the slow worker (the others take milliseconds).
DELAY = 0.25

#: The slow source owner's share of time.
SHARE = 0.025


@pytest.fixture(scope="module")
def client():
    # Writers are judged once they wrote for 0.2 s; one hand-over at a time on 3 threads.
    with speculation_client(min_runtime=0.2, interval="100ms", max_fraction=0.34) as c:
        yield c


@pytest.fixture(autouse=True)
def no_slow_workers(client):
    """Each test starts with no worker found slow: a loaded machine's first tasks vary, and a
    worker flagged by that noise would get no unit (nor help) in these runs."""
    client.run_on_scheduler(forget_slow_workers)


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
    # The worker holding the most blocks: units are placed next to their
    # main input, so it surely owns units (and a queue) of its own. Not one
    # already found slow (a fresh cluster's first tasks vary): new runs
    # place no unit there.
    # The times of the tasks that made x may flag a worker on a loaded
    # machine; the run must be placed with none flagged (a worker flagged by
    # those would own no unit, and have no queue to hand over).
    client.run_on_scheduler(forget_slow_workers)
    flagged = set(aimss_dask.status().stragglers["slow_workers"])
    held = Counter(w for ws in client.who_has(x).values() for w in ws if w not in flagged)
    slow = max(sorted(held), key=held.__getitem__)
    path = str(tmp_path / "a.zarr")
    before = aimss_dask.status()[slow]
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
    # The helper stored what was handed over (the writer counts it); nothing came back.
    after = aimss_dask.status()[slow]
    assert after.get("sink_handed_regions", 0) > before.get("sink_handed_regions", 0), after
    assert after.get("sink_taken_back_regions", 0) == before.get("sink_taken_back_regions", 0), after
    # The report of the hand-over closes (its outcome says what the last
    # heartbeat showed). The writer, still slow, may be found late again
    # after it: such a report closes without a helper.
    def ends() -> list[dict[str, Any]]:
        return [
            m for m in _events(client, t0)
            if m["action"] == "straggler" and m["kind"] == "sink-writer" and m["outcome"] != "running"
        ]

    wait_until(lambda: any(e["outcome"].startswith("helper on ") for e in ends()), timeout=10,
               what="the slow writer's report closed with its helper")
    assert all(e["worker"] == slow for e in ends()), ends()


def test_writers_at_equal_speed_hand_nothing_over(client, tmp_path):
    x = _array(client)
    t0 = time.time()
    path = str(tmp_path / "b.zarr")
    aimss_dask.to_zarr(x, path, chunks=(300, 1200))
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], x.compute())
    time.sleep(0.5)  # a last check after the run
    assert not [m for m in _events(client, t0) if m.get("kind") == "sink-writer"], _events(client, t0)


def test_a_loader_backs_up_the_late_reads_of_a_slow_owner_and_every_batch_is_right(client, tmp_path):
    x = np.random.default_rng(5).random((4800, 256))
    path = str(tmp_path / "src.zarr")
    zarr.create_array(store=path, shape=x.shape, chunks=(100, 256), dtype=x.dtype)[...] = x
    s = from_zarr(path, partitions=6, name="hedged")
    slow = sorted(set(s.info()["owners"]))[-1]
    pid = client.run(os.getpid, workers=[slow])[slow]
    t0 = time.time()
    try:
        # Warm up: the loader learns how fast the owners answer.
        with throttled(pid, SHARE):
            got = np.concatenate(list(s.batches(200, shuffle=True, seed=1, epochs=2)))
    finally:
        aimss_dask.destroy_stream(s.name)
    # Two shuffled epochs: every row twice, none lost or repeated within an epoch.
    first, second = got[:4800], got[4800:]
    for epoch in (first, second):
        np.testing.assert_array_equal(epoch[np.lexsort(epoch.T[::-1])], x[np.lexsort(x.T[::-1])])
    copies = wait_until(lambda: [
        m for m in _events(client, t0) if m["action"] == "copy" and m.get("kind") == "loader"
    ], timeout=10, what="the loader's backups reported")
    assert all(c["dest"] != c["worker"] and c["copies"] >= 1 for c in copies), copies
    # The slow owner's reads are the ones backed up. A machine busy with
    # other work may make another owner late once or twice too (a backup is
    # then right to go, and harmless): most, not all.
    of_slow = sum(c["copies"] for c in copies if c["worker"] == slow)
    assert of_slow >= 0.8 * sum(c["copies"] for c in copies), copies
    won = sum(int(c["outcome"].split()[2]) for c in copies if c["worker"] == slow)  # "copy won k of n"
    assert won >= 1, copies


def test_a_loader_over_owners_at_equal_speed_backs_nothing_up(client, tmp_path):
    x = np.random.default_rng(6).random((2400, 128))
    path = str(tmp_path / "even.zarr")
    zarr.create_array(store=path, shape=x.shape, chunks=(100, 128), dtype=x.dtype)[...] = x
    s = from_zarr(path, partitions=6, name="even")
    t0 = time.time()
    try:
        np.testing.assert_array_equal(np.concatenate(list(s.batches(100))), x)
    finally:
        aimss_dask.destroy_stream(s.name)
    time.sleep(0.5)  # reports are sent after the last batch
    assert not [m for m in _events(client, t0) if m.get("kind") == "loader"], _events(client, t0)


def _timed_zarr_write(path: str) -> float:
    t0 = time.perf_counter()
    zarr.open_array(path, mode="r+")[:] = 1.0  # two chunks
    return time.perf_counter() - t0


def test_slow_writes_slows_chunk_writes_on_one_worker_only_and_is_undone(client, tmp_path):
    path = str(tmp_path / "timed.zarr")
    zarr.create_array(store=path, shape=(20,), chunks=(10,), dtype="f8")
    slow, fast = sorted(listed_workers(client))[-1], sorted(listed_workers(client))[0]
    with slow_writes(client, slow, 0.3):
        took = client.run(_timed_zarr_write, path, workers=[slow, fast])
        assert took[slow] >= 0.3 and took[fast] < 0.3, took  # Zarr writes the two at once
    assert client.run(_timed_zarr_write, path, workers=[slow])[slow] < 0.3
    with pytest.raises(aimss_dask.InvalidArgumentError, match="delay=-1"):
        with slow_writes(client, slow, -1):
            pass
