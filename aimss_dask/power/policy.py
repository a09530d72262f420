"""Which filler slice runs where, and for how long (pure).

One function, :func:`plan`, decides every dispatch of idle-filling work:
the coordinator calls it on live workers, :func:`aimss_dask.power.simulate`
on modelled GPUs. It sees plain snapshots and returns plain decisions, so
its promises are checked by property tests, not by hoping:

- nothing goes to a worker that has main-job tasks ready (a filler never
  delays the job's own work), and no GPU slice goes where the job's tasks
  run unless the GPU's utilisation shows a dip;
- nothing goes where there is neither a sync phase nor an idle dip;
- a slice never runs past the phase's expected end (less a safety share),
  nor past ``dip_slice_s`` where no end is known, nor past the filler's
  own ``max_s``;
- a GPU slice never takes more than the device's free memory, less a
  reserve, counting the other slices placed there in the same plan;
- no filler gets more slices at once than it allows (``concurrency``).

Workers in a sync phase are served before workers in a dip, and among them
the ones drawing the least power first: with too little filler work to go
round, it goes where the power would fall furthest (the floor of GB300's
power smoothing, in software).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from aimss_dask.core.errors import InvalidArgumentError


@dataclass(frozen=True)
class FillPolicy:
    """The knobs of :func:`plan` (``aimss.fill`` in the config).

    ``util_threshold``: a GPU below this utilisation (0-1) is in an idle dip;
    ``dip_after_s``: a dip counts once it has lasted this long (short gaps
    between kernels are not worth a dispatch); ``dip_slice_s``: the slice
    length in a dip, whose end nobody announced; ``safety``: the share of a
    phase's remaining time left unfilled, against phases that end early;
    ``min_slice_s``: shorter windows are not filled; ``memory_reserve``: the
    share of a GPU's free memory no slice may take.

    ``floor_w`` (``aimss.power.target-floor``): the power, per GPU in a sync
    phase, that filling holds on average over those GPUs, filling only as
    many of them as that takes (the lowest-drawing first), so that filler
    work lasts the whole phase instead of running out in the middle of it
    and dropping the power all at once; ``None``: fill every idle GPU.
    ``idle_w`` and ``fill_w``: a GPU's draw idle and running a filler, to
    size that share; ``None``: estimated from the GPUs' sampled power.
    """

    util_threshold: float = 0.3
    dip_after_s: float = 0.2
    dip_slice_s: float = 0.25
    safety: float = 0.1
    min_slice_s: float = 0.01
    memory_reserve: float = 0.1
    floor_w: float | None = None
    idle_w: float | None = None
    fill_w: float | None = None

    def __post_init__(self) -> None:
        for name in ("floor_w", "idle_w", "fill_w"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise InvalidArgumentError(f"fill policy {name}={v!r} must be a positive number of watts, or None")
        for name in ("dip_after_s", "dip_slice_s", "min_slice_s"):
            v = getattr(self, name)
            if not v >= 0:
                raise InvalidArgumentError(f"fill policy {name}={v!r} must be zero or more seconds")
        for name in ("util_threshold", "safety", "memory_reserve"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise InvalidArgumentError(f"fill policy {name}={v!r} must be within [0, 1)")


@dataclass(frozen=True)
class WorkerView:
    """What the coordinator knows of one worker at ``now`` (its clock).

    ``phase_end``: the expected end of the sync phase the worker is in, or
    ``None``; ``in_phase``: it is in one whose end nobody knows yet (a first
    phase of its name, unannounced); ``ready_tasks``: main-job tasks ready for it (queued on it or
    waiting for a slot it could give); ``running_tasks``: main-job tasks running there, besides
    those waiting in a phase (they may be using its GPU); ``idle_threads``: task threads with
    nothing to run; ``dip_s``: how long its GPU has been below the
    utilisation threshold (0: not in a dip) and ``gpu_free``: its device's
    free bytes (``None``: no GPU); ``power_w``: its latest power draw, if
    sampled; ``gpu_fillers`` / ``cpu_fillers``: slices already running there.
    """

    address: str
    now: float
    phase_end: float | None = None
    in_phase: bool = False
    ready_tasks: int = 0
    running_tasks: int = 0
    idle_threads: int = 0
    dip_s: float = 0.0
    gpu_free: int | None = None
    power_w: float | None = None
    gpu_fillers: int = 0
    cpu_fillers: int = 0


@dataclass(frozen=True)
class FillerView:
    """One queued filler: ``slots`` more slices of it may start now (its
    ``concurrency`` less those running); ``mem_bytes``: device memory one
    slice needs (GPU fillers); ``max_s``: the longest slice it accepts."""

    key: str
    gpu: bool
    max_s: float
    slots: int = 1
    mem_bytes: int = 0
    order: int = 0


@dataclass(frozen=True)
class Dispatch:
    """Run one slice of filler ``key`` on ``worker`` for at most ``budget_s``."""

    key: str
    worker: str
    budget_s: float
    in_phase: bool = field(default=False, compare=False)


def window(view: WorkerView, policy: FillPolicy, *, gpu: bool) -> tuple[float, bool] | None:
    """The time ``view``'s worker offers a GPU (or CPU) filler now, and whether it is a phase's; None: none."""
    if view.ready_tasks > 0:
        return None  # the job's own work first, always
    if gpu and view.gpu_free is None:
        return None
    if gpu and view.gpu_fillers > 0:
        return None  # one slice per device: two would compete with each other, and with the job
    if gpu and view.running_tasks > 0 and not (view.dip_s >= policy.dip_after_s and view.dip_s > 0):
        # The job's own tasks run there: its GPU is theirs unless its
        # utilisation shows they leave it idle.
        return None
    if not gpu and view.idle_threads - view.cpu_fillers <= 0:
        return None
    if view.phase_end is not None:
        left = (view.phase_end - view.now) * (1.0 - policy.safety)
        if left >= policy.min_slice_s and left > 0:
            return left, True
        return None
    if view.in_phase:
        # Idle by the application's word, for a time nobody knows: dip-sized
        # slices at once, rather than waiting to see a dip.
        if policy.dip_slice_s >= policy.min_slice_s and policy.dip_slice_s > 0:
            return policy.dip_slice_s, True
        return None
    if gpu:
        in_dip = view.dip_s >= policy.dip_after_s and view.dip_s > 0
    else:
        # Idle threads with nothing ready are a dip of the CPU kind; the
        # coordinator only reports threads idle for dip_after_s.
        in_dip = True
    if in_dip and policy.dip_slice_s >= policy.min_slice_s and policy.dip_slice_s > 0:
        return policy.dip_slice_s, False
    return None


def _floor_room(workers: list[WorkerView], policy: FillPolicy, fleet: tuple[int, int] | None) -> int | None:
    """How many more GPUs in a phase may start a slice under ``policy.floor_w``; None: no limit.

    ``fleet``: (GPUs in a phase, of which filling), where ``workers`` is not
    every worker (the simulation plans for those whose turn it is).
    """
    if policy.floor_w is None:
        return None
    in_phase = [v for v in workers if v.gpu_free is not None and (v.phase_end is not None or v.in_phase)]
    if fleet is None:
        fleet = (len(in_phase), sum(1 for v in in_phase if v.gpu_fillers > 0))
    idle = policy.idle_w
    fill = policy.fill_w
    if idle is None or fill is None:
        drawn = [(v.power_w, v.gpu_fillers > 0) for v in in_phase if v.power_w is not None]
        seen_idle = sorted(p for p, f in drawn if not f)
        seen_fill = sorted(p for p, f in drawn if f)
        idle = idle if idle is not None else (seen_idle[len(seen_idle) // 2] if seen_idle else None)
        fill = fill if fill is not None else (seen_fill[len(seen_fill) // 2] if seen_fill else None)
    if idle is None or fill is None or fill <= idle:
        return None  # nothing to size the share by yet: fill every idle GPU
    share = min(1.0, max(0.0, (policy.floor_w - idle) / (fill - idle)))
    want = math.ceil(share * fleet[0] - 1e-9)
    return max(0, want - fleet[1])


def plan(
    workers: Iterable[WorkerView], fillers: Sequence[FillerView], policy: FillPolicy = FillPolicy(),
    fleet: tuple[int, int] | None = None,
) -> list[Dispatch]:
    """The slices to start now: at most one filler slice per free place, in queue order.

    Examples
    --------
    >>> w = [WorkerView("a", now=10.0, phase_end=12.0, gpu_free=8 << 30),
    ...      WorkerView("b", now=10.0, ready_tasks=1, gpu_free=8 << 30)]
    >>> plan(w, [FillerView("f", gpu=True, max_s=5.0, slots=2)])
    [Dispatch(key='f', worker='a', budget_s=1.8, in_phase=True)]
    """
    workers = list(workers)
    slots = {f.key: f.slots for f in fillers}
    queue = sorted(fillers, key=lambda f: f.order)
    gpu_phase_room = _floor_room(workers, policy, fleet)
    offers: list[tuple[tuple[int, float, str], WorkerView]] = []
    for v in workers:
        phase = v.phase_end is not None or v.in_phase
        offers.append(((0 if phase else 1, v.power_w if v.power_w is not None else 0.0, v.address), v))
    offers.sort(key=lambda o: o[0])
    out: list[Dispatch] = []
    for _, v in offers:
        mem_left = None if v.gpu_free is None else int(v.gpu_free * (1.0 - policy.memory_reserve))
        cpu_free = v.idle_threads - v.cpu_fillers
        gpu_placed = False
        for kind_gpu in (True, False):
            w = window(v, policy, gpu=kind_gpu)
            if w is None:
                continue
            left, in_phase = w
            for f in queue:
                if f.gpu != kind_gpu or slots[f.key] <= 0:
                    continue
                if kind_gpu:
                    if gpu_placed or mem_left is None or f.mem_bytes > mem_left:
                        continue
                    if in_phase and gpu_phase_room is not None and gpu_phase_room <= 0:
                        break  # the floor is held: the rest of the work waits for later in the phase
                elif cpu_free <= 0:
                    break
                budget = min(left, f.max_s)
                if budget < policy.min_slice_s or budget <= 0:
                    continue
                out.append(Dispatch(f.key, v.address, budget, in_phase))
                slots[f.key] -= 1
                if kind_gpu:
                    gpu_placed = True
                    mem_left = (mem_left or 0) - f.mem_bytes
                    if in_phase and gpu_phase_room is not None:
                        gpu_phase_room -= 1
                    break
                cpu_free -= 1
    return out
