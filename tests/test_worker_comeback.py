"""A worker that comes back at the same address (a nanny on a fixed port) serves new streams.

On HPC clusters nannies often listen on fixed ports: a worker killed and
restarted by its nanny is a new process at the old address. The streams
that had partitions on the dead process lost them, and still say so; a
stream made afterwards, with a partition on the new process, works from
every producer: the client and the other worker (which had a connection
to, and the data address of, the dead process).
"""

from __future__ import annotations

import os
import signal
import socket

import numpy as np
import pytest
from conftest import unique_name, wait_until
from distributed import Client, Nanny, Scheduler, SpecCluster

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.api.streams import create_stream, destroy_stream, get_stream, write_to
from aimss_dask.core.errors import PartitionLostError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_from_task(name: str, partition: int, values: list[int]) -> int:
    for v in values:
        write_to(name, np.full(4, v), partition=partition)
    get_stream(name).flush()
    return len(values)


def _pid() -> int:
    return os.getpid()


@pytest.fixture
def fixed_port_cluster():
    port = _free_port()
    workers = {
        "fixed": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "worker_port": port}},
        "other": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1"}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0", "host": "127.0.0.1"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        yield client, f"tcp://127.0.0.1:{port}"


def _back(client: Client, address: str, old_pid: int) -> bool:
    """A new process listens at ``address``, with the AIMSS plugin set up."""
    if address not in listed_workers(client):
        return False
    try:  # the old process may still be on the scheduler's books: a run fails
        pid = client.run(_pid, workers=[address]).get(address)
        ready = client.run(lambda dask_worker: "aimss" in dask_worker.plugins, workers=[address])
    except Exception:
        return False
    return pid not in (None, old_pid) and bool(ready.get(address))


def test_a_worker_back_at_the_same_address_serves_new_streams(fixed_port_cluster):
    client, fixed = fixed_port_cluster
    other = next(w for w in listed_workers(client) if w != fixed)
    old = create_stream(unique_name("old"), partitions=2)
    on_fixed = old.spec.owners.index(fixed)
    on_other = 1 - on_fixed
    # Both producers talk to the soon-dead process first.
    old.write(np.zeros(4), partition=on_fixed)
    client.submit(_write_from_task, old.name, on_fixed, [1, 2], workers=[other], pure=False).result()
    old.flush()

    pid = client.run(_pid, workers=[fixed])[fixed]
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: _back(client, fixed, pid),
        timeout=60,
        interval=0.2,
        what="the nanny restarts the worker at its fixed address",
    )
    # The old stream lost its partition there, and says so (this is also how
    # the client's producer learns of the loss).
    wait_until(lambda: on_fixed in get_stream(old.name).info()["lost"], timeout=20, what="loss recorded")
    with pytest.raises(PartitionLostError, match="lost with its"):
        old.write(np.zeros(4), partition=on_fixed)
        old.flush()

    # A new stream with a partition on the new process at the old address.
    new = create_stream(unique_name("new"), partitions=2)
    assert fixed in new.spec.owners
    for p in range(2):
        for v in range(3):
            new.write(np.full(4, 100 * p + v), partition=p)
            # Looking at the old stream again says its partition is lost
            # again: that must not touch the new stream's traffic there.
            get_stream(old.name)
    sent = client.submit(_write_from_task, new.name, new.spec.owners.index(fixed), [7, 8], workers=[other], pure=False)
    assert sent.result() == 2
    new.flush()
    new.seal()
    got = {p: sorted(int(r[0]) for r in new.read(partition=p)) for p in range(2)}
    want = {p: [100 * p + v for v in range(3)] for p in range(2)}
    want[new.spec.owners.index(fixed)] += [7, 8]
    assert got == {p: sorted(v) for p, v in want.items()}
    # The old stream's other partition lives on the other worker, untouched.
    assert get_stream(old.name).info()["lost"] == [on_fixed] and on_other != on_fixed
    destroy_stream(new.name)
    destroy_stream(old.name)
