"""The owners' side of a ``to_zarr`` push run: write each unit once all its pieces arrived.

The create task registers the run (its stream is placed next to the inputs)
and starts an :class:`AssemblerRun` on each owner, which counts what arrives
and queues every complete unit on the worker's write-behind thread.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np

from aimss_dask.core.errors import SinkError
from aimss_dask.node.runs import Run
from aimss_dask.ops import pushrun
from aimss_dask.sink.assembler import UnitAssembler, assemble, row_slabs, unit_regions
from aimss_dask.sink.specs import ZarrWriteSpec
from aimss_dask.sink.writer import ZarrTarget, writer_for


def create(
    spec: ZarrWriteSpec,
    npartitions: int,
    prefer: list[Any],
    target: ZarrTarget,
    chunks: tuple[tuple[int, ...], ...],
    dtype: Any,
) -> list[str]:
    """Create the run's stream, then have each owner write its units as they complete.

    The stream is a sink's: partitions stay where they were placed (next to
    their main input) and are not freed at seal; the owners drain them.
    """
    from aimss_dask.api import streams as api
    from aimss_dask.api.context import current

    names = pushrun.create(spec, npartitions, prefer)
    stream = api.operator_stream(names[0]).spec
    by_owner: dict[str, list[int]] = {}
    for p, w in enumerate(stream.owners):
        by_owner.setdefault(w, []).append(p)
    ep = current("to_zarr")
    for w, ps in sorted(by_owner.items()):
        factory = pickle.dumps(AssemblerFactory(stream.name, stream.epoch, ps, target, chunks, np.dtype(dtype)))
        ep.call(ep.ask_worker, w, "run_start", factory=factory)
    return names


@dataclass(frozen=True)
class AssemblerFactory:
    """What ``aimss_run_start`` gets for a push run's owner (pickled: it imports this module)."""

    name: str
    epoch: int
    partitions: list[int]
    target: ZarrTarget
    chunks: Any
    dtype: np.dtype

    def make_run(self, plugin: Any) -> AssemblerRun:
        run = AssemblerRun(self.name, self.epoch)
        run.assembler = attach(plugin, run, self.partitions, self.target, self.chunks, self.dtype)
        return run


class AssemblerRun(Run):
    """A push run's owner: writes each unit held here once all its pieces arrived."""

    assembler: UnitAssembler

    def on_append(self, partition: int, records: list[Any]) -> None:
        self.assembler.on_append(partition, records)


def attach(
    plugin: Any,
    owner: AssemblerRun,
    partitions: list[int],
    target: ZarrTarget,
    chunks: Any,
    dtype: np.dtype,
) -> UnitAssembler:
    """The owner's side of :func:`create`: an assembler that writes complete units."""
    name, epoch = owner.name, owner.epoch
    # Registers the run's WriteRun here now, once, not per unit on the appending thread.
    wb = writer_for(plugin, target)
    # Runs on the event loop: one vectorised lookup for all units, not a
    # NumPy call per unit (hundreds of units per owner).
    regions = unit_regions(partitions, chunks)
    shapes = {p: tuple(r.stop - r.start for r in region) for p, region in regions.items()}
    # Empty units (a zero-length axis) have nothing to write.
    expected = {p: math.prod(s) for p, s in shapes.items() if math.prod(s)}

    def ready(p: int) -> None:
        # On the appending thread: queue only. Its bytes are in the log
        # (under the budget) until the job reads them, so it holds none.
        wb.submit_job(
            target, p, 0, lambda put: _unit_job(p, put),
            size=expected[p] * dtype.itemsize, portable=lambda: _portable(p),
        )

    def _unit(p: int, scratch: bool) -> Any:
        records, _, _ = plugin.store.read(name, epoch, p, 0, None)
        # Pieces cut along the first axis only are written as they are;
        # anything else is assembled into one array first.
        out = row_slabs(records, shapes[p], dtype)
        if out is None:
            out = plugin.scratch.array(shapes[p], dtype) if scratch else np.empty(shapes[p], dtype)
            if assemble(records, out) != out.size:
                raise SinkError(f"unit {p} of {name!r} is incomplete; this is a bug, please report it")
        return out

    def _unit_job(p: int, put: Any) -> int:
        try:
            out = _unit(p, True)
            nbytes = put(regions[p], out)
            del out  # views into the log's records: let them go before the trim
            plugin.store.trim(name, epoch, p)  # durable: free its memory now
        except Exception:
            if plugin.runs.get(name) is not owner:
                return 0  # a run that restarted (or was dropped): the new run rewrites it
            raise
        return int(nbytes)

    def _portable(p: int) -> tuple[tuple[slice, ...], Any, Any]:
        # Handed over to a helper (a fresh array: it is serialised while
        # the writer's own jobs reuse the scratch pool); the unit's records
        # are freed once the helper stored it.
        return regions[p], _unit(p, False), lambda: plugin.store.trim(name, epoch, p)

    asm = UnitAssembler(epoch, expected, ready)
    if expected:  # units will be written here (and flushed): make their directories now
        wb.prepare(target, [regions[p] for p in sorted(expected)])
    return asm
