"""DLIO-style training read: the AIMSS loader against a synchronous pull loader.

A float32 Zarr array of ``--mib`` MiB (samples of ``--sample-kib`` KiB,
``--chunk-samples`` samples per chunk, zstd unless ``--codec none``) is read
in batches of ``--batch-size`` by one consumer, this process, which sleeps
``--compute`` seconds per batch as if training. Two loaders, interleaved,
after a warm-up round, ``--reps`` times:

* ``aimss``: ``from_zarr`` + ``Stream.batches`` on a LocalCluster of 2
  worker processes (1 thread each). The stream is made anew each round, so
  the brokers start cold; its creation is inside the timed part, its
  destruction after the last batch is not.
* ``pull``: the consumer reads each batch itself, synchronously, from Zarr
  (``arr[a:b]``, or ``arr.oindex[...]`` with ``--shuffle``), or with
  ``--pull dask`` through ``dask.array.from_zarr(...).compute()``.

Both read a file the page cache already holds (it was just written), so the
pull loader pays Zarr's decoding, not the disk. Reported, after DLIO:
AU = compute time / wall time (a run passes at AU >= 0.90), samples/s =
(steps - 2) / wall time x batch size, and MiB/s of samples delivered.

    python benchmarks/bench_loader.py --mib 1024 --batch-size 8 --compute 0.04 --reps 3
    python benchmarks/bench_loader.py --mib 1024 --shuffle --reps 3
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

MiB = 2**20


def _make_array(args: argparse.Namespace, path: str) -> tuple[int, int]:
    import zarr

    cols = args.sample_kib * 1024 // 4
    rows = max(1, int(args.mib * MiB) // (cols * 4))
    kwargs: dict[str, Any] = {}
    if args.codec == "none":
        kwargs["compressors"] = None
    a = zarr.create_array(
        store=path, shape=(rows, cols), chunks=(args.chunk_samples, cols), dtype="f4", **kwargs
    )
    rng = np.random.default_rng(0)
    for lo in range(0, rows, args.chunk_samples * 16):
        hi = min(rows, lo + args.chunk_samples * 16)
        a[lo:hi] = rng.random((hi - lo, cols), dtype=np.float32)
    return rows, cols


def _aimss(args: argparse.Namespace, path: str, rows: int) -> tuple[int, float, float, float]:
    """Steps, compute seconds, checksum and wall time of one epoch through the AIMSS loader.

    The stream's creation is timed (the brokers start cold); its destruction,
    after the last batch, is not.
    """
    import aimss_dask
    from aimss_dask.source import from_zarr

    t0 = time.perf_counter()
    s = from_zarr(path, prefetch=args.prefetch)
    try:
        steps, total = 0, 0.0
        for x in s.batches(args.batch_size, shuffle=args.shuffle, seed=args.seed):
            total += float(x[:, 0].sum(dtype=np.float64))
            time.sleep(args.compute)
            steps += 1
        return steps, steps * args.compute, total, time.perf_counter() - t0
    finally:
        aimss_dask.destroy_stream(s.name)


def _pull(args: argparse.Namespace, path: str, rows: int) -> tuple[int, float, float, float]:
    """The same epoch, read synchronously per batch by the consumer."""
    import zarr

    from aimss_dask.source.layout import batch_plan, epoch_order

    t0 = time.perf_counter()
    arr = zarr.open_array(path, mode="r")
    darr = None
    if args.pull == "dask":
        import dask.array as da

        darr = da.from_zarr(path)
    order = epoch_order(rows, 0, args.seed, args.shuffle)
    steps, total = 0, 0.0
    for _, i, j in batch_plan(rows, args.batch_size, 0, rows):
        if order is None:
            x = arr[i:j] if darr is None else darr[i:j].compute(scheduler="threads")
        else:
            idx = order[i:j]
            sorted_idx = np.sort(idx)
            if darr is None:
                x = arr.oindex[sorted_idx]
            else:
                x = darr[sorted_idx].compute(scheduler="threads")
            x = x[np.searchsorted(sorted_idx, idx)]  # back to the permuted order
        total += float(x[:, 0].sum(dtype=np.float64))
        time.sleep(args.compute)
        steps += 1
    return steps, steps * args.compute, total, time.perf_counter() - t0


def run(args: argparse.Namespace) -> None:
    from distributed import Client, LocalCluster

    import aimss_dask

    workdir = tempfile.mkdtemp(prefix="bench-loader-", dir=args.dir)
    path = os.path.join(workdir, "data.zarr")
    try:
        rows, cols = _make_array(args, path)
        sample_bytes = cols * 4
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster, Client(cluster) as client:
            client.register_plugin(aimss_dask.AIMSS(memory_limit=args.memory_limit))
            methods = {"aimss": _aimss, "pull": _pull}
            results: dict[str, dict[str, list[float]]] = {
                m: {"wall": [], "au": [], "sps": [], "mibs": []} for m in methods
            }
            checks: dict[str, float] = {}
            for rep in range(args.reps + 1):  # the first round warms up
                for name, fn in methods.items():
                    steps, compute, total, wall = fn(args, path, rows)
                    # Both loaders must deliver the same samples.
                    ref = checks.setdefault("ref", total)
                    assert abs(total - ref) <= 1e-6 * max(1.0, abs(ref)), (name, total, ref)
                    au = compute / wall
                    sps = max(steps - 2, 0) / wall * args.batch_size
                    mibs = rows * sample_bytes / MiB / wall
                    tag = "warm-up" if rep == 0 else f"rep {rep}"
                    print(
                        f"  {tag:7s} {name:6s} {wall:7.2f} s  AU {au:5.3f}  {sps:9.1f} samples/s  "
                        f"{mibs:8.1f} MiB/s  ({steps} steps)",
                        flush=True,
                    )
                    if rep == 0:
                        continue
                    for k, v in (("wall", wall), ("au", au), ("sps", sps), ("mibs", mibs)):
                        results[name][k].append(v)
            med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in results.items()}
            print(
                f"\n{rows} samples of {sample_bytes // 1024} KiB ({rows * sample_bytes / MiB:.0f} MiB, "
                f"chunks of {args.chunk_samples}, codec {args.codec}), batch {args.batch_size}, "
                f"compute {args.compute * 1e3:g} ms/step, {'shuffled' if args.shuffle else 'sequential'}, "
                f"pull via {args.pull}; medians of {args.reps}:"
            )
            for m, r in med.items():
                verdict = "pass" if r["au"] >= 0.90 else "FAIL"
                print(
                    f"{m:6s} {r['wall']:7.2f} s  AU {r['au']:5.3f} ({verdict})  "
                    f"{r['sps']:9.1f} samples/s  {r['mibs']:8.1f} MiB/s"
                )
            print(
                f"aimss/pull: samples/s {med['aimss']['sps'] / max(med['pull']['sps'], 1e-9):.2f}x, "
                f"AU {med['aimss']['au'] / max(med['pull']['au'], 1e-9):.2f}x"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=float, default=1024, help="array size in MiB")
    ap.add_argument("--sample-kib", type=int, default=256, help="bytes per sample, in KiB")
    ap.add_argument("--chunk-samples", type=int, default=32, help="samples per Zarr chunk")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compute", type=float, default=0.04, help="seconds of 'training' per batch")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--codec", choices=["zstd", "none"], default="zstd")
    ap.add_argument("--pull", choices=["zarr", "dask"], default="zarr")
    ap.add_argument("--prefetch", type=int, default=None, help="slabs read ahead per partition")
    ap.add_argument("--memory-limit", default=None, help="AIMSS budget per worker, e.g. 1GiB")
    ap.add_argument("--dir", default=None, help="where to write the array (default: a temp dir)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
