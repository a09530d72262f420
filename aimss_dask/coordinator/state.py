"""The coordinator's metadata: streams, placement, seals, group offsets.

Plain data and pure methods, no asyncio: the scheduler plugin wraps it, and
the unit tests drive it directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aimss_dask.coordinator.access import StreamAccess
from aimss_dask.coordinator.placement import (
    add_replicas,
    owners_load,
    place_partitions,
    place_replicas,
)
from aimss_dask.core.errors import (
    InvalidArgumentError,
    InvalidOffsetError,
    StreamExistsError,
    StreamNotFoundError,
)
from aimss_dask.core.specs import StreamSpec, check_name, check_partition

__all__ = ["CoordinatorState", "StreamSpec", "check_name", "check_partition"]


@dataclass
class CoordinatorState:
    """All stream metadata of one cluster."""

    streams: dict[str, StreamSpec] = field(default_factory=dict)
    sealed: set[str] = field(default_factory=set)
    groups: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    #: name -> lost partition -> ``(first, end)``: the offsets its owner held
    #: when it died; ``end`` None where the partition was open (records written
    #: after the owner's last heartbeat are unknown). See :meth:`worker_lost`.
    lost: dict[str, dict[int, tuple[int, int | None]]] = field(default_factory=dict)
    #: name -> partition -> ``(start, end)`` its owner last reported: exact at
    #: seal (:meth:`note_bounds` from the seal replies), else from heartbeats.
    bounds: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    released: dict[str, set[int]] = field(default_factory=dict)
    #: name -> the epoch at which a recovery last re-created lost partitions,
    #: empty (a seal tagged with an older epoch would end them unfilled).
    recreated: dict[str, int] = field(default_factory=dict)
    #: ``(name, partition, replica)`` -> ``(epoch, seq, in_sync)``: the newest
    #: word on a copy that is not, or was not, known to hold every record
    #: readers may have seen (placed and catching up, or dropped by its
    #: owner). Such a copy is never promoted. No entry: in sync (placed with
    #: its stream, empty). See :meth:`replica_state`.
    replica_marks: dict[tuple[str, int, str], tuple[int, int, bool]] = field(default_factory=dict)
    #: name -> partitions rebuilt from a dead owner's spill files only in
    #: part: readable up to their entry in :attr:`lost` (see :meth:`commit_salvage`).
    salvaged: dict[str, set[int]] = field(default_factory=dict)
    #: Stream name -> its owner, share and grants (absent: not checked).
    access: dict[str, StreamAccess] = field(default_factory=dict)
    #: Epoch of the newest stream made here. Epochs grow across every stream
    #: of the cluster, so "streams made before X" is "epoch <= last_epoch at X".
    last_epoch: int = 0

    def _next_epoch(self) -> int:
        self.last_epoch += 1
        return self.last_epoch

    def next_epoch(self) -> int:
        """A new epoch, newer than every stream's (for a spec not applied yet)."""
        return self._next_epoch()

    def create(
        self,
        name: str,
        partitions: int,
        workers: Sequence[str],
        *,
        parent: str | None = None,
        exist_ok: bool = False,
        persist: bool = False,
        creator: str | None = None,
        colocate_with: str | None = None,
        prefer: Sequence[str | None] | None = None,
        replication: int | None = None,
        default_replication: int = 1,
        host_of: Mapping[str, str] | None = None,
    ) -> tuple[StreamSpec, bool]:
        """Create (or, with ``exist_ok``, find) a stream; ``(spec, created)``.

        ``replication`` copies of each partition (None:
        ``default_replication``; see :func:`place_replicas`, ``host_of`` maps
        workers to their hosts). An existing stream found with ``exist_ok``
        must have as many as a ``replication`` given.
        """
        check_name(name)
        if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
            raise InvalidArgumentError(
                f"partitions={partitions!r} for stream {name!r}: a stream needs at "
                "least 1 partition"
            )
        if parent is not None:
            check_name(parent, "parent stream name")
            if parent == name:
                raise InvalidArgumentError(f"stream {name!r} cannot be its own parent")
            if parent not in self.streams:
                raise StreamNotFoundError(
                    f"parent stream {parent!r} of {name!r} does not exist; create "
                    "the parent first"
                )
        old = self.streams.get(name)
        if old is not None:
            if not exist_ok:
                raise StreamExistsError(
                    f"stream {name!r} already exists with {old.partitions} "
                    "partition(s); pass exist_ok=True to reuse it, or pick another name"
                )
            if old.partitions != partitions:
                raise StreamExistsError(
                    f"stream {name!r} already exists with {old.partitions} "
                    f"partition(s), not {partitions}; use partitions={old.partitions} "
                    "or another name"
                )
            if replication is not None and old.replication != replication:
                raise StreamExistsError(
                    f"stream {name!r} already exists with replication={old.replication}, "
                    f"not {replication}; use replication={old.replication} or another name"
                )
            return old, False
        if replication is None:
            replication = default_replication
        if not isinstance(replication, int) or isinstance(replication, bool) or replication < 1:
            raise InvalidArgumentError(
                f"replication={replication!r} for stream {name!r} must be an int >= 1 "
                "(the copies of each partition, its owner's included)"
            )
        if replication > 1 and replication > len(workers):
            raise InvalidArgumentError(
                f"replication={replication} for stream {name!r} needs {replication} workers, "
                f"and the cluster has {len(workers)}; use replication <= {len(workers)} or "
                "add workers"
            )
        other = self.get(colocate_with) if colocate_with is not None else None
        if other is not None:
            # Partition p of both streams on one worker: a join reads both locally.
            if other.partitions != partitions:
                raise InvalidArgumentError(
                    f"stream {name!r} with {partitions} partition(s) cannot be "
                    f"co-located with {colocate_with!r}, which has {other.partitions}"
                )
            owners = list(other.owners)
        else:
            load = owners_load([s.owners for s in self.streams.values()], workers)
            owners = place_partitions(partitions, load, prefer)
        replicas: tuple[tuple[str, ...], ...] = ()
        if other is not None and replication > 1 and other.replication == replication:
            # Copies co-located too: a promotion hands both sides to one worker.
            replicas = other.replicas
        elif replication > 1:
            replicas = tuple(place_replicas(owners, replication, self._copies_load(workers, owners), host_of))
        spec = StreamSpec(
            name=name,
            partitions=partitions,
            owners=tuple(owners),
            epoch=self._next_epoch(),
            parent=parent,
            persist=persist,
            creator=creator,
            replicas=replicas,
            replication=replication,
        )
        self.streams[name] = spec
        return spec, True

    def get(self, name: str) -> StreamSpec:
        check_name(name)
        try:
            return self.streams[name]
        except KeyError:
            raise StreamNotFoundError(
                f"stream {name!r} does not exist; create it with "
                "aimss_dask.create_stream"
            ) from None

    def children(self, parent: str) -> list[str]:
        return sorted(n for n, s in self.streams.items() if s.parent == parent)

    def destroy(self, name: str) -> list[StreamSpec]:
        """Forget ``name`` and its descendants; the specs removed (children first)."""
        spec = self.get(name)
        removed: list[StreamSpec] = []
        for child in self.children(name):
            removed.extend(self.destroy(child))
        del self.streams[name]
        self.sealed.discard(name)
        self.groups.pop(name, None)
        self.lost.pop(name, None)
        self.bounds.pop(name, None)
        self.released.pop(name, None)
        self.recreated.pop(name, None)
        self.salvaged.pop(name, None)
        self.access.pop(name, None)
        self.replica_marks = {k: v for k, v in self.replica_marks.items() if k[0] != name}
        removed.append(spec)
        return removed

    def offsets(self, name: str, group: str) -> list[int]:
        spec = self.get(name)
        check_name(group, "consumer group")
        return list(self.groups.get(name, {}).get(group, [0] * spec.partitions))

    def consumed(self, name: str, p: int) -> int:
        """The lowest offset any consumer group of ``name`` has committed in partition ``p``.

        A new copy is built from there (``aimss.recovery: offsets``): every
        group has passed the records before it. 0 for a stream without
        groups: nobody is known to have read anything.

        Examples
        --------
        >>> st = CoordinatorState()
        >>> _ = st.create("s", 2, ["a"])
        >>> st.consumed("s", 0)
        0
        >>> _ = st.commit("s", "g1", {0: 70, 1: 5}); _ = st.commit("s", "g2", {0: 40})
        >>> st.consumed("s", 0), st.consumed("s", 1)
        (40, 0)
        """
        check_partition(self.get(name), p)
        return min((offs[p] for offs in self.groups.get(name, {}).values()), default=0)

    def commit(self, name: str, group: str, offsets: dict[int, int]) -> list[int]:
        """Record a group's progress; offsets only move forward (at-least-once)."""
        spec = self.get(name)
        check_name(group, "consumer group")
        # Check everything first: offsets never go back, so a half-applied
        # commit could not be undone.
        for p, off in offsets.items():
            check_partition(spec, p)
            if not isinstance(off, int) or isinstance(off, bool) or off < 0:
                raise InvalidOffsetError(
                    f"offset {off!r} for group {group!r} on stream {name!r} must be "
                    "a non-negative int"
                )
        current = self.groups.setdefault(name, {}).setdefault(group, [0] * spec.partitions)
        for p, off in offsets.items():
            current[p] = max(current[p], off)
        return list(current)

    def forget_group(self, name: str, group: str) -> None:
        """Drop consumer group ``group`` of stream ``name`` (one a call made for itself and is done with)."""
        groups = self.groups.get(name)
        if groups is not None:
            groups.pop(group, None)

    def release(self, name: str, partitions: Iterable[int]) -> bool:
        """Readers are done with ``partitions`` for good; True once all are."""
        spec = self.get(name)
        for p in partitions:
            check_partition(spec, p)
        done = self.released.setdefault(name, set())
        done.update(partitions)
        return len(done) == spec.partitions

    def note_bounds(self, name: str, epoch: int, bounds: Iterable[Sequence[int]]) -> None:
        """An owner reports ``(partition, start, end)`` of its logs of stream ``name`` at ``epoch``.

        Stale reports (an older stream of that name, a partition lost
        already) are ignored; offsets only grow.
        """
        spec = self.streams.get(name)
        if spec is None or not spec.answers(epoch):
            return
        known = self.bounds.setdefault(name, {})
        gone = self.lost.get(name, {})
        for p, start, end in bounds:
            if 0 <= p < spec.partitions and p not in gone:
                old = known.get(p, (0, 0))
                known[p] = (max(old[0], start), max(old[1], end))

    def promote(
        self,
        address: str,
        workers: Sequence[str],
        host_of: Mapping[str, str] | None = None,
        planned: Mapping[str, StreamSpec] | None = None,
        names: Iterable[str] | None = None,
    ) -> list[tuple[StreamSpec, StreamSpec]]:
        """Replicated streams that held a copy on ``address``, and what each becomes without it.

        Where ``address`` owned a partition, a surviving replica owns it
        now; where it held a copy, another of ``workers`` is placed to hold
        one (re-replication), while enough are left. A partition whose only
        copy was there stays on ``address``: :meth:`worker_lost` names it
        lost. Not applied: :meth:`commit_promotion` does, once the workers
        hold it. ``planned``: specs of promotions not applied yet (a worker
        lost while another's loss is handled): plans start from them.
        ``names``: only these streams (None: all).

        Examples
        --------
        >>> st = CoordinatorState()
        >>> s, _ = st.create("s", 2, ["a", "b", "c"], replication=2)
        >>> s.owners, s.replicas
        (('a', 'b'), (('c',), ('a',)))
        >>> [(new.owners, new.replicas) for _, new in st.promote("a", ["b", "c"])]
        [(('c', 'b'), (('b',), ('c',)))]

        A copy still catching up (or dropped by its owner) is not promoted:

        >>> st = CoordinatorState()
        >>> s, _ = st.create("s", 1, ["a", "b", "c"], replication=2)
        >>> _, new = st.promote("b", ["a", "c"])[0]  # its replica died: c is placed
        >>> (new.owners, new.replicas, st.in_sync("s", 0, "c"))
        (('a',), (('c',),), False)
        >>> _ = st.commit_promotion(s, new)
        >>> [n.owners for _, n in st.promote("a", ["c"])]  # a dies before c caught up: lost
        [('a',)]
        """
        out = []
        live = set(workers)
        for name in list(self.streams) if names is None else [n for n in names if n in self.streams]:
            spec = (planned or {}).get(name) or self.streams[name]
            if not spec.replicas or not any(address in spec.holders(p) for p in range(spec.partitions)):
                continue
            held = [[w for w in spec.holders(p) if w != address] for p in range(spec.partitions)]
            load = self._copies_load(workers)
            owners = list(spec.owners)
            replicas = []
            epoch = self._next_epoch()
            for p, copies in enumerate(held):
                if owners[p] == address:
                    fit = [w for w in copies if w in live and self.in_sync(spec.name, p, w)]
                    if not fit:
                        # No copy holds every record readers may have seen:
                        # lost (named), not silently shorter.
                        replicas.append(tuple(copies))
                        continue
                    owners[p] = fit[0]
                rest = [w for w in copies if w != owners[p]]
                new = add_replicas(copies, spec.replication - len(copies), load, host_of)
                for w in new:
                    self.replica_marks[(spec.name, p, w)] = (epoch, -1, False)
                replicas.append(tuple(rest + new))
            out.append((spec, spec.recovered(epoch, tuple(owners), tuple(replicas))))
        return out

    def fill(
        self, workers: Sequence[str], host_of: Mapping[str, str] | None = None, skip: Iterable[str] = ()
    ) -> list[tuple[StreamSpec, StreamSpec]]:
        """Replicated streams with partitions short of copies, and what each becomes with new ones on ``workers``.

        A worker joined (or came back): partitions left with fewer copies
        than their factor by an earlier loss get them back. Lost partitions
        and streams in ``skip`` (a promotion under way) are left alone. Not
        applied: :meth:`commit_promotion` does, once the workers hold them.

        Examples
        --------
        >>> st = CoordinatorState()
        >>> s, _ = st.create("s", 2, ["a", "b"], replication=2)
        >>> _, short = st.promote("b", ["a"])[0]
        >>> _ = st.commit_promotion(s, short)
        >>> short.owners, short.replicas
        (('a', 'a'), ((), ()))
        >>> [(new.owners, new.replicas) for _, new in st.fill(["a", "c"])]
        [(('a', 'a'), (('c',), ('c',)))]
        """
        out = []
        skipped = set(skip)
        for spec in list(self.streams.values()):
            if not spec.replicas or spec.name in skipped:
                continue
            lost = self.lost.get(spec.name, {})
            short = [p for p in range(spec.partitions) if p not in lost and len(spec.holders(p)) < spec.replication]
            if not short:
                continue
            load = self._copies_load(workers)
            epoch = None
            replicas = list(spec.replicas)
            for p in short:
                new = add_replicas(spec.holders(p), spec.replication - len(spec.holders(p)), load, host_of)
                if not new:
                    continue
                epoch = self._next_epoch() if epoch is None else epoch
                for w in new:
                    self.replica_marks[(spec.name, p, w)] = (epoch, -1, False)
                replicas[p] = (*replicas[p], *new)
            if epoch is not None:
                out.append((spec, spec.recovered(epoch, spec.owners, tuple(replicas))))
        return out

    def replace_copies(
        self,
        name: str,
        given_up: Iterable[tuple[int, str]],
        workers: Sequence[str],
        host_of: Mapping[str, str] | None = None,
        avoid: Iterable[str] = (),
    ) -> tuple[StreamSpec, StreamSpec] | None:
        """Stream ``name`` without the copies its owners gave up on, with new ones placed on ``workers``.

        ``given_up``: ``(partition, replica)`` pairs whose owner could not
        keep that copy up to date (its catch-up failed, it refused records).
        Such a copy no longer counts, so the stream must not list it: it
        would look whole while it runs on fewer copies. Each gets a new,
        empty copy that catches up: on another worker where one is free,
        else on the same one again; never on ``avoid`` (workers that gave
        up on that partition too often). With none, the partition is short
        (``under_replicated``) until a worker joins (:meth:`fill`). None
        when no pair is still listed. Not applied: :meth:`commit_promotion`
        does, once the workers hold it.

        Examples
        --------
        >>> st = CoordinatorState()
        >>> s, _ = st.create("s", 2, ["a", "b", "c"], replication=2)
        >>> s.replicas
        (('c',), ('a',))
        >>> _, new = st.replace_copies("s", [(0, "c")], ["a", "b", "c"])
        >>> new.replicas, st.in_sync("s", 0, "b")
        ((('b',), ('a',)), False)
        >>> st.replace_copies("s", [(0, "c")], ["a", "c"])[1].replicas  # none free: c again, empty
        (('c',), ('a',))
        >>> st.replace_copies("s", [(0, "c")], ["a", "c"], avoid=["c"])[1].replicas  # short
        ((), ('a',))
        >>> st.replace_copies("s", [(0, "b")], ["a", "b", "c"]) is None  # not a copy of 0
        True
        """
        spec = self.streams.get(name)
        if spec is None or not spec.replicas:
            return None
        drop: dict[int, set[str]] = {}
        for p, w in given_up:
            if 0 <= p < spec.partitions and w in spec.replicas_of(p) and p not in self.lost.get(name, {}):
                drop.setdefault(p, set()).add(w)
        if not drop:
            return None
        epoch = self._next_epoch()
        barred = set(avoid)
        load = self._copies_load([w for w in workers if w not in barred])
        replicas = list(spec.replicas)
        for p, gone in sorted(drop.items()):
            kept = [w for w in spec.replicas_of(p) if w not in gone]
            held = [spec.owners[p], *kept]
            new = add_replicas(held + sorted(gone), spec.replication - len(held), load, host_of)
            new += add_replicas(held + new, spec.replication - len(held) - len(new), load, host_of)
            for w in new:
                self.replica_marks[(name, p, w)] = (epoch, -1, False)
            replicas[p] = (*kept, *new)
        return spec, spec.recovered(epoch, spec.owners, tuple(replicas))

    def _copies_load(self, workers: Sequence[str], *more: Sequence[str]) -> dict[str, int]:
        """Partitions each of ``workers`` holds, owned or copied, over every stream (and ``more`` owner lists)."""
        held = [s.owners for s in self.streams.values()] + list(more)
        held += [r for s in self.streams.values() for r in s.replicas]
        return owners_load(held, workers)

    def in_sync(self, name: str, p: int, replica: str) -> bool:
        """Whether ``replica``'s copy of partition ``p`` of ``name`` may take over (see :attr:`replica_marks`)."""
        mark = self.replica_marks.get((name, p, replica))
        return mark is None or mark[2]

    def replica_state(self, name: str, epoch: int, p: int, replica: str, seq: int, in_sync: bool) -> None:
        """The owner of partition ``p`` (at ``epoch``) says whether ``replica`` holds all it holds.

        ``seq`` orders one owner's reports; a newer epoch's owner outranks
        an older one. Older words than the newest known are ignored (reports
        race over separate connections).
        """
        spec = self.streams.get(name)
        # A newer epoch than the stream's: the owner applied a promotion the
        # coordinator has not committed yet (an empty copy catches up at
        # once); its word counts then, or that copy would never count.
        if spec is None or epoch < spec.first_epoch or not 0 <= p < spec.partitions:
            return
        key = (name, p, replica)
        old = self.replica_marks.get(key)
        if old is None or (epoch, seq) > old[:2]:
            self.replica_marks[key] = (epoch, seq, in_sync)

    def same_records(self, name: str, epoch: int) -> bool:
        """Whether stream ``name`` at ``epoch`` holds every record written to it as of that older ``epoch``.

        True when only owners or replicas changed since (a promotion), not
        when a recovery re-created partitions empty.
        """
        spec = self.get(name)
        return spec.first_epoch <= epoch <= spec.epoch and epoch >= self.recreated.get(name, 0)

    def commit_promotion(self, old: StreamSpec, new: StreamSpec) -> bool:
        """Replace ``old`` by ``new`` from :meth:`promote`; False if ``old`` is gone (destroyed, replaced)."""
        if self.streams.get(old.name) is not old:
            return False
        self.streams[old.name] = new
        return True

    def worker_lost(
        self,
        address: str,
        keep: Mapping[str, Iterable[int]] | None = None,
        only: Mapping[str, Iterable[int] | None] | None = None,
    ) -> list[str]:
        """Mark the partitions ``address`` owned as lost, with their offsets; names affected.

        A sealed partition's range is exact (its end was reported at seal);
        an open one's end is None: records may have arrived after the
        owner's last report. ``keep``: partitions by stream that a replica
        takes over (:meth:`promote`), not lost. ``only``: just these streams
        (and of each, these partitions; None: all it owned), not every
        stream with a partition there: another stream's may be taken over
        by a promotion not yet applied, or belong to a stream made since.
        """
        hit = []
        for name, spec in self.streams.items():
            if only is not None and name not in only:
                continue
            kept = set((keep or {}).get(name, ()))
            wanted = None if only is None or only[name] is None else set(only[name])  # type: ignore[arg-type]
            ps = [
                p for p, w in enumerate(spec.owners)
                if w == address and p not in kept and (wanted is None or p in wanted)
            ]
            if not ps:
                continue
            known = self.bounds.get(name, {})
            sealed = name in self.sealed
            lost = self.lost.setdefault(name, {})
            partial = self.salvaged.get(name, set())
            for p in ps:
                start, end = known.get(p, (0, 0))
                if p in partial:
                    # Rebuilt in part from spill files, and lost again: what
                    # it held goes with what it had lost already.
                    partial.discard(p)
                    lost[p] = (min(start, lost[p][0]), lost[p][1])
                elif p not in lost:
                    lost[p] = (start, end if sealed else None)
            hit.append(name)
        return hit

    def recovered(self, name: str, partitions: Sequence[int], owners: Sequence[str]) -> StreamSpec:
        """Stream ``name`` under a new epoch, its lost ``partitions`` placed on ``owners`` (one each).

        Not applied: :meth:`commit_recovery` does, once the workers hold it.

        Examples
        --------
        >>> st = CoordinatorState()
        >>> s, _ = st.create("s", 2, ["a", "b"])
        >>> _ = st.worker_lost("b")
        >>> new = st.recovered("s", [1], ["c"])
        >>> (new.owners, new.epoch > s.epoch, new.first_epoch == s.epoch)
        (('a', 'c'), True, True)
        >>> st.commit_recovery(s, new), st.lost, st.get("s") is new
        (True, {}, True)
        """
        spec = self.get(name)
        owners_now = list(spec.owners)
        for p, w in zip(partitions, owners, strict=True):
            check_partition(spec, p)
            owners_now[p] = w
        replicas = None
        if spec.replicas:
            # A partition re-created on a worker that held a copy of it (one
            # still catching up: it drops that first) has one copy fewer.
            replicas = tuple(
                tuple(w for w in spec.replicas_of(p) if w != owners_now[p]) for p in range(spec.partitions)
            )
        return spec.recovered(self._next_epoch(), tuple(owners_now), replicas)

    def commit_recovery(self, old: StreamSpec, new: StreamSpec, parts: Iterable[int] | None = None) -> bool:
        """Replace ``old`` by its recovery ``new``: the partitions re-created (``parts``) are no longer lost.

        ``parts`` None: those whose owner changed. Named, a partition placed
        on a worker that came back at its dead owner's address (a nanny on
        a fixed port) counts too. False (nothing changed) if ``old`` is no
        longer the stream of its name (destroyed, or recovered again meanwhile).
        """
        if self.streams.get(old.name) is not old:
            return False
        self.streams[old.name] = new
        self.recreated[old.name] = new.epoch
        moved = (
            {p for p in range(new.partitions) if new.owners[p] != old.owners[p]} if parts is None else set(parts)
        )
        for p in moved:
            # The copies hold what the dead owner had: they catch up (and cut
            # back) from the re-created log before they count.
            for w in new.replicas_of(p):
                key = (old.name, p, w)
                if self.replica_marks.get(key, (0, -1))[:2] < (new.epoch, -1):
                    self.replica_marks[key] = (new.epoch, -1, False)
        lost = self.lost.get(old.name, {})
        for p in moved:
            lost.pop(p, None)
            self.bounds.get(old.name, {}).pop(p, None)
        if not lost:
            self.lost.pop(old.name, None)
        return True

    def commit_salvage(self, old: StreamSpec, new: StreamSpec, got: Mapping[int, tuple[int, int]]) -> bool:
        """Replace ``old`` by ``new``, whose lost partitions ``got`` were rebuilt from spill files: ``{p: (start, end)}``.

        A partition rebuilt up to the end it had when its owner died is no
        longer lost; one rebuilt in part stays lost from ``end`` on (and
        readable below it: :attr:`salvaged`). False (nothing changed) if
        ``old`` is no longer the stream of its name.

        Examples
        --------
        >>> st = CoordinatorState()
        >>> s, _ = st.create("s", 2, ["a", "b"])
        >>> st.note_bounds("s", s.epoch, [(0, 0, 10), (1, 0, 50)]); st.sealed.add("s")
        >>> st.worker_lost("a"), st.worker_lost("b"), st.lost["s"]
        (['s'], ['s'], {0: (0, 10), 1: (0, 50)})
        >>> new = s.recovered(st.next_epoch(), ("c", "c"))
        >>> st.commit_salvage(s, new, {0: (0, 10), 1: (20, 30)})
        True
        >>> st.lost["s"], st.salvaged["s"], st.bounds["s"][1]
        ({1: (30, 50)}, {1}, (20, 30))
        """
        if self.streams.get(old.name) is not old:
            return False
        self.streams[old.name] = new
        lost = self.lost.get(old.name, {})
        bounds = self.bounds.setdefault(old.name, {})
        for p, (start, end) in got.items():
            last = lost.get(p, (start, end))[1]
            bounds[p] = (start, end)
            if last is not None and end >= last:
                lost.pop(p, None)
                self.salvaged.get(old.name, set()).discard(p)
            else:
                lost[p] = (end, last)
                self.salvaged.setdefault(old.name, set()).add(p)
        if not lost:
            self.lost.pop(old.name, None)
        return True

    def left_with_client(self, client: str, live: set[str]) -> list[str]:
        """Non-persistent streams that go now that ``client`` left (``live``: the clients still here).

        Those it owned, unless shared with another live application that
        holds a handle on them (those go with the last of them); see
        :meth:`StreamAccess.leave`. The consumer groups it kept on other
        applications' streams go too (their offsets no longer hold records).
        """
        out = []
        for n, s in self.streams.items():
            acc = self.access.get(n)
            gone = acc.leave(client, live) if acc is not None else s.creator == client
            if gone and not s.persist:
                out.append(n)
        # Another application's groups are kept under its client id, which a
        # restarted application does not get back: they would hold retention
        # (what sinks may trim, what a new copy must keep) for good.
        prefix = f"{client}/"
        for groups in self.groups.values():
            for g in [g for g in groups if g.startswith(prefix)]:
                del groups[g]
        return sorted(out)

    def clear(self) -> list[StreamSpec]:
        specs = list(self.streams.values())
        self.streams.clear()
        self.sealed.clear()
        self.groups.clear()
        self.lost.clear()
        self.bounds.clear()
        self.released.clear()
        self.recreated.clear()
        self.salvaged.clear()
        self.access.clear()
        return specs
