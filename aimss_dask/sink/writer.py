"""Write-behind: a worker's background writer of Zarr regions.

A sink task hands an assembled region (a whole number of Zarr shards or
chunks) to :class:`WriteBehind` and returns at once; a writer thread
compresses and stores it while the worker's task thread computes the next
block. Bytes waiting to be written are bounded (``max_bytes``): past it the
task waits, which is the sink's back-pressure. ``flush(sink)`` waits for
every region of one sink run and reports what was written and what failed,
so the run's last task can fail loudly instead of losing data quietly.

Pure threads: tasks call ``submit`` from their own thread. On a worker the
queue is one of its shared resources (``plugin.runs.shared``), and each
to_zarr run that writes there is a :class:`WriteRun` (its ``flush`` waits
on a thread of the loop's default executor).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed.comm import get_address_host

from aimss_dask.core import trace
from aimss_dask.core.names import SINK_WRITER_KEY
from aimss_dask.node.iogate import IOGate
from aimss_dask.node.runs import Run
from aimss_dask.sink.durable import sync_units
from aimss_dask.sink.handover import Shipper
from aimss_dask.sink.ioresource import io_resource
from aimss_dask.sink.units import UnitWriter, unit_writer

logger = logging.getLogger("aimss_dask")

#: Longest burst of one run's regions while another run's wait (seconds).
BURST = 0.25

#: Flushed runs whose last progress a writer keeps until the run stops here.
FLUSHED_KEPT = 64


@dataclass(frozen=True)
class ZarrTarget:
    """Where a sink run writes: enough to open the array on any worker.

    ``run`` identifies one run (one ``to_zarr`` call), so two runs into the
    same array never mix their bookkeeping.
    """

    store: Any
    path: str
    zarr_format: int
    run: str
    storage_options: dict[str, Any] | None = None
    #: Each writer fsyncs the units it wrote before its run's flush answers
    #: (:mod:`aimss_dask.sink.durable`).
    durable: bool = False
    #: Writers on several hosts write units in place (a shared parallel file
    #: system): each syncs what it wrote itself, as the last task's fsync
    #: reaches only its own host's cache.
    shared: bool = False
    #: The run's ``io_priority`` (coordinated I/O).
    io_priority: int = 0

    def describe(self) -> str:
        """Where, for people (status views): the store as text, and the path."""
        store = self.store if isinstance(self.store, str) else type(self.store).__name__
        return f"{store}:{self.path}" if self.path else str(store)

    def open(self) -> Any:
        import zarr

        kwargs = {"storage_options": self.storage_options} if self.storage_options else {}
        return zarr.open_array(
            self.store, path=self.path, mode="r+", zarr_format=self.zarr_format, **kwargs
        )


@dataclass
class _Run:
    pending: set[Future[int]] = field(default_factory=set)
    written: list[int] = field(default_factory=list)
    nbytes: int = 0
    errors: list[str] = field(default_factory=list)
    put: Any = None
    active: int = 0  # write_now calls under way
    array: Any = None  # the open array, for durable runs
    resource: str | None = None  # the file system it writes to, as the I/O scheduler names it
    regions: list[tuple[slice, ...]] = field(default_factory=list)  # written, for durable runs
    queued_size: int = 0  # bytes the queued regions will write (what is left here)
    busy: float = 0.0  # seconds spent writing (the rate the coordinator judges)
    handing: int = 0  # regions handed over to a helper and not yet written there
    handed: int = 0  # regions a helper wrote
    taken_back: int = 0  # regions handed over, then written here (the helper failed)


#: A queued region's portable form, for a hand-over to another worker:
#: ``() -> (region, data, after)``, ``after`` (or None) called once the
#: region is stored elsewhere (a push run frees the unit's records).
Portable = Callable[[], tuple[tuple[slice, ...], Any, Callable[[], None] | None]]


#: Stores one region on a helper: ``(target, region, data) -> bytes written``.
Ship = Callable[["ZarrTarget", tuple[slice, ...], Any], int]


@dataclass(eq=False)
class _Job:
    seq: int
    target: ZarrTarget
    run: _Run
    job: Callable[[UnitWriter], int]
    fut: Future[int]
    size: int
    portable: Portable | None = None


class WriteBehind:
    """Background writer of one worker; one thread, a byte-bounded queue.

    One thread is enough: Zarr's codecs and file writes release the GIL, and
    the worker's task thread is the other consumer of this core.

    Writes go in bursts of one run: while a run has regions queued, the
    thread goes on with it for up to ``burst`` seconds, then takes the run
    whose oldest region waited longest. Each run's own regions keep their
    order. Two applications' sinks on one worker then alternate in bursts,
    not region by region, so the writer asks the I/O scheduler for a grant
    about once per burst instead of once per region.

    Examples
    --------
    >>> wb = WriteBehind(max_bytes=2**28)                  # doctest: +SKIP
    >>> wb.submit(target, (slice(0, 1024), slice(None)), block, rid=0)  # doctest: +SKIP
    >>> wb.flush(target.run)                                # doctest: +SKIP
    {'written': [0], 'bytes': 8388608, 'errors': []}
    """

    def __init__(
        self,
        max_bytes: int,
        gate: IOGate | None = None,
        host: str = "",
        burst: float = BURST,
        shipper: Callable[[str], Ship] | None = None,
    ) -> None:
        self.max_bytes = max(1, int(max_bytes))
        # dest -> how regions are written on that worker (hand-overs).
        self._shipper = shipper
        # Each unit write holds a grant of the coordinated I/O scheduler.
        self.gate = gate or IOGate(None)
        self.host = host
        self.burst = burst
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="aimss-sink")
        # Regions waiting, per run; the pool runs one _next per region
        # queued, which picks what to write.
        self._queues: dict[str, deque[_Job]] = {}
        self._seq = itertools.count()
        self._current: str | None = None
        self._burst_since = 0.0
        self._cond = threading.Condition()
        self._queued = 0
        self._runs: dict[str, _Run] = {}
        self._aborted: dict[str, None] = {}  # runs whose writes are refused, oldest first
        self._flushed: dict[str, dict[str, Any]] = {}  # run -> its progress when flushed, until it stops
        self.peak_queued = 0
        self.handed_total = 0
        self.taken_back_total = 0

    def submit(
        self, target: ZarrTarget, region: tuple[slice, ...], data: np.ndarray, rid: int
    ) -> None:
        """Queue ``array[region] = data``, a whole number of units (region ``rid`` of the run).

        Waits while the queue is full: the caller is a task thread, and
        waiting is the back-pressure that keeps the queue in its bound.
        """
        def job(put: Any) -> int:
            return put(region, data)

        self.submit_job(target, rid, int(data.nbytes), job, portable=lambda: (region, data, None))

    def submit_job(
        self,
        target: ZarrTarget,
        rid: int,
        nbytes: int,
        job: Callable[[UnitWriter], int],
        *,
        portable: Portable | None = None,
        size: int | None = None,
    ) -> None:
        """Queue ``job(put) -> bytes written`` as region ``rid``; ``nbytes`` it holds meanwhile.

        ``put(region, data) -> bytes`` stores a region made of whole units.

        A job whose data is still counted elsewhere (in the log) passes
        ``nbytes=0`` and never waits; ``size`` is then what it will write
        (default ``nbytes``), the work left that the coordinator judges.
        ``portable``: the job as ``(region, data, after)``, which a helper
        on another worker can write instead (:meth:`hand_over`); None: only
        this worker can write it.
        """
        n = int(nbytes)
        size = n if size is None else int(size)
        with self._cond:
            if target.run in self._aborted:
                return
            # A region larger than the whole bound still goes through alone.
            while n and self._queued and self._queued + n > self.max_bytes:
                self._cond.wait()
            if target.run in self._aborted:
                return
            self._queued += n
            self.peak_queued = max(self.peak_queued, self._queued)
            run = self._runs.setdefault(target.run, _Run())
            fut: Future[int] = Future()
            run.pending.add(fut)
            run.queued_size += size
            entry = _Job(next(self._seq), target, run, job, fut, size, portable)
            self._queues.setdefault(target.run, deque()).append(entry)
        fut.add_done_callback(lambda f: self._done(run, f, n, rid))
        self._pool.submit(self._next)

    def _next(self) -> None:
        """Write one queued region: of the current burst's run, else of the run that waited longest."""
        while True:
            with self._cond:
                now = time.monotonic()
                q = self._queues.get(self._current) if self._current is not None else None
                if not q or now - self._burst_since >= self.burst:
                    heads = [(dq[0].seq, name) for name, dq in self._queues.items() if dq]
                    if not heads:
                        return  # written already (an earlier _next took more than one, or an abort dropped them)
                    name = min(heads)[1]
                    if name != self._current:
                        self._current, self._burst_since = name, now
                    elif now - self._burst_since >= self.burst:
                        self._burst_since = now
                    q = self._queues[name]
                entry = q.popleft()
                entry.run.queued_size -= entry.size
                if not q:
                    del self._queues[entry.target.run]
            if not entry.fut.set_running_or_notify_cancel():
                continue  # dropped by abort(): take the next
            self._run_job(entry)
            return

    def _run_job(self, entry: _Job) -> None:
        """Write a region taken off the queue (running) here; its future gets the outcome."""
        try:
            entry.fut.set_result(self._write(entry.target, entry.run, entry.job))
        except BaseException as e:  # noqa: BLE001 -- the region's error, reported by flush
            entry.fut.set_exception(e)

    def write_now(self, target: ZarrTarget, rid: int, job: Callable[[UnitWriter], int]) -> int:
        """Run ``job(put) -> bytes written`` on the calling thread, as region ``rid`` of the run.

        For blocks already in memory (a persisted input) there is no
        computation to overlap the writes with, and handing each one to the
        writer thread cost ~6% of the write (a future and GIL hand-offs per
        chunk). Errors propagate to the caller (the task fails with them).
        ``flush`` reports these regions with the queued ones.
        """
        with self._cond:
            if target.run in self._aborted:
                return 0
            run = self._runs.setdefault(target.run, _Run())
            run.active += 1
        t0 = time.monotonic()
        try:
            put = _run_put(target, run, self.host)
            with self.gate.writing(target.run, run.resource):
                n = int(job(put) or 0)
        finally:
            with self._cond:
                run.busy += time.monotonic() - t0
                run.active -= 1
                if not run.active:
                    self._cond.notify_all()  # an abort may wait for it
        with self._cond:
            run.written.append(rid)
            run.nbytes += n
        return n

    def prepare(self, target: ZarrTarget, regions: list[tuple[slice, ...]]) -> None:
        """Queue the creation of the directories that ``regions``' files go in.

        Queued before a run's first unit is complete, it runs while the
        writer would otherwise wait, instead of one ``mkdir`` before each
        unit's write. Best effort: a failure here is left to the write
        itself, which makes any directory still missing and reports errors.
        """
        with self._cond:
            run = self._runs.setdefault(target.run, _Run())

        def job() -> None:
            try:
                _run_put(target, run, self.host).prepare(regions)
            except Exception:
                logger.debug("aimss: making the directories of %s ahead failed", target.run, exc_info=True)

        self._pool.submit(job)

    def _write(self, target: ZarrTarget, run: _Run, job: Callable[[UnitWriter], int]) -> int:
        if target.run in self._aborted:
            return 0
        # ``busy`` counts the wait for an I/O grant too: a writer held back
        # on a congested node is late for its run, and a helper on another
        # node is what helps it.
        t0 = time.monotonic()
        try:
            put = _run_put(target, run, self.host)
            with self.gate.writing(target.run, run.resource):
                with trace.span("sink-write", run=target.run, store=target.describe()) as args:
                    args["bytes"] = n = job(put)
        finally:
            with self._cond:
                run.busy += time.monotonic() - t0
        return n

    def hand_over_to(self, run_id: str, dest: str, nbytes: int) -> int:
        """:meth:`hand_over` to worker ``dest``, through the shipper this writer was made with (0 without one)."""
        if self._shipper is None:
            return 0
        return self.hand_over(run_id, nbytes, self._shipper(dest))

    def hand_over(self, run_id: str, nbytes: int, ship: Ship) -> int:
        """Have ``ship`` write up to ``nbytes`` of ``run_id``'s queued regions elsewhere; how many regions.

        The regions queued last (the ones this writer would reach last) that
        can be written elsewhere leave the queue at once: this writer never
        writes them, so each region is still written once. A thread of
        their own ships them one by one, while this writer goes on from the
        head of the queue; ``ship(target, region, data) -> bytes`` stores
        one on a helper. A region the helper fails to store is written here
        after all, so a hand-over never loses one (nor reports it twice:
        its future ends once). ``flush`` waits for handed regions too.
        """
        taken: list[_Job] = []
        with self._cond:
            q = self._queues.get(run_id)
            if not q or run_id in self._aborted:
                return 0
            left = int(nbytes)
            keep: list[_Job] = []
            while q and left > 0:
                entry = q.pop()
                if entry.portable is None:
                    keep.append(entry)
                    continue
                if not entry.fut.set_running_or_notify_cancel():
                    continue  # dropped by abort()
                entry.run.queued_size -= entry.size
                entry.run.handing += 1
                left -= entry.size
                taken.append(entry)
            q.extend(reversed(keep))
            if not q:
                del self._queues[run_id]
        if taken:
            threading.Thread(
                target=self._ship_all, args=(taken, ship), name="aimss-sink-handover", daemon=True
            ).start()
        return len(taken)

    def _ship_all(self, taken: list[_Job], ship: Ship) -> None:
        failed = False
        for entry in taken:
            n = None
            after = None
            if not failed and entry.target.run not in self._aborted:
                try:
                    region, data, after = entry.portable()  # type: ignore[misc]
                    n = int(ship(entry.target, region, data))
                    del data
                except Exception:
                    # Written here instead; the helper is not asked again
                    # for this hand-over (it, or the way to it, is broken).
                    logger.warning(
                        "aimss: a helper failed to write a region of %s; writing it here", entry.target.run,
                        exc_info=True,
                    )
                    failed = True
            # Counted before the region's future ends: a flush it completes
            # keeps the run's last progress, which must include it.
            with self._cond:
                entry.run.handing -= 1
                if n is None:
                    entry.run.taken_back += 1
                    self.taken_back_total += 1
                else:
                    entry.run.handed += 1
                    self.handed_total += 1
            if n is None:
                self._run_job(entry)
                continue
            if after is not None:
                try:
                    after()
                except Exception:  # stored already: only its memory stays until the run ends
                    logger.warning("aimss: freeing a region of %s after its hand-over failed",
                                   entry.target.run, exc_info=True)
            entry.fut.set_result(n)
        close = getattr(ship, "close", None)
        if close is not None:
            close()

    def _done(self, run: _Run, fut: Future[int], n: int, rid: int) -> None:
        with self._cond:
            self._queued -= n
            run.pending.discard(fut)
            if fut.cancelled():  # dropped by abort()
                pass
            elif (exc := fut.exception()) is None:
                run.written.append(rid)
                run.nbytes += int(fut.result() or 0)
            else:
                run.errors.append(f"{type(exc).__name__}: {exc}")
            # Waiters: submitters waiting for room (only freed bytes help them)
            # and flush (only the run's last write). Waking them for every
            # chunk cost a GIL hand-off per chunk on the writer thread.
            if n or not run.pending:
                self._cond.notify_all()

    def flush(self, run_id: str, timeout: float | None = None, durable: bool = False) -> dict[str, Any]:
        """Wait for every queued region of ``run_id``; report and forget the run.

        ``durable``: then fsync the unit files written here (and their
        folders) before answering; ``synced`` says how many.
        """
        with self._cond:
            ok = self._cond.wait_for(lambda: not self._runs.get(run_id, _Run()).pending, timeout)
            run = self._runs.pop(run_id, _Run())
            # What it did stays visible until the run stops here: its rate is
            # what a slower writer of the run is judged against.
            self._flushed[run_id] = self._progress(run)
            while len(self._flushed) > FLUSHED_KEPT:
                del self._flushed[next(iter(self._flushed))]
        errors = list(run.errors)
        if not ok:
            errors.append(f"writes still pending after {timeout} s")
        synced = 0
        if durable and run.array is not None and not errors:
            try:
                synced = sync_units(run.array, run.regions)
            except OSError as e:
                errors.append(f"fsync failed: {e}")
        return {"written": run.written, "bytes": run.nbytes, "errors": errors, "synced": synced}

    def abort(self, run_id: str, timeout: float | None = None) -> int:
        """Drop ``run_id``'s queued writes, wait for the one being written, refuse any later one.

        For a run that failed: once this returns, nothing more of it is
        written here (queued, or by a task writing now), so what it left on
        disk can be removed. Returns how many queued writes were dropped.
        """
        with self._cond:
            self._flushed.pop(run_id, None)
            self._aborted[run_id] = None
            while len(self._aborted) > 1000:  # a bound on what failed runs leave here
                del self._aborted[next(iter(self._aborted))]
            run = self._runs.pop(run_id, None)
            pending = list(run.pending) if run is not None else []
        dropped = sum(f.cancel() for f in pending)
        wait(pending, timeout)
        if run is not None:
            with self._cond:
                self._cond.wait_for(lambda: not run.active, timeout)
        return dropped

    def run_progress(self, run_id: str) -> dict[str, Any]:
        """Regions of ``run_id`` queued and written so far, and their bytes.

        Also what the coordinator judges this writer by: ``left`` (bytes the
        queued regions will write), ``busy`` (seconds spent writing), and its
        hand-overs: regions ``handing`` (on a helper now), ``handed``
        (written there) and ``taken_back`` (written here after a helper failed).
        """
        with self._cond:
            run = self._runs.get(run_id)
            if run is None:
                return dict(self._flushed.get(run_id) or {"queued": 0, "written": 0, "bytes": 0})
            return self._progress(run)

    @staticmethod
    def _progress(run: _Run) -> dict[str, Any]:
        return {
            "queued": len(run.pending), "written": len(run.written), "bytes": run.nbytes,
            "left": run.queued_size, "busy": round(run.busy, 3), "handing": run.handing,
            "handed": run.handed, "taken_back": run.taken_back,
        }

    def statistics(self) -> dict[str, int]:
        """Bytes queued now and at most; regions handed over to helpers and stored there, and
        those written here after all (their helper failed), since this writer started."""
        with self._cond:
            return {
                "queued_bytes": self._queued, "peak_queued_bytes": self.peak_queued,
                "handed_regions": self.handed_total, "taken_back_regions": self.taken_back_total,
            }

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


