"""Benchmark of speculation (issue: stragglers), part ``tasks``: ordinary tasks with one slow worker.

A LocalCluster of ``--workers`` nanny processes (1 thread each) with AIMSS
at its default ``aimss.speculation`` settings runs ``--tasks`` calls of one
function, each taking ``--seconds`` on a normal worker and ``--factor``
times that on the slow one (the first worker by address). The work is a
sleep: a task whose time goes to I/O, a remote service or a device, so
that the copies' CPU does not compete with the measurement on a small
machine. Methods, interleaved, medians over ``--reps`` after a warm-up:

- ``speculative``: the function declared idempotent
  (``aimss_dask.speculative``): a straggling call gets a copy on a fast
  worker, and the first result wins;
- ``plain``: the same function, not declared: Dask's own scheduling, and
  AIMSS only reports the stragglers (speculation off for it);

each with the slow worker (``slow``) and without one (``even``: every worker
normal; the overhead, and no copy may start). Reported: wall time, copies
started and won, and the ratio plain / speculative.

The issue's workloads (a shuffle, a ``to_zarr``, a stream consumer: work
pinned to workers, where a slow worker holds a fixed share) need copies of
AIMSS operators' tasks, which are not built yet; Dask's dynamic scheduling
already gives a slow worker fewer ordinary tasks, so copies here shorten
only the tail.

    python benchmarks/bench_stragglers.py --tasks 24 --seconds 1.2 --factor 4 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from distributed import get_worker

import aimss_dask


def _work(i: int, slow: str | None, seconds: float, factor: float) -> int:
    time.sleep(seconds * (factor if get_worker().address == slow else 1.0))
    return i


_speculative_work = aimss_dask.speculative(_work)


def _copies(client: Any, since: float) -> tuple[int, int]:
    started = won = 0
    for t, msg in client.get_events("aimss-straggler"):
        if t < since or not isinstance(msg, dict):
            continue
        if msg.get("action") == "copy":
            started += 1
        elif msg.get("action") == "straggler" and msg.get("outcome") == "copy won":
            won += 1
    return started, won


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=1.2, help="a task's time on a normal worker")
    ap.add_argument("--factor", type=float, default=4.0, help="how much slower the slow worker is")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        slow_worker = sorted(client.scheduler_info()["workers"])[0]
        fns = {"speculative": _speculative_work, "plain": _work}
        methods = [(f, s) for s in ("slow", "even") for f in fns]
        times: dict[str, list[float]] = {}
        copies: dict[str, list[tuple[int, int]]] = {}
        print(
            f"{args.tasks} tasks of {args.seconds:g} s on {args.workers} workers; "
            f"the slow one {args.factor:g}x slower", flush=True,
        )
        for rep in range(args.reps + 1):
            order = methods[rep % len(methods):] + methods[: rep % len(methods)]
            for fn, setting in order:
                slow = slow_worker if setting == "slow" else None
                t0, w0 = time.perf_counter(), time.time()
                futs = client.map(
                    fns[fn], range(args.tasks), slow=slow, seconds=args.seconds, factor=args.factor, pure=False
                )
                assert client.gather(futs) == list(range(args.tasks))
                dt = time.perf_counter() - t0
                del futs
                time.sleep(1.0)  # copies' outcomes reach the event log
                c = _copies(client, w0)
                name = f"{fn}/{setting}"
                print(
                    f"  rep {rep} {name:17s} {dt:6.2f} s  copies {c[0]} started, {c[1]} won"
                    + ("  (warm-up)" if rep == 0 else ""), flush=True,
                )
                if rep:
                    times.setdefault(name, []).append(dt)
                    copies.setdefault(name, []).append(c)
        med = {m: statistics.median(v) for m, v in times.items()}
        print(f"\nmedians of {args.reps}:")
        for m, v in med.items():
            print(f"{m:17s} {v:6.2f} s  copies started/won per run: {copies[m]}")
        for setting in ("slow", "even"):
            a, b = med.get(f"plain/{setting}"), med.get(f"speculative/{setting}")
            if a and b:
                print(f"plain / speculative ({setting}): {a / b:.2f}x")


if __name__ == "__main__":
    main()
