"""What one process remembers about streams: their specs and round-robin counters.

A leaf of the stream layer, so the worker plugin can forget a destroyed
stream without importing the public API. Specs never change for a given
epoch, so caching them is safe; a stale one (destroyed elsewhere) is rejected
by the owners by epoch.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from aimss_dask.core.specs import StreamSpec

_specs: dict[str, StreamSpec] = {}
_round_robin: dict[str, itertools.count] = {}
_lock = threading.Lock()
# The specs a task looked up, by thread: see tracking().
_tls = threading.local()


def remember(spec: StreamSpec) -> None:
    """Cache ``spec`` (the newest epoch of its name wins).

    A lookup that was answered before a restart or a recovery, and
    remembered after it, must not put the older epoch back.

    Examples
    --------
    >>> new, old = StreamSpec("doc-s", 1, ("a",), epoch=5), StreamSpec("doc-s", 1, ("a",), epoch=4)
    >>> remember(new); remember(old); get("doc-s").epoch
    5
    >>> forget("doc-s")
    """
    with _lock:
        held = _specs.get(spec.name)
        if held is None or held.epoch <= spec.epoch:
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


@contextmanager
def tracking() -> Iterator[dict[str, int]]:
    """Collect ``{name: epoch}`` of every spec this thread looks up (:func:`used`) meanwhile.

    A run's task wraps its body in this, so that when a write or read fails
    it can tell whether the spec it used was superseded by a restart.
    """
    used: dict[str, int] = {}
    outer = getattr(_tls, "used", None)
    _tls.used = used
    try:
        yield used
    finally:
        _tls.used = outer
        if outer is not None:  # a task body inside another: the outer one used them too
            for name, epoch in used.items():
                outer.setdefault(name, epoch)


def used(spec: StreamSpec) -> StreamSpec:
    """Note that this thread uses ``spec`` (the first epoch seen wins); returns it."""
    seen = getattr(_tls, "used", None)
    if seen is not None:
        seen.setdefault(spec.name, spec.epoch)
    return spec
