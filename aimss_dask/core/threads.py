"""Daemon threads that are reused, for work started once per task.

Starting or ending a thread takes the interpreter's thread-list lock while
holding the GIL. On CPython 3.11 before 3.11.9, ``sys._current_frames``
holds that lock and can run the garbage collector, whose callbacks and
finalizers may hand the GIL to another thread: if that thread is starting
or ending, the process deadlocks for good (CPython gh-106883). A Dask
worker calls ``sys._current_frames`` a hundred times a second (its
profiler), so a thread started per task makes that hang a matter of time.
Work handed to :func:`start` runs on a thread that stays for the next
piece instead; a new one starts only when every thread is busy.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from typing import Callable

logger = logging.getLogger("aimss_dask")

#: Idle threads kept; one that finds this many others idle ends.
MAX_IDLE = 32

_jobs: queue.SimpleQueue[tuple[Callable[[], None], str]] = queue.SimpleQueue()
_lock = threading.Lock()
_idle = 0  # threads waiting for a job, less the jobs already promised to them


def start(fn: Callable[[], None], name: str) -> None:
    """Run ``fn()`` on a reused daemon thread, named ``name`` while it runs.

    ``fn`` should catch its own exceptions; one that escapes is logged.

    >>> done = threading.Event()
    >>> start(done.set, "aimss-example")
    >>> done.wait(5)
    True
    """
    global _idle
    with _lock:
        spawn = _idle == 0
        if not spawn:
            _idle -= 1
    _jobs.put((fn, name))
    if spawn:
        threading.Thread(target=_serve, name="aimss-reused", daemon=True).start()


def idle() -> int:
    """Threads waiting for work now (none promised to them yet)."""
    with _lock:
        return _idle


def _serve() -> None:
    global _idle
    me = threading.current_thread()
    while True:
        fn, name = _jobs.get()
        me.name = name
        try:
            fn()
        except BaseException:
            logger.exception("aimss: work on thread %s failed", name)
        finally:
            me.name = "aimss-reused"
        with _lock:
            if _idle >= MAX_IDLE:
                return
            _idle += 1


def frames_deadlock_risk(version: tuple[int, int, int] | None = None) -> bool:
    """Whether CPython ``version`` (default: this one) has the ``sys._current_frames`` deadlock (gh-106883).

    Fixed in 3.11.9; 3.12 runs the collector only between bytecodes, where
    no lock is held.

    >>> frames_deadlock_risk((3, 11, 7)), frames_deadlock_risk((3, 11, 9)), frames_deadlock_risk((3, 12, 1))
    (True, False, False)
    """
    major, minor, micro = version if version is not None else tuple(sys.version_info[:3])
    return (major, minor) == (3, 11) and micro < 9
