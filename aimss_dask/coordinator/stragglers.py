"""Stragglers, found from what the scheduler and the coordinator see, and reported.

What it watches:

- every task group's finished durations (per worker too), noted in the
  scheduler's ``transition`` hook in O(1) from the ``compute`` start and
  stop the worker reports. Dask's ``TaskPrefix.duration_average`` is not
  used: long tasks reset it, and a prefix spans runs;
- the tasks running now and for how long: each worker's heartbeat carries
  them (``WorkerState.executing``), to which the time since that heartbeat
  is added; those that ended since are left out;
- every consumer group's committed offset per partition, sampled at each
  check, against the partition's end as its owner last reported (or the end
  of the consumer's own range, once it handed the rest over): a rate
  (records per second over ``RATE_WINDOW``) and the records left.

A periodic callback (``aimss.speculation.interval``), never the hooks,
applies the pure rules of :mod:`~aimss_dask.coordinator.speculation`:
Spark's quantile rule to the tasks of each group (halfway between 1x and
``multiplier`` x the median for tasks on a worker already found slow: rule
``slow worker``), LATE's time-left rule to the consumers of each group of each
stream, and tells slow workers from slow tasks. Each new straggler, and its end, is an event on the
``aimss-straggler`` topic (``client.subscribe_topic``), a line in the log
and an entry of ``aimss_dask.status().stragglers``.

What it does about them, with speculation on: a copy of a straggling task
whose function is declared idempotent (an AIMSS operator's push, a function
marked :func:`~aimss_dask.speculative`), and, for a straggling consumer
that can split its range (``Stream.map_records``), a *takeover*: at its
next progress report the consumer is told to stop at a split point
(:func:`~aimss_dask.coordinator.speculation.split_point`) and to start a
helper on a fast worker that consumes the rest. Copies and helpers together
stay under ``max-fraction`` of the cluster's threads.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from aimss_dask.coordinator.pinning import calls_in
from aimss_dask.coordinator.sinkwriters import SinkWriters
from aimss_dask.coordinator.speculation import (
    Progress,
    Running,
    Straggler,
    WorkerView,
    copy_cap,
    late_report,
    late_rule,
    place_copies,
    quantile_rule,
    slow_workers,
    slowness,
    split_point,
    steer_off,
)
from aimss_dask.core.config import SpeculationConfig
from aimss_dask.core.names import (
    RUN_PUSH,
    SPECULATIVE,
    SPECULATIVE_ANNOTATION,
    STRAGGLER_TOPIC,
    TAKEOVER_TASK_PREFIX,
    key_text,
)
from aimss_dask.core.race import Speculative

if TYPE_CHECKING:
    from distributed import Scheduler

    from aimss_dask.coordinator.state import CoordinatorState

logger = logging.getLogger("aimss_dask")

#: Task groups whose durations are kept (the most recently finished ones).
MAX_GROUPS = 512

#: Durations kept per group, and per group and worker.
MAX_DURATIONS = 4096
MAX_PER_WORKER = 64

#: Seconds of committed offsets a consumer's rate is taken over.
RATE_WINDOW = 10.0

#: Commits a consumer must have made before it is judged: a rate from fewer
#: rests on one commit interval (``aimss_dask.api.reader.COMMIT_INTERVAL``),
#: and consumers that started a moment apart look far apart.
MIN_COMMITS = 3

#: Seconds during which a straggler seen on a worker counts toward calling it slow.
SLOW_WINDOW = 120.0

#: Task groups, the most recently finished, whose durations per worker can make a worker slow.
SLOW_GROUPS = 32

#: Share of a worker's tasks in :data:`SLOW_WINDOW` that must have straggled
#: for its task stragglers to count toward calling it slow: a slow worker's
#: tasks straggle as a rule, while a couple among many (a cold first run, a
#: busy moment on a shared machine) say nothing of the worker, and a flag
#: keeps new runs off it for the whole window.
SLOW_SHARE = 0.25

#: Fraction of ``min-runtime`` a worker's median duration in a group must
#: exceed for that group to make it slow: shorter tasks differ by noise.
SLOW_FLOOR = 0.1

#: Seconds a takeover's helper is expected to need before its first record
#: (a task submitted from a task, then a remote read): the split leaves the
#: helper that much less.
TAKEOVER_STARTUP = 0.5

#: Seconds a helper's task may take to appear on the scheduler after its
#: consumer was told to start it; past that, it never will (the consumer
#: ended first) and no longer counts against the cap.
TAKEOVER_APPEAR = 30.0

#: Seconds a takeover decided for a consumer waits for the consumer's next
#: progress report; past that it is dropped (the consumer has stopped
#: reporting: it waits for its helpers, or it is gone).
ORDER_TTL = 5.0

#: Seconds without a progress report after which a consumer that can split
#: its range is forgotten (its task ended without saying so).
RANGE_STALE = 300.0

#: Reports kept for ``status()``.
MAX_REPORTS = 200

#: Pushes remembered as steered off slow workers: past this many, those
#: the scheduler has forgotten (a graph cancelled before they ran) go.
MAX_STEERED = 100_000


def max_slow(workers: int) -> int:
    """How many of ``workers`` may be flagged slow at once: fewer than half, and one of two.

    >>> [max_slow(n) for n in (1, 2, 3, 4, 5, 9)]
    [0, 1, 1, 1, 2, 4]
    """
    return 0 if workers < 2 else max(1, (workers - 1) // 2)


class _Group:
    """The finished durations of one task group, in all and per worker."""

    __slots__ = ("durations", "by_worker", "last")

    def __init__(self) -> None:
        self.durations: deque[float] = deque(maxlen=MAX_DURATIONS)
        self.by_worker: dict[str, deque[float]] = {}
        #: ``time.time()`` when its last task finished.
        self.last = 0.0

    def add(self, worker: str | None, seconds: float, now: float) -> None:
        self.last = now
        self.durations.append(seconds)
        if worker is not None:
            mine = self.by_worker.get(worker)
            if mine is None:
                mine = self.by_worker[worker] = deque(maxlen=MAX_PER_WORKER)
            mine.append(seconds)


def _reported(cid: str, worker: str, r: dict[str, Any], end: int, now: float) -> Progress:
    """The progress of a consumer that reports its own (``Stragglers.ranges``), as of ``now``.

    ``end``: its partition's end as last known; its own range may end sooner.
    """
    consumed = float(max(r["offset"] - r["start"], 0))
    if r["done"]:
        return Progress(cid, worker, r["elapsed"], consumed, 0.0, consumed / r["elapsed"] if r["elapsed"] > 0 else None)
    if r["stop"] is not None:
        end = min(end, r["stop"])
    elapsed = r["elapsed"] + max(now - r["seen"], 0.0)
    return Progress(cid, worker, elapsed, consumed, float(max(end - r["offset"], 0)))


class _Consumer:
    """What one consumer (stream, group, partition) has committed, as sampled at each check."""

    __slots__ = ("hist", "started", "commits", "changed")

    def __init__(self) -> None:
        self.hist: deque[tuple[float, int]] = deque()  # (when, committed offset), oldest first
        self.started: float | None = None  # when it was first seen consuming
        self.commits = 0  # offset moves seen
        self.changed: float | None = None  # when its offset last moved

    def observe(self, now: float, off: int) -> None:
        hist = self.hist
        if hist and hist[-1][1] != off:
            self.commits += 1
            self.changed = now
        if not hist or hist[-1][1] != off or now - hist[-1][0] >= 1.0:
            hist.append((now, off))
        while len(hist) > 2 and now - hist[1][0] >= RATE_WINDOW:
            hist.popleft()
        if off > 0 and self.started is None:
            self.started = hist[0][0] if hist[0][1] == 0 else now

    def rate(self, now: float, off: int, done: bool) -> float | None:
        """Records per second over the window; for one that is done, over the time it consumed.

        Not a rate that falls the longer it has had nothing left.
        """
        first_t, first_off = self.hist[0]
        until = (self.changed or now) if done else now
        return (off - first_off) / (until - first_t) if until - first_t > 0 else None


def _running_on(ws: Any) -> list[tuple[Any, float]]:
    """``(task, seconds it had run)`` of the tasks ``ws``'s last heartbeat listed that still run there.

    The heartbeat's list is as old as the heartbeat: a task that ended
    since (or moved) is no longer running there.
    """
    return [(ts, e) for ts, e in ws.executing.items() if ts.state == "processing" and ts.processing_on is ws]


def calls_marked(spec: Any, mark: str = SPECULATIVE) -> bool:
    """Whether task spec ``spec`` calls a function marked speculative (or ``mark``), even fused into another task.

    A speculative function (:func:`aimss_dask.speculative`, an operator's
    push) races a copy only from inside its call, so a task qualifies when
    that call is in it anywhere: Dask may have fused the push with the task
    that made its input.
    """
    return any(getattr(call.func, mark, False) for call in calls_in(spec))


def mark_annotated(scheduler: Any, annotations: dict[str, dict[Any, Any]] | None) -> int:
    """Make the tasks annotated ``aimss_speculative`` calls of speculative functions; how many.

    Called from the ``update_graph`` hook, before Dask sends any of them to
    a worker: each such task's function is wrapped in
    :class:`~aimss_dask.core.race.Speculative`, so that a straggling call of
    it can race a copy, exactly like a function declared with
    :func:`aimss_dask.speculative`. Tasks not annotated are never touched.
    """
    from dask.task_spec import Task

    marked = (annotations or {}).get(SPECULATIVE_ANNOTATION) or {}
    n = 0
    for key, value in marked.items():
        ts = scheduler.tasks.get(key) if value else None
        spec = getattr(ts, "run_spec", None)
        if not isinstance(spec, Task) or getattr(spec.func, SPECULATIVE, False):
            continue
        ts.run_spec = Task(spec.key, Speculative(spec.func), *spec.args, **spec.kwargs)
        n += 1
    return n


def _compute_seconds(startstops: Any) -> float | None:
    """The ``compute`` time of a finished task from the worker's ``startstops``."""
    if not startstops:
        return None
    total = 0.0
    seen = False
    for ss in startstops:
        if isinstance(ss, dict) and ss.get("action") == "compute":
            total += float(ss["stop"]) - float(ss["start"])
            seen = True
    return total if seen else None


