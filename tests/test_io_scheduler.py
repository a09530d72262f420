"""Coordinated I/O: the scheduler's rules (pure) and the gate on a real cluster."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time

import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import make_cluster, wait_until
from distributed import Client
from hypothesis import given, settings
from hypothesis import strategies as st

import aimss_dask
from aimss_dask.coordinator.io import IOHandlers, IOScheduler
from aimss_dask.core.config import AIMSSConfig
from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.node.iogate import IOGate


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# -- the rules ------------------------------------------------------------------------------


def test_at_most_limit_writers_hold_a_resource_and_a_release_lets_the_next_in():
    s = IOScheduler(limit=2, turn=1.0, clock=Clock())
    a = s.request("h|fs", "A", 0, "w1")
    b = s.request("h|fs", "B", 0, "w2")
    c = s.request("h|fs", "C", 0, "w3")
    assert (a[1], b[1], c[1]) == (True, True, False)
    assert s.snapshot()["h|fs"]["waiting"] == {"C": 1}
    assert s.release(a[0]) == [c[0]]
    assert s.holds(c[0]) and not s.holds(a[0])
    # Another resource (another file system, or host) has slots of its own.
    assert s.request("h|other", "D", 0, "w1")[1]


def test_higher_priority_goes_first_whatever_waited_longer():
    clock = Clock()
    s = IOScheduler(limit=1, turn=1.0, clock=clock)
    held, _ = s.request("r", "A", 0, "w1")
    clock.t = 0.1
    low, _ = s.request("r", "B", 0, "w2")
    clock.t = 0.2
    high, _ = s.request("r", "C", 5, "w3")
    assert s.release(held) == [high]
    assert s.release(high) == [low]


def test_bursts_are_served_one_after_the_other_each_for_its_turn():
    clock = Clock()
    s = IOScheduler(limit=1, turn=1.0, clock=clock)
    a1, _ = s.request("r", "A", 0, "w1")
    clock.t = 0.1
    b1, _ = s.request("r", "B", 0, "w2")  # B waits ...
    a2, _ = s.request("r", "A", 0, "w1")
    clock.t = 0.5
    # ... while A's turn lasts, A's next write goes before B's older one:
    # its burst is not interleaved with B's.
    assert s.release(a1) == [a2]
    a3, _ = s.request("r", "A", 0, "w1")
    clock.t = 1.2
    # A has had its turn and B waits: B's turn now, though A asks too.
    assert s.release(a2) == [b1]
    assert s.snapshot()["r"]["turn"] == "B"
    b2, _ = s.request("r", "B", 0, "w2")
    clock.t = 1.3
    assert s.release(b1) == [b2]  # B's turn lasts, A waits
    clock.t = 2.3
    assert s.release(b2) == [a3]
    assert s.snapshot()["r"]["served"] == {"A": 3, "B": 2}


def test_a_slot_the_turns_application_leaves_free_goes_to_another_without_the_turn():
    clock = Clock()
    s = IOScheduler(limit=2, turn=1.0, clock=clock)
    a1, _ = s.request("r", "A", 0, "w1")
    b1, now = s.request("r", "B", 0, "w2")
    assert now  # work-conserving
    assert s.snapshot()["r"]["turn"] == "A"
    # The turn passes once its application is done here.
    b2, _ = s.request("r", "B", 0, "w2")
    a2, _ = s.request("r", "A", 0, "w1")
    assert s.release(a1) == [a2]  # A's turn: A first
    s.release(a2)
    assert s.holds(b2) and s.snapshot()["r"]["turn"] == "B"
    assert s.snapshot()["r"]["peak"] == 2


def test_an_application_holding_its_share_goes_after_the_others_but_never_leaves_a_slot_idle():
    clock = Clock()
    s = IOScheduler(limit=2, turn=10.0, clock=clock, share=0.5)
    a1, _ = s.request("r", "A", 0, "w1")
    a2, now = s.request("r", "A", 0, "w2")
    assert now  # nobody else waits: a free slot is A's all the same
    a3, _ = s.request("r", "A", 0, "w1")
    b1, _ = s.request("r", "B", 0, "w3")
    # A holds 2 (over its share of 1) and it is A's turn, yet B goes first.
    assert s.release(a1) == [b1]
    assert s.release(a2) == [a3]
    # Without a share, the turn's application would have gone first.
    t = IOScheduler(limit=2, turn=10.0, clock=clock)
    x1, _ = t.request("r", "A", 0, "w1")
    t.request("r", "A", 0, "w2")
    x3, _ = t.request("r", "A", 0, "w1")
    t.request("r", "B", 0, "w3")
    assert t.release(x1) == [x3]
    with pytest.raises(ValueError, match="share=0"):
        IOScheduler(limit=2, turn=1.0, share=0)


def test_the_count_of_grants_per_application_stays_bounded():
    from aimss_dask.coordinator import io

    s = IOScheduler(limit=1, turn=1.0, clock=Clock())
    for i in range(io.SERVED_KEPT + 10):
        ticket, _ = s.request("r", f"app{i}", 0, "w1")
        s.release(ticket)
    assert len(s.snapshot()["r"]["served"]) == io.SERVED_KEPT
    assert f"app{io.SERVED_KEPT + 9}" in s.snapshot()["r"]["served"]  # the newest is kept


def test_a_worker_that_leaves_gives_back_what_it_held_and_waited_for():
    s = IOScheduler(limit=1, turn=1.0, clock=Clock())
    a, _ = s.request("r", "A", 0, "w1")
    a2, _ = s.request("r", "A", 0, "w1")
    b, _ = s.request("r", "B", 0, "w2")
    dropped, granted = s.forget_worker("w1")
    assert sorted(dropped) == sorted([a, a2]) and granted == [b]
    assert s.release(12345) == []  # unknown: nothing happens


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 3),
    share=st.sampled_from([1.0, 0.5, 0.34]),
    ops=st.lists(
        st.tuples(st.sampled_from(["ask", "release", "tick", "leave"]), st.integers(0, 3), st.integers(0, 2)),
        max_size=60,
    ),
)
def test_slots_are_never_overbooked_nor_left_idle_and_everyone_is_served_in_the_end(limit, share, ops):
    clock = Clock()
    s = IOScheduler(limit=limit, turn=0.5, clock=clock, share=share)
    tickets: list[int] = []
    for op, who, prio in ops:
        if op == "ask":
            tickets.append(s.request("r", f"app{who}", prio, f"w{who}")[0])
        elif op == "release" and tickets:
            s.release(tickets.pop(who % len(tickets)))
        elif op == "tick":
            clock.t += 0.3
        elif op == "leave":
            gone = set(s.forget_worker(f"w{who}")[0])
            tickets = [t for t in tickets if t not in gone]
        for res in s.snapshot().values():
            writing = sum(res["writing"].values())
            assert writing <= limit
            assert not res["waiting"] or writing == limit  # no slot idle while someone waits
    # Whoever waits gets in once the holders are done: no one starves.
    while tickets:
        held = [t for t in tickets if s.holds(t)]
        assert held
        for t in held:
            s.release(t)
            tickets.remove(t)
        clock.t += 0.3


def test_handlers_wait_for_a_grant_and_a_disabled_scheduler_waits_for_nothing():
    async def main() -> None:
        h = IOHandlers(1, 1.0, 0.25, True, lambda run: (run.split("-")[0], 0))
        first = await h._h_io_acquire("w1", "r", "A-1")
        second = asyncio.ensure_future(h._h_io_acquire("w2", "r", "B-1"))
        await asyncio.sleep(0.05)
        assert not second.done()
        await h._h_io_release(first["ticket"])
        got = await asyncio.wait_for(second, 1)
        assert got["ticket"] != first["ticket"] and got["lease"] == 0.25
        assert (h.grants, h.waited) == (2, 1)
        # A worker that leaves while waiting: its call ends, its place goes.
        third = asyncio.ensure_future(h._h_io_acquire("w3", "r", "C-1"))
        await asyncio.sleep(0.01)
        h.forget_worker("w3")
        with pytest.raises(asyncio.CancelledError):
            await third
        off = IOHandlers(1, 1.0, 0.25, False, lambda run: (run, 0))
        assert await off._h_io_acquire("w1", "r", "x") == {"ticket": 0, "lease": 1.0}
        assert off.status()["grants"] == 0

    asyncio.run(main())


class _Worker:
    """What the gate uses of a Dask worker: a loop in a thread, and the scheduler's two ops."""

    def __init__(self, handlers: IOHandlers) -> None:
        from tornado.ioloop import IOLoop

        ready = threading.Event()
        box: dict[str, IOLoop] = {}

        def run() -> None:
            asyncio.set_event_loop(asyncio.new_event_loop())
            box["loop"] = IOLoop.current()
            ready.set()
            box["loop"].start()

        threading.Thread(target=run, daemon=True).start()
        ready.wait()
        self.loop = box["loop"]
        self.address = "tcp://127.0.0.1:1"
        self.asks = 0
        outer = self

        class Scheduler:
            async def aimss_io_acquire(self, **kw):
                outer.asks += 1
                return await handlers._h_io_acquire(**kw)

            async def aimss_io_release(self, ticket):
                await handlers._h_io_release(ticket)

        self.scheduler = Scheduler()

    def stop(self) -> None:
        self.loop.add_callback(self.loop.stop)


