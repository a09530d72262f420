"""Integration tests of the stream API on a real multi-process LocalCluster."""

from __future__ import annotations

import re
import threading
import time
from collections import defaultdict

import dask
import numpy as np
import pytest
from conftest import (
    assert_workers_clean,
    destroy_all_streams,
    make_cluster,
    unique_name,
    wait_until,
)
from distributed import Client, get_worker

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.coordinator.placement import partition_for_key

#: Every test here runs on a TCP and on a TLS cluster (conftest): the data plane is on both.
ALSO_TLS = True

N_PARTITIONS = 4


# -- task functions (module level: workers import them by reference) -------------------


def _produce(name: str, pid: int, n: int) -> int:
    """Write ``(pid, seq)`` records; the routing mode depends on ``pid``."""
    for seq in range(n):
        rec = (pid, seq)
        mode = pid % 3
        if mode == 0:
            aimss_dask.write_to(name, rec, key=pid)
        elif mode == 1:
            aimss_dask.write_to(name, rec)  # round-robin
        else:
            aimss_dask.write_to(name, rec, partition=(pid + seq) % N_PARTITIONS)
    return pid


def _read_partition(name: str, p: int, **kwargs) -> tuple[str, list]:
    return get_worker().address, list(aimss_dask.read_from(name, partition=p, **kwargs))


def _write_records(name: str, records: list, partition: int) -> str:
    s = aimss_dask.get_stream(name)
    for r in records:
        s.write(r, partition=partition)
    return get_worker().address


def _read_until_timeout(name: str, p: int, timeout: float) -> tuple[list, str, float]:
    got = []
    t0 = time.monotonic()
    try:
        for r in aimss_dask.read_from(name, partition=p, timeout=timeout):
            got.append(r)
    except aimss_dask.ReadTimeoutError as e:
        assert isinstance(e, TimeoutError)
        return got, str(e), time.monotonic() - t0
    return got, "", time.monotonic() - t0


def _where_and_what(records, tag):
    return get_worker().address, tag, list(records)


def _create_in_task(name: str) -> str:
    aimss_dask.create_stream(name, partitions=2)
    aimss_dask.write_to(name, b"from-task", partition=0)
    return name


# -- write many / read all ---------------------------------------------------------------


def test_many_producers_nothing_lost_nothing_duplicated_order_kept(client):
    name = unique_name("many")
    s = aimss_dask.create_stream(name, partitions=N_PARTITIONS)
    n_producers, n_records = 20, 50
    futs = client.map(_produce, [name] * n_producers, range(n_producers), [n_records] * n_producers)
    assert sorted(client.gather(futs)) == list(range(n_producers))
    s.seal()

    by_partition = {p: list(s.read(partition=p)) for p in range(N_PARTITIONS)}
    everything = [r for p in range(N_PARTITIONS) for r in by_partition[p]]
    expected = {(pid, seq) for pid in range(n_producers) for seq in range(n_records)}
    assert len(everything) == len(expected), "records lost or duplicated"
    assert set(everything) == expected

    # Reading the whole stream (no partition) yields the partitions in order.
    assert list(s.read()) == everything

    for p, recs in by_partition.items():
        per_producer = defaultdict(list)
        for pid, seq in recs:
            per_producer[pid].append(seq)
        for pid, seqs in per_producer.items():
            assert seqs == sorted(seqs), f"producer {pid} out of order in partition {p}"
            if pid % 3 == 0:  # key=pid: every record of the producer in one partition
                assert p == partition_for_key(pid, N_PARTITIONS)
                assert seqs == list(range(n_records))
            if pid % 3 == 2:  # explicit partition
                assert all((pid + seq) % N_PARTITIONS == p for seq in seqs)

    info = s.info()
    assert info["records"] == [len(by_partition[p]) for p in range(N_PARTITIONS)]
    assert sum(info["records"]) == n_producers * n_records
    assert info["sealed"] is True


