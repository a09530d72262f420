"""The read path: iterate a partition from an offset, locally or remotely."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from aimss_dask.api.context import Endpoint
from aimss_dask.core.errors import PartitionLostError, ReadTimeoutError
from aimss_dask.core.specs import StreamSpec

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
    """Yield ``(offset, record)`` from ``start`` until the sealed end."""
    owner = spec.owners[p]
    local = ep.plugin is not None and ep.plugin.store is not None and owner == ep.address
    if ep.plugin is not None:
        ep.plugin.reads["local" if local else "remote"] += 1
    offset = start
    while True:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if local:
                assert ep.plugin is not None and ep.plugin.store is not None
                store = ep.plugin.store
                records, sealed, _ = store.read(spec.name, spec.epoch, p, offset, max_bytes)
                if records or sealed:
                    break
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not store.wait(spec.name, spec.epoch, p, offset, left):
                    raise _timed_out(spec, p, offset, timeout)
            else:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    reply = ep.call(
                        ep.ask_worker,
                        owner,
                        "read",
                        name=spec.name,
                        epoch=spec.epoch,
                        partition=p,
                        start=offset,
                        max_bytes=max_bytes,
                        wait=left,
                    )
                except OSError as e:
                    raise PartitionLostError(
                        f"owner {owner} of stream {spec.name!r} partition {p} could not "
                        f"be reached ({e}); the partition is lost from offset {offset} on",
                        {p: (offset, None)},
                    ) from e
                records, sealed = list(reply["records"]), reply["sealed"]
                if records or sealed:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise _timed_out(spec, p, offset, timeout)
        for r in records:
            yield offset, r
            offset += 1
        if sealed and not records:
            return


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
        if todo:
            self.ep.scheduler_op("commit", name=self.name, group=self.group, offsets=todo)
            self.sent.update({p: o for p, o in todo})


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
