"""``aimss_dask.trace``: record where data moved, on every worker, in DFTracer's format."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aimss_dask.api.context import current
from aimss_dask.core import trace as tracer

__all__ = ["Trace", "trace"]


@dataclass
class Trace:
    """A trace under way or done: its ``folder`` and, once stopped, its ``files`` (one per process)."""

    folder: str
    files: list[str] = field(default_factory=list)


@contextmanager
def trace(path: str | os.PathLike[str], *, compress: bool = True) -> Iterator[Trace]:
    """Trace data movement on every worker, the scheduler and this process while the block runs.

    Events: ``push`` (a batch from ``write`` to its owner's answer),
    ``append`` (a batch stored), ``seal``, ``read``, ``spill``,
    ``sink-write``, ``source-read``, ``recover``, and the coordinator's
    events (``run-recovered``, ``straggler``, ...), each tagged with its
    stream, partition and sizes (a sink write with its run). Each process
    writes one file, in a folder of its own under ``path`` (made if
    missing; nothing there is overwritten or deleted): JSON lines of
    Chrome-trace complete events, ``.pfw.gz`` (``compress=False``:
    ``.pfw``), which DFTracer's tools and Perfetto read. A worker that joins
    during the trace is traced from its setup on.

    Examples
    --------
    >>> with aimss_dask.trace("traces/shuffle") as t:           # doctest: +SKIP
    ...     aimss_dask.shuffle(df, on="k").compute()
    >>> t.files                                                 # doctest: +SKIP
    ['traces/shuffle/node1-4242/aimss-0.pfw.gz', ...]
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"trace path must be a folder name (str or path), got {path!r}")
    folder = os.path.abspath(os.fspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"trace path {folder!r} is a file; give a folder (made if missing)")
    os.makedirs(folder, exist_ok=True)
    ep = current("trace")
    handle = Trace(folder)
    mine = tracer.start(folder, compress=compress)
    try:
        ep.scheduler_op("trace", folder=folder, compress=compress)
        yield handle
    finally:
        files = ep.scheduler_op("trace", folder=None)["files"]
        tracer.stop()
        handle.files = sorted(set(files) | {mine})
