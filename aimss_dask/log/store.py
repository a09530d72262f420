"""The worker's log store: every partition log it owns, under one byte budget.

Thread-safe: appends come from the event loop (pushed batches) and from task
threads (local producers); reads from task threads (local consumers) and from
the loop. Every method holds the store lock only for O(records) bookkeeping;
disk reads and writes happen outside it, so the loop never waits on I/O.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aimss_dask.core import trace
from aimss_dask.core.errors import (
    InvalidOffsetError,
    PartitionLostError,
    PartitionNotHeldError,
    PartitionOutOfRangeError,
    ReplicaGapError,
    SpillCorruptionError,
    SpillError,
    StreamNotFoundError,
    StreamSealedError,
)
from aimss_dask.log import records as rec
from aimss_dask.log import salvage, spillfile
from aimss_dask.log.segment import PartitionLog, Segment

logger = logging.getLogger("aimss_dask")

T = TypeVar("T")

#: Destroyed stream names a store remembers, to refuse late opens of them.
TOMBSTONES = 10_000

#: Spill files of freed segments an event loop removes itself; more go on a thread.
REAP_INLINE = 8

#: Seconds before a segment whose spill failed on an OSError (a full disk, a
#: folder gone) is tried again; spilling goes on with other segments meanwhile.
SPILL_RETRY = 10.0


def _reaps(method: Callable[..., T]) -> Callable[..., T]:
    """A :class:`LogStore` method that may free segments: their files go once it returns (:meth:`LogStore._reap`)."""

    @functools.wraps(method)
    def wrapper(self: LogStore, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        finally:
            self._reap()

    return wrapper


@dataclass(eq=False)
class _StreamLogs:
    epoch: int
    partitions: dict[int, PartitionLog]
    #: The oldest epoch these logs answer to: ``epoch`` itself, unless a
    #: run's recovery re-created lost partitions under a newer epoch (see
    #: :meth:`LogStore.open`).
    since: int

    def answers(self, epoch: int | None) -> bool:
        """Whether a message about ``epoch`` (None: any) is about these logs."""
        return epoch is None or self.since <= epoch <= self.epoch


class LogStore:
    """Partition logs of one worker, kept within ``budget`` bytes of memory.

    Past the budget, sealed segments spill to disk and are read back
    transparently, verified. ``spill()`` does the disk writes; callers on the
    event loop run it in a thread.

    ``spill_root`` may be shared by many workers (and hosts, on a shared file
    system): each store spills into a folder of its own that it creates
    inside it (``spill_dir``), named after the host, the process and a random
    suffix, and removes only the files it wrote there. A ``spill_root`` that
    did not exist is created and, if empty at :meth:`close`, removed.

    Examples
    --------
    >>> import tempfile
    >>> s = LogStore(budget=2**20, spill_root=tempfile.mkdtemp())
    >>> s.open("temps", epoch=1, partitions=[0])
    >>> s.append("temps", 1, 0, [b"a", b"b"], [1, 1])
    0
    >>> s.read("temps", 1, 0, start=1)[0]
    [b'b']
    """

    def __init__(
        self,
        budget: int,
        spill_root: str,
        segment_size: int = 4 * 2**20,
        on_change: Callable[[str, int], None] | None = None,
        owner: Mapping[str, Any] | None = None,
    ) -> None:
        self.budget = budget
        #: Written into the spill folder (:data:`~aimss_dask.log.salvage.OWNER_FILE`):
        #: a worker that takes over after this one died finds its files by it.
        self.owner = dict(owner or {})
        self.spill_root = os.path.abspath(spill_root)
        #: This store's own folder inside ``spill_root``; made on first use.
        self.spill_dir = os.path.join(self.spill_root, _own_folder_name())
        self._spill_dir_made = False
        self._made_root = False
        self.segment_size = segment_size
        self._on_change = on_change
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        # Task threads parked in wait(); see the ``waiting`` property.
        self._waiting = 0
        self._spill_lock = threading.Lock()
        self._streams: dict[str, _StreamLogs] = {}
        # name -> newest epoch destroyed here (see tombstone()).
        self._dropped: OrderedDict[str, int] = OrderedDict()
        self._seq = itertools.count()
        self._files = itertools.count()
        self.memory_bytes = 0
        self.spilled_bytes = 0
        self.peak_memory = 0
        #: Running totals for the metrics: records and bytes appended (every
        #: copy held here, a replica's included), read (a replica's catch-up
        #: included), and bytes ever written to spill files.
        self.appended = [0, 0]
        self.served = [0, 0]
        self.spilled_total = 0
        #: The last spill that failed: ``(time.monotonic(), what failed)``; None once one succeeds.
        self.spill_failure: tuple[float, str] | None = None
        # Spill files of freed segments, removed outside the lock (_reap),
        # and the threads removing many of them.
        self._doomed: list[str] = []
        self._reapers: set[threading.Thread] = set()
        self.closed = False

    # -- streams -----------------------------------------------------------------

    @_reaps
    def open(
        self,
        name: str,
        epoch: int,
        partitions: Iterable[int],
        starts: Mapping[int, int] | None = None,
        since: int | None = None,
    ) -> None:
        """Create empty logs for ``partitions`` of ``name`` (idempotent).

        ``starts[p]``: the first offset of a new log of ``p`` (a partition
        moved here from a worker that had trimmed its head), so that every
        record keeps its offset; 0 where not given. An older epoch than the
        stream held here raises :class:`StreamNotFoundError`.

        ``since``: the stream was created at epoch ``since`` and recovered
        under ``epoch`` (a run re-created partitions that were lost): logs
        held here of an epoch from ``since`` on are kept, with their records,
        and answer to both epochs from now on (a write tagged with the older
        one is still in flight). ``partitions`` may then be empty.
        """
        first = epoch if since is None else since
        with self._lock:
            logs = self._streams.get(name)
            if first <= self._dropped.get(name, 0):
                # A late open of a stream destroyed here already: it would
                # leave logs nobody drops.
                raise StreamNotFoundError(f"stream {name!r} at epoch {epoch} was destroyed")
            if logs is not None and first <= logs.epoch < epoch:
                logs.epoch, logs.since = epoch, first
            if logs is not None and logs.answers(epoch):
                pass  # more partitions of the stream held here
            elif logs is not None and logs.epoch > epoch:
                # A late message about an older stream of this name (epochs
                # only grow): it must not replace the newer one's logs.
                raise StreamNotFoundError(
                    f"stream {name!r} at epoch {epoch} was replaced here by a newer one "
                    f"(epoch {logs.epoch})"
                )
            else:
                if logs is not None:
                    self._drop_locked(name)
                logs = self._streams[name] = _StreamLogs(epoch, {}, first)
            for p in partitions:
                if p not in logs.partitions:
                    first = (starts or {}).get(p, 0)
                    logs.partitions[p] = PartitionLog(start=first, end=first)

    def _logs(self, name: str, epoch: int | None) -> _StreamLogs:
        logs = self._streams.get(name)
        if logs is None or not logs.answers(epoch):
            held = "none" if logs is None else f"epoch {logs.epoch}"
            raise StreamNotFoundError(
                f"stream {name!r} has no log on this worker (destroyed, or never "
                f"created; asked for epoch {epoch}, held: {held}); create it with "
                "aimss_dask.create_stream"
            )
        return logs

    def _log(self, name: str, epoch: int | None, p: int) -> PartitionLog:
        logs = self._logs(name, epoch)
        try:
            return logs.partitions[p]
        except KeyError:
            raise PartitionNotHeldError(
                f"partition {p!r} of stream {name!r} is not held by this worker"
            ) from None

    def tombstone(self, name: str, epoch: int) -> None:
        """Stream ``name`` up to ``epoch`` is destroyed: refuse a late :meth:`open` of it.

        Epochs only grow, so a new stream of the name always opens. The
        most recent :data:`TOMBSTONES` names are remembered.
        """
        with self._lock:
            self._dropped[name] = max(epoch, self._dropped.pop(name, 0))
            while len(self._dropped) > TOMBSTONES:
                self._dropped.popitem(last=False)

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._streams

    @property
    def empty(self) -> bool:
        """No stream is open on this worker."""
        with self._lock:
            return not self._streams

    @_reaps
    def drop(self, name: str) -> bool:
        """Free the memory and spill files of ``name``; False if unknown."""
        with self._lock:
            return self._drop_locked(name)

    def _drop_locked(self, name: str) -> bool:
        logs = self._streams.pop(name, None)
        if logs is None:
            return False
        for log in logs.partitions.values():
            for seg in log.segments:
                self._free(seg)
            log.segments.clear()
            log.sealed = True
        self._changed.notify_all()
        return True

    @_reaps
    def drop_partition(self, name: str, epoch: int | None, p: int) -> None:
        """Forget one partition of ``name`` (it moved to another worker)."""
        with self._lock:
            logs = self._streams.get(name)
            if logs is None or not logs.answers(epoch):
                return
            log = logs.partitions.pop(p, None)
            if log is not None:
                for seg in log.segments:
                    self._free(seg)
            self._changed.notify_all()

    def _free(self, seg: Segment) -> None:
        """Forget ``seg`` (hold the lock); its spill file goes once the lock is released (:meth:`_reap`)."""
        if seg.in_memory:
            self.memory_bytes -= seg.nbytes
        else:
            self.spilled_bytes -= seg.nbytes
            if seg.path:
                self._doomed.append(seg.path)
        seg.nbytes = 0
        seg.records = None
        seg.path = None  # freed by us: a reader that then finds no file knows why

    # -- write ---------------------------------------------------------------------

    def append(
        self,
        name: str,
        epoch: int | None,
        p: int,
        records: Sequence[Any],
        sizes: Sequence[int],
    ) -> int:
        """Append records (stored as given, arrays as read-only views).

        Returns the offset of the first one.
        """
        with self._lock:
            log = self._log(name, epoch, p)
            if log.gap is not None:
                raise _gap_error(name, p, log.gap)
            if log.sealed:
                raise StreamSealedError(
                    f"stream {name!r} is sealed: partition {p} takes no more writes; "
                    "create a new stream for new data"
                )
            first = log.end
            seg = log.segments[-1] if log.segments else None
            for r, n in zip(records, sizes):
                if seg is None or seg.sealed or not seg.in_memory:
                    seg = Segment(base=log.end, seq=next(self._seq))
                    log.segments.append(seg)
                assert seg.records is not None
                seg.records.append(rec.freeze(r))
                seg.sizes.append(n)
                seg.nbytes += n
                self.memory_bytes += n
                log.end += 1
                if seg.nbytes >= self.segment_size:
                    seg.sealed = True
            self.peak_memory = max(self.peak_memory, self.memory_bytes)
            self.appended[0] += len(records)
            self.appended[1] += sum(sizes)
            self._changed.notify_all()
        if self._on_change is not None:
            self._on_change(name, p)
        return first

    def append_at(
        self,
        name: str,
        epoch: int | None,
        p: int,
        at: int,
        records: Sequence[Any],
        sizes: Sequence[int],
    ) -> int:
        """A replica's copy: append records that are at offsets ``at ..`` on the owner.

        Records this log holds already (a copy sent again) are skipped, so
        every copy keeps each record at its owner's offset. Returns how many
        were appended. Raises :class:`ReplicaGapError` if ``at`` is past this
        log's end: the owner must send what is missing first.
        """
        with self._lock:
            log = self._log(name, epoch, p)
            skip = log.end - at
            if skip < 0:
                raise ReplicaGapError(
                    f"the copy of stream {name!r} partition {p} here ends at offset "
                    f"{log.end}; records from {at} cannot follow it"
                )
            if skip >= len(records):
                return 0
            self.append(name, epoch, p, records[skip:], sizes[skip:])
            return len(records) - skip

    def rebase(self, name: str, epoch: int | None, p: int, start: int) -> None:
        """An empty log of ``p`` starts at ``start`` instead (a replica of a trimmed partition).

        Raises :class:`InvalidOffsetError` if the log holds records: they
        would lose their offsets.
        """
        with self._lock:
            log = self._log(name, epoch, p)
            if log.end == start:
                return
            if log.end != log.start or start < log.end:
                raise InvalidOffsetError(
                    f"cannot start stream {name!r} partition {p} at offset {start}: its log "
                    f"here holds offsets {log.start} to {log.end}"
                )
            log.start = log.end = start

    @_reaps
    def truncate(self, name: str, epoch: int | None, p: int, end: int) -> int:
        """Forget records from offset ``end`` on: a replica ahead of the copy that became owner.

        Those records were never on every copy, so no reader saw them (and
        their writers were not answered: they send them again). Returns how
        many were dropped.
        """
        with self._lock:
            log = self._log(name, epoch, p)
            if end >= log.end:
                return 0
            if end < log.start:
                raise InvalidOffsetError(
                    f"cannot cut stream {name!r} partition {p} at {end}: it starts at {log.start}"
                )
            dropped = log.end - end
            keep: list[Segment] = []
            for seg in log.segments:
                if seg.base >= end:
                    self._free(seg)
                    continue
                if seg.end > end:
                    if not seg.in_memory:
                        # Spilled segments are immutable files: read the kept
                        # head back into memory as a segment of its own.
                        head = self._load(name, seg, 0, end - seg.base)
                        sizes = seg.sizes[: end - seg.base]
                        self._free(seg)
                        seg = Segment(base=seg.base, seq=next(self._seq), records=head, sizes=sizes)
                        seg.nbytes = sum(sizes)
                        self.memory_bytes += seg.nbytes
                    else:
                        assert seg.records is not None
                        n = end - seg.base
                        cut = sum(seg.sizes[n:])
                        seg.records = seg.records[:n]
                        seg.sizes = seg.sizes[:n]
                        seg.nbytes -= cut
                        self.memory_bytes -= cut
                keep.append(seg)
            log.segments = keep
            log.end = end
            if log.committed is not None:
                log.committed = min(log.committed, end)
            return dropped

    def seal(self, name: str, epoch: int | None, partitions: Iterable[int]) -> None:
        """No more appends to these partitions; readers see the end."""
        with self._lock:
            for p in partitions:
                log = self._log(name, epoch, p)
                log.sealed = True
                # A seal follows the writers' flushes, which waited for every
                # copy: readers see it all.
                log.committed = None
                if log.segments:
                    log.segments[-1].sealed = True
            self._changed.notify_all()
        if self._on_change is not None:
            for p in partitions:
                self._on_change(name, p)

    def adopt(
        self,
        name: str,
        epoch: int | None,
        p: int,
        start: int,
        files: Sequence[salvage.Found],
        upto: int | None,
    ) -> int:
        """Rebuild the empty log of ``p`` from spill files of a worker that died (checked: :mod:`~aimss_dask.log.salvage`).

        The files move into this store's folder (a rename: the spill root
        is one folder) and become its spilled segments, read back and
        checked like its own. The log keeps offsets ``start`` to the end of
        the last file, sealed. ``upto``: where the partition ended when its
        worker died (None: not known); records from the end of the files to
        there died with it (:attr:`~aimss_dask.log.segment.PartitionLog.gap`).
        Returns the end. Raises :class:`InvalidOffsetError` if the log
        holds records or the files are not consecutive.
        """
        if any(b.seg.base != a.end for a, b in zip(files, files[1:])) or (files and not files[0].seg.base <= start < files[0].end):
            raise InvalidOffsetError(
                f"spill files of stream {name!r} partition {p} do not hold offsets {start} on without a hole"
            )
        with self._spill_lock:
            if self.closed:
                raise StreamNotFoundError(f"stream {name!r} cannot be rebuilt here: this worker's log is closed")
            self._make_spill_dir()
            moved = []
            try:
                for f in files:
                    dest = os.path.join(self.spill_dir, f"segment-{next(self._files)}.bin")
                    os.rename(f.path, dest)
                    moved.append((dest, f))
            except OSError:
                for dest, f in moved:  # put back what moved: the folder stays as it was
                    os.rename(dest, f.path)
                raise
        with self._lock:
            try:
                log = self._log(name, epoch, p)  # destroyed (or moved on) meanwhile: raises
                if log.segments or log.end != log.start:
                    raise InvalidOffsetError(
                        f"cannot rebuild stream {name!r} partition {p} here: its log holds offsets "
                        f"{log.start} to {log.end}"
                    )
            except Exception:  # the files moved here are ours to remove
                for dest, _ in moved:
                    _unlink(dest)
                raise
            for dest, f in moved:
                sizes = [n for _, n in f.index.spans]
                seg = Segment(
                    base=f.seg.base, seq=next(self._seq), records=None, sizes=sizes, nbytes=sum(sizes),
                    sealed=True, path=dest, index=f.index, spilled_as=f.seg,
                )
                log.segments.append(seg)
                self.spilled_bytes += seg.nbytes
            log.start = start
            log.end = files[-1].end if files else start
            log.sealed = True
            log.committed = None
            log.gap = None if upto is not None and upto <= log.end else (log.end, upto)
            self._changed.notify_all()
            end = log.end
        if self._on_change is not None:
            self._on_change(name, p)
        return end

    # -- read ----------------------------------------------------------------------

    def read(
        self,
        name: str,
        epoch: int | None,
        p: int,
        start: int,
        max_bytes: int | None = None,
        upto: int | None = None,
        decode: bool = True,
    ) -> tuple[list[Any], bool, int]:
        """Records from ``start`` on, up to ``max_bytes`` (at least one).

        Returns ``(records, sealed, end)``. Spilled segments are read back
        from disk outside the lock. ``upto``: read records stored up to that
        offset, whether readers may see them yet or not (an owner copying
        its log to a replica); by default, only what they may see.
        ``decode=False``: records stored serialised (a replica's copies)
        come as they are, for a reader that sends them on.
        """
        if start < 0:
            raise InvalidOffsetError(
                f"offset {start!r} is negative; offsets start at 0"
            )
        plan: list[tuple[Segment, list[Any] | None, int, int]] = []
        with self._lock:
            log = self._log(name, epoch, p)
            if start < log.start:
                raise InvalidOffsetError(
                    f"offset {start} of stream {name!r} partition {p} was trimmed; "
                    f"the earliest offset still kept is {log.start}"
                )
            sealed, end = log.sealed, log.visible if upto is None else min(upto, log.end)
            if start >= end and log.gap is not None:
                raise _gap_error(name, p, log.gap)
            if start >= end:
                return [], sealed, end
            budget = max_bytes if max_bytes is not None else float("inf")
            i = log.segment_at(start)
            taken = 0
            offset = start
            while i < len(log.segments) and offset < end:
                seg = log.segments[i]
                lo = offset - seg.base
                hi = lo
                # At least one record per read, even one larger than max_bytes.
                stop = min(len(seg.sizes), end - seg.base)  # readers stop at what every copy holds
                while hi < stop and (
                    (not plan and hi == lo) or taken + seg.sizes[hi] <= budget
                ):
                    taken += seg.sizes[hi]
                    hi += 1
                if hi == lo:
                    break
                # A reference to the list, not a copy: records are immutable and
                # a spill swaps the list out rather than emptying it.
                plan.append((seg, seg.records, lo, hi))
                offset = seg.base + hi
                i += 1
                if hi < stop:
                    break
            self.served[0] += offset - start
            self.served[1] += taken
        out: list[Any] = []
        t0 = time.time() if trace.on() else 0.0
        disk = 0
        for seg, records, lo, hi in plan:
            if records is not None:
                out.extend(rec.decoded(records, lo, hi, name, p, seg.base) if decode else records[lo:hi])
            else:
                out.extend(self._load(name, seg, lo, hi))
                disk += hi - lo
        if t0:
            trace.complete("read", t0, time.time() - t0, stream=name, partition=p, offset=start,
                           records=len(out), bytes=taken, from_disk=disk)
        return out, sealed, start + len(out)

    def _load(self, name: str, seg: Segment, lo: int, hi: int) -> list[Any]:
        path, index, spilled_as = seg.path, seg.index, seg.spilled_as
        try:
            if path is None or index is None or spilled_as is None:
                raise FileNotFoundError
            return spillfile.load(path, spilled_as, index, lo, hi)
        except FileNotFoundError:
            with self._lock:
                freed = seg.path is None
            if not freed:  # the store still holds it: removed behind its back
                raise SpillCorruptionError(
                    f"the spill file {path} of stream {name!r} partition {spilled_as.partition if spilled_as else '?'} "
                    f"(offsets {seg.base + lo} to {seg.base + hi - 1}) is gone from disk: something other than "
                    "aimss removed it (a scratch cleaner?), and those records are lost"
                ) from None
            raise StreamNotFoundError(
                f"stream {name!r} was destroyed while it was being read"
            ) from None

    def wait(self, name: str, epoch: int | None, p: int, offset: int, timeout: float | None) -> bool:
        """Block (a task thread) until ``offset`` exists or the log is sealed."""
        with self._lock:

            def ready() -> bool:
                logs = self._streams.get(name)
                if logs is None or not logs.answers(epoch):
                    return True  # destroyed: let the next read raise
                log = logs.partitions.get(p)
                return log is None or log.sealed or log.visible > offset

            if ready():
                return True  # not parked: ``waiting`` counts only blocked threads
            self._waiting += 1
            try:
                return self._changed.wait_for(ready, timeout)
            finally:
                self._waiting -= 1

    @property
    def waiting(self) -> int:
        """How many threads are blocked in :meth:`wait` now.

        A snapshot read without the lock (an int, so never torn): a hint for
        callers such as the source broker, which must not block on the lock.
        """
        return self._waiting

    def bounds(self, name: str, epoch: int | None, p: int) -> tuple[int, int, bool]:
        """``(start, end, sealed)`` of one partition log; ``end`` of what readers may see."""
        with self._lock:
            log = self._log(name, epoch, p)
            return log.start, log.visible, log.sealed

    def since(self, name: str, epoch: int | None) -> int:
        """The first epoch of the line of stream ``name`` that answers to ``epoch`` (a stale one raises)."""
        with self._lock:
            return self._logs(name, epoch).since

    def held(self, name: str, epoch: int | None, p: int) -> int:
        """The end of every record stored in one partition log, seen by readers or not yet."""
        with self._lock:
            return self._log(name, epoch, p).end

    def hold_back(self, name: str, epoch: int | None, partitions: Iterable[int]) -> None:
        """Readers of these partitions see records only once :meth:`commit` says every copy holds them."""
        with self._lock:
            for p in partitions:
                log = self._log(name, epoch, p)
                if log.committed is None and not log.sealed:
                    log.committed = log.end

    def commit(self, name: str, epoch: int | None, p: int, upto: int | None) -> None:
        """Every copy holds partition ``p`` up to ``upto``: readers may see that far.

        ``None``: readers see every record stored here from now on (no copy
        left to wait for). Never moves back.
        """
        with self._lock:
            logs = self._streams.get(name)
            log = logs.partitions.get(p) if logs is not None and logs.answers(epoch) else None
            if log is None:
                return  # dropped meanwhile
            if upto is None:
                log.committed = None
            elif log.committed is not None and upto > log.committed:
                log.committed = min(upto, log.end)
            else:
                return
            self._changed.notify_all()
        if self._on_change is not None:
            self._on_change(name, p)

    # -- retention -----------------------------------------------------------------

    @_reaps
    def trim(self, name: str, epoch: int | None, p: int, upto: int | None = None) -> int:
        """Forget offsets below ``upto`` (everyone has read them); bytes freed.

        ``upto=None``: every record written so far.
        """
        freed = 0
        with self._lock:
            log = self._log(name, epoch, p)
            upto = log.end if upto is None else min(upto, log.end)
            if upto <= log.start:
                return 0
            keep: list[Segment] = []
            for seg in log.segments:
                if seg.end <= upto:
                    freed += seg.nbytes
                    self._free(seg)
                    continue
                if seg.base < upto and seg.in_memory:
                    assert seg.records is not None
                    # Copy-on-write: a reader may hold the old list.
                    records = list(seg.records)
                    for i in range(max(0, log.start - seg.base), upto - seg.base):
                        records[i] = None
                        seg.nbytes -= seg.sizes[i]
                        self.memory_bytes -= seg.sizes[i]
                        freed += seg.sizes[i]
                    seg.records = records
                keep.append(seg)
            log.segments = keep
            log.start = upto
        return freed

    # -- memory --------------------------------------------------------------------

    @property
    def over_budget(self) -> bool:
        return self.memory_bytes > self.budget

    def tight(self, extra: int = 0) -> bool:
        """Whether the log (plus ``extra`` bytes about to come) is past half its budget.

        From there on the log may spill soon, so data meant for it gets
        memory of its own rather than staying a view into a shared buffer
        (one spilled view would free nothing). Read without the lock: a
        hint, and a stale answer costs one copy or one pinned buffer.
        """
        return self.memory_bytes + extra > self.budget // 2

    def make_room(self, name: str, epoch: int | None, p: int) -> int:
        """Before partition ``p`` is read whole: spill others so the read fits the budget.

        Reading a partition brings its spilled records back into memory, and
        its reader builds an output as large as the partition; neither is in
        ``memory_bytes``. Other partitions' segments spill (oldest first)
        until the log, the loaded records and that output fit in the budget
        together; ``p``'s own segments stay (the reader needs them now).
        Blocking, like :meth:`spill`. Returns the bytes spilled.
        """
        with self._lock:
            try:
                log = self._log(name, epoch, p)
            except (StreamNotFoundError, PartitionOutOfRangeError):
                return 0  # not (or no longer) here: the read itself will say so
            need = log.spilled_bytes() + log.retained_bytes()
            keep = set(map(id, log.segments))
        return self.spill(max(0, self.budget - need), keep=keep)

    def spill(self, target: int | None = None, keep: set[int] | None = None) -> int:
        """Write sealed segments to disk, oldest first, until memory <= target.

        ``target`` defaults to 90% of the budget, so a store that just crossed
        the line does not spill one segment per append. Blocking: run it in a
        thread from the event loop. Returns the bytes spilled.
        """
        target = int(self.budget * 0.9) if target is None else target
        spilled = 0
        with self._spill_lock:
            while not self.closed:
                with self._lock:
                    if self.memory_bytes <= target:
                        break
                    victim = self._pick_victim(keep)
                    if victim is None:
                        break
                    seg_id, seg = victim
                    records = list(seg.records or [])
                path = os.path.join(self.spill_dir, f"segment-{next(self._files)}.bin")
                t0 = time.time()
                try:
                    self._make_spill_dir()
                    index = spillfile.dump(records, path, seg_id)
                except Exception as e:
                    # The records are stored already: a failed spill must not
                    # fail the write that stored them (its writer would send
                    # them again), nor stop other segments from spilling.
                    self._spill_failed(seg, seg_id, e)
                    continue
                trace.complete("spill", t0, time.time() - t0, stream=seg_id.stream, partition=seg_id.partition,
                               records=len(records), bytes=seg.nbytes)
                with self._lock:
                    logs = self._streams.get(seg_id.stream)
                    if seg.records is None or logs is None:
                        _unlink(path)  # trimmed or dropped meanwhile
                        continue
                    seg.path, seg.index, seg.spilled_as = path, index, seg_id
                    seg.records = None
                    seg.spill_failed = None
                    self.spill_failure = None
                    self.memory_bytes -= seg.nbytes
                    self.spilled_bytes += seg.nbytes
                    self.spilled_total += seg.nbytes
                    spilled += seg.nbytes
        return spilled

    def _spill_failed(self, seg: Segment, seg_id: spillfile.SegmentId, e: Exception) -> None:
        """Spilling ``seg`` failed: left in memory, skipped for a while (for good if its records cannot be written)."""
        written = isinstance(e, OSError)  # the disk's fault; a record that does not serialise is the record's
        what = (
            f"records {seg_id.base} to {seg.end - 1} of stream {seg_id.stream!r} partition "
            f"{seg_id.partition} stay in memory: {type(e).__name__}: {e}"
        )
        with self._lock:
            # Said once per segment that cannot be written, and once per
            # spell of a failing disk (not once per segment then).
            first = (self.spill_failure is None) if written else seg.spill_failed is None
            seg.spill_failed = time.monotonic() if written else float("inf")
            self.spill_failure = (time.monotonic(), what)
        (logger.error if first else logger.debug)(
            "aimss: could not spill to %s (%s); %s", self.spill_dir,
            "tried again later" if written else "they cannot be written to disk", what,
        )

    def check_room(self) -> None:
        """Before storing more: spill if past the budget; :class:`SpillError` if the log stays past it.

        Only while spilling fails (a full or unwritable spill folder, records
        that cannot be written): the records about to come are then refused
        before they are stored, so that writing them again later is safe.
        Blocking, like :meth:`spill`.
        """
        if not self.over_budget:
            return
        self.spill()
        failure = self.spill_failure
        if self.over_budget and failure is not None:
            raise SpillError(
                f"the log of this worker holds {self.memory_bytes} bytes, past its budget of "
                f"{self.budget}, and cannot spill to {self.spill_dir} ({failure[1]}); these records "
                "were not stored: free space there (or read and trim the stream), then write them again"
            )

    def prepare_spill_dir(self) -> str:
        """Create this store's spill folder now, so a bad ``spill_root`` fails early.

        Raises ``OSError`` (with the path) when the folder cannot be created.
        Returns the folder.
        """
        with self._spill_lock:
            self._make_spill_dir()
        return self.spill_dir

    def _make_spill_dir(self) -> None:
        """Called with the spill lock held."""
        if self._spill_dir_made:
            return
        if not os.path.isdir(self.spill_root):
            try:
                os.makedirs(self.spill_root)
                self._made_root = True
            except FileExistsError:
                pass  # another worker made it first: not ours to remove
        # Exclusive: a folder of that name that exists is not ours, whoever made it.
        os.mkdir(self.spill_dir)
        self._spill_dir_made = True
        salvage.write_owner(self.spill_dir, self.owner)

    def _pick_victim(
        self, keep: set[int] | None = None
    ) -> tuple[spillfile.SegmentId, Segment] | None:
        best: tuple[spillfile.SegmentId, Segment] | None = None
        now = time.monotonic()
        for name, logs in self._streams.items():
            for p, log in logs.partitions.items():
                for seg in log.segments:
                    if keep and id(seg) in keep:
                        continue
                    if seg.spill_failed is not None and now - seg.spill_failed < SPILL_RETRY:
                        continue
                    if seg.in_memory and seg.nbytes > 0 and (best is None or seg.seq < best[1].seq):
                        best = (spillfile.SegmentId(name, logs.epoch, p, seg.base), seg)
        if best is not None:
            # Sealing the open segment is what makes the newest data spillable
            # too; the next append opens a fresh segment.
            best[1].sealed = True
        return best

    # -- inspection ----------------------------------------------------------------

    def stream_stats(self, name: str) -> dict[int, dict[str, Any]]:
        with self._lock:
            logs = self._streams.get(name)
            if logs is None:
                return {}
            return {p: _log_stats(log) for p, log in logs.partitions.items()}

    def partition_stats(self, name: str, p: int) -> dict[str, Any] | None:
        """:meth:`stream_stats` of one partition; None if it is not held here."""
        with self._lock:
            logs = self._streams.get(name)
            log = logs.partitions.get(p) if logs is not None else None
            return None if log is None else _log_stats(log)

    def totals(self) -> dict[str, tuple[int, int, int, int, list[tuple[int, int, int]]]]:
        """Per stream held here: ``(records, bytes in memory, bytes spilled, epoch, bounds)``, in one pass.

        ``bounds``: ``(partition, start, end)`` of each partition log, what
        the coordinator names as lost if this worker dies. What a heartbeat
        carries: one lock and no per-partition dicts, so thousands of streams
        cost the worker's event loop little. The sums of
        ``PartitionLog.retained_bytes``/``spilled_bytes``, in one walk of the
        segments (calling both walks them twice: 3.7x the time).
        """
        with self._lock:
            out = {}
            for name, logs in self._streams.items():
                records = memory = spilled = 0
                bounds = []
                for p, log in logs.partitions.items():
                    records += log.visible
                    bounds.append((p, log.start, log.visible))
                    for seg in log.segments:
                        if seg.in_memory:
                            memory += seg.nbytes
                        else:
                            spilled += seg.nbytes
                out[name] = (records, memory, spilled, logs.epoch, bounds)
            return out

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "budget": self.budget,
                "memory_bytes": self.memory_bytes,
                "spilled_bytes": self.spilled_bytes,
                "peak_memory": self.peak_memory,
                "streams": sorted(self._streams),
            }

    def _reap(self) -> None:
        """Remove the spill files of the segments freed so far; call without the lock.

        Not under the lock: a stream of thousands of spilled segments
        dropped would stall every append and read meanwhile (seconds on a
        parallel file system). Removed by the caller, which returns once
        they are gone, unless it runs an event loop and there are many:
        those go on a thread of their own.
        """
        with self._lock:
            paths, self._doomed = self._doomed, []
        if len(paths) <= REAP_INLINE or not _on_event_loop():
            for path in paths:
                _unlink(path)
            return
        t = threading.Thread(target=self._unlink_all, args=(paths,), name="aimss-spill-reap", daemon=True)
        with self._lock:
            self._reapers.add(t)
        t.start()

    def _unlink_all(self, paths: list[str]) -> None:
        try:
            for path in paths:
                _unlink(path)
        except OSError:  # a folder gone or unreadable: close() says what is left
            logger.warning("aimss: could not remove spill files of %s", self.spill_dir, exc_info=True)
        finally:
            with self._lock:
                self._reapers.discard(threading.current_thread())

    def close(self) -> None:
        """Drop every log and remove the spill files; safe to call twice.

        Only what this store created goes: its segment files, then its own
        folder and the ``spill_root`` it made, each only if empty. A file
        someone else put there keeps the folder (and the file) in place.
        """
        with self._lock:
            self.closed = True
            for name in list(self._streams):
                self._drop_locked(name)
            paths, self._doomed = self._doomed, []
            reapers = list(self._reapers)
        for path in paths:
            _unlink(path)
        for t in reapers:
            t.join()
        with self._spill_lock:  # a spill under way finishes (and is dropped) first
            if self._spill_dir_made:
                salvage.remove_owner(self.spill_dir)
                _rmdir_if_empty(self.spill_dir, warn=True)
                self._spill_dir_made = False
            if self._made_root:
                _rmdir_if_empty(self.spill_root, warn=False)
                self._made_root = False


def _gap_error(name: str, p: int, gap: tuple[int, int | None]) -> PartitionLostError:
    last = "its end" if gap[1] is None else f"offset {gap[1] - 1}"
    return PartitionLostError(
        f"records of stream {name!r} partition {p} from offset {gap[0]} to {last} were "
        "lost with their worker (only the part before was recovered from its spill "
        "files); write them again to a new stream",
        {p: gap},
    )


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _own_folder_name() -> str:
    """A spill folder name no other worker, run or host picks."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"
    return f"aimss-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _rmdir_if_empty(path: str, *, warn: bool) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if warn:
            logger.warning(
                "aimss: left spill folder %s in place: it holds files aimss did not "
                "write (%s)", path, e.strerror,
            )


def _log_stats(log: PartitionLog) -> dict[str, Any]:
    return {
        "records": log.visible,
        "start": log.start,
        "bytes": log.retained_bytes(),
        "spilled_bytes": log.spilled_bytes(),
        "sealed": log.sealed,
    }
