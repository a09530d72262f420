"""The pure layer of idle filling: the dispatch policy, phase lengths, power metrics, the simulation."""

from __future__ import annotations

import doctest
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aimss_dask.power as power_pkg
import aimss_dask.power.metrics as metrics_mod
import aimss_dask.power.phases as phases_mod
import aimss_dask.power.policy as policy_mod
import aimss_dask.power.sim as simulate_mod
from aimss_dask import InvalidArgumentError
from aimss_dask.power.metrics import aggregate, resample, summarize, window_swings
from aimss_dask.power.phases import PhaseHistory, check_expected
from aimss_dask.power.policy import FillerView, FillPolicy, WorkerView, plan, window
from aimss_dask.power.sim import GpuModel, Workload, simulate


@pytest.mark.parametrize("mod", [power_pkg, metrics_mod, phases_mod, policy_mod, simulate_mod])
def test_examples_in_docstrings_hold(mod):
    failed, tried = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failed == 0


# -- policy -------------------------------------------------------------------------------

GiB = 1 << 30

workers_st = st.lists(
    st.builds(
        WorkerView,
        address=st.sampled_from([f"w{i}" for i in range(6)]),
        now=st.just(100.0),
        phase_end=st.one_of(st.none(), st.floats(99.0, 103.0)),
        in_phase=st.booleans(),
        ready_tasks=st.integers(0, 2),
        running_tasks=st.integers(0, 2),
        idle_threads=st.integers(0, 3),
        dip_s=st.floats(0.0, 1.0),
        gpu_free=st.one_of(st.none(), st.integers(0, 16 * GiB)),
        power_w=st.one_of(st.none(), st.floats(50.0, 700.0)),
        gpu_fillers=st.integers(0, 1),
        cpu_fillers=st.integers(0, 2),
    ),
    max_size=6,
    unique_by=lambda w: w.address,
)
fillers_st = st.lists(
    st.builds(
        FillerView,
        key=st.sampled_from([f"f{i}" for i in range(5)]),
        gpu=st.booleans(),
        max_s=st.floats(0.001, 5.0),
        slots=st.integers(0, 3),
        mem_bytes=st.integers(0, 12 * GiB),
        order=st.integers(0, 10),
    ),
    max_size=5,
    unique_by=lambda f: f.key,
)
policy_st = st.builds(
    FillPolicy,
    util_threshold=st.floats(0.0, 0.9),
    dip_after_s=st.floats(0.0, 0.5),
    dip_slice_s=st.floats(0.0, 1.0),
    safety=st.floats(0.0, 0.5),
    min_slice_s=st.floats(0.0, 0.1),
    memory_reserve=st.floats(0.0, 0.5),
)


floor_policy_st = st.builds(
    FillPolicy,
    dip_after_s=st.floats(0.0, 0.5),
    floor_w=st.one_of(st.none(), st.floats(50.0, 800.0)),
    idle_w=st.one_of(st.none(), st.floats(50.0, 200.0)),
    fill_w=st.one_of(st.none(), st.floats(100.0, 700.0)),
)