def test_the_gate_holds_a_grant_across_back_to_back_writes_and_gives_it_back_when_they_pause():
    handlers = IOHandlers(1, 1.0, 5.0, True, lambda run: (run, 0))
    worker = _Worker(handlers)
    try:
        gate = IOGate(worker, linger=0.05)
        for _ in range(10):
            with gate.writing("A", "r"):
                pass
        assert worker.asks == 1
        # Another run here: the idle grant of A goes back first, or this
        # writer would wait behind itself (the node has one slot).
        with gate.writing("B", "r"):
            pass
        assert worker.asks == 2
        wait_until(lambda: handlers.sched.snapshot()["r"]["writing"] == {}, what="the grant back after the pause")
        assert handlers.sched.snapshot()["r"]["served"] == {"A": 1, "B": 1}
        with gate.writing("C", None):  # not a file system: nothing asked
            pass
        assert worker.asks == 2 and gate.statistics()["io_writes"] == 11
    finally:
        worker.stop()


def test_the_gate_writes_ungated_when_the_coordinator_cannot_be_asked_and_does_not_ask_every_time():
    handlers = IOHandlers(1, 1.0, 5.0, True, lambda run: (run, 0))
    worker = _Worker(handlers)

    async def broken(**kw):
        worker.asks += 1
        raise OSError("no such handler")

    worker.scheduler.aimss_io_acquire = broken
    try:
        gate = IOGate(worker)
        for run in ("A", "B", "A"):
            with gate.writing(run, "r"):
                pass  # the writes go ahead
        assert worker.asks == 1
    finally:
        worker.stop()


