"""The unit writer: gather a unit, write it once, commit it.

A *unit* is the part of a Zarr array that has exactly one writer: a chunk,
or a shard when the array is sharded. Every sink path that holds whole
units stores them through one :class:`UnitWriter` of the array, made by
:func:`unit_writer`:

- aligned ``to_zarr`` (a block is a whole number of units), queued on the
  worker's write-behind (:mod:`aimss_dask.sink.writer`);
- the push run, where a unit's owner assembles it from the pieces pushed to
  it (:mod:`aimss_dask.sink.push_run`);
- the streaming sink, whose rounds hand each owner whole chunks and whose
  tail ends at the array's edge (:mod:`aimss_dask.sink._stream_tasks`).

Each unit lands whole or not at all: the direct writers
(:class:`~aimss_dask.sink.chunkfiles.ChunkWriter`,
:class:`~aimss_dask.sink.shards.ShardWriter`) write a private file and
rename it onto Zarr's key; Zarr's own path (:class:`ZarrUnits`) covers every
other store and layout. A region that holds only part of a unit is refused
by the direct writers, never padded over the unit's other rows.

Two fast paths write *pieces* of units instead, because moving the pieces to
one writer first would cost more than the write (a misaligned ``to_zarr``
on one host): rows in place (:meth:`RowsInPlace.write_rows`) and inner
chunks appended to shards (:meth:`ShardWriter.append_chunks`). Their commit
is a rename of the run's partial files at the run's end. Both are built by
:func:`aimss_dask.sink.direct.in_place_writers`.
"""

from __future__ import annotations

from typing import Any, Protocol

from aimss_dask.sink.assembler import RowSlabs
from aimss_dask.sink.chunkfiles import Data
from aimss_dask.sink.direct import direct_writer

__all__ = ["UnitWriter", "ZarrUnits", "unit_writer", "whole_region"]


class UnitWriter(Protocol):
    """Stores regions made of whole units of one array.

    ``writer(region, data)`` stores ``data`` (an array, or a unit's row
    slabs) at ``region`` and returns the array bytes written;
    ``prepare(regions)`` makes ahead what those writes will need (the
    directories of their files) and returns how many it made.
    """

    def __call__(self, region: tuple[slice, ...], data: Data) -> int: ...

    def prepare(self, regions: list[tuple[slice, ...]]) -> int: ...


class ZarrUnits:
    """Zarr's own write path, for stores and layouts the direct writers do not cover.

    Examples
    --------
    >>> import numpy as np, zarr
    >>> z = zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), chunks=(2,), dtype="i4")
    >>> ZarrUnits(z)((slice(0, 2),), np.arange(2, dtype="i4"))
    8
    >>> z[:2].tolist()
    [0, 1]
    """

    def __init__(self, array: Any) -> None:
        self.array = array

    def __call__(self, region: tuple[slice, ...], data: Data) -> int:
        if isinstance(data, RowSlabs):
            data = data.materialize()
        self.array[region] = data
        return int(data.nbytes)

    def prepare(self, regions: list[tuple[slice, ...]]) -> int:
        return 0  # Zarr makes what it needs as it writes


def unit_writer(array: Any) -> UnitWriter:
    """How to store whole units of ``array``: direct unit files where the layout allows.

    ``array`` is an open ``zarr.Array`` with the shape the writes target
    (open it again after a resize).

    Examples
    --------
    >>> import numpy as np, zarr, tempfile
    >>> z = zarr.create_array(tempfile.mkdtemp(), shape=(6, 2), chunks=(2, 2), dtype="f8")
    >>> put = unit_writer(z)
    >>> put((slice(0, 4), slice(0, 2)), np.ones((4, 2)))  # two whole chunks
    64
    >>> float(z[:].sum())
    8.0
    """
    direct = direct_writer(array)
    return direct if direct is not None else ZarrUnits(array)


def whole_region(shape: tuple[int, ...], axis: int, start: int, n: int) -> tuple[slice, ...]:
    """Rows ``start..start+n`` along ``axis``, and all of every other axis of ``shape``.

    >>> whole_region((10, 3), 0, 4, 2)
    (slice(4, 6, None), slice(0, 3, None))
    """
    return tuple(slice(start, start + n) if i == axis else slice(0, s) for i, s in enumerate(shape))
