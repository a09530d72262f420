"""A stateful test: streams written, sealed and read while worker processes are SIGKILLed.

Hypothesis drives a real ``LocalCluster`` (nanny processes, which restart
what is killed; a worker may also join) and checks every stream against a model after each step:

- a partition whose owner lives holds exactly the records written to it, in
  order;
- a partition whose owner was killed is never read short: reading it raises
  ``PartitionLostError``, whose ``.lost`` names it with the offsets it held
  (``(0, None)`` while open, since records may have arrived after the last
  report; ``(0, end)`` once sealed), and a write to it is refused the same way;
- sealing a stream with a lost partition raises, and still seals the rest.

Streams are plain user streams with one copy (``replication=1``): what dies
with a worker is lost, and must be said, never skipped. The same machine
with two copies of every partition (:class:`ReplicatedKillMachine`) waits
after each kill until the copies are whole again, and then nothing may be
lost at all. CI runs a few examples; ``AIMSS_TEST_LARGE=1`` runs more.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from conftest import wait_until
from distributed import Client, LocalCluster, Status
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

import aimss_dask
from aimss_dask._compat import listed_workers

LARGE = os.environ.get("AIMSS_TEST_LARGE") == "1"
WORKERS = 3
MAX_KILLS = 2
MAX_JOINS = 1


class _Model:
    """One stream as the test knows it."""

    def __init__(self, stream: aimss_dask.Stream) -> None:
        self.stream = stream
        self.records: list[list[int]] = [[] for _ in range(stream.spec.partitions)]
        self.lost: set[int] = set()
        self.lost_sealed: set[int] = set()  # lost after its seal: its end is known
        self.sealed = False


class KillMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cluster = LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
        self.client = Client(self.cluster)
        self.client.register_plugin(aimss_dask.AIMSS())
        self.streams: dict[str, _Model] = {}
        self.next_value = 0
        self.kills = 0
        self.size = WORKERS  # workers the cluster should have: kills are replaced, joins add one

    def teardown(self) -> None:
        self.client.close()
        self.cluster.close()

    # -- rules ----------------------------------------------------------------------------

    @rule(partitions=st.integers(1, 4))
    def create(self, partitions: int) -> None:
        name = f"s{len(self.streams)}"
        self.streams[name] = _Model(aimss_dask.create_stream(name, partitions=partitions))

    @precondition(lambda self: self.size < WORKERS + MAX_JOINS)
    @rule()
    def join(self) -> None:
        """A worker joins: streams made before keep their placement; later ones may use it."""
        self.size += 1
        self.cluster.scale(self.size)
        wait_until(lambda: len(listed_workers(self.client)) == self.size, timeout=60, what="a joined worker")
        # The scheduler lists the new worker before its nanny has finished
        # starting it: wait for the nanny too, so that a kill never lands in
        # the middle of a start (the nanny then gives up, and no worker comes
        # back: Dask's behaviour, not what this checks). The cluster adds the
        # new nanny to ``workers`` only once it started: count them too.
        wait_until(
            lambda: len(self.cluster.workers) == self.size
            and all(n.status == Status.running for n in self.cluster.workers.values()),
            timeout=60, what="the joined worker's nanny running",
        )

    @precondition(lambda self: any(not m.sealed for m in self.streams.values()))
    @rule(data=st.data(), n=st.integers(1, 5))
    def write(self, data: st.DataObject, n: int) -> None:
        model = data.draw(st.sampled_from([m for m in self.streams.values() if not m.sealed]))
        p = data.draw(st.integers(0, len(model.records) - 1))
        values = list(range(self.next_value, self.next_value + n))
        self.next_value += n
        if p in model.lost:
            with pytest.raises(aimss_dask.PartitionLostError) as e:
                for v in values:
                    model.stream.write(np.array([v]), partition=p)
                model.stream.flush()
            assert p in e.value.lost, e.value.lost
            return
        for v in values:
            model.stream.write(np.array([v]), partition=p)
        model.stream.flush()
        model.records[p].extend(values)

    @precondition(lambda self: any(not m.sealed for m in self.streams.values()))
    @rule(data=st.data())
    def seal(self, data: st.DataObject) -> None:
        model = data.draw(st.sampled_from([m for m in self.streams.values() if not m.sealed]))
        if model.lost:
            with pytest.raises(aimss_dask.PartitionLostError) as e:
                model.stream.seal()
            assert set(e.value.lost) == model.lost
        else:
            model.stream.seal()
        model.sealed = True

    @precondition(lambda self: self.kills < MAX_KILLS and self.streams)
    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        owners = sorted({w for m in self.streams.values() for w in m.stream.info()["owners"]})
        live = set(listed_workers(self.client))
        victim = data.draw(st.sampled_from(sorted(live & set(owners)) or sorted(live)))
        pid = self.client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        self.kills += 1
        event(f"kill {self.kills}")
        wait_until(lambda: victim not in listed_workers(self.client), timeout=60, what="the kill seen")
        for model in self.streams.values():
            info = model.stream.info()
            gone = {p for p, w in enumerate(info["owners"]) if w == victim}
            if model.sealed:
                model.lost_sealed |= gone - model.lost
            model.lost |= gone
        # The nanny brings a new process back: later streams are placed on it.
        wait_until(lambda: len(listed_workers(self.client)) == self.size, timeout=60, what="a new worker")

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def check(self, data: st.DataObject) -> None:
        model = data.draw(st.sampled_from(list(self.streams.values())))
        info = model.stream.info()
        assert sorted(info["lost"]) == sorted(model.lost), (info, model.lost)
        for p, want in enumerate(model.records):
            if p in model.lost:
                # Never a short read: the loss is named, with its offsets.
                with pytest.raises(aimss_dask.PartitionLostError) as e:
                    list(model.stream.read(partition=p, timeout=5))
                first, end = e.value.lost[p]
                assert first == 0
                assert end == (len(want) if p in model.lost_sealed else None), (p, e.value.lost, len(want))
                assert info["records"][p] is None  # unknown, never a quiet 0
                continue
            got: list[int] = []
            try:
                for r in model.stream.read(partition=p, timeout=None if model.sealed else 0.5):
                    got.append(int(r[0]))
            except aimss_dask.ReadTimeoutError:
                assert not model.sealed, "a read of a sealed partition timed out"
            assert got == want, (model.stream.name, p, got, want)
            assert info["records"][p] == len(want)


class ReplicatedKillMachine(KillMachine):
    """Every stream has two copies: a kill loses nothing, and the copies are rebuilt before the next."""

    @rule(partitions=st.integers(1, 4))
    def create(self, partitions: int) -> None:
        name = f"s{len(self.streams)}"
        self.streams[name] = _Model(aimss_dask.create_stream(name, partitions=partitions, replication=2))

    @precondition(lambda self: self.kills < MAX_KILLS and self.streams)
    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        live = sorted(listed_workers(self.client))
        victim = data.draw(st.sampled_from(live))
        pid = self.client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        self.kills += 1
        event(f"kill {self.kills}")
        wait_until(lambda: victim not in listed_workers(self.client), timeout=60, what="the kill seen")
        wait_until(lambda: len(listed_workers(self.client)) == self.size, timeout=60, what="a new worker")
        for model in self.streams.values():
            # A copy took over whatever the victim owned, and the nanny's new
            # worker (or another) holds a fresh copy, caught up, before the next kill.
            info = wait_until(
                lambda m=model: (i := m.stream.info())["lost"] == [] and victim not in i["owners"]
                and all(len(c) == 1 and victim not in c for c in i["in_sync"]) and i,
                timeout=60, what=f"{model.stream.name}: whole again",
            )
            assert info["lost"] == []


for machine in (KillMachine, ReplicatedKillMachine):
    machine.TestCase.settings = settings(
        max_examples=6 if LARGE else 3,
        stateful_step_count=14 if LARGE else 8,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


TestKills = pytest.mark.slow(KillMachine.TestCase)
TestReplicatedKills = pytest.mark.slow(ReplicatedKillMachine.TestCase)
