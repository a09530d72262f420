"""The driver of a streaming Zarr sink: rounds, commits, failures (one thread).

:class:`SinkRun` is the mutable run behind a :class:`~aimss_dask.sink.stream_sink.Sink`;
the design is described in :mod:`aimss_dask.sink.stream_sink`.
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
    StreamNotFoundError,
)
from aimss_dask.core.runs import OnLoss
from aimss_dask.sink import _stream_plan as plan
from aimss_dask.sink import _xarray as xr_sink
from aimss_dask.sink._stream_plan import Committed, Position, Template
from aimss_dask.sink._stream_tasks import (
    OwnerJob,
    OwnerReport,
    Target,
    owner_step,
    take_rows,
    trim_only,
)
from aimss_dask.sink.specs import StreamSinkSpec
from aimss_dask.sink.units import unit_writer, whole_region

logger = logging.getLogger("aimss_dask")

#: Poll interval of an idle driver: doubles from the first to the second
#: while nothing arrives, back to the first as soon as something does.
IDLE_POLL = (0.02, 0.5)
#: How often a driver waiting on its tasks checks that their owners are alive.
LOST_CHECK = 1.0
#: Least time between two progress reports to the coordinator.
REPORT_EVERY = 0.5
#: How long a failed round waits for its other tasks before cutting the array
#: back (a task still writing must not land after the cut).
FAIL_GRACE = 30.0


class SinkRun:
    """State and rounds of one sink run; :meth:`main` is its thread's body."""

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
        self._client = client
        self._ep = ep
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
        self._arr: Any = None
        self.lock = threading.Lock()
        self.stop = threading.Event()  # set by Sink.close()
        self._state = "starting"
        self.error: BaseException | None = None
        self._rounds = 0
        self._chunks_written = 0
        # The sink as the coordinator lists it: reads the stream, fails if it is lost.
        self.listed = run_api.ListedRun(
            StreamSinkSpec(
                run_id=f"zarr-sink-{target.run}", reads=(spec.name,), on_loss=OnLoss.FAIL, target=target.where
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
            if self._loop():
                self._set(state="done")
        except BaseException as e:  # noqa: BLE001 -- reported by wait()
            self._set(state="failed", error=_translate(e, self._resume_hint()))
            if not isinstance(e, AIMSSError):
                logger.warning("aimss: sink of %r failed: %r", self.spec.name, e)
        if not self._client_closed():  # else the coordinator closed the run with its client
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
        """Take over an existing array, right before this sink's first write to it.

        Not earlier: a sink that fails on its first records (another dtype,
        another shape) leaves the array exactly as it was. The run fence
        first, so a leftover writer stops; then cut back whatever a failed
        round left past the committed rows.
        """
        if self._arr is not None or self._committed is None:
            return  # active already, or the array does not exist yet
        self._arr = self.target.open()
        self._commit(replace_run=True)
        self._truncate()

    def _truncate(self) -> None:
        c = self._committed
        if self._arr is None or c is None:
            return
        ax = c.axis
        if self._arr.shape[ax] != c.rows:
            shape = list(self._arr.shape)
            shape[ax] = c.rows
            self._arr.resize(tuple(shape))

    def _commit(self, *, replace_run: bool = False, **changes: Any) -> None:
        """Write the ``aimss`` attribute: one metadata write, by the driver only."""
        assert self._committed is not None and self._arr is not None
        if not replace_run:
            fresh = self.target.open(mode="r").attrs.get("aimss")
            run = fresh.get("run") if isinstance(fresh, dict) else None
            if run != self.target.run:
                raise SinkError(
                    f"another sink (run {run!r}) took over {self.target.where}; this one "
                    "stops without committing. Run one sink per array at a time"
                )
        new = replace(self._committed, run=self.target.run, stream=self.spec.name, **changes)
        self._arr.update_attributes({"aimss": new.to_doc()})
        self._set(committed=new)

    def _client_closed(self) -> bool:
        return self._client.status not in ("running", "connecting", "newly-created")

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
            if self._client_closed():
                raise SinkError(f"the client of the sink of stream {self.spec.name!r} closed")
            info = self._stream_info()
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

    def _stream_info(self) -> dict[str, Any]:
        try:
            info = self._ep.scheduler_op("info", name=self.spec.name)["info"]
        except StreamNotFoundError as e:
            raise SinkError(f"stream {self.spec.name!r} was destroyed while its sink was running") from e
        if info["epoch"] != self.spec.epoch:
            raise SinkError(
                f"stream {self.spec.name!r} was destroyed and created again while its sink was running"
            )
        self._check_lost(info["lost"])
        return info

    def _check_lost(self, lost: Any, involved: Any = ()) -> None:
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

    def _submit(self, fn: Any, job: OwnerJob, kind: str) -> Any:
        owner = self.spec.owners[job.p]
        return self._client.submit(
            fn,
            job,
            key=(f"zarr-sink-{kind}-{self.target.run[:12]}", self._rounds, job.p),
            workers=[owner],
            allow_other_workers=False,
            pure=False,
        )

    def _get(self) -> dict[str, Any]:
        try:
            return self._ep.scheduler_op("get", name=self.spec.name)
        except StreamNotFoundError as e:
            raise SinkError(f"stream {self.spec.name!r} was destroyed while its sink was running") from e

    def _gather(self, futures: dict[int, Any]) -> dict[int, Any]:
        """Results of pinned tasks; on any failure, wait for the rest and cut back.

        Never an unbounded wait: a result held by a worker that just died is
        rescheduled on that (gone) worker and would never come back, so every
        wait is short and followed by a look at the lost partitions.
        """
        from distributed import wait

        results: dict[int, Any] = {}
        try:
            while True:
                progress = False
                for p, f in futures.items():
                    if p in results:
                        continue
                    if f.status == "error":
                        try:
                            f.result()  # raises the task's exception
                        except StreamNotFoundError:
                            # Destroyed between the look at the stream and the task: say so.
                            self._stream_info()
                            raise
                    if f.status in ("cancelled", "lost") or self._client_closed():
                        raise SinkError(
                            f"the sink of stream {self.spec.name!r} lost its tasks (its client closed?)"
                        )
                    if f.status == "finished":
                        try:
                            results[p] = f.result(timeout=LOST_CHECK)
                            progress = True
                        except TimeoutError:
                            pass
                if len(results) == len(futures):
                    return results
                pending = [f for p, f in futures.items() if p not in results and f.status == "pending"]
                if pending and not progress:
                    try:
                        wait(pending, timeout=LOST_CHECK, return_when="FIRST_COMPLETED")
                        progress = True
                    except TimeoutError:
                        pass
                    except Exception:
                        pass  # cancelled futures: seen at the top of the loop
                if not progress:
                    self._check_lost(self._get().get("lost"), involved=futures)
        except BaseException:
            self._abort(futures)
            raise

    def _abort(self, futures: dict[int, Any]) -> None:
        """Let the round's other tasks end, then cut the array back to the commit."""
        from distributed import wait

        try:
            lost = set(self._get().get("lost", ()))
        except Exception:
            lost = set(futures)
        alive = [f for p, f in futures.items() if p not in lost]
        for p in lost & set(futures):
            futures[p].cancel()  # pinned to a dead worker: would wait forever
        try:
            wait(alive, timeout=FAIL_GRACE)
        except Exception:
            pass
        try:
            self._truncate()
        except Exception as e:
            logger.warning("aimss: sink could not cut %s back after a failure: %r", self.target.where, e)

    def _round(self, jobs: dict[int, tuple[OwnerJob, plan.Slot | None]]) -> None:
        slots = [s for _, s in jobs.values() if s is not None]
        c = self._committed
        if slots:
            assert c is not None and self._template is not None
            self._activate()
            new_rows = max(s.start + s.nchunks * self._chunk_rows for s in slots)
            self._arr.resize(self._template.array_shape(new_rows))
        futures = {p: self._submit(owner_step, job, "round") for p, (job, _) in jobs.items()}
        reports: dict[int, OwnerReport] = self._gather(futures)
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
        import zarr

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
        try:
            arr = zarr.create_array(
                self.target.store,
                name=self.target.path,
                shape=template.array_shape(0),
                chunks=chunk_shape,
                dtype=np.dtype(template.dtype),
                zarr_format=self._zarr_format,
                **kwargs,
            )
        except zarr.errors.ContainsArrayError as e:
            raise SinkError(
                f"{self.target.where} was created by someone else while the sink started; "
                "run one sink per array at a time"
            ) from e
        self._arr = arr
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
            parts = self._gather({p: self._submit(take_rows, j, "tail") for p, j in jobs.items()})
            tail = np.concatenate([parts[p] for p in sorted(parts)], axis=self._template.axis)
            total = int(tail.shape[self._template.axis])
            self._arr.resize(self._template.array_shape(c.rows + total))
            # Fenced like the owners' writes; the tail ends at the array's edge,
            # so it is whole units too.
            region = whole_region(tail.shape, self._template.axis, c.rows, total)
            unit_writer(self.target.open_fenced())(region, tail)
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
        """The groups' consolidated metadata, once the array has its final shape."""
        xr_sink.consolidate(self.target.store, self._groups, None)

    def _final_trim(self) -> None:
        from distributed import wait

        try:
            info = self._ep.scheduler_op("info", name=self.spec.name)["info"]
            trim = self._trim_targets(info)
            futs = [
                self._client.submit(
                    trim_only,
                    self.spec.name,
                    self.spec.epoch,
                    p,
                    trim[p],
                    workers=[self.spec.owners[p]],
                    allow_other_workers=False,
                    pure=False,
                )
                for p in range(self.spec.partitions)
                if trim[p] > self._trimmed[p] and p not in info["lost"]
            ]
            # Bounded: an owner that dies now must not keep this thread.
            wait(futs, timeout=FAIL_GRACE)
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