def test_the_gate_stops_asking_a_coordinator_that_does_not_schedule():
    handlers = IOHandlers(1, 1.0, 5.0, False, lambda run: (run, 0))
    worker = _Worker(handlers)
    try:
        gate = IOGate(worker)
        for run in ("A", "B", "A", "B"):
            with gate.writing(run, "r"):
                pass
        assert worker.asks == 1
    finally:
        worker.stop()


def test_config_refuses_a_bad_limit_by_name():
    with pytest.raises(InvalidArgumentError, match="max-concurrent-writes-per-node=0"):
        AIMSSConfig.load(io={"max-concurrent-writes-per-node": 0})
    with pytest.raises(InvalidArgumentError, match="io.enabled='yes'"):
        AIMSSConfig.load(io={"enabled": "yes"})
    assert AIMSSConfig.load(io={"turn": "2s"}).io.turn == 2.0
    with pytest.raises(InvalidArgumentError, match="io.share"):
        AIMSSConfig.load(io={"share": 0})


# -- on a real cluster ----------------------------------------------------------------------


def _resource(path: str) -> str:
    return f"127.0.0.1|dev:{os.stat(path).st_dev}"


def _expected(rows: int, cols: int) -> np.ndarray:
    return np.arange(rows * cols, dtype="f8").reshape(rows, cols)


def _source(rows: int, cols: int) -> da.Array:
    return da.arange(rows * cols, dtype="f8", chunks=64 * cols).reshape(rows, cols)


def test_writers_wait_while_another_application_holds_the_node_and_write_everything_after(tmp_path):
    rows, cols = 4096, 256
    with make_cluster(2) as cl, Client(cl) as client:
        client.register_plugin(aimss_dask.AIMSS(io={"max-concurrent-writes-per-node": 1}))
        # Another application's burst holds the node's one slot (asked the way workers ask).
        holder = client.sync(
            client.scheduler.aimss_io_acquire, worker="someone", resource=_resource(str(tmp_path)), run="other-app"
        )
        done = threading.Event()
        errors: list[BaseException] = []

        def write() -> None:
            try:
                aimss_dask.to_zarr(_source(rows, cols), str(tmp_path / "a.zarr"), chunks=(64, cols), io_priority=2)
            except BaseException as e:  # noqa: BLE001 -- asserted below
                errors.append(e)
            finally:
                done.set()

        threading.Thread(target=write, daemon=True).start()
        waiting = wait_until(
            lambda: sum(r["waiting"].get(client.id, 0) for r in aimss_dask.status().io["resources"].values()),
            timeout=60, what="a writer waiting for the node",
        )
        assert waiting >= 1
        time.sleep(0.5)
        assert not done.is_set()  # nothing written while the node is held
        client.sync(client.scheduler.aimss_io_release, ticket=holder["ticket"])
        assert done.wait(120) and not errors, errors
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"))[:], _expected(rows, cols))
        st = aimss_dask.status()
        res = st.io["resources"][_resource(str(tmp_path))]
        assert res["peak"] == 1 and res["served"][client.id] >= 1
        assert st.io["waited"] >= 1
        assert [r["io_priority"] for r in st.run("to_zarr")] == [2]
        # Leases: the workers wrote 64 chunks on far fewer grants.
        writes = sum(w.get("io_writes", 0) for w in st.values())
        assert writes == rows // 64 and res["granted"] <= writes // 4


