"""Filler slices on a worker: run where the job's own work does not wait for them.

The coordinator (:mod:`aimss_dask.coordinator.filling`) sends one slice at
a time: a filler function, its arguments and a budget in seconds. It runs
on threads of its own, started once and reused, whose OS scheduling
priority is the lowest (``nice`` 19): on a busy CPU the job's task threads
go first. A GPU filler runs with a non-blocking CuPy stream of the lowest
priority as the current stream: it never waits on (or holds up) the legacy
default stream, and the job's kernels go before its kernels wherever the
job runs on streams of higher priority (CUDA's default priority is also the
lowest, so kernels of the job on default streams share the GPU evenly with
it; slices are short and stop at their budget).

A filler is ``func(*args, budget_s=...)``: it does at most ``budget_s``
seconds of work and returns ``True`` while it has more to do. Whatever it
raises is caught here and reported to the coordinator, never to the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from distributed.protocol.pickle import loads

logger = logging.getLogger("aimss_dask")

#: Filler functions kept unpickled per worker (the most recent ones).
CACHED = 32
#: The OS niceness of filler threads (the lowest priority).
NICE = 19


def _lower_priority() -> None:
    """Make the calling thread the last the OS runs (Linux: per-thread niceness)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except (AttributeError, OSError):
        pass  # elsewhere the threads run at the process's priority


@contextlib.contextmanager
def _low_priority_stream() -> Iterator[None]:
    """A CuPy stream of the lowest priority as the current one, where CuPy is loaded."""
    from aimss_dask.power.gpu import optional_import

    cupy = optional_import("cupy")
    if cupy is None:
        yield
        return
    lowest, _highest = cupy.cuda.runtime.deviceGetStreamPriorityRange()
    stream = cupy.cuda.Stream(non_blocking=True, priority=lowest)
    with stream:
        yield
    stream.synchronize()


class FillerRunner:
    """A worker's filler threads (``threads`` CPU slices and one GPU slice at a time)."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, threads) + 1, thread_name_prefix="aimss-filler", initializer=_lower_priority
        )
        self._cache: OrderedDict[str, tuple[str, Callable[..., Any], tuple[Any, ...]]] = OrderedDict()
        self._lock = threading.Lock()
        self.slices = 0
        self.seconds = 0.0
        #: GPU slices running now (the GPU's utilisation is then the filler's, not the job's).
        self.gpu_running = 0

    def _load(self, key: str, payload: bytes) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        digest = hashlib.blake2b(payload, digest_size=16).hexdigest()
        with self._lock:
            got = self._cache.get(key)
            if got is not None and got[0] == digest:
                self._cache.move_to_end(key)
                return got[1], got[2]
        func, args = loads(payload)
        with self._lock:
            self._cache[key] = (digest, func, tuple(args))
            while len(self._cache) > CACHED:
                self._cache.popitem(last=False)
        return func, tuple(args)

    def run_slice(self, key: str, payload: bytes, budget_s: float, gpu: bool) -> dict[str, Any]:
        """One slice, on the calling (filler) thread: its time, whether it has more, or its error."""
        t0 = time.perf_counter()
        if gpu:
            with self._lock:
                self.gpu_running += 1
        try:
            func, args = self._load(key, payload)
            with _low_priority_stream() if gpu else contextlib.nullcontext():
                more = func(*args, budget_s=budget_s)
            out: dict[str, Any] = {"more": more is True}
        except BaseException as e:  # a filler's failure is reported, never raised into the job
            out = {
                "more": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-4000:],
            }
        finally:
            if gpu:
                with self._lock:
                    self.gpu_running -= 1
        out["seconds"] = time.perf_counter() - t0
        self.slices += 1
        self.seconds += out["seconds"]
        return out

    async def run(self, key: str, payload: bytes, budget_s: float, gpu: bool) -> dict[str, Any]:
        """:meth:`run_slice` on a filler thread, awaited on the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.run_slice, key, payload, budget_s, gpu)

    def close(self) -> None:
        # A running slice is bounded by its budget; nothing waits for it.
        self._pool.shutdown(wait=False, cancel_futures=True)
