"""Which tasks and consumers are stragglers, which workers are slow, where copies go: pure functions.

Two rules, both from the literature (see ``aimss.speculation`` in the config):

- :func:`quantile_rule`, Spark's: once ``quantile`` of a task group is
  done, a running task of the group that has run longer than ``multiplier``
  times the median duration of the finished ones (and at least
  ``min_runtime``) is a straggler.
- :func:`late_rule`, LATE's (OSDI'08): for work that reports progress (a
  stream consumer's committed offsets, an operator task's rows), the
  estimated time left is ``left / rate``. A straggler is slower than the
  ``SLOW_RATE_QUANTILE`` of its peers' rates and has more than
  ``multiplier`` times their median time left; the longest time left first.

:func:`slow_workers` tells slow *workers* (several stragglers, or finished
tasks far slower than the same group's elsewhere) from slow *tasks*, and
:func:`place_copies` puts copies on free, fast workers under the cap, and
:func:`split_point` says where a slow consumer hands the rest of its range
to a helper.
Everything here is plain data in, plain data out: the coordinator
(:mod:`~aimss_dask.coordinator.stragglers`) gathers the data and acts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RECENT_GROUPS",
    "SLOW_RATE_QUANTILE",
    "SLOW_WORKER_STRAGGLERS",
    "Progress",
    "Running",
    "Straggler",
    "WorkerView",
    "copy_cap",
    "late_report",
    "late_rule",
    "place_copies",
    "quantile_rule",
    "slow_workers",
    "slowness",
    "split_point",
    "steer_off",
]

#: LATE's SlowTaskThreshold: only work whose rate is below this quantile of
#: its peers' rates can be a straggler.
SLOW_RATE_QUANTILE = 0.25

#: Distinct stragglers seen on one worker (within the caller's window) that
#: make it a slow worker.
SLOW_WORKER_STRAGGLERS = 2


@dataclass(frozen=True)
class Running:
    """A task that runs now: its key, worker and seconds it has run."""

    key: str
    worker: str
    elapsed: float


@dataclass(frozen=True)
class Progress:
    """Work that reports progress: ``done`` and ``left`` in its own units, ``rate`` in units per second.

    ``rate`` None: ``done / elapsed`` (the average since it started).

    >>> Progress("c", "w", elapsed=10, done=50, left=150).time_left
    30.0
    """

    key: str
    worker: str
    elapsed: float
    done: float
    left: float
    rate: float | None = None

    @property
    def speed(self) -> float:
        if self.rate is not None:
            return max(self.rate, 0.0)
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def time_left(self) -> float:
        if self.left <= 0:
            return 0.0
        speed = self.speed
        return self.left / speed if speed > 0 else math.inf


@dataclass(frozen=True)
class Straggler:
    """One straggler: what, where, how long it ran, which rule fired and its bound.

    ``bound``: the elapsed time the quantile rule allowed, or the time left
    the LATE rule allowed; ``estimate``: the straggler's own time left
    (LATE), else None.
    """

    key: str
    worker: str
    elapsed: float
    rule: str
    bound: float
    estimate: float | None = None


def quantile_rule(
    done: Sequence[float],
    total: int,
    running: Iterable[Running],
    *,
    quantile: float,
    multiplier: float,
    min_runtime: float,
) -> list[Straggler]:
    """Spark's rule over one task group; longest-running first.

    ``done``: durations of the group's finished tasks; ``total``: tasks in
    the group. Nothing is a straggler before ``ceil(quantile * total)``
    tasks are done; then one that has run longer than ``max(min_runtime,
    multiplier * median(done))``.

    >>> quantile_rule([1.0, 1.0, 1.2], 4, [Running("t3", "w2", 5.0)], quantile=0.75, multiplier=2, min_runtime=0)
    [Straggler(key='t3', worker='w2', elapsed=5.0, rule='quantile', bound=2.0, estimate=None)]
    """
    if total <= 0 or not done or len(done) < max(1, math.ceil(quantile * total - 1e-9)):
        return []
    bound = max(min_runtime, multiplier * statistics.median(done))
    out = [Straggler(r.key, r.worker, r.elapsed, "quantile", bound) for r in running if r.elapsed > bound]
    return sorted(out, key=lambda s: (-s.elapsed, s.key))


def late_rule(peers: Sequence[Progress], *, multiplier: float, min_runtime: float) -> list[Straggler]:
    """LATE's rule over peers (the consumers of one group, or one operator's tasks); longest time left first.

    A straggler has run at least ``min_runtime``, has work left, a rate
    strictly below the ``SLOW_RATE_QUANTILE`` of the peers' rates and below
    their median over ``multiplier``, and a time left strictly above
    ``multiplier`` times the peers' median: with equal rates nothing is a
    straggler, and rates that differ by noise neither (once most peers are
    done their median time left is 0, and only the rate tells). Work that has not started (nothing
    done yet) is waiting, not slow: it is not judged.

    >>> peers = [Progress(f"c{i}", f"w{i}", 10, 90, 10) for i in range(3)] + [Progress("c3", "w3", 10, 10, 90)]
    >>> [s.key for s in late_rule(peers, multiplier=2, min_runtime=1)]
    ['c3']
    """
    # Finished peers count however briefly they ran: consumers of a few
    # records each may all finish before ``min_runtime``, but the one left
    # behind is judged against them.
    judged = [p for p in peers if p.done > 0 and (p.elapsed >= min_runtime or p.left <= 0)]
    if len(judged) < 2:
        return []
    speeds = sorted(p.speed for p in judged)
    slow_below = min(_quantile(speeds, SLOW_RATE_QUANTILE), statistics.median(speeds) / multiplier)
    bound = multiplier * statistics.median(p.time_left for p in judged)
    out = [
        Straggler(p.key, p.worker, p.elapsed, "late", bound, p.time_left)
        for p in judged
        if p.left > 0 and p.speed < slow_below and p.time_left > bound
    ]
    return sorted(out, key=lambda s: (-(s.estimate or 0.0), s.key))


def late_report(s: Straggler, kind: str, now: float, **where: Any) -> dict[str, Any]:
    """The report of a new straggler found by :func:`late_rule` (``where``: its stream, group or run).

    >>> late_report(Straggler("c", "w", 2.0, "late", 1.0, 3.0), "consumer", 0.0, stream="s")["outcome"]
    'running'
    """
    return {
        "action": "straggler", "kind": kind, "key": s.key, **where, "worker": s.worker,
        "elapsed": round(s.elapsed, 3), "rule": s.rule, "bound": round(s.bound, 3),
        "estimate": round(s.estimate or 0.0, 3), "copy": None, "outcome": "running", "found": now,
    }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ascending values, interpolated linearly."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def slow_workers(
    stragglers_seen: Mapping[str, int],
    durations: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    multiplier: float,
    floor: float = 0.0,
    workers: Iterable[str] = (),
) -> set[str]:
    """Workers that are slow, not just one of their tasks.

    ``stragglers_seen``: worker -> distinct stragglers flagged there lately;
    ``SLOW_WORKER_STRAGGLERS`` of them make it slow, if that is more than
    twice the median over ``workers`` (and those seen), none counting zero:
    stragglers spread over many workers are a group's spread of durations,
    not a slow worker. ``durations``: task
    group -> worker -> durations of the group's finished tasks there,
    newest group first; a worker whose :func:`slowness` exceeds
    ``multiplier`` is slow: its recent tasks took that much longer, in all,
    than the same groups' tasks typically take (with one thread per worker,
    it never runs two stragglers at once).

    >>> sorted(slow_workers({}, {"g": {"a": [1, 1], "b": [1, 1], "c": [4, 5]}}, multiplier=2))
    ['c']
    """
    everyone = set(workers) | set(stragglers_seen)
    typical = statistics.median(stragglers_seen.get(w, 0) for w in everyone) if everyone else 0
    slow = {w for w, n in stragglers_seen.items() if n >= SLOW_WORKER_STRAGGLERS and n > 2 * typical}
    slow.update(w for w, x in slowness(durations, floor).items() if x > multiplier)
    return slow


#: Task groups, a worker's most recent ones, that :func:`slowness` weighs: a
#: worker slowed down (or sped up) shows it within a few groups, not after
#: its whole history is replaced.
RECENT_GROUPS = 4


def slowness(durations: Mapping[str, Mapping[str, Sequence[float]]], floor: float = 0.0) -> dict[str, float]:
    """Worker -> how much longer its tasks took than the same groups' typical task, time-weighted.

    ``durations``: task group -> worker -> durations of the group's
    finished tasks there, newest group first. Over the ``RECENT_GROUPS``
    newest groups where a worker ran at least two tasks: the time it spent
    over ``tasks x the group's median`` (over all workers), so the groups
    where it spent its time weigh the most. A group counts only where its
    median or the worker's exceeds ``floor`` seconds: tasks of milliseconds
    differ by scheduling noise, on a busy machine many times over, and say
    nothing of the worker.

    >>> slowness({"g": {"a": [1, 1], "c": [3, 3]}, "tiny": {"a": [.001, .001], "c": [.004, .004]}}, floor=.1)
    {'a': 0.5, 'c': 1.5}
    """
    spent: dict[str, float] = {}
    typical: dict[str, float] = {}
    groups: dict[str, int] = {}
    for by_worker in durations.values():
        every = [d for ds in by_worker.values() for d in ds]
        if not every:
            continue
        median = statistics.median(every)
        for worker, mine in by_worker.items():
            if len(mine) < 2 or groups.get(worker, 0) >= RECENT_GROUPS or median <= 0:
                continue
            if max(statistics.median(mine), median) <= floor:
                continue
            groups[worker] = groups.get(worker, 0) + 1
            spent[worker] = spent.get(worker, 0.0) + sum(mine)
            typical[worker] = typical.get(worker, 0.0) + len(mine) * median
    return {w: spent[w] / typical[w] for w in spent}


def split_point(offset: int, end: int, rate: float, helper_rate: float, startup: float = 0.0) -> int | None:
    """Where a consumer at ``offset`` of a range ending at ``end`` stops and a helper takes over, or None.

    The consumer goes on at ``rate`` records per second; the helper, which
    starts ``startup`` seconds from now, reads the rest at ``helper_rate``.
    The split is where both are expected to finish together: the consumer
    keeps ``k`` records with ``k / rate = (n - k) / helper_rate + startup``
    (``n = end - offset``), rounded up so that it never keeps less than its
    share. None where handing over would not save time: nothing is left,
    the helper is no faster, or its share would be empty. A consumer that
    has stopped (``rate`` 0) keeps nothing.

    >>> split_point(100, 1100, rate=1.0, helper_rate=4.0)
    300
    >>> split_point(0, 10, rate=4.0, helper_rate=4.0) is None
    True
    """
    n = end - offset
    if n <= 0 or helper_rate <= 0 or helper_rate <= rate:
        return None
    if rate <= 0:
        return offset
    k = math.ceil((n / helper_rate + max(startup, 0.0)) / (1.0 / rate + 1.0 / helper_rate) - 1e-9)
    if k >= n:
        return None
    return offset + k


@dataclass(frozen=True)
class WorkerView:
    """What placement needs to know of a worker: threads, threads busy, bytes free.

    ``free_in``: seconds until one of its threads is expected to be free
    (its running tasks' typical time left); 0 when one is free now.
    """

    threads: int
    busy: int
    free_bytes: int
    free_in: float = 0.0


def copy_cap(threads: int, max_fraction: float) -> int:
    """Copies that may run at once: ``floor(max_fraction * threads)``.

    >>> copy_cap(4, 0.25), copy_cap(3, 0.25), copy_cap(100, 0.1)
    (1, 0, 10)
    """
    return math.floor(max_fraction * threads + 1e-9)


def steer_off(slow: Iterable[str], workers: Iterable[str]) -> list[str] | None:
    """Where a new push should run: ``workers`` that are not ``slow``.

    None: leave it to Dask (no worker is slow, or none but slow ones run).
    LATE never gives a slow node a copy; by the same reasoning a node known
    to be slow gets no new push, which can run anywhere, rather than each of
    its pushes straggling before a copy wins back part of the time lost.

    >>> steer_off({"b"}, ["a", "b", "c"]), steer_off(set(), ["a"]), steer_off({"a"}, ["a"])
    (['a', 'c'], None, None)
    """
    slow = set(slow)
    workers = list(workers)
    fast = sorted(w for w in workers if w not in slow)
    if not fast or len(fast) == len(workers):
        return None
    return fast


def place_copies(
    stragglers: Sequence[Straggler],
    workers: Mapping[str, WorkerView],
    *,
    slow: Iterable[str],
    running_copies: int,
    max_fraction: float,
    need_bytes: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Straggler key -> worker for its copy, in the order given, under the cap.

    At most ``copy_cap(all threads, max_fraction) - running_copies`` new
    copies. A copy never goes to its straggler's worker, to a ``slow``
    worker, or to one with fewer free log bytes than ``need_bytes[key]``
    (0 if not given); among the others, to one with a free thread (the
    most free threads first), else to the one expected to free a thread
    soonest (``free_in``: a copy waits for a thread, first in line), then
    the most free bytes, then the lowest address. A worker takes at most as
    many copies as it has free threads (at least one).

    >>> ws = {"a": WorkerView(1, 1, 10), "b": WorkerView(1, 0, 10), "c": WorkerView(1, 0, 10)}
    >>> place_copies([Straggler("t", "a", 9, "quantile", 2)], ws, slow={"c"}, running_copies=0, max_fraction=0.5)
    {'t': 'b'}
    """
    slow = set(slow)
    need = need_bytes or {}
    room = copy_cap(sum(w.threads for w in workers.values()), max_fraction) - running_copies
    taken: dict[str, int] = {}
    out: dict[str, str] = {}
    for s in stragglers:
        if room <= 0:
            break
        if s.key in out:
            continue
        best: tuple[float, int, int, str] | None = None
        for addr, w in workers.items():
            if addr == s.worker or addr in slow or w.free_bytes < need.get(s.key, 0):
                continue
            if taken.get(addr, 0) >= max(w.threads - w.busy, 1):
                continue
            free = w.threads - w.busy - taken.get(addr, 0)
            rank = (0.0 if free > 0 else w.free_in, -free, -w.free_bytes, addr)
            if best is None or rank < best:
                best = rank
        if best is None:
            continue
        out[s.key] = best[3]
        taken[best[3]] = taken.get(best[3], 0) + 1
        room -= 1
    return out
