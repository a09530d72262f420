"""The README's examples work as written.

Every ``python`` block of README.md runs in a subprocess, in a temporary
working directory of its own (the blocks write ``out.zarr``, ``sim.zarr``...):

- a *script*, a block that defines every name it uses (the Quick start), runs
  exactly as pasted: ``python block.py``;
- a *fragment*, a block that uses names the README leaves to the reader
  (``df``, ``x``, ``step``...), runs after :data:`PRELUDE`, which makes them at
  small sizes (``AIMSS_README_ROWS`` rows) on a real ``LocalCluster`` with
  worker processes, as the README says in one sentence before the snippets.
  :data:`CHECKS` then asserts, in the same process, that the block did what
  the README says.

A block that cannot run here is named in :data:`SKIP` with the reason; every
other block runs, so a new block cannot escape. ``bash`` blocks are checked,
not run: the entry points, extras, modules, scripts and flags they name exist.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: Rows of the prelude's inputs: enough for several chunks per array and
#: partitions per frame, small enough that every block runs in seconds.
ROWS = os.environ.get("AIMSS_README_ROWS", "8192")

#: Seconds one block may take: a cluster start plus a few small computations.
BLOCK_TIMEOUT = 180

#: Blocks that cannot run here, by id (the heading above the block), with why.
SKIP: dict[str, str] = {
    "HPC: dask-jobqueue and clusters configured by files": (
        "SLURMCluster needs dask-jobqueue and a SLURM batch system (tests/test_slurm.py runs its like)"
    ),
    "Slurm and PBS, step by step": (
        "SLURMCluster needs a SLURM batch system and an ib0 interface (tests/test_slurm.py runs its like)"
    ),
}

#: What a fragment may use without defining it: exactly what PRELUDE makes.
PRELUDE_NAMES = frozenset({"np", "aimss_dask", "client", "df", "orders", "customers", "x", "step"})

#: Inputs the README's prelude sentence must name (the files too).
PRELUDE_INPUTS = ("df", "orders", "customers", "x", "train.zarr", "step", "client")

# Everything runs under the main guard: the workers are processes that import
# the main module, and must not start clusters of their own.
PRELUDE = """\
import os

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import zarr
from distributed import Client, LocalCluster

import aimss_dask

ROWS = int(os.environ["AIMSS_README_ROWS"])

