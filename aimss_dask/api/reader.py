"""The read path: iterate a partition from an offset, locally or remotely."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from aimss_dask.api.context import Endpoint
from aimss_dask.core.errors import (
    AIMSSError,
    InvalidArgumentError,
    PartitionLostError,
    PartitionNotHeldError,
    ReadTimeoutError,
    describe_lost,
    lost_ranges,
)
from aimss_dask.core.specs import StreamSpec
from aimss_dask.transport import speccache

logger = logging.getLogger("aimss_dask")

#: Group offsets are sent to the coordinator at most this often while reading
#: (and always when a partition ends or the iterator is closed). Delivery is
#: at-least-once, so a commit that lags only means re-reads after a crash.
COMMIT_INTERVAL = 0.5


def _timed_out(spec: StreamSpec, p: int, offset: int, timeout: float | None) -> ReadTimeoutError:
    return ReadTimeoutError(
        f"no record at offset {offset} of stream {spec.name!r} partition {p} within "
        f"timeout={timeout}s and the partition is not sealed; seal the stream when "
        "its producers are done, or read with a longer timeout"
    )


def iter_partition(
    ep: Endpoint,
    spec: StreamSpec,
    p: int,
    start: int,
    timeout: float | None,
    max_bytes: int | None,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(offset, record)`` from ``start`` until the sealed end.

    A partition that moves meanwhile (its owner retired) is followed to its
    new owner, from the same offset.
    """
    owner = spec.owners[p]
    if ep.plugin is not None:
        ep.plugin.reads["local" if _is_local(ep, owner) else "remote"] += 1
    offset = start
    while True:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                records, sealed = _fetch(ep, spec, owner, p, offset, left, max_bytes)
            except (OSError, AIMSSError) as e:
                moved = _moved_to(ep, spec, p, owner, e)
                if moved is None:
                    if isinstance(e, OSError):
                        lost = _lost_from(ep, spec, p, offset)
                        raise PartitionLostError(
                            f"owner {owner} of stream {spec.name!r} partition {p} could not "
                            f"be reached ({e}); the partition is lost: {describe_lost(lost)}",
                            lost,
                        ) from e
                    raise
                owner = moved
                continue
            if records or sealed:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise _timed_out(spec, p, offset, timeout)
        for r in records:
            yield offset, r
            offset += 1
        if sealed and not records:
            return


def _is_local(ep: Endpoint, owner: str) -> bool:
    return ep.plugin is not None and ep.plugin.store is not None and owner == ep.address


def _fetch(
    ep: Endpoint, spec: StreamSpec, owner: str, p: int, offset: int, wait: float | None, max_bytes: int | None
) -> tuple[list[Any], bool]:
    """One batch from ``offset``: ``(records, sealed)``; waits up to ``wait`` s (None: a while) for one."""
    if _is_local(ep, owner):
        assert ep.plugin is not None and ep.plugin.store is not None
        store = ep.plugin.store
        records, sealed, _ = store.read(spec.name, spec.epoch, p, offset, max_bytes)
        if not records and not sealed:
            store.wait(spec.name, spec.epoch, p, offset, wait)
            records, sealed, _ = store.read(spec.name, spec.epoch, p, offset, max_bytes)
        return records, sealed
    reply = ep.call(
        ep.ask_worker,
        owner,
        "read",
        name=spec.name,
        epoch=spec.epoch,
        partition=p,
        start=offset,
        max_bytes=max_bytes,
        wait=wait,
    )
    return list(reply["records"]), reply["sealed"]


def _lost_from(ep: Endpoint, spec: StreamSpec, p: int, offset: int) -> dict[int, tuple[int, int | None]]:
    """What of partition ``p`` is lost from ``offset`` on: up to its sealed end where the coordinator knows it."""
    try:
        # Saying which partition: recovery brings it back first.
        known = lost_ranges(ep.scheduler_op("get", name=spec.name, partition=p).get("lost_offsets")).get(p)
    except AIMSSError:
        known = None
    if known is None or (known[1] is not None and known[1] <= offset):
        return {p: (offset, None)}
    return {p: (offset, known[1])}


#: Longest a reader waits for the coordinator to name a partition's new
#: owner when the old one stopped serving it (a retirement under way), s.
MOVE_WAIT = 30.0


