"""``AIMSS``: the scheduler plugin that is the coordinator.

It holds the stream metadata (:class:`CoordinatorState`) and the registry of
runs (:class:`RunRegistry`), installs the worker plugin on every current and
future worker, answers the ``aimss_*`` RPCs of clients and tasks (stream
handlers in :mod:`~aimss_dask.coordinator.streams`, run handlers in
:mod:`~aimss_dask.coordinator.runs`, client seals in
:mod:`~aimss_dask.coordinator.sealing`), pins partition tasks to their owners in
``update_graph`` (:mod:`~aimss_dask.coordinator.pinning`), and cleans up after
clients and workers that leave.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import dask
from dask.utils import format_bytes
from distributed.comm import get_address_host
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from distributed.utils import offload
from tornado.ioloop import PeriodicCallback

from aimss_dask.coordinator import dashboard
from aimss_dask.coordinator.cluster import ClusterOps, as_application
from aimss_dask.coordinator.demand import ReadDemand
from aimss_dask.coordinator.filling import FillHandlers
from aimss_dask.coordinator.io import IOHandlers
from aimss_dask.coordinator.metrics import coordinator_metrics
from aimss_dask.coordinator.overview import heartbeats
from aimss_dask.coordinator.panels import Throughput
from aimss_dask.coordinator.pinning import Pinner
from aimss_dask.coordinator.recovery import Recoveries
from aimss_dask.coordinator.registry import RunRegistry
from aimss_dask.coordinator.replicas import Promotions
from aimss_dask.coordinator.retire import Evacuations
from aimss_dask.coordinator.runs import RunHandlers
from aimss_dask.coordinator.salvage import Salvages
from aimss_dask.coordinator.sealing import (
    SEAL_CLIENT_TIMEOUT,
    ClientSeals,
    SealProducersEvent,
)
from aimss_dask.coordinator.state import CoordinatorState
from aimss_dask.coordinator.stragglers import Stragglers, mark_annotated
from aimss_dask.coordinator.streams import StreamHandlers
from aimss_dask.core import metrics, threads, trace
from aimss_dask.core.config import AIMSSConfig, dask_memory_thresholds
from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.core.metrics import Metric
from aimss_dask.core.names import (
    PLUGIN_NAME,
    REGISTERED_KEY,
    SECRET_KEY,
    TRACE_KEY,
)
from aimss_dask.core.runs import OnLoss, RunState
from aimss_dask.transport import dataplane, secure
from aimss_dask.transport.rpc import replies

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["AIMSS", "SEAL_CLIENT_TIMEOUT", "SealProducersEvent"]

logger = logging.getLogger("aimss_dask")

#: How often the coordinator takes the workers' reported offsets (ms); about
#: Dask's heartbeat interval on a small cluster.
BOUNDS_INTERVAL_MS = 500

#: How often the dashboard's throughput history takes a point (ms).
THROUGHPUT_INTERVAL_MS = 1000

#: How long ``status()`` waits for a worker's answer by default (s); a
#: listed worker that has not answered by then is reported silent.
STATUS_WAIT = 10.0


class AIMSS(SchedulerPlugin):
    """Turn a Dask cluster's workers into an in-memory stream store.

    Parameters
    ----------
    memory_limit
        Byte budget of each worker's log (int or ``"4GiB"``); default: the
        ``aimss.memory-fraction`` of the worker's memory limit.
    spill_directory
        Node-local folder for spilled segments; default: the worker's local
        directory.
    replication
        Default copies of each partition of a user's stream, a shuffle, a
        join or a rechunk (its owner's included; runs cap it at the running
        workers); ``create_stream(replication=...)`` and
        ``shuffle(..., replication=...)`` override it.
    **options
        Any other key of the ``aimss:`` config block, with ``_`` for ``-``.

    Examples
    --------
    >>> from distributed import Client, LocalCluster
    >>> import aimss_dask
    >>> client = Client(LocalCluster(n_workers=2))           # doctest: +SKIP
    >>> client.register_plugin(aimss_dask.AIMSS(memory_limit="2GiB"))  # doctest: +SKIP
    """

    name = PLUGIN_NAME
    # A second registration keeps the first (and its streams) intact.
    idempotent = True

    def __init__(
        self,
        memory_limit: int | str | None = None,
        spill_directory: str | None = None,
        replication: int | None = None,
        **options: Any,
    ) -> None:
        self.overrides: dict[str, Any] = {
            "memory_limit": memory_limit,
            "spill_directory": spill_directory,
            "replication": replication,
            **options,
        }
        # Validate on the client, where a typo is easiest to see; each worker
        # resolves the config again against its own Dask config.
        self.config = AIMSSConfig.load(**self.overrides)
        self.scheduler: Scheduler | None = None
        self._bounds_pc: PeriodicCallback | None = None
        self._throughput_pc: PeriodicCallback | None = None
        #: Bytes per second pushed and received, for the dashboard.
        self.throughput = Throughput()
        # The dashboard pages' own Bokeh application, where the dashboard lacked them.
        self._dashboard: Any = None
        self.state = CoordinatorState()
        # Every operator run: its spec, policies, state and progress.
        self.runs = RunRegistry()
        self.pinner: Pinner | None = None
        self.ops = ClusterOps()
        self.seals = ClientSeals(self.ops)
        self.stream_ops = StreamHandlers(self, self.ops)
        self.run_ops = RunHandlers(self, self.ops)
        self.evacuations = Evacuations(self, self.ops)
        self.recoveries = Recoveries(self, self.ops)
        self.promotions = Promotions(self, self.ops)
        self.salvages = Salvages(self, self.ops)
        #: Partitions readers asked for lately: recovered first.
        self.demand = ReadDemand()
        self.stragglers = Stragglers(self.state, self.config.speculation, tell=self.ops.tell)
        self._stragglers_pc: PeriodicCallback | None = None
        io = self.config.io
        self.io = IOHandlers(
            io.max_concurrent_writes_per_node, io.turn, io.lease, io.enabled, self._io_app, share=io.share
        )
        # Sync phases and the idle-filling queue (aimss_dask.sync_phase, aimss_dask.fill).
        self.fill = FillHandlers(
            self.ops, self.config.fill, ramp_limit=self.config.power.max_ramp_w_per_s,
            auto_phases=self.config.power.auto_phases, floor_w=self.config.power.target_floor,
        )
        # A task that waits in a sync phase is not a straggler for that wait.
        self.stragglers.synced = self.fill.synced
        # The scheduler's process is traced (aimss_dask.trace) on this plugin's word.
        self._tracing = False
        # The cluster's data-plane secret, made (or found) at start.
        self.secret: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"overrides": self.overrides}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["overrides"])  # type: ignore[misc]

    def _handlers(self) -> dict[str, Any]:
        """RPC op -> handler: ``_h_<op>`` of this plugin and of its handler objects."""
        out: dict[str, Any] = {}
        for owner in (self, self.stream_ops, self.run_ops, self.seals, self.evacuations, self.io, self.fill):
            for attr in dir(type(owner)):
                if attr.startswith("_h_"):
                    out[attr[3:]] = getattr(owner, attr)
        return out

    async def start(self, scheduler: Scheduler) -> None:
        from aimss_dask.node.plugin import AIMSSWorker

        # Before anything is installed: a refused registration leaves the
        # cluster as it was (Dask adds the plugin only if start succeeds).
        self._check_budget_fits(scheduler)
        self.scheduler = self.ops.scheduler = scheduler
        if threads.frames_deadlock_risk() and dask.config.get("distributed.worker.profile.enabled", True):
            logger.warning(
                "aimss: Python %s can hang a Dask worker for good: its profiler's sys._current_frames "
                "deadlocks against a thread that starts or ends (CPython gh-106883, fixed in 3.11.9). "
                "AIMSS reuses its threads, which makes it rare, not impossible; use Python 3.11.9 or "
                "later, or set distributed.worker.profile.enabled: false",
                platform.python_version(),
            )
        self.pinner = Pinner(
            scheduler, self.state.streams, self.run_ops.spec_of_run, lambda: [r.spec for r in self.runs.unfinished()]
        )
        self.stream_ops.start()
        handlers = self._handlers()
        for op, handler in handlers.items():
            scheduler.handlers[f"aimss_{op}"] = handler
        if self.config.trace is not None:
            # aimss.trace: traced from the start; the workers read the folder
            # from the scheduler's metadata at their setup.
            await self._trace_here(self.config.trace, True)
        # Workers and clients prove they hold it before a data connection
        # carries anything (transport/secure.py).
        self.secret = scheduler.get_metadata(keys=[SECRET_KEY], default=None) or secure.new_secret()
        scheduler.set_metadata(keys=[SECRET_KEY], value=self.secret)
        await scheduler.register_worker_plugin(
            None, dumps(AIMSSWorker(self.overrides, self.secret)), name=PLUGIN_NAME, idempotent=True
        )
        failed = await self._setup_failures(scheduler)
        if failed:
            # Undo, so that a corrected registration starts from a clean slate.
            await scheduler.unregister_worker_plugin(None, PLUGIN_NAME)
            for op in handlers:
                scheduler.handlers.pop(f"aimss_{op}", None)
            addr, why = sorted(failed.items())[0]
            raise InvalidArgumentError(
                f"AIMSS could not start on {len(failed)} of {len(scheduler.workers)} "
                f"worker(s); on {addr}: {why}. Nothing was registered: fix the "
                "setting (a spill_directory every worker can create folders in) "
                "and register again"
            )
        # How a client asks whether AIMSS is here without calling a handler
        # that may not exist (Dask logs a traceback for an unknown handler).
        scheduler.set_metadata(keys=[REGISTERED_KEY], value=True)
        # A dead worker's last heartbeat is gone with it by the time
        # remove_worker runs: keep the offsets each one reported, so that a
        # loss names the offsets it took.
        self._bounds_pc = PeriodicCallback(self._note_bounds, BOUNDS_INTERVAL_MS)
        self._bounds_pc.start()
        self._throughput_pc = PeriodicCallback(self._sample_throughput, THROUGHPUT_INTERVAL_MS)
        self._throughput_pc.start()
        self.stragglers.scheduler = scheduler
        self._stragglers_pc = PeriodicCallback(self.stragglers.check, self.config.speculation.interval * 1000)
        self._stragglers_pc.start()
        self.fill.start()
        # aimss_ metrics on the scheduler's /metrics (where prometheus_client is installed).
        metrics.expose(self._metrics)
        self._dashboard = dashboard.attach(scheduler)

    def _io_app(self, run: str) -> tuple[str, int]:
        """The application and I/O priority of run ``run``, for the I/O scheduler."""
        rec = self.runs.find(run)
        if rec is None:
            return run, 0
        return as_application(rec.client) or run, rec.spec.io_priority

    def _sample_throughput(self) -> None:
        """One point of the dashboard's throughput history, from the workers' latest heartbeats."""
        try:
            assert self.scheduler is not None
            self.throughput.sample(heartbeats(self.scheduler), time.time())
        except Exception:
            logger.exception("aimss: sampling throughput failed")

    def _note_bounds(self) -> None:
        """Take the partition offsets of every worker's latest heartbeat into the state."""
        try:
            assert self.scheduler is not None
            for beat in heartbeats(self.scheduler).values():
                if not isinstance(beat, dict):
                    continue
                for name, entry in beat.get("streams", {}).items():
                    if len(entry) >= 5:
                        self.state.note_bounds(name, entry[3], entry[4])
        except Exception:
            logger.exception("aimss: noting heartbeat offsets failed")

    @staticmethod
    async def _setup_failures(scheduler: Scheduler) -> dict[str, str]:
        """Workers whose worker plugin setup failed, with why."""
        replies = await scheduler.broadcast(msg={"op": "aimss_setup_status"}, on_error="return")
        return {
            addr: r["error"]
            for addr, r in replies.items()
            if isinstance(r, dict) and r.get("error")
        }

    def _check_budget_fits(self, scheduler: Scheduler) -> None:
        """Refuse a log budget that a current worker cannot hold.

        Raises :class:`InvalidArgumentError` naming the worker, both sizes
        and the largest budget that fits every worker. Workers that join
        later clamp instead (see :class:`AIMSSWorker`).
        """
        cfg = AIMSSConfig.load(**self.overrides)
        thresholds = dask_memory_thresholds()
        misfits = []
        for ws in scheduler.workers.values():
            if not ws.memory_limit:
                continue  # no Dask limit: the worker checks against its own machine
            check = cfg.check_budget(ws.memory_limit, thresholds)
            if not check.fits:
                misfits.append((check.largest, ws.address, check))
        if not misfits:
            return
        largest, address, check = min(misfits, key=lambda m: (m[0], m[1]))
        given = (
            f"memory_limit={self.overrides['memory_limit']!r}"
            if cfg.memory_limit is not None
            else f"memory-fraction={cfg.memory_fraction:g} of each worker's limit"
        )
        raise InvalidArgumentError(
            f"AIMSS({given}) refused: {check.explain(address)}"
            + (f" (and {len(misfits) - 1} more worker(s) like it)" if len(misfits) > 1 else "")
            + f". Give memory_limit={format_bytes(largest).replace(' ', '')!r} or less "
            "(a budget every worker holds), or leave memory_limit unset to use "
            "memory-fraction of each worker's limit; past its budget the log "
            "spills to disk"
        )

    def _metrics(self) -> list[Metric]:
        return coordinator_metrics(self)

    async def close(self) -> None:
        metrics.withdraw(self._metrics)
        if self.scheduler is not None:
            dashboard.detach(self.scheduler, self._dashboard)
        self._dashboard = None
        if self._tracing:
            self._tracing = False
            trace.stop()
        if self._bounds_pc is not None:
            self._bounds_pc.stop()
        if self._throughput_pc is not None:
            self._throughput_pc.stop()
        if self._stragglers_pc is not None:
            self._stragglers_pc.stop()
        self.fill.stop()
        self.stragglers.clear()
        self.ops.cancel_background()
        self.state.clear()
        self.runs.clear()
        self.recoveries.clear()
        self.promotions.clear()
        if self.pinner is not None:
            self.pinner.clear()
        if self.scheduler is not None:
            for op in self._handlers():
                self.scheduler.handlers.pop(f"aimss_{op}", None)
            self.scheduler.task_metadata.pop(REGISTERED_KEY, None)
            self.scheduler.task_metadata.pop(TRACE_KEY, None)

    def restart(self, scheduler: Scheduler) -> None:
        # Workers restart with empty logs: metadata of their streams is void.
        try:
            self.state.clear()
            self.runs.clear()
            self.recoveries.clear()
            self.promotions.clear()
            self.salvages.clear()
            self.demand.clear()
            self.stragglers.clear()
            if self.pinner is not None:
                self.pinner.clear()
        except Exception:
            logger.exception("aimss: restart hook failed")

    def log_event(self, topic: str, msg: Any) -> None:
        """A worker Dask is retiring (``closing_gracefully``): move its partitions away now; one running: copy to it; one closing: noted.

        Dask logs every worker status change as an event under the
        worker's address; retirement (``retire_workers``, adaptive
        scale-down, a dask-jobqueue worker's lifetime) starts with this one,
        and a worker that starts (or restarts) reaches ``running`` with one.
        """
        try:
            if not (isinstance(msg, dict) and msg.get("action") == "worker-status-change" and isinstance(topic, str)):
                return
            status = msg.get("status")
            if status == Status.closing_gracefully.name:
                self.evacuations.begin(topic)
            elif status == Status.closing.name:
                # It closes its own store (and spill folder): nothing to take over when it goes.
                self.salvages.closing(topic)
            elif status == Status.running.name and self.scheduler is not None and self.scheduler.status == Status.running:
                # A worker joined (or a nanny's came back): partitions left
                # short of copies by an earlier loss get them back, and
                # spill files a worker that died on its host left behind
                # give back what they hold.
                self.promotions.fill()
                self.salvages.on_worker_running(topic)
        except Exception:
            logger.exception("aimss: log_event hook failed")

    def valid_workers_downscaling(self, scheduler: Scheduler, workers: list[Any]) -> list[Any]:
        """Scale down only workers whose partitions can move: none that owns a partition being written."""
        try:
            return self.evacuations.keep(workers)
        except Exception:
            logger.exception("aimss: valid_workers_downscaling hook failed")
            return workers

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> Any:
        try:
            self.fill.worker_left(worker)
        except Exception:
            logger.exception("aimss: remove_worker hook failed (idle filling)")
        if worker in self.evacuations.pending or worker in self.evacuations.moved:
            # Retiring: its partitions are on their way to other workers
            # (the worker finishes sending them as it closes). What did not
            # arrive is lost, named, once the moves are over.
            return self._remove_after_moves(scheduler, worker, kwargs)
        self._worker_gone(scheduler, worker, kwargs)
        return None

    async def _remove_after_moves(self, scheduler: Scheduler, worker: str, kwargs: dict[str, Any]) -> None:
        try:
            await self.evacuations.wait(worker)
        except Exception:  # its losses must be named all the same
            logger.exception("aimss: waiting for the moves off %s failed", worker)
        finally:
            self._worker_gone(scheduler, worker, kwargs)

    def _worker_gone(self, scheduler: Scheduler, worker: str, kwargs: dict[str, Any]) -> None:
        """``worker`` left: name what it took, restart the runs that need it, free its readers."""
        try:
            # Replicas take over what it owned (and new copies are placed)
            # before anything is named lost: only partitions with no copy left are.
            kept = self.promotions.on_worker_lost(worker) if scheduler.status == Status.running else {}
            lost = self.state.worker_lost(worker, keep=kept)
            lost_parts = {
                n: {p for p, w in enumerate(self.state.streams[n].owners) if w == worker and p not in kept.get(n, ())}
                for n in lost
            }
            if lost:
                logger.warning(
                    "aimss: worker %s left; partitions of %s are lost", worker, lost
                )
            # Producers everywhere stop queueing records for it at once, and
            # give up requests on their way to it (Dask's comms would retry
            # the dead address for their connect timeout). Not for expected
            # departures (closing, retiring): their peers may be closing too,
            # and producers find out on their next connect. Nor when it held
            # no partition: no producer writes to it. When copies took over
            # all it owned, only producers that write over Dask's comms need
            # the word: the data plane fails over at once on its own, and
            # telling its producers too made replicated runs that lose a
            # worker markedly slower (why is not known yet).
            over_comms = not dataplane.carries(self.config.transport, worker)
            if scheduler.status == Status.running and not kwargs.get("expected") and (lost or (kept and over_comms)):
                # Only streams made so far lost partitions there: a worker that
                # comes back at the same address serves later streams.
                self.ops.spawn(self.ops.broadcast(
                    {"op": "aimss_owner_lost", "address": worker, "epoch": self.state.last_epoch}
                ))
                self.seals.owner_lost(worker, self.state.last_epoch)
            stimulus_id = kwargs.get("stimulus_id", "aimss-worker-lost")
            # Killed (not expected, not closing): its spill files are still on its node.
            killed = scheduler.status == Status.running and not kwargs.get("expected")
            self.salvages.on_worker_lost(worker, get_address_host(worker) if killed else None)
            self.io.forget_worker(worker)
            self._partitions_lost(scheduler, worker, lost_parts, stimulus_id)
        except Exception:
            logger.exception("aimss: remove_worker hook failed")

    def _partitions_lost(
        self, scheduler: Scheduler, worker: str, lost_parts: dict[str, set[int]], stimulus_id: str, later: bool = False
    ) -> None:
        """The runs and readers of ``lost_parts`` (stream -> partitions ``worker`` took along) react.

        ``later``: found lost after the worker's removal was handled; only
        the runs of those streams react (the others did then).
        """
        if scheduler.status == Status.running:
            self.run_ops.restart_runs(scheduler, stimulus_id, worker, lost_parts, only_lost=later)
        # Readers of lost partitions that no restart re-creates (a user's
        # stream's map_partitions) must not wait for the dead worker.
        # Those of a run that recovers are pinned to the new owners.
        if self.pinner is not None:
            self.pinner.unpin_lost(
                {
                    n: ps
                    for n, ps in lost_parts.items()
                    if n in self.state.streams and n not in self.recoveries.recovering
                },
                stimulus_id,
            )
        # Runs that cannot recover what was lost (a loader or a streaming
        # sink on a user's stream) fail, named; they raise too.
        for rec, action, _ in self.runs.on_worker_lost(worker, lost_parts):
            if action is OnLoss.RESTART:  # nothing left to run again: see restart_runs
                self.runs.finish(rec.run_id, rec.epoch, RunState.FAILED, (
                    "PartitionLostError",
                    f"run {rec.run_id!r} lost partitions with worker {worker} after its "
                    "graph was done; it cannot run again",
                ))

    def lost_after_all(self, worker: str, name: str, parts: Collection[int]) -> None:
        """A promotion planned for ``worker``'s loss did not hold: ``parts`` of ``name`` are lost after all.

        ``worker``'s removal found them taken over, so its runs went on; now
        they recover or restart, and readers are unpinned, as for partitions
        lost at once. Without this the run's pushes waited for a new epoch
        that never came, and failed.
        """
        try:
            scheduler = self.ops.scheduler
            spec = self.state.streams.get(name)
            if scheduler is None or spec is None:
                return
            parts = {p for p in self.state.lost.get(name, {}) if spec.owners[p] == worker and p in parts}
            if parts:
                logger.warning("aimss: partitions %s of %s are lost with %s after all", sorted(parts), name, worker)
                self._partitions_lost(scheduler, worker, {name: parts}, "aimss-promotion-failed", later=True)
        except Exception:
            logger.exception("aimss: handling partitions of %s lost with %s failed", name, worker)

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        try:
            self.fill.client_left(client)
            self.seals.client_left(client)
            names = self.state.left_with_client(client, set(scheduler.clients) - {client})
            if names:
                self.ops.spawn(self.stream_ops.destroy_many(names))
            for run_id in self.runs.owned_by_client(client):
                rec = self.runs.get(run_id)
                self.runs.finish(run_id, rec.epoch, RunState.CLOSED)
        except Exception:
            logger.exception("aimss: remove_client hook failed")

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """A run's push task finished (noted: where), or its create task forgotten (its streams freed).

        Every task that leaves ``processing`` is noted for straggler
        detection (its duration; a flagged one's report closes).

        The streams of a run are freed as their partitions are read; a graph
        that stops before (cancelled, its futures released, or a restarted
        run whose last create ran after the result was in) would leave them
        in the workers' memory for good. Where a push finished is what a
        recovery needs (:mod:`~aimss_dask.coordinator.recovery`). O(1) per
        transition.
        """
        if start == "processing":
            try:
                self.stragglers.task_ended(key, start, finish, kwargs)
            except Exception:
                logger.exception("aimss: transition hook failed")
        if finish == "memory" and start == "processing":
            try:
                self.recoveries.task_finished(key, kwargs.get("worker"))
            except Exception:
                logger.exception("aimss: transition hook failed")
            return
        if finish != "forgotten":
            return
        try:
            rec = self.runs.for_create(key)
            if rec is None:
                return
            names = [n for n in rec.spec.streams if n in self.state.streams]
            if names:
                logger.info("aimss: the graph of %s run %s is gone; freeing %s", rec.kind, rec.run_id, names)
                self.ops.spawn(self.stream_ops.destroy_many(names))
            if not rec.finished:
                self.runs.finish(rec.run_id, rec.epoch, RunState.CLOSED)
        except Exception:
            logger.exception("aimss: transition hook failed")

    def update_graph(self, scheduler: Scheduler, *, tasks: list[Any], **kwargs: Any) -> None:
        """Pin partition tasks to their partitions' owners; wrap the tasks annotated speculative; steer pushes off slow workers."""
        try:
            if self.pinner is not None:
                self.pinner.update_graph(tasks)
        except Exception:
            logger.exception("aimss: update_graph hook failed")
        try:
            mark_annotated(scheduler, kwargs.get("annotations"))
        except Exception:
            logger.exception("aimss: update_graph hook failed to mark speculative tasks")
        try:
            self.stragglers.steer(tasks)
        except Exception:
            logger.exception("aimss: update_graph hook failed to steer pushes off slow workers")

    @replies
    async def _h_config(self) -> dict[str, Any]:
        """The ``AIMSS(...)`` arguments and the data-plane secret, for the producers of client processes."""
        return {"overrides": self.overrides, "secret": self.secret}

    @replies
    async def _h_trace(self, folder: str | None = None, compress: bool = True) -> dict[str, Any]:
        """Start (``folder``) or stop (None) tracing on every worker and here; the trace files.

        A worker that joins while a trace runs starts tracing at its setup
        (it reads the trace's folder from the scheduler's metadata).
        """
        mine = await self._trace_here(folder, compress)
        replies = await self.ops.broadcast({"op": "aimss_trace", "folder": folder, "compress": compress})
        files = [r["file"] for r in replies.values() if isinstance(r, dict) and r.get("file")]
        return {"files": sorted(set(files) | ({mine} if mine else set()))}

    async def _trace_here(self, folder: str | None, compress: bool) -> str | None:
        """Start (``folder``) or stop (None) tracing the scheduler's process; its file, if that changed.

        Workers that join meanwhile read the folder from the scheduler's metadata at their setup.
        """
        assert self.scheduler is not None
        self.scheduler.set_metadata(keys=[TRACE_KEY], value=None if folder is None else [folder, compress])
        if folder is not None and not self._tracing:
            self._tracing = True
            return await offload(trace.start, folder, compress=compress)
        if folder is None and self._tracing:
            self._tracing = False
            return await offload(trace.stop)
        return None

    @replies
    async def _h_copy_outcome(self, key: str, outcome: str) -> None:
        """A straggler's call says how the race with its copy ended."""
        self.stragglers.copy_outcome(key, outcome)

    @replies
    async def _h_speculation_view(self) -> dict[str, Any]:
        """A loader's view of speculation: settings, the copy cap, slow workers."""
        return self.stragglers.view()

    @replies
    async def _h_loader_copies(
        self, stream: str, owner: str, dest: str, copies: int, won: int, elapsed: float, rule: str
    ) -> None:
        """A loader says how many late reads of an owner it backed up, and how they went."""
        self.stragglers.loader_copies(stream, owner, dest, copies, won, elapsed, rule)

    @replies
    async def _h_listed(self, address: str) -> dict[str, Any]:
        """Whether the scheduler lists worker ``address``: a caller's connect to it is worth waiting for."""
        assert self.scheduler is not None
        return {"listed": address in self.scheduler.workers}

    @replies
    async def _h_status(self, timeout: float = STATUS_WAIT) -> dict[str, Any]:
        # A worker stopped or hung, but listed, never answers: status() is
        # what a user calls to find out why a job hangs, so it names it.
        # status() checks the caller's timeout; bounded here all the same.
        wait = min(max(float(timeout), 0.1), 600.0)
        replies = await self.ops.broadcast({"op": "aimss_worker_status"}, timeout=wait)
        return {
            "workers": {
                addr: r["status"] for addr, r in replies.items() if isinstance(r, dict)
            },
            "silent": sorted(addr for addr, r in replies.items() if isinstance(r, TimeoutError)),
        }
