"""The streaming sink's array: created, taken over, resized, committed (driver side).

The driver is the array's only metadata writer: :class:`SinkArray` does
every write of ``zarr.json`` (shape, the ``aimss`` document) and the tail's
units; the owners write only whole chunks
(:mod:`aimss_dask.sink._stream_tasks`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from aimss_dask.core.errors import SinkError
from aimss_dask.sink import _stream_plan as plan
from aimss_dask.sink import _xarray as xr_sink
from aimss_dask.sink._stream_plan import Committed, Template
from aimss_dask.sink._stream_tasks import Target
from aimss_dask.sink.durable import sync_metadata, sync_units
from aimss_dask.sink.units import unit_writer, whole_region


class SinkArray:
    """One sink run's handle on its target array.

    ``committed`` documents are values: every method takes the current one
    and :meth:`commit` returns the next, so the driver keeps the one copy
    it reports from.
    """

    def __init__(self, target: Target, stream: str) -> None:
        self.target = target
        self.stream = stream
        self._arr: Any = None

    @property
    def active(self) -> bool:
        """Whether this run writes the array (created it, or took it over)."""
        return self._arr is not None

    def activate(self, committed: Committed) -> Committed:
        """Take over an existing array, right before this sink's first write to it.

        Not earlier: a sink that fails on its first records (another dtype,
        another shape) leaves the array exactly as it was. The run fence
        first, so a leftover writer stops; then cut back whatever a failed
        round left past the committed rows.
        """
        if self._arr is not None:
            return committed
        arr = self.target.open()
        doc = arr.attrs.get("aimss")
        now = None if doc is None else plan.parse_doc(doc, self.target.where)
        seen = committed if committed.run is not None else None  # None: the array had no document
        if now != seen:
            # Another sink committed since this one looked: taking the array
            # over with the older document would cut away rows it committed.
            raise SinkError(
                f"{self.target.where} changed since this sink started ("
                + (f"another sink, run {now.run!r}, committed into it" if now is not None
                   else "its 'aimss' attribute was removed")
                + "); nothing was written: run one sink per array at a time"
            )
        self._arr = arr
        new = self.commit(committed, replace_run=True)
        self.truncate(new)
        return new

    def truncate(self, committed: Committed | None) -> None:
        """Cut the array back to its committed rows (a failed round's chunks go)."""
        if self._arr is None or committed is None:
            return
        ax = committed.axis
        if self._arr.shape[ax] != committed.rows:
            shape = list(self._arr.shape)
            shape[ax] = committed.rows
            self._arr.resize(tuple(shape))

    def commit(self, committed: Committed, *, replace_run: bool = False, **changes: Any) -> Committed:
        """Write the ``aimss`` attribute (one metadata write); returns what is now committed."""
        assert self._arr is not None
        if not replace_run:
            # Fresh from the store: the document written goes with the shape
            # and attributes there now, never with this handle's older ones.
            self._arr = self.target.open_fenced()
        new = replace(committed, run=self.target.run, stream=self.stream, **changes)
        self._arr.update_attributes({"aimss": new.to_doc()})
        if self.target.durable:
            # The owners synced the chunks this covers before they reported.
            sync_metadata(self._arr)
        return new

    def resize(self, template: Template, rows: int) -> None:
        """Grow the array to ``rows``, if this run still owns it (a resize writes all of ``zarr.json``)."""
        self._arr = self.target.open_fenced()
        self._arr.resize(template.array_shape(rows))

    def create(
        self,
        template: Template,
        chunk_shape: tuple[int, ...],
        zarr_format: int,
        kwargs: dict[str, Any],
    ) -> None:
        """Create the array for records like ``template``; ``kwargs`` hold its attributes."""
        import zarr

        try:
            self._arr = zarr.create_array(
                self.target.store,
                name=self.target.path,
                shape=template.array_shape(0),
                chunks=chunk_shape,
                dtype=np.dtype(template.dtype),
                zarr_format=zarr_format,
                **kwargs,
            )
        except zarr.errors.ContainsArrayError as e:
            raise SinkError(
                f"{self.target.where} was created by someone else while the sink started; "
                "run one sink per array at a time"
            ) from e
        if self.target.durable:
            sync_metadata(self._arr, created=True)  # its folders are new entries of their parents

    def write_tail(self, template: Template, start: int, tail: np.ndarray) -> int:
        """Grow the array by ``tail`` at row ``start`` (a chunk edge); rows written.

        The tail ends at the array's edge, so it is whole units too. Fenced
        like the owners' writes.
        """
        total = int(tail.shape[template.axis])
        self.resize(template, start + total)
        region = whole_region(tail.shape, template.axis, start, total)
        arr = self.target.open_fenced()
        unit_writer(arr)(region, tail)
        if self.target.durable:
            sync_units(arr, [region])
        return total

    def consolidate(self, groups: tuple[str, ...]) -> None:
        """The groups' consolidated metadata, once the array has its final shape."""
        xr_sink.consolidate(self.target.store, groups, None)
