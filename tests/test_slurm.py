"""dask-jobqueue on a real Slurm: workers started by ``sbatch`` get AIMSS, streams, shuffles and sinks run, scale-down keeps data.

A single-node Slurm is started from Debian's packages by
:mod:`slurm_harness` (``.ci/run`` installs them where it can, as root);
without it every test here skips, saying why. Each job is one
single-threaded worker on the loopback interface.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import slurm_harness
from conftest import wait_until
from distributed import Client

import aimss_dask
from aimss_dask._compat import listed_workers

dask_jobqueue = pytest.importorskip("dask_jobqueue", reason="needs dask-jobqueue (pip install 'aimss-dask[hpc]')")

#: Seconds a test waits for its jobs' workers.
JOBS_UP = 120

#: Seconds a step of a test may take before it counts as hung.
STEP = 60


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    started = slurm_harness.start(str(tmp_path_factory.mktemp("slurm")))
    if isinstance(started, str):
        pytest.skip(f"no Slurm: {started}")
    try:
        yield started
    finally:
        slurm_harness.stop(started)


def _cluster(tmp_path, **kwargs):
    return dask_jobqueue.SLURMCluster(
        cores=1, processes=1, memory="2GiB", interface="lo", walltime="00:30:00",
        python=sys.executable, log_directory=str(tmp_path / "logs"),
        local_directory=str(tmp_path / "local"), death_timeout=60,
        # The jobs unpickle this module's functions (a shuffle's inputs) by name.
        job_script_prologue=[f"export PYTHONPATH={os.path.dirname(__file__)}:${{PYTHONPATH:-}}"], **kwargs,
    )


def _jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, timeout=30).stdout
    return [line for line in out.splitlines() if line.strip()]


def _frame(i: int) -> pd.DataFrame:
    rng = np.random.default_rng(i)
    return pd.DataFrame({"key": rng.integers(0, 1 << 40, 5_000), "v": rng.random(5_000)})


def test_slurm_workers_get_the_plugin_and_run_streams_shuffles_and_sinks(slurm, tmp_path):
    """Registered after the cluster object exists, before its jobs start; then a scale-down that retires an owner."""
    with _cluster(tmp_path) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit="256MiB"))
        cluster.scale(3)
        client.wait_for_workers(3, timeout=JOBS_UP)
        assert len(_jobs()) == 3, _jobs()
        st = aimss_dask.status()
        assert len(st) == 3 and all(w["budget"] == 256 * 2**20 for w in st.values()), st

        # A stream: written by tasks, read back whole.
        s = aimss_dask.create_stream("hpc", partitions=6)

        def produce(i: int) -> int:
            for j in range(100):
                aimss_dask.write_to("hpc", (i, j), partition=(i + j) % 6)
            aimss_dask.get_stream("hpc").flush()
            return 100

        assert sum(client.gather(client.map(produce, range(6)))) == 600
        s.seal()
        got = sorted(r for p in range(6) for r in s.read(partition=p))
        assert got == sorted((i, j) for i in range(6) for j in range(100))

        # A shuffle, exact.
        df = dd.from_map(_frame, range(6), meta=_frame(0).iloc[:0])
        out = client.compute(aimss_dask.shuffle(df, "key", npartitions=6)).result(timeout=STEP)
        want = pd.concat([_frame(i) for i in range(6)])
        assert len(out) == len(want) and int(out["key"].sum()) == int(want["key"].sum())

        # to_zarr, byte-equal to what Zarr holds when written directly.
        import zarr

        x = da.random.RandomState(0).random((600, 400), chunks=(100, 400))
        aimss_dask.to_zarr(x, str(tmp_path / "a.zarr"), chunks=(200, 100))
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[:], x.compute())

        # Scale down: the job holding the most partitions of the sealed
        # stream retires; its partitions move, nothing is lost.
        owners = aimss_dask.get_stream("hpc").spec.owners
        victim = max(set(owners), key=owners.count)
        client.retire_workers([victim], close_workers=True)
        wait_until(lambda: victim not in listed_workers(client), timeout=60, what="the retirement")
        moved = aimss_dask.get_stream("hpc").spec.owners
        assert victim not in moved
        got = sorted(r for p in range(6) for r in aimss_dask.get_stream("hpc").read(partition=p))
        assert got == sorted((i, j) for i in range(6) for j in range(100))
        # dask-jobqueue's own scale-down ends a job (scancel: SIGTERM to its
        # processes) that owns partitions: they move before it goes.
        before = set(aimss_dask.get_stream("hpc").spec.owners)
        cluster.scale(1)
        wait_until(lambda: len(listed_workers(client)) == 1, timeout=60, what="scale(1)")
        left = set(listed_workers(client))
        assert before - left, f"the job that ended owned no partition: {before} {left}"
        assert set(aimss_dask.get_stream("hpc").spec.owners) <= left
        got = sorted(r for p in range(6) for r in aimss_dask.get_stream("hpc").read(partition=p))
        assert got == sorted((i, j) for i in range(6) for j in range(100))
        aimss_dask.destroy_stream("hpc")
    wait_until(lambda: not _jobs(), timeout=60, what="the jobs to end")


def test_slurm_workers_with_the_preload_install_aimss_themselves(slurm, tmp_path):
    """``worker_extra_args=["--preload", "aimss_dask.preload"]``: no register_plugin call at all."""
    with _cluster(tmp_path, worker_extra_args=["--preload", "aimss_dask.preload"]) as cluster, Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=JOBS_UP)
        wait_until(lambda: len(aimss_dask.status()) == 2, timeout=60, what="AIMSS on both workers")
        s = aimss_dask.create_stream("preloaded", partitions=2)
        for i in range(50):
            s.write(i, partition=i % 2)
        s.seal()
        assert sorted(r for p in range(2) for r in s.read(partition=p)) == list(range(50))
        aimss_dask.destroy_stream("preloaded")
    wait_until(lambda: not _jobs(), timeout=60, what="the jobs to end")


def test_the_demo_runs_on_slurm(slurm, tmp_path):
    env = {**os.environ, "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(tmp_path / "logs")}
    r = subprocess.run(
        [sys.executable, "-m", "aimss_dask.cli", "demo", "--jobqueue", "slurm", "--workers", "2",
         "--interface", "lo", "--job-memory", "2GiB", "--records", "8", "--record-size", "64KiB",
         "--shuffle-size", "8MiB", "--sink-size", "8MiB", "--sink-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "verified" in r.stdout.splitlines()[-1], r.stdout[-2000:]
    deadline = time.monotonic() + 60
    while _jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _jobs()
