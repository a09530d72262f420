"""Benchmark of the log and the push path (issue: foundation).

(a) Append-then-read throughput of the local log (``LogStore``) for records
    of 1 KiB, 64 KiB, 1 MiB and 64 MiB, against copying the same bytes with
    NumPy (``np.copyto`` into a pre-touched buffer, i.e. memcpy speed, and
    ``arr.copy()`` per record, what a copying store would do).
(b) Push throughput from a producer worker to the owner worker, 256 MiB as
    1 MiB records, against Dask's own worker-to-worker transfer of the same
    records (a task on B that depends on a result held on A) and a raw
    loopback TCP socket.

Every method runs in the same process, interleaved, after a warm-up; the
figures are medians over ``--reps`` repetitions.

    python benchmarks/bench_log.py [--reps 5] [--push-mib 256]
"""

from __future__ import annotations

import argparse
import gc
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np

from aimss_dask._compat import listed_workers

MiB = 2**20


# -- (a) local log --------------------------------------------------------------------


def _log_append_read(records: list[np.ndarray]) -> float:
    from aimss_dask.log.store import LogStore

    store = LogStore(budget=2**40, spill_root=tempfile.mkdtemp(prefix="aimss-bench-"))
    store.open("s", 1, [0])
    sizes = [r.nbytes for r in records]
    t0 = time.perf_counter()
    for r, n in zip(records, sizes):
        store.append("s", 1, 0, [r], [n])
    got = 0
    offset = 0
    while True:
        out, sealed, end = store.read("s", 1, 0, offset, 64 * MiB)
        if not out:
            break
        for a in out:
            got += a.nbytes  # touch the record object, as a consumer would
        offset += len(out)
    dt = time.perf_counter() - t0
    assert got == sum(sizes)
    store.close()
    return dt


def _numpy_copyto(records: list[np.ndarray], dest: np.ndarray) -> float:
    t0 = time.perf_counter()
    pos = 0
    for r in records:
        n = r.size
        np.copyto(dest[pos : pos + n], r)
        pos += n
    return time.perf_counter() - t0


