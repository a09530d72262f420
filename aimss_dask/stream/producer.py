"""The write path: batch records per owner and push them, with back-pressure.

One ``Producer`` per process (worker or client). Writers are threads (task
threads, the user's thread); the pushes run on the process's event loop, one
batch in flight per owner so a producer's records keep their order.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from distributed.core import ConnectionPool
from distributed.protocol import Serialized
from tornado.ioloop import IOLoop

from aimss_dask.errors import PartitionLostError, StreamSealedError, raise_from_wire
from aimss_dask.log.budget import ByteBudget
from aimss_dask.plugin.state import StreamSpec

#: ``(spec, partition, record, nbytes)``: store a record on this very process.
LocalAppend = Callable[[StreamSpec, int, Any, int], None]


@dataclass(eq=False)
class _Item:
    name: str
    epoch: int
    partition: int
    record: Serialized
    nbytes: int


class Producer:
    """Buffers writes per owner and pushes them in batches.

    ``write`` blocks once ``max_in_flight`` bytes are written but not yet
    stored. Errors reported by an owner (a sealed stream, a lost worker) are
    raised by the next ``write`` or ``flush`` touching that stream.
    """

    def __init__(
        self,
        loop: IOLoop,
        rpc: ConnectionPool,
        *,
        batch_size: int,
        max_in_flight: int,
        linger: float,
        address: str | None = None,
        local: LocalAppend | None = None,
    ) -> None:
        self._loop = loop
        self._rpc = rpc
        self._batch_size = batch_size
        self._linger = linger
        self._address = address
        self._local = local
        self.budget = ByteBudget(max_in_flight)
        self._lock = threading.Lock()
        self._pending: dict[str, deque[_Item]] = {}
        self._pending_bytes: dict[str, int] = {}
        self._written: dict[str, int] = {}
        self._acked: dict[str, int] = {}
        self._timers: set[str] = set()
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._errors: dict[str, Exception] = {}
        self._sealed: set[tuple[str, int]] = set()
        self._progress: asyncio.Condition | None = None
        self.closed = False

    # -- thread side ---------------------------------------------------------------

    def _raise_pending(self, name: str) -> None:
        with self._lock:
            err = self._errors.pop(name, None)
        if err is not None:
            raise err

    def write(self, spec: StreamSpec, partition: int, record: Any, ser: Serialized, nbytes: int) -> None:
        """Queue (or, on the owner itself, store) one serialised record."""
        self._raise_pending(spec.name)
        if (spec.name, spec.epoch) in self._sealed:
            raise StreamSealedError(
                f"stream {spec.name!r} is sealed and takes no more writes; create a "
                "new stream for new data"
            )
        owner = spec.owners[partition]
        if self._local is not None and owner == self._address:
            # Same process as the owner: no serialisation, no copy, no comm.
            self._local(spec, partition, record, nbytes)
            return
        self.budget.acquire(nbytes)
        with self._lock:
            q = self._pending.setdefault(owner, deque())
            q.append(_Item(spec.name, spec.epoch, partition, ser, nbytes))
            self._pending_bytes[owner] = self._pending_bytes.get(owner, 0) + nbytes
            self._written[owner] = self._written.get(owner, 0) + 1
            full = self._pending_bytes[owner] >= self._batch_size
            if not full and owner in self._timers:
                return  # a linger timer will push it
            if not full:
                self._timers.add(owner)
        self._loop.add_callback(self._kick, owner, not full)

    # -- loop side -----------------------------------------------------------------

    def _kick(self, owner: str, linger: bool = False) -> None:
        if linger and self._linger > 0:
            self._loop.call_later(self._linger, self._kick, owner)
            return
        with self._lock:
            self._timers.discard(owner)
        if owner not in self._senders and not self.closed:
            self._senders[owner] = asyncio.ensure_future(self._drain(owner))

    async def _drain(self, owner: str) -> None:
        try:
            while True:
                with self._lock:
                    q = self._pending.get(owner)
                    if not q:
                        break
                    batch: list[_Item] = []
                    size = 0
                    while q and (not batch or size + q[0].nbytes <= self._batch_size):
                        item = q.popleft()
                        batch.append(item)
                        size += item.nbytes
                    self._pending_bytes[owner] -= size
                try:
                    await self._send(owner, batch)
                finally:
                    self.budget.release(size)
                    with self._lock:
                        self._acked[owner] = self._acked.get(owner, 0) + len(batch)
                    await self._notify()
        finally:
            self._senders.pop(owner, None)

    async def _send(self, owner: str, batch: list[_Item]) -> None:
        groups: list[list[Any]] = []
        for it in batch:
            if groups and groups[-1][:3] == [it.name, it.epoch, it.partition]:
                groups[-1][3].append(it.record)
                groups[-1][4].append(it.nbytes)
            else:
                groups.append([it.name, it.epoch, it.partition, [it.record], [it.nbytes]])
        try:
            reply = raise_from_wire(
                await self._rpc(owner).aimss_append(items=groups), "aimss_append"
            )
        except Exception as e:
            err: Exception = e
            if isinstance(e, OSError):
                err = PartitionLostError(
                    f"owner {owner} of stream {batch[0].name!r} could not be reached "
                    f"({e}); its partitions are lost"
                )
            with self._lock:
                for it in batch:
                    self._errors.setdefault(it.name, err)
            return
        with self._lock:
            for name, (kind, msg) in (reply.get("errors") or {}).items():
                self._errors.setdefault(name, _rebuild(kind, msg))

    async def _notify(self) -> None:
        if self._progress is None:
            self._progress = asyncio.Condition()
        async with self._progress:
            self._progress.notify_all()

    async def flush(self, names: Iterable[str] | None = None, raise_errors: bool = True) -> None:
        """Push everything written so far and wait until owners stored it."""
        if self._progress is None:
            self._progress = asyncio.Condition()
        with self._lock:
            targets = dict(self._written)
        for owner in targets:
            self._kick(owner)

        def done() -> bool:
            with self._lock:
                return all(self._acked.get(o, 0) >= n for o, n in targets.items())

        async with self._progress:
            await self._progress.wait_for(done)
        if raise_errors:
            with self._lock:
                wanted = list(self._errors) if names is None else [n for n in names if n in self._errors]
                errs = [self._errors.pop(n) for n in wanted]
            if errs:
                raise errs[0]

    async def seal(self, name: str, epoch: int) -> None:
        """Refuse further writes to ``name`` here, then push what is buffered."""
        self.mark_sealed(name, epoch)
        await self.flush([name], raise_errors=False)

    def forget(self, name: str) -> None:
        """The stream was destroyed: drop its errors and seal marks."""
        with self._lock:
            self._errors.pop(name, None)
            self._sealed = {s for s in self._sealed if s[0] != name}

    def mark_sealed(self, name: str, epoch: int) -> None:
        with self._lock:
            self._sealed.add((name, epoch))

    def close(self) -> None:
        self.closed = True
        for t in self._senders.values():
            t.cancel()


def _rebuild(kind: str, message: str) -> Exception:
    try:
        raise_from_wire({"status": "aimss-error", "type": kind, "message": message}, "")
    except Exception as e:
        return e
    raise AssertionError("unreachable")