@settings(max_examples=400, deadline=None)
@given(workers=workers_st, fillers=fillers_st, policy=st.one_of(policy_st, floor_policy_st))
def test_plan_keeps_its_promises(workers, fillers, policy):
    ds = plan(workers, fillers, policy)
    by_worker = {w.address: w for w in workers}
    by_key = {f.key: f for f in fillers}
    gpu_mem: dict[str, int] = {}
    gpu_n: dict[str, int] = {}
    cpu_n: dict[str, int] = {}
    per_filler: dict[str, int] = {}
    for d in ds:
        w, f = by_worker[d.worker], by_key[d.key]
        # Never delay a ready main task.
        assert w.ready_tasks == 0
        # Only in a phase or an idle dip.
        assert w.phase_end is not None or w.in_phase or (w.dip_s >= policy.dip_after_s and w.dip_s > 0) or not f.gpu
        assert 0 < d.budget_s <= f.max_s
        assert d.budget_s >= policy.min_slice_s
        if w.phase_end is not None:
            # Never past the phase's expected end, less the safety share.
            assert w.now + d.budget_s <= w.phase_end
            assert d.budget_s <= (w.phase_end - w.now) * (1 - policy.safety) + 1e-12
            assert d.in_phase
        else:
            assert d.budget_s <= policy.dip_slice_s
            assert d.in_phase == w.in_phase
        per_filler[f.key] = per_filler.get(f.key, 0) + 1
        if f.gpu:
            assert w.gpu_free is not None and w.gpu_fillers == 0
            # The job's running tasks keep their GPU, unless it is seen idle.
            assert w.running_tasks == 0 or (w.dip_s >= policy.dip_after_s and w.dip_s > 0)
            gpu_mem[w.address] = gpu_mem.get(w.address, 0) + f.mem_bytes
            gpu_n[w.address] = gpu_n.get(w.address, 0) + 1
        else:
            cpu_n[w.address] = cpu_n.get(w.address, 0) + 1
    for a, m in gpu_mem.items():
        # Never past the device's free memory, less the reserve.
        assert m <= by_worker[a].gpu_free * (1 - policy.memory_reserve)
        assert gpu_n[a] == 1
    for a, n in cpu_n.items():
        assert n <= by_worker[a].idle_threads - by_worker[a].cpu_fillers
    for k, n in per_filler.items():
        assert n <= by_key[k].slots


@settings(max_examples=200, deadline=None)
@given(workers=workers_st, fillers=fillers_st, policy=policy_st)
def test_plan_leaves_no_place_unfilled_that_a_filler_fits(workers, fillers, policy):
    """Not lazy: a worker left out had no window, or no queued filler fits it."""
    ds = plan(workers, fillers, policy)
    used = {f.key: 0 for f in fillers}
    for d in ds:
        used[d.key] += 1
    got = {(d.worker, by_gpu) for d in ds for by_gpu in [next(f.gpu for f in fillers if f.key == d.key)]}
    for w in workers:
        for kind in (True, False):
            if (w.address, kind) in got:
                continue
            win = window(w, policy, gpu=kind)
            if win is None:
                continue
            mem = None if w.gpu_free is None else w.gpu_free * (1 - policy.memory_reserve)
            fits = [
                f for f in fillers
                if f.gpu == kind and used[f.key] < f.slots and min(win[0], f.max_s) >= policy.min_slice_s
                and min(win[0], f.max_s) > 0 and (not kind or (mem is not None and f.mem_bytes <= mem))
            ]
            assert not fits, f"{w} had a {kind and 'GPU' or 'CPU'} window {win} and {fits} fit it"


def test_plan_serves_phases_first_and_the_lowest_power_first():
    ws = [
        WorkerView("dip-low", now=0.0, dip_s=1.0, gpu_free=8 * GiB, power_w=60.0),
        WorkerView("phase-high", now=0.0, phase_end=2.0, gpu_free=8 * GiB, power_w=300.0),
        WorkerView("phase-low", now=0.0, phase_end=2.0, gpu_free=8 * GiB, power_w=90.0),
    ]
    one = plan(ws, [FillerView("f", gpu=True, max_s=10.0, slots=1)])
    assert [d.worker for d in one] == ["phase-low"]
    two = plan(ws, [FillerView("f", gpu=True, max_s=10.0, slots=2)])
    assert [d.worker for d in two] == ["phase-low", "phase-high"]
    three = plan(ws, [FillerView("f", gpu=True, max_s=10.0, slots=3)])
    assert [(d.worker, d.in_phase) for d in three][-1] == ("dip-low", False)
    assert three[-1].budget_s == FillPolicy().dip_slice_s


def test_plan_takes_the_queue_in_order_and_counts_memory_across_fillers():
    w = [WorkerView("a", now=0.0, phase_end=1.0, gpu_free=10 * GiB, idle_threads=2)]
    fs = [
        FillerView("late", gpu=False, max_s=1.0, order=2),
        FillerView("big", gpu=True, max_s=1.0, mem_bytes=9 * GiB + 1, order=0),
        FillerView("small", gpu=True, max_s=1.0, mem_bytes=GiB, order=1),
        FillerView("early", gpu=False, max_s=0.2, order=1),
    ]
    got = plan(w, fs, FillPolicy(memory_reserve=0.1))
    # 9 GiB + 1 byte is past 90% of 10 GiB; the next GPU filler fits.
    assert [(d.key, round(d.budget_s, 3)) for d in got] == [("small", 0.9), ("early", 0.2), ("late", 0.9)]


