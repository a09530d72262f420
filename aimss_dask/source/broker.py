"""Storage brokers: the worker side of a Zarr source.

One :class:`SourceRun` per source stream on each worker that owns some of its
partitions, started by the ``aimss_source_start`` handler. Each owned
partition gets a broker: an asyncio task on the worker's event loop that
reads the partition's slabs from Zarr in a thread (never on the loop, never
in a task thread) and appends them to the local log with
``plugin.local_append`` (no copy, no serialisation).

How far a broker reads ahead
----------------------------
A broker keeps the records ``[low, low + window)`` of its partition in the
log, where ``low`` is the slowest consumer's committed offset:

* consumer groups committed at the coordinator (polled, with back-off, while
  the broker has nothing to do; groups ending in ``#position`` are loader
  positions, not offsets, and are ignored),
* loaders attached to the run, which send their progress straight to the
  owners after each commit (``advance``), so the window slides at once.

Records below ``low`` are trimmed. ``window`` (records per partition) is the
source's ``prefetch`` clamped so that the windows of all partitions a worker
owns fit in :data:`PREFETCH_FRACTION` of its log budget. A broker goes past
the window only when asked: a ``take`` for a record not yet read (a loader
blocked on its next batch) or, when no loader is attached, a reader parked
at the end of the log (a ``read_from`` consumer that has not committed yet,
or reads without a group) - without that, such a reader would wait forever
on a window that only commits can move.

A loader that needs every record again and again (a shuffle, or several
epochs) switches the run to *retain*: the brokers read the whole array and
trim nothing; past the budget the log spills to local disk as usual.

Early reads
-----------
A take for a record the broker has not started reading (a shuffled loader's
first batches want records from all over the array) reads it at once, on a
pool of its own, instead of waiting for the in-order read to get there; the
brokers of the run pause their read-ahead meanwhile, so the reads a consumer
waits for get the CPU first. The broker appends that very read when it
reaches the offset (each slab is read once). Early reads held outside the log
are bounded like the windows (``PREFETCH_FRACTION`` of the budget); past it a
take waits for the in-order read as before.

A broker stops when its partition is read and either retained or trimmed to
the end, when the stream is dropped (``stop``: destroy, or its client left)
and at plugin teardown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed.protocol import to_serialize

from aimss_dask.core import trace
from aimss_dask.core.errors import (
    AIMSSError,
    InvalidArgumentError,
    InvalidOffsetError,
    PartitionNotHeldError,
    PartitionOutOfRangeError,
    StoreNotFoundError,
    StreamNotFoundError,
)
from aimss_dask.core.specs import StreamSpec
from aimss_dask.node.runs import Run
from aimss_dask.source.layout import POSITION_SUFFIX, SourceLayout

logger = logging.getLogger("aimss_dask")

#: Share of a worker's log budget the windows of all its source partitions
#: may fill together; the rest stays free for other streams and for a
#: retained source's read-ahead before it spills.
PREFETCH_FRACTION = 0.25
#: Zarr reads one broker keeps in flight (the next slabs of its partition),
#: so decoding one slab overlaps reading the next.
READS_IN_FLIGHT = 2
#: Threads of the process-wide pool that runs Zarr reads and log appends.
READ_THREADS = 4
#: Threads of the pool that runs reads a take is waiting for, so that they do
#: not queue behind the brokers' read-ahead.
EARLY_THREADS = 2
#: How often an idle broker looks again (parked readers, a due poll).
TICK = 0.05
#: Coordinator polls for committed offsets: first interval and back-off cap.
POLL_MIN, POLL_MAX = 0.25, 4.0
#: Key under which a loader without a consumer group reports its progress.
PRIVATE_PREFIX = "loader-"

_pool_lock = threading.Lock()
_pools: dict[bool, ThreadPoolExecutor] = {}


def _executor(early: bool = False) -> ThreadPoolExecutor:
    """The process-wide pool of reads and appends, or (``early``) of reads a take waits for."""
    with _pool_lock:
        pool = _pools.get(early)
        if pool is None:
            threads, prefix = (EARLY_THREADS, "aimss-source-early") if early else (READ_THREADS, "aimss-source")
            pool = _pools[early] = ThreadPoolExecutor(threads, thread_name_prefix=prefix)
        return pool


@dataclass(eq=False)
class _Part:
    """One partition's broker state; only the event loop thread touches it."""

    p: int
    n: int  # records (slabs) the partition holds when complete
    window: int
    end: int = 0  # next offset to append
    start: int = 0  # first offset still kept (trimmed below)
    low: int = 0  # slowest consumer's offset: nothing below it is needed
    demand: int = 0  # a take waits for offsets below this
    peak: int = 0  # most records held at once (end - start)
    sealed: bool = False
    issued: int = 0  # the broker's in-order reads cover offsets below this
    reads: int = 0  # slabs read from the store (each once, early or in order)
    early_reads: int = 0  # of which a take started early
    # Reads a take started ahead of the broker (offset >= issued), kept until
    # the broker reaches them and appends them in order.
    early: dict[int, asyncio.Future[np.ndarray]] = field(default_factory=dict)


