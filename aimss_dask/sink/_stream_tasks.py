"""The owner side of the streaming Zarr sink: small tasks pinned to a partition's owner.

Each task reads its partition from the worker's own log (a zero-copy walk over
the stored arrays), trims what is already durable, writes the whole chunks the
driver assigned to it, and scans the records that arrived since the last round
(checking each against the template, counting its rows). It never writes
array metadata: that is the driver's, so there is one writer of ``zarr.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed.comm import get_address_host

from aimss_dask.core.errors import SinkError, StreamNotFoundError
from aimss_dask.core.names import PLUGIN_NAME
from aimss_dask.sink._stream_plan import Position, Template, advance, cut
from aimss_dask.sink.durable import sync_units
from aimss_dask.sink.ioresource import io_resource
from aimss_dask.sink.units import unit_writer, whole_region

#: Bytes of records fetched from the log per read (references, not copies,
#: unless a segment was spilled to disk).
READ_BATCH = 64 * 2**20


@dataclass(frozen=True)
class Target:
    """Where the array lives; opened again by every task (and every chunk)."""

    store: Any
    path: str | None
    run: str
    where: str
    #: fsync what is written before it is committed (:mod:`aimss_dask.sink.durable`).
    durable: bool = True

    def open(self, mode: str = "r+") -> Any:
        import zarr

        if self.path:
            return zarr.open_array(self.store, path=self.path, mode=mode)
        return zarr.open_array(self.store, mode=mode)

    def open_fenced(self) -> Any:
        """The array, freshly opened, if this run still owns it.

        A sink that is started again (after a crash of its client) writes a
        new ``run`` id first; a task of the old run that is still going finds
        it here and stops, instead of writing over the new run's chunks.
        """
        arr = self.open()
        doc = arr.attrs.get("aimss")
        run = doc.get("run") if isinstance(doc, dict) else None
        if run != self.run:
            raise SinkError(
                f"another sink (run {run!r}) took over {self.where}; this sink (run "
                f"{self.run!r}) stops writing. Run one sink per array at a time"
            )
        return arr


@dataclass(frozen=True)
class OwnerJob:
    """One round's work for one partition."""

    stream: str
    epoch: int
    p: int
    axis: int
    trim_upto: int
    # Writing: ``nrows`` rows from ``position`` into rows ``start..`` of the array.
    position: Position
    nrows: int = 0
    start: int = 0
    chunk_rows: int = 0
    target: Target | None = None
    # Scanning: records from ``scan_from`` on; the first ``scan_skip`` rows of
    # record ``scan_from`` are durable already (a resumed sink).
    scan: bool = True
    scan_from: int = 0
    scan_skip: int = 0
    template: Template | None = None


@dataclass(frozen=True)
class OwnerReport:
    p: int
    position: Position
    scan_end: int
    scan_rows: int
    complete: bool
    template: Template | None = None
    first_rows: int = 0
    error: str | None = None


def _local_log(stream: str, epoch: int, p: int) -> Any:
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    store = getattr(plugin, "store", None)
    if store is None:
        raise SinkError(f"worker {worker.address} has no AIMSS log store; register the AIMSS plugin")
    # Raises StreamNotFoundError if the stream was destroyed (or re-created).
    store.bounds(stream, epoch, p)
    return store


def _gate() -> tuple[Any, str]:
    """This worker's I/O gate (coordinated I/O) and host."""
    from distributed import get_worker

    worker = get_worker()
    return worker.plugins[PLUGIN_NAME].io_gate, get_address_host(worker.address)


def _records(store: Any, job: OwnerJob, start: int, rows: int) -> tuple[list[Any], list[int]]:
    """Records from ``start`` until ``rows`` rows are covered (after ``job.position``'s row)."""
    records: list[Any] = []
    lengths: list[int] = []
    have = 0
    while have < rows:
        batch, _, _ = store.read(job.stream, job.epoch, job.p, start + len(records), READ_BATCH)
        if not batch:
            raise SinkError(
                f"partition {job.p} of stream {job.stream!r} has {have} rows from offset "
                f"{start}, fewer than the {rows} the sink planned; this is a bug"
            )
        for r in batch:
            records.append(r)
            lengths.append(int(r.shape[job.axis]))
            have += lengths[-1]
            if have >= rows:
                break
    return records, lengths


def _rows(records: Sequence[Any], pieces: Sequence[tuple[int, int, int]], axis: int) -> np.ndarray:
    def piece(i: int, lo: int, hi: int) -> np.ndarray:
        sel = (slice(None),) * axis + (slice(lo, hi),)
        return records[i][sel]  # a view

    if len(pieces) == 1:
        return piece(*pieces[0])
    return np.concatenate([piece(*pc) for pc in pieces], axis=axis)


