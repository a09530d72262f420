"""The write path: batch records per owner and push them, with back-pressure.

One ``Producer`` per process (worker or client). Writers are threads (task
threads, the user's thread). Each owner gets a sender thread that pushes
batches in order over one connection, up to ``PIPELINE`` of them unanswered,
so a producer's records keep their order while the next batch is already on
the wire. Plain ``tcp://`` clusters use the raw data plane
(:mod:`aimss_dask.transport.dataplane`, TCP and TLS); others (UCX, in-process) use
Dask's comms.

A write may carry an :class:`~aimss_dask.core.specs.Origin` (a run's push
task tags what it writes with its input and attempt, plan §2.8): it travels
with its group to the owner, which drops a second copy of an input. Plain
writes carry none and pay nothing for the feature but one ``None`` per group.

Writes to a replicated stream also carry this producer's id and a sequence
number per partition. When the owner dies before it answers, the producer
does not fail them: it asks the coordinator which replica took over and
sends them again there (in their order, ahead of newer writes), and the new
owner drops those it holds already (:mod:`aimss_dask.node.writers`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from distributed import get_worker
from distributed.protocol import Serialized
from distributed.utils import sync

from aimss_dask.core import trace
from aimss_dask.core.errors import (
    PartitionLostError,
    StreamNotFoundError,
    StreamSealedError,
    WorkerClosingError,
    WriteOrderError,
    error_from_wire,
    raise_from_wire,
)
from aimss_dask.core.specs import Origin, StreamSpec
from aimss_dask.core.stats import Histogram
from aimss_dask.log import records
from aimss_dask.log.budget import ByteBudget
from aimss_dask.transport import dataplane, secure
from aimss_dask.transport.liveness import EVERY, Liveness, call_listed, shut_down
from aimss_dask.transport.rpc import Listed, connect_listed
from aimss_dask.transport.secure import Credentials

logger = logging.getLogger("aimss_dask")

#: ``(spec, partition, record, nbytes, origin)``: store a record on this very process.
LocalAppend = Callable[[StreamSpec, int, Any, int, Origin | None], None]

#: Batches one producer may have on the wire to one owner at once.
PIPELINE = 4

#: How long writes to a replicated partition whose owner died wait for the
#: coordinator to name the replica that takes over (s).
FAILOVER_TIMEOUT = 60.0

#: How long writes to a replicated partition whose owner could not be reached
#: wait before they are sent to it again, while the coordinator still names
#: it and nobody said it left (s): a live owner unreachable for a moment.
SAME_OWNER_RETRY = 2.0

#: A sender thread with nothing to send, and nothing unanswered, for this
#: long (s) closes its connection and ends; the next write starts another.
#: A long-lived process (a notebook's client) writes to the workers of many
#: clusters in turn, and would otherwise keep a thread and a socket per
#: worker it ever wrote to.
IDLE_EXIT = 60.0

#: At most one line per owner in this many seconds says why writes failed over.
FAILOVER_LOG_EVERY = 10.0

#: ``(stream name) -> the coordinator's reply about it`` (``aimss_get``): a blocking call.
Resolve = Callable[[str], dict[str, Any]]

#: ``(stream names or None) -> None``: block until what was stored on this
#: very process is on every copy.
LocalWait = Callable[[list[str] | None], None]


@dataclass(eq=False)
class _Item:
    name: str
    epoch: int
    partition: int
    record: Serialized
    nbytes: int
    origin: Origin | None = None
    #: Sequence number within (this producer, stream, partition): replicated streams only.
    seq: int | None = None
    #: ``(stream, its first epoch, partition)``: the line ``seq`` numbers (None: no number).
    line: tuple[str, int, int] | None = None
    #: Sent again to the replica that took over from a dead owner.
    rerouted: bool = False
    #: ``time.monotonic()`` at ``write``: the push latency runs from there to the owner's answer.
    created: float = 0.0
    #: When its owner could first not be reached, and when it may next be sent to that owner again.
    orphaned: float = 0.0
    retry_at: float = 0.0
    #: Who wrote it (:func:`writer_id`): its failure is raised to that writer alone.
    writer: Any = None


@dataclass(eq=False)
class _Link:
    """What one producer process has queued for, and sent to, one owner."""

    owner: str
    pending: deque[_Item] = field(default_factory=deque)
    pending_bytes: int = 0
    written: int = 0
    acked: int = 0
    flush_now: bool = False
    thread: threading.Thread | None = None
    #: Bumped when the owner is lost: the sender drops its connection, since
    #: a worker back at the same address is another process.
    generation: int = 0
    #: A request over Dask's comms on its way: the newest stream epoch in it,
    #: and what cancels it (on the event loop).
    aborts: tuple[int, Callable[[], Any]] | None = None


class Producer:
    """Buffers writes per owner and pushes them in batches.

    ``write`` blocks once ``max_in_flight`` bytes are written but not yet
    stored. Errors reported by an owner (a sealed stream, a lost worker) are
    raised by the next ``write`` or ``flush`` touching that stream.
    """

    def __init__(
        self,
        loop: Any,
        rpc: Any,
        *,
        batch_size: int,
        max_in_flight: int,
        linger: float,
        credentials: Credentials | None = None,
        address: str | None = None,
        local: LocalAppend | None = None,
        local_wait: LocalWait | None = None,
        resolve: Resolve | None = None,
        listed: Listed | None = None,
        liveness_interval: float = EVERY,
    ) -> None:
        self._loop = loop
        self._rpc = rpc
        # Whether the scheduler still lists a worker: a connect to an owner
        # that died fails within a fraction of a second (rpc.CONNECT_GRACE)
        # instead of Dask's connect timeout.
        self._listed = listed
        # ... and cuts data connections to an owner that stopped answering
        # without dying once the scheduler removed it (see liveness).
        self.liveness = Liveness(loop, listed, liveness_interval)
        self._batch_size = batch_size
        self._linger = linger
        # The cluster's data-plane credentials; None: Dask's comms only.
        self._credentials = credentials
        self._address = address
        self._local = local
        self.budget = ByteBudget(max_in_flight)
        self._cond = threading.Condition()
        self._links: dict[str, _Link] = {}
        # stream -> writer (writer_id()) -> (epoch, first error): a failed
        # write's error goes to the writer that wrote it, never to another
        # writer of the stream (which would take it, and the seal then see
        # none); epochs keep a destroyed stream's off a new one of the name.
        self._errors: dict[str, dict[Any, tuple[int, Exception]]] = {}
        # stream name -> owner -> (epoch, first error): what failed, kept for
        # the seal of a recovered stream (see failure()).
        self._failed: dict[str, dict[str, tuple[int, Exception]]] = {}
        self._sealed: set[tuple[str, int]] = set()
        self._data_addresses: dict[str, tuple[str | None, int | None]] = {}
        # owner -> the newest stream epoch that lost partitions with it. Epochs
        # grow cluster-wide: streams made later (on a worker that came back
        # at the same address) write there as to any worker.
        self._dead: dict[str, int] = {}
        # owner -> when a failover from it was last logged (one line per
        # owner and burst: a broken connection fails every batch in flight).
        self._failover_logged: dict[str, float] = {}
        self._local_wait = local_wait
        self._resolve = resolve
        #: This producer's id in the writer tags of replicated streams.
        self.id = random.getrandbits(62)
        # (stream, its first epoch, partition) -> the next sequence number of
        # a replicated write. A stream made again under the same name (its
        # run restarted) starts a new line of epochs, and its numbers at 0.
        self._seq: dict[tuple[str, int, int], int] = {}
        # (stream, its first epoch, partition) -> the owner this producer last queued a
        # replicated write for: when the owner changes, older writes still
        # on their way to that one go first.
        self._sent_to: dict[tuple[str, int, int], str] = {}
        # (stream, its first epoch, partition) -> owner -> replicated writes
        # queued for, or on the wire to, that owner and not answered yet.
        self._unsettled: dict[tuple[str, int, int], dict[str, int]] = {}
        # (stream, its first epoch, partition) -> how many of its replicated
        # writes failed over so far (see _resend).
        self._failures: dict[tuple[str, int, int], int] = {}
        # (stream, its first epoch, partition) -> the sequence number and the
        # error of the first of its replicated writes that failed for good:
        # the owner then refuses the later ones as a gap (_explain_refusal).
        self._gave_up: dict[tuple[str, int, int], tuple[int, Exception]] = {}
        # stream -> the newest spec learned after an owner died (writes with
        # an older handle go to the owner it names).
        self._routes: dict[str, StreamSpec] = {}
        # Writes to replicated partitions whose owner died, waiting for the
        # one that takes over, and how many such are not settled yet.
        self._orphans: list[tuple[str, _Item]] = []
        self._rerouting = 0
        self._rerouter: threading.Thread | None = None
        self.closed = False
        #: What this process wrote and its owners stored, for the metrics:
        #: ``{"remote" | "local": [records, bytes]}`` (local: appended in this
        #: very process, the owner's own writes).
        self.stored: dict[str, list[int]] = {"remote": [0, 0], "local": [0, 0]}
        self._stored_lock = threading.Lock()
        #: Seconds from ``write`` to the owner's answer, per batch (its oldest record).
        self.latency = Histogram()

    # -- writers (any thread but the event loop's) -----------------------------------------

    def _pop_error(self, name: str, epoch: int | None, writer: Any = None) -> Exception | None:
        """``writer``'s (None: the caller's) pending error on the stream (hold the lock); stale ones dropped."""
        mine = self._errors.get(name, {})
        me = writer_id() if writer is None else writer
        entry = mine.get(me)
        if entry is None or (epoch is not None and entry[0] > epoch):
            return None  # none, or a newer stream's: not the caller's to take
        del mine[me]
        if not mine:
            self._errors.pop(name, None)
        return entry[1] if epoch is None or entry[0] == epoch else None

    def _set_error(self, it: _Item, err: Exception) -> None:
        """``it`` failed with ``err``: its writer's error, unless it has one already (hold ``_cond``)."""
        self._errors.setdefault(it.name, {}).setdefault(it.writer, (it.epoch, err))

    def write(
        self,
        spec: StreamSpec,
        partition: int,
        record: Any,
        *,
        moving: bool = False,
        origin: Origin | None = None,
        own: bool = False,
    ) -> None:
        """Queue (or, on the owner itself, store) one record.

        ``moving``: the coordinator is moving a sealed partition to a new
        owner; its records are re-sent even though the stream is sealed.
        ``origin``: the input and attempt the record comes from (a run's push
        task); the owner drops it if another attempt's copy of that origin is
        already stored there. ``None`` (a plain write): always stored.
        ``own``: a small view of a large buffer is copied first
        (:func:`~aimss_dask.log.records.owned`): a user's write. Operators
        keep their views, and copy where the log is tight themselves.
        """
        if own:
            record = records.owned(record)
        with self._cond:
            err = self._pop_error(spec.name, spec.epoch)
            closed = self.closed
        if err is not None:
            raise err
        if closed:
            # Queued now, nothing would ever send it: said, not dropped.
            raise WorkerClosingError(
                f"cannot write to stream {spec.name!r}: this process's AIMSS producer is closed "
                "(its client or worker is closing)"
            )
        if not moving and (spec.name, spec.epoch) in self._sealed:
            raise StreamSealedError(
                f"stream {spec.name!r} is sealed and takes no more writes; create a "
                "new stream for new data"
            )
        owner = spec.owners[partition]
        line = (spec.name, spec.first_epoch, partition)
        if spec.replicas:
            owner = self._replicated_owner(spec, partition)
        if spec.epoch <= self._dead.get(owner, 0) and not spec.replicas:
            raise PartitionLostError(
                f"partition {partition} of stream {spec.name!r} was lost with its "
                f"worker {owner}; destroy the stream and write it again",
                {partition: (0, None)},
            )
        here = self._local is not None and owner == self._address
        settled = True
        if here and spec.replicas:
            with self._cond:
                self._sent_to[line] = owner
                # Stored at once, it must not overtake older writes of the
                # partition still on their way here (sent to the owner this
                # process took over from). Still unsettled after the wait,
                # it goes the way remote writes go: queued behind them.
                settled = self._cond.wait_for(lambda: self.closed or self._clear(line, None), FAILOVER_TIMEOUT)
        if here and settled:
            # Same process as the owner: no serialisation, no copy, no comm.
            local = records.local_nbytes(record)
            if local is None:
                local = records.encode(record, spec.name)[1]  # still must serialise
            self._local(spec, partition, record, local, origin)
            with self._stored_lock:
                counts = self.stored["local"]
                counts[0] += 1
                counts[1] += local
            return
        ser, nbytes = records.encode(record, spec.name)
        self.budget.acquire(nbytes)
        with self._cond:
            link = self._link(owner)
            seq = None
            if spec.replicas:
                seq = self._seq.get(line, 0)
                self._seq[line] = seq + 1
                self._sent_to[line] = owner
            item = _Item(
                spec.name, spec.epoch, partition, ser, nbytes, origin, seq,
                line=line if seq is not None else None, created=time.monotonic(), writer=writer_id(),
            )
            if seq is not None and not self._clear(line, owner):
                # An older write of the partition waits to be sent again, or
                # is still on its way to another owner (the waits above
                # return before a failure that comes later, and other threads
                # write with other handles): queued now, this one could
                # overtake it, and an owner that never saw this writer takes
                # any first number and would drop the older records then as
                # stored already. It waits with them, sent in the writer's order.
                self._orphan(owner, [item], retry=False)
                return
            link.pending.append(item)
            link.pending_bytes += nbytes
            link.written += 1
            self._queued(owner, item)
            self._cond.notify_all()

    def _replicated_owner(self, spec: StreamSpec, partition: int) -> str:
        """Where a write to ``partition`` of a replicated ``spec`` goes now.

        The copy that took over from a dead owner, once the coordinator
        names it. A writer whose owner changed first waits for its older
        writes of the partition to be sent again (back-pressure; the order
        itself is kept where the write is queued, see :meth:`_clear`).
        """
        owner = self._current_owner(spec, partition)
        line = (spec.name, spec.first_epoch, partition)
        before = self._sent_to.get(line, spec.owners[partition])
        if owner != before:
            # The owner changed since this producer's last write there:
            # what is queued for, or still on the wire to, the one before
            # (a request over Dask's comms may take long to fail) goes first.
            self._behind_resent(before, spec.name, partition)
        elif owner != spec.owners[partition]:
            self._behind_resent(spec.owners[partition], spec.name, partition)
        elif self._orphans:
            self._behind_resent(None, spec.name, partition)  # a handle that names the new owner
        else:
            return owner
        # The world may have changed while this writer waited (an owner died).
        return self._current_owner(spec, partition)

    def _current_owner(self, spec: StreamSpec, partition: int) -> str:
        """The owner of ``partition`` of a replicated ``spec`` as this producer knows it now."""
        owner = spec.owners[partition]
        route = self._routes.get(spec.name)
        if route is not None and route.epoch > spec.epoch and route.first_epoch == spec.first_epoch:
            owner = route.owners[partition]  # a replica took over from a dead owner
        if spec.epoch <= self._dead.get(owner, 0):
            owner = self._route(spec, partition)
        return owner

    def _clear(self, line: tuple[str, int, int], owner: str | None) -> bool:
        """Whether a write of ``line`` may be queued for ``owner`` now (hold ``_cond``).

        No older write of it waits to be sent again, and none is queued for
        or on the wire to another owner (``None``: to any). Writes on one
        link keep their order (one connection, answered in order; a broken
        one fails all it carried, and they are sent again in order).
        """
        if self._waits_behind(line):
            return False
        return all(o == owner for o in self._unsettled.get(line, ()))

    def _waits_behind(self, line: tuple[str, int, int]) -> bool:
        """Whether a write of ``line`` waits to be sent again (hold ``_cond``): newer ones wait behind it."""
        return bool(self._orphans) and any(it.line == line for _, it in self._orphans)

    def _queued(self, owner: str, it: _Item) -> None:
        """``it`` is queued for ``owner`` (hold ``_cond``): see :meth:`_clear`."""
        if it.line is not None:
            per = self._unsettled.setdefault(it.line, {})
            per[owner] = per.get(owner, 0) + 1

    def _unqueued(self, owner: str, items: list[_Item]) -> None:
        """``items`` queued for ``owner`` were answered, failed, or taken back (hold ``_cond``)."""
        for it in items:
            per = self._unsettled.get(it.line) if it.line is not None else None
            if per is None:
                continue
            n = per.get(owner, 0) - 1
            if n > 0:
                per[owner] = n
            else:
                per.pop(owner, None)
                if not per:
                    del self._unsettled[it.line]  # type: ignore[arg-type]

    def flush_blocking(
        self,
        names: Iterable[str] | None = None,
        raise_errors: bool = True,
        epoch: int | None = None,
        writer: Any = None,
    ) -> None:
        """Push everything written so far and wait until the owners stored it.

        Then raise the first error of a write to ``names`` (all streams if
        None) that failed; with ``epoch``, only errors of that incarnation.
        Only the errors of ``writer``'s writes (None: the caller's, see
        :func:`writer_id`): another writer's are its own to raise, and the
        seal's to see until then.
        """
        with self._cond:
            targets = {o: link.written for o, link in self._links.items()}
            for link in self._links.values():
                link.flush_now = True
            self._cond.notify_all()
            self._cond.wait_for(
                lambda: self.closed
                or (
                    all(self._links[o].acked >= n for o, n in targets.items())
                    and not self._rerouting
                )
            )
            short = self.closed and (
                any(self._links[o].acked < n for o, n in targets.items()) or self._rerouting
            )
        if short and raise_errors:
            raise WorkerClosingError(
                "this process's AIMSS producer closed (its client or worker is closing) before the "
                "owners answered for every record written: those were not all stored"
            )
        if self._local_wait is not None and not self.closed:
            self._local_wait(list(names) if names is not None else None)
        with self._cond:
            if not raise_errors:
                return
            wanted = list(self._errors) if names is None else list(names)
            me = writer_id() if writer is None else writer
            errs = [e for n in wanted if (e := self._pop_error(n, epoch, me)) is not None]
        if errs:
            raise errs[0]

    async def flush(
        self, names: Iterable[str] | None = None, raise_errors: bool = True, epoch: int | None = None
    ) -> None:
        """:meth:`flush_blocking` for the event loop (waits in a thread), for the caller's writes."""
        await asyncio.get_running_loop().run_in_executor(
            None,
            functools.partial(
                self.flush_blocking, list(names) if names else None, raise_errors, epoch, writer_id()
            ),
        )

    # -- sender threads -----------------------------------------------------------------

    def _link(self, owner: str) -> _Link:
        """The link to ``owner``, its sender thread started (hold ``_cond``)."""
        link = self._links.get(owner)
        if link is None:
            link = self._links[owner] = _Link(owner)
        if link.thread is None:
            link.thread = threading.Thread(
                target=self._run, args=(link,), name=f"aimss-push-{owner}", daemon=True
            )
            link.thread.start()
        return link

    def _next_batch(self, link: _Link) -> list[_Item] | None:
        """Wait for a full batch, a flush or the linger time; None when closed, or idle (see ``IDLE_EXIT``)."""
        with self._cond:
            while not self._cond.wait_for(lambda: self.closed or bool(link.pending), IDLE_EXIT):
                if link.acked >= link.written:
                    # Idle, every batch answered: nothing on the connection
                    # to fail over. Under the lock writers take to queue, so
                    # the next write finds no thread and starts one.
                    link.thread = None
                    return None
            if self.closed:
                return None
            if link.pending_bytes < self._batch_size and not link.flush_now and self._linger > 0:
                self._cond.wait_for(
                    lambda: self.closed or link.flush_now or link.pending_bytes >= self._batch_size,
                    self._linger,
                )
            batch: list[_Item] = []
            size = 0
            q = link.pending
            while q and (not batch or size + q[0].nbytes <= self._batch_size):
                item = q.popleft()
                batch.append(item)
                size += item.nbytes
            link.pending_bytes -= size
            if not q:
                link.flush_now = False
            return batch

    def _run(self, link: _Link) -> None:
        conn: _Conn | None = None
        generation = link.generation
        while True:
            batch = self._next_batch(link)
            if batch is None:
                break
            try:
                if self._reported_dead(link.owner, batch):
                    # Taken from the queue just before the owner was reported
                    # lost: no connection to it (asking a dead worker for its
                    # data address, Dask's connect retries for its timeout).
                    raise ConnectionError(f"worker {link.owner} left the cluster")
                if conn is not None and generation != link.generation:
                    conn.close()  # to a process that is gone
                    conn = None
                if conn is not None and conn.broken:
                    # Its answers stopped (batches on the wire failed over):
                    # this one must not overtake them on a new connection.
                    raise ConnectionError(f"the connection to {link.owner} broke")
                if conn is None:
                    batch = self._behind_old_connection(link, batch)
                    if not batch:
                        continue
                    generation = link.generation
                    conn = self._open(link)
                conn.send(batch)
            except Exception as e:
                self._settle(link, batch, None, _lost(link.owner, e), failover=True)
                with self._cond:
                    if not self.closed:
                        # What is queued behind it for this owner waits with
                        # it, to be sent again in the writer's order (an
                        # owner refuses a number past the next it expects).
                        self._orphan_queued(link, lambda it: True)
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _behind_old_connection(self, link: _Link, batch: list[_Item]) -> list[_Item]:
        """What of ``batch`` may go on a new connection to ``link``'s owner now; the rest waits with older writes.

        A connection that broke fails the batches it carried in another
        thread (its reader), one by one. A write queued meanwhile behind
        them, for the same owner, was clear to go; on a new connection it
        would overtake them, and the owner refuses a number past the next
        it expects. So a new connection waits until the old one's batches
        have all failed over, and a write of a partition with older writes
        waiting to be sent again waits with them (sent in the writer's order).
        """
        with self._cond:
            self._cond.wait_for(
                lambda: self.closed or link.written - link.acked - len(link.pending) <= len(batch), FAILOVER_TIMEOUT
            )
            held = [it for it in batch if it.line is not None and self._waits_behind(it.line)]
            if not held or self.closed:
                return batch
            self._take_back(link, held, retry=False)
            self._cond.notify_all()
        ids = {id(it) for it in held}
        return [it for it in batch if id(it) not in ids]

    def _open(self, link: _Link) -> _Conn:
        creds = self._credentials
        if creds is not None and creds.serves(link.owner):
            # A worker's data address lives as long as the worker: ask once. A
            # dead owner then fails fast (connection refused) on reconnect.
            addr = self._data_addresses.get(link.owner)
            if addr is None:
                reply = raise_from_wire(
                    sync(self._loop, ask_data_address, self._rpc, link.owner, self._listed),
                    "aimss_data_address",
                )
                addr = self._data_addresses[link.owner] = (reply.get("host"), reply.get("port"))
            if addr[0]:
                return _RawConn(self, link, addr)
        return _DaskConn(self, link)

    def _settle(
        self,
        link: _Link,
        batch: list[_Item],
        reply: Any,
        error: Exception | None = None,
        failover: bool = False,
    ) -> None:
        """A batch is stored (or failed): record errors, free its bytes.

        ``failover``: the owner could not be reached; writes to replicated
        partitions wait for the replica that takes over instead of failing.
        """
        if error is None:
            try:
                reply = raise_from_wire(reply, "aimss_append")
            except Exception as e:
                error = e
        if isinstance(error, WorkerClosingError):
            # The owner answered that it is closing (Dask's comms carry that
            # answer; the data plane just closes): as unreachable as one gone.
            failover = True
        with self._cond:
            if self._unsettled:  # replicated writes on their way (else nothing to count: no loop per record)
                self._unqueued(link.owner, batch)
            moved = [it for it in batch if it.seq is not None] if failover and not self.closed else []
            if moved:
                self._log_failover(link.owner, moved, error)
                self._orphan(link.owner, moved)
                # Writes of their partitions queued behind them (clear to go
                # while these were on the wire to the same owner) wait with
                # them now, or they would overtake them.
                lines = {it.line for it in moved}
                self._orphan_queued(link, lambda it: it.line in lines)
                kept = {id(it) for it in moved}
                batch_failed = [it for it in batch if id(it) not in kept]
            else:
                batch_failed = batch
            if error is not None:
                parts: dict[str, set[int]] = {}
                for it in batch_failed:
                    parts.setdefault(it.name, set()).add(it.partition)
                told = {name: _naming(error, ps) for name, ps in parts.items()}
                for it in batch_failed:
                    self._set_error(it, told[it.name])
                    self._failed.setdefault(it.name, {}).setdefault(link.owner, (it.epoch, told[it.name]))
                    self._give_up(it, told[it.name])
            else:
                epochs = {it.name: it.epoch for it in batch}
                for name, (kind, msg) in (reply.get("errors") or {}).items():
                    err = error_from_wire(kind, msg)
                    refused = isinstance(err, WriteOrderError)
                    if refused:
                        err = self._explain_refusal(name, batch, err)
                    for it in batch:
                        if it.name == name:
                            if not refused:
                                self._give_up(it, err)
                            self._set_error(it, err)
                    self._failed.setdefault(name, {}).setdefault(link.owner, (epochs.get(name, -1), err))
            link.acked += len(batch)
            self._cond.notify_all()
        if error is None:
            took = time.monotonic() - batch[0].created
            self.latency.observe(took)
            nbytes = sum(it.nbytes for it in batch)
            if trace.on():
                first = batch[0]
                trace.complete(
                    "push", time.time() - took, took, owner=link.owner, stream=first.name,
                    partition=first.partition, records=len(batch), bytes=nbytes,
                )
            with self._stored_lock:
                counts = self.stored["remote"]
                counts[0] += len(batch)
                counts[1] += nbytes
        self.budget.release(sum(it.nbytes for it in batch_failed))
        self._settled_moved(batch_failed)

    def _give_up(self, it: _Item, error: Exception) -> None:
        """``it`` failed for good (hold ``_cond``): remember the first such write of its partition."""
        if it.line is not None and it.seq is not None:
            self._gave_up.setdefault(it.line, (it.seq, error))

    def _explain_refusal(self, name: str, batch: list[_Item], refusal: WriteOrderError) -> WriteOrderError:
        """The owner refused writes of ``name`` as a gap: why, if an earlier write of theirs failed (hold ``_cond``).

        Their sequence numbers skip the failed write's, so the owner takes
        them for writes that overtook a lost one (as in Kafka's idempotent
        producer, the writer must start over). Without such a failure a gap
        is a bug, and ``refusal`` says so.
        """
        for it in batch:
            if it.name == name and it.line in self._gave_up:
                seq, error = self._gave_up[it.line]  # type: ignore[index]
                return WriteOrderError(
                    f"stream {name!r} partition {it.partition}: a write from this process failed earlier "
                    f"({type(error).__name__}: {error}), so its owner refuses the later ones: their "
                    f"sequence numbers go on past the failed write's ({seq}), and stored they would look "
                    "like writes that overtook a lost one. Write the records again to a new stream, or "
                    "destroy this one and write it again"
                )
        return refusal

    def _settled_moved(self, batch: list[_Item]) -> None:
        """Items sent again after a failover are settled: flushes stop waiting for them."""
        n = sum(1 for it in batch if it.rerouted)
        if n:
            with self._cond:
                self._rerouting -= n
                self._cond.notify_all()

    # -- failover of replicated partitions --------------------------------------------------

    def _reported_dead(self, owner: str, items: list[_Item]) -> bool:
        """Whether ``owner`` was reported lost with the streams ``items`` write to (or later ones)."""
        return max(it.epoch for it in items) <= self._dead.get(owner, 0)

    def _log_failover(self, owner: str, items: list[_Item], error: Exception | None) -> None:
        """Say why writes to ``owner`` fail over (hold ``_cond``).

        An owner reported dead is the expected case (DEBUG). One that was
        not deserves a WARNING naming the cause: a live worker that could
        not be reached (its writes go to it again), or news of a death that
        has not arrived yet.
        """
        now = time.monotonic()
        if now - self._failover_logged.get(owner, -FAILOVER_LOG_EVERY) < FAILOVER_LOG_EVERY:
            return
        self._failover_logged[owner] = now
        first = items[0]
        expected = self._reported_dead(owner, items)
        logger.log(
            logging.DEBUG if expected else logging.WARNING,
            "aimss: %d write(s) to %s (first: stream %r partition %d) failed over %s: %r",
            len(items), owner, first.name, first.partition,
            "after it left the cluster" if expected
            else "before anyone reported it lost; they go again to whoever owns the partition then",
            error,
        )

    def _orphan(self, dead: str, items: list[_Item], retry: bool = True) -> None:
        """``items`` sent (or queued) to ``dead`` wait for the owner that takes over (hold ``_cond``).

        ``retry`` False: they never failed, they only wait behind older
        writes of their partition; sent to ``dead`` again, they go with them,
        not ``SAME_OWNER_RETRY`` later.
        """
        self._orphans.extend((dead, it) for it in items)
        self._rerouting += sum(1 for it in items if not it.rerouted)
        now = time.monotonic()
        for it in items:
            it.orphaned = it.orphaned or now
            it.retry_at = now + SAME_OWNER_RETRY if retry else now
            if retry and it.line is not None:
                self._failures[it.line] = self._failures.get(it.line, 0) + 1
        if self._rerouter is None:
            self._rerouter = threading.Thread(target=self._reroute, name="aimss-push-failover", daemon=True)
            self._rerouter.start()

    def _orphan_queued(self, link: _Link, match: Callable[[_Item], bool]) -> None:
        """Queued writes to replicated partitions (``match``) wait with ``link``'s orphans (hold ``_cond``)."""
        stuck = [it for it in link.pending if it.seq is not None and match(it)]
        if stuck:
            ids = {id(it) for it in stuck}
            link.pending = deque(it for it in link.pending if id(it) not in ids)
            link.pending_bytes -= sum(it.nbytes for it in stuck)
            self._take_back(link, stuck)

    def _take_back(self, link: _Link, items: list[_Item], retry: bool = True) -> None:
        """``items``, taken off ``link`` (queued, or held by its sender), wait with the orphans (hold ``_cond``).

        They count as answered on ``link`` (flushes and :meth:`_clear` see
        them leave it); see :meth:`_orphan` for ``retry``.
        """
        link.acked += len(items)
        self._unqueued(link.owner, items)
        self._orphan(link.owner, items, retry)

    def _reroute(self) -> None:
        """Send writes whose owner died to the replica that took over, in their order.

        Asks the coordinator (``resolve``) until the stream names another
        owner for the partition, or says the partition is lost (no copy
        survived: the writes fail as before), or ``FAILOVER_TIMEOUT`` passes.
        While it still names the same owner and nobody said that owner left,
        the writes go to it again every ``SAME_OWNER_RETRY`` seconds.
        """
        deadline: dict[str, float] = {}
        while True:
            with self._cond:
                if self.closed or not self._orphans:
                    self._rerouter = None
                    return
                # Left in place while resolved: a newer write of their
                # partition waits behind them (_clear). Writes of their
                # partition still queued or on the wire may be older (a
                # pipelined connection fails them in another thread): the
                # partition's orphans wait until those have joined them.
                orphans = [o for o in self._orphans if o[1].line not in self._unsettled]
                # Writes this round sends again may fail again before it is
                # through (a connection that breaks once more): newer ones of
                # their partition must then not follow them.
                failures = {it.line: self._failures.get(it.line, 0) for _, it in orphans}
                if not orphans:
                    self._cond.wait(0.05)
                    continue
            names = sorted({it.name for _, it in orphans})
            left: list[tuple[str, _Item]] = []
            for name in names:
                # In the writer's order: the new owner drops a number it has
                # passed, and refuses one past the next it expects.
                mine = sorted(
                    ((o, it) for o, it in orphans if it.name == name),
                    key=lambda o: (o[1].partition, o[1].seq or 0),
                )
                spec, lost, unsure = self._ask_spec(name)
                now = time.monotonic()
                first = deadline.setdefault(name, now + FAILOVER_TIMEOUT)
                waiting: set[int] = set()  # partitions with an older write still waiting
                for dead, it in mine:
                    p = it.partition
                    # Sent to the same owner again, an item may come back here:
                    # its own first orphaning bounds the wait too.
                    late = now > first or now > it.orphaned + FAILOVER_TIMEOUT
                    if p in waiting and not late:
                        left.append((dead, it))  # never ahead of an older write of its partition
                    elif spec is not None and p not in lost and spec.owners[p] != dead and it.epoch >= spec.first_epoch:
                        if not self._resend(spec, it, failures.get(it.line, 0)):
                            left.append((dead, it))
                    elif unsure and not late:
                        # The coordinator did not answer (busy with the very
                        # loss this waits on): ask again, not a lost write.
                        left.append((dead, it))
                    elif spec is None or p in lost or it.epoch < spec.first_epoch or late:
                        self._fail_moved(dead, it, spec, lost)
                    elif now >= it.retry_at and it.epoch > self._dead.get(dead, 0):
                        # The coordinator still names the owner and nobody
                        # said it left: it was unreachable for a moment (a
                        # reset connection, a timeout), not dead, and no copy
                        # will take over. Send to it again; it drops what it
                        # stored already (the writer's sequence numbers).
                        # Should it fail again, _orphan sets its next retry.
                        if not self._resend(spec, it, failures.get(it.line, 0)):
                            left.append((dead, it))
                    else:
                        left.append((dead, it))
                    if left and left[-1][1] is it:
                        waiting.add(p)
            with self._cond:
                taken = {id(o) for o in orphans}
                self._orphans = left + [o for o in self._orphans if id(o) not in taken]
                self._cond.notify_all()
                if left:
                    self._cond.wait(0.1)

    def _ask_spec(self, name: str) -> tuple[StreamSpec | None, set[int], bool]:
        """Stream ``name`` as the coordinator has it now, its lost partitions, and whether it failed to say.

        ``(None, set(), False)``: the stream is gone (or nobody to ask);
        ``(None, set(), True)``: the question failed (a comm error, a
        timeout): the answer is unknown, not "lost".
        """
        if self._resolve is None:
            return None, set(), False
        try:
            reply = raise_from_wire(self._resolve(name), "aimss_get")
        except StreamNotFoundError:
            return None, set(), False
        except Exception as e:
            logger.info("aimss: could not ask where stream %r lives now: %r", name, e)
            return None, set(), True
        spec = StreamSpec.from_wire(reply["spec"])
        with self._cond:
            old = self._routes.get(name)
            if old is None or spec.epoch > old.epoch:
                self._routes[name] = spec
        return spec, set(reply.get("lost") or ()), False

    def _resend(self, spec: StreamSpec, it: _Item, failures: int) -> bool:
        """Queue ``it`` first for the partition's owner now: a copy that took over, or the same one
        again (its older records go before newer ones).

        False, and nothing queued: a write of its partition failed over
        since the rerouter's round began (``failures``, see ``_failures``):
        it may be older than ``it`` and go again next round, before ``it``.
        """
        owner = spec.owners[it.partition]
        with self._cond:
            if self._failures.get(it.line, 0) != failures:  # type: ignore[arg-type]
                return False
            if not it.rerouted:
                it.rerouted = True
            link = self._link(owner)
            # Ahead of what was written since for that partition, behind
            # other resent items (they are older).
            i = next((j for j, q in enumerate(link.pending) if not q.rerouted), len(link.pending))
            link.pending.insert(i, it)
            link.pending_bytes += it.nbytes
            link.written += 1
            self._queued(owner, it)
            link.flush_now = True
            self._cond.notify_all()
        return True

    def _fail_moved(self, dead: str, it: _Item, spec: StreamSpec | None, lost: set[int]) -> None:
        err = PartitionLostError(
            f"partition {it.partition} of stream {it.name!r}: its owner {dead} died before it "
            "stored these records, and no replica took over"
            + (" in time" if spec is not None and it.partition not in lost else ""),
            {it.partition: (0, None)},
        )
        # Counted against the owner the partition was lost with: a copy may
        # have taken over from ``dead`` and died in turn before this write
        # reached it. A recovery that re-creates the partition writes it
        # again, and forgives the writes lost with that owner (failure()).
        where = spec.owners[it.partition] if spec is not None and it.partition in lost else dead
        with self._cond:
            self._give_up(it, err)
            self._set_error(it, err)
            self._failed.setdefault(it.name, {}).setdefault(where, (it.epoch, err))
            self._rerouting -= 1
            self._cond.notify_all()
        self.budget.release(it.nbytes)

    def _behind_resent(self, dead: str | None, name: str, partition: int) -> None:
        """Before a write goes to the owner that took over: older writes of the partition go first.

        What is still queued for (or on the wire to) the dead owner fails
        there and is sent again; a newer write must not overtake it, or the
        partition's order would differ from the writer's. ``dead`` None: the
        writer's handle names the new owner already; only the writes
        waiting to be sent again are waited for.
        """
        with self._cond:
            link = self._links.get(dead) if dead is not None else None
            if link is not None:
                self._orphan_queued(link, lambda it: it.name == name and it.partition == partition)
                if link.pending:
                    # Older writes of other partitions still queued for the
                    # old owner hold this one back until they fail there:
                    # send them now, not after the linger.
                    link.flush_now = True
                    self._cond.notify_all()
            deadline = time.monotonic() + FAILOVER_TIMEOUT
            # Only what was written to it so far: later writes of other
            # streams to a live old owner must not keep this one waiting.
            sent = link.written if link is not None else 0

            def older_pending() -> bool:
                if any(it.name == name and it.partition == partition for _, it in self._orphans):
                    return True
                lk = self._links.get(dead) if dead is not None else None
                return lk is not None and lk.acked < sent  # in flight to the old owner

            while not self.closed and older_pending() and time.monotonic() < deadline:
                self._cond.wait(0.05)

    def _route(self, spec: StreamSpec, partition: int) -> str:
        """The live owner of ``partition`` of a replicated ``spec`` whose owner there died.

        Blocks (a writer's thread) until the coordinator names the replica
        that took over, for at most ``FAILOVER_TIMEOUT``; the dead owner if
        none does (the write then fails there, named).
        """
        dead = spec.owners[partition]
        deadline = time.monotonic() + FAILOVER_TIMEOUT
        while not self.closed:
            new, lost, unsure = self._ask_spec(spec.name)
            if new is None:
                if not unsure:  # gone; else the coordinator did not answer: ask again
                    return dead
            elif partition in lost or new.first_epoch != spec.first_epoch:
                return dead
            elif new.owners[partition] != dead:
                return new.owners[partition]
            if time.monotonic() > deadline:
                return dead
            time.sleep(0.1)
        return dead

    # -- seals, errors, lifecycle ------------------------------------------------------------

    async def seal(self, name: str, epoch: int) -> None:
        """Refuse further writes to ``name`` here, then push what is buffered."""
        self.mark_sealed(name, epoch)
        await self.flush([name], raise_errors=False)

    def failure(self, name: str, epoch: int, since: int | None = None) -> tuple[str, str] | None:
        """``(error class, message)`` of a write to ``name`` that failed, if any.

        ``since``: the stream was recovered (created at ``since``, now at
        ``epoch``): a write tagged with an older epoch counts too, unless it
        went to an owner that was lost since (its partitions were re-created
        and written again). The writes of a push that finished before the
        recovery are not sent again to the partitions that survived: one of
        them that failed must fail the seal.
        """
        with self._cond:
            # Any writer's: one that was raised its error took it (its task
            # failed); one still here was never raised to anyone.
            for ep, err in self._errors.get(name, {}).values():
                if ep == epoch:
                    return type(err).__name__, str(err)
            if since is None:
                return None
            for owner, (ep, err) in sorted(self._failed.get(name, {}).items()):
                if since <= ep < epoch and ep > self._dead.get(owner, 0):
                    return type(err).__name__, str(err)
        return None

    def owner_lost(self, owner: str, epoch: int) -> None:
        """``owner`` left the cluster: streams up to ``epoch`` lost their partitions there.

        Their records queued for it fail, and so do later writes to them.
        Streams made later may be placed on a worker that came back at the
        same address (a nanny restart on a fixed port): that is another
        process, so its data address is asked again and the connection
        to the old one dropped. Only news does that: a stream reply repeats
        an old loss each time it is fetched, and dropping the connection
        then would fail the new process's in-flight batches.
        """
        with self._cond:
            if epoch <= self._dead.get(owner, 0):
                return
            self._dead[owner] = epoch
            self._data_addresses.pop(owner, None)
            link = self._links.get(owner)
            batch = [it for it in link.pending if it.epoch <= epoch] if link else []
            if link and link.aborts is not None and link.aborts[0] <= epoch:
                # Dask's connect retries a refused address until its connect
                # timeout (30 s by default): the scheduler knows sooner.
                self._loop.add_callback(link.aborts[1])
            if link:
                link.generation += 1
                link.pending = deque(it for it in link.pending if it.epoch > epoch)
                link.pending_bytes = sum(it.nbytes for it in link.pending)
        if link and batch:
            self._settle(link, batch, None, PartitionLostError(
                f"worker {owner} left the cluster before it stored these records"
            ), failover=True)

    def mark_sealed(self, name: str, epoch: int) -> None:
        with self._cond:
            self._sealed.add((name, epoch))

    def forget(self, name: str, epoch: int) -> None:
        """Stream ``name`` up to ``epoch`` was destroyed: drop its errors, seal marks and numbering.

        A newer stream of the name (its run restarted, and its writes may
        come before this late word) keeps its own.
        """
        with self._cond:
            mine = {w: e for w, e in self._errors.pop(name, {}).items() if e[0] > epoch}
            if mine:
                self._errors[name] = mine
            failed = {o: e for o, e in self._failed.pop(name, {}).items() if e[0] > epoch}
            if failed:
                self._failed[name] = failed
            if name in self._routes and self._routes[name].epoch <= epoch:
                del self._routes[name]
            for key in [k for k in self._seq if k[0] == name and k[1] <= epoch]:
                del self._seq[key]
            for key in [k for k in self._sent_to if k[0] == name and k[1] <= epoch]:
                del self._sent_to[key]
            for table in (self._failures, self._unsettled, self._gave_up):
                for key in [k for k in table if k[0] == name and k[1] <= epoch]:
                    del table[key]
            self._sealed = {s for s in self._sealed if s[0] != name or s[1] > epoch}

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class _Conn:
    broken = False

    def send(self, batch: list[_Item]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _DaskConn(_Conn):
    """One request per batch over Dask's comms (UCX, in-process, or no data plane)."""

    def __init__(self, producer: Producer, link: _Link) -> None:
        self.p = producer
        self.link = link

    def send(self, batch: list[_Item]) -> None:
        link, owner = self.link, self.link.owner
        newest = max(it.epoch for it in batch)
        items = _group(batch, self.p.id)

        async def call() -> Any:
            task = asyncio.current_task()
            assert task is not None
            link.aborts = (newest, task.cancel)
            try:
                if newest <= self.p._dead.get(owner, 0):
                    # The news came (on this loop) after the sender thread
                    # looked: with it, owner_lost found nothing to cancel.
                    raise ConnectionError(f"worker {owner} left the cluster")
                request = self.p._rpc(owner).aimss_append(items=items)
                listed = self.p._listed
                # The owner-lost word cancels this (aborts) where the coordinator
                # sends it; an owner stopped or hung is given up once removed.
                return await (
                    request if listed is None
                    else call_listed(request, owner, listed, every=self.p.liveness.every)
                )
            except asyncio.CancelledError:
                # Producer.owner_lost: the batch fails over like any other
                # whose owner could not be reached.
                raise ConnectionError(f"worker {owner} left the cluster before it answered") from None
            finally:
                link.aborts = None

        reply = sync(self.p._loop, call)
        self.p._settle(link, batch, reply)


class _RawConn(_Conn):
    """The data plane: batches written back to back, answered in order."""

    def __init__(self, producer: Producer, link: _Link, address: tuple[str, int]) -> None:
        self.p = producer
        self.link = link
        assert producer._credentials is not None
        self.address = link.owner
        self.sock = secure.connect(address, producer._credentials, tls=link.owner.startswith("tls://"))
        self.window = threading.Semaphore(PIPELINE)
        self.inflight: deque[list[_Item]] = deque()
        # Since when the owner has answered nothing while batches wait on it.
        self._since: float | None = None
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._acks, name="aimss-push-acks", daemon=True)
        self.reader.start()
        producer.liveness.watch(self)

    def waiting_since(self) -> float | None:
        return self._since if self.inflight else None

    def abort(self, reason: str) -> None:
        # Only wakes the sender and the ack reader (their calls fail): the
        # reader fails over what is in flight, as on a crash, and the
        # sender's thread closes the socket.
        self.broken = True
        shut_down(self.sock)

    def send(self, batch: list[_Item]) -> None:
        self.window.acquire()
        with self.lock:
            # Checked with the append, under the lock the ack reader takes to
            # fail what is in flight: a batch is settled by one of us, once.
            if self.broken:
                raise ConnectionError("data connection broke")
            if not self.inflight:
                self._since = time.monotonic()
            self.inflight.append(batch)
        try:
            dataplane.send_buffers(self.sock, dataplane.encode_batch(_group(batch, self.p.id)))
        except Exception:
            with self.lock:
                # Not sent: the caller fails this batch; the ack reader the
                # rest, and this one too if it got to it first (settling a
                # batch twice would count its records twice).
                mine = bool(self.inflight) and self.inflight[-1] is batch
                if mine:
                    self.inflight.pop()
            self.close()
            if mine:
                raise

    def _acks(self) -> None:
        try:
            while True:
                with self.lock:
                    if not self.inflight and self.broken:
                        return
                reply = dataplane.read_ack(self.sock)
                with self.lock:
                    batch = self.inflight.popleft()
                    self._since = time.monotonic()  # it answers: the wait starts again
                self.p._settle(self.link, batch, reply)
                self.window.release()
        except Exception as e:
            with self.lock:
                self.broken = True
                rest = list(self.inflight)
                self.inflight.clear()
            for batch in rest:
                self.p._settle(self.link, batch, None, _lost(self.link.owner, e), failover=True)
            self.window.release(PIPELINE)

    def close(self) -> None:
        self.broken = True
        self.p.liveness.unwatch(self)
        shut_down(self.sock)
        self.sock.close()


