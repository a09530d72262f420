"""What the benchmarks share: a peak-RSS and disk sampler run on each worker.

``client.run(start)`` before a method and ``client.run(finish)`` after it
give each worker's peak RSS (sampled every 20 ms) and peak disk use under its
local directory.
"""

from __future__ import annotations

import os
import shutil
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


#: How long ext4 without a journal (this VM's root file system: no jbd2
#: entry for it) keeps skipping freed inodes when it allocates one:
#: ``recently_deleted()`` in fs/ext4/ialloc.c passes over every inode freed
#: in the last 60 s (360 s while its inode-table block is dirty), rescanning
#: them for each new file or directory. Right after a benchmark deletes a
#: round's few thousand files, every file or directory created costs
#: ~0.5 ms instead of ~30 us, for a minute.
RECENTLY_DELETED_S = 61.0

_last_removal = [time.monotonic()]  # whatever ran before us may have deleted files


def remove(paths: list[str]) -> None:
    """Delete ``paths`` and write the inode tables back (so the 60 s window applies)."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    os.sync()
    _last_removal[0] = time.monotonic()


def settle(wait_s: float = RECENTLY_DELETED_S) -> float:
    """Wait until the last :func:`remove` (or the start) is ``wait_s`` old; the seconds waited.

    Call it before timing methods that create files: otherwise each pays for
    the inodes the previous round freed (see :data:`RECENTLY_DELETED_S`), and
    the more files a method creates, the more it pays.
    """
    os.sync()
    left = wait_s - (time.monotonic() - _last_removal[0])
    if left > 0:
        time.sleep(left)
    return max(left, 0.0)


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
