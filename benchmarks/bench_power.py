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
utilisation, the job's slowdown and the filler GPU-seconds. Then with
filler work for only a quarter of the phases' idle time, without and with
``aimss.power.target-floor`` (200 W): without, the work is spent on the
first phases and the later ones swing fully; with it, every phase keeps
the share of GPUs filled that holds the floor.

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
Part ``gpu`` (``--part gpu``, where NVML sees a GPU; it skips, saying so,
elsewhere): the issue's training-like CuPy loop in one task on a GPU
worker: steps of about 100 ms of ``--n`` fp32 matmuls, and every 10 steps
a checkpoint phase that copies ``--state-mib`` of state to the host and
writes it through an AIMSS stream (a streaming sink drains it to Zarr)
while the GPU would sit idle; without and with a GPU filler (``--fill-n``
matmuls on a low-priority stream), interleaved. Reported from NVML
(``power_report``, 20 ms samples): the checkpoint swing per window, the
largest ramp, energy; the loop's slowdown; filler throughput; and the
power traces as PNGs (``--out``). ``tests/gpu/run_gpu_checks.sh`` runs it
with the GPU tests on a lent GPU machine.

    python benchmarks/bench_power.py --part sim
    python benchmarks/bench_power.py --part cpu --reps 3
    python benchmarks/bench_power.py --part gpu --reps 3 --out power-traces
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


# -- part gpu: a CuPy training loop with checkpoints, on a GPU worker ------------------------

_FILL_CACHE: dict[int, Any] = {}


def _gpu_train(steps: int, every: int, n: int, k: int, state_mib: int, stream_name: str) -> dict[str, Any]:
    """The main loop, one task on the GPU worker: ``k`` n x n matmuls a step, a checkpoint every ``every``."""
    import cupy as cp

    import aimss_dask

    a = cp.random.default_rng(0).random((n, n), dtype=cp.float32)
    state = cp.random.default_rng(1).random((state_mib * 2**20 // 4 // 1024, 1024), dtype=cp.float32)
    stream = aimss_dask.get_stream(stream_name)
    steps_s, phases_s = [], []
    t0 = time.perf_counter()
    for step in range(steps):
        ts = time.perf_counter()
        b = a
        for _ in range(k):
            b = a @ b
            b /= float(n)
        cp.cuda.Device().synchronize()
        steps_s.append(time.perf_counter() - ts)
        if (step + 1) % every == 0:
            tp = time.perf_counter()
            with aimss_dask.sync_phase("checkpoint"):
                host = cp.asnumpy(state)
                for slab in np.array_split(host, 8):
                    stream.write(slab)
                stream.flush()
            phases_s.append(time.perf_counter() - tp)
    return {"loop_s": time.perf_counter() - t0, "steps_s": steps_s, "phases_s": phases_s}


def _gpu_filler(n: int, budget_s: float) -> bool:
    """Useful-looking batch work on the GPU: matmuls on the current (low-priority) stream, within the budget."""
    import cupy as cp

    m = _FILL_CACHE.get(n)
    if m is None:
        m = _FILL_CACHE[n] = cp.random.default_rng(2).random((n, n), dtype=cp.float32)
    end = time.perf_counter() + budget_s
    units = 0
    stream = cp.cuda.get_current_stream()
    while True:
        t = time.perf_counter()
        r = m @ m
        r /= float(n)
        stream.synchronize()
        units += 1
        if time.perf_counter() + (time.perf_counter() - t) > end:
            break
    _FILL_CACHE[-1] = _FILL_CACHE.get(-1, 0) + units
    return True


def _filler_units() -> int:
    return int(_FILL_CACHE.get(-1, 0))


def _calibrate(n: int) -> float:
    import cupy as cp

    a = cp.random.default_rng(0).random((n, n), dtype=cp.float32)
    (a @ a).sum()
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t) / 5


def run_gpu(args: argparse.Namespace) -> None:
    import shutil
    import tempfile

    from distributed import Client, LocalCluster

    import aimss_dask
    from aimss_dask.power.gpu import gpu_count

    if gpu_count() == 0:
        print("part gpu: no GPU visible to NVML here; skipped (the simulation and the CPU variant run without one)")
        return
    out = args.out or tempfile.mkdtemp(prefix="aimss-bench-power-")
    os.makedirs(out, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="aimss-bench-power-zarr-")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(power={"interval": "20ms"}))
        per = client.run(_calibrate, args.n)
        t1 = max(per.values())
        k = max(1, round(STEP_S / t1))
        print(f"GPU: {args.n}x{args.n} fp32 matmul {t1 * 1000:.1f} ms; {k} per step of ~{k * t1 * 1000:.0f} ms; "
              f"{args.steps} steps, a checkpoint of {args.state_mib} MiB every 10 through an AIMSS stream to Zarr",
              flush=True)
        stream = aimss_dask.create_stream("bench-power-ckpt", partitions=1)
        sink = stream.to_zarr(os.path.join(folder, "ckpt.zarr"), axis=0, chunks=(4096, 1024))
        results: dict[str, list[dict[str, Any]]] = {"plain": [], "filled": []}
        last_png: dict[str, str] = {}
        try:
            for rep in range(args.reps + 1):
                for m in (["plain", "filled"] if rep % 2 == 0 else ["filled", "plain"]):
                    f = None
                    units0 = sum(client.run(_filler_units).values())
                    if m == "filled":
                        f = aimss_dask.fill(_gpu_filler, args.fill_n, gpu=True, max_s=0.5,
                                            memory=3 * args.fill_n * args.fill_n * 4)
                    t0 = time.time()
                    r = client.submit(_gpu_train, args.steps, 10, args.n, k, args.state_mib, stream.name,
                                      pure=False).result()
                    busy = 0.0
                    if f is not None:
                        f.cancel()
                        st = f.wait(timeout=60)
                        busy = st["seconds"]
                        if st["error"]:
                            print("  filler failed:", st["error"])
                    units = sum(client.run(_filler_units).values()) - units0
                    rep_ = aimss_dask.power_report(since=t0, window_s=10 * STEP_S + 1.5)
                    mt = rep_.metrics()
                    png = os.path.join(out, f"power-{m}.png")
                    rep_.png(png)
                    last_png[m] = png
                    row = {"loop_s": r["loop_s"], "filler_s": busy, "units": units,
                           "phase_s": statistics.median(r["phases_s"]) if r["phases_s"] else 0.0,
                           "swing_w": mt.get("median_swing_w", float("nan")),
                           "swing_max_w": mt.get("swing_w", float("nan")),
                           "ramp": mt.get("max_ramp_w_per_s", float("nan")), "energy_j": mt.get("energy_j", 0.0)}
                    print(f"  rep {rep} {m:7s} loop {row['loop_s']:6.2f} s  checkpoint {row['phase_s']:.2f} s  "
                          f"filler {busy:5.2f} s ({units} units)  swing median {row['swing_w']:.0f} W "
                          f"max {row['swing_max_w']:.0f} W  ramp {row['ramp']:.0f} W/s  energy {row['energy_j']:.0f} J"
                          + ("  (warm-up)" if rep == 0 else ""), flush=True)
                    if rep:
                        results[m].append(row)
            stream.seal()
            sink.wait(timeout=120)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        med = {m: {c: statistics.median(x[c] for x in rs) for c in rs[0]} for m, rs in results.items() if rs}
        if len(med) == 2:
            p, f_ = med["plain"], med["filled"]
            print(f"\nmedians of {args.reps}: loop {p['loop_s']:.2f} s -> {f_['loop_s']:.2f} s "
                  f"(slowdown {100 * (f_['loop_s'] / p['loop_s'] - 1):+.2f}%, target < 2%)")
            print(f"  checkpoint swing (median window) {p['swing_w']:.0f} W -> {f_['swing_w']:.0f} W "
                  f"({100 * (1 - f_['swing_w'] / p['swing_w']) if p['swing_w'] else 0:.0f}% less, target >= 50%); "
                  f"largest ramp {p['ramp']:.0f} -> {f_['ramp']:.0f} W/s")
            print(f"  filler throughput {f_['units'] / f_['loop_s']:.1f} matmuls/s of {args.fill_n}x{args.fill_n}; "
                  f"{f_['filler_s']:.2f} s of slices; energy {p['energy_j']:.0f} -> {f_['energy_j']:.0f} J")
        print(f"power traces: {last_png}")


