"""Reused threads (``core/threads.py``) and the speculative race that runs on them.

A thread started or ended while Dask's profiler takes ``sys._current_frames``
can deadlock CPython before 3.11.9 (gh-106883): work started once per task
must not start a thread each time.
"""

from __future__ import annotations

import doctest
import logging
import threading

import pytest
from conftest import unique_name, wait_until
from distributed import Client, LocalCluster

import aimss_dask
from aimss_dask.core import threads


def _run_and_wait(fn):
    done = threading.Event()

    def job():
        try:
            fn()
        finally:
            done.set()

    threads.start(job, "aimss-test-job")
    assert done.wait(10), "the job never ran"


def test_work_started_one_piece_at_a_time_runs_on_one_thread_that_stays():
    seen: list[tuple[int, str]] = []
    for _ in range(20):
        _run_and_wait(lambda: seen.append((threading.get_native_id(), threading.current_thread().name)))
    # One kernel thread for all twenty (a thread per piece has a new id each time).
    assert len({tid for tid, _ in seen}) == 1, seen
    assert {name for _, name in seen} == {"aimss-test-job"}
    idle = [t for t in threading.enumerate() if t.name == "aimss-reused"]
    assert idle and all(t.daemon for t in idle), "the thread stays, a daemon, named as idle"


def test_pieces_that_overlap_each_get_a_thread_and_none_waits_for_another():
    n = 6
    started = threading.Barrier(n + 1)
    release = threading.Event()
    ids: list[int] = []

    def piece():
        ids.append(threading.get_native_id())
        started.wait(10)
        assert release.wait(10)

    for _ in range(n):
        threads.start(piece, "aimss-test-overlap")
    started.wait(10)  # all six run at once: a broken barrier raises here
    release.set()
    assert len(set(ids)) == n
    wait_until(lambda: threads.idle() >= n, what="the six threads idle again")
    # Afterwards they are reused: six more pieces start no new thread.
    before = {t.native_id for t in threading.enumerate()}
    done = threading.Barrier(n + 1)
    for _ in range(n):
        threads.start(lambda: done.wait(10), "aimss-test-again")
    done.wait(10)
    assert {t.native_id for t in threading.enumerate()} <= before


def test_an_exception_in_a_piece_is_logged_and_the_thread_goes_on(caplog):
    with caplog.at_level(logging.ERROR, logger="aimss_dask"):
        _run_and_wait(lambda: 1 / 0)
        wait_until(
            lambda: any("aimss-test-job" in r.getMessage() and r.exc_info for r in caplog.records),
            what="the failure logged",
        )
        after: list[int] = []
        _run_and_wait(lambda: after.append(1))
    assert after == [1]


def test_docstring_examples():
    result = doctest.testmod(threads)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("version, risk", [((3, 11, 0), True), ((3, 11, 8), True), ((3, 11, 9), False),
                                           ((3, 12, 0), False), ((3, 13, 1), False)])
def test_the_interpreters_with_the_current_frames_deadlock(version, risk):
    assert threads.frames_deadlock_risk(version) is risk


@aimss_dask.speculative
def _where() -> int:
    """The kernel thread that ran the call's body."""
    return threading.get_native_id()


def test_speculative_calls_in_tasks_reuse_their_threads():
    """Each call of a speculative function in a task runs its body beside the task: on a reused thread."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        tag = unique_name("t")
        ids = [client.submit(_where, key=f"{tag}-{i}").result() for i in range(8)]
        assert len(set(ids)) == 1, f"a new thread per call: {ids}"


@pytest.mark.parametrize("profile", [True, False])
def test_the_scheduler_warns_of_the_deadlock_where_the_interpreter_has_it(monkeypatch, caplog, profile):
    import dask

    monkeypatch.setattr(threads, "frames_deadlock_risk", lambda version=None: True)
    with dask.config.set({"distributed.worker.profile.enabled": profile}), caplog.at_level(
        logging.WARNING, logger="aimss_dask"
    ), LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
    said = [r.getMessage() for r in caplog.records if "gh-106883" in r.getMessage()]
    if profile:
        assert len(said) == 1 and "distributed.worker.profile.enabled: false" in said[0], said
    else:
        assert not said, "no warning once the profiler is off"
