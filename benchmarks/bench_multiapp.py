"""Benchmark of many applications on one cluster (issue: many applications).

Part ``tls`` (``--part tls``): moving bytes between two workers, AIMSS's data
plane against Dask's own transfer, on a TLS cluster (temporary certificates,
``Security.temporary()``, what dask-jobqueue's ``security=True`` makes) and,
for reference, on plain TCP. One LocalCluster per comms kind, 2 nanny
workers of one thread, AIMSS registered with its defaults. ``--gib`` GiB of
float64 arrays of ``--record-mib`` MiB each are made and held on worker A
before each run (not timed; fresh ones, so that B holds no copy); then,
interleaved, ``--reps`` times:

- ``aimss``: one task on A writes every array to the partition of a stream
  owned by worker B and flushes (returns once B stored them all): the data
  plane, over TLS on a TLS cluster;
- ``dask``: one task on B takes the arrays as its arguments: Dask fetches
  them from A over its comms (TLS on a TLS cluster) and the task sums their
  sizes.

Both include one task's scheduling; the stream is destroyed and the arrays
released between runs. Reported: medians of wall time and GB/s,
and aimss/dask per comms kind. Receive buffers are reused across runs by
both (AIMSS's pool; Dask's allocator), so the first run of each is reported
apart (a user's first transfer).

    python benchmarks/bench_multiapp.py --part tls --gib 1 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

import numpy as np
from distributed import Client, LocalCluster, wait
from distributed.security import Security

import aimss_dask

GiB = 2**30


def _make(i: int, nbytes: int) -> np.ndarray:
    return np.full(nbytes // 8, float(i))


def _push(name: str, partition: int, *arrays: np.ndarray) -> int:
    s = aimss_dask.get_stream(name)
    for a in arrays:
        s.write(a, partition=partition)
    s.flush()
    return sum(a.nbytes for a in arrays)


def _take(*arrays: np.ndarray) -> int:
    return sum(a.nbytes for a in arrays)


def _partitions_held(name: str, dask_worker: Any) -> list[int]:
    return sorted(dask_worker.plugins["aimss"].store.stream_stats(name))


def _batches(dask_worker: Any) -> int:
    srv = dask_worker.plugins["aimss"].data_server
    return -1 if srv is None else srv.batches


def transfer(kind: str, args: argparse.Namespace) -> dict[str, list[float]]:
    security = Security.temporary() if kind == "tls" else None
    times: dict[str, list[float]] = {"aimss": [], "dask": []}
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", security=security
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        a, b = sorted(client.scheduler_info()["workers"])
        assert a.startswith(f"{kind}://"), a
        nbytes = args.record_mib * 2**20
        n = max(1, int(args.gib * GiB) // nbytes)
        total = n * nbytes
        for rep in range(args.reps + 1):
            for method in ("aimss", "dask") if rep % 2 == 0 else ("dask", "aimss"):
                # Fresh arrays on A each run: B holds no copy of them yet.
                arrays = [client.submit(_make, i, nbytes, workers=[a], pure=False) for i in range(n)]
                wait(arrays)
                if method == "aimss":
                    name = f"bench-tls-{uuid.uuid4().hex[:8]}"
                    aimss_dask.create_stream(name, partitions=2)
                    [p] = client.run(_partitions_held, name, workers=[b])[b]
                    before = client.run(_batches, workers=[b])[b]
                    t0 = time.perf_counter()
                    got = client.submit(_push, name, p, *arrays, workers=[a], pure=False).result()
                    dt = time.perf_counter() - t0
                    carried = client.run(_batches, workers=[b])[b] - before
                    aimss_dask.destroy_stream(name)
                    assert carried > 0, "the pushes did not take the data plane"
                else:
                    t0 = time.perf_counter()
                    fut = client.submit(_take, *arrays, workers=[b], pure=False)
                    got = fut.result()
                    dt = time.perf_counter() - t0
                    del fut
                assert got == total
                del arrays
                label = "first" if rep == 0 else f"rep {rep}"
                print(f"  {kind} {label:6s} {method:6s} {dt:6.2f} s  {total / dt / 1e9:5.2f} GB/s", flush=True)
                if rep:
                    times[method].append(dt)
                else:
                    times[f"{method}-first"] = [dt]
    return times


def tls(args: argparse.Namespace) -> None:
    total = (max(1, int(args.gib * GiB) // (args.record_mib * 2**20))) * args.record_mib * 2**20
    results = {kind: transfer(kind, args) for kind in args.kinds.split(",")}
    print(f"\nmoving {total / GiB:.2f} GiB worker to worker, {args.record_mib} MiB records, medians of {args.reps}:")
    for kind, times in results.items():
        med = {m: statistics.median(v) for m, v in times.items()}
        for m in ("aimss", "dask"):
            print(
                f"{kind:4s} {m:6s} {med[m]:6.2f} s  {total / med[m] / 1e9:5.2f} GB/s"
                f"   (first run {times[m + '-first'][0]:5.2f} s)"
            )
        print(f"{kind:4s} aimss data plane / Dask's comms: {med['dask'] / med['aimss']:.2f}x faster")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["tls"], default="tls")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--record-mib", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kinds", default="tls,tcp", help="comms kinds to measure, of tls,tcp")
    args = ap.parse_args()
    if args.part == "tls":
        tls(args)


if __name__ == "__main__":
    main()
