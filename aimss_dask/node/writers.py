"""Drop records a writer sends again after the owner it sent them to died.

A writer whose batch to an owner of a replicated partition got no answer
(the owner died) cannot know whether the owner stored it and copied it to a
replica before dying. It sends the batch again, to the replica that took
over. Each record of a replicated stream carries its writer's id and a
sequence number that grows per partition (Kafka's idempotent producer), and
the owner keeps, per partition, the next number it expects of each writer:
records below it are stored already and are dropped. Replicas apply the same
rule to the copies they receive, so a replica that becomes owner knows what
it holds.

Plain data, no lock: callers hold the lock that orders appends to a
replicated partition (:class:`aimss_dask.node.replication.Replicator`).
"""

from __future__ import annotations


class WriterSeqs:
    """Per stream and partition: writer id -> the next sequence number not stored yet.

    Examples
    --------
    >>> w = WriterSeqs()
    >>> w.admit("s", 0, (7, 0), 3), w.admit("s", 0, (7, 1), 3), w.admit("s", 0, (7, 5), 1)
    (0, 2, 0)
    >>> w.admit("s", 0, (7, 0), 6)  # all six are stored already
    6
    """

    def __init__(self) -> None:
        self._next: dict[str, dict[int, dict[int, int]]] = {}

    def admit(self, name: str, partition: int, writer: tuple[int, int], n: int) -> int:
        """``n`` records from ``writer`` = ``(id, first sequence number)``: how many at the head to drop.

        A gap (a number past the next expected) is accepted: records in
        between failed where they were sent, and their writer was told.
        """
        wid, first = writer
        seqs = self._next.setdefault(name, {}).setdefault(partition, {})
        expected = seqs.get(wid, 0)
        skip = min(n, max(0, expected - first))
        seqs[wid] = max(expected, first + n)
        return skip

    def forget(self, name: str) -> None:
        self._next.pop(name, None)
