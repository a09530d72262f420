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

    def on_worker_lost(self, worker: str) -> dict[str, set[int]]:
        """Plan and start the promotions for ``worker``'s copies; the partitions a replica takes over, by stream."""
        state = self.coord.state
        plans = state.promote(worker, [w for w in self.ops.running() if w != worker], self.ops.hosts())
        kept: dict[str, set[int]] = {}
        for old, new in plans:
            took = {p for p in range(old.partitions) if old.owners[p] == worker and new.owners[p] != worker}
            if took:
                kept[old.name] = took
            self.pending[old.name] = asyncio.Event()
            self.ops.spawn(self._apply(worker, old, new))
        return kept

    async def settled(self, name: str) -> None:
        """Wait until no promotion of ``name`` is under way."""
        ev = self.pending.get(name)
        if ev is not None:
            await ev.wait()

    async def _apply(self, worker: str, old: StreamSpec, new: StreamSpec) -> None:
        state = self.coord.state
        try:
            rec = self.coord.runs.for_stream(old.name)
            inputs = rec.spec.inputs if rec is not None and not rec.finished else 0
            msg = {"op": "aimss_recover", "spec": new.to_wire(), "since": new.first_epoch, "inputs": inputs}
            # New copies first, empty, so that their owner's catch-up finds them.
            fresh: dict[str, list[int]] = {}
            for p in range(new.partitions):
                for w in new.replicas_of(p):
                    if w not in old.holders(p):
                        fresh.setdefault(w, []).append(p)
            for w, ps in fresh.items():
                await self.ops.ask(w, {**msg, "partitions": ps})
            # Then everyone: holders answer to the new epoch (a replica that
            # owns its partition now starts forwarding), and every process
            # forgets the spec it cached.
            await self.ops.broadcast(msg)
            if not state.commit_promotion(old, new):
                return  # destroyed meanwhile: its drop took these logs too
        except Exception as e:
            logger.warning("aimss: replicas of stream %r could not take over (%r); its partitions there are lost", old.name, e)
            if state.streams.get(old.name) is old:
                state.worker_lost(worker)
            return
        finally:
            ev = self.pending.pop(old.name, None)
            if ev is not None:
                ev.set()
        assert self.coord.pinner is not None
        self.coord.pinner.repin([new.name])
        took = sorted(p for p in range(old.partitions) if old.owners[p] == worker and new.owners[p] != worker)
        short = sorted(p for p in range(new.partitions) if len(new.holders(p)) < old.replication)
        logger.warning(
            "aimss: stream %r lost the copies on %s; partitions %s now owned by a replica, new copies placed on %s",
            old.name, worker, took,
            sorted({w for p in range(new.partitions) for w in new.replicas_of(p) if w not in old.holders(p)}),
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
