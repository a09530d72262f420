"""Sync phases: what one is, and how long each kind usually lasts (pure).

A sync phase is a stretch where a worker's accelerator would sit idle while
the job synchronises: a checkpoint, a collective, a shuffle's seal. The
application names them (:func:`aimss_dask.sync_phase`), AIMSS opens its
own around its barriers, and the coordinator learns each name's typical
length from the phases that ended, so that an idle-filling slice can be
sized to the time left (PipeFill's rule: fill a bubble, never overrun it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from aimss_dask.core.errors import InvalidArgumentError


@dataclass(frozen=True)
class Phase:
    """One open sync phase on one worker.

    ``start`` is the coordinator's clock; ``expected_s`` the length the
    application announced, or ``None`` (the coordinator's history decides).
    """

    name: str
    worker: str
    start: float
    expected_s: float | None = None
    token: str = ""


def check_expected(expected_s: float | None) -> float | None:
    """``expected_s`` as given to :func:`~aimss_dask.sync_phase`, checked."""
    if expected_s is None:
        return None
    try:
        v = float(expected_s)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"expected_s={expected_s!r} is not a number of seconds") from e
    if not v > 0 or v != v or v == float("inf"):
        raise InvalidArgumentError(f"expected_s={expected_s!r} must be a positive, finite number of seconds (or None)")
    return v


class PhaseHistory:
    """The recent lengths of each named phase, and the length to expect next.

    The expectation is a low quantile of the last ``keep`` lengths (the 25th
    percentile by default), not their mean: a filler sized to a phase that
    ends early delays the job, one sized to a phase that ends late only
    leaves some idle time unfilled.

    Examples
    --------
    >>> h = PhaseHistory()
    >>> for s in (1.0, 1.2, 0.9, 1.1):
    ...     h.record("checkpoint", s)
    >>> round(h.expected("checkpoint"), 3)
    0.975
    >>> round(h.expected("checkpoint", elapsed=1.15), 3)  # open for 1.15 s: longer than any before
    1.2
    >>> h.expected("all-reduce") is None
    True
    """

    def __init__(self, keep: int = 32, quantile: float = 0.25, max_names: int = 1024, overdue_s: float = 0.05) -> None:
        if keep < 1:
            raise InvalidArgumentError(f"keep={keep!r} must be at least 1")
        if not 0.0 <= quantile <= 1.0:
            raise InvalidArgumentError(f"quantile={quantile!r} must be within [0, 1]")
        if not overdue_s > 0:
            raise InvalidArgumentError(f"overdue_s={overdue_s!r} must be positive")
        self.keep, self.quantile, self.max_names, self.overdue_s = keep, quantile, max_names, overdue_s
        self._lengths: dict[str, deque[float]] = {}

    def record(self, name: str, seconds: float) -> None:
        """A phase ``name`` lasted ``seconds``."""
        if not seconds >= 0:
            return  # a clock that went backwards tells nothing
        d = self._lengths.get(name)
        if d is None:
            if len(self._lengths) >= self.max_names:
                # Names are the application's; a run-away set of names must
                # not grow the coordinator without bound. Forget the oldest.
                self._lengths.pop(next(iter(self._lengths)))
            d = self._lengths[name] = deque(maxlen=self.keep)
        d.append(float(seconds))

    def expected(self, name: str, elapsed: float = 0.0) -> float | None:
        """The length to expect of a phase ``name`` that has lasted ``elapsed`` so far.

        From the recent lengths longer than ``elapsed`` (a phase still open
        is one of those), and never less than ``elapsed + overdue_s``: a
        phase still open is expected to go on a little (when it has outlasted
        every recent one, or nearly, that little is re-asked as it goes on),
        so that a slice sized to it risks at most ``overdue_s`` past its end,
        and slices do not shrink to nothing. ``None`` before any phase
        ``name`` ended.
        """
        got = self.expected_many(name, np.array([elapsed], dtype=np.float64))
        return None if got is None else float(got[0])

    def expected_many(self, name: str, elapsed: np.ndarray) -> np.ndarray | None:
        """:meth:`expected` for many open phases of ``name`` at once (one per ``elapsed``)."""
        d = self._lengths.get(name)
        if not d:
            return None
        xs = np.sort(np.fromiter(d, dtype=np.float64))
        elapsed = np.asarray(elapsed, dtype=np.float64)
        # The lengths longer than each elapsed time are a suffix xs[k:];
        # their quantile, interpolated as np.quantile's default does.
        k = np.searchsorted(xs, elapsed, side="right")
        m = xs.size - k
        pos = k + np.maximum(m - 1, 0) * self.quantile
        lo = np.clip(np.floor(pos).astype(np.int64), 0, xs.size - 1)
        hi = np.clip(lo + 1, 0, xs.size - 1)
        frac = pos - np.floor(pos)
        q = xs[lo] + (xs[hi] - xs[lo]) * frac
        return np.maximum(np.where(m > 0, q, elapsed), elapsed + self.overdue_s)

    def end_of(self, phase: Phase, now: float) -> float | None:
        """When ``phase``, open at ``now``, is expected to end; ``None``: nothing known yet.

        The announced length while the phase is within it; past it, or
        without one, what :meth:`expected` says for the time it has lasted.
        """
        elapsed = now - phase.start
        if phase.expected_s is not None and elapsed < phase.expected_s:
            return phase.start + phase.expected_s
        got = self.expected(phase.name, elapsed)
        if got is None:
            return None if phase.expected_s is None else now + self.overdue_s
        return phase.start + got

    def lengths(self, name: str) -> list[float]:
        """The recent lengths of ``name``, oldest first."""
        return list(self._lengths.get(name, ()))

    def names(self) -> list[str]:
        return list(self._lengths)
