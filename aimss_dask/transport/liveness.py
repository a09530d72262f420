"""Cut data connections that wait on a worker the scheduler no longer lists.

A worker process that stops answering while its host's kernel still does
(stopped, hung in C code with the GIL held, paging itself to death) keeps its
connections open: its kernel acknowledges what arrives, answers keep-alive
probes, and a thread blocked sending to it, or waiting for its answer, waits
for ever. A host that vanished (power, network) answers nothing, and a send
to it waits for the kernel's retransmissions (minutes). Only a crash breaks
connections at once (the kernel closes a dead process's sockets). Neither
case may be cut on a timeout of its own: a live owner whose budget is full,
or that is stopped for a while, reads nothing either, and waiting on it is
right (see :func:`~aimss_dask.transport.secure.watch_peer`).

Dask decides: a vanished host's comms with the scheduler fail, and a worker
that missed heartbeats for ``distributed.scheduler.worker-ttl`` is killed by
its nanny (its connections then close as on a crash) or, without a nanny or
with one that does not answer either, removed. From then on nobody will
answer on its connections: a :class:`Liveness` asks the scheduler, every
``every`` seconds, about the peers of the connections it watches that have
waited that long, and shuts down the sockets of peers it no longer lists.
Their blocked calls then fail, and what they carried fails over as after a
crash. A peer the scheduler still lists is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Iterator
from typing import Any, Protocol, TypeVar

from aimss_dask.transport.rpc import Listed, still_listed, until_unlisted
from aimss_dask.transport.secure import Conn

logger = logging.getLogger("aimss_dask")

T = TypeVar("T")

#: Seconds a connection waits on its peer before the scheduler is asked
#: whether the peer is still there, and between asks (the default of
#: ``aimss.liveness-interval``). One ask per peer and process, and only while
#: something waits on it: cheap for the scheduler.
EVERY = 2.0

#: Seconds a request to a worker may take before :func:`call_listed` asks:
#: longer than any wait a handler is asked for (a read waits up to 5 s for
#: records), so that a healthy long poll never asks.
GRACE = 8.0


class Watched(Protocol):
    """A connection to ``address`` that may wait on it."""

    address: str

    def waiting_since(self) -> float | None:
        """``time.monotonic()`` since which it waits on its peer with nothing back; None while it waits on nothing."""

    def abort(self, reason: str) -> None:
        """Shut the connection down (from another thread): its blocked calls fail."""


class Liveness:
    """Watches data connections; cuts those whose peer the scheduler no longer lists.

    ``listed`` asks the scheduler (see :func:`aimss_dask.transport.rpc.listed_by`);
    it runs on ``loop``, which also runs the periodic check while anything is
    watched. ``aborted`` counts the connections cut.

    Examples
    --------
    >>> liveness = Liveness(loop, listed_by(rpc(scheduler_address)))  # doctest: +SKIP
    >>> with liveness.exchange(sock, "tcp://10.0.0.7:40111"):           # doctest: +SKIP
    ...     send_and_wait_for_the_answer(sock)
    """

    def __init__(self, loop: Any, listed: Listed | None, every: float = EVERY) -> None:
        self._loop = loop
        self._listed = listed
        #: Seconds between asks (``aimss.liveness-interval``); also what
        #: :func:`call_listed` is given by the holder of this watcher.
        self.every = every
        self._lock = threading.Lock()
        self._watched: set[Watched] = set()
        self._patrolling = False
        self.aborted = 0

    def watch(self, conn: Watched) -> None:
        """Check on ``conn`` until :meth:`unwatch` (from any thread)."""
        if self._listed is None:
            return  # nobody to ask
        with self._lock:
            self._watched.add(conn)
            if self._patrolling:
                return
            self._patrolling = True
        self._loop.add_callback(self._patrol)

    def unwatch(self, conn: Watched) -> None:
        with self._lock:
            self._watched.discard(conn)

    @contextlib.contextmanager
    def exchange(self, sock: Conn, address: str) -> Iterator[None]:
        """Watch a blocking exchange with ``address`` on ``sock`` (a send and its answer) while it lasts."""
        ex = _Exchange(sock, address)
        self.watch(ex)
        try:
            yield
        finally:
            self.unwatch(ex)

    async def _patrol(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.every)
                with self._lock:
                    if not self._watched:
                        self._patrolling = False
                        return
                    now = time.monotonic()
                    waiting = [c for c in self._watched if _waited(c, now) >= self.every]
                for address in sorted({c.address for c in waiting}):
                    if not await self._gone(address):
                        continue
                    cut = [c for c in waiting if c.address == address]
                    logger.warning(
                        "aimss: %s stopped answering and the scheduler no longer lists it: "
                        "dropping %d data connection(s) that waited on it", address, len(cut),
                    )
                    for c in cut:
                        self.unwatch(c)
                        self.aborted += 1
                        c.abort(f"worker {address} stopped answering and left the cluster")
        except Exception:  # a patrol must not die silently with connections still watched
            logger.exception("aimss: the data connections' liveness check failed")
            with self._lock:
                self._patrolling = False

    async def _gone(self, address: str) -> bool:
        assert self._listed is not None
        return not await still_listed(self._listed, address)


async def call_listed(
    call: Awaitable[T], address: str, listed: Listed, grace: float = GRACE, every: float = EVERY
) -> T:
    """Await ``call``, a request to worker ``address``; ``ConnectionError`` once the scheduler no longer lists it.

    The request-and-answer twin of :class:`Liveness`: Dask's rpc waits for
    an answer for ever, and a worker stopped or hung with its kernel alive
    never answers nor breaks the connection. A call still pending after
    ``grace`` seconds (longer than a handler's own waits, such as a read's
    wait for records) asks ``listed`` every ``every`` seconds; once the
    worker is gone, the call is cancelled and the caller fails over (a
    reader follows its partition to a copy, or names it lost). Without an
    answer from the scheduler, the call goes on waiting.

    Examples
    --------
    >>> reply = await call_listed(rpc(addr).aimss_read(**kw), addr, listed)  # doctest: +SKIP
    """
    return await until_unlisted(call, address, listed, grace, every, "stopped answering and left the cluster")


def _waited(conn: Watched, now: float) -> float:
    since = conn.waiting_since()
    return -1.0 if since is None else now - since


class _Exchange:
    """One blocking send-and-answer on a socket, waiting from its start."""

    def __init__(self, sock: Conn, address: str) -> None:
        self.sock = sock
        self.address = address
        self._since = time.monotonic()

    def waiting_since(self) -> float | None:
        return self._since

    def abort(self, reason: str) -> None:
        shut_down(self.sock)


def shut_down(sock: Conn) -> None:
    """Wake every thread blocked on ``sock`` (its calls fail); the owner of ``sock`` still closes it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
