"""The owner's side of replication, shaken at random: copies that break mid-batch, and catch-ups under load.

A real :class:`~aimss_dask.node.replication.Replicator` ships what writer
threads append to a real owner log (with the owner's writer filter, and
records that spill) to a real copy (:class:`~aimss_dask.node.follower.Follower`
over its own log), linked in-process. The link breaks at random, before a
batch or after part of it was stored; the replicator then drops the copy,
and a stand-in coordinator lists it again, so that it catches up while the
writers go on.

Checked all along: a copy counted in sync holds at least the end it is
counted for (a promotion must never lose an answered record). Checked at
the end: the copy holds exactly the owner's records at the owner's offsets,
and the owner's writer numbers.
"""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest
from conftest import linked_replicator, wait_until

from aimss_dask.core.specs import StreamSpec
from aimss_dask.log.store import LogStore
from aimss_dask.node.dedup import OriginFilter
from aimss_dask.node.follower import Follower
from aimss_dask.node.writers import WriterSeqs

PARTITIONS = 2
#: ``AIMSS_TEST_LARGE=1``: many more trials than CI runs.
LARGE = os.environ.get("AIMSS_TEST_LARGE") == "1"


def _trial(seed: int, root: str, writes: int = 400) -> None:
    rng = random.Random(seed)
    dice = threading.Lock()  # random.Random is not for concurrent use
    budget = 64 * 2**10  # records of 1 KiB: both logs spill
    owner = LogStore(budget=budget, spill_root=os.path.join(root, f"owner-{seed}"))
    copy = LogStore(budget=budget, spill_root=os.path.join(root, f"copy-{seed}"))
    parts = list(range(PARTITIONS))
    owner.open("s", 1, parts)
    copy.open("s", 1, parts)
    writers, copy_writers = WriterSeqs(), WriterSeqs()
    follower = Follower(copy, copy_writers, OriginFilter(), threading.Lock())
    breaks = [0]

    def roll() -> float:
        with dice:
            return rng.random()

    class Linked(linked_replicator(follower, copy)):
        def _transmit(self, d, groups, conn):
            fate = roll()
            if fate < 0.06:
                breaks[0] += 1
                # The connection breaks: before the batch, or after the copy stored part of it.
                groups = groups[: int(fate / 0.06 * (len(groups) + 1))] if fate > 0.03 else []
            errors = self.deliver(groups)
            while copy.over_budget and copy.spill():
                pass
            if fate < 0.06:
                raise ConnectionResetError(104, "Connection reset by peer")
            return {"errors": errors}, conn

    r = Linked(owner, loop=None, rpc=None, address="a", batch_size=8 * 2**10, credentials=None, writers=writers)
    spec = StreamSpec(name="s", partitions=PARTITIONS, owners=("a",) * PARTITIONS, epoch=1,
                      replicas=(("b",),) * PARTITIONS, replication=2)
    r.configure(spec, fresh=True)
    done = threading.Event()
    problems: list[str] = []

    def write(w: int) -> None:
        try:
            for i in range(writes):
                p = i % PARTITIONS
                record = np.full(128, w * 100_000 + i, dtype=np.int64)
                with r.append_lock:
                    skip = writers.admit("s", 1, p, (w, i // PARTITIONS), 1)
                    assert skip == 0
                    first = owner.append("s", 1, p, [record], [record.nbytes])
                    r.shipped("s", p, first, [record], [record.nbytes], None, (w, i // PARTITIONS))
                while owner.over_budget and owner.spill():
                    pass
                if not r.wait("s", 1, p, first + 1):
                    problems.append(f"writer {w}: no answer for offset {first} of partition {p}")
        except Exception as e:  # noqa: BLE001 - reported by the test
            problems.append(repr(e))

    def coordinate() -> None:
        """List the copy again where the replicator dropped it; check the copies counted in sync."""
        while not done.is_set():
            with r._cond:
                counted = {p: r._parts[("s", p)].insync.get("b") for p in parts}
                listed = all(r._parts[("s", p)].has("b") for p in parts)
            for p, end in counted.items():
                if end is not None and copy.held("s", 1, p) < end:
                    problems.append(f"partition {p}: the copy is counted in sync up to {end} "
                                    f"but holds {copy.held('s', 1, p)}")
            if not listed:
                time.sleep(roll() * 0.01)
                r.configure(spec)
            time.sleep(0.002)

    threads = [threading.Thread(target=write, args=(w,)) for w in (1, 2)]
    watcher = threading.Thread(target=coordinate)
    try:
        watcher.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wait_until(lambda: all("b" in r._parts[("s", p)].insync for p in parts), timeout=30,
                   what="the copy in sync again")
        r.wait_all()
    finally:
        done.set()
        watcher.join(10)
        r.close()
    assert not problems, problems[:5]
    assert breaks[0] > 0 and r.stats["replica_syncs"] > 0, (breaks, r.stats)  # the test shook something
    for p in parts:
        mine = owner.read("s", 1, p, 0, None, upto=owner.held("s", 1, p))[0]
        theirs = copy.read("s", 1, p, 0, None, upto=copy.held("s", 1, p))[0]
        assert len(theirs) == len(mine) == writes, (seed, p, len(theirs), len(mine))
        assert all(np.array_equal(a, b) for a, b in zip(mine, theirs)), (seed, p)
        assert copy_writers.table("s", 1, p) == writers.table("s", 1, p), (seed, p)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100 if LARGE else 8))
def test_a_copy_that_breaks_and_catches_up_under_load_ends_exactly_like_its_owner(seed, tmp_path):
    _trial(seed, str(tmp_path))
