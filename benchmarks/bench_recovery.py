"""Benchmark of recovery (issue: fault tolerance): streams that lose an owner, and a shuffle that loses a worker.

Part (1), ``--part streams``: a replicated stream that loses an owner.

``--stream-gib`` of 1 MiB records in 4 partitions per worker, on a
LocalCluster of ``--workers`` nanny processes, ``replication=2``, written by
tasks on the workers. A consumer group ``g`` has consumed (committed) 75%
of every partition. Then one worker is SIGKILLed (its nanny restarts it),
and a consumer of ``g`` on a partition the victim owned asks for its next
record. Measured from the kill:

- ``next record``: until that consumer has its next record;
- ``readable``: until no partition is owned by the dead worker;
- ``redundant``: until every partition has its copies again, in sync;
- ``MB sent``: what the owners sent to build the new copies.

Then every record the group had not committed is read back and checked
(none lost, none twice). Methods, interleaved, a fresh cluster each:
``offsets`` (``aimss.recovery: offsets``: a new copy gets only what the
group has not passed), ``full`` (every record), and ``dask``: the same
records as a persisted Dask collection (one 1 MiB NumPy block per future),
which Dask recomputes after the same kill (``next record``: one lost block
back; ``readable``: all of them; Dask keeps no copies: no ``redundant``).
Memory is not prefaulted; the first round is reported apart.

    python benchmarks/bench_recovery.py --part streams --stream-gib 4 --workers 4 --reps 3

Part (1b), ``--part single``: the same stream with one copy and a small
budget (``--single-budget``), so that most of it is on disk when the owner
is SIGKILLed; a worker on the node takes over its spill files (issue 19,
item 4.1). ``next record``: until a consumer of the victim's last
partition with records on disk, asking again while it is lost, has its
next record (with
``offsets`` the partition a reader waits on is rebuilt first, on its
own; ``full`` rebuilds all of them at once); ``readable``: until the
last round of the take-over is done; ``MB read``: what was read
back and checked; ``MB lost``: unconsumed records that were still in
memory, named lost (each
partition is then read back up to its lost range and checked); ``noticed``:
until the scheduler has removed the victim (the same for every method: the
rest is the take-over). ``offsets``
against ``full``, interleaved, a fresh cluster each; no prefaulting.

    python benchmarks/bench_recovery.py --part single --stream-gib 4 --workers 4 --reps 3

Part (2), ``--part operators``: a shuffle that loses a worker.

A DataFrame shuffle (int64 key + 6 float64 columns, ``--partitions`` in and
out) on a LocalCluster of ``--workers`` nanny processes with 1 thread each;
the input is generated and persisted first. The timed part is the shuffle
plus ``len`` of every output partition, checked against the input's row
count. Methods, interleaved after a warm-up round, medians over ``--reps``.
Each round runs the undisturbed methods first, then those with a kill, each
group in a shuffled order (seeded by the round, so the same in every run of
the benchmark), and from the second round on it starts with one run, not
counted, of each undisturbed method: the kills of the round before
restarted workers, fresh processes with none of their memory touched (a
replicated run needs twice what an unreplicated one touched), and a fixed
rotation had each method always follow the same other one. Before each run
the coordinator forgets any worker it found slow (``--keep-slow-flags``
keeps them): a cold run can flag one, and new runs would then avoid it for
minutes, running on three workers of four. The methods:

- ``aimss``: ``aimss_dask.shuffle``, ``replication=1``: a run that loses
  a worker in its map phase keeps the partitions that survive, re-creates
  the lost ones, and runs again the pushes that fed them, writing only the
  re-created partitions where the push had finished on a worker that
  stayed (``OnLoss.RECOVER``);
- ``aimss-r2``: the same with ``replication=2``: every partition has a copy
  on another worker, stored before a push is acknowledged; a lost owner's
  partitions are taken over by their copies, and only the pushes that had
  finished on the dead worker run again (their unsent records died with
  it), each writing only the partitions where a copy lacks its input. Each
  kill's line says what the coordinator did (its events);
- ``p2p``: ``df.shuffle(shuffle_method="p2p")``, which restarts likewise;
- each ``+kill``: the same, with one worker SIGKILLed once half of the map
  tasks are done (``aimss-push-*`` / ``shuffle-transfer-*`` in memory),
  killed from the scheduler's transition hook at that very transition (a
  scheduler plugin: nothing polls during the run). Its nanny restarts it; the persisted
  input partitions it held are computed again, for every method alike
  (``--inputs single``, the default), or were held by another worker too
  (``--inputs replicated``: Dask's ``client.replicate``, two copies of each,
  restored before each run): the cost of the shuffle's own recovery, without
  Dask recomputing a quarter of the input. The next round waits for every
  worker to be back.

Reported: wall time per method, with the CPU seconds the whole machine was
busy meanwhile (every process; ``psutil``): what a kill adds in work, which
is time where cores are few. And the ratios the issue sets targets for:
aimss with a kill against aimss without one (target: at most 1.3x), P2P
with a kill against aimss with one (target: at least 3x), and the cost of
the copies without a kill (``aimss-r2 / aimss``, target: under 1.25x).
Memory is not prefaulted and nothing waits for the file system: every
round is what a user sees. The warm-up round (rep 0, not in the medians) is
a user's first run on a fresh cluster, and is printed apart.

``--start forkserver`` has the nannies fork their workers from a server
that imported Dask's stack once (Dask's
``distributed.worker.multiprocessing-method``; ``spawn``, the default,
starts each worker, the restarted one too, as a fresh interpreter that
imports numpy, pandas and distributed again): what a kill costs when the
restart is cheap.

    python benchmarks/bench_recovery.py --part operators --gib 2 --workers 4 --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import psutil
from distributed.diagnostics.plugin import SchedulerPlugin

GiB = 2**30
COLS = 6
ROW_BYTES = 8 * (COLS + 1)


def _make(i: int, rows: int, nkeys: int) -> pd.DataFrame:
    rng = np.random.default_rng(i)
    data = {"key": rng.integers(0, nkeys, rows, dtype=np.int64)}
    for c in range(COLS):
        data[f"x{c}"] = rng.random(rows)
    return pd.DataFrame(data)


def _count(df: pd.DataFrame) -> int:
    return len(df)


class _KillAt(SchedulerPlugin):
    """A scheduler plugin that SIGKILLs ``pid`` once ``at`` map tasks (by key prefix) reached memory.

    It counts in the scheduler's ``transition`` hook and kills from there, so
    the kill lands at the very transition, and nothing polls the scheduler
    while the timed run goes (a poll every few ms loads a small machine, and
    only the ``+kill`` runs would pay for it).
    """

    name = "bench-recovery-kill-at"

    def __init__(self, prefixes: tuple[str, ...], at: int, pid: int) -> None:
        self.prefixes, self.at, self.pid = prefixes, at, pid
        self.done = 0
        self.killed = False

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if self.killed or finish != "memory":
            return
        name = key[0] if isinstance(key, tuple) else key
        if isinstance(name, str) and name.startswith(self.prefixes):
            self.done += 1
            if self.done >= self.at:
                self.killed = True
                os.kill(self.pid, signal.SIGKILL)


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (every process: workers, nannies, scheduler, client)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _arm(dask_scheduler: Any, prefixes: tuple[str, ...], at: int, pid: int) -> None:
    dask_scheduler.add_plugin(_KillAt(prefixes, at, pid), name=_KillAt.name)


def _disarm(dask_scheduler: Any) -> bool:
    """Remove the plugin; whether it killed."""
    plugin = dask_scheduler.plugins.get(_KillAt.name)
    if plugin is None:
        return False
    dask_scheduler.remove_plugin(name=_KillAt.name)
    return bool(plugin.killed)


def _what_recovery_did(client: Any, since: float) -> str:
    """The coordinator's recoveries and restarts since ``since`` (``time.perf_counter``), in words."""
    wall = time.time() - (time.perf_counter() - since)
    out = []
    refilled = []
    for t, msg in client.get_events("aimss"):
        if t < wall or not isinstance(msg, dict):
            continue
        if msg.get("action") == "push-refilled":
            refilled.append(msg)
        if msg.get("action") == "run-recovered":
            out.append(
                f"recovered {len(msg['partitions'])} partitions; {msg['pushes_refill']} finished pushes "
                f"re-sent only those, {msg['pushes_rerun'] - msg['pushes_refill']} had finished on the dead worker"
            )
        elif msg.get("action") == "replicas-promoted" and msg["stream"].startswith("aimss-shuffle-"):
            out.append(f"copies took over {len(msg['partitions'])} partitions")
        elif msg.get("action") == "run-kept":
            out.append(
                f"nothing re-created; {msg['pushes_rerun']} finished pushes released to run again "
                "(besides those Dask reruns itself)"
            )
        elif msg.get("action") == "run-stale":
            out.append(f"{msg['released']} stale pushes ran again")
        elif msg.get("action") == "run-restarted":
            out.append("restarted")
    if refilled:
        out.append(
            f"{len(refilled)} pushes that had finished on the dead worker wrote "
            f"{sum(m['written'] for m in refilled)} of {sum(m['partitions'] for m in refilled)} partitions"
        )
    return "  (" + "; ".join(out or ["no recovery event"]) + ")"