def test_client_writes_tasks_read_on_every_worker(client):
    name = unique_name("c2t")
    s = aimss_dask.create_stream(name, partitions=2)
    owners = s.info()["owners"]
    assert len(set(owners)) == 2
    expected = {p: [np.full(4, 10 * p + i) for i in range(7)] for p in range(2)}
    for p in range(2):
        for a in expected[p]:
            s.write(a, partition=p)
    s.seal()
    # Every worker reads every partition: one read is local, the other remote.
    for w in owners:
        for p in range(2):
            addr, got = client.submit(_read_partition, name, p, workers=[w], pure=False).result()
            assert addr == w
            assert len(got) == len(expected[p])
            for a, b in zip(got, expected[p]):
                np.testing.assert_array_equal(a, b)


def test_tasks_write_client_reads(client):
    name = unique_name("t2c")
    s = aimss_dask.create_stream(name, partitions=2)
    owners = s.info()["owners"]
    futs = []
    for i, w in enumerate(owners):  # each worker writes to both partitions
        for p in range(2):
            recs = [("w", i, "p", p, k) for k in range(5)]
            futs.append(client.submit(_write_records, name, recs, p, workers=[w], pure=False))
    assert [f.result() for f in futs] == [owners[0], owners[0], owners[1], owners[1]]
    s.seal()
    for p in range(2):
        got = list(aimss_dask.read_from(name, partition=p))
        assert sorted(got) == sorted(("w", i, "p", p, k) for i in range(2) for k in range(5))
        for i in range(2):  # one writer's records keep their order
            assert [r for r in got if r[1] == i] == [("w", i, "p", p, k) for k in range(5)]


# -- consumer groups ---------------------------------------------------------------------


def test_consumer_group_resumes_at_committed_offset(client):
    name = unique_name("group")
    s = aimss_dask.create_stream(name, partitions=2)
    for i in range(10):
        s.write(i, partition=0)
    for i in range(3):
        s.write(100 + i, partition=1)
    s.seal()

    it = s.read(partition=0, group="g")
    first = [next(it) for _ in range(4)]
    assert first == [0, 1, 2, 3]
    it.close()
    # Records 0..2 were followed by a request for the next one: committed.
    # Record 3 was yielded but never acknowledged: not committed.
    assert s.info()["groups"]["g"] == [3, 0]

    second = list(s.read(partition=0, group="g"))
    assert second == [3, 4, 5, 6, 7, 8, 9]  # record 3 is delivered again
    assert s.info()["groups"]["g"] == [10, 0]
    assert list(s.read(partition=0, group="g")) == []  # nothing left for g

    # Another group has its own offsets; start= overrides the committed one.
    assert list(s.read(partition=0, group="h")) == list(range(10))
    assert list(s.read(partition=0, group="g", start=8)) == [8, 9]

    # A group across all partitions, stopped inside partition 1.
    it = s.read(group="all")
    got = [next(it) for _ in range(12)]
    assert got == list(range(10)) + [100, 101]
    it.close()
    assert s.info()["groups"]["all"] == [10, 1]
    assert list(s.read(group="all")) == [101, 102]
    assert s.info()["groups"] == {"g": [10, 0], "h": [10, 0], "all": [10, 3]}


# -- start / timeout / waiting readers -------------------------------------------------------


def test_explicit_start_offset(client):
    name = unique_name("start")
    s = aimss_dask.create_stream(name, partitions=2)
    for i in range(10):
        s.write(i, partition=1)
    s.seal()
    assert list(s.read(partition=1, start=6)) == [6, 7, 8, 9]
    assert list(s.read(partition=1, start=0)) == list(range(10))
    assert list(s.read(partition=1, start=10)) == []
    # start= applies to every partition when reading them all.
    assert list(s.read(start=9)) == [9]


