"""Benchmark of ``aimss_dask.to_zarr`` (issue: storage brokers, Zarr sinks).

A float64 array of ``--gib`` (``--cols`` columns, row blocks) is generated and
persisted on a LocalCluster of 2 worker processes with 1 thread each; the
timed part is the write, from the call until the data is in the store. Every
method of a case runs in the same run, interleaved (each round starts with
the next method), after a warm-up round; medians over ``--reps``. Reported:
wall time, GB/s, peak RSS of each worker, and the CPU time the workers used
(user + system, summed over both). Writes are buffered (no fsync, as Zarr
does). So that no method pays for another's leftovers, the page cache is
synced before each method and free memory is touched first
(``_common.prefault``). Outputs are kept until a case's last round and
deleted together, and the next case starts a minute later
(``_common.settle``): on this VM's file system, files created within a
minute of a large delete cost ~15x more. ``--cold`` does neither (a
user's first run). Without room on disk for every
round's output, each round's is deleted after it, and the next waits.

Cases (``--cases``):
- ``aligned``: Dask blocks of 1024 rows, Zarr chunks of 1024 rows.
- ``misaligned``: Dask blocks of 1000 rows, Zarr chunks of 1024 rows.
- ``sharded``: Dask blocks of 1024 rows, Zarr chunks of 256 rows in shards
  of 4096 rows.

Methods:
- ``aimss``: ``aimss_dask.to_zarr``.
- ``aimss-durable``: ``aimss_dask.to_zarr(..., durable=True)``: every unit
  file fsynced (by its writer) before the run returns; its ratio to
  ``aimss`` is the cost of that.
- ``dask``: ``dask.array.to_zarr`` as a user would run it correctly: without
  a lock where the blocks are aligned with the chunks (or shards), and with
  ``mode="w"`` (which takes Dask's cluster-wide lock) otherwise.
- ``dask-rechunk``: (misaligned and sharded) ``x.rechunk(unit).to_zarr()``,
  the other correct way to write misaligned blocks with Dask.
- ``plain``: the same bytes written with plain file writes, one file per
  block, by one task per worker that writes the blocks it holds back to back:
  the disk's limit for two writers.
- ``plain-durable``: as ``plain``, each file fsynced: the disk's limit for
  writes that are on disk when they return, what ``aimss-durable`` is
  measured against.
- ``plain-dirs``: as ``plain``, but each block's file goes in the directory
  of the row of units (chunks or shards) it starts in, the way Zarr v3's
  default keys (``c/i/j``) put one directory per row: what that layout
  costs the file system, which every Zarr v3 writer pays and ``plain`` does
  not.

``--hosts 2`` runs the workers on two "hosts" (127.0.0.1 and 127.0.0.2)
sharing this disk, as nodes share a parallel file system: ``aimss`` then
declares ``shared_filesystem=True`` (rows written in place from both
hosts), and ``aimss-push`` is the same call with ``shared_filesystem=False``
(what a file system not known to be shared gets: units pushed to one writer
each). Compare its ``aimss / plain`` with a ``--hosts 1`` run's.

Each case runs with ``--codecs`` ``none`` (uncompressed) and ``default``
(Zarr's default, zstd). Its title says what fraction of the rows must cross
to another worker, given where Dask placed the persisted blocks: the least
any writer with one writer per unit moves, and what ``plain`` never moves.

    python benchmarks/bench_sink.py --gib 2 --reps 3
    python benchmarks/bench_sink.py --gib 0.25 --reps 1 --cases misaligned --codecs none
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
from _common import GiB, cpu_seconds, prefault, remove, settle
from _common import finish as _finish
from _common import start as _start

from aimss_dask._compat import listed_workers

UNIT_ROWS = 1024


def _write_files(directory: str, names: list[str], blocks: list[np.ndarray], sync: bool = False) -> int:
    """One worker's blocks, one file each, written back to back: the disk's limit.

    ``sync``: each file fsynced after its write, and the folder at the end:
    the limit for writes that must be on disk when the call returns.
    """
    for name, block in zip(names, blocks):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(memoryview(np.ascontiguousarray(block)).cast("B"))
            if sync:
                f.flush()
                os.fsync(f.fileno())
    if sync:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return sum(b.nbytes for b in blocks)


def _write_files_in_dirs(directory: str, names: list[str], blocks: list[np.ndarray]) -> int:
    """Like :func:`_write_files`, but ``names`` are ``"dir/file"``: the directory made first."""
    for name in {os.path.dirname(n) for n in names}:
        os.makedirs(os.path.join(directory, name), exist_ok=True)
    return _write_files(directory, names, blocks)


def _crossing(client: Any, x: Any, block_rows: int, unit_rows: int) -> float:
    """The fraction of rows held by another worker than the one holding most of their unit.

    Those rows must move before their unit can be written by one writer: the
    least any correct writer of ``x`` moves, given where Dask placed the blocks.
    """
    who = client.who_has(client.futures_of(x))
    workers = sorted({w for holders in who.values() for w in holders})
    rows = sum(x.chunks[0])
    holder = np.empty(rows, dtype=np.int64)
    for key, holders in who.items():
        holder[key[1] * block_rows : (key[1] + 1) * block_rows] = workers.index(sorted(holders)[0])
    moved = 0
    for lo in range(0, rows, unit_rows):
        counts = np.bincount(holder[lo : lo + unit_rows], minlength=len(workers))
        moved += int(counts.sum() - counts.max())
    return moved / rows


def _check(path: str, x: Any, rows: int) -> None:
    """Spot-check the written array against the input (a chunk edge and the end)."""
    import zarr

    z = zarr.open_array(path, mode="r")
    assert z.shape == x.shape, (z.shape, x.shape)
    for lo in (UNIT_ROWS - 7, rows // 2 - 3, rows - 9):
        sl = slice(max(lo, 0), min(lo + 16, rows))
        got, want = z[sl], x[sl].compute()
        assert np.array_equal(got, want), f"{path}: rows {sl} differ"


def run(args: argparse.Namespace) -> None:
    import dask.array as da
    from distributed import Client, wait

    import aimss_dask

    root = tempfile.mkdtemp(prefix="aimss-bench-sink-", dir=args.dir)
    cols = args.cols
    rows = int(args.gib * GiB) // (8 * cols)
    rows -= rows % 4096
    nbytes = rows * cols * 8
    with _cluster(args.hosts) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        client.register_plugin(aimss_dask.AIMSS(memory_limit=args.memory_limit))
        print(f"workers on {len({w['host'] for w in listed_workers(client).values()})} host(s)")
        summary: list[str] = []
        for case in args.cases.split(","):
            block_rows = 1000 if case == "misaligned" else UNIT_ROWS
            x = da.random.default_rng(1).random((rows, cols), chunks=(block_rows, cols)).persist()
            wait(x)
            if case == "sharded":
                zchunks, shards = (256, cols), (4096, cols)
            else:
                zchunks, shards = (UNIT_ROWS, cols), None
            unit = shards or zchunks
            for codec in args.codecs.split(","):
                ckw: dict[str, Any] = {"compressors": None} if codec == "none" else {}
                zkw: dict[str, Any] = dict(chunks=zchunks, **ckw)
                if shards:
                    zkw["shards"] = shards

                def aimss_run(path: str, shared: bool | None = None) -> None:
                    if shared is None and args.hosts > 1:
                        shared = True  # nodes sharing a parallel file system
                    aimss_dask.to_zarr(x, path, shared_filesystem=shared, **zkw)

                def dask_run(path: str) -> None:
                    # mode="w" takes Dask's lock: needed for correctness when
                    # blocks and chunks (or shards) are not aligned.
                    da.to_zarr(x, path, mode="a" if case == "aligned" else "w", **zkw)

                def dask_rechunk_run(path: str) -> None:
                    da.to_zarr(x.rechunk(unit), path, mode="a", **zkw)

                def plain_run(path: str, dirs: bool = False, sync: bool = False) -> None:
                    # One task per worker writes the blocks it already holds,
                    # back to back: no scheduling between files, no transfer.
                    # With dirs, each block's file goes in the directory of
                    # the row of units it starts in, as Zarr v3's keys
                    # (c/i/j) need: what that layout costs the file system.
                    os.makedirs(path)
                    futures = client.futures_of(x)
                    who = client.who_has(futures)
                    mine: dict[str, list[Any]] = {}
                    for f in futures:
                        mine.setdefault(sorted(who[f.key])[0], []).append(f)

                    def name(key: Any) -> str:
                        flat = "-".join(map(str, key[1:]))
                        return f"c/{key[1] * block_rows // unit[0]}/{flat}" if dirs else flat

                    done = [
                        client.submit(
                            _write_files_in_dirs if dirs else _write_files,
                            path, [name(f.key) for f in fs], fs, *((True,) if sync else ()),
                            workers=[w], pure=False,
                        )
                        for w, fs in mine.items()
                    ]
                    assert sum(client.gather(done)) == nbytes

                def aimss_durable_run(path: str) -> None:
                    aimss_dask.to_zarr(x, path, durable=True, shared_filesystem=args.hosts > 1 or None, **zkw)

                methods = {"aimss": aimss_run, "aimss-durable": aimss_durable_run, "dask": dask_run}
                if args.hosts > 1:
                    methods["aimss-push"] = lambda path: aimss_run(path, shared=False)
                if case != "aligned":
                    methods["dask-rechunk"] = dask_rechunk_run
                methods["plain"] = plain_run
                methods["plain-dirs"] = lambda path: plain_run(path, dirs=True)
                methods["plain-durable"] = lambda path: plain_run(path, sync=True)
                skipped = []
                for m in sorted(args.skip):
                    peers_left = sum(k.startswith("dask") for k in methods)
                    if m in methods and (not m.startswith("dask") or peers_left > 1):  # keep one Dask method
                        del methods[m]
                        skipped.append(m)
                title = (
                    f"{case}, codec {codec}: {nbytes / GiB:.2f} GiB float64 ({rows}x{cols}), "
                    f"blocks of {block_rows} rows, zarr chunks {zchunks}"
                    + (f" shards {shards}" if shards else "")
                    + f"; {_crossing(client, x, block_rows, unit[0]):.1%} of the rows must cross workers"
                )
                print(f"\n== {title}", flush=True)
                med = _measure(args, client, methods, root, x, rows)
                for m, r in med.items():
                    print(
                        f"{m:13s} {r['t']:7.2f} s  {nbytes / r['t'] / 1e9:6.3f} GB/s  "
                        f"worker CPU {r['cpu']:6.2f} s  peak RSS/worker {r['rss'] / GiB:5.2f} GiB"
                    )
                peers = [m for m in med if m.startswith("dask")]
                best = min(peers, key=lambda m: med[m]["t"])
                line = (
                    f"{case:10s} {codec:7s} aimss {nbytes / med['aimss']['t'] / 1e9:5.2f} GB/s; "
                    + ", ".join(f"{m} {nbytes / med[m]['t'] / 1e9:5.2f}" for m in peers)
                    + f"; plain {nbytes / med['plain']['t'] / 1e9:5.2f} GB/s; "
                    f"aimss vs best dask run ({best}) {med[best]['t'] / med['aimss']['t']:.2f}x, "
                    f"aimss / plain {med['plain']['t'] / med['aimss']['t']:.0%} "
                )
                if "plain-dirs" in med:
                    layout = med["plain-dirs"]["t"]
                    line += (
                        f"(/ plain-dirs {layout / med['aimss']['t']:.0%}; plain-dirs / plain "
                        f"{med['plain']['t'] / layout:.0%}) "
                    )
                line += f"(worker CPU {med['aimss']['cpu']:.2f} s vs plain {med['plain']['cpu']:.2f} s)"
                if "aimss-push" in med:
                    line += (
                        f"; pushed (shared_filesystem=False) {nbytes / med['aimss-push']['t'] / 1e9:5.2f} GB/s, "
                        f"aimss-push / plain {med['plain']['t'] / med['aimss-push']['t']:.0%}"
                    )
                if "aimss-durable" in med:
                    line += f"; durable=True costs {med['aimss-durable']['t'] / med['aimss']['t']:.2f}x"
                    if "plain-durable" in med:
                        line += (
                            f" (aimss-durable / plain-durable "
                            f"{med['plain-durable']['t'] / med['aimss-durable']['t']:.0%})"
                        )
                if skipped:
                    line += f" [not run: {', '.join(skipped)}]"
                print(line, flush=True)
                summary.append(line)
        print("\nSummary (medians of %d):" % args.reps)
        print("\n".join(summary))
    shutil.rmtree(root, ignore_errors=True)


def _cluster(hosts: int) -> Any:
    """Two one-thread worker processes: on one host, or one each on 127.0.0.1 and 127.0.0.2."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    if hosts == 1:
        return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    workers = {
        f"w{i}": {"cls": Nanny, "options": {"host": f"127.0.0.{i + 1}", "nthreads": 1}} for i in range(hosts)
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return SpecCluster(scheduler=scheduler, workers=workers)


def _measure(
    args: argparse.Namespace, client: Any, methods: dict[str, Any], root: str, x: Any, rows: int
) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, list[float]]] = {m: {"t": [], "rss": [], "cpu": []} for m in methods}
    names = list(methods)
    # Keep every round's output until the end if the disk has room for it
    # (compressed output is smaller; count it whole), else delete per round.
    need = (args.reps + 1) * len(names) * args.gib * GiB * 1.05 + 4 * GiB
    keep = shutil.disk_usage(root).free > need
    paths: list[str] = []
    for rep in range(args.reps + 1):  # the first round warms up
        if (rep == 0 or not keep) and not args.cold:
            waited = settle(args.settle)
            if waited > 1:
                print(f"  (waited {waited:.0f} s for the file system to forget deleted inodes)", flush=True)
        # Each round starts with another method, so that none always runs
        # first (or always right after the heaviest one).
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            fn = methods[name]
            path = os.path.join(root, f"{name}-{rep}.zarr")
            paths.append(path)
            # Start every method with no dirty pages waiting for the disk
            # (otherwise a method pays for the writeback of the one before),
            # and with backed free pages for its page cache.
            os.sync()
            if not args.cold:
                prefault(int(args.gib * GiB) + GiB)
            client.run(_start)
            cpu0 = client.run(cpu_seconds)
            t0 = time.perf_counter()
            fn(path)
            dt = time.perf_counter() - t0
            cpu = sum(client.run(cpu_seconds).values()) - sum(cpu0.values())
            peaks = client.run(_finish)
            if not name.startswith("plain"):
                _check(path, x, rows)
            if rep == 0:
                continue
            rss = max(r for r, _ in peaks.values())
            results[name]["t"].append(dt)
            results[name]["rss"].append(rss)
            results[name]["cpu"].append(cpu)
            print(
                f"  rep {rep} {name:13s} {dt:7.2f} s  worker CPU {cpu:6.2f} s  peak RSS/worker {rss / GiB:.2f} GiB",
                flush=True,
            )
        if not keep:
            remove(paths)
            paths = []
    remove(paths)
    return {m: {k: statistics.median(v) for k, v in r.items()} for m, r in results.items()}