def _run_put(target: ZarrTarget, run: _Run, host: str) -> UnitWriter:
    """The run's writer of whole units, opened on first use (on the writer thread).

    One handle per run and worker: the shape of a to_zarr target is fixed
    for the run, so a cached handle cannot go stale. ``host``: where this
    writes from, for the name of the file system it writes to.
    """
    if run.put is None:
        array = target.open()
        run.resource = io_resource(array, host)
        put = unit_writer(array)
        if target.durable:
            run.array = array
            put = _Recording(put, run.regions)
        run.put = put
    return run.put


class _Recording:
    """A unit writer that notes the regions it stored (a durable run syncs them at flush)."""

    def __init__(self, put: UnitWriter, regions: list[tuple[slice, ...]]) -> None:
        self._put = put
        self._regions = regions

    def __call__(self, region: tuple[slice, ...], data: Any) -> int:
        n = self._put(region, data)
        self._regions.append(region)  # list.append: safe from the writer and task threads
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._put, name)


# -- on a worker: the shared queue, and one run per to_zarr run -----------------------

#: Key of the worker's write-behind queue among its shared resources; its
#: statistics show in ``aimss_dask.status()`` as ``sink_*``.
SHARED_KEY = SINK_WRITER_KEY


def write_behind(plugin: Any) -> WriteBehind:
    """The worker's write-behind queue, made on first use.

    Regions waiting for the disk are memory outside the log: a quarter of
    the budget, so log + queue stay near the budget.
    """
    store = plugin.store
    host = get_address_host(plugin.worker.address) if plugin.worker is not None else ""
    return plugin.runs.shared(
        SHARED_KEY,
        lambda: WriteBehind(
            max(64 * 2**20, store.budget // 4), plugin.io_gate, host, shipper=lambda dest: Shipper(plugin, dest)
        ),
    )


class WriteRun(Run):
    """What one to_zarr run writes on one worker; held as :meth:`key` of the run's id.

    Operation ``flush`` waits for the run's queued regions and reports them
    (then forgets them); stopping the run drops what is still queued and
    refuses later writes, as :meth:`WriteBehind.abort` does.
    """

    #: Closing waits for the run's write under way, which may wait for an I/O grant on the loop.
    blocking_close = True

    def __init__(self, run_id: str, writer: WriteBehind) -> None:
        super().__init__(self.key(run_id), 0)
        self.run_id = run_id
        self.writer = writer

    @staticmethod
    def key(run_id: str) -> str:
        """Its name among the worker's runs: apart from the run's stream (a push
        run's stream bears the run's id, and has a run of its own)."""
        return f"{run_id}/writes"

    async def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        if op == "flush":
            # Not offload(): its one thread is the process's, and Dask
            # (de)serialises large messages there; a flush waits for the
            # whole queue (and its fsyncs), so they would wait as long.
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                None, self.writer.flush, self.run_id, None, bool(kwargs.get("durable"))
            )
        return await super().call(op, **kwargs)

    def progress(self) -> dict[str, Any]:
        return self.writer.run_progress(self.run_id)

    def close(self) -> None:
        self.writer.abort(self.run_id)


def writer_for(plugin: Any, target: ZarrTarget) -> WriteBehind:
    """The worker's queue, with ``target``'s run registered as a :class:`WriteRun` (any thread)."""
    writer = write_behind(plugin)
    plugin.runs.start(WriteRun(target.run, writer))  # the run already there, after the first
    return writer
