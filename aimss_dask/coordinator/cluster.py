"""The coordinator's means on the cluster: broadcasts, background work, who holds and wants what.

Everything here goes through the scheduler's public surface
(``Scheduler.broadcast``, ``scheduler.tasks``, ``scheduler.workers``); the
handlers of the coordinator use it instead of the scheduler directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from distributed.core import Status

from aimss_dask.core import trace
from aimss_dask.core.errors import WorkerClosingError, raise_from_wire

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger("aimss_dask")

#: Worker states in which a worker takes new partitions (a paused one resumes).
_STAYING = frozenset({Status.running, Status.paused})

#: The topic of AIMSS's events in Dask's event log: recoveries, restarts.
EVENT_TOPIC = "aimss"

#: How often a message on its way checks that its worker is still listed (s).
GONE_POLL = 0.05

#: Tasks looked at, at most, to find which client a run's create task works for.
_CREATOR_SEARCH = 20_000


def is_worker_client(client_id: str) -> bool:
    """Whether ``client_id`` is a worker's own client (distributed names it ``"worker"``: ``Client-worker-<uuid>``)."""
    return client_id.split("-", 2)[1:2] == ["worker"]


def as_application(client_id: str | None) -> str | None:
    """``client_id`` as the application a stream belongs to: None for no client, or a worker's own.

    >>> as_application("Client-1c2d"), as_application("Client-worker-1c2d"), as_application(None)
    ('Client-1c2d', None, None)
    """
    return None if client_id is None or is_worker_client(client_id) else client_id


