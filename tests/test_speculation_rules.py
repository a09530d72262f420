"""The straggler rules and the placement of copies (:mod:`aimss_dask.coordinator.speculation`): examples and invariants."""

from __future__ import annotations

import doctest
import math
import statistics

from dask.task_spec import Task
from hypothesis import given, settings
from hypothesis import strategies as st

from aimss_dask.coordinator import speculation as sp
from aimss_dask.coordinator.speculation import (
    RECENT_GROUPS,
    Progress,
    Running,
    Straggler,
    WorkerView,
    copy_cap,
    late_rule,
    place_copies,
    quantile_rule,
    slow_workers,
    slowness,
    split_point,
    steer_off,
)

durations = st.floats(min_value=0.01, max_value=100, allow_nan=False)
addresses = st.sampled_from([f"tcp://10.0.0.{i}:1" for i in range(6)])


def test_the_examples_in_the_docstrings_hold():
    result = doctest.testmod(sp)
    assert result.attempted >= 6 and result.failed == 0


def test_quantile_rule_waits_for_the_quantile_then_flags_past_multiplier_times_the_median():
    running = [Running("slow", "w3", 7.0), Running("fine", "w1", 1.5)]
    # 2 of 4 done: below the 0.75 quantile, nothing is judged however long it ran.
    assert quantile_rule([1.0, 1.0], 4, running, quantile=0.75, multiplier=2, min_runtime=0) == []
    got = quantile_rule([1.0, 1.0, 1.0], 4, running, quantile=0.75, multiplier=2, min_runtime=0)
    assert [(s.key, s.worker, s.rule, s.bound) for s in got] == [("slow", "w3", "quantile", 2.0)]
    # min_runtime raises the bound where the median is short.
    assert quantile_rule([1.0, 1.0, 1.0], 4, running, quantile=0.75, multiplier=2, min_runtime=8) == []


@settings(max_examples=200, deadline=None)
@given(
    d=durations,
    n_done=st.integers(1, 30),
    n_running=st.integers(0, 10),
    quantile=st.floats(0.05, 1.0),
    multiplier=st.floats(1.0, 5.0),
    min_runtime=st.floats(0, 5),
)
def test_equal_durations_never_make_a_straggler(d, n_done, n_running, quantile, multiplier, min_runtime):
    # Tasks that all take d: one still running has run at most d.
    running = [Running(f"r{i}", "w", d) for i in range(n_running)]
    assert quantile_rule([d] * n_done, n_done + n_running, running,
                         quantile=quantile, multiplier=multiplier, min_runtime=min_runtime) == []
    peers = [Progress(f"c{i}", f"w{i}", elapsed=d, done=d, left=d) for i in range(n_done)]
    assert late_rule(peers, multiplier=multiplier, min_runtime=min_runtime) == []


@settings(max_examples=200, deadline=None)
@given(
    done=st.lists(durations, max_size=40),
    running=st.lists(durations, max_size=10),
    extra=st.integers(0, 40),
    quantile=st.floats(0.05, 1.0),
    multiplier=st.floats(1.0, 5.0),
    min_runtime=st.floats(0, 5),
)
def test_quantile_rule_never_fires_before_the_quantile_and_only_past_its_bound(
    done, running, extra, quantile, multiplier, min_runtime
):
    total = len(done) + len(running) + extra
    tasks = [Running(f"r{i}", "w", e) for i, e in enumerate(running)]
    got = quantile_rule(done, total, tasks, quantile=quantile, multiplier=multiplier, min_runtime=min_runtime)
    if len(done) < quantile * total - 1e-6:
        assert got == []
    for s in got:
        assert s.elapsed > s.bound >= min_runtime
        assert s.bound >= multiplier * min(done)
    assert [s.elapsed for s in got] == sorted((s.elapsed for s in got), reverse=True)


@settings(max_examples=200, deadline=None)
@given(
    peers=st.lists(
        st.tuples(st.floats(0, 100), st.floats(0, 1000), st.floats(0, 1000)), min_size=0, max_size=12
    ),
    multiplier=st.floats(1.0, 5.0),
    min_runtime=st.floats(0, 5),
)
def test_late_rule_flags_only_slow_work_with_much_time_left(peers, multiplier, min_runtime):
    work = [Progress(f"c{i}", f"w{i}", e, d, left) for i, (e, d, left) in enumerate(peers)]
    got = late_rule(work, multiplier=multiplier, min_runtime=min_runtime)
    by_key = {p.key: p for p in work}
    # Finished peers count however briefly they ran.
    judged = [p for p in work if p.done > 0 and (p.elapsed >= min_runtime or p.left <= 0)]
    for s in got:
        p = by_key[s.key]
        assert p.elapsed >= min_runtime and p.done > 0 and p.left > 0
        # Slower than most peers: at least one judged peer is strictly faster,
        # and the peers' median rate is over multiplier times its own.
        assert any(q.speed > p.speed for q in judged)
        assert p.speed * multiplier < statistics.median(q.speed for q in judged)
        assert s.estimate == p.time_left > s.bound
    estimates = [s.estimate for s in got]
    assert estimates == sorted(estimates, reverse=True)


def test_late_rule_judges_the_one_left_behind_against_peers_that_finished_quickly():
    peers = [Progress(f"c{i}", f"w{i}", 0.2, 300, 0) for i in range(4)] + [Progress("slow", "w9", 2.0, 40, 260)]
    got = late_rule(peers, multiplier=2, min_runtime=1.0)
    assert [s.key for s in got] == ["slow"]
    # ... but the one behind must itself have run min_runtime.
    young = [Progress(f"c{i}", f"w{i}", 0.2, 300, 0) for i in range(4)] + [Progress("slow", "w9", 0.5, 10, 290)]
    assert late_rule(young, multiplier=2, min_runtime=1.0) == []


