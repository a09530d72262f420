"""Sync phases and idle filling: the application's side.

``with sync_phase("checkpoint"):`` tells the coordinator that a worker (in
a task: the one running it; in the client: every worker, or those named)
is about to wait; :func:`fill` queues low-priority, preemptible work that
the coordinator runs in such waits, and in idle dips, one bounded slice at
a time (:mod:`aimss_dask.coordinator.filling`).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from distributed.protocol.pickle import dumps

from aimss_dask.api.context import current
from aimss_dask.core.errors import InvalidArgumentError, InvalidTypeError
from aimss_dask.power.phases import check_expected

logger = logging.getLogger("aimss_dask")

#: How often :meth:`Filler.wait` asks for the filler's state.
WAIT_POLL = 0.05


@contextlib.contextmanager
def sync_phase(name: str, expected_s: float | None = None, workers: list[str] | None = None) -> Iterator[str]:
    """Mark a stretch where the workers' accelerators would sit idle: a checkpoint, a collective.

    In a task, the phase is its worker's, and the task's thread counts as
    idle meanwhile; in the client, it covers ``workers`` (default: every
    worker). ``expected_s``: how long it should last; without it the
    coordinator expects what phases of this ``name`` lasted before. While it
    is open, the coordinator runs queued fillers (:func:`fill`) there, each
    slice sized to end before the phase does. Yields the phase's token.

    Examples
    --------
    >>> with aimss_dask.sync_phase("checkpoint", expected_s=1.5):   # doctest: +SKIP
    ...     save(model_state)
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"sync_phase needs a name (a non-empty str), got {name!r}")
    expected = check_expected(expected_s)
    if workers is not None and (isinstance(workers, str) or not all(isinstance(w, str) for w in workers)):
        raise InvalidTypeError(f"sync_phase(workers={workers!r}): give a list of worker addresses, or None for all")
    ep = current("sync_phase")
    if ep.address is not None:
        if workers is not None and list(workers) != [ep.address]:
            raise InvalidArgumentError(
                f"sync_phase in a task covers the worker running it ({ep.address}), not {workers!r}; "
                "open a phase on other workers from the client"
            )
        scope: list[str] | None = [ep.address]
    else:
        scope = None if workers is None else list(workers)
    token = ep.scheduler_op("phase_open", name=name, workers=scope, expected_s=expected, **ep.owner_kwargs())["token"]
    try:
        yield token
    finally:
        ep.scheduler_op("phase_close", token=token)


@contextlib.contextmanager
def barrier_phase(name: str) -> Iterator[str | None]:
    """AIMSS's own barrier (a shuffle's seal), from the task that waits on it, as a sync phase.

    It covers every worker with nothing else to run meanwhile (the
    coordinator decides), where ``aimss.power.auto-phases`` is on. It never
    fails the barrier: a phase that cannot be opened or closed is skipped.
    """
    token: str | None = None
    ep = None
    try:
        ep = current(name)
        token = ep.scheduler_op("phase_open", name=name, workers=None, auto=True, **ep.owner_kwargs())["token"]
    except Exception as e:  # the barrier matters, its phase does not
        logger.debug("aimss: no sync phase for %s: %r", name, e)
    try:
        yield token
    finally:
        if token is not None and ep is not None:
            try:
                ep.scheduler_op("phase_close", token=token)
            except Exception as e:
                logger.debug("aimss: sync phase %s not closed: %r", name, e)


class Filler:
    """A queued filler: its state, and the means to wait for it or cancel it.

    Examples
    --------
    >>> f = aimss_dask.fill(score_batch, "queue-a", gpu=False, max_s=0.5)   # doctest: +SKIP
    >>> f.status()["state"]                                                   # doctest: +SKIP
    'running'
    """

    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"Filler({self.key!r})"

    def status(self) -> dict[str, Any]:
        """State (``queued``, ``running``, ``done``, ``failed``, ``cancelled``), slices run, seconds,
        workers, slices over budget, and the error and traceback of a failed one."""
        return dict(current("Filler.status").scheduler_op("fill_status", key=self.key))

    def cancel(self) -> bool:
        """No new slice starts (a running one ends within its budget); whether it was still active."""
        return bool(current("Filler.cancel").scheduler_op("fill_cancel", key=self.key)["cancelled"])

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the filler is done, failed or cancelled; its last status.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if st["state"] in ("done", "failed", "cancelled") and not st["running"]:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"filler {self.key!r} is still {st['state']} after {timeout} s")
            time.sleep(WAIT_POLL)


def fill(
    func: Callable[..., Any],
    *args: Any,
    gpu: bool = True,
    max_s: float = 1.0,
    key: str | None = None,
    concurrency: int = 1,
    memory: int = 0,
) -> Filler:
    """Queue low-priority work that runs only where the job leaves a worker idle.

    ``func(*args, budget_s=b)`` is called again and again, one *slice* at a
    time: each call does at most ``b`` seconds of work (``b`` is sized to
    the idle time, never more than ``max_s``) and returns ``True`` while it
    has more to do. Slices go to workers in a sync phase
    (:func:`sync_phase`) and to workers idle for a while (GPU utilisation
    low, or task threads idle), never to a worker with tasks of the job
    ready, and stop when the phase ends. ``gpu=True`` slices need a GPU and
    ``memory`` bytes of its free memory, and run on a low-priority CUDA
    stream; ``gpu=False`` slices fill idle CPU threads. ``concurrency``:
    slices of this filler that may run at once (on different workers).
    What a slice raises is recorded in :meth:`Filler.status` and the
    ``aimss`` events, never raised into the job. ``func`` and ``args`` go
    to the worker with every slice: keep them small (a stream's name, not
    its data).

    Examples
    --------
    >>> def score(queue, budget_s):                                    # doctest: +SKIP
    ...     end = time.monotonic() + budget_s
    ...     while time.monotonic() < end and queue_has_work(queue):
    ...         score_one(queue)
    ...     return queue_has_work(queue)
    >>> f = aimss_dask.fill(score, "batch-7", gpu=False, max_s=0.5)    # doctest: +SKIP
    >>> f.wait()["state"]                                              # doctest: +SKIP
    'done'
    """
    if not callable(func):
        raise InvalidTypeError(f"fill needs a function to call, got {type(func).__name__} {func!r}")
    if not isinstance(max_s, numbers.Real) or isinstance(max_s, bool) or not max_s > 0 or max_s == float("inf"):
        raise InvalidArgumentError(f"fill(max_s={max_s!r}): the longest slice must be a positive, finite number of seconds")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidArgumentError(f"fill(concurrency={concurrency!r}): give an int >= 1 (slices at once)")
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        raise InvalidArgumentError(f"fill(memory={memory!r}): give the device bytes one slice needs (an int >= 0)")
    if key is None:
        key = f"{getattr(func, '__name__', 'filler')}-{uuid.uuid4().hex[:12]}"
    elif not isinstance(key, str) or not key:
        raise InvalidArgumentError(f"fill(key={key!r}): a key is a non-empty str")
    payload = dumps((func, args))
    ep = current("fill")
    ep.scheduler_op(
        "fill_submit", key=key, payload=payload, gpu=bool(gpu), max_s=float(max_s), concurrency=concurrency,
        memory=memory, client=ep.client_id,
    )
    return Filler(key)
