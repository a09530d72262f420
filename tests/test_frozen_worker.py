"""A worker that stops answering without dying: what waited on it fails over once the scheduler removes it.

The worker's process is stopped (``SIGSTOP``), as a hung one would be; its
host's kernel still acknowledges what arrives and answers keep-alive probes,
so no connection to it breaks by itself. Dask removes such a worker once it
has missed heartbeats for ``distributed.scheduler.worker-ttl`` (minutes by
default, and its nanny's kill, if it has one and it answers, comes first);
these tests remove it as that path ends, with ``Scheduler.remove_worker``,
instead of waiting that long. Until then, waiting is right: the tests check
that writers and readers still wait on a stopped worker the scheduler lists.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import dask
import numpy as np
import pytest
from conftest import make_cluster, security_kwargs, unique_name, wait_until
from distributed import Client

import aimss_dask
from aimss_dask._compat import listed_workers

#: 8 KiB: the few records written to the stopped worker fit in its socket's
#: receive window, so its kernel acknowledges them all: nothing but the
#: worker's own answers is missing (the last test fills the window).
RECORD = np.ones(2**10)
IN_FLIGHT = 4


#: ``aimss.liveness-interval`` of this module's clusters and clients (2 s by
#: default): each test waits a few of these before and after a removal.
EVERY = 0.5


@pytest.fixture(scope="module", autouse=True)
def _liveness_interval() -> Iterator[None]:
    """Set before the module's clusters start (autouse fixtures come first): their nannies pass it on."""
    with dask.config.set({"aimss.liveness-interval": f"{EVERY}s"}):
        yield


@pytest.fixture(scope="module")
def client3() -> Iterator[Client]:
    with make_cluster(3) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        yield client


@contextlib.contextmanager
def _frozen(client: Client, address: str) -> Iterator[None]:
    """``address``'s process stopped while the block runs; killed after (its nanny starts another)."""
    pid = client.run(os.getpid, workers=[address])[address]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: address not in listed_workers(client), timeout=60, what=f"{address} gone")
        client.wait_for_workers(3, timeout=60)


async def _remove(address: str, dask_scheduler: Any = None) -> None:
    """What the scheduler does with a worker that missed its heartbeats (and whose nanny did not answer)."""
    await dask_scheduler.remove_worker(address=address, stimulus_id="test-frozen-worker")


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _waits_then_ends_after_removal(client: Client, victim: str, thread: threading.Thread, out: dict[str, Any]) -> float:
    """``thread`` (a writer or reader) waits while ``victim`` is stopped and listed, and ends once the
    scheduler removed it; how many seconds it took then."""
    thread.join(2 * EVERY)
    assert thread.is_alive(), f"the call stopped waiting on a stopped worker the scheduler still lists: {out}"
    client.run_on_scheduler(_remove, victim)
    t0 = time.monotonic()
    thread.join(3 * EVERY + 20)
    assert not thread.is_alive(), f"the call still waits on {victim}, which the scheduler removed"
    return time.monotonic() - t0


def test_a_flush_waiting_on_a_stopped_owner_fails_named_once_it_is_removed(client3):
    _flush_fails_named(client3)


def test_the_same_on_a_tls_cluster():
    """TLS: the data connections run over TLS (their own channel on memory buffers); cutting one works the same."""
    with make_cluster(3, **security_kwargs("tls")) as cluster, Client(cluster) as client:
        assert all(a.startswith("tls://") for a in listed_workers(client))
        client.register_plugin(aimss_dask.AIMSS())
        _flush_fails_named(client)


def _flush_fails_named(client: Client) -> None:
    name = unique_name("frozen")
    s = aimss_dask.create_stream(name, partitions=3)
    victim = s.spec.owners[0]
    for p in range(3):
        s.write(RECORD, partition=p)
    s.flush()  # the data connections are up

    def write_and_flush() -> None:
        for _ in range(IN_FLIGHT):
            s.write(RECORD, partition=0)
        s.flush()

    with _frozen(client, victim):
        thread, out = _in_thread(write_and_flush)
        _waits_then_ends_after_removal(client, victim, thread, out)
        err = out.get("error")
        assert isinstance(err, aimss_dask.PartitionLostError), f"expected the loss of partition 0, got {out}"
        assert 0 in err.lost
    # The seal seals the others, and says partition 0 is lost; they are whole.
    with pytest.raises(aimss_dask.PartitionLostError, match="partition 0"):
        s.seal()
    for p in (1, 2):
        assert [r.nbytes for r in s.read(partition=p)] == [RECORD.nbytes]
    aimss_dask.destroy_stream(name)


