"""The write-behind writer's bookkeeping: queued and immediate writes, flush, abort."""

from __future__ import annotations

import threading

import pytest
import zarr

from aimss_dask.sink.writer import WriteBehind, ZarrTarget


@pytest.fixture
def target(tmp_path):
    path = str(tmp_path / "a.zarr")
    zarr.create_array(path, shape=(8,), chunks=(4,), dtype="f8")
    return ZarrTarget(path, "", 3, "aimss-sink-test")


def test_queued_and_immediate_writes_are_reported_by_flush(target):
    wb = WriteBehind(max_bytes=2**20)
    try:
        wb.submit_job(target, 0, 10, lambda put: 10)
        assert wb.write_now(target, 1, lambda put: 5) == 5
        wb.submit_job(target, 2, 0, lambda put: (_ for _ in ()).throw(OSError("disk full")))
        report = wb.flush(target.run)
        assert sorted(report["written"]) == [0, 1]
        assert report["bytes"] == 15
        assert report["errors"] == ["OSError: disk full"]
        assert wb.statistics()["queued_bytes"] == 0
        with pytest.raises(OSError, match="read-only"):  # an immediate write raises in the caller
            wb.write_now(target, 3, lambda put: (_ for _ in ()).throw(OSError("read-only")))
    finally:
        wb.close()


def test_abort_drops_queued_writes_and_refuses_later_ones(target):
    wb = WriteBehind(max_bytes=2**20)
    started, release = threading.Event(), threading.Event()
    ran = []

    def blocking(put):
        started.set()
        release.wait(10)
        ran.append("first")
        return 1

    try:
        wb.submit_job(target, 0, 100, blocking)
        started.wait(10)
        wb.submit_job(target, 1, 100, lambda put: ran.append("queued") or 1)
        threading.Timer(0.2, release.set).start()
        assert wb.abort(target.run, timeout=10) == 1  # the queued one; the running one finished
        assert ran == ["first"]
        wb.submit_job(target, 2, 100, lambda put: ran.append("late") or 1)
        assert wb.write_now(target, 3, lambda put: ran.append("now") or 1) == 0
        assert wb.flush(target.run)["written"] == []
        assert ran == ["first"]
        assert wb.statistics()["queued_bytes"] == 0
        # Another run is not affected.
        other = ZarrTarget(target.store, "", 3, "aimss-sink-other")
        wb.submit_job(other, 0, 1, lambda put: 1)
        assert wb.flush(other.run)["written"] == [0]
    finally:
        wb.close()


def test_abort_waits_for_a_write_under_way_on_a_task_thread(target):
    """A task writing now when the run is aborted finishes first: nothing of
    the run is written after abort() returns."""
    wb = WriteBehind(max_bytes=2**20)
    started = threading.Event()
    log = []

    def slow(put):
        started.set()
        import time

        time.sleep(0.3)
        log.append("written")
        return 1

    try:
        t = threading.Thread(target=wb.write_now, args=(target, 0, slow))
        t.start()
        started.wait(10)
        wb.abort(target.run, timeout=10)
        log.append("aborted")
        t.join(10)
        assert log == ["written", "aborted"]
    finally:
        wb.close()


