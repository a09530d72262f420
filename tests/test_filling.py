"""Idle filling on a real cluster, with CPU fillers (``gpu=False``): the path CI can run.

Each filler slice writes one line -- its process, start, end and budget --
to a file of its own process under the test's folder, and the tests check
those times against the phases and the job's own tasks (Dask's task
stream): slices run in phases and idle dips, end before a phase announced
to end, never start while the job's tasks run there, stop when cancelled
or when the phase closes, and a failing filler is reported, not raised.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import pytest
from conftest import make_cluster, wait_until
from distributed import Client, get_task_stream, get_worker

import aimss_dask
from aimss_dask import InvalidArgumentError, InvalidTypeError

#: The coordinator looks often; idle threads count after 0.1 s.
FILL = {"tick": "30ms", "dip-after": "100ms", "dip-slice": "150ms"}


@pytest.fixture(scope="module")
def client():
    with make_cluster(2) as cluster, Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS(fill=FILL))
        c.wait_for_workers(2)
        yield c


def _slices(folder: pathlib.Path) -> list[dict[str, Any]]:
    out = []
    for f in folder.glob("*.jsonl"):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(out, key=lambda r: r["start"])


def record_slice(folder: str, budget_s: float, *, limit: int = 10_000, work: float = 1.0) -> bool:
    """A filler: spins for ``work`` of its budget, notes the slice, has more until ``limit`` slices."""
    start = time.time()
    end = time.monotonic() + budget_s * work
    while time.monotonic() < end:
        pass
    path = pathlib.Path(folder) / f"{os.getpid()}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "start": start, "end": time.time(), "budget": budget_s}) + "\n")
    return len(path.read_text().splitlines()) < limit


def fails(budget_s: float) -> bool:
    raise ValueError("the filler broke on purpose")


def _in_phase(seconds: float, expected: float | None) -> dict[str, float]:
    """A task that waits ``seconds`` in a sync phase; when it opened and closed, and where."""
    with aimss_dask.sync_phase("test-ckpt", expected_s=expected):
        t0 = time.time()
        time.sleep(seconds)
        t1 = time.time()
    return {"open": t0, "close": t1, "pid": os.getpid(), "worker": get_worker().address}


def _busy(i: int, seconds: float) -> int:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return i * i


def test_slices_fill_a_phase_and_end_before_it_does(client, tmp_path):
    """Both workers busy with the job; one task opens a phase: its worker is filled, then not."""
    addrs = sorted(client.scheduler_info()["workers"])
    f = aimss_dask.fill(record_slice, str(tmp_path), gpu=False, max_s=0.3)
    try:
        # The other worker runs the job's tasks back to back meanwhile: no
        # slice may start there.
        with get_task_stream(client) as ts:
            busy = client.map(_busy, range(12), seconds=0.15, workers=[addrs[1]], pure=False)
            phase = client.submit(_in_phase, 1.5, 1.5, workers=[addrs[0]], pure=False).result()
            assert client.gather(busy) == [i * i for i in range(12)]
    finally:
        # Idle now, both workers would be filled for ever.
        f.cancel()
    wait_until(lambda: not f.status()["running"], what="slices ended")
    slices = _slices(tmp_path)
    here = [s for s in slices if s["pid"] == phase["pid"]]
    in_phase = [s for s in here if phase["open"] - 0.05 <= s["start"] <= phase["close"]]
    assert len(in_phase) >= 3, f"too few slices in the 1.5 s phase: {in_phase}"
    # Sized to the announced end (less a safety share): none runs past it
    # (slack for a loaded machine: the filler threads run at the lowest priority).
    assert all(s["end"] <= phase["close"] + 0.15 for s in in_phase), in_phase
    assert sum(s["end"] - s["start"] for s in in_phase) > 0.6
    # The busy worker: no slice starts while one of the job's tasks runs there.
    runs = [(t["startstops"][0]["start"], t["startstops"][0]["stop"]) for t in ts.data
            if t["worker"] == addrs[1] and "_busy" in str(t["key"])]
    assert len(runs) == 12
    other = [s for s in slices if s["pid"] != phase["pid"]]
    for s in other:
        assert not any(a + 0.03 < s["start"] < b for a, b in runs), f"slice {s} started during a task {runs}"
    st = f.status()
    # Some of those may have started as idle-dip slices just before the phase opened.
    assert st["slices"] >= len(in_phase) and st["in_phase"] >= 2 and st["error"] is None


def record_five(folder: str, budget_s: float) -> bool:
    return record_slice(folder, budget_s, limit=5)


def test_idle_workers_are_filled_until_the_filler_is_done(client, tmp_path):
    f = aimss_dask.fill(record_five, str(tmp_path), gpu=False, max_s=0.1, concurrency=2, key="idle-test")
    st = f.wait(timeout=30)
    # Each process's fifth slice returns False: the filler is done then.
    assert st["state"] == "done" and st["error"] is None and 5 <= st["slices"] <= 10
    slices = _slices(tmp_path)
    assert len(slices) == st["slices"]
    per_pid: dict[int, int] = {}
    for s in slices:
        per_pid[s["pid"]] = per_pid.get(s["pid"], 0) + 1
    assert max(per_pid.values()) == 5
    # Idle dips get dip-slice (0.15 s) windows, capped by max_s.
    assert all(s["budget"] <= 0.1 + 1e-9 for s in slices)
    assert "filler-done" in {e["action"] for _, e in client.get_events("aimss") if e.get("key") == "idle-test"}


def test_a_failing_filler_is_reported_never_raised(client):
    f = aimss_dask.fill(fails, gpu=False, max_s=0.1, key="broken-filler")
    st = f.wait(timeout=30)
    assert st["state"] == "failed"
    assert "ValueError: the filler broke on purpose" in st["error"]
    assert "fails" in st["traceback"]
    events = [e for _, e in client.get_events("aimss") if e.get("action") == "filler-failed"]
    assert any(e["key"] == "broken-filler" for e in events)
    # The job goes on as if nothing happened.
    assert client.submit(_busy, 3, 0.01, pure=False).result() == 9


def test_cancel_stops_new_slices(client, tmp_path):
    f = aimss_dask.fill(record_slice, str(tmp_path), gpu=False, max_s=0.05)
    wait_until(lambda: len(_slices(tmp_path)) >= 3, timeout=20, what="three slices")
    assert f.cancel()
    wait_until(lambda: not f.status()["running"], what="the running slice ended")
    n = len(_slices(tmp_path))
    time.sleep(0.5)
    assert len(_slices(tmp_path)) == n
    assert f.status()["state"] == "cancelled"


def test_phase_lengths_are_learned_and_the_gpu_queue_waits_without_a_gpu(client, tmp_path):
    for seconds in (0.2, 0.25, 0.3):
        with aimss_dask.sync_phase("learned"):
            time.sleep(seconds)
    st = client.sync(client.scheduler.aimss_phase_status)
    assert 0.2 <= st["expected"]["learned"] <= 0.3
    # A GPU filler never runs on workers without a GPU, in a phase or not.
    g = aimss_dask.fill(record_slice, str(tmp_path), gpu=True, max_s=0.1)
    with aimss_dask.sync_phase("learned", expected_s=0.5):
        time.sleep(0.5)
    assert g.status()["slices"] == 0 and g.status()["state"] == "queued"
    g.cancel()
    assert _slices(tmp_path) == []


def test_bad_arguments_are_refused_by_name(client):
    with pytest.raises(InvalidArgumentError, match="max_s=0"):
        aimss_dask.fill(record_slice, "x", max_s=0)
    with pytest.raises(InvalidArgumentError, match="concurrency=0"):
        aimss_dask.fill(record_slice, "x", concurrency=0)
    with pytest.raises(InvalidTypeError, match="function"):
        aimss_dask.fill("not callable")
    with pytest.raises(InvalidArgumentError, match="expected_s=-1"):
        with aimss_dask.sync_phase("x", expected_s=-1):
            pass
    with pytest.raises(InvalidArgumentError, match="not workers of this cluster"):
        with aimss_dask.sync_phase("x", workers=["tcp://10.255.0.1:1"]):
            pass
    f = aimss_dask.fill(record_slice, "unused", gpu=True, key="twice")
    try:
        with pytest.raises(InvalidArgumentError, match="already queued"):
            aimss_dask.fill(record_slice, "unused", gpu=True, key="twice")
    finally:
        f.cancel()


def test_a_shuffle_seal_is_a_sync_phase_of_the_idle_workers(client):
    import dask.dataframe as dd
    import pandas as pd

    t0 = time.time()
    df = pd.DataFrame({"k": range(1000), "v": range(1000)})
    out = aimss_dask.shuffle(dd.from_pandas(df, npartitions=4), "k", npartitions=4).compute()
    assert sorted(out["v"]) == list(range(1000))
    phases = client.sync(client.scheduler.aimss_power_timelines, since=t0)["phases"]
    seals = [p for p in phases if p["name"] == "aimss-seal"]
    assert seals and all(p["end"] is not None and p["end"] >= p["start"] for p in seals)
    assert set(seals[0]["workers"]) <= set(client.scheduler_info()["workers"]) and seals[0]["workers"]
    st = client.sync(client.scheduler.aimss_phase_status)
    assert st["expected"]["aimss-seal"] is not None


def test_auto_phases_can_be_turned_off():
    import dask.dataframe as dd
    import pandas as pd

    with make_cluster(1) as cluster, Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS(power={"auto-phases": False}))
        df = pd.DataFrame({"k": range(100), "v": range(100)})
        assert len(aimss_dask.shuffle(dd.from_pandas(df, npartitions=2), "k").compute()) == 100
        st = c.sync(c.scheduler.aimss_phase_status)
        assert "aimss-seal" not in st["expected"] and not st["open"]


def _step_or_wait(i: int, wait: float) -> int:
    """A group of tasks where every fourth waits in a sync phase, as a collective does."""
    if i % 4 == 3:
        with aimss_dask.sync_phase("test-allreduce"):
            time.sleep(wait)
    else:
        time.sleep(0.1)
    return i


def test_a_wait_in_a_sync_phase_is_not_a_straggler():
    from conftest import speculation_client

    from aimss_dask.core.names import STRAGGLER_TOPIC

    with speculation_client(min_runtime=0.2, interval="100ms") as c:
        since = time.time()
        got = c.gather(c.map(_step_or_wait, range(24), wait=1.2, pure=False))
        assert got == list(range(24))
        reports = [m for t, m in c.get_events(STRAGGLER_TOPIC) if t >= since and isinstance(m, dict)]
        # Without the phase these waits are 12x their group's median: they
        # would be flagged, and their workers found slow.
        assert reports == []
        assert not c.sync(c.scheduler.aimss_speculation_view)["slow"]


def _cupy_filler(n: int, budget_s: float) -> bool:
    """A GPU filler: records the current stream's priority and does one matmul."""
    import cupy as cp

    stream = cp.cuda.get_current_stream()
    assert stream.ptr != 0, "the filler ran on the legacy default stream"
    m = cp.ones((n, n), dtype=cp.float32)
    (m @ m).sum()
    stream.synchronize()
    lowest, _ = cp.cuda.runtime.deviceGetStreamPriorityRange()
    assert stream.priority == lowest, (stream.priority, lowest)
    return False


