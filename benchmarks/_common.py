"""What the benchmarks share: a peak-RSS and disk sampler run on each worker.

``client.run(start)`` before a method and ``client.run(finish)`` after it
give each worker's peak RSS (sampled every 20 ms) and peak disk use under its
local directory.
"""

from __future__ import annotations

import os
import threading
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


def start(dask_worker: Any) -> None:
    dask_worker._bench_sampler = Sampler(dask_worker.local_directory)


def finish(dask_worker: Any) -> tuple[int, int]:
    return dask_worker._bench_sampler.finish()
