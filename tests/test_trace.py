"""``aimss_dask.trace``: DFTracer-format traces of data movement, from a real cluster.

Files are read back twice: line by line as JSON here, and by DFTracer's own
event counter (``dftracer_event_count`` from ``dftracer-utils``), an
independent reader of the format.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.core import trace as tracer

FIELDS = {"id", "name", "cat", "pid", "tid", "ts", "dur", "ph", "args"}

#: DFTracer's event counter (dftracer-utils), on PATH or beside this Python.
EVENT_COUNT = shutil.which("dftracer_event_count") or shutil.which(
    "dftracer_event_count", path=os.path.dirname(sys.executable)
)


def _events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = f.read().splitlines()
    assert lines[0] == "[" and lines[-1] == "]", path
    events = [json.loads(line) for line in lines[1:-1]]
    for e in events:
        assert set(e) == FIELDS and e["ph"] == "X" and e["cat"] == "aimss", e
        assert e["dur"] >= 0 and e["ts"] > 1.6e15  # microseconds since the epoch
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    return events


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, Client(c) as cl:
        cl.register_plugin(aimss_dask.AIMSS())
        yield cl


def test_a_trace_of_streams_a_shuffle_and_zarr_holds_their_events_on_every_process(client, tmp_path):
    folder = tmp_path / "trace"
    with aimss_dask.trace(folder) as t:
        s = aimss_dask.create_stream("traced", partitions=2)
        for i in range(200):
            s.write(np.full(16, i))
        s.seal()
        assert len(list(s.read())) == 200
        df = dd.from_pandas(pd.DataFrame({"k": np.arange(4000) % 13, "v": np.arange(4000)}), npartitions=4)
        assert len(aimss_dask.shuffle(df, on="k").compute()) == 4000
        x = da.random.default_rng(0).random((800, 50), chunks=(100, 50))
        aimss_dask.to_zarr(x, str(tmp_path / "a.zarr"), chunks=(100, 50))
        src = aimss_dask.from_zarr(str(tmp_path / "a.zarr"))
        assert sum(len(r) for r in src.read()) == 800
    assert t.files == sorted(t.files)
    workers = listed_workers(client)
    # Every worker and this process (the scheduler's too, here) wrote one file,
    # each in a folder of its own under the trace's folder.
    assert len(t.files) == len(workers) + 1
    assert len({os.path.dirname(f) for f in t.files}) == len(t.files)
    assert all(os.path.dirname(os.path.dirname(f)) == str(folder) and f.endswith(".pfw.gz") for f in t.files)
    events = [e for f in t.files for e in _events(f)]
    names = {e["name"] for e in events}
    assert {"push", "append", "seal", "read", "sink-write", "source-read"} <= names, names
    pushes = [e for e in events if e["name"] == "push"]
    assert all({"stream", "partition", "records", "bytes", "owner"} <= set(e["args"]) for e in pushes)
    assert any(e["args"]["stream"] == "traced" for e in pushes)
    assert any(e["args"]["stream"].startswith("aimss-") for e in events if e["name"] == "append")
    assert sum(e["args"]["records"] for e in events if e["name"] == "append" and e["args"]["stream"] == "traced") == 200
    assert all(e["args"]["bytes"] > 0 and e["args"]["run"] for e in events if e["name"] == "sink-write")
    assert all(e["args"]["bytes"] > 0 for e in events if e["name"] == "source-read")
    # Workers' events come from their own processes.
    assert len({e["pid"] for e in events}) == len(t.files)


@pytest.mark.skipif(EVENT_COUNT is None, reason="dftracer-utils is not installed")
def test_dftracers_own_reader_counts_every_event(client, tmp_path):
    with aimss_dask.trace(tmp_path / "t") as t:
        s = aimss_dask.create_stream("counted", partitions=2)
        for i in range(50):
            s.write(i)
        s.seal()
        list(s.read())
    for f in t.files:
        out = subprocess.run(
            [EVENT_COUNT, "-d", os.path.dirname(f), "--log-level", "off"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert int(out.stdout.split()[-1]) == len(_events(f)) > 0


def test_a_worker_that_joins_during_a_trace_is_traced_too(client, tmp_path):
    from conftest import wait_until

    cluster = client.cluster
    before = set(listed_workers(client))
    with aimss_dask.trace(tmp_path / "joined", compress=False) as t:
        cluster.scale(len(before) + 1)
        client.wait_for_workers(len(before) + 1)
        [new] = set(listed_workers(client)) - before
        pid = client.run(os.getpid, workers=[new])[new]
        wait_until(lambda: any(d.endswith(f"-{pid}") for d in os.listdir(tmp_path / "joined")), timeout=20,
                   what="the new worker's trace folder")
        s = aimss_dask.create_stream("joined", partitions=3)
        for i in range(30):
            s.write(i)
        s.seal()
    mine = [f for f in t.files if os.path.basename(os.path.dirname(f)).endswith(f"-{pid}")]
    assert len(mine) == 1 and any(e["name"] == "append" for e in _events(mine[0]))
    cluster.scale(len(before))
    wait_until(lambda: len(listed_workers(client)) == len(before), timeout=30, what="scaled back")


def test_a_second_trace_into_the_same_folder_keeps_the_first(client, tmp_path):
    with aimss_dask.trace(tmp_path, compress=False) as first:
        aimss_dask.create_stream("one", partitions=1).seal()
    kept = {f: open(f).read() for f in first.files}
    with aimss_dask.trace(tmp_path, compress=False) as second:
        aimss_dask.create_stream("two", partitions=1).seal()
    assert not set(first.files) & set(second.files)
    assert all(f.endswith(".pfw") for f in second.files)
    assert {f: open(f).read() for f in first.files} == kept


def test_bad_trace_paths_are_refused_by_name(client, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("mine")
    with pytest.raises(NotADirectoryError, match="a-file"):
        with aimss_dask.trace(f):
            pass
    assert f.read_text() == "mine"
    with pytest.raises(TypeError, match="folder name"):
        with aimss_dask.trace(42):  # type: ignore[arg-type]
            pass


def test_spills_and_coordinator_events_are_traced(tmp_path):
    from aimss_dask.coordinator.cluster import ClusterOps
    from aimss_dask.log.store import LogStore

    path = tracer.start(str(tmp_path), compress=False)
    try:
        store = LogStore(budget=4096, spill_root=str(tmp_path / "spill"), segment_size=1024)
        store.open("s", 1, [0])
        for _ in range(8):
            store.append("s", 1, 0, [np.zeros(128)], [1024])
        assert store.spill(target=0) > 0
        store.close()
        ops = ClusterOps()
        ops.scheduler = type("S", (), {"log_event": lambda self, topic, msg: None})()
        ops.event({"action": "run-recovered", "run": "r1", "partitions": [0, 2]})
    finally:
        assert tracer.stop() == path
    events = _events(path)
    spills = [e for e in events if e["name"] == "spill"]
    assert spills and all(e["args"]["stream"] == "s" and e["args"]["bytes"] >= 1024 for e in spills)
    [rec] = [e for e in events if e["name"] == "run-recovered"]
    assert rec["args"] == {"run": "r1", "partitions": [0, 2]}


def test_tracing_is_off_unless_started_and_stops_once_per_start(tmp_path):
    assert not tracer.on()
    with tracer.span("nothing", stream="s") as args:
        args["x"] = 1  # off: nothing is written, the block still runs
    a = tracer.start(str(tmp_path), compress=False)
    b = tracer.start(str(tmp_path), compress=False)  # a second worker of this process
    assert a == b and tracer.on()
    assert tracer.stop() == a and tracer.on()
    assert tracer.stop() == a and not tracer.on()
    assert tracer.stop() is None


@pytest.mark.parametrize("compress", [False, True])
def test_full_buffers_are_written_by_the_writer_thread_not_the_caller(tmp_path, monkeypatch, compress):
    """An event added on the event loop must not wait for the disk or for gzip."""
    import threading

    path = tracer.start(str(tmp_path), compress=compress)
    writers: list[str] = []
    real = tracer._current._file.write

    def write(data):
        writers.append(threading.current_thread().name)
        return real(data)

    monkeypatch.setattr(tracer._current._file, "write", write)
    try:
        for i in range(3 * tracer.BUFFER_LINES + 7):
            tracer.complete("push", 1.7e9 + i, 0.001, n=i)
    finally:
        assert tracer.stop() == path
    assert len(writers) >= 3 and set(writers) == {"aimss-trace-writer"}, writers
    events = _events(path)
    assert [e["args"]["n"] for e in events] == list(range(3 * tracer.BUFFER_LINES + 7))


def test_a_trace_whose_disk_fails_drops_events_says_so_once_and_never_raises(tmp_path, monkeypatch, caplog):
    path = tracer.start(str(tmp_path), compress=False)

    def full(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracer._current._file, "write", full)
    try:
        for i in range(2 * tracer.BUFFER_LINES):
            tracer.complete("push", 1.7e9 + i, 0.001)  # never raises in the caller
    finally:
        assert tracer.stop() == path
    said = [r.getMessage() for r in caplog.records if "stopped growing" in r.getMessage()]
    assert len(said) == 1 and path in said[0] and "No space left" in said[0], said
    assert not tracer.on()


def test_the_trace_key_of_the_config_traces_from_the_start(tmp_path):
    folder = tmp_path / "from-config"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, Client(c) as cl:
        cl.register_plugin(aimss_dask.AIMSS(trace=str(folder)))
        pids = set(cl.run(os.getpid).values())
        s = aimss_dask.create_stream("configured", partitions=2)
        for i in range(20):
            s.write(i)
        s.seal()
        assert len(list(s.read())) == 20
    # Closed with the cluster: every worker's file and the scheduler's.
    files = sorted(str(p) for p in folder.glob("*/aimss-*.pfw.gz"))
    assert {int(os.path.basename(os.path.dirname(f)).rsplit("-", 1)[1]) for f in files} >= pids
    events = [e for f in files for e in _events(f)]
    assert {"append", "seal", "read"} <= {e["name"] for e in events}
    with pytest.raises(aimss_dask.InvalidArgumentError, match="trace=42"):
        aimss_dask.AIMSSConfig.load(trace=42)
