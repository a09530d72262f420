"""``aimss-dask``: the command line. ``aimss-dask demo`` runs the main job."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
    from aimss_dask._compat import listed_workers

    client.register_plugin(aimss_dask.AIMSS())
    nworkers = len(listed_workers(client))
    if partitions is None:
        partitions = 2 * max(nworkers, 1)
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


@dataclass(frozen=True)
class Comparison:
    """One stage run with aimss and with Dask: timings and what verified."""

    stage: str  # "shuffle" or "sink"
    dask: str  # how the summary names Dask's way, e.g. "Dask p2p"
    aimss_seconds: float
    dask_seconds: float
    failed: tuple[str, ...]  # labels of the methods whose output did not verify
    output_partitions: tuple[int, ...] = ()  # shuffle: partitions each method produced


def _frame(i: int, rows: int) -> Any:
    import pandas as pd

    rng = np.random.default_rng(i)
    return pd.DataFrame(
        {"key": rng.integers(0, 1 << 40, rows), **{f"x{c}": rng.random(rows) for c in range(6)}}
    )


def _frame_stats(df: Any) -> Any:
    """One row per partition: its rows and the sum of its keys."""
    import pandas as pd

    # uint64 sums wrap modulo 2**64, which does not depend on the order of the
    # rows, so input and output compare exactly at any size.
    keysum = df["key"].to_numpy().astype(np.uint64).sum(dtype=np.uint64)
    return pd.DataFrame({"rows": [len(df)], "keysum": [keysum]}).astype({"rows": "i8", "keysum": "u8"})


def _stats(df: Any) -> tuple[int, int, int]:
    """(partitions, rows, key sum mod 2**64) of ``df``, counted from its computed partitions."""
    import pandas as pd

    meta = pd.DataFrame({"rows": pd.Series(dtype="i8"), "keysum": pd.Series(dtype="u8")})
    per_part = df.map_partitions(_frame_stats, meta=meta).compute()
    keysum = int(per_part["keysum"].to_numpy().sum(dtype=np.uint64))
    return len(per_part), int(per_part["rows"].sum()), keysum


def run_shuffle_demo(
    client: Any,
    *,
    nbytes: int,
    partitions: int | None = None,
    input_partitions: int = 32,
    out: Any = sys.stdout,
) -> Comparison:
    """Shuffle a generated frame with aimss and with Dask's p2p, side by side.

    Each output is checked against the input: the same rows and keys, in
    exactly ``partitions`` (default: ``input_partitions``) output partitions.
    """
    import dask.dataframe as dd
    from distributed import wait

    import aimss_dask

    nout = input_partitions if partitions is None else partitions
    rows = max(nbytes // 56 // input_partitions, 1)
    df = dd.from_map(_frame, range(input_partitions), rows=rows, meta=_frame(0, 0)).persist()
    wait(df)
    _, want_rows, want_keysum = _stats(df)
    print(
        f"\nshuffle stage: {format_bytes(rows * input_partitions * 56)} ({want_rows} rows, "
        f"{input_partitions} -> {nout} partitions) by an int64 key",
        file=out,
    )
    seconds: list[float] = []
    made: list[int] = []
    failed: list[str] = []
    for name, make in (
        ("aimss", lambda: aimss_dask.shuffle(df, "key", npartitions=nout)),
        ("dask p2p", lambda: df.shuffle(on="key", npartitions=nout, shuffle_method="p2p")),
    ):
        t0 = time.perf_counter()
        nparts, nrows, keysum = _stats(make())
        dt = time.perf_counter() - t0
        good = (nparts, nrows, keysum) == (nout, want_rows, want_keysum)
        if not good:
            failed.append(name)
        seconds.append(dt)
        made.append(nparts)
        print(
            f"  {name:9s} {dt:6.2f} s  ({want_rows * 56 / dt / 1e9:.2f} GB/s)  "
            f"{nparts} output partitions, {nrows} rows: {'verified' if good else 'MISMATCH'}",
            file=out,
        )
    return Comparison("shuffle", "Dask p2p", seconds[0], seconds[1], tuple(failed), tuple(made))


def run_sink_demo(
    client: Any, *, nbytes: int, directory: str | None = None, out: Any = sys.stdout
) -> Comparison:
    """Write a generated array to Zarr with aimss and with Dask, side by side.

    The Dask blocks (1000 rows) are not aligned with the Zarr chunks (1024
    rows): Dask must take its lock to write them correctly; aimss pushes each
    chunk's pieces to one writer. Both results are read back and checked.
    """
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
    seconds: list[float] = []
    failed: list[str] = []
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
            if not good:
                failed.append(name)
            seconds.append(dt)
            print(
                f"  {name:9s} {dt:6.2f} s  ({rows * cols * 8 / dt / 1e9:.2f} GB/s)  "
                f"read back: {'identical sum' if good else 'MISMATCH'}",
                file=out,
            )
        print(f"  zarr.open_array reads it: shape {zarr.open_array(path).shape}", file=out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return Comparison("sink", "Dask to_zarr", seconds[0], seconds[1], tuple(failed))


def summary(stream: dict[str, Any] | None, comparisons: Sequence[Comparison]) -> tuple[str, bool]:
    """The demo's last line, and whether every output verified.

    Examples
    --------
    >>> line, ok = summary(None, [Comparison("shuffle", "Dask p2p", 1.0, 2.5, ())])
    >>> line
    'summary: shuffle: aimss 1.00 s vs Dask p2p 2.50 s, aimss 2.5x faster; all outputs verified'
    """
    parts: list[str] = []
    failed: list[str] = []
    if stream is not None:
        parts.append(f"stream: {stream['records']} records in {stream['seconds']:.2f} s")
        if not stream["ok"]:
            failed.append("stream (records lost or changed)")
    for c in comparisons:
        ratio = c.dask_seconds / c.aimss_seconds if c.aimss_seconds > 0 else float("inf")
        speed = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
        parts.append(
            f"{c.stage}: aimss {c.aimss_seconds:.2f} s vs {c.dask} {c.dask_seconds:.2f} s, aimss {speed}"
        )
        failed += [f"{c.stage} ({name})" for name in c.failed]
    parts.append(f"verification FAILED: {', '.join(failed)}" if failed else "all outputs verified")
    return "summary: " + "; ".join(parts), not failed


# Dask's p2p logs every shuffle's start and end at WARNING, and its GC monitor
# warns under load; in the demo's output they interleave with the results.
_NOISY_LOGGERS = ("distributed.shuffle", "distributed.gc")


@contextlib.contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """Raise Dask's noisy loggers to ERROR for the demo (errors still show)."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# argparse takes these as plain text: the module docstring is RST for the docs.
_DESCRIPTION = """\
aimss-dask: an in-memory stream store built into Dask.

Run "aimss-dask demo --help" to see what the demo runs and its options,
and "aimss-dask clean-spill --help" to find (and remove) the spill files
of workers that died on this host."""

