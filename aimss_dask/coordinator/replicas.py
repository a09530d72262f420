"""A worker that held copies of replicated partitions left: replicas take over, new copies are placed.

For every replicated stream the worker held a copy of (issue 19, item 2):

- where it owned a partition, a surviving replica becomes the owner; its log
  holds every record the writers were answered for (the old owner answered
  only once every copy held them), at the same offsets, so consumer groups
  go on from their committed offsets;
- where it held a copy, or a replica was promoted, another worker is placed
  to hold one and catches up from the owner's log in the background
  (:mod:`aimss_dask.node.replication`), while enough workers are left;
- the stream goes on under a new epoch (:meth:`StreamSpec.recovered`):
  writes tagged with the old one still land, writers that were sending to
  the dead owner send again to the new one (:mod:`aimss_dask.transport.producer`),
  and pinned readers move to it.

A partition whose every copy died is lost, as without replication. When
fewer workers are left than a stream's factor, the stream goes on with
fewer copies: a warning event (topic ``"aimss"``, ``under-replicated``) and
``status()["under_replicated"]`` say so; nothing fails.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aimss_dask.coordinator.cluster import ClusterOps
from aimss_dask.core.specs import StreamSpec

if TYPE_CHECKING:
    from aimss_dask.coordinator.plugin import AIMSS

logger = logging.getLogger("aimss_dask")


class Promotions:
    """The replicated streams of one coordinator ``coord`` that are changing hands."""

    def __init__(self, coord: AIMSS, ops: ClusterOps) -> None:
        self.coord = coord
        self.ops = ops
        #: stream -> set once its promotion is applied (or given up).
        self.pending: dict[str, asyncio.Event] = {}
        #: stream -> the spec its last planned promotion makes (until applied):
        #: a second loss plans from it, and applies after it.
        self.planned: dict[str, StreamSpec] = {}

    def on_worker_lost(self, worker: str) -> dict[str, set[int]]:
        """Plan and start the promotions for ``worker``'s copies; the partitions a replica takes over, by stream."""
        state = self.coord.state
        plans = state.promote(
            worker, [w for w in self.ops.running() if w != worker], self.ops.hosts(), planned=self.planned
        )
        kept: dict[str, set[int]] = {}
        for old, new in plans:
            took = {p for p in range(old.partitions) if old.owners[p] == worker and new.owners[p] != worker}
            if took:
                kept[old.name] = took
            self._start(worker, old, new, frozenset(took))
        return kept

    def _start(self, worker: str | None, old: StreamSpec, new: StreamSpec, kept: frozenset[int] = frozenset()) -> None:
        """Apply ``old -> new`` in the background, after the promotion of that stream under way, if any.

        ``kept``: the partitions ``worker``'s removal was told a copy takes
        over (the others it named lost then).
        """
        before = self.pending.get(old.name)
        mine = self.pending[old.name] = asyncio.Event()
        self.planned[old.name] = new
        self.ops.spawn(self._apply(worker, old, new, mine, before, kept))

    def _replan(self, worker: str, name: str, kept: frozenset[int]) -> None:
        """Plan the loss of ``worker`` again for stream ``name``, from its committed spec."""
        planned = {n: s for n, s in self.planned.items() if n != name}
        running = [w for w in self.ops.running() if w != worker]
        for old, new in self.coord.state.promote(worker, running, self.ops.hosts(), planned=planned, names=[name]):
            self._start(worker, old, new, kept)

    def fill(self) -> int:
        """Place new copies of partitions left short by an earlier loss (a worker joined); streams changed."""
        state = self.coord.state
        plans = state.fill(self.ops.running(), self.ops.hosts(), skip=self.pending)
        for old, new in plans:
            self._start(None, old, new)
        return len(plans)

    async def settled(self, name: str) -> None:
        """Wait until no promotion of ``name`` is under way."""
        ev = self.pending.get(name)
        if ev is not None:
            await ev.wait()

    async def _apply(
        self,
        worker: str | None,
        old: StreamSpec,
        new: StreamSpec,
        mine: asyncio.Event,
        before: asyncio.Event | None = None,
        kept: frozenset[int] = frozenset(),
    ) -> None:
        """Open the new copies, then switch every process to ``new``; ``worker``: the one lost (None: copies added).

        ``mine`` is set once this is over; ``before``, once the promotion of
        the same stream planned before this one is (this one starts from its spec).
        """
        state = self.coord.state
        fresh: dict[str, list[int]] = {}  # worker -> partitions it gets a new copy of
        for p in range(new.partitions):
            for w in new.replicas_of(p):
                if w not in old.holders(p):
                    fresh.setdefault(w, []).append(p)
        try:
            if before is not None:
                await before.wait()
            # Not before the stream is open on its owners (see StreamHandlers.opened).
            await self.coord.stream_ops.opened(old.name)
            rec = self.coord.runs.for_stream(old.name)
            inputs = rec.spec.inputs if rec is not None and not rec.finished else 0
            msg = {"op": "aimss_recover", "spec": new.to_wire(), "since": new.first_epoch, "inputs": inputs}
            # New copies first, empty, so that their owner's catch-up finds them.
            for w, ps in fresh.items():
                try:
                    await self.ops.ask(w, {**msg, "partitions": ps})
                except Exception as e:
                    # Gone too (a host lost): that copy never counts as in
                    # sync, and its worker's removal places another.
                    logger.info("aimss: no new copy of %r on %s (%r)", old.name, w, e)
            # Then everyone: holders answer to the new epoch (a replica that
            # owns its partition now starts forwarding), and every process
            # forgets the spec it cached.
            await self.ops.broadcast(msg)
            if not state.commit_promotion(old, new):
                if worker is not None and before is not None and old.name in state.streams:
                    # Planned from a promotion that did not apply: planned
                    # again from what holds, or ``worker``'s partitions
                    # would be neither taken over nor named lost.
                    self._replan(worker, old.name, kept)
                return  # else destroyed meanwhile: its drop took these logs too
            after_all = frozenset(p for p in kept if new.owners[p] == worker)
            if worker is not None and after_all:
                # Planned after another loss not yet applied, with no copy in
                # sync left: lost, named, as the loss itself would have. Not
                # those it named lost already: their runs are recovering.
                state.worker_lost(worker)
                self.coord.lost_after_all(worker, old.name, after_all)
        except Exception as e:
            if worker is None:
                # The stream goes on with the copies it had; a later join tries again.
                logger.warning("aimss: new copies of stream %r could not be placed (%r)", old.name, e)
                return
            logger.warning("aimss: replicas of stream %r could not take over (%r); its partitions there are lost", old.name, e)
            if state.streams.get(old.name) is old:
                state.worker_lost(worker)
                if kept:
                    self.coord.lost_after_all(worker, old.name, kept)
            return
        finally:
            if self.pending.get(old.name) is mine:
                del self.pending[old.name]
            if self.planned.get(old.name) is new:
                del self.planned[old.name]
            mine.set()
        if worker is not None:
            # A worker that joined while this was under way was skipped by
            # its own fill (this stream was pending): partitions left short
            # here get their copies now, not at the next join.
            self.fill()
        assert self.coord.pinner is not None
        placed = sorted(fresh)
        if worker is None:
            logger.info("aimss: stream %r gets new copies on %s", old.name, placed)
            self.ops.event({"action": "replicas-added", "stream": old.name, "workers": placed})
            return
        self.coord.pinner.repin([new.name])
        took = sorted(p for p in range(old.partitions) if old.owners[p] == worker and new.owners[p] != worker)
        short = sorted(p for p in range(new.partitions) if len(new.holders(p)) < old.replication)
        logger.warning(
            "aimss: stream %r lost the copies on %s; partitions %s now owned by a replica, new copies placed on %s",
            old.name, worker, took, placed,
        )
        self.ops.event({"action": "replicas-promoted", "stream": old.name, "worker": worker, "partitions": took})
        if short:
            logger.warning("aimss: stream %r has fewer than %d copies of partitions %s", old.name, old.replication, short)
            self.ops.event({
                "action": "under-replicated", "stream": old.name, "partitions": short,
                "copies": old.replication, "workers": len(self.ops.running()),
            })

    def under_replicated(self) -> dict[str, list[int]]:
        """Streams with partitions that hold fewer copies than their factor, by stream."""
        out = {}
        for name, spec in self.coord.state.streams.items():
            if not spec.replicas:
                continue
            short = [p for p in range(spec.partitions) if len(spec.holders(p)) < spec.replication]
            if short:
                out[name] = short
        return out

    def clear(self) -> None:
        for ev in self.pending.values():
            ev.set()
        self.pending.clear()
        self.planned.clear()
