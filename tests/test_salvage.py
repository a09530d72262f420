"""Single copy (issue 19, item 4.1): a partition whose owner was killed comes back from the spill files it left.

Unit tests of the pure parts (which folders are a dead worker's, which
files chain, what a rebuilt log answers), then real worker processes
SIGKILLed: a sibling on the node rebuilds the partition at once, and a
lone worker's nanny brings back a worker that does it as it starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from conftest import wait_until
from dask.utils import format_bytes
from distributed import Client, LocalCluster

import aimss_dask
from aimss_dask import cli
from aimss_dask._compat import listed_workers
from aimss_dask.core.errors import (
    InvalidOffsetError,
    PartitionLostError,
    SpillCorruptionError,
    StreamNotFoundError,
)
from aimss_dask.log import salvage, spillfile
from aimss_dask.log.store import LogStore

MiB = 2**20


# -- spill files read back by another process -----------------------------------------


def test_a_spill_file_rebuilds_its_own_index_and_every_record_is_checked(tmp_path):
    seg = spillfile.SegmentId("s", 4, 2, 30)
    records = [np.arange(n, dtype="f8") for n in (3, 0, 1000)] + [b"tail"]
    path = str(tmp_path / "segment-0.bin")
    written = spillfile.dump(records, path, seg)
    got_seg, index = spillfile.read_index(path)
    assert got_seg == seg and index == written
    spillfile.verify(path, seg, index, chunk=64)  # several reads, records split across none
    out = spillfile.load(path, seg, index, 0, 4)
    assert [np.array_equal(a, b) for a, b in zip(out[:3], records[:3])] == [True] * 3 and out[3] == b"tail"
    # One flipped bit in the third record: named by its offset.
    with open(path, "r+b") as f:
        f.seek(index.data_start + index.spans[2][0] + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(SpillCorruptionError, match="offset 32"):
        spillfile.verify(path, seg, index)
    # Cut short: the header no longer matches the size.
    with open(path, "r+b") as f:
        f.truncate(index.data_start + 10)
    with pytest.raises(SpillCorruptionError, match="cut short"):
        spillfile.read_index(path)
    (tmp_path / "junk.bin").write_bytes(b"not a segment")
    with pytest.raises(SpillCorruptionError, match="not a readable"):
        spillfile.read_index(str(tmp_path / "junk.bin"))


def _folder(root, name: str, owner: dict | None) -> str:
    folder = os.path.join(root, name)
    os.mkdir(folder)
    if owner is not None:
        with open(os.path.join(folder, salvage.OWNER_FILE), "w") as f:
            json.dump(owner, f)
    return folder


def test_only_folders_of_that_worker_on_this_host_whose_process_is_gone_are_orphans(tmp_path):
    host = socket.gethostname()
    dead, live = 999_999_991, os.getpid() + 0  # the test's own pid never counts as dead
    w = "tcp://127.0.0.1:4000"
    mine = _folder(tmp_path, "a", {"host": host, "pid": dead, "worker": w})
    _folder(tmp_path, "b", {"host": host, "pid": live, "worker": w})  # a live process: never
    _folder(tmp_path, "c", {"host": host, "pid": dead, "worker": "tcp://127.0.0.1:4001"})  # another worker
    _folder(tmp_path, "d", {"host": host + "-other", "pid": dead, "worker": w})  # another node's
    _folder(tmp_path, "e", None)  # not a store's folder
    (tmp_path / "f").write_text("a file, not a folder")
    assert salvage.orphans(str(tmp_path), w, alive=lambda pid: pid != dead) == [mine]
    assert salvage.orphans(str(tmp_path / "missing"), w) == []


def test_clean_spill_lists_then_removes_only_what_dead_workers_on_this_host_left(tmp_path, capsys):
    """``aimss-dask clean-spill``: lists by default; ``--remove`` removes only aimss's files of dead processes."""
    host = socket.gethostname()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = child.pid  # a process that ran here and is gone
    gone = _folder(tmp_path, "gone", {"host": host, "pid": dead, "worker": "tcp://127.0.0.1:4000"})
    with open(os.path.join(gone, "segment-0.bin"), "wb") as f:
        f.write(b"x" * 1000)
    odd = _folder(tmp_path, "odd", {"host": host, "pid": dead, "worker": "tcp://127.0.0.1:4001"})
    with open(os.path.join(odd, "segment-3.bin"), "wb") as f:
        f.write(b"y")
    with open(os.path.join(odd, "notes.txt"), "w") as f:
        f.write("the user's")
    live = _folder(tmp_path, "live", {"host": host, "pid": os.getppid(), "worker": "tcp://127.0.0.1:4002"})
    with open(os.path.join(live, "segment-0.bin"), "wb") as f:
        f.write(b"z")
    other = _folder(tmp_path, "other", {"host": host + "-other", "pid": dead, "worker": "tcp://127.0.0.1:4003"})
    plain = _folder(tmp_path, "plain", None)

    assert cli.main(["clean-spill", "--directory", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    size = format_bytes(sum(os.path.getsize(os.path.join(gone, n)) for n in os.listdir(gone)))
    assert f"{gone}  {size}  (worker tcp://127.0.0.1:4000, pid {dead})" in out
    assert odd in out and "2 folder(s); run again with --remove" in out
    assert live not in out and other not in out and plain not in out
    assert os.path.exists(os.path.join(gone, "segment-0.bin"))  # listing removes nothing

    assert cli.main(["clean-spill", "--directory", str(tmp_path), "--remove"]) == 1  # one kept
    out = capsys.readouterr().out
    assert f"removed {gone}" in out and f"kept {odd}: it holds files aimss did not write" in out
    assert not os.path.exists(gone)
    assert os.listdir(odd) == ["notes.txt"]
    assert sorted(os.listdir(live)) == [salvage.OWNER_FILE, "segment-0.bin"]
    assert os.path.isdir(other) and os.path.isdir(plain)
    assert cli.main(["clean-spill", "--directory", str(tmp_path)]) == 0
    assert "no spill folder of a dead worker" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["clean-spill", "--directory", str(tmp_path / "missing")])
    assert e.value.code == 2
    assert "is not a directory" in capsys.readouterr().err


def test_a_killed_process_not_yet_reaped_by_its_parent_is_dead():
    """A nanny reaps its killed worker a moment later: the zombie's files are free at once."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert salvage.pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while salvage.pid_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not salvage.pid_alive(child.pid)
        assert child.poll() is not None  # reaped only now
    finally:
        child.kill()
        child.wait()


def _found(tmp_path, seg: spillfile.SegmentId, n: int) -> salvage.Found:
    path = str(tmp_path / f"segment-{seg.epoch}{seg.partition}{seg.base}.bin")
    index = spillfile.dump([np.full(4, seg.base + i) for i in range(n)], path, seg)
    return salvage.Found(path, seg, index)


def test_a_chain_starts_at_the_offset_needed_and_stops_at_a_hole_or_a_bad_file(tmp_path):
    files = [_found(tmp_path, spillfile.SegmentId("s", 5, 0, b), 10) for b in (0, 10, 20, 40)]
    other = _found(tmp_path, spillfile.SegmentId("s", 5, 1, 0), 10)
    older = _found(tmp_path, spillfile.SegmentId("s", 2, 0, 30), 10)  # another stream of the name
    found = salvage.scan(str(tmp_path))
    assert sorted(f.path for f in found) == sorted(f.path for f in [*files, other, older])
    got = salvage.chain(found, "s", 0, (4, 6), need=13)
    assert [f.seg.base for f in got] == [10, 20]  # 30-39 was in memory: a hole
    assert salvage.chain(found, "s", 0, (4, 6), need=35) == []
    assert [f.seg.base for f in salvage.chain(found, "s", 0, (2, 6), need=25)] == [20, 30, 40]
    # A flipped bit in the second file: the chain ends before it.
    with open(files[1].path, "r+b") as f:
        f.seek(-1, 2)
        b = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    assert [f.seg.base for f in salvage.verified(salvage.chain(found, "s", 0, (4, 6), need=0))] == [0]


def test_a_rebuilt_log_reads_to_its_end_then_names_what_is_lost(tmp_path):
    dead = tmp_path / "dead"
    dead.mkdir()
    files = [_found(dead, spillfile.SegmentId("s", 5, 0, b), 10) for b in (0, 10)]
    (dead / "notes.txt").write_text("someone else's")
    store = LogStore(budget=MiB, spill_root=str(tmp_path / "root"), owner={"worker": "me"})
    store.open("s", 7, [0], starts={0: 4}, since=5)
    assert store.adopt("s", 7, 0, 4, files, upto=26) == 20
    # The files moved into this store's own folder; they count as spilled.
    assert not any(os.path.exists(f.path) for f in files)
    assert sorted(os.listdir(store.spill_dir)) == [salvage.OWNER_FILE, "segment-0.bin", "segment-1.bin"]
    assert store.stats()["spilled_bytes"] > 0 and store.memory_bytes == 0
    got, sealed, end = store.read("s", 7, 0, 4, max_bytes=10**9)
    assert [int(r[0]) for r in got] == list(range(4, 20)) and sealed and end == 20
    with pytest.raises(InvalidOffsetError, match="trimmed"):
        store.read("s", 7, 0, 3)
    # At its end: the records that died with the worker, by offsets, never a quiet end.
    with pytest.raises(PartitionLostError, match="20 to offset 25") as lost:
        store.read("s", 7, 0, 20)
    assert lost.value.lost == {0: (20, 26)}
    with pytest.raises(PartitionLostError):
        store.append("s", 7, 0, [b"x"], [1])
    # Rebuilt up to the end the owner had: no gap.
    store.open("t", 7, [0])
    more = [_found(dead, spillfile.SegmentId("t", 7, 0, 0), 3)]
    store.adopt("t", 7, 0, 0, more, upto=3)
    assert store.read("t", 7, 0, 3) == ([], True, 3)
    # The dead folder goes, but not a file aimss did not write.
    assert not salvage.discard(str(dead)) and os.listdir(dead) == ["notes.txt"]
    store.close()
    assert not os.path.exists(store.spill_dir)


def test_files_taken_over_for_a_stream_destroyed_meanwhile_are_removed_not_leaked(tmp_path):
    """The stream went between the take-over's open and its adopt: the files already moved into this
    store's folder are its own now, and go; the folder closes clean (no "files aimss did not write")."""
    dead = tmp_path / "dead"
    dead.mkdir()
    files = [_found(dead, spillfile.SegmentId("s", 5, 0, 0), 4)]
    store = LogStore(budget=MiB, spill_root=str(tmp_path / "root"), owner={"worker": "me"})
    store.open("s", 7, [0], since=5)
    store.tombstone("s", 7)
    store.drop("s")
    with pytest.raises(StreamNotFoundError):
        store.adopt("s", 7, 0, 0, files, upto=4)
    assert sorted(os.listdir(store.spill_dir)) == [salvage.OWNER_FILE]
    store.close()
    assert not os.path.exists(store.spill_dir)
    # A closed store takes nothing over (nor makes its folder again).
    more = [_found(dead, spillfile.SegmentId("s", 5, 0, 0), 4)]
    with pytest.raises(StreamNotFoundError, match="closed"):
        store.adopt("s", 7, 0, 0, more, upto=4)
    assert os.path.exists(more[0].path) and not os.path.exists(store.spill_dir)


def test_two_dead_workers_salvaged_at_once_onto_one_worker_both_come_back():
    """A node lost two workers, each the only owner of a partition of one stream; a new worker there takes
    both folders over at once. The second commit finds the stream changed by the first: it goes on the
    stream as it is now (its partition is still lost where it was), instead of dropping the whole stream
    on that worker, what the first salvage had just rebuilt included."""
    import asyncio
    from types import SimpleNamespace

    from aimss_dask.coordinator.salvage import Salvages
    from aimss_dask.coordinator.state import CoordinatorState

    st = CoordinatorState()
    spec, _ = st.create("s", 2, ["d1", "d2"])
    st.note_bounds("s", spec.epoch, [(0, 0, 10), (1, 0, 20)])
    st.sealed.add("s")
    st.worker_lost("d1")
    st.worker_lost("d2")
    sent: list[dict] = []
    gate = asyncio.Event()

    async def ask(worker, msg):
        (stream,) = msg["streams"]
        parts = stream["parts"]
        if msg["dead"] == "d1":
            await gate.wait()  # d1's answer comes after d2's commit
        return {"folders": 1, "streams": {"s": [[p, need, end, 100] for p, need, end in parts]}}

    async def broadcast(msg, workers=None):
        sent.append(msg)
        return {}

    ops = SimpleNamespace(
        ask=ask, broadcast=broadcast, hosts=lambda: {"w": "h"}, running=lambda: ["w"],
        event=lambda e: None, spawn=lambda c: None,
    )
    coord = SimpleNamespace(
        state=st, config=SimpleNamespace(recovery="full"), recoveries=SimpleNamespace(recovering=set()),
        runs=SimpleNamespace(for_stream=lambda name: None), pinner=SimpleNamespace(repin=lambda names: None),
    )
    salvages = Salvages(coord, ops)
    salvages.waiting.update({"d1": "h", "d2": "h"})

    async def main() -> None:
        first = asyncio.ensure_future(salvages._take_over("d1", "w"))
        await asyncio.sleep(0.01)
        await salvages._take_over("d2", "w")
        gate.set()
        await first

    asyncio.run(main())
    assert "s" not in st.lost and st.get("s").owners == ("w", "w")
    assert not [m for m in sent if m["op"] == "aimss_drop"], sent


def _salvage_harness(recovery: str, lost: dict[int, int], answer=None):
    """A coordinator's Salvages over a stream ``s`` whose partitions ``lost`` (partition -> records) died with ``d``.

    Returns ``(salvages, state, asks)``: ``asks`` collects what the worker
    ``w`` is asked for, ``(partitions, last)`` per round; ``answer(msg)`` may
    run before each answer (a reader asking meanwhile).
    """
    from types import SimpleNamespace

    from aimss_dask.coordinator.demand import ReadDemand
    from aimss_dask.coordinator.salvage import Salvages
    from aimss_dask.coordinator.state import CoordinatorState

    st = CoordinatorState()
    n = max(lost) + 2
    spec, _ = st.create("s", n, ["d" if p in lost else "w" for p in range(n)])
    st.note_bounds("s", spec.epoch, [(p, 0, lost.get(p, 1)) for p in range(n)])
    st.sealed.add("s")
    st.worker_lost("d")
    asks: list[tuple[list[int], bool]] = []

    async def ask(worker, msg):
        if answer is not None:
            answer(msg)
        parts = [part for stream in msg["streams"] for part in stream["parts"]]
        asks.append(([p for p, _, _ in parts], msg["last"]))
        return {"folders": 1, "streams": {"s": [[p, need, end, 100] for p, need, end in parts]}}

    async def broadcast(msg, workers=None):
        return {}

    ops = SimpleNamespace(
        ask=ask, broadcast=broadcast, hosts=lambda: {"w": "h", "d": "h"}, running=lambda: ["w"],
        event=lambda e: None, spawn=lambda c: c.close(),
    )
    clock = iter(range(10**6))  # every reading later than the one before
    coord = SimpleNamespace(
        state=st, config=SimpleNamespace(recovery=recovery), recoveries=SimpleNamespace(recovering=set()),
        runs=SimpleNamespace(for_stream=lambda name: None), pinner=SimpleNamespace(repin=lambda names: None),
        demand=ReadDemand(clock=lambda: float(next(clock))),
    )
    return Salvages(coord, ops), st, asks


def _salvage(salvages) -> None:
    import asyncio

    salvages.on_worker_lost("d", "h")
    asyncio.run(salvages._take_over("d", "w"))


def test_offsets_recovery_brings_back_first_the_partitions_readers_wait_on():
    salvages, st, asks = _salvage_harness("offsets", {0: 10, 2: 10, 4: 10})
    salvages.coord.demand.note("s", [2])  # asked before it died: not waiting
    salvages.on_worker_lost("d", "h")
    salvages.coord.demand.note("s", [4])  # a reader asks after: it waits on 4
    import asyncio

    asyncio.run(salvages._take_over("d", "w"))
    assert asks == [([4], False), ([0, 2], True)]
    assert "s" not in st.lost and st.get("s").owners[:5] == ("w",) * 5


def test_without_a_waiting_reader_the_partition_asked_for_last_comes_first_then_the_rest():
    salvages, _, asks = _salvage_harness("offsets", {0: 10, 2: 10, 4: 10})
    salvages.coord.demand.note("s", [2])  # the last ask, just before the coordinator heard
    _salvage(salvages)
    assert asks == [([2], False), ([0, 4], True)]
    salvages, _, asks = _salvage_harness("offsets", {0: 10, 2: 10, 4: 10})
    _salvage(salvages)
    assert asks == [([0], False), ([2, 4], True)]  # nobody asked: the first


def test_a_reader_that_asks_during_a_round_is_next():
    def answer(msg):
        if not asks_seen:
            salvages.coord.demand.note("s", [4])  # while the first round runs
        asks_seen.append(msg)

    asks_seen: list = []
    salvages, _, asks = _salvage_harness("offsets", {0: 10, 2: 10, 4: 10, 6: 10}, answer)
    _salvage(salvages)
    assert asks == [([0], False), ([4], False), ([2, 6], True)]


def test_full_recovery_brings_everything_back_in_one_round():
    salvages, st, asks = _salvage_harness("full", {0: 10, 2: 10, 4: 10})
    salvages.coord.demand.note("s", [4])
    _salvage(salvages)
    assert asks == [([0, 2, 4], True)]
    assert "s" not in st.lost


def test_read_demand_keeps_the_latest_ask_for_a_while():
    from aimss_dask.coordinator import demand as dm

    now = [100.0]
    d = dm.ReadDemand(clock=lambda: now[0])
    d.note("a", [0, 1])
    now[0] += 1
    d.note("a", [2])
    d.note("b", [0])
    assert d.wanted("a", range(3)) == [2, 0, 1] and d.wanted("b", [0, 1]) == [0]
    assert d.wanted("a", range(3), since=100.5) == [2]
    now[0] += dm.RECENT
    assert d.wanted("a", range(3)) == [2] and d.asked_at("a", 0) is None  # the first asks aged out
    d.clear()
    assert d.wanted("a", range(3)) == []


# -- real workers killed ---------------------------------------------------------------


def _record(i: int) -> np.ndarray:
    a = np.full(MiB // 8, float(i))
    a[-1] = -i
    return a


def _salvaged(client: Client, name: str) -> list[dict]:
    """The ``partitions-salvaged`` events of stream ``name``, ranges as lists (msgpack may give tuples)."""
    return [
        {**e, "partitions": {p: list(r) for p, r in e["partitions"].items()}, "lost": {p: list(r) for p, r in e["lost"].items()}}
        for _, e in client.get_events("aimss")
        if e.get("action") == "partitions-salvaged" and e["stream"] == name
    ]


def _kill_and_salvage(client: Client, victim: str, name: str, timeout: float = 60, rounds: int = 1) -> Any:
    """SIGKILL ``victim``; the ``partitions-salvaged`` event of stream ``name`` that follows (a list of ``rounds`` of them)."""
    os.kill(client.run(os.getpid)[victim], signal.SIGKILL)
    wait_until(lambda: len(_salvaged(client, name)) >= rounds, timeout=timeout, what=f"partitions of {name!r} rebuilt")
    evs = _salvaged(client, name)
    assert len(evs) == rounds, evs
    return evs[0] if rounds == 1 else evs


def _spill_all(dask_worker) -> int:
    return dask_worker.plugins["aimss"].store.spill(0)


def _folders(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))


def _owners(root) -> list[str]:
    """The workers whose spill folders are in ``root``."""
    out = []
    for n in _folders(root):
        with open(os.path.join(root, n, salvage.OWNER_FILE)) as f:
            out.append(json.load(f)["worker"])
    return sorted(out)


@pytest.fixture
def pair(tmp_path):
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", memory_limit="1GiB"
    ) as cluster, Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS(memory_limit="16MiB", segment_size="1MiB", spill_directory=str(tmp_path)))
        yield c, tmp_path


