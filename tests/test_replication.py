"""Replicated streams (issue 19, items 1-2): every copy stored before a writer is answered,
and a replica that takes over from an owner SIGKILLed mid-stream loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import linked_replicator, make_cluster, wait_until
from distributed import Client, wait

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.coordinator.placement import place_replicas
from aimss_dask.coordinator.replicas import Promotions
from aimss_dask.coordinator.state import CoordinatorState
from aimss_dask.core.errors import InvalidArgumentError, ReplicaGapError
from aimss_dask.core.names import PLUGIN_NAME
from aimss_dask.core.runs import RunSpec
from aimss_dask.log.store import LogStore


def test_replicas_never_share_the_owner_and_prefer_other_hosts():
    got = place_replicas(["a", "a", "b"], 3, {"a": 0, "b": 0, "c": 0, "d": 0},
                         {"a": "h1", "b": "h1", "c": "h2", "d": "h2"})
    for owner, reps in zip(["a", "a", "b"], got):
        assert owner not in reps and len(set(reps)) == 2
        assert any(r in ("c", "d") for r in reps)  # another host than the owner's


def test_more_copies_than_workers_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match=r"replication=3 .* needs 3 workers, and the cluster has 2"):
        CoordinatorState().create("s", 2, ["a", "b"], replication=3)


def test_readers_see_only_what_every_copy_holds(tmp_path):
    s = LogStore(budget=2**20, spill_root=str(tmp_path))
    s.open("s", 1, [0])
    s.hold_back("s", 1, [0])
    s.append("s", 1, 0, [b"a", b"b"], [1, 1])
    assert s.read("s", 1, 0, 0)[0] == [] and s.held("s", 1, 0) == 2
    s.commit("s", 1, 0, 1)
    assert s.read("s", 1, 0, 0)[0] == [b"a"]
    assert s.read("s", 1, 0, 0, upto=2)[0] == [b"a", b"b"]  # what an owner sends its replicas
    s.seal("s", 1, [0])
    assert s.read("s", 1, 0, 0)[0] == [b"a", b"b"]


def test_a_copy_lands_at_its_owners_offsets_and_refuses_a_gap(tmp_path):
    s = LogStore(budget=2**20, spill_root=str(tmp_path))
    s.open("s", 1, [0])
    assert s.append_at("s", 1, 0, 0, [b"a", b"b"], [1, 1]) == 2
    assert s.append_at("s", 1, 0, 1, [b"b", b"c"], [1, 1]) == 1  # sent again: only the new one
    with pytest.raises(ReplicaGapError, match="ends at offset 3; records from 5"):
        s.append_at("s", 1, 0, 5, [b"x"], [1])
    assert s.truncate("s", 1, 0, 2) == 1
    assert s.read("s", 1, 0, 0)[0] == [b"a", b"b"]


def test_a_run_spec_carries_its_replication_and_refuses_a_bad_one():
    spec = RunSpec(run_id="r", streams=("r-0",), replication=2)
    assert RunSpec.view_from_wire(spec.to_wire()).replication == 2
    assert RunSpec(run_id="r").replication is None  # the aimss.replication default
    for bad in (0, True, 1.5):
        with pytest.raises(InvalidArgumentError, match=rf"replication={bad!r} of run 'r' must be an int >= 1"):
            RunSpec(run_id="r", replication=bad)


def test_a_second_loss_plans_from_the_promotion_not_yet_applied():
    st = CoordinatorState()
    s, _ = st.create("s", 1, ["a", "b", "c"], replication=3)
    assert (s.owners, s.replicas) == (("a",), (("b", "c"),))
    ((_, first),) = st.promote("a", ["b", "c"])
    assert first.owners == ("b",)
    # b dies before the first promotion is applied: the plan starts from it.
    ((base, second),) = st.promote("b", ["c"], planned={"s": first})
    assert base is first and second.owners == ("c",) and second.replicas == ((),)
    assert st.commit_promotion(s, first) and st.commit_promotion(first, second)
    assert st.get("s").owners == ("c",)
    # A dead worker still listed is never the one that takes over.
    st2 = CoordinatorState()
    st2.create("s", 1, ["a", "b", "c"], replication=3)
    ((_, new),) = st2.promote("a", ["c"])
    assert new.owners == ("c",)


def test_an_owner_that_applied_a_promotion_first_is_heard():
    """An empty new copy catches up before the coordinator commits the promotion: its report counts."""
    st = CoordinatorState()
    s, _ = st.create("s", 1, ["a", "b", "c"], replication=2)
    ((old, new),) = st.promote("b", ["a", "c"])
    (copy,) = new.replicas[0]
    assert not st.in_sync("s", 0, copy)
    st.replica_state("s", new.epoch, 0, copy, 0, True)  # the owner, already at the new epoch
    assert st.commit_promotion(old, new) and st.in_sync("s", 0, copy)
    st.replica_state("s", s.first_epoch - 1, 0, copy, 1, False)  # an older stream of that name: ignored
    assert st.in_sync("s", 0, copy)


def test_the_sides_of_a_join_keep_their_copies_together():
    st = CoordinatorState()
    a, _ = st.create("a", 6, ["w1", "w2", "w3"], replication=2)
    b, _ = st.create("b", 6, ["w1", "w2", "w3"], replication=2, colocate_with="a")
    assert (b.owners, b.replicas) == (a.owners, a.replicas)
    # A promotion then hands both sides of a partition to one worker.
    plans = dict((old.name, new) for old, new in st.promote("w1", ["w2", "w3"]))
    assert plans["a"].owners == plans["b"].owners


class _FakeOps:
    """The cluster as :class:`Promotions` sees it: who runs, and what it was asked (pure logic, no comms)."""

    def __init__(self, running: list[str], failing_broadcasts: int = 0) -> None:
        self.workers = running
        self.asked: list[tuple[str, list[int]]] = []
        self.tasks: list[asyncio.Task] = []
        self.failing = failing_broadcasts

    def running(self) -> list[str]:
        return list(self.workers)

    def hosts(self) -> dict[str, str]:
        return {w: w for w in self.workers}

    def spawn(self, coro) -> None:
        self.tasks.append(asyncio.ensure_future(coro))

    async def ask(self, worker: str, msg: dict) -> None:
        self.asked.append((worker, msg["partitions"]))

    async def broadcast(self, msg: dict) -> dict:
        await asyncio.sleep(0)
        if self.failing:
            self.failing -= 1
            raise OSError("the broadcast failed")
        return {}

    def event(self, msg: dict) -> None:
        pass


def test_a_worker_that_joins_while_a_promotion_is_under_way_still_gets_its_copies():
    """Its own fill skips the stream (pending); the promotion fills it once applied, not at the next join."""
    st = CoordinatorState()
    st.create("s", 1, ["a", "b"], replication=2)
    ops = _FakeOps(["b"])  # a was killed; c, its nanny's new worker, is not running yet
    promotions = Promotions(_fake_coordinator(st), ops)

    async def scenario() -> None:
        assert promotions.on_worker_lost("a") == {"s": {0}}
        ops.workers.append("c")  # c reaches running before the promotion is applied
        assert promotions.fill() == 0  # skipped: under way
        while ops.tasks:
            await ops.tasks.pop(0)

    asyncio.run(scenario())
    spec = st.get("s")
    assert spec.owners == ("b",) and spec.replicas == (("c",),)
    assert ops.asked == [("c", [0])]


def _fake_coordinator(st: CoordinatorState) -> SimpleNamespace:
    lost_late: list[tuple[str, str]] = []
    return SimpleNamespace(
        state=st, runs=SimpleNamespace(for_stream=lambda name: None), pinner=SimpleNamespace(repin=lambda names: None),
        lost_late=lost_late, lost_after_all=lambda worker, name, parts: lost_late.append((worker, name, sorted(parts))),
        stream_ops=SimpleNamespace(opened=_nothing_to_wait_for),
    )


async def _nothing_to_wait_for(name: str) -> None:
    return None


def test_a_promotion_planned_from_one_that_failed_is_planned_again():
    """Two losses in a row; the first promotion fails: the second still hands over or names every partition."""
    st = CoordinatorState()
    s, _ = st.create("s", 2, ["a", "b", "c"], replication=3)
    assert s.owners == ("a", "b")
    ops = _FakeOps(["b", "c"], failing_broadcasts=1)
    coord = _fake_coordinator(st)
    promotions = Promotions(coord, ops)

    async def scenario() -> None:
        promotions.on_worker_lost("a")
        ops.workers.remove("b")
        promotions.on_worker_lost("b")  # planned from a's promotion, not applied yet
        while ops.tasks:
            await ops.tasks.pop(0)

    asyncio.run(scenario())
    # a's promotion failed: what a owned is lost, named; b's partition went to c.
    assert sorted(st.lost["s"]) == [0]
    assert st.get("s").owners[1] == "c"
    # Its loss first looked handled: the coordinator hears that it is not (its runs recover).
    assert coord.lost_late == [("a", "s", [0])]


def test_a_partition_a_pending_promotion_hands_to_a_worker_that_dies_before_it_applies_is_named_lost():
    """a dies: its partition goes to its copy on c. c dies before that promotion applies: c's removal looks at
    the committed spec, where a still owns it, and neither hands it over nor names it lost. Writers then wrote
    to the dead c until their failover gave up (seen in CI: three owners SIGKILLed in quick succession)."""
    st = CoordinatorState()
    s, _ = st.create("s", 2, ["a", "b", "c"], replication=2)
    assert s.owners == ("a", "b") and s.replicas == (("c",), ("a",))
    ops = _FakeOps(["b", "c"])  # a was killed
    coord = _fake_coordinator(st)
    promotions = Promotions(coord, ops)

    async def scenario() -> None:
        # What the coordinator's remove_worker does, twice in a row.
        kept = promotions.on_worker_lost("a")
        assert kept == {"s": {0}}  # c takes partition 0 over
        st.worker_lost("a", keep=kept)
        ops.workers.remove("c")  # c dies before a's promotion is applied
        kept = promotions.on_worker_lost("c")
        assert kept == {}  # planned from a's promotion: partition 0's only other copy (new, on b) is not in sync
        assert st.worker_lost("c", keep=kept) == []  # the committed spec: c owns nothing there
        while ops.tasks:
            await ops.tasks.pop(0)

    asyncio.run(scenario())
    assert st.get("s").owners == ("c", "b")
    assert sorted(st.lost["s"]) == [0]
    assert coord.lost_late == [("c", "s", [0])]


def _kill(client: Client, address: str) -> None:
    os.kill(client.run(os.getpid, workers=[address])[address], signal.SIGKILL)


def _running(client: Client) -> int:
    """Workers that take new copies (a nanny's restarted worker is listed before it does)."""
    return client.run_on_scheduler(
        lambda dask_scheduler: sum(ws.status.name == "running" for ws in dask_scheduler.workers.values())
    )


def _workers_seen(dask_scheduler) -> list[tuple[str, str, float]]:
    """Each listed worker: address, status, seconds since the scheduler last heard from it."""
    now = time.time()
    return [(a, ws.status.name, round(now - ws.last_seen, 1)) for a, ws in dask_scheduler.workers.items()]


def _wait_running(client: Client, n: int) -> None:
    """Until ``n`` workers run (nannies restart the ones earlier tests killed).

    Generous: restarts after a kill may queue behind other processes' work
    on a loaded machine. On failure, says what the scheduler lists.
    """
    try:
        wait_until(lambda: _running(client) == n, timeout=60, what=f"{n} workers running")
    except AssertionError as e:
        nannies = {name: getattr(w, "status", None) for name, w in client.cluster.workers.items()}
        raise AssertionError(
            f"{e}; the scheduler lists {client.run_on_scheduler(_workers_seen)}; the cluster's nannies: {nannies}"
        ) from None


@pytest.fixture(scope="module")
def cluster3():
    with make_cluster(3) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        yield client


def test_a_replica_takes_over_from_a_killed_owner_and_loses_nothing(cluster3):
    _replica_takes_over(cluster3)


def test_a_replica_takes_over_on_a_tls_cluster():
    """TLS: every copy travels over Dask's comms (the raw data plane is plain TCP), and a kill loses nothing."""
    from distributed.security import Security

    sec = Security.temporary()
    with make_cluster(3, security=sec) as cluster, Client(cluster, security=sec) as client:
        assert all(a.startswith("tls://") for a in listed_workers(client))
        client.register_plugin(aimss_dask.AIMSS())
        _replica_takes_over(client)


def _replica_takes_over(client: Client) -> None:
    """A replicated stream's owner is SIGKILLed mid-stream: writers, a consumer group and readers lose nothing."""
    s = aimss_dask.create_stream("rep-kill", 3, replication=2)
    assert all(s.spec.owners[p] not in s.spec.replicas[p] for p in range(3))
    for i in range(300):
        s.write(np.full(1000, i), partition=i % 3)
    s.flush()
    info = s.info()
    assert info["records"] == [100, 100, 100] and info["replication"] == 2
    # Every copy is stored once flush returns.
    assert sum(w.get("replica_records_sent", 0) for w in aimss_dask.status().values()) >= 300
    it = aimss_dask.read_from("rep-kill", partition=0, group="g", timeout=5)
    seen = [int(next(it)[0]) for _ in range(61)]
    it.close()  # the 61st is not committed (at-least-once): read again below
    victim = s.spec.owners[0]
    os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    t0 = time.monotonic()
    for i in range(300, 600):
        s.write(np.full(1000, i), partition=i % 3)
    s.flush()
    # Not Dask's connect timeout (30 s): over Dask's comms (TLS), a request
    # to the dead owner is given up once the scheduler knows of the loss.
    took = time.monotonic() - t0
    assert took < 20, f"the writes after the kill took {took:.1f} s to be stored"
    rest = []
    try:
        for r in aimss_dask.read_from("rep-kill", partition=0, group="g", timeout=3):
            rest.append(int(r[0]))
    except aimss_dask.ReadTimeoutError:
        pass
    assert seen[:60] + rest == list(range(0, 600, 3))  # the group goes on from its offset
    s.seal()
    after = s.info()
    assert after["lost"] == [] and after["records"] == [200, 200, 200]
    assert victim not in after["owners"]
    assert sorted(int(r[0]) for r in aimss_dask.read_from("rep-kill")) == list(range(600))
    assert any(e.get("action") == "replicas-promoted" for _, e in client.get_events("aimss"))
    aimss_dask.destroy_stream("rep-kill")


def _sorted_ints(records) -> list[int]:
    return sorted(int(r) for r in records)


def _stream_of_ints(client: Client, name: str, partitions: int, n: int, replication: int) -> aimss_dask.Stream:
    """Once 3 workers run: ``name`` holding ``0..n-1``, record ``i`` in partition ``i % partitions``, stored."""
    _wait_running(client, 3)
    s = aimss_dask.create_stream(name, partitions, replication=replication)
    for i in range(n):
        s.write(i, partition=i % partitions)
    s.flush()
    return s


def test_a_reader_running_on_a_killed_owner_moves_to_the_replica_that_takes_over(cluster3):
    """Dask sends the reader back to ``no-worker`` (pinned to the dead owner); the promotion schedules it again."""
    client = cluster3
    s = _stream_of_ints(client, "rep-readers", 3, 30, replication=2)
    futs = s.map_partitions(_sorted_ints)  # each reads its partition until the seal
    victim = s.spec.owners[0]

    def running_there(dask_scheduler, key=futs[0].key, where=victim) -> bool:
        ts = dask_scheduler.tasks.get(key)
        return ts is not None and ts.processing_on is not None and ts.processing_on.address == where

    wait_until(lambda: client.run_on_scheduler(running_there), timeout=30, what="the reader of partition 0 running")
    _kill(client, victim)
    wait_until(lambda: victim not in s.info()["owners"], timeout=30, what="a replica owning partition 0")
    for i in range(30, 60):
        s.write(i, partition=i % 3)
    s.seal()
    wait(futs, timeout=60)  # a reader left in no-worker never runs again: TimeoutError
    got = client.gather(futs)
    assert got == [list(range(p, 60, 3)) for p in range(3)]
    aimss_dask.destroy_stream("rep-readers")


def test_fewer_workers_than_copies_is_a_warning_and_a_status_flag_until_one_joins(cluster3):
    client = cluster3
    s = _stream_of_ints(client, "rep-short", 2, 20, replication=3)
    client.cluster.scale(2)  # one leaves for good: 2 workers for 3 copies
    wait_until(
        lambda: any(e.get("action") == "under-replicated" and e.get("stream") == "rep-short"
                    for _, e in client.get_events("aimss")),
        timeout=30, what="the under-replicated event",
    )
    (entry,) = [x for x in aimss_dask.status().streams if x["name"] == "rep-short"]
    assert entry["under_replicated"] == [0, 1] and entry["replication"] == 3
    # Nothing fails: the stream takes writes and reads as before.
    s.write(20, partition=0)
    s.flush()
    # A worker joins: each partition gets its third copy back, caught up.
    client.cluster.scale(3)
    wait_until(
        lambda: all(len(c) == 2 for c in s.info()["in_sync"]), timeout=30, what="a third copy of each partition",
    )
    (entry,) = [x for x in aimss_dask.status().streams if x["name"] == "rep-short"]
    assert entry["under_replicated"] == []
    assert any(e.get("action") == "replicas-added" and e.get("stream") == "rep-short"
               for _, e in client.get_events("aimss"))
    # The new copy is whole: both other holders die at once, and it takes over.
    info = s.info()
    (new,) = set(info["in_sync"][0]) - set(s.spec.holders(0))
    for w in {info["owners"][0], *info["in_sync"][0]} - {new}:
        _kill(client, w)
    wait_until(lambda: (i := s.info())["owners"] == [new, new] or i["lost"], timeout=30, what="the new copy owns all")
    assert s.info()["lost"] == []
    s.seal()
    assert sorted(aimss_dask.read_from("rep-short")) == list(range(21))
    aimss_dask.destroy_stream("rep-short")


def _write_ints(name: str, values: list[int], partitions: int) -> int:
    """A task: write ``values`` to ``name`` (value ``i`` to partition ``i % partitions``) and flush."""
    s = aimss_dask.get_stream(name)
    for i in values:
        s.write(i, partition=i % partitions)
    s.flush()
    return len(values)


async def _drop_late(name: str, epoch: int, dask_worker=None) -> None:
    """The coordinator's drop of ``name`` at ``epoch``, arriving at this worker only now."""
    await dask_worker.handlers["aimss_drop"](name=name, epoch=epoch)


def test_a_late_drop_of_an_old_stream_leaves_the_new_one_of_its_name_whole():
    """A restarted run makes its stream again under the same name, and the old one's drop travels
    on another connection: it may reach a worker after that worker wrote to the new one. The new
    stream's copies and its writers' numbering must not be reset: the owners would then drop the
    records that follow as ones they already hold."""
    # A cluster of its own: not one still bringing back the workers an earlier test killed.
    with make_cluster(3) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        _late_drop(client)


def _late_drop(client: Client) -> None:
    old = _stream_of_ints(client, "late-drop", 3, 30, replication=2)
    aimss_dask.destroy_stream("late-drop")
    new = aimss_dask.create_stream("late-drop", 3, replication=2)
    assert new.spec.epoch > old.spec.epoch
    writer = new.spec.owners[0]
    first = client.submit(_write_ints, "late-drop", list(range(30)), 3, workers=[writer], pure=False)
    assert first.result(timeout=60) == 30
    client.run(_drop_late, "late-drop", old.spec.epoch, workers=[writer])
    second = client.submit(_write_ints, "late-drop", list(range(30, 60)), 3, workers=[writer], pure=False)
    assert second.result(timeout=60) == 30
    new.seal()
    info = new.info()
    assert info["records"] == [20, 20, 20] and info["lost"] == []
    assert all(len(c) == 1 for c in info["in_sync"]), info["in_sync"]  # the copies still count
    assert _sorted_ints(aimss_dask.read_from("late-drop")) == list(range(60))
    aimss_dask.destroy_stream("late-drop")


def test_a_copy_catching_up_is_not_promoted_and_one_in_sync_is():
    st = CoordinatorState()
    s, _ = st.create("s", 1, ["a", "b", "c"], replication=2)
    assert s.replicas == (("b",),)
    _, new = st.promote("b", ["a", "c"])[0]  # the replica died: c is placed, catching up
    assert new.replicas == (("c",),) and not st.in_sync("s", 0, "c")
    st.commit_promotion(s, new)
    # A word from an older owner epoch, or an older word, changes nothing.
    st.replica_state("s", s.epoch, 0, "c", 5, True)
    assert not st.in_sync("s", 0, "c")
    st.replica_state("s", new.epoch, 0, "c", 7, True)
    st.replica_state("s", new.epoch, 0, "c", 6, False)  # overtaken on the wire
    assert st.in_sync("s", 0, "c")
    assert [n.owners for _, n in st.promote("a", ["c"])] == [("c",)]  # a plan, not applied
    # Its owner dropped the copy: it is not promoted any more (lost, named).
    st.replica_state("s", new.epoch, 0, "c", 8, False)
    assert [n.owners for _, n in st.promote("a", ["c"])] == [("a",)]


# Its tests come after those of cluster3: aimss_dask calls go to the newest client.
@pytest.fixture(scope="module")
def cluster4():
    with make_cluster(4) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        yield client


def test_a_killed_replica_is_replaced_and_the_new_copy_takes_over_from_the_owner(cluster4):
    client = cluster4
    s = aimss_dask.create_stream("rep-twice", 2, replication=2)
    for i in range(400):
        s.write(np.full(100, i), partition=i % 2)
    s.flush()
    owner, (replica,) = s.spec.owners[0], s.spec.replicas[0]
    syncs = sum(w.get("replica_syncs", 0) for w in aimss_dask.status().values())
    _kill(client, replica)
    # Another worker gets a copy, catches up from the owner's log, and only
    # then may take over.
    info = wait_until(
        lambda: (i := s.info())["in_sync"][0] and replica not in i["replicas"][0] and i,
        timeout=30, what="a new copy of partition 0 in sync",
    )
    (new_copy,) = info["in_sync"][0]
    assert new_copy not in (owner, replica) and info["owners"][0] == owner
    assert sum(w.get("replica_syncs", 0) for w in aimss_dask.status().values()) > syncs
    for i in range(400, 600):
        s.write(np.full(100, i), partition=i % 2)
    s.flush()
    _kill(client, owner)  # the second kill: the copy made after the first takes over
    for i in range(600, 700):
        s.write(np.full(100, i), partition=i % 2)
    s.flush()
    s.seal()
    after = s.info()
    assert after["lost"] == [] and after["owners"][0] == new_copy
    assert after["records"] == [350, 350]
    assert sorted(int(r[0]) for r in aimss_dask.read_from("rep-twice")) == list(range(700))
    aimss_dask.destroy_stream("rep-twice")


def test_an_owner_killed_while_its_new_copy_catches_up_is_lost_loudly_or_taken_over_whole(cluster4):
    """Whichever the kill lands on, never a copy shorter than what was written."""
    client = cluster4
    _wait_running(client, 4)
    s = aimss_dask.create_stream("rep-race", 1, replication=2)
    for i in range(64):
        s.write(np.full(2**17, i), partition=0)  # 1 MiB each: the catch-up takes a while
    s.flush()
    owner, (replica,) = s.spec.owners[0], s.spec.replicas[0]
    _kill(client, replica)
    wait_until(lambda: replica not in s.info()["replicas"][0], timeout=30, what="a new copy placed")
    _kill(client, owner)
    def handled():
        i = s.info()
        return i if i["owners"][0] != owner or i["lost"] else None

    info = wait_until(handled, timeout=30, what="the owner's loss handled")
    if info["lost"]:
        with pytest.raises(aimss_dask.PartitionLostError) as e:
            list(aimss_dask.read_from("rep-race", partition=0, timeout=5))
        assert 0 in e.value.lost
    else:
        got = []
        with pytest.raises(aimss_dask.ReadTimeoutError):
            for r in aimss_dask.read_from("rep-race", partition=0, timeout=3):
                got.append(int(r[0]))
        assert got == list(range(64))
    aimss_dask.destroy_stream("rep-race")


def test_a_new_copy_starts_where_the_consumer_groups_stand(cluster4):
    """``aimss.recovery: offsets``: records every group committed past are not copied; the groups go on."""
    client = cluster4
    _wait_running(client, 4)
    s = aimss_dask.create_stream("rep-offsets", 1, replication=2)
    for i in range(400):
        s.write(np.full(1000, i), partition=0)
    s.flush()
    for group, upto in (("g", 300), ("h", 200)):
        it = aimss_dask.read_from("rep-offsets", partition=0, group=group, timeout=5)
        assert [int(next(it)[0]) for _ in range(upto + 1)] == list(range(upto + 1))
        it.close()  # commits `upto` (the last one read is not committed)

    owner, (replica,) = s.spec.owners[0], s.spec.replicas[0]

    def counters() -> tuple[int, int]:
        # Not the victim's: its counters leave with it.
        st = [w for a, w in aimss_dask.status().items() if a != replica]
        return (sum(w.get("replica_sync_records_skipped", 0) for w in st),
                sum(w.get("replica_sync_bytes", 0) for w in st))

    skipped, moved = counters()
    _kill(client, replica)
    wait_until(
        lambda: (i := s.info())["in_sync"][0] and replica not in i["replicas"][0],
        timeout=30, what="a new copy of partition 0 in sync",
    )
    skipped2, moved2 = counters()
    # The lower group stands at 200: only records 200..399 were sent.
    assert skipped2 - skipped == 200
    assert 200 * 8000 <= moved2 - moved < 201 * 8000 + 4096
    _kill(client, owner)  # the new copy, which holds 200..399, takes over
    for group, upto in (("g", 300), ("h", 200)):
        got = []
        with pytest.raises(aimss_dask.ReadTimeoutError):
            for r in aimss_dask.read_from("rep-offsets", partition=0, group=group, timeout=3):
                got.append(int(r[0]))
        assert got == list(range(upto, 400)), group
    # Below what every group passed, the new owner says so: never a silent gap.
    t0 = time.monotonic()
    with pytest.raises(aimss_dask.InvalidOffsetError, match="was trimmed; the earliest offset still kept is 200"):
        next(aimss_dask.read_from("rep-offsets", partition=0, start=0, timeout=5))
    # At once: that answer is final, not one to wait out for another owner (MOVE_WAIT, 30 s).
    assert time.monotonic() - t0 < 10
    aimss_dask.destroy_stream("rep-offsets")


def _lose_copy(name: str, epoch: int, partition: int, dask_worker=None) -> None:
    """The copy here of ``partition`` loses its log; the worker lives on (stands in for a copy that broke)."""
    dask_worker.plugins[PLUGIN_NAME].store.drop_partition(name, epoch, partition)


def _holds(name: str, partition: int, dask_worker=None) -> bool:
    return dask_worker.plugins[PLUGIN_NAME].store.partition_stats(name, partition) is not None


def test_a_copy_its_owner_gave_up_on_is_replaced_and_the_new_one_takes_over(cluster4):
    """A copy on a live worker that refuses its owner's records is not silently forgotten.

    Its owner gives up on it; the coordinator stops listing it (the stream
    would look whole on one copy) and places a new one, which catches up
    and takes over when the owner dies. Before, the stream ran on one copy
    until a worker joined, and losing the owner lost the partition.
    """
    client = cluster4
    _wait_running(client, 4)
    s = aimss_dask.create_stream("rep-given-up", 1, replication=2)
    for i in range(50):
        s.write(i, partition=0)
    s.flush()
    owner, (replica,) = s.spec.owners[0], s.spec.replicas_of(0)
    client.run(_lose_copy, s.name, s.spec.epoch, 0, workers=[replica])
    for i in range(50, 100):  # the broken copy refuses these: its owner gives up on it
        s.write(i, partition=0)
    s.flush()
    info = wait_until(
        lambda: (i := s.info())["in_sync"][0] and replica not in i["replicas"][0] and i,
        timeout=30, what="a new copy of partition 0 in sync",
    )
    (new,) = info["in_sync"][0]
    assert new not in (owner, replica)  # a worker that did not fail, while one is free
    (entry,) = [x for x in aimss_dask.status().streams if x["name"] == s.name]
    assert entry["under_replicated"] == []
    given_up = [e for _, e in client.get_events("aimss")
                if e.get("action") == "replicas-given-up" and e.get("stream") == s.name]
    assert [[list(c) for c in e["copies"]] for e in given_up] == [[[0, replica]]]
    # No memory held for nothing (dropped once the new list is in force).
    wait_until(lambda: not client.run(_holds, s.name, 0, workers=[replica])[replica], timeout=10,
               what="the copy given up on dropped")
    _kill(client, owner)  # the new copy holds every record: it takes over
    wait_until(lambda: s.info()["owners"] == [new], timeout=30, what="the new copy owning partition 0")
    s.seal()
    assert s.info()["lost"] == []
    assert sorted(aimss_dask.read_from(s.name)) == list(range(100))
    aimss_dask.destroy_stream(s.name)


def test_catch_ups_are_paced_to_the_recovery_rate(tmp_path):
    from aimss_dask.node.replication import Replicator, _Dest, _Part

    store = LogStore(budget=2**20, spill_root=str(tmp_path))
    d, part = _Dest("b"), _Part("s", 1, 0, joining={"b"})
    r = Replicator(store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None, rate=100 * 2**20)
    t0 = time.monotonic()
    for _ in range(4):
        r._pace(10 * 2**20, d, part, None)  # 40 MiB at 100 MiB/s: the last chunk waits for 0.3 s of the budget
    assert 0.28 <= time.monotonic() - t0 < 2.0
    free = Replicator(store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None)
    t0 = time.monotonic()
    for _ in range(4):
        free._pace(10 * 2**20, d, part, None)
    assert time.monotonic() - t0 < 0.05


def test_live_copies_go_while_a_catch_up_waits_for_its_pace(tmp_path):
    """Copies of live writes to a replica do not wait behind a paced catch-up to it (their writers wait on
    them): they go while it waits, except those of the partition caught up, or of one whose catch-up is
    queued before them (that copy needs its records in order)."""
    from aimss_dask.node.replication import Replicator, _Dest, _Part, _Ship, _Sync

    class Recorded(Replicator):
        def _transmit(self, d, groups, conn):
            self.sent.append((time.monotonic(), [g[2] for g in groups]))
            return {"errors": {}}, conn

    store = LogStore(budget=2**20, spill_root=str(tmp_path))
    r = Recorded(store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None, rate=10 * 2**20)
    r.sent = []
    d = _Dest("b")
    syncing, live, queued = (_Part("s", 1, 0, joining={"b"}), _Part("s", 1, 1, insync={"b": 0}),
                             _Part("s", 1, 2, joining={"b"}))
    waiting = [_Sync(queued), _Ship(syncing, 0, [b"y"], [1], None, None), _Ship(queued, 0, [b"z"], [1], None, None)]
    d.queue.extend([waiting[0], _Ship(live, 0, [b"x"], [1], None, None), *waiting[1:]])
    r._rate_free = time.monotonic() + 0.5  # the catch-up's chunk may go in 0.5 s
    t0 = time.monotonic()
    r._pace(2**20, d, syncing, None)
    assert time.monotonic() - t0 >= 0.45  # it still waited its turn ...
    (sent_at, parts), = r.sent
    assert parts == [1] and sent_at - t0 < 0.2  # ... and the live copy went at once
    assert list(d.queue) == waiting  # the others keep their places
    # A live copy queued while it waits goes too.
    r.sent = []
    r._rate_free = time.monotonic() + 0.5
    threading.Timer(0.2, lambda: (d.queue.append(_Ship(live, 1, [b"w"], [1], None, None)),
                                  r._cond.acquire(), r._cond.notify_all(), r._cond.release())).start()
    t0 = time.monotonic()
    r._pace(2**20, d, syncing, None)
    (sent_at, parts), = r.sent
    assert parts == [1] and 0.15 <= sent_at - t0 < 0.45  # as it came, before the catch-up's turn


def test_a_replica_that_has_not_heard_of_the_new_epoch_yet_is_sent_again_not_dropped(tmp_path, monkeypatch):
    """After a loss every worker learns the new epoch at once: a replica that hears after its owner refuses a while."""
    from aimss_dask.core.specs import StreamSpec
    from aimss_dask.node import replication
    from aimss_dask.node.replication import Replicator

    class Flaky(Replicator):
        refusals = 3

        def _transmit(self, d, groups, conn):
            self.sent.append([g[7] for g in groups])
            if self.refusals:
                self.refusals -= 1
                return {"errors": {"s": ("StreamNotFoundError", "asked for epoch 2, held: epoch 1")}}, conn
            return {"errors": {}}, conn

    store = LogStore(budget=2**20, spill_root=str(tmp_path))
    spec = StreamSpec(name="s", partitions=1, owners=("a",), epoch=2, since=1, replicas=(("b",),), replication=2)
    store.open("s", 2, [0])

    def run(r: Replicator) -> bool:
        r.sent = []
        r.configure(spec, fresh=True)
        for i in range(3):
            with r.append_lock:
                first = store.append("s", 2, 0, [i], [8])
                r.shipped("s", 0, first, [i], [8])
        return r.wait("s", 2, 0, store.held("s", 2, 0))

    r = Flaky(store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None)
    assert run(r)  # every copy confirmed, in order, after the refusals
    assert r.stats["replicas_dropped"] == 0 and r._parts[("s", 0)].insync == {"b": 3}
    sent = [at for batch in r.sent for at in batch]
    assert sent[-3:] == [0, 1, 2] and sorted(set(sent)) == [0, 1, 2]
    r.close()
    # A replica that keeps refusing (the stream was dropped there) stops counting after the grace.
    monkeypatch.setattr(replication, "NEW_EPOCH_GRACE", 0.1)
    store = LogStore(budget=2**20, spill_root=str(tmp_path / "2"))  # run() reads this one now
    store.open("s", 2, [0])
    r = Flaky(store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None)
    r.refusals = 10**6
    assert run(r)  # readers see the records once the copy no longer counts
    assert r.stats["replicas_dropped"] == 1 and not r._parts[("s", 0)].has("b")
    r.close()


def test_an_owner_forwards_the_wire_forms_it_received_and_encodes_only_its_own_writes(tmp_path, monkeypatch):
    """Records pushed from another worker go to the replicas in the form they arrived, not pickled again."""
    from aimss_dask.core.specs import StreamSpec
    from aimss_dask.log import records
    from aimss_dask.node import replication
    from aimss_dask.node.replication import Replicator

    class Recording(Replicator):
        def _transmit(self, d, groups, conn):
            self.sent.extend(groups)
            return {"errors": {}}, conn

    encoded: list = []
    real_encode = records.encode
    monkeypatch.setattr(replication.rec, "encode", lambda r, name="?": encoded.append(r) or real_encode(r, name))
    store = LogStore(budget=2**20, spill_root=str(tmp_path))
    spec = StreamSpec(name="s", partitions=1, owners=("a",), epoch=1, since=1, replicas=(("b",),), replication=2)
    store.open("s", 1, [0])
    r = Recording(store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None)
    r.sent = []
    r.configure(spec, fresh=True)
    pushed = np.arange(3.0)
    wire = [real_encode(pushed)[0]]
    with r.append_lock:
        first = store.append("s", 1, 0, [pushed], [24])
        r.shipped("s", 0, first, [pushed], [24], wire=wire)  # arrived over the data plane
        first = store.append("s", 1, 0, [b"local"], [5])
        r.shipped("s", 0, first, [b"local"], [5])  # written on this worker: no wire form
    assert r.wait("s", 1, 0, store.held("s", 1, 0))
    sent = [ser for g in r.sent for ser in g[3]]
    assert sent[0] is wire[0]
    assert encoded == [b"local"]  # only the record without a wire form was encoded
    r.close()


def test_a_copy_that_has_not_heard_of_the_new_epoch_is_caught_up_again_not_dropped(tmp_path):
    """The coordinator tells every worker of a new epoch at once: a new owner may start a catch-up first.

    The copy refuses it as a stream it does not know, twice; the owner tries
    again (within ``NEW_EPOCH_GRACE``) and the copy counts, instead of being
    dropped for good and leaving the partition a copy short.
    """
    from aimss_dask.core.specs import StreamSpec
    from aimss_dask.node.replication import Replicator

    class Late(Replicator):
        def _replica_end(self, dest, name, p):
            return 0

        def _ask(self, dest, op, **kwargs):
            return {}

        def _transmit(self, d, groups, conn):
            self.tries += 1
            if self.tries <= 2:
                return {"errors": {"s": ("StreamNotFoundError", "stream 's' has no log here (asked for epoch 2)")}}, conn
            return {"errors": {}}, conn

    store = LogStore(budget=2**20, spill_root=str(tmp_path))
    store.open("s", 2, [0])
    store.append("s", 2, 0, [1, 2], [8, 8])
    r = Late(store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None)
    r.tries = 0
    r.configure(StreamSpec(name="s", partitions=1, owners=("a",), epoch=2, replicas=(("b",),), replication=2))
    wait_until(lambda: "b" in r._parts[("s", 0)].insync, timeout=10, what="the copy in sync")
    assert r.tries == 3 and r.stats["replicas_dropped"] == 0
    r.close()


def test_a_new_copy_counts_only_once_it_holds_what_came_while_it_caught_up(tmp_path):
    """Records appended during a catch-up were answered without the new copy: it holds them before it counts.

    And the owner's filters (writer numbers, origins) are handed over as
    they stand where the copy ends, or the copy, become owner, would refuse
    the writer's next records as a gap or keep a second copy of an input.
    """
    from aimss_dask.core.specs import Origin, StreamSpec
    from aimss_dask.node.dedup import OriginFilter
    from aimss_dask.node.replication import Replicator
    from aimss_dask.node.writers import WriterSeqs

    class Catching(Replicator):
        def _replica_end(self, dest, name, p):
            return 0

        def _ask(self, dest, op, **kwargs):
            self.asks.append((op, kwargs))
            return {}

        def _transmit(self, d, groups, conn):
            for g in groups:
                self.sent.append((g[7], len(g[3]), g[6]))
            if self.during:
                self.during.pop(0)()
            return {"errors": {}}, conn

    store = LogStore(budget=2**20, spill_root=str(tmp_path))
    store.open("s", 1, [0])
    writers, origins = WriterSeqs(), OriginFilter()
    origins.track("s", 1, inputs=8)
    r = Catching(store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None,
                 writers=writers, origins=origins)
    r.sent, r.asks, r.during = [], [], []

    def append(i: int) -> None:
        with r.append_lock:
            writers.admit("s", 1, 0, (7, i), 1)
            assert origins.admit("s", 1, 0, Origin(i, attempt=1))
            first = store.append("s", 1, 0, [i], [8])
            r.shipped("s", 0, first, [i], [8], (i, 1, 0), (7, i))

    for i in range(3):
        append(i)
    # While the first chunk goes, record 3 comes, and while the tables go, record 4.
    r.during = [lambda: append(3)]
    real_ask = r._ask

    def ask(dest, op, **kwargs):
        if op == "aimss_replica_writers" and len(r.asks) == 0:
            append(4)
        return real_ask(dest, op, **kwargs)

    r._ask = ask
    r.configure(StreamSpec(name="s", partitions=1, owners=("a",), epoch=1, replicas=(("b",),), replication=2))
    wait_until(lambda: "b" in r._parts[("s", 0)].insync, timeout=10, what="the copy in sync")
    assert r._parts[("s", 0)].insync["b"] == 5  # it counts from where it holds everything
    plain = [(at, n) for at, n, writer in r.sent if writer is None]
    assert plain == [(0, 3), (3, 1), (4, 1)], r.sent  # the catch-up copied 3 and 4 too
    tables = [kw["table"] for op, kw in r.asks if op == "aimss_replica_writers"]
    found = [kw["origins"] for op, kw in r.asks if op == "aimss_replica_origins"]
    assert tables[-1] == [(7, 5)] and sorted(found[-1]) == [[i, 0, 1] for i in range(5)], r.asks
    r.close()


def test_a_copy_cut_back_to_its_new_owner_forgets_what_its_filters_knew_of_the_records_cut(tmp_path):
    """A copy ahead of the replica that took over is cut back, and its filters with it.

    The owner that died shipped records 3 and 4 to this copy but not to the
    replica promoted in its place. The copy's writer numbers and origins
    named them: left so, the copy, promoted in turn, would drop the writer's
    re-send of 3 and 4 (and a re-run push's copy of inputs 3 and 4) as
    stored already, a silent loss. A real owner (its replicator) catches up
    a real copy (its follower), linked in-process.
    """
    from aimss_dask.core.specs import Origin, StreamSpec
    from aimss_dask.node.dedup import OriginFilter
    from aimss_dask.node.follower import Follower
    from aimss_dask.node.writers import WriterSeqs

    copy_store = LogStore(budget=2**20, spill_root=str(tmp_path / "copy"))
    copy_store.open("s", 1, [0])
    copy_writers, copy_origins = WriterSeqs(), OriginFilter()
    copy_origins.track("s", 1, inputs=8)
    follower = Follower(copy_store, copy_writers, copy_origins, threading.Lock())
    for i in range(5):  # what the dead owner shipped here: (input i, attempt 1), writer 7's number i
        follower.append("s", 1, 0, [i], [8], (i, 1, 0), (7, i), at=i)

    Linked = linked_replicator(follower, copy_store)

    owner_store = LogStore(budget=2**20, spill_root=str(tmp_path / "owner"))
    owner_store.open("s", 1, [0])
    writers, origins = WriterSeqs(), OriginFilter()
    origins.track("s", 1, inputs=8)
    for i in range(3):  # the replica promoted holds 0 to 2
        writers.admit("s", 1, 0, (7, i), 1)
        assert origins.admit("s", 1, 0, Origin(i, attempt=1))
        owner_store.append("s", 1, 0, [i], [8])
    r = Linked(owner_store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None,
               writers=writers, origins=origins)
    r.configure(StreamSpec(name="s", partitions=1, owners=("a",), epoch=1, replicas=(("b",),), replication=2))
    wait_until(lambda: "b" in r._parts[("s", 0)].insync, timeout=10, what="the copy in sync")
    r.close()
    assert r.cut == [2] and copy_store.held("s", 1, 0) == 3
    assert copy_store.read("s", 1, 0, 0, None)[0] == [0, 1, 2]
    assert copy_writers.table("s", 1, 0) == {7: 3}
    assert sorted(copy_origins.export("s", 1, 0)) == [(0, 0, 1), (1, 0, 1), (2, 0, 1)]
    # Promoted, the copy stores the writer's re-send of 3 and 4, and a re-run's copy of input 3.
    assert copy_writers.admit("s", 1, 0, (7, 3), 2) == 0
    assert copy_origins.admit("s", 1, 0, Origin(3, attempt=2))
    assert not copy_origins.admit("s", 1, 0, Origin(2, attempt=2))  # what it holds is still a duplicate


def test_a_copy_ahead_of_a_promoted_owner_is_cut_where_it_took_over_not_where_it_is_now(tmp_path):
    """Three copies, the owner dies: the copy promoted held offsets 0-2, another 0-4 (the dead owner's
    3 and 4, never on every copy). Writers' sends reach the new owner before its catch-up of the other
    starts, and fill 3-5 with other records: the other copy must be cut at 3 (where the new owner took
    over), not at 6 (its end now), or it keeps the dead owner's 3 and 4 where the owner holds others."""
    from aimss_dask.core.specs import StreamSpec
    from aimss_dask.node.dedup import OriginFilter
    from aimss_dask.node.follower import Follower
    from aimss_dask.node.writers import WriterSeqs

    copy_store = LogStore(budget=2**20, spill_root=str(tmp_path / "copy"))
    copy_store.open("s", 1, [0])
    follower = Follower(copy_store, WriterSeqs(), OriginFilter(), threading.Lock())
    for i in range(5):
        follower.append("s", 1, 0, [i], [8], None, None, at=i)
    go = threading.Event()

    class Held(linked_replicator(follower, copy_store)):
        def _replica_end(self, dest, name, p):
            assert go.wait(10)  # the catch-up starts once the writers' sends are in
            return super()._replica_end(dest, name, p)

    owner_store = LogStore(budget=2**20, spill_root=str(tmp_path / "owner"))
    owner_store.open("s", 1, [0])
    owner_store.append("s", 1, 0, [0, 1, 2], [8, 8, 8])
    r = Held(owner_store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None)
    r.configure(StreamSpec(name="s", partitions=1, owners=("a",), epoch=1, replicas=(("b",),), replication=2))
    with r.append_lock:  # a writer's sends of its records, now at the new owner
        first = owner_store.append("s", 1, 0, [100, 101, 102], [8, 8, 8])
        r.shipped("s", 0, first, [100, 101, 102], [8, 8, 8])
    go.set()
    wait_until(lambda: "b" in r._parts[("s", 0)].insync, timeout=10, what="the copy in sync")
    r.close()
    assert r.cut == [2]  # offsets 3 and 4 of the dead owner
    assert copy_store.read("s", 1, 0, 0, None)[0] == owner_store.read("s", 1, 0, 0, None, upto=6)[0]
    assert copy_store.read("s", 1, 0, 0, None)[0] == [0, 1, 2, 100, 101, 102]


def test_copies_of_re_created_partitions_are_emptied_with_their_filters(tmp_path):
    """A recovery re-creates partitions 0 and 1: every copy of them held here starts again, empty.

    A copy that stays one (0) is opened again, empty, at the new epoch; one
    that does not (1) is gone; a partition not re-created (2) keeps its
    records and filters; nothing is opened that was not held (3).
    """
    from aimss_dask.core.specs import Origin
    from aimss_dask.node.dedup import OriginFilter
    from aimss_dask.node.follower import Follower
    from aimss_dask.node.writers import WriterSeqs

    store = LogStore(budget=2**20, spill_root=str(tmp_path))
    store.open("s", 1, [0, 1, 2])
    writers, origins = WriterSeqs(), OriginFilter()
    origins.track("s", 1, inputs=4)
    f = Follower(store, writers, origins, threading.Lock())
    for p in (0, 1, 2):
        f.append("s", 1, p, [p, p], [8, 8], (5, 1, 0), (7, 0), at=0)
    origins.track("s", 3, inputs=4, since=1)  # the recovery's epoch 3 continues epoch 1
    store.open("s", 3, [], since=1)
    assert f.reset("s", 3, 1, [0, 1, 3], keep=[0, 3]) == [0, 1]
    assert store.held("s", 3, 0) == 0 and store.partition_stats("s", 1) is None
    assert store.partition_stats("s", 3) is None
    assert store.read("s", 3, 2, 0, None)[0] == [2, 2]
    assert writers.table("s", 1, 0) == {} and writers.table("s", 1, 2) == {7: 2}
    assert origins.admit("s", 3, 0, Origin(5, attempt=2))  # a re-run's copy is the first one now
    assert not origins.admit("s", 3, 2, Origin(5, attempt=2))  # still held


def test_a_copy_that_refuses_a_group_learns_nothing_of_it(tmp_path):
    """A sealed copy refuses a late group: its filters must not name the group's writer numbers or
    origin, or the writer's send of them again, once this copy owns the partition, would be dropped."""
    from aimss_dask.core.errors import StreamSealedError
    from aimss_dask.core.specs import Origin
    from aimss_dask.node.dedup import OriginFilter
    from aimss_dask.node.follower import Follower
    from aimss_dask.node.writers import WriterSeqs

    store = LogStore(budget=2**20, spill_root=str(tmp_path))
    store.open("s", 1, [0])
    writers, origins = WriterSeqs(), OriginFilter()
    origins.track("s", 1, inputs=4)
    f = Follower(store, writers, origins, threading.Lock())
    f.append("s", 1, 0, [b"a"], [1], (2, 1, 0), (7, 0), at=0)
    store.seal("s", 1, [0])
    with pytest.raises(StreamSealedError):
        f.append("s", 1, 0, [b"b"], [1], (3, 1, 0), (7, 1), at=1)
    assert store.read("s", 1, 0, 0)[0] == [b"a"]
    assert writers.table("s", 1, 0) == {7: 1}  # the refused group's number is not taken
    assert origins.admit("s", 1, 0, Origin(3, attempt=2))  # nor its input: a send again is stored
    assert not origins.admit("s", 1, 0, Origin(2, attempt=2))


def test_a_copy_learns_the_writer_numbers_of_a_group_its_owner_dropped_as_a_second_copy(tmp_path):
    """A marker (no records, a writer tag) moves a copy's writer numbers on, and stores nothing."""
    from aimss_dask.core.specs import StreamSpec
    from aimss_dask.node.replication import Replicator

    class Recording(Replicator):
        def _transmit(self, d, groups, conn):
            self.sent.extend(groups)
            return {"errors": {}}, conn

    store = LogStore(budget=2**20, spill_root=str(tmp_path))
    store.open("s", 1, [0])
    r = Recording(store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None)
    r.sent = []
    r.configure(StreamSpec(name="s", partitions=1, owners=("a",), epoch=1, replicas=(("b",),), replication=2),
                fresh=True)
    hold = threading.Event()
    real = r._transmit

    def held_back(d, groups, conn):
        assert hold.wait(10)
        return real(d, groups, conn)

    r._transmit = held_back
    with r.append_lock:
        assert r.shipped("s", 0, 0, [], [], None, None) == 0  # nothing, no writer: nothing to send
        mark = r.shipped("s", 0, 0, [], [], None, (7, 4))
    assert mark == 1
    # The writer is answered only once every copy in sync has the marker.
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(r.wait_marker("s", 0, mark)))
    waiter.start()
    time.sleep(0.2)
    assert not waited
    hold.set()
    waiter.join(10)
    assert waited == [True]
    ((name, epoch, p, records, sizes, origin, writer, at),) = r.sent
    assert (records, writer, at) == ([], (7, 4), 0)
    r.close()


