"""Recovery that keeps what survived: a run in its map phase re-creates only the partitions it lost.

A run whose policy is :attr:`~aimss_dask.core.runs.OnLoss.RECOVER` (a
shuffle, a merge, a rechunk) and whose streams are still being written
when a worker dies does not start over:

- Partitions that survive keep their records. Each stream continues under
  a new epoch (:meth:`~aimss_dask.core.specs.StreamSpec.recovered`): owners
  take writes tagged with the old epoch or the new one, and their filters
  still know which inputs they hold (:mod:`aimss_dask.node.dedup`).
- The lost partitions are opened, empty, on running workers.
- The pushes that could have written to them run again: every push task
  in memory once partitions were lost; only the ones that finished on the
  dead worker when none was (their records still in its send buffers died
  with it). Owners drop the copies they already hold, first copy wins.
  Pushes still running, or that finish at the old epoch afterwards, are
  found stale at the seal (``aimss_run_stale``) and run again then.
- A push that finished on a worker that is still there sent its records
  to the surviving partitions already (or they are in that worker's send
  buffers, and a write that fails there fails the seal): it runs again
  for the re-created partitions only (``aimss_run_refill``).
- A push that finished on the dead worker may have died with records in
  its send buffers, to any partition. Dask runs it again (its result died
  too); that execution asks the owners of every partition, and their
  copies in sync, which inputs they hold
  (:meth:`~aimss_dask.node.dedup.OriginFilter.held`, one snapshot per
  stream and epoch) and writes only the partitions that lack its own on
  one of them. A record counts as held only where every copy that may take
  over holds it, so whichever does has it too (a copy still catching up
  gets the owner's whole log); where anything is unknown (no answer, a
  newer epoch meanwhile) it writes everything.

Anything else (a stream already sealed or being sealed, a recovery that
fails) falls back to restarting the run from its create task
(:meth:`~aimss_dask.coordinator.runs.RunHandlers.restart`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from aimss_dask.coordinator.cluster import ClusterOps
from aimss_dask.coordinator.placement import add_replicas, owners_load
from aimss_dask.coordinator.registry import RunRecord
from aimss_dask.core.errors import AIMSSError
from aimss_dask.core.runs import OnLoss, RunState

if TYPE_CHECKING:
    from aimss_dask.coordinator.plugin import AIMSS

logger = logging.getLogger("aimss_dask")

#: Scheduler states of a barrier whose seal has not ended the stream yet.
_BEFORE_SEAL = frozenset({"waiting", "no-worker", "queued", "processing", "released"})

#: How long a push run again waits for the owners' word on what they hold
#: before it writes everything instead.
HELD_TIMEOUT = 10.0


def _has(bitmap: bytes | None, i: int) -> bool:
    """Whether bit ``i`` of ``bitmap`` (see :meth:`~aimss_dask.node.dedup.OriginFilter.held`) is set."""
    return bitmap is not None and i >> 3 < len(bitmap) and bool(bitmap[i >> 3] >> (i & 7) & 1)


def _both(a: bytes, b: bytes) -> bytes:
    """The bits set in both bitmaps."""
    return bytes(x & y for x, y in zip(a, b))


def _place_recreated(parts: list[int], specs: list[Any], load: dict[str, int]) -> list[str]:
    """Owners for the lost ``parts`` of ``specs`` (placed alike): least loaded, not a worker holding a copy of it.

    A copy there is one still catching up (an in-sync one would have taken
    over): re-created on another worker, it stays a copy (emptied, then
    caught up from the new log), and the partition keeps its factor.
    ``load`` is updated.

    Examples
    --------
    >>> from aimss_dask.core.specs import StreamSpec
    >>> s = StreamSpec(name="s", partitions=2, owners=("x", "x"), epoch=2, replicas=(("a",), ("b",)), replication=2)
    >>> _place_recreated([0, 1], [s], {"a": 0, "b": 0, "c": 5})
    ['b', 'a']
    """
    out = []
    for p in parts:
        # Placed as a copy would be (least loaded, not a holder), or anywhere when every worker holds one.
        copies = [w for s in specs for w in s.replicas_of(p)]
        out.append((add_replicas(copies, 1, load) or add_replicas([], 1, load))[0])
    return out


class Recoveries:
    """Which worker finished each push of a run, and the recoveries under way, of one coordinator ``coord``."""

    def __init__(self, coord: AIMSS, ops: ClusterOps) -> None:
        self.coord = coord
        self.ops = ops
        #: Streams whose lost partitions are being re-created: not sealable.
        self.recovering: set[str] = set()
        # push key -> run id, for the runs that recover (see watch()).
        self._push_of: dict[Any, str] = {}
        # run id -> worker -> keys of its pushes that finished there.
        self._ran_on: dict[str, dict[str, set[Any]]] = {}
        # push key -> the only partitions its next execution must write.
        self._refill: dict[Any, set[int]] = {}
        # push key that finished on a worker that died -> partitions its next
        # execution writes besides those lacking its input (re-created ones).
        self._probe: dict[Any, set[int]] = {}
        # (stream, epoch) -> the owners' and copies' word on the inputs each
        # partition holds (see held()).
        self._held: dict[tuple[str, int], asyncio.Task[dict[int, bytes]]] = {}

    # -- bookkeeping (hooks: O(1)) ------------------------------------------------------

    def watch(self, rec: RunRecord) -> None:
        """``rec`` registered: note its push tasks (the barrier's dependencies but the create)."""
        scheduler = self.ops.scheduler
        spec = rec.spec
        if scheduler is None or spec.on_loss is not OnLoss.RECOVER or spec.barrier is None:
            return
        self._prune()
        barrier = scheduler.tasks.get(spec.barrier)
        if barrier is None:
            return
        for ts in barrier.dependencies:
            if ts.key != spec.create:
                self._push_of[ts.key] = rec.run_id
        self._ran_on.setdefault(rec.run_id, {})

    def task_finished(self, key: Any, worker: str | None) -> None:
        """The scheduler's ``processing -> memory`` of ``key`` on ``worker``."""
        run_id = self._push_of.get(key)
        if run_id is not None and worker is not None:
            self._ran_on.setdefault(run_id, {}).setdefault(worker, set()).add(key)

    def _prune(self) -> None:
        """Forget the pushes of runs that are over (called as runs register: bounded by the runs in flight)."""
        over = [r for r in self._ran_on if (rec := self.coord.runs.find(r)) is None or rec.finished]
        if not over:
            return
        gone = set(over)
        for r in over:
            del self._ran_on[r]
        self._push_of = {k: r for k, r in self._push_of.items() if r not in gone}
        self._refill = {k: ps for k, ps in self._refill.items() if k in self._push_of}
        self._probe = {k: ps for k, ps in self._probe.items() if k in self._push_of}
        streams = self.coord.state.streams
        for k in [k for k in self._held if k[0] not in streams or streams[k[0]].epoch != k[1]]:
            self._held.pop(k).cancel()

    async def refill(self, key: Any, stream: str, epoch: int, input_id: int | None = None) -> list[int] | None:
        """The partitions push ``key`` (of input ``input_id``) must write to ``stream`` at ``epoch``; None: all.

        Those a recovery re-created, for a push that finished on a worker
        still there; for one that finished on a worker that died, those
        and the ones where some copy lacks its input (:meth:`held`).
        Asked once per execution, which consumes the answer: any later
        execution writes everything. An execution that holds an older
        ``epoch`` than the stream's writes everything (and is found stale
        at the seal).
        """
        spec = self.coord.state.streams.get(stream)
        if spec is None or spec.epoch != epoch or self._push_of.get(key) is None:
            return None
        ps = self._refill.pop(key, None)
        extra = self._probe.pop(key, None)
        if extra is None:
            return None if ps is None else sorted(ps)
        if input_id is None:
            return None
        held = await self.held(stream, epoch)
        if self.coord.state.streams.get(stream) is not spec:
            return None  # recovered or replaced meanwhile: the answer is of an older epoch
        out = [p for p in range(spec.partitions) if p in extra or not _has(held.get(p), input_id)]
        self.ops.event({
            "action": "push-refilled", "stream": stream, "key": str(key), "input": input_id,
            "written": len(out), "partitions": spec.partitions,
            # Partitions whose every copy answered (the rest count as holding nothing).
            "known": len(held),
        })
        return out

    async def held(self, stream: str, epoch: int) -> dict[int, bytes]:
        """Partition -> bitmap of the inputs that every copy of it holds (one snapshot per ``stream`` and ``epoch``).

        A partition whose owner or a copy did not answer in
        :data:`HELD_TIMEOUT` is absent (holds nothing, as far as anyone
        knows).
        """
        task = self._held.get((stream, epoch))
        if task is None:
            task = self._held[(stream, epoch)] = asyncio.ensure_future(self._ask_held(stream, epoch))
        try:
            return await asyncio.shield(task)
        except Exception as e:  # noqa: BLE001 - any failure means "nothing known"
            logger.info("aimss: no word on what %r holds (%r): its pushes write everything", stream, e)
            return {}

    async def _ask_held(self, stream: str, epoch: int) -> dict[int, bytes]:
        spec = self.coord.state.streams[stream]
        rec = self.coord.runs.for_stream(stream)
        inputs = rec.spec.inputs if rec is not None else 0
        if not inputs:
            return {}
        # The owner and the copies that may take over from it. One still
        # catching up gets the owner's whole log; should the owner die
        # first, the partition is lost and re-created, and whatever skipped
        # it is written again (stale at the seal, or refilled).
        state = self.coord.state
        copies: dict[int, list[str]] = {
            p: [spec.owners[p], *(w for w in spec.replicas_of(p) if state.in_sync(stream, p, w))]
            for p in range(spec.partitions)
        }
        asked: dict[str, list[int]] = {}
        for p, ws in copies.items():
            for w in ws:
                asked.setdefault(w, []).append(p)

        async def one(w: str, ps: list[int]) -> dict[int, bytes]:
            msg = {"op": "aimss_held_inputs", "name": stream, "epoch": epoch, "partitions": ps, "inputs": inputs}
            try:
                reply = await asyncio.wait_for(self.ops.ask(w, msg), HELD_TIMEOUT)
            except Exception:  # noqa: BLE001 - a copy that does not answer holds nothing, as far as we know
                return {}
            return {int(p): bytes(b) for p, b in reply.get("held") or ()}

        workers = list(asked)
        got = dict(zip(workers, await asyncio.gather(*(one(w, asked[w]) for w in workers))))
        out: dict[int, bytes] = {}
        for p, ws in copies.items():
            maps = [got[w].get(p) for w in ws]
            if all(m is not None for m in maps):
                acc = maps[0]
                for m in maps[1:]:
                    acc = _both(acc, m)
                out[p] = acc
        return out

    def pushes_pending(self, stream: str) -> list[Any]:
        """The barrier dependencies of ``stream``'s run that are not in memory: it must not be sealed yet.

        A barrier task runs once every push is in memory. A worker that
        leaves while it runs takes the results and the unsent records of
        the pushes that finished there: Dask (or :meth:`_rerun_pushes`)
        computes them again, and moves the barrier back to waiting, but
        cannot stop the execution already under way. That execution must
        not seal: the pushes' records are not all in.
        """
        scheduler = self.ops.scheduler
        rec = self.coord.runs.for_stream(stream)
        if scheduler is None or rec is None or rec.finished or rec.spec.barrier is None:
            return []
        barrier = scheduler.tasks.get(rec.spec.barrier)
        if barrier is None:
            return []
        return [ts.key for ts in barrier.dependencies if ts.state != "memory"]

    # -- a worker left ------------------------------------------------------------------

    def eligible(self, rec: RunRecord) -> bool:
        """``rec`` keeps what survives a loss: its policy says so, and its streams are still being written."""
        scheduler = self.ops.scheduler
        spec = rec.spec
        if scheduler is None or spec.on_loss is not OnLoss.RECOVER or rec.finished:
            return False
        if rec.state is RunState.RESTARTING or not spec.streams or spec.barrier is None:
            return False
        state = self.coord.state
        busy = self.recovering | self.coord.stream_ops.sealing
        if any(n not in state.streams or n in state.sealed or n in busy for n in spec.streams):
            return False
        barrier = scheduler.tasks.get(spec.barrier)
        return barrier is not None and barrier.state in _BEFORE_SEAL

    def keep(
        self, rec: RunRecord, worker: str, lost: Mapping[str, Collection[int]], stimulus_id: str, later: bool = False
    ) -> None:
        """Recover ``rec`` from the loss of ``worker`` (``lost``: its partitions there, by stream).

        ``later``: found lost after the worker's removal was handled (a
        promotion planned then failed).
        """
        ran_there = self._ran_on.get(rec.run_id, {}).pop(worker, set())
        hit = {n: set(lost[n]) for n in rec.spec.streams if lost.get(n)}
        if not hit:
            # Nothing it owned is lost (none there, or copies took over);
            # what that worker's pushes had not sent yet died with it: those
            # run again (Dask reruns the ones whose result was only there).
            again = self._rerun_pushes(rec, stimulus_id, only=ran_there, full=ran_there)
            self.ops.event({
                "action": "run-kept", "run": rec.run_id, "kind": rec.kind, "worker": worker,
                "pushes_rerun": len(again),
            })
            return
        state = self.coord.state
        if later and any(state.streams[n].replicas for n in hit if n in state.streams):
            # A promotion that failed part-way: some workers may have taken
            # the promoted epoch (a copy acting as owner) that the
            # coordinator never committed, a state recovery is not proven
            # against (a second copy of an input was seen stored). Start over.
            logger.warning(
                "aimss: %s run %s lost partitions its copies could not take over; restarting it",
                rec.kind, rec.run_id,
            )
            assert self.ops.scheduler is not None
            self.coord.run_ops.restart(rec, self.ops.scheduler, stimulus_id)
            return
        self.recovering.update(rec.spec.streams)
        self.ops.spawn(self._recover(rec, hit, ran_there, stimulus_id))

    async def _recover(self, rec: RunRecord, hit: dict[str, set[int]], ran_there: set[Any], stimulus_id: str) -> None:
        state = self.coord.state
        names = list(rec.spec.streams)
        # A promotion for the same loss (copies took over the partitions
        # that had one in sync; new copies placed) makes a new epoch too:
        # recover from what it made, not race it.
        for n in names:
            await self.coord.promotions.settled(n)
        if any(n not in state.streams for n in names):
            self.recovering.difference_update(names)
            return  # destroyed meanwhile (its run restarted, its graph released)
        olds = [state.streams[n] for n in names]
        # Streams of a run are placed alike (a join reads both sides on one
        # worker): their lost partitions are the same.
        parts = sorted(set().union(*hit.values()))
        try:
            # A stream still being opened (the loss came during its run's
            # registration) gets its new epoch once every owner holds it.
            for n in names:
                await self.coord.stream_ops.opened(n)
            if not self._unchanged(rec, olds, stimulus_id):
                return
            load = owners_load([s.owners for s in state.streams.values()], self.ops.running())
            placed = _place_recreated(parts, olds, load)
            news = [state.recovered(o.name, parts, placed) for o in olds]
            for new in news:
                msg = {
                    "op": "aimss_recover", "spec": new.to_wire(), "since": new.first_epoch,
                    "inputs": rec.spec.inputs, "recreated": parts,
                }
                # Everyone: holders of surviving partitions answer to the new
                # epoch too, and every process forgets the spec it cached.
                replies = await self.ops.broadcast(msg)
                deaf = sorted({
                    w for p, w in enumerate(new.owners)
                    if p not in parts and not (isinstance(replies.get(w), dict) and replies[w].get("held"))
                })
                if deaf:
                    # Its writes at the new epoch would be refused there.
                    raise AIMSSError(f"owners {deaf} of surviving partitions of {new.name!r} did not take epoch {new.epoch}")
                by_owner: dict[str, list[int]] = {}
                for p in parts:
                    by_owner.setdefault(new.owners[p], []).append(p)
                for w, ps in by_owner.items():
                    await self.ops.ask(w, {**msg, "partitions": ps})
            if not self._unchanged(rec, olds, stimulus_id):
                return
            for old, new in zip(olds, news):
                state.commit_recovery(old, new, parts)
        except Exception as e:
            logger.warning("aimss: recovery of %s run %s failed (%r); restarting it", rec.kind, rec.run_id, e)
            if self.ops.scheduler is not None and all(state.streams.get(o.name) is o for o in olds):
                self.coord.run_ops.restart(rec, self.ops.scheduler, stimulus_id)
            return
        finally:
            self.recovering.difference_update(names)
        assert self.coord.pinner is not None
        self.coord.pinner.repin(names)
        logger.warning(
            "aimss: %s run %s keeps what survived; partitions %s re-created on %s",
            rec.kind, rec.run_id, parts, sorted(set(placed)),
        )
        # Every push may have written to a lost partition.
        again = self._rerun_pushes(rec, stimulus_id, full=ran_there, parts=set(parts))
        self.ops.event({
            "action": "run-recovered", "run": rec.run_id, "kind": rec.kind, "partitions": parts,
            "pushes_rerun": len(again), "pushes_refill": sum(k not in ran_there for k in again),
        })

    def _unchanged(self, rec: RunRecord, olds: list[Any], stimulus_id: str) -> bool:
        """Whether the streams are still ``olds``; if not, the run restarts unless they are gone.

        Gone: destroyed meanwhile (the run restarted, its graph released),
        and their drops took the logs this recovery made. Changed: another
        loss made a new epoch meanwhile (a promotion, or a recovery, planned
        from a spec this one did not see): start over rather than guess.
        """
        state = self.coord.state
        if all(state.streams.get(o.name) is o for o in olds):
            return True
        if all(o.name in state.streams for o in olds) and self.ops.scheduler is not None:
            logger.warning("aimss: %s run %s changed hands during its recovery; restarting it", rec.kind, rec.run_id)
            self.coord.run_ops.restart(rec, self.ops.scheduler, stimulus_id)
        return False

    def _rerun_pushes(
        self,
        rec: RunRecord,
        stimulus_id: str,
        only: Collection[Any] | None = None,
        full: Collection[Any] = (),
        parts: set[int] | None = None,
    ) -> list[Any]:
        """Release ``rec``'s pushes in memory (only those in ``only``, if given); Dask runs them again. Their keys.

        Those in ``full`` (they finished on the worker that died) write
        ``parts`` and whatever some copy lacks of theirs (see
        :meth:`refill`); the others only ``parts`` (re-created partitions),
        and so do pushes yet to run again that a recovery before this one
        released.
        """
        scheduler = self.ops.scheduler
        spec = rec.spec
        if scheduler is None or spec.barrier is None:
            return []
        barrier = scheduler.tasks.get(spec.barrier)
        if barrier is None:
            return []
        recs = {}
        for ts in barrier.dependencies:
            key = ts.key
            if key == spec.create:
                continue
            if key in full:
                self._refill.pop(key, None)
                self._probe[key] = set(parts or ())
            elif parts is not None and key in self._probe:
                self._probe[key] |= parts  # yet to ask: a later recovery's partitions too
            elif parts is not None and ts.state == "memory":
                self._refill[key] = set(parts)
            elif parts is not None and key in self._refill:
                # Yet to ask (or to run again): the writes of its execution
                # before the first recovery are lost here too. One that
                # asked already writes to the older epoch: stale at the seal.
                self._refill[key] |= parts
            if ts.state == "memory" and (only is None or key in only):
                recs[key] = "released"
        if recs:
            logger.info("aimss: %d push(es) of %s run %s run again", len(recs), rec.kind, rec.run_id)
            self.ops.release(recs, stimulus_id)
        return list(recs)

    def clear(self) -> None:
        self.recovering.clear()
        self._push_of.clear()
        self._ran_on.clear()
        self._refill.clear()
        self._probe.clear()
        for task in self._held.values():
            task.cancel()
        self._held.clear()