class SourceRun(Run):
    """The brokers of one source stream on one worker: a run (``node/runs.py``).

    Its operations (``aimss_run_call``): ``take`` (samples for a loader),
    ``backup`` (the same, of any partition, read straight from Zarr: a
    loader's backup of another owner's late take), ``control`` (attach,
    advance, detach a loader) and ``status``.
    """

    def __init__(self, plugin: Any, spec: StreamSpec, source: dict[str, Any], parts: list[int]) -> None:
        super().__init__(spec.name, spec.epoch)
        self.plugin = plugin
        self.spec = spec
        self.source = source
        self.where = str(source["where"])
        self.layout = SourceLayout(int(source["rows"]), int(source["slab_rows"]), spec.partitions)
        budget = plugin.store.budget
        slab = max(1, int(source["slab_nbytes"]))
        # The windows of every partition of this source on this worker fit in
        # a fraction of the budget; at least one record, or nothing moves.
        cap = max(1, int(budget * PREFETCH_FRACTION) // (slab * max(1, len(parts))))
        wanted = source.get("prefetch")
        window = cap if wanted is None else max(1, min(int(wanted), cap))
        self.parts = {p: _Part(p, self.layout.records(p), window) for p in parts}
        # Early reads held at once on this worker (outside the log until the
        # broker appends them): bounded like the prefetch windows.
        self.early_cap = max(READS_IN_FLIGHT, int(budget * PREFETCH_FRACTION) // slab)
        self.retain = False
        self.loaders: set[str] = set()
        # Offsets of every consumer known here (polled groups and attached
        # loaders), merged element-wise by max since commits only move forward.
        self.groups: dict[str, list[int]] = {}
        self.error: BaseException | None = None
        self.stopped = False
        self.tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._appended = asyncio.Event()
        self._array: Any = None
        self._array_lock = threading.Lock()
        self._last_poll = 0.0
        self._poll_every = POLL_MIN
        self._polling = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """Start a broker per partition held here (on the event loop); the run's status."""
        for st in self.parts.values():
            if st.n == 0:
                self._seal(st)  # an empty partition: nothing to read, ever
            else:
                task = asyncio.ensure_future(self._fill(st))
                task.set_name(f"aimss-source-{self.spec.name}-{st.p}")
                self.tasks.append(task)
        return self.status()

    async def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        if op == "take":
            return await self.take(kwargs["takes"])
        if op == "backup":
            return await self.backup(kwargs["takes"])
        if op == "control":
            return self.control(
                kwargs["action"], kwargs.get("key"), kwargs.get("mode"), kwargs.get("offsets")
            )
        if op == "status":
            return {"run": self.status()}
        return await super().call(op, **kwargs)

    def progress(self) -> dict[str, Any]:
        parts = self.parts.values()
        return {
            "partitions": len(self.parts),
            "records": sum(st.end for st in parts),
            "of": sum(st.n for st in parts),
            "reads": sum(st.reads for st in parts),
            "loaders": len(self.loaders),
            "error": None if self.error is None else repr(self.error),
        }

    def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Cancel the brokers and wake every waiting take; idempotent."""
        self.stopped = True
        for t in self.tasks:
            t.cancel()
        for st in self.parts.values():
            for f in st.early.values():
                f.cancel()
            st.early.clear()
        self._pulse()

    def _pulse(self) -> None:
        """Wake brokers and takes waiting for a change (events are one-shot)."""
        self._wake.set()
        self._wake = asyncio.Event()
        self._appended.set()
        self._appended = asyncio.Event()

    def _fail(self, e: BaseException) -> None:
        if self.stopped:
            return  # dropped while a read was in flight: nobody is waiting
        self.error = e
        logger.error("aimss: source broker of stream %r failed: %r", self.spec.name, e)
        self._pulse()

    # -- the broker loop -------------------------------------------------------------

    def _target(self, st: _Part) -> int:
        if self.retain:
            return st.n
        return min(st.n, max(st.low + st.window, st.demand))

    async def _fill(self, st: _Part) -> None:
        loop = asyncio.get_running_loop()
        pool = _executor()
        inflight: deque[asyncio.Future[np.ndarray]] = deque()
        try:
            while not self.stopped:
                await self._trim(st)
                target = self._target(st)
                if self._early_busy() and st.end not in st.early:
                    # A take waits for early reads: they get the CPU first.
                    target = min(target, st.end + len(inflight))
                while st.end + len(inflight) < target and len(inflight) < READS_IN_FLIGHT:
                    o = st.end + len(inflight)
                    # A take may have read this slab already: no second read.
                    early = st.early.get(o)
                    if early is None:
                        early = loop.run_in_executor(pool, self._read, st.p, o)
                        st.reads += 1
                    inflight.append(early)
                    st.issued = max(st.issued, o + 1)
                if inflight:
                    data = await inflight[0]
                    inflight.popleft()
                    st.early.pop(st.end, None)
                    # local_append spills when the log is over budget: a thread.
                    await loop.run_in_executor(pool, self._append, st.p, data)
                    st.end += 1
                    st.peak = max(st.peak, st.end - st.start)
                    if st.end == st.n:
                        self._seal(st)
                    self._pulse()
                    continue
                if st.end >= st.n and (self.retain or st.start >= st.n):
                    return  # read, and kept for good or trimmed to the end
                wake = self._wake
                try:
                    await asyncio.wait_for(wake.wait(), TICK)
                except asyncio.TimeoutError:
                    pass
                await self._observe(st)
        except asyncio.CancelledError:
            for f in inflight:
                f.cancel()
            raise
        except Exception as e:
            self._fail(e)

    async def _trim(self, st: _Part) -> None:
        upto = min(st.low, st.end)
        if self.retain or upto <= st.start:
            return
        store = self.plugin.store
        # Counted as trimmed before the trim runs: a loader that asks to
        # retain meanwhile (``control``) is refused, not told every record
        # is kept while the ones below ``upto`` go.
        st.start = upto
        # Trimming unlinks spill files: disk I/O, not on the loop.
        await asyncio.get_running_loop().run_in_executor(
            _executor(), store.trim, self.spec.name, self.spec.epoch, st.p, upto
        )

    async def _observe(self, st: _Part) -> None:
        """Nothing to do: learn of consumer progress, or of a reader stuck at the end."""
        if self.retain:
            return
        blocked = st.end < st.n and st.end >= self._target(st)
        if blocked or st.start < st.end:
            await self._poll()
        if blocked and not self.loaders and st.end >= self._target(st) and _readers_parked(self.plugin):
            # A reader waits and no commit has moved the window: it may be the
            # very reader the window waits for (no group, or a commit not yet
            # due). One more record unblocks it; the parked count is
            # worker-wide, so at worst an unrelated reader costs one record per tick.
            st.demand = max(st.demand, st.end + 1)

    async def _poll(self) -> None:
        """Committed offsets of every group of the stream, from the coordinator."""
        now = time.monotonic()
        if self._polling or now - self._last_poll < self._poll_every:
            return
        self._polling = True
        try:
            reply = await self.plugin.worker.scheduler.aimss_info(name=self.spec.name)
        except Exception as e:  # the scheduler is going away: try again later
            logger.debug("aimss: source %r could not poll offsets: %r", self.spec.name, e)
            reply = None
        finally:
            self._polling = False
            self._last_poll = time.monotonic()
        if not isinstance(reply, dict) or reply.get("status") != "OK":
            if isinstance(reply, dict) and reply.get("type") == "StreamNotFoundError":
                self.stop()  # destroyed; the drop message is on its way
            return
        moved = False
        for group, offsets in reply["info"]["groups"].items():
            if not group.endswith(POSITION_SUFFIX):
                moved |= self._merge(group, list(offsets))
        self._poll_every = POLL_MIN if moved else min(POLL_MAX, self._poll_every * 2)
        self._update_lows()

    def _merge(self, key: str, offsets: list[int]) -> bool:
        old = self.groups.get(key)
        new = offsets if old is None else [max(a, b) for a, b in zip(old, offsets)]
        self.groups[key] = new
        return new != old

    def _update_lows(self) -> None:
        if not self.groups:
            return
        for st in self.parts.values():
            # Monotone: a group that appears late cannot bring back what was
            # trimmed; it finds out from the read's InvalidOffsetError.
            st.low = max(st.low, min(offs[st.p] for offs in self.groups.values()))

    def _seal(self, st: _Part) -> None:
        self.plugin.store.seal(self.spec.name, self.spec.epoch, [st.p])
        st.sealed = True

    # -- threads ---------------------------------------------------------------------

    def _open(self) -> Any:
        with self._array_lock:
            if self._array is None:
                self._array = pickle.loads(self.source["array"])
            return self._array

    def _read(self, p: int, offset: int) -> np.ndarray:
        slab = self.layout.slab_at(p, offset)
        lo, hi = self.layout.slab_bounds(slab)
        try:
            # Zarr reads a missing chunk as its fill value: without these
            # checks an array removed before (or while) it is read would
            # stream zeros. On a file system its metadata file is looked at
            # before and after; in another store (an object store) the
            # array's metadata is read again after (one small request).
            meta = self.source.get("local_root")
            if meta is not None and not os.path.exists(meta):
                raise FileNotFoundError(f"{meta!r} no longer exists")
            with trace.span("source-read", stream=self.spec.name, partition=p, rows=[lo, hi]) as args:
                arr = self._open()
                data = np.ascontiguousarray(arr[lo:hi])
                args["bytes"] = data.nbytes
            if meta is not None and not os.path.exists(meta):
                raise FileNotFoundError(f"{meta!r} was removed while its rows were read")
            if meta is None:
                _still_there(arr)
            return data
        except FileNotFoundError as e:
            raise StoreNotFoundError(
                f"rows {lo}..{hi - 1} of {self.where} could not be read for stream "
                f"{self.spec.name!r}: {e}; was the store removed while it was being loaded?"
            ) from e

    def _append(self, p: int, data: np.ndarray) -> None:
        if not self.stopped:
            self.plugin.local_append(self.spec, p, data, data.nbytes)

    # -- takes -----------------------------------------------------------------------

    def _check(self) -> None:
        if self.error is not None:
            raise self.error if isinstance(self.error, AIMSSError) else AIMSSError(
                f"the broker of stream {self.spec.name!r} failed reading {self.where}: "
                f"{type(self.error).__name__}: {self.error}"
            )
        if self.stopped:
            raise StreamNotFoundError(f"stream {self.spec.name!r} was destroyed")

    async def take(self, takes: list[list[Any]]) -> dict[str, Any]:
        """Rows of records of this worker's partitions, waiting for unread ones."""
        wanted: list[tuple[_Part, int]] = []
        for p, offset, _ in takes:
            st = self.parts.get(p)
            if st is None:
                raise PartitionNotHeldError(
                    f"partition {p!r} of stream {self.spec.name!r} is not held by this worker"
                )
            if not 0 <= offset < st.n:
                raise InvalidOffsetError(
                    f"offset {offset!r} of stream {self.spec.name!r} partition {p} is out "
                    f"of range: the partition holds {st.n} record(s)"
                )
            wanted.append((st, offset))
            # Demand first for every record, so all partitions read at once.
            st.demand = max(st.demand, offset + 1)
        self._start_early(wanted)
        self._pulse()
        ahead: dict[tuple[int, int], np.ndarray] = {}
        for st, offset in wanted:
            early = st.early.get(offset)
            if early is not None and st.end <= offset:
                # asyncio.shield: a cancelled take must not cancel the read
                # the broker will append.
                ahead[(st.p, offset)] = await asyncio.shield(early)
                continue
            while st.end <= offset:
                self._check()
                await self._appended.wait()
        self._check()
        return await asyncio.get_running_loop().run_in_executor(_executor(), self._take, takes, ahead)

    async def backup(self, takes: list[list[Any]]) -> dict[str, Any]:
        """What :meth:`take` answers, for records of any partition, read straight from Zarr.

        A loader's backup of a take that another owner is late with
        (:mod:`aimss_dask.source.hedge`): nothing goes through this
        worker's log, and its brokers are left as they are.
        """
        self._check()
        wanted = sorted({(int(p), int(offset)) for p, offset, _ in takes})
        for p, offset in wanted:
            if not 0 <= p < self.spec.partitions:
                raise PartitionOutOfRangeError(
                    f"partition {p!r} of stream {self.spec.name!r} does not exist: it has "
                    f"{self.spec.partitions} partition(s)"
                )
            if not 0 <= offset < self.layout.records(p):
                raise InvalidOffsetError(
                    f"offset {offset!r} of stream {self.spec.name!r} partition {p} is out "
                    f"of range: the partition holds {self.layout.records(p)} record(s)"
                )
        loop = asyncio.get_running_loop()
        reads = [loop.run_in_executor(_executor(early=True), self._read, p, offset) for p, offset in wanted]
        ahead = dict(zip(wanted, await asyncio.gather(*reads)))
        return await loop.run_in_executor(_executor(), self._take, takes, ahead)

    def _early_busy(self) -> bool:
        return any(not f.done() for st in self.parts.values() for f in st.early.values())

    def _start_early(self, wanted: list[tuple[_Part, int]]) -> None:
        """Read now the records a take wants that the broker has not started on.

        A shuffled loader's first batches want records from all over the
        partition; waiting for the broker's in-order read to reach them
        would cost a cold start of about the whole array's read time.
        """
        loop = asyncio.get_running_loop()
        held = sum(len(st.early) for st in self.parts.values())
        for st, offset in wanted:
            if offset < st.issued or offset in st.early or held >= self.early_cap:
                continue
            st.early[offset] = fut = loop.run_in_executor(_executor(early=True), self._read, st.p, offset)
            fut.add_done_callback(lambda _: self._pulse())  # paused brokers go on
            st.reads += 1
            st.early_reads += 1
            held += 1

    def _take(self, takes: list[list[Any]], ahead: dict[tuple[int, int], np.ndarray]) -> dict[str, Any]:
        """``parts``: a view per row range; scattered rows gathered into one array.

        One reply array for all scattered rows instead of one per record:
        a shuffled batch touches many records for a few rows each, and each
        array on the wire has a fixed cost. ``ahead`` holds records read
        early, not yet in the log.
        """
        store = self.plugin.store
        parts: list[Any] = []
        gathered: list[tuple[np.ndarray, np.ndarray]] = []
        for p, offset, rows in takes:
            # Spilled records are read back from disk here: in a thread.
            record = ahead.get((p, offset))
            if record is None:
                (record,), _, _ = store.read(self.spec.name, self.spec.epoch, p, offset, 1)
            if isinstance(rows, (list, tuple)):
                parts.append(to_serialize(record[rows[0] : rows[1]]))  # a view: no copy here
            else:
                parts.append(None)
                gathered.append((record, np.asarray(rows)))
        reply: dict[str, Any] = {"parts": parts}
        if gathered:
            first = gathered[0][0]
            out = np.empty((sum(len(r) for _, r in gathered), *first.shape[1:]), dtype=first.dtype)
            i = 0
            for record, rows in gathered:
                np.take(record, rows, axis=0, out=out[i : i + len(rows)])
                i += len(rows)
            reply["gathered"] = to_serialize(out)
        return reply

    # -- control and status ----------------------------------------------------------

    def control(self, op: str, key: str | None, mode: str | None, offsets: list[int] | None) -> dict[str, Any]:
        if op == "attach":
            if mode == "retain":
                trimmed = {st.p: st.start for st in self.parts.values() if st.start > 0}
                if trimmed:
                    p, start = sorted(trimmed.items())[0]
                    raise InvalidOffsetError(
                        f"stream {self.spec.name!r}: partition {p} was already trimmed "
                        f"below offset {start} behind a sequential reader, and a shuffled "
                        "or multi-epoch loader needs every record; create the source "
                        "again with aimss_dask.source.from_zarr"
                    )
                self.retain = True
            elif key is not None:
                self.loaders.add(key)
        elif op == "detach":
            if key is not None:
                self.loaders.discard(key)
                if key.startswith(PRIVATE_PREFIX):
                    # A loader without a group: nobody will resume it.
                    self.groups.pop(key, None)
        elif op == "advance":
            if key is None or offsets is None or len(offsets) != self.spec.partitions:
                raise InvalidArgumentError(
                    f"advance of stream {self.spec.name!r} needs a key and "
                    f"{self.spec.partitions} offsets, got {key!r}, {offsets!r}"
                )
            self._merge(key, [int(o) for o in offsets])
            self._update_lows()
        else:
            raise InvalidArgumentError(f"unknown source control op {op!r}")
        self._pulse()
        # A loader learns the layout and the windows from its attach.
        return {"run": self.status()} if op == "attach" else {}

    def status(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "epoch": self.spec.epoch,
            "rows": self.layout.rows,
            "slab_rows": self.layout.slab_rows,
            "partitions": self.layout.partitions,
            "shape": list(self.source["shape"]),
            "dtype": self.source["dtype"],
            "retain": self.retain,
            "loaders": len(self.loaders),
            "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
            "running": sum(not t.done() for t in self.tasks),
            "parts": [
                [
                    st.p,
                    {
                        "records": st.n,
                        "end": st.end,
                        "start": st.start,
                        "low": st.low,
                        "window": st.window,
                        "demand": st.demand,
                        "peak": st.peak,
                        "reads": st.reads,
                        "early": len(st.early),
                        "early_reads": st.early_reads,
                        "sealed": st.sealed,
                    },
                ]
                for st in self.parts.values()
            ],
        }


def _readers_parked(plugin: Any) -> bool:
    """Is a reader waiting for new records on this worker?

    Remote readers parked in ``aimss_read`` are counted by our worker plugin,
    task threads parked in ``LogStore.wait`` by the store (``waiting``). Both
    are read without a lock, used only as a hint (see ``SourceRun._observe``).
    """
    if plugin.remote_readers_waiting:
        return True
    store = plugin.store  # None once the plugin has closed
    return store is not None and store.waiting > 0


# -- how a source run is started on its owners ----------------------------------------


@dataclass(frozen=True)
class SourceFactory:
    """What ``aimss_run_start`` gets for a source (pickled: it imports this module)."""

    spec: dict[str, Any]  # StreamSpec.to_wire()
    source: dict[str, Any]  # the array's description, see zarr_source.from_zarr

    def make_run(self, plugin: Any) -> SourceRun:
        s = StreamSpec.from_wire(self.spec)
        if not plugin.store.has(s.name):
            raise StreamNotFoundError(f"stream {s.name!r} has no log on this worker; it was destroyed")
        parts = [p for p, w in enumerate(s.owners) if w == plugin.worker.address]
        return SourceRun(plugin, s, self.source, parts)


def _still_there(arr: Any) -> None:
    """``FileNotFoundError`` if ``arr``'s metadata is gone from its store (the array was removed)."""
    import zarr

    try:
        zarr.open_array(store=arr.store, path=arr.path, mode="r")
    except FileNotFoundError as e:  # zarr's ArrayNotFoundError is one
        raise FileNotFoundError(f"the array {arr.path or '/'!r} is gone from {arr.store} ({e})") from None
