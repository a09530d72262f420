"""Benchmark of idle filling (issue: GPUs, power and idle filling).

Part ``sim`` (``--part sim``): :func:`aimss_dask.power.simulate` with
``--gpus`` GPUs (16,384 by default) of a synchronous training-like job:
steps of 100 ms with 5% jitter, a sync phase of 1.5 s (10% jitter) every
10 steps, GPUs between 100 W idle, 700 W busy and 600 W running a filler,
changes ramped over 50 ms. The same draws without and with filling, the
filling placed by the very policy the coordinator runs
(:func:`aimss_dask.power.policy.plan`); once with phase lengths the
coordinator learns (the first phase is then filled as an idle dip, late)
and once announced by the application (``expected_s``). Reported: the
aggregate swing, peak to trough, in the largest window and in the median
window (one window per step-and-phase period), the largest ramp, energy,
utilisation, the job's slowdown and the filler GPU-seconds.

Part ``cpu`` (``--part cpu``): the CPU-filler variant, on a real
``LocalCluster`` of ``--workers`` nanny workers (one thread each). A
synchronous training-like loop: each step, one task per worker does 100 ms
of matrix products (jitter 10%), and the client waits for all of them;
every 10 steps each worker's task waits in a sync phase (``with
aimss_dask.sync_phase("allreduce")``) for ``--phase`` seconds, as a
collective's wait would keep a device idle (the wait is a sleep: there is
no network to wait on here, and the threads are idle either way). With
filling, one CPU filler (``gpu=False``, ``concurrency`` = workers) does
batch work -- 20 ms matrix products, as many as each slice's budget
allows -- in those phases. Methods ``plain`` and ``filled`` interleaved,
medians of ``--reps`` after a warm-up round. Reported: the main loop's
time (the slowdown is the ratio), the filler's busy seconds and work
units, and the machine's CPU busy share sampled every 50 ms (``psutil``):
its swing per period and its mean, the CPU's stand-in for power.
Without a GPU this is what the benchmark runs, and it says so; on a GPU
machine the GPU part is ``tests/gpu/run_gpu_checks.sh``'s to run.

    python benchmarks/bench_power.py --part sim
    python benchmarks/bench_power.py --part cpu --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any

import numpy as np

STEP_S = 0.1
UNIT_S = 0.02


def _matmul_for(seconds: float, n: int = 256) -> int:
    """Matrix products for about ``seconds``; how many."""
    a = np.random.default_rng(0).random((n, n))
    end = time.perf_counter() + seconds
    k = 0
    while time.perf_counter() < end:
        a = a @ a
        a /= np.abs(a).max() or 1.0
        k += 1
    return k


def _step(rank: int, step: int, phase_s: float, every: int) -> int:
    import aimss_dask

    rng = np.random.default_rng(1000 * step + rank)
    k = _matmul_for(STEP_S * (1.0 + 0.1 * rng.standard_normal()))
    if (step + 1) % every == 0:
        with aimss_dask.sync_phase("allreduce"):
            time.sleep(phase_s * (1.0 + 0.1 * rng.standard_normal()))
    return k


def _filler(counter_dir: str, budget_s: float) -> bool:
    """Batch work in 20 ms units, as many as fit the budget; counts them in a file of this process."""
    end = time.perf_counter() + budget_s
    units = 0
    while time.perf_counter() + UNIT_S <= end:
        _matmul_for(UNIT_S, 128)
        units += 1
    path = os.path.join(counter_dir, f"{os.getpid()}.units")
    with open(path, "a") as f:
        f.write(f"{units}\n")
    return True


class _CpuSampler:
    def __init__(self, every: float = 0.05) -> None:
        import psutil

        self.psutil = psutil
        self.every = every
        self.t: list[float] = []
        self.busy: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _CpuSampler:
        self.psutil.cpu_percent(percpu=False)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.t.append(time.time())
            self.busy.append(self.psutil.cpu_percent(percpu=False) / 100.0)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_cpu(args: argparse.Namespace) -> None:
    import shutil
    import tempfile

    import dask
    from distributed import Client, LocalCluster

    import aimss_dask
    from aimss_dask.power.gpu import gpu_count
    from aimss_dask.power.metrics import summarize

    if gpu_count() == 0:
        print("no GPU here: the CPU-filler variant (fillers on idle CPU threads), and the simulation with --part sim")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    every, steps = 10, args.steps
    period = every * STEP_S + args.phase
    with dask.config.set({"distributed.scheduler.work-stealing": False}), LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        workers = sorted(client.scheduler_info()["workers"])

        def loop(fill: bool) -> dict[str, float]:
            folder = tempfile.mkdtemp(prefix="aimss-bench-power-")
            f = None
            try:
                if fill:
                    f = aimss_dask.fill(_filler, folder, gpu=False, max_s=2.0, concurrency=len(workers))
                with _CpuSampler() as cpu:
                    t0 = time.perf_counter()
                    for step in range(steps):
                        futs = [
                            client.submit(_step, r, step, args.phase, every, workers=[w], pure=False)
                            for r, w in enumerate(workers)
                        ]
                        client.gather(futs)
                    dt = time.perf_counter() - t0
                busy_s = 0.0
                if f is not None:
                    f.cancel()
                    busy_s = f.wait(timeout=30)["seconds"]
                units = 0
                for name in os.listdir(folder):
                    with open(os.path.join(folder, name)) as fh:
                        units += sum(int(x) for x in fh.read().split())
                s = summarize(np.array(cpu.t), np.array(cpu.busy), window_s=period)
                return {"loop_s": dt, "filler_s": busy_s, "units": units, "cpu_mean": s.mean_w,
                        "cpu_swing": s.median_swing_w, "cpu_swing_max": s.swing_w}
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        results: dict[str, list[dict[str, float]]] = {"plain": [], "filled": []}
        first: dict[str, dict[str, float]] = {}
        print(f"{len(workers)} workers x 1 thread; {steps} steps of {STEP_S * 1000:.0f} ms, a {args.phase:g} s "
              f"sync phase every {every}; {args.reps} reps after a warm-up, interleaved", flush=True)
        for rep in range(args.reps + 1):
            order = ["plain", "filled"] if rep % 2 == 0 else ["filled", "plain"]
            for m in order:
                r = loop(m == "filled")
                tag = "  (warm-up)" if rep == 0 else ""
                print(f"  rep {rep} {m:7s} loop {r['loop_s']:6.2f} s  filler {r['filler_s']:6.2f} s "
                      f"({r['units']} units)  CPU busy mean {r['cpu_mean']:.2f}, swing median {r['cpu_swing']:.2f} "
                      f"max {r['cpu_swing_max']:.2f}{tag}", flush=True)
                if rep:
                    results[m].append(r)
                else:
                    first[m] = r
        med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
        print(f"\nmedians of {args.reps}:")
        for m, r in med.items():
            print(f"  {m:7s} loop {r['loop_s']:6.2f} s  filler {r['filler_s']:6.2f} s ({r['units']:.0f} units of "
                  f"{UNIT_S * 1000:.0f} ms)  CPU busy mean {r['cpu_mean']:.2f}  swing median {r['cpu_swing']:.2f}")
        slow = med["filled"]["loop_s"] / med["plain"]["loop_s"] - 1
        print(f"main-loop slowdown with filling: {100 * slow:+.1f}% (target < 2%)")
        a, b = med["plain"]["cpu_swing"], med["filled"]["cpu_swing"]
        print(f"CPU busy-share swing per period: {a:.2f} -> {b:.2f} ({100 * (1 - b / a) if a else 0:.0f}% less)")
        print(f"first runs (rep 0): plain {first['plain']['loop_s']:.2f} s, filled {first['filled']['loop_s']:.2f} s")


def run_sim(args: argparse.Namespace) -> None:
    from aimss_dask.power import Workload, simulate

    for hint in (False, True):
        t0 = time.perf_counter()
        r = simulate(n_gpus=args.gpus, workload=Workload(rounds=args.rounds, hint=hint), seed=args.seed)
        d = r.as_dict()
        w, f = d["without"], d["with"]
        how = "lengths announced (expected_s)" if hint else "lengths learned (the first phase unknown)"
        print(f"simulated {args.gpus} GPUs, {args.rounds} sync phases, {how}  [{time.perf_counter() - t0:.1f} s]")
        print(f"  swing, median window: {w['median_swing_mw']:.2f} MW -> {f['median_swing_mw']:.2f} MW "
              f"({100 * r.swing_reduction:.0f}% less)")
        print(f"  swing, largest window: {w['swing_mw']:.2f} MW -> {f['swing_mw']:.2f} MW "
              f"({100 * r.peak_swing_reduction:.0f}% less)")
        print(f"  largest ramp: {w['max_ramp_mw_per_s']:.1f} -> {f['max_ramp_mw_per_s']:.1f} MW/s; "
              f"energy {w['energy_mwh'] * 1000:.1f} -> {f['energy_mwh'] * 1000:.1f} kWh; "
              f"utilisation {w['utilisation']:.2f} -> {f['utilisation']:.2f}")
        print(f"  job {w['job_s']:.2f} s -> {f['job_s']:.2f} s (slowdown {100 * r.slowdown:.2f}%); "
              f"filler work {f['filled_gpu_s'] / 3600:.1f} GPU-hours")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["sim", "cpu", "both"], default="both")
    ap.add_argument("--gpus", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--phase", type=float, default=1.0, help="part cpu: seconds of each sync phase")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.part in ("sim", "both"):
        run_sim(args)
    if args.part in ("cpu", "both"):
        run_cpu(args)


if __name__ == "__main__":
    main()