def test_a_task_writing_to_a_stopped_owner_fails_named_once_it_is_removed(client3):
    """The same from a task on another worker: its producer is the worker's, not the client's."""
    name = unique_name("frozen-task")
    s = aimss_dask.create_stream(name, partitions=3)
    victim = s.spec.owners[0]
    writer = s.spec.owners[1]
    s.write(RECORD, partition=0)
    s.flush()

    def task() -> str:
        stream = aimss_dask.get_stream(name)
        for _ in range(IN_FLIGHT):
            aimss_dask.write_to(name, RECORD, partition=0)
        stream.flush()
        return "stored"

    with _frozen(client3, victim):
        fut = client3.submit(task, workers=[writer], pure=False)
        thread, out = _in_thread(lambda: fut.result())
        _waits_then_ends_after_removal(client3, victim, thread, out)
        assert isinstance(out.get("error"), aimss_dask.PartitionLostError), out
    aimss_dask.destroy_stream(name)


def test_a_replicated_write_to_a_stopped_owner_fails_over_and_loses_nothing(client3):
    _replicated_write_fails_over(client3)


def test_an_owner_stops_waiting_on_a_stopped_replica_once_it_is_removed(client3):
    _copy_given_up(client3)


def test_the_same_over_dasks_comms():
    """``aimss.transport: dask`` (UCX clusters take it too): writes and copies are Dask requests, given up alike."""
    with make_cluster(3) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(transport="dask"))
        _replicated_write_fails_over(client)
        _copy_given_up(client)


def _replicated_write_fails_over(client: Client) -> None:
    name = unique_name("frozen-rep")
    s = aimss_dask.create_stream(name, partitions=3, replication=2)
    victim = s.spec.owners[0]
    for i in range(30):
        s.write(np.full(1000, i), partition=i % 3)
    s.flush()

    def write_and_flush() -> None:
        for i in range(30, 60):
            s.write(np.full(2**9, i), partition=i % 3)  # 4 KiB each
        s.flush()

    with _frozen(client, victim):
        thread, out = _in_thread(write_and_flush)
        took = _waits_then_ends_after_removal(client, victim, thread, out)
        assert "error" not in out, f"a replicated write failed: {out['error']!r}"
        assert took < 2 * EVERY + 15, f"the failover took {took:.1f} s after the removal"
    s.seal()
    info = s.info()
    assert info["lost"] == [] and info["records"] == [20, 20, 20]
    assert victim not in info["owners"]
    got = sorted(int(r[0]) for r in aimss_dask.read_from(name))
    assert got == list(range(60)), "records lost or stored twice"
    aimss_dask.destroy_stream(name)


def _copying_to(dest: str) -> list[str]:
    """The replicator threads of this worker that copy to ``dest``."""
    return [t.name for t in threading.enumerate() if t.name == f"aimss-replicate-{dest}"]


def _copy_given_up(client: Client) -> None:
    name = unique_name("frozen-copy")
    s = aimss_dask.create_stream(name, partitions=1, replication=2)
    owner, (replica,) = s.spec.owners[0], s.spec.replicas[0]
    s.write(np.full(1000, 0), partition=0)
    s.flush()

    def write_and_flush() -> None:
        for i in range(1, 10):
            s.write(np.full(2**9, i), partition=0)
        s.flush()

    with _frozen(client, replica):
        thread, out = _in_thread(write_and_flush)
        _waits_then_ends_after_removal(client, replica, thread, out)
        assert "error" not in out, f"the writes failed with their owner alive: {out['error']!r}"
        # Nor is the owner's thread that copied to it left blocked on it.
        wait_until(
            lambda: not client.run(_copying_to, replica, workers=[owner])[owner], timeout=3 * EVERY + 10,
            what=f"the owner's copying thread to {replica} gone",
        )
    wait_until(lambda: replica not in s.info()["replicas"][0], timeout=30, what="the removed copy dropped")
    s.seal()
    assert s.info()["owners"] == [owner]
    assert [int(r[0]) for r in aimss_dask.read_from(name, partition=0)] == list(range(10))
    aimss_dask.destroy_stream(name)