def test_numpy_integers_are_ints_for_counts_partitions_offsets_and_timeouts(client):
    """Counts and indexes computed with NumPy (``np.int64``) are ints, not a wrong type."""
    name = unique_name("npint")
    s = aimss_dask.create_stream(name, partitions=np.int64(2))
    assert s.partitions == 2 and type(s.info()["partitions"]) is int
    for i in range(4):
        s.write(i, partition=np.int64(1))
        aimss_dask.write_to(name, -i, partition=np.uint8(0))
    s.seal()
    assert list(s.read(partition=np.int32(1), start=np.int64(2), timeout=np.float32(5))) == [2, 3]
    assert list(aimss_dask.read_from(name, partition=np.int64(0), start=np.int64(3))) == [-3]
    assert aimss_dask.shuffle_streams(name, timeout=np.float64(0)) == []


def test_read_open_partition_times_out_after_existing_records(client):
    name = unique_name("timeout")
    s = aimss_dask.create_stream(name, partitions=2)
    owners = s.info()["owners"]
    for i in range(3):
        s.write(i, partition=0)
    s.flush()

    got = []
    t0 = time.monotonic()
    with pytest.raises(aimss_dask.ReadTimeoutError, match=rf"offset 3 of stream '{name}' partition 0") as ei:
        for r in s.read(partition=0, timeout=0.5):
            got.append(r)
    elapsed = time.monotonic() - t0
    assert isinstance(ei.value, TimeoutError)
    assert got == [0, 1, 2]
    assert 0.45 <= elapsed < 5

    # Inside tasks: on the owner (local wait) and on the other worker (remote).
    for w in owners:
        recs, msg, elapsed = client.submit(_read_until_timeout, name, 0, 0.5, workers=[w], pure=False).result()
        assert recs == [0, 1, 2]
        assert "offset 3" in msg and "timeout=0.5" in msg
        assert 0.45 <= elapsed < 5

    # timeout=0 on the open partition: what exists, then the error at once.
    it = s.read(partition=0, timeout=0)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(aimss_dask.ReadTimeoutError):
        next(it)


def _threaded_reader(name: str, p: int, out: list, errors: list) -> None:
    try:
        for r in aimss_dask.read_from(name, partition=p):
            out.append(r)
    except BaseException as e:  # reported to the test thread
        errors.append(e)


def test_waiting_reader_gets_later_records_and_ends_at_seal(client):
    name = unique_name("wait")
    s = aimss_dask.create_stream(name, partitions=2)
    owners = s.info()["owners"]
    out: list = []
    errors: list = []
    t = threading.Thread(target=_threaded_reader, args=(name, 0, out, errors), daemon=True)
    t.start()
    # A reader task on the owner waits locally for the same records.
    local = client.submit(_read_partition, name, 0, workers=[owners[0]], pure=False)
    time.sleep(0.2)  # let both readers block on the empty partition
    assert out == [] and t.is_alive() and not local.done()

    for i in range(3):
        s.write(i, partition=0)
    s.flush()
    wait_until(lambda: len(out) == 3, timeout=4, what="the waiting reader receiving 3 records")
    assert out == [0, 1, 2] and t.is_alive()

    for i in range(3, 6):
        s.write(i, partition=0)
    t_seal = time.monotonic()
    s.seal()
    t.join(timeout=4)
    assert not t.is_alive(), "reader did not end after seal()"
    # The reader is woken by the seal, not by its 5 s re-poll.
    assert time.monotonic() - t_seal < 4
    assert errors == []
    assert out == list(range(6))
    addr, got = local.result(timeout=10)
    assert addr == owners[0]
    assert got == list(range(6))


def test_remote_reader_waiting_on_a_destroyed_stream_fails_promptly(client):
    """A reader blocked on an open partition learns at once that the stream is gone.

    The local path (store.wait) is woken by the drop; the remote one must be too,
    not only when its 5 s re-poll (MAX_READ_WAIT) comes round.
    """
    name = unique_name("gone")
    s = aimss_dask.create_stream(name, partitions=2)
    out: list = []
    errors: list = []
    t = threading.Thread(target=_threaded_reader, args=(name, 0, out, errors), daemon=True)
    t.start()
    time.sleep(0.2)  # let the reader block on the empty partition
    assert t.is_alive()
    t0 = time.monotonic()
    aimss_dask.destroy_stream(name)
    t.join(timeout=2.5)
    waited = time.monotonic() - t0
    still_blocked = t.is_alive()
    t.join(timeout=10)  # let it finish either way, so it does not outlive the test
    assert not still_blocked, f"remote reader still blocked {waited:.1f}s after destroy_stream"
    assert len(errors) == 1 and isinstance(errors[0], aimss_dask.StreamNotFoundError)
    assert s.name in str(errors[0])


