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
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from aimss_dask.api.context import Endpoint, current
from aimss_dask.api.extensions import register_extension
from aimss_dask.api.progress import Bar
from aimss_dask.api.progress import wanted as progress_wanted
from aimss_dask.api.runs import register_run
from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.core.specs import check_name
from aimss_dask.source.broker import PRIVATE_PREFIX
from aimss_dask.source.fetcher import END, Committer, Fetcher, ask_source
from aimss_dask.source.layout import POSITION_SUFFIX, position_group
from aimss_dask.source.specs import LoaderSpec, OnLoss
from aimss_dask.source.zarr_source import describe

logger = logging.getLogger("aimss_dask")

#: Least time between two progress reports of a loader to the coordinator.
REPORT_EVERY = 0.5

#: Longest a closing loader waits for one owner to release its broker, s.
DETACH_WAIT = 5.0


def batches(
    stream: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int | None = None,
    epochs: int = 1,
    group: str | None = None,
    progress: bool | None = None,
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
    progress
        A bar of batches on stderr: ``None`` where someone watches (a
        terminal, a notebook), ``True`` always, ``False`` never.

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
    show = progress_wanted(progress)
    it = BatchIterator(stream, batch_size, bool(shuffle), seed, epochs, group)
    it.bar = Bar(len(it), f"batches of {stream.name}", "batches", show=show)
    return it


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
        self.bar: Bar | None = None  # set by batches()
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
                start = ep.scheduler_op(
                    "offsets", name=spec.name, group=position_group(group), **ep.owner_kwargs()
                )["offsets"][0]
            stop = epochs * rows
            start = min(start, stop)
            self.position = start
            self._len = _count(rows, batch_size, start, stop)
            self._committer = Committer(ep, info, group, self._key, self.windowed, start)
            if self.windowed:
                # A resumed loader lets the brokers trim up to where it starts.
                self._committer.submit(start, force=True)
        except BaseException:
            if self.windowed:
                try:
                    self._ep.call(self._detach_async)
                except Exception:
                    pass  # the original error matters more
            raise
        self._pending: int | None = None
        self._fetcher = Fetcher(ep, info, batch_size, shuffle, seed, start, stop, self.windowed, self._committer)
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

    async def _detach_async(self) -> None:
        """Release the brokers, each owner's as far as it answers within :data:`DETACH_WAIT` s.

        Best effort: an owner that died (the loss this loader fails with)
        takes its broker with it, and connecting to it would retry for
        Dask's whole connect timeout before the loader's error is raised.
        """
        ep, spec = self._ep, self._spec

        async def one(worker: str) -> None:
            try:
                await asyncio.wait_for(
                    ask_source(ep, worker, spec, "control", action="detach", key=self._key), DETACH_WAIT
                )
            except Exception as e:  # gone, closing, or the stream destroyed: nothing to release
                logger.debug("aimss: loader not detached from %s: %r", worker, e)

        await asyncio.gather(*(one(w) for w in sorted(set(spec.owners))))

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
        if item is END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self._close("failed", item)
            raise item
        self._pending, batch = item
        self._batches += 1
        if self.bar is not None:
            self.bar.update(self._batches)
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
        if self.bar is not None:
            self.bar.close()
        self._report(state, error)
        try:
            self._committer.flush()
        finally:
            if self.windowed:
                try:
                    self._ep.call(self._detach_async)
                except Exception:
                    pass  # the cluster connection is gone: nothing left to release

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
                    self._ep.loop.add_callback(self._detach_async)
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


register_extension("batches", batches)
