"""``Stream.map_records`` on a real cluster: a slow consumer hands the rest of its range to a helper.

One worker is throttled (``aimss_dask.testing.throttled``, a CPU-share
limit): the consumers of the partitions it owns fall behind their peers, the
coordinator's LATE rule flags them, and at their next progress report they
stop at a split point and start a helper on a fast worker. Each record is
consumed once, in order, and the group's offsets end at the partitions' ends.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pytest
from conftest import speculation_client, wait_until
from distributed import Client

import aimss_dask
from aimss_dask.core.errors import AIMSSError
from aimss_dask.core.names import STRAGGLER_TOPIC
from aimss_dask.testing import throttled

#: The slow worker's share of time (20x slower than the others).
SHARE = 0.05
PARTITIONS = 6
RECORDS = 300


@pytest.fixture(scope="module")
def client():
    # Judge consumers after 0.2 s; one helper at a time on 3 threads.
    with speculation_client(min_runtime=0.2, interval="100ms", max_fraction=0.34) as c:
        yield c


def _pid(client: Client, worker: str) -> int:
    return client.run(os.getpid, workers=[worker])[worker]


def _events(client: Client, since: float) -> list[dict[str, Any]]:
    return [m for t, m in client.get_events(STRAGGLER_TOPIC) if t >= since and isinstance(m, dict)]


def _work(record: np.ndarray, scale: float = 1.0) -> tuple[int, float]:
    """Some milliseconds of CPU per record, and a result that names the record."""
    x = 0
    for i in range(20_000):
        x += i
    return int(record[0]), float(record.sum()) * scale


def _record(p: int, i: int) -> np.ndarray:
    return np.full(8, p * 100_000 + i, dtype=np.int64)


def _filled(name: str) -> aimss_dask.Stream:
    stream = aimss_dask.create_stream(name, partitions=PARTITIONS)
    for i in range(RECORDS):
        for p in range(PARTITIONS):
            stream.write(_record(p, i), partition=p)
    stream.seal()
    return stream


def _want(p: int, scale: float = 1.0) -> list[tuple[int, float]]:
    return [_work(_record(p, i), scale) for i in range(RECORDS)]


def test_equally_fast_consumers_get_no_helper(client):
    # First: the slow test leaves its worker flagged slow for a while.
    name = f"even-{time.time_ns()}"
    stream = _filled(name)
    t0 = time.time()
    got = client.gather(stream.map_records(_work))
    assert got == [_want(p) for p in range(PARTITIONS)]
    copies = [e for e in _events(client, t0) if e["action"] == "copy"]
    assert copies == []
    # Without a group of its own, a call reads from offset 0 again.
    assert client.gather(stream.map_records(_work)) == got
    # ... and the groups those calls made for themselves are gone once they are done.
    assert stream.info()["groups"] == {}
    aimss_dask.destroy_stream(name)


def test_a_slow_consumer_hands_the_rest_of_its_range_to_a_helper_and_every_record_is_consumed_once(client):
    name = f"takeover-{time.time_ns()}"
    stream = _filled(name)
    slow = stream.info()["owners"][0]
    t0 = time.time()
    with throttled(_pid(client, slow), SHARE):
        got = client.gather(stream.map_records(_work, 2.0, group="g"))
    assert got == [_want(p, 2.0) for p in range(PARTITIONS)]
    events = _events(client, t0)
    helpers = [e for e in events if e["action"] == "copy" and e.get("kind") == "consumer"]
    assert helpers, f"no consumer was taken over: {events}"
    for h in helpers:
        assert h["worker"] == slow and h["dest"] != slow, h
        assert h["rule"] == "late"
        first, stop = h["range"]
        assert 0 < first < RECORDS and (stop is None or first < stop <= RECORDS), h
    # The group's offsets end at the partitions' ends: nothing skipped, nothing left over.
    assert stream.info()["groups"]["g"] == [RECORDS] * PARTITIONS
    # A group that has consumed everything gets nothing more.
    again = client.gather(stream.map_records(_work, group="g"))
    assert again == [[] for _ in range(PARTITIONS)]
    # The helpers are over: none counts against the cap any longer, and each
    # flagged consumer's report closed with its helper's offset.
    wait_until(lambda: aimss_dask.status().stragglers["takeovers"] == [], timeout=20, what="helpers forgotten")
    closed = [e for e in _events(client, t0) if e["action"] == "straggler" and e.get("kind") == "consumer"
              and e["outcome"] != "running"]
    assert any(e["outcome"].startswith("helper took over from offset") for e in closed), closed
    aimss_dask.destroy_stream(name)


def test_map_records_refuses_what_is_not_a_function_and_a_bad_group_name(client):
    name = f"bad-{time.time_ns()}"
    stream = aimss_dask.create_stream(name, partitions=2)
    with pytest.raises(TypeError, match=r"map_records needs a function .*'not callable'"):
        stream.map_records("not callable")
    with pytest.raises((TypeError, AIMSSError), match="consumer group"):
        stream.map_records(_work, group=3)
    aimss_dask.destroy_stream(name)


def test_a_consumer_whose_worker_is_killed_runs_again_and_every_record_is_consumed(client):
    # Last in this module: it kills a worker (its nanny starts a new one).
    import signal

    name = f"killed-{time.time_ns()}"
    stream = aimss_dask.create_stream(name, partitions=3, replication=2)
    n = 3 * RECORDS  # per partition: consumers run a second or more
    for i in range(3 * n):
        stream.write(_record(i % 3, i // 3), partition=i % 3)
    stream.seal()
    victim = stream.info()["owners"][0]
    pid = _pid(client, victim)
    futs = stream.map_records(_work)
    wait_until(lambda: client.run_on_scheduler(_consuming, name), timeout=20, what="consumers under way")
    os.kill(pid, signal.SIGKILL)
    got = client.gather(futs)
    # Without a group of its own the re-run consumer starts from offset 0:
    # the whole partition, in order, once.
    assert got == [[_work(_record(p, i)) for i in range(n)] for p in range(3)]
    aimss_dask.destroy_stream(name)
    # With a group (a stream of its own: the records the first call's group
    # passed were trimmed): the re-run starts where the call started, not
    # where the killed consumer had got to (its results died with it), and
    # the group is committed to the ends once the results are the tasks'.
    client.wait_for_workers(3, timeout=60)
    name = f"killed-group-{time.time_ns()}"
    stream = aimss_dask.create_stream(name, partitions=3, replication=2)
    for i in range(3 * n):
        stream.write(_record(i % 3, i // 3), partition=i % 3)
    stream.seal()
    pid = _pid(client, stream.info()["owners"][1])
    futs = stream.map_records(_work, group="kept")
    wait_until(lambda: client.run_on_scheduler(_consuming, name, 1), timeout=20, what="consumers past their start")
    # Nothing committed before the results: a partition whose consumer still
    # runs is at 0 (one that finished meanwhile is at its end).
    assert client.run_on_scheduler(_committed_while_running, name) == []
    os.kill(pid, signal.SIGKILL)
    got = client.gather(futs)
    assert got == [[_work(_record(p, i)) for i in range(n)] for p in range(3)]
    assert stream.info()["groups"]["kept"] == [n] * 3
    aimss_dask.destroy_stream(name)


def _committed_while_running(name: str, dask_scheduler=None) -> list[tuple[int, int]]:
    """``(partition, committed offset)`` of ``name``'s partitions whose consumer still runs, where that is not 0."""
    from aimss_dask.core.names import PLUGIN_NAME

    coord = dask_scheduler.plugins[PLUGIN_NAME]
    running = {k[2] for k, r in coord.stragglers.ranges.items() if k[0] == name and not r["done"]}
    out = []
    for offsets in coord.state.groups.get(name, {}).values():
        out += [(p, off) for p, off in enumerate(offsets) if p in running and off]
    return out


def _consuming(name: str, past: int = 0, dask_scheduler=None) -> bool:
    """Whether a consumer of ``name`` reported an offset past ``past`` records from its start."""
    from aimss_dask.core.names import PLUGIN_NAME

    ranges = dask_scheduler.plugins[PLUGIN_NAME].stragglers.ranges
    return any(k[0] == name and r["offset"] - r["start"] >= past and not r["done"] for k, r in ranges.items())
