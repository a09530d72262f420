"""What durability costs the streaming sink: ``durable=True`` (fsync) against ``durable=False``.

A stream of ``--partitions`` partitions on a LocalCluster of 2 worker
processes (1 thread each) gets ``--mib`` MiB of float64 records (``--rows``
rows of ``--cols`` columns each); a streaming sink drains it into a Zarr
array on ``--dir``. Timed: from the sink's start until ``wait()`` returns
after the seal, i.e. until every row is committed. Both settings run in the
same run, interleaved, ``--reps`` times each; medians and their ratio.

Each round's array is deleted right after it; no prefault and no wait for
the file system, so every round is what a user's run sees. The first round
of each setting is reported apart ("first"), as a user's first run.

    python benchmarks/bench_stream_sink.py --mib 512 --reps 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np


def _one(client, root: str, durable: bool, args: argparse.Namespace, i: int) -> float:
    import aimss_dask

    path = os.path.join(root, f"r{i}-{int(durable)}.zarr")
    s = aimss_dask.create_stream(f"bench-sink-{i}-{int(durable)}", partitions=args.partitions)
    record = np.ones((args.rows, args.cols))
    n = int(args.mib * 2**20 // record.nbytes)
    t0 = time.perf_counter()
    sink = s.to_zarr(path, chunks=args.rows * 4, durable=durable)
    for k in range(n):
        s.write(record, partition=k % args.partitions)
    s.seal()
    sink.wait(timeout=600)
    took = time.perf_counter() - t0
    import zarr

    got = zarr.open_array(path, mode="r")
    assert got.shape == (n * args.rows, args.cols), got.shape
    aimss_dask.destroy_stream(s.name)
    shutil.rmtree(path)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=float, default=512)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=128)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the arrays are written (default: $TMPDIR)")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    import aimss_dask

    root = tempfile.mkdtemp(prefix="bench-stream-sink-", dir=args.dir)
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(
            cluster
        ) as client:
            client.register_plugin(aimss_dask.AIMSS())
            for i in range(args.reps):
                order = (True, False) if i % 2 == 0 else (False, True)
                for durable in order:
                    times[durable].append(_one(client, root, durable, args, i))
                    print(f"round {i} durable={durable}: {times[durable][-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gb = args.mib * 2**20 / 1e9
    print(f"\n{args.mib:g} MiB, {args.partitions} partitions, chunks of {args.rows * 4} rows x {args.cols}")
    for durable in (False, True):
        t = times[durable]
        print(
            f"durable={durable!s:5}: first {t[0]:.2f} s; median of the rest "
            f"{statistics.median(t[1:] or t):.2f} s ({gb / statistics.median(t[1:] or t):.2f} GB/s)"
        )
    ratio = statistics.median(times[True][1:] or times[True]) / statistics.median(times[False][1:] or times[False])
    print(f"durable / not durable (medians): {ratio:.2f}x")


if __name__ == "__main__":
    main()