def _app_write(address: str, path: str, rows: int, cols: int) -> None:
    with Client(address):  # the current client of to_zarr
        aimss_dask.to_zarr(_source(rows, cols), path, chunks=(64, cols))


def test_two_applications_writing_at_once_share_the_node_one_writer_at_a_time(tmp_path):
    rows, cols = 8192, 512
    with make_cluster(2) as cl, Client(cl) as client:
        client.register_plugin(aimss_dask.AIMSS(io={"max-concurrent-writes-per-node": 1}))
        ctx = multiprocessing.get_context("spawn")
        other = ctx.Process(target=_app_write, args=(cl.scheduler_address, str(tmp_path / "b.zarr"), rows, cols))
        other.start()
        aimss_dask.to_zarr(_source(rows, cols), str(tmp_path / "a.zarr"), chunks=(64, cols))
        other.join(180)
        assert other.exitcode == 0
        for name in ("a.zarr", "b.zarr"):
            np.testing.assert_array_equal(zarr.open_array(str(tmp_path / name))[:], _expected(rows, cols))
        res = aimss_dask.status().io["resources"][_resource(str(tmp_path))]
        assert res["peak"] == 1
        assert len(res["served"]) == 2  # both applications, each its own


def test_with_the_scheduler_off_nobody_asks(tmp_path):
    with make_cluster(2) as cl, Client(cl) as client:
        client.register_plugin(aimss_dask.AIMSS(io={"enabled": False}))
        aimss_dask.to_zarr(_source(1024, 64), str(tmp_path / "a.zarr"), chunks=(64, 64))
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"))[:], _expected(1024, 64))
        st = aimss_dask.status()
        assert st.io["enabled"] is False and st.io["grants"] == 0 and st.io["resources"] == {}


def test_a_bad_io_priority_is_refused_before_anything_is_written(tmp_path):
    with make_cluster(1) as cl, Client(cl) as client:
        client.register_plugin(aimss_dask.AIMSS())
        with pytest.raises(InvalidArgumentError, match="io_priority='high'"):
            aimss_dask.to_zarr(_source(128, 8), str(tmp_path / "a.zarr"), io_priority="high")
        assert not (tmp_path / "a.zarr").exists()


def test_a_streams_sink_writes_through_the_scheduler_at_the_streams_priority(tmp_path):
    with make_cluster(2) as cl, Client(cl) as client:
        client.register_plugin(aimss_dask.AIMSS(io={"max-concurrent-writes-per-node": 1}))
        with pytest.raises(InvalidArgumentError, match="io_priority=1.5"):
            aimss_dask.create_stream("io-bad", partitions=1, io_priority=1.5)
        s = aimss_dask.create_stream("io-frames", partitions=2, io_priority=4)
        assert s.info()["io_priority"] == 4
        for i in range(64):
            s.write(np.full((16, 8), i, dtype="f8"), partition=i % 2)
        sink = s.to_zarr(str(tmp_path / "f.zarr"), chunks=64)
        s.seal()
        sink.wait(timeout=60)
        got = zarr.open_array(str(tmp_path / "f.zarr"))[:]
        assert got.shape == (64 * 16, 8)
        assert sorted(got[::16, 0].tolist()) == list(range(64))  # every record once
        st = aimss_dask.status()
        assert [r["io_priority"] for r in st.run("zarr-sink")] == [4]
        res = st.io["resources"][_resource(str(tmp_path))]
        assert res["served"][client.id] >= 1 and res["peak"] == 1
        # An explicit priority wins over the stream's.
        s2 = aimss_dask.create_stream("io-frames-2", partitions=1, io_priority=4)
        s2.write(np.zeros((16, 8)), partition=0)
        s2.seal()
        s2.to_zarr(str(tmp_path / "g.zarr"), io_priority=-1).wait(timeout=60)
        assert [r["io_priority"] for r in aimss_dask.status().run("zarr-sink")][-1] == -1