def test_seal_stores_what_another_client_wrote_before(client, cluster):
    """seal(): "Everything written before seal() is called, by any task or client, is stored first."

    A second client writes (buffered in its producer for up to ``linger``), then
    the first client seals. A long linger makes the window deterministic.
    """
    name = unique_name("seal2")
    s = aimss_dask.create_stream(name, partitions=2, share="write")  # c2 writes too
    c2 = Client(cluster, set_as_default=False)
    try:
        # c2's producer is made (reading the config) on its first write.
        with dask.config.set({"aimss.linger": "2s"}), c2.as_current():
            for i in range(10):
                aimss_dask.write_to(name, i, partition=0)
        s.seal()  # from the first client
        assert list(s.read(partition=0)) == list(range(10))
    finally:
        with c2.as_current():
            try:
                aimss_dask.get_stream(name).flush()
            except aimss_dask.StreamSealedError:
                pass  # the rejected writes are reported here
        c2.close()


# -- shuffle barrier ---------------------------------------------------------------------


def test_shuffle_streams_returns_once_every_child_is_sealed(client):
    parent = unique_name("parent")
    aimss_dask.create_stream(parent, partitions=1)
    kids = [aimss_dask.create_stream(f"{parent}/c{i}", partitions=2, parent=parent) for i in range(2)]
    for k in kids:
        k.write(b"x", partition=1)
    events: list[tuple[str, float]] = []

    def seal_later():
        time.sleep(0.3)
        events.append(("seal0", time.monotonic()))
        kids[0].seal()
        time.sleep(0.3)
        events.append(("seal1", time.monotonic()))
        kids[1].seal()

    t = threading.Thread(target=seal_later, daemon=True)
    t0 = time.monotonic()
    t.start()
    children = aimss_dask.shuffle_streams(parent)
    t_done = time.monotonic()
    t.join(timeout=10)
    assert children == sorted(k.name for k in kids)
    assert [e[0] for e in events] == ["seal0", "seal1"]
    assert t_done >= events[1][1], "shuffle_streams returned before the last child was sealed"
    assert t_done - t0 >= 0.55
    assert all(aimss_dask.get_stream(c).info()["sealed"] for c in children)
    # Already sealed: returns at once.
    assert aimss_dask.shuffle_streams(parent, timeout=1) == children


def test_shuffle_streams_timeout_names_open_child(client):
    parent = unique_name("parent")
    aimss_dask.create_stream(parent, partitions=1)
    done = aimss_dask.create_stream(f"{parent}/done", partitions=1, parent=parent)
    aimss_dask.create_stream(f"{parent}/open", partitions=1, parent=parent)
    done.seal()
    t0 = time.monotonic()
    with pytest.raises(aimss_dask.ReadTimeoutError, match=rf"still open: \['{parent}/open'\]") as ei:
        aimss_dask.shuffle_streams(parent, timeout=0.5)
    assert isinstance(ei.value, TimeoutError)
    assert 0.45 <= time.monotonic() - t0 < 5


def test_destroying_parent_destroys_children(client):
    parent = unique_name("parent")
    aimss_dask.create_stream(parent, partitions=1)
    kid = aimss_dask.create_stream(f"{parent}/kid", partitions=2, parent=parent)
    grandkid = aimss_dask.create_stream(f"{parent}/kid/gk", partitions=1, parent=kid.name)
    kid.write(np.ones(100), partition=0)
    grandkid.write(np.ones(100), partition=0)
    kid.flush()
    grandkid.flush()
    assert sum(st["memory_bytes"] for st in aimss_dask.status().values()) == 1600

    aimss_dask.destroy_stream(parent)
    for n in (parent, kid.name, grandkid.name):
        with pytest.raises(aimss_dask.StreamNotFoundError, match=n):
            aimss_dask.get_stream(n)
    assert_workers_clean(aimss_dask.status())