class ClusterOps:
    """Broadcast to workers, run background work of hooks, look up task holders and owners.

    ``scheduler`` is set by the plugin's ``start``; nothing here is usable before.
    """

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self._background: set[asyncio.Task[Any]] = set()
        #: Events logged, by action (``run-recovered``, ...): running totals for the metrics.
        self.event_counts: dict[str, int] = {}

    def cancel_background(self) -> None:
        for t in list(self._background):
            t.cancel()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Background work of a hook (cleanup, notices): worth a line in
            # the log, never an "exception was never retrieved".
            logger.info("aimss: background task failed: %r", task.exception())

    def workers(self) -> list[str]:
        assert self.scheduler is not None
        return list(self.scheduler.workers)

    def running(self) -> list[str]:
        """Workers that take new partitions: running or paused.

        Not one that is leaving (retiring, closing), nor one that has just
        joined (``init``): an open sent before its plugins are installed
        fails. Dask reports ``running`` as it starts installing them; AIMSS's
        setup is synchronous, so it is done before the worker handles any
        message sent in answer to that report.
        """
        assert self.scheduler is not None
        return [a for a, ws in self.scheduler.workers.items() if ws.status in _STAYING]

    def hosts(self) -> dict[str, str]:
        """Each worker's host (where replicas of one partition should not share one)."""
        assert self.scheduler is not None
        return {a: ws.host for a, ws in self.scheduler.workers.items()}

    async def broadcast(
        self, msg: dict[str, Any], workers: list[str] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """``msg`` to ``workers`` (all listed ones by default): worker -> its reply, or the exception it got.

        A worker that leaves meanwhile gets an ``OSError``; with ``timeout``,
        one that has not answered after that many seconds a ``TimeoutError``.
        """
        assert self.scheduler is not None
        live = set(self.workers())
        targets = [w for w in (workers if workers is not None else live) if w in live]
        if not targets:
            return {}
        replies = dict(zip(targets, await asyncio.gather(*(self._until_gone(w, msg, timeout) for w in targets))))
        for addr, reply in replies.items():
            if not isinstance(reply, BaseException):
                try:
                    raise_from_wire(reply, msg["op"])
                except WorkerClosingError as e:
                    # Listed until it is gone, its log already closed: as if gone.
                    reply = replies[addr] = e
            if isinstance(reply, BaseException):
                # A closed comm (an OSError) means that worker is leaving
                # too (a cluster shutting down): its removal cleans up.
                log = logger.info if isinstance(reply, OSError) else logger.warning
                log("aimss: %s failed on %s: %r", msg["op"], addr, reply)
        return replies

    async def _until_gone(self, worker: str, msg: dict[str, Any], timeout: float | None = None) -> Any:
        """``msg`` to ``worker``: its reply, or an ``OSError`` once the scheduler no longer lists it.

        A worker killed a moment ago is listed until the scheduler notices,
        and connecting to it retries for Dask's whole connect timeout: a
        promotion must not wait that long for a worker already gone. With
        ``timeout``: a ``TimeoutError`` once it has not answered for that long.
        """
        assert self.scheduler is not None
        task = asyncio.ensure_future(self.scheduler.broadcast(msg=msg, workers=[worker], on_error="return"))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done, _ = await asyncio.wait({task}, timeout=GONE_POLL)
            if done:
                return task.result()[worker]
            if worker not in self.scheduler.workers:
                task.cancel()
                return OSError(f"worker {worker} left while {msg['op']} was on its way")
            if deadline is not None and time.monotonic() > deadline:
                task.cancel()
                return TimeoutError(f"worker {worker} did not answer {msg['op']} within {timeout:g} s")

    async def ask(self, worker: str, msg: dict[str, Any]) -> Any:
        """``msg`` to ``worker`` even if the scheduler no longer lists it (it is closing); its reply.

        Raises what the worker raised, or the comm's error.
        """
        assert self.scheduler is not None
        replies = await self.scheduler.broadcast(msg=msg, workers=[worker], on_error="raise")
        return raise_from_wire(replies[worker], msg["op"])

    def release(self, recs: dict[Any, str], stimulus_id: str) -> None:
        """Send ``recs`` (key -> ``"released"``) to the scheduler: Dask computes those tasks again."""
        assert self.scheduler is not None
        self.scheduler.transitions(recs, stimulus_id=stimulus_id)
        self.scheduler.stimulus_queue_slots_maybe_opened(stimulus_id=stimulus_id)

    def event(self, msg: dict[str, Any]) -> None:
        """Log ``msg`` in Dask's event log under topic :data:`EVENT_TOPIC` (``client.get_events("aimss")``)."""
        assert self.scheduler is not None
        action = str(msg.get("action", "other"))
        self.event_counts[action] = self.event_counts.get(action, 0) + 1
        # Recoveries and the like, in the scheduler's trace (when tracing).
        trace.complete(action, time.time(), 0.0, **{k: v for k, v in msg.items() if k != "action"})
        self.scheduler.log_event(EVENT_TOPIC, msg)

    def tell(self, worker: str, msg: dict[str, Any]) -> bool:
        """``msg`` on the scheduler's ordered stream to ``worker``; False if it has none."""
        assert self.scheduler is not None
        comm = self.scheduler.stream_comms.get(worker)
        if comm is None:
            return False
        comm.send(msg)
        return True

    def creator(self, client: str | None, task: Any) -> str | None:
        """The client a stream belongs to: the caller, or who wants the task."""
        if client:
            return client
        assert self.scheduler is not None
        ts = self.scheduler.tasks.get(as_key(task)) if task is not None else None
        # A run's create task is rarely wanted itself: the client wants the
        # outputs downstream of it. The nearest wanted dependent says whose.
        seen: set[Any] = set()
        frontier = [ts] if ts is not None else []
        while frontier and len(seen) < _CREATOR_SEARCH:
            wanted = sorted(cs.client_key for t in frontier for cs in (t.who_wants or ()))
            if wanted:
                return wanted[0]
            seen.update(t.key for t in frontier)
            frontier = [d for t in frontier for d in t.dependents if d.key not in seen]
        return None

    def application(self, client: str | None, task: Any) -> str | None:
        """The application a caller acts for (for access checks): :meth:`creator`, but
        None where that is a worker's own client.

        A task submitted from a task (``get_client().submit``) is wanted by
        the worker's client, which stands for no application: the caller is
        then not known, and not checked.
        """
        return as_application(self.creator(client, task))

    def holders(self, keys: list[Any]) -> list[str | None]:
        """The worker holding each task result (``None`` where none is in memory)."""
        assert self.scheduler is not None
        out: list[str | None] = []
        for key in keys:
            ts = self.scheduler.tasks.get(as_key(key))
            holders = sorted(ws.address for ws in ts.who_has) if ts is not None and ts.who_has else []
            out.append(holders[0] if holders else None)
        return out


def as_key(key: Any) -> Any:
    """A Dask key back from the wire, where msgpack turned its tuples into lists."""
    return tuple(as_key(k) for k in key) if isinstance(key, (list, tuple)) else key