def test_no_window_without_a_phase_or_a_dip_and_none_with_ready_work():
    p = FillPolicy(dip_after_s=0.2)
    assert window(WorkerView("a", now=0.0, dip_s=0.1, gpu_free=GiB), p, gpu=True) is None
    assert window(WorkerView("a", now=0.0, dip_s=0.3, gpu_free=GiB), p, gpu=True) == (p.dip_slice_s, False)
    assert window(WorkerView("a", now=0.0, dip_s=0.3, gpu_free=None), p, gpu=True) is None
    assert window(WorkerView("a", now=0.0, phase_end=5.0, ready_tasks=1, gpu_free=GiB), p, gpu=True) is None
    assert window(WorkerView("a", now=0.0, idle_threads=0), p, gpu=False) is None
    # A phase whose expected end has passed offers nothing: the coordinator
    # asks its history again (PhaseHistory.expected with the time elapsed).
    assert window(WorkerView("a", now=5.0, phase_end=4.0, gpu_free=GiB), p, gpu=True) is None
    # In a phase whose end nobody knows yet: dip-sized slices at once, no dip needed.
    assert window(WorkerView("a", now=0.0, in_phase=True, gpu_free=GiB), p, gpu=True) == (p.dip_slice_s, True)


@pytest.mark.parametrize("kw", [{"safety": 1.0}, {"safety": -0.1}, {"dip_slice_s": -1.0}, {"memory_reserve": 2}])
def test_a_bad_policy_is_refused_by_name(kw):
    with pytest.raises(InvalidArgumentError, match=next(iter(kw))):
        FillPolicy(**kw)


# -- phases -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=40),
    q=st.floats(0.0, 1.0),
    elapsed=st.lists(st.floats(0.0, 12.0), min_size=1, max_size=5),
)
def test_expected_length_is_the_quantile_of_the_longer_ones_and_never_behind(lengths, q, elapsed):
    h = PhaseHistory(keep=32, quantile=q, overdue_s=0.05)
    for x in lengths:
        h.record("ckpt", x)
    kept = np.array(lengths[-32:])
    assert h.lengths("ckpt") == list(kept)
    for e in elapsed:
        longer = kept[kept > e]
        want = max(np.quantile(longer, q), e + 0.05) if longer.size else e + 0.05
        assert h.expected("ckpt", e) == pytest.approx(want, rel=1e-12, abs=1e-12)
    many = h.expected_many("ckpt", np.array(elapsed))
    assert many == pytest.approx([h.expected("ckpt", e) for e in elapsed])


def test_phase_history_is_bounded_and_checks_its_input():
    h = PhaseHistory(keep=2, max_names=3)
    for name in "abcd":
        h.record(name, 1.0)
    assert h.names() == ["b", "c", "d"]
    h.record("d", -1.0)  # a clock that went backwards is ignored
    assert h.lengths("d") == [1.0]
    assert h.expected("nobody") is None
    with pytest.raises(InvalidArgumentError, match="keep=0"):
        PhaseHistory(keep=0)
    assert check_expected(None) is None and check_expected(2) == 2.0
    for bad in (0, -1, float("nan"), float("inf"), "soon"):
        with pytest.raises(InvalidArgumentError, match="expected_s="):
            check_expected(bad)


# -- metrics ------------------------------------------------------------------------------


def test_summary_of_a_square_wave():
    t = np.arange(0.0, 10.0, 0.01)
    w = np.where((t % 2.0) < 1.0, 700.0, 100.0)
    s = summarize(t, w, np.where(w > 400, 1.0, 0.0), window_s=2.0)
    assert s.swing_w == 600.0 and s.median_swing_w == 600.0
    assert s.peak_w == 700.0 and s.trough_w == 100.0
    assert s.energy_j == pytest.approx(400.0 * (t[-1] - t[0]), rel=1e-2)
    assert s.max_ramp_w_per_s == pytest.approx(600.0 / 0.01)
    assert s.utilisation == pytest.approx(0.5, abs=0.01)
    flat = summarize(t, np.full(t.size, 300.0), window_s=2.0)
    assert flat.swing_w == 0.0 and flat.max_ramp_w_per_s == 0.0 and flat.mean_w == pytest.approx(300.0)


