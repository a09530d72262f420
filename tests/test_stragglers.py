"""Straggler detection on a real cluster with one worker made slow on purpose.

The tasks sleep, six times longer on the slow worker: the coordinator must
report them (``aimss-straggler`` events, ``status().stragglers``, the log),
flag the worker as slow, report consumers of a stream that fall behind their
group's peers, and report nothing at all when every worker is equally fast.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dask
import numpy as np
import pytest
from conftest import speculation_client, unique_name, wait_until
from distributed import Client, get_worker

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.core.names import STRAGGLER_TOPIC

BASE = 0.25
SLOW = 6


@pytest.fixture(scope="module")
def client():
    # Short tasks: judge them after 0.2 s, and look often; one copy at a
    # time on 3 threads (the default, a quarter of them, rounds to none).
    with speculation_client(min_runtime=0.2, interval="100ms", max_fraction=0.34) as c:
        yield c


def _work(i: int, slow: str | None, tag: str) -> int:
    time.sleep(BASE * (SLOW if get_worker().address == slow else 1))
    return i


@aimss_dask.speculative
def _marked(i: int, slow: str, tag: str) -> tuple[int, str]:
    """Idempotent for the test's purpose: the same number, wherever it runs; says where it ran."""
    here = get_worker().address
    time.sleep(BASE * (4 * SLOW if here == slow else 1))  # slow enough that a copy started late still wins
    return i, here


def _annotated(i: int, slow: str, tag: str) -> tuple[int, str]:
    """``_marked``'s body, not declared speculative: its graph is annotated instead."""
    here = get_worker().address
    time.sleep(BASE * (4 * SLOW if here == slow else 1))
    return i, here


@aimss_dask.speculative
def _fails_elsewhere(i: int, slow: str, tag: str) -> int:
    """Succeeds only on the slow worker: its copy, which runs elsewhere, fails."""
    here = get_worker().address
    if here != slow:
        time.sleep(BASE)
        if "-copy-" in str(get_worker().get_current_task()):
            raise RuntimeError("copies fail here")
        return i
    time.sleep(BASE * 2 * SLOW)
    return i


def _reports(client: Client, since: float) -> list[dict[str, Any]]:
    return [msg for t, msg in client.get_events(STRAGGLER_TOPIC) if t >= since and isinstance(msg, dict)]


def test_a_slow_workers_tasks_are_reported_and_the_worker_flagged(client):
    slow = sorted(listed_workers(client))[-1]
    t0 = time.time()
    for round_ in range(2):  # two groups: two stragglers on the slow worker
        tag = unique_name("slowtask")
        futs = client.map(_work, range(12), slow=slow, tag=tag, key=[f"{tag}-{i}" for i in range(12)])
        assert client.gather(futs) == list(range(12))
    wait_until(lambda: any(r["action"] == "slow-worker" for r in _reports(client, t0)), timeout=10)
    reports = _reports(client, t0)
    found = [r for r in reports if r["action"] == "straggler" and r["outcome"] == "running"]
    assert found, reports
    assert found[0]["rule"] == "quantile"
    for r in found:
        assert r["kind"] == "task" and r["worker"] == slow
        # Past 2x the median of a group whose other tasks took BASE (1.5x once
        # the worker is found slow), and its own elapsed time is known from
        # heartbeats, so below its full duration.
        assert r["rule"] in ("quantile", "slow worker")
        assert r["bound"] == pytest.approx((2 if r["rule"] == "quantile" else 1.5) * BASE, rel=0.4)
        assert r["bound"] < r["elapsed"] <= BASE * SLOW + 1.0
        assert r["copy"] is None  # ordinary tasks not marked idempotent are never copied
    ended = {r["key"]: r["outcome"] for r in reports if r["action"] == "straggler" and r["outcome"] != "running"}
    assert {r["key"] for r in found} <= set(ended) and set(ended.values()) == {"finished"}
    slow_reports = [r for r in reports if r["action"] == "slow-worker"]
    assert [r["worker"] for r in slow_reports] == [slow]
    st = aimss_dask.status().stragglers
    assert st["slow_workers"] == [slow]
    assert st["tasks"] == []  # all finished
    assert {r["key"] for r in st["reports"] if r["action"] == "straggler"} >= {r["key"] for r in found}


def test_equally_fast_workers_report_nothing(client):
    t0 = time.time()
    tag = unique_name("even")
    futs = client.map(_work, range(12), slow=None, tag=tag, key=[f"{tag}-{i}" for i in range(12)])
    assert client.gather(futs) == list(range(12))
    time.sleep(0.5)  # a few more checks
    assert [r for r in _reports(client, t0) if r["action"] == "straggler"] == []


def _write(name: str, p: int, n: int) -> int:
    stream = aimss_dask.get_stream(name)
    for i in range(n):
        stream.write(np.full(16, i, dtype=np.int64), partition=p)
    stream.flush()
    return n


