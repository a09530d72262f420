"""``Stream.batches``: a training-style loader over a Zarr source stream.

The loader runs in the consumer's process (a client or a task). A background
thread fetches the next batches while the consumer computes on the current
one; each batch is one ``take`` (``aimss_run_call``) per owner worker, answered with
only the requested rows of the requested slabs (a shuffled batch never moves
whole slabs), then assembled into one NumPy array.

Modes
-----
* **Sequential, one epoch** (``shuffle=False, epochs=1``): the brokers keep
  a bounded window per partition ahead of the loader, which reports its
  progress after every batch; slabs behind it are trimmed. Memory stays at
  the prefetch window whatever the array's size.
* **Shuffled, or several epochs**: every epoch reads every sample again, so
  the loader asks the brokers to *retain* the whole array in the workers'
  logs (past the budget it spills to node-local disk, which is read back
  faster than Zarr is decoded). Each epoch is a fresh global permutation
  drawn from ``(seed, epoch)``.

Position and resume
-------------------
With ``group=g`` the loader commits, after each batch the consumer is done
with, its position, the number of samples consumed counted across epochs
(``epoch * rows + index in the epoch``), to partition 0 of the companion
consumer group ``g#position``; in sequential one-epoch mode it also commits
the slabs it is done with as ordinary record offsets of group ``g``, which
is what the brokers trim behind. A batch counts as consumed when the next
one is asked for (at-least-once, as :func:`aimss_dask.read_from`): a new
iterator with the same group starts with the first batch whose successor was
never requested. Commits are sent in the background, in order, and flushed
by :meth:`BatchIterator.close` and at the end.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
from distributed.protocol import to_serialize

from aimss_dask.core.specs import check_name
from aimss_dask.errors import AIMSSError, InvalidArgumentError, PartitionLostError, StreamNotFoundError
from aimss_dask.source.broker import PRIVATE_PREFIX
from aimss_dask.source.layout import (
    POSITION_SUFFIX,
    Take,
    batch_plan,
    epoch_order,
    plan_take,
    position_group,
)
from aimss_dask.source.specs import LoaderSpec, OnLoss
from aimss_dask.source.zarr_source import SourceInfo, describe
from aimss_dask.stream.context import Endpoint, current
from aimss_dask.stream.runs import register_run
from aimss_dask.stream.extensions import register_extension

logger = logging.getLogger("aimss_dask")

#: Batches the background thread prepares ahead of the consumer ...
PREFETCH_BATCHES = 4
#: ... and batches it has requested from the owners but not yet assembled:
#: several round trips in flight hide the latency of each.
FETCHES_IN_FLIGHT = 3
#: How often blocked threads look at the stop flag.
_POLL = 0.1
#: Least time between two progress reports of a loader to the coordinator.
REPORT_EVERY = 0.5
_END = object()


def batches(
    stream: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int | None = None,
    epochs: int = 1,
    group: str | None = None,
) -> BatchIterator:
    """Iterate ``stream``, a Zarr source, in batches of ``batch_size`` samples.

    Each batch is a NumPy array of ``batch_size`` samples along axis 0 (the
    last batch of an epoch may be smaller; batches never span two epochs).

    Parameters
    ----------
    stream
        A :class:`~aimss_dask.Stream` made by
        :func:`aimss_dask.source.from_zarr`.
    batch_size
        Samples per batch (>= 1).
    shuffle
        A fresh global permutation every epoch (the whole array is then kept
        in the workers' logs, spilling past the budget).
    seed
        Makes the permutations reproducible: epoch ``e`` uses
        ``default_rng([seed, e])``. Required with ``shuffle`` and ``group``,
        since a resumed iterator must replay the same order.
    epochs
        Passes over the array.
    group
        Consumer group: start where the group's last iterator stopped, and
        commit progress as batches are consumed (see the module docstring).

    Examples
    --------
    >>> s = aimss_dask.source.from_zarr("train.zarr")                     # doctest: +SKIP
    >>> with s.batches(64, shuffle=True, seed=0, epochs=2, group="run-1") as it:  # doctest: +SKIP
    ...     for x in it:
    ...         step(x)
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size!r} must be an int >= 1")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise InvalidArgumentError(f"epochs={epochs!r} must be an int >= 1")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise InvalidArgumentError(f"seed={seed!r} must be a non-negative int or None")
    if group is not None:
        check_name(group, "consumer group")
        if group.endswith(POSITION_SUFFIX):
            raise InvalidArgumentError(
                f"group={group!r}: names ending in {POSITION_SUFFIX!r} hold loader "
                "positions; pick another group name"
            )
    if shuffle and seed is None:
        if group is not None:
            raise InvalidArgumentError(
                f"shuffle with group={group!r} needs a seed: a resumed iterator must "
                "replay the same permutation; pass seed=<int>"
            )
        seed = int(np.random.SeedSequence().entropy)
    return BatchIterator(stream, batch_size, bool(shuffle), seed, epochs, group)