def test_killed_owner_partition_comes_back_from_its_spill_files_from_the_consumers_offset(pair):
    client, root = pair
    n = 48
    s = aimss_dask.create_stream("kept", partitions=2)
    victim = s.spec.owners[0]
    for i in range(n):
        s.write(_record(i), partition=0)
    s.write(_record(-1), partition=1)
    s.seal()
    it = s.read(partition=0, group="g")
    assert [int(next(it)[0]) for _ in range(11)] == list(range(11))
    it.close()  # commits 10: the 11th was handed out, not yet consumed
    assert aimss_dask.get_stream("kept").info()["groups"]["g"][0] == 10
    assert victim in _owners(root)
    ev = _kill_and_salvage(client, victim, "kept")
    _, end = ev["partitions"][0]
    # Most of the partition was on disk; what was still in memory (the
    # newest ~14 MiB) died with the worker, and is named by offsets.
    assert 10 < end < n - 4, ev
    assert ev["lost"] == {0: [end, n]}
    info = s.info()
    assert info["lost_offsets"] == {0: [end, n]} and info["owners"][0] != victim
    # The group goes on from its committed offset, exactly, to the gap ...
    got = []
    with pytest.raises(PartitionLostError) as lost:
        for r in s.read(partition=0, group="g"):
            got.append(r)
    assert [int(r[0]) for r in got] == list(range(10, end))
    assert all(np.array_equal(r, _record(i)) for i, r in zip(range(10, end), got))
    assert lost.value.lost == {0: (end, n)}
    # ... records every group had passed were not brought back (offsets first),
    with pytest.raises(InvalidOffsetError, match="trimmed"):
        list(s.read(partition=0, start=0))
    # and the other partition never noticed.
    assert [int(r[0]) for r in s.read(partition=1)] == [-1]
    # The dead worker's folder is gone (just after the answer); the live workers' are not.
    wait_until(lambda: victim not in _owners(root), timeout=10, what="the dead worker's folder removed")
    assert set(_owners(root)) == set(listed_workers(client))
    aimss_dask.destroy_stream("kept")


