"""``AIMSS``: the scheduler plugin that is the coordinator.

It holds the stream metadata (:class:`CoordinatorState`), installs the worker
plugin on every current and future worker, answers the ``aimss_*`` RPCs of
clients and tasks, pins partition tasks to their owners in ``update_graph``,
and cleans up after clients and workers that leave.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypedDict

from dask.utils import format_bytes
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps

from aimss_dask.config import AIMSSConfig, dask_memory_thresholds
from aimss_dask.core.names import (
    PLUGIN_NAME,
    REGISTERED_KEY,
    SEAL_PRODUCERS_TOPIC,
)
from aimss_dask.core.runs import OnLoss, OnSeal, RunSpec, RunState
from aimss_dask.errors import (
    InvalidArgumentError,
    StreamExistsError,
    ReadTimeoutError,
    error_from_wire,
    raise_from_wire,
)
from aimss_dask.plugin import progress
from aimss_dask.plugin.rpc import replies
from aimss_dask.plugin.pinning import Pinner
from aimss_dask.plugin.placement import rebalance
from aimss_dask.plugin.registry import RunRecord, RunRegistry
from aimss_dask.plugin.state import CoordinatorState, StreamSpec

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger("aimss_dask")


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
        Copies of each partition; only 1 is supported so far.
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
        AIMSSConfig.load(**self.overrides)
        self.scheduler: Scheduler | None = None
        self.state = CoordinatorState()
        self._sealed_changed: asyncio.Condition | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Client processes that write (they buffer records too), and the seals
        # waiting for them to push: token -> (clients yet to answer, done, failures).
        self._producer_clients: set[str] = set()
        self._seal_waits: dict[str, tuple[set[str], asyncio.Event, dict[str, Any]]] = {}
        # Every operator run: its spec, policies, state and progress.
        self.runs = RunRegistry()
        self.pinner: Pinner | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"overrides": self.overrides}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["overrides"])  # type: ignore[misc]

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, scheduler: Scheduler) -> None:
        from aimss_dask.plugin.worker import AIMSSWorker

        # Before anything is installed: a refused registration leaves the
        # cluster as it was (Dask adds the plugin only if start succeeds).
        self._check_budget_fits(scheduler)
        self.scheduler = scheduler
        self.pinner = Pinner(scheduler, self.state.streams, self._spec_of_run)
        self._sealed_changed = asyncio.Condition()
        for op in _HANDLERS:
            scheduler.handlers[f"aimss_{op}"] = getattr(self, f"_h_{op}")
        await scheduler.register_worker_plugin(
            None, dumps(AIMSSWorker(self.overrides)), name=PLUGIN_NAME, idempotent=True
        )
        failed = await self._setup_failures(scheduler)
        if failed:
            # Undo, so that a corrected registration starts from a clean slate.
            await scheduler.unregister_worker_plugin(None, PLUGIN_NAME)
            for op in _HANDLERS:
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

    async def close(self) -> None:
        for t in list(self._background):
            t.cancel()
        self.state.clear()
        self.runs.clear()
        if self.pinner is not None:
            self.pinner.clear()
        if self.scheduler is not None:
            for op in _HANDLERS:
                self.scheduler.handlers.pop(f"aimss_{op}", None)
            self.scheduler.task_metadata.pop(REGISTERED_KEY, None)

    def restart(self, scheduler: Scheduler) -> None:
        # Workers restart with empty logs: metadata of their streams is void.
        try:
            self.state.clear()
            self.runs.clear()
            if self.pinner is not None:
                self.pinner.clear()
        except Exception:
            logger.exception("aimss: restart hook failed")

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        try:
            lost = self.state.worker_lost(worker)
            lost_parts = {n: {p for p, w in enumerate(self.state.streams[n].owners) if w == worker} for n in lost}
            if lost:
                logger.warning(
                    "aimss: worker %s left; partitions of %s are lost", worker, lost
                )
            # Producers everywhere stop queueing records for it at once. Not
            # for expected departures (closing, retiring): their peers may be
            # closing too, and producers find out on their next connect. Nor
            # when it held no partition: no producer writes to it.
            if scheduler.status == Status.running and not kwargs.get("expected") and lost:
                self._spawn(self._broadcast({"op": "aimss_owner_lost", "address": worker}))
            if scheduler.status == Status.running:
                self._restart_runs(scheduler, kwargs.get("stimulus_id", "aimss-worker-lost"))
            # Runs that cannot recover what was lost (a loader or a streaming
            # sink on a user's stream) fail, named; they raise too.
            for rec, action, _ in self.runs.on_worker_lost(worker, lost_parts):
                if action is OnLoss.RESTART:  # nothing left to run again: see _restart_runs
                    self.runs.finish(rec.run_id, rec.epoch, RunState.FAILED, (
                        "PartitionLostError",
                        f"run {rec.run_id!r} lost partitions with worker {worker} after its "
                        "graph was done; it cannot run again",
                    ))
        except Exception:
            logger.exception("aimss: remove_worker hook failed")

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        try:
            if client in self._producer_clients:
                self._producer_clients.discard(client)
                # Distributed keeps a topic's subscribers after they leave.
                scheduler.unsubscribe_topic(SEAL_PRODUCERS_TOPIC, client)
            for pending, done, _ in self._seal_waits.values():
                pending.discard(client)
                if not pending:
                    done.set()
            names = self.state.owned_by_client(client)
            if names:
                self._spawn(self._destroy_many(names))
            for run_id in self.runs.owned_by_client(client):
                rec = self.runs.get(run_id)
                self.runs.finish(run_id, rec.epoch, RunState.CLOSED)
        except Exception:
            logger.exception("aimss: remove_client hook failed")

    def update_graph(self, scheduler: Scheduler, *, tasks: list[Any], **kwargs: Any) -> None:
        """Pin partition tasks to the worker that owns their partition."""
        try:
            if self.pinner is not None:
                self.pinner.update_graph(tasks)
        except Exception:
            logger.exception("aimss: update_graph hook failed")

    def _spec_of_run(self, run_id: str) -> RunSpec | None:
        rec = self.runs.find(run_id)
        return None if rec is None else rec.spec

    def _restart_runs(self, scheduler: Scheduler, stimulus_id: str) -> None:
        """Run again, from a clean slate, every restartable run still in flight.

        A lost worker takes partitions and unsent pushes with it; the run's
        streams are forgotten at once (the re-run creates fresh ones, with a
        new epoch, so late messages of the old run are rejected) and its
        tasks, from stream creation through the barrier to the reads, are
        released so the scheduler computes them again. Every such run, not
        only those that had partitions there: a push task that ran on the
        lost worker is computed again, and until records carry their origin
        a second push would duplicate rows.
        """
        for rec in self.runs.unfinished():
            spec = rec.spec
            if spec.on_loss is not OnLoss.RESTART or rec.state is RunState.RESTARTING:
                continue
            barrier = scheduler.tasks.get(spec.barrier) if spec.barrier is not None else None
            if barrier is None:
                continue
            recs: dict[Any, str] = {}
            for ts in (*barrier.dependents, barrier, *barrier.dependencies):
                if ts.state == "erred":
                    recs = {}
                    break
                recs[ts.key] = "released"
            if not recs:
                continue
            create = scheduler.tasks.get(spec.create) if spec.create is not None else None
            if create is not None:
                recs[create.key] = "released"
            self.runs.restart(rec.run_id, rec.epoch)
            for name in spec.streams:
                if name in self.state.streams:
                    for s in self.state.destroy(name):
                        self._spawn(self._broadcast({"op": "aimss_drop", "name": s.name, "epoch": s.epoch}))
            logger.warning("aimss: restarting %s run %s after losing a worker", rec.kind, rec.run_id)
            scheduler.transitions(recs, stimulus_id=stimulus_id)
            scheduler.stimulus_queue_slots_maybe_opened(stimulus_id=stimulus_id)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Background work of a hook (cleanup, notices): worth a line in
            # the log, never an "exception was never retrieved".
            logger.info("aimss: background task failed: %r", task.exception())

    # -- helpers -------------------------------------------------------------------

    def _workers(self) -> list[str]:
        assert self.scheduler is not None
        return list(self.scheduler.workers)

    async def _broadcast(self, msg: dict[str, Any], workers: list[str] | None = None) -> dict[str, Any]:
        assert self.scheduler is not None
        live = set(self._workers())
        targets = [w for w in (workers if workers is not None else live) if w in live]
        if not targets:
            return {}
        replies = await self.scheduler.broadcast(msg=msg, workers=targets, on_error="return")
        for addr, reply in replies.items():
            if isinstance(reply, BaseException):
                # A closed comm (an OSError) means that worker is leaving
                # too (a cluster shutting down): its removal cleans up.
                log = logger.info if isinstance(reply, OSError) else logger.warning
                log("aimss: %s failed on %s: %r", msg["op"], addr, reply)
            else:
                raise_from_wire(reply, msg["op"])
        return replies

    def _creator(self, client: str | None, task: Any) -> str | None:
        """The client a stream belongs to: the caller, or who wants the task."""
        if client:
            return client
        assert self.scheduler is not None
        ts = self.scheduler.tasks.get(_as_key(task)) if task is not None else None
        # A run's create task is rarely wanted itself: the client wants the
        # outputs downstream of it. The nearest wanted dependent says whose.
        seen: set[Any] = set()
        frontier = [ts] if ts is not None else []
        while frontier and len(seen) < _CREATOR_SEARCH:
            wanted = sorted(cs.client_key for t in frontier for cs in (t.who_wants or ()))
            if wanted:
                return wanted[0]
            seen.update(t.key for t in frontier)
            frontier = [d for t in frontier for d in t.dependents if d.key not in seen]
        return None

    def _wire(self, spec: StreamSpec) -> dict[str, Any]:
        return {
            "spec": spec.to_wire(),
            "sealed": spec.name in self.state.sealed,
            "lost": sorted(self.state.lost.get(spec.name, ())),
        }

    async def _destroy_many(self, names: list[str]) -> None:
        for name in names:
            if name in self.state.streams:
                try:
                    await self._destroy(name)
                except Exception:
                    logger.exception("aimss: cleanup of stream %r failed", name)

    # -- handlers (RPC ops "aimss_<name>") ---------------------------------------------

    @replies
    async def _h_create(
        self,
        name: str,
        partitions: int,
        parent: str | None = None,
        exist_ok: bool = False,
        persist: bool = False,
        client: str | None = None,
        task: Any = None,
    ) -> dict[str, Any]:
        spec, created = self.state.create(
            name,
            partitions,
            self._workers(),
            parent=parent,
            exist_ok=exist_ok,
            persist=persist,
            creator=self._creator(client, task),
        )
        if created:
            await self._open(spec)
        return {**self._wire(spec), "created": created}

    async def _open(self, spec: StreamSpec, inputs: int = 0) -> None:
        """Open a new stream's partitions on their owners and pin its known readers.

        ``inputs`` > 0: records carry their origin, and owners drop a second
        copy of an input (see :mod:`aimss_dask.plugin.dedup`).
        """
        assert self.pinner is not None
        # Read tasks submitted before the stream existed, or pinned to the
        # owners of a run that restarted.
        self.pinner.repin([spec.name])
        by_owner: dict[str, list[int]] = {}
        for p, w in enumerate(spec.owners):
            by_owner.setdefault(w, []).append(p)
        try:
            for w, ps in by_owner.items():
                await self._broadcast(
                    {"op": "aimss_open", "spec": spec.to_wire(), "partitions": ps, "inputs": inputs}, [w]
                )
        except Exception:
            self.state.destroy(spec.name)
            await self._broadcast({"op": "aimss_drop", "name": spec.name, "epoch": spec.epoch})
            raise

    @replies
    async def _h_run_register(
        self,
        run: dict[str, Any],
        partitions: int | None = None,
        prefer: list[Any] | None = None,
        client: str | None = None,
        task: Any = None,
    ) -> dict[str, Any]:
        """Register a run (its spec's wire form) and create the streams it owns.

        Its streams get ``partitions`` partitions each, all placed like the
        first (a join reads both sides locally); ``prefer[p]`` is the key of
        the task whose result is most of partition ``p``'s input, placed
        with it where it is in memory. The same run registered again while
        its streams are open (its create task ran twice) gets them back; a
        sealed leftover of an earlier compute of the same graph is replaced.
        """
        assert self.pinner is not None
        view = RunSpec.view_from_wire(run)
        if view.streams and (not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1):
            raise InvalidArgumentError(
                f"run {view.run_id!r} owns streams {list(view.streams)}: give partitions= "
                f"(a positive int), not {partitions!r}"
            )
        rec = self.runs.find(view.run_id)
        open_ = [self.state.streams.get(n) for n in view.streams]
        if (
            rec is not None
            and not rec.finished
            and rec.state is not RunState.RESTARTING
            and all(s is not None and s.name not in self.state.sealed for s in open_)
        ):
            return self._run_reply(rec, created=False)
        for name in view.streams:
            if name not in self.state.streams:
                continue
            if rec is None or name not in rec.spec.streams:
                # Never replace a stream this run did not make (a user's).
                raise StreamExistsError(
                    f"stream {name!r} of {run.get('kind', 'run')} run {view.run_id!r} "
                    "already exists and is not this run's; destroy it first or use another name"
                )
            await self._destroy(name)  # a leftover of this run: a cancelled compute
        rec = self.runs.register(run, client=self._creator(client, task))
        created: list[str] = []
        try:
            holders = self._holders(prefer) if prefer else None
            for i, name in enumerate(view.streams):
                assert partitions is not None
                spec, _ = self.state.create(
                    name,
                    partitions,
                    self._workers(),
                    creator=rec.client,
                    colocate_with=view.streams[0] if i else None,
                    prefer=None if i else holders,
                )
                created.append(name)
                await self._open(spec, view.inputs)
            self.pinner.run_registered(rec.spec)
        except Exception as e:
            self.runs.finish(view.run_id, rec.epoch, RunState.FAILED, (type(e).__name__, str(e)))
            for name in created:
                if name in self.state.streams:
                    await self._destroy(name)
            raise
        return self._run_reply(rec, created=True)

    def _run_reply(self, rec: RunRecord, created: bool) -> dict[str, Any]:
        return {
            "run_id": rec.run_id,
            "epoch": rec.epoch,
            "created": created,
            "streams": [self._wire(self.state.streams[n]) for n in rec.spec.streams],
        }

    @replies
    async def _h_run_report(
        self,
        run_id: str,
        epoch: int,
        who: str | None = None,
        state: str | None = None,
        progress: dict[str, Any] | None = None,
        error: list[str] | None = None,
    ) -> dict[str, Any]:
        """A report on a run from where it runs (a worker, a client's driver thread)."""
        return {"applied": self.runs.update(run_id, epoch, who, state=state, progress=progress, error=error)}

    @replies
    async def _h_run_finish(
        self, run_id: str, epoch: int | None = None, state: str = "done", error: list[str] | None = None
    ) -> dict[str, Any]:
        """End a run's epoch (DONE, FAILED with ``error``, or CLOSED); its streams stay as they are.

        ``epoch`` None: the registered one; an unknown run is not an error then.
        """
        if epoch is None:
            rec = self.runs.find(run_id)
            if rec is None:
                return {"finished": False}
            epoch = rec.epoch
        return {"finished": self.runs.finish(run_id, epoch, state, error)}

    def _holders(self, keys: list[Any]) -> list[str | None]:
        """The worker holding each task result (``None`` where none is in memory)."""
        assert self.scheduler is not None
        out: list[str | None] = []
        for key in keys:
            ts = self.scheduler.tasks.get(_as_key(key))
            holders = sorted(ws.address for ws in ts.who_has) if ts is not None and ts.who_has else []
            out.append(holders[0] if holders else None)
        return out

    @replies
    async def _h_get(self, name: str) -> dict[str, Any]:
        return self._wire(self.state.get(name))

    @replies
    async def _h_seal(self, name: str) -> dict[str, Any]:
        spec = self.state.get(name)
        # 1. Every worker stops taking writes for the stream and pushes what it
        #    has buffered; 2. only then do owners seal, so nothing written before
        #    seal() is rejected.
        msg = {"name": name, "epoch": spec.epoch}
        replies = await self._broadcast({"op": "aimss_seal_producers", **msg})
        replies.update(await self._seal_clients(name, spec.epoch))
        await self._broadcast({"op": "aimss_seal_partitions", **msg}, list(set(spec.owners)))
        self.state.sealed.add(name)
        action = self.runs.on_seal(name)
        if action is not None:
            await self._run_sealed(name, spec, *action)
        assert self._sealed_changed is not None
        async with self._sealed_changed:
            self._sealed_changed.notify_all()
        failures = {
            addr: r["failure"]
            for addr, r in replies.items()
            if isinstance(r, dict) and r.get("failure")
        }
        if failures:
            addr, (kind, message) = sorted(failures.items())[0]
            raise error_from_wire(
                kind,
                f"stream {name!r} is sealed, but writes from {sorted(failures)} were "
                f"not stored: {message}",
            )
        return self._wire(spec)

    async def _seal_clients(self, name: str, epoch: int) -> dict[str, Any]:
        """Have every writing client push what it buffered for ``name``."""
        assert self.scheduler is not None
        clients = {c for c in self._producer_clients if c in self.scheduler.client_comms}
        if not clients:
            return {}
        token = uuid.uuid4().hex
        done = asyncio.Event()
        failures: dict[str, Any] = {}
        self._seal_waits[token] = (set(clients), done, failures)
        try:
            # One event to the topic's subscribers (the writing clients); each
            # answers only if it is named in ``clients``.
            event: SealProducersEvent = {
                "name": name,
                "epoch": int(epoch),
                "token": token,
                "clients": sorted(clients),
            }
            self.scheduler.log_event(SEAL_PRODUCERS_TOPIC, event)
            try:
                await asyncio.wait_for(done.wait(), SEAL_CLIENT_TIMEOUT)
            except asyncio.TimeoutError:
                pending = sorted(self._seal_waits[token][0])
                logger.warning(
                    "aimss: seal of %r went ahead without clients %s pushing their writes",
                    name,
                    pending,
                )
        finally:
            del self._seal_waits[token]
        return failures

    @replies
    async def _h_register_producer(self, client: str) -> None:
        assert self.scheduler is not None
        self._producer_clients.add(client)
        # The client subscribes itself too, but on its batched stream, which
        # may arrive after this reply and after a seal it makes right away:
        # subscribing it here means the first seal does not wait
        # SEAL_CLIENT_TIMEOUT for an answer to an event it never got.
        self.scheduler.subscribe_topic(SEAL_PRODUCERS_TOPIC, client)

    @replies
    async def _h_producers_sealed(self, token: str, client: str, failure: Any = None) -> None:
        wait = self._seal_waits.get(token)
        if wait is not None:
            pending, done, failures = wait
            pending.discard(client)
            if failure:
                failures[client] = {"failure": failure}
            if not pending:
                done.set()

    @replies
    async def _h_shuffle_wait(self, parent: str, timeout: float | None = None) -> dict[str, Any]:
        self.state.get(parent)
        assert self._sealed_changed is not None

        def done() -> bool:
            if parent not in self.state.streams:
                return True
            return all(c in self.state.sealed for c in self.state.children(parent))

        async with self._sealed_changed:
            try:
                if not done():  # wait_for(..., 0) would time out without looking
                    await asyncio.wait_for(self._sealed_changed.wait_for(done), timeout)
            except asyncio.TimeoutError:
                open_ = [c for c in self.state.children(parent) if c not in self.state.sealed]
                raise ReadTimeoutError(
                    f"shuffle_streams({parent!r}) timed out after {timeout}s; child "
                    f"streams still open: {open_}"
                ) from None
        self.state.get(parent)  # destroyed while waiting: raise
        return {"children": self.state.children(parent)}

    async def _run_sealed(self, name: str, spec: StreamSpec, on_seal: OnSeal, free_unread: bool) -> None:
        """Stream ``name`` of a run is sealed: apply its run's seal policy."""
        rec = self.runs.for_stream(name)
        assert rec is not None and self.pinner is not None
        out = rec.spec.outputs
        if free_unread and out is not None:
            # Output partitions that no submitted task will read (a partial
            # compute, out.partitions[0]): free them now.
            unread = set(range(spec.partitions)) - self.pinner.read(out.stream)
            if unread:
                await self._release(spec, sorted(unread))
        if on_seal is OnSeal.REBALANCE and name in self.state.streams:
            await self._rebalance(rec)

    @replies
    async def _h_destroy(self, name: str) -> dict[str, Any]:
        return {"destroyed": await self._destroy(name)}

    async def _destroy(self, name: str) -> list[str]:
        """Forget ``name`` (and its children) everywhere; a run whose streams are all gone is done."""
        removed = self.state.destroy(name)
        for spec in removed:
            await self._broadcast({"op": "aimss_drop", "name": spec.name, "epoch": spec.epoch})
        for spec in removed:
            rec = self.runs.for_stream(spec.name)
            if (
                rec is not None
                and rec.state is not RunState.RESTARTING
                and not any(n in self.state.streams for n in rec.spec.streams)
            ):
                self.runs.finish(rec.run_id, rec.epoch, RunState.DONE)
        assert self._sealed_changed is not None
        async with self._sealed_changed:
            self._sealed_changed.notify_all()
        return [s.name for s in removed]

    @replies
    async def _h_release(self, name: str, partition: int) -> dict[str, Any]:
        """An operator's reader is done with a partition; destroy when all are."""
        return {"destroyed": await self._release(self.state.get(name), [partition], trim=False)}

    async def _rebalance(self, rec: RunRecord) -> None:
        """Even out the bytes each worker holds for an operator's sealed streams.

        Placement was fixed before any data existed; now the sizes are known
        (a hot key makes one partition huge). Partitions move as a group (a
        join's two sides stay together), and the read tasks, which cannot
        have started, are pinned to the new owners.
        """
        assert self.pinner is not None
        group = sorted(rec.spec.streams)
        if not group or not all(n in self.state.sealed for n in group):
            return
        specs = [self.state.get(n) for n in group]
        owners = specs[0].owners
        sizes = [0] * specs[0].partitions
        for spec in specs:
            for p, st in (await self._partition_stats(spec)).items():
                sizes[p] += st["bytes"]
        new = rebalance(sizes, owners, self._workers())
        moves = [p for p in range(len(sizes)) if new[p] != owners[p] and sizes[p] > 0]
        if not moves:
            return
        target = tuple(new[p] if p in moves else owners[p] for p in range(len(owners)))
        for spec in specs:
            moved = replace(spec, owners=target)
            msg = {"spec": moved.to_wire()}
            for w in sorted({target[p] for p in moves}):
                await self._broadcast(
                    {"op": "aimss_open", **msg, "partitions": [p for p in moves if target[p] == w]}, [w]
                )
            await asyncio.gather(
                *(
                    self._broadcast(
                        {"op": "aimss_move", **msg, "partitions": [p for p in moves if owners[p] == w]}, [w]
                    )
                    for w in sorted({owners[p] for p in moves})
                )
            )
            await self._broadcast(
                {"op": "aimss_seal_partitions", "name": spec.name, "epoch": spec.epoch},
                sorted({target[p] for p in moves}),
            )
            self.state.streams[spec.name] = moved
        self.pinner.repin(group, moves)
        logger.info("aimss: moved %d partition(s) of %s to balance sizes", len(moves), group)

    async def _partition_stats(self, spec: StreamSpec) -> dict[int, dict[str, Any]]:
        """Each partition's counts, as its owner reports them (absent if lost)."""
        replies = await self._broadcast(
            {"op": "aimss_stream_stats", "name": spec.name}, list(set(spec.owners))
        )
        return {
            p: st
            for r in replies.values()
            if isinstance(r, dict)
            for p, st in r.get("partitions", [])
        }

    async def _release(self, spec: StreamSpec, partitions: list[int], trim: bool = True) -> bool:
        if trim:
            by_owner: dict[str, list[int]] = {}
            for p in partitions:
                by_owner.setdefault(spec.owners[p], []).append(p)
            for w, ps in by_owner.items():
                await self._broadcast(
                    {"op": "aimss_trim", "name": spec.name, "epoch": spec.epoch, "partitions": ps}, [w]
                )
        if self.state.release(spec.name, partitions):
            await self._destroy(spec.name)
            return True
        return False

    @replies
    async def _h_offsets(self, name: str, group: str) -> dict[str, Any]:
        return {"offsets": self.state.offsets(name, group)}

    @replies
    async def _h_commit(self, name: str, group: str, offsets: list[list[int]]) -> dict[str, Any]:
        return {"offsets": self.state.commit(name, group, {int(p): int(o) for p, o in offsets})}

    @replies
    async def _h_info(self, name: str) -> dict[str, Any]:
        spec = self.state.get(name)
        records = [0] * spec.partitions
        nbytes = [0] * spec.partitions
        spilled = 0
        for p, st in (await self._partition_stats(spec)).items():
            records[p] = st["records"]
            nbytes[p] = st["bytes"]
            spilled += st["spilled_bytes"]
        return {
            "info": {
                "name": name,
                "partitions": spec.partitions,
                "owners": list(spec.owners),
                "epoch": spec.epoch,
                "parent": spec.parent,
                "persist": spec.persist,
                "sealed": name in self.state.sealed,
                "lost": sorted(self.state.lost.get(name, ())),
                "records": records,
                "bytes": nbytes,
                "spilled_bytes": spilled,
                "groups": {g: list(o) for g, o in self.state.groups.get(name, {}).items()},
            }
        }

    @replies
    async def _h_config(self) -> dict[str, Any]:
        """The ``AIMSS(...)`` arguments, for the producers of client processes."""
        return {"overrides": self.overrides}

    @replies
    async def _h_runs(self) -> dict[str, Any]:
        """Every run and stream, with progress from the workers' last heartbeats; no fan-out."""
        assert self.scheduler is not None
        beats = {a: ws.metrics.get(progress.METRIC) for a, ws in self.scheduler.workers.items()}
        return progress.overview(self.runs, self.state.streams, self.state.sealed, self.state.lost, beats)

    @replies
    async def _h_status(self) -> dict[str, Any]:
        replies = await self._broadcast({"op": "aimss_worker_status"})
        return {
            "workers": {
                addr: r["status"] for addr, r in replies.items() if isinstance(r, dict)
            }
        }


def _as_key(key: Any) -> Any:
    """A Dask key back from the wire, where msgpack turned its tuples into lists."""
    return tuple(_as_key(k) for k in key) if isinstance(key, (list, tuple)) else key


#: Tasks looked at, at most, to find which client a run's create task works for.
_CREATOR_SEARCH = 20_000

#: How long a seal waits for writing clients to push their buffered records.
SEAL_CLIENT_TIMEOUT = 60.0


class SealProducersEvent(TypedDict):
    """The message of a seal event: push ``name`` (epoch ``epoch``), then answer
    ``aimss_producers_sealed(token=...)``; only the ``clients`` named do."""

    name: str
    epoch: int
    token: str
    clients: list[str]


_HANDLERS = (
    "config",
    "register_producer",
    "producers_sealed",
    "create",
    "get",
    "seal",
    "shuffle_wait",
    "destroy",
    "release",
    "offsets",
    "commit",
    "info",
    "status",
    "runs",
    "run_register",
    "run_report",
    "run_finish",
)
