"""A worker's side of coordinated I/O: ask the coordinator before writing to a file system.

A sink's writer wraps each unit write in ``gate.writing(run, resource)``.
The first write of a run to a resource asks the coordinator
(:mod:`aimss_dask.coordinator.io`) and waits for a grant; the grant is then
kept for ``lease`` seconds of back-to-back writes, so a run that writes
many chunks asks about once per lease. When the writes pause for
``linger`` seconds, or the lease is over and its last write ends, the grant
goes back, and another application may have the node's turn.

The gate never fails a write: if the coordinator cannot be asked (it is
gone, or the call fails), the write goes ahead ungated and the failure is
logged once.

Examples
--------
>>> gate = IOGate(None)                     # no worker: every write goes ahead at once
>>> with gate.writing("run-1", "host|dev:2049"):
...     pass
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from distributed.utils import sync

logger = logging.getLogger("aimss_dask")

#: How long a held grant waits for the next write before it goes back.
LINGER = 0.02
#: Seconds of ungated writes after the coordinator could not be asked.
RETRY_AFTER = 10.0


@dataclass
class _Lease:
    ticket: int
    until: float
    users: int = 0
    last: float = 0.0
    done: bool = False  # given back


class IOGate:
    """Grants held by one worker, per (run, resource); see the module.

    ``worker`` is the Dask worker (None: ungated, as on a local scheduler).
    """

    def __init__(self, worker: Any, enabled: bool = True, linger: float = LINGER) -> None:
        self.worker = worker
        self.enabled = enabled and worker is not None
        self.linger = linger
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, str], _Lease] = {}
        self._warned = False
        # Until then, write without asking: the coordinator said it does not
        # schedule (aimss.io.enabled false there); asked again after that.
        self._ungated_until = 0.0
        #: Writes that went through the gate, and seconds spent waiting for grants.
        self.writes = 0
        self.waited = 0.0

    @contextmanager
    def writing(self, run: str, resource: str | None) -> Iterator[None]:
        """Hold a grant to write ``run``'s units to ``resource`` (None: not a file system) meanwhile."""
        lease = self._enter(run, resource) if self.enabled and resource else None
        try:
            yield
        finally:
            if lease is not None:
                self._exit((run, resource), lease)  # type: ignore[arg-type]

    def _enter(self, run: str, resource: str) -> _Lease | None:
        key = (run, resource)
        now = time.monotonic()
        with self._lock:
            self.writes += 1
            if now < self._ungated_until:
                return None
            lease = self._leases.get(key)
            if lease is not None and not lease.done and now < lease.until:
                lease.users += 1
                return lease
        # An idle grant here on the same resource (of another run, or this
        # one's, over) goes back first: this writer would otherwise count
        # twice against the node's limit, and wait behind its own idle grant.
        with self._lock:
            idle = [
                (k, lease) for k, lease in self._leases.items()
                if k[1] == resource and not lease.users and not lease.done
            ]
            for k, lease in idle:
                self._retire_locked(k, lease)
        for _, lease in idle:
            self._send_release(lease.ticket)
        t0 = time.monotonic()
        try:
            reply = sync(
                self.worker.loop, self.worker.scheduler.aimss_io_acquire,
                worker=self.worker.address, resource=resource, run=run,
            )
        except Exception as e:  # never fail a write for want of a grant
            if not self._warned:
                self._warned = True
                logger.warning("aimss: could not ask the coordinator before writing (%r); writing ungated", e)
            with self._lock:  # nor ask again before every write
                self._ungated_until = time.monotonic() + RETRY_AFTER
            return None
        now = time.monotonic()
        if not reply["ticket"]:
            with self._lock:
                self._ungated_until = now + float(reply["lease"])
            return None
        lease = _Lease(int(reply["ticket"]), now + float(reply["lease"]), users=1, last=now)
        with self._lock:
            self.waited += now - t0
            # One still in use (over) goes back when its last user ends (_exit).
            self._leases[key] = lease
        return lease

    def _exit(self, key: tuple[str, str], lease: _Lease) -> None:
        now = time.monotonic()
        with self._lock:
            lease.users -= 1
            lease.last = now
            if lease.users:
                return
            over = now >= lease.until or self._leases.get(key) is not lease
            if over:
                self._retire_locked(key, lease)
        if over:
            self._send_release(lease.ticket)
        else:
            self._on_loop(self._linger, key, lease)

    async def _linger(self, key: tuple[str, str], lease: _Lease) -> None:
        await asyncio.sleep(self.linger)
        with self._lock:
            if lease.done or lease.users or time.monotonic() - lease.last < self.linger * 0.9:
                return  # in use again (its last user's own linger gives it back)
            self._retire_locked(key, lease)
        await self._release(lease.ticket)

    def _retire_locked(self, key: tuple[str, str], lease: _Lease) -> None:
        """Mark ``lease`` given back; drop it if it is still ``key``'s. The caller holds the
        lock, and sends the release."""
        lease.done = True
        if self._leases.get(key) is lease:
            del self._leases[key]

    def _send_release(self, ticket: int) -> None:
        self._on_loop(self._release, ticket)

    def _on_loop(self, func: Any, *args: Any) -> None:
        """Run ``func(*args)`` on the worker's loop; nothing if the loop is gone (the worker closed)."""
        try:
            self.worker.loop.add_callback(func, *args)
        except RuntimeError as e:  # the write itself succeeded: never fail it here
            logger.debug("aimss: could not give an I/O grant back (%r)", e)

    async def _release(self, ticket: int) -> None:
        try:
            await self.worker.scheduler.aimss_io_release(ticket=ticket)
        except Exception as e:
            logger.debug("aimss: giving back I/O grant %d failed: %r", ticket, e)

    def close(self) -> None:
        """Give back every grant held (the worker is closing)."""
        with self._lock:
            leases = [lease for lease in self._leases.values() if not lease.done]
            for lease in leases:
                lease.done = True
            self._leases.clear()
        for lease in leases:
            self._send_release(lease.ticket)

    def statistics(self) -> dict[str, float]:
        with self._lock:
            return {"io_writes": self.writes, "io_wait_seconds": round(self.waited, 3)}
