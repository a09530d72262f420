"""Graceful retirement: a worker that leaves on purpose hands its partitions over first.

Dask marks a worker it is about to retire ``closing_gracefully``
(``client.retire_workers``, adaptive scale-down, a dask-jobqueue worker at
the end of its lifetime all go through ``Scheduler.retire_workers``) and
logs that change as an event, which the coordinator hears in its
``log_event`` hook. It then moves every sealed partition the worker owns to
the running workers, verifies that each arrived whole, switches the owners
and pins the readers there. Dask may remove the worker before the moves are
done: the coordinator's ``remove_worker`` hook waits for them, and the
worker's teardown finishes the moves under way before it closes.

An open partition (its producers still write) cannot move without losing
the records in flight: it stays, and is lost, named, when the worker goes.
Adaptive scale-down does not pick a worker that owns one (see
:meth:`Evacuations.keep`).

A replicated stream does not move: when the worker goes, a copy in sync
takes over each partition it owned, open or sealed, and another worker
gets a new copy (:mod:`~aimss_dask.coordinator.replicas`). Scale-down never
picks at once every worker that holds a copy in sync of one partition.

A worker closed without a retirement (a cluster manager closing its
nanny: ``LocalCluster.scale`` down) asks for the same moves from its
teardown (``aimss_evacuate``), within the time its nanny gives it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from distributed.core import Status

from aimss_dask.coordinator.cluster import ClusterOps
from aimss_dask.coordinator.moves import copy_group, drop_copies
from aimss_dask.coordinator.placement import place_partitions
from aimss_dask.core.runs import RUNS_AGAIN
from aimss_dask.transport.rpc import replies

if TYPE_CHECKING:
    from aimss_dask.coordinator.plugin import AIMSS

logger = logging.getLogger("aimss_dask")

#: Longest ``remove_worker`` waits for a retiring worker's moves (s).
EVACUATE_TIMEOUT = 600.0


class Evacuations:
    """The retirements under way: worker address -> the task moving its partitions away."""

    def __init__(self, coord: AIMSS, ops: ClusterOps) -> None:
        self.coord = coord
        self.ops = ops
        self.pending: dict[str, asyncio.Task[int]] = {}
        #: worker -> ``(streams, partitions)`` moved off it, until it is gone.
        self.moved: dict[str, list[tuple[list[str], list[int]]]] = {}
        self._one_at_a_time: asyncio.Lock | None = None

    def owned(self, worker: str) -> dict[str, list[int]]:
        """Stream name -> the partitions ``worker`` owns."""
        out = {}
        for name, spec in self.coord.state.streams.items():
            ps = [p for p, w in enumerate(spec.owners) if w == worker]
            if ps:
                out[name] = ps
        return out

    def begin(self, worker: str) -> None:
        """``worker`` is closing gracefully: move its partitions away, in the background."""
        if worker in self.pending or not self._groups(worker):
            return
        # Before Dask's "close" on the same stream: the worker's teardown
        # waits for the moves (see AIMSSWorker._finish_moves).
        if not self.ops.tell(worker, {"op": "aimss_retiring"}):
            return
        task = asyncio.ensure_future(self._evacuate(worker))
        self.pending[worker] = task
        task.add_done_callback(self._done)

    @replies
    async def _h_evacuate(self, worker: str) -> dict[str, Any]:
        """A worker closes without Dask retiring it (a cluster manager closing its nanny): move its partitions now.

        Answers once they are moved (or could not be): the worker's teardown
        waits for this before it lets go of its log. Nothing moves while the
        whole cluster is shutting down.
        """
        assert self.ops.scheduler is not None
        if self.ops.scheduler.status != Status.running:
            return {"moved": 0}
        # Another worker's partitions may be on their way here: once they
        # are, they are this worker's to hand on.
        others = [t for w, t in self.pending.items() if w != worker]
        if others:
            await asyncio.wait(others)
        self.begin(worker)
        task = self.pending.get(worker)
        return {"moved": 0 if task is None else await asyncio.shield(task)}

    def _done(self, task: asyncio.Task[int]) -> None:
        # A retirement called off (Dask found nowhere for its keys) leaves
        # the moved partitions where they are now: as good a place as any.
        for w, t in list(self.pending.items()):
            if t is task:
                del self.pending[w]
        if not task.cancelled() and task.exception() is not None:
            logger.error("aimss: moving a retiring worker's partitions failed: %r", task.exception())

    async def wait(self, worker: str) -> None:
        """Until ``worker``'s partitions have moved (or could not); never raises.

        Then pins their readers to the new owners once more: those that
        were running on ``worker`` kept it (a running task is not moved)
        and Dask has just handed them back.
        """
        task = self.pending.pop(worker, None)
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), EVACUATE_TIMEOUT)
            except (Exception, asyncio.CancelledError):  # logged by _done; the loss is named next
                pass
        assert self.coord.pinner is not None
        for group, done in self.moved.pop(worker, []):
            self.coord.pinner.repin(group, done, stimulus_id="aimss-retired")

    def keep(self, workers: list[Any]) -> list[Any]:
        """Of the workers Dask would close to scale down, those it may: none that owns an open partition.

        Sealed partitions move before a worker goes; an open one cannot, so
        its owner stays until the stream is sealed. ``workers``: Dask's
        ``WorkerState`` objects.
        """
        state = self.coord.state
        busy = {
            w
            for name, spec in state.streams.items()
            if not spec.replicas and (name not in state.sealed or self._restarts(name))
            for p, w in enumerate(spec.owners)
            if p not in state.lost.get(name, {})
        }
        out = []
        leaving: set[str] = set()
        for ws in workers:
            if ws.address in busy:
                continue
            trial = leaving | {ws.address}
            if self._copies_stay(ws.address, trial):
                out.append(ws)
                leaving = trial
        return out

    def _copies_stay(self, worker: str, leaving: set[str]) -> bool:
        """Every replicated partition ``worker`` holds keeps a copy in sync off ``leaving``."""
        state = self.coord.state
        for name, spec in state.streams.items():
            if not spec.replicas:
                continue
            for p in range(spec.partitions):
                holders = spec.holders(p)
                if worker in holders and p not in state.lost.get(name, {}) and not any(
                    w not in leaving and state.in_sync(name, p, w) for w in holders
                ):
                    return False
        return True

    def _restarts(self, name: str) -> bool:
        """Stream ``name`` belongs to a run in flight that runs again when a worker leaves.

        Such a run starts over once the worker is gone (see
        :meth:`~aimss_dask.coordinator.runs.RunHandlers.restart_runs`), so
        moving its partitions first would be wasted.
        """
        rec = self.coord.runs.for_stream(name)
        return rec is not None and not rec.finished and rec.spec.on_loss in RUNS_AGAIN

    async def _evacuate(self, worker: str) -> int:
        """Move every sealed partition of ``worker`` to running workers; partitions moved."""
        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Lock()
        # One retirement at a time: a worker that starts to close while
        # another's partitions move to it hands them on once they are there,
        # instead of closing under them.
        async with self._one_at_a_time:
            return await self._evacuate_now(worker)

    async def _evacuate_now(self, worker: str) -> int:
        started = time.monotonic()
        moved = 0
        left_open: list[str] = []
        try:
            for group in self._groups(worker):
                # As they are now: a stream of the group destroyed during an
                # earlier move is no reason to leave the others' partitions.
                live = [n for n in group if n in self.coord.state.streams]
                if not live:
                    continue
                if not all(n in self.coord.state.sealed for n in live):
                    left_open.extend(live)
                    continue
                moved += await self._move_group(worker, live)
        finally:
            try:
                await self.ops.ask(worker, {"op": "aimss_retired"})
            except Exception as e:  # gone already: nothing waits any more
                logger.info("aimss: could not tell %s its moves are done: %r", worker, e)
        if left_open:
            logger.warning(
                "aimss: retiring worker %s owns partitions of open streams %s; they cannot move "
                "while written and are lost when it leaves (seal streams before scaling down)",
                worker,
                left_open,
            )
        logger.info(
            "aimss: moved %d partition(s) off retiring worker %s in %.2fs", moved, worker, time.monotonic() - started
        )
        return moved

    def _groups(self, worker: str) -> list[list[str]]:
        """The streams ``worker`` owns partitions of, in groups that move together.

        The streams of one run (a join's two sides) are placed alike so
        that a read finds both sides locally: they move alike too.
        """
        seen: set[str] = set()
        groups = []
        for name in sorted(self.owned(worker)):
            if name in seen or self._restarts(name) or self.coord.state.streams[name].replicas:
                continue  # a replicated stream's copies take over when the worker goes
            rec = self.coord.runs.for_stream(name)
            group = sorted(n for n in rec.spec.streams if n in self.coord.state.streams) if rec else [name]
            if name not in group:
                group = [name]
            seen.update(group)
            groups.append(group)
        return groups

    async def _move_group(self, worker: str, group: list[str]) -> int:
        state = self.coord.state
        specs = [state.streams[n] for n in group]
        lead = specs[0]
        parts = [p for p, w in enumerate(lead.owners) if w == worker and p not in state.lost.get(lead.name, {})]
        targets = [w for w in self.ops.running() if w != worker and w not in self.pending]
        if not parts:
            return 0
        if not targets:
            logger.warning("aimss: no running worker can take the partitions of %s from %s", group, worker)
            return 0
        load = dict.fromkeys(targets, 0)
        for spec in state.streams.values():
            for w in spec.owners:
                if w in load:
                    load[w] += 1
        new = dict(zip(parts, place_partitions(len(parts), load)))
        owners = tuple(new.get(p, w) for p, w in enumerate(lead.owners))
        streams = state.streams
        arrived = await copy_group(
            self.ops, specs, owners, parts, alive=lambda: all(streams.get(s.name) is s for s in specs)
        )
        # Only to targets still listed: one that died during the copy is the
        # owner of nothing (its removal looked at the old owners), and the
        # source's copy must stay. (One that is retiring in turn is still
        # listed, and hands them on.)
        listed = set(self.ops.workers())
        arrived = {p for p in arrived if owners[p] in listed}
        done = sorted(arrived)
        for spec in specs:
            current = state.streams.get(spec.name)
            if current is None or current.epoch != spec.epoch:
                continue  # destroyed meanwhile
            # Partitions that did not arrive whole stay with the old owner.
            state.streams[spec.name] = replace(
                current, owners=tuple(owners[p] if p in arrived else w for p, w in enumerate(current.owners))
            )
        assert self.coord.pinner is not None
        self.coord.pinner.repin(group, done, stimulus_id="aimss-retire")
        if done:
            self.moved.setdefault(worker, []).append((group, done))
            # Readers now go to the new owners: the old copies can go.
            for spec in specs:
                await drop_copies(self.ops, worker, spec, done)
        return len(done)
