"""``aimss_`` metrics on the real ``/metrics`` endpoints of a running cluster, scraped over HTTP.

The pages are parsed with ``prometheus_client``'s own text parser, an
independent reader of the exposition format, and the figures are checked
against what the test wrote and read.
"""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import textwrap
import urllib.request
from typing import Any

import pytest
from distributed import Client, LocalCluster

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.core import metrics as core_metrics
from aimss_dask.core import stats
from aimss_dask.core.metrics import Metric, merge

prometheus_client = pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

RECORDS = 400
NBYTES = 1024

#: The only labels an aimss_ metric may carry, and so their values stay few.
ALLOWED_LABELS = {"where", "path", "kind", "state", "how", "action", "le", "waited"}


def _scrape(port: int) -> dict[str, list[Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    got = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert got, f"{name}{labels} not on the page; aimss_ names there: {sorted(n for n in samples if 'aimss' in n)}"
    return sum(got)


def _write(name: str, n: int) -> int:
    import numpy as np

    s = aimss_dask.get_stream(name)
    for i in range(n):
        s.write(np.full(NBYTES // 8, i, dtype=np.int64), partition=i % s.partitions)
    s.flush()
    return n


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
    ) as c, Client(c) as client:
        client.register_plugin(aimss_dask.AIMSS())
        yield c, client


def _ports(cluster: LocalCluster, client: Client) -> tuple[int, list[int]]:
    workers = listed_workers(client)
    return cluster.scheduler.http_server.port, [w["services"]["dashboard"] for w in workers.values()]


def test_workers_and_the_scheduler_serve_aimss_metrics_that_match_what_was_written_and_read(cluster):
    cluster, client = cluster
    sched_port, worker_ports = _ports(cluster, client)
    before = [_scrape(p) for p in worker_ports]
    stream = aimss_dask.create_stream("metrics-demo", partitions=2)
    # Written from a task on each worker: half of each one's records go to
    # its own partition (local), half to the other worker's (pushed).
    workers = sorted(listed_workers(client))
    futs = [client.submit(_write, stream.name, RECORDS // 2, workers=[w], pure=False) for w in workers]
    assert sum(client.gather(futs)) == RECORDS
    stream.seal()
    assert sum(1 for _ in stream.read(partition=0, group="g")) == RECORDS // 2

    after = [_scrape(p) for p in worker_ports]

    def delta(name: str, **labels: str) -> float:
        return sum(_value(a, name, **labels) - _value(b, name, **labels) for a, b in zip(after, before))

    assert delta("aimss_pushed_records_total", path="remote") + delta(
        "aimss_pushed_records_total", path="local"
    ) == RECORDS
    assert delta("aimss_pushed_records_total", path="remote") > 0
    assert delta("aimss_received_records_total") == RECORDS
    assert delta("aimss_received_bytes_total") >= RECORDS * NBYTES
    assert delta("aimss_read_records_total") >= RECORDS // 2
    # Every remote batch answered is one latency sample.
    assert delta("aimss_push_latency_seconds_count") > 0
    assert delta("aimss_push_latency_seconds_sum") > 0
    for page in after:
        assert _value(page, "aimss_log_budget_bytes") > 0
        buckets = sorted(
            (float(s.labels["le"]), s.value) for s in page["aimss_push_latency_seconds_bucket"]
        )
        assert [n for _, n in buckets] == sorted(n for _, n in buckets)  # cumulative
        assert buckets[-1][0] == float("inf") and buckets[-1][1] == _value(page, "aimss_push_latency_seconds_count")
    assert sum(_value(p, "aimss_log_bytes", where="memory") for p in after) >= RECORDS * NBYTES

    sched = _scrape(sched_port)
    assert _value(sched, "aimss_streams") >= 1
    assert _value(sched, "aimss_consumer_groups") >= 1
    # Group "g" read partition 0 only: partition 1's records are its lag.
    assert _value(sched, "aimss_group_lag_records") == RECORDS // 2
    assert _value(sched, "aimss_slow_workers") == 0
    for page in [sched, *after]:
        for name, samples in page.items():
            if name.startswith("aimss_"):
                for s in samples:
                    assert set(s.labels) <= ALLOWED_LABELS, (name, s.labels)
    aimss_dask.destroy_stream(stream.name)


def test_runs_are_counted_by_kind_and_state(cluster):
    import dask.dataframe as dd
    import pandas as pd

    cluster, client = cluster
    sched_port, _ = _ports(cluster, client)
    df = dd.from_pandas(pd.DataFrame({"k": range(2000), "v": range(2000)}), npartitions=4)
    out = aimss_dask.shuffle(df, on="k").compute()
    assert len(out) == 2000
    runs = aimss_dask.status().runs
    kinds = {(r["kind"], r["state"]) for r in runs}
    page = _scrape(sched_port)
    for kind, state in kinds:
        assert _value(page, "aimss_runs", kind=kind, state=state) >= 1
    assert sum(s.value for s in page["aimss_runs"]) == len(runs)


def test_sink_writes_show_as_grants_of_the_io_scheduler(cluster, tmp_path):
    import dask.array as da

    cluster, client = cluster
    sched_port, _ = _ports(cluster, client)
    before = _scrape(sched_port)
    aimss_dask.to_zarr(da.ones((512, 64), chunks=(64, 64)), str(tmp_path / "m.zarr"))
    page = _scrape(sched_port)
    io = aimss_dask.status().io
    granted = _value(page, "aimss_io_grants_total", waited="no") + _value(page, "aimss_io_grants_total", waited="yes")
    assert granted == io["grants"] > _value(before, "aimss_io_grants_total", waited="no")
    assert _value(page, "aimss_io_writers", state="waiting") == 0


def test_histogram_and_merge_examples_hold():
    for mod in (stats, core_metrics):
        assert doctest.testmod(mod).failed == 0


def test_sources_of_one_process_are_summed_and_mismatches_refused():
    h1, h2 = stats.Histogram((1.0,)), stats.Histogram((1.0,))
    h1.observe(0.5)
    h2.observe(3.0)
    a = Metric("lat", "histogram", "L.", [({}, h1.snapshot()[:2])])
    b = Metric("lat", "histogram", "L.", [({}, h2.snapshot()[:2])])
    [m] = merge([a, b])
    assert m.samples == [({}, ([(1.0, 1), (float("inf"), 2)], 3.5))]
    with pytest.raises(ValueError, match="both gauge and counter"):
        merge([Metric("x", "gauge", "X.", [({}, 1)]), Metric("x", "counter", "X.", [({}, 1)])])
    with pytest.raises(ValueError, match="kind 'summary'"):
        Metric("x", "summary", "X.")
    with pytest.raises(ValueError, match="strictly increasing"):
        stats.Histogram((1.0, 0.5))


def test_without_prometheus_client_metrics_is_off_and_the_cluster_works():
    # A cluster in a process where prometheus_client cannot be imported:
    # the plugin still registers and stores, and /metrics still answers.
    code = textwrap.dedent('''
        import sys
        sys.modules["prometheus_client"] = None
        import urllib.request
        import aimss_dask
        from aimss_dask.core import metrics
        from distributed import Client, LocalCluster

        assert not metrics.available() and metrics.expose(lambda: []) is False
        with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as c, Client(c) as client:
            client.register_plugin(aimss_dask.AIMSS())
            s = aimss_dask.create_stream("s", partitions=1)
            s.write(1)
            s.seal()
            assert list(s.read()) == [1]
            with urllib.request.urlopen(f"http://127.0.0.1:{c.scheduler.http_server.port}/metrics") as r:
                page = r.read().decode()
            assert "aimss_" not in page
        print("ok")
    ''')
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
