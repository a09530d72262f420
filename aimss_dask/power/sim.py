"""Idle filling at a scale no test cluster has: a power model driven by the real policy.

:func:`simulate` models ``n_gpus`` GPUs running a synchronous training-like
job: steps of ``step_s`` with jitter, and every ``sync_every`` steps a sync
phase (a checkpoint, an all-reduce) that starts when the slowest GPU
arrives and lasts ``sync_s``. Every GPU waits idle for it, and at scale those
waits line up into a swing of megawatts (Llama 3 reports tens of MW).

With filling on, the coordinator asks, as each GPU's phase opens or its
slice ends (one ``message_s`` later), or at its next utilisation sample
(every ``dispatch_s``) for a dip no phase announced,
:func:`aimss_dask.power.policy.plan` -- the very function the real
coordinator calls -- which idle GPUs get a filler slice and for how long,
from what a coordinator could know at that tick: the phase's expected end
(announced, or learned from the phases before by
:class:`~aimss_dask.power.phases.PhaseHistory`; a first phase nobody
announced gets dip-sized slices), how long each GPU has been idle, its
free memory. A slice that outlives its phase slows the job's next
steps on that GPU by ``overlap_cost`` of the overlap (it runs on a
low-priority stream: the job goes first, but not for free), and the next
sync waits for the slowest GPU, so the slowdown reported is the job's.

Both runs -- without and with filling -- use the same random draws, and
report the same :class:`~aimss_dask.power.metrics.PowerSummary` that
:func:`aimss_dask.power_report` gives for measured timelines.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.power.metrics import PowerSummary, summarize
from aimss_dask.power.phases import PhaseHistory
from aimss_dask.power.policy import FillerView, FillPolicy, WorkerView, plan


@dataclass(frozen=True)
class GpuModel:
    """One GPU's power: ``idle_w`` waiting, ``busy_w`` in the job's steps,
    ``fill_w`` running a filler slice; each change takes ``ramp_s`` (linear)."""

    idle_w: float = 100.0
    busy_w: float = 700.0
    fill_w: float = 600.0
    ramp_s: float = 0.05
    memory: int = 80 << 30


@dataclass(frozen=True)
class Workload:
    """The job and its fillers.

    ``hint``: the application announces each phase's length (``expected_s``);
    otherwise the coordinator learns it from the phases that ended, and the
    first phase gets dip-sized slices, whose last may outlive it. ``dispatch_s``: the coordinator's
    tick, at which it samples utilisation; ``message_s``: one message between
    a worker and the coordinator (a phase's opening, a slice's end). ``overlap_cost``: the share of a slice's
    overlap with the job's work that the job loses. ``filler_gpu_s``: the
    filler work queued, in GPU-seconds (``inf``: more than can ever run).
    """

    step_s: float = 0.1
    jitter: float = 0.05
    sync_every: int = 10
    sync_s: float = 1.5
    sync_jitter: float = 0.1
    rounds: int = 10
    hint: bool = False
    dispatch_s: float = 0.05
    message_s: float = 0.002
    overlap_cost: float = 0.25
    filler_mem: int = 4 << 30
    filler_max_s: float = 2.0
    filler_gpu_s: float = math.inf


@dataclass(frozen=True)
class SimRun:
    """One simulated run: the aggregate power on a grid and what it amounts to."""

    summary: PowerSummary
    job_s: float
    filled_gpu_s: float
    t: np.ndarray = field(repr=False)
    watts: np.ndarray = field(repr=False)
    utilisation: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class SimReport:
    """:func:`simulate`'s answer: the same job without and with filling.

    Examples
    --------
    >>> r = simulate(n_gpus=64, workload=Workload(rounds=4))
    >>> r.swing_reduction > 0.5 and r.slowdown < 0.02
    True
    """

    n_gpus: int
    without: SimRun
    with_fill: SimRun
    gpu: GpuModel
    workload: Workload
    policy: FillPolicy

    @property
    def slowdown(self) -> float:
        """The job's time with filling over its time without, less 1."""
        return self.with_fill.job_s / self.without.job_s - 1.0

    @property
    def swing_reduction(self) -> float:
        """How much of the typical (median) window's swing filling took away (0-1)."""
        a, b = self.without.summary.median_swing_w, self.with_fill.summary.median_swing_w
        return 1.0 - b / a if a > 0 else 0.0

    @property
    def peak_swing_reduction(self) -> float:
        """How much of the largest window's swing filling took away (0-1)."""
        a, b = self.without.summary.swing_w, self.with_fill.summary.swing_w
        return 1.0 - b / a if a > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The figures, for tables and JSON (MW and MW/s at the cluster's scale)."""
        out: dict[str, Any] = {"n_gpus": self.n_gpus, "slowdown": self.slowdown,
                               "swing_reduction": self.swing_reduction,
                               "peak_swing_reduction": self.peak_swing_reduction}
        for name, run in (("without", self.without), ("with", self.with_fill)):
            s = run.summary
            out[name] = {
                "swing_mw": s.swing_w / 1e6, "median_swing_mw": s.median_swing_w / 1e6, "max_ramp_mw_per_s": s.max_ramp_w_per_s / 1e6,
                "energy_mwh": s.energy_j / 3.6e9, "utilisation": s.utilisation, "job_s": run.job_s,
                "filled_gpu_s": run.filled_gpu_s,
            }
        out["gpu"], out["workload"] = asdict(self.gpu), asdict(self.workload)
        out["workload"]["filler_gpu_s"] = str(self.workload.filler_gpu_s)
        return out

    def frame(self) -> Any:
        """The two aggregate timelines as a pandas DataFrame (one row per grid point)."""
        import pandas as pd

        n = min(self.without.t.size, self.with_fill.t.size)
        return pd.DataFrame({
            "t": self.without.t[:n],
            "watts_without": self.without.watts[:n],
            "watts_with": self.with_fill.watts[:n],
            "utilisation_without": self.without.utilisation[:n],
            "utilisation_with": self.with_fill.utilisation[:n],
        })


class _Trace:
    """Power and busy-count changes, summed on a grid at the end (a difference array)."""

    def __init__(self) -> None:
        self.at: list[np.ndarray] = []
        self.dw: list[np.ndarray] = []
        self.du: list[np.ndarray] = []

    def add(self, start: np.ndarray, end: np.ndarray, watts: float) -> None:
        keep = end > start
        if not np.any(keep):
            return
        s, e = start[keep], end[keep]
        self.at += [s, e]
        self.dw += [np.full(s.size, watts), np.full(e.size, -watts)]
        self.du += [np.ones(s.size), -np.ones(e.size)]

    def grid(self, end: float, grid_s: float, base_w: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = max(1, int(math.ceil(end / grid_s - 1e-9)))  # the points before the end
        t = grid_s * np.arange(n)
        w = np.zeros(n)
        u = np.zeros(n)
        if self.at:
            idx = np.maximum(np.ceil(np.concatenate(self.at) / grid_s - 1e-9).astype(np.int64), 0)
            inside = idx < n  # a change at the end or later is past the grid
            np.add.at(w, idx[inside], np.concatenate(self.dw)[inside])
            np.add.at(u, idx[inside], np.concatenate(self.du)[inside])
        return t, base_w + np.cumsum(w), np.cumsum(u)


def _ramped(w: np.ndarray, ramp_s: float, grid_s: float) -> np.ndarray:
    """Each step of ``w`` spread into a linear ramp of ``ramp_s`` (a box filter)."""
    k = int(round(ramp_s / grid_s))
    if k <= 1 or w.size <= k:
        return w
    padded = np.r_[np.full(k - 1, w[0]), w]
    c = np.cumsum(np.r_[0.0, padded])
    return (c[k:] - c[:-k]) / k


def _run(
    n: int, busy: np.ndarray, sync: np.ndarray, gpu: GpuModel, work: Workload, policy: FillPolicy,
    fill: bool, grid_s: float,
) -> SimRun:
    tr = _Trace()
    history = PhaseHistory()
    names = [f"gpu-{i}" for i in range(n)]
    start = np.zeros(n)  # when each GPU starts the round's steps
    filled = 0.0
    budget_left = work.filler_gpu_s
    t_end = job_s = 0.0
    q = work.message_s
    for r in range(work.rounds):
        arrive = start + busy[r]
        tr.add(start, arrive, gpu.busy_w - gpu.idle_w)
        barrier = float(arrive.max())
        end = barrier + float(sync[r])
        delay = np.zeros(n)
        # Each GPU's sync phase runs from its arrival to the common end; its
        # opening reaches the coordinator in one message.
        known = work.hint or history.expected("sync") is not None
        if fill:
            idle_since = arrive.copy()
            slice_end = np.full(n, -math.inf)
            due = arrive + q
            while budget_left > 0:
                now = float(due.min())
                if now >= end:
                    break
                batch = np.flatnonzero(due <= now + q)
                phase_end: np.ndarray | None = None
                if known:
                    elapsed = now - arrive[batch]
                    if work.hint:
                        exp = np.where(elapsed < work.sync_s, work.sync_s, elapsed + history.overdue_s)
                    else:
                        exp = history.expected_many("sync", elapsed)
                    phase_end = arrive[batch] + exp
                views = [
                    WorkerView(
                        names[i], now=now, phase_end=None if phase_end is None else float(phase_end[j]),
                        in_phase=True, dip_s=now - idle_since[i], gpu_free=gpu.memory, power_w=gpu.idle_w,
                    )
                    for j, i in enumerate(batch)
                ]
                slots = batch.size if math.isinf(budget_left) else int(
                    min(batch.size, max(1, math.ceil(budget_left / max(policy.min_slice_s, 1e-3))))
                )
                fleet = (int(np.count_nonzero(arrive <= now)), int(np.count_nonzero(slice_end > now)))
                ds = plan(views, [FillerView("fill", gpu=True, max_s=work.filler_max_s, slots=slots,
                                             mem_bytes=work.filler_mem)], policy, fleet=fleet)
                # Not dispatched: ask again at the next tick, or when the
                # phase is due to end (it is then asked about as overdue).
                due[batch] = now + work.dispatch_s
                if phase_end is not None:
                    due[batch] = np.minimum(due[batch], np.maximum(phase_end, now) + q)
                if ds and not math.isinf(budget_left):
                    # Filler work that is finite runs out: the last slices get what is left.
                    b_all = np.array([d.budget_s for d in ds])
                    keep = np.cumsum(b_all) - b_all < budget_left
                    ds = [d for d, k in zip(ds, keep) if k]
                if ds:
                    idx = np.array([int(d.worker[4:]) for d in ds])
                    b = np.array([d.budget_s for d in ds])
                    if not math.isinf(budget_left):
                        b = np.minimum(b, np.maximum(budget_left - (np.cumsum(b) - b), 0.0))
                    s1 = now + b
                    tr.add(np.full(idx.size, now), np.minimum(s1, end), gpu.fill_w - gpu.idle_w)
                    # A slice that outlives the phase shares the GPU with the
                    # job's next steps (counted as busy power there).
                    delay[idx] = np.maximum(delay[idx], np.maximum(0.0, s1 - end) * work.overlap_cost)
                    idle_since[idx] = s1
                    slice_end[idx] = s1
                    # The worker asks for its next slice one message before
                    # this one ends.
                    due[idx] = s1
                    used = float(b.sum())
                    filled += used
                    budget_left -= used
        for i in range(0, n, max(1, n // history.keep)):
            history.record("sync", end - float(arrive[i]))
        # The job resumes at the phase's end everywhere; where a slice
        # overlaps it, its steps take longer (busy power all along).
        start = np.full(n, end)
        if r + 1 < work.rounds:
            busy[r + 1] += delay
        t_end = end
        job_s = float((end + delay).max())
    t, w, u = tr.grid(t_end, grid_s, n * gpu.idle_w)
    w = _ramped(w, gpu.ramp_s, grid_s)
    # One window per sync period: each holds one phase and the steps around it.
    period = work.sync_every * work.step_s + work.sync_s
    util = np.minimum(u, n) / n
    summary = summarize(t, w, util, window_s=period, grid_s=grid_s)
    return SimRun(summary, job_s, filled, t, w, util)


def simulate(
    n_gpus: int = 16384,
    *,
    gpu: GpuModel | None = None,
    workload: Workload | None = None,
    policy: FillPolicy | None = None,
    seed: int = 0,
    grid_s: float = 0.01,
) -> SimReport:
    """Simulate ``n_gpus`` GPUs of a synchronous job, without and with idle filling.

    Returns the two aggregate power timelines and their summaries; the job's
    slowdown from filling; the filler work done. See the module's doc for
    the model.

    Examples
    --------
    >>> r = simulate(n_gpus=256, workload=Workload(rounds=3, hint=True))
    >>> round(r.without.summary.swing_w / 1e3)  # kW: 256 GPUs between 100 W and 700 W
    154
    """
    gpu = gpu or GpuModel()
    work = workload or Workload()
    policy = policy or FillPolicy()
    if policy.floor_w is not None:
        # The model's draws, where the policy does not name its own.
        policy = replace(policy, idle_w=policy.idle_w or gpu.idle_w, fill_w=policy.fill_w or gpu.fill_w)
    if not isinstance(n_gpus, int) or n_gpus < 1:
        raise InvalidArgumentError(f"n_gpus={n_gpus!r} must be a positive integer")
    if work.rounds < 1 or work.sync_every < 1:
        raise InvalidArgumentError(
            f"a workload needs at least one round and one step per round (rounds={work.rounds!r}, "
            f"sync_every={work.sync_every!r})"
        )
    for name in ("step_s", "sync_s", "dispatch_s", "message_s"):
        if not getattr(work, name) > 0:
            raise InvalidArgumentError(f"workload {name}={getattr(work, name)!r} must be positive")
    if not grid_s > 0:
        raise InvalidArgumentError(f"grid_s={grid_s!r} must be positive")
    rng = np.random.default_rng(seed)
    # Each run gets its own copy: a run adds its overlaps to the rounds after.
    mean = work.sync_every * work.step_s
    sd = work.step_s * work.jitter * math.sqrt(work.sync_every)
    busy = np.clip(rng.normal(mean, sd, size=(work.rounds, n_gpus)), 0.5 * mean, None)
    sync = np.clip(rng.normal(work.sync_s, work.sync_s * work.sync_jitter, size=work.rounds), 0.1 * work.sync_s, None)
    return SimReport(
        n_gpus=n_gpus,
        without=_run(n_gpus, busy.copy(), sync, gpu, work, policy, False, grid_s),
        with_fill=_run(n_gpus, busy.copy(), sync, gpu, work, policy, True, grid_s),
        gpu=gpu,
        workload=work,
        policy=policy,
    )