def test_destroying_parent_wakes_a_waiting_shuffle(client):
    parent = unique_name("parent")
    aimss_dask.create_stream(parent, partitions=1)
    aimss_dask.create_stream(f"{parent}/c", partitions=1, parent=parent)
    errors: list = []

    def wait():
        try:
            aimss_dask.shuffle_streams(parent)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()
    aimss_dask.destroy_stream(parent)
    t.join(timeout=5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], aimss_dask.StreamNotFoundError)


def test_shuffle_streams_timeout_zero_returns_when_all_children_sealed(client):
    """timeout=0 means "do not wait": with every child sealed there is nothing to wait for."""
    parent = unique_name("parent")
    aimss_dask.create_stream(parent, partitions=1)
    kid = aimss_dask.create_stream(f"{parent}/c", partitions=1, parent=parent)
    kid.seal()
    assert aimss_dask.shuffle_streams(parent, timeout=0) == [kid.name]


# -- map_partitions placement -----------------------------------------------------------------


def test_map_partitions_runs_on_partition_owners(client):
    name = unique_name("mp")
    s = aimss_dask.create_stream(name, partitions=6)
    owners = s.info()["owners"]
    workers = set(listed_workers(client))
    assert set(owners) == workers and len(workers) == 2
    assert sorted(owners.count(w) for w in workers) == [3, 3]
    for p in range(6):
        for i in range(p + 1):
            s.write((p, i), partition=p)
    s.seal()
    futs = s.map_partitions(_where_and_what, tag="t")
    assert len(futs) == 6
    results = client.gather(futs)
    for p, (addr, tag, recs) in enumerate(results):
        assert addr == owners[p], f"partition {p} ran on {addr}, owner is {owners[p]}"
        assert tag == "t"
        assert recs == [(p, i) for i in range(p + 1)]


# -- cleanup when a client leaves ---------------------------------------------------------------


def test_streams_of_a_disconnected_client_are_destroyed_unless_persist(client, cluster):
    gone = unique_name("gone")
    kept = unique_name("kept")
    by_task = unique_name("bytask")
    c2 = Client(cluster)
    try:
        with c2.as_current():
            s = aimss_dask.create_stream(gone, partitions=2)
            s.write(np.arange(10), partition=0)
            s.flush()
            k = aimss_dask.create_stream(kept, partitions=2, persist=True)
            k.write(np.arange(5), partition=1)
            k.flush()
            token = k.token
            assert c2.submit(_create_in_task, by_task, pure=False).result() == by_task
    finally:
        c2.close()

    def destroyed(n):
        try:
            aimss_dask.get_stream(n)
        except aimss_dask.StreamNotFoundError:
            return True
        except aimss_dask.StreamPermissionError:
            return False  # still there, c2's: the scheduler has not seen c2 leave yet
        return False

    def dropped_everywhere() -> bool:
        # The coordinator forgets them first; each worker drops its logs when its word arrives.
        return not any(gone in st["streams"] or by_task in st["streams"] for st in aimss_dask.status().values())

    try:
        wait_until(lambda: destroyed(gone) and destroyed(by_task), timeout=5, what="cleanup of the client's streams")
        wait_until(dropped_everywhere, timeout=10, what="the workers' logs of those streams dropped")
        with pytest.raises(aimss_dask.StreamPermissionError, match="ask the owner"):
            aimss_dask.get_stream(kept)  # c2's, though c2 left
        ks = aimss_dask.get_stream(kept, token=token)  # claimed: this client's now
        ks.seal()
        got = list(ks.read(partition=1))
        assert len(got) == 1
        np.testing.assert_array_equal(got[0], np.arange(5))
    finally:
        # Whatever failed above, the persisted stream is not left to the next tests (nobody else may destroy it).
        aimss_dask.get_stream(kept, token=token)  # claimed (again): this client may destroy it
        aimss_dask.destroy_stream(kept)