@pytest.mark.gpu
def test_gpu_fillers_run_on_a_low_priority_stream_in_a_phase():
    from aimss_dask.power.gpu import gpu_count, optional_import

    if gpu_count() == 0 or optional_import("cupy") is None:
        pytest.skip("needs a GPU with CuPy")
    with make_cluster(1) as cluster, Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS(power={"interval": "20ms"}))
        time.sleep(0.5)  # the sampler's first report: the GPU's free memory
        f = aimss_dask.fill(_cupy_filler, 1024, gpu=True, max_s=0.5, memory=16 << 20)
        with aimss_dask.sync_phase("gpu-test", expected_s=1.0):
            time.sleep(1.0)
        st = f.wait(timeout=30)
        assert st["state"] == "done" and st["error"] is None and st["slices"] == 1, st


def test_waiting_for_a_sink_is_a_sync_phase(client, tmp_path):
    import numpy as np
    from conftest import unique_name

    t0 = time.time()
    stream = aimss_dask.create_stream(unique_name("sinkwait"), partitions=2)
    try:
        sink = stream.to_zarr(str(tmp_path / "a.zarr"), axis=0, chunks=(64, 8))
        for _ in range(8):
            stream.write(np.ones((64, 8)))
        stream.seal()
        sink.wait(timeout=60)
    finally:
        aimss_dask.destroy_stream(stream.name)
    phases = client.sync(client.scheduler.aimss_power_timelines, since=t0)["phases"]
    waits = [p for p in phases if p["name"] == "aimss-sink-wait"]
    assert len(waits) == 1 and waits[0]["end"] is not None and waits[0]["workers"]