def test_window_swings_and_resample_and_aggregate():
    t = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.6])
    w = np.array([1.0, 5.0, 2.0, 2.5, 9.0, 0.0])
    starts, swings = window_swings(t, w, 1.0)
    # Each window counts the reading held from before it: 5 W into [1, 2), 2.5 W into [2, 3).
    assert starts.tolist() == [0.0, 1.0, 2.0] and swings.tolist() == [4.0, 3.0, 9.0]
    # Samples as sparse as the windows: every window still sees the change.
    t2 = np.arange(0.0, 6.0, 1.0)
    _, sw2 = window_swings(t2, np.where(np.arange(6) % 2 == 0, 100.0, 700.0), 1.0)
    assert sw2[1:].tolist() == [600.0] * 5
    g, gw = resample(np.array([0.0, 1.0, 3.0]), np.array([1.0, 2.0, 3.0]), 1.0)
    assert g.tolist() == [0.0, 1.0, 2.0, 3.0] and gw.tolist() == [1.0, 2.0, 2.0, 3.0]
    # Two devices: summed over the span both cover, each held to its next sample.
    g, total = aggregate({"a": (np.array([0.0, 2.0, 4.0]), np.array([10.0, 20.0, 30.0])),
                          "b": (np.array([1.0, 3.0]), np.array([1.0, 2.0]))}, 1.0)
    assert g.tolist() == [1.0, 2.0, 3.0] and total.tolist() == [11.0, 21.0, 22.0]


def test_metrics_refuse_bad_timelines():
    with pytest.raises(InvalidArgumentError, match="one time per sample"):
        summarize(np.arange(3.0), np.arange(4.0))
    with pytest.raises(InvalidArgumentError, match="backwards"):
        summarize(np.array([0.0, 2.0, 1.0]), np.ones(3))
    with pytest.raises(InvalidArgumentError, match="at least two samples"):
        summarize(np.array([0.0]), np.ones(1))


# -- simulation ---------------------------------------------------------------------------


def test_simulation_fills_the_phases_without_slowing_the_job():
    r = simulate(n_gpus=256, workload=Workload(rounds=6), seed=3)
    # Without filling: the whole cluster swings between idle and busy.
    assert r.without.summary.median_swing_w == pytest.approx(256 * (700 - 100), rel=0.01)
    assert r.without.filled_gpu_s == 0.0
    # With it (learned phase lengths): the typical swing is mostly gone, the
    # job barely slower, and the filler work is real GPU time.
    assert r.swing_reduction > 0.5
    assert 0.0 <= r.slowdown < 0.02
    assert r.with_fill.summary.utilisation > r.without.summary.utilisation + 0.3
    assert r.with_fill.filled_gpu_s > 0.5 * 256 * 5 * 1.5
    # The first phase, whose length nobody knew, got dip-sized slices at once.
    assert r.peak_swing_reduction > 0.5
    hinted = simulate(n_gpus=256, workload=Workload(rounds=6, hint=True), seed=3)
    assert hinted.peak_swing_reduction > 0.5
    frame = hinted.frame()
    assert list(frame.columns[:3]) == ["t", "watts_without", "watts_with"] and len(frame) > 100


def test_simulation_runs_the_real_policy(monkeypatch):
    calls = []

    def nothing(workers, fillers, policy, fleet=None):
        calls.append(len(list(workers)))
        return []

    monkeypatch.setattr(simulate_mod, "plan", nothing)
    r = simulate(n_gpus=32, workload=Workload(rounds=3), seed=1)
    assert calls and r.with_fill.filled_gpu_s == 0.0
    assert np.array_equal(r.with_fill.watts, r.without.watts)
    assert r.slowdown == 0.0


