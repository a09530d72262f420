"""The coordinator's stream handlers: create, seal, destroy, release, offsets, info.

Streams are the coordinator's metadata (:class:`CoordinatorState`); these
handlers keep the owners in step with it, and hand a run's streams to the
run handlers at seal (:mod:`aimss_dask.coordinator.runs`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aimss_dask.coordinator.access import StreamAccess, check_mode
from aimss_dask.coordinator.cluster import ClusterOps, as_application
from aimss_dask.coordinator.state import StreamSpec
from aimss_dask.core.errors import (
    InvalidArgumentError,
    PartitionLostError,
    PushesPendingError,
    ReadTimeoutError,
    StreamNotFoundError,
    describe_lost,
    error_from_wire,
    lost_to_wire,
)
from aimss_dask.core.names import MAP_GROUP_PREFIX
from aimss_dask.core.runs import RunState, check_io_priority
from aimss_dask.transport.rpc import replies

if TYPE_CHECKING:
    from aimss_dask.coordinator.plugin import AIMSS

logger = logging.getLogger("aimss_dask")

#: Promotions a seal follows (an owner that dies while it seals, then another) before it gives up.
SEAL_PROMOTIONS = 3


class _Promoted(Exception):
    """A seal met a promotion: the stream's owners changed under it, its records did not."""


