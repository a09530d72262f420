"""The worker side of runs: the manager, and runs started over the wire."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.protocol.pickle import dumps

import aimss_dask
from aimss_dask.core.errors import (
    InvalidArgumentError,
    StreamNotFoundError,
    raise_from_wire,
)
from aimss_dask.node.runs import Run, RunManager


class Counting(Run):
    """A toy run: counts the records appended to its stream, per partition."""

    def __init__(self, name: str, epoch: int) -> None:
        super().__init__(name, epoch)
        self.counts: dict[int, int] = {}
        self.closed = 0
        self.lock = threading.Lock()

    def on_append(self, partition: int, records: list[Any]) -> None:
        with self.lock:
            self.counts[partition] = self.counts.get(partition, 0) + len(records)

    async def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        if op == "counts":
            return {"counts": sorted(self.counts.items())}
        return await super().call(op, **kwargs)

    def progress(self) -> dict[str, Any]:
        return {"records": sum(self.counts.values())}

    def close(self) -> None:
        self.closed += 1


@dataclass(frozen=True)
class CountingFactory:
    name: str
    epoch: int

    def make_run(self, host: Any) -> Run:
        assert host.store is not None  # the worker plugin is the host
        return Counting(self.name, self.epoch)


# -- the manager, in process ---------------------------------------------------------


def test_a_newer_epoch_replaces_and_an_older_one_is_refused():
    m = RunManager()
    first = m.start(Counting("s", 1))
    second = m.start(Counting("s", 2))
    assert first.closed == 1 and m.get("s") is second
    with pytest.raises(StreamNotFoundError, match="epoch 1 arrived after epoch 2"):
        m.start(Counting("s", 1))
    assert m.get("s") is second and second.closed == 0
    assert m.get("s", epoch=1) is None
    assert not m.stop("s", epoch=1) and m.stop("s", epoch=2) and second.closed == 1
    assert m.names() == []


def test_a_run_replaced_on_the_event_loop_closes_off_it_when_its_close_blocks():
    """A start on the loop that replaces a run waiting for its writers must not hold the loop for that wait."""
    import asyncio
    import threading

    closed_on: dict[str, str] = {}

    class Blocking(Run):
        blocking_close = True

        def close(self):
            closed_on[f"{self.name}-{self.epoch}"] = threading.current_thread().name

    class Tasks(Run):  # cancels asyncio tasks: closes on the loop
        def close(self):
            asyncio.get_running_loop()  # raises off the loop
            closed_on[f"{self.name}-{self.epoch}"] = threading.current_thread().name

    async def main():
        m = RunManager()
        await m.start_async(Blocking("w", 1))
        held = await m.start_async(Blocking("w", 2))
        assert m.get("w") is held and held.epoch == 2
        await m.start_async(Tasks("t", 1))
        await m.start_async(Tasks("t", 2))
        return threading.current_thread().name

    loop_thread = asyncio.run(main())
    assert closed_on["w-1"] != loop_thread, closed_on
    assert closed_on["t-1"] == loop_thread, closed_on
    assert "w-2" not in closed_on and "t-2" not in closed_on


def test_a_repeated_start_keeps_the_run_there_and_a_drop_ends_older_epochs():
    m = RunManager()
    first = m.start(Counting("s", 3))
    assert m.start(Counting("s", 3)) is first and first.closed == 0
    assert not m.stop("s", epoch=2)  # dropping an older epoch leaves the newer run
    assert m.stop("s", epoch=4) and first.closed == 1  # a newer drop ends it


def test_appends_reach_only_the_run_of_their_stream_and_failures_stay_there(caplog):
    m = RunManager()
    a = m.start(Counting("a", 1))

    class Broken(Run):
        def on_append(self, partition, records):
            raise RuntimeError("boom")

        def progress(self):
            raise RuntimeError("no view")

    m.start(Broken("b", 1))
    m.on_append("a", 0, [1, 2])
    m.on_append("b", 0, [1])  # logged, not raised: the records are stored anyway
    m.on_append("c", 0, [1])  # no run: nothing
    assert a.counts == {0: 2}
    assert "failed on append" in caplog.text
    prog = m.progress()
    assert prog["a"] == {"kind": "Counting", "epoch": 1, "run_id": None, "records": 2}
    assert prog["b"]["error"] == "RuntimeError: no view"


def test_shared_resources_are_made_once_and_closed_with_the_runs():
    m = RunManager()
    made = []

    class Res:
        closed = False

        def close(self):
            self.closed = True

    def make():
        made.append(Res())
        return made[-1]

    assert m.peek_shared("w") is None
    r = m.shared("w", make)
    assert m.shared("w", make) is r and len(made) == 1
    run = m.start(Counting("s", 1))
    m.close_all()
    assert r.closed and run.closed == 1 and m.names() == [] and m.peek_shared("w") is None
    m.close_all()  # twice is fine
    assert run.closed == 1


def test_a_close_that_waits_for_the_loop_runs_in_a_thread_and_the_others_on_the_loop():
    """A sink's write under way may wait for the coordinator's answer on the worker's loop (an I/O
    grant): closed on that loop (the worker's teardown), its run waited for ever, and the worker
    stopped answering. A source's brokers are asyncio tasks: their run closes on the loop."""
    import asyncio

    loop: asyncio.AbstractEventLoop | None = None

    def wait_for_the_loop(holder: Any) -> None:
        assert loop is not None
        holder.got = asyncio.run_coroutine_threadsafe(asyncio.sleep(0, "answered"), loop).result(timeout=5)

    class Waits(Run):
        blocking_close = True
        got = None

        def close(self) -> None:
            wait_for_the_loop(self)

    class OnLoop(Run):
        thread = None

        def close(self) -> None:
            self.thread = threading.get_ident()

    class Res:
        got = None

        def close(self) -> None:
            wait_for_the_loop(self)

    async def main() -> tuple[Any, ...]:
        nonlocal loop
        loop = asyncio.get_running_loop()
        m = RunManager()
        stopped, kept, on_loop = m.start(Waits("a", 1)), m.start(Waits("b", 1)), m.start(OnLoop("c", 1))
        res = m.shared("r", Res)
        assert await m.astop("a") and not await m.astop("a")
        await m.aclose_all()
        assert m.names() == []
        return stopped, kept, on_loop, res, threading.get_ident()

    stopped, kept, on_loop, res, loop_thread = asyncio.run(main())
    assert (stopped.got, kept.got, res.got) == ("answered",) * 3
    assert on_loop.thread == loop_thread


def test_unknown_operation_is_a_clear_error():
    import asyncio

    with pytest.raises(InvalidArgumentError, match="run of stream 's' \\(Counting\\) has no operation 'fly'"):
        asyncio.run(Counting("s", 1).call("fly"))


# -- over the wire, on real workers --------------------------------------------------


def _ask(client: Client, addr: str, handler: str, **kwargs: Any) -> dict[str, Any]:
    reply = client.sync(getattr(client.rpc(addr), f"aimss_{handler}"), **kwargs)
    return raise_from_wire(reply, handler)


def test_a_run_started_over_the_wire_sees_its_streams_appends_and_dies_with_it():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit="256MiB"))
        s = aimss_dask.create_stream("counted", partitions=2)
        owners = s.spec.owners
        for addr in set(owners):
            got = _ask(client, addr, "run_start", factory=dumps(CountingFactory("counted", s.spec.epoch)))
            assert got["name"] == "counted" and got["epoch"] == s.spec.epoch
        for i in range(10):
            s.write(np.full(4, i), partition=i % 2)
        s.flush()
        for p, addr in enumerate(owners):
            counts = dict(_ask(client, addr, "run_call", name="counted", operation="counts")["counts"])
            assert counts[p] == 5
        status = aimss_dask.status()
        assert all(status[a]["runs"]["counted"]["records"] >= 5 for a in set(owners))
        # Not a run: a clear error, over the wire too.
        with pytest.raises(StreamNotFoundError, match="no run of stream 'other'"):
            _ask(client, owners[0], "run_call", name="other", operation="counts")
        with pytest.raises(InvalidArgumentError, match="has no make_run"):
            _ask(client, owners[0], "run_start", factory=dumps(42))
        # Destroying the stream stops its runs everywhere.
        aimss_dask.destroy_stream("counted")
        for addr in set(owners):
            assert aimss_dask.status()[addr]["runs"] == {}


def test_to_zarr_runs_leave_no_run_behind(tmp_path):
    """A push run (blocks that straddle chunks) and a direct one: while they
    write, their runs live on the workers; once done, none is left."""
    import dask.array as da
    import zarr

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit="256MiB"))
        x = da.random.default_rng(0).random((4000, 64), chunks=(1000, 64))
        aimss_dask.to_zarr(x, str(tmp_path / "push.zarr"), chunks=(1024, 64))  # misaligned: pushed
        aimss_dask.to_zarr(x, str(tmp_path / "direct.zarr"), chunks=(1000, 64))  # aligned
        for name in ("push.zarr", "direct.zarr"):
            np.testing.assert_array_equal(zarr.open_array(str(tmp_path / name), mode="r")[:], x.compute())
        st = aimss_dask.status()
        assert all(w["runs"] == {} for w in st.values()), {a: w["runs"] for a, w in st.items()}
        # The write-behind queue is the workers' shared resource, shown as sink_*.
        assert any("sink_peak_queued_bytes" in w for w in st.values())
