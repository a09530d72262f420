"""When a worker gives its idle buffers back (node/idle.py): the pure rule and the watch, on a real event loop.

The integration tests, with real workers and Dask's memory manager, are in
test_transport.py.
"""

from __future__ import annotations

import asyncio
import time

from aimss_dask.node.idle import IdleRelease, Memory, wanted

GiB = 2**30
CALM = Memory(process=GiB, target=4 * GiB, available=16 * GiB, total=32 * GiB)


def test_memory_is_wanted_past_dasks_target_or_with_the_node_nearly_full():
    assert not wanted(CALM)
    assert wanted(CALM._replace(process=5 * GiB))
    assert not wanted(CALM._replace(process=5 * GiB, target=None))  # no limit: the node decides
    assert wanted(CALM._replace(available=3 * GiB))  # under a tenth of 32 GiB left
    assert not wanted(CALM._replace(available=4 * GiB))


class Pools:
    """Stand-in pools: ``held`` bytes of buffers, ``free`` of them idle; a log that is ``empty`` or not."""

    def __init__(self) -> None:
        self.held = 100
        self.free = 100
        self.empty = True
        self.memory = CALM
        self.released: list[float] = []

    def release(self) -> None:
        self.released.append(time.monotonic())
        self.held -= self.free
        self.free = 0

    def watch(self, keep: float) -> IdleRelease:
        return IdleRelease(
            keep, lambda: self.empty, lambda: (self.held, self.free), self.release,
            lambda: self.memory, check=0.02,
        )


def run(coro):
    return asyncio.run(coro)


def test_buffers_are_kept_for_keep_seconds_then_given_back():
    async def main():
        pools = Pools()
        watch = pools.watch(0.3)
        t0 = time.monotonic()
        watch.emptied()
        await asyncio.sleep(0.2)
        assert pools.released == []  # still kept for the next run
        await asyncio.sleep(0.3)
        assert len(pools.released) == 1 and pools.released[0] - t0 >= 0.3
        assert watch.last_reason == "kept" and pools.held == 0
        watch.close()

    run(main())


def test_a_log_that_empties_again_starts_the_keep_again():
    async def main():
        pools = Pools()
        watch = pools.watch(0.3)
        watch.emptied()
        await asyncio.sleep(0.2)
        t1 = time.monotonic()
        watch.emptied()  # another run came and went
        await asyncio.sleep(0.5)
        assert len(pools.released) == 1 and pools.released[0] - t1 >= 0.3
        watch.close()

    run(main())


def test_a_new_run_keeps_its_buffers():
    async def main():
        pools = Pools()
        watch = pools.watch(0.1)
        watch.emptied()
        pools.empty = False  # a run started: it reuses them
        await asyncio.sleep(0.3)
        assert pools.released == [] and pools.held == 100
        watch.close()

    run(main())


def test_memory_wanted_gives_them_back_before_the_keep_is_over():
    async def main():
        pools = Pools()
        watch = pools.watch(60.0)
        watch.emptied()
        await asyncio.sleep(0.1)
        assert pools.released == []
        pools.memory = CALM._replace(process=5 * GiB)  # past Dask's target
        await asyncio.sleep(0.1)
        assert len(pools.released) == 1 and watch.last_reason == "memory"
        watch.close()

    run(main())


def test_buffers_still_in_use_go_back_once_they_are_free():
    async def main():
        pools = Pools()
        pools.free = 0  # a task result still refers to them
        watch = pools.watch(0.05)
        watch.emptied()
        await asyncio.sleep(0.2)
        assert pools.released == []
        pools.free = 100  # the result was released
        await asyncio.sleep(0.1)
        assert len(pools.released) == 1 and pools.held == 0
        await asyncio.sleep(0.1)
        assert watch._timer is None  # nothing held: the watch ended
        watch.close()

    run(main())


def test_a_failing_memory_reading_never_raises_into_the_loop():
    async def main():
        pools = Pools()
        errors: list[BaseException] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
        watch = IdleRelease(0.2, lambda: True, lambda: (pools.held, pools.free), pools.release,
                            lambda: (_ for _ in ()).throw(OSError("no /proc")), check=0.02)
        watch.emptied()
        await asyncio.sleep(0.1)
        assert errors == [] and pools.released == []
        await asyncio.sleep(0.2)
        assert errors == [] and len(pools.released) == 1  # the keep still ends
        watch.close()

    run(main())
