"""The front doors: the CLI demo, the preload, lazy GPU imports."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from distributed import Client, LocalCluster

import aimss_dask
from aimss_dask.power import gpu

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimss_dask.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def test_demo_runs_on_a_builtin_local_cluster(tmp_path):
    r = _cli(
        "demo", "--producers", "3", "--records", "10", "--record-size", "64KiB", "--shuffle-size", "4MiB",
        "--sink-size", "4MiB", "--sink-dir", str(tmp_path),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "records    30 (all present)" in r.stdout
    assert "GB/s" in r.stdout
    assert r.stdout.count("peak log memory") == 2  # one line per worker
    # The shuffle stage: aimss and Dask's p2p side by side.
    assert "shuffle stage:" in r.stdout
    assert "  aimss " in r.stdout and "  dask p2p " in r.stdout
    # The sink stage: both writes read back identical, and nothing is left on disk.
    assert "sink stage:" in r.stdout and "  dask lock " in r.stdout
    assert r.stdout.count("read back: identical sum") == 2
    assert list(tmp_path.iterdir()) == []


def test_demo_on_an_existing_cluster():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cl:
        r = _cli("demo", "--scheduler", cl.scheduler_address, "--producers", "2", "--records", "5", "--record-size", "8KiB", "--shuffle-size", "0", "--sink-size", "0")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "records    10 (all present)" in r.stdout
        with Client(cl) as c:
            # The demo destroyed its stream: nothing left behind on the cluster.
            c.register_plugin(aimss_dask.AIMSS())
            assert all(not w["streams"] for w in aimss_dask.status().values())


def test_preload_on_the_scheduler_registers_aimss():
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        scheduler_kwargs={"preload": ["aimss_dask.preload"]},
    ) as cl, Client(cl):
        s = aimss_dask.create_stream("pre", partitions=2)
        s.write(np.arange(4), partition=1)
        s.seal()
        assert [r.tolist() for r in s.read()] == [[0, 1, 2, 3]]
        aimss_dask.destroy_stream("pre")


def test_preload_on_workers_registers_aimss_on_the_scheduler():
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        preload=["aimss_dask.preload"],
    ) as cl, Client(cl) as c:
        c.wait_for_workers(2)
        s = aimss_dask.create_stream("pre-w", partitions=2)
        assert len(set(s.spec.owners)) == 2
        for p in range(2):
            s.write(b"x" * p, partition=p)
        s.seal()
        assert s.info()["records"] == [1, 1]
        aimss_dask.destroy_stream("pre-w")


def test_gpu_stack_is_imported_lazily():
    code = (
        "import sys, aimss_dask; "
        "bad = [m for m in ('cupy', 'pynvml', 'cudf') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(gpu.optional_import("cupy") is None or gpu.gpu_count() == 0, reason="needs CuPy and a CUDA GPU")
def test_cupy_records_round_trip():
    import cupy

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, Client(cl) as c:
        c.register_plugin(aimss_dask.AIMSS())
        s = aimss_dask.create_stream("gpu", partitions=2)
        x = cupy.arange(1000, dtype="float32")
        s.write(x, partition=0)
        s.write(x * 2, partition=1)
        s.seal()
        got = list(s.read())
        assert [float(cupy.asarray(g).sum()) for g in got] == [float(x.sum()), float((x * 2).sum())]
        aimss_dask.destroy_stream("gpu")
