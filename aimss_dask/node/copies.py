"""Where the coordinator wants copies of this worker's straggling tasks to run: a mailbox.

The coordinator sends ``aimss_speculate`` on the scheduler's ordered stream
(key as text, destination worker); the straggling call of a function marked
with :func:`aimss_dask.speculative`, which checks here while it runs, takes
its destination and starts the copy (:mod:`aimss_dask.core.race`).
"""

from __future__ import annotations

import threading


class CopyMailbox:
    """Task key (text) -> the worker its copy should run on; taken once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dest: dict[str, str] = {}

    def put(self, key: str, dest: str) -> None:
        with self._lock:
            self._dest[key] = dest

    def take(self, key: str) -> str | None:
        """The destination for ``key``'s copy, once (then None)."""
        with self._lock:
            return self._dest.pop(key, None)

    def forget(self, key: str) -> None:
        with self._lock:
            self._dest.pop(key, None)
