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
apart (a user's first transfer), and so are, apart, the runs that came right
after a run of the same method (warm receive memory, as in a job that moves
data all along) and those that came after the other's (which took that memory).

For reference, on TLS: the ceiling of Python's ``ssl`` on this machine, one
TLS connection between two processes (the cluster's certificates, no Dask,
no AIMSS) carrying the same bytes in ``--record-mib`` writes into one reused
buffer. No data plane written in Python moves more over one connection.

    python benchmarks/bench_multiapp.py --part tls --gib 1 --reps 5

Part ``apps`` (``--part apps``, the default): three applications, each a
client in a process of its own, on one LocalCluster of 4 nanny workers (one
thread each), AIMSS registered with its defaults:

- ``S1`` and ``S2`` each write a ``--sink-gib`` GiB float64 array, computed
  block by block (``--chunk-mib`` MiB chunks, uncompressed), to a Zarr
  array of their own: ``aimss_dask.to_zarr`` (AIMSS) or ``da.to_zarr``
  (Dask);
- ``L`` reads a shared ``--stream-gib`` GiB dataset of 4 MiB records with a
  DLIO-style loader: a thread prefetches ``--prefetch`` batches of
  ``--batch`` records while the consumer "trains" ``--compute`` seconds per
  batch. AIMSS: a stream the benchmark made with ``share="read"``, which L
  opens with ``get_stream`` and reads; Dask: a persisted array published
  with ``publish_dataset``, which L pulls batch by batch with ``x[i:j].compute()``.

Each round runs, interleaved (the order turns every round): S alone and L
alone with AIMSS and with Dask, then all three at once (started at one
instant) with the coordinated I/O scheduler on (``coordinated``), with it
off (``uncoordinated``: the coordinator grants every write at once), and
with plain Dask. Reported: medians of each application's time, aggregate
GB/s (bytes written and read / the last one's finish), each application's
slowdown against its alone-time with the same system, and L's AU (compute
time / wall time). The arrays are deleted after each run (not timed, no
settling: every run starts as a user's would, with the previous run's
writes still being written back); round 0 is reported apart as the first.
Before each run the benchmark touches and frees as much memory as the run's
page cache will take (``--no-prefault``: not, as for a user): a VM that
hands freed pages back to its host makes whichever run comes first after a
pause fault fresh memory, several times slower, which otherwise decides the
comparison more than the methods do. The order of the runs turns every round
and reverses every other one.

    python benchmarks/bench_multiapp.py --part apps --sink-gib 2 --stream-gib 1 --reps 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from typing import Any

import numpy as np
from _common import prefault
from distributed import Client, LocalCluster, wait
from distributed.security import Security

import aimss_dask
from aimss_dask._compat import listed_workers

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
        a, b = sorted(listed_workers(client))
        assert a.startswith(f"{kind}://"), a
        nbytes = args.record_mib * 2**20
        n = max(1, int(args.gib * GiB) // nbytes)
        total = n * nbytes
        prev = None
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
                    times.setdefault(f"{method}-{'warm' if prev == method else 'after-other'}", []).append(dt)
                else:
                    times[f"{method}-first"] = [dt]
                prev = method
        if kind == "tls":
            times["ssl-ceiling"] = [_ssl_ceiling(security, total, nbytes) for _ in range(3)]
    return times


def _ssl_receive(port: Any, certs: tuple[str, str, str], total: int, record: int) -> None:
    import socket
    import ssl

    cert, key, ca = certs
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port.put(srv.getsockname()[1])
        raw, _ = srv.accept()
        with ctx.wrap_socket(raw, server_side=True) as conn:
            view = memoryview(bytearray(record))
            got = 0
            while got < total:
                n = conn.recv_into(view)
                if not n:
                    raise ConnectionError(f"the sender closed after {got} of {total} bytes")
                got += n
            conn.sendall(b"k")


def _ssl_ceiling(security: Security, total: int, record: int) -> float:
    """Seconds Python's ``ssl`` takes to move ``total`` bytes over one TLS connection to another process."""
    import socket
    import ssl

    folder = tempfile.mkdtemp(prefix="bench-ssl-")
    try:
        certs = []
        for name, pem in (("cert", security.tls_worker_cert), ("key", security.tls_worker_key), ("ca", security.tls_ca_file)):
            path = os.path.join(folder, f"{name}.pem")
            with open(path, "w") as f:
                f.write(pem)
            certs.append(path)
        ctx = multiprocessing.get_context("spawn")
        port = ctx.Queue()
        proc = ctx.Process(target=_ssl_receive, args=(port, tuple(certs), total, record))
        proc.start()
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_cert_chain(certs[0], certs[1])
        client.load_verify_locations(certs[2])
        client.check_hostname = False
        data = memoryview(np.random.default_rng(0).bytes(record))
        with client.wrap_socket(socket.create_connection(("127.0.0.1", port.get(timeout=60)))) as conn:
            t0 = time.perf_counter()
            for _ in range(total // record):
                conn.sendall(data)
            conn.recv(1)
            dt = time.perf_counter() - t0
        proc.join(60)
        return dt
    finally:
        shutil.rmtree(folder)  # the benchmark's own mkdtemp folder


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
        for when in ("warm", "after-other"):
            if f"aimss-{when}" in med and f"dask-{when}" in med:
                a, d = med[f"aimss-{when}"], med[f"dask-{when}"]
                print(f"{kind:4s}   runs {when:11s}: aimss {a:5.2f} s, dask {d:5.2f} s ({d / a:.2f}x)")
        if "ssl-ceiling" in med:
            c = med["ssl-ceiling"]
            print(f"{kind:4s} Python ssl alone, one connection: {c:5.2f} s  {total / c / 1e9:5.2f} GB/s (the ceiling)")


# -- part apps: three applications at once ------------------------------------------------

RECORD = 4 * 2**20  # bytes per record of the shared dataset
SHARED_STREAM = "bench-multiapp-shared"
SHARED_DATASET = "bench_multiapp_shared"


def _block(block_info: Any = None) -> np.ndarray:
    """A sink's block, computed: its first row's index in every element."""
    info = block_info[None]
    (r0, r1), (c0, c1) = info["array-location"]
    return np.full((r1 - r0, c1 - c0), float(r0))


def _sink_array(gib: float, chunk_mib: int) -> Any:
    import dask.array as da

    cols = 1024
    rows_per_chunk = max(1, chunk_mib * 2**20 // (cols * 8))
    rows = max(rows_per_chunk, int(gib * GiB) // (cols * 8) // rows_per_chunk * rows_per_chunk)
    return da.map_blocks(_block, chunks=((rows_per_chunk,) * (rows // rows_per_chunk), (cols,)), dtype="f8")


def _sink(system: str, path: str, args: argparse.Namespace) -> int:
    import dask.array as da
    import zarr

    x = _sink_array(args.sink_gib, args.chunk_mib)
    if system == "aimss":
        aimss_dask.to_zarr(x, path, chunks=x.chunksize, compressors=None)
    else:
        z = zarr.create_array(path, shape=x.shape, chunks=x.chunksize, dtype=x.dtype, compressors=None)
        da.to_zarr(x, z)
    return int(x.nbytes)


def _load(system: str, client: Client, args: argparse.Namespace) -> tuple[int, float]:
    """One epoch of the shared dataset; bytes read and the seconds of compute."""
    q: queue.Queue[Any] = queue.Queue(maxsize=args.prefetch)
    errors: list[BaseException] = []

    def prefetch() -> None:
        try:
            if system == "aimss":
                batch: list[np.ndarray] = []
                for rec in aimss_dask.get_stream(SHARED_STREAM).read(start=0):
                    batch.append(rec)
                    if len(batch) == args.batch:
                        q.put(batch)
                        batch = []
                if batch:
                    q.put(batch)
            else:
                x = client.get_dataset(SHARED_DATASET)
                step = args.batch * x.chunksize[0]
                for i in range(0, x.shape[0], step):
                    q.put([x[i:i + step].compute()])
        except BaseException as e:  # noqa: BLE001 -- reported by the consumer
            errors.append(e)
        finally:
            q.put(None)

    threading.Thread(target=prefetch, daemon=True).start()
    nbytes, computed = 0, 0.0
    while (batch := q.get()) is not None:
        nbytes += sum(int(a.nbytes) for a in batch)
        time.sleep(args.compute)  # the training step
        computed += args.compute
    if errors:
        raise errors[0]
    return nbytes, computed


def _app(address: str, role: str, args: argparse.Namespace, inbox: Any, outbox: Any) -> None:
    """One application: a client of its own; runs what it is told at the time it is told."""
    with Client(address) as client:
        outbox.put((role, client.id))
        while (cmd := inbox.get()) is not None:
            system, at, path = cmd
            time.sleep(max(0.0, at - time.time()))
            t0 = time.perf_counter()
            try:
                if role == "L":
                    nbytes, computed = _load(system, client, args)
                else:
                    nbytes, computed = _sink(system, path, args), 0.0
                outbox.put((role, time.perf_counter() - t0, nbytes, computed, None))
            except Exception as e:
                outbox.put((role, time.perf_counter() - t0, 0, 0.0, f"{type(e).__name__}: {e}"))


def _set_io(enabled: bool, dask_scheduler: Any = None) -> bool:
    """Turn the coordinator's I/O scheduler on or off (a benchmark's switch, not an API)."""
    plugin = dask_scheduler.plugins["aimss"]
    plugin.io.enabled = enabled
    return plugin.io.enabled


def _fill_shared(i: int, n_parts: int) -> int:
    s = aimss_dask.get_stream(SHARED_STREAM)
    s.write(np.full(RECORD // 8, float(i)), partition=i % n_parts)
    s.flush()
    return RECORD


def _check_sink(path: str, args: argparse.Namespace) -> None:
    """The array is there, whole: a few chunks hold what their blocks computed."""
    import zarr

    x = _sink_array(args.sink_gib, args.chunk_mib)
    z = zarr.open_array(path, mode="r")
    assert z.shape == x.shape, (path, z.shape, x.shape)
    rows = x.chunksize[0]
    for r0 in (0, (x.shape[0] // rows // 2) * rows, x.shape[0] - rows):
        got = z[r0:r0 + rows]
        assert (got == float(r0)).all(), (path, r0)


def apps(args: argparse.Namespace) -> None:
    import dask.array as da

    workdir = tempfile.mkdtemp(prefix="bench-multiapp-", dir=args.dir)
    ctx = multiprocessing.get_context("spawn")
    procs: dict[str, Any] = {}
    try:
        with LocalCluster(
            n_workers=4, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster, Client(cluster) as client:
            io = {"max-concurrent-writes-per-node": args.limit} if args.limit else None
            client.register_plugin(aimss_dask.AIMSS(io=io))
            n_records = max(1, int(args.stream_gib * GiB) // RECORD)
            stream_bytes = n_records * RECORD
            shared = aimss_dask.create_stream(SHARED_STREAM, partitions=4, share="read")
            assert sum(client.gather(client.map(_fill_shared, range(n_records), n_parts=4))) == stream_bytes
            shared.seal()
            x = da.random.random((n_records * (RECORD // 8 // 512), 512), chunks=(RECORD // 8 // 512, 512)).persist()
            wait(x)
            client.publish_dataset(**{SHARED_DATASET: x})
            sink_bytes = _sink_array(args.sink_gib, args.chunk_mib).nbytes
            outbox = ctx.Queue()
            inboxes = {}
            for role in ("S1", "S2", "L"):
                inboxes[role] = ctx.Queue()
                procs[role] = ctx.Process(target=_app, args=(cluster.scheduler_address, role, args, inboxes[role], outbox))
                procs[role].start()
            ids = dict(outbox.get(timeout=180) for _ in procs)
            print(f"applications: {ids}", flush=True)
            runs = [
                ("alone", "aimss", ("S1",)), ("alone", "aimss", ("L",)),
                ("alone", "dask", ("S1",)), ("alone", "dask", ("L",)),
                ("uncoordinated", "aimss", ("S1", "S2", "L")),
                ("coordinated", "aimss", ("S1", "S2", "L")),
                ("dask", "dask", ("S1", "S2", "L")),
            ]
            times: dict[str, dict[str, list[float]]] = {}
            last_io: tuple[int, int, float] = (0, 0, 0.0)
            first: dict[str, dict[str, float]] = {}
            for rep in range(args.reps + 1):
                # Turned, and reversed every other round: no method always
                # follows the same one (a run after another's deletion of
                # gigabytes reuses the pages it freed; one after a pause
                # faults fresh ones).
                k = rep % len(runs)
                order = runs[k:] + runs[:k]
                for mode, system, roles in order[::-1] if rep % 2 else order:
                    on = client.run_on_scheduler(_set_io, mode != "uncoordinated")
                    assert on == (mode != "uncoordinated")
                    label = mode if mode != "alone" else f"{system}-alone-{roles[0][0]}"
                    if args.prefault:
                        prefault(int(len(roles) * args.sink_gib * GiB))
                    paths = {r: os.path.join(workdir, f"{label}-{rep}-{r}.zarr") for r in roles}
                    at = time.time() + 1.0
                    for r in roles:
                        inboxes[r].put((system, at, paths.get(r)))
                    res = {}
                    for _ in roles:
                        role, dt, nbytes, computed, err = outbox.get(timeout=1800)
                        if err:
                            raise RuntimeError(f"{label}: {role} failed: {err}")
                        res[role] = (dt, nbytes, computed)
                    for r in roles:
                        if r != "L":
                            _check_sink(paths[r], args)
                    assert res.get("L", (0, stream_bytes))[1] == stream_bytes
                    makespan = max(dt for dt, _, _ in res.values())
                    moved = sum(nb for _, nb, _ in res.values())
                    line = {r: dt for r, (dt, _, _) in res.items()}
                    line["aggregate"] = moved / makespan / 1e9
                    if "L" in res:
                        line["au"] = res["L"][2] / res["L"][0]
                    print(f"  round {rep} {label:18s} " + "  ".join(
                        f"{kk} {v:6.2f}" for kk, v in line.items()), flush=True)
                    if system == "aimss":
                        st = aimss_dask.status()
                        io = (st.io["grants"], st.io["waited"], sum(w.get("io_wait_seconds", 0) for w in st.values()))
                        if io != last_io:
                            print(f"      I/O scheduler: {io[0] - last_io[0]} grants, {io[1] - last_io[1]} waited, "
                                  f"workers waited {io[2] - last_io[2]:.2f} s in all", flush=True)
                        last_io = io
                    for p in paths.values():
                        shutil.rmtree(p, ignore_errors=True)
                    if rep == 0:
                        first[label] = line
                    else:
                        for kk, v in line.items():
                            times.setdefault(label, {}).setdefault(kk, []).append(v)
            for q_ in inboxes.values():
                q_.put(None)
            for proc in procs.values():
                proc.join(60)
            aimss_dask.destroy_stream(SHARED_STREAM)
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    _report_apps(times, first, args, sink_bytes, stream_bytes)


def _report_apps(
    times: dict[str, dict[str, list[float]]], first: dict[str, dict[str, float]],
    args: argparse.Namespace, sink_bytes: int, stream_bytes: int,
) -> None:
    if not times:
        return  # the first round only
    med = {label: {k: statistics.median(v) for k, v in d.items()} for label, d in times.items()}
    print(
        f"\nthree applications on 4 workers: S1, S2 sink {sink_bytes / GiB:.2f} GiB each, L reads "
        f"{stream_bytes / GiB:.2f} GiB ({args.batch} x 4 MiB per batch, {args.compute} s compute); "
        f"medians of {args.reps} rounds (round 0, the first, apart)"
    )
    for system in ("aimss", "dask"):
        for r in ("S", "L"):
            label = f"{system}-alone-{r}"
            extra = f"  AU {med[label]['au']:.2f}" if r == "L" else ""
            print(f"{label:18s} {med[label][r + ('1' if r == 'S' else '')]:6.2f} s{extra}"
                  f"   (first {first[label][r + ('1' if r == 'S' else '')]:6.2f} s)")
    for mode, system in (("coordinated", "aimss"), ("uncoordinated", "aimss"), ("dask", "dask")):
        m = med[mode]
        alone_s = med[f"{system}-alone-S"]["S1"]
        alone_l = med[f"{system}-alone-L"]["L"]
        print(
            f"{mode:14s} aggregate {m['aggregate']:5.2f} GB/s (first {first[mode]['aggregate']:5.2f})  "
            f"S1 {m['S1']:6.2f} s ({m['S1'] / alone_s:4.2f}x alone)  "
            f"S2 {m['S2']:6.2f} s ({m['S2'] / alone_s:4.2f}x alone)  "
            f"L {m['L']:6.2f} s ({m['L'] / alone_l:4.2f}x alone, AU {m['au']:.2f})"
        )
    print(
        f"coordinated / uncoordinated aggregate: {med['coordinated']['aggregate'] / med['uncoordinated']['aggregate']:.2f}x; "
        f"coordinated / dask: {med['coordinated']['aggregate'] / med['dask']['aggregate']:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["apps", "tls"], default="apps")
    ap.add_argument("--gib", type=float, default=1.0, help="tls: GiB moved")
    ap.add_argument("--record-mib", type=int, default=4, help="tls: MiB per record")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kinds", default="tls,tcp", help="tls: comms kinds to measure, of tls,tcp")
    ap.add_argument("--sink-gib", type=float, default=2.0, help="apps: GiB each sink writes")
    ap.add_argument("--stream-gib", type=float, default=1.0, help="apps: GiB of the shared dataset")
    ap.add_argument("--chunk-mib", type=int, default=8, help="apps: MiB per chunk of the sinks' arrays")
    ap.add_argument("--batch", type=int, default=4, help="apps: 4 MiB records per loader batch")
    ap.add_argument("--compute", type=float, default=0.05, help="apps: seconds of compute per batch")
    ap.add_argument("--prefetch", type=int, default=4, help="apps: batches the loader reads ahead")
    ap.add_argument("--dir", default=None, help="apps: where the arrays go (default: the temp folder)")
    ap.add_argument(
        "--limit", type=int, default=None,
        help="apps: aimss.io.max-concurrent-writes-per-node (default: the configured one)",
    )
    ap.add_argument(
        "--prefault", action=argparse.BooleanOptionalAction, default=True,
        help="apps: touch and free the memory a run's page cache will take, before each run "
        "(--no-prefault: as a user's runs, which fault it fresh)",
    )
    args = ap.parse_args()
    if args.part == "tls":
        tls(args)
    else:
        apps(args)


if __name__ == "__main__":
    main()