def test_a_partition_wholly_on_disk_comes_back_whole_and_takes_no_new_writes(pair):
    client, root = pair
    s = aimss_dask.create_stream("whole", partitions=1)
    victim = s.spec.owners[0]
    for i in range(12):
        s.write(_record(i), partition=0)
    s.seal()
    assert client.run(_spill_all, workers=[victim])[victim] > 0
    ev = _kill_and_salvage(client, victim, "whole")
    assert ev["partitions"] == {0: [0, 12]} and ev["lost"] == {}
    info = s.info()
    assert info["lost"] == [] and info["records"] == [12]
    got = list(s.read())
    assert len(got) == 12 and all(np.array_equal(r, _record(i)) for i, r in enumerate(got))
    with pytest.raises(aimss_dask.StreamSealedError):
        s.write(_record(99), partition=0)
        s.flush()
    aimss_dask.destroy_stream("whole")


def test_an_open_partition_comes_back_up_to_its_spilled_end_and_refuses_writes(pair):
    client, _ = pair
    s = aimss_dask.create_stream("open", partitions=1)
    victim = s.spec.owners[0]
    for i in range(8):
        s.write(_record(i), partition=0)
    s.flush()
    client.run(_spill_all, workers=[victim])
    ev = _kill_and_salvage(client, victim, "open")
    # Open: records may have arrived after the last report; the end is unknown.
    assert ev["partitions"] == {0: [0, 8]} and ev["lost"] == {0: [8, None]}
    got = []
    with pytest.raises(PartitionLostError) as lost:
        for r in s.read(partition=0):
            got.append(int(r[0]))
    assert got == list(range(8)) and lost.value.lost == {0: (8, None)}
    with pytest.raises(PartitionLostError):
        s.write(_record(8), partition=0)
        s.flush()
    with pytest.raises(PartitionLostError, match="8 on"):
        s.seal()
    aimss_dask.destroy_stream("open")


