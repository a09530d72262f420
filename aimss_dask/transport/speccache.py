"""What one process remembers about streams: their specs and round-robin counters.

A leaf of the stream layer, so the worker plugin can forget a destroyed
stream without importing the public API. Specs never change for a given
epoch, so caching them is safe; a stale one (destroyed elsewhere) is rejected
by the owners by epoch. A recovered stream's owners still take its older
epochs, so a process told of a recovery caches no older one again
(:func:`supersede`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from aimss_dask.core.specs import StreamSpec

_specs: dict[str, StreamSpec] = {}
# name -> the oldest epoch still current (see supersede()).
_floors: dict[str, int] = {}
_round_robin: dict[str, itertools.count] = {}
_lock = threading.Lock()
# The specs a task looked up, by thread: see tracking().
_tls = threading.local()


def remember(spec: StreamSpec) -> None:
    """Cache ``spec`` (the newest epoch of its name wins).

    A lookup that was answered before a restart or a recovery, and
    remembered after it, must not put the older epoch back: nor one older
    than the epoch :func:`supersede` named, once the cache was emptied.

    Examples
    --------
    >>> new, old = StreamSpec("doc-s", 1, ("a",), epoch=5), StreamSpec("doc-s", 1, ("a",), epoch=4)
    >>> remember(new); remember(old); get("doc-s").epoch
    5
    >>> forget("doc-s")
    """
    with _lock:
        if spec.epoch < _floors.get(spec.name, spec.epoch):
            return
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


def forget(name: str, destroyed: int | None = None) -> None:
    """Drop what this process cached about ``name``, so that the next lookup asks the coordinator.

    ``destroyed``: the epoch of ``name`` destroyed here; a floor that
    :func:`supersede` set at or below it goes too (a newer stream of the
    name has a newer epoch anyway).
    """
    with _lock:
        _specs.pop(name, None)
        _round_robin.pop(name, None)
        if destroyed is not None and _floors.get(name, destroyed + 1) <= destroyed:
            del _floors[name]


def supersede(name: str, epoch: int) -> None:
    """Stream ``name`` continues under ``epoch``: forget its cached spec, and never cache an older one again.

    A recovery keeps the stream's logs, which still take writes tagged with
    the older epoch; a lookup answered before the recovery and remembered
    after this call would have the tasks of this process write under that
    epoch for good, and their results would look older than the partitions
    the recovery re-created, run after run. The floor stays until the
    stream is destroyed here (:func:`forget` with ``destroyed``).

    Examples
    --------
    >>> supersede("doc-r", 5); remember(StreamSpec("doc-r", 1, ("a",), epoch=4)); get("doc-r") is None
    True
    >>> remember(StreamSpec("doc-r", 1, ("a",), epoch=5)); get("doc-r").epoch
    5
    >>> forget("doc-r", destroyed=5)
    """
    with _lock:
        _specs.pop(name, None)
        _round_robin.pop(name, None)
        _floors[name] = max(epoch, _floors.get(name, epoch))


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
