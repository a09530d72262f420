"""``aimss-dask``: the command line. ``aimss-dask demo`` runs the main job."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from dask.utils import format_bytes, parse_bytes


def _produce(name: str, producer: int, records: int, record_bytes: int) -> int:
    """A producer task: push ``records`` arrays into the stream."""
    import aimss_dask

    n = max(record_bytes // 8, 1)
    rng = np.random.default_rng(producer)
    for i in range(records):
        arr = rng.random(n)
        arr[0] = producer * 1_000_000 + i  # a tag, to check nothing is lost
        aimss_dask.write_to(name, arr, key=(producer, i))
    aimss_dask.get_stream(name).flush()
    return records


def _reduce(records: Any) -> dict[str, float]:
    """A consumer task on the owning worker: sum and count what it reads."""
    count = 0
    nbytes = 0
    total = 0.0
    tags = 0.0
    for arr in records:
        count += 1
        nbytes += arr.nbytes
        total += float(arr[1:].sum())
        tags += float(arr[0])
    return {"records": count, "bytes": nbytes, "sum": total, "tags": tags}


def run_demo(
    client: Any,
    *,
    producers: int = 8,
    records: int = 64,
    record_bytes: int = 2**20,
    partitions: int | None = None,
    out: Any = sys.stdout,
) -> dict[str, Any]:
    """The end-to-end pipeline: producers push arrays, owners reduce them."""
    from distributed import progress, wait

    import aimss_dask

    client.register_plugin(aimss_dask.AIMSS())
    nworkers = len(client.scheduler_info()["workers"])
    partitions = partitions or 2 * max(nworkers, 1)
    name = f"aimss-demo-{uuid.uuid4().hex[:8]}"
    stream = aimss_dask.create_stream(name, partitions=partitions)
    print(
        f"stream {name!r}: {partitions} partitions on {nworkers} workers; "
        f"{producers} producers x {records} records of {format_bytes(record_bytes)}",
        file=out,
    )
    try:
        t0 = time.perf_counter()
        futs = client.map(
            _produce, [name] * producers, range(producers), [records] * producers,
            [record_bytes] * producers, pure=False,
        )
        progress(futs)
        wait(futs)
        client.gather(futs)
        stream.seal()
        t_write = time.perf_counter() - t0
        parts = client.gather(stream.map_partitions(_reduce))
        elapsed = time.perf_counter() - t0
        info = stream.info()
        st = aimss_dask.status()
    finally:
        aimss_dask.destroy_stream(name)

    got = sum(p["records"] for p in parts)
    nbytes = sum(p["bytes"] for p in parts)
    expected_tags = sum(
        float(pr * 1_000_000 + i) for pr in range(producers) for i in range(records)
    )
    ok = got == producers * records and sum(p["tags"] for p in parts) == expected_tags
    print(f"\nrecords    {got} ({'all present' if ok else 'MISMATCH'})", file=out)
    print(f"bytes      {format_bytes(nbytes)}", file=out)
    print(f"produce    {t_write:.2f} s  ({nbytes / t_write / 1e9:.2f} GB/s, generating + pushing)", file=out)
    print(f"end to end {elapsed:.2f} s  ({nbytes / elapsed / 1e9:.2f} GB/s)", file=out)
    print(f"spilled    {format_bytes(info['spilled_bytes'])}", file=out)
    for addr, ws in sorted(st.items()):
        print(
            f"worker {addr}: peak log memory {format_bytes(ws['peak_memory'])} "
            f"of {format_bytes(ws['budget'])} budget",
            file=out,
        )
    return {"ok": ok, "records": got, "bytes": nbytes, "seconds": elapsed}


def _frame(i: int, rows: int) -> Any:
    import pandas as pd

    rng = np.random.default_rng(i)
    return pd.DataFrame(
        {"key": rng.integers(0, 1 << 40, rows), **{f"x{c}": rng.random(rows) for c in range(6)}}
    )


def _rows(df: Any) -> int:
    return len(df)


def run_shuffle_demo(client: Any, *, nbytes: int, partitions: int = 32, out: Any = sys.stdout) -> bool:
    """Shuffle a generated frame with aimss and with Dask's p2p, side by side."""
    import dask.dataframe as dd
    from distributed import wait

    import aimss_dask

    rows = max(nbytes // 56 // partitions, 1)
    df = dd.from_map(_frame, range(partitions), rows=rows, meta=_frame(0, 0)).persist()
    wait(df)
    print(
        f"\nshuffle stage: {format_bytes(rows * partitions * 56)} ({rows * partitions} rows, "
        f"{partitions} -> {partitions} partitions) by an int64 key",
        file=out,
    )
    ok = True
    for name, make in (
        ("aimss", lambda: aimss_dask.shuffle(df, "key", npartitions=partitions)),
        ("dask p2p", lambda: df.shuffle(on="key", npartitions=partitions, shuffle_method="p2p")),
    ):
        t0 = time.perf_counter()
        n = int(make().map_partitions(_rows, meta=(None, "i8")).sum().compute())
        dt = time.perf_counter() - t0
        ok &= n == rows * partitions
        print(f"  {name:9s} {dt:6.2f} s  ({rows * partitions * 56 / dt / 1e9:.2f} GB/s)", file=out)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aimss-dask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo pipeline")
    demo.add_argument("--scheduler", help="address of an existing cluster's scheduler")
    demo.add_argument("--workers", type=int, default=2, help="local workers (default 2)")
    demo.add_argument("--producers", type=int, default=8)
    demo.add_argument("--records", type=int, default=64, help="records per producer")
    demo.add_argument("--record-size", default="1MiB")
    demo.add_argument("--partitions", type=int, default=None)
    demo.add_argument(
        "--shuffle-size", default="256MiB", help="input of the shuffle stage; 0 skips it"
    )
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    kwargs = dict(
        producers=args.producers,
        records=args.records,
        record_bytes=parse_bytes(args.record_size),
        partitions=args.partitions,
    )
    shuffle_bytes = parse_bytes(args.shuffle_size)

    def stages(client: Any) -> bool:
        ok = bool(run_demo(client, **kwargs)["ok"])
        if shuffle_bytes:
            ok &= run_shuffle_demo(client, nbytes=shuffle_bytes)
        return ok

    if args.scheduler:
        with Client(args.scheduler) as client:
            ok = stages(client)
    else:
        with LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster, Client(cluster) as client:
            ok = stages(client)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
