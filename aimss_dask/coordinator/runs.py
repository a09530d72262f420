"""The coordinator's run handlers: register, report, finish; seal and loss policies.

An operator registers a :class:`~aimss_dask.core.runs.RunSpec` here (the
streams it owns are created then, all placed like the first), and the
registry (:class:`~aimss_dask.coordinator.registry.RunRegistry`) keeps its state.
At seal and when a worker leaves, the spec's policies say what to do; these
handlers do it: rebalance the bytes per worker, free partitions no task will
read, or restart the run from its create task.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from aimss_dask.coordinator import overview
from aimss_dask.coordinator.access import StreamAccess
from aimss_dask.coordinator.cluster import ClusterOps, as_application, as_key
from aimss_dask.coordinator.moves import copy_group, drop_copies
from aimss_dask.coordinator.placement import rebalance
from aimss_dask.coordinator.registry import RunRecord
from aimss_dask.coordinator.state import StreamSpec
from aimss_dask.core.errors import (
    AIMSSError,
    InvalidArgumentError,
    PartitionLostError,
    StreamExistsError,
    StreamNotFoundError,
)
from aimss_dask.core.runs import RUNS_AGAIN, OnLoss, OnSeal, RunSpec, RunState
from aimss_dask.transport.rpc import replies

if TYPE_CHECKING:
    from distributed import Scheduler

    from aimss_dask.coordinator.plugin import AIMSS

logger = logging.getLogger("aimss_dask")

#: Scheduler states of a task that is to be computed (again).
_WANTED = frozenset({"waiting", "processing", "no-worker", "queued"})
#: Most times one task of a run is computed again for a stale result (see
#: ``_h_run_stale``): each loss or restart explains one; far more is a loop
#: that would never seal.
MAX_STALE_ROUNDS = 20


class RunHandlers:
    """The ``aimss_run_*`` RPCs and the run policies of one coordinator ``coord``."""

    def __init__(self, coord: AIMSS, ops: ClusterOps) -> None:
        self.coord = coord
        self.ops = ops
        # (run id, task key) -> how often the task was computed again for a stale result.
        self._stale_rounds: dict[tuple[str, Any], int] = {}

    def spec_of_run(self, run_id: str) -> RunSpec | None:
        rec = self.coord.runs.find(run_id)
        return None if rec is None else rec.spec

    def restart_runs(
        self,
        scheduler: Scheduler,
        stimulus_id: str,
        worker: str | None = None,
        lost: Mapping[str, Collection[int]] | None = None,
        only_lost: bool = False,
    ) -> None:
        """After losing ``worker`` (``lost``: its partitions, by stream): recover or restart the runs in flight.

        ``only_lost``: only the runs that own or read a stream in ``lost``
        (partitions found lost later, after the worker's removal was
        handled: the other runs had their turn then).

        A run that recovers (:mod:`~aimss_dask.coordinator.recovery`) and
        whose streams are still being written keeps what survived; one
        whose streams are sealed goes on untouched if the loss took nothing
        it still needs (:meth:`_untouched`). Any other restartable run
        starts again from a clean slate (:meth:`restart`), even without a
        partition there: a push task that ran on the lost worker is
        computed again.
        """
        for rec in self.coord.runs.restartable():
            spec = rec.spec
            if spec.on_loss not in RUNS_AGAIN or rec.state is RunState.RESTARTING:
                continue
            if only_lost and not any(n in (lost or {}) for n in (*spec.streams, *spec.reads)):
                continue
            if worker is not None and self.coord.recoveries.eligible(rec):
                self.coord.recoveries.keep(rec, worker, lost or {}, stimulus_id, later=only_lost)
                continue
            if worker is not None and not rec.finished and self._untouched(rec, scheduler, lost or {}):
                continue
            self.restart(rec, scheduler, stimulus_id)

    def _untouched(self, rec: RunRecord, scheduler: Scheduler, lost: Mapping[str, Collection[int]]) -> bool:
        """A run past its barrier that a lost worker took nothing from that it still needs.

        Its streams are sealed (every push was stored before: the seal
        flushed every producer) and none of their partitions were there;
        Dask keeps the barrier's result; and no output Dask computes again
        reads a partition that was freed once read. Then the outputs that
        were on that worker simply run again, reading surviving partitions.
        """
        spec = rec.spec
        state = self.coord.state
        if spec.on_loss is not OnLoss.RECOVER or spec.barrier is None:
            return False
        if any(
            n not in state.sealed or n in self.coord.stream_ops.sealing or lost.get(n) or n in state.lost
            for n in spec.streams
        ):
            return False
        barrier = scheduler.tasks.get(spec.barrier)
        if barrier is None or barrier.state != "memory":
            return False
        for ts in barrier.dependents:
            if ts.state in _WANTED:
                where = spec.output_partition(ts.key)
                if where is None or where[1] in state.released.get(where[0], ()):
                    return False
        return True

    def restart(self, rec: RunRecord, scheduler: Scheduler, stimulus_id: str) -> None:
        """Run ``rec`` again from a clean slate, if it is still in flight (or lost outputs of it).

        A lost worker takes partitions and unsent pushes with it; the run's
        streams are forgotten at once (the re-run creates fresh ones, with a
        new epoch, so late messages of the old run are rejected) and its
        tasks, from stream creation through the barrier to the reads, are
        released so the scheduler computes them again.
        """
        spec = rec.spec
        barrier = scheduler.tasks.get(spec.barrier) if spec.barrier is not None else None
        if barrier is None:
            return
        if rec.finished and not self._outputs_lost(barrier, spec):
            return
        recs: dict[Any, str] = {}
        for ts in (*barrier.dependents, barrier, *barrier.dependencies):
            if ts.state == "erred":
                return
            recs[ts.key] = "released"
        create = scheduler.tasks.get(spec.create) if spec.create is not None else None
        if create is not None:
            recs[create.key] = "released"
        if not self.coord.runs.restart(rec.run_id, rec.epoch, done=True):
            return
        for name in spec.streams:
            if name in self.coord.state.streams:
                for s in self.coord.state.destroy(name):
                    self.ops.spawn(self.ops.broadcast({"op": "aimss_drop", "name": s.name, "epoch": s.epoch}))
        logger.warning("aimss: restarting %s run %s after losing a worker", rec.kind, rec.run_id)
        self.ops.event({"action": "run-restarted", "run": rec.run_id, "kind": rec.kind})
        self.ops.release(recs, stimulus_id)

    def _outputs_lost(self, barrier: Any, spec: RunSpec) -> bool:
        """A finished run must run again: Dask lost outputs it will compute again.

        Its streams were freed once read; a lost output (or the barrier
        itself) is waiting to be computed again, and its reads need the
        streams back, so the run starts over from its create task.
        """
        if any(n in self.coord.state.streams for n in spec.streams):
            return False
        return any(ts.state in _WANTED for ts in (barrier, *barrier.dependents))

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
        assert self.coord.pinner is not None and self.ops.scheduler is not None
        view = RunSpec.view_from_wire(run)
        if task is not None and view.create is not None and as_key(task) == view.create:
            ts = self.ops.scheduler.tasks.get(view.create)
            if ts is None or ts.state != "processing":
                # An execution of the create task that Dask gave up on (its
                # graph released, or the task handed back) still running: the
                # streams it made would be nobody's, in memory for good.
                raise StreamNotFoundError(
                    f"{run.get('kind', 'run')} run {view.run_id!r}: its create task is no longer "
                    f"wanted ({'forgotten' if ts is None else ts.state}); nothing was created"
                )
        if view.streams and (not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1):
            raise InvalidArgumentError(
                f"run {view.run_id!r} owns streams {list(view.streams)}: give partitions= "
                f"(a positive int), not {partitions!r}"
            )
        rec = self.coord.runs.find(view.run_id)
        open_ = [self.coord.state.streams.get(n) for n in view.streams]
        if (
            rec is not None
            and not rec.finished
            and rec.state is not RunState.RESTARTING
            and all(s is not None and s.name not in self.coord.state.sealed for s in open_)
        ):
            return self._reply(rec, created=False)
        for name in view.streams:
            if name not in self.coord.state.streams:
                continue
            if rec is None or name not in rec.spec.streams:
                # Never replace a stream this run did not make (a user's).
                raise StreamExistsError(
                    f"stream {name!r} of {run.get('kind', 'run')} run {view.run_id!r} "
                    "already exists and is not this run's; destroy it first or use another name"
                )
            await self.coord.stream_ops.destroy(name)  # a leftover of this run: a cancelled compute
        rec = self.coord.runs.register(run, client=self.ops.creator(client, task))
        created: list[str] = []
        try:
            holders = self.ops.holders(prefer) if prefer else None
            everyone = self.ops.running()
            running = self.coord.stragglers.avoid(everyone)
            if view.replication is not None and view.replication > len(running):
                running = everyone  # the copies asked for need the slow workers too
            if len(running) < len(everyone):
                logger.info(
                    "aimss: %s run %s places its partitions off slow worker(s) %s",
                    rec.kind, rec.run_id, sorted(set(everyone) - set(running)),
                )
            copies = view.replication
            if copies is None:
                # The default never fails a run on a small cluster: at most
                # one copy per worker (a factor asked for explicitly must fit).
                copies = max(1, min(self.coord.config.replication, len(running)))
            for i, name in enumerate(view.streams):
                assert partitions is not None
                spec, _ = self.coord.state.create(
                    name,
                    partitions,
                    running,
                    creator=rec.client,
                    colocate_with=view.streams[0] if i else None,
                    prefer=None if i else holders,
                    replication=copies,
                    host_of=self.ops.hosts(),
                )
                created.append(name)
                # Private to the run's application for other clients.
                self.coord.state.access[name] = StreamAccess(owner=as_application(rec.client), internal=True)
                await self.coord.stream_ops.open(spec, view.inputs)
            self.coord.pinner.run_registered(rec.spec)
            self.coord.recoveries.watch(rec)
        except Exception as e:
            self.coord.runs.finish(view.run_id, rec.epoch, RunState.FAILED, (type(e).__name__, str(e)))
            for name in created:
                if name in self.coord.state.streams:
                    await self.coord.stream_ops.destroy(name)
            raise
        return self._reply(rec, created=True)

    def _reply(self, rec: RunRecord, created: bool) -> dict[str, Any]:
        gone = [n for n in rec.spec.streams if n not in self.coord.state.streams]
        if gone:
            # A worker left while the streams were opened, and the run
            # restarted under this task (which Dask computes again).
            raise PartitionLostError(
                f"{rec.kind} run {rec.run_id!r} lost a worker while it registered (streams "
                f"{gone} are gone); it restarts"
            )
        return {
            "run_id": rec.run_id,
            "epoch": rec.epoch,
            "created": created,
            "streams": [self.coord.stream_ops.wire(self.coord.state.streams[n]) for n in rec.spec.streams],
        }

    @replies
    async def _h_run_refill(self, key: Any, stream: str, epoch: int, input: int | None = None) -> dict[str, Any]:
        """Which partitions of ``stream`` push ``key`` (of ``input``) writes in this execution (see :mod:`~aimss_dask.coordinator.recovery`)."""
        return {"partitions": await self.coord.recoveries.refill(as_key(key), stream, epoch, input)}

    @replies
    async def _h_run_stale(
        self, stream: str, keys: list[Any], epochs: list[dict[str, int]] | None = None, create: bool = False
    ) -> dict[str, Any]:
        """A seal found results that may not be its run's (see ``pushrun.seal``): compute the stale ones again.

        ``keys``: push tasks whose result came from an execution that wrote
        to an older epoch of the run's streams (``epochs``: the epoch of each
        stream it wrote, per key); ``create``: the create task's result names
        older streams. A push whose older epochs all hold every record it
        wrote (a replica took over since, nothing was re-created) is not
        stale. Each stale one, if in memory, is released; Dask computes it
        again for the seal that waits on it. Returns ``stale``: how many
        keys were, and ``released``.
        """
        assert self.ops.scheduler is not None
        rec = self.coord.runs.for_stream(stream)
        state = self.coord.state
        used_by: dict[Any, dict[str, int]] = {}
        if epochs is not None:
            used_by = {
                as_key(k): used for k, used in zip(keys, epochs)
                if not all(n in state.streams and state.same_records(n, e) for n, e in used.items())
            }
            keys = [k for k in keys if as_key(k) in used_by]
        wanted = [as_key(k) for k in keys]
        if create and rec is not None and rec.spec.create is not None:
            wanted.append(rec.spec.create)
        tasks = self.ops.scheduler.tasks
        recs = {k: "released" for k in wanted if k in tasks and tasks[k].state == "memory"}
        if recs:
            run = rec.run_id if rec is not None else stream
            self._count_stale_rounds(run, recs, used_by)
            # What the first one wrote, and who holds it: enough to tell a loop from a restart.
            first = next(iter(recs))
            spec = state.streams.get(stream)
            logger.warning(
                "aimss: %d result(s) of run %s came from before its restart; computing them again "
                "(first: %r, held by %s, wrote epochs %s; stream %r at epoch %s, first %s, re-created at %s; "
                "create stale: %s)",
                len(recs), run, first,
                sorted(ws.address for ws in tasks[first].who_has or ()), used_by.get(first),
                stream, spec and spec.epoch, spec and spec.first_epoch, state.recreated.get(stream), create,
            )
            self.ops.scheduler.transitions(recs, stimulus_id="aimss-run-stale")
            self.ops.event({"action": "run-stale", "run": run, "released": len(recs)})
        return {"released": len(recs), "stale": len(keys)}

    def _count_stale_rounds(self, run: str, keys: Collection[Any], used_by: Mapping[Any, dict[str, int]]) -> None:
        """Count one more round for each of ``keys`` of ``run``; an error past :data:`MAX_STALE_ROUNDS`.

        A task whose every new execution is stale again (it keeps writing
        under an epoch older than a re-creation) would hold the seal in a
        loop for ever: failing the run says so, and seals nothing short.
        """
        if len(self._stale_rounds) > 10_000:  # forget the runs that ended
            self._stale_rounds = {
                (r, k): n for (r, k), n in self._stale_rounds.items()
                if (found := self.coord.runs.find(r)) is not None and not found.finished
            }
        for k in keys:
            n = self._stale_rounds[(run, k)] = self._stale_rounds.get((run, k), 0) + 1
            if n > MAX_STALE_ROUNDS:
                used = used_by.get(k) or {}
                epochs = {
                    name: (e, self.coord.state.recreated.get(name)) for name, e in used.items()
                }
                raise AIMSSError(
                    f"run {run}: task {k!r} was computed again {n - 1} times, and each result was "
                    f"still written under an older epoch than the partitions its run re-created "
                    f"(stream: (epoch written, epoch re-created) = {epochs}); giving up rather than "
                    "sealing partitions short. This is a bug in aimss_dask: please report it with the "
                    "workers' logs"
                )

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
        return {"applied": self.coord.runs.update(run_id, epoch, who, state=state, progress=progress, error=error)}

    @replies
    async def _h_run_finish(
        self, run_id: str, epoch: int | None = None, state: str = "done", error: list[str] | None = None
    ) -> dict[str, Any]:
        """End a run's epoch (DONE, FAILED with ``error``, or CLOSED); its streams stay as they are.

        ``epoch`` None: the registered one; an unknown run is not an error then.
        """
        if epoch is None:
            rec = self.coord.runs.find(run_id)
            if rec is None:
                return {"finished": False}
            epoch = rec.epoch
        return {"finished": self.coord.runs.finish(run_id, epoch, state, error)}

    async def run_sealed(self, name: str, spec: StreamSpec, on_seal: OnSeal, free_unread: bool) -> None:
        """Stream ``name`` of a run is sealed: apply its run's seal policy."""
        rec = self.coord.runs.for_stream(name)
        assert rec is not None and self.coord.pinner is not None
        out = rec.spec.outputs
        if free_unread and out is not None:
            # Output partitions that no submitted task will read (a partial
            # compute, out.partitions[0]; outputs in memory already, when a
            # finished run ran again for the few Dask lost): free them now.
            unread = set(range(spec.partitions)) - self.coord.pinner.read(out.stream, _WANTED)
            if unread:
                await self.coord.stream_ops.release(spec, sorted(unread))
        if on_seal is OnSeal.REBALANCE and name in self.coord.state.streams:
            await self.rebalance(rec)

    async def rebalance(self, rec: RunRecord) -> None:
        """Even out the bytes each worker holds for an operator's sealed streams.

        Placement was fixed before any data existed; now the sizes are known
        (a hot key makes one partition huge). Partitions move as a group (a
        join's two sides stay together), and the read tasks, which cannot
        have started, are pinned to the new owners.
        """
        assert self.coord.pinner is not None
        group = sorted(rec.spec.streams)
        if not group or not all(n in self.coord.state.sealed for n in group):
            return
        specs = [self.coord.state.get(n) for n in group]
        if any(s.replicas for s in specs):
            # A move would have to carry every copy along (an owner's
            # replica set is placed off the owner's host): replicated
            # streams stay where they were placed.
            return
        owners = specs[0].owners
        sizes = [0] * specs[0].partitions
        for spec in specs:
            for p, st in (await self.coord.stream_ops.partition_stats(spec)).items():
                sizes[p] += st["bytes"]
        # Never onto a worker found slow: it holds little because it is slow.
        new = rebalance(sizes, owners, self.coord.stragglers.avoid(self.ops.running()))
        moves = [p for p in range(len(sizes)) if new[p] != owners[p] and sizes[p] > 0]
        if not moves:
            return
        target = tuple(new[p] if p in moves else owners[p] for p in range(len(owners)))
        # Each partition moves only once it arrived whole (checked at its new
        # owner); one that did not stays where it is, still whole there.
        streams = self.coord.state.streams
        arrived = await copy_group(
            self.ops, specs, target, moves, listed_only=True,
            alive=lambda: all(streams.get(s.name) is s for s in specs),
        )
        if not arrived:
            return
        final = tuple(target[p] if p in arrived else owners[p] for p in range(len(owners)))
        for spec in specs:
            if self.coord.state.streams.get(spec.name) is spec:
                self.coord.state.streams[spec.name] = replace(spec, owners=final)
        self.coord.pinner.repin(group, sorted(arrived))
        for spec in specs:
            for w in sorted({owners[p] for p in arrived}):
                await drop_copies(self.ops, w, spec, sorted(p for p in arrived if owners[p] == w))
        logger.info("aimss: moved %d partition(s) of %s to balance sizes", len(arrived), group)

    def overview(self) -> dict[str, Any]:
        """Every run and stream, with progress from the workers' last heartbeats (no fan-out); the loop's thread."""
        assert self.ops.scheduler is not None
        beats = overview.heartbeats(self.ops.scheduler)
        out = overview.overview(self.coord.runs, self.coord.state.streams, self.coord.state.sealed, self.coord.state.lost, beats)
        out["stragglers"] = self.coord.stragglers.summary()
        out["io"] = self.coord.io.status()
        out["fill"] = self.coord.fill.summary()
        return out

    @replies
    async def _h_runs(self) -> dict[str, Any]:
        """Every run and stream (:meth:`overview`)."""
        return self.overview()