def test_a_worker_killed_during_a_slice_leaves_the_filler_going(tmp_path):
    import signal

    with make_cluster(2) as cluster, Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS(fill=FILL))
        c.wait_for_workers(2)
        f = aimss_dask.fill(record_slice, str(tmp_path), gpu=False, max_s=0.5, concurrency=2, key="survives")
        wait_until(lambda: len(f.status()["running"]) == 2, timeout=20, what="slices on both workers")
        pids = c.run(os.getpid)
        victim = sorted(pids)[0]
        os.kill(pids[victim], signal.SIGKILL)
        # The dead worker's slice ends without an answer; the other goes on,
        # and so do new slices, on whoever is there.
        wait_until(lambda: victim not in c.scheduler_info()["workers"], timeout=30, what="the kill seen")
        before = f.status()["slices"]
        wait_until(lambda: f.status()["slices"] >= before + 3, timeout=30, what="slices after the kill")
        st = f.status()
        assert st["state"] == "running" and st["error"] is None and victim not in st["running"]
        f.cancel()


def test_a_clients_fillers_and_phases_end_with_it(client, tmp_path):
    other = Client(client.scheduler.address, set_as_default=False)
    try:
        with other.as_current():
            f = aimss_dask.fill(record_slice, str(tmp_path), gpu=True, max_s=0.1, key="left-behind")
            token = aimss_dask.sync_phase("left-open").__enter__()  # never closed by this client
        assert token
        assert f.status()["state"] == "queued"
    finally:
        other.close()
    wait_until(lambda: f.status()["state"] == "cancelled", what="the filler cancelled")
    st = client.sync(client.scheduler.aimss_phase_status)
    assert not [p for p in st["open"] if p["name"] == "left-open"]