@pytest.mark.parametrize("owner_whole", [True, False])
def test_a_copy_refuses_an_unseen_writer_mid_way_only_while_every_writer_of_its_partition_is_known(
    tmp_path, owner_whole
):
    """A writer not seen before must start at 0 on a partition held since its creation, anywhere elsewhere.

    Held since its creation, a partition knows every writer that stored a
    record in it: an unseen one starting above 0 lost records on the way,
    and taking it would drop them later as stored (a silent loss), so it is
    refused. A copy caught up by an owner that cannot say so (it was cut
    back, or re-created) gets records without writer tags: a writer it does
    not know may have stored some, and goes on from where it was.
    """
    from aimss_dask.core.errors import WriteOrderError
    from aimss_dask.core.specs import StreamSpec
    from aimss_dask.node.dedup import OriginFilter
    from aimss_dask.node.follower import Follower
    from aimss_dask.node.writers import WriterSeqs

    copy_store = LogStore(budget=2**20, spill_root=str(tmp_path / "copy"))
    copy_store.open("s", 1, [0])
    copy_writers = WriterSeqs()
    copy_writers.begin("s", 1, 0)  # a copy from the stream's creation that fell behind
    follower = Follower(copy_store, copy_writers, OriginFilter(), threading.Lock())
    owner_store = LogStore(budget=2**20, spill_root=str(tmp_path / "owner"))
    owner_store.open("s", 1, [0])
    writers = WriterSeqs()
    if owner_whole:
        writers.begin("s", 1, 0)
        for i in range(3):
            assert writers.admit("s", 1, 0, (7, i), 1) == 0
    else:
        # A promoted copy that was cut back: it holds writer 8's records and forgot their numbers.
        writers.admit("s", 1, 0, (7, 0), 3)
        writers.forget_partition("s", 1, 0)
    owner_store.append("s", 1, 0, [0, 1, 2], [8, 8, 8])
    r = linked_replicator(follower, copy_store)(
        owner_store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None, writers=writers
    )
    r.configure(StreamSpec(name="s", partitions=1, owners=("a",), epoch=1, replicas=(("b",),), replication=2))
    wait_until(lambda: "b" in r._parts[("s", 0)].insync, timeout=10, what="the copy in sync")
    r.close()
    assert copy_store.read("s", 1, 0, 0, None)[0] == [0, 1, 2]
    assert copy_writers.whole("s", 1, 0) is owner_whole
    # Promoted: a writer that stored here goes on; one it does not know...
    assert copy_writers.admit("s", 1, 0, (7, 3), 1) == 0
    if owner_whole:
        with pytest.raises(WriteOrderError, match=r"writer 8 .* from sequence number 2, but it stored none here"):
            copy_writers.admit("s", 1, 0, (8, 2), 1)
        assert copy_writers.table("s", 1, 0) == {7: 4}  # refused: nothing changed
        assert copy_writers.admit("s", 1, 0, (8, 0), 1) == 0
    else:
        assert copy_writers.admit("s", 1, 0, (8, 2), 1) == 0