class Stragglers:
    """The coordinator's straggler detection: hooks note, :meth:`check` judges and reports.

    ``state``: the coordinator's stream metadata (consumer groups, partition
    bounds, owners). ``config``: ``aimss.speculation``. ``tell(worker,
    msg)``: a message on the scheduler's stream to a worker, for copies.
    Reports reach Dask's event log through ``scheduler.log_event``.
    """

    def __init__(
        self,
        state: CoordinatorState,
        config: SpeculationConfig,
        tell: Callable[[str, dict[str, Any]], bool] | None = None,
    ) -> None:
        self.state = state
        self.config = config
        # Sends a message on the scheduler's stream to a worker (ClusterOps.tell).
        self._tell = tell
        #: Copies asked for and not yet over: key text -> where, since when, how it ended.
        self.copies: dict[str, dict[str, Any]] = {}
        self.scheduler: Scheduler | None = None
        self._groups: OrderedDict[str, _Group] = OrderedDict()
        #: Flagged and still running: key -> its report.
        self.current: dict[Any, dict[str, Any]] = {}
        #: Consumers flagged and still behind: consumer id -> its report.
        self.consumers: dict[str, dict[str, Any]] = {}
        self.slow: dict[str, dict[str, Any]] = {}
        self.reports: deque[dict[str, Any]] = deque(maxlen=MAX_REPORTS)
        #: (when, worker, straggler id, "task" | "consumer" | "writer")
        self._seen: deque[tuple[float, str, str, str]] = deque()
        #: (when, worker) of each task finished within SLOW_WINDOW, oldest first.
        self._finished: deque[tuple[float, str]] = deque()
        self._consumed: dict[tuple[str, str, int], _Consumer] = {}  # (stream, group, partition) -> it
        self.checks = 0
        self._running: dict[str, Any] = {}  # key text -> TaskState, of the last check
        #: Reports made, by (action, kind): running totals for the metrics (never cleared).
        self.counts: dict[tuple[str, str], int] = {}
        #: Consumers that can hand the rest of their range over (``map_records``):
        #: (stream, group, partition) -> the end of their own range (None: the
        #: partition's end) and when they last reported.
        self.ranges: dict[tuple[str, str, int], dict[str, Any]] = {}
        #: Takeovers decided and not yet told: consumer -> helper's worker and the rates.
        self.orders: dict[tuple[str, str, int], dict[str, Any]] = {}
        #: Helpers told to start and not yet over: key text -> what they took over.
        self.takeovers: dict[str, dict[str, Any]] = {}
        #: Sink writers behind their peers, and their hand-overs.
        self.sinks = SinkWriters(self)
        #: Keys of pushes given restrictions by :meth:`steer`, not yet run.
        self._steered: set[Any] = set()
        #: Keys of tasks that waited in a sync phase (a collective, a
        #: checkpoint): part of their time is a wait for others, by design,
        #: so they are neither judged nor counted in their group's times.
        self.synced: Container[Any] = ()

    # -- hooks (O(1)) ----------------------------------------------------------------------

    def task_ended(self, key: Any, start: str, finish: str, kwargs: dict[str, Any]) -> None:
        """A task left ``processing``: note its duration if it finished; close its report if flagged."""
        if start != "processing":
            return
        ts = self.scheduler.tasks.get(key) if self.scheduler is not None else None
        if finish in ("memory", "erred") and key in self._steered:
            # Its restrictions placed it; they must not outlive that: should
            # its worker die, Dask computes it again, and by then the
            # workers they name may all be gone (no-worker for good). On a
            # way back to waiting instead (its worker died before it ended),
            # it stays steered: check() lifts them if none is left.
            self._steered.discard(key)
            if ts is not None:
                ts.worker_restrictions = None
        if finish == "memory" and key not in self.synced:
            now = time.time()
            seconds = _compute_seconds(kwargs.get("startstops"))
            if seconds is not None and ts is not None:
                name = ts.group.name
                g = self._groups.get(name)
                if g is None:
                    g = self._groups[name] = _Group()
                    if len(self._groups) > MAX_GROUPS:
                        self._groups.popitem(last=False)
                else:
                    self._groups.move_to_end(name)
                g.add(kwargs.get("worker"), seconds, now)
            if kwargs.get("worker") is not None:
                self._finished.append((now, kwargs["worker"]))
        report = self.current.pop(key, None)
        copy = self.copies.pop(key_text(key), None) if self.copies else None
        if report is not None:
            outcome = "finished" if finish == "memory" else finish
            if copy is not None:
                outcome = copy.get("outcome") or ("original won" if finish == "memory" else outcome)
            self._report({**report, "outcome": outcome, "ended": time.time()})

    def steer(self, keys: list[Any]) -> int:
        """Keep new pushes of AIMSS operators off the workers found slow; how many were steered.

        Called from the ``update_graph`` hook, before Dask places them. A
        push (:data:`~aimss_dask.core.names.RUN_PUSH`) may run anywhere: its
        output is exactly-once wherever it runs. While a worker is flagged
        slow and speculation is on, a new push gets the other running
        workers as its restrictions: Dask moves its input off the slow
        worker instead of queueing the push there (where it would straggle
        and a copy would read and push its input again). Not loose ones:
        Dask's work stealing would hand them to the slow worker as soon as
        it sits idle. Should every worker allowed leave, :meth:`check`
        lifts them (:meth:`_unstick`). Pushes with restrictions of
        their own are left alone, and so are the user's tasks, even those
        declared speculative: they get copies when they straggle, nothing
        more (a flag that outlives a worker's slowness would cost them a
        worker).
        """
        if not self.slow or self.scheduler is None:
            return 0
        where = self._fast_workers()
        if where is None:
            return 0
        running, fast = where
        n = 0
        for key in keys:
            ts = self.scheduler.tasks.get(key)
            if ts is not None and ts.state in ("released", "waiting") and self._restrict(ts, fast):
                n += 1
        if len(self._steered) > MAX_STEERED:
            self._steered = {k for k in self._steered if k in self.scheduler.tasks}
        if n:
            self._report({
                "action": "steer", "tasks": n, "avoid": sorted(set(running) - set(fast)), "found": time.time(),
            })
        return n

    def _move_queued(self, worker: str) -> int:
        """Pushes queued on ``worker``, just found slow, that have not started: moved to fast workers; how many.

        Dask's work stealing moves them (``move_task_request``): the slow
        worker gives a task up only if it has not started it, so nothing
        runs twice; one that has started may get a copy instead. They are
        steered like new pushes, so that stealing never hands them back.
        """
        assert self.scheduler is not None
        stealing = self.scheduler.extensions.get("stealing")
        victim = self.scheduler.workers.get(worker)
        where = self._fast_workers()
        if stealing is None or victim is None or where is None:
            return 0
        running, fast = where
        # The least busy first, each move counted at its group's typical time.
        load = {a: float(running[a].occupancy) / max(running[a].nthreads, 1) for a in fast}
        n = 0
        for ts in list(victim.processing):
            if ts in victim.executing or not self._restrict(ts, fast):
                continue
            thief = min(fast, key=lambda a: (load[a], a))
            if stealing.move_task_request(ts, victim, running[thief]) in ("in-flight", "comm-closed"):
                continue
            g = self._groups.get(ts.group.name)
            load[thief] += (statistics.median(g.durations) if g is not None and g.durations else 1.0) / max(
                running[thief].nthreads, 1
            )
            n += 1
        if n:
            self._report({"action": "steer", "tasks": n, "avoid": [worker], "moved": True, "found": time.time()})
        return n

    def _fast_workers(self) -> tuple[dict[str, Any], list[str]] | None:
        """The running workers by address, and those not found slow; None: speculation off, or nothing to avoid."""
        assert self.scheduler is not None
        if not self.config.enabled:
            return None
        running = {a: ws for a, ws in self.scheduler.workers.items() if ws.status.name == "running"}
        fast = steer_off([w for w, entry in self.slow.items() if not entry.get("io")], running)
        return None if fast is None else (running, fast)

    def _restrict(self, ts: Any, fast: list[str]) -> bool:
        """Restrict push ``ts`` to ``fast`` and remember it; False (untouched) for a task that is no push or has restrictions of its own."""
        if (
            ts.worker_restrictions or ts.host_restrictions or ts.resource_restrictions
            or not calls_marked(ts.run_spec, RUN_PUSH)
        ):
            return False
        ts.worker_restrictions = set(fast)
        self._steered.add(ts.key)
        return True

    def _unstick(self) -> None:
        """Steered pushes that no worker they may use is left for (``no-worker``): any may run them now."""
        assert self.scheduler is not None
        stuck = {ts.key: "processing" for ts in self.scheduler.unrunnable if ts.key in self._steered}
        for key in stuck:
            self.scheduler.tasks[key].worker_restrictions = None
            self._steered.discard(key)
        if stuck:
            logger.info("aimss: %d push task(s) kept off slow workers may run on them again: no other is left", len(stuck))
            self.scheduler.transitions(stuck, stimulus_id=f"aimss-unsteer-{time.time()}")

    def copy_outcome(self, key: str, outcome: str) -> None:
        """How the race between a straggler and its copy ended, from the straggler's call."""
        copy = self.copies.get(key)
        if copy is not None:
            copy["outcome"] = outcome

    def clear(self) -> None:
        self._groups.clear()
        self.current.clear()
        self.consumers.clear()
        self.slow.clear()
        self._seen.clear()
        self._finished.clear()
        self.copies.clear()
        self._consumed.clear()
        self.ranges.clear()
        self.orders.clear()
        self.takeovers.clear()
        self.sinks.clear()
        self._steered.clear()

    # -- the periodic check -----------------------------------------------------------------

    def check(self) -> None:
        """Apply the rules to what runs now; report what is new (a periodic callback)."""
        try:
            if self.scheduler is None:
                return
            now = time.time()
            self.checks += 1
            if self._steered:
                self._unstick()
            tasks = self._task_stragglers(now)
            self._speculate(tasks)
            self._end_takeovers(now)
            consumers = self._consumer_stragglers(now)
            writers = self.sinks.check(now)
            kinds = {s.key: "consumer" for s in consumers} | {s.key: "writer" for s in writers}
            self._note_slow_workers(now, tasks + consumers + writers, kinds)
        except Exception:
            logger.exception("aimss: straggler check failed")

    def _task_stragglers(self, now: float) -> list[Straggler]:
        assert self.scheduler is not None
        cfg = self.config
        running: dict[str, list[Running]] = {}
        tasks: dict[str, Any] = {}
        for ws in self.scheduler.workers.values():
            since_beat = max(now - ws.last_seen, 0.0)
            for ts, elapsed in _running_on(ws):
                if ts.key in self.synced:
                    continue
                text = key_text(ts.key)
                tasks[text] = ts
                running.setdefault(ts.group.name, []).append(Running(text, ws.address, float(elapsed) + since_beat))
        self._running = tasks
        found: list[Straggler] = []
        for name, rs in running.items():
            g = self._groups.get(name)
            if g is None or not g.durations:
                continue
            total = len(tasks[rs[0].key].group)
            durations = list(g.durations)
            # On a worker already found slow, a task well past the group's
            # median will most likely be slow too: it is judged halfway
            # between 1x and multiplier x, so its copy starts sooner.
            on_slow = [r for r in rs if r.worker in self.slow]
            judged = quantile_rule(
                durations, total, [r for r in rs if r.worker not in self.slow],
                quantile=cfg.quantile, multiplier=cfg.multiplier, min_runtime=cfg.min_runtime,
            ) + [
                replace(s, rule="slow worker")
                for s in quantile_rule(
                    durations, total, on_slow, quantile=cfg.quantile, multiplier=(1.0 + cfg.multiplier) / 2,
                    min_runtime=cfg.min_runtime,
                )
            ]
            for s in judged:
                found.append(s)
                key = tasks[s.key].key
                if key not in self.current:
                    report = {
                        "action": "straggler", "kind": "task", "key": s.key, "group": name,
                        "worker": s.worker, "elapsed": round(s.elapsed, 3), "rule": s.rule,
                        "bound": round(s.bound, 3), "estimate": None, "copy": None,
                        "outcome": "running", "found": now,
                    }
                    self.current[key] = report
                    self._report(report)
                else:
                    self.current[key]["elapsed"] = round(s.elapsed, 3)
        return found

    def _speculate(self, found: list[Straggler]) -> None:
        """Copies of straggling tasks of functions declared idempotent, on fast workers, under the cap."""
        if not self.config.enabled or self._tell is None or not found:
            return
        assert self.scheduler is not None
        marked = [s for s in found if s.key not in self.copies and calls_marked(self._running[s.key].run_spec)]
        if not marked:
            return
        placed = place_copies(
            marked, self._views(), slow=self.slow, running_copies=self._copies_running(),
            max_fraction=self.config.max_fraction,
        )
        now = time.time()
        for s in marked:
            dest = placed.get(s.key)
            if dest is None or not self._tell(s.worker, {"op": "aimss_speculate", "key": s.key, "dest": dest}):
                continue
            self.copies[s.key] = {"worker": s.worker, "dest": dest, "since": now, "outcome": None}
            report = self.current.get(self._running[s.key].key)
            if report is not None:
                report["copy"] = dest
            self._report({
                "action": "copy", "key": s.key, "worker": s.worker, "dest": dest,
                "elapsed": round(s.elapsed, 3), "rule": s.rule, "found": now,
            })

    def _views(self) -> dict[str, WorkerView]:
        """What placement needs of each running worker."""
        assert self.scheduler is not None
        return {
            addr: WorkerView(
                ws.nthreads, min(len(ws.processing), ws.nthreads),
                max(ws.memory_limit - ws.nbytes, 0) if ws.memory_limit else 2**62,
                self._free_in(ws),
            )
            for addr, ws in self.scheduler.workers.items()
            if ws.status.name == "running"
        }

    def _copies_running(self) -> int:
        """Copies, takeover helpers and sink hand-overs under way or decided: what counts against the cap."""
        return len(self.copies) + len(self.takeovers) + len(self.orders) + len(self.sinks.handovers)

    def _free_in(self, ws: Any) -> float:
        """Seconds until ``ws`` should have a free thread: its running tasks' shortest typical time left."""
        running = _running_on(ws)
        if len(running) < ws.nthreads:
            return 0.0
        left = []
        for ts, elapsed in running:
            g = self._groups.get(ts.group.name)
            if g is None or not g.durations:
                continue
            left.append(max(statistics.median(g.durations) - float(elapsed), 0.0))
        return min(left) if left else float("inf")

    def _consumer_stragglers(self, now: float) -> list[Straggler]:
        cfg = self.config
        peers: dict[tuple[str, str], list[Progress]] = {}
        ids: dict[str, tuple[str, str, int]] = {}
        live: set[tuple[str, str, int]] = set()
        # A group is committed only when its first consumer is done: until
        # then its consumers are known by their reports alone, and are
        # judged as well (a map_records call's consumers from their start).
        known: dict[str, dict[str, list[int]]] = {n: dict(gs) for n, gs in self.state.groups.items()}
        for name, group, _ in self.ranges:
            spec = self.state.streams.get(name)
            if spec is not None and group not in known.setdefault(name, {}):
                known[name][group] = [0] * spec.partitions
        for name, groups in known.items():
            spec = self.state.streams.get(name)
            if spec is None:
                continue
            bounds = self.state.bounds.get(name, {})
            for group, offsets in groups.items():
                for p, off in enumerate(offsets):
                    k = (name, group, p)
                    live.add(k)
                    cid = f"{name}/{group}/{p}"
                    end = bounds.get(p, (0, off))[1]
                    mine = self.ranges.get(k)
                    if mine is not None:
                        # A consumer that reports its own progress: exact,
                        # even for one that finished between two checks.
                        ids[cid] = k
                        peers.setdefault((name, group), []).append(
                            _reported(cid, mine["worker"] or spec.owners[p], mine, end, now)
                        )
                        continue
                    c = self._consumed.get(k)
                    if c is None:
                        c = self._consumed[k] = _Consumer()
                    c.observe(now, off)
                    done = end <= off
                    # A consumer that is done is a peer however few commits
                    # it made (a fast one may finish within a few).
                    if c.started is None or (c.commits < MIN_COMMITS and not done):
                        continue
                    peers.setdefault((name, group), []).append(Progress(
                        cid, spec.owners[p], now - c.started, float(off),
                        float(max(end - off, 0)), c.rate(now, off, done),
                    ))
        for k in [k for k in self._consumed if k not in live]:
            del self._consumed[k]
        for k in [k for k, r in self.ranges.items() if k not in live or now - r["seen"] > RANGE_STALE]:
            del self.ranges[k]
            self.orders.pop(k, None)
        found: list[Straggler] = []
        flagged: set[str] = set()
        for (name, group), work in peers.items():
            late = late_rule(work, multiplier=cfg.multiplier, min_runtime=cfg.min_runtime)
            for s in late:
                found.append(s)
                flagged.add(s.key)
                if s.key not in self.consumers:
                    report = late_report(s, "consumer", now, stream=name, group=group)
                    self.consumers[s.key] = report
                    self._report(report)
            self._take_over(late, work, ids, now)
        for cid in [c for c in self.consumers if c not in flagged]:
            # Caught up with its peers (or done): the report closes.
            report = self.consumers.pop(cid)
            gone = report["stream"] not in self.state.streams
            outcome = (
                "stream destroyed" if gone
                else f"helper took over from offset {report['takeover'][0]}" if report.get("takeover")
                else "caught up"
            )
            self._report({**report, "outcome": outcome, "ended": now})
        return found

    # -- takeovers of consumers' ranges -------------------------------------------------------

    def _take_over(
        self, late: list[Straggler], work: list[Progress], ids: dict[str, tuple[str, str, int]], now: float
    ) -> None:
        """Decide helpers for straggling consumers that can split their range, under the cap.

        The decision waits in :attr:`orders` for the consumer's next progress
        report (:meth:`consumer_progress`), which alone knows its exact
        offset; one not taken within ``ORDER_TTL`` is dropped (the consumer
        is waiting for its helpers, or gone), so that it holds no place
        under the cap. A consumer whose split would leave its helper nothing
        worth starting gets none.
        """
        for k in [k for k, o in self.orders.items() if now - o["since"] > ORDER_TTL]:
            del self.orders[k]
        if not self.config.enabled or self.scheduler is None:
            return
        speeds = {p.key: p.speed for p in work}
        able = []
        for s in late:
            k = ids[s.key]
            r = self.ranges.get(k)
            others = [v for c, v in speeds.items() if c != s.key and v > 0]
            if r is None or k in self.orders or r["done"] or not others:
                continue
            helper_rate = statistics.median(others)
            if split_point(r["offset"], self._range_end(k, r["stop"]), speeds[s.key], helper_rate,
                           TAKEOVER_STARTUP) is None:
                continue
            able.append((s, k, helper_rate))
        if not able:
            return
        placed = place_copies(
            [s for s, _, _ in able], self._views(), slow=self.slow, running_copies=self._copies_running(),
            max_fraction=self.config.max_fraction,
        )
        for s, k, helper_rate in able:
            dest = placed.get(s.key)
            if dest is not None:
                self.orders[k] = {
                    "dest": dest, "rate": speeds[s.key], "helper_rate": helper_rate, "rule": "late",
                    "cid": s.key, "worker": s.worker, "elapsed": s.elapsed, "since": now,
                }

    def _range_end(self, k: tuple[str, str, int], stop: int | None) -> int:
        """Where consumer ``k``'s own range ends as far as known: its stop, else its partition's end."""
        name, _, p = k
        end = self.state.bounds.get(name, {}).get(p, (0, 0))[1]
        return end if stop is None else min(end, stop)

    def _on_slow_worker(self, cid: str, worker: str, now: float) -> dict[str, Any] | None:
        """An order for a consumer that starts on a worker found slow: hand everything over, if a place is free."""
        placed = place_copies(
            [Straggler(cid, worker, 0.0, "slow worker", 0.0)], self._views(), slow=self.slow,
            running_copies=self._copies_running(), max_fraction=self.config.max_fraction,
        )
        dest = placed.get(cid)
        if dest is None:
            return None
        # It would go at no speed at all, compared with the helper's.
        return {
            "dest": dest, "rate": 0.0, "helper_rate": 1.0, "rule": "slow worker",
            "cid": cid, "worker": worker, "elapsed": 0.0, "since": now,
        }

    def consumer_progress(
        self,
        name: str,
        group: str,
        partition: int,
        offset: int,
        *,
        start: int,
        elapsed: float,
        stop: int | None,
        done: bool,
        worker: str | None = None,
    ) -> dict[str, Any]:
        """A consumer that can split its range reports (from its task): a takeover order, or ``{}``.

        ``offset``: the next record it will consume (it consumes nothing until
        the answer comes, so a split at or past it is exact); ``start``: where
        it started, ``elapsed`` seconds ago; ``stop``: the end of its own
        range, None for the partition's end; ``done``: it has finished (its
        rate stays, for its peers); ``worker``: where it runs. A consumer
        that starts on a worker found slow hands its whole range over at
        once, where a place is free under the cap (LATE: no work on a slow
        node). The answer, when a takeover was decided: ``split`` (the
        consumer stops there), ``dest`` (the helper's worker) and ``key``
        (the helper task's key, which the coordinator follows).
        """
        k = (name, group, partition)
        now = time.time()
        self.ranges[k] = {
            "stop": stop, "seen": now, "start": start, "offset": offset, "elapsed": elapsed, "done": done,
            "worker": worker,
        }
        if done or not self.config.enabled:
            self.orders.pop(k, None)
            return {}
        cid = f"{name}/{group}/{partition}"
        order = self.orders.pop(k, None)
        if order is None and offset == start and stop is None and worker in self.slow:
            order = self._on_slow_worker(cid, worker, now)
        if order is None:
            return {}
        split = split_point(offset, self._range_end(k, stop), order["rate"], order["helper_rate"], TAKEOVER_STARTUP)
        if split is None:
            return {}
        key = (f"{TAKEOVER_TASK_PREFIX}{uuid.uuid4().hex}", name, partition, split)
        self.takeovers[key_text(key)] = {
            "key": key, "cid": cid, "dest": order["dest"], "range": [split, stop], "since": now, "seen": False,
        }
        report = self.consumers.get(cid)
        if report is not None:
            report["copy"] = order["dest"]
            report["takeover"] = [split, stop]
        self._report({
            "action": "copy", "kind": "consumer", "key": cid, "worker": order["worker"],
            "dest": order["dest"], "elapsed": round(order["elapsed"], 3), "rule": order["rule"],
            "range": [split, stop], "found": now,
        })
        return {"split": split, "dest": order["dest"], "key": list(key)}

    def view(self) -> dict[str, Any]:
        """What a loader needs to back up late reads (:mod:`aimss_dask.source.hedge`): settings, cap, slow workers."""
        cfg = self.config
        threads = sum(ws.nthreads for ws in self.scheduler.workers.values()) if self.scheduler is not None else 0
        return {
            "enabled": cfg.enabled, "multiplier": cfg.multiplier, "min_runtime": cfg.min_runtime,
            "cap": copy_cap(threads, cfg.max_fraction), "slow": sorted(self.slow),
        }

    def loader_copies(
        self, stream: str, owner: str, dest: str, copies: int, won: int, elapsed: float, rule: str
    ) -> None:
        """A loader backed up ``copies`` late takes of ``owner`` on ``dest``; ``won``: the backup answered first."""
        self._report({
            "action": "copy", "kind": "loader", "key": f"{stream}@{owner}", "stream": stream, "worker": owner,
            "dest": dest, "elapsed": round(float(elapsed), 3), "rule": rule, "copies": int(copies),
            "outcome": f"copy won {int(won)} of {int(copies)}", "found": time.time(),
        })

    def forget_group(self, name: str, group: str) -> None:
        """Group ``group`` of ``name`` is over (a map_records call's own): forget its consumers' reports."""
        for k in [k for k in self.ranges if k[0] == name and k[1] == group]:
            del self.ranges[k]
            self.orders.pop(k, None)

    def consumers_done(self, name: str, group: str, partitions: int) -> bool:
        """Whether the consumers of every partition of ``group`` reported that they are done."""
        ranges = [self.ranges.get((name, group, p)) for p in range(partitions)]
        return all(r is not None and r["done"] for r in ranges)

    def _end_takeovers(self, now: float) -> None:
        """Forget helpers that are over (or never started): they no longer count against the cap."""
        assert self.scheduler is not None
        for text, t in list(self.takeovers.items()):
            ts = self.scheduler.tasks.get(t["key"])
            if ts is not None:
                t["seen"] = True
                # Not "released": a task submitted a moment ago passes through it.
                if ts.state not in ("memory", "erred", "forgotten"):
                    continue
            elif not t["seen"] and now - t["since"] < TAKEOVER_APPEAR:
                continue
            del self.takeovers[text]

    def _note_slow_workers(self, now: float, found: list[Straggler], kinds: Mapping[str, str] | None = None) -> None:
        """Flag workers slow, or fast again, from stragglers ``found`` and recent task times.

        ``kinds``: straggler key -> ``"consumer"`` or ``"writer"`` (a sink
        writer); any other is a task's.
        """
        kinds = kinds or {}
        seen_ids = {(w, k) for _, w, k, _ in self._seen}
        for s in found:
            if (s.worker, s.key) not in seen_ids:
                self._seen.append((now, s.worker, s.key, kinds.get(s.key, "task")))
        while self._seen and now - self._seen[0][0] > SLOW_WINDOW:
            self._seen.popleft()
        while self._finished and now - self._finished[0][0] > SLOW_WINDOW:
            self._finished.popleft()
        counts: dict[str, int] = {}
        tasks: dict[str, int] = {}  # task stragglers per worker
        consuming: set[str] = set()  # workers where a consumer straggled
        for _, w, _, kind in self._seen:
            counts[w] = counts.get(w, 0) + 1
            if kind == "consumer":
                consuming.add(w)
            elif kind == "task":
                tasks[w] = tasks.get(w, 0) + 1
        finished: dict[str, int] = {}
        for _, w in self._finished:
            finished[w] = finished.get(w, 0) + 1
        for w, n in tasks.items():
            # A few task stragglers among many tasks are no sign (see SLOW_SHARE);
            # consumers' and sink writers' stragglers count as they are.
            if n < SLOW_SHARE * max(finished.get(w, 0), n):
                counts[w] -= n
        # Groups that ran within the window only: a worker flagged by its
        # tasks' times gets no new runs' work, so its old times would
        # otherwise keep it flagged until other groups pushed them out.
        recent = [
            (name, g) for name, g in list(self._groups.items())[-SLOW_GROUPS:][::-1]  # newest first
            if now - g.last <= SLOW_WINDOW
        ]
        durations = {name: {w: list(ds) for w, ds in g.by_worker.items()} for name, g in recent}
        assert self.scheduler is not None
        floor = SLOW_FLOOR * self.config.min_runtime
        slow = slow_workers(
            counts, durations, multiplier=self.config.multiplier, floor=floor, workers=self.scheduler.workers
        ) & set(self.scheduler.workers)
        for w in slow & set(self.slow):
            self.slow[w]["seen"] = now
        now_slow = slowness(durations, floor)
        # Slow is slower than most: never a majority of the workers. Where
        # most look slow, the "typical" time is the odd one (a worker whose
        # tasks hit a warm cache, say); flagging them would leave new runs
        # one worker and copies no helper. The slowest come first, and one
        # slower than a worker flagged by its tasks takes its place.
        room = max_slow(len(self.scheduler.workers))
        for w in sorted(slow - set(self.slow), key=lambda w: -now_slow.get(w, 0.0)):
            if sum(v in self.scheduler.workers for v in self.slow) >= room:
                weakest = min(
                    (v for v in self.slow if self.slow[v].get("by") == "tasks" and v in self.scheduler.workers),
                    key=lambda v: now_slow.get(v, 0.0), default=None,
                )
                if weakest is None or now_slow.get(weakest, 0.0) >= now_slow.get(w, 0.0):
                    break
                del self.slow[weakest]
            x = now_slow.get(w, 0.0)
            by_tasks = x > self.config.multiplier
            report = {
                "action": "slow-worker", "worker": w, "stragglers": counts.get(w, 0),
                "why": (
                    f"its recent tasks took {x:.1f}x the same groups' typical time" if x > self.config.multiplier
                    else f"{counts.get(w, 0)} stragglers in {SLOW_WINDOW:g} s, more than most workers"
                ),
                "found": now,
            }
            self.slow[w] = {**report, "seen": now, "by": "tasks" if by_tasks else "stragglers"}
            self._report(report)
        fast_again = (1.0 + self.config.multiplier) / 2
        for w, entry in self.slow.items():
            # Slow only at writing: its sink writers straggle while its tasks
            # take as long as anyone's (a slow disk). Its pushes stay: they
            # are computing, and steering them off would cost its CPU. Its
            # tasks' times decide, not their stragglers: a task that waits
            # for its writes (a sink's finish) straggles on a slow disk too.
            # Without timed tasks of its own, or with a consumer behind, it
            # may be slow at computing: not this.
            moved = not entry.get("io", True)  # found slow at computing before: its queue moved then
            entry["io"] = (
                entry.get("by") != "tasks" and w not in consuming
                and now_slow.get(w, fast_again) < fast_again
            )
            if not moved and not entry["io"]:
                self._move_queued(w)
        # A worker found slow by its tasks stays flagged until its recent
        # tasks show it is fast again: typically under halfway between 1x and
        # multiplier x (a margin, or a worker near the bound would flip at
        # every check and runs placed meanwhile would land on it). One found
        # slow by its stragglers (a slow disk shows in its sink writers, not
        # in its tasks' times) stays flagged while that evidence lasts. Either
        # way, for SLOW_WINDOW at most without any sign, or until it leaves.
        for w in set(self.slow) - slow:
            by_tasks = self.slow[w].get("by") == "tasks"
            if (
                (by_tasks and now_slow.get(w, fast_again) < fast_again)
                or now - self.slow[w]["seen"] > SLOW_WINDOW
                or w not in self.scheduler.workers
            ):
                del self.slow[w]

    # -- reporting ----------------------------------------------------------------------------

    def _report(self, report: dict[str, Any]) -> None:
        self.reports.append(report)
        if report["action"] != "straggler" or report.get("outcome") == "running":
            # New ones only (a straggler's report comes again when it ends).
            what = (report["action"], report.get("kind") or "worker")
            self.counts[what] = self.counts.get(what, 0) + 1
        if report["action"] == "slow-worker":
            logger.warning("aimss: worker %s is slow (%s)", report["worker"], report["why"])
        elif report["action"] == "steer":
            logger.info(
                "aimss: %d %s push task(s) run off slow worker(s) %s",
                report["tasks"], "queued" if report.get("moved") else "new", report["avoid"],
            )
        elif report["action"] == "copy" and report.get("kind") == "sink-writer":
            logger.warning(
                "aimss: sink writer %s (on %s, %.1f s writing) hands %d bytes of its queue over to %s",
                report["key"], report["worker"], report["elapsed"], report["bytes"], report["dest"],
            )
        elif report["action"] == "copy" and report.get("kind") == "loader":
            logger.warning(
                "aimss: a loader of %s backed up %d late reads of %s on %s (%s)",
                report["stream"], report["copies"], report["worker"], report["dest"], report["outcome"],
            )
        elif report["action"] == "copy":
            logger.warning(
                "aimss: a copy of straggler %s (on %s, %.1f s running) starts on %s",
                report["key"], report["worker"], report["elapsed"], report["dest"],
            )
        elif report["outcome"] == "running":
            what = {"task": "task", "sink-writer": "sink writer"}.get(report["kind"], "consumer")
            logger.warning(
                "aimss: %s %s on %s is a straggler: %.1f s running (%s rule: %s %.1f s)",
                what, report["key"], report["worker"], report["elapsed"], report["rule"],
                "time left over" if report["rule"] == "late" else "bound", report["bound"],
            )
        else:
            logger.info("aimss: straggler %s on %s: %s", report["key"], report["worker"], report["outcome"])
        if self.scheduler is not None:
            self.scheduler.log_event(STRAGGLER_TOPIC, dict(report))

    def avoid(self, workers: list[str]) -> list[str]:
        """``workers`` without the slow ones, where speculation is on and a fast one remains.

        Where new work is placed (a run's partitions): a worker found slow
        would make every reader of what it owns wait, and no copy can take
        a partition's reads elsewhere.
        """
        if not self.config.enabled or not self.slow:
            return workers
        fast = [w for w in workers if w not in self.slow]
        return fast or workers

    def summary(self) -> dict[str, Any]:
        """For ``status()``: stragglers running now, consumers behind, slow workers, helpers running, recent reports."""
        return {
            "tasks": [dict(r) for r in self.current.values()],
            "consumers": [dict(r) for r in self.consumers.values()],
            "slow_workers": sorted(self.slow),
            # Of those, the ones slow only at writing (they still run pushes).
            "slow_at_writing": sorted(w for w, entry in self.slow.items() if entry.get("io")),
            "takeovers": [
                {"consumer": t["cid"], "dest": t["dest"], "range": list(t["range"])} for t in self.takeovers.values()
            ],
            "sink_writers": self.sinks.summary(),
            "reports": [dict(r) for r in self.reports],
        }
