"""``Stream.map_records``: a consumer per partition that can hand the rest of its range to a helper.

Each partition's consumer is a task on the partition's owner that applies a
function to every record in offset order and reports its progress every
``COMMIT_INTERVAL``; its consumer group's offset is committed once it is done. The
coordinator's LATE rule compares those rates; when one consumer falls far
behind its peers (its worker is slow, or its records cost more), the answer
to its next report tells it where to stop and on which fast worker to start
a *helper* that consumes the rest of the range. The consumer starts the
helper itself, since only it holds the function, and a split at its own
current offset is exact: each record is consumed once, by the consumer or by
one helper, and the partition's result lists them in offset order.

Only a consumer that is done commits: its results live in the task until
it returns, so a task run again starts where the first run started (the
group's offset when ``map_records`` was called) and re-delivers those
records (at-least-once), never skips them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from aimss_dask.api.context import Endpoint, current
from aimss_dask.api.reader import COMMIT_INTERVAL
from aimss_dask.core.names import MAP_GROUP_PREFIX, PARTITION_TASK_PREFIX
from aimss_dask.core.specs import StreamSpec

__all__ = ["map_records"]


def map_records(
    spec: StreamSpec,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    group: str | None,
    read: Callable[..., Iterator[Any]],
) -> list[Any]:
    """Submit one consumer task per partition of ``spec``; one ``Future`` each (see ``Stream.map_records``).

    ``read``: ``read_from``, passed in by the caller so that this module
    needs no edge back to the stream API.
    """
    from distributed import get_client

    if not callable(func):
        raise TypeError(
            f"map_records needs a function to apply to each record of stream {spec.name!r}, "
            f"got {func!r}; pass a callable taking (record, *args, **kwargs)"
        )
    token = uuid.uuid4().hex
    # Without a group of its own, a call consumes every record from offset 0
    # under a group of its own, so that its progress is seen. With one, from
    # the group's offsets as they are now: taken here, not in the task, so
    # that a task run again (its worker died, or its result did) gives the
    # same records again, never only those after what the first run had
    # passed while its results died with it.
    name = group if group is not None else f"{MAP_GROUP_PREFIX}{token}"
    starts = [0] * spec.partitions
    if group is not None:
        ep = current("map_records")
        starts = ep.scheduler_op("offsets", name=spec.name, group=group, **ep.owner_kwargs())["offsets"]
    client = get_client()
    return [
        client.submit(
            _consume_partition, spec.name, p, name, int(starts[p]), func, args, kwargs, read,
            key=(f"{PARTITION_TASK_PREFIX}{token}", spec.name, p),
            pure=False,
        )
        for p in range(spec.partitions)
    ]


def _consume_partition(
    name: str,
    p: int,
    group: str,
    start: int,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    read: Callable[..., Iterator[Any]],
) -> list[Any]:
    """The consumer of partition ``p``: results of ``func`` over its records from ``start`` (the group's offset then)."""
    ep = current("map_records")
    consumer = _Consumer(ep, name, p, group, start, func, args, kwargs, read)
    results, offset = consumer.run()
    if consumer.helpers:
        from distributed import worker_client

        # The thread is given back while waiting (a consumer of this worker
        # may run meanwhile). The newest helper starts where this consumer
        # stopped; the first one ends where the partition ends.
        with worker_client() as client:
            parts = client.gather(list(reversed(consumer.helpers)))
        for rs, _ in parts:
            results.extend(rs)
        offset = parts[-1][1]
    consumer.report(offset, done=True)
    return results


def _consume_range(
    name: str,
    p: int,
    start: int,
    stop: int | None,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    read: Callable[..., Iterator[Any]],
) -> tuple[list[Any], int]:
    """A helper: ``func`` over records ``[start, stop)`` of partition ``p``, and the offset after the last."""
    return _apply(read(name, partition=p, start=start), start, lambda: stop, func, args, kwargs, None)


class _Consumer:
    """One partition's consumer: applies, reports, and starts a helper when told to."""

    def __init__(
        self,
        ep: Endpoint,
        name: str,
        p: int,
        group: str,
        start: int,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        read: Callable[..., Iterator[Any]],
    ) -> None:
        self.ep = ep
        self.name = name
        self.p = p
        self.group = group
        self.start = start
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.read = read
        self.stop: int | None = None
        self.helpers: list[Any] = []
        self.began = time.monotonic()

    def run(self) -> tuple[list[Any], int]:
        # The first report: a consumer that starts on a worker found slow
        # hands its whole range over at once.
        self.report(self.start)
        records = self.read(self.name, partition=self.p, start=self.start)
        return _apply(records, self.start, lambda: self.stop, self.func, self.args, self.kwargs, self.report)

    def report(self, offset: int, done: bool = False) -> None:
        """Say how far and how fast it goes; start a helper if the coordinator says so.

        Once done, ``offset`` is committed (the results are the task's
        then) and its time is the partition's, its helpers' included.
        """
        reply = self.ep.scheduler_op(
            "consume_progress", name=self.name, group=self.group, partition=self.p, offset=offset,
            start=self.start, elapsed=time.monotonic() - self.began, stop=self.stop, done=done,
            worker=self.ep.address, **self.ep.owner_kwargs(),
        )
        split = reply.get("split")
        if done or split is None:
            return
        split = int(split)
        if split < offset or (self.stop is not None and split >= self.stop):
            return  # not a split of what is left: ignore it
        from distributed import get_client

        self.helpers.append(get_client().submit(
            _consume_range, self.name, self.p, split, self.stop, self.func, self.args, self.kwargs, self.read,
            key=tuple(reply["key"]), workers=[reply["dest"]], allow_other_workers=True, pure=False,
        ))
        self.stop = split


def _apply(
    records: Iterator[Any],
    start: int,
    stop: Callable[[], int | None],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    report: Callable[[int], None] | None,
) -> tuple[list[Any], int]:
    """``func`` over ``records`` (offsets from ``start``) until ``stop()``; reports every ``COMMIT_INTERVAL``.

    The next record is asked for only below the stop: on an open partition,
    asking would wait for records that a helper consumes.
    """
    out: list[Any] = []
    offset = start
    last = time.monotonic()
    try:
        while True:
            end = stop()
            if end is not None and offset >= end:
                break
            try:
                record = next(records)
            except StopIteration:
                break
            out.append(func(record, *args, **kwargs))
            offset += 1
            if report is not None and time.monotonic() - last >= COMMIT_INTERVAL:
                report(offset)
                last = time.monotonic()
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()
    return out, offset