def test_a_producer_that_skipped_sequence_numbers_is_refused_not_stored(cluster4):
    """The owner of a partition held since its creation refuses a writer whose first number is not 0.

    Stands in for a bug in the producer's order (records 0 to 2 lost on the
    way): taken, the owner would drop those records as stored when they
    came, silently. Refused, the writer fails loudly and the partition keeps
    what it held.
    """
    from aimss_dask.api.context import _client_producers
    from aimss_dask.core.errors import WriteOrderError

    client = cluster4
    with client.as_current():  # a module fixture of this file may have made another client the default
        _wait_running(client, 4)
        s = aimss_dask.create_stream("rep-skip", 2, replication=2)
        for i in range(5):
            s.write(i, partition=0)
        s.flush()
        producer = _client_producers[client]
        with producer._cond:
            # Its first write to partition 1: numbers 0 to 2 "lost on the way".
            producer._seq[("rep-skip", s.spec.first_epoch, 1)] = 3
        s.write(100, partition=1)
        with pytest.raises(WriteOrderError, match=r"'rep-skip' partition 1 from sequence number 3, but it stored none"):
            s.flush()
        assert s.info()["records"] == [5, 0]
        aimss_dask.destroy_stream("rep-skip")


def test_a_catch_up_cut_short_by_a_destroy_is_not_a_warning_and_one_that_fails_otherwise_is(tmp_path, caplog):
    """A copy catching up when its stream is destroyed fails there: expected, so not logged as a problem."""
    import logging

    from aimss_dask.core.errors import StreamSealedError
    from aimss_dask.core.specs import StreamSpec
    from aimss_dask.node.replication import Replicator

    class Refused(Replicator):
        """The copy refuses the catch-up, once the test says so (``go``)."""

        go: threading.Event

        def _sync(self, d, part, conn):
            assert self.go.wait(10)
            raise StreamSealedError(f"stream {part.name!r} is sealed on this worker")

    def catch_up_fails(dropped: bool) -> list[logging.LogRecord]:
        store = LogStore(budget=2**20, spill_root=str(tmp_path / str(dropped)))
        store.open("s", 1, [0])
        r = Refused(store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None)
        r.go = threading.Event()
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="aimss_dask"):
            r.configure(StreamSpec(name="s", partitions=1, owners=("a",), epoch=1, replicas=(("b",),),
                                   replication=2))  # "b" is new: it catches up first
            if dropped:
                store.drop("s")  # destroyed while the copy catches up
            r.go.set()
            wait_until(lambda: not r._parts[("s", 0)].has("b"), timeout=10, what="the copy dropped")
        r.close()
        return [x for x in caplog.records if "catching up replica b" in x.getMessage()]

    (kept,) = catch_up_fails(dropped=False)
    assert kept.levelno == logging.WARNING
    (gone,) = catch_up_fails(dropped=True)
    assert gone.levelno == logging.DEBUG