if __name__ == "__main__":
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = Client(cluster)
    client.register_plugin(aimss_dask.AIMSS())
    rng = np.random.default_rng(0)
    x = da.random.default_rng(0).random((ROWS, 512), chunks=(1000, 512))
    df = dd.from_pandas(
        pd.DataFrame({"key": rng.integers(0, 100, ROWS), "value": rng.random(ROWS)}), npartitions=4
    )
    orders = dd.from_pandas(
        pd.DataFrame({"order_id": np.arange(ROWS), "customer_id": rng.integers(0, 200, ROWS)}),
        npartitions=4,
    )
    customers = dd.from_pandas(
        pd.DataFrame({"customer_id": np.arange(100), "name": [f"c{i}" for i in range(100)]}),
        npartitions=2,
    )
    TRAIN_ROWS = max(1, ROWS // 16)
    train_array = zarr.create_array("train.zarr", shape=(TRAIN_ROWS, 64), chunks=(64, 64), dtype="f4")
    train_array[:] = rng.random((TRAIN_ROWS, 64), dtype="f4")
    steps = []

    def step(batch):
        steps.append(batch.shape[0])

"""

# A fragment's cluster is closed before the interpreter exits, so a shutdown
# race cannot print a traceback that the test would take for the block's.
EPILOGUE = """
client.close()
cluster.close()
"""

#: Per block id: code run after the block, in its process, asserting what the README promises.
CHECKS: dict[str, str] = {
    "Shuffle, join and rechunk through streams": """
        assert out.npartitions == 64 and len(out) == len(df)
        assert sorted(out.compute()["value"]) == sorted(df.compute()["value"])
        assert len(joined) == len(orders)
        assert y.chunks[1] == (256, 256)
        np.testing.assert_array_equal(y.compute(), x.compute())
    """,
    "Zarr: sinks that never lose a write, sources that read ahead": """
        expected = x.compute()
        for path in ("out.zarr", "sharded.zarr"):
            np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], expected)
        assert zarr.open_array("sharded.zarr", mode="r").shards == (4096, 512)
    """,
    "For xarray: Datasets, DataArrays and named dimensions": """
        back = xr.open_zarr("ds.zarr")
        xr.testing.assert_identical(back.compute(), ds.compute())
        named = xr.open_zarr("named.zarr")
        assert named["temp"].dims == ("time", "x")
        np.testing.assert_array_equal(named["temp"].values, x.compute())
    """,
    "Streaming sink: a stream drained into a growing array, exactly once": """
        # The attributes as the README describes them (section "Streaming sink").
        sim = zarr.open_array("sim.zarr", mode="r")
        doc = sim.attrs["aimss"]
        records = stream.info()["records"]
        assert sum(records) == 16
        assert doc["offsets"] == {str(p): [n, 0] for p, n in enumerate(records)}, doc["offsets"]
        assert sum(run[4] for run in doc["layout"]) == sim.shape[0] == 16 * 1024
        positions = {p: (0, 0) for p in range(stream.partitions)}
        covered = []
        for p, offset, row, start, rows in doc["layout"]:
            # Each run continues its partition where its last run ended...
            assert (offset, row) == positions[p], (doc["layout"], positions)
            end = row + rows  # ...records are 1024 rows each
            positions[p] = (offset + end // 1024, end % 1024)
            covered.append((start, start + rows))
        # ... and the runs tile the array, each row from exactly one partition.
        covered.sort()
        assert covered[0][0] == 0 and covered[-1][1] == sim.shape[0]
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), covered
        assert positions == {p: (n, 0) for p, n in enumerate(records)}
    """,
    "Zarr sources: prefetching training loaders": """
        assert steps and max(steps) <= 64, steps
        assert sum(steps) == 3 * TRAIN_ROWS, steps
    """,
}


@dataclass(frozen=True)
class Block:
    id: str  # the heading above it, "#2" etc. for a second block under it
    lang: str
    code: str
    line: int  # of the opening fence, for messages


def readme_blocks() -> list[Block]:
    """The fenced code blocks of README.md, named by the heading above each."""
    blocks: list[Block] = []
    heading, count = "(top)", 0
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"#+\s+(.*)", line):
            heading, count = m.group(1).strip(), 0
        elif m := re.match(r"```(\w*)\s*$", line):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            count += 1
            bid = heading if count == 1 else f"{heading} #{count}"
            blocks.append(Block(bid, m.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1))
            i = end
        i += 1
    return blocks


def free_names(code: str) -> set[str]:
    """Names ``code`` reads but never binds (nor imports, nor gets from builtins).

    Scopes are not told apart: good enough to tell a README fragment from a script.
    """
    bound: set[str] = set()
    used: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return used - bound - set(dir(builtins))


PYTHON_BLOCKS = [b for b in readme_blocks() if b.lang == "python"]
BASH_BLOCKS = [b for b in readme_blocks() if b.lang == "bash"]


def run_python(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AIMSS_README_ROWS": ROWS, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, path.name], cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT
    )


# -- python blocks ----------------------------------------------------------------------------


def test_readme_has_its_blocks_and_skips_only_blocks_it_has():
    """A stale SKIP entry (its block renamed or gone) fails, as does a README without blocks."""
    ids = [b.id for b in PYTHON_BLOCKS]
    assert len(ids) == len(set(ids))
    assert "Quick start" in ids
    assert set(SKIP) <= set(ids), f"SKIP names blocks the README no longer has: {set(SKIP) - set(ids)}"
    assert set(CHECKS) <= set(ids), f"CHECKS names blocks the README no longer has: {set(CHECKS) - set(ids)}"
    assert set(ids) - set(SKIP), "every python block is skipped"


def test_readme_states_the_prelude():
    """The README's one sentence on the prelude names every input the prelude makes."""
    text = " ".join(README.read_text().split())
    m = re.search(r"The snippets below assume ([^;]*); `tests/test_readme.py` runs each of them with small data", text)
    assert m, "the README lost its sentence on what the snippets assume"
    for name in PRELUDE_INPUTS:
        assert f"`{name}`" in m.group(1), f"the prelude sentence does not name `{name}`"


#: Dask's own log of a worker whose heartbeat met a scheduler that closed
#: first, as a cluster shuts down: its traceback is Dask's, not the block's.
_SHUTDOWN_NOISE = re.compile(
    r"^\S+ \S+ - distributed\.worker - ERROR - Failed to communicate with scheduler during heartbeat\.\n"
    r"(?:(?!\d{4}-\d\d-\d\d ).*\n?)*",
    re.M,
)


def test_shutdown_noise_is_cut_and_nothing_else():
    log = (
        "2026-12-04 02:37:03,516 - distributed.worker - ERROR - Failed to communicate with scheduler during heartbeat.\n"
        "Traceback (most recent call last):\n  File ...\nCommClosedError: Stream is closed\n"
        "2026-12-04 02:37:04,000 - aimss_dask - ERROR - boom\nTraceback (most recent call last):\n"
    )
    assert _SHUTDOWN_NOISE.sub("", log) == (
        "2026-12-04 02:37:04,000 - aimss_dask - ERROR - boom\nTraceback (most recent call last):\n"
    )


