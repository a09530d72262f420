"""A worker process killed for real: nothing is silently lost."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster

import aimss_dask


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
    assert _wait_for(lambda: victim not in client.scheduler_info()["workers"])

    # The coordinator knows the partition is gone ...
    assert _wait_for(lambda: s.info()["lost"] == [0])
    # ... so reading it raises instead of returning a short stream,
    with pytest.raises(aimss_dask.PartitionLostError, match=r"partition\(s\) \[0\] of stream 'doomed'"):
        list(s.read(partition=0))
    # and writes meant for the dead owner are refused, never silently dropped.
    with pytest.raises(aimss_dask.PartitionLostError, match="was lost with its worker"):
        s.write(np.ones(4), partition=0)
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