def _moved_to(ep: Endpoint, spec: StreamSpec, p: int, owner: str, error: BaseException) -> str | None:
    """The new owner of partition ``p``, if it moved off ``owner``; None (the ``error`` stands) if not.

    It moved when a retirement handed a sealed partition over, or when a
    replica took over from an owner that died. The old owner may stop
    answering (it closes, it died) a moment before the coordinator switches
    the owner: ask again for up to :data:`MOVE_WAIT`
    seconds, until the partition has a new owner, or is lost, or gone.
    """
    # The owner's answer about the request itself (an offset trimmed or out of
    # range, a read not allowed) is final where it holds the partition: no
    # other owner would answer otherwise, so waiting for one only delays it.
    # One that no longer holds it (a retirement, or a seal's rebalance, moved
    # it while it lives on) is not: the coordinator says where it went.
    final = isinstance(error, (ReadTimeoutError, InvalidArgumentError, PermissionError))
    if (final and not isinstance(error, PartitionNotHeldError)) or (
        isinstance(error, PartitionLostError) and not spec.replicas
    ):
        return None
    deadline = time.monotonic() + MOVE_WAIT
    while True:
        try:
            got = ep.scheduler_op("get", name=spec.name)
        except AIMSSError:
            return None
        now = StreamSpec.from_wire(got["spec"])
        if p in got.get("lost", ()):
            return None
        if now.replicas:
            # A replica took over from a dead owner: same records, same offsets.
            if now.first_epoch != spec.first_epoch or spec.epoch < got.get("recreated", 0):
                return None
        elif now.epoch != spec.epoch or not got.get("sealed"):
            return None
        if now.owners[p] != owner:
            speccache.remember(now)
            return now.owners[p]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


class GroupCommitter:
    """Tracks what a consumer group has consumed and commits it, batched."""

    def __init__(self, ep: Endpoint, name: str, group: str) -> None:
        self.ep = ep
        self.name = name
        self.group = group
        self.done: dict[int, int] = {}
        self.sent: dict[int, int] = {}
        self.last = time.monotonic()

    def consumed(self, p: int, next_offset: int) -> None:
        self.done[p] = next_offset
        if time.monotonic() - self.last > COMMIT_INTERVAL:
            self.commit()

    def commit(self) -> None:
        todo = [[p, o] for p, o in self.done.items() if self.sent.get(p) != o]
        self.last = time.monotonic()
        if not todo:
            return
        kwargs = dict(name=self.name, group=self.group, offsets=todo, **self.ep.owner_kwargs())
        if self.ep.on_loop():
            # A reader freed on the event loop (a failed task's traceback
            # held it, released there): waiting there for the loop would
            # block the worker for good. Sent without waiting.
            task = asyncio.ensure_future(_commit_later(self.ep, kwargs))
            _commits.add(task)  # the loop holds tasks weakly
            task.add_done_callback(_commits.discard)
        else:
            self.ep.scheduler_op("commit", **kwargs)
        self.sent.update({p: o for p, o in todo})


_commits: set[asyncio.Future[None]] = set()


async def _commit_later(ep: Endpoint, kwargs: dict[str, Any]) -> None:
    try:
        await ep.ask_scheduler("commit", **kwargs)
    except Exception as e:  # the records are delivered again (at-least-once)
        logger.info("aimss: a consumer group's commit failed: %r", e)


def read_records(
    ep: Endpoint,
    spec: StreamSpec,
    partitions: Sequence[int],
    starts: Sequence[int],
    timeout: float | None,
    max_bytes: int | None,
    committer: GroupCommitter | None,
) -> Iterator[Any]:
    """Every partition in turn, each in offset order, committing as we go."""
    try:
        for p, start in zip(partitions, starts):
            for offset, record in iter_partition(ep, spec, p, start, timeout, max_bytes):
                yield record
                # The consumer asked for the next record: this one is done.
                if committer is not None:
                    committer.consumed(p, offset + 1)
            if committer is not None:
                committer.commit()
    finally:
        if committer is not None:
            try:
                committer.commit()
            except Exception:
                # Closed from a GC finaliser or on a dying cluster: the commit
                # is lost and the records will be delivered again (at-least-once).
                pass