class StreamHandlers:
    """The ``aimss_*`` stream RPCs of one coordinator ``coord``."""

    def __init__(self, coord: AIMSS, ops: ClusterOps) -> None:
        self.coord = coord
        self.ops = ops
        # Woken whenever a stream is sealed or destroyed (shuffle_wait).
        self.sealed_changed: asyncio.Condition | None = None
        #: Streams a seal is under way for (a recovery waits for the next loss).
        self.sealing: set[str] = set()
        #: Streams whose partitions are being opened on their owners: set once all are.
        self.opening: dict[str, asyncio.Event] = {}

    def start(self) -> None:
        self.sealed_changed = asyncio.Condition()

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
        replication: int | None = None,
        share: str | None = None,
        io_priority: int = 0,
    ) -> dict[str, Any]:
        check_mode(share)
        io_priority = check_io_priority(io_priority, f"stream {name!r}")
        who = self.ops.creator(client, task)
        spec, created = self.coord.state.create(
            name,
            partitions,
            self.ops.running(),
            parent=parent,
            exist_ok=exist_ok,
            persist=persist,
            creator=who,
            replication=replication,
            default_replication=self.coord.config.replication,
            host_of=self.ops.hosts(),
        )
        if created:
            acc = self.coord.state.access[name] = StreamAccess(
                owner=as_application(who), share=share, io_priority=io_priority
            )
            await self.open(spec)
            # The owner's token goes to the creator only.
            return {**self.wire(spec), "created": True, "access": "owner", "token": acc.token}
        return {**self.wire(spec), "created": False, "access": self.allow(name, client, task, "read")}

    def _checked(self, name: str, client: str | None, task: Any) -> tuple[StreamAccess, str | None] | None:
        """``name``'s access rules and the caller's application, if this call is checked.

        Callers that say who they are (``client`` or ``task``: the public
        API) are checked, tasks not on an operator's stream; AIMSS's own
        requests, which do not say, are not.
        """
        acc = self.coord.state.access.get(name)
        if acc is None or (client is None and (task is None or acc.internal)):
            return None
        return acc, self.ops.application(client, task)

    def allow(self, name: str, client: str | None, task: Any, op: str) -> str:
        """The caller's access to ``name`` if it may do ``op``; :class:`StreamPermissionError` if not."""
        checked = self._checked(name, client, task)
        if checked is None:
            return "owner"
        acc, who = checked
        return acc.check(who, op, name) or "owner"

    def group_key(self, name: str, client: str | None, task: Any, group: str) -> str:
        """Where the caller's consumer group ``group`` of ``name`` keeps its offsets (groups are per application)."""
        checked = self._checked(name, client, task)
        return group if checked is None else checked[0].group_key(checked[1], group)

    async def open(self, spec: StreamSpec, inputs: int = 0) -> None:
        """Open a new stream's partitions on their owners and pin its known readers.

        ``inputs`` > 0: records carry their origin, and owners drop a second
        copy of an input (see :mod:`aimss_dask.node.dedup`).
        """
        assert self.coord.pinner is not None
        # Read tasks submitted before the stream existed, or pinned to the
        # owners of a run that restarted.
        self.coord.pinner.repin([spec.name])
        by_owner: dict[str, list[int]] = {}
        for p in range(spec.partitions):
            for w in spec.holders(p):  # replicas too
                by_owner.setdefault(w, []).append(p)
        done = self.opening[spec.name] = asyncio.Event()
        try:
            for w, ps in by_owner.items():
                await self.ops.broadcast(
                    {"op": "aimss_open", "spec": spec.to_wire(), "partitions": ps, "inputs": inputs}, [w]
                )
        except Exception:
            self.coord.state.destroy(spec.name)
            await self.ops.broadcast({"op": "aimss_drop", "name": spec.name, "epoch": spec.epoch})
            raise
        finally:
            if self.opening.get(spec.name) is done:
                del self.opening[spec.name]
            done.set()

    async def opened(self, name: str) -> None:
        """Wait until stream ``name`` is open on all its owners (at once if it is, or is no stream).

        A new epoch (a recovery, a promotion) must reach an owner after its
        open: one that hears of the new epoch first does not hold the stream
        yet and ignores it, then opens the old epoch only, and refuses the
        writes of the new one.
        """
        ev = self.opening.get(name)
        if ev is not None:
            await ev.wait()

    def wire(self, spec: StreamSpec) -> dict[str, Any]:
        lost = self.coord.state.lost.get(spec.name, {})
        return {
            "spec": spec.to_wire(),
            "sealed": spec.name in self.coord.state.sealed,
            "lost": sorted(lost),
            "lost_offsets": lost_to_wire(lost),
            # Rebuilt in part from a dead owner's spill files: readable
            # below their lost range.
            "salvaged": sorted(self.coord.state.salvaged.get(spec.name, ())),
            # Readers of an older epoch follow a partition to a new owner
            # only if no recovery re-created partitions (empty) since.
            "recreated": self.coord.state.recreated.get(spec.name, 0),
        }

    async def destroy_many(self, names: list[str]) -> None:
        for name in names:
            if name in self.coord.state.streams:
                try:
                    await self.destroy(name)
                except Exception:
                    logger.exception("aimss: cleanup of stream %r failed", name)

    @replies
    async def _h_get(
        self,
        name: str,
        client: str | None = None,
        task: Any = None,
        token: str | None = None,
        need: str = "read",
        partition: int | None = None,
    ) -> dict[str, Any]:
        """A stream's spec; for a caller that says who it is, its ``access`` (and a ``token`` it presents).

        ``partition``: the one a reader is about to read (recovery brings
        it back first, should it be lost: :mod:`~aimss_dask.coordinator.demand`).
        """
        spec = self.coord.state.get(name)
        # Only a partition of the stream (read_from checks what it was given after this).
        if isinstance(partition, int) and not isinstance(partition, bool) and 0 <= partition < spec.partitions:
            self.coord.demand.note(name, [partition])
        acc = self.coord.state.access.get(name)
        if token is not None and acc is not None and (client is not None or task is not None):
            who = self.ops.application(client, task)
            if who is not None:
                acc.present(who, token, name)
        return {**self.wire(spec), "access": self.allow(name, client, task, need)}

    @replies
    async def _h_grant(self, name: str, who: str, mode: str | None, client: str | None = None, task: Any = None) -> dict[str, Any]:
        """The owner grants ``who`` (a client id or a token) ``mode``; None revokes."""
        self.coord.state.get(name)
        acc = self.coord.state.access.get(name)
        if acc is None or acc.owner is None:
            raise InvalidArgumentError(
                f"stream {name!r} belongs to no application (made by AIMSS or by a task of no "
                "known client): every application may use it, there is nothing to grant"
            )
        self.allow(name, client, task, "grant" if mode is not None else "revoke")
        if mode is None:
            return {"had": acc.revoke(who)}
        acc.grant(who, mode)
        return {"had": True}

    @replies
    async def _h_seal(
        self, name: str, epoch: int | None = None, client: str | None = None, task: Any = None
    ) -> dict[str, Any]:
        """Seal stream ``name``; with ``epoch``, only if it is still the stream of that epoch."""
        self.allow(name, client, task, "seal")
        # A replica taking over from a dead owner: seal the stream it owns.
        await self.coord.promotions.settled(name)
        spec = self.coord.state.get(name)
        if epoch is not None and spec.epoch != epoch and self.coord.state.same_records(name, epoch):
            epoch = spec.epoch  # only owners changed (a promotion): every partition has its records
        if epoch is not None and spec.epoch != epoch:
            # The caller's stream was replaced (destroyed and created again,
            # or recovered under a new epoch with partitions it has not
            # filled): sealing the new one would end it without its records.
            raise StreamNotFoundError(
                f"stream {name!r} at epoch {epoch} is now epoch {spec.epoch}; seal with its new handle"
            )
        if name in self.coord.recoveries.recovering:
            raise PartitionLostError(
                f"stream {name!r} is re-creating partitions lost with a worker; seal it once that is done",
                self.coord.state.lost.get(name, {}),
            )
        pending = self.coord.recoveries.pushes_pending(name)
        if pending:
            # Checked with no await before the sealing mark: a loss from
            # here on sees the stream sealing and restarts its run instead.
            raise PushesPendingError(
                f"stream {name!r} cannot be sealed yet: {len(pending)} task(s) of its run "
                f"(such as {pending[0]!r}) are being computed again after a worker left; "
                "its barrier runs again once they are done"
            )
        self.sealing.add(name)
        try:
            for _ in range(SEAL_PROMOTIONS):
                try:
                    return await self._seal(name, spec)
                except _Promoted:
                    # A copy took over from an owner that died while this seal
                    # was under way: same records, new owners; seal those.
                    await self.coord.promotions.settled(name)
                    spec = self.coord.state.get(name)
            return await self._seal(name, spec)
        finally:
            self.sealing.discard(name)

    async def _seal(self, name: str, spec: StreamSpec) -> dict[str, Any]:
        # 1. Every worker stops taking writes for the stream and pushes what it
        #    has buffered; 2. only then do owners seal, so nothing written before
        #    seal() is rejected.
        msg = {"name": name, "epoch": spec.epoch}
        since = {"since": spec.first_epoch} if spec.since else {}
        replies = await self.ops.broadcast({"op": "aimss_seal_producers", **msg, **since})
        replies.update(await self.coord.seals.seal_clients(name, spec.epoch))
        # Owners and copies in sync; a copy still catching up is sealed by
        # its owner once it holds everything (sealed empty now, it would
        # refuse the rest).
        state = self.coord.state
        holders: dict[str, list[int]] = {}
        for p in range(spec.partitions):
            for w in spec.holders(p):
                if w == spec.owners[p] or state.in_sync(name, p, w):
                    holders.setdefault(w, []).append(p)
        sealed: dict[str, Any] = {}
        for part in await asyncio.gather(*(
            self.ops.broadcast({"op": "aimss_seal_partitions", **msg, "partitions": ps}, [w])
            for w, ps in sorted(holders.items())
        )):
            sealed.update(part)
        for addr, r in sealed.items():
            if _answered(r):
                # Each partition's end as its owner reports it (a replica's is the same).
                bounds = [b for b in r.get("bounds", ()) if spec.owners[b[0]] == addr]
                self.coord.state.note_bounds(name, spec.epoch, bounds)
        # Every partition's owner sealed it, or the partition is known lost:
        # one whose owner did not answer (it is leaving, or hung, and not yet
        # removed: a retirement still moving, a host gone silent) may hold
        # records past what the coordinator last heard. Sealed now, it would
        # be taken for complete, or its lost range end too early.
        lost = self.coord.state.lost.get(name, {})
        unsealed = [
            p for p in range(spec.partitions) if p not in lost and not _answered(sealed.get(spec.owners[p]))
        ]
        if unsealed and self.coord.state.streams.get(name) is spec:
            owners = sorted({spec.owners[p] for p in unsealed})
            why = "; ".join(f"{w}: {_why(sealed.get(w))}" for w in owners[:3])
            raise PartitionLostError(
                f"stream {name!r} is not sealed: the owners {owners} of partitions {unsealed[:10]} did not "
                f"seal them ({why}); they are leaving or stopped answering. Seal again once the cluster "
                "has settled: their partitions are then either sealed or named lost",
                {p: (0, None) for p in unsealed},
            )
        now = self.coord.state.streams.get(name)
        if now is not spec and now is not None and now.epoch > spec.epoch and self.coord.state.same_records(
            name, spec.epoch
        ):
            raise _Promoted()
        if now is not spec:
            # Destroyed while it was sealed (its run restarted, with a new
            # stream of this name): the new one is not sealed.
            raise StreamNotFoundError(
                f"stream {name!r} (epoch {spec.epoch}) was destroyed while it was sealed"
            )
        self.coord.state.sealed.add(name)
        action = self.coord.runs.on_seal(name)
        if action is not None:
            await self.coord.run_ops.run_sealed(name, spec, *action)
        assert self.sealed_changed is not None
        async with self.sealed_changed:
            self.sealed_changed.notify_all()
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
                lost_to_wire(self.coord.state.lost.get(name, {})),
            )
        lost = self.coord.state.lost.get(name, {})
        if lost:
            # Sealed all the same (readers of the other partitions can end),
            # but the data is not all there: never a quiet success.
            raise PartitionLostError(
                f"stream {name!r} is sealed, but {describe_lost(lost)} were lost with their "
                "owner(s) and are not in it; write them again to a new stream, or read the "
                "partitions that survive",
                lost,
            )
        return self.wire(spec)

    @replies
    async def _h_shuffle_wait(self, parent: str, timeout: float | None = None) -> dict[str, Any]:
        self.coord.state.get(parent)
        assert self.sealed_changed is not None

        def done() -> bool:
            if parent not in self.coord.state.streams:
                return True
            return all(c in self.coord.state.sealed for c in self.coord.state.children(parent))

        async with self.sealed_changed:
            try:
                if not done():  # wait_for(..., 0) would time out without looking
                    await asyncio.wait_for(self.sealed_changed.wait_for(done), timeout)
            except asyncio.TimeoutError:
                open_ = [c for c in self.coord.state.children(parent) if c not in self.coord.state.sealed]
                raise ReadTimeoutError(
                    f"shuffle_streams({parent!r}) timed out after {timeout}s; child "
                    f"streams still open: {open_}"
                ) from None
        self.coord.state.get(parent)  # destroyed while waiting: raise
        return {"children": self.coord.state.children(parent)}

    @replies
    async def _h_destroy(self, name: str, client: str | None = None, task: Any = None) -> dict[str, Any]:
        self.coord.state.get(name)
        self.allow(name, client, task, "destroy")
        removed = await self.destroy(name)
        return {"destroyed": [s.name for s in removed], "epochs": [s.epoch for s in removed]}

    async def destroy(self, name: str) -> list[StreamSpec]:
        """Forget ``name`` (and its children) everywhere; a run whose streams are all gone is done.

        Returns the specs destroyed.
        """
        removed = self.coord.state.destroy(name)
        for spec in removed:
            await self.ops.broadcast({"op": "aimss_drop", "name": spec.name, "epoch": spec.epoch})
        for spec in removed:
            rec = self.coord.runs.for_stream(spec.name)
            if (
                rec is not None
                and rec.state is not RunState.RESTARTING
                and not any(n in self.coord.state.streams for n in rec.spec.streams)
            ):
                self.coord.runs.finish(rec.run_id, rec.epoch, RunState.DONE)
        assert self.sealed_changed is not None
        async with self.sealed_changed:
            self.sealed_changed.notify_all()
        return removed

    @replies
    async def _h_release(self, name: str, partition: int) -> dict[str, Any]:
        """An operator's reader is done with a partition; destroy when all are."""
        return {"destroyed": await self.release(self.coord.state.get(name), [partition], trim=False)}

    async def partition_stats(self, spec: StreamSpec) -> dict[int, dict[str, Any]]:
        """Each partition's counts, as its owner reports them (absent if lost)."""
        replies = await self.ops.broadcast(
            {"op": "aimss_stream_stats", "name": spec.name}, list(set(spec.owners))
        )
        # Each owner reports the copies it holds of others' partitions too:
        # only the owner's own count (a copy may be catching up, or start
        # past a trimmed head).
        return {
            p: st
            for addr, r in replies.items()
            if isinstance(r, dict)
            for p, st in r.get("partitions", [])
            if spec.owners[p] == addr
        }

    async def release(self, spec: StreamSpec, partitions: list[int], trim: bool = True) -> bool:
        if trim:
            by_owner: dict[str, list[int]] = {}
            for p in partitions:
                for w in spec.holders(p):
                    by_owner.setdefault(w, []).append(p)
            for w, ps in by_owner.items():
                await self.ops.broadcast(
                    {"op": "aimss_trim", "name": spec.name, "epoch": spec.epoch, "partitions": ps}, [w]
                )
        if self.coord.state.release(spec.name, partitions):
            await self.destroy(spec.name)
            return True
        return False

    @replies
    async def _h_offsets(self, name: str, group: str, client: str | None = None, task: Any = None) -> dict[str, Any]:
        self.allow(name, client, task, "read")
        return {"offsets": self.coord.state.offsets(name, self.group_key(name, client, task, group))}

    @replies
    async def _h_commit(
        self, name: str, group: str, offsets: list[list[int]], client: str | None = None, task: Any = None
    ) -> dict[str, Any]:
        self.allow(name, client, task, "commit")
        group = self.group_key(name, client, task, group)
        return {"offsets": self.coord.state.commit(name, group, {int(p): int(o) for p, o in offsets})}

    @replies
    async def _h_consume_progress(
        self,
        name: str,
        group: str,
        partition: int,
        offset: int,
        start: int,
        elapsed: float,
        stop: int | None = None,
        done: bool = False,
        worker: str | None = None,
        client: str | None = None,
        task: Any = None,
    ) -> dict[str, Any]:
        """A consumer of ``Stream.map_records`` says how far it is, and learns whether to hand over.

        Once ``done``, ``offset`` is committed (its results are the task's
        then; committed earlier, a task run again would start past records
        whose results died with the first run). See
        :meth:`~aimss_dask.coordinator.stragglers.Stragglers.consumer_progress`.
        """
        self.allow(name, client, task, "commit")
        group = self.group_key(name, client, task, group)
        if done:
            offsets = self.coord.state.commit(name, group, {int(partition): int(offset)})
        else:
            offsets = self.coord.state.offsets(name, group)
        stragglers = self.coord.stragglers
        order = stragglers.consumer_progress(
            name, group, int(partition), int(offset), start=int(start), elapsed=float(elapsed),
            stop=None if stop is None else int(stop), done=bool(done), worker=worker,
        )
        if done and group.startswith(MAP_GROUP_PREFIX) and stragglers.consumers_done(name, group, len(offsets)):
            # The group a map_records call made for itself: forgotten once
            # every partition's consumer is done, or calls would pile groups up.
            self.coord.state.forget_group(name, group)
            stragglers.forget_group(name, group)
        return {"offsets": offsets, **order}

    @replies
    async def _h_consumed(self, name: str, partition: int) -> dict[str, Any]:
        """Where a new copy of a partition starts: see :meth:`CoordinatorState.consumed`."""
        return {"offset": self.coord.state.consumed(name, partition)}

    @replies
    async def _h_replica_state(
        self, name: str, epoch: int, partition: int, replica: str, seq: int, in_sync: bool, dropped: bool = False
    ) -> dict[str, Any]:
        """An owner says whether a replica holds what it holds (:meth:`CoordinatorState.replica_state`).

        An owner that drops a copy waits for this answer before it lets
        readers see past that copy's end: a copy that may miss records
        readers saw is never promoted. ``dropped``: the owner gave up on
        that copy; another is placed (:meth:`Promotions.copy_given_up`).
        """
        self.coord.state.replica_state(name, epoch, partition, replica, seq, in_sync)
        if dropped:
            self.coord.promotions.copy_given_up(name, epoch, partition, replica)
        return {}

    @replies
    async def _h_info(self, name: str) -> dict[str, Any]:
        spec = self.coord.state.get(name)
        acc = self.coord.state.access.get(name)
        lost = self.coord.state.lost.get(name, {})
        # A lost partition's count is unknown (None), never a quiet 0.
        records: list[int | None] = [None if p in lost else 0 for p in range(spec.partitions)]
        nbytes: list[int | None] = list(records)
        spilled = 0
        for p, st in (await self.partition_stats(spec)).items():
            if p in lost:
                continue  # a worker back at the old address: not this data
            records[p] = st["records"]
            nbytes[p] = st["bytes"]
            spilled += st["spilled_bytes"]
        return {
            "info": {
                "name": name,
                "partitions": spec.partitions,
                "owners": list(spec.owners),  # the workers holding each partition
                "replicas": [list(spec.replicas_of(p)) for p in range(spec.partitions)],
                # The copies that may take over (Kafka's ISR): not those catching up.
                "in_sync": [
                    [w for w in spec.replicas_of(p) if self.coord.state.in_sync(name, p, w)]
                    for p in range(spec.partitions)
                ],
                "replication": spec.replication,
                "epoch": spec.epoch,
                "parent": spec.parent,
                "persist": spec.persist,
                "sealed": name in self.coord.state.sealed,
                "lost": sorted(lost),
                "lost_offsets": {p: [a, b] for p, (a, b) in sorted(lost.items())},
                "records": records,
                "bytes": nbytes,
                "spilled_bytes": spilled,
                "groups": {g: list(o) for g, o in self.coord.state.groups.get(name, {}).items()},
                # Who it belongs to and what others may do (no grants: tokens are secrets).
                "owner": acc.owner if acc is not None else None,
                "share": acc.share if acc is not None else None,
                "io_priority": acc.io_priority if acc is not None else 0,
            }
        }


def _answered(reply: Any) -> bool:
    """Whether a worker's reply to a broadcast is an answer (not an exception, an error, or missing)."""
    return isinstance(reply, dict) and reply.get("status", "OK") == "OK"


def _why(reply: Any) -> str:
    if reply is None:
        return "no longer listed"
    if isinstance(reply, BaseException):
        return f"{type(reply).__name__}: {reply}"
    return f"{reply.get('type', 'error')}: {reply.get('message', reply)}"
