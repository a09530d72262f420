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


def run_sink_demo(client: Any, *, nbytes: int, directory: str | None = None, out: Any = sys.stdout) -> bool:
    """Write a generated array to Zarr with aimss and with Dask, side by side.

    The Dask blocks (1000 rows) are not aligned with the Zarr chunks (1024
    rows): Dask must take its lock to write them correctly; aimss pushes each
    chunk's pieces to one writer. Both results are read back and checked.
    """
    import os
    import shutil
    import tempfile

    import dask.array as da
    import zarr
    from distributed import wait

    import aimss_dask

    cols = 256
    rows = max(nbytes // (8 * cols), 1)
    x = da.random.default_rng(7).random((rows, cols), chunks=(1000, cols)).persist()
    wait(x)
    want = float(x.sum().compute())
    root = tempfile.mkdtemp(prefix="aimss-demo-sink-", dir=directory)
    print(
        f"\nsink stage: {format_bytes(rows * cols * 8)} float64 to Zarr, blocks of 1000 rows "
        f"into chunks of 1024 rows (not aligned), uncompressed, under {root}",
        file=out,
    )
    ok = True
    try:
        for name, write in (
            ("aimss", lambda p: aimss_dask.to_zarr(x, p, chunks=(1024, cols), compressors=None)),
            ("dask lock", lambda p: da.to_zarr(x, p, chunks=(1024, cols), compressors=None, mode="w")),
        ):
            path = os.path.join(root, name.replace(" ", "-") + ".zarr")
            t0 = time.perf_counter()
            write(path)
            dt = time.perf_counter() - t0
            got = float(da.from_zarr(path).sum().compute())
            good = abs(got - want) <= 1e-9 * abs(want)
            ok &= good
            print(
                f"  {name:9s} {dt:6.2f} s  ({rows * cols * 8 / dt / 1e9:.2f} GB/s)  "
                f"read back: {'identical sum' if good else 'MISMATCH'}",
                file=out,
            )
        print(f"  zarr.open_array reads it: shape {zarr.open_array(path).shape}", file=out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
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
    demo.add_argument("--sink-size", default="256MiB", help="array of the Zarr sink stage; 0 skips it")
    demo.add_argument("--sink-dir", default=None, help="where the sink stage writes (default: a temp dir)")
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    kwargs = dict(
        producers=args.producers,
        records=args.records,
        record_bytes=parse_bytes(args.record_size),
        partitions=args.partitions,
    )
    shuffle_bytes = parse_bytes(args.shuffle_size)
    sink_bytes = parse_bytes(args.sink_size)

    def stages(client: Any) -> bool:
        ok = bool(run_demo(client, **kwargs)["ok"])
        if shuffle_bytes:
            ok &= run_shuffle_demo(client, nbytes=shuffle_bytes)
        if sink_bytes:
            ok &= run_sink_demo(client, nbytes=sink_bytes, directory=args.sink_dir)
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
