"""The loader's background work: fetch the next batches, send the position commits.

:class:`Fetcher` is the thread that asks the owners for the rows of the next
batches (several round trips in flight) and assembles them;
:class:`Committer` sends the consumer's position and the slabs it is done
with, in order, off the consumer's thread. See :mod:`aimss_dask.source.loader`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
from distributed.protocol import to_serialize

from aimss_dask.api.context import Endpoint
from aimss_dask.core.errors import AIMSSError, PartitionLostError, StreamNotFoundError
from aimss_dask.source.hedge import Hedger, race
from aimss_dask.source.layout import (
    Take,
    batch_plan,
    epoch_order,
    plan_take,
    position_group,
)
from aimss_dask.source.zarr_source import SourceInfo

logger = logging.getLogger("aimss_dask")

#: Batches the background thread prepares ahead of the consumer ...
PREFETCH_BATCHES = 4
#: ... and batches it has requested from the owners but not yet assembled:
#: several round trips in flight hide the latency of each.
FETCHES_IN_FLIGHT = 3
#: How often blocked threads look at the stop flag.
_POLL = 0.1
#: What the fetcher's queue holds after the last batch.
END = object()


class Committer:
    """Sends the consumer's position (and slabs done) in order, off the consumer's thread."""

    def __init__(
        self, ep: Endpoint, info: SourceInfo, group: str | None, key: str, windowed: bool, start: int
    ) -> None:
        self.ep = ep
        self.info = info
        self.group = group
        self.key = key
        self.windowed = windowed
        self.cond = threading.Condition()
        self.target = start  # position the consumer is done with
        self.sent = start  # position acknowledged by the coordinator and the brokers
        self.acked = info.layout.records_consumed(start) if windowed else [0] * info.spec.partitions
        self.error: BaseException | None = None
        self._busy = False
        self._force = False

    def submit(self, position: int, force: bool = False) -> None:
        with self.cond:
            if self.error is not None:
                raise self.error
            if self.group is None and not self.windowed:
                # Nobody to tell: no group to resume, no window to slide.
                self.target = self.sent = max(self.target, position)
                return
            self.target = max(self.target, position)
            self._force |= force
            self.cond.notify_all()
            if self._busy or (self.target <= self.sent and not self._force):
                return
            self._busy = True
        self.ep.loop.add_callback(self._drain)

    async def _drain(self) -> None:
        while True:
            with self.cond:
                pos, force = self.target, self._force
                if pos <= self.sent and not force:
                    self._busy = False
                    self.cond.notify_all()
                    return
                self._force = False
            try:
                recs = await self._send(pos, force)
            except Exception as e:
                with self.cond:
                    self.error = e
                    self._busy = False
                    self.cond.notify_all()
                return
            with self.cond:
                self.sent = max(self.sent, pos)
                if recs is not None:
                    self.acked = [max(a, b) for a, b in zip(self.acked, recs)]
                self.cond.notify_all()

    async def _send(self, pos: int, force: bool = False) -> list[int] | None:
        ep, spec = self.ep, self.info.spec
        if self.group is not None:
            # Position first: if the record offsets went first and we died in
            # between, a resumed loader could ask for slabs already trimmed.
            await ep.ask_scheduler(
                "commit", name=spec.name, group=position_group(self.group), offsets=[[0, pos]], **ep.owner_kwargs()
            )
        if not self.windowed:
            return None
        recs = self.info.layout.records_consumed(pos)
        with self.cond:
            unchanged = recs == self.acked
        if unchanged and not force:
            return recs  # still inside the same slabs: nothing new to trim
        if self.group is not None:
            await ep.ask_scheduler(
                "commit", name=spec.name, group=self.group, offsets=[[p, o] for p, o in enumerate(recs)],
                **ep.owner_kwargs(),
            )
        # Straight to the brokers too, so the window slides now, not at their next poll.
        await asyncio.gather(
            *(
                ask_source(ep, w, spec, "control", action="advance", key=self.key, offsets=recs)
                for w in sorted(set(spec.owners))
            )
        )
        return recs

    def flush(self) -> None:
        """Wait until every submitted position is sent; raise what failed."""
        with self.cond:
            while self._busy and self.error is None:
                self.cond.wait(_POLL)
            if self.error is not None:
                raise self.error


class Fetcher:
    """The background thread that prepares the next batches."""

    def __init__(
        self,
        ep: Endpoint,
        info: SourceInfo,
        batch_size: int,
        shuffle: bool,
        seed: int | None,
        start: int,
        stop: int,
        windowed: bool,
        committer: Committer,
    ) -> None:
        self.ep = ep
        self.info = info
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.start = start
        self.stop_at = stop
        self.windowed = windowed
        self.committer = committer
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=PREFETCH_BATCHES)
        # Backups of late takes, by the coordinator's speculation settings.
        self.hedger = Hedger(list(info.spec.owners), _view(ep))
        self._chores: set[asyncio.Future[Any]] = set()  # its reports and refreshes under way
        self.stopped = threading.Event()
        # The thread holds this object, never the iterator, so an abandoned
        # iterator is collected and its __del__ stops the thread.
        self.thread = threading.Thread(target=self._run, name="aimss-loader", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        with self.committer.cond:
            self.committer.cond.notify_all()

    def get(self) -> Any:
        while True:
            try:
                return self.queue.get(timeout=_POLL)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    return END

    def _put(self, item: Any) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=_POLL)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        rows = self.info.layout.rows
        order_epoch, order = -1, None
        # Batches requested but not yet assembled: (position after, takes, size, reply).
        inflight: deque[tuple[int, list[Take], int, Future[list[Any]]]] = deque()
        try:
            for epoch, i, j in batch_plan(rows, self.batch_size, self.start, self.stop_at):
                if epoch != order_epoch:
                    order_epoch, order = epoch, epoch_order(rows, epoch, self.seed, self.shuffle)
                samples = np.arange(i, j) if order is None else order[i:j]
                takes = plan_take(self.info.layout, samples)
                if self.windowed and not self._in_window(takes):
                    # Hand over what is in flight first: the consumer must be
                    # able to move (and commit) for the window to slide.
                    while inflight:
                        if not self._deliver(inflight.popleft()):
                            return
                    if not self._wait_window(takes, epoch * rows + i):
                        return
                while len(inflight) >= FETCHES_IN_FLIGHT:
                    if not self._deliver(inflight.popleft()):
                        return
                inflight.append((epoch * rows + j, takes, j - i, self._ask(takes)))
            while inflight:
                if not self._deliver(inflight.popleft()):
                    return
            self.ep.loop.add_callback(self._hedger_chores, True)
            self._put(END)
        except BaseException as e:
            for *_, fut in inflight:
                fut.cancel()
            self._put(e)

    def _in_window(self, takes: list[Take]) -> bool:
        """Below the slabs the brokers know we are done with, plus the window."""
        c, windows = self.committer, self.info.windows
        with c.cond:
            return all(t.offset < c.acked[t.partition] + windows[t.partition] for t in takes)

    def _wait_window(self, takes: list[Take], first: int) -> bool:
        """Wait until ``takes`` are inside the window; False once stopped.

        The batch the consumer waits for goes ahead anyway once every commit
        is acknowledged (a batch wider than the window must still be read),
        so this cannot deadlock.
        """
        c = self.committer
        with c.cond:
            while not self.stopped.is_set():
                if c.error is not None:
                    raise c.error
                if c.sent >= first and not c._busy:
                    return True
                c.cond.wait(_POLL)
                if all(t.offset < c.acked[t.partition] + self.info.windows[t.partition] for t in takes):
                    return True
        return False

    def _ask(self, takes: list[Take]) -> Future[list[Any]]:
        """Send one take per owner, concurrently, without waiting for the answers."""
        spec = self.info.spec
        by_owner: dict[str, list[Take]] = defaultdict(list)
        for t in takes:
            by_owner[spec.owners[t.partition]].append(t)

        def one(w: str, ts: list[Take]) -> Awaitable[dict[str, Any]]:
            wire = [[t.partition, t.offset, _rows_wire(t)] for t in ts]
            return race(
                self.hedger, w,
                lambda: ask_source(self.ep, w, spec, "take", takes=wire),
                lambda dest: ask_source(self.ep, dest, spec, "backup", takes=wire),
            )

        async def ask() -> list[Any]:
            self._hedger_chores()
            replies = await asyncio.gather(*(one(w, ts) for w, ts in by_owner.items()))
            parts = {w: _unpack(ts, r) for (w, ts), r in zip(by_owner.items(), replies)}
            # Back in the order of ``takes``.
            return [next(parts[spec.owners[t.partition]]) for t in takes]

        return asyncio.run_coroutine_threadsafe(ask(), self.ep.loop.asyncio_loop)

    def _hedger_chores(self, last: bool = False) -> None:
        """On the loop: refresh the coordinator's view when stale; send the backups' reports due."""
        h = self.hedger
        if h.stale() and not last:
            h.seen = time.monotonic()  # one refresh at a time

            async def refresh() -> None:
                try:
                    h.update(await self.ep.ask_scheduler("speculation_view"))
                except Exception:  # keep the last view: backups are an optimisation
                    logger.debug("aimss: reading the speculation settings failed", exc_info=True)

            self._spawn(refresh())
        for report in h.due_reports(force=last):
            self._spawn(_report(self.ep, self.info.spec.name, report))

    def _spawn(self, coro: Any) -> None:
        # The loop keeps only weak references to tasks: hold them until done.
        task = asyncio.ensure_future(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _deliver(self, item: tuple[int, list[Take], int, Future[list[Any]]]) -> bool:
        """Wait for one batch's parts, assemble it, queue it; False once stopped."""
        position, takes, n, fut = item
        while True:
            if self.stopped.is_set():
                fut.cancel()
                return False
            try:
                parts = fut.result(timeout=_POLL)
                break
            except FutureTimeout:
                continue  # a comm failure arrives as PartitionLostError (ask_source)
        batch = np.empty((n, *self.info.shape[1:]), dtype=self.info.dtype)
        for t, part in zip(takes, parts):
            batch[t.positions] = part
        return self._put((position, batch))