def block_script(block: Block) -> str:
    """What runs for ``block``: itself as pasted, or the prelude, the block, its check and the epilogue."""
    free = free_names(block.code)
    if not free:
        return block.code  # self-contained: exactly as pasted
    unknown = free - PRELUDE_NAMES
    assert not unknown, (
        f"README block {block.id!r} (line {block.line}) uses {sorted(unknown)}, which neither it "
        "nor the prelude defines: define them in PRELUDE and name them in the README's prelude sentence"
    )
    check = textwrap.dedent(CHECKS.get(block.id, ""))
    return PRELUDE + textwrap.indent(block.code + check + EPILOGUE, "    ")


#: Blocks run at once, each in its own processes and folder: a block's
#: cluster mostly waits (process starts, its few tasks), so two overlap well.
BLOCKS_AT_ONCE = 2


@pytest.fixture(scope="module")
def block_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Block id -> ``(script, future of its run)``, for the blocks this session runs, started in README order."""
    selected = {
        item.callspec.params["block"].id
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_python_block_runs" and hasattr(item, "callspec")
    }
    runs: dict[str, Any] = {}
    with ThreadPoolExecutor(BLOCKS_AT_ONCE) as pool:
        for block in PYTHON_BLOCKS:
            if block.id not in selected or block.id in SKIP:
                continue
            try:
                script = block_script(block)
            except AssertionError as e:
                runs[block.id] = (None, e)  # the block's test reports it
                continue
            folder = tmp_path_factory.mktemp("block")
            (folder / "block.py").write_text(script)
            runs[block.id] = (script, pool.submit(run_python, folder / "block.py", folder))
        yield runs
        for _, run in runs.values():
            if isinstance(run, Future):
                run.cancel()


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_block_runs(block: Block, block_runs: dict[str, Any]):
    if block.id in SKIP:
        pytest.skip(f"README block {block.id!r} (line {block.line}): {SKIP[block.id]}")
    script, run = block_runs[block.id]
    if isinstance(run, AssertionError):
        raise run
    r = run.result()
    report = f"README block {block.id!r} (line {block.line}):\n{script}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    assert r.returncode == 0, report
    assert "Traceback" not in _SHUTDOWN_NOISE.sub("", r.stderr), report


def test_streaming_sink_attributes_are_named_as_the_readme_says():
    """The paths the README gives are the ones CHECKS reads (and the sink writes)."""
    text = README.read_text()
    check = CHECKS["Streaming sink: a stream drained into a growing array, exactly once"]
    for key in ("offsets", "layout"):
        assert f'`attrs["aimss"]["{key}"]`' in text
        assert f'doc["{key}"]' in check
    assert 'doc = sim.attrs["aimss"]' in check


# -- bash blocks: checked, not run ------------------------------------------------------------


@functools.cache
def _help(*args: str) -> str:
    r = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def check_command(words: list[str], comment: str) -> None:
    """Assert that what one README shell command names exists; fail on a command we do not know."""
    prog = words[0].removeprefix(".venv/bin/")
    if words[:3] == ["python3", "-m", "venv"]:
        return
    if prog == "pip" and words[1] == "install":
        for spec in words[2:]:
            if spec == "-e":
                continue
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec)
            assert m, f"pip installs {spec!r}, not this project"
            for extra in (m.group(1) or "").split(","):
                assert not extra or extra in PYPROJECT["project"]["optional-dependencies"], f"no extra [{extra}]"
        return
    if prog == "python" and words[1:3] == ["-m", "pytest"]:
        assert importlib.util.find_spec("pytest")
        return
    if prog == "python" and words[1].startswith("benchmarks/"):
        script = ROOT / words[1]
        assert script.is_file(), f"{words[1]} does not exist"
        # Flags on the line and in its comment ("add --skew") must be the script's.
        flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", " ".join(words[2:]) + " " + comment))
        offered = set(re.findall(r"--[a-z][\w-]*", _help(str(script))))
        assert flags <= offered, f"{words[1]} has no {sorted(flags - offered)}"
        return
    if prog in PYPROJECT["project"]["scripts"]:
        module, _, func = PYPROJECT["project"]["scripts"][prog].partition(":")
        assert hasattr(importlib.import_module(module), func)
        assert (Path(sys.executable).parent / prog).exists(), f"{prog} is not installed in this environment"
        if len(words) > 1:
            _help("-m", module, words[1])  # the subcommand exists
        return
    if prog == "dask" and words[1] in ("scheduler", "worker"):
        assert (Path(sys.executable).parent / "dask").exists()
        preload = words[words.index("--preload") + 1]
        assert importlib.util.find_spec(preload), f"--preload {preload}: no such module"
        return
    raise AssertionError(f"no check for README command {' '.join(words)!r}: add one to check_command")


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=[f"{b.id} (line {b.line})" for b in BASH_BLOCKS])
def test_bash_block_names_what_exists(block: Block):
    checked = 0
    for line in block.code.splitlines():
        command, _, comment = line.partition("#")
        for part in command.split("&&"):
            if part.strip():
                check_command(shlex.split(part), comment)
                checked += 1
    assert checked, f"README bash block {block.id!r} has no command"
