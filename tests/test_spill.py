"""Past the memory budget, data spills to disk and reads back identical.

A real LocalCluster with worker processes and a small AIMSS budget; the
worker's RSS is sampled while it stores 4x its budget.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import psutil
import pytest
from conftest import spill_files
from distributed import Client, LocalCluster

import aimss_dask

BUDGET = 64 * 2**20
RECORD = 2**20  # 1 MiB arrays
LARGE = os.environ.get("AIMSS_TEST_LARGE") == "1"
PER_WORKER = (2048 if LARGE else 256) * 2**20


@pytest.fixture(scope="module")
def client():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS(memory_limit=BUDGET))
        yield c


def _rss() -> int:
    return psutil.Process().memory_info().rss


class _RSSSampler:
    """Samples this worker's RSS every 20 ms in a thread, keeps the peak."""

    def __init__(self) -> None:
        self.peak = _rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, _rss())


def _start_sampler(dask_worker) -> int:
    dask_worker._aimss_test_sampler = _RSSSampler()
    return _rss()


def _stop_sampler(dask_worker) -> int:
    s = dask_worker._aimss_test_sampler
    s.stop.set()
    s.thread.join()
    return s.peak


def _produce(name: str, seed: int, n: int) -> float:
    rng = np.random.default_rng(seed)
    total = 0.0
    for i in range(n):
        a = rng.random(RECORD // 8)
        a[0] = seed * 100_000 + i
        total += float(a.sum())
        aimss_dask.write_to(name, a, key=(seed, i))
    aimss_dask.get_stream(name).flush()
    return total


def _consume(records) -> tuple[int, float, list[float]]:
    n, total, tags = 0, 0.0, []
    for a in records:
        assert not a.flags.writeable
        n += 1
        total += float(a.sum())
        tags.append(float(a[0]))
    return n, total, tags


def test_spills_past_budget_and_reads_back_identical(client):
    name = "spill-test"
    stream = aimss_dask.create_stream(name, partitions=4)
    base = client.run(_start_sampler)
    producers = 8
    per_producer = 2 * PER_WORKER // RECORD // producers
    try:
        sums = client.gather(
            client.map(_produce, [name] * producers, range(producers), [per_producer] * producers, pure=False)
        )
        stream.seal()
        info = stream.info()
        st = aimss_dask.status()
        results = client.gather(stream.map_partitions(_consume))
        peaks = client.run(_stop_sampler)
    finally:
        aimss_dask.destroy_stream(name)

    n = sum(r[0] for r in results)
    assert n == producers * per_producer
    tags = sorted(t for r in results for t in r[2])
    assert tags == sorted(float(s * 100_000 + i) for s in range(producers) for i in range(per_producer))
    assert sum(r[1] for r in results) == pytest.approx(sum(sums), rel=1e-12)

    written = n * RECORD
    print(
        f"wrote {written >> 20} MiB, spilled {info['spilled_bytes'] >> 20} MiB; "
        + "; ".join(
            f"{a}: peak log {st[a]['peak_memory'] >> 20} MiB, RSS +{(peaks[a] - base[a]) >> 20} MiB"
            for a in st
        )
    )
    assert info["spilled_bytes"] > written // 2, info
    for addr, ws in st.items():
        # The log never holds more than its budget plus the batch in hand.
        assert ws["peak_memory"] <= BUDGET + 8 * 2**20, (addr, ws)
        assert ws["memory_bytes"] <= BUDGET, (addr, ws)
        # RSS stays bounded: far below what the worker stored.
        growth = peaks[addr] - base[addr]
        assert growth < PER_WORKER * 0.75, (addr, growth / 2**20)

    # Destroy freed memory and removed the spill files.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = aimss_dask.status()
        if all(ws["memory_bytes"] == 0 and ws["spilled_bytes"] == 0 for ws in st.values()):
            break
        time.sleep(0.1)
    for ws in st.values():
        assert ws["memory_bytes"] == 0 and ws["spilled_bytes"] == 0
        d = ws["spill_directory"]
        assert spill_files(d) == []


# -- several workers, one spill_directory ----------------------------------------------


def _write_tagged(name: str, partition: int, n: int) -> int:
    for i in range(n):
        aimss_dask.write_to(name, np.full(64 * 1024 // 8, partition * 10_000 + i, dtype="i8"), partition=partition)
    return n


def _tags(records) -> list[int]:
    out = []
    for r in records:
        assert np.all(r == r[0]), "a record came back mixed"
        out.append(int(r[0]))
    return out


def _spill_files(dask_worker) -> list[str]:
    d = dask_worker.plugins["aimss"].store.spill_dir
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_workers_sharing_a_spill_directory_read_back_exactly_their_own_records(tmp_path):
    """The README's HPC set-up: every worker of a node given one folder. Each
    spills into a folder of its own, every partition reads back exactly its
    records, and a user's file in the folder survives the cluster."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "results.csv").write_text("the user's own data\n")
    parts, per_part = 6, 96  # 36 MiB of 64 KiB records on 3 workers of 4 MiB budgets
    with LocalCluster(
        n_workers=3, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as c:
        c.register_plugin(
            aimss_dask.AIMSS(memory_limit="4MiB", segment_size="256KiB", spill_directory=str(scratch))
        )
        stream = aimss_dask.create_stream("tagged", partitions=parts)
        c.gather(c.map(_write_tagged, ["tagged"] * parts, range(parts), [per_part] * parts))
        stream.seal()
        st = aimss_dask.status()
        dirs = [w["spill_directory"] for w in st.values()]
        assert len(set(dirs)) == 3 and all(os.path.dirname(d) == str(scratch) for d in dirs)
        assert all(w["spilled_bytes"] > 0 for w in st.values())
        files = c.run(_spill_files)
        # The same file names on every worker: only their folders keep them apart.
        assert len(set.intersection(*(set(f) for f in files.values()))) > 0
        got = c.gather(stream.map_partitions(_tags))
        assert got == [[p * 10_000 + i for i in range(per_part)] for p in range(parts)]
        aimss_dask.destroy_stream("tagged")
    # Shut down: each worker removed its own folder and nothing else.
    assert sorted(os.listdir(scratch)) == ["results.csv"]
    assert (scratch / "results.csv").read_text() == "the user's own data\n"


# -- a spill folder that cannot be written ----------------------------------------------


def _block_spill(dask_worker) -> str:
    """Put a file where the worker's spill folder is: every spill fails (ENOTDIR), as on a full disk."""
    store = dask_worker.plugins["aimss"].store
    d = store.prepare_spill_dir()
    os.rename(d, d + ".aside")
    open(d, "w").close()
    return d


def _unblock_spill(dask_worker) -> None:
    from aimss_dask.log import store as store_mod

    store_mod.SPILL_RETRY = 0.0  # segments that failed are tried again at once
    d = dask_worker.plugins["aimss"].store.spill_dir
    os.unlink(d)
    os.rename(d + ".aside", d)


def test_a_worker_that_cannot_spill_refuses_writes_before_storing_them_and_loses_nothing(client):
    """Past its budget with its spill folder unwritable, an owner refuses new writes with SpillError before
    storing anything of them: what it holds is a prefix of what was written, each record once, and writing
    the refused ones again once the folder is back gives every record exactly once, in order."""
    name = "cannot-spill"
    stream = aimss_dask.create_stream(name, partitions=1)
    owner = stream.info()["owners"][0]
    n = 2 * BUDGET // RECORD
    blocked = False
    try:
        client.run(_block_spill, workers=[owner])
        blocked = True
        refused = None
        for i in range(n):
            try:
                stream.write(np.full(RECORD // 8, float(i)), partition=0)
                if i % 8 == 7:
                    stream.flush()
            except aimss_dask.SpillError as e:
                refused = (i, e)
                break
        assert refused is not None, "the owner stored twice its budget without spilling"
        assert "past its budget" in str(refused[1]) and "were not stored" in str(refused[1])
        st = aimss_dask.status()[owner]
        assert BUDGET < st["memory_bytes"] <= BUDGET + 16 * RECORD, st["memory_bytes"]
        held = stream.info()["records"][0]
        assert held <= refused[0] + 1
        client.run(_unblock_spill, workers=[owner])
        blocked = False
        for i in range(held, n):
            stream.write(np.full(RECORD // 8, float(i)), partition=0)
        stream.flush()
        stream.seal()
        tags = client.gather(stream.map_partitions(lambda rs: [float(r[0]) for r in rs]))[0]
        assert tags == [float(i) for i in range(n)]
        assert aimss_dask.status()[owner]["spilled_bytes"] > 0
    finally:
        if blocked:
            client.run(_unblock_spill, workers=[owner])
        aimss_dask.destroy_stream(name)