@settings(max_examples=300, deadline=None)
@given(
    offset=st.integers(0, 10**6),
    n=st.integers(1, 10**5),
    rate=st.floats(0.01, 1e4),
    ratio=st.floats(1.01, 100),
    startup=st.floats(0, 10),
)
def test_a_split_leaves_the_consumer_its_share_and_not_a_record_more(offset, n, rate, ratio, startup):
    helper = rate * ratio
    got = split_point(offset, offset + n, rate, helper, startup)
    tol = 1e-6 * (1 + n / rate)
    if got is None:
        # Handing over would not save time: the consumer, alone, ends about
        # when a helper could start.
        assert (n - 1) / rate < startup + 1 / helper + tol
        return
    k = got - offset
    assert 0 <= k < n
    # Both finish together, up to one record: the consumer keeps at least its
    # share (its part takes no less than the helper's) ...
    assert k / rate >= (n - k) / helper + startup - tol
    # ... and one record fewer would leave it finishing first.
    assert (k - 1) / rate < (n - k + 1) / helper + startup + tol


def test_no_split_where_the_helper_would_be_no_faster_or_nothing_is_left():
    assert split_point(0, 100, rate=5.0, helper_rate=5.0) is None
    assert split_point(0, 100, rate=5.0, helper_rate=1.0) is None
    assert split_point(100, 100, rate=1.0, helper_rate=10.0) is None
    assert split_point(100, 90, rate=1.0, helper_rate=10.0) is None
    # A consumer that has stopped keeps nothing.
    assert split_point(40, 100, rate=0.0, helper_rate=10.0) == 40


def test_late_rule_ignores_rates_that_differ_by_noise_once_most_peers_are_done():
    done = [Progress(f"c{i}", f"w{i}", 10.0, 1000, 0) for i in range(5)]
    # 1.5x slower than its finished peers, with the median time left 0: noise, not a straggler.
    assert late_rule(done + [Progress("late", "w9", 10.0, 667, 333)], multiplier=2, min_runtime=1) == []
    assert [s.key for s in late_rule(done + [Progress("late", "w9", 10.0, 300, 700)], multiplier=2, min_runtime=1)] == [
        "late"
    ]


def test_late_rule_ignores_work_that_has_not_started():
    peers = [Progress(f"c{i}", f"w{i}", 10, 50, 50) for i in range(3)] + [Progress("idle", "w9", 10, 0, 100)]
    assert late_rule(peers, multiplier=2, min_runtime=1) == []


def test_slow_workers_from_stragglers_or_from_finished_durations():
    assert slow_workers({"a": 2, "b": 1}, {}, multiplier=2, workers=["a", "b", "c", "d"]) == {"a"}
    assert slow_workers({"a": 2}, {}, multiplier=2, workers=["a", "b", "c"]) == {"a"}
    # Stragglers on most workers: a group's spread, not one slow worker.
    assert slow_workers({"a": 2, "b": 2, "c": 1}, {}, multiplier=2, workers=["a", "b", "c"]) == set()
    groups = {"g": {"a": [1.0, 1.1], "b": [0.9, 1.0], "c": [3.0, 3.5]}}
    assert slow_workers({}, groups, multiplier=2) == {"c"}
    # One slow task is not a slow worker.
    assert slow_workers({}, {"g": {"a": [1.0, 1.0], "c": [5.0]}}, multiplier=2) == set()
    # Tasks of milliseconds are noise, however far apart.
    tiny = {"g": {"a": [0.001, 0.001], "b": [0.001, 0.001], "c": [0.008, 0.009]}}
    assert slow_workers({}, tiny, multiplier=2) == {"c"}
    assert slow_workers({}, tiny, multiplier=2, floor=0.1) == set()


def test_slowness_weighs_time_spent_in_a_workers_recent_groups():
    # Slow where it spent its time (reads of 1 s against 0.4 s), normal in a
    # short group: time-weighted, it is slow; one group's ratio alone says little.
    groups = {
        "reads": {"a": [0.4, 0.4], "b": [0.4, 0.4], "c": [1.0, 1.2, 1.0]},
        "small": {"a": [0.2, 0.2], "b": [0.2, 0.2], "c": [0.2, 0.2]},
    }
    got = slowness(groups)
    assert got["c"] > 2 > got["a"]
    assert slow_workers({}, groups, multiplier=2) == {"c"}
    # Only a worker's RECENT_GROUPS newest groups count (newest first): a
    # worker fast long ago and slow now is slow.
    old = {f"old{i}": {"a": [1.0, 1.0], "b": [1.0, 1.0], "c": [1.0, 1.0]} for i in range(10)}
    new = {f"new{i}": {"a": [1.0, 1.0], "b": [1.0, 1.0], "c": [3.0, 3.0]} for i in range(RECENT_GROUPS)}
    assert slowness({**new, **old})["c"] > 2
    assert slowness({**old, **new})["c"] < 2


def test_copy_cap_is_a_floor_of_the_fraction_of_threads():
    assert [copy_cap(n, 0.25) for n in (1, 3, 4, 8, 9)] == [0, 0, 1, 2, 2]
    assert copy_cap(10, 0.0) == 0 and copy_cap(10, 1.0) == 10


