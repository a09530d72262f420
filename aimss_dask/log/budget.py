"""A byte budget that threads wait on: the back-pressure object."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass


class BudgetExhausted(Exception):
    """Raised by :meth:`ByteBudget.acquire_nowait` when the bytes are not free."""


@dataclass(frozen=True)
class BudgetStatistics:
    limit: int
    used: int
    peak: int
    waits: int
    waited_seconds: float


class ByteBudget:
    """At most ``limit`` bytes held at once; ``acquire`` blocks until they fit.

    A single request larger than the whole budget is let through when nothing
    else is held, so an oversized record slows its writer instead of
    deadlocking it. Waiters are served in the order they came: a large
    request is not starved by a stream of small ones that keep fitting
    into what each release frees.

    Examples
    --------
    >>> b = ByteBudget(100)
    >>> b.acquire(60); b.statistics().used
    60
    >>> b.release(60)
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"budget limit must be positive, got {limit!r}")
        self.limit = limit
        self._used = 0
        self._peak = 0
        self._waits = 0
        self._waited = 0.0
        self._cond = threading.Condition()
        #: Tickets of the waiting requests, first come first.
        self._queue: deque[object] = deque()

    def _fits(self, n: int) -> bool:
        return self._used == 0 or self._used + n <= self.limit

    def acquire(self, n: int, timeout: float | None = None) -> bool:
        """Take ``n`` bytes, waiting for them (after those who waited first); False if ``timeout`` ran out."""
        with self._cond:
            if self._queue or not self._fits(n):
                self._waits += 1
                ticket = object()
                self._queue.append(ticket)
                t0 = time.perf_counter()
                try:
                    ok = self._cond.wait_for(lambda: self._queue[0] is ticket and self._fits(n), timeout)
                finally:
                    self._queue.remove(ticket)
                    self._cond.notify_all()  # the next in line may fit now
                self._waited += time.perf_counter() - t0
                if not ok:
                    return False
            self._used += n
            self._peak = max(self._peak, self._used)
            return True

    def acquire_nowait(self, n: int) -> None:
        with self._cond:
            if self._queue or not self._fits(n):
                raise BudgetExhausted(
                    f"{n} bytes do not fit: {self._used} of {self.limit} in use"
                    + (f", {len(self._queue)} request(s) waiting before it" if self._queue else "")
                )
            self._used += n
            self._peak = max(self._peak, self._used)

    def release(self, n: int) -> None:
        with self._cond:
            self._used = max(0, self._used - n)
            self._cond.notify_all()

    def statistics(self) -> BudgetStatistics:
        with self._cond:
            return BudgetStatistics(
                self.limit, self._used, self._peak, self._waits, self._waited
            )
