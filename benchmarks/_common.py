"""What the benchmarks share: a peak-RSS and disk sampler run on each worker.

``client.run(start)`` before a method and ``client.run(finish)`` after it
give each worker's peak RSS (sampled every 20 ms) and peak disk use under its
local directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Any

GiB = 2**30


class Sampler:
    def __init__(self, local_dir: str) -> None:
        import psutil

        self.proc = psutil.Process()
        self.dir = local_dir
        self.rss = self.proc.memory_info().rss
        self.disk = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        n = 0
        while not self.stop.wait(0.02):
            self.rss = max(self.rss, self.proc.memory_info().rss)
            n += 1
            if n % 10 == 0:
                self.disk = max(self.disk, du(self.dir))

    def finish(self) -> tuple[int, int]:
        self.stop.set()
        self.thread.join()
        return self.rss, max(self.disk, du(self.dir))


def du(path: str) -> int:
    """Bytes of disk used under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def settle(where: str, *, quiet_us: float = 150.0, timeout: float = 15.0) -> float:
    """Wait until the file system under ``where`` creates directories at its normal speed.

    On this VM (ext4 mounted with ``discard``), for a second or more after a
    large delete every directory or file creation costs up to ~1 ms of system
    CPU instead of ~50 us. A benchmark that deletes one method's output and
    starts the next would charge the next method for it, and most of all the
    methods that create more files. Call this after deleting outputs, before
    timing anything; it returns the seconds waited.
    """
    t0 = time.perf_counter()
    probe = tempfile.mkdtemp(prefix="settle-", dir=where)
    try:
        n = 0
        while time.perf_counter() - t0 < timeout:
            t = time.perf_counter()
            for _ in range(20):
                os.mkdir(os.path.join(probe, str(n)))
                n += 1
            if (time.perf_counter() - t) / 20 * 1e6 < quiet_us:
                break
            time.sleep(0.1)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return time.perf_counter() - t0


def prefault(nbytes: int) -> None:
    """Touch then free ``nbytes`` of memory, so that the next writes find backed pages.

    This VM reports free pages to its host, which reclaims them; the first
    touch of such a page costs a fault on the host. Page-cache writes that
    land on those pages run several times slower, and at random. Freed just
    before a method runs, the touched pages are reused by its page cache.
    """
    import numpy as np

    warm = np.ones(nbytes, dtype=np.uint8)
    del warm


def start(dask_worker: Any) -> int:
    """Start sampling; returns the worker's RSS now (what earlier methods left)."""
    dask_worker._bench_sampler = Sampler(dask_worker.local_directory)
    return int(dask_worker._bench_sampler.rss)


def finish(dask_worker: Any) -> tuple[int, int]:
    return dask_worker._bench_sampler.finish()


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far.

    Summed over the workers around a method, it is the work the method cost,
    which this VM's noise moves far less than wall time.
    """
    import psutil

    t = psutil.Process().cpu_times()
    return float(t.user + t.system)
