"""Sync phases and idle filling, on the coordinator.

The application says when a worker is about to wait
(:func:`aimss_dask.sync_phase`: a checkpoint, a collective), AIMSS says it
around its own barriers, and the coordinator keeps a queue of filler work
(:func:`aimss_dask.fill`). Whenever a phase opens, a slice ends, a filler
arrives, and every ``aimss.fill.tick`` while fillers wait, it takes a
snapshot of each worker -- what Dask has running and queued there, which
of its tasks are in a phase, how long its threads have been idle, its GPU's
utilisation and free memory -- and asks the pure policy
(:func:`aimss_dask.power.policy.plan`) where slices go and for how long.
A slice runs on the worker's low-priority filler threads
(:mod:`aimss_dask.node.filling`) and reports back; the coordinator never
waits for one on its event loop.

Feeding stops where a phase ends or main-job tasks are ready: those
workers simply get no next slice, and a running slice is bounded by its
budget. A filler's exception is recorded, logged as an event and shown
in its status; it never reaches the job.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tornado.ioloop import PeriodicCallback

from aimss_dask.coordinator.cluster import as_key
from aimss_dask.core.config import FillConfig
from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.core.names import HEARTBEAT_METRIC
from aimss_dask.power.phases import Phase, PhaseHistory, check_expected
from aimss_dask.power.policy import FillerView, FillPolicy, WorkerView, plan
from aimss_dask.transport.rpc import replies

if TYPE_CHECKING:
    from aimss_dask.coordinator.cluster import ClusterOps

logger = logging.getLogger("aimss_dask")

#: Finished fillers kept for their status (the oldest go first).
FINISHED_KEPT = 256
#: Phases kept per name for the history (and names at most).
HISTORY_KEEP = 32
#: Closed phases kept for power reports (their shading), the most recent.
PHASE_LOG = 4096
#: Seconds after which a GPU whose heartbeats stopped carrying its state is forgotten.
GPU_STALE = 5.0
#: Sync phases open at once, at most (each is closed by whoever opened it).
MAX_OPEN_PHASES = 65536
#: Tasks that waited in a sync phase, remembered (the most recent) so that
#: straggler rules do not take their wait for slowness.
SYNCED_KEPT = 65536


def fill_policy(cfg: FillConfig, floor_w: float | None = None) -> FillPolicy:
    """The policy's knobs from ``aimss.fill`` (and ``aimss.power.target-floor``)."""
    return FillPolicy(
        floor_w=floor_w,
        util_threshold=cfg.util_threshold,
        dip_after_s=cfg.dip_after,
        dip_slice_s=cfg.dip_slice,
        safety=cfg.safety,
        min_slice_s=cfg.min_slice,
        memory_reserve=cfg.memory_reserve,
    )


@dataclass
class OpenPhase:
    """A sync phase open on ``workers`` (a task's: its worker; a client's: all it named)."""

    token: str
    name: str
    workers: frozenset[str]
    start: float
    expected_s: float | None
    task: Any = None
    client: str | None = None

    def phase(self, worker: str) -> Phase:
        return Phase(self.name, worker, self.start, self.expected_s, self.token)


@dataclass
class Filler:
    """One queued filler and what it has done."""

    key: str
    payload: bytes
    gpu: bool
    max_s: float
    concurrency: int
    memory: int
    order: int
    client: str | None
    submitted: float
    state: str = "queued"  # queued -> running -> done | failed | cancelled
    running: dict[str, float] = field(default_factory=dict)  # worker -> when its slice started
    slices: int = 0
    seconds: float = 0.0
    over_budget: int = 0
    in_phase: int = 0
    workers: set[str] = field(default_factory=set)
    error: str | None = None
    traceback: str | None = None

    @property
    def waiting(self) -> bool:
        return self.state in ("queued", "running") and len(self.running) < self.concurrency

    def status(self) -> dict[str, Any]:
        return {
            "key": self.key, "state": self.state, "gpu": self.gpu, "slices": self.slices,
            "seconds": round(self.seconds, 6), "running": sorted(self.running), "over_budget": self.over_budget,
            "in_phase": self.in_phase, "workers": sorted(self.workers), "error": self.error,
            "traceback": self.traceback,
        }


