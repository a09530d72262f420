"""Benchmark of speculation (issue: stragglers): tasks, a shuffle, a to_zarr, consumers and a loader, with one slow worker.

Part ``tasks`` (``--part tasks``):

A LocalCluster of ``--workers`` nanny processes (1 thread each) with AIMSS
at its default ``aimss.speculation`` settings runs ``--tasks`` calls of one
function, each taking ``--seconds`` on a normal worker and ``--factor``
times that on the slow one (the first worker by address). The work is a
sleep: a task whose time goes to I/O, a remote service or a device, so
that the copies' CPU does not compete with the measurement on a small
machine. Methods, interleaved (the order turns each round and runs
backwards every other round, so that no method always follows the same
one; in the other parts, plain Dask ends every round, the others take turns
right after it, and the workers collect garbage and wait ``SETTLE``
seconds before each run: use an even ``--reps`` there), medians over
``--reps`` after a warm-up:

- ``speculative``: the function declared idempotent
  (``aimss_dask.speculative``): a straggling call gets a copy on a fast
  worker, and the first result wins;
- ``plain``: the same function, not declared: Dask's own scheduling, and
  AIMSS only reports the stragglers (speculation off for it);

each with the slow worker (``slow``) and without one (``even``: every worker
normal; the overhead, and no copy may start). Reported: wall time, copies
started and won, and the ratio plain / speculative.

Dask's dynamic scheduling already gives a slow worker fewer ordinary tasks,
so copies here shorten only the tail.

    python benchmarks/bench_stragglers.py --part tasks --tasks 24 --seconds 1.2 --factor 4 --reps 3

Part ``shuffle`` (``--part shuffle``): a ``--gib`` GiB DataFrame shuffle
(``--partitions`` input partitions of int64 id, int64 key, float64 value,
persisted first) on a LocalCluster of ``--workers`` nanny processes with
AIMSS: ``spec-on`` (its defaults), ``spec-off`` (``aimss.speculation``
switched off on the coordinator between runs: a benchmark's switch, so that
both run on the same workers, interleaved) and Dask's P2P shuffle (``p2p``).
The slow worker is slow for real: it runs only ``--share`` of the time
(``aimss_dask.testing.throttled``, SIGSTOP/SIGCONT, a CPU-share limit: its
tasks, event loop and data plane all slow down). Methods interleaved, a
warm-up run of each first (not counted; printed apart), with no slow worker
first (``even``: the overhead), then with the slow one (``slow``; its
warm-up is when the coordinator first finds the worker slow). Reported: wall time, push copies started,
whether the coordinator knew the slow worker when the run started,
medians and ratios.

With speculation on, AIMSS copies straggling pushes (the first copy of each
record wins at its owner), places no partition of a run on a worker found
slow, so the output phase never waits for it, and runs none of the pushes
of a run submitted while it is known slow there (their inputs move); off,
the slow worker keeps its share of the partitions and pushes its own
inputs. On a machine with fewer cores than workers, the slow worker's lost
CPU goes to the others: with 4 CPU-bound workers on 2
cores, the others get ``(2 - share) / 3`` of a core each, so the default
share 0.15 makes the slow worker about 4x slower than the others (not
``1 / share``). The time with no slow worker bounds what speculation can
win back.

    python benchmarks/bench_stragglers.py --part shuffle --gib 1 --share 0.15 --reps 6

Part ``zarr`` (``--part zarr``): the same comparison for a ``--zarr-gib`` GiB
float64 array (``--partitions`` persisted row blocks) written to Zarr with
chunks of 1.5 blocks, so that no unit matches a block: ``aimss_dask.to_zarr``
(its push run: pieces go to each unit's owner, which writes the unit once
complete) against plain Dask (``x.rechunk(chunks).to_zarr(path)``). Each run
writes a new array in a temporary folder this benchmark made, checks a
sample of it against the input, and deletes it.

    python benchmarks/bench_stragglers.py --part zarr --zarr-gib 2 --share 0.15 --reps 6

With ``--slow disk`` the slow worker's CPU is not limited; its disk is slow
instead: every chunk it writes waits ``--disk-delay`` seconds first
(``aimss_dask.testing.slow_writes``: AIMSS's sink writes and Zarr's own
``LocalStore`` writes alike, so plain Dask's chunks written there wait too).
A slow writer of aimss's is then helped by a hand-over of its queue to a
fast worker (speculation on).

    python benchmarks/bench_stragglers.py --part zarr --zarr-gib 2 --slow disk --disk-delay 0.75 --reps 6

Part ``consumers`` (``--part consumers``): a stream of ``--stream-partitions``
partitions of ``--records`` records each (1 KiB arrays), written once and
sealed, consumed by one consumer per partition doing ``--work-ms`` ms of CPU
per record (a busy loop on the thread's CPU clock: fixed work, which the
slow worker's CPU share stretches): ``Stream.map_records`` with speculation
on (a consumer that falls behind hands the rest of its range to a helper on
a fast worker, and one that starts on a worker found slow hands all of it)
and off (each partition's consumer on its owner, to the end), against plain
Dask: the same records as one list per partition in Dask's memory,
``client.map`` of a function that does the same work on each list. Reported
per run: consumer helpers started.

    python benchmarks/bench_stragglers.py --part consumers --records 1000 --work-ms 2 --share 0.15 --reps 6

Part ``loader`` (``--part loader``): a ``--loader-gib`` GiB float32 Zarr array
(slabs of 1024 rows, written once into a temporary folder this benchmark
made) read in order by ``Stream.batches`` over ``aimss_dask.source.from_zarr``
with ``--stream-partitions`` partitions, a batch being one slab of every
partition, so every batch waits for every owner: speculation on (a take the
slow owner is late with is read again by a fast owner, from Zarr) and off,
against plain Dask (``da.from_zarr(path)[i:j].compute()`` per batch).
Reported per run: backups that answered first / backups started.

    python benchmarks/bench_stragglers.py --part loader --loader-gib 1 --share 0.15 --reps 6

With ``--slow disk`` the slow worker's chunk reads wait ``--disk-delay``
seconds each instead (``aimss_dask.testing.slow_reads``, for any reader of a
local Zarr store in that process: its brokers and Dask's tasks alike).

    python benchmarks/bench_stragglers.py --part loader --loader-gib 1 --slow disk --disk-delay 0.1 --reps 6
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import pandas as pd
from distributed import get_worker

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.testing import slow_reads, slow_writes, throttled


def _order(methods: list[Any], rep: int, last: Any = None) -> list[Any]:
    """The order of round ``rep``: turned by one each round; ``last`` (the peer), if given, ends every round.

    Without ``last``, backwards every other round too, so that no method
    always follows the same one. With it, the methods compared with each
    other take turns right after the peer (a run after Dask's P2P shuffle
    pays for the memory P2P frees meanwhile): with an even number of rounds,
    each follows it equally often.
    """
    rest = [m for m in methods if m != last]
    k = rep % len(rest)
    order = rest[k:] + rest[:k]
    if last is not None:
        return order + [last]
    return order[::-1] if rep % 2 else order


#: Seconds each run waits, after collecting garbage on the workers, before
#: it starts: what the run before it freed (a P2P shuffle's buffers, say)
#: is given back first, so that no method pays for the one before it.
SETTLE = 1.0


def _settle(client: Any) -> None:
    client.run(gc.collect)
    time.sleep(SETTLE)


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
    ap.add_argument("--part", choices=("tasks", "shuffle", "zarr", "consumers", "loader", "all"), default="all")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=1.2, help="a task's time on a normal worker")
    ap.add_argument("--factor", type=float, default=4.0, help="how much slower the slow worker is (tasks)")
    ap.add_argument("--gib", type=float, default=1.0, help="shuffle input size")
    ap.add_argument("--zarr-gib", type=float, default=2.0, help="to_zarr array size")
    ap.add_argument("--partitions", type=int, default=32, help="shuffle input partitions, to_zarr input blocks")
    ap.add_argument("--share", type=float, default=0.15, help="the slow worker's share of time (shuffle)")
    ap.add_argument("--slow", choices=("cpu", "disk"), default="cpu",
                    help="zarr, loader: what is slow on the slow worker: its CPU (--share), or its disk (--disk-delay)")
    ap.add_argument("--loader-gib", type=float, default=1.0, help="loader: the Zarr source's size")
    ap.add_argument("--disk-delay", type=float, default=0.75,
                    help="--slow disk: seconds each chunk write (zarr) or read (loader) waits")
    ap.add_argument("--stream-partitions", type=int, default=8, help="consumers: stream partitions")
    ap.add_argument("--records", type=int, default=1000, help="consumers: records per partition")
    ap.add_argument("--work-ms", type=float, default=2.0, help="consumers: CPU ms per record")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.part in ("tasks", "all"):
        tasks(args)
    if args.part in ("shuffle", "all"):
        shuffle(args)
    if args.part in ("zarr", "all"):
        zarr(args)
    if args.part in ("consumers", "all"):
        consumers(args)
    if args.part in ("loader", "all"):
        loader(args)


def tasks(args: argparse.Namespace) -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        slow_worker = sorted(listed_workers(client))[0]
        fns = {"speculative": _speculative_work, "plain": _work}
        methods = [(f, s) for s in ("slow", "even") for f in fns]
        times: dict[str, list[float]] = {}
        copies: dict[str, list[tuple[int, int]]] = {}
        print(
            f"{args.tasks} tasks of {args.seconds:g} s on {args.workers} workers; "
            f"the slow one {args.factor:g}x slower", flush=True,
        )
        for rep in range(args.reps + 1):
            order = _order(methods, rep)
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
        med = _medians(times, copies, "copies started/won per run")
        for setting in ("slow", "even"):
            a, b = med.get(f"plain/{setting}"), med.get(f"speculative/{setting}")
            if a and b:
                print(f"plain / speculative ({setting}): {a / b:.2f}x")


def _make(i: int, rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(i)
    return pd.DataFrame({"id": np.arange(i * rows, (i + 1) * rows), "k": rng.integers(0, 100_000, rows), "v": rng.random(rows)})


def _copy_events(client: Any, since: float, kind: str | None = None, key_part: str | None = None) -> list[dict[str, Any]]:
    """The copy events since ``since``: of ``kind``, or whose key holds ``key_part``."""
    return [
        m for t, m in client.get_events("aimss-straggler")
        if t >= since and isinstance(m, dict) and m.get("action") == "copy"
        and (kind is None or m.get("kind") == kind) and (key_part is None or key_part in str(m.get("key")))
    ]


def _push_copies(client: Any, since: float) -> int:
    return len(_copy_events(client, since, key_part="aimss-push-"))


def _sink_copies(client: Any, since: float) -> str:
    """Push copies and sink writers' hand-overs a to_zarr run started: "pushes+hand-overs"."""
    return f"{_push_copies(client, since)}+{len(_copy_events(client, since, kind='sink-writer'))}"


