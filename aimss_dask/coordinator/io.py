"""Coordinated I/O: who of all applications writes to a node's file system, and when.

Applications that share a cluster each burst their sink writes at the same
file systems; interleaved, the bursts slow each other down (Gainaru et al.,
IPDPS'15, saw up to 67% of a machine's I/O throughput lost that way). The
coordinator sees every run, so it orders the bursts instead:

- A worker asks (:class:`IOHandlers`, op ``aimss_io_acquire``) before it
  writes a sink's units to a *resource*: one host's view of one file system.
  At most ``limit`` writers hold a resource at once
  (``aimss.io.max-concurrent-writes-per-node``).
- Waiting writers go in this order: higher ``io_priority`` of their run
  first; then the application whose *turn* it is on that resource; then the
  application that has waited longest. An application keeps its turn for
  ``turn`` seconds while another waits, so bursts are served one after the
  other, each for a share of the node's time, instead of interleaved. The
  order is work-conserving: a slot the turn's application does not use goes
  to the next one.
- ``share`` (``aimss.io.share``, a fraction of ``limit``): an application
  that holds that many of a resource's slots goes after every other
  waiting one, whatever its turn. 1.0 (the default) lets a burst take the
  whole node for its turn; 0.5 splits a node between two applications.
- A worker keeps a grant for a *lease* of back-to-back writes
  (:mod:`aimss_dask.node.iogate`) and gives it back when its writes pause
  or the lease ends; a worker that leaves gives back everything it held.

Readers never ask: a source's or loader's reads are latency-bound
(prefetch windows wait on them), so they are never queued behind writes.

:class:`IOScheduler` is pure (plain data, an injected clock); the handlers
wrap it in futures on the scheduler's event loop.

Examples
--------
>>> s = IOScheduler(limit=1, turn=1.0, clock=lambda: 0.0)
>>> s.request("n1|fs", "appA", 0, "w1")
(1, True)
>>> s.request("n1|fs", "appB", 0, "w2")     # the node's one slot is taken: B waits
(2, False)
>>> s.release(1)                              # A is done: B's turn
[2]
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("aimss_dask")

#: Applications whose grants a resource counts (``served``); the least served go first past it.
SERVED_KEPT = 64


@dataclass
class _Ticket:
    id: int
    resource: str
    app: str
    priority: int
    worker: str
    asked: float
    granted: float | None = None


@dataclass
class _Resource:
    holders: dict[int, _Ticket] = field(default_factory=dict)
    waiting: dict[int, _Ticket] = field(default_factory=dict)
    turn_app: str | None = None
    turn_since: float = 0.0
    granted: int = 0  # grants so far (for status)
    peak: int = 0  # most writers that held it at once
    served: dict[str, int] = field(default_factory=dict)  # grants per application


class IOScheduler:
    """Slots per resource, granted in priority, turn and waiting order (see the module).

    ``limit``: writers that may hold one resource at once; ``turn``: seconds
    an application keeps a resource's turn while another waits.
    """

    def __init__(
        self, limit: int, turn: float, clock: Callable[[], float] = time.monotonic, share: float = 1.0
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit={limit!r} must be >= 1")
        if not 0 < share <= 1:
            raise ValueError(f"share={share!r} must be in (0, 1]")
        self.limit = int(limit)
        self.turn = float(turn)
        #: Slots one application may hold while another waits (at least one).
        self.cap = max(1, math.floor(self.limit * share))
        self.clock = clock
        self._ids = itertools.count(1)
        self._resources: dict[str, _Resource] = {}
        self._tickets: dict[int, _Ticket] = {}

    def request(self, resource: str, app: str, priority: int, worker: str) -> tuple[int, bool]:
        """A ticket for one writer of ``worker``, and whether it holds a slot already."""
        t = _Ticket(next(self._ids), resource, app, int(priority), worker, self.clock())
        self._tickets[t.id] = t
        res = self._resources.setdefault(resource, _Resource())
        res.waiting[t.id] = t
        return t.id, t.id in self._pump(res)

    def release(self, ticket: int) -> list[int]:
        """Give ``ticket`` back (held or still waiting); the tickets this lets in."""
        t = self._tickets.pop(ticket, None)
        if t is None:
            return []
        res = self._resources[t.resource]
        res.holders.pop(t.id, None)
        res.waiting.pop(t.id, None)
        # Kept when idle: there are only so many hosts and file systems, and
        # the turn and the counts outlive one burst.
        return self._pump(res)

    def forget_worker(self, worker: str) -> tuple[list[int], list[int]]:
        """``worker`` left: drop its tickets; ``(dropped, now granted to others)``."""
        mine = [i for i, t in self._tickets.items() if t.worker == worker]
        granted: list[int] = []
        for i in mine:
            granted.extend(self.release(i))
        return mine, [g for g in granted if g not in mine]

    def holds(self, ticket: int) -> bool:
        t = self._tickets.get(ticket)
        return t is not None and t.granted is not None

    def _pump(self, res: _Resource) -> list[int]:
        """Fill ``res``'s free slots from its waiting tickets, in order; the ones granted."""
        out: list[int] = []
        while res.waiting and len(res.holders) < self.limit:
            now = self.clock()
            over = self._turn_over(res, now)
            # Those over their share go after the others; a slot nobody
            # else wants is theirs all the same (work-conserving).
            pool = [t for t in res.waiting.values() if self._under_share(res, t.app)] or res.waiting.values()
            t = min(pool, key=lambda t: self._order(res, t, now, over))
            del res.waiting[t.id]
            t.granted = now
            res.holders[t.id] = t
            res.granted += 1
            res.peak = max(res.peak, len(res.holders))
            res.served[t.app] = res.served.get(t.app, 0) + 1
            if len(res.served) > SERVED_KEPT:  # a long-lived cluster sees many applications
                del res.served[min(res.served, key=res.served.__getitem__)]
            # The turn passes when its application is done here or has had
            # its time; a spare slot lent to another does not pass it.
            if t.app != res.turn_app and (over or not self._busy(res, res.turn_app)):
                res.turn_app, res.turn_since = t.app, now
            out.append(t.id)
        return out

    def _order(self, res: _Resource, t: _Ticket, now: float, over: bool) -> tuple[Any, ...]:
        mine = t.app == res.turn_app and not over
        return (-t.priority, 0 if mine else 1, self._waiting_since(res, t.app), t.id)

    def _under_share(self, res: _Resource, app: str) -> bool:
        """Whether ``app`` may take one more slot of ``res``: below its share, or nobody else waits."""
        held = sum(1 for h in res.holders.values() if h.app == app)
        return held < self.cap or all(w.app == app for w in res.waiting.values())

    def _turn_over(self, res: _Resource, now: float) -> bool:
        """The turn's application has had the resource for ``turn`` seconds and another waits."""
        if res.turn_app is None or now - res.turn_since < self.turn:
            return False
        return any(w.app != res.turn_app for w in res.waiting.values())

    @staticmethod
    def _busy(res: _Resource, app: str | None) -> bool:
        return app is not None and any(t.app == app for t in (*res.holders.values(), *res.waiting.values()))

    @staticmethod
    def _waiting_since(res: _Resource, app: str) -> float:
        return min((w.asked for w in res.waiting.values() if w.app == app), default=float("inf"))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per resource: writers holding it and waiting, by application, whose turn it is,
        grants so far (``granted``, and ``served`` per application) and the most writers
        that ever held it at once (``peak``)."""
        out: dict[str, dict[str, Any]] = {}
        for name, res in sorted(self._resources.items()):
            held: dict[str, int] = {}
            queued: dict[str, int] = {}
            for t in res.holders.values():
                held[t.app] = held.get(t.app, 0) + 1
            for t in res.waiting.values():
                queued[t.app] = queued.get(t.app, 0) + 1
            out[name] = {
                "writing": held, "waiting": queued, "turn": res.turn_app, "granted": res.granted,
                "peak": res.peak, "served": dict(res.served),
            }
        return out


class IOHandlers:
    """The coordinator's ops over one :class:`IOScheduler`: acquire waits for a grant.

    ``app_of(run) -> (application, io_priority)`` looks the run up in the
    run registry (an unknown run is its own application, at priority 0).
    """

    def __init__(
        self, limit: int, turn: float, lease: float, enabled: bool,
        app_of: Callable[[str], tuple[str, int]], share: float = 1.0,
    ) -> None:
        self.sched = IOScheduler(limit, turn, share=share)
        self.lease = lease
        self.enabled = enabled
        self.app_of = app_of
        self._waiters: dict[int, asyncio.Future[None]] = {}
        #: Grants given, and those that had to wait for a slot (for metrics).
        self.grants = 0
        self.waited = 0

    async def _h_io_acquire(self, worker: str, resource: str, run: str) -> dict[str, Any]:
        """Wait until ``worker`` may write ``run``'s units to ``resource``; its ticket and lease."""
        if not self.enabled:
            # Ticket 0: write without asking for a while (a second: the
            # setting may change, and asking once a second costs nothing).
            return {"ticket": 0, "lease": 1.0}
        app, priority = self.app_of(run)
        ticket, now = self.sched.request(resource, app, priority, worker)
        self.grants += 1
        if not now:
            self.waited += 1
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters[ticket] = fut
            try:
                await fut
            except BaseException:
                # The worker's call went away (it left, or gave up): its ticket must not hold a slot.
                self._waiters.pop(ticket, None)
                self._wake(self.sched.release(ticket))
                raise
        return {"ticket": ticket, "lease": self.lease}

    async def _h_io_release(self, ticket: int) -> None:
        self._wake(self.sched.release(int(ticket)))

    def forget_worker(self, worker: str) -> None:
        """``worker`` left: what it held goes to others; its waiting calls end."""
        try:
            dropped, granted = self.sched.forget_worker(worker)
            for i in dropped:
                fut = self._waiters.pop(i, None)
                if fut is not None and not fut.done():
                    fut.cancel()
            self._wake(granted)
        except Exception:
            logger.exception("aimss: freeing the I/O slots of %s failed", worker)

    def _wake(self, tickets: list[int]) -> None:
        for i in tickets:
            fut = self._waiters.pop(i, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "limit": self.sched.limit,
            "grants": self.grants,
            "waited": self.waited,
            "resources": self.sched.snapshot(),
        }
