"""What one process remembers about streams: their specs and round-robin counters.

A leaf of the stream layer, so the worker plugin can forget a destroyed
stream without importing the public API. Specs never change for a given
epoch, so caching them is safe; a stale one (destroyed elsewhere) is rejected
by the owners by epoch.
"""

from __future__ import annotations

import itertools
import threading

from aimss_dask.core.specs import StreamSpec

_specs: dict[str, StreamSpec] = {}
_round_robin: dict[str, itertools.count] = {}
_lock = threading.Lock()


def remember(spec: StreamSpec) -> None:
    """Cache ``spec`` (the newest epoch of its name wins)."""
    with _lock:
        _specs[spec.name] = spec


def get(name: str) -> StreamSpec | None:
    """The cached spec of ``name``, if any."""
    return _specs.get(name)


def next_partition(spec: StreamSpec) -> int:
    """Round-robin partition of this process's next keyless write to ``spec``."""
    with _lock:
        counter = _round_robin.setdefault(spec.name, itertools.count())
    return next(counter) % spec.partitions


def forget(name: str) -> None:
    """Drop what this process cached about ``name`` (it was destroyed)."""
    with _lock:
        _specs.pop(name, None)
        _round_robin.pop(name, None)
