"""How AIMSS handlers answer: errors become values, never dead comms."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aimss_dask.core.errors import AIMSSError, error_to_wire, raise_from_wire

logger = logging.getLogger("aimss_dask")

T = TypeVar("T")

#: A connect to a worker pending this long (s) makes the caller ask whether the worker is still listed.
#: Dask retries a refused connect in silence: a reader waiting on an owner
#: that died waits this long at least before it follows its partition.
CONNECT_GRACE = 0.2
#: How often (s) it asks again while the connect is pending.
CONNECT_POLL = 0.5

#: How long (s) an answer to "is this worker listed?" serves every caller of
#: the process that asks the same scheduler: many readers and writers waiting
#: on one stopped worker then make one ask per interval, not one each. No
#: longer than the quickest poll (:data:`CONNECT_POLL`), so no failover waits
#: on an old answer more than it would wait on its own next ask.
LISTED_FRESH = CONNECT_POLL

#: ``(worker address) -> whether the scheduler still lists that worker``.
Listed = Callable[[str], Awaitable[bool]]


def replies(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap an ``aimss_*`` handler: ``{"status": "OK", ...}`` or an error reply.

    Our own errors (a bad argument, an unknown stream) are answers; anything
    else is a bug and is logged here too, since the caller may be far away.
    """

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return {"status": "OK", **(await method(*args, **kwargs) or {})}
        except Exception as e:
            if not isinstance(e, AIMSSError):
                logger.exception("aimss handler %s failed", method.__name__)
            return error_to_wire(e)

    return wrapper


def listed_by(scheduler: Any) -> Listed:
    """:data:`Listed` through ``scheduler`` (an rpc to it): the coordinator's ``aimss_listed``.

    One per ``scheduler`` object, shared by its callers: concurrent asks
    about one address make a single request, and its answer serves for
    :data:`LISTED_FRESH` seconds.
    """
    try:
        return _answers[scheduler]
    except KeyError:
        return _answers.setdefault(scheduler, _Answers(scheduler, LISTED_FRESH))
    except TypeError:  # not weakly referable: answers for this caller alone
        return _Answers(scheduler, LISTED_FRESH)


class _Answers:
    """Whether workers are listed, asked of one scheduler and shared by everyone who asks it."""

    #: Past this many addresses known, answers too old to serve are dropped.
    KEEP = 1024

    def __init__(self, scheduler: Any, fresh: float) -> None:
        # By weak reference: the entry of ``_answers`` must not keep its own key alive.
        self._scheduler = weakref.ref(scheduler)
        self._fresh = fresh
        self._known: dict[str, tuple[float, bool]] = {}
        # Futures belong to one event loop: a process may run several (a client's and a worker's).
        self._asking: dict[tuple[int, str], asyncio.Future[bool]] = {}

    async def __call__(self, address: str) -> bool:
        hit = self._known.get(address)
        if hit is not None and time.monotonic() - hit[0] < self._fresh:
            return hit[1]
        loop = asyncio.get_running_loop()
        key = (id(loop), address)
        pending = self._asking.get(key)
        if pending is None or pending.get_loop() is not loop:  # none, or one of a closed loop with the same id
            pending = self._asking[key] = asyncio.ensure_future(self._ask(address))
            pending.add_done_callback(functools.partial(self._done, key))
        # Shielded: a caller that gives up does not cancel the others' answer.
        return await asyncio.shield(pending)

    async def _ask(self, address: str) -> bool:
        scheduler = self._scheduler()
        if scheduler is None:
            raise ConnectionError("the rpc to the scheduler was closed")
        reply = await scheduler.aimss_listed(address=address)
        listed = bool(raise_from_wire(reply, "aimss_listed")["listed"])
        now = time.monotonic()
        if len(self._known) >= self.KEEP:
            self._known = {a: k for a, k in self._known.items() if now - k[0] < self._fresh}
        self._known[address] = (now, listed)
        return listed

    def _done(self, key: tuple[int, str], future: asyncio.Future[bool]) -> None:
        if self._asking.get(key) is future:
            del self._asking[key]
        if not future.cancelled():
            future.exception()  # retrieved: every caller may have given up


_answers: weakref.WeakKeyDictionary[Any, _Answers] = weakref.WeakKeyDictionary()


async def still_listed(listed: Listed, address: str) -> bool:
    """Whether the scheduler lists ``address``; True when it does not answer (no news is not a loss)."""
    try:
        return await listed(address)
    except Exception as e:
        logger.debug("aimss: could not ask whether %s is listed: %s", address, e)
        return True


async def until_unlisted(call: Awaitable[T], address: str, listed: Listed, grace: float, every: float, gone: str) -> T:
    """Await ``call``, on worker ``address``; ``ConnectionError("worker <address> <gone>")`` once it is not listed.

    Still pending after ``grace`` seconds, the call asks ``listed`` whether
    the worker is there, every ``every`` seconds after that; once it is
    not, the call is cancelled. Without an answer, the call goes on.
    """
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=grace)
        while not done:
            if not await still_listed(listed, address):
                raise ConnectionError(f"worker {address} {gone}")
            done, _ = await asyncio.wait({task}, timeout=every)
        return task.result()
    finally:
        if not task.done():
            task.cancel()  # Dask closes the call's connection; nobody waits for that


async def connect_listed(rpc: Any, addr: str, listed: Listed) -> None:
    """An open connection to ``addr`` in ``rpc``'s pool; ``OSError`` once the scheduler no longer lists it.

    Dask retries a refused connect for its whole connect timeout (30 s by
    default): a call to a worker that died takes that long to fail, and a
    reader, loader or writer that would follow its partition to a copy
    waits as long. A connect still pending after :data:`CONNECT_GRACE`
    asks ``listed`` whether the worker is still there, every
    :data:`CONNECT_POLL` after that; with no answer, Dask's own timeout
    decides.
    """
    comm = await until_unlisted(
        rpc.connect(addr), addr, listed, CONNECT_GRACE, CONNECT_POLL, "left the cluster (no connection to it)"
    )
    rpc.reuse(addr, comm)