def _speculation(dask_scheduler: Any, enabled: bool) -> None:
    """The benchmark's switch: speculation on or off on the running coordinator (not an API)."""
    from aimss_dask.core.names import PLUGIN_NAME

    stragglers = dask_scheduler.plugins[PLUGIN_NAME].stragglers
    stragglers.config = replace(stragglers.config, enabled=enabled)


def _medians(times: dict[str, list[float]], copies: dict[str, list[Any]], what: str) -> dict[str, float]:
    """Print each method's median time (runs after its warm-up) and its copies per run; the medians."""
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\nmedians of {len(next(iter(times.values())))} (after a warm-up of each):")
    for m, v in med.items():
        print(f"{m:17s} {v:6.2f} s  {what}: {copies[m]}")
    return med


def _consumer_helpers(client: Any, since: float) -> int:
    return len(_copy_events(client, since, kind="consumer"))


def _interleave(
    client: Any, slow: str, pid: int, methods: list[str], run: Callable[[str], None], args: argparse.Namespace,
    baseline: str, copies_of: Callable[[Any, float], Any] = _push_copies, what: str = "push copies",
) -> None:
    """Run ``methods`` interleaved, with no slow worker then with one; print runs, medians, ratios.

    ``run(method)`` does one run and checks its result; ``baseline``: the
    method that is not AIMSS (plain Dask); ``copies_of(client, since)``:
    the copies a run started, reported as ``what``.
    """

    def known() -> str:
        return "  (slow worker known)" if slow in aimss_dask.status().stragglers["slow_workers"] else ""

    times: dict[str, list[float]] = {}
    copies: dict[str, list[Any]] = {}
    # No slow worker first (the overhead, before any worker is found
    # slow), then the slow worker.
    for setting in ("even", "slow"):
        for rep in range(args.reps + 1):
            order = _order(methods, rep, last=baseline)
            for method in order:
                _settle(client)
                flag = known()
                t0, w0 = time.perf_counter(), time.time()
                with _slowdown(client, slow, pid, args) if setting == "slow" else nullcontext():
                    run(method)
                dt = time.perf_counter() - t0
                time.sleep(0.5)  # copies' reports reach the event log
                c = copies_of(client, w0)
                name = f"{method}/{setting}"
                print(f"  {name:14s} rep {rep} {dt:6.2f} s  {what} {c}" + flag
                      + ("  (warm-up)" if rep == 0 else ""), flush=True)
                if rep:
                    times.setdefault(name, []).append(dt)
                    copies.setdefault(name, []).append(c)
    med = _medians(times, copies, f"{what} per run")
    print(f"spec-off / spec-on (slow): {med['spec-off/slow'] / med['spec-on/slow']:.2f}x (target >= 1.5x)")
    print(f"{baseline} / spec-on (slow): {med[baseline + '/slow'] / med['spec-on/slow']:.2f}x")
    print(f"spec-on / spec-off (even): {med['spec-on/even'] / med['spec-off/even']:.2f}x (overhead: target < 1.05x)")
    print(f"slow / even, spec-on: {med['spec-on/slow'] / med['spec-on/even']:.2f}x; "
          f"spec-off: {med['spec-off/slow'] / med['spec-off/even']:.2f}x")


