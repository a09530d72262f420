"""Helpers for tests and benchmarks of AIMSS on a real cluster: a worker made slow on purpose, and slow flags forgotten.

Not part of the user API (like ``distributed.utils_test``); the test suite
and ``benchmarks/`` share them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from aimss_dask.core.errors import InvalidArgumentError


def forget_slow_workers(dask_scheduler: Any = None) -> list[str]:
    """The coordinator forgets every worker it found slow, and the task times that found them; those it had.

    For ``client.run_on_scheduler``. What it forgets when the scheduler
    restarts. Tests sharing a cluster call it between them, and benchmarks
    between runs: a worker flagged by one run's noise on a loaded machine
    (a cold first run) would otherwise get no partitions, units or copies
    in the next runs.

    >>> client.run_on_scheduler(forget_slow_workers)  # doctest: +SKIP
    []
    """
    from aimss_dask.core.names import PLUGIN_NAME

    stragglers = dask_scheduler.plugins[PLUGIN_NAME].stragglers
    flagged = sorted(stragglers.slow)
    stragglers.clear()
    return flagged


@contextlib.contextmanager
def throttled(pid: int, share: float, period: float = 0.04) -> Iterator[None]:
    """Let process ``pid`` run only ``share`` of the time: a node ``1 / share`` times slower.

    A CPU-share limit without cgroups: the process is stopped
    (``SIGSTOP``) for ``(1 - share) * period`` of every ``period`` seconds
    and continued (``SIGCONT``) for the rest. Everything in it slows down
    alike -- its tasks, its event loop, its comms -- as on a node with a
    slow CPU, and the time Dask measures for its tasks grows with it. The
    process is always left running on exit.

    Examples
    --------
    >>> import os
    >>> pid = client.run(os.getpid, workers=[slow])[slow]  # doctest: +SKIP
    >>> with throttled(pid, share=0.25):                    # doctest: +SKIP
    ...     result = df.compute()                           # 4x slower on `slow`
    """
    if not 0 < share <= 1:
        raise InvalidArgumentError(f"share={share!r} must be in (0, 1]: the fraction of time the process runs")
    if not period > 0:
        raise InvalidArgumentError(f"period={period!r} must be a positive number of seconds")
    stop = threading.Event()
    on, off = share * period, (1 - share) * period

    def cycle() -> None:
        try:
            while not stop.is_set():
                if off > 0:
                    os.kill(pid, signal.SIGSTOP)
                    stop.wait(off)
                os.kill(pid, signal.SIGCONT)
                stop.wait(on)
        except ProcessLookupError:
            return  # the process ended (killed by a test): nothing to slow down
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    t = threading.Thread(target=cycle, name=f"aimss-throttle-{pid}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)



@contextlib.contextmanager
def slow_writes(client: Any, worker: str, delay: float) -> Iterator[None]:
    """Every chunk written on ``worker`` waits ``delay`` seconds first: a slow disk on one node.

    The wait is taken where AIMSS's sinks write (the worker's I/O gate,
    ``plugin.io_gate``, which every unit write passes through) and where
    Zarr writes a local store's keys (``zarr.storage.LocalStore.set``, the
    path of Dask's own ``to_zarr``), so only that worker's writes slow down,
    not its tasks or comms, whoever writes. Undone on exit. (An AIMSS sink
    writing through Zarr's own path, for layouts its direct writer does not
    handle, waits twice per chunk.)

    Examples
    --------
    >>> with slow_writes(client, slow, 0.2):               # doctest: +SKIP
    ...     aimss_dask.to_zarr(x, "out.zarr")               # that worker's chunks are late
    """
    with _patched(client, worker, _slow_disk, delay):
        yield


def _slow_disk(delay: float | None, dask_worker: Any = None) -> None:
    import asyncio
    import time

    from zarr.storage import LocalStore

    from aimss_dask.core.names import PLUGIN_NAME

    gate = dask_worker.plugins[PLUGIN_NAME].io_gate
    if delay is None:
        gate.__dict__.pop("writing", None)  # the class's method again
        original = getattr(LocalStore, "_aimss_set", None)
        if original is not None:
            LocalStore.set = original
            del LocalStore._aimss_set
        return
    inner = type(gate).writing.__get__(gate)

    @contextlib.contextmanager
    def writing(run: str, resource: str | None) -> Iterator[None]:
        with inner(run, resource):  # a slow disk is slow while the write holds its grant
            time.sleep(delay)
            yield

    gate.writing = writing
    LocalStore._aimss_delay = delay
    if not hasattr(LocalStore, "_aimss_set"):
        LocalStore._aimss_set = original = LocalStore.set

        async def set(self: Any, key: str, value: Any) -> None:
            if not key.endswith(_METADATA):
                await asyncio.sleep(LocalStore._aimss_delay)  # a chunk, not metadata
            await original(self, key, value)

        LocalStore.set = set


#: Zarr keys that are metadata, not chunks: never slowed.
_METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


@contextlib.contextmanager
def slow_reads(client: Any, worker: str, delay: float) -> Iterator[None]:
    """Every chunk read from a local Zarr store on ``worker`` waits ``delay`` seconds first.

    A slow disk (or a congested network file system) on one node, for
    readers: ``zarr.storage.LocalStore.get`` waits before each chunk key,
    whoever reads (an AIMSS source's broker, or a Dask task of
    ``da.from_zarr``). Undone on exit.

    Examples
    --------
    >>> with slow_reads(client, slow, 0.1):                # doctest: +SKIP
    ...     batches = list(stream.batches(1024))            # that owner's slabs are late
    """
    with _patched(client, worker, _slow_get, delay):
        yield


@contextlib.contextmanager
def _patched(client: Any, worker: str, patch: Any, delay: float) -> Iterator[None]:
    """``patch(delay)`` on ``worker`` for the block, ``patch(None)`` after (undone)."""
    if not delay >= 0:
        raise InvalidArgumentError(f"delay={delay!r} must be a number of seconds, 0 or more")
    client.run(patch, delay, workers=[worker])
    try:
        yield
    finally:
        client.run(patch, None, workers=[worker])


def _slow_get(delay: float | None) -> None:
    import asyncio

    from zarr.storage import LocalStore

    if delay is None:
        original = getattr(LocalStore, "_aimss_get", None)
        if original is not None:
            LocalStore.get = original
            del LocalStore._aimss_get
        return
    LocalStore._aimss_get_delay = delay
    if not hasattr(LocalStore, "_aimss_get"):
        LocalStore._aimss_get = original = LocalStore.get

        async def get(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
            if not key.endswith(_METADATA):
                await asyncio.sleep(LocalStore._aimss_get_delay)  # a chunk, not metadata
            return await original(self, key, *args, **kwargs)

        LocalStore.get = get