def test_a_reader_waiting_on_a_stopped_owner_fails_named_once_it_is_removed(client3):
    name = unique_name("frozen-read")
    s = aimss_dask.create_stream(name, partitions=2)
    victim = s.spec.owners[0]
    for p in range(2):
        for _ in range(3):
            s.write(RECORD, partition=p)
    s.seal()
    with _frozen(client3, victim):
        thread, out = _in_thread(lambda: list(s.read(partition=0)))
        _waits_then_ends_after_removal(client3, victim, thread, out)
        err = out.get("error")
        assert isinstance(err, aimss_dask.PartitionLostError), f"expected the loss of partition 0, got {out}"
        assert err.lost == {0: (0, 3)}
    assert len(list(s.read(partition=1))) == 3
    aimss_dask.destroy_stream(name)


def test_a_reader_of_a_replicated_partition_follows_it_from_a_stopped_owner_to_its_copy(client3):
    name = unique_name("frozen-read-rep")
    s = aimss_dask.create_stream(name, partitions=1, replication=2)
    victim = s.spec.owners[0]
    for i in range(5):
        s.write(np.full(16, i), partition=0)
    s.seal()
    with _frozen(client3, victim):
        thread, out = _in_thread(lambda: [int(r[0]) for r in s.read(partition=0)])
        _waits_then_ends_after_removal(client3, victim, thread, out)
        assert out == {"value": [0, 1, 2, 3, 4]}, out
    aimss_dask.destroy_stream(name)


def test_status_names_a_stopped_worker_instead_of_waiting_for_it(client3):
    victim = sorted(listed_workers(client3))[0]
    with _frozen(client3, victim):
        t0 = time.monotonic()
        st = aimss_dask.status(timeout=2)
        took = time.monotonic() - t0
        assert st.silent == [victim]
        assert set(st) == set(listed_workers(client3)) - {victim}
        assert 2 <= took < 20, f"status(timeout=2) took {took:.1f} s with a stopped worker"
    st = aimss_dask.status()
    assert st.silent == [] and set(st) == set(listed_workers(client3))


def test_an_owner_that_reads_nothing_for_longer_than_the_tcp_timeout_is_waited_on():
    """Back-pressure is not silence: an owner stopped past ``distributed.comm.timeouts.tcp`` and resumed loses nothing.

    Its socket's receive window fills and stays shut; the writers' kernels
    probe it and get answers. Nothing may fail the writes (a stream without
    copies could only call them lost): the scheduler still lists the owner,
    and it answers once it runs again.
    """
    name = unique_name("stalled")
    # Dask's least (its comms set 10 keep-alive probes of a second or more).
    with dask.config.set({"distributed.comm.timeouts.tcp": "11s"}):
        with make_cluster(2) as cluster, Client(cluster) as client:
            client.register_plugin(aimss_dask.AIMSS())
            s = aimss_dask.create_stream(name, partitions=2)
            victim = s.spec.owners[0]
            for p in range(2):
                s.write(RECORD, partition=p)
            s.flush()
            big = np.ones(2**17)  # 1 MiB: 16 of them fill the stopped owner's window and more

            def write_and_flush() -> None:
                for _ in range(16):
                    s.write(big, partition=0)
                s.flush()

            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGSTOP)
            try:
                thread, out = _in_thread(write_and_flush)
                thread.join(14)  # past the 11 s: Dask's keep-alive would have cut it by now
                assert thread.is_alive(), f"the writer stopped waiting on a stopped owner the scheduler lists: {out}"
            finally:
                os.kill(pid, signal.SIGCONT)
            thread.join(60)
            assert not thread.is_alive() and out == {"value": None}, out
            s.seal()
            assert s.info()["records"] == [17, 1]
            assert sum(r.nbytes for r in s.read(partition=0)) == RECORD.nbytes + 16 * big.nbytes
