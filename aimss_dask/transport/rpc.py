"""How AIMSS handlers answer: errors become values, never dead comms."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aimss_dask.core.errors import AIMSSError, error_to_wire

logger = logging.getLogger("aimss_dask")


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
