"""When a worker whose log has emptied gives its free buffers back to the OS.

A run's receive and scratch buffers are free once its streams are dropped.
Kept, the next run reuses memory already touched; given back, it faults all
of it in afresh, which costs as much as a good part of a shuffle where fresh
pages are slow to come (virtual machines that return freed memory to their
host). So a worker keeps them for ``aimss.keep-idle-buffers`` after its log
empties, and gives them back sooner once its memory is wanted: past Dask's
target for the worker, or with the node nearly out of memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

logger = logging.getLogger(__name__)

#: How often a worker holding idle buffers looks at its memory (s).
IDLE_CHECK = 1.0

#: Share of the node's memory that must stay available while buffers are idle.
NODE_RESERVE = 0.1


class Memory(NamedTuple):
    """One reading of a worker's memory; every size in bytes."""

    #: The worker process's memory (Dask's reading: RSS).
    process: int
    #: Where Dask starts acting on it (its memory limit times the target
    #: fraction); None: no limit.
    target: int | None
    #: The node's available and total memory.
    available: int
    total: int


def wanted(m: Memory) -> bool:
    """Whether idle buffers should go back now, whatever the time kept.

    >>> wanted(Memory(process=5 * 2**30, target=4 * 2**30, available=2**34, total=2**35))
    True
    >>> wanted(Memory(process=2**30, target=4 * 2**30, available=2**34, total=2**35))
    False
    >>> wanted(Memory(process=2**30, target=None, available=2**30, total=2**35))
    True
    """
    if m.target is not None and m.process > m.target:
        # Dask would spill or pause for memory that is only our idle buffers.
        return True
    return m.available < NODE_RESERVE * m.total


class IdleRelease:
    """Gives a worker's idle buffers back ``keep`` seconds after its log empties, or once memory is wanted.

    ``empty``: whether the log is empty (a new run stops the watch: it
    reuses the buffers); ``pools``: the bytes of buffers held, free or not
    (the watch goes on while there are any: one a task result refers to is
    free later), and of those free, in one reading; ``release``: gives the
    free ones back; ``memory``: a :class:`Memory` reading.
    Every callable runs on the event loop, and is cheap.

    >>> import asyncio
    >>> async def demo() -> list[str]:
    ...     done: list[str] = []
    ...     watch = IdleRelease(0.0, lambda: True, lambda: (1, 1),
    ...                         lambda: done.append("released"), lambda: Memory(0, None, 1, 1))
    ...     watch.emptied()
    ...     await asyncio.sleep(0.01)
    ...     watch.close()
    ...     return done
    >>> asyncio.run(demo())
    ['released']
    """

    def __init__(
        self,
        keep: float,
        empty: Callable[[], bool],
        pools: Callable[[], tuple[int, int]],
        release: Callable[[], object],
        memory: Callable[[], Memory],
        check: float = IDLE_CHECK,
    ) -> None:
        self.keep = keep
        self._empty = empty
        self._pools = pools
        self._release = release
        self._memory = memory
        self._check_every = check
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: Why the last release happened ("kept", "memory"), for whoever looks (tests do).
        self.last_reason: str | None = None

    def emptied(self) -> None:
        """The log has just emptied: keep its buffers ``keep`` seconds from now (call on the loop)."""
        self._since = time.monotonic()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                min(self.keep, self._check_every), self._check
            )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wanted(self) -> bool:
        try:
            return wanted(self._memory())
        except Exception:  # no reading (a process that is going): the keep decides
            logger.debug("aimss: reading memory failed", exc_info=True)
            return False

    def _check(self) -> None:
        self._timer = None
        try:
            if not self._empty():
                return  # a run reuses them
            held, free = self._pools()
            if not held:
                return  # nothing left to give back
            if free:
                # Buffers a reader or a task result still refers to go on
                # being watched: they become free later.
                if time.monotonic() - self._since >= self.keep:
                    self.last_reason = "kept"
                    self._release()
                elif self._wanted():
                    self.last_reason = "memory"
                    self._release()
            left = self.keep - (time.monotonic() - self._since)
            self._timer = asyncio.get_running_loop().call_later(
                min(self._check_every, left) if left > 0 else self._check_every, self._check
            )
        except Exception:  # a timer callback: never raise into the loop
            logger.debug("aimss: releasing idle buffers failed", exc_info=True)