async def ask_data_address(rpc: Any, owner: str, listed: Listed | None = None) -> Any:
    """``{"host", "port"}`` of ``owner``'s data plane (None, None: it has none).

    ``listed``: how to ask whether the scheduler still lists ``owner``; an
    owner that died then fails within a fraction of a second (see
    :func:`~aimss_dask.transport.rpc.connect_listed`).
    """

    async def ask() -> Any:
        if listed is not None:
            await connect_listed(rpc, owner, listed)
        return await rpc(owner).aimss_data_address()

    # Dask retries a refused connection for its whole connect timeout (30 s by
    # default); an owner that does not answer in 10 s is as good as lost.
    return await asyncio.wait_for(ask(), 10)


def _naming(error: Exception, partitions: Iterable[int]) -> Exception:
    """``error`` as told to a stream whose writes to ``partitions`` it failed.

    A loss names those partitions (from offset 0: the offsets lost are the
    coordinator's to say), since it may surface at a later write to another
    partition, or at a flush.

    Examples
    --------
    >>> _naming(PartitionLostError("owner x could not be reached"), [3, 1, 3]).lost
    {1: (0, None), 3: (0, None)}
    """
    if isinstance(error, PartitionLostError) and not error.lost:
        return PartitionLostError(str(error), {p: (0, None) for p in sorted(set(partitions))})
    return error


