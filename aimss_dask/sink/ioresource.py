"""Which file system a sink writes to, as the coordinated I/O scheduler names it.

A *resource* is one host's view of one file system: ``host|dev:<st_dev>``
for a folder (two arrays on one disk share it; a parallel file system
mounted on every host is one resource per host, since each host's link to
it is what its writers share), ``host|<protocol>:<bucket>`` for an object
store. Stores in memory are no resource: their writes are never queued.

Examples
--------
>>> import zarr
>>> io_resource(zarr.create_array(zarr.storage.MemoryStore(), shape=(2,), dtype="i4"), "h") is None
True
"""

from __future__ import annotations

import os
from typing import Any

from aimss_dask.sink.durable import array_root

__all__ = ["io_resource"]


def io_resource(array: Any, host: str) -> str | None:
    """The resource that writes to ``array`` (an open Zarr array) from ``host`` use; None: none."""
    root = array_root(array)
    if root is not None:
        path = os.path.abspath(root)
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)  # the array's folder may not exist yet
        try:
            return f"{host}|dev:{os.stat(path).st_dev}"
        except OSError:
            return None
    fs = getattr(array.store, "fs", None)
    if fs is None:
        return None
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    bucket = str(getattr(array.store, "path", "")).lstrip("/").split("/", 1)[0]
    return f"{host}|{protocol}:{bucket}"
