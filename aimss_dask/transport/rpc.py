"""How AIMSS handlers answer: errors become values, never dead comms."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aimss_dask.core.errors import AIMSSError, error_to_wire, raise_from_wire

logger = logging.getLogger("aimss_dask")

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
    task = asyncio.ensure_future(rpc.connect(addr))
    try:
        done, _ = await asyncio.wait({task}, timeout=CONNECT_GRACE)
        while not done:
            try:
                still = await listed(addr)
            except Exception:
                still = True
            if not still:
                raise OSError(f"worker {addr} left the cluster (no connection to it)")
            done, _ = await asyncio.wait({task}, timeout=CONNECT_POLL)
        rpc.reuse(addr, task.result())
    finally:
        if not task.done():
            task.cancel()