def _numpy_copy_each(records: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    out = [r.copy() for r in records]
    dt = time.perf_counter() - t0
    del out
    return dt


def bench_local(reps: int, total: int) -> list[dict[str, float]]:
    rows = []
    for size in (1024, 64 * 1024, MiB, 64 * MiB):
        n = max(total // size, 2)
        if size == 1024:
            n = min(n, 32 * MiB // size)  # 32 Ki records: Python overhead dominates
        records = [np.random.random(size // 8) for _ in range(n)]
        nbytes = n * size
        dest = np.empty(nbytes // 8)
        dest[:] = 1.0  # pre-touch: the memcpy reference, not a page-fault test
        times: dict[str, list[float]] = {"aimss": [], "copyto": [], "copy": []}
        methods: dict[str, Callable[[], float]] = {
            "aimss": lambda: _log_append_read(records),
            "copyto": lambda: _numpy_copyto(records, dest),
            "copy": lambda: _numpy_copy_each(records),
        }
        for m in methods.values():  # warm-up
            m()
        for _ in range(reps):
            for name, m in methods.items():
                gc.collect()
                times[name].append(m())
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "size": size,
            "records": n,
            "bytes": nbytes,
            **{f"{k}_gbs": nbytes / v / 1e9 for k, v in med.items()},
        }
        row["ratio_vs_copyto"] = row["aimss_gbs"] / row["copyto_gbs"]
        rows.append(row)
        records = dest = None  # free them before the next size
    return rows


# -- (b) push between workers -----------------------------------------------------------


def _make_records(n: int) -> list[np.ndarray]:
    recs = [np.random.random(MiB // 8) for _ in range(n)]
    return recs


def _push(records: list[np.ndarray], name: str) -> float:
    import aimss_dask

    s = aimss_dask.get_stream(name)
    t0 = time.perf_counter()
    for r in records:
        s.write(r, partition=0)
    s.flush()
    return time.perf_counter() - t0


def _count(records: list[np.ndarray]) -> int:
    return sum(r.nbytes for r in records)


def _socket_push(nbytes: int, chunk: int = MiB) -> float:
    """Raw loopback TCP, pre-touched buffers on both ends: the wire's limit."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    src = bytearray(b"x" * chunk)
    sink = bytearray(chunk)
    got = [0]

    def receive() -> None:
        conn, _ = srv.accept()
        view = memoryview(sink)
        while got[0] < nbytes:
            k = conn.recv_into(view)
            if not k:
                break
            got[0] += k
        conn.close()

    t = threading.Thread(target=receive)
    t.start()
    c = socket.create_connection(("127.0.0.1", port))
    t0 = time.perf_counter()
    sent = 0
    while sent < nbytes:
        c.sendall(src)
        sent += chunk
    t.join()
    dt = time.perf_counter() - t0
    c.close()
    srv.close()
    assert got[0] == nbytes
    return dt


def bench_push(reps: int, total: int) -> dict[str, float]:
    from distributed import Client, LocalCluster, wait

    import aimss_dask

    n = total // MiB
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit=4 * total))
        a, b = sorted(listed_workers(client))
        times: dict[str, list[float]] = {"aimss": [], "aimss_in_task": [], "dask": [], "socket": []}

        def one_aimss(record: bool) -> None:
            name = f"bench-push-{time.monotonic_ns()}"
            # Two partitions on two workers: partition 0 is on `a` (sorted
            # placement), so push from `b`.
            s = aimss_dask.create_stream(name, partitions=2)
            owner = s.spec.owners[0]
            producer = b if owner == a else a
            data = client.submit(_make_records, n, workers=[producer], pure=False)
            wait(data)
            t0 = time.perf_counter()
            inner = client.submit(_push, data, name, workers=[producer], pure=False).result()
            dt = time.perf_counter() - t0
            info = s.info()
            assert info["records"][0] == n and info["bytes"][0] == total, info
            aimss_dask.destroy_stream(name)
            del data
            if record:
                times["aimss"].append(dt)
                times["aimss_in_task"].append(inner)

        def one_dask(record: bool) -> None:
            data = client.submit(_make_records, n, workers=[a], pure=False)
            wait(data)
            t0 = time.perf_counter()
            got = client.submit(_count, data, workers=[b], pure=False).result()
            dt = time.perf_counter() - t0
            assert got == total
            del data
            if record:
                times["dask"].append(dt)

        def one_socket(record: bool) -> None:
            dt = _socket_push(total)
            if record:
                times["socket"].append(dt)

        for f in (one_aimss, one_dask, one_socket):
            f(False)
        for _ in range(reps):
            for f in (one_aimss, one_dask, one_socket):
                f(True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {f"{k}_gbs": total / v / 1e9 for k, v in med.items()}
    out["all_aimss_gbs"] = [round(total / v / 1e9, 3) for v in times["aimss"]]  # type: ignore[assignment]
    out["all_dask_gbs"] = [round(total / v / 1e9, 3) for v in times["dask"]]  # type: ignore[assignment]
    out["ratio_vs_dask"] = out["aimss_gbs"] / out["dask_gbs"]
    out["ratio_vs_socket"] = out["aimss_gbs"] / out["socket_gbs"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--local-mib", type=int, default=256, help="bytes per size in (a)")
    ap.add_argument("--push-mib", type=int, default=256)
    ap.add_argument("--skip-local", action="store_true")
    ap.add_argument("--skip-push", action="store_true")
    args = ap.parse_args()

    if not args.skip_local:
        print(f"(a) local log append+read vs NumPy copies, medians of {args.reps}")
        print(f"{'record':>8} {'records':>8} {'aimss GB/s':>11} {'copyto GB/s':>12} {'copy GB/s':>10} {'aimss/copyto':>13}")
        for r in bench_local(args.reps, args.local_mib * MiB):
            print(
                f"{r['size'] // 1024:>6}Ki {r['records']:>8} {r['aimss_gbs']:>11.2f} "
                f"{r['copyto_gbs']:>12.2f} {r['copy_gbs']:>10.2f} {r['ratio_vs_copyto']:>12.2f}x"
            )
    if not args.skip_push:
        print(f"\n(b) push {args.push_mib} MiB as 1 MiB records, worker -> worker, medians of {args.reps}")
        r = bench_push(args.reps, args.push_mib * MiB)
        print(f"aimss push (client-timed)   {r['aimss_gbs']:.2f} GB/s   all: {r['all_aimss_gbs']}")
        print(f"aimss push (inside task)    {r['aimss_in_task_gbs']:.2f} GB/s")
        print(f"dask worker->worker         {r['dask_gbs']:.2f} GB/s   all: {r['all_dask_gbs']}")
        print(f"raw loopback socket         {r['socket_gbs']:.2f} GB/s")
        print(f"aimss / dask = {r['ratio_vs_dask']:.2f}x   aimss / socket = {r['ratio_vs_socket']:.2f}x")


if __name__ == "__main__":
    main()
