"""Benchmark of the push-based shuffle (issue: push-based shuffle).

DataFrame shuffle of an int64 key + 6 float64 columns, 64 input and 64 output
partitions, on a LocalCluster of 2 worker processes with 1 thread each:
aimss against Dask's ``shuffle_method="tasks"`` and ``"p2p"``, interleaved,
medians over ``--reps``. Optionally with 30% of rows on one key, and a merge
of two frames (aimss against Dask's p2p merge).

The input is generated and persisted first; the timed part is the shuffle
plus ``len`` of every output partition. Reported: wall time, GB/s of input,
peak RSS of each worker (sampled every 20 ms; with the RSS it started from,
which is what the methods before it left behind), peak disk used under the
workers' local directories, and the CPU time the workers used (user +
system, summed over both; steadier than wall time on a noisy VM). Before each
method, free memory is touched and freed (``_common.prefault``): this VM hands
free pages back to its host, and without it the method that allocates the
most fresh memory pays several times more for it, at random.

    python benchmarks/bench_shuffle.py --gib 1 --reps 3 [--skew] [--merge]
    python benchmarks/bench_shuffle.py --rechunk --gib 2 --reps 3

``--rechunk``: a float64 array of ``--gib`` from row chunks to column
chunks (64 x 64 chunks), aimss against Dask's p2p rechunk with
``distributed.p2p.storage.disk`` true and false.

``--trace``: one more method, ``aimss+tr``, the aimss shuffle inside
``aimss_dask.trace`` (a new folder under a temporary folder this benchmark
made and removes at the end); reported: the overhead of tracing (its
median over aimss's) and the trace's size.

    python benchmarks/bench_shuffle.py --gib 1 --reps 5 --trace --no-tasks
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
from _common import cpu_seconds, prefault
from _common import finish as _finish
from _common import start as _start

GiB = 2**30
COLS = 6
ROW_BYTES = 8 * (COLS + 1)


def _make(i: int, rows: int, skew: bool, nkeys: int) -> pd.DataFrame:
    rng = np.random.default_rng(i)
    keys = rng.integers(0, nkeys, rows, dtype=np.int64)
    if skew:
        keys[rng.random(rows) < 0.3] = 42  # 30% of rows on one key
    data = {"key": keys}
    for c in range(COLS):
        data[f"x{c}"] = rng.random(rows)
    return pd.DataFrame(data)


def _count(df: pd.DataFrame) -> int:
    return len(df)


def _rechunk_run(args: argparse.Namespace, client: Any) -> None:
    import dask
    import dask.array as da
    from distributed import wait

    import aimss_dask

    nbytes = int(args.gib * GiB)
    side = int((nbytes // 8) ** 0.5)
    side -= side % args.partitions
    step = side // args.partitions
    x = da.random.default_rng(0).random((side, side), chunks=(step, side)).persist()
    wait(x)
    target = (side, step)

    def total(y: Any) -> float:
        return float(y.sum().compute())

    def p2p(disk: bool) -> float:
        with dask.config.set({"array.rechunk.method": "p2p", "distributed.p2p.storage.disk": disk}):
            return total(x.rechunk(target, method="p2p"))

    methods = {
        "aimss": lambda: total(aimss_dask.rechunk(x, target)),
        "p2p-disk": lambda: p2p(True),
        "p2p-mem": lambda: p2p(False),
    }
    _measure(args, client, methods, side * side * 8,
             f"rechunk of {side * side * 8 / GiB:.2f} GiB float64 ({side}x{side}), "
             f"{args.partitions} row chunks -> {args.partitions} column chunks")


def _measure(args: argparse.Namespace, client: Any, methods: dict[str, Any], nbytes: int, title: str) -> Any:
    """Run every method ``reps`` times after a warm-up round, interleaved; print medians.

    Every method must return the same result (a row count, a sum); it is returned.
    """
    # "rss0": RSS when the method starts, i.e. what the methods before it left
    # behind; a method's peak includes it.
    results: dict[str, dict[str, list[float]]] = {m: {"t": [], "rss": [], "rss0": [], "disk": [], "cpu": []} for m in methods}
    first: Any = None
    names = list(methods)
    for rep in range(args.reps + 1):  # the first round warms up
        # Reversed every other round: without prefaulting, a method that runs
        # after one that freed much memory pays for faulting it back in, so
        # no method may always follow the same one.
        for name in names if rep % 2 == 0 else names[::-1]:
            fn = methods[name]
            # Backed free pages for whatever the method allocates: see
            # _common.prefault (this VM hands free pages back to its host).
            prefault(args.prefault)
            starts = client.run(_start)
            cpu0 = client.run(cpu_seconds)
            t0 = time.perf_counter()
            got = fn()
            dt = time.perf_counter() - t0
            cpu = sum(client.run(cpu_seconds).values()) - sum(cpu0.values())
            peaks = client.run(_finish)
            first = got if first is None else first
            assert got == _approx(first), (name, got, first)
            if rep == 0:
                continue
            rss = max(r for r, _ in peaks.values())
            results[name]["t"].append(dt)
            results[name]["rss"].append(rss)
            results[name]["rss0"].append(max(starts.values()))
            results[name]["disk"].append(sum(d for _, d in peaks.values()))
            results[name]["cpu"].append(cpu)
            print(
                f"  rep {rep} {name:8s} {dt:7.2f} s  worker CPU {cpu:6.2f} s  peak RSS/worker {rss / GiB:.2f} GiB",
                flush=True,
            )
    print(f"\n{title}, medians of {args.reps}:")
    med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in results.items()}
    for m, r in med.items():
        print(
            f"{m:8s} {r['t']:7.2f} s  {nbytes / r['t'] / 1e9:6.3f} GB/s  worker CPU {r['cpu']:6.2f} s  "
            f"peak RSS/worker {r['rss'] / GiB:5.2f} GiB (at start {r['rss0'] / GiB:5.2f})  "
            f"disk {r['disk'] / GiB:5.2f} GiB"
        )
    for m in med:
        if m == "aimss+tr":
            print(f"tracing overhead: {med[m]['t'] / med['aimss']['t']:.3f}x (target < 1.05x)")
        elif m != "aimss":
            print(f"aimss speed-up over {m}: {med[m]['t'] / med['aimss']['t']:.2f}x")
    return first


def _approx(x: Any) -> Any:
    class _Approx:
        def __eq__(self, other: Any) -> bool:
            return abs(other - x) <= 1e-9 * max(abs(x), 1.0)

    return _Approx()


def run(args: argparse.Namespace) -> None:
    import dask
    import dask.dataframe as dd
    from distributed import Client, LocalCluster, wait

    import aimss_dask

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit=args.memory_limit))
        if args.rechunk:
            _rechunk_run(args, client)
            return
        nbytes = int(args.gib * GiB)
        rows = nbytes // ROW_BYTES // args.partitions
        ddf = dd.from_map(
            _make, range(args.partitions), rows=rows, skew=args.skew, nkeys=10 * rows * args.partitions,
            meta=_make(0, 0, False, 1),
        ).persist()
        wait(ddf)
        total_rows = rows * args.partitions
        other = None
        if args.merge:
            other = dd.from_map(
                _make, range(1000, 1000 + args.partitions), rows=rows, skew=False,
                nkeys=10 * rows * args.partitions, meta=_make(0, 0, False, 1),
            ).persist()
            wait(other)

        def aimss_run() -> int:
            if other is not None:
                out = aimss_dask.merge(ddf, other, on="key", npartitions=args.partitions)
            else:
                out = aimss_dask.shuffle(ddf, "key", npartitions=args.partitions)
            return int(out.map_partitions(_count, meta=(None, "i8")).sum().compute())

        def dask_run(method: str) -> int:
            with dask.config.set({"dataframe.shuffle.method": method}):
                if other is not None:
                    out = ddf.merge(other, on="key", npartitions=args.partitions, shuffle_method=method)
                else:
                    out = ddf.shuffle(on="key", npartitions=args.partitions, shuffle_method=method)
                return int(out.map_partitions(_count, meta=(None, "i8")).sum().compute())

        methods = {"aimss": aimss_run, "p2p": lambda: dask_run("p2p")}
        traces: list[int] = []
        if args.trace:
            root = tempfile.mkdtemp(prefix="aimss-bench-trace-")

            def traced_run() -> int:
                with aimss_dask.trace(os.path.join(root, f"run-{len(traces)}")) as t:
                    n = aimss_run()
                traces.append(sum(os.path.getsize(f) for f in t.files))
                return n

            methods["aimss+tr"] = traced_run
        if not args.merge and not args.no_tasks:
            methods["tasks"] = lambda: dask_run("tasks")
        what = "merge of two" if args.merge else "shuffle of"
        first = _measure(
            args, client, methods, nbytes,
            f"{what} {args.gib:g} GiB ({total_rows} rows, {args.partitions} -> {args.partitions} "
            f"partitions{', 30% on one key' if args.skew else ''})",
        )
        if not args.merge:
            assert first == total_rows, (first, total_rows)
        if args.trace:
            shutil.rmtree(root)  # the folder this benchmark made, and only that
            print(f"trace size per run: {statistics.median(traces) / 2**20:.2f} MiB (gzip)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--skew", action="store_true")
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--rechunk", action="store_true")
    ap.add_argument("--no-tasks", action="store_true")
    ap.add_argument("--trace", action="store_true", help="also time the aimss shuffle under aimss_dask.trace")
    ap.add_argument("--memory-limit", default=None, help="AIMSS budget per worker, e.g. 1GiB")
    ap.add_argument(
        "--prefault-gib", type=float, default=None,
        help="memory touched and freed before each method (default: 3 x --gib + 1, at most 16)",
    )
    args = ap.parse_args()
    gib = args.prefault_gib if args.prefault_gib is not None else min(3 * args.gib + 1, 16)
    args.prefault = int(gib * GiB)
    run(args)


if __name__ == "__main__":
    main()
