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

An owner may also give up on a copy on a live worker (its catch-up failed,
it refused records, it could not be reached for a while): the stream stops
listing that copy and places a new, empty one that catches up
(:meth:`Promotions.copy_given_up`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aimss_dask.coordinator.cluster import ClusterOps
from aimss_dask.core.specs import StreamSpec

if TYPE_CHECKING:
    from aimss_dask.coordinator.plugin import AIMSS

logger = logging.getLogger("aimss_dask")

#: A worker whose copies of one stream its owners gave up on this many
#: times within :data:`GIVE_UP_WINDOW` seconds gets no new copy of it: a
#: copy that fails at once every time would otherwise be placed again and
#: again. It may get one again once the window has passed.
GIVE_UP_LIMIT = 3
GIVE_UP_WINDOW = 300.0
#: Seconds a copy given up on waits to be replaced: an owner gives up on
#: the copies of a worker killed a moment ago too, and the scheduler's
#: removal of that worker (which promotes and places copies) comes first.
GIVE_UP_DELAY = 2.0


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
        #: stream -> ``(partition, replica)`` copies its owners gave up on,
        #: to replace once no promotion of it is under way.
        self.given_up: dict[str, set[tuple[int, str]]] = {}
        #: ``(stream, worker)`` -> when owners gave up on its copies lately.
        self._give_ups: dict[tuple[str, str], list[float]] = {}

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

    def _start(
        self,
        worker: str | None,
        old: StreamSpec,
        new: StreamSpec,
        kept: frozenset[int] = frozenset(),
        renew: frozenset[tuple[int, str]] = frozenset(),
    ) -> None:
        """Apply ``old -> new`` in the background, after the promotion of that stream under way, if any.

        ``kept``: the partitions ``worker``'s removal was told a copy takes
        over (the others it named lost then). ``renew``: ``(partition,
        replica)`` copies ``old`` lists too that start again, empty.
        """
        before = self.pending.get(old.name)
        mine = self.pending[old.name] = asyncio.Event()
        self.planned[old.name] = new
        self.ops.spawn(self._apply(worker, old, new, mine, before, kept, renew))

    def _replan(self, worker: str, name: str, kept: frozenset[int]) -> None:
        """Plan the loss of ``worker`` again for stream ``name``, from its committed spec."""
        planned = {n: s for n, s in self.planned.items() if n != name}
        running = [w for w in self.ops.running() if w != worker]
        for old, new in self.coord.state.promote(worker, running, self.ops.hosts(), planned=planned, names=[name]):
            self._start(worker, old, new, kept)

    def copy_given_up(self, name: str, epoch: int, p: int, replica: str) -> None:
        """The owner of partition ``p`` of ``name`` (at ``epoch``) gave up on its copy on ``replica``: replace it.

        Ignored when ``replica`` left (its removal places copies) or the
        word is older than the stream's epoch (an owner that hears of a
        newer one tries the copies it lists again by itself).
        """
        spec = self.coord.state.streams.get(name)
        if spec is None or epoch < spec.epoch or replica not in self.ops.running():
            return
        self.given_up.setdefault(name, set()).add((p, replica))

        async def later() -> None:
            await asyncio.sleep(GIVE_UP_DELAY)
            self.replace_given_up()

        self.ops.spawn(later())

    def replace_given_up(self) -> None:
        """Replace the copies owners gave up on, in streams that no promotion is changing now."""
        state = self.coord.state
        now = time.monotonic()
        self._give_ups = {k: v for k, v in self._give_ups.items() if k[0] in state.streams}
        running = self.ops.running()
        for name in [n for n in self.given_up if n not in self.pending]:
            pairs = {(p, w) for p, w in self.given_up.pop(name) if w in running}
            if not pairs:
                continue
            for w in {w for _, w in pairs}:
                self._give_ups[(name, w)] = [t for t in self._give_ups.get((name, w), []) if now - t < GIVE_UP_WINDOW]
                self._give_ups[(name, w)].append(now)
            avoid = [w for (n, w), ts in self._give_ups.items() if n == name and len(ts) >= GIVE_UP_LIMIT]
            plan = state.replace_copies(name, pairs, running, self.ops.hosts(), avoid=avoid)
            if plan is None:
                continue
            old, new = plan
            renew = frozenset((p, w) for p, w in pairs if w in new.replicas_of(p))
            copies = sorted([p, w] for p, w in pairs if w in old.replicas_of(p))
            logger.warning(
                "aimss: stream %r: owners gave up on the copies %s (partition, worker); new copies %s",
                name, copies, [list(new.replicas_of(p)) for p, _ in copies],
            )
            self.ops.event({"action": "replicas-given-up", "stream": name, "copies": copies, "avoided": sorted(avoid)})
            self._start(None, old, new, renew=renew)

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
        renew: frozenset[tuple[int, str]] = frozenset(),
    ) -> None:
        """Open the new copies, then switch every process to ``new``; ``worker``: the one lost (None: copies added).

        ``mine`` is set once this is over; ``before``, once the promotion of
        the same stream planned before this one is (this one starts from its spec).
        """
        state = self.coord.state
        fresh: dict[str, list[int]] = {}  # worker -> partitions it gets a new copy of
        for p in range(new.partitions):
            for w in new.replicas_of(p):
                if w not in old.holders(p) or (p, w) in renew:
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
            # Left on ``worker``, no copy in sync to take over: lost, named, as
            # the loss itself would have. Those its removal was told a copy
            # takes over (planned after another loss not yet applied), and
            # those that loss's promotion, not applied when ``worker`` left,
            # had just made ``worker``'s: its removal looked at the committed
            # spec, where another owned them, and named neither. Not those it
            # named lost already: their runs are recovering.
            named = set(state.lost.get(old.name, {}))
            after_all = frozenset(
                p for p in range(new.partitions) if new.owners[p] == worker and (p in kept or p not in named)
            )
            if worker is not None and after_all:
                state.worker_lost(worker, only={old.name: after_all})
                self.coord.lost_after_all(worker, old.name, after_all)
            # Copies no longer listed on workers still here (given up on):
            # their logs would hold memory that nothing reads.
            running = set(self.ops.running())
            unlisted: dict[str, list[int]] = {}
            for p in range(new.partitions):
                for w in old.replicas_of(p):
                    if w in running and w not in new.holders(p):
                        unlisted.setdefault(w, []).append(p)
            for w, ps in unlisted.items():
                await self.ops.broadcast(
                    {"op": "aimss_drop", "name": new.name, "epoch": new.epoch, "partitions": ps}, [w]
                )
        except Exception as e:
            if worker is None:
                # The stream goes on with the copies it had; a later join tries again.
                logger.warning("aimss: new copies of stream %r could not be placed (%r)", old.name, e)
                return
            logger.warning("aimss: replicas of stream %r could not take over (%r); its partitions there are lost", old.name, e)
            if state.streams.get(old.name) is old:
                state.worker_lost(worker, only={old.name: None})
                if kept:
                    self.coord.lost_after_all(worker, old.name, kept)
            return
        finally:
            if self.pending.get(old.name) is mine:
                del self.pending[old.name]
            if self.planned.get(old.name) is new:
                del self.planned[old.name]
            mine.set()
            if old.name in self.given_up:
                try:  # those that came while this was under way
                    self.replace_given_up()
                except Exception:
                    logger.exception("aimss: replacing the copies given up on of %r failed", old.name)
        if worker is not None:
            # A worker that joined while this was under way was skipped by
            # its own fill (this stream was pending): partitions left short
            # here get their copies now, not at the next join.
            self.fill()
        assert self.coord.pinner is not None
        placed = sorted(fresh)
        if worker is None:
            if placed:
                logger.info("aimss: stream %r gets new copies on %s", old.name, placed)
                self.ops.event({"action": "replicas-added", "stream": old.name, "workers": placed})
            # Copies given up on with no worker free for new ones.
            short = sorted(
                p for p in range(new.partitions) if len(new.holders(p)) < min(len(old.holders(p)), old.replication)
            )
            self._say_short(old, short)
            return
        self.coord.pinner.repin([new.name])
        took = sorted(p for p in range(old.partitions) if old.owners[p] == worker and new.owners[p] != worker)
        short = sorted(p for p in range(new.partitions) if len(new.holders(p)) < old.replication)
        logger.warning(
            "aimss: stream %r lost the copies on %s; partitions %s now owned by a replica, new copies placed on %s",
            old.name, worker, took, placed,
        )
        self.ops.event({"action": "replicas-promoted", "stream": old.name, "worker": worker, "partitions": took})
        self._say_short(old, short)

    def _say_short(self, old: StreamSpec, short: list[int]) -> None:
        """Warn (log and event) that stream ``old`` holds fewer copies than its factor of ``short`` partitions."""
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
        self.given_up.clear()
        self._give_ups.clear()