def test_an_owner_tells_the_coordinator_of_each_copy_it_gives_up_on(tmp_path):
    """A copy given up on is reported ``dropped``, in sync or still catching up: the coordinator places another."""
    from distributed.utils import LoopRunner

    from aimss_dask.core.errors import StreamSealedError
    from aimss_dask.core.specs import StreamSpec
    from aimss_dask.node.replication import Replicator

    class Refused(Replicator):
        def _sync(self, d, part, conn):
            raise StreamSealedError(f"stream {part.name!r} is sealed on this worker")

        def _transmit(self, d, groups, conn):
            raise OSError(f"no route to {d.address}")

    told: list[dict] = []

    async def tell(msg: dict) -> dict:
        told.append(msg)
        return {}

    runner = LoopRunner(asynchronous=False)
    runner.start()
    store = LogStore(budget=2**20, spill_root=str(tmp_path))
    store.open("s", 1, [0, 1])
    r = Refused(store, loop=runner.loop, rpc=None, address="a", batch_size=2**20, credentials=None, tell=tell)
    try:
        # Partition 0's copy catches up (and fails); partition 1's is in sync, then unreachable.
        r.configure(StreamSpec(name="s", partitions=2, owners=("a", "a"), epoch=1, replicas=(("b",), ()),
                               replication=2))
        wait_until(lambda: any(m["replica"] == "b" for m in told), timeout=10, what="b reported")
        r.configure(StreamSpec(name="s", partitions=2, owners=("a", "a"), epoch=1, replicas=(("b",), ("c",)),
                               replication=2), fresh=True)
        with r.append_lock:
            r.shipped("s", 1, store.append("s", 1, 1, [b"x"], [1]), [b"x"], [1])
        wait_until(lambda: any(m["replica"] == "c" for m in told), timeout=10, what="c reported")
    finally:
        r.close()
        runner.stop()
    # b again each time the owner hears the copy is still listed (it tries once more).
    b = [m for m in told if m["replica"] == "b"]
    assert b and all({**m, "seq": 0} == {"name": "s", "epoch": 1, "partition": 0, "replica": "b", "seq": 0,
                                         "in_sync": False, "dropped": True} for m in b), b
    c = [m for m in told if m["replica"] == "c"]
    assert [(m["partition"], m["in_sync"], m.get("dropped")) for m in c] == [(1, False, True)]


