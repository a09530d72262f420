"""The copy side of replication: a replica stores its owner's copies and follows its filters.

An owner ships each group it appends to its replicas
(:mod:`aimss_dask.node.replication`). A replica (Kafka's *follower*) keeps,
for each partition it holds a copy of:

- the records, at the offsets they have on the owner;
- the owner's filters: the writers' sequence numbers
  (:class:`~aimss_dask.node.writers.WriterSeqs`) and the inputs' origins
  (:class:`~aimss_dask.node.dedup.OriginFilter`), so that, promoted, it drops
  exactly what the old owner would have.

The filters must say what the copy's *log* holds, never more: a copy whose
filter names records it lacks would, once it owns the partition, drop a
writer's re-send of them (or a re-run push's copy) as stored already, a
silent loss. Hence :meth:`Follower.truncate`: when the owner that took over
holds less than this copy (the owner that died shipped records here that
never reached it), the records it lacks are cut, and the filters' state for
the partition is cleared with them. The owner's catch-up then hands over its
own state (:meth:`Follower.learn_writers`, :meth:`Follower.learn_origins`)
before the copy counts again.

Every method holds ``lock``, the replicator's append lock on this worker:
copies, catch-ups and cuts of a partition are applied in order.

Examples
--------
>>> import threading
>>> from aimss_dask.log.store import LogStore
>>> from aimss_dask.node.dedup import OriginFilter
>>> from aimss_dask.node.writers import WriterSeqs
>>> store, origins = LogStore(budget=2**20, spill_root="spill"), OriginFilter()  # nothing spills
>>> store.open("s", 1, [0]); _ = origins.track("s", 1)
>>> f = Follower(store, WriterSeqs(), origins, threading.Lock())
>>> f.append("s", 1, 0, [b"a", b"b"], [1, 1], (4, 0, 0), (7, 0), at=0)
>>> f.truncate("s", 1, 0, end=0)  # the new owner holds none of them
2
>>> origins.export("s", 1, 0)
[]
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from typing import Any

from aimss_dask.core.specs import Origin
from aimss_dask.log.store import LogStore
from aimss_dask.node.dedup import OriginFilter
from aimss_dask.node.writers import WriterSeqs

logger = logging.getLogger("aimss_dask")

__all__ = ["Follower"]


class Follower:
    """The copies this worker holds of partitions owned elsewhere: their records and their owners' filters."""

    def __init__(self, store: LogStore, writers: WriterSeqs, origins: OriginFilter, lock: threading.Lock) -> None:
        self.log = store
        self.writers = writers
        self.origins = origins
        self.lock = lock

    def append(
        self,
        name: str,
        epoch: int,
        partition: int,
        records: list[Any],
        sizes: list[int],
        origin: tuple[int, int, int] | None,
        writer: tuple[int, int] | None,
        at: int,
    ) -> None:
        """Append the owner's copy of a group at offset ``at``, and learn what its filters learned.

        A group without records and with a writer tag is a *marker*: the
        owner dropped a second copy of an input, and the writer's numbers
        moved on there (see :meth:`~aimss_dask.node.replication.Replicator.shipped`).
        Records this copy holds already (a catch-up overlapping the live
        copies) are skipped by the log.
        """
        with self.lock:
            held = self.log.held(name, epoch, partition)
            skip = held - at
            since = self.log.since(name, epoch)
            # Stored first: a copy that refuses the records (sealed, a gap)
            # must not have filters naming them, or a writer's send of them
            # again, once this copy owns the partition, would be dropped.
            self.log.append_at(name, epoch, partition, int(at), records, sizes)
            if not records and writer is not None and skip >= 0:
                self.writers.admit(name, since, partition, (int(writer[0]), int(writer[1])), 0, strict=False)
            if 0 <= skip < len(records):
                # The owner's filters passed these: the same filters here
                # must hold the same state, so that this copy, if it becomes
                # the owner, drops what the old one would have.
                if writer is not None:
                    self.writers.admit(
                        name, since, partition, (int(writer[0]), int(writer[1] + skip)), len(records) - skip,
                        strict=False,
                    )
                if origin is not None and not self.origins.learn(name, epoch, partition, Origin(*origin)):
                    logger.warning(
                        "aimss: the copy of %r partition %d here disagrees with its owner on origin %s",
                        name, partition, origin,
                    )

    def truncate(self, name: str, epoch: int, partition: int, end: int) -> int:
        """Cut the copy at ``end`` (the new owner holds no more); how many records were cut.

        Those records were never on every copy, so no reader saw them and
        their writers were not answered. The filters' state for the
        partition goes with them: it may name the records cut, and the
        catch-up that follows hands over the owner's.
        """
        with self.lock:
            dropped = self.log.truncate(name, epoch, partition, end)
            if dropped:
                self.writers.forget_partition(name, self.log.since(name, epoch), partition)
                self.origins.forget_partition(name, epoch, partition)
            return dropped

    def reset(self, name: str, epoch: int, since: int, partitions: list[int], keep: Collection[int] = ()) -> list[int]:
        """Empty what this worker holds of ``partitions`` of ``name``: they were lost and are re-created.

        ``name`` was created at ``since`` and is recovered at ``epoch``. A
        copy here (one still catching up when the owner died, or one the
        coordinator could not promote) holds records of the lost log, and
        filters that name them: the re-created partition starts empty and
        is written again, so those go. Cut back to the new owner's length
        instead, a copy would keep the old log's records under offsets the
        new log fills with others. The partitions of ``keep`` this worker
        holds are opened again, empty (it stays a copy, or is the new
        owner). Returns the partitions that were held here.
        """
        with self.lock:
            held = [p for p in partitions if self.log.partition_stats(name, p) is not None]
            for p in partitions:
                self.log.drop_partition(name, since, p)
                self.writers.forget_partition(name, since, p)
                self.origins.forget_partition(name, epoch, p)
            again = [p for p in held if p in keep]
            if again:
                self.log.open(name, epoch, again, since=since)
            return held

    def learn_writers(self, name: str, epoch: int, partition: int, table: dict[int, int], whole: bool) -> None:
        """The owner's writer numbers as its catch-up of this copy ended (the copies carried no writer tags).

        ``whole``: the owner held the partition since its creation (see
        :meth:`~aimss_dask.node.writers.WriterSeqs.begin`).
        """
        with self.lock:
            self.writers.merge(name, self.log.since(name, epoch), partition, table, whole)

    def learn_origins(self, name: str, epoch: int, partition: int, origins: list[tuple[int, int, int]]) -> int:
        """The owner's origins as its catch-up ended; how many this copy's filter holds otherwise."""
        with self.lock:
            return self.origins.merge(name, epoch, partition, origins)
