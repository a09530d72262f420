"""Benchmark of spilling to disk and reading back (issue: data safety).

AIMSS's log spills sealed segments into a folder of its own and verifies each
file when it reads it back (header: stream, partition, epoch, offsets;
CRC32C per record). The peer is Dask's own spill path for worker data,
``distributed.spill.SpillBuffer`` (zict: pickled, compressed with the
configured ``distributed.worker.memory.spill-compression``, one file per key),
which verifies nothing.

For each record size, the same records go through both, interleaved, in
one process:

- *spill*: store ``--mib`` MiB under a budget of an eighth of it, so 7/8 of
  the bytes are written to disk;
- *reload*: read every record back (from disk where spilled) and touch it.

Reported: medians over ``--reps`` of the seconds of each phase and GB/s, the
ratio aimss / Dask, and the time CRC32C alone takes over the bytes (the cost
of verification). Every repetition uses fresh folders and fresh records. The
first repetition (a user's first run: fresh memory, cold folders) is printed
apart from the medians of the others.

    python benchmarks/bench_spill.py [--mib 512] [--reps 5] [--sizes 64KiB,1MiB]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
from dask.utils import format_bytes, parse_bytes

MiB = 2**20


def _records(total: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    n = max(1, total // size)
    # Random bytes: compression cannot shortcut the peer's writes.
    return [rng.integers(0, 2**63, size // 8, dtype=np.int64) for _ in range(n)]


def run_aimss(records: list[np.ndarray], root: str) -> tuple[float, float]:
    from aimss_dask.log.store import LogStore

    total = sum(r.nbytes for r in records)
    store = LogStore(budget=total // 8, spill_root=root, segment_size=4 * MiB)
    store.open("bench", 1, [0])
    t0 = time.perf_counter()
    for r in records:
        store.append("bench", 1, 0, [r], [r.nbytes])
        if store.over_budget:
            store.spill()
    t1 = time.perf_counter()
    got, offset = 0, 0
    while True:
        out, _, _ = store.read("bench", 1, 0, offset, 64 * MiB)
        if not out:
            break
        for a in out:
            got += int(a[-1] != 0) + a.nbytes - 1  # touch the record
        offset += len(out)
    t2 = time.perf_counter()
    assert offset == len(records) and store.spilled_bytes > total // 2
    store.close()
    return t1 - t0, t2 - t1


def run_dask(records: list[np.ndarray], root: str) -> tuple[float, float]:
    from distributed.spill import SpillBuffer

    total = sum(r.nbytes for r in records)
    buf = SpillBuffer(root, target=total // 8)
    t0 = time.perf_counter()
    for i, r in enumerate(records):
        buf[f"k{i}"] = r
    t1 = time.perf_counter()
    got = 0
    for i in range(len(records)):
        a = buf[f"k{i}"]
        got += int(a[-1] != 0) + a.nbytes - 1
    t2 = time.perf_counter()
    assert len(buf.slow) > len(records) // 2
    buf.clear()
    return t1 - t0, t2 - t1


def crc_only(records: list[np.ndarray]) -> float:
    from aimss_dask.log.spillfile import _crc

    t0 = time.perf_counter()
    for r in records:
        _crc(r)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="MiB per method and repetition (default: 512)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (default: 5)")
    ap.add_argument("--sizes", default="64KiB,1MiB", help="record sizes (default: 64KiB,1MiB)")
    ap.add_argument("--dir", default=None, help="where to spill (default: a temporary folder)")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="aimss-bench-spill-", dir=args.dir)
    methods: dict[str, Callable[[list[np.ndarray], str], tuple[float, float]]] = {
        "aimss": run_aimss,
        "dask": run_dask,
    }
    try:
        for size in (parse_bytes(s) for s in args.sizes.split(",")):
            total = args.mib * MiB
            times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
            crcs: list[float] = []
            for rep in range(args.reps):
                order = list(methods) if rep % 2 == 0 else list(reversed(methods))
                for m in order:
                    recs = _records(total, size, seed=rep)
                    root = os.path.join(base, f"{m}-{rep}")
                    gc.collect()
                    times[m].append(methods[m](recs, root))
                    shutil.rmtree(root, ignore_errors=True)
                    del recs
                crcs.append(crc_only(_records(total, size, seed=rep)))
            print(f"\n== {args.mib} MiB as records of {format_bytes(size)}, budget 1/8 (7/8 spilled) ==")
            for m in methods:
                s0, r0 = times[m][0]
                print(f"  first run  {m:6s} spill {s0:6.3f} s  reload {r0:6.3f} s")
            rest = slice(1, None) if args.reps > 1 else slice(None)
            med = {
                m: (statistics.median(t[0] for t in times[m][rest]), statistics.median(t[1] for t in times[m][rest]))
                for m in methods
            }
            gb = total / 1e9
            for m, (sp, rl) in med.items():
                print(
                    f"  median     {m:6s} spill {sp:6.3f} s ({gb / sp:5.2f} GB/s)  "
                    f"reload {rl:6.3f} s ({gb / rl:5.2f} GB/s)"
                )
            a, d = med["aimss"], med["dask"]
            print(f"  aimss vs dask: spill {d[0] / a[0]:.2f}x, reload {d[1] / a[1]:.2f}x (>1: aimss faster)")
            c = statistics.median(crcs[rest])
            print(f"  CRC32C of the same bytes alone: {c:.3f} s ({gb / c:.2f} GB/s), counted twice (spill + reload)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
