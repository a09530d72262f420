"""Storage brokers that fill streams from files (prefetching sources).

:func:`from_zarr` makes a stream of a Zarr array's slabs that brokers on the
owner workers read ahead of the consumers; :meth:`aimss_dask.Stream.batches`
(:mod:`aimss_dask.source.loader`) reads it like a training data loader.
"""

# The loader provides Stream.batches when it is imported (api/extensions.py).
from aimss_dask.source import loader as loader
from aimss_dask.source.zarr_source import from_zarr

__all__ = ["from_zarr", "loader"]
