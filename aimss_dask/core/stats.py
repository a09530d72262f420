"""Counters the metrics endpoints read: a latency histogram, cheap to update from any thread."""

from __future__ import annotations

import bisect
import threading

__all__ = ["LATENCY_BUCKETS", "Histogram"]

#: Upper bounds (seconds) of the push latency buckets: from a batch acked
#: within half a millisecond to one held up for ten seconds by back-pressure.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Histogram:
    """Observations counted per bucket, with their sum: what a Prometheus histogram exports.

    Examples
    --------
    >>> h = Histogram((0.1, 1.0))
    >>> for s in (0.05, 0.5, 0.7, 3.0):
    ...     h.observe(s)
    >>> h.snapshot()
    ([(0.1, 1), (1.0, 3), (inf, 4)], 4.25, 4)
    """

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        if list(bounds) != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram bounds {bounds!r} must be strictly increasing")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.bounds, seconds)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """``([(upper bound, cumulative count), ..., (inf, total)], sum, total)``."""
        with self._lock:
            counts, total_sum = list(self._counts), self._sum
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), counts):
            running += n
            out.append((bound, running))
        return out, total_sum, running