#: Methods a run may leave out (aimss and plain are always run).
SKIPPABLE = ("dask", "dask-rechunk", "plain-dirs", "aimss-durable", "plain-durable", "aimss-push")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default="aligned,misaligned,sharded")
    ap.add_argument("--codecs", default="none,default")
    ap.add_argument("--dir", default=None, help="where the arrays are written (default: $TMPDIR)")
    ap.add_argument("--memory-limit", default=None, help="AIMSS budget per worker, e.g. 1GiB")
    ap.add_argument(
        "--hosts", type=int, choices=(1, 2), default=1,
        help="run the two workers on one host, or on two (127.0.0.1 and 127.0.0.2) sharing this disk",
    )
    ap.add_argument(
        "--settle", type=float, default=61.0,
        help="seconds between deleting outputs and timing new writes (0: no wait); see _common.settle",
    )
    ap.add_argument(
        "--cold", action="store_true",
        help="a user's first run: no prefaulted memory, no wait for the file system after deletes",
    )
    ap.add_argument(
        "--skip", default="",
        help="methods not to run, comma-separated, from " + ", ".join(SKIPPABLE)
        + " (for a quicker confirming run: Dask's locked path takes 10-18 s per repetition); "
        "a case keeps its only Dask method",
    )
    args = ap.parse_args()
    skip = {m for m in args.skip.split(",") if m}
    if skip - set(SKIPPABLE):
        ap.error(f"--skip {args.skip!r}: can skip only {', '.join(SKIPPABLE)}")
    args.skip = skip
    run(args)


if __name__ == "__main__":
    main()