def test_a_consumer_far_behind_its_groups_peers_is_reported(client):
    name = unique_name("consumed")
    n = 150
    stream = aimss_dask.create_stream(name, partitions=4)
    assert sum(client.gather(client.map(_write, [name] * 4, range(4), [n] * 4))) == 4 * n
    stream.seal()
    t0 = time.time()
    got: dict[int, int] = {}

    def consume(p: int, pause: float) -> None:
        k = 0
        for rec in stream.read(partition=p, group="g"):
            assert int(rec[0]) == k
            k += 1
            time.sleep(pause)
        got[p] = k

    threads = [
        threading.Thread(target=consume, args=(p, 0.05 if p == 3 else 0.01), daemon=True) for p in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {p: n for p in range(4)}
    wait_until(lambda: any(r.get("outcome") == "caught up" for r in _reports(client, t0)), timeout=10)
    reports = [r for r in _reports(client, t0) if r["action"] == "straggler"]
    flagged = [r for r in reports if r["outcome"] == "running"]
    assert [r["key"] for r in flagged] == [f"{name}/g/3"], reports
    r = flagged[0]
    assert r["kind"] == "consumer" and r["rule"] == "late" and r["stream"] == name and r["group"] == "g"
    assert r["worker"] == stream.spec.owners[3]
    assert r["estimate"] > r["bound"] >= 0  # 0 once its peers are done
    aimss_dask.destroy_stream(name)


def test_a_straggling_call_of_a_speculative_function_is_won_by_its_copy(client):
    slow = sorted(listed_workers(client))[-1]
    t0 = time.time()
    tag = unique_name("marked")
    futs = client.map(_marked, range(12), slow=slow, tag=tag, key=[f"{tag}-{i}" for i in range(12)])
    got = client.gather(futs)
    assert [i for i, _ in got] == list(range(12))
    wait_until(lambda: any(r.get("outcome") == "copy won" for r in _reports(client, t0)), timeout=10)
    reports = _reports(client, t0)
    copies = [r for r in reports if r["action"] == "copy"]
    assert copies, reports
    # Every copy ran off the slow worker.
    assert all(r["worker"] == slow and r["dest"] != slow for r in copies)
    won = [r for r in reports if r["action"] == "straggler" and r["outcome"] == "copy won"]
    assert won
    # The task's result came from its copy: computed on the copy's worker.
    by_key = {f"{tag}-{i}": where for i, where in got}
    for r in won:
        assert r["copy"] != slow and by_key[r["key"]] == r["copy"]
    # Nothing is left behind: no copy task, no straggler running.
    st = aimss_dask.status().stragglers
    assert st["tasks"] == []
    wait_until(lambda: not any(str(k).startswith("aimss-copy-") for k in client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.tasks))), timeout=10)


def test_tasks_annotated_speculative_get_copies_like_a_declared_function(client):
    slow = sorted(listed_workers(client))[-1]
    t0 = time.time()
    tag = unique_name("annotated")
    with dask.annotate(aimss_speculative=True):
        futs = client.map(_annotated, range(12), slow=slow, tag=tag, key=[f"{tag}-{i}" for i in range(12)])
    got = client.gather(futs)
    assert [i for i, _ in got] == list(range(12))
    wait_until(lambda: any(r.get("outcome") == "copy won" for r in _reports(client, t0)), timeout=10)
    won = [r for r in _reports(client, t0) if r["action"] == "straggler" and r["outcome"] == "copy won"]
    by_key = {f"{tag}-{i}": where for i, where in got}
    assert won and all(r["copy"] != slow and by_key[r["key"]] == r["copy"] for r in won)
    # The same function without the annotation is never copied.
    t1 = time.time()
    tag = unique_name("plain")
    futs = client.map(_annotated, range(12), slow=slow, tag=tag, key=[f"{tag}-{i}" for i in range(12)])
    assert [i for i, _ in client.gather(futs)] == list(range(12))
    time.sleep(0.5)
    reports = _reports(client, t1)
    assert any(r["action"] == "straggler" for r in reports), reports  # found, reported...
    assert not [r for r in reports if r["action"] == "copy"]  # ...never copied


def test_speculative_marks_a_function_and_calls_it_plainly_outside_a_task():
    f = aimss_dask.speculative(lambda x: x + 1)
    assert f(1) == 2 and aimss_dask.speculative(f) is f
    with pytest.raises(TypeError, match="needs a function, not int 3"):
        aimss_dask.speculative(3)


def test_a_failed_copy_leaves_the_result_to_the_original(client):
    slow = sorted(listed_workers(client))[-1]
    t0 = time.time()
    tag = unique_name("fails")
    futs = client.map(_fails_elsewhere, range(12), slow=slow, tag=tag, key=[f"{tag}-{i}" for i in range(12)])
    assert client.gather(futs) == list(range(12))
    wait_until(lambda: any(
        r["action"] == "straggler" and r["outcome"] not in ("running",) and r.get("copy")
        for r in _reports(client, t0)
    ), timeout=10)
    ended = [r for r in _reports(client, t0) if r["action"] == "straggler" and r.get("copy") and r["outcome"] != "running"]
    assert ended and all(r["outcome"] == "copy error" for r in ended), ended
