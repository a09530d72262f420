"""The driver of a streaming Zarr sink: plans rounds, keeps what is durable (one thread).

:class:`SinkRun` is the mutable run behind a :class:`~aimss_dask.sink.stream_sink.Sink`;
the design is described in :mod:`aimss_dask.sink.stream_sink`. Its array's
metadata is written by :mod:`~aimss_dask.sink._stream_array`, its tasks on
the owners run through :mod:`~aimss_dask.sink._stream_owners`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

import numpy as np

from aimss_dask.api import runs as run_api
from aimss_dask.core.errors import (
    AIMSSError,
    InvalidArgumentError,
    PartitionLostError,
    SinkError,
    StoreNotFoundError,
    StoreReadOnlyError,
)
from aimss_dask.core.runs import OnLoss
from aimss_dask.sink import _stream_plan as plan
from aimss_dask.sink import _xarray as xr_sink
from aimss_dask.sink._stream_array import SinkArray
from aimss_dask.sink._stream_owners import Owners
from aimss_dask.sink._stream_plan import Committed, Position, Template
from aimss_dask.sink._stream_tasks import (
    OwnerJob,
    OwnerReport,
    Target,
    owner_step,
    take_rows,
)
from aimss_dask.sink.specs import StreamSinkSpec

logger = logging.getLogger("aimss_dask")

#: Poll interval of an idle driver: doubles from the first to the second
#: while nothing arrives, back to the first as soon as something does.
IDLE_POLL = (0.02, 0.5)
#: Least time between two progress reports to the coordinator.
REPORT_EVERY = 0.5


class SinkRun:
    """State and rounds of one sink run; :meth:`main` is its thread's body.

    It plans each round and keeps what is durable; the array's metadata is
    :class:`SinkArray`'s, the tasks on the owners are :class:`Owners`'.
    """

    def __init__(
        self,
        spec: Any,
        target: Target,
        axis: int,
        chunks: Any,
        existing: tuple[Template, int, Committed] | None,
        client: Any,
        ep: Any,
        *,
        dims: tuple[str, ...] | None = None,
        named: bool = False,
        zarr_format: int = 3,
        groups: tuple[str, ...] = (),
        io_priority: int = 0,
    ) -> None:
        self.spec = spec
        self.target = target
        self._axis = axis
        self._chunks = chunks
        # An xarray variable (see stream_to_zarr): its dims (None: xarray's
        # defaults, once the rank is known) and the groups consolidated at the end.
        self._dims = dims
        self._named = named
        self._zarr_format = zarr_format
        self._groups = groups
        self._array = SinkArray(target, spec.name)
        self._owners = Owners(
            spec, target.run, client, ep, self._check_lost, lambda: self._array.truncate(self._committed)
        )
        n = spec.partitions
        self._template: Template | None = None
        self._chunk_rows = 0
        self._committed: Committed | None = None
        if existing is not None:
            self._template, self._chunk_rows, self._committed = existing
        start = self._committed.offsets if self._committed else ((0, 0),) * n
        self._pos: list[Position] = list(start)
        self._scan = [o for o, _ in start]
        self._skip = [r for _, r in start]  # durable rows of record scan[p]
        self._avail = [0] * n
        self._complete = [False] * n
        self._trimmed = [0] * n
        self._seen = [(0, 0)] * n  # (records, rows) scanned per partition
        self.lock = threading.Lock()
        self.stop = threading.Event()  # set by Sink.close()
        self._state = "starting"
        self.error: BaseException | None = None
        self._rounds = 0
        self._chunks_written = 0
        # The sink as the coordinator lists it: reads the stream, fails if it is lost.
        self.listed = run_api.ListedRun(
            StreamSinkSpec(
                run_id=f"zarr-sink-{target.run}", reads=(spec.name,), on_loss=OnLoss.FAIL, target=target.where,
                io_priority=io_priority,
            ),
            ep,
            REPORT_EVERY,
        )

    def info(self) -> dict[str, Any]:
        """See :meth:`Sink.info`."""
        with self.lock:
            c = self._committed
            return {
                "stream": self.spec.name,
                "array": self.target.where,
                "state": self._state,
                "rows": c.rows if c else 0,
                "offsets": [list(p) for p in (c.offsets if c else self._pos)],
                "pending_rows": list(self._avail),
                "chunk_rows": self._chunk_rows or None,
                "chunks_written": self._chunks_written,
                "rounds": self._rounds,
                "complete": bool(c and c.complete),
                "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
                "run": self.target.run,
            }

    # -- driver --------------------------------------------------------------------------

    def _set(self, **kw: Any) -> None:
        """Change what :meth:`info` reports, atomically (``error`` is public)."""
        with self.lock:
            for k, v in kw.items():
                setattr(self, k if k == "error" else f"_{k}", v)

    def main(self) -> None:
        try:
            self._set(state="running")
            self.listed.start(self._progress())
            self._hold()
            if self._loop():
                self._set(state="done")
        except BaseException as e:  # noqa: BLE001 -- reported by wait()
            self._set(state="failed", error=_translate(e, self._resume_hint()))
            if not isinstance(e, AIMSSError):
                logger.warning("aimss: sink of %r failed: %r", self.spec.name, e)
        if not self._owners.client_closed():  # else the coordinator closed the run with its client
            state = {"done": "done", "closed": "closed"}.get(self._state, "failed")
            self.listed.end(state, self.error if state == "failed" else None, self._progress())

    def _progress(self) -> dict[str, Any]:
        info = self.info()
        return {k: info[k] for k in ("rows", "chunks_written", "rounds", "pending_rows", "complete")}

    def _resume_hint(self) -> str:
        c = self._committed
        durable = f"{c.rows} rows (offsets {[list(o) for o in c.offsets]})" if c else "nothing"
        return (
            f"{durable} of {self.target.where} are durable; to resume, write the same "
            "records to the stream (re-create it if it was lost) and call to_zarr on the "
            "same array again"
        )

    def _activate(self) -> None:
        """Take over the array before this sink's first write (see :meth:`SinkArray.activate`)."""
        if self._committed is not None and not self._array.active:
            self._set(committed=self._array.activate(self._committed))

    def _commit(self, **changes: Any) -> None:
        assert self._committed is not None
        self._set(committed=self._array.commit(self._committed, **changes))
        self._hold()

    def _hold(self) -> None:
        """Keep the stream's records from the durable offsets on, for this sink.

        Its consumer group (named by the array) holds them: another
        application's sink of the same stream trims only what every group
        has passed (:meth:`_trim_targets`), so it never trims records this
        one has still to write. The group stays when the sink stops early:
        a sink that resumes the array needs them, and goes on with the same
        group (offsets only move forward).
        """
        c = self._committed
        offsets = [[p, c.offsets[p][0] if c else 0] for p in range(self.spec.partitions)]
        self._owners.hold(self.hold_group, offsets)

    @property
    def hold_group(self) -> str:
        """The consumer group that holds this sink's records (see :meth:`_hold`)."""
        return f"aimss-sink:{self.target.where}"

    def _loop(self) -> bool:
        """Rounds until complete (True) or stopped (False)."""
        idle = IDLE_POLL[0]
        while True:
            if self.stop.is_set():
                closed = SinkError(
                    f"sink of stream {self.spec.name!r} was closed before it finished; "
                    + self._resume_hint()
                )
                self._set(state="closed", error=closed)
                return False
            if self._owners.client_closed():
                raise SinkError(f"the client of the sink of stream {self.spec.name!r} closed")
            info = self._owners.info()
            jobs = self._plan(info)
            if jobs:
                self._round(jobs)
                self.listed.report(self._progress())
                idle = IDLE_POLL[0]
                continue
            if all(self._complete) and all(a < self._chunk_rows or self._template is None for a in self._avail):
                self._finish()
                return True
            self.listed.report(self._progress())  # what the last rounds did, once they are over
            self.stop.wait(idle)
            idle = min(idle * 2, IDLE_POLL[1])

    def _check_lost(self, lost: Any, involved: Any) -> None:
        """Raise if a lost partition still matters: it has rows not yet durable, or a task."""
        needed = sorted(
            p for p in lost or () if p in involved or not (self._complete[p] and self._avail[p] == 0)
        )
        if needed:
            raise PartitionLostError(
                f"partition(s) {needed} of stream {self.spec.name!r} were lost with "
                "their worker while the sink was running"
            )

    def _trim_targets(self, info: dict[str, Any]) -> list[int]:
        c = self._committed
        out = [c.offsets[p][0] if c else 0 for p in range(self.spec.partitions)]
        for offsets in info.get("groups", {}).values():
            out = [min(a, int(b)) for a, b in zip(out, offsets)]
        return out

    def _plan(self, info: dict[str, Any]) -> dict[int, tuple[OwnerJob, plan.Slot | None]]:
        spec = self.spec
        c = self._committed
        slots: dict[int, plan.Slot] = {}
        if self._template is not None and c is not None and not c.complete:
            cap = plan.rows_per_round(self._chunk_rows, self._template.row_bytes)
            slots = {s.p: s for s in plan.allocate(c.rows, self._chunk_rows, self._avail, cap)}
        trim = self._trim_targets(info)
        lost = set(info["lost"])  # all durable (else _stream_info raised): leave them be
        jobs = {}
        for p in range(spec.partitions):
            if p in lost:
                continue
            slot = slots.get(p)
            if self._complete[p]:
                scan = False
            elif info["sealed"]:
                scan = True  # to find the end (and the last rows)
            else:
                scan = plan.worth_scanning(
                    info["records"][p] - self._scan[p],
                    self._avail[p],
                    self._seen[p][0],
                    self._seen[p][1],
                    self._chunk_rows,
                )
            if not (slot or scan or trim[p] > self._trimmed[p]):
                continue
            jobs[p] = (
                OwnerJob(
                    stream=spec.name,
                    epoch=spec.epoch,
                    p=p,
                    axis=self._template.axis if self._template else self._axis,
                    trim_upto=trim[p] if trim[p] > self._trimmed[p] else 0,
                    position=self._pos[p],
                    nrows=slot.nchunks * self._chunk_rows if slot else 0,
                    start=slot.start if slot else 0,
                    chunk_rows=self._chunk_rows,
                    target=self.target if slot else None,
                    scan=scan,
                    scan_from=self._scan[p],
                    scan_skip=self._skip[p],
                    template=self._template,
                ),
                slot,
            )
        return jobs

    def _round(self, jobs: dict[int, tuple[OwnerJob, plan.Slot | None]]) -> None:
        slots = [s for _, s in jobs.values() if s is not None]
        c = self._committed
        if slots:
            assert c is not None and self._template is not None
            self._activate()
            new_rows = max(s.start + s.nchunks * self._chunk_rows for s in slots)
            self._array.resize(self._template, new_rows)
        futures = {
            p: self._owners.submit(owner_step, job, "round", self._rounds) for p, (job, _) in jobs.items()
        }
        reports: dict[int, OwnerReport] = self._owners.gather(futures)
        del futures
        self._rounds += 1
        runs = []
        errors = []
        templates = {}
        with self.lock:
            for p in sorted(jobs):
                job, slot = jobs[p]
                r = reports[p]
                if slot is not None:
                    runs.append((p, job.position[0], job.position[1], slot.start, job.nrows))
                    self._pos[p] = r.position
                    self._avail[p] -= job.nrows
                    self._chunks_written += slot.nchunks
                if job.trim_upto:
                    self._trimmed[p] = job.trim_upto
                if job.scan:
                    if r.scan_end > self._scan[p]:
                        self._skip[p] = 0
                        k, n = self._seen[p]
                        self._seen[p] = (k + r.scan_end - self._scan[p], n + r.scan_rows)
                    self._scan[p] = r.scan_end
                    self._avail[p] += r.scan_rows
                    self._complete[p] = r.complete
                if r.template is not None:
                    templates[p] = (r.template, r.first_rows)
                if r.error:
                    errors.append(r.error)
        if runs:
            assert c is not None
            total = sum(n for *_, n in runs)
            self._commit(
                offsets=tuple(self._pos),
                rows=c.rows + total,
                layout=tuple(map(tuple, plan.extend_layout([list(x) for x in c.layout], runs))),
            )
        if templates and self._template is None:
            self._learn(templates)
        if errors:
            raise InvalidArgumentError(errors[0])
        c = self._committed
        if c is not None and c.complete and any(a > 0 for a in self._avail):
            raise InvalidArgumentError(
                f"{self.target.where} was completed by an earlier sink (its last chunk is "
                f"partial) and cannot grow, but stream {self.spec.name!r} has records past "
                f"its offsets {[list(o) for o in c.offsets]}; sink into a new array"
            )

    def _learn(self, templates: dict[int, tuple[Template, int]]) -> None:
        """The first records are here: check they agree, then create the array."""
        first = min(templates)
        template, first_rows = templates[first]
        for p, (t, _) in sorted(templates.items()):
            if t != template:
                raise InvalidArgumentError(
                    f"partitions {first} and {p} of stream {self.spec.name!r} start with "
                    f"different records ({template.describe()} vs {t.describe()}); every "
                    "record of a Zarr sink needs the same dtype and shape but along the axis"
                )
        chunk_shape = plan.choose_chunks(template, self._chunks, first_rows)
        chunk_rows = chunk_shape[template.axis]
        committed = replace(
            Committed.fresh(self.spec.partitions, 0, chunk_rows, template.axis),
            run=self.target.run,
            stream=self.spec.name,
        )
        kwargs: dict[str, Any] = {"attributes": {"aimss": committed.to_doc()}}
        if self._named:
            what = f"the records of stream {self.spec.name!r} ({template.describe()})"
            if self._dims is not None:
                dims = xr_sink.check_dims(self._dims, template.ndim, what)
            else:
                dims = xr_sink.default_dims(template.ndim)
            kwargs = xr_sink.dims_kwargs(dims, self._zarr_format, kwargs, self.target.where)
        self._array.create(template, chunk_shape, self._zarr_format, kwargs)
        self._set(template=template, chunk_rows=chunk_rows, committed=committed)

    def _finish(self) -> None:
        """Everything sealed, no full chunk left: write the tail, commit ``complete``."""
        c = self._committed
        if self._template is None or c is None:
            return  # an empty stream: no dtype, so no array
        ends = tuple((s, 0) for s in self._scan)
        rems = list(self._avail)
        if c.complete and not any(rems):
            self._consolidate()  # a replay of a completed sink: nothing else to do
            return
        self._activate()
        if any(rems):
            jobs = {
                p: OwnerJob(
                    stream=self.spec.name,
                    epoch=self.spec.epoch,
                    p=p,
                    axis=self._template.axis,
                    trim_upto=0,
                    position=self._pos[p],
                    nrows=n,
                    scan=False,
                )
                for p, n in enumerate(rems)
                if n > 0
            }
            parts = self._owners.gather(
                {p: self._owners.submit(take_rows, j, "tail", self._rounds) for p, j in jobs.items()}
            )
            tail = np.concatenate([parts[p] for p in sorted(parts)], axis=self._template.axis)
            total = self._array.write_tail(self._template, c.rows, tail)
        else:
            total = 0
        runs = plan.tail_runs(self._pos, rems, c.rows)
        self._commit(
            offsets=ends,
            rows=c.rows + total,
            complete=True,
            layout=tuple(map(tuple, plan.extend_layout([list(x) for x in c.layout], runs))),
        )
        with self.lock:
            self._pos = list(ends)
            self._avail = [0] * self.spec.partitions
        self._consolidate()
        self._final_trim()

    def _consolidate(self) -> None:
        self._array.consolidate(self._groups)

    def _final_trim(self) -> None:
        try:
            info = self._owners.info()
            trim = self._trim_targets(info)
            self._owners.trim(
                {
                    p: trim[p]
                    for p in range(self.spec.partitions)
                    if trim[p] > self._trimmed[p] and p not in info["lost"]
                }
            )
        except Exception as e:  # the data is durable: trimming is only memory
            logger.info("aimss: final trim of %r skipped: %r", self.spec.name, e)


def _translate(e: BaseException, hint: str) -> BaseException:
    """The exception ``wait()`` raises: ours as they are (plus the resume hint), others wrapped."""
    if isinstance(e, (PartitionLostError, SinkError)) and hint not in str(e):
        out = type(e)(f"{e}; {hint}")
        out.__cause__ = e.__cause__ or e
        return out
    if isinstance(e, AIMSSError):
        return e
    if isinstance(e, PermissionError):
        out2: BaseException = StoreReadOnlyError(f"writing failed with {e}; {hint}")
    elif isinstance(e, FileNotFoundError):
        out2 = StoreNotFoundError(f"writing failed with {e}; {hint}")
    else:
        out2 = SinkError(f"writing failed with {type(e).__name__}: {e}; {hint}")
    out2.__cause__ = e
    return out2