_CLEAN_DESCRIPTION = """\
List the spill folders that AIMSS workers on this host left behind when
their process died (killed, or out of memory), with their size; with
--remove, remove them.

A folder is listed only if the note AIMSS writes in it (owner.json) names
this host and a process that no longer runs. Only the files AIMSS writes
(segment-N.bin and the note) are removed, then the folder if it is empty;
anything else keeps it, and it is reported.

While the cluster that saw a worker die still runs, a worker that starts
on this host takes that worker's files over (its partitions come back
from them): remove only when no such cluster is left."""

_DEMO_DESCRIPTION = """\
Run three stages on a Dask cluster (a built-in LocalCluster unless
--scheduler or --jobqueue is given), time them, and verify every output:

  stream   producer tasks write records into an AIMSS stream; consumer
           tasks on each partition's owner read and reduce them; every
           record is counted and its tag checked.
  shuffle  a generated DataFrame (an int64 key and six float64 columns)
           is shuffled by its key with aimss_dask.shuffle and with Dask's
           p2p shuffle; each output's rows, keys and number of partitions
           are checked against the input.
  sink     a generated float64 array is written to Zarr with
           aimss_dask.to_zarr and with dask.array.to_zarr (Dask's blocks
           not aligned with the Zarr chunks); both are read back and their
           sums compared.

The last line sums up: each stage's aimss time against Dask's, and whether
every output verified. The exit status is 1 if any output did not verify.
Sizes take bytes or units: 4096, 64KiB, 1MiB, 2GB.

--jobqueue slurm (or pbs) submits --workers batch jobs through dask-jobqueue,
one single-threaded worker each with --job-memory, from this machine (a login
node); the scheduler runs in this process. --interface names the network
interface workers and scheduler use (e.g. ib0, or lo on one machine)."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aimss-dask")
    except PackageNotFoundError:  # run from a source tree that is not installed
        import aimss_dask

        return aimss_dask.__version__


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=``: a whole number of at least ``minimum``."""

    def count(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is too small: it must be at least {minimum}")
        return n

    return count


def _size(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=``: a byte size like 4096 or 1MiB, at least ``minimum``."""

    def size(text: str) -> int:
        try:
            # parse_bytes reads "" as 1 byte; refuse it with the other non-sizes.
            n = parse_bytes(text) if text.strip() else None
        except ValueError:
            n = None
        if n is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not a size; give bytes or e.g. 64KiB, 1MiB, 2GB")
        if n < minimum:
            raise argparse.ArgumentTypeError(
                f"{text!r} is too small: it must be at least {format_bytes(minimum)}"
            )
        return n

    return size


def _writable_dir(text: str) -> str:
    """An argparse ``type=``: an existing directory this process can write in."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist; give an existing directory")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    if not os.access(text, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable by this user")
    return text


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter  # keeps the descriptions' layout
    parser = argparse.ArgumentParser(prog="aimss-dask", description=_DESCRIPTION, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the demo: an AIMSS stream, then AIMSS against Dask at shuffling and writing Zarr",
        description=_DEMO_DESCRIPTION,
        formatter_class=raw,
    )
    demo.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="address of a running cluster's scheduler, e.g. tcp://host:8786 (default: start a LocalCluster)",
    )
    demo.add_argument(
        "--jobqueue", choices=sorted(_JOBQUEUES), default=None,
        help="start the workers as batch jobs with dask-jobqueue (pip install 'aimss-dask[hpc]')",
    )
    demo.add_argument(
        "--workers", type=_count(1), default=2, metavar="N",
        help="worker processes of the built-in LocalCluster (or batch jobs with --jobqueue), "
        "one thread each; ignored with --scheduler (default: %(default)s)",
    )
    demo.add_argument(
        "--job-memory", type=_size(2**28), default="4GiB", metavar="SIZE",
        help="with --jobqueue: memory of each job's worker (default: %(default)s)",
    )
    demo.add_argument(
        "--interface", default=None, metavar="NAME",
        help="with --jobqueue: network interface of the scheduler and workers (default: dask-jobqueue's)",
    )
    demo.add_argument(
        "--producers", type=_count(1), default=8, metavar="N",
        help="stream stage: producer tasks (default: %(default)s)",
    )
    demo.add_argument(
        "--records", type=_count(1), default=64, metavar="N",
        help="stream stage: records each producer writes (default: %(default)s)",
    )
    demo.add_argument(
        "--record-size", type=_size(8), default="1MiB", metavar="SIZE",
        help="stream stage: bytes per record, a float64 array, at least 8 B (default: %(default)s)",
    )
    demo.add_argument(
        "--partitions", type=_count(1), default=None, metavar="N",
        help="partitions of the stream stage's stream and output partitions of the shuffle "
        "stage, at least 1 (default: 2 per worker for the stream, 32 for the shuffle)",
    )
    demo.add_argument(
        "--shuffle-size", type=_size(0), default="256MiB", metavar="SIZE",
        help="shuffle stage: bytes of DataFrame shuffled, in 32 input partitions; "
        "0 skips the stage (default: %(default)s)",
    )
    demo.add_argument(
        "--sink-size", type=_size(0), default="256MiB", metavar="SIZE",
        help="sink stage: bytes of float64 array written to Zarr; 0 skips the stage (default: %(default)s)",
    )
    demo.add_argument(
        "--sink-dir", type=_writable_dir, default=None, metavar="DIR",
        help="sink stage: an existing, writable directory in which it makes and then removes "
        "a temporary folder (default: the system's temporary directory)",
    )
    clean = sub.add_parser(
        "clean-spill",
        help="list (and with --remove, remove) spill folders that dead workers left on this host",
        description=_CLEAN_DESCRIPTION,
        formatter_class=raw,
    )
    clean.add_argument(
        "--directory", type=_existing_dir, default=None, metavar="DIR",
        help="the spill root workers use (default: the aimss spill-directory setting if set, else "
        "aimss-spill in Dask's scratch space, <temporary-directory>/dask-scratch-space/aimss-spill)",
    )
    clean.add_argument("--remove", action="store_true", help="remove what is listed (default: only list)")
    return parser


#: The batch systems ``--jobqueue`` knows: dask-jobqueue's cluster class for each.
_JOBQUEUES = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}

