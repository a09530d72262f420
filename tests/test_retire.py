"""Graceful retirement: a worker Dask retires hands its partitions over before it goes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import unique_name, wait_until
from distributed import Client, Event, LocalCluster, get_worker

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.log.store import LogStore


@pytest.fixture
def client():
    with LocalCluster(
        n_workers=3, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS())
        yield c


def _fill(name: str, partitions: int, per: int) -> aimss_dask.Stream:
    s = aimss_dask.create_stream(name, partitions=partitions)
    for p in range(partitions):
        for i in range(per):
            s.write(np.full(1000, p * 1000 + i, dtype=np.int64), partition=p)
    s.flush()
    return s


def _values(records) -> list[int]:
    return [int(r[0]) for r in records]


def _where_and_len(records, event: str) -> tuple[str, int]:
    # Held until the retirement is over: the victim's readers are running
    # there when it leaves, and Dask hands them back.
    Event(event).wait()
    return get_worker().address, sum(1 for _ in records)


def test_retire_workers_moves_sealed_partitions_and_their_readers(client):
    name = unique_name("retire")
    s = _fill(name, partitions=6, per=20)
    s.seal()
    owners = s.info()["owners"]
    victim = owners[0]
    mine = [p for p, w in enumerate(owners) if w == victim]
    assert mine
    # A consumer group half way through the victim's first partition.
    reader = aimss_dask.read_from(name, partition=mine[0], group="g")
    half = [int(next(reader)[0]) for _ in range(11)]
    reader.close()

    # Readers submitted before the retirement, waiting on it: they follow
    # the partitions to their new owners.
    go = Event()
    futs = s.map_partitions(_where_and_len, go.name)
    wait_until(
        lambda: sum(len(v) for v in client.processing().values()) == 6, timeout=10, what="readers running"
    )

    retired = client.retire_workers([victim])
    assert victim in retired
    wait_until(lambda: victim not in listed_workers(client), timeout=30, what="retirement")
    go.set()

    info = s.info()
    assert victim not in info["owners"]
    assert info["lost"] == [] and not info["lost_offsets"]
    assert info["records"] == [20] * 6
    # Partitions that did not live on the victim stayed where they were.
    assert [w for p, w in enumerate(info["owners"]) if p not in mine] == [
        w for p, w in enumerate(owners) if p not in mine
    ]
    for p in range(6):
        assert _values(s.read(partition=p)) == [p * 1000 + i for i in range(20)]
    # The group goes on from its committed offset, nothing twice, nothing lost.
    expected = [mine[0] * 1000 + i for i in range(20)]
    assert half == expected[:11]
    rest = _values(aimss_dask.read_from(name, partition=mine[0], group="g"))
    # At-least-once: the 11th record counts as consumed once the next is asked for.
    assert len(rest) in (9, 10) and rest == expected[20 - len(rest):]
    placed = client.gather(futs)
    assert [n for _, n in placed] == [20] * 6
    assert [w for w, _ in placed] == info["owners"]
    # No copy left behind: every worker holds exactly the partitions it owns.
    held = client.run(lambda dask_worker: sorted(  # noqa: E731
        p for p, _ in dask_worker.plugins["aimss"].store.stream_stats(name).items()
    ))
    for w, ps in held.items():
        assert ps == [p for p, o in enumerate(info["owners"]) if o == w], (w, ps)


def test_retiring_an_owner_of_an_open_stream_names_the_loss(client):
    name = unique_name("open")
    s = _fill(name, partitions=3, per=2)
    owners = s.info()["owners"]
    victim = owners[1]
    client.retire_workers([victim])
    wait_until(lambda: victim not in listed_workers(client), timeout=30, what="retirement")
    # Open partitions cannot move while written: the loss is named, never a gap.
    wait_until(lambda: s.info()["lost"] == [1], timeout=10, what="the loss of partition 1")
    with pytest.raises(aimss_dask.PartitionLostError, match=r"partition\(s\) \[1\]"):
        list(s.read(partition=1))


def test_scale_down_spares_owners_of_open_streams_and_takes_them_once_sealed(client):
    name = unique_name("adaptive")
    s = _fill(name, partitions=3, per=2)
    assert len(set(s.info()["owners"])) == 3

    def to_close() -> list[str]:
        return list(client.sync(client.scheduler.workers_to_close, n=2))

    # Every worker owns a partition being written: none may go.
    assert to_close() == []
    s.seal()
    picked = to_close()
    assert len(picked) == 2
    client.retire_workers(picked)
    wait_until(lambda: len(listed_workers(client)) == 1, timeout=30, what="scale-down")
    (last,) = listed_workers(client)
    info = s.info()
    assert info["owners"] == [last] * 3, info
    for p in range(3):
        assert _values(s.read(partition=p)) == [p * 1000, p * 1000 + 1]


def test_a_moved_partition_keeps_its_offsets():
    # The new owner's log starts where the old one's was trimmed to.
    store = LogStore(budget=2**20, spill_root="/tmp", segment_size=2**16)
    store.open("s", 1, [0, 1], {1: 7})
    assert store.bounds("s", 1, 1) == (7, 7, False)
    assert store.append("s", 1, 1, ["a", "b"], [1, 1]) == 7
    assert store.read("s", 1, 1, 7)[0] == ["a", "b"]
    with pytest.raises(aimss_dask.InvalidOffsetError, match="was trimmed"):
        store.read("s", 1, 1, 3)
    assert store.bounds("s", 1, 0) == (0, 0, False)
    # A repeated open keeps what is there.
    store.open("s", 1, [1], {1: 0})
    assert store.bounds("s", 1, 1) == (7, 9, False)


def test_cluster_scale_down_keeps_every_sealed_record():
    with LocalCluster(
        n_workers=3, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS())
        name = unique_name("scale")
        s = _fill(name, partitions=6, per=5)
        s.seal()
        cluster.scale(1)
        wait_until(lambda: len(listed_workers(c)) == 1, timeout=60, what="scale(1)")
        (last,) = listed_workers(c)
        info = s.info()
        assert info["owners"] == [last] * 6 and info["lost"] == []
        for p in range(6):
            assert _values(s.read(partition=p)) == [p * 1000 + i for i in range(5)]


def test_a_worker_closing_gracefully_at_the_end_of_its_lifetime_hands_over(client):
    # What a dask-jobqueue worker does when its --lifetime is up.
    name = unique_name("lifetime")
    s = _fill(name, partitions=3, per=4)
    s.seal()
    victim = s.info()["owners"][2]

    async def close_gracefully(dask_worker) -> None:
        await dask_worker.close_gracefully(reason="lifetime")

    client.run(close_gracefully, workers=[victim], wait=False)
    wait_until(lambda: victim not in listed_workers(client), timeout=30, what="the worker to leave")
    wait_until(lambda: victim not in s.info()["owners"], timeout=10, what="the new owner")
    assert s.info()["lost"] == []
    assert _values(s.read(partition=2)) == [2000 + i for i in range(4)]



def test_a_worker_process_sent_sigterm_hands_over_before_it_exits(client):
    """As a batch system ends a job: SIGTERM straight to the worker process (not through its nanny).

    Without AIMSS the process dies at once with its partitions; with it, it
    closes gracefully and moves them first. Its nanny starts a new worker.
    """
    import os
    import signal

    name = unique_name("sigterm")
    s = _fill(name, partitions=3, per=4)
    s.seal()
    victim = s.info()["owners"][1]
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: victim not in s.info()["owners"], timeout=30, what="the new owner")
    assert s.info()["lost"] == []
    for p in range(3):
        assert _values(s.read(partition=p)) == [p * 1000 + i for i in range(4)]
    wait_until(lambda: len(listed_workers(client)) == 3, timeout=60, what="the nanny's new worker")