def test_the_partition_a_reader_waits_on_comes_back_first(pair):
    """``recovery: offsets``: of a killed owner's partitions, the one a reader waits on is rebuilt first, on its own."""
    client, _ = pair
    s = aimss_dask.create_stream("waited", partitions=6)
    victim = s.spec.owners[0]
    mine = [p for p in range(6) if s.spec.owners[p] == victim]
    assert len(mine) >= 2, s.spec.owners
    for i in range(6 * 4):
        s.write(_record(i), partition=i % 6)
    s.seal()
    client.run(_spill_all)
    waited = mine[-1]  # not the first: the order comes from the reader
    os.kill(client.run(os.getpid)[victim], signal.SIGKILL)
    got = None
    deadline = time.monotonic() + 60
    while got is None:  # a reader of the victim's last partition asks until it is back
        try:
            got = [int(r[0]) for r in s.read(partition=waited)]
        except PartitionLostError:
            assert time.monotonic() < deadline, "the partition did not come back"
            time.sleep(0.01)
    assert got == list(range(waited, 24, 6))
    wait_until(lambda: sum(len(e["partitions"]) for e in _salvaged(client, "waited")) == len(mine), timeout=60,
               what="every partition of the victim rebuilt")
    first, *rest = _salvaged(client, "waited")
    assert first["partitions"] == {waited: [0, 4]}, first
    assert sorted(p for e in rest for p in e["partitions"]) == mine[:-1]
    assert [int(r[0]) for r in s.read()] == [i for p in range(6) for i in range(p, 24, 6)]
    aimss_dask.destroy_stream("waited")


def test_a_lone_worker_restarted_by_its_nanny_takes_back_its_own_spill_files(tmp_path):
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", memory_limit="1GiB"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit="16MiB", segment_size="1MiB", spill_directory=str(tmp_path)))
        s = aimss_dask.create_stream("alone", partitions=2)
        for i in range(6):
            s.write(_record(i), partition=i % 2)
        s.seal()
        victim = s.spec.owners[0]
        client.run(_spill_all)
        # No other worker on the node: the restarted one does it as it starts,
        # one partition first (no reader asked for any: the first), then the rest.
        first, rest = _kill_and_salvage(client, victim, "alone", timeout=90, rounds=2)
        assert first["partitions"] == {0: [0, 3]} and rest["partitions"] == {1: [0, 3]}
        assert first["lost"] == rest["lost"] == {}
        assert [int(r[0]) for r in s.read()] == [0, 2, 4, 1, 3, 5]
        wait_until(lambda: _owners(tmp_path) == list(listed_workers(client)), timeout=10,
                   what="only the new worker's own folder left")
        aimss_dask.destroy_stream("alone")
