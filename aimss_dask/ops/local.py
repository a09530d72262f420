"""What a push run's task body finds on the worker it runs on.

The worker's address, its AIMSS plugin, the plugin's scratch pool and how
tight the log's byte budget is; plain NumPy and ``None`` off a worker (a
local scheduler, a test). Shared by the shuffle's and the sink's tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from aimss_dask.core.names import PLUGIN_NAME

#: ``(shape, dtype) -> uninitialised array``: np.empty, or a worker's scratch pool.
Alloc = Callable[[tuple[int, ...], Any], np.ndarray]


def memory_tight(extra: int = 0) -> bool:
    """Whether this worker's log (plus ``extra`` bytes) is past half its budget
    (:meth:`LogStore.tight`, the data plane's threshold for storing records
    as their own copies, too)."""
    store = getattr(here()[1], "store", None)
    return store is not None and store.tight(extra)


def scratch() -> tuple[str | None, Alloc]:
    """This worker's address and scratch allocator (plain NumPy elsewhere)."""
    address, plugin = here()
    pool = getattr(plugin, "scratch", None)
    return address, (pool.array if pool is not None else np.empty)


def here() -> tuple[str | None, Any]:
    """This worker's address and AIMSS plugin (``(None, None)`` off a worker)."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return None, None
    return worker.address, worker.plugins.get(PLUGIN_NAME)