def _view(ep: Endpoint) -> dict[str, Any]:
    """The coordinator's speculation settings and slow workers; backups off if it cannot tell."""
    try:
        return ep.scheduler_op("speculation_view")
    except Exception:
        logger.debug("aimss: reading the speculation settings failed; no backup reads", exc_info=True)
        return {"enabled": False}


async def _report(ep: Endpoint, stream: str, report: dict[str, Any]) -> None:
    try:
        await ep.ask_scheduler("loader_copies", stream=stream, **report)
    except Exception:  # a report lost is no reason to fail the loader
        logger.debug("aimss: reporting backup reads failed", exc_info=True)


def _unpack(takes: list[Take], reply: dict[str, Any]) -> Iterator[np.ndarray]:
    """One owner's answer as one array per take (see ``SourceRun._take``)."""
    gathered, i = reply.get("gathered"), 0
    for t, part in zip(takes, reply["parts"]):
        if part is None:
            part = gathered[i : i + len(t.rows)]
            i += len(t.rows)
        yield part


async def ask_source(ep: Endpoint, worker: str, spec: Any, operation: str, **kwargs: Any) -> dict[str, Any]:
    """``operation`` of the source run of ``spec`` on ``worker`` (see ``SourceRun.call``)."""
    try:
        return await ep.ask_worker(
            worker, "run_call", name=spec.name, epoch=spec.epoch, operation=operation, kwargs=kwargs
        )
    except StreamNotFoundError:
        raise StreamNotFoundError(
            f"stream {spec.name!r} is not a Zarr source on worker {worker} (destroyed, or "
            "not made by aimss_dask.from_zarr)"
        ) from None
    except AIMSSError:
        raise  # StoreNotFoundError is an OSError too, but no comm failure
    except OSError as e:
        # Every call of a loader (takes, acks, windows) names the loss alike.
        parts = [p for p, w in enumerate(spec.owners) if w == worker]
        raise PartitionLostError(
            f"worker {worker}, owner of partitions {parts} of stream {spec.name!r}, could not "
            f"be reached ({e}); they are lost: destroy the stream and create the source again"
        ) from e


def _rows_wire(t: Take) -> Any:
    """A contiguous row range as ``[start, stop]`` (the owner answers a view), else the rows."""
    if isinstance(t.positions, slice):
        return [int(t.rows[0]), int(t.rows[-1]) + 1]
    return to_serialize(np.ascontiguousarray(t.rows))