# -- workers that join later, repeated registration ------------------------------------------


def test_plugin_reaches_a_worker_added_later():
    with make_cluster(1) as cl, Client(cl) as c:
        c.register_plugin(aimss_dask.AIMSS())
        first = set(listed_workers(c))
        assert set(aimss_dask.status()) == first
        cl.scale(2)
        c.wait_for_workers(2)
        new = set(listed_workers(c)) - first
        assert len(new) == 1
        (new_worker,) = new
        wait_until(lambda: set(aimss_dask.status()) == first | new, timeout=10, what="status() listing the new worker")

        name = unique_name("late")
        s = aimss_dask.create_stream(name, partitions=4)
        owners = s.info()["owners"]
        assert owners.count(new_worker) == 2
        for p in range(4):
            s.write(np.full(3, p), partition=p)
        s.flush()  # stored before the task's write: order across producers is by arrival
        c.submit(_write_records, name, ["task"], owners.index(new_worker), workers=[new_worker], pure=False).result()
        s.seal()
        p_new = owners.index(new_worker)
        addr, got = c.submit(_read_partition, name, p_new, workers=[new_worker], pure=False).result()
        assert addr == new_worker
        assert len(got) == 2
        np.testing.assert_array_equal(got[0], np.full(3, p_new))
        assert got[1] == "task"
        assert [int(r[0]) for p in range(4) for r in s.read(partition=p) if not isinstance(r, str)] == [0, 1, 2, 3]
        st = aimss_dask.status()
        assert name in st[new_worker]["streams"]
        assert st[new_worker]["memory_bytes"] > 0
        destroy_all_streams()
        assert_workers_clean(aimss_dask.status())


def test_registering_twice_keeps_streams(client):
    name = unique_name("twice")
    s = aimss_dask.create_stream(name, partitions=2)
    for i in range(4):
        s.write(i, partition=i % 2)
    s.flush()
    client.register_plugin(aimss_dask.AIMSS())
    client.register_plugin(aimss_dask.AIMSS(memory_limit="32MiB"))
    assert aimss_dask.get_stream(name).spec == s.spec
    s.write(4, partition=0)
    s.seal()
    assert list(s.read()) == [0, 2, 4, 1, 3]
    assert all(name in st["streams"] for st in aimss_dask.status().values())


# -- info() and status() -----------------------------------------------------------------------


def test_info_and_status(client):
    name = unique_name("info")
    s = aimss_dask.create_stream(name, partitions=2)
    info = s.info()
    workers = set(listed_workers(client))
    assert set(info) == {
        "name", "partitions", "owners", "epoch", "parent", "persist", "sealed",
        "lost", "lost_offsets", "records", "bytes", "spilled_bytes", "groups",
        "replicas", "in_sync", "replication", "owner", "share", "io_priority",
    }
    assert info["owner"] == client.id and info["share"] is None and info["io_priority"] == 0
    assert info["name"] == name
    assert info["partitions"] == 2
    assert isinstance(info["owners"], list) and set(info["owners"]) == workers
    assert info["owners"] == list(s.spec.owners)
    assert info["sealed"] is False and info["persist"] is False and info["parent"] is None
    assert info["lost"] == [] and info["lost_offsets"] == {} and info["records"] == [0, 0] and info["bytes"] == [0, 0]
    assert info["spilled_bytes"] == 0 and info["groups"] == {}

    for _ in range(3):
        s.write(np.zeros(100, dtype="float64"), partition=0)  # 800 bytes each
    s.write(np.zeros(10, dtype="int8"), partition=1)  # 10 bytes
    s.flush()
    info = s.info()
    assert info["records"] == [3, 1]
    assert info["bytes"] == [2400, 10]
    assert info["spilled_bytes"] == 0

    st = aimss_dask.status()
    assert set(st) == workers and st.silent == []
    for bad, error in ((0, aimss_dask.InvalidArgumentError), (float("nan"), aimss_dask.InvalidArgumentError),
                       ("2s", aimss_dask.InvalidTypeError), (None, aimss_dask.InvalidTypeError)):
        with pytest.raises(error, match=re.escape(f"status(timeout={bad!r})")):
            aimss_dask.status(timeout=bad)
    for addr, w in st.items():
        assert {"budget", "memory_bytes", "spilled_bytes", "peak_memory", "streams", "spill_directory"} <= set(w)
        assert w["streams"] == [name]
        assert w["budget"] >= 16 * 2**20
        assert w["peak_memory"] >= w["memory_bytes"]
        assert w["spilled_bytes"] == 0
    assert st[info["owners"][0]]["memory_bytes"] == 2400
    assert st[info["owners"][1]]["memory_bytes"] == 10

    s.seal()
    list(s.read(partition=0, group="g"))
    info = s.info()
    assert info["sealed"] is True
    assert info["groups"] == {"g": [3, 0]}
    assert info["epoch"] == s.spec.epoch