#: Seconds ``--jobqueue`` waits for its jobs' workers to join (a busy queue may hold them).
JOB_START_TIMEOUT = 600


def _jobqueue_cluster(kind: str, workers: int, memory: int, interface: str | None) -> Any:
    """A dask-jobqueue cluster of one-thread, one-process jobs (not scaled yet)."""
    try:
        import dask_jobqueue
    except ImportError:
        raise SystemExit(
            "aimss-dask demo --jobqueue needs dask-jobqueue: pip install 'aimss-dask[hpc]'"
        ) from None
    cls = getattr(dask_jobqueue, _JOBQUEUES[kind])
    return cls(
        cores=1, processes=1, memory=format_bytes(memory).replace(" ", ""), interface=interface,
        walltime="01:00:00", python=sys.executable,
    )


def _default_spill_root() -> str:
    """Where workers of this configuration spill, with Dask's default local directory."""
    import tempfile

    import dask

    from aimss_dask.core.config import AIMSSConfig

    tmp = dask.config.get("temporary-directory", None) or tempfile.gettempdir()
    return AIMSSConfig.load().spill_root(os.path.join(tmp, "dask-scratch-space"))


def _existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory; give the spill root workers use")
    return text


def clean_spill(root: str, remove: bool, out: Any = None) -> int:
    """List (or remove) the spill folders dead workers left in ``root``; how many were left in place."""
    from aimss_dask.log import salvage

    out = out or sys.stdout
    found = salvage.left_behind(root)
    if not found:
        print(f"no spill folder of a dead worker in {root}", file=out)
        return 0
    kept = 0
    for folder, owner in found:
        size = sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
        what = f"{folder}  {format_bytes(size)}  (worker {owner.get('worker')}, pid {owner.get('pid')})"
        if not remove:
            print(what, file=out)
        elif salvage.discard(folder):
            print(f"removed {what}", file=out)
        else:
            kept += 1
            print(f"kept {folder}: it holds files aimss did not write", file=out)
    if not remove:
        print(f"{len(found)} folder(s); run again with --remove to remove them", file=out)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    # Every value is checked here, so a bad one is a usage error (exit 2)
    # before any cluster starts.
    args = _parser().parse_args(argv)
    if args.command == "clean-spill":
        root = args.directory or _default_spill_root()
        if not os.path.isdir(root):
            print(f"no spill root at {root}: nothing to clean")
            return 0
        return 1 if clean_spill(root, args.remove) else 0

    from distributed import Client, LocalCluster

    def stages(client: Any) -> tuple[dict[str, Any], list[Comparison]]:
        stream = run_demo(
            client, producers=args.producers, records=args.records,
            record_bytes=args.record_size, partitions=args.partitions,
        )
        comparisons = []
        if args.shuffle_size:
            comparisons.append(run_shuffle_demo(client, nbytes=args.shuffle_size, partitions=args.partitions))
        if args.sink_size:
            comparisons.append(run_sink_demo(client, nbytes=args.sink_size, directory=args.sink_dir))
        return stream, comparisons

    if args.scheduler and args.jobqueue:
        _parser().error("--scheduler and --jobqueue exclude each other: pick the cluster to use")
    with _quiet_dask_logs():
        if args.scheduler:
            with Client(args.scheduler) as client:
                stream, comparisons = stages(client)
        elif args.jobqueue:
            with _jobqueue_cluster(args.jobqueue, args.workers, args.job_memory, args.interface) as cluster, \
                    Client(cluster) as client:
                cluster.scale(args.workers)
                client.wait_for_workers(args.workers, timeout=JOB_START_TIMEOUT)
                stream, comparisons = stages(client)
        else:
            # silence_logs applies in the worker processes too, where the
            # in-process loggers set above do not reach.
            with LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                silence_logs=logging.ERROR,
            ) as cluster, Client(cluster) as client:
                stream, comparisons = stages(client)
    line, ok = summary(stream, comparisons)
    print(f"\n{line}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
