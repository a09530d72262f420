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
    # writes pushed to the dead owner surface as errors, never as silence,
    s.write(np.ones(4), partition=0)
    with pytest.raises(aimss_dask.PartitionLostError, match="could not be reached"):
        s.flush()
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