def _write_views_on_the_owner(name: str) -> dict[str, bool]:
    """On partition 0's owner: write a whole array, a small slice of it, and a slice of a frame; which pin ``big``."""
    import pandas as pd

    big = np.arange(2**20, dtype="f8")  # 8 MiB
    frame = pd.DataFrame({"a": big, "b": big + 1})
    s = aimss_dask.get_stream(name)
    s.write(big, partition=0)
    s.write(big[:10], partition=0)
    s.write(frame.iloc[:5], partition=0)
    s.seal()
    whole, piece, rows = aimss_dask.read_from(name, partition=0)  # local: the stored objects themselves
    np.testing.assert_array_equal(piece, big[:10])
    pd.testing.assert_frame_equal(rows, frame.iloc[:5])
    return {
        "whole": bool(np.shares_memory(whole, big)),
        "piece": bool(np.shares_memory(piece, big)),
        "rows": any(np.shares_memory(rows[c].to_numpy(), frame[c].to_numpy()) for c in rows),
    }


def test_a_small_view_written_on_its_owner_is_stored_as_a_copy_not_pinning_its_array(client):
    # Stored as it is, big[:10] would keep all 8 MiB alive while the log counts 80 bytes.
    name = unique_name("views")
    s = aimss_dask.create_stream(name, partitions=1)
    owner = s.spec.owners[0]
    pinned = client.submit(_write_views_on_the_owner, name, workers=[owner], pure=False).result()
    # The whole array is stored without a copy; the slices own their bytes.
    assert pinned == {"whole": True, "piece": False, "rows": False}
    assert s.info()["bytes"][0] < 8 * 2**20 + 2**16
    aimss_dask.destroy_stream(name)


def test_spill_shows_in_info_and_status_and_is_cleaned_up():
    with make_cluster(1) as cl, Client(cl) as c:
        c.register_plugin(aimss_dask.AIMSS(memory_limit="1MiB", segment_size="128KiB"))
        name = unique_name("spill")
        s = aimss_dask.create_stream(name, partitions=1)
        arrays = [np.full(16 * 1024, i, dtype="float64") for i in range(40)]  # 128 KiB each, 5 MiB in all
        for a in arrays:
            s.write(a)
        s.seal()
        info = s.info()
        assert info["records"] == [40]
        assert info["bytes"] == [40 * 128 * 1024]
        assert info["spilled_bytes"] > 0
        (w,) = aimss_dask.status().values()
        assert w["spilled_bytes"] == info["spilled_bytes"]
        assert w["memory_bytes"] <= 1024 * 1024
        assert w["memory_bytes"] + w["spilled_bytes"] == 40 * 128 * 1024
        got = list(s.read())
        assert len(got) == 40
        for a, b in zip(got, arrays):
            np.testing.assert_array_equal(a, b)
        aimss_dask.destroy_stream(name)
        assert_workers_clean(aimss_dask.status())