class FillHandlers:
    """The ``aimss_phase_*`` and ``aimss_fill_*`` ops, and the dispatch loop."""

    def __init__(
        self, ops: ClusterOps, cfg: FillConfig, *, gpu_view: Callable[[str, float], dict[str, Any] | None] | None = None,
        clock: Callable[[], float] = time.monotonic, ramp_limit: float | None = None, auto_phases: bool = True,
        floor_w: float | None = None,
    ) -> None:
        self.ops = ops
        #: aimss.power.auto-phases: AIMSS's own barriers open phases.
        self.auto_phases = auto_phases
        #: aimss.power.max-ramp-w-per-s, for power reports.
        self.ramp_limit = ramp_limit
        self.cfg = cfg
        self.policy = fill_policy(cfg, floor_w)
        self.clock = clock
        self.history = PhaseHistory(keep=HISTORY_KEEP)
        self.phases: dict[str, OpenPhase] = {}
        self.fillers: dict[str, Filler] = {}
        #: Each worker's GPU as its sampler reported it last (free bytes, utilisation, power, time in a dip).
        self.gpus: dict[str, tuple[float, dict[str, Any]]] = {}
        self.gpu_view = gpu_view or self._gpu_view
        #: Closed phases, wall clock: (name, workers, start, end), for power reports.
        self.phase_log: deque[tuple[str, list[str], float, float]] = deque(maxlen=PHASE_LOG)
        #: Keys of tasks that opened a sync phase: their time is partly a wait for others.
        self.synced: OrderedDict[Any, None] = OrderedDict()
        self._order = itertools.count()
        #: Running totals for the metrics: slices and their seconds by kind, phases closed.
        self.slices_total: dict[str, int] = {"gpu": 0, "cpu": 0}
        self.seconds_total: dict[str, float] = {"gpu": 0.0, "cpu": 0.0}
        self.phases_closed = 0
        self._free_since: dict[str, float] = {}
        self._kicked = False
        self._pc: PeriodicCallback | None = None
        self._slices: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._pc = PeriodicCallback(self._tick, self.cfg.tick * 1000)
        self._pc.start()

    def stop(self) -> None:
        if self._pc is not None:
            self._pc.stop()
            self._pc = None
        for t in list(self._slices):
            t.cancel()
        self.phases.clear()
        for f in self.fillers.values():
            if f.state in ("queued", "running"):
                f.state = "cancelled"

    def worker_left(self, worker: str) -> None:
        """``worker`` is gone: its phases no longer cover it (its slices end with their calls)."""
        self._free_since.pop(worker, None)
        self.gpus.pop(worker, None)
        for token, p in list(self.phases.items()):
            if worker in p.workers:
                rest = p.workers - {worker}
                if rest:
                    p.workers = rest
                else:
                    del self.phases[token]

    def client_left(self, client: str) -> None:
        """Fillers and phases of a client that disconnected end with it."""
        for f in self.fillers.values():
            if f.client == client and f.state in ("queued", "running"):
                f.state = "cancelled"
        for token, p in list(self.phases.items()):
            if p.client == client:
                del self.phases[token]

    # -- phases ------------------------------------------------------------------------

    @replies
    async def _h_phase_open(
        self, name: str, workers: list[str] | None = None, expected_s: float | None = None, task: Any = None,
        client: str | None = None, auto: bool = False,
    ) -> dict[str, Any]:
        if auto and not self.auto_phases:
            return {"token": None, "workers": []}
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"a sync phase needs a name (a non-empty str), got {name!r}")
        expected = check_expected(expected_s)
        live = set(self.ops.workers())
        if workers is None:
            covered = frozenset(live)
        else:
            unknown = sorted(set(workers) - live)
            if unknown:
                raise InvalidArgumentError(
                    f"sync phase {name!r}: {unknown} are not workers of this cluster; name workers by "
                    "the addresses client.scheduler_info()['workers'] lists"
                )
            covered = frozenset(workers)
        key = as_key(task) if task is not None else None
        if auto:
            # AIMSS's own barrier: the workers that wait on it are those with
            # nothing else to run (a worker busy with other tasks is not idle).
            sched = self.ops.scheduler
            assert sched is not None
            covered = frozenset(
                w for w in covered
                if w in sched.workers and all(ts.key == key for ts in sched.workers[w].processing)
            )
            if not covered:
                return {"token": None, "workers": []}
        if len(self.phases) >= MAX_OPEN_PHASES:
            # Phases are closed by whoever opened them; this many open is a leak
            # somewhere, and the oldest go first rather than the coordinator's memory.
            oldest = min(self.phases.values(), key=lambda p: p.start)
            logger.warning("aimss: %d sync phases open; the oldest (%r) is dropped", len(self.phases), oldest.name)
            del self.phases[oldest.token]
        token = uuid.uuid4().hex
        self.phases[token] = OpenPhase(token, name, covered, self.clock(), expected, key, client)
        if key is not None:
            self.synced[key] = None
            if len(self.synced) > SYNCED_KEPT:
                self.synced.popitem(last=False)
        self.kick()
        return {"token": token, "workers": sorted(covered)}

    @replies
    async def _h_phase_close(self, token: str) -> dict[str, Any]:
        p = self.phases.pop(token, None)
        if p is None:
            return {"closed": False}
        seconds = self.clock() - p.start
        self.history.record(p.name, seconds)
        self.phases_closed += 1
        end = time.time()
        self.phase_log.append((p.name, sorted(p.workers), end - seconds, end))
        return {"closed": True, "seconds": seconds}

    @replies
    async def _h_phase_status(self) -> dict[str, Any]:
        return {"open": self._open_phases(), "expected": self._expected()}

    def _open_phases(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [
            {"name": p.name, "workers": sorted(p.workers), "elapsed": round(now - p.start, 3), "expected_s": p.expected_s}
            for p in self.phases.values()
        ]

    def _expected(self) -> dict[str, float | None]:
        return {n: self.history.expected(n) for n in self.history.names()}

    def phases_since(self, since: float) -> list[dict[str, Any]]:
        """Phases closed after ``since`` and those open (``end`` None), wall clock."""
        now_wall, now = time.time(), self.clock()
        out = [{"name": n, "workers": w, "start": a, "end": b} for n, w, a, b in self.phase_log if b >= since]
        out += [
            {"name": p.name, "workers": sorted(p.workers), "start": now_wall - (now - p.start), "end": None}
            for p in self.phases.values()
        ]
        return out

    def summary(self) -> dict[str, Any]:
        """For ``status()``: the fillers, the phases open, the lengths expected."""
        return {
            "fillers": [self._status(f) for f in self.fillers.values()],
            "phases": self._open_phases(),
            "expected": self._expected(),
            "gpus": sorted(self.gpus),
        }

    # -- GPUs ----------------------------------------------------------------------------

    @replies
    async def _h_gpu_state(
        self, worker: str, free: int | None = None, util: float | None = None, power_w: float | None = None,
        low: bool = False, dip_s: float = 0.0, t: float | None = None,
    ) -> None:
        self._note_gpu(worker, {"free": free, "util": util, "power_w": power_w, "low": low, "dip_s": dip_s, "t": t})
        if low:
            self.kick()

    def _note_gpu(self, worker: str, g: dict[str, Any]) -> None:
        if g.get("free") is None or self.ops.scheduler is None or worker not in self.ops.scheduler.workers:
            return  # a GPU whose memory NVML does not report gets no GPU slices; a worker gone, nothing
        t = float(g.get("t") or time.time())
        old = self.gpus.get(worker)
        if old is not None and old[0] >= t:
            return  # an older reading (a heartbeat after a crossing told at once)
        self.gpus[worker] = (t, {"free": int(g["free"]), "util": g.get("util"), "power_w": g.get("power_w"),
                                 "low": bool(g.get("low")), "dip_s": float(g.get("dip_s") or 0.0)})

    def _gpu_view(self, worker: str, now: float) -> dict[str, Any] | None:
        sched = self.ops.scheduler
        ws = sched.workers.get(worker) if sched is not None else None
        beat = ws.metrics.get(HEARTBEAT_METRIC) if ws is not None else None
        if isinstance(beat, dict) and isinstance(beat.get("gpu"), dict):
            self._note_gpu(worker, beat["gpu"])
        got = self.gpus.get(worker)
        if got is None:
            return None
        at, g = got
        if isinstance(beat, dict) and beat.get("gpu") is None and time.time() - at > GPU_STALE:
            # Its sampler stopped (or never ran): no GPU to fill there.
            del self.gpus[worker]
            return None
        # A dip goes on between reports (a crossing back is reported at once);
        # the readings carry the worker's wall clock.
        return {**g, "dip_s": g["dip_s"] + max(0.0, time.time() - at) if g["low"] else 0.0}

    @replies
    async def _h_power_timelines(self, since: float = 0.0, timeout: float = 10.0) -> dict[str, Any]:
        """Every worker's GPU samples since ``since`` (wall clock), and the sync phases then."""
        replies = await self.ops.broadcast({"op": "aimss_power_samples", "since": since}, timeout=timeout)
        workers = {
            w: (r if isinstance(r, dict) else {"state": f"off: no answer ({type(r).__name__}: {r})", "columns": {}})
            for w, r in replies.items()
        }
        return {"workers": workers, "phases": self.phases_since(since), "max_ramp_w_per_s": self.ramp_limit}

    # -- fillers -----------------------------------------------------------------------

    @replies
    async def _h_fill_submit(
        self, key: str, payload: bytes, gpu: bool, max_s: float, concurrency: int = 1, memory: int = 0,
        client: str | None = None,
    ) -> dict[str, Any]:
        old = self.fillers.get(key)
        if old is not None and (old.state in ("queued", "running") or old.running):
            raise InvalidArgumentError(
                f"a filler with key {key!r} is already queued or has a slice running; give another key, "
                "or cancel that one and wait for it (Filler.wait) first"
            )
        self.fillers[key] = Filler(
            key, payload, bool(gpu), float(max_s), int(concurrency), int(memory), next(self._order), client,
            self.clock(),
        )
        self._forget_finished()
        self.kick()
        return {"key": key}

    @replies
    async def _h_fill_status(self, key: str | None = None) -> dict[str, Any]:
        if key is None:
            return {"fillers": [self._status(f) for f in self.fillers.values()]}
        f = self.fillers.get(key)
        if f is None:
            raise InvalidArgumentError(f"no filler {key!r} is known here (never submitted, or long finished)")
        return self._status(f)

    def _status(self, f: Filler) -> dict[str, Any]:
        st = f.status()
        if f.gpu and f.waiting:
            fits = [w for w, (_, g) in self.gpus.items() if g["free"] * (1 - self.policy.memory_reserve) >= f.memory]
            if not self.gpus:
                st["note"] = "no worker has reported a GPU (NVML, the gpu extra): a GPU filler waits for one"
            elif not fits:
                st["note"] = (
                    f"no GPU has {f.memory} bytes free (less the reserve): this filler waits until one has"
                )
        return st

    @replies
    async def _h_fill_cancel(self, key: str) -> dict[str, Any]:
        f = self.fillers.get(key)
        if f is None:
            return {"cancelled": False}
        if f.state in ("queued", "running"):
            f.state = "cancelled"
        return {"cancelled": f.state == "cancelled", "running": sorted(f.running)}

    def _forget_finished(self) -> None:
        done = [k for k, f in self.fillers.items() if f.state in ("done", "failed", "cancelled") and not f.running]
        for k in done[: max(0, len(done) - FINISHED_KEPT)]:
            del self.fillers[k]

    # -- dispatch ----------------------------------------------------------------------

    def kick(self) -> None:
        """Look for places soon (once, however many things asked)."""
        if self._kicked:
            return
        self._kicked = True
        asyncio.get_running_loop().call_soon(self._dispatch_now)

    def _tick(self) -> None:
        try:
            self._expire_phases()
        except Exception:
            logger.exception("aimss: sync-phase expiry failed")
        if any(f.waiting for f in self.fillers.values()):
            self._dispatch_now()

    def _expire_phases(self) -> None:
        """A task's phase ends with its task (a close that never came: the task was cancelled, its client left)."""
        sched = self.ops.scheduler
        if sched is None or not self.phases:
            return
        for token, p in list(self.phases.items()):
            if p.task is None:
                continue
            ts = sched.tasks.get(p.task)
            if ts is None or ts.state != "processing":
                del self.phases[token]

    def _dispatch_now(self) -> None:
        self._kicked = False
        try:
            self.dispatch()
        except Exception:  # a hook's work: never out of the event loop
            logger.exception("aimss: idle-filling dispatch failed")

    def views(self, now: float) -> list[WorkerView]:
        """A snapshot of every running worker, as the policy sees it."""
        sched = self.ops.scheduler
        assert sched is not None
        by_worker: dict[str, list[OpenPhase]] = {}
        for p in self.phases.values():
            for w in p.workers:
                by_worker.setdefault(w, []).append(p)
        gpu_running: dict[str, int] = {}
        cpu_running: dict[str, int] = {}
        for f in self.fillers.values():
            for w in f.running:
                (gpu_running if f.gpu else cpu_running)[w] = (gpu_running if f.gpu else cpu_running).get(w, 0) + 1
        queued = len(sched.queued)
        out = []
        for addr in self.ops.workers():
            ws = sched.workers.get(addr)
            if ws is None:
                continue
            phases = by_worker.get(addr, [])
            phase_tasks = {p.task for p in phases if p.task is not None}
            in_phase = sum(1 for ts in ws.processing if ts.key in phase_tasks) if phase_tasks else 0
            main = len(ws.processing) - in_phase
            free = ws.nthreads - main
            client_phase = any(p.task is None for p in phases)
            if free > in_phase:
                self._free_since.setdefault(addr, now)
            else:
                self._free_since.pop(addr, None)
            idle_long = now - self._free_since.get(addr, now) >= self.policy.dip_after_s
            # Threads whose task waits in a phase are idle now; free ones once
            # they have been for dip_after (or at once in a client's phase).
            idle = in_phase + (max(0, free - in_phase) if (client_phase or idle_long) else 0)
            ready = max(0, main - ws.nthreads) + (queued if free > in_phase else 0)
            ends = [e for e in (self.history.end_of(p.phase(addr), now) for p in phases) if e is not None]
            gpu = self.gpu_view(addr, now)
            out.append(WorkerView(
                addr, now=now, phase_end=min(ends) if ends else None, in_phase=bool(phases), ready_tasks=ready,
                running_tasks=max(0, main), idle_threads=idle,
                dip_s=gpu["dip_s"] if gpu else 0.0, gpu_free=gpu["free"] if gpu else None,
                power_w=gpu.get("power_w") if gpu else None,
                gpu_fillers=gpu_running.get(addr, 0), cpu_fillers=cpu_running.get(addr, 0),
            ))
        return out

    def dispatch(self) -> list[Any]:
        """Start the slices the policy places now; the decisions."""
        waiting = [f for f in self.fillers.values() if f.waiting]
        if not waiting or self.ops.scheduler is None:
            return []
        now = self.clock()
        views = self.views(now)
        fv = [
            FillerView(f.key, gpu=f.gpu, max_s=f.max_s, slots=f.concurrency - len(f.running), mem_bytes=f.memory,
                       order=f.order)
            for f in waiting
        ]
        # A worker already running a slice of a filler gets no second one of it.
        ds = [d for d in plan(views, fv, self.policy) if d.worker not in self.fillers[d.key].running]
        for d in ds:
            f = self.fillers[d.key]
            f.running[d.worker] = now
            f.state = "running"
            task = asyncio.ensure_future(self._slice(f, d.worker, d.budget_s, d.in_phase))
            self._slices.add(task)
            task.add_done_callback(self._slices.discard)
        return ds

    async def _slice(self, f: Filler, worker: str, budget: float, in_phase: bool) -> None:
        reply: Any = None
        try:
            msg = {"op": "aimss_fill_slice", "key": f.key, "payload": f.payload, "budget_s": budget, "gpu": f.gpu}
            # A worker that left answers an OSError here: the filler goes on elsewhere.
            reply = (await self.ops.broadcast(msg, workers=[worker])).get(worker)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the worker refused: counted as a failed slice, never lost
            reply = {"seconds": 0.0, "error": f"the worker could not run the slice: {type(e).__name__}: {e}"}
        finally:
            f.running.pop(worker, None)
        try:
            self._note(f, worker, budget, in_phase, reply)
        except Exception:  # bookkeeping of a background task: logged, never lost silently
            logger.exception("aimss: the end of a slice of filler %r could not be noted", f.key)
        self.kick()

    def _note(self, f: Filler, worker: str, budget: float, in_phase: bool, reply: Any) -> None:
        if isinstance(reply, dict):
            f.slices += 1
            f.in_phase += int(in_phase)
            f.workers.add(worker)
            sec = float(reply.get("seconds", 0.0))
            f.seconds += sec
            kind = "gpu" if f.gpu else "cpu"
            self.slices_total[kind] += 1
            self.seconds_total[kind] += sec
            # A slice is the filler's promise to stop within its budget; a
            # broken promise delays the job, so it is counted for all to see.
            if sec > budget * 1.5 + 0.005:
                f.over_budget += 1
            if reply.get("error"):
                if f.state != "cancelled":
                    f.state = "failed"
                f.error, f.traceback = reply["error"], reply.get("traceback")
                self.ops.event({"action": "filler-failed", "key": f.key, "worker": worker, "error": f.error})
            elif not reply.get("more") and f.state == "running":
                f.state = "done"
                self.ops.event({"action": "filler-done", "key": f.key, "slices": f.slices, "busy_s": f.seconds})
