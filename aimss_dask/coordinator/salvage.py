"""Partitions with no copy left, rebuilt from the spill files their dead owner left on its node (issue 19, item 4.1).

A worker that is killed leaves its spill folder behind. When it owned the
only copy of a partition (``replication=1``), a worker on the same host
takes those files over (:mod:`aimss_dask.log.salvage`): at once if one
runs there (a node with several workers), else the first that starts
there (a nanny restarting the one that died). The coordinator decides what
it takes:

- only partitions of streams no run is writing (a run that keeps what
  survived re-runs the pushes that wrote the lost partitions instead:
  :mod:`~aimss_dask.coordinator.recovery`), and with no copy left;
- from the first offset a consumer still needs on (``aimss.recovery:
  offsets``: the lowest committed offset of the stream's consumer groups,
  and never below what the owner still held); ``full``: from where the
  owner's log started;
- whatever it gets back, the stream goes on under a new epoch with that
  worker as the partition's owner. A partition rebuilt up to its end is no
  longer lost; one whose tail was still in memory when its owner died
  stays lost from the end of the files on, by offsets, and readers that
  reach that point (and writers) get ``PartitionLostError`` naming them.

With ``recovery: offsets``, partitions readers asked for lately
(:mod:`~aimss_dask.coordinator.demand`) come back first, each round
committed as it is done; ``full`` brings all back in one round.

One attempt per dead worker: the files it does not need are removed with
its folder afterwards, once the last round has answered. Event
``partitions-salvaged`` (topic ``"aimss"``), one per stream and round that
brought something back, says what came back: the partitions and their
offsets, what stays lost, the bytes read back and checked, the ``round``
(from 1) and whether it was the ``last``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aimss_dask.coordinator.cluster import ClusterOps

if TYPE_CHECKING:
    from aimss_dask.coordinator.plugin import AIMSS

logger = logging.getLogger("aimss_dask")

#: Dead workers remembered while no worker runs on their host (the oldest go first).
MAX_WAITING = 1024


class Salvages:
    """Dead workers whose spill files may still give back lost partitions, of one coordinator ``coord``."""

    def __init__(self, coord: AIMSS, ops: ClusterOps) -> None:
        self.coord = coord
        self.ops = ops
        #: dead worker -> its host, until a worker there took its files over.
        self.waiting: dict[str, str] = {}
        #: dead worker -> when the coordinator heard (ReadDemand's clock):
        #: readers that asked since then wait on its partitions.
        self._died: dict[str, float] = {}
        #: Workers that said they are closing: they remove their own folders.
        self._closing: set[str] = set()

    def closing(self, worker: str) -> None:
        """``worker`` is closing (not killed): its leaving is no loss of files."""
        self._closing.add(worker)

    def on_worker_lost(self, worker: str, host: str | None) -> None:
        """``worker`` left; killed on ``host`` (None: it left on purpose); its partitions are marked lost already.

        Even with nothing to rebuild, a worker on that host is asked once:
        it removes the folder the dead one left.
        """
        if worker in self._closing:
            self._closing.discard(worker)
            return
        if host is None:
            return
        self.waiting[worker] = host
        self._died[worker] = self.coord.demand.now()
        while len(self.waiting) > MAX_WAITING:
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            self._died.pop(oldest, None)
        self.ops.spawn(self._try(worker))

    def on_worker_running(self, address: str) -> None:
        """``address`` started (or came back): it may take over the files of a worker that died on its host."""
        host = self.ops.hosts().get(address)
        for dead, h in list(self.waiting.items()):
            if h == host:
                self.ops.spawn(self._try(dead, address))

    def _wanted(self, dead: str) -> dict[str, list[list[Any]]]:
        """``{stream: [[partition, first offset needed, end or None], ...]}`` that ``dead`` took along and files may give back."""
        state = self.coord.state
        offsets = self.coord.config.recovery == "offsets"
        out: dict[str, list[list[Any]]] = {}
        for name, lost in state.lost.items():
            spec = state.streams.get(name)
            if spec is None or spec.replicas or name in self.coord.recoveries.recovering:
                continue
            if self.coord.runs.for_stream(name) is not None:
                continue  # a run's: it re-runs what wrote the partition (recovery), or restarts
            parts = []
            for p, (first, end) in sorted(lost.items()):
                if spec.owners[p] != dead or p in state.salvaged.get(name, ()):
                    continue
                need = max(first, state.consumed(name, p)) if offsets else first
                if end is not None and need >= end:
                    continue  # every group read it all: nothing to bring back
                parts.append([p, need, end])
            if parts:
                out[name] = parts
        return out

    async def _try(self, dead: str, worker: str | None = None) -> None:
        """Ask ``worker`` (None: one running on ``dead``'s host) to rebuild what ``dead`` took along."""
        try:
            await self._take_over(dead, worker)
        except Exception:
            logger.exception("aimss: rebuilding the partitions of %s from its spill files failed", dead)

    async def _take_over(self, dead: str, worker: str | None) -> None:
        host = self.waiting.get(dead)
        if host is None:
            return
        if worker is None:
            hosts = self.ops.hosts()
            here = [w for w in self.ops.running() if w != dead and hosts.get(w) == host]
            if not here:
                return  # the next worker to start on that host tries
            worker = here[0]
        del self.waiting[dead]  # one attempt: the worker removes the files it leaves
        died = self._died.pop(dead, None)
        asked: set[tuple[str, int]] = set()
        first = True
        rounds = 0
        while True:
            left = {
                name: [part for part in parts if (name, part[0]) not in asked]
                for name, parts in self._wanted(dead).items()
            }
            wanted, last = self._next_round({name: parts for name, parts in left.items() if parts}, first, died)
            asked.update((name, part[0]) for name, parts in wanted.items() for part in parts)
            rounds += 1
            if not await self._round(dead, worker, wanted, last, rounds) or last:
                return
            first = False

    def _next_round(
        self, left: dict[str, list[list[Any]]], first: bool, died: float | None
    ) -> tuple[dict[str, list[list[Any]]], bool]:
        """What of ``left`` to ask for next, and whether that is the last round.

        ``recovery: full`` brings everything back in one round. With
        ``offsets``, partitions readers asked for since their owner ``died``
        come first, in a round of their own, whenever there are any (a
        waiting reader asks again); a first round with none takes the one
        asked for last (a reader may have asked just before the coordinator
        heard), else the first; then the rest, at once.
        """
        if self.coord.config.recovery != "offsets" or not left:
            return left, True
        demand = self.coord.demand
        now: dict[str, list[list[Any]]] = {}
        for name, parts in left.items():
            by_p = {part[0]: part for part in parts}
            waiting = demand.wanted(name, by_p, since=died)
            if waiting:
                now[name] = [by_p[p] for p in waiting]
        if not now and first:
            best: tuple[float, str, list[Any]] | None = None
            for name, parts in sorted(left.items()):
                for part in parts:
                    t = demand.asked_at(name, part[0])
                    if t is not None and (best is None or t > best[0]):
                        best = (t, name, part)
            if best is None:
                name = min(left)
                now = {name: left[name][:1]}
            else:
                now = {best[1]: [best[2]]}
        if not now:
            return left, True
        rest = sum(len(parts) for parts in left.values()) - sum(len(parts) for parts in now.values())
        return now, rest == 0

    async def _round(
        self, dead: str, worker: str, wanted: dict[str, list[list[Any]]], last: bool, round_: int
    ) -> bool:
        """Ask ``worker`` to rebuild ``wanted`` from ``dead``'s files, and commit what it did; False: it did not answer.

        ``last``: the worker then removes what is left of the folder(s).
        ``round_``: this round's number (from 1), for the event.
        """
        state = self.coord.state
        olds = {name: state.streams[name] for name in wanted}
        # Each stream's new epoch, under which the worker opens what it rebuilds.
        epochs = {name: state.next_epoch() for name in wanted}
        msg_streams = []
        for name, parts in wanted.items():
            old = olds[name]
            asked = {p for p, _, _ in parts}
            owners = tuple(worker if p in asked else o for p, o in enumerate(old.owners))
            msg_streams.append({
                "spec": old.recovered(epochs[name], owners).to_wire(),
                "epochs": [old.first_epoch, old.epoch],
                "parts": parts,
            })
        try:
            reply = await self.ops.ask(
                worker, {"op": "aimss_salvage", "dead": dead, "streams": msg_streams, "last": last}
            )
        except Exception as e:
            logger.warning("aimss: %s could not take over the spill files of %s (%r)", worker, dead, e)
            return False
        logger.info(
            "aimss: %s took over %d spill folder(s) of %s; rebuilt %s",
            worker, (reply or {}).get("folders", 0), dead, sorted((reply or {}).get("streams", {})),
        )
        for name, got in (reply or {}).get("streams", {}).items():
            old = olds.get(name)
            if old is None or not got:
                continue
            rebuilt = {int(p): (int(a), int(b)) for p, a, b, _ in got}
            # Only the partitions it rebuilt move to it; the others stay lost where they were.
            owners = tuple(worker if p in rebuilt else o for p, o in enumerate(old.owners))
            new = old.recovered(epochs[name], owners)
            if not state.commit_salvage(old, new, rebuilt):
                # Changed meanwhile (another salvage of the stream, a move,
                # committed first): on the stream as it is now, if these
                # partitions are still lost where they were. The worker's
                # logs move to the newer epoch with the recovery's word.
                cur = state.streams.get(name)
                still_lost = cur is not None and cur.first_epoch == old.first_epoch and all(
                    p in state.lost.get(name, {}) and cur.owners[p] == dead for p in rebuilt
                )
                if still_lost:
                    assert cur is not None
                    owners = tuple(worker if p in rebuilt else o for p, o in enumerate(cur.owners))
                    new = cur.recovered(state.next_epoch(), owners)
                    still_lost = state.commit_salvage(cur, new, rebuilt)
                if not still_lost:
                    # Destroyed: free what it opened (its epoch and older,
                    # never a newer stream of the name). Taken care of
                    # otherwise: free what it rebuilt, and only that (the
                    # worker may own or copy other partitions of the stream).
                    gone = cur is None or cur.first_epoch != old.first_epoch
                    only = {} if gone else {"partitions": sorted(rebuilt)}
                    await self.ops.broadcast({"op": "aimss_drop", "name": name, "epoch": epochs[name], **only}, [worker])
                    continue
            # Every process forgets the spec it cached; holders answer to the new epoch.
            await self.ops.broadcast({"op": "aimss_recover", "spec": new.to_wire(), "since": new.first_epoch})
            assert self.coord.pinner is not None
            self.coord.pinner.repin([name])
            still = {p: state.lost[name][p] for p in rebuilt if p in state.lost.get(name, {})}
            logger.warning(
                "aimss: stream %r partitions %s rebuilt on %s from the spill files of %s%s",
                name, sorted(rebuilt), worker, dead, f"; still lost: {still}" if still else "",
            )
            self.ops.event({
                "action": "partitions-salvaged", "stream": name, "worker": worker, "dead": dead,
                "partitions": {p: list(r) for p, r in sorted(rebuilt.items())},
                "lost": {p: list(r) for p, r in sorted(still.items())},
                "bytes": sum(int(g[3]) for g in got),
                "round": round_, "last": last,
            })
        return True

    def clear(self) -> None:
        self.waiting.clear()
        self._died.clear()
        self._closing.clear()