def run_sim(args: argparse.Namespace) -> None:
    from aimss_dask.power import FillPolicy, Workload, simulate

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
    # Filler work for a quarter of the phases' idle time: spent on the first
    # phases, or rationed over all of them by a power floor.
    work = Workload(rounds=args.rounds, filler_gpu_s=0.25 * args.gpus * 1.5 * args.rounds)
    print(f"simulated {args.gpus} GPUs, filler work for a quarter of the phases' idle time:")
    for floor in (None, 200.0):
        r = simulate(n_gpus=args.gpus, workload=work, policy=FillPolicy(floor_w=floor), seed=args.seed)
        d = r.as_dict()
        w, f = d["without"], d["with"]
        how = f"target-floor {floor:g} W" if floor else "no floor"
        print(f"  {how:18s} swing, largest window {w['swing_mw']:.2f} -> {f['swing_mw']:.2f} MW, median "
              f"{w['median_swing_mw']:.2f} -> {f['median_swing_mw']:.2f} MW; ramp {f['max_ramp_mw_per_s']:.1f} MW/s; "
              f"slowdown {100 * r.slowdown:.2f}%; {f['filled_gpu_s'] / 3600:.1f} GPU-hours")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["sim", "cpu", "gpu", "both", "all"], default="both",
                    help="both: sim and cpu; all: sim, cpu and gpu (gpu skips, saying so, without a GPU)")
    ap.add_argument("--gpus", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--phase", type=float, default=1.0, help="part cpu: seconds of each sync phase")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=8192, help="part gpu: the main loop's matrix size")
    ap.add_argument("--fill-n", type=int, default=4096, help="part gpu: the fillers' matrix size")
    ap.add_argument("--state-mib", type=int, default=2048, help="part gpu: the checkpointed state")
    ap.add_argument("--out", default=None, help="part gpu: folder for the power-trace PNGs")
    args = ap.parse_args()
    if args.part in ("sim", "both", "all"):
        run_sim(args)
    if args.part in ("cpu", "both", "all"):
        run_cpu(args)
    if args.part in ("gpu", "all"):
        run_gpu(args)


if __name__ == "__main__":
    main()
