"""Power timelines in numbers: swing, ramp, energy and utilisation (pure NumPy).

The same functions summarise a measured NVML timeline
(:func:`aimss_dask.power_report`) and a simulated one
(:func:`aimss_dask.power.simulate`), so the two report comparable figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from aimss_dask.core.errors import InvalidArgumentError


@dataclass(frozen=True)
class PowerSummary:
    """What a power timeline amounts to.

    ``swing_w``: the largest peak-to-trough difference within one window of
    ``window_s`` (consecutive windows from the first sample), and
    ``median_swing_w`` the typical window's (a first phase nobody announced
    sets the largest; the median is the steady state); ``max_ramp_w_per_s``:
    the largest change between two grid points ``grid_s`` apart, per second;
    ``energy_j``: the integral of power; ``utilisation``: the time-weighted mean
    of the utilisation samples (0-1), ``None`` without them.

    Examples
    --------
    >>> import numpy as np
    >>> s = summarize(np.array([0.0, 1.0, 2.0]), np.array([100.0, 300.0, 300.0]), window_s=2.0)
    >>> s.swing_w, s.energy_j
    (200.0, 400.0)
    """

    duration_s: float
    energy_j: float
    mean_w: float
    peak_w: float
    trough_w: float
    swing_w: float
    median_swing_w: float
    max_ramp_w_per_s: float
    utilisation: float | None
    window_s: float
    grid_s: float

    def as_dict(self) -> dict[str, Any]:
        """The figures as a plain dict (for JSON, events and tables)."""
        return asdict(self)


def _check(t: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(t, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if t.ndim != 1 or t.shape != w.shape:
        raise InvalidArgumentError(
            f"a power timeline needs one time per sample: got times of shape {t.shape} "
            f"and watts of shape {w.shape}"
        )
    if t.size and np.any(np.diff(t) < 0):
        raise InvalidArgumentError("a power timeline's times must not go backwards; sort the samples by time first")
    return t, w


def resample(t: np.ndarray, w: np.ndarray, grid_s: float) -> tuple[np.ndarray, np.ndarray]:
    """``w`` held from each sample to the next (a meter's reading), on a grid ``grid_s`` apart.

    Examples
    --------
    >>> resample(np.array([0.0, 1.0]), np.array([5.0, 7.0]), 0.5)[1].tolist()
    [5.0, 5.0, 7.0]
    """
    t, w = _check(t, w)
    if grid_s <= 0:
        raise InvalidArgumentError(f"grid_s={grid_s!r} must be positive")
    if t.size == 0:
        return t, w
    n = int(np.floor((t[-1] - t[0]) / grid_s + 1e-9)) + 1
    grid = t[0] + grid_s * np.arange(n)
    return grid, held(t, w, grid)


def window_swings(t: np.ndarray, w: np.ndarray, window_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Each window's start and its peak-to-trough swing (consecutive windows of ``window_s``).

    A window holds its own samples and the reading in force as it starts
    (the last sample before it): a meter's reading holds until the next, so
    a swing across a window's edge is that window's too.
    """
    t, w = _check(t, w)
    if window_s <= 0:
        raise InvalidArgumentError(f"window_s={window_s!r} must be positive")
    if t.size == 0:
        return t, w
    which = np.floor((t - t[0]) / window_s + 1e-9).astype(np.int64)
    starts = t[0] + window_s * np.unique(which)
    first = np.r_[0, np.flatnonzero(np.diff(which)) + 1]
    peaks = np.maximum.reduceat(w, first)
    troughs = np.minimum.reduceat(w, first)
    held = w[np.maximum(first - 1, 0)]
    return starts, np.maximum(peaks, held) - np.minimum(troughs, held)


def summarize(
    t: np.ndarray,
    watts: np.ndarray,
    util: np.ndarray | None = None,
    *,
    window_s: float = 1.0,
    grid_s: float | None = None,
) -> PowerSummary:
    """The :class:`PowerSummary` of one timeline (times in seconds, power in W, utilisation 0-1).

    ``grid_s``: the spacing on which ramps are measured; default the median
    gap between samples (a ramp is only as fine as the meter).
    """
    t, w = _check(t, watts)
    if t.size < 2:
        raise InvalidArgumentError(
            f"a power summary needs at least two samples, got {t.size}; sample for longer or more often"
        )
    gaps = np.diff(t)
    if grid_s is None:
        grid_s = float(np.median(gaps[gaps > 0])) if np.any(gaps > 0) else 1.0
    duration = float(t[-1] - t[0])
    # A sample holds until the next one, as a meter reading does.
    energy = float(np.sum(w[:-1] * gaps))
    g, gw = resample(t, w, grid_s)
    ramp = float(np.max(np.abs(np.diff(gw))) / grid_s) if gw.size > 1 else 0.0
    _, swings = window_swings(t, w, window_s)
    # The last window is cut short by the end of the samples: it counts for
    # the largest swing, not for the typical one.
    typical = swings[:-1] if swings.size > 1 else swings
    u = None
    if util is not None:
        ut = np.asarray(util, dtype=np.float64)
        if ut.shape != t.shape:
            raise InvalidArgumentError(f"utilisation has shape {ut.shape}; it needs one value per sample {t.shape}")
        u = float(np.sum(ut[:-1] * gaps) / duration) if duration > 0 else float(ut[0])
    return PowerSummary(
        duration_s=duration,
        energy_j=energy,
        mean_w=energy / duration if duration > 0 else float(w[0]),
        peak_w=float(w.max()),
        trough_w=float(w.min()),
        swing_w=float(swings.max()),
        median_swing_w=float(np.median(typical)),
        max_ramp_w_per_s=ramp,
        utilisation=u,
        window_s=float(window_s),
        grid_s=float(grid_s),
    )


def held(t: np.ndarray, v: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``v`` as read at each time of ``grid``: each sample held until the next (the first before it starts)."""
    t, v = _check(t, v)
    idx = np.searchsorted(t, np.asarray(grid, dtype=np.float64) + 1e-12, side="right") - 1
    return v[np.clip(idx, 0, t.size - 1)]


def aggregate(timelines: Mapping[Any, tuple[np.ndarray, np.ndarray]], grid_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The sum of several devices' power on one grid, over the span every device covers.

    Each device's reading holds until its next sample; a device with no
    sample yet, or none any more, is left out of that span rather than
    counted as 0 W (which would show a swing that never happened).
    """
    spans = [(_check(t, w)) for t, w in timelines.values() if len(t)]
    if not spans:
        return np.empty(0), np.empty(0)
    start = max(t[0] for t, _ in spans)
    end = min(t[-1] for t, _ in spans)
    if end < start:
        return np.empty(0), np.empty(0)
    n = int(np.floor((end - start) / grid_s + 1e-9)) + 1
    grid = start + grid_s * np.arange(n)
    total = np.zeros(n)
    for t, w in spans:
        total += held(t, w, grid)
    return grid, total
