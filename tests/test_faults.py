"""A worker process killed for real: nothing is silently lost."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster

import aimss_dask
from aimss_dask._compat import listed_workers


@pytest.fixture
def client():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS())
        yield c


def _wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_killed_owner_makes_writes_and_reads_fail_loudly(client):
    s = aimss_dask.create_stream("doomed", partitions=2)
    victim, survivor = s.spec.owners
    for p in range(2):
        s.write(np.arange(10) + p, partition=p)
    s.flush()
    pids = client.run(os.getpid)
    os.kill(pids[victim], signal.SIGKILL)
    assert _wait_for(lambda: victim not in listed_workers(client))

    # The coordinator knows the partition is gone ...
    assert _wait_for(lambda: s.info()["lost"] == [0])
    # ... so reading it raises instead of returning a short stream,
    with pytest.raises(aimss_dask.PartitionLostError, match=r"partition\(s\) \[0\] of stream 'doomed'"):
        list(s.read(partition=0))
    # and writes meant for the dead owner are refused, never silently dropped.
    with pytest.raises(aimss_dask.PartitionLostError, match="was lost with its worker") as lost:
        s.write(np.ones(4), partition=0)
    # The error names what is gone: offsets 0 on of the open partition 0.
    assert lost.value.lost == {0: (0, None)}
    # A task still writing to the lost partition is refused at once, and a
    # seal reports writes that never made it.
    def write_lost():
        with pytest.raises(aimss_dask.PartitionLostError, match="was lost with its worker"):
            aimss_dask.write_to("doomed", np.ones(3), partition=0)
        return True

    assert client.submit(write_lost, pure=False).result()

    # The surviving partition is intact (still open: the read times out).
    got = []
    with pytest.raises(aimss_dask.ReadTimeoutError):
        for r in s.read(partition=1, timeout=1):
            got.append(r.tolist())
    assert got == [(np.arange(10) + 1).tolist()]
    aimss_dask.destroy_stream("doomed")


def test_owner_killed_mid_push_fails_the_producer(client):
    s = aimss_dask.create_stream("mid-push", partitions=2)
    victim = s.spec.owners[0]
    pids = client.run(os.getpid)
    record = np.ones(2**17)  # 1 MiB
    for _ in range(32):
        s.write(record, partition=0)
    s.flush()  # the data connection to the victim is up
    os.kill(pids[victim], signal.SIGKILL)
    with pytest.raises(aimss_dask.PartitionLostError, match="lost"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            s.write(record, partition=0)
            s.flush()
    aimss_dask.destroy_stream("mid-push")


def _sum_records(records) -> int:
    return int(sum(int(r.sum()) for r in records))


def test_readers_of_a_lost_partition_fail_named_instead_of_waiting_forever(client):
    """map_partitions pinned to an owner that dies: a named error, never a hang; the seal says so too."""
    s = aimss_dask.create_stream("pinned", partitions=2)
    victim, survivor = s.spec.owners
    for p in range(2):
        s.write(np.full(10, p + 1), partition=p)
    s.flush()
    # Open stream: both readers run on their owners and wait for the end.
    futs = s.map_partitions(_sum_records)
    assert _wait_for(lambda: all(f.status == "pending" for f in futs)) and time.sleep(0.5) is None
    os.kill(client.run(os.getpid)[victim], signal.SIGKILL)
    assert _wait_for(lambda: s.info()["lost"] == [0])

    # The reader of partition 0 was pinned to the dead worker: it runs
    # elsewhere and names the offsets lost (open partition: 0 on).
    with pytest.raises(aimss_dask.PartitionLostError) as lost:
        futs[0].result(timeout=60)
    assert lost.value.lost == {0: (0, None)}
    # Seal seals the survivor (its reader ends) but does not pass for a success.
    with pytest.raises(aimss_dask.PartitionLostError, match="partition 0") as sealed:
        s.seal()
    assert sealed.value.lost == {0: (0, None)}
    assert futs[1].result(timeout=60) == 20
    info = s.info()
    assert info["records"] == [None, 1]  # unknown, not a quiet 0
    assert info["lost_offsets"] == {0: [0, None]}
    # Readers submitted after the loss fail at once, too.
    with pytest.raises(aimss_dask.PartitionLostError):
        s.map_partitions(_sum_records)[0].result(timeout=60)
    aimss_dask.destroy_stream("pinned")


def test_a_sealed_partition_lost_names_its_exact_offsets(client):
    s = aimss_dask.create_stream("sealed-lost", partitions=2)
    victim = s.spec.owners[0]
    for i in range(7):
        s.write(np.arange(3), partition=0)
    s.write(np.arange(3), partition=1)
    s.seal()
    os.kill(client.run(os.getpid)[victim], signal.SIGKILL)
    assert _wait_for(lambda: s.info()["lost"] == [0])
    with pytest.raises(aimss_dask.PartitionLostError, match=r"0-6") as lost:
        list(s.read(partition=0))
    assert lost.value.lost == {0: (0, 7)}
    assert [r.tolist() for r in s.read(partition=1)] == [[0, 1, 2]]
    aimss_dask.destroy_stream("sealed-lost")