def test_simulation_with_no_filler_work_is_the_job_alone():
    r = simulate(n_gpus=16, workload=Workload(rounds=3, filler_gpu_s=0.0))
    assert np.array_equal(r.with_fill.watts, r.without.watts) and r.with_fill.filled_gpu_s == 0.0
    limited = simulate(n_gpus=16, workload=Workload(rounds=3, filler_gpu_s=5.0))
    assert limited.with_fill.filled_gpu_s == pytest.approx(5.0)
    tiny = simulate(n_gpus=16, workload=Workload(rounds=3, filler_gpu_s=0.5))
    assert tiny.with_fill.filled_gpu_s == pytest.approx(0.5)


def test_simulation_power_is_within_the_model():
    g = GpuModel(idle_w=50.0, busy_w=400.0, fill_w=300.0)
    r = simulate(n_gpus=8, gpu=g, workload=Workload(rounds=3, hint=True))
    for run in (r.without, r.with_fill):
        assert run.watts.min() >= 8 * 50.0 - 1e-6 and run.watts.max() <= 8 * 400.0 + 1e-6
    assert not math.isnan(r.with_fill.summary.energy_j)


@pytest.mark.parametrize(
    "kw, match",
    [({"n_gpus": 0}, "n_gpus=0"), ({"workload": Workload(rounds=0)}, "rounds=0"),
     ({"workload": Workload(step_s=0)}, "step_s=0"), ({"grid_s": 0.0}, "grid_s=0.0")],
)
def test_simulation_refuses_bad_arguments(kw, match):
    with pytest.raises(InvalidArgumentError, match=match):
        simulate(**kw)


def test_a_floor_fills_only_the_share_of_phase_gpus_it_takes():
    gpus = [WorkerView(f"g{i}", now=0.0, phase_end=2.0, gpu_free=8 * GiB, power_w=100.0 + i) for i in range(10)]
    # 100 W idle, 600 W filling: 30% of the GPUs hold 250 W on average.
    p = FillPolicy(floor_w=250.0, idle_w=100.0, fill_w=600.0)
    got = plan(gpus, [FillerView("f", gpu=True, max_s=5.0, slots=10)], p)
    assert [d.worker for d in got] == ["g0", "g1", "g2"]  # the lowest-drawing first
    # Two already filling: one more.
    busy = [replace(g, gpu_fillers=1) for g in gpus[:2]] + gpus[2:]
    assert len(plan(busy, [FillerView("f", gpu=True, max_s=5.0, slots=10)], p)) == 1
    # Without the draws known, nor seen: every idle GPU, as without a floor.
    assert len(plan(gpus, [FillerView("f", gpu=True, max_s=5.0, slots=10)], FillPolicy(floor_w=250.0))) == 10
    # Seen: idle GPUs at 100 W, filling ones at 600 W.
    seen = [replace(g, power_w=600.0, gpu_fillers=1) if i < 1 else g for i, g in enumerate(gpus)]
    assert len(plan(seen, [FillerView("f", gpu=True, max_s=5.0, slots=10)], FillPolicy(floor_w=250.0))) == 2
    with pytest.raises(InvalidArgumentError, match="floor_w=-1"):
        FillPolicy(floor_w=-1)


def test_a_floor_makes_limited_filler_work_last_every_phase():
    n, rounds = 256, 8
    budget = 0.25 * n * 1.5 * rounds  # a quarter of the phases' idle GPU time
    work = Workload(rounds=rounds, filler_gpu_s=budget)
    plain = simulate(n_gpus=n, workload=work, seed=2)
    floor = simulate(n_gpus=n, workload=work, policy=FillPolicy(floor_w=200.0), seed=2)
    full = n * (700 - 100)
    # Without a floor the work is spent on the first phases: later ones swing fully.
    assert plain.with_fill.summary.swing_w == pytest.approx(full, rel=0.01)
    # With one, every phase keeps a fifth of its GPUs filled: no window swings fully.
    assert floor.with_fill.summary.swing_w < 0.9 * full
    assert floor.with_fill.summary.max_ramp_w_per_s < plain.with_fill.summary.max_ramp_w_per_s
    assert floor.with_fill.filled_gpu_s <= budget + 1e-6 and floor.slowdown < 0.02
