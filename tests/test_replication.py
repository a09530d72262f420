"""Replicated streams (issue 19, items 1-2): every copy stored before a writer is answered,
and a replica that takes over from an owner SIGKILLed mid-stream loses nothing."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from distributed import Client, LocalCluster

import aimss_dask
from aimss_dask.coordinator.placement import place_replicas
from aimss_dask.coordinator.state import CoordinatorState
from aimss_dask.core.errors import InvalidArgumentError, ReplicaGapError
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


@pytest.fixture(scope="module")
def cluster3():
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        yield client


def test_a_replica_takes_over_from_a_killed_owner_and_loses_nothing(cluster3):
    client = cluster3
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
    for i in range(300, 600):
        s.write(np.full(1000, i), partition=i % 3)
    s.flush()
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