def test_a_key_is_refused_while_its_cancelled_filler_still_runs(client, tmp_path):
    f = aimss_dask.fill(record_slice, str(tmp_path), gpu=False, max_s=0.5, key="busy-key")
    wait_until(lambda: f.status()["running"], timeout=20, what="a slice running")
    f.cancel()
    if f.status()["running"]:  # a slice of 0.5 s: most likely still running
        with pytest.raises(InvalidArgumentError, match="has a slice running"):
            aimss_dask.fill(record_slice, str(tmp_path), gpu=False, key="busy-key")
    f.wait(timeout=20)
    again = aimss_dask.fill(record_five, str(tmp_path), gpu=False, max_s=0.05, key="busy-key")
    assert again.wait(timeout=30)["state"] == "done"


def test_a_gpu_filler_without_a_gpu_says_what_it_waits_for(client):
    from aimss_dask.power.gpu import gpu_count

    if gpu_count():
        pytest.skip("a GPU is here: the filler would run")
    f = aimss_dask.fill(record_slice, "unused", gpu=True, key="gpu-waits")
    try:
        assert "no worker has reported a GPU" in f.status()["note"]
    finally:
        f.cancel()


def test_status_and_metrics_show_fillers_and_phases(client, tmp_path):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    f = aimss_dask.fill(record_five, str(tmp_path), gpu=False, max_s=0.05, key="shown")
    st = f.wait(timeout=30)
    with aimss_dask.sync_phase("shown-phase", expected_s=5.0):
        fill = aimss_dask.status().fill
        assert any(p["name"] == "shown-phase" for p in fill["phases"])
    shown = [x for x in fill["fillers"] if x["key"] == "shown"]
    assert shown and shown[0]["state"] == "done" and shown[0]["slices"] == st["slices"]
    port = client.cluster.scheduler.http_server.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("aimss_fill_slices_total", (("kind", "cpu"),))] >= st["slices"]
    assert samples[("aimss_fill_seconds_total", (("kind", "cpu"),))] > 0
    assert samples[("aimss_sync_phases_total", ())] >= 1
    assert ("aimss_sync_phases_open", ()) in samples


def _fake_gpu(dask_worker, free: int) -> None:
    """Make this worker's plugin report a GPU in a dip, as its NVML sampler would."""
    plugin = dask_worker.plugins["aimss"]
    plugin.gpu_state = {"worker": dask_worker.address, "free": free, "util": 0.0, "power_w": 90.0,
                        "low": True, "dip_s": 1.0, "t": time.time()}


def test_gpu_fillers_go_where_a_gpu_reports_a_dip_with_room(client, tmp_path):
    """The coordinator's GPU path end to end (heartbeat -> snapshot -> plan -> slice), with a reported GPU."""
    addrs = sorted(client.scheduler_info()["workers"])
    client.run(_fake_gpu, free=8 << 30, workers=[addrs[0]])
    big = aimss_dask.fill(record_slice, str(tmp_path / "none"), gpu=True, max_s=0.05, memory=9 << 30, key="too-big")
    (tmp_path / "none").mkdir()
    f = aimss_dask.fill(record_five, str(tmp_path), gpu=True, max_s=0.05, memory=1 << 30, key="fits")
    try:
        st = f.wait(timeout=30)
        assert st["state"] == "done" and list(st["workers"]) == [addrs[0]] and st["slices"] == 5
        # One slice at a time on a GPU, never on the worker without one.
        assert st["over_budget"] == 0
        assert big.status()["slices"] == 0 and "bytes free" in big.status()["note"]
    finally:
        big.cancel()
        client.run(lambda dask_worker: setattr(dask_worker.plugins["aimss"], "gpu_state", None), workers=[addrs[0]])
