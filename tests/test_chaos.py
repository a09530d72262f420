"""Chaos: shuffles and rechunks while workers are SIGKILLed at random, and segfault.

Every run must finish with the exact result, without a hang, and leave no
stream and no log memory behind once its result is in. Nannies restart the
killed workers. CI runs a few of each; ``AIMSS_TEST_LARGE=1`` runs the
issue's 50 shuffles and 30 rechunks.
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import tempfile
import threading
import time

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import wait_until
from distributed import Client, LocalCluster
from distributed.chaos import KillWorker

import aimss_dask
from aimss_dask._compat import listed_workers

LARGE = os.environ.get("AIMSS_TEST_LARGE") == "1"
SHUFFLES = int(os.environ.get("AIMSS_CHAOS_SHUFFLES", 50 if LARGE else 2))
RECHUNKS = int(os.environ.get("AIMSS_CHAOS_RECHUNKS", 30 if LARGE else 1))
PARTS = 16
ROWS = 40_000
RUN_TIMEOUT = 120  # s: a run that takes longer has hung


def _frame(i: int) -> pd.DataFrame:
    rng = np.random.default_rng(i)
    return pd.DataFrame({"key": rng.integers(0, 1 << 40, ROWS), "v": rng.random(ROWS)})


def _check_partition(df: pd.DataFrame, npartitions: int) -> pd.DataFrame:
    return pd.DataFrame({"rows": [len(df)], "keys": [int(df["key"].sum() % (1 << 61))]})


def _killer(client: Client, stop: threading.Event, rng: random.Random, kills: list[str], within: float) -> None:
    """SIGKILL one random worker at a random time within ``within`` seconds, once per run.

    Callers give half a run's undisturbed time (timed cold, once): later,
    warm runs are faster, and a kill after the result proves nothing.
    """
    time.sleep(rng.uniform(0.02, within))
    if stop.is_set():
        return
    try:
        pids = client.run(os.getpid)
    except Exception:
        return
    if not pids:
        return
    victim = rng.choice(sorted(pids))
    try:
        os.kill(pids[victim], signal.SIGKILL)
        kills.append(victim)
    except ProcessLookupError:
        pass


def _stuck(client: Client) -> str:
    """What the scheduler and the workers say of every unfinished task: for a hang's report."""

    def on_scheduler(dask_scheduler):
        return {
            str(ts.key): (ts.state, ts.processing_on.address if ts.processing_on else None,
                          sorted(ts.worker_restrictions or ()))
            for ts in dask_scheduler.tasks.values()
            if ts.state not in ("memory", "released", "forgotten")
        }

    def on_worker(dask_worker):
        return {str(k): (ts.state, getattr(ts, "run_id", None)) for k, ts in dask_worker.state.tasks.items()
                if ts.state != "memory" or "aimss" in str(k)}

    def stacks() -> str:
        # Where aimss threads wait: what a hang's report needs most.
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(f, all_threads=True)
            f.seek(0)
            threads = f.read().split("\n\n")
        return "\n\n".join(t for t in threads if "aimss_dask" in t)

    try:
        return (
            f"scheduler: {client.run_on_scheduler(on_scheduler)}\nworkers: {client.run(on_worker)}\n"
            f"aimss: {aimss_dask.status().runs}\n"
            + "\n".join(f"=== threads of {w}:\n{s}" for w, s in client.run(stacks).items())
        )
    except Exception as e:  # the report must not hide the hang
        return f"(no report: {e!r})"


def _shuffle(replication: int = 1):
    df = dd.from_map(_frame, range(PARTS), meta=_frame(0).iloc[:0])
    out = aimss_dask.shuffle(df, "key", npartitions=PARTS, replication=replication)
    return out.map_partitions(_check_partition, PARTS, meta=pd.DataFrame({"rows": [0], "keys": [0]}))


def _rechunk(x: np.ndarray, replication: int = 1):
    return aimss_dask.rechunk(da.from_array(x, chunks=(250, 1000)), (2000, 125), replication=replication)


def _spill_folders(client: Client) -> set[str]:
    """Every folder in the workers' spill roots (other clusters' included)."""
    roots = {os.path.dirname(w["spill_directory"]) for w in aimss_dask.status().values() if w.get("spill_directory")}
    return {os.path.join(r, n) for r in roots if os.path.isdir(r) for n in os.listdir(r)}


def _clean(client: Client, before: set[str] = frozenset()) -> bool:
    """No stream, no log memory, and no new spill folder but the live workers' own (dead ones' were taken over).

    ``before``: the folders there before the test (other tests' clusters).
    """
    st = aimss_dask.status()
    if not st or any(w["streams"] or w["memory_bytes"] for w in st.values()):
        return False
    own = {w["spill_directory"] for w in st.values() if w.get("spill_directory")}
    return _spill_folders(client) - before <= own