def _busy(wb: WriteBehind, target: ZarrTarget) -> threading.Event:
    """Keep ``wb``'s writer busy (as region 99 of ``target``) until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def blocking(put):
        started.set()
        release.wait(10)
        return 1

    wb.submit_job(target, 99, 1, blocking)
    started.wait(10)
    return release


def test_two_runs_queued_at_once_are_written_in_bursts_each_in_its_own_order(target):
    wb = WriteBehind(max_bytes=2**20, burst=60.0)
    order: list[tuple[str, int]] = []
    other = ZarrTarget(target.store, "", 3, "aimss-sink-other")
    try:
        release = _busy(wb, target)  # the rest queue up meanwhile
        for i in range(4):  # interleaved, as two applications' tasks hand them in
            for t in (target, other):
                wb.submit_job(t, i, 1, lambda put, t=t, i=i: order.append((t.run, i)) or 1)
        release.set()
        assert sorted(wb.flush(target.run)["written"]) == [0, 1, 2, 3, 99]
        assert sorted(wb.flush(other.run)["written"]) == [0, 1, 2, 3]
        # One run's burst, then the other's (not region by region), each in order.
        assert order == [(target.run, i) for i in range(4)] + [(other.run, i) for i in range(4)]
    finally:
        wb.close()


def test_a_burst_ends_after_its_time_when_another_run_waits(target):
    wb = WriteBehind(max_bytes=2**20, burst=0.0)
    order: list[str] = []
    other = ZarrTarget(target.store, "", 3, "aimss-sink-other")
    try:
        release = _busy(wb, target)
        for i in range(3):
            for t in (target, other):
                wb.submit_job(t, i, 1, lambda put, t=t: order.append(t.run) or 1)
        release.set()
        wb.flush(target.run), wb.flush(other.run)
        assert order == [target.run, other.run] * 3  # no burst: oldest first
    finally:
        wb.close()


def test_a_hand_over_takes_the_last_queued_regions_and_each_is_written_once(target):
    wb = WriteBehind(max_bytes=2**20, burst=60.0)
    here: list[int] = []
    shipped: list[tuple[slice, ...]] = []
    freed: list[int] = []
    try:
        release = _busy(wb, target)  # the rest queue up meanwhile
        for i in range(6):
            region = (slice(i, i + 1),)
            wb.submit_job(
                target, i, 0, lambda put, i=i: here.append(i) or 8, size=8,
                portable=lambda i=i, region=region: (region, i, lambda: freed.append(i)),
            )
        wb.submit_job(target, 6, 0, lambda put: here.append(6) or 8, size=8)  # only this writer can write it
        assert wb.run_progress(target.run)["left"] == 7 * 8
        # 20 bytes: the last portable regions (5, 4, 3), not region 6.
        assert wb.hand_over(target.run, 20, lambda t, region, data: shipped.append(region) or 8) == 3
        assert wb.run_progress(target.run)["left"] == 4 * 8
        release.set()
        report = wb.flush(target.run)
        assert sorted(report["written"]) == [0, 1, 2, 3, 4, 5, 6, 99]
        assert report["bytes"] == 8 * 7 + 1 and report["errors"] == []
        assert sorted(here) == [0, 1, 2, 6]  # never the regions handed over
        assert sorted(r[0].start for r in shipped) == [3, 4, 5]
        assert sorted(freed) == [3, 4, 5]  # each freed once stored elsewhere
    finally:
        wb.close()


def test_regions_a_helper_fails_to_store_are_written_here(target):
    wb = WriteBehind(max_bytes=2**20, burst=60.0)
    here: list[int] = []
    calls: list[int] = []

    def broken(t, region, data):
        calls.append(data)
        raise ConnectionError("helper gone")

    try:
        release = _busy(wb, target)
        for i in range(4):
            wb.submit_job(target, i, 0, lambda put, i=i: here.append(i) or 8, size=8,
                          portable=lambda i=i: ((slice(i, i + 1),), i, None))
        assert wb.hand_over(target.run, 100, broken) == 4
        release.set()
        report = wb.flush(target.run)
        assert sorted(report["written"]) == [0, 1, 2, 3, 99] and report["errors"] == []
        assert sorted(here) == [0, 1, 2, 3]
        assert len(calls) == 1  # the helper is not asked again after it failed
        # Flushed, its last progress stays until the run stops here (abort).
        progress = wb.run_progress(target.run)
        assert (progress["written"], progress["taken_back"], progress["handed"], progress["left"]) == (5, 4, 0, 0)
        wb.abort(target.run)
        assert wb.run_progress(target.run) == {"queued": 0, "written": 0, "bytes": 0}
    finally:
        wb.close()


def test_progress_counts_hand_overs_and_a_run_with_nothing_portable_hands_nothing(target):
    wb = WriteBehind(max_bytes=2**20, burst=60.0)
    try:
        release = _busy(wb, target)
        wb.submit_job(target, 0, 0, lambda put: 8, size=8)
        assert wb.hand_over(target.run, 100, lambda *a: 8) == 0
        assert wb.hand_over("no-such-run", 100, lambda *a: 8) == 0
        assert wb.hand_over_to(target.run, "tcp://x:1", 100) == 0  # no shipper: nothing leaves
        wb.submit_job(target, 1, 0, lambda put: 8, size=8, portable=lambda: ((slice(0, 1),), 0, None))
        gate = threading.Event()
        assert wb.hand_over(target.run, 100, lambda *a: gate.wait(10) and 8) == 1
        progress = wb.run_progress(target.run)
        assert progress["handing"] == 1 and progress["left"] == 8
        gate.set()
        release.set()
        assert sorted(wb.flush(target.run)["written"]) == [0, 1, 99]
    finally:
        wb.close()


def test_a_hand_over_stopped_while_its_write_waits_for_its_turn_writes_nothing(target):
    """The writer gave up on the helper (it waited too long) and writes the region itself: the helper's
    write, still waiting for its I/O turn, must not land later (perhaps over a newer run's data)."""
    import contextlib
    from types import SimpleNamespace

    import numpy as np

    from aimss_dask.core.errors import SinkError
    from aimss_dask.sink.handover import HandoverRun

    turn = threading.Event()

    class Gate:
        @contextlib.contextmanager
        def writing(self, run, resource):
            assert turn.wait(10)
            yield

    run = HandoverRun(target, "tcp://writer:1", SimpleNamespace(worker=None, io_gate=Gate()))
    region = (slice(0, 8),)
    out: list = []

    def write() -> None:
        try:
            out.append(run._write(region, np.full(8, 7.0)))
        except Exception as e:
            out.append(e)

    t = threading.Thread(target=write)
    t.start()
    run.close()  # what run_stop does on the helper
    turn.set()
    t.join(10)
    assert len(out) == 1 and isinstance(out[0], SinkError) and "writes the region itself" in str(out[0])
    assert not zarr.open_array(target.store, mode="r")[:].any()  # nothing landed
    # A hand-over that goes on writes as before.
    live = HandoverRun(target, "tcp://writer:2", SimpleNamespace(worker=None, io_gate=Gate()))
    assert live._write(region, np.full(8, 7.0)) > 0
    assert (zarr.open_array(target.store, mode="r")[:] == 7.0).all()


def test_a_flush_waiting_for_its_queue_leaves_dasks_offload_thread_free(target):
    """Dask (de)serialises large messages on its one offload thread: a run's flush, which waits for the
    whole write-behind queue and its fsyncs, must not hold that thread meanwhile."""
    import asyncio
    import time

    from distributed.utils import offload

    from aimss_dask.sink.writer import WriteRun

    wb = WriteBehind(max_bytes=2**20)
    started, release = threading.Event(), threading.Event()

    def slow(put):
        started.set()
        release.wait(10)
        return 1

    async def main() -> tuple[float, dict]:
        wb.submit_job(target, 0, 100, slow)
        assert started.wait(10)
        flushing = asyncio.ensure_future(WriteRun(target.run, wb).call("flush"))
        await asyncio.sleep(0.1)  # the flush waits now
        t0 = time.monotonic()
        assert await asyncio.wait_for(offload(lambda: 42), 5) == 42
        took = time.monotonic() - t0
        release.set()
        return took, await flushing

    try:
        took, report = asyncio.run(main())
        assert took < 1, f"offload() waited {took:.1f} s behind a flush"
        assert report["written"] == [0]
    finally:
        release.set()
        wb.close()