def _slowdown(client: Any, slow: str, pid: int, args: argparse.Namespace) -> Any:
    """The slow worker's handicap: a CPU share (``--slow cpu``), or a slow disk (``--slow disk``:
    its chunk writes, or for the loader its chunk reads, wait ``--disk-delay`` each)."""
    if args.slow == "disk":
        return (slow_reads if args.part == "loader" else slow_writes)(client, slow, args.disk_delay)
    return throttled(pid, args.share)


def _what_slow(args: argparse.Namespace) -> str:
    if args.slow == "disk":
        return f"its every chunk {'read' if args.part == 'loader' else 'write'} waits {args.disk_delay:g} s"
    return f"it runs {args.share:g} of the time"


def _cluster(args: argparse.Namespace) -> Any:
    from distributed import LocalCluster

    return LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0")


def _slow_worker(client: Any) -> tuple[str, int]:
    """The worker to slow down (the first by address) and its process id."""
    slow = sorted(listed_workers(client))[0]
    return slow, client.run(os.getpid, workers=[slow])[slow]


def shuffle(args: argparse.Namespace) -> None:
    import dask
    import dask.dataframe as dd
    from distributed import Client, wait

    rows = int(args.gib * 2**30) // 24 // args.partitions
    with _cluster(args) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        df = dd.from_delayed([dask.delayed(_make)(i, rows) for i in range(args.partitions)], meta=_make(0, 1))
        frame = client.persist(df)
        wait(frame)
        slow, pid = _slow_worker(client)

        def run(method: str) -> None:
            if method == "p2p":
                out = frame.shuffle(on="k", shuffle_method="p2p")
            else:
                client.run_on_scheduler(_speculation, enabled=method == "spec-on")
                out = aimss_dask.shuffle(frame, on="k")
            n = int(out.map_partitions(len).compute().sum())
            assert n == rows * args.partitions, (method, n)

        print(
            f"\nshuffle of {args.gib:g} GiB ({args.partitions} partitions) on {args.workers} workers "
            f"(one slow: it runs {args.share:g} of the time)", flush=True,
        )
        _interleave(client, slow, pid, ["spec-on", "spec-off", "p2p"], run, args, baseline="p2p")


