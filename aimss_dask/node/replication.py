"""Copies of partitions on other workers: an owner forwards what it stores, in its order.

Replication (issue 19, item 1) is log shipping from the owner, as in Kafka:

- The owner appends a group to its log, then queues it for every replica of
  the partition, under one lock (:attr:`Replicator.append_lock`), so the
  queue has the log's order.
- One sender thread per replica worker pushes its queue, in order, over the
  data plane (Dask's comms where there is none), batched like a producer's
  writes. The replica appends each group exactly at the offset it has on
  the owner (:meth:`~aimss_dask.log.store.LogStore.append_at`): every copy
  holds the same record at the same offset, so consumer groups' offsets
  mean the same on any copy.
- Readers on the owner see a record only once every replica in sync holds
  it (:meth:`~aimss_dask.log.store.LogStore.commit`, Kafka's high
  watermark), and the owner answers a writer's batch only then: ``flush()``
  and ``seal()`` return with every copy stored (``acks=all``).
- Replica traffic has the back-pressure of pushes: the owner's answer to a
  writer waits for it, and a replica spills what it receives like any log.

A replica that joins late (placed after a worker died, or left behind by a
promotion) first catches up from the owner's log (a *sync*) and counts for
the watermark only once it has: live writes are not held up by a copy being
rebuilt. A replica that cannot be reached is dropped from its partitions
here; the coordinator, which sees the worker leave, places another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from distributed.utils import sync

from aimss_dask.core.errors import (
    AIMSSError,
    StreamNotFoundError,
    error_from_wire,
    raise_from_wire,
)
from aimss_dask.core.specs import StreamSpec
from aimss_dask.log import records as rec
from aimss_dask.log.store import LogStore
from aimss_dask.node.dedup import OriginFilter
from aimss_dask.node.writers import WriterSeqs
from aimss_dask.transport import dataplane, secure
from aimss_dask.transport.liveness import EVERY, Liveness, call_listed
from aimss_dask.transport.producer import ask_data_address
from aimss_dask.transport.rpc import Listed
from aimss_dask.transport.secure import Conn, Credentials

logger = logging.getLogger("aimss_dask")

#: Longest an owner waits for its replicas before it answers a writer with an error (s).
ACK_TIMEOUT = 120.0

#: Tries to tell the coordinator a copy fell behind (backing off up to 5 s between).
REPORT_TRIES = 12

#: Bytes of one catch-up read from the owner's log.
SYNC_CHUNK = 16 * 2**20

#: How long a replica may refuse copies as of a stream it does not know before
#: it stops counting as a copy (s): after a loss, the coordinator tells every
#: worker of the stream's new epoch at once, and an owner may hear first.
NEW_EPOCH_GRACE = 10.0


@dataclass(eq=False)
class _Part:
    """A partition owned here that has replicas."""

    name: str
    epoch: int
    p: int
    #: Replicas that hold everything up to the offset given (they count for the watermark).
    insync: dict[str, int] = field(default_factory=dict)
    #: Replicas catching up (a sync is queued for each).
    joining: set[str] = field(default_factory=set)
    #: Replicas dropped while in sync, with the end they held: they bound the
    #: watermark until the coordinator knows not to promote them.
    dropping: dict[str, int] = field(default_factory=dict)
    #: Sealed here while copies were still catching up: forgotten once they have.
    closing: bool = False
    #: Markers queued (see :meth:`Replicator.shipped`), and the last each replica confirmed.
    marks: int = 0
    marked: dict[str, int] = field(default_factory=dict)
    #: This log's end when the partition began to be tracked here (None: unknown).
    taken_at: int | None = None

    def has(self, dest: str) -> bool:
        return dest in self.insync or dest in self.joining


@dataclass(eq=False)
class _Ship:
    part: _Part
    at: int
    records: list[Any]
    sizes: list[int]
    origin: tuple[int, int, int] | None
    writer: tuple[int, int] | None
    #: A marker's number (0: records).
    mark: int = 0
    #: The records' ``Serialized`` forms as a writer sent them (None: encode them).
    wire: list[Any] | None = None

    def encoded(self) -> list[Any]:
        """The records as they go to a replica: their wire forms, or encoded now."""
        if self.wire is not None:
            return self.wire
        return [rec.encode(r, self.part.name)[0] for r in self.records]


@dataclass(eq=False)
class _Sync:
    part: _Part


@dataclass(eq=False)
class _Dest:
    address: str
    queue: deque[_Ship | _Sync] = field(default_factory=deque)
    thread: threading.Thread | None = None


class Replicator:
    """The replicas of the partitions one worker owns: forwards, catches up, keeps the watermark.

    ``store``: the owner's log. ``writers``: its filter of writers' sequence
    numbers, handed to a copy that catches up. ``tell``: sends the
    coordinator a ``replica_state`` message (which copies may take over;
    None: nobody is told, and a dropped copy stops counting at once).
    ``loop`` and ``rpc``: the worker's, to reach replicas over Dask's comms
    where the data plane is not used. ``consumed(name, p)``: the lowest
    offset a consumer group committed in a partition; a catch-up starts
    there (``aimss.recovery: offsets``; None: from the log's start, ``full``).
    ``rate``: bytes per second all catch-ups from here send together (None:
    no bound), so rebuilding a copy leaves room for live pushes.
    """

    def __init__(
        self,
        store: LogStore,
        *,
        loop: Any,
        rpc: Any,
        address: str,
        batch_size: int,
        credentials: Credentials | None,
        writers: WriterSeqs | None = None,
        origins: OriginFilter | None = None,
        tell: Callable[[dict[str, Any]], Awaitable[Any]] | None = None,
        consumed: Callable[[str, int], int] | None = None,
        rate: int | None = None,
        listed: Listed | None = None,
        liveness_interval: float = EVERY,
    ) -> None:
        self.store = store
        self._listed = listed
        self._consumed = consumed
        self._rate = rate
        self._rate_lock = threading.Lock()
        self._rate_free = 0.0  # when the paced catch-up traffic may send next (time.monotonic)
        self._writers = writers
        self._origins = origins
        self._tell = tell
        # Words for the coordinator on which copies may take over, oldest first.
        self._reports: list[tuple[_Part, str, bool, int, int, bool]] = []
        self._report_seq = 0
        self._loop = loop
        # Cuts a copy's connection when its replica stopped answering without
        # dying and the scheduler removed it (see liveness): the copy is lost.
        self._liveness = Liveness(loop, listed, liveness_interval)
        self._rpc = rpc
        self.address = address
        self._batch_size = batch_size
        # The cluster's data-plane credentials; None: copies go over Dask's comms.
        self._credentials = credentials
        #: Held around an append to a replicated partition and its queueing,
        #: so queues keep the log's order.
        self.append_lock = threading.Lock()
        self._cond = threading.Condition()
        self._parts: dict[tuple[str, int], _Part] = {}
        self._names: dict[str, int] = {}  # stream -> partitions tracked here
        self._dests: dict[str, _Dest] = {}
        # (stream, partition, replica) -> when the replica first refused copies
        # as a stream it does not know (see NEW_EPOCH_GRACE).
        self._refused: dict[tuple[str, int, str], float] = {}
        self.closed = False
        #: Counters for status(): groups and records sent, catch-ups done.
        self.stats = {
            "replica_records_sent": 0, "replica_syncs": 0, "replicas_dropped": 0,
            "replica_sync_bytes": 0, "replica_sync_records_skipped": 0,
        }

    # -- configuration (the event loop) ---------------------------------------------------

    def tracks(self, name: str) -> bool:
        """Whether partitions of ``name`` owned here have replicas (a dict lookup)."""
        return name in self._names

    def configure(self, spec: StreamSpec, fresh: bool = False) -> None:
        """The partitions of ``spec`` owned here and their replicas, as the coordinator placed them.

        ``fresh``: a new stream, whose replicas were opened empty before
        this owner: they are in sync from the start. Otherwise replicas new
        to a partition catch up first. Replicas no longer listed are
        dropped; a partition left without any shows every record to readers.
        """
        with self.append_lock, self._cond:
            for p in range(spec.partitions):
                key = (spec.name, p)
                part = self._parts.get(key)
                mine = spec.owners[p] == self.address
                want = set(spec.replicas_of(p)) if mine else set()
                if part is not None and part.epoch < spec.first_epoch:
                    # An older stream of the name, destroyed while a copy
                    # of it caught up: not this one's.
                    self._forget_part(part)
                    part = None
                if not want:
                    if part is not None:
                        self._untrack(key)
                        self.store.commit(spec.name, None, p, None)
                    continue
                if part is None:
                    try:
                        self.store.hold_back(spec.name, spec.epoch, [p])
                    except AIMSSError:
                        # Not opened here yet (a lost partition re-created
                        # here: the coordinator tells every worker of the
                        # new epoch first): configured when it is opened.
                        continue
                    part = self._parts[key] = _Part(spec.name, spec.epoch, p)
                    # Where this log ended when it began to count here (a copy
                    # promoted to owner ends where it took over): a copy past
                    # that holds records of the owner that died, which writers
                    # send again here, perhaps otherwise (see _sync).
                    part.taken_at = self.store.held(spec.name, spec.epoch, p)
                    self._names[spec.name] = self._names.get(spec.name, 0) + 1
                part.epoch = max(part.epoch, spec.epoch)
                for dest in list(part.insync) + list(part.joining) + list(part.dropping):
                    if dest not in want:
                        # The coordinator no longer lists it: it cannot take over.
                        part.insync.pop(dest, None)
                        part.joining.discard(dest)
                        part.dropping.pop(dest, None)
                for dest in want - set(part.insync) - part.joining:
                    if fresh:
                        part.insync[dest] = self.store.bounds(spec.name, spec.epoch, p)[0]
                    else:
                        part.joining.add(dest)
                        self._queue(dest).append(_Sync(part))
                self._advance(part)
            self._cond.notify_all()

    def forget(self, name: str, partitions: list[int] | None = None, epoch: int | None = None) -> None:
        """Partitions of ``name`` (None: all) were sealed or dropped here: nothing more to send.

        ``epoch``: the stream up to that epoch was destroyed; a newer one of
        the name (its run restarted before this late word) is kept.
        """
        with self.append_lock, self._cond:
            keys = [
                k for k, part in self._parts.items()
                if k[0] == name and (partitions is None or k[1] in partitions) and (epoch is None or part.epoch <= epoch)
            ]
            parts = set()
            for key in keys:
                part = self._parts[key]
                if part.joining:
                    # Copies still catching up (placed after a loss) finish,
                    # and their sync seals them: a seal must not leave them short.
                    part.closing = True
                    continue
                parts.add(id(part))
                self._untrack(key)
            self._unqueue(parts)

    def _untrack(self, key: tuple[str, int]) -> None:
        del self._parts[key]
        for k in [k for k in self._refused if k[:2] == key]:
            del self._refused[k]
        n = self._names[key[0]] - 1
        if n:
            self._names[key[0]] = n
        else:
            del self._names[key[0]]

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # -- appends (receiver and task threads, under append_lock) ------------------------------

    def shipped(
        self,
        name: str,
        p: int,
        first: int,
        records: list[Any],
        sizes: list[int],
        origin: tuple[int, int, int] | None = None,
        writer: tuple[int, int] | None = None,
        wire: list[Any] | None = None,
    ) -> int:
        """``records`` were appended at ``first``: queue them for the partition's replicas.

        ``wire``: their ``Serialized`` forms as they arrived from a writer,
        forwarded as they are (an owner that encoded each record again would
        pay for a second pickling of every record it copies).

        No ``records`` but a ``writer``: a marker, that the writer's numbers
        go on from ``writer[1]`` (its group was a second copy of an input,
        dropped here: the copies must not take the skipped numbers for lost
        records once one of them owns the partition). Returns its number,
        for :meth:`wait_marker` (0: records, or nothing to tell).

        Call with :attr:`append_lock` held since before the append.
        """
        part = self._parts.get((name, p))
        if part is None or (not records and writer is None):
            return 0
        with self._cond:
            ship = _Ship(
                part, first, list(records), list(sizes), origin, writer,
                wire=list(wire) if wire is not None and len(wire) == len(records) else None,
            )
            if not records:
                part.marks += 1
                ship.mark = part.marks
            dests = list(part.insync) + list(part.joining)
            for dest in dests:
                self._queue(dest).append(ship)
            if not part.insync:
                self._advance(part)
            self._cond.notify_all()
            return ship.mark

    def wait_marker(self, name: str, p: int, mark: int) -> bool:
        """Block until every replica in sync of ``p`` has marker ``mark`` (see :meth:`shipped`); False on timeout.

        The writer is answered only then: should this owner die first, the
        copy that takes over knows where the writer's numbers stand.
        """
        deadline = time.monotonic() + ACK_TIMEOUT
        with self._cond:
            while True:
                part = self._parts.get((name, p))
                if part is None or all(part.marked.get(d, 0) >= mark for d in part.insync):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)

    def wait(self, name: str, epoch: int | None, p: int, end: int) -> bool:
        """Block until readers of ``p`` may see up to ``end`` (every copy holds it); False on timeout."""
        return self.store.wait(name, epoch, p, end - 1, ACK_TIMEOUT)

    def wait_all(self, names: list[str] | None = None) -> None:
        """Block until every record stored here so far in partitions of ``names`` (None: all) is on every copy.

        Raises :class:`AIMSSError` naming the partitions whose copies did not
        hold them after :data:`ACK_TIMEOUT`, as a writer from another process
        is answered: a flush that returned would promise copies that a
        promotion would not find.
        """
        with self._cond:
            todo = [
                (part.name, part.epoch, part.p)
                for part in self._parts.values()
                if names is None or part.name in names
            ]
        short: dict[str, list[int]] = {}
        for name, epoch, p in todo:
            try:
                end = self.store.held(name, epoch, p)
            except AIMSSError:
                continue  # dropped meanwhile
            if not self.wait(name, epoch, p, end):
                short.setdefault(name, []).append(p)
        if short:
            name, parts = sorted(short.items())[0]
            raise AIMSSError(
                f"the replicas of stream {name!r} partitions {parts} did not confirm the records "
                f"written here in time ({ACK_TIMEOUT:.0f} s): they are stored here, not on every copy"
            )

    # -- senders (one thread per replica worker) -------------------------------------------

    def _queue(self, dest: str) -> deque[_Ship | _Sync]:
        """``dest``'s queue, its sender started (hold ``_cond``)."""
        d = self._dests.get(dest)
        if d is None:
            d = self._dests[dest] = _Dest(dest)
        if d.thread is None:
            d.thread = threading.Thread(
                target=self._run, args=(d,), name=f"aimss-replicate-{dest}", daemon=True
            )
            d.thread.start()
        return d.queue

    def _advance(self, part: _Part) -> None:
        """Readers may see what every replica in sync holds (hold ``_cond``)."""
        try:
            held = self.store.held(part.name, part.epoch, part.p)
        except AIMSSError:
            return
        upto = min([held, *part.insync.values(), *part.dropping.values()])
        self.store.commit(part.name, part.epoch, part.p, upto)

    def _next(self, d: _Dest) -> list[_Ship] | _Sync | None:
        with self._cond:
            self._cond.wait_for(lambda: self.closed or bool(d.queue))
            if self.closed:
                return None
            if isinstance(d.queue[0], _Sync):
                return d.queue.popleft()  # type: ignore[return-value]
            batch: list[_Ship] = []
            size = 0
            while d.queue and isinstance(d.queue[0], _Ship) and (
                not batch or size + sum(d.queue[0].sizes) <= self._batch_size
            ):
                ship = d.queue.popleft()
                assert isinstance(ship, _Ship)
                batch.append(ship)
                size += sum(ship.sizes)
            return batch

    def _live(self, d: _Dest, syncing: _Part | None = None) -> list[_Ship]:
        """Take a batch of live copies queued for ``d`` that may go ahead of catch-ups (hold ``_cond``).

        Not those of ``syncing`` (being caught up now) or of a partition
        with a catch-up queued before them: that copy needs its records in
        order.
        """
        blocked = set() if syncing is None else {id(syncing)}
        batch: list[_Ship] = []
        size = 0
        for item in d.queue:
            if isinstance(item, _Sync):
                blocked.add(id(item.part))
                continue
            if id(item.part) in blocked:
                continue
            if batch and size + sum(item.sizes) > self._batch_size:
                break
            batch.append(item)
            size += sum(item.sizes)
        if batch:
            taken = {id(s) for s in batch}
            d.queue = deque(e for e in d.queue if id(e) not in taken)
        return batch

    def _run(self, d: _Dest) -> None:
        conn: Conn | None = None
        try:
            while True:
                work = self._next(d)
                if work is None:
                    return
                if isinstance(work, _Sync):
                    try:
                        conn = self._sync(d, work.part, conn)
                        with self._cond:
                            self._refused.pop((work.part.name, work.part.p, d.address), None)
                        if self._dropped_here(work.part):
                            # Destroyed while this copy caught up: a part
                            # left tracked would hold back, or stop, a new
                            # stream of the name placed here.
                            self._untrack_part(work.part)
                    except StreamNotFoundError as e:
                        if self._not_heard_yet(d, work.part):
                            # The replica has not heard of the stream's new
                            # epoch yet (told to every worker at once): again.
                            with self._cond:
                                d.queue.appendleft(work)
                            time.sleep(0.05)
                            continue
                        self._sync_failed(d, work.part, e)
                    except AIMSSError as e:  # about this stream only (dropped there, say)
                        self._sync_failed(d, work.part, e)
                else:
                    conn = self._send(d, [s for s in work if s.part.has(d.address)], conn)
                if self._reports:
                    self._send_reports()
        except Exception as e:
            self._lost(d, e)
        finally:
            if conn is not None:
                conn.close()
            if self._reports:
                self._send_reports()

    def _not_heard_yet(self, d: _Dest, part: _Part) -> bool:
        """Whether ``d`` may still refuse ``part``'s epoch as unknown (a catch-up; see :meth:`_in_grace`)."""
        if self._dropped_here(part):
            return False  # destroyed here too: the copy is gone on purpose
        with self._cond:
            return self._in_grace(part, d.address)

    def _in_grace(self, part: _Part, dest: str) -> bool:
        """Whether ``dest``, still a copy of ``part``, may refuse its epoch as unknown a while longer (hold ``_cond``).

        Within :data:`NEW_EPOCH_GRACE` of its first refusal: after a loss the
        coordinator tells every worker of the new epoch at once, and this
        owner may hear first.
        """
        if not part.has(dest) or self._parts.get((part.name, part.p)) is not part:
            return False
        key = (part.name, part.p, dest)
        return time.monotonic() - self._refused.setdefault(key, time.monotonic()) < NEW_EPOCH_GRACE

    def _sync_failed(self, d: _Dest, part: _Part, e: Exception) -> None:
        """Catching up ``d`` failed for this stream only: it no longer counts as a copy."""
        # A stream destroyed meanwhile (dropped here too) is not news: its
        # copies are gone on purpose.
        (logger.debug if self._dropped_here(part) else logger.warning)(
            "aimss: catching up replica %s of %r partition %d failed (%s); "
            "it no longer counts as a copy", d.address, part.name, part.p, e,
        )
        with self._cond:
            self._drop(part, d.address)

    def _untrack_part(self, part: _Part) -> None:
        """:meth:`_forget_part`, from a sender thread."""
        with self.append_lock, self._cond:
            self._forget_part(part)

    def _forget_part(self, part: _Part) -> None:
        """Forget ``part`` if it is still the one tracked under its key, and what is queued for it (hold both locks)."""
        if self._parts.get((part.name, part.p)) is part:
            self._untrack((part.name, part.p))
        self._unqueue({id(part)})

    def _unqueue(self, parts: set[int]) -> None:
        """Drop what is queued for the parts of these ids (hold ``_cond``)."""
        for d in self._dests.values():
            d.queue = deque(e for e in d.queue if id(e.part) not in parts)

    def _dropped_here(self, part: _Part) -> bool:
        """Whether this worker's log no longer holds ``part`` (its stream was destroyed)."""
        try:
            self.store.held(part.name, part.epoch, part.p)
        except AIMSSError:
            return True
        return False

    def _send(self, d: _Dest, ships: list[_Ship], conn: Conn | None) -> Conn | None:
        """Send groups to ``d``; the replicas that hold them count up to their end."""
        if not ships:
            return conn
        groups = []
        for s in ships:
            groups.append((s.part.name, s.part.epoch, s.part.p, s.encoded(), s.sizes, s.origin, s.writer, s.at))
        reply, conn = self._transmit(d, groups, conn)
        errors = reply.get("errors") or {}
        again: list[_Ship] = []
        with self._cond:
            for s in ships:
                part = s.part
                err = errors.get(part.name)
                key = (part.name, part.p, d.address)
                if err is None:
                    self._refused.pop(key, None)
                    if s.mark:
                        part.marked[d.address] = max(part.marked.get(d.address, 0), s.mark)
                    if d.address in part.insync:
                        part.insync[d.address] = max(part.insync[d.address], s.at + len(s.records))
                    self._advance(part)
                elif err[0] == "StreamNotFoundError" and self._in_grace(part, d.address):
                    # The replica has not heard of the stream's new epoch yet
                    # (the coordinator tells every worker at once, and this
                    # owner heard first): send again shortly, in order.
                    again.append(s)
                elif err[0] == "ReplicaGapError" and part.has(d.address) and self._parts.get((part.name, part.p)) is part:
                    # It missed records (a copy it dropped): catch up again.
                    if d.address in part.insync:
                        self._out_of_sync(part, d.address)
                        part.joining.add(d.address)
                        d.queue.appendleft(_Sync(part))
                        self._advance(part)
                elif part.has(d.address):
                    logger.warning(
                        "aimss: replica %s refused partition %d of %r (%s: %s); it no longer counts as a copy",
                        d.address, part.p, part.name, *err,
                    )
                    self._drop(part, d.address)
            if again:
                d.queue.extendleft(reversed(again))
            self.stats["replica_records_sent"] += sum(len(s.records) for s in ships) - sum(len(s.records) for s in again)
            self._cond.notify_all()
        if again:
            time.sleep(0.02)
        return conn

    def _sync(self, d: _Dest, part: _Part, conn: Conn | None) -> Conn | None:
        """Bring replica ``d`` of ``part`` up to what this owner holds, then count it."""
        name, p, epoch = part.name, part.p, part.epoch
        theirs = self._replica_end(d.address, name, p)
        if theirs is None:
            # No log of it there (yet: the coordinator opens new copies
            # before it tells the owners, but a copy may hear of its epoch
            # late). Asked again within the grace, then dropped, and said
            # (see _run): dropped without a word, the coordinator kept
            # listing a copy that nobody would ever catch up.
            raise StreamNotFoundError(f"replica {d.address} holds no log of {name!r} partition {p} to catch up")
        # What we hold now; queued ships (already past it or not) follow.
        with self.append_lock:
            try:
                start, held = self.store.bounds(name, part.epoch, p)[0], self.store.held(name, part.epoch, p)
                since = self.store.since(name, part.epoch)
            except AIMSSError:
                return conn
        # Cut at where this owner took over, not at what it holds now:
        # writers' sends since may have filled those offsets with other
        # records than the copy holds there.
        cut = held if part.taken_at is None else min(held, part.taken_at)
        if theirs > cut:
            # It holds records the owner that died copied to it but not to
            # us; no reader saw them (they were not on every copy).
            self._ask(d.address, "aimss_truncate", name=name, epoch=part.epoch, partition=p, end=cut)
            theirs = cut
        floor = start
        if theirs < start or (theirs == 0 and self._consumed is not None):
            # An empty copy starts where this log starts (this owner trimmed
            # records every reader had passed), or past what every consumer
            # group has committed: nobody reads those records again.
            consumed = self._group_floor(name, p) if theirs == 0 else 0
            floor = min(max(start, consumed), held)
            if floor > theirs:
                self._ask(d.address, "aimss_replica_start", name=name, epoch=part.epoch, partition=p, start=floor)
                with self._cond:
                    self.stats["replica_sync_records_skipped"] += floor - max(theirs, start)
                theirs = floor
        offset = theirs
        paced = True  # the bulk; what came meanwhile goes at once, or a busy partition never converges
        while True:
            while offset < held:
                # As stored: a copy this worker held before it took over
                # goes on serialised, as it came (encoding passes it through).
                records, _, _ = self.store.read(name, part.epoch, p, offset, SYNC_CHUNK, upto=held, decode=False)
                if not records:
                    break
                encoded = [rec.encode(r, name) for r in records]
                sizes = [n for _, n in encoded]
                if paced:
                    conn = self._pace(sum(sizes), d, part, conn)
                ship = _Ship(part, offset, records, sizes, None, None, wire=[ser for ser, _ in encoded])
                conn = self._send_plain(d, ship, conn)
                offset += len(records)
                with self._cond:
                    self.stats["replica_sync_bytes"] += sum(sizes)
            # Records appended meanwhile were acknowledged without this copy
            # (it did not count yet): it holds them before it counts, or a
            # promotion would lose them. The filters' state (the copies
            # carry no writer tags and no origins) is taken where the copy
            # ends, and handed over before it counts: without it, the copy,
            # become owner, would store a writer's re-sent records twice,
            # or a second copy of an input a push run again sends.
            with self.append_lock:
                try:
                    now = self.store.held(name, part.epoch, p)
                    sealed = self.store.bounds(name, part.epoch, p)[2]
                except AIMSSError:
                    return conn
                if now > offset:
                    held, paced = now, False
                    continue
                table = self._writers.table(name, since, p) if self._writers is not None else {}
                whole = self._writers is None or self._writers.whole(name, since, p)
                origins = self._origins.export(name, part.epoch, p) if self._origins is not None else None
            if table or not whole:
                # Not whole here: the copy's table may lack writers of the
                # records it just got, so it is not either (WriterSeqs.merge).
                self._ask(
                    d.address, "aimss_replica_writers", name=name, epoch=part.epoch, partition=p,
                    table=sorted(table.items()), whole=whole,
                )
            if origins:
                self._ask(
                    d.address, "aimss_replica_origins", name=name, epoch=part.epoch, partition=p,
                    origins=[list(o) for o in origins],
                )
            if sealed:
                self._ask(d.address, "aimss_seal_partitions", name=name, epoch=part.epoch, partitions=[p])
            # It counts from here: appends wait for it. None may come between
            # the last look and this (the lock), or it would count short; nor
            # may a writer's numbers move on (a second copy of an input,
            # dropped here: its marker is queued behind this catch-up).
            with self.append_lock:
                try:
                    now = self.store.held(name, part.epoch, p)
                    sealed_now = self.store.bounds(name, part.epoch, p)[2]
                except AIMSSError:
                    return conn
                moved = self._writers is not None and self._writers.table(name, since, p) != table
                # Sealed meanwhile too: the coordinator skipped this copy (not
                # yet in sync), so it is sealed here, or never.
                if now > offset or moved or sealed_now != sealed:
                    held, paced = now, False
                    continue  # more came while the tables went: copy those, then the tables again
                with self._cond:
                    if d.address in part.joining:
                        part.joining.discard(d.address)
                        part.insync[d.address] = offset
                        self._note(part, d.address, True, epoch)
                        self._advance(part)
                        self._closed_if_done(part)
                    self.stats["replica_syncs"] += 1
                    self._cond.notify_all()
            return conn

    def _group_floor(self, name: str, p: int) -> int:
        """Where consumer groups stand in partition ``p`` of ``name`` (0 if unknown: copy everything)."""
        if self._consumed is None:
            return 0
        try:
            return int(self._consumed(name, p))
        except Exception as e:  # the coordinator is away: the safe choice is everything
            logger.info("aimss: no consumer offsets for %r partition %d (%r); copying all of it", name, p, e)
            return 0

    def _pace(self, nbytes: int, d: _Dest, part: _Part, conn: Conn | None) -> Conn | None:
        """Wait for this catch-up chunk's turn under :attr:`_rate` (shared by every sender thread).

        Meanwhile live copies queued for ``d`` go (those of other partitions
        than ``part``, the one caught up): behind a paced catch-up, their
        writers' acknowledgements would wait for it, and re-replication
        would starve the live writes.
        """
        if not self._rate:
            return conn
        with self._rate_lock:
            now = time.monotonic()
            start = max(self._rate_free, now)
            self._rate_free = start + nbytes / self._rate
        while True:
            with self._cond:
                left = start - time.monotonic()
                batch = self._live(d, part) if not self.closed else []
                if not batch:
                    if left <= 0 or self.closed:
                        return conn
                    # Woken by a new copy queued (shipped() notifies).
                    self._cond.wait(left)
                    continue
            conn = self._send(d, [s for s in batch if s.part.has(d.address)], conn)

    def _send_plain(self, d: _Dest, ship: _Ship, conn: Conn | None) -> Conn | None:
        group = (ship.part.name, ship.part.epoch, ship.part.p, ship.encoded(), ship.sizes, None, None, ship.at)
        reply, conn = self._transmit(d, [group], conn)
        err = (reply.get("errors") or {}).get(ship.part.name)
        if err is not None:
            raise error_from_wire(err[0], f"replica {d.address} refused a catch-up copy: {err[0]}: {err[1]}")
        with self._cond:
            self.stats["replica_records_sent"] += len(ship.records)
        return conn

    def _transmit(self, d: _Dest, groups: list[Any], conn: Conn | None) -> tuple[dict[str, Any], Conn | None]:
        creds = self._credentials
        if creds is not None and creds.serves(d.address):
            if conn is None:
                addr = raise_from_wire(
                    sync(self._loop, ask_data_address, self._rpc, d.address, self._listed), "aimss_data_address"
                )
                if addr.get("host"):
                    conn = secure.connect((addr["host"], addr["port"]), creds, tls=d.address.startswith("tls://"))
            if conn is not None:
                with self._liveness.exchange(conn, d.address):
                    dataplane.send_buffers(conn, dataplane.encode_batch(groups))
                    return dataplane.read_ack(conn), conn
        return self._ask(d.address, "aimss_append", items=groups), conn

    def _replica_end(self, dest: str, name: str, p: int) -> int | None:
        """The end of ``dest``'s copy of partition ``p`` of ``name``; None if it holds none."""
        reply = self._ask(dest, "aimss_stream_stats", name=name)
        for q, st in (reply or {}).get("partitions", []):
            if q == p:
                return int(st["records"])
        return None

    def _ask(self, dest: str, op: str, **kwargs: Any) -> Any:
        """``op`` on replica ``dest`` over Dask's comms; given up once the scheduler removed ``dest``."""

        async def call() -> Any:
            request = getattr(self._rpc(dest), op)(**kwargs)
            # A replica stopped or hung never answers, nor breaks the connection.
            return await (
                request if self._listed is None
                else call_listed(request, dest, self._listed, every=self._liveness.every)
            )

        return raise_from_wire(sync(self._loop, call), op)

    def _drop(self, part: _Part, dest: str) -> None:
        """``dest`` no longer holds a copy of ``part`` (hold ``_cond``); the coordinator places another.

        Not said, it would go on listing the copy: the stream would look
        whole while it runs on fewer copies.
        """
        self._refused.pop((part.name, part.p, dest), None)
        self._out_of_sync(part, dest, dropped=True)
        part.joining.discard(dest)
        self.stats["replicas_dropped"] += 1
        self._advance(part)
        self._closed_if_done(part)

    def _closed_if_done(self, part: _Part) -> None:
        """Forget a partition sealed here once no copy of it is catching up (hold ``_cond``)."""
        key = (part.name, part.p)
        if part.closing and not part.joining and self._parts.get(key) is part:
            self._untrack(key)

    def _out_of_sync(self, part: _Part, dest: str, dropped: bool = False) -> None:
        """``dest`` stops counting as a copy in sync (hold ``_cond``); ``dropped``: given up on, too.

        Readers may already have seen up to its end, and the coordinator
        could promote it: until the coordinator knows it is behind, the
        watermark stays at its end (Kafka shrinks its ISR the same way).
        """
        end = part.insync.pop(dest, None)
        if self._tell is None or (end is None and not dropped):
            return
        if end is not None:
            part.dropping[dest] = min(end, part.dropping.get(dest, end))
        self._note(part, dest, False, part.epoch, dropped)

    def _note(self, part: _Part, dest: str, in_sync: bool, epoch: int, dropped: bool = False) -> None:
        """Queue a word for the coordinator on ``dest``'s copy of ``part`` (hold ``_cond``)."""
        if self._tell is None:
            return
        self._report_seq += 1
        self._reports.append((part, dest, in_sync, epoch, self._report_seq, dropped))

    def _send_reports(self) -> None:
        """Tell the coordinator what :meth:`_note` queued (a sender thread, no lock held).

        A copy marked out of sync stops bounding the watermark once the
        coordinator has the word; if it cannot be told, the watermark
        stays (writers' answers wait, then fail): never a promotable copy
        behind what readers saw.
        """
        assert self._tell is not None
        tell = self._tell
        while True:
            with self._cond:
                if not self._reports:
                    return
                part, dest, in_sync, epoch, seq, dropped = self._reports.pop(0)
            msg = {"name": part.name, "epoch": epoch, "partition": part.p, "replica": dest,
                   "seq": seq, "in_sync": in_sync}
            if dropped:
                msg["dropped"] = True
            told = False
            for attempt in range(REPORT_TRIES):
                try:
                    raise_from_wire(sync(self._loop, tell, msg), "aimss_replica_state")
                    told = True
                    break
                except Exception as e:
                    if self.closed or attempt == REPORT_TRIES - 1:
                        logger.warning(
                            "aimss: could not tell the coordinator that the copy of %r partition %d "
                            "on %s is %s (%r)", part.name, part.p, dest,
                            "in sync" if in_sync else "behind", e,
                        )
                        break
                    time.sleep(min(2.0**attempt * 0.1, 5.0))
            if told and not in_sync:
                with self._cond:
                    part.dropping.pop(dest, None)
                    self._advance(part)
                    self._cond.notify_all()

    def _lost(self, d: _Dest, e: Exception) -> None:
        """Replica worker ``d`` cannot be reached: it holds no copy of anything any more."""
        if not self.closed:
            logger.warning("aimss: replica %s is unreachable (%r); copies there no longer count", d.address, e)
        with self._cond:
            if self._dests.get(d.address) is d:
                del self._dests[d.address]
            for part in list(self._parts.values()):  # a drop may forget a closing partition
                if part.has(d.address):
                    self._drop(part, d.address)
            self._cond.notify_all()
