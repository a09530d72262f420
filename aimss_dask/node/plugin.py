"""``AIMSSWorker``: the worker plugin, the application cache of one worker.

It owns the worker's :class:`LogStore` and :class:`Producer`, and answers the
``aimss_*`` RPCs that the coordinator, producers and remote readers send.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import psutil
from dask.utils import format_bytes
from distributed.comm import get_address_host
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol import (
    Serialize,
    Serialized,
    deserialize,
    pickle,
    to_serialize,
)
from distributed.utils import offload, sync

from aimss_dask.core import metrics, trace
from aimss_dask.core.config import AIMSSConfig
from aimss_dask.core.errors import (
    AIMSSError,
    InvalidArgumentError,
    SpillError,
    WorkerClosingError,
    error_to_wire,
    raise_from_wire,
)
from aimss_dask.core.metrics import Metric
from aimss_dask.core.names import (
    HEARTBEAT_METRIC,
    PLUGIN_NAME,
    SINK_WRITER_KEY,
    TRACE_KEY,
    key_text,
)
from aimss_dask.core.specs import Origin, StreamSpec
from aimss_dask.log.store import LogStore
from aimss_dask.node import heartbeat
from aimss_dask.node.copies import CopyMailbox
from aimss_dask.node.dedup import OriginFilter
from aimss_dask.node.filling import FillerRunner
from aimss_dask.node.follower import Follower
from aimss_dask.node.gpupower import GpuSampler
from aimss_dask.node.idle import IdleRelease, Memory
from aimss_dask.node.iogate import IOGate
from aimss_dask.node.metrics import worker_metrics
from aimss_dask.node.replication import Replicator
from aimss_dask.node.runs import RunFactory, RunManager
from aimss_dask.node.salvager import discard_leftovers, take_over
from aimss_dask.node.writers import WriterSeqs
from aimss_dask.transport import dataplane, speccache
from aimss_dask.transport.dataplane import CHUNK, BufferPool, DataServer, Group
from aimss_dask.transport.producer import Producer
from aimss_dask.transport.rpc import listed_by, replies

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger("aimss_dask")

#: How long one remote read may wait on the owner before it answers "nothing
#: yet"; the reader then asks again. Keeps comms from idling for minutes.
MAX_READ_WAIT = 5.0

#: Free scratch bytes a worker keeps for operators (at most an eighth of the budget).
SCRATCH_IDLE = 256 * 2**20

#: Longest a closing worker waits for its partition moves to finish (s).
MOVE_TIMEOUT = 600.0
#: Seconds between two reports, besides the heartbeats, of a GPU in a dip (a crossing goes at once).
GPU_STATE_EVERY = 0.5


def receive_idle_limit(budget: int, log_bytes: int) -> int:
    """Bytes of free receive buffers a worker keeps for reuse, with ``log_bytes`` in its log.

    Never more than the budget has room for beside the log (the log and the
    idle buffers together stay within it: RSS is the contract), and at most
    half the budget: an operator with a second copy (``replication=2``)
    receives as much again as its pushes, and back-to-back runs should reuse
    all of it rather than fault part of it afresh each time.

    >>> receive_idle_limit(4 * 2**30, 3 * 2**30) == 2**30
    True
    """
    return max(0, min(budget // 2, budget - log_bytes))


class AIMSSWorker(WorkerPlugin):
    """Installed on every worker by :class:`aimss_dask.AIMSS`; not used directly."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, overrides: dict[str, Any], secret: str | None = None) -> None:
        self.overrides = overrides
        # The cluster's data-plane secret (coordinator's); None: no data plane.
        self.secret = secret
        self.worker: Worker | None = None
        self.config: AIMSSConfig | None = None
        self.store: LogStore | None = None
        #: Grants of the coordinated I/O scheduler held here (ungated until setup).
        self.io_gate = IOGate(None)
        self.producer: Producer | None = None
        self.data_server: DataServer | None = None
        self.pool: BufferPool | None = None
        self._changed: asyncio.Event | None = None
        self._waiters = 0
        self.setup_error: str | None = None
        self.budget_warning: str | None = None
        self.scratch: BufferPool | None = None
        self.idle_release: IdleRelease | None = None
        #: Work started by a handler that outlives its answer (held: the loop keeps weak references).
        self._background: set[asyncio.Future[Any]] = set()
        # Partitions read by tasks here: from this worker's log, or remotely.
        # Partition reads from this worker's log / another's; "streamed": shuffle
        # reads that filled their output batch by batch (shuffle._tasks.read);
        # "duplicates": groups of records this owner dropped as a second copy
        # of an input (another attempt's copy was stored first; plan §2.8).
        # Kept here, in status()'s "reads", because the filter forgets a
        # stream at its seal and a run's count must outlive that.
        self.reads = {"local": 0, "remote": 0, "streamed": 0, "duplicates": 0}
        # Drops a second copy of an input before it reaches the log, for the
        # streams opened with inputs (runs whose records carry their origin).
        self.origins = OriginFilter()
        # What writers of replicated streams stored here (they send again
        # what an owner that died did not answer), and the copies of the
        # partitions owned here on other workers.
        self.writers = WriterSeqs()
        self.replicator: Replicator | None = None
        # The copies held here of partitions owned elsewhere.
        self.follower: Follower | None = None
        # Drops are counted from receiver and task threads at once (rare: a lock).
        self._duplicates_lock = threading.Lock()
        # Operators' run objects on this worker, and resources they share.
        self.runs = RunManager()
        # Partition moves under way (a retirement's, a rebalance's).
        self._moves: set[asyncio.Future[Any]] = set()
        # Set while the coordinator moves this (retiring) worker's partitions.
        self._retiring: asyncio.Event | None = None
        # SIGTERM closes the worker gracefully (see _catch_sigterm).
        self._sigterm = False
        # Where copies of straggling speculative tasks here should run.
        self.copies = CopyMailbox()
        # Idle-filling slices the coordinator sends (aimss_dask.fill).
        self.fillers: FillerRunner | None = None
        # NVML samples of this worker's GPUs (off without NVML or a GPU).
        self.gpu_sampler: GpuSampler | None = None
        self._gpu_sent = 0.0
        self._gpu_low_since: float | None = None
        #: The GPU's state as last sampled, for the heartbeats.
        self.gpu_state: dict[str, Any] | None = None
        # This worker started its process's trace (aimss_dask.trace).
        self._tracing = False

    def __getstate__(self) -> dict[str, Any]:
        return {"overrides": self.overrides, "secret": self.secret}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["overrides"], state.get("secret"))  # type: ignore[misc]

    # -- lifecycle -----------------------------------------------------------------

    def setup(self, worker: Worker) -> None:
        # First, so the coordinator can ask how setup went even when it failed.
        worker.handlers["aimss_setup_status"] = self._h_setup_status
        # On the scheduler's ordered stream, so that it comes before the
        # "close" of a retirement; an unknown op there would break the stream.
        worker.stream_handlers["aimss_retiring"] = self._s_retiring
        worker.stream_handlers["aimss_speculate"] = self._s_speculate
        worker.stream_handlers["aimss_sink_handover"] = self._s_sink_handover
        try:
            self._setup(worker)
        except Exception as e:
            # Not raised: a hook must not fail the worker. Calls on this
            # worker then raise NotRegisteredError quoting this error.
            self.setup_error = f"{type(e).__name__}: {e}"
            logger.exception("aimss: worker plugin setup failed on %s", worker.address)

    def _setup(self, worker: Worker) -> None:
        self.worker = worker
        requested = AIMSSConfig.load(**self.overrides)
        limit = worker.memory_manager.memory_limit
        check = requested.check_budget(limit)
        if not check.fits:
            # A worker that joined after registration (which refuses such a
            # budget for the workers it sees) or reads another Dask config:
            # refusing would leave it without a log, so clamp, loudly.
            self.budget_warning = (
                f"{check.explain(worker.address)}; using {format_bytes(check.largest)}"
            )
            logger.warning("aimss: %s", self.budget_warning)
        # Dask's scratch space, not the worker's own folder in it: Dask
        # removes that folder once its process is gone, and with it the
        # spill files a worker taking over from a dead one would read.
        self.config = requested.resolve_for_worker(limit, os.path.dirname(worker.local_directory))
        assert self.config.memory_limit is not None and self.config.spill_directory
        self._changed = asyncio.Event()
        self.store = LogStore(
            budget=self.config.memory_limit,
            spill_root=self.config.spill_directory,
            segment_size=self.config.segment_size,
            on_change=self._on_change,
            owner={"worker": worker.address, "name": str(worker.name)},
        )
        # Now, not at the first spill: a folder that cannot be made fails
        # here, by name, before any record is accepted.
        self.store.prepare_spill_dir()
        # The cluster's secret, and on a TLS cluster the worker's own ssl contexts.
        creds = dataplane.credentials(
            self.config.transport,
            worker.address,
            self.secret,
            worker.connection_args,
            worker.security.get_listen_args("worker"),
        )
        # Whether the scheduler still lists a worker: connects to dead ones fail fast.
        listed = listed_by(worker.scheduler)
        self.replicator = Replicator(
            self.store,
            loop=worker.loop,
            rpc=worker.rpc,
            address=worker.address,
            batch_size=self.config.batch_size,
            credentials=creds,
            writers=self.writers,
            origins=self.origins,
            tell=self._tell_replica_state,
            consumed=self._consumed if self.config.recovery == "offsets" else None,
            rate=self.config.recovery_rate,
            listed=listed,
            liveness_interval=self.config.liveness_interval,
        )
        self.follower = Follower(self.store, self.writers, self.origins, self.replicator.append_lock)
        self.producer = Producer(
            worker.loop,
            worker.rpc,
            batch_size=self.config.batch_size,
            max_in_flight=self.config.max_in_flight,
            linger=self.config.linger,
            credentials=creds,
            address=worker.address,
            local=self.local_append,
            local_wait=self.replicator.wait_all,
            resolve=self._resolve,
            listed=listed,
            liveness_interval=self.config.liveness_interval,
        )
        self.io_gate = IOGate(worker, self.config.io.enabled)
        store = self.store
        # Scratch space for operators (a shuffle's sorted copy of its input):
        # memory this worker has touched already, reused once unreferenced.
        self.scratch = BufferPool(lambda: min(SCRATCH_IDLE, store.budget // 8))
        if creds is not None:
            store = self.store
            # Chunks that hold two full batches: every batch a producer
            # sends fills one after the other (see BufferPool.take_for).
            self.pool = BufferPool(
                lambda: receive_idle_limit(store.budget, store.memory_bytes),
                chunk=max(CHUNK, 2 * self.config.batch_size),
            )
            # Its own interface only, the one its Dask address names.
            host = get_address_host(worker.address)
            # Views into receive buffers are only safe while nothing spills:
            # from half the budget on, records are stored as their own copies.
            self.data_server = DataServer(
                host, self.store_batch, self.pool, own_copies=store.tight, credentials=creds
            )
        # Free buffers outlive the runs that filled them (aimss.keep-idle-buffers).
        self.idle_release = IdleRelease(
            self.config.keep_idle_buffers,
            empty=lambda: self.store is not None and not self.store.closed and self.store.empty,
            pools=self._pools_bytes,
            release=self._release_idle,
            memory=self._memory,
        )
        self.fillers = FillerRunner(worker.state.nthreads)
        self.gpu_sampler = GpuSampler(self.config.power.interval, self.config.power.keep, on_sample=self._gpu_sampled)
        self.gpu_sampler.start()
        for op in _HANDLERS:
            worker.handlers[f"aimss_{op}"] = getattr(self, f"_h_{op}")
        # Progress rides the heartbeats: the coordinator never polls for it.
        worker.metrics[HEARTBEAT_METRIC] = lambda _worker: heartbeat.heartbeat(self)
        # aimss_ metrics on the worker's /metrics (where prometheus_client is installed).
        metrics.expose(self._metrics)
        # A worker that joins while a trace runs is traced too.
        worker.loop.add_callback(self._join_trace)
        self._catch_sigterm(worker)

    def _catch_sigterm(self, worker: Worker) -> None:
        """A nanny's worker process closes gracefully on SIGTERM, handing its partitions over first.

        A batch system ends a job (``scancel``, ``qdel``, dask-jobqueue's
        scale-down, the end of its walltime) with SIGTERM to every process
        in it, and only later SIGKILL (Slurm's ``KillWait``, 30 s by
        default). The nanny closes on it, but its worker process would die at
        once, by default, with the partitions it owns: it closes instead, and
        its teardown moves them away (see :meth:`_finish_moves`). Only in a
        process of its own under a nanny (its main thread runs the loop);
        elsewhere the process's signals are not ours to take.
        """
        if worker.nanny is None:
            return
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._on_sigterm)
            self._sigterm = True
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # not the main thread, or a platform without loop signal handlers

    def _on_sigterm(self) -> None:
        w = self.worker
        if w is None or w.status not in (Status.running, Status.paused):
            return
        logger.info("aimss: SIGTERM: closing this worker gracefully, its partitions handed over first")
        # nanny=False: as before, the nanny decides whether a new worker starts.
        w.loop.add_callback(w.close, reason="signal-15", nanny=False)

    async def _join_trace(self) -> None:
        try:
            assert self.worker is not None
            on = await self.worker.scheduler.get_metadata(keys=[TRACE_KEY], default=None)
            if on and not self._tracing:
                await self._h_trace(folder=on[0], compress=bool(on[1]))
        except Exception as e:  # never fail a worker for its trace
            logger.info("aimss: could not join the trace under way: %r", e)

    def _metrics(self) -> list[Metric]:
        return worker_metrics(self)

    async def teardown(self, worker: Worker) -> None:
        try:
            if self._sigterm:
                self._sigterm = False
                asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
            await self._finish_moves()
            worker.metrics.pop(HEARTBEAT_METRIC, None)
            metrics.withdraw(self._metrics)
            for op in _HANDLERS:
                # Answer late messages (a closing cluster) instead of letting
                # Dask log "no handler" tracebacks.
                worker.handlers[f"aimss_{op}"] = _torn_down
            await self.runs.aclose_all()
            self.io_gate.close()
            if self._tracing:
                self._tracing = False
                trace.stop()
            if self.replicator is not None:
                self.replicator.close()
            if self.data_server is not None:
                self.data_server.close()
            if self.producer is not None:
                self.producer.close()
            if self.store is not None:
                self.store.close()
            if self.idle_release is not None:
                self.idle_release.close()
            if self.fillers is not None:
                self.fillers.close()
            if self.gpu_sampler is not None:
                self.gpu_sampler.close()
            if self.pool is not None:
                self.pool.clear()
            if self.scratch is not None:
                self.scratch.clear()
        except Exception:
            logger.exception("aimss: worker teardown failed")

    async def _finish_moves(self) -> None:
        """A retiring worker hands its partitions over before it goes.

        Dask may close it before the coordinator's moves are done: wait for
        the coordinator to say it is over (``aimss_retired``), then for the
        moves still under way.
        """
        try:
            if self._retiring is not None:
                await asyncio.wait_for(self._retiring.wait(), MOVE_TIMEOUT)
            elif self._closing() and self.store is not None and not self.store.empty:
                # Closed without a retirement (a cluster manager closing the
                # nanny): ask for the moves ourselves.
                reply = await asyncio.wait_for(
                    self.worker.scheduler.aimss_evacuate(worker=self.worker.address), MOVE_TIMEOUT
                )
                logger.info("aimss: handed partitions over before closing: %s", reply)
            if self._moves:
                _, late = await asyncio.wait(set(self._moves), timeout=MOVE_TIMEOUT)
                if late:
                    logger.warning("aimss: closing with %d partition move(s) unfinished", len(late))
        except asyncio.TimeoutError:
            logger.warning("aimss: closing before the coordinator moved this worker's partitions away")
        except Exception as e:  # the scheduler is gone too: nothing to hand over to
            logger.info("aimss: could not hand partitions over before closing: %r", e)

    def _closing(self) -> bool:
        """The worker is closing (not only this plugin being removed)."""
        return self.worker is not None and self.worker.status in (Status.closing, Status.closing_gracefully)

    def _s_retiring(self, **kwargs: Any) -> None:
        """The coordinator moves this worker's partitions away: closing waits for that."""
        if self._retiring is None or self._retiring.is_set():
            self._retiring = asyncio.Event()

    def _s_speculate(self, key: str = "", dest: str = "", **kwargs: Any) -> None:
        """Run a copy of straggling task ``key`` (text) on ``dest``: its call takes this from the mailbox."""
        # Only for a task running here now: a word that arrives after the
        # call ended must not start a copy of a later run of the same key.
        if key and dest and self.worker is not None and any(key_text(k) == key for k in self.worker.active_keys):
            self.copies.put(key, dest)

    def _s_sink_handover(self, run: str = "", dest: str = "", nbytes: int = 0, **kwargs: Any) -> None:
        """Hand ``nbytes`` of sink run ``run``'s queued regions here over to a helper on ``dest``."""
        writer = self.runs.peek_shared(SINK_WRITER_KEY)
        if writer is None or not run or not dest:
            return
        try:
            n = writer.hand_over_to(run, dest, int(nbytes))
        except Exception:  # a stream handler must not raise: the writer goes on alone
            logger.exception("aimss: handing sink run %s over to %s failed", run, dest)
            return
        logger.info("aimss: %d regions of sink run %s handed over to %s", n, run, dest)

    @replies
    async def _h_retired(self) -> None:
        """The coordinator is done moving this worker's partitions away."""
        if self._retiring is not None:
            self._retiring.set()

    @replies
    async def _h_setup_status(self) -> dict[str, Any]:
        """``{"error": None}``, or why setup failed on this worker."""
        return {"error": self.setup_error}

    # -- local fast paths (task threads) ---------------------------------------------

    def local_append(
        self, spec: StreamSpec, partition: int, record: Any, nbytes: int, origin: Origin | None = None
    ) -> None:
        """A producer task on the owner: store without serialising or copying.

        ``origin``: see :meth:`store_batch`; a second copy is dropped here too.
        """
        assert self.store is not None and self.replicator is not None
        self.store.check_room()  # refused before it is stored, not after: a write again is safe
        if self.replicator.tracks(spec.name):
            with self.replicator.append_lock:
                if origin is not None and not self._admit(spec.name, spec.epoch, partition, origin):
                    return
                first = self.store.append(spec.name, spec.epoch, partition, [record], [nbytes])
                o = None if origin is None else (origin.input, origin.attempt, origin.seq)
                self.replicator.shipped(spec.name, partition, first, [record], [nbytes], o)
        else:
            if origin is not None and not self._admit(spec.name, spec.epoch, partition, origin):
                return
            self.store.append(spec.name, spec.epoch, partition, [record], [nbytes])
        self.runs.on_append(spec.name, partition, [record])
        if self.store.over_budget:
            self.store.spill()  # we are in a task thread: blocking is fine

    def store_batch(self, groups: list[Group]) -> dict[str, tuple[str, str]]:
        """Store a batch pushed over the data plane (its receiver thread) or comms.

        A group with an origin (``(input, attempt, seq)``: a run's push task
        wrote it) goes through :class:`OriginFilter` first: a second copy of
        an input is dropped whole and counted in ``reads["duplicates"]``, and
        a second write by the attempt that was kept fails its stream with
        :class:`~aimss_dask.core.errors.DuplicateOriginError`. Groups without one
        are stored as they come.

        Groups of replicated streams (see :data:`~aimss_dask.transport.dataplane.Group`):
        records a writer sends again are dropped (:mod:`aimss_dask.node.writers`);
        a copy from the partition's owner (``at`` given) lands at its owner's
        offsets; and a batch for partitions owned here is answered only once
        every replica holds it (:mod:`aimss_dask.node.replication`).
        """
        errors, waits = self._store_groups(groups)
        return self._confirm_copies(errors, waits)

    def _store_groups(
        self, groups: list[Group]
    ) -> tuple[dict[str, tuple[str, str]], list[tuple[str, int, int, int]]]:
        """Store ``groups`` (see :meth:`store_batch`); errors by stream, and the ends replicas must confirm."""
        assert self.store is not None and self.replicator is not None
        errors: dict[str, tuple[str, str]] = {}
        waits: list[tuple[str, int, int, int, int]] = []
        try:
            self.store.check_room()
        except SpillError as e:  # nothing of the batch stored: its writers may send it again
            wire = error_to_wire(e)
            return {g[0]: (wire["type"], wire["message"]) for g in groups}, waits
        for group in groups:
            name, epoch, partition, records, sizes, origin = group[:6]
            writer = group[6] if len(group) > 6 else None
            at = group[7] if len(group) > 7 else None
            wire = group[8] if len(group) > 8 else None
            # A copy's records may stay serialised: the log decodes them
            # when they are first read (see LogStore.read).
            records = _as_sent(records) if at is None else records
            if name in errors:
                continue
            try:
                if at is not None:
                    assert self.follower is not None
                    self.follower.append(name, epoch, partition, records, sizes, origin, writer, at)
                    continue
                if writer is not None or self.replicator.tracks(name):
                    stored = self._store_replicated(name, epoch, partition, records, sizes, origin, writer, wire)
                    if stored is not None:
                        waits.append((name, epoch, partition, *stored))
                    continue
                # The filter checks the fields (Origin's constructor): they
                # came over the network, and index its arrays.
                if origin is not None and not self._admit(name, epoch, partition, Origin(*origin)):
                    continue
                # The span's sizes are summed only while tracing.
                with (trace.span("append", stream=name, partition=partition, records=len(records),
                                 bytes=sum(sizes)) if trace.on() else nullcontext()):
                    self.store.append(name, epoch, partition, records, sizes)
                self.runs.on_append(name, partition, records)
            except AIMSSError as e:
                wire = error_to_wire(e)
                errors[name] = (wire["type"], wire["message"])
        # Back-pressure: the producer waits for this answer, so spilling
        # before answering is what keeps its bytes in flight bounded.
        while self.store.over_budget and self.store.spill():
            pass
        return errors, waits

    def _confirm_copies(
        self, errors: dict[str, tuple[str, str]], waits: list[tuple[str, int, int, int, int]]
    ) -> dict[str, tuple[str, str]]:
        """Wait until the replicas hold what :meth:`_store_groups` stored; ``errors`` with those that did not."""
        assert self.replicator is not None
        for name, epoch, partition, end, mark in waits:
            if name in errors:
                continue
            if not self.replicator.wait(name, epoch, partition, end) or (
                mark and not self.replicator.wait_marker(name, partition, mark)
            ):
                errors[name] = (
                    "AIMSSError",
                    f"the replicas of stream {name!r} partition {partition} did not confirm "
                    f"records up to offset {end} in time",
                )
        return errors

    def _store_replicated(
        self,
        name: str,
        epoch: int,
        partition: int,
        records: list[Any],
        sizes: list[int],
        origin: tuple[int, int, int] | None,
        writer: tuple[int, int] | None,
        wire: list[Any] | None = None,
    ) -> tuple[int, int] | None:
        """Append a group to a replicated partition owned here and queue it for the replicas.

        ``wire``: the records' ``Serialized`` forms as they arrived, sent to
        the replicas as they are (None: encoded again for them).

        Returns what the writer's answer must wait for: the end offset the
        replicas must hold, and a marker they must have (0: none; see
        :meth:`~aimss_dask.node.replication.Replicator.shipped`). None: a
        second copy of an input from a write without a writer tag (nothing
        to wait for).
        """
        assert self.store is not None and self.replicator is not None
        with self.replicator.append_lock:
            self.store.held(name, epoch, partition)  # a stale epoch raises before any state changes
            if writer is not None:
                since = self.store.since(name, epoch)
                skip = self.writers.admit(name, since, partition, (int(writer[0]), int(writer[1])), len(records))
                if skip:
                    with self._duplicates_lock:
                        self.reads["duplicates"] += 1
                    records, sizes = records[skip:], sizes[skip:]
                    wire = wire[skip:] if wire is not None else None
                    writer = (writer[0], writer[1] + skip)
                if not records:
                    # Stored already (a writer's second send, after an answer
                    # that did not reach it): answered once the copies hold it too.
                    return self.store.held(name, epoch, partition), 0
            if origin is not None and not self._admit(name, epoch, partition, Origin(*origin)):
                if writer is None:
                    return None
                # The writer's numbers moved on here, for records this log
                # holds from another attempt: the copies learn it too, or
                # the one that takes over would refuse the writer's next
                # numbers as a gap.
                end = self.store.held(name, epoch, partition)
                mark = self.replicator.shipped(name, partition, end, [], [], None, (writer[0], writer[1] + len(records)))
                return end, mark
            first = self.store.append(name, epoch, partition, records, sizes)
            self.replicator.shipped(name, partition, first, records, sizes, origin, writer, wire)
        self.runs.on_append(name, partition, records)
        return first + len(records), 0

    def _admit(self, name: str, epoch: int, partition: int, origin: Origin) -> bool:
        """Whether to append a group with ``origin`` (False: a duplicate, counted)."""
        if self.origins.admit(name, epoch, partition, origin):
            return True
        with self._duplicates_lock:
            self.reads["duplicates"] += 1
        return False

    async def _tell_replica_state(self, msg: dict[str, Any]) -> Any:
        """The replicator's word to the coordinator on a copy (which may take over)."""
        assert self.worker is not None
        return await self.worker.scheduler.aimss_replica_state(**msg)

    def _from_thread(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """The coordinator's reply to ``aimss_<op>``, asked from a thread of this worker (not its loop)."""
        assert self.worker is not None
        worker = self.worker

        async def ask() -> Any:
            return await getattr(worker.scheduler, f"aimss_{op}")(**kwargs)

        return sync(worker.loop, ask)

    def _consumed(self, name: str, p: int) -> int:
        """The lowest offset a consumer group committed in partition ``p`` of ``name`` (a replicator thread asks)."""
        return int(raise_from_wire(self._from_thread("consumed", name=name, partition=p), "aimss_consumed")["offset"])

    def _resolve(self, name: str) -> dict[str, Any]:
        """The coordinator's reply about stream ``name`` now (a sender thread of the producer asks)."""
        return self._from_thread("get", name=name)

    # -- change notification for remote readers waiting on the loop ---------------------

    @property
    def remote_readers_waiting(self) -> int:
        """Remote reads parked here until records arrive (a hint, read without a lock)."""
        return self._waiters

    def _on_change(self, name: str, partition: int) -> None:
        if self._waiters and self.worker is not None:
            self.worker.loop.add_callback(self._bump)

    def _bump(self) -> None:
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    # -- handlers ------------------------------------------------------------------

    @replies
    async def _h_open(
        self,
        spec: dict[str, Any],
        partitions: list[int],
        inputs: int = 0,
        starts: list[list[int]] | None = None,
    ) -> None:
        """Open partitions of a stream here; ``inputs`` > 0: its records carry origins.

        Then a second copy of an input is dropped here (``inputs`` presizes
        the filter: input ids ``0 .. inputs - 1``). Tracked before the logs
        open, so no group can be appended unfiltered in between. Repeated
        opens (more partitions) keep the filter's state. ``starts``:
        ``[[p, first offset], ...]`` of partitions moved here whose head was
        trimmed where they were.
        """
        assert self.store is not None
        s = StreamSpec.from_wire(spec)
        # ``since``: an open of a recovered stream (a partition moved here)
        # may come before this worker heard of the recovery; what it holds
        # of the stream's older epochs is the same stream, and stays.
        if inputs:
            self.origins.track(s.name, s.epoch, inputs, since=s.first_epoch)
        # Created now (not moved here, nor a late repeat for partitions held
        # already): every writer of these starts at 0 (see WriterSeqs.begin).
        # No append can come between the look and the open (none before it).
        created = (
            [p for p in partitions if self.store.partition_stats(s.name, p) is None]
            if s.replicas and starts is None and s.epoch == s.first_epoch
            else []
        )
        self.store.open(s.name, s.epoch, partitions, {int(p): int(o) for p, o in starts or ()}, since=s.first_epoch)
        if created and self.replicator is not None:
            with self.replicator.append_lock:  # the writers' table is the appends'
                for p in created:
                    self.writers.begin(s.name, s.epoch, p)
        if s.replicas and self.replicator is not None and self.worker is not None:
            # The coordinator opened the replicas before it returns the
            # stream to anyone: they start in sync, empty like this log.
            if any(s.owners[p] == self.worker.address for p in partitions):
                self.replicator.configure(s, fresh=True)

    @replies
    async def _h_append(self, items: list[list[Any]]) -> dict[str, Any]:
        """Store batches pushed over Dask's comms (TLS and other transports)."""
        # Storing may spill to disk before it returns: not on the loop.
        errors, waits = await offload(self._store_groups, items)
        if waits:
            # Waiting for the replicas must not hold Dask's one offload
            # thread: the copies this worker holds for other owners arrive
            # through it, and owners waiting on each other in a ring would
            # deadlock.
            errors = await asyncio.get_running_loop().run_in_executor(None, self._confirm_copies, errors, waits)
        return {"errors": errors}

    @replies
    async def _h_data_address(self) -> dict[str, Any]:
        if self.data_server is None:
            return {"host": None, "port": None}
        host, port = self.data_server.address
        return {"host": host, "port": port}

    @replies
    async def _h_read(
        self,
        name: str,
        epoch: int,
        partition: int,
        start: int,
        max_bytes: int | None = None,
        wait: float | None = 0,
    ) -> dict[str, Any]:
        assert self.store is not None and self._changed is not None
        wait = MAX_READ_WAIT if wait is None else min(wait, MAX_READ_WAIT)
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            ev = self._changed
            # Counted before the look: an append on another thread right
            # after it must see a waiter and wake this read (see _bump).
            self._waiters += 1
            try:
                lo, end, sealed = self.store.bounds(name, epoch, partition)
                if end > start or sealed or start < lo:
                    break
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return {"records": [], "sealed": False, "end": end, "next": start}
                try:
                    await asyncio.wait_for(ev.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
            finally:
                self._waiters -= 1
        max_bytes = max_bytes or (self.config.read_batch_size if self.config else None)
        # Spilled segments mean disk reads: keep them off the event loop.
        records, sealed, end = await offload(
            self.store.read, name, epoch, partition, start, max_bytes
        )
        return {
            "records": [to_serialize(r) for r in records],
            "sealed": sealed and start + len(records) >= end,
            "end": end,
            "next": start + len(records),
        }

    @replies
    async def _h_recover(
        self,
        spec: dict[str, Any],
        since: int,
        partitions: list[int] | None = None,
        inputs: int = 0,
        recreated: list[int] | None = None,
    ) -> dict[str, Any]:
        """Stream ``spec`` continues, recovered, under a newer epoch (see :mod:`aimss_dask.coordinator.recovery`).

        Logs and filter state held here of an epoch from ``since`` on are
        kept and answer to the new epoch too; ``partitions``: lost ones
        re-created here, empty. ``recreated``: every partition re-created
        (told to all): a copy of one held here is emptied (see
        :meth:`~aimss_dask.node.follower.Follower.reset`). Every process
        forgets the spec it cached and caches no older epoch from then on
        (``speccache.supersede``). Returns whether this worker holds the stream.
        """
        assert self.store is not None
        s = StreamSpec.from_wire(spec)
        speccache.supersede(s.name, s.epoch)
        if not partitions and not self.store.has(s.name):
            return {"held": False}
        if inputs:
            self.origins.track(s.name, s.epoch, inputs, since=since)
        with trace.span("recover", stream=s.name, epoch=s.epoch, recreated=sorted(partitions or [])):
            # Told to everyone first, then to each new owner for its own.
            gone = partitions or recreated or []
            if gone and self.follower is not None:
                # Copies of the lost logs held here go first (the new owner's
                # too): the partitions start empty, filters too, and are
                # written again; a copy stays one, empty, and catches up.
                assert self.worker is not None
                copies = [p for p in gone if self.worker.address in s.replicas_of(p)]
                self.follower.reset(s.name, s.epoch, since, gone, keep=copies)
            self.store.open(s.name, s.epoch, partitions or [], since=since)
        if self.replicator is not None and (s.replicas or self.replicator.tracks(s.name)):
            # A replica here may own its partition now (its owner died), and
            # partitions owned here may have new replicas to catch up.
            self.replicator.configure(s)
        return {"held": True}

    @replies
    async def _h_held_inputs(self, name: str, epoch: int, partitions: list[int], inputs: int) -> dict[str, Any]:
        """Which inputs each of ``partitions`` of ``name`` holds here: ``[[p, bitmap], ...]``, or ``None`` (unknown).

        Asked for a push run again after a recovery: it skips the
        partitions that hold its records already on every copy (see
        :meth:`aimss_dask.node.dedup.OriginFilter.held`).
        """
        held = self.origins.held(name, epoch, partitions, inputs)
        return {"held": None if held is None else [[p, b] for p, b in held.items()]}

    @replies
    async def _h_replica_start(self, name: str, epoch: int, partition: int, start: int) -> None:
        """The empty copy here of a partition whose owner trimmed its head starts where the owner's log does."""
        assert self.store is not None
        self.store.rebase(name, epoch, partition, start)

    @replies
    async def _h_replica_writers(
        self, name: str, epoch: int, partition: int, table: list[tuple[int, int]], whole: bool = False
    ) -> None:
        """What the owner's writer filter knew when this copy caught up (its copies carried no writer tags)."""
        assert self.follower is not None
        self.follower.learn_writers(name, epoch, partition, dict(table), bool(whole))

    @replies
    async def _h_replica_origins(self, name: str, epoch: int, partition: int, origins: list[list[int]]) -> None:
        """What the owner's origin filter knew when this copy caught up (its copies carried no origins)."""
        assert self.follower is not None
        disagree = self.follower.learn_origins(name, epoch, partition, [tuple(o) for o in origins])
        if disagree:
            logger.warning(
                "aimss: the copy of %r partition %d here disagrees with its owner on %d origin(s)",
                name, partition, disagree,
            )

    @replies
    async def _h_truncate(self, name: str, epoch: int, partition: int, end: int) -> dict[str, Any]:
        """The copy here holds records the new owner lacks (no reader saw them): forget them, and what the filters knew of them."""
        assert self.follower is not None
        return {"dropped": await offload(self.follower.truncate, name, epoch, partition, end)}

    @replies
    async def _h_seal_producers(self, name: str, epoch: int, since: int | None = None) -> dict[str, Any]:
        assert self.producer is not None
        await self.producer.seal(name, epoch)
        # Writes that failed before the seal are data the sealer believes
        # stored: report them so seal() raises instead of losing them quietly.
        return {"failure": self.producer.failure(name, epoch, since)}

    @replies
    async def _h_seal_partitions(self, name: str, epoch: int, partitions: list[int] | None = None) -> dict[str, Any]:
        """Seal the partitions of ``name`` held here (only ``partitions``, if given); their ``[[p, start, end], ...]``.

        The coordinator keeps those ends: they are what it names as lost if
        this worker dies.
        """
        assert self.store is not None
        parts = self.store.stream_stats(name)
        if partitions is not None:
            parts = {p: st for p, st in parts.items() if p in partitions}
        if parts:
            with trace.span("seal", stream=name, partitions=sorted(parts),
                            records=sum(st["records"] for st in parts.values())):
                self.store.seal(name, epoch, list(parts))
        if self.replicator is not None:
            self.replicator.forget(name, list(parts))
        # No push after a seal (the store refuses it), and moves carry no
        # origin: the filter's state is of no more use (plan §2.8).
        self.origins.forget(name, epoch)
        return {"bounds": [[p, st["start"], st["records"]] for p, st in sorted(parts.items())]}

    @replies
    async def _h_drop(self, name: str, epoch: int, partitions: list[int] | None = None) -> None:
        """Free stream ``name`` at ``epoch`` here; only ``partitions`` of it, if given (a failed move's)."""
        assert self.store is not None and self.producer is not None
        if partitions is not None:
            store = self.store
            # Removing spill files is disk I/O: not on the loop.
            await offload(lambda: [store.drop_partition(name, epoch, p) for p in partitions])
            return
        speccache.forget(name, destroyed=epoch)
        # First: a late open of this stream (a retry, an execution Dask gave
        # up on) must not bring back logs that nothing would drop again.
        self.store.tombstone(name, epoch)
        # Only this epoch's state or older: a late drop leaves a new stream's.
        self.origins.forget(name, epoch)
        if self.replicator is not None:
            self.replicator.forget(name, epoch=epoch)
            with self.replicator.append_lock:  # appends on other threads add to the table
                self.writers.forget(name, epoch)
        # Runs first (a source's brokers), so none appends while it is dropped.
        await self.runs.astop(name, epoch)
        self.producer.forget(name, epoch)
        # Removing spill files is disk I/O: not on the loop.
        await offload(self._drop, name, epoch)
        # Remote readers waiting on the stream must find out now, not at
        # their next poll.
        self._bump()
        if self.store.empty and self.idle_release is not None:
            # The last stream is gone: its free buffers wait a while for the
            # next run, unless the worker's memory is wanted meanwhile.
            self.idle_release.emptied()

    def _pools_bytes(self) -> tuple[int, int]:
        """Bytes of the receive and scratch pools together: all their buffers, and those free."""
        stats = [p.statistics() for p in (self.pool, self.scratch) if p is not None]
        return sum(st["pool_bytes"] for st in stats), sum(st["pool_free_bytes"] for st in stats)

    def _release_idle(self) -> None:
        """Give free receive and scratch buffers back to the OS."""
        for pool in (self.pool, self.scratch):
            if pool is not None:
                pool.release_idle()

    def _memory(self) -> Memory:
        """This worker's memory against Dask's target for it, and the node's."""
        assert self.worker is not None
        mm = self.worker.memory_manager
        fraction = mm.memory_target_fraction or mm.memory_spill_fraction
        limit = mm.memory_limit
        vm = psutil.virtual_memory()
        return Memory(
            process=self.worker.monitor.get_process_memory(),
            target=int(limit * fraction) if limit and fraction else None,
            available=vm.available,
            total=vm.total,
        )

    # -- runs: operators' worker-side objects (node/runs.py) -------------------------

    @replies
    async def _h_run_start(self, factory: bytes) -> dict[str, Any]:
        """Build a run from its pickled factory (which imports its operator) and hold it."""
        made = pickle.loads(factory)
        if not isinstance(made, RunFactory):
            raise InvalidArgumentError(
                f"aimss_run_start got a {type(made).__name__}, which has no make_run(host)"
            )
        new = made.make_run(self)
        run = await self.runs.start_async(new)
        # A repeated start (same epoch) keeps the run that is there, running.
        started = await run.start() if run is new else None
        return {"name": run.name, "epoch": run.epoch, "started": started}

    @replies
    async def _h_run_call(
        self,
        name: str,
        operation: str,
        epoch: int | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``operation`` of the run of stream ``name`` held here.

        Not ``op``: Dask's messages name their handler with that key.
        """
        return await self.runs.require(name, epoch).call(operation, **(kwargs or {}))

    @replies
    async def _h_run_stop(self, name: str, epoch: int | None = None) -> dict[str, Any]:
        # Closing may wait for writes under way (a sink's): not on the loop;
        # a source's brokers are asyncio tasks: on it (Run.close).
        return {"stopped": await self.runs.astop(name, epoch)}

    def _drop(self, name: str, epoch: int) -> None:
        assert self.store is not None
        stats = self.store.stream_stats(name)
        if stats:
            try:
                self.store.bounds(name, epoch, next(iter(stats)))
            except AIMSSError:
                return  # a newer stream of the same name: not ours to drop
        self.store.drop(name)

    @replies
    async def _h_move(self, spec: dict[str, Any], partitions: list[int], drop: bool = True) -> dict[str, Any]:
        """Send these sealed partitions to their new owners in ``spec``, then drop them.

        Each from its first kept offset: the new owner opened it there.
        Returns the records sent and ``ends``, ``[[p, end offset], ...]``, of
        the partitions sent (one already gone, read and released meanwhile,
        is not listed). ``drop=False``: keep serving them here until the
        coordinator has switched their readers (and drops them with
        ``aimss_drop``). A worker that is closing finishes its moves first
        (see :meth:`teardown`).
        """
        assert self.store is not None and self.producer is not None
        new = StreamSpec.from_wire(spec)
        task = asyncio.ensure_future(self._move(new, partitions, drop))
        self._moves.add(task)
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._moves.discard(task)
            else:
                task.add_done_callback(self._moves.discard)

    async def _move(self, spec: StreamSpec, partitions: list[int], drop: bool) -> dict[str, Any]:
        assert self.store is not None and self.producer is not None
        # Sending waits for the new owners' answers (back-pressure): not on
        # Dask's one offload thread, which their answers to this worker's
        # peers may need (two workers retiring at once over TLS).
        moved, ends = await asyncio.get_running_loop().run_in_executor(None, self._send_partitions, spec, partitions)
        for p, _ in ends if drop else ():
            self.store.drop_partition(spec.name, spec.epoch, p)
        return {"records": moved, "ends": ends}

    def _send_partitions(self, spec: StreamSpec, partitions: list[int]) -> tuple[int, list[list[int]]]:
        assert self.store is not None and self.producer is not None
        moved = 0
        ends: list[list[int]] = []
        for p in partitions:
            try:
                offset = self.store.bounds(spec.name, spec.epoch, p)[0]
            except AIMSSError:
                continue  # read and released since the coordinator looked
            while True:
                records, _, _ = self.store.read(spec.name, spec.epoch, p, offset, 64 * 2**20)
                if not records:
                    break
                for r in records:
                    self.producer.write(spec, p, r, moving=True)
                offset += len(records)
                moved += len(records)
            ends.append([p, offset])
        # Flushed by the thread that wrote: its writes' errors are raised to it alone.
        self.producer.flush_blocking([spec.name], epoch=spec.epoch)
        return moved, ends

    @replies
    async def _h_trim(self, name: str, epoch: int, partitions: list[int]) -> None:
        """Drop every record of these partitions (nobody will read them)."""
        assert self.store is not None
        store = self.store
        await offload(lambda: [store.trim(name, epoch, p) for p in partitions])

    @replies
    async def _h_salvage(self, dead: str, streams: list[dict[str, Any]], last: bool = True) -> dict[str, Any]:
        """Rebuild lost partitions from the spill files ``dead`` left on this node (see :mod:`aimss_dask.node.salvager`).

        ``last``: nothing more is asked of those files; what is left of them
        is removed after the answer (deleting is disk work no reader needs
        to wait for).
        """
        assert self.store is not None
        # Not on Dask's one offload thread: reads of the partitions rebuilt in
        # an earlier round (a reader waits on them) go there meanwhile.
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(None, take_over, self.store, dead, streams)
        if last:
            task = loop.run_in_executor(None, discard_leftovers, self.store, dead)
            self._background.add(task)
            task.add_done_callback(self._background_done)
        return reply

    def _background_done(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("aimss: background work failed: %r", task.exception())

    @replies
    async def _h_owner_lost(self, address: str, epoch: int) -> None:
        assert self.producer is not None
        self.producer.owner_lost(address, epoch)

    @replies
    async def _h_trace(self, folder: str | None = None, compress: bool = True) -> dict[str, Any]:
        """Start tracing this worker's process into ``folder``, or stop (None); the trace file's path."""
        if folder is not None:
            if self._tracing:
                return {"file": None}  # on already for this worker
            # Set before the first await: the broadcast's start and a late
            # answer to _join_trace at setup may both arrive; only one starts.
            self._tracing = True
            try:
                path = await offload(trace.start, folder, compress=compress)
            except BaseException:
                self._tracing = False
                raise
            return {"file": path}
        if not self._tracing:
            return {"file": None}
        self._tracing = False
        return {"file": await offload(trace.stop)}

    @replies
    async def _h_fill_slice(self, key: str, payload: bytes, budget_s: float, gpu: bool) -> dict[str, Any]:
        """One slice of an idle filler, on this worker's filler threads (:mod:`aimss_dask.node.filling`)."""
        assert self.fillers is not None
        return await self.fillers.run(key, payload, budget_s, gpu)

    @replies
    async def _h_power_samples(self, since: float = 0.0) -> dict[str, Any]:
        """This worker's GPU samples since ``since`` (wall clock), and the sampler's state."""
        if self.gpu_sampler is None:
            return {"state": "off: AIMSS is not set up on this worker", "columns": {}, "power_samples": {}}
        return self.gpu_sampler.timeline(since)

    def _gpu_sampled(self, rows: list[tuple[Any, ...]]) -> None:
        """On the sampling thread: what idle filling needs of this worker's GPU.

        Its first GPU's free memory, utilisation and power, and how long it
        has been below the fill threshold. It rides the heartbeats (whose
        pace Dask scales with the cluster); a crossing of the threshold is
        told to the coordinator at once, so that a dip is filled without
        waiting for the next heartbeat.
        """
        if not rows or self.worker is None:
            return
        t, _gpu, power_w, _e, util, _used, free, _clock = rows[0]
        low = util is not None and util < self.config.fill.util_threshold
        if self.fillers is not None and self.fillers.gpu_running and self._gpu_low_since is not None:
            # The filler's own kernels keep the GPU busy: the dip they fill goes on.
            low = True
        crossed = low != (self._gpu_low_since is not None)
        if low and self._gpu_low_since is None:
            self._gpu_low_since = t
        elif not low:
            self._gpu_low_since = None
        dip_s = 0.0 if self._gpu_low_since is None else t - self._gpu_low_since
        state = {
            "worker": self.worker.address, "free": free, "util": util, "power_w": power_w, "low": low,
            "dip_s": dip_s, "t": t,
        }
        self.gpu_state = state
        if crossed or (low and t - self._gpu_sent >= GPU_STATE_EVERY):
            self._gpu_sent = t
            self.worker.loop.add_callback(self._send_gpu_state, state)

    async def _send_gpu_state(self, state: dict[str, Any]) -> None:
        try:
            assert self.worker is not None
            await self.worker.scheduler.aimss_gpu_state(**state)
        except Exception as e:  # a missed update is made good by the next one
            logger.debug("aimss: GPU state not sent: %r", e)

    @replies
    async def _h_stream_stats(self, name: str) -> dict[str, Any]:
        assert self.store is not None
        return {"partitions": sorted(self.store.stream_stats(name).items())}

    @replies
    async def _h_worker_status(self) -> dict[str, Any]:
        assert self.store is not None and self.producer is not None
        st = self.store.stats()
        st["producer_in_flight"] = self.producer.budget.statistics().used
        st["reads"] = dict(self.reads)
        if self.pool is not None:
            st.update(self.pool.statistics())
        st["spill_directory"] = self.store.spill_dir
        if self.budget_warning is not None:
            st["budget_warning"] = self.budget_warning
        if self.replicator is not None:
            st.update(self.replicator.stats)
        st["runs"] = self.runs.progress()
        st.update(self.runs.shared_statistics())
        st.update(self.io_gate.statistics())
        return {"status": st}


def _as_sent(records: list[Any]) -> list[Any]:
    """Records as their writer wrote them.

    A comm that does not serialise (in-process clusters' ``inproc://``)
    hands the wrapped, serialised records over as they are: stored like
    that, readers would get the wrappers instead of their records.
    """
    # A group comes from one producer's batch: wrapped all alike, or not at all.
    if not records or (type(records[0]) is not Serialized and type(records[0]) is not Serialize):
        return records
    return [
        deserialize(r.header, r.frames) if type(r) is Serialized else r.data if type(r) is Serialize else r
        for r in records
    ]


async def _torn_down(**kwargs: Any) -> dict[str, Any]:
    return error_to_wire(WorkerClosingError("this worker is closing: its AIMSS plugin was torn down"))


_HANDLERS = (
    "setup_status",
    "salvage",
    "open",
    "recover",
    "held_inputs",
    "replica_start",
    "replica_writers",
    "replica_origins",
    "truncate",
    "data_address",
    "append",
    "read",
    "seal_producers",
    "seal_partitions",
    "owner_lost",
    "trim",
    "move",
    "retired",
    "drop",
    "stream_stats",
    "worker_status",
    "trace",
    "run_start",
    "run_call",
    "run_stop",
    "fill_slice",
    "power_samples",
)