def _lost(owner: str, e: Exception) -> Exception:
    if isinstance(e, (OSError, ConnectionError, EOFError)):
        return PartitionLostError(
            f"owner {owner} could not be reached ({type(e).__name__}: {e}); the "
            "records sent to it are lost"
        )
    return e


def _group(batch: list[_Item], producer_id: int = 0) -> list[dataplane.Group]:
    """Consecutive plain records of one partition travel as one group.

    A record with an origin travels as a group of its own, the origin as a
    plain ``(input, attempt, seq)`` tuple (see :data:`dataplane.Group`). An
    origin names one write (every operator writes one record per input and
    partition; ``seq`` numbers any further ones), so a record with the same
    origin as the one before it is a second write, which the owner must see
    as a group of its own to refuse it, however the records were batched.
    Records of a replicated stream carry ``(producer_id, sequence number)``
    of the group's first record; a group holds consecutive numbers only.
    """
    groups: list[dataplane.Group] = []
    for it in batch:
        o = it.origin
        if o is not None:
            g = (it.name, it.epoch, it.partition, [it.record], [it.nbytes], (o.input, o.attempt, o.seq))
            groups.append(g if it.seq is None else (*g, (producer_id, it.seq)))
            continue
        g = groups[-1] if groups else None
        if (
            g is not None
            and g[5] is None
            and (g[0], g[1], g[2]) == (it.name, it.epoch, it.partition)
            and (it.seq is None if len(g) == 6 else it.seq == g[6][1] + len(g[3]))
        ):
            g[3].append(it.record)
            g[4].append(it.nbytes)
        elif it.seq is None:
            groups.append((it.name, it.epoch, it.partition, [it.record], [it.nbytes], None))
        else:
            groups.append((it.name, it.epoch, it.partition, [it.record], [it.nbytes], None, (producer_id, it.seq)))
    return groups


def writer_id() -> Any:
    """Who writes from here: the Dask task running on this thread, else the thread.

    Failed writes are raised to the writer that wrote them (at its next
    write or flush). A task's, not its thread's: the next task on that
    thread is another writer, and the seal must still see the error of a
    task that ended without flushing.
    """
    try:
        key = get_worker().get_current_task()
    except Exception:  # not in a worker, or not on a task's thread
        key = None
    if key is not None:
        return ("task", key)
    # Not the thread's ident: the system hands it to the next thread once
    # this one ends, and that one is another writer.
    token = getattr(_writers, "token", None)
    if token is None:
        token = _writers.token = next(_thread_tokens)
    return ("thread", token)


_writers = threading.local()
_thread_tokens = itertools.count()