stragglers_st = st.lists(
    st.builds(Straggler, key=st.text("abcdefgh", min_size=1, max_size=3), worker=addresses,
              elapsed=durations, rule=st.just("quantile"), bound=durations),
    max_size=12,
    unique_by=lambda s: s.key,  # a task runs on one worker
)
workers_st = st.dictionaries(
    addresses,
    st.builds(lambda t, b, f: WorkerView(t, min(b, t), f), st.integers(1, 4), st.integers(0, 4),
              st.integers(0, 2**30)),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(
    stragglers=stragglers_st,
    workers=workers_st,
    slow=st.sets(addresses, max_size=3),
    running_copies=st.integers(0, 4),
    max_fraction=st.floats(0, 1),
    need=st.integers(0, 2**30),
)
def test_copies_stay_under_the_cap_and_off_stragglers_and_slow_workers(
    stragglers, workers, slow, running_copies, max_fraction, need
):
    got = place_copies(
        stragglers, workers, slow=slow, running_copies=running_copies, max_fraction=max_fraction,
        need_bytes={s.key: need for s in stragglers},
    )
    cap = copy_cap(sum(w.threads for w in workers.values()), max_fraction)
    assert len(got) <= max(cap - running_copies, 0)
    owner = {s.key: s.worker for s in stragglers}
    for key, dest in got.items():
        assert dest in workers
        assert dest != owner[key]
        assert dest not in slow
        assert workers[dest].free_bytes >= need
    # No worker takes more copies than its free threads (or one, when none is free).
    for dest in set(got.values()):
        w = workers[dest]
        assert list(got.values()).count(dest) <= max(w.threads - w.busy, 1)


@settings(max_examples=200, deadline=None)
@given(slow=st.sets(addresses, max_size=4), workers=st.lists(addresses, max_size=6, unique=True))
def test_steering_keeps_new_work_off_slow_workers_and_never_leaves_none(slow, workers):
    got = steer_off(slow, workers)
    fast = [w for w in workers if w not in slow]
    if not fast or len(fast) == len(workers):
        assert got is None  # nothing to avoid, or nowhere else to go: Dask decides
    else:
        assert got == sorted(fast) and not set(got) & slow


def test_copies_prefer_free_threads_then_free_memory():
    ws = {
        "busy": WorkerView(2, 2, 100),
        "free-small": WorkerView(2, 0, 10),
        "free-big": WorkerView(2, 0, 50),
        "half": WorkerView(2, 1, 500),
    }
    s = [Straggler("t1", "x", 9, "quantile", 2), Straggler("t2", "x", 8, "quantile", 2)]
    got = place_copies(s, ws, slow=(), running_copies=0, max_fraction=1.0)
    # The second copy goes where most threads are still free once the first is placed.
    assert got == {"t1": "free-big", "t2": "free-small"}
    # No room under the cap: no copy at all.
    assert place_copies(s, ws, slow=(), running_copies=8, max_fraction=1.0) == {}
    assert math.isinf(Progress("c", "w", 5, 1, 1, rate=0).time_left)


# -- the coordinator's tracker over a stand-in scheduler (plain objects) ----------------------


class _Group:
    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size


class _Task:
    def __init__(self, key, group, ws=None, func=None, state=None) -> None:
        self.key, self.group, self.processing_on = key, group, ws
        self.state = state or ("processing" if ws is not None else "memory")
        self.run_spec = Task(key, func) if func is not None else None
        self.worker_restrictions = self.host_restrictions = self.resource_restrictions = None
        self.loose_restrictions = False


class _Worker:
    def __init__(self, address: str) -> None:
        self.address, self.executing, self.last_seen = address, {}, 0.0
        self.nthreads, self.processing, self.memory_limit, self.nbytes = 2, set(), 0, 0
        self.occupancy = 0.0
        self.metrics: dict = {}
        self.status = type("Status", (), {"name": "running"})()


class _Scheduler:
    def __init__(self, workers) -> None:
        self.workers = {w.address: w for w in workers}
        self.tasks: dict = {}
        self.events: list = []
        self.unrunnable: dict = {}
        self.transitioned: list = []
        self.extensions: dict = {}

    def log_event(self, topic, msg) -> None:
        self.events.append((topic, msg))

    def transitions(self, recs, stimulus_id) -> None:
        self.transitioned.append(dict(recs))


def _tracker(enabled: bool = True, told: list | None = None):
    import time

    from aimss_dask.coordinator.state import CoordinatorState
    from aimss_dask.coordinator.stragglers import Stragglers
    from aimss_dask.core.config import SpeculationConfig

    a, b = _Worker("a"), _Worker("b")
    sched = _Scheduler([a, b])
    tell = None if told is None else (lambda w, msg: told.append((w, msg)) or True)
    tracker = Stragglers(CoordinatorState(), SpeculationConfig(min_runtime=0.0, enabled=enabled), tell=tell)
    tracker.scheduler = sched
    g = _Group("work-abc", 4)
    for i in range(3):
        sched.tasks[("work-abc", i)] = _Task(("work-abc", i), g)
        tracker.task_ended(("work-abc", i), "processing", "memory", {
            "worker": "a", "startstops": [{"action": "compute", "start": 10.0, "stop": 11.0}],
        })
    a.last_seen = b.last_seen = time.time()
    return tracker, sched, g, a, b


def test_the_tracker_flags_a_long_running_task_once_and_closes_its_report():
    from aimss_dask.core.names import STRAGGLER_TOPIC

    tracker, sched, g, a, b = _tracker()
    slow = sched.tasks[("work-abc", 3)] = _Task(("work-abc", 3), g, b)
    b.executing = {slow: 5.0}
    tracker.check()
    tracker.check()  # seen again: not a second report
    flagged = [m for t, m in sched.events if t == STRAGGLER_TOPIC and m["action"] == "straggler"]
    assert len(flagged) == 1
    r = flagged[0]
    assert (r["key"], r["group"], r["worker"], r["rule"], r["bound"], r["outcome"]) == (
        "('work-abc', 3)", "work-abc", "b", "quantile", 2.0, "running",
    )
    assert r["elapsed"] >= 5.0
    assert [x["key"] for x in tracker.summary()["tasks"]] == ["('work-abc', 3)"]
    tracker.task_ended(("work-abc", 3), "processing", "memory", {"worker": "b", "startstops": []})
    assert sched.events[-1][1]["outcome"] == "finished" and tracker.summary()["tasks"] == []


def test_the_tracker_ignores_what_a_heartbeat_listed_but_has_ended_since():
    tracker, sched, g, a, b = _tracker()
    done = sched.tasks[("work-abc", 3)] = _Task(("work-abc", 3), g)  # finished: state "memory"
    b.executing = {done: 5.0}  # the last heartbeat still lists it
    moved = _Task(("work-abc", 4), g, a)  # now processing on another worker
    b.executing[moved] = 5.0
    tracker.check()
    assert sched.events == [] and tracker.summary()["tasks"] == []


def test_only_marked_stragglers_get_a_copy_and_only_when_enabled():
    import aimss_dask

    marked = aimss_dask.speculative(lambda: None)
    for enabled, func, copies in [(True, marked, 1), (False, marked, 0), (True, lambda: None, 0)]:
        told: list = []
        tracker, sched, g, a, b = _tracker(enabled=enabled, told=told)
        slow = sched.tasks[("work-abc", 3)] = _Task(("work-abc", 3), g, b, func=func)
        b.executing = {slow: 5.0}
        tracker.check()
        tracker.check()  # asked once, not again
        assert len(told) == copies, (enabled, func)
        if copies:
            # To the straggler's worker, naming the other worker for the copy.
            assert told == [("b", {"op": "aimss_speculate", "key": "('work-abc', 3)", "dest": "a"})]
            assert [m["action"] for _, m in sched.events].count("copy") == 1
            tracker.copy_outcome("('work-abc', 3)", "copy won")
            tracker.task_ended(("work-abc", 3), "processing", "memory", {"worker": "b", "startstops": []})
            last = sched.events[-1][1]
            assert (last["outcome"], last["copy"]) == ("copy won", "a") and tracker.copies == {}


def test_with_every_thread_busy_a_copy_goes_where_a_thread_frees_soonest():
    ws = {
        "late": WorkerView(1, 1, 100, free_in=0.9),
        "soon": WorkerView(1, 1, 10, free_in=0.1),
        "never": WorkerView(1, 1, 500, free_in=math.inf),
    }
    s = [Straggler("t", "x", 9, "quantile", 2)]
    assert place_copies(s, ws, slow=(), running_copies=0, max_fraction=1.0) == {"t": "soon"}
    # A free thread comes first, however soon another frees.
    ws["idle"] = WorkerView(1, 0, 1, free_in=0.0)
    assert place_copies(s, ws, slow=(), running_copies=0, max_fraction=1.0) == {"t": "idle"}


def test_on_a_worker_found_slow_a_task_past_the_median_is_a_straggler():
    tracker, sched, g, a, b = _tracker()
    on_b = sched.tasks[("work-abc", 3)] = _Task(("work-abc", 3), g, b)
    b.executing = {on_b: 1.6}  # past 1.5x the median (1 s), not past 2x
    tracker.check()
    assert tracker.summary()["tasks"] == []
    tracker.slow["b"] = {"action": "slow-worker", "worker": "b"}
    tracker.check()
    [r] = tracker.summary()["tasks"]
    assert (r["worker"], r["rule"], r["bound"]) == ("b", "slow worker", 1.5)


def test_a_marked_call_is_found_inside_a_fused_task():
    import aimss_dask
    from aimss_dask.coordinator.stragglers import calls_marked
    from aimss_dask.shuffle import _tasks

    marked = aimss_dask.speculative(len)
    assert calls_marked(Task("k", marked, [1]))
    # Dask fused the push with the task that made its input: the call is an argument.
    fused = Task("k", sum, [Task("inner", _tasks.push, Task("input", list, [1]), ["s"], 0, ["a"], 4, None)])
    assert calls_marked(fused)
    assert not calls_marked(Task("k", sum, [Task("inner", len, [1])]))
    assert not calls_marked(None)


def test_new_partitions_avoid_slow_workers_only_when_speculation_is_on():
    for enabled, expect in [(True, ["a"]), (False, ["a", "b"])]:
        tracker, *_ = _tracker(enabled=enabled, told=[])
        tracker.slow = {"b": {"seen": 0.0}}
        assert tracker.avoid(["a", "b"]) == expect
        # Never none at all: a cluster of slow workers still places its partitions.
        assert tracker.avoid(["b"]) == ["b"]


def test_new_pushes_run_off_slow_workers_only_when_speculation_is_on():
    import aimss_dask
    from aimss_dask.ops.pushrun import copyable

    marked, plain = copyable(len), len
    for enabled in (True, False):
        tracker, sched, g, a, b = _tracker(enabled=enabled, told=[])
        c = _Worker("c")
        sched.workers["c"] = c
        new = {
            "push": _Task("push", g, func=marked, state="released"),
            "plain": _Task("plain", g, func=plain, state="released"),
            # Declared idempotent by its user: copies only, never steered.
            "user": _Task("user", g, func=aimss_dask.speculative(len), state="released"),
            "pinned": _Task("pinned", g, func=marked, state="released"),
            "started": _Task("started", g, b, func=marked),
        }
        new["pinned"].worker_restrictions = {"b"}
        sched.tasks.update(new)
        assert tracker.steer(list(new)) == 0  # no worker is slow yet
        assert new["push"].worker_restrictions is None
        tracker.slow = {"b": {"seen": 0.0}}
        steered = tracker.steer(list(new))
        if not enabled:
            assert steered == 0 and new["push"].worker_restrictions is None
            continue
        # Only the marked task still to be placed, without restrictions of its own.
        assert steered == 1
        # Strict: Dask's stealing would hand loose ones to the idle slow worker.
        assert new["push"].worker_restrictions == {"a", "c"} and not new["push"].loose_restrictions
        assert new["plain"].worker_restrictions is None and new["user"].worker_restrictions is None
        assert new["pinned"].worker_restrictions == {"b"} and not new["pinned"].loose_restrictions
        assert new["started"].worker_restrictions is None
        [(topic, msg)] = [e for e in sched.events if e[1]["action"] == "steer"]
        assert msg["tasks"] == 1 and msg["avoid"] == ["b"]
        # With every running worker slow there is nowhere else: left to Dask.
        tracker.slow = {"a": {}, "b": {}, "c": {}}
        new["again"] = sched.tasks["again"] = _Task("again", g, func=marked, state="released")
        assert tracker.steer(["again"]) == 0 and new["again"].worker_restrictions is None
        # It was sent to a fast worker, which died before running it: Dask
        # takes it back (processing -> released) and, the other fast one
        # gone too, it waits for a worker it may use (no-worker): the next
        # check lets any worker run it.
        tracker.task_ended("push", "processing", "released", {})
        new["push"].state = "no-worker"
        sched.unrunnable = {new["push"]: 0.0}
        tracker.check()
        assert new["push"].worker_restrictions is None
        assert sched.transitioned == [{"push": "processing"}]
        tracker.check()
        assert sched.transitioned == [{"push": "processing"}]  # once
        # A steered push that ran keeps no restriction: computed again
        # after its worker died, it may run on any worker left.
        again = sched.tasks["ran"] = _Task("ran", g, func=marked, state="released")
        tracker.slow = {"b": {"seen": 0.0}}
        assert tracker.steer(["ran"]) == 1 and again.worker_restrictions == {"a", "c"}
        tracker.task_ended("ran", "processing", "memory", {})
        assert again.worker_restrictions is None


def test_a_worker_slow_only_at_writing_keeps_its_pushes_until_it_is_slow_at_computing():
    """A slow disk shows in a worker's sink writers, not in its tasks' times: its pushes (CPU)
    stay there. Once its tasks take longer than others', or with no timed task to tell, or
    with a consumer behind there, new pushes avoid it."""
    import time

    from aimss_dask.coordinator.speculation import Straggler
    from aimss_dask.ops.pushrun import copyable

    def ran(tracker, sched, g, worker: str, seconds: float, first: int) -> None:
        for i in range(first, first + 3):
            sched.tasks[("work-abc", i)] = _Task(("work-abc", i), g)
            tracker.task_ended(("work-abc", i), "processing", "memory", {
                "worker": worker, "startstops": [{"action": "compute", "start": 10.0, "stop": 10.0 + seconds}],
            })

    def straggle(tracker, worker: str, kind: str) -> None:
        found = [Straggler(f"{kind}@{worker}#{i}", worker, 9.0, "late", 1.0) for i in range(2)]
        tracker._note_slow_workers(time.time(), found, {s.key: kind for s in found})

    for case in ("disk", "untimed", "consumer"):
        tracker, sched, g, a, b = _tracker()
        sched.workers["c"] = _Worker("c")
        if case != "untimed":
            ran(tracker, sched, g, "c", 1.0, 3)  # as long as a's
        push = sched.tasks["push"] = _Task("push", g, func=copyable(len), state="released")
        straggle(tracker, "c", "writer")
        # A task that waits for c's writes straggles too; its times still look typical.
        tracker._note_slow_workers(time.time(), [Straggler("finish@c", "c", 5.0, "slow worker", 1.0)])
        if case == "consumer":
            straggle(tracker, "c", "consumer")
        assert "c" in tracker.slow
        if case != "disk":
            # Nothing says its CPU is fine: treated as slow at everything.
            assert tracker.summary()["slow_at_writing"] == []
            assert tracker.steer(["push"]) == 1 and push.worker_restrictions == {"a", "b"}
            continue
        assert tracker.summary()["slow_at_writing"] == ["c"]
        assert tracker.steer(["push"]) == 0 and push.worker_restrictions is None
        # Its run's partitions still go elsewhere: its sink writers would write them.
        assert tracker.avoid(["a", "c"]) == ["a"]
        # Its tasks turn slow (3x a's): slow at computing now.
        ran(tracker, sched, g, "c", 6.0, 6)
        tracker._note_slow_workers(time.time(), [])
        assert tracker.summary()["slow_at_writing"] == []
        assert tracker.steer(["push"]) == 1 and push.worker_restrictions == {"a", "b"}


class _Stealing:
    def __init__(self) -> None:
        self.requests: list = []

    def move_task_request(self, ts, victim, thief) -> str:
        self.requests.append((ts.key, victim.address, thief.address))
        return "steal-1"


def test_a_worker_found_slow_has_its_queued_pushes_moved_but_not_the_running_one():
    from aimss_dask.ops.pushrun import copyable

    push = copyable(len)
    for enabled in (True, False):
        tracker, sched, g, a, b = _tracker(enabled=enabled, told=[])
        c = _Worker("c")
        sched.workers["c"] = c
        a.occupancy = 5.0  # busier than c
        stealing = sched.extensions["stealing"] = _Stealing()
        running = _Task("running", g, b, func=push)
        queued = [_Task(f"queued-{i}", g, b, func=push) for i in range(3)]
        plain = _Task("plain", g, b, func=len)
        b.processing = {running, plain, *queued}
        b.executing = {running: 0.5}
        tracker.slow = {"b": {"seen": 0.0}}
        moved = tracker._move_queued("b")
        if not enabled:
            assert moved == 0 and stealing.requests == []
            continue
        # Only the pushes not started, each to the least busy fast worker
        # (c first: a has 5 s queued; each move adds the group's median, 1 s).
        assert moved == 3
        assert sorted(k for k, _, _ in stealing.requests) == ["queued-0", "queued-1", "queued-2"]
        assert [t for _, _, t in stealing.requests] == ["c", "c", "c"]
        assert all(v == "b" for _, v, _ in stealing.requests)
        assert all(q.worker_restrictions == {"a", "c"} for q in queued)
        assert running.worker_restrictions is None and plain.worker_restrictions is None
        [(_, msg)] = [e for e in sched.events if e[1]["action"] == "steer"]
        assert msg["tasks"] == 3 and msg["moved"] and msg["avoid"] == ["b"]


def test_only_tasks_annotated_speculative_are_wrapped_and_they_compute_the_same():
    from aimss_dask.coordinator.stragglers import calls_marked, mark_annotated

    class _TS:
        def __init__(self, spec):
            self.run_spec = spec

    tasks = {k: _TS(Task(k, sum, [1, 2])) for k in ("a", "b", "c")}
    scheduler = type("Scheduler", (), {"tasks": tasks})()
    assert mark_annotated(scheduler, {"aimss_speculative": {"a": True, "b": False}, "other": {"c": 1}}) == 1
    assert calls_marked(tasks["a"].run_spec) and not calls_marked(tasks["b"].run_spec)
    assert not calls_marked(tasks["c"].run_spec)
    assert tasks["a"].run_spec({}) == 3 and tasks["a"].run_spec.key == "a"
    # Marking again changes nothing; no annotations at all, nothing.
    assert mark_annotated(scheduler, {"aimss_speculative": {"a": True}}) == 0
    assert mark_annotated(scheduler, None) == 0


# -- takeovers of consumers' ranges (Stream.map_records), over the stand-in scheduler ----------


def _consumers(enabled: bool = True):
    """A tracker with stream "s" (4 sealed partitions of 100 records, owners b, a, a, b) and group "g"."""
    tracker, sched, g, a, b = _tracker(enabled=enabled, told=[])
    state = tracker.state
    spec, _ = state.create("s", 4, ["b", "a", "a", "b"])
    state.note_bounds("s", spec.epoch, [(p, 0, 100) for p in range(4)])
    state.sealed.add("s")
    return tracker, sched


def _progress(tracker, p: int, offset: int, elapsed: float, *, worker: str, done: bool = False, stop=None):
    tracker.state.commit("s", "g", {p: offset})
    return tracker.consumer_progress(
        "s", "g", p, offset, start=0, elapsed=elapsed, stop=stop, done=done, worker=worker
    )


def _copies(sched) -> list[dict]:
    from aimss_dask.core.names import STRAGGLER_TOPIC

    return [m for t, m in sched.events if t == STRAGGLER_TOPIC and m["action"] == "copy"]


def _taken_over():
    """Consumer 0 (on b) far behind two finished peers, told to hand over; the tracker, scheduler, answer."""
    tracker, sched = _consumers()
    assert _progress(tracker, 1, 100, 1.0, worker="a", done=True) == {}
    assert _progress(tracker, 2, 100, 1.0, worker="a", done=True) == {}
    assert _progress(tracker, 0, 10, 5.0, worker="b") == {}
    tracker.check()
    order = tracker.orders[("s", "g", 0)]
    assert order["dest"] == "a" and order["rule"] == "late"
    got = _progress(tracker, 0, 12, 6.0, worker="b")
    want = split_point(12, 100, order["rate"], order["helper_rate"], 0.5)
    assert want is not None and got["split"] == want and got["dest"] == "a"
    assert got["key"][1:] == ["s", 0, want] and got["key"][0].startswith("aimss-takeover-")
    [copy] = _copies(sched)
    assert (copy["kind"], copy["key"], copy["worker"], copy["dest"], copy["range"]) == (
        "consumer", "s/g/0", "b", "a", [want, None],
    )
    assert tracker.summary()["takeovers"] == [{"consumer": "s/g/0", "dest": "a", "range": [want, None]}]
    # Its own range now ends at the split: its time left is counted to there.
    assert tracker.ranges[("s", "g", 0)]["stop"] is None
    _progress(tracker, 0, 13, 6.5, worker="b", stop=want)
    assert tracker.ranges[("s", "g", 0)]["stop"] == want
    return tracker, sched, got


def test_a_consumer_far_behind_is_told_at_its_next_report_where_to_stop_and_where_its_helper_runs():
    _taken_over()


def test_the_cap_counts_running_helpers_and_frees_when_they_end():
    tracker, sched, got = _taken_over()
    helper = _Task(tuple(got["key"]), _Group("aimss-takeover", 1), sched.workers["a"])
    sched.tasks[helper.key] = helper
    # Another consumer falls behind: 4 threads, max-fraction 0.25, one helper runs: no room.
    _progress(tracker, 3, 5, 5.0, worker="b")
    tracker.check()
    assert ("s", "g", 3) not in tracker.orders
    helper.state = "memory"
    tracker.check()  # the helper is over: it leaves the cap, and the next one gets its place
    assert tracker.summary()["takeovers"] == [] and tracker.orders[("s", "g", 3)]["dest"] == "a"


def test_an_order_the_consumer_never_collects_expires():
    import time

    from aimss_dask.coordinator import stragglers

    tracker, sched = _consumers()
    _progress(tracker, 1, 100, 1.0, worker="a", done=True)
    _progress(tracker, 2, 100, 1.0, worker="a", done=True)
    _progress(tracker, 0, 10, 5.0, worker="b")
    tracker.check()
    k = ("s", "g", 0)
    first = tracker.orders[k]["since"]
    tracker.check()
    assert tracker.orders[k]["since"] == first  # one order at a time
    tracker.orders[k]["since"] -= stragglers.ORDER_TTL + 1
    tracker.check()
    # The stale order is gone; the consumer, still behind, gets a fresh one.
    assert tracker.orders[k]["since"] > time.time() - stragglers.ORDER_TTL


def test_a_consumer_that_starts_on_a_slow_worker_hands_everything_over_at_once():
    for enabled in (True, False):
        tracker, sched = _consumers(enabled=enabled)
        tracker.slow = {"b": {"seen": 0.0}}
        got = _progress(tracker, 0, 0, 0.0, worker="b")
        if not enabled:
            assert got == {} and _copies(sched) == []
            continue
        assert got["split"] == 0 and got["dest"] == "a"
        assert _copies(sched)[0]["rule"] == "slow worker"
        # On a fast worker, or once it has started, no such order.
        assert _progress(tracker, 1, 0, 0.0, worker="a") == {}
        assert _progress(tracker, 3, 7, 1.0, worker="b") == {}


def test_consumers_of_a_group_not_committed_yet_are_judged_from_their_reports():
    # A map_records call commits once a consumer is done: before that its
    # group exists only in its consumers' reports, and a straggler among
    # them must be found all the same (not only after a peer finished).
    tracker, sched = _consumers()

    def report(p, offset, worker):
        return tracker.consumer_progress("s", "m", p, offset, start=0, elapsed=5.0, stop=None, done=False,
                                         worker=worker)

    for p, offset, worker in ((1, 80, "a"), (2, 80, "a"), (3, 80, "b"), (0, 5, "b")):
        assert report(p, offset, worker) == {}
    assert "m" not in tracker.state.groups.get("s", {})
    tracker.check()
    assert ("s", "m", 0) in tracker.orders, tracker.reports
    assert report(0, 6, "b")["dest"] == "a"
    # Once the call is over its reports go, and its group is judged no more.
    tracker.forget_group("s", "m")
    assert not [k for k in tracker.ranges if k[1] == "m"] and not tracker.orders
    tracker.check()
    assert not [k for k in tracker.ranges if k[1] == "m"]


def test_a_consumer_that_has_nothing_worth_handing_over_gets_no_helper():
    tracker, sched = _consumers()
    _progress(tracker, 1, 100, 1.0, worker="a", done=True)
    _progress(tracker, 2, 100, 1.0, worker="a", done=True)
    # Far behind by rate, but one record left: it ends before a helper could start.
    _progress(tracker, 0, 99, 99.0, worker="b")
    tracker.check()
    assert tracker.orders == {} and _copies(sched) == []


# -- sink writers: judged from heartbeats, their queues handed over -----------------------------


def _writers(enabled: bool = True, slow_left: int = 800):
    """A tracker whose workers a, b write run "r" fast and c slowly, with ``slow_left`` bytes queued on c."""
    from aimss_dask.core.names import HEARTBEAT_METRIC

    told: list = []
    tracker, sched, _, a, b = _tracker(enabled=enabled, told=told)
    c = _Worker("c")
    sched.workers["c"] = c

    def beat(w, written, busy, left, **more):
        w.metrics = {HEARTBEAT_METRIC: {"runs": [
            ["r/writes", None, 0, "WriteRun", {"bytes": written, "busy": busy, "left": left, **more}],
            ["other", None, 0, "AssemblerRun", {"busy": 99.0}],  # not a writer: ignored
        ]}}

    beat(a, 1000, 1.0, 0)
    beat(b, 900, 1.0, 100)
    beat(c, 100, 1.0, slow_left)
    return tracker, sched, told, beat, c


def test_a_slow_sink_writer_hands_part_of_its_queue_to_a_fast_worker():
    from aimss_dask.coordinator.sinkwriters import HANDOVER_STARTUP

    tracker, sched, told, beat, c = _writers()
    tracker.check()
    [(worker, msg)] = told
    assert worker == "c" and msg["op"] == "aimss_sink_handover" and msg["run"] == "r"
    assert msg["dest"] in ("a", "b")
    # Split so that both finish together: c keeps its share at 100 B/s.
    keep = split_point(0, 800, 100.0, 950.0, HANDOVER_STARTUP)
    assert msg["nbytes"] == 800 - keep
    kinds = [(m["action"], m["kind"]) for _, m in sched.events]
    assert kinds == [("straggler", "sink-writer"), ("copy", "sink-writer")]
    assert tracker.summary()["sink_writers"][0]["handover"] == msg["dest"]
    # The cap (1 of 6 threads at 0.25) counts it: one hand-over at a time, none told again.
    tracker.check()
    assert len(told) == 1
    # The writer's heartbeats show it under way, then over: the report ends with how it went.
    beat(c, 150, 1.5, 100, handing=2)
    tracker.check()
    assert tracker.sinks.handovers
    beat(c, 150, 1.5, 0, handing=0, handed=7)
    tracker.check()
    assert not tracker.sinks.handovers and not tracker.sinks.current
    ended = [m for _, m in sched.events if m["action"] == "straggler" and m["outcome"] != "running"]
    assert ended[-1]["outcome"] == f"helper on {msg['dest']} wrote 7 regions"


def test_sink_writers_are_reported_but_never_handed_over_with_speculation_off():
    tracker, sched, told, _, _ = _writers(enabled=False)
    tracker.check()
    assert told == []
    assert [m["action"] for _, m in sched.events] == ["straggler"]


def test_writers_at_equal_speed_or_with_little_left_are_left_alone():
    tracker, sched, told, beat, c = _writers()
    beat(c, 1000, 1.0, 100)  # as fast as its peers
    tracker.check()
    assert told == [] and sched.events == []
    tracker, sched, told, beat, c = _writers(slow_left=1)  # slow, but nothing worth handing over
    tracker.check()
    assert told == []


def test_a_hand_over_that_never_shows_in_the_heartbeats_expires():
    from aimss_dask.coordinator import sinkwriters

    tracker, sched, told, beat, c = _writers()
    tracker.check()
    assert len(told) == 1
    tracker.sinks.handovers["r@c"]["since"] -= sinkwriters.HANDOVER_APPEAR + 1
    beat(c, 1000, 1.0, 0)  # its queue drained before the word came: nothing was handed
    tracker.check()
    assert not tracker.sinks.handovers
    ended = [m for _, m in sched.events if m["action"] == "straggler" and m["outcome"] != "running"]
    assert ended[-1]["outcome"] == "nothing left to hand over"


def test_a_worker_found_slow_by_its_stragglers_is_not_cleared_by_its_tasks_times():
    import time

    tracker, sched, g, a, b = _tracker()
    for i in range(3, 6):  # b's tasks take what a's do: by its tasks, b is not slow
        sched.tasks[("work-abc", i)] = _Task(("work-abc", i), g)
        tracker.task_ended(("work-abc", i), "processing", "memory", {
            "worker": "b", "startstops": [{"action": "compute", "start": 10.0, "stop": 11.0}],
        })
    now = time.time()
    # Its sink writes (a slow disk) made it a straggler twice: it stays slow.
    tracker.slow["b"] = {"action": "slow-worker", "worker": "b", "seen": now, "by": "stragglers"}
    tracker.check()
    assert "b" in tracker.slow
    # Found slow by its tasks' times, the same times clear it.
    tracker.slow["b"]["by"] = "tasks"
    tracker.check()
    assert "b" not in tracker.slow


def test_a_writer_whose_run_stopped_on_its_worker_stays_a_peer_while_others_write():
    tracker, sched, told, beat, c = _writers()
    a, b = sched.workers["a"], sched.workers["b"]
    tracker.check()  # seen once
    told.clear()
    tracker.sinks.handovers.clear()
    a.metrics = b.metrics = {}  # a and b are done: their runs stopped there
    tracker.sinks.current.clear()
    tracker.check()
    assert [m["run"] for _, m in told] == ["r"]  # still judged against a and b
    c.metrics = {}
    tracker.check()  # no writer of "r" left: forgotten
    assert "r" not in tracker.sinks._last


def test_a_hand_over_whose_run_ended_between_heartbeats_says_so():
    tracker, sched, told, beat, c = _writers()
    tracker.check()
    assert len(told) == 1
    for w in sched.workers.values():
        w.metrics = {}  # the run ended on every worker before a heartbeat showed the hand-over
    tracker.check()
    assert not tracker.sinks.handovers
    ended = [m for _, m in sched.events if m["action"] == "straggler" and m["outcome"] != "running"]
    assert ended[-1]["outcome"].endswith("the run ended before the writer's count was seen")


def test_a_majority_of_workers_is_never_flagged_slow_only_the_slowest_of_them():
    from aimss_dask.coordinator import stragglers

    assert [stragglers.max_slow(n) for n in (1, 2, 3, 5)] == [0, 1, 1, 2]
    tracker, sched, g, a, b = _tracker()
    c = _Worker("c")
    sched.workers["c"] = c
    # a ran many quick tasks (a warm cache); b and c each ran theirs 3x and 4x slower.
    runs = [("a", 1.0)] * 6 + [("b", 3.0), ("b", 3.0), ("c", 4.0), ("c", 4.0)]
    for i, (w, took) in enumerate(runs, start=10):
        sched.tasks[("work-abc", i)] = _Task(("work-abc", i), g)
        tracker.task_ended(("work-abc", i), "processing", "memory", {
            "worker": w, "startstops": [{"action": "compute", "start": 10.0, "stop": 10.0 + took}],
        })
    tracker.check()
    assert set(tracker.slow) == {"c"}  # one of three, the slowest
    tracker.check()
    assert set(tracker.slow) == {"c"}  # b is not added later either
    # b's next tasks make it the slowest: it takes c's place (flagged by its tasks).
    for i in range(20, 24):
        sched.tasks[("work-abc", i)] = _Task(("work-abc", i), g)
        tracker.task_ended(("work-abc", i), "processing", "memory", {
            "worker": "b", "startstops": [{"action": "compute", "start": 10.0, "stop": 19.0}],
        })
    tracker.check()
    assert set(tracker.slow) == {"b"}


def test_two_stragglers_among_many_tasks_do_not_make_a_worker_slow_but_among_few_they_do():
    """A cold first run scatters a few stragglers; a slow worker's tasks straggle as a rule."""
    import time

    from aimss_dask.coordinator.speculation import Straggler
    from aimss_dask.coordinator.stragglers import SLOW_SHARE

    tracker, sched, g, a, b = _tracker()
    c = _Worker("c")
    sched.workers["c"] = c

    def finish(worker, n, start):
        for i in range(start, start + n):
            sched.tasks[("work-abc", i)] = _Task(("work-abc", i), g)
            tracker.task_ended(("work-abc", i), "processing", "memory", {
                "worker": worker, "startstops": [{"action": "compute", "start": 10.0, "stop": 11.0}],
            })

    finish("b", 16, 100)  # b ran sixteen tasks, two of them stragglers: an eighth
    assert 2 < SLOW_SHARE * 16
    now = time.time()
    tracker._note_slow_workers(now, [Straggler("k1", "b", 3.0, "quantile", 2.0), Straggler("k2", "b", 3.0, "quantile", 2.0)])
    assert "b" not in tracker.slow
    finish("c", 4, 200)  # c ran four, two of them stragglers: half
    tracker._note_slow_workers(now, [Straggler("k3", "c", 3.0, "quantile", 2.0), Straggler("k4", "c", 3.0, "quantile", 2.0)])
    assert set(tracker.slow) == {"c"}
    assert tracker.slow["c"]["why"] == "2 stragglers in 120 s, more than most workers"
    # Consumers' stragglers count whatever the worker's tasks: b, behind on two reads, is flagged.
    tracker, sched, g, a, b = _tracker()
    sched.workers["c"] = c
    finish("b", 16, 300)
    tracker._note_slow_workers(
        now, [Straggler("cons1", "b", 3.0, "rate", 1.0), Straggler("cons2", "b", 3.0, "rate", 1.0)],
        {"cons1": "consumer", "cons2": "consumer"},
    )
    assert "b" in tracker.slow


def test_a_worker_flagged_by_its_tasks_times_is_cleared_once_those_times_are_older_than_the_window():
    """Kept off new runs, a flagged worker makes no new times: its old ones must not keep it flagged."""
    import time

    from aimss_dask.coordinator import stragglers

    tracker, sched, g, a, b = _tracker()
    c = _Worker("c")
    sched.workers["c"] = c
    runs = [("a", 1.0)] * 4 + [("b", 1.0)] * 4 + [("c", 4.0)] * 4  # c took 4x the others: slow
    for i, (w, took) in enumerate(runs, start=10):
        sched.tasks[("work-abc", i)] = _Task(("work-abc", i), g)
        tracker.task_ended(("work-abc", i), "processing", "memory", {
            "worker": w, "startstops": [{"action": "compute", "start": 10.0, "stop": 10.0 + took}],
        })
    tracker.check()
    assert set(tracker.slow) == {"c"} and tracker.slow["c"]["by"] == "tasks"
    tracker.check()  # the same times, still in the window: still flagged
    assert "c" in tracker.slow
    # No task of c since (it was kept off new runs): once those times are
    # older than the window, they no longer renew the flag, and it goes.
    tracker._note_slow_workers(time.time() + stragglers.SLOW_WINDOW + 1, [])
    assert "c" not in tracker.slow