def test_retiring_a_worker_of_a_replicated_stream_hands_over_to_its_copies(cluster4):
    """Open or sealed, a replicated stream loses nothing when a worker retires; its copies are rebuilt."""
    client = cluster4
    _wait_running(client, 4)
    s = aimss_dask.create_stream("rep-retire", 4, replication=2)
    done = aimss_dask.create_stream("rep-retire-sealed", 4, replication=2)
    for i in range(200):
        s.write(np.full(100, i), partition=i % 4)
        done.write(np.full(100, i), partition=i % 4)
    s.flush()
    done.seal()
    leaving = s.spec.owners[0]
    # Scale-down may take this worker (its partitions have copies elsewhere),
    # but never it together with every other holder of one of its partitions.
    close = client.run_on_scheduler(
        lambda dask_scheduler: [
            ws.address for ws in dask_scheduler.plugins["aimss"].valid_workers_downscaling(
                dask_scheduler, list(dask_scheduler.workers.values()))
        ]
    )
    assert len(close) < 4
    for p in range(4):
        assert {s.spec.owners[p], *s.spec.replicas[p]} - set(close)
    client.retire_workers([leaving])
    wait_until(lambda: leaving not in listed_workers(client), timeout=30, what="the worker gone")
    for i in range(200, 240):
        s.write(np.full(100, i), partition=i % 4)
    s.seal()
    for stream in (s, done):
        info = wait_until(
            lambda: (i := stream.info())["in_sync"] and all(len(c) == 1 for c in i["in_sync"]) and i,
            timeout=30, what=f"{stream.name}: every partition copied again",
        )
        assert info["lost"] == [] and leaving not in info["owners"]
        assert all(leaving not in c for c in info["replicas"])
    assert sorted(int(r[0]) for r in aimss_dask.read_from("rep-retire")) == list(range(240))
    assert sorted(int(r[0]) for r in aimss_dask.read_from("rep-retire-sealed")) == list(range(200))
    aimss_dask.destroy_stream("rep-retire")
    aimss_dask.destroy_stream("rep-retire-sealed")


