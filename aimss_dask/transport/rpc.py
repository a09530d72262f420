"""How AIMSS handlers answer: errors become values, never dead comms."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aimss_dask.core.errors import AIMSSError, error_to_wire, raise_from_wire

logger = logging.getLogger("aimss_dask")

T = TypeVar("T")

#: A connect to a worker pending this long (s) makes the caller ask whether the worker is still listed.
CONNECT_GRACE = 1.0
#: How often (s) it asks again while the connect is pending.
CONNECT_POLL = 0.5

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
    """:data:`Listed` through ``scheduler`` (an rpc to it): the coordinator's ``aimss_listed``."""

    async def listed(address: str) -> bool:
        reply = await scheduler.aimss_listed(address=address)
        return bool(raise_from_wire(reply, "aimss_listed")["listed"])

    return listed


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