def _write(store: Any, job: OwnerJob) -> Position:
    assert job.target is not None
    o, r = job.position
    records, lengths = _records(store, job, o, r + job.nrows)
    arr = None
    written = []
    gate, host = _gate()
    resource: str | None = None  # the same for every chunk of the array: looked up once
    for k, pieces in enumerate(cut(job.position, lengths, job.nrows, job.chunk_rows)):
        block = _rows(records, pieces, job.axis)
        # Opened per chunk: a fresh shape (the driver resized before this
        # round) and the run fence checked right before each write.
        arr = job.target.open_fenced()
        # The stream may have been destroyed meanwhile (its client died):
        # then this task is a leftover and must not write.
        store.bounds(job.stream, job.epoch, job.p)
        start = job.start + k * job.chunk_rows
        # Whole chunks (or the array's edge): one unit, written once.
        region = whole_region(block.shape, job.axis, start, block.shape[job.axis])
        if k == 0:
            resource = io_resource(arr, host)
        with gate.writing(f"zarr-sink-{job.target.run}", resource):
            unit_writer(arr)(region, block)
        written.append(region)
    if job.target.durable and arr is not None:
        # On disk before the driver commits offsets that cover them; each
        # folder synced once for the round.
        sync_units(arr, written)
    return advance(job.position, lengths, job.nrows)


def _check(job: OwnerJob, template: Template | None, offset: int, record: Any) -> str | None:
    where = f"record {offset} of partition {job.p} of stream {job.stream!r}"
    if not isinstance(record, np.ndarray):
        return f"{where} is a {type(record).__name__}, not a NumPy array; the Zarr sink takes array slabs"
    if record.dtype.hasobject:
        return f"{where} has dtype object; Zarr stores fixed-size dtypes only"
    if template is not None:
        why = template.mismatch(record.dtype, record.shape)
        if why:
            return (
                f"{where} does not fit the array: {why}. The sink takes "
                f"{template.describe()} (rows along axis {template.axis}); write records "
                "of that dtype and shape, or sink into another array"
            )
    return None


def _scan(store: Any, job: OwnerJob, position: Position) -> OwnerReport:
    from aimss_dask.core.errors import InvalidArgumentError

    template = job.template
    first_rows = 0
    offset = job.scan_from
    rows = 0
    error = None
    while error is None:
        batch, _, _ = store.read(job.stream, job.epoch, job.p, offset, READ_BATCH)
        if not batch:
            break
        for rec in batch:
            error = _check(job, template, offset, rec)
            if error is None and template is None:
                try:
                    template = Template.of(rec.dtype, rec.shape, job.axis)
                    first_rows = int(rec.shape[template.axis])
                except InvalidArgumentError as e:
                    error = f"record {offset} of partition {job.p} of stream {job.stream!r}: {e}"
            if error is not None:
                break
            n = int(rec.shape[template.axis])  # type: ignore[union-attr]
            if offset == job.scan_from and job.scan_skip:
                if n <= job.scan_skip:
                    error = _replay_error(job, f"record {offset} has {n} rows")
                    break
                n -= job.scan_skip
            rows += n
            offset += 1
    _, end, sealed = store.bounds(job.stream, job.epoch, job.p)
    if error is None and sealed and (end < job.scan_from or (end == job.scan_from and job.scan_skip)):
        error = _replay_error(job, f"the partition ends at offset {end}")
    return OwnerReport(
        p=job.p,
        position=position,
        scan_end=offset,
        scan_rows=rows,
        complete=error is None and sealed and offset >= end,
        template=template if job.template is None else None,
        first_rows=first_rows,
        error=error,
    )


def _replay_error(job: OwnerJob, what: str) -> str:
    return (
        f"partition {job.p} of stream {job.stream!r} does not replay what the array "
        f"holds: {what}, but up to offset {job.scan_from} row {job.scan_skip} is "
        "durable already. A resumed sink needs the same records at the same offsets; "
        "sink a different stream into a new array"
    )


def owner_step(job: OwnerJob) -> OwnerReport:
    """Trim, write the assigned chunks, scan what arrived; runs on the owner."""
    store = _local_log(job.stream, job.epoch, job.p)
    if job.trim_upto > 0:
        store.trim(job.stream, job.epoch, job.p, job.trim_upto)
    position = _write(store, job) if job.nrows else job.position
    if not job.scan:
        return OwnerReport(job.p, position, job.scan_from, 0, False)
    return _scan(store, job, position)


def take_rows(job: OwnerJob) -> np.ndarray:
    """The partition's last ``job.nrows`` rows (fewer than a chunk), for the tail."""
    store = _local_log(job.stream, job.epoch, job.p)
    o, r = job.position
    records, lengths = _records(store, job, o, r + job.nrows)
    (pieces,) = cut(job.position, lengths, job.nrows, job.nrows)
    # A copy: it travels to the driver, and must not pin the log's buffers.
    return np.array(_rows(records, pieces, job.axis), copy=True)


def trim_only(stream: str, epoch: int, p: int, upto: int) -> int:
    """Free durable records ``< upto`` of the partition; bytes freed (0 if gone)."""
    try:
        store = _local_log(stream, epoch, p)
    except StreamNotFoundError:
        return 0
    return int(store.trim(stream, epoch, p, upto))
