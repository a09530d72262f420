"""A slow sink writer hands the rest of its queue over to a helper on a fast worker.

The coordinator judges each worker's writer of each ``to_zarr`` run from the
progress its heartbeats carry (bytes written, seconds spent writing, bytes
queued) and, for one that falls behind its peers (LATE's rule), tells it on
the scheduler's stream to hand ``nbytes`` of its queue over to a worker it
chose (``aimss_sink_handover``). The writer takes those regions off its
queue (:meth:`WriteBehind.hand_over`) and ships them here, one by one, over
Dask's comms to a :class:`HandoverRun` on the helper, which writes each
whole region of units and answers when it is stored (synced, for a durable
run). The writer's own flush waits for the regions it handed over, so the
run's last task sees them as written by the writer they were queued on.

Each region is written once: the writer never writes what it handed over,
unless the helper fails, and then the writer writes it itself. A region
whose answer was lost after the helper stored it is written again with the
same bytes, replaced atomically (:func:`~aimss_dask.sink.chunkfiles.put_file`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distributed.comm import get_address_host
from distributed.protocol import to_serialize
from distributed.utils import sync

from aimss_dask.core.errors import SinkError, raise_from_wire
from aimss_dask.node.runs import Run
from aimss_dask.sink.durable import sync_units
from aimss_dask.sink.ioresource import io_resource
from aimss_dask.sink.units import unit_writer

if TYPE_CHECKING:
    from aimss_dask.sink.writer import ZarrTarget

logger = logging.getLogger("aimss_dask")

#: Seconds one region's write on the helper may take before the writer gives
#: up on the helper and writes the region itself.
SHIP_TIMEOUT = 120.0

#: Seconds the writer waits for the helper to stop its hand-over (a helper
#: that does not answer that soon has its writes fenced by nothing more).
STOP_TIMEOUT = 10.0


def _wire(region: tuple[slice, ...]) -> list[list[int]]:
    return [[s.start, s.stop] for s in region]


def _region(wire: list[list[int]]) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in wire)


class HandoverRun(Run):
    """On the helper: writes the regions one writer of one run hands over (operation ``write``)."""

    def __init__(self, target: ZarrTarget, sender: str, plugin: Any) -> None:
        super().__init__(self.key(target.run, sender), 0)
        self.target = target
        self.plugin = plugin
        self._put: Any = None
        self._array: Any = None
        self._resource: str | None = None
        self.written = 0
        # Set by run_stop: the writer took its regions back (it gave up
        # waiting), so a write still queued here must not land later,
        # perhaps over a newer run's data.
        self._stopped = threading.Event()

    @staticmethod
    def key(run_id: str, sender: str) -> str:
        """Its name among the helper's runs: one per run and writer that hands over."""
        return f"{run_id}/handover/{sender}"

    async def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        if op == "write":
            # Not offload(): its one thread is shared by the whole process
            # (flushes waiting for their queues).
            loop = asyncio.get_running_loop()
            n = await loop.run_in_executor(None, self._write, _region(kwargs["region"]), kwargs["data"])
            return {"bytes": n}
        return await super().call(op, **kwargs)

    def _write(self, region: tuple[slice, ...], data: Any) -> int:
        if self._put is None:
            self._array = self.target.open()
            worker = self.plugin.worker
            self._resource = io_resource(self._array, get_address_host(worker.address) if worker else "")
            self._put = unit_writer(self._array)
        with self.plugin.io_gate.writing(self.target.run, self._resource):
            if self._stopped.is_set():
                raise SinkError(
                    f"the hand-over of {self.target.run} was stopped: its writer writes the region itself"
                )
            n = int(self._put(region, data))
        if self.target.durable:
            # The run's flush syncs only the writers' own regions: this one
            # is durable before the writer counts it written.
            sync_units(self._array, [region])
        self.written += 1
        return n

    def progress(self) -> dict[str, Any]:
        return {"written": self.written}

    def close(self) -> None:
        self._stopped.set()


@dataclass(frozen=True)
class HandoverFactory:
    """What ``aimss_run_start`` gets on the helper (pickled: it imports this module)."""

    target: ZarrTarget
    sender: str

    def make_run(self, plugin: Any) -> HandoverRun:
        return HandoverRun(self.target, self.sender, plugin)


class Shipper:
    """The writer's side: ``ship(target, region, data) -> bytes`` stores a region on ``dest``.

    Called from the hand-over's own thread; each call waits for the helper's
    answer. :meth:`close` stops the helper's run (after the last region).
    """

    def __init__(self, plugin: Any, dest: str) -> None:
        self.plugin = plugin
        self.dest = dest
        self._started: ZarrTarget | None = None

    def _ask(self, op: str, timeout: float = SHIP_TIMEOUT, **kwargs: Any) -> dict[str, Any]:
        worker = self.plugin.worker

        async def ask() -> dict[str, Any]:
            reply = await getattr(worker.rpc(self.dest), f"aimss_{op}")(**kwargs)
            return raise_from_wire(reply, f"aimss_{op}")

        return sync(worker.loop, ask, callback_timeout=timeout)

    def __call__(self, target: ZarrTarget, region: tuple[slice, ...], data: Any) -> int:
        import pickle

        name = HandoverRun.key(target.run, self.plugin.worker.address)
        if self._started is None:
            factory = pickle.dumps(HandoverFactory(target, self.plugin.worker.address))
            self._ask("run_start", factory=factory)
            self._started = target
        try:
            reply = self._ask(
                "run_call", name=name, operation="write",
                kwargs={"region": _wire(region), "data": to_serialize(data)},
            )
        except Exception:
            # The caller writes the region itself now: the helper's write,
            # if still waiting (for its I/O turn), must not land after it.
            self.close()
            raise
        return int(reply["bytes"])

    def close(self) -> None:
        if self._started is None:
            return
        started, self._started = self._started, None
        try:
            self._ask("run_stop", STOP_TIMEOUT, name=HandoverRun.key(started.run, self.plugin.worker.address))
        except Exception:  # the helper left: its runs went with it
            logger.debug("aimss: stopping the hand-over run on %s failed", self.dest, exc_info=True)

