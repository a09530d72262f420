"""The front doors: the CLI demo, the preload, lazy GPU imports."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import distributed
import numpy as np
import pytest
from distributed import Client, LocalCluster

import aimss_dask
from aimss_dask import cli
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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One small real demo on a built-in LocalCluster, shared by the tests that read its output."""
    sink_dir = tmp_path_factory.mktemp("sink")
    r = _cli(
        "demo", "--producers", "3", "--records", "10", "--record-size", "64KiB", "--shuffle-size", "4MiB",
        "--sink-size", "4MiB", "--sink-dir", str(sink_dir), "--partitions", "3",
    )
    return r, sink_dir


def test_demo_runs_on_a_builtin_local_cluster(demo_run):
    r, sink_dir = demo_run
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
    assert list(sink_dir.iterdir()) == []


def test_partitions_reach_the_shuffle(demo_run):
    r, _ = demo_run
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 partitions on 2 workers" in r.stdout  # the stream stage
    assert "(74880 rows, 32 -> 3 partitions)" in r.stdout
    # Counted from the computed output, one line per method: 3 partitions, no row lost.
    made = re.findall(r"^  (aimss|dask p2p) .* (\d+) output partitions, (\d+) rows: verified$", r.stdout, re.M)
    assert made == [("aimss", "3", "74880"), ("dask p2p", "3", "74880")]


def test_demo_ends_with_a_summary(demo_run):
    r, _ = demo_run
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    t = r"\d+\.\d\d s"
    assert re.fullmatch(
        rf"summary: stream: 30 records in {t}; "
        rf"shuffle: aimss {t} vs Dask p2p {t}, aimss \d+\.\dx (faster|slower); "
        rf"sink: aimss {t} vs Dask to_zarr {t}, aimss \d+\.\dx (faster|slower); "
        r"all outputs verified",
        last,
    ), last


def test_demo_output_has_no_dask_shuffle_warnings(demo_run):
    r, _ = demo_run
    assert r.returncode == 0, r.stdout + r.stderr
    noisy = [
        line for line in (r.stdout + r.stderr).splitlines()
        if "distributed.shuffle" in line or "WARNING" in line
    ]
    assert noisy == []


def test_summary_names_what_failed():
    stream = {"ok": True, "records": 30, "seconds": 0.5}
    shuffle = cli.Comparison("shuffle", "Dask p2p", 1.0, 2.5, failed=("dask p2p",))
    sink = cli.Comparison("sink", "Dask to_zarr", 2.0, 0.5, failed=())
    line, ok = cli.summary(stream, [shuffle, sink])
    assert not ok
    assert line == (
        "summary: stream: 30 records in 0.50 s; "
        "shuffle: aimss 1.00 s vs Dask p2p 2.50 s, aimss 2.5x faster; "
        "sink: aimss 2.00 s vs Dask to_zarr 0.50 s, aimss 4.0x slower; "
        "verification FAILED: shuffle (dask p2p)"
    )
    line, ok = cli.summary({**stream, "ok": False}, [])
    assert not ok and line.endswith("verification FAILED: stream (records lost or changed)")


def _help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_is_plain_text_and_describes_the_demo(capsys):
    top = _help(capsys)
    demo = _help(capsys, "demo")
    for text in (top, demo):
        assert "``" not in text  # RST markup is for the docs, not the terminal
    assert "aimss-dask demo --help" in top
    flat = " ".join(demo.split())
    for what in ("stream", "aimss_dask.shuffle", "p2p shuffle", "aimss_dask.to_zarr", "dask.array.to_zarr", "verif"):
        assert what in flat, what
    # Every option has help; the sized and counted ones give their default.
    options = dict(re.findall(r"^  (--[\w-]+)(.*?)(?=^  -|\Z)", demo, re.M | re.S))
    for opt in ("--scheduler", "--workers", "--producers", "--records", "--record-size", "--partitions",
                "--shuffle-size", "--sink-size", "--sink-dir"):
        assert "default" in options[opt], (opt, options[opt])
    assert "(default: 1MiB)" in " ".join(options["--record-size"].split())
    assert "shuffle" in options["--partitions"]  # it applies to both stages


def test_version_prints_the_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"aimss-dask {aimss_dask.__version__}"


def _no_cluster(*args, **kwargs):
    raise AssertionError("a bad value reached the cluster")


@pytest.mark.parametrize(
    "option, value, why",
    [
        ("--record-size", "banana", "is not a size"),
        ("--shuffle-size", "lots", "is not a size"),
        ("--record-size", "4", "at least 8"),
        ("--sink-dir", "/nonexistent", "does not exist"),
        ("--sink-dir", __file__, "is not a directory"),
        ("--workers", "0", "at least 1"),
        ("--producers", "two", "is not a whole number"),
        ("--partitions", "0", "at least 1"),
    ],
)
def test_bad_values_are_usage_errors(monkeypatch, capsys, option, value, why):
    # Refused before any cluster starts: starting one fails the test at once.
    monkeypatch.setattr(distributed, "LocalCluster", _no_cluster)
    monkeypatch.setattr(distributed, "Client", _no_cluster)
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: aimss-dask demo")
    assert f"argument {option}: {value!r} " in err and why in err, err
    assert "Traceback" not in err


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



def test_import_leaves_the_array_and_frame_stacks_to_the_operators_that_use_them():
    """Every worker imports aimss_dask when the plugin reaches it (at start, and after each restart):
    pandas, dask.array/dataframe, xarray and zarr load only when an operator needs them."""
    heavy = ("pandas", "dask.array", "dask.dataframe", "xarray", "zarr")
    code = (
        "import sys, aimss_dask, aimss_dask.node.plugin, aimss_dask.shuffle._tasks; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
    # ...and the operators still find them.
    code = "import aimss_dask, dask.array as da; print(aimss_dask.rechunk(da.ones((4, 4), chunks=(1, 4)), (4, 1)).chunks)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == "((4,), (1, 1, 1, 1))", (r.stdout, r.stderr)


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