def zarr(args: argparse.Namespace) -> None:
    import shutil
    import tempfile

    import dask.array as da
    from distributed import Client, wait

    cols = 1024
    rows = int(args.zarr_gib * 2**30) // 8 // cols
    block = -(-rows // args.partitions)
    # Zarr chunks of 1.5 input blocks: the units do not match the blocks, so
    # aimss pushes pieces to each unit's owner, and plain Dask rechunks first.
    zchunks = (block * 3 // 2, cols)
    root = tempfile.mkdtemp(prefix="aimss-bench-zarr-")
    try:
        with _cluster(args) as cluster, Client(cluster) as client:
            client.register_plugin(aimss_dask.AIMSS())
            x = da.random.default_rng(1).random((rows, cols), chunks=(block, cols)).persist()
            wait(x)
            want = float(x[::997].sum().compute())
            slow, pid = _slow_worker(client)
            runs = iter(range(10**6))

            def run(method: str) -> None:
                path = os.path.join(root, f"{method}-{next(runs)}.zarr")
                if method == "dask":
                    x.rechunk(zchunks).to_zarr(path)
                else:
                    client.run_on_scheduler(_speculation, enabled=method == "spec-on")
                    aimss_dask.to_zarr(x, path, chunks=zchunks)
                got = float(da.from_zarr(path)[::997].sum().compute())
                shutil.rmtree(path)  # this run's own array
                assert got == want, (method, got, want)

            print(
                f"\nto_zarr of {args.zarr_gib:g} GiB ({args.partitions} blocks, Zarr chunks of "
                f"{zchunks[0]} rows) on {args.workers} workers (one slow: {_what_slow(args)})",
                flush=True,
            )
            _interleave(
                client, slow, pid, ["spec-on", "spec-off", "dask"], run, args, baseline="dask",
                copies_of=_sink_copies, what="push copies+hand-overs",
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the folder this benchmark made


def _busy(record: np.ndarray, ms: float) -> float:
    """``ms`` of this thread's CPU time, then a result that depends on the record."""
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass
    return float(record.sum())


def _busy_list(records: list[np.ndarray], ms: float) -> list[float]:
    return [_busy(r, ms) for r in records]


def _records(p: int, n: int) -> list[np.ndarray]:
    return [np.full(128, p * 1_000_003 + i, dtype=np.float64) for i in range(n)]


def consumers(args: argparse.Namespace) -> None:
    from distributed import Client, wait

    nparts = args.stream_partitions
    want = [[float(r.sum()) for r in _records(p, args.records)] for p in range(nparts)]
    with _cluster(args) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        name = f"bench-consumers-{os.getpid()}"
        stream = aimss_dask.create_stream(name, partitions=nparts)
        for p in range(nparts):
            for r in _records(p, args.records):
                stream.write(r, partition=p)
        stream.seal()
        # Plain Dask's copy of the same records: one list per partition,
        # spread over the workers as the stream's partitions are.
        lists = [
            client.scatter([_records(p, args.records)], workers=[o])[0]
            for p, o in enumerate(stream.info()["owners"])
        ]
        wait(lists)
        slow, pid = _slow_worker(client)

        def run(method: str) -> None:
            if method == "dask":
                futs = client.map(_busy_list, lists, ms=args.work_ms, pure=False)
            else:
                client.run_on_scheduler(_speculation, enabled=method == "spec-on")
                futs = stream.map_records(_busy, args.work_ms)
            got = client.gather(futs)
            assert got == want, method

        print(
            f"\nconsumers: {nparts} partitions x {args.records} records, {args.work_ms:g} ms of CPU each, on "
            f"{args.workers} workers (one slow: it runs {args.share:g} of the time; owners: "
            f"{sum(o == slow for o in stream.info()['owners'])} partitions on it)", flush=True,
        )
        _interleave(client, slow, pid, ["spec-on", "spec-off", "dask"], run, args, baseline="dask",
                    copies_of=_consumer_helpers, what="consumer helpers")
        aimss_dask.destroy_stream(name)


def _loader_copies(client: Any, since: float) -> str:
    """Late takes a run's loader backed up, and how many the backup won: "won/copies"."""
    events = _copy_events(client, since, kind="loader")
    copies = sum(int(m["copies"]) for m in events)
    won = sum(int(m["outcome"].split()[2]) for m in events)  # "copy won k of n"
    return f"{won}/{copies}"


def loader(args: argparse.Namespace) -> None:
    import shutil
    import tempfile

    import dask.array as da
    import zarr as zarr_lib
    from distributed import Client

    from aimss_dask.source import from_zarr

    cols = 1024
    slab = 1024  # rows per Zarr chunk: 4 MiB of float32
    rows = int(args.loader_gib * 2**30) // 4 // cols // slab * slab
    batch = slab * args.stream_partitions  # one slab of every partition per batch
    root = tempfile.mkdtemp(prefix="aimss-bench-loader-")
    try:
        path = os.path.join(root, "source.zarr")
        src = zarr_lib.create_array(store=path, shape=(rows, cols), chunks=(slab, cols), dtype="f4")
        rng = np.random.default_rng(2)
        for i in range(0, rows, slab * 16):
            src[i : i + slab * 16] = rng.random((min(slab * 16, rows - i), cols), dtype=np.float32)
        want = float(np.asarray(src[::509]).astype(np.float64).sum())
        with _cluster(args) as cluster, Client(cluster) as client:
            client.register_plugin(aimss_dask.AIMSS())
            slow, pid = _slow_worker(client)
            runs = iter(range(10**6))

            def run(method: str) -> None:
                got = 0.0
                if method == "dask":
                    x = da.from_zarr(path)
                    for i in range(0, rows, batch):
                        b = x[i : i + batch].compute()
                        got += float(b[(-i) % 509 :: 509].astype(np.float64).sum())
                else:
                    client.run_on_scheduler(_speculation, enabled=method == "spec-on")
                    s = from_zarr(path, partitions=args.stream_partitions, name=f"bench-loader-{next(runs)}")
                    try:
                        i = 0
                        for b in s.batches(batch):
                            got += float(b[(-i) % 509 :: 509].astype(np.float64).sum())
                            i += len(b)
                    finally:
                        aimss_dask.destroy_stream(s.name)
                assert abs(got - want) <= 1e-6 * abs(want), (method, got, want)

            print(
                f"\nloader over {rows * cols * 4 / 2**30:.2f} GiB of Zarr ({rows // slab} slabs, "
                f"{args.stream_partitions} partitions, batches of {batch} rows) on {args.workers} workers "
                f"(one slow: {_what_slow(args)})", flush=True,
            )
            _interleave(client, slow, pid, ["spec-on", "spec-off", "dask"], run, args, baseline="dask",
                        copies_of=_loader_copies, what="backups won/started")
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the folder this benchmark made


if __name__ == "__main__":
    main()