def run_operators(args: argparse.Namespace) -> None:
    import dask
    import dask.dataframe as dd
    from distributed import Client, LocalCluster, wait

    import aimss_dask
    from aimss_dask.testing import forget_slow_workers

    # A nanny that dies more than once must not be given up on.
    conf: dict[str, Any] = {
        "distributed.deploy.lost-worker-timeout": "600s",
        "distributed.worker.multiprocessing-method": args.start,
    }
    if args.inputs == "replicated":
        # The active memory manager drops the replicas client.replicate makes.
        conf["distributed.scheduler.active-memory-manager.start"] = False
    with dask.config.set(conf), LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit=args.memory_limit))
        nbytes = int(args.gib * GiB)
        rows = nbytes // ROW_BYTES // args.partitions
        total = rows * args.partitions
        ddf = dd.from_map(
            _make, range(args.partitions), rows=rows, nkeys=10 * total, meta=_make(0, 0, 1)
        ).persist()
        wait(ddf)
        if args.inputs == "replicated":
            client.replicate(ddf, n=2)

        def aimss_run(replication: int) -> Any:
            def go() -> int:
                out = aimss_dask.shuffle(ddf, "key", npartitions=args.partitions, replication=replication)
                return int(out.map_partitions(_count, meta=(None, "i8")).sum().compute())
            return go

        def p2p_run() -> int:
            out = ddf.shuffle(on="key", npartitions=args.partitions, shuffle_method="p2p")
            return int(out.map_partitions(_count, meta=(None, "i8")).sum().compute())

        kinds = {
            "aimss": (aimss_run(1), ("aimss-push-",)),
            "aimss-r2": (aimss_run(2), ("aimss-push-",)),
            "p2p": (p2p_run, ("shuffle-transfer-",)),
        }
        methods = [(k, kill) for k in kinds for kill in (False, True)
                   if args.methods is None or k + ("+kill" if kill else "") in args.methods]
        times: dict[str, list[float]] = {}
        cpus: dict[str, list[float]] = {}
        first: dict[str, float] = {}
        print(
            f"shuffle of {nbytes / GiB:g} GiB ({total} rows, {args.partitions} -> {args.partitions} "
            f"partitions) on {args.workers} workers ({args.start}, inputs {args.inputs}); "
            "a kill at half of the map tasks",
            flush=True,
        )
        def ready() -> None:
            """Every worker back, the inputs lost with an earlier kill computed again, no worker flagged slow."""
            client.wait_for_workers(args.workers, timeout=120)
            wait(ddf)
            if args.inputs == "replicated":
                client.replicate(ddf, n=2)  # the copies a kill took
            if not args.keep_slow_flags:
                # A cold run (the first, or one on a worker just restarted)
                # can flag a worker slow; new runs would then avoid it for
                # minutes and run on the others. That is the stragglers'
                # feature (bench_stragglers.py), not what this one measures.
                flagged = client.run_on_scheduler(forget_slow_workers)
                if flagged:
                    print(f"  (workers found slow by the run before, forgotten: {flagged})", flush=True)

        calm = [m for m in methods if not m[1]]
        kills = [m for m in methods if m[1]]
        for rep in range(args.reps + 1):  # the first round warms up
            rng = random.Random(rep)
            order = rng.sample(calm, len(calm)) + rng.sample(kills, len(kills))
            if rep and calm and kills:
                # Each undisturbed method once, not counted, so that none is
                # measured on the workers the kills of the round before
                # restarted (fresh processes, none of their memory touched
                # yet): one of them settled only what it uses, and a
                # replicated run uses twice as much.
                for kind, _ in order[: len(calm)]:
                    ready()
                    t0 = time.perf_counter()
                    assert kinds[kind][0]() == total, f"{kind}: a settling run lost rows"
                    print(f"  rep {rep} {kind:13s} {time.perf_counter() - t0:7.2f} s  (settles: not counted)", flush=True)
            for kind, kill in order:
                fn, prefixes = kinds[kind]
                ready()
                if kill:
                    pids = client.run(os.getpid)
                    victim = pids[sorted(pids)[-1]]
                    client.run_on_scheduler(_arm, prefixes=prefixes, at=args.partitions // 2, pid=victim)
                t0, c0 = time.perf_counter(), _busy_cpu_s()
                got = fn()
                dt, cpu = time.perf_counter() - t0, _busy_cpu_s() - c0
                killed = kill and client.run_on_scheduler(_disarm)
                assert got == total, f"{kind}: {got} rows, not {total}"
                name = kind + ("+kill" if kill else "")
                did = _what_recovery_did(client, t0) if kill and kind.startswith("aimss") else ""
                if kill and not killed:
                    print(f"  rep {rep} {name:13s} {dt:7.2f} s  (ended before the kill: not counted)", flush=True)
                    continue
                print(
                    f"  rep {rep} {name:13s} {dt:7.2f} s  {cpu:6.1f} CPU-s" + ("  (warm-up)" if rep == 0 else "") + did,
                    flush=True,
                )
                if rep:
                    times.setdefault(name, []).append(dt)
                    cpus.setdefault(name, []).append(cpu)
                else:
                    first[name] = dt
        med = {m: statistics.median(v) for m, v in times.items()}
        print(f"\nmedians of {args.reps} (first run on the fresh cluster, rep 0, apart):")
        for m, v in med.items():
            cold = f"{first[m]:7.2f} s" if m in first else "      -"
            print(
                f"{m:13s} {v:7.2f} s  ({len(times[m])} runs)  {statistics.median(cpus[m]):6.1f} CPU-s"
                f"   first run {cold}"
            )

        def ratio(a: str, b: str, target: str) -> None:
            if a in med and b in med:
                print(f"{a} / {b}: {med[a] / med[b]:.2f}x  {target}")

        ratio("aimss+kill", "aimss", "(target <= 1.3x)")
        ratio("aimss-r2+kill", "aimss-r2", "(target <= 1.3x)")
        ratio("p2p+kill", "aimss+kill", "(target >= 3x)")
        ratio("p2p+kill", "aimss-r2+kill", "(target >= 3x)")
        ratio("aimss-r2", "aimss", "(the copies' cost; target < 1.25x)")
        ratio("p2p", "aimss", "")


# -- part (1): streams ------------------------------------------------------------------

RECORD = 2**20
PER_WORKER = 4


def _block(p: int, i: int) -> np.ndarray:
    """Record ``i`` of partition ``p``: 1 MiB, its first two values tag it."""
    out = np.empty(RECORD // 8, dtype=np.int64)
    out[0], out[1] = p, i
    return out


def _write_partition(name: str, p: int, n: int) -> int:
    import aimss_dask

    s = aimss_dask.get_stream(name)
    for i in range(n):
        s.write(_block(p, i), partition=p)
    s.flush()
    return n


def _consume(name: str, p: int, n: int) -> int:
    """Read ``n + 1`` records of partition ``p`` in group ``g``: ``n`` are committed."""
    import aimss_dask

    it = aimss_dask.read_from(name, partition=p, group="g", timeout=60)
    for _ in range(n + 1):
        next(it)
    it.close()
    return n


def _check_rest(name: str, p: int, first: int, n: int) -> int:
    """Read the rest of partition ``p`` in group ``g``: records ``first .. n-1``, each once, in order."""
    import aimss_dask

    want = first
    it = aimss_dask.read_from(name, partition=p, group="g", timeout=60)
    while want < n:
        r = next(it)
        assert (int(r[0]), int(r[1])) == (p, want), f"partition {p}: got {(int(r[0]), int(r[1]))}, want {(p, want)}"
        want += 1
    it.close()
    return want - first


def _knows(dask_scheduler: Any, victim: str) -> bool:
    """Whether the scheduler has seen ``victim`` go."""
    return victim not in dask_scheduler.workers


def _in_memory(dask_scheduler: Any, keys: list[Any]) -> bool:
    return all(dask_scheduler.tasks[k].state == "memory" for k in keys)


def _sync_bytes() -> int:
    import aimss_dask

    return sum(w.get("replica_sync_bytes", 0) for w in aimss_dask.status().values())


def _stream_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    """Partitions, records per partition, and how many of them group ``g`` commits (75%)."""
    parts = args.workers * PER_WORKER
    n = max(4, int(args.stream_gib * GiB / RECORD) // parts)
    return parts, n, (3 * n) // 4


@contextlib.contextmanager
def _nanny_cluster(args: argparse.Namespace) -> Iterator[tuple[Any, dict[str, int], str]]:
    """A fresh LocalCluster of nanny workers: ``(client, worker pids, the worker to kill)``."""
    import dask
    from distributed import Client, LocalCluster

    # A nanny that dies more than once must not be given up on.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "600s"}), LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        yield client, pids, sorted(pids)[-1]


def _streams_round(args: argparse.Namespace, mode: str) -> dict[str, float]:
    from distributed import wait

    import aimss_dask

    parts, n, done = _stream_shape(args)
    with _nanny_cluster(args) as (client, pids, victim):
        out: dict[str, float] = {}
        if mode == "dask":
            futs = [client.submit(_block, p, i, pure=False) for p in range(parts) for i in range(n)]
            wait(futs)
            # Blocks only the victim holds (Dask may have copied some elsewhere).
            lost = [f for f, w in zip(futs, client.who_has(futs).values()) if set(w) == {victim}]
            t0 = time.perf_counter()
            os.kill(pids[victim], signal.SIGKILL)
            # Once the scheduler knows (as a reader of the stream must find
            # out too), a gather waits until Dask has computed the block again.
            while client.run_on_scheduler(_knows, victim=victim) is False:
                time.sleep(0.001)
            b = lost[len(lost) // 2].result(timeout=300)
            out["next record"] = time.perf_counter() - t0
            assert b.shape == (RECORD // 8,)
            keys = [f.key for f in lost]
            while not client.run_on_scheduler(_in_memory, keys=keys):
                assert time.perf_counter() - t0 < 600, "Dask never computed the lost blocks again"
                time.sleep(0.005)
            out["readable"] = time.perf_counter() - t0
            out["MB sent"] = len(lost) * RECORD / 1e6  # computed again
            return out
        client.register_plugin(aimss_dask.AIMSS(replication=2, recovery=mode))
        name = "bench-recovery"
        s = aimss_dask.create_stream(name, parts)
        owners = s.spec.owners
        wait([client.submit(_write_partition, name, p, n, workers=[owners[p]], pure=False) for p in range(parts)])
        wait([client.submit(_consume, name, p, done, workers=[owners[p]], pure=False) for p in range(parts)])
        mine = [p for p in range(parts) if owners[p] == victim]
        it = aimss_dask.read_from(name, partition=mine[0], group="g", timeout=300)
        sent = _sync_bytes()
        t0 = time.perf_counter()
        os.kill(pids[victim], signal.SIGKILL)
        r = next(it)
        out["next record"] = time.perf_counter() - t0
        assert (int(r[0]), int(r[1])) == (mine[0], done), (int(r[0]), int(r[1]))
        it.close()  # commits nothing new: that record is read again below
        while True:
            info = s.info()
            assert not info["lost"], info["lost"]
            if "readable" not in out and victim not in info["owners"]:
                out["readable"] = time.perf_counter() - t0
            if all(len(c) == 1 and victim not in c for c in info["in_sync"]):
                out["redundant"] = time.perf_counter() - t0
                break
            assert time.perf_counter() - t0 < 600, "redundancy never restored"
            time.sleep(0.005)
        out["MB sent"] = (_sync_bytes() - sent) / 1e6
        client.wait_for_workers(args.workers, timeout=120)
        now = s.info()["owners"]
        got = client.gather([
            client.submit(_check_rest, name, p, done, n, workers=[now[p]], pure=False) for p in range(parts)
        ])
        assert sum(got) == parts * (n - done), f"read back {sum(got)} records, not {parts * (n - done)}"
        aimss_dask.destroy_stream(name)
        return out


def _salvage_events(client: Any, name: str) -> list[dict[str, Any]]:
    return [m for _, m in client.get_events("aimss") if isinstance(m, dict)
            and m.get("action") == "partitions-salvaged" and m.get("stream") == name]


def _single_round(args: argparse.Namespace, mode: str) -> dict[str, float]:
    """Part (1b): one copy; the victim's partitions come back from its spill files."""
    from distributed import wait

    import aimss_dask

    parts, n, done = _stream_shape(args)
    with _nanny_cluster(args) as (client, pids, victim):
        out: dict[str, float] = {}
        client.register_plugin(aimss_dask.AIMSS(replication=1, recovery=mode, memory_limit=args.single_budget))
        name = "bench-salvage"
        s = aimss_dask.create_stream(name, parts)
        owners = s.spec.owners
        mine = [p for p in range(parts) if owners[p] == victim]
        # Partitions are written one after the other on each worker: the
        # first ones are on disk by the end, the newest records in memory.
        for p in sorted(range(parts), key=lambda p: p not in mine):
            client.submit(_write_partition, name, p, n, workers=[owners[p]], pure=False).result()
        s.seal()
        wait([client.submit(_consume, name, p, done, workers=[owners[p]], pure=False) for p in range(parts)])
        # The consumer waits on the victim's last partition with records on
        # disk (the last one written is still in memory): were partitions
        # rebuilt in their order, it would come back late.
        waited = mine[-2] if len(mine) > 2 else mine[0]
        t0 = time.perf_counter()
        os.kill(pids[victim], signal.SIGKILL)
        while True:  # a consumer of that partition asks until it gets its next record
            if "noticed" not in out and client.run_on_scheduler(_knows, victim=victim):
                out["noticed"] = time.perf_counter() - t0  # the scheduler removed the victim
            try:
                it = aimss_dask.read_from(name, partition=waited, group="g", timeout=300)
                r = next(it)
                break
            except aimss_dask.PartitionLostError as e:
                # Its record was still in memory when the worker died: named lost, for good.
                if time.perf_counter() - t0 > 60:
                    raise AssertionError(f"record {done} of partition {waited} did not come back: {e}") from e
                time.sleep(0.005)
        out["next record"] = time.perf_counter() - t0
        assert (int(r[0]), int(r[1])) == (waited, done), (int(r[0]), int(r[1]))
        it.close()
        while not any(ev["last"] for ev in _salvage_events(client, name)):
            assert time.perf_counter() - t0 < 600, "the take-over did not end"
            time.sleep(0.005)
        out["readable"] = time.perf_counter() - t0
        out["MB read"] = sum(ev["bytes"] for ev in _salvage_events(client, name)) / 1e6
        kill_wall = time.time() - (time.perf_counter() - t0)
        rounds = ", ".join(
            f"{sorted(int(p) for p in m['partitions'])} at {t - kill_wall:.2f} s"
            for t, m in client.get_events("aimss")
            if isinstance(m, dict) and m.get("action") == "partitions-salvaged" and m.get("stream") == name
        )
        print(f"    ({mode}: waited on partition {waited} of {mine}; rebuilt {rounds})", flush=True)
        lost = {int(p): r for p, r in s.info()["lost_offsets"].items()}
        # Unconsumed records named lost (what was still in memory).
        out["MB lost"] = sum(b - max(a, done) for a, b in lost.values() if b > done) * RECORD / 1e6
        client.wait_for_workers(args.workers, timeout=120)
        now = s.info()["owners"]
        # What each partition must read back to: up to its lost range (one
        # that did not come back at all reads nothing past the group's commit).
        ends = {p: (max(done, lost[p][0]) if p in lost else n) for p in range(parts)}

        def check(p: int) -> int:
            if ends[p] <= done:
                return 0  # nothing to read back: lost (named) from the group's offset on
            try:
                return _check_rest(name, p, done, ends[p])
            except aimss_dask.PartitionLostError:
                return -1

        # A partition that did not come back still names its dead owner: run its check anywhere.
        got = client.gather([
            client.submit(check, p, workers=[now[p]], allow_other_workers=True, pure=False) for p in range(parts)
        ])
        assert got == [ends[p] - done for p in range(parts)], (got, ends)
        aimss_dask.destroy_stream(name)
        return out


def _interleaved(args: argparse.Namespace, modes: list[str], round_: Any) -> dict[str, dict[str, float]]:
    """``round_(args, mode)`` for every mode, ``--reps`` + 1 times, rotating the order; each figure's median.

    The first round (a user's first run on a fresh cluster) is printed but
    not in the medians. Figures whose name starts with ``MB`` are megabytes,
    the others seconds.
    """
    def line(got: dict[str, float]) -> str:
        return "  ".join(f"{k} {v:7.2f}{'' if k.startswith('MB') else ' s'}" for k, v in got.items())

    results: dict[str, list[dict[str, float]]] = {}
    for rep in range(args.reps + 1):
        for mode in modes[rep % len(modes):] + modes[: rep % len(modes)]:
            got = round_(args, mode)
            print(f"  rep {rep} {mode:8s} {line(got)}" + ("  (first run)" if rep == 0 else ""), flush=True)
            if rep:
                results.setdefault(mode, []).append(got)
    print(f"\nmedians of {args.reps} (after the first round):")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    for m, v in med.items():
        print(f"  {m:8s} {line(v)}")
    return med


def run_single(args: argparse.Namespace) -> None:
    parts, n, done = _stream_shape(args)
    print(
        f"stream of {parts * n * RECORD / GiB:g} GiB ({parts} partitions of {n} 1 MiB records, ONE copy, "
        f"budget {args.single_budget} per worker: the rest spills) on {args.workers} workers; group g "
        f"committed {done} of each; one owner SIGKILLed, its spill files taken over",
        flush=True,
    )
    med = _interleaved(args, ["offsets", "full"], _single_round)
    o, f = med.get("offsets"), med.get("full")
    if o and f:
        print(f"full / offsets: next record {f['next record'] / o['next record']:.2f}x, "
              f"MB read {f['MB read'] / max(o['MB read'], 1e-9):.2f}x (unconsumed: 25%)")


def run_streams(args: argparse.Namespace) -> None:
    parts, n, done = _stream_shape(args)
    print(
        f"stream of {parts * n * RECORD / GiB:g} GiB ({parts} partitions of {n} 1 MiB records, replication 2) "
        f"on {args.workers} workers; group g committed {done} of each; one owner SIGKILLed",
        flush=True,
    )
    med = _interleaved(args, ["offsets", "full", "dask"], _streams_round)
    o, f = med.get("offsets"), med.get("full")
    if o and f:
        print(
            f"full / offsets: next record {f['next record'] / o['next record']:.2f}x (target >= 4x), "
            f"redundant {f['redundant'] / o['redundant']:.2f}x, MB sent {f['MB sent'] / max(o['MB sent'], 1e-9):.2f}x "
            "(unconsumed: 25%)"
        )
    if o and "dask" in med:
        print(f"dask / offsets: next record {med['dask']['next record'] / o['next record']:.2f}x, "
              f"readable {med['dask']['readable'] / o['readable']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["streams", "single", "operators", "both"], default="both")
    ap.add_argument("--stream-gib", type=float, default=4.0, help="part (1): bytes of the stream")
    ap.add_argument("--gib", type=float, default=2.0, help="part (2): bytes shuffled")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--memory-limit", default=None, help="AIMSS budget per worker, e.g. 1GiB")
    ap.add_argument("--single-budget", default="128MiB", help="part (1b): AIMSS budget per worker")
    ap.add_argument(
        "--keep-slow-flags", action="store_true",
        help="part (2): keep AIMSS's slow-worker flags between runs (default: forgotten before each run, "
        "so that every run has all the workers)",
    )
    ap.add_argument(
        "--methods", default=None, type=lambda s: s.split(","),
        help="part (2): only these, e.g. aimss,aimss+kill (default: aimss, aimss-r2, p2p, each with and without a kill)",
    )
    ap.add_argument(
        "--inputs", choices=["single", "replicated"], default="single",
        help="part (2): the persisted input partitions in one copy (a kill loses a quarter of them, "
        "which Dask computes again for every method), or in two (client.replicate: a kill loses none)",
    )
    ap.add_argument(
        "--start", choices=["spawn", "forkserver"], default="spawn",
        help="part (2): how nannies start workers (Dask's distributed.worker.multiprocessing-method)",
    )
    args = ap.parse_args()
    if args.part in ("streams", "both"):
        run_streams(args)
    if args.part == "single":
        run_single(args)
    if args.part in ("operators", "both"):
        run_operators(args)


if __name__ == "__main__":
    main()
