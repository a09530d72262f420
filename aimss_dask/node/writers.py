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

A batch that skips numbers is refused (records would be lost silently
otherwise). So is a writer not seen before whose first number is above 0, on
a partition held here since it was created (:meth:`WriterSeqs.begin`):
elsewhere (a log re-created empty, a copy cut back) such a writer may
rightly go on from where it was. Plain data, no lock: callers hold the lock
that orders appends to a replicated partition
(:class:`aimss_dask.node.replication.Replicator`).
"""

from __future__ import annotations

from aimss_dask.core.errors import WriteOrderError


class WriterSeqs:
    """Per stream and partition: writer id -> the next sequence number not stored yet.

    Examples
    --------
    >>> w = WriterSeqs()
    >>> w.admit("s", 1, 0, (7, 0), 3), w.admit("s", 1, 0, (7, 1), 3), w.admit("s", 1, 0, (7, 4), 2)
    (0, 2, 0)
    >>> w.admit("s", 1, 0, (7, 0), 6)  # all six are stored already
    6
    >>> w.admit("s", 5, 0, (7, 0), 2)  # a new stream of the name (first epoch 5) counts anew
    0
    >>> w.admit("s", 5, 0, (7, 9), 1)  # 2 to 8 never arrived
    Traceback (most recent call last):
    ...
    aimss_dask.core.errors.WriteOrderError: writer 7 sent records of 's' partition 0 from sequence number 9, but the next one stored here is 2: ...
    """

    def __init__(self) -> None:
        # (stream, its first epoch) -> partition -> writer id -> next number.
        # Keyed by the line of epochs: a stream made again under the same
        # name (its run restarted) numbers from 0, and a late drop of the
        # old one must not reset the new one's numbers.
        self._next: dict[tuple[str, int], dict[int, dict[int, int]]] = {}
        # (stream, its first epoch) -> partitions held here since they were
        # created: every writer that ever stored a record in one is known.
        self._whole: dict[tuple[str, int], set[int]] = {}

    def _seqs(self, name: str, since: int, partition: int) -> dict[int, int]:
        line = self._next.get((name, since))
        if line is None:
            # A newer line replaces older ones of the name (the log did too).
            for key in [k for k in self._next if k[0] == name and k[1] < since]:
                del self._next[key]
                self._whole.pop(key, None)
            line = self._next[(name, since)] = {}
        return line.setdefault(partition, {})

    def begin(self, name: str, since: int, partition: int) -> None:
        """``partition`` of a stream created at epoch ``since`` opens here empty, as it is created.

        Every record it will hold passes through :meth:`admit` here (or
        reaches it with the owner's table, a catch-up), so a writer not seen
        yet has stored nothing in it: its first number must be 0. Until
        :meth:`forget_partition`.

        Examples
        --------
        >>> w = WriterSeqs()
        >>> w.begin("s", 1, 0)
        >>> w.admit("s", 1, 0, (7, 0), 2), w.admit("s", 1, 0, (8, 0), 1)
        (0, 0)
        >>> w.admit("s", 1, 0, (9, 3), 1)
        Traceback (most recent call last):
        ...
        aimss_dask.core.errors.WriteOrderError: writer 9 sent records of 's' partition 0 from sequence number 3, but it stored none here, and this partition was held here from its creation: ...
        """
        self._seqs(name, since, partition)
        self._whole.setdefault((name, since), set()).add(partition)

    def admit(
        self, name: str, since: int, partition: int, writer: tuple[int, int], n: int, strict: bool = True
    ) -> int:
        """``n`` records from ``writer`` = ``(id, first sequence number)``: how many at the head to drop.

        A writer seen before must go on from the next number: a gap would
        make the records in between look stored, so ``strict`` refuses it
        (:class:`~aimss_dask.core.errors.WriteOrderError`) and nothing
        changes. A copy from the owner passes ``strict=False``: the owner
        checked already. A writer not seen here starts at 0 on a partition
        held here since its creation (:meth:`begin`), anywhere otherwise (a
        log re-created empty: what it stored before is gone).
        """
        wid, first = writer
        seqs = self._seqs(name, since, partition)
        expected = seqs.get(wid)
        if strict and expected is None and first > 0 and self.whole(name, since, partition):
            raise WriteOrderError(
                f"writer {wid} sent records of {name!r} partition {partition} from sequence "
                f"number {first}, but it stored none here, and this partition was held here "
                f"from its creation: records 0 to {first - 1} did not arrive, so these are "
                "refused; this is a bug in aimss_dask, please report it"
            )
        if strict and expected is not None and first > expected:
            raise WriteOrderError(
                f"writer {wid} sent records of {name!r} partition {partition} from sequence "
                f"number {first}, but the next one stored here is {expected}: the records in "
                "between did not arrive, so these are refused; this is a bug in aimss_dask, "
                "please report it"
            )
        expected = expected or 0
        skip = min(n, max(0, expected - first))
        seqs[wid] = max(expected, first + n)
        return skip

    def table(self, name: str, since: int, partition: int) -> dict[int, int]:
        """Writer id -> next sequence number, for a copy that catches up."""
        return dict(self._next.get((name, since), {}).get(partition, {}))

    def whole(self, name: str, since: int, partition: int) -> bool:
        """Whether ``partition`` was held here since its creation (:meth:`begin`), its every writer known."""
        return partition in self._whole.get((name, since), ())

    def merge(self, name: str, since: int, partition: int, table: dict[int, int], whole: bool = False) -> None:
        """Learn an owner's :meth:`table` (the numbers only grow) as a catch-up from it ends.

        The catch-up's records carried no writer tags: unless the owner's
        table is :meth:`whole`, the copy's no longer is either.

        Examples
        --------
        >>> w = WriterSeqs()
        >>> w.begin("s", 1, 0); w.merge("s", 1, 0, {7: 4}, whole=True); w.whole("s", 1, 0)
        True
        >>> w.merge("s", 1, 0, {8: 2}); w.whole("s", 1, 0), w.table("s", 1, 0)
        (False, {7: 4, 8: 2})
        """
        seqs = self._seqs(name, since, partition)
        for wid, nxt in table.items():
            seqs[int(wid)] = max(seqs.get(int(wid), 0), int(nxt))
        if not whole:
            self._whole.get((name, since), set()).discard(partition)

    def forget_partition(self, name: str, since: int, partition: int) -> None:
        """Forget one partition's numbers (a copy cut back: they may count records it no longer holds).

        Examples
        --------
        >>> w = WriterSeqs()
        >>> w.admit("s", 1, 0, (7, 0), 3)
        0
        >>> w.forget_partition("s", 1, 0); w.table("s", 1, 0)
        {}
        """
        line = self._next.get((name, since))
        if line is not None:
            line.pop(partition, None)
        self._whole.get((name, since), set()).discard(partition)

    def forget(self, name: str, epoch: int) -> None:
        """Stream ``name`` up to ``epoch`` was destroyed; a newer one of the name keeps its numbers."""
        for key in [k for k in self._next if k[0] == name and k[1] <= epoch]:
            del self._next[key]
            self._whole.pop(key, None)