def _allow_failures(n: int, dask_scheduler=None) -> None:
    dask_scheduler.allowed_failures = n


@pytest.fixture
def chaos_cluster():
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "600s"}), LocalCluster(
        n_workers=3, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        # A small log budget: the runs spill, so that killed workers leave
        # spill folders behind, which must not outlive them.
        client.register_plugin(aimss_dask.AIMSS(memory_limit="4MiB", segment_size="256KiB"))
        yield client


def _run_with_a_kill(client: Client, make, want, rng: random.Random, within: float) -> list[str]:
    stop = threading.Event()
    kills: list[str] = []
    t = threading.Thread(target=_killer, args=(client, stop, rng, kills, within), daemon=True)
    t.start()
    try:
        fut = client.compute(make())
        try:
            got = fut.result(timeout=RUN_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"hung after killing {kills}:\n{_stuck(client)}")
    finally:
        stop.set()
        t.join()
    want(got)
    return kills


@pytest.mark.slow
@pytest.mark.timeout(1800 if LARGE else 300)  # the 80 runs take about 5 minutes
@pytest.mark.parametrize("replication", [1, 2])
def test_chaos_shuffles_and_rechunks_finish_exactly(chaos_cluster, replication):
    """With one copy, runs re-create what a kill took; with two, copies take over."""
    client = chaos_cluster
    rng = random.Random(int(os.environ.get("AIMSS_CHAOS_SEED", "0")) or None)
    frames = pd.concat([_frame(i) for i in range(PARTS)])
    want_rows, want_keys = len(frames), int(frames["key"].sum() % (1 << 61))
    x = np.arange(2000 * 1000, dtype="float64").reshape(2000, 1000)
    before = _spill_folders(client)
    total_kills = 0
    # How long each kind takes undisturbed: kills land within that time.
    took = {}
    for kind, make in (("shuffle", lambda: _shuffle(replication)), ("rechunk", lambda: _rechunk(x, replication))):
        t0 = time.monotonic()
        client.compute(make()).result(timeout=RUN_TIMEOUT)
        took[kind] = time.monotonic() - t0
    order = ["shuffle"] * SHUFFLES + ["rechunk"] * RECHUNKS
    rng.shuffle(order)
    for i, kind in enumerate(order):
        wait_until(lambda: len(listed_workers(client)) == 3, timeout=60, what="3 workers back")
        if kind == "shuffle":
            def make():
                return _shuffle(replication)

            def want(got: pd.DataFrame) -> None:
                assert int(got["rows"].sum()) == want_rows, f"run {i}: rows {got['rows'].sum()} != {want_rows}"
                assert int(got["keys"].sum()) % (1 << 61) == want_keys, f"run {i}: key sum differs"
        else:
            def make():
                return _rechunk(x, replication)

            def want(got: np.ndarray) -> None:
                np.testing.assert_array_equal(got, x, err_msg=f"run {i}")

        kills = _run_with_a_kill(client, make, want, rng, took[kind] / 2)
        total_kills += len(kills)
        try:
            wait_until(lambda: _clean(client, before), timeout=60)
        except AssertionError:
            st = aimss_dask.status()
            pytest.fail(
                f"run {i} ({kind}) left data behind after killing {kills}: "
                f"{ {a: (w['streams'], w['memory_bytes']) for a, w in st.items()} }; "
                f"coordinator streams {st.streams}, runs {st.runs}"
            )
    assert total_kills >= len(order) // 2, "the killer hardly ever fired: the test proved nothing"


def test_chaos_segfaulting_workers(chaos_cluster):
    """Dask's own KillWorker plugin (segfault) on top of the runs."""
    client = chaos_cluster
    # Every worker dies after ~4 s on average: a task of a second or more
    # (a seal waits for every push) now and then dies on 4 workers in a row,
    # and Dask's default of 3 allowed failures would fail the run for that
    # (KilledWorker: its policy, not a wrong or hung run).
    client.run_on_scheduler(_allow_failures, 20)
    client.register_plugin(KillWorker(delay="4s", mode="segfault"))
    frames = pd.concat([_frame(i) for i in range(PARTS)])
    for i in range(3 if not LARGE else 20):
        df = dd.from_map(_frame, range(PARTS), meta=_frame(0).iloc[:0])
        out = aimss_dask.shuffle(df, "key", npartitions=PARTS)
        got = client.compute(
            out.map_partitions(_check_partition, PARTS, meta=pd.DataFrame({"rows": [0], "keys": [0]}))
        ).result(timeout=RUN_TIMEOUT)
        assert int(got["rows"].sum()) == len(frames)
        assert int(got["keys"].sum()) % (1 << 61) == int(frames["key"].sum() % (1 << 61))