def test_a_flush_of_local_writes_fails_when_the_copies_do_not_confirm_in_time(tmp_path, monkeypatch):
    """A task on the owner writes locally; its flush waits for the copies (wait_all). A copy alive but
    stuck past ACK_TIMEOUT: the flush must fail, as a remote writer's does, not return as if every copy
    held the records."""
    from aimss_dask.core.errors import AIMSSError
    from aimss_dask.core.specs import StreamSpec
    from aimss_dask.node import replication
    from aimss_dask.node.replication import Replicator

    monkeypatch.setattr(replication, "ACK_TIMEOUT", 0.3)
    stuck = threading.Event()

    class Stuck(Replicator):
        def _transmit(self, d, groups, conn):
            stuck.wait(10)
            return {"errors": {}}, conn

    store = LogStore(budget=2**20, spill_root=str(tmp_path))
    store.open("s", 1, [0, 1])
    r = Stuck(store, loop=None, rpc=None, address="a", batch_size=2**20, credentials=None)
    r.configure(StreamSpec(name="s", partitions=2, owners=("a", "x"), epoch=1, replicas=(("b",), ()), replication=2),
                fresh=True)
    try:
        with r.append_lock:
            first = store.append("s", 1, 0, [b"r"], [1])
            r.shipped("s", 0, first, [b"r"], [1])
        with pytest.raises(AIMSSError, match=r"replicas of stream 's' partitions \[0\] did not confirm"):
            r.wait_all(["s"])
    finally:
        stuck.set()
        r.close()