class BatchIterator(Iterator[np.ndarray]):
    """The iterator :func:`batches` returns; also a context manager.

    ``position`` is the number of samples consumed so far (across epochs);
    ``len()`` the number of batches this iterator yields in all.
    """

    def __init__(
        self,
        stream: Any,
        batch_size: int,
        shuffle: bool,
        seed: int | None,
        epochs: int,
        group: str | None,
    ) -> None:
        self._closed = True  # until fully set up: close() has nothing to undo
        ep = current("batches")
        self._ep = ep
        self._spec = spec = stream.spec
        self.batch_size = batch_size
        self.group = group
        self.windowed = not shuffle and epochs == 1
        self._key = group if group is not None else f"{PRIVATE_PREFIX}{uuid.uuid4().hex}"
        # Attach before anything is read (a retained source must not trim);
        # the owners answer with the layout and their windows.
        replies = self._control("attach", mode="window" if self.windowed else "retain")
        try:
            info = self._info = describe(spec, [r["run"] for r in replies])
            rows = info.layout.rows
            start = 0
            if group is not None:
                start = ep.scheduler_op("offsets", name=spec.name, group=position_group(group))["offsets"][0]
            stop = epochs * rows
            start = min(start, stop)
            self.position = start
            self._len = _count(rows, batch_size, start, stop)
            self._committer = _Committer(ep, info, group, self._key, self.windowed, start)
            if self.windowed:
                # A resumed loader lets the brokers trim up to where it starts.
                self._committer.submit(start, force=True)
        except BaseException:
            if self.windowed:
                try:
                    self._control("detach")
                except Exception:
                    pass  # the original error matters more
            raise
        self._pending: int | None = None
        self._fetcher = _Fetcher(ep, info, batch_size, shuffle, seed, start, stop, self.windowed, self._committer)
        self._stop = stop
        self._batches = 0
        self._reported = 0.0
        self._run = _listed(ep, spec.name, self._key, group)
        self._closed = False

    async def _control_async(self, op: str, **kwargs: Any) -> list[dict[str, Any]]:
        ep, spec = self._ep, self._spec
        return list(
            await asyncio.gather(
                *(
                    ask_source(ep, w, spec, "control", action=op, key=self._key, **kwargs)
                    for w in sorted(set(spec.owners))
                )
            )
        )

    def _control(self, op: str, **kwargs: Any) -> list[dict[str, Any]]:
        return self._ep.call(self._control_async, op, **kwargs)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> np.ndarray:
        if self._closed:
            raise StopIteration
        if self._pending is not None:
            # Asking for the next batch means the previous one is done.
            self._committer.submit(self._pending)
            self.position = self._pending
            self._pending = None
        item = self._fetcher.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self._close("failed", item)
            raise item
        self._pending, batch = item
        self._batches += 1
        now = time.monotonic()
        if now - self._reported >= REPORT_EVERY:
            self._reported = now
            self._report()
        return batch

    def _progress(self) -> dict[str, Any]:
        return {"position": self.position, "of": self._stop, "batches": self._batches, "len": self._len}

    def _report(self, state: str = "running", error: BaseException | None = None) -> None:
        """Progress (or the end) to the coordinator, without waiting: the training loop never stalls on it."""
        if self._run is None:
            return
        ep, (run_id, epoch), progress = self._ep, self._run, self._progress()
        who = ep.client_id or ep.address

        async def send() -> None:
            try:
                if state in ("done", "closed", "failed"):
                    await ep.ask_scheduler("run_report", run_id=run_id, epoch=epoch, who=who, progress=progress)
                    await ep.ask_scheduler(
                        "run_finish", run_id=run_id, epoch=epoch, state=state,
                        error=None if error is None else [type(error).__name__, str(error)],
                    )
                else:
                    await ep.ask_scheduler(
                        "run_report", run_id=run_id, epoch=epoch, who=who, state=state, progress=progress
                    )
            except Exception as e:  # a status view must never break iteration
                logger.debug("aimss: loader progress not reported: %r", e)

        try:
            ep.loop.add_callback(send)
        except Exception:
            pass  # the loop is closed: so is the cluster connection

    def close(self) -> None:
        """Stop prefetching, send the pending commits, release the brokers; idempotent.

        The last batch returned is not committed (the consumer may not have
        finished it): a new iterator of the same group starts with it.
        """
        self._close("done" if self.position >= self._stop else "closed")

    def _close(self, state: str, error: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._fetcher.stop()
        self._report(state, error)
        try:
            self._committer.flush()
        finally:
            if self.windowed:
                try:
                    self._control("detach")
                except Exception:
                    pass  # the stream is gone: nothing left to release

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # Abandoned mid-way (a `break` without close()): stop the thread; no
        # blocking calls from a finaliser.
        if not getattr(self, "_closed", True):
            self._closed = True
            self._fetcher.stop()
            if self.windowed:
                # Fire and forget (add_callback is thread-safe): the brokers
                # stop holding records back for this loader.
                try:
                    self._ep.loop.add_callback(_quietly, self._control_async, "detach")
                except Exception:
                    pass  # the loop is closed: so is the cluster connection


def _listed(ep: Endpoint, stream: str, key: str, group: str | None) -> tuple[str, int] | None:
    """Register the loader as a run reading ``stream``, for ``status()``; None if that fails."""
    spec = LoaderSpec(run_id=f"loader-{uuid.uuid4().hex[:16]}", reads=(stream,), on_loss=OnLoss.FAIL, group=group)
    try:
        handle = register_run(spec, ep=ep)
    except Exception as e:  # listing is for people: iteration goes on without it
        logger.debug("aimss: loader of %r not listed: %r", stream, e)
        return None
    return handle.run_id, handle.epoch


async def _quietly(fn: Any, *args: Any) -> None:
    try:
        await fn(*args)
    except Exception:
        pass  # a finaliser's courtesy: the stream may be gone already


def _count(rows: int, batch_size: int, start: int, stop: int) -> int:
    """Batches :func:`batch_plan` yields from ``start`` to ``stop``, without walking it."""
    if rows <= 0 or start >= stop:
        return 0
    per_epoch = -(-rows // batch_size)
    epoch, i = divmod(start, rows)
    last_epoch, j = divmod(stop, rows)
    if epoch == last_epoch:
        return -(-(j - i) // batch_size)
    n = -(-(rows - i) // batch_size) + (last_epoch - epoch - 1) * per_epoch
    return n + (-(-j // batch_size) if j else 0)


class _Committer:
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
            await ep.ask_scheduler("commit", name=spec.name, group=position_group(self.group), offsets=[[0, pos]])
        if not self.windowed:
            return None
        recs = self.info.layout.records_consumed(pos)
        with self.cond:
            unchanged = recs == self.acked
        if unchanged and not force:
            return recs  # still inside the same slabs: nothing new to trim
        if self.group is not None:
            await ep.ask_scheduler(
                "commit", name=spec.name, group=self.group, offsets=[[p, o] for p, o in enumerate(recs)]
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


class _Fetcher:
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
        committer: _Committer,
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
                    return _END

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
            self._put(_END)
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

        async def ask() -> list[Any]:
            replies = await asyncio.gather(
                *(
                    ask_source(
                        self.ep, w, spec, "take", takes=[[t.partition, t.offset, _rows_wire(t)] for t in ts]
                    )
                    for w, ts in by_owner.items()
                )
            )
            parts = {w: _unpack(ts, r) for (w, ts), r in zip(by_owner.items(), replies)}
            # Back in the order of ``takes``.
            return [next(parts[spec.owners[t.partition]]) for t in takes]

        return asyncio.run_coroutine_threadsafe(ask(), self.ep.loop.asyncio_loop)

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
                continue
            except AIMSSError:
                raise  # StoreNotFoundError is an OSError too, but no comm failure
            except OSError as e:
                raise PartitionLostError(
                    f"an owner of stream {self.info.spec.name!r} could not be reached "
                    f"({e}); its partitions are lost: destroy the stream and create the "
                    "source again"
                ) from e
        batch = np.empty((n, *self.info.shape[1:]), dtype=self.info.dtype)
        for t, part in zip(takes, parts):
            batch[t.positions] = part
        return self._put((position, batch))


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


def _rows_wire(t: Take) -> Any:
    """A contiguous row range as ``[start, stop]`` (the owner answers a view), else the rows."""
    if isinstance(t.positions, slice):
        return [int(t.rows[0]), int(t.rows[-1]) + 1]
    return to_serialize(np.ascontiguousarray(t.rows))


register_extension("batches", batches)
