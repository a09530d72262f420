"""Traces of data movement in DFTracer's format: one file per process, JSON lines of complete events.

A file starts with ``[`` and holds one Chrome-trace event per line
(``{"id", "name", "cat", "pid", "tid", "ts", "dur", "ph": "X", "args"}``,
times in microseconds since the epoch, so that the processes' files line
up), then ``]`` when the trace stops: what DFTracer writes and its tools
and Perfetto read. ``.pfw.gz`` files are gzip streams.

Each process writes its own file, in a folder of its own under the trace's
folder (``<host>-<pid>``), created with exclusive creation: a trace never
overwrites or deletes a file. Tracing is off unless :func:`start` was
called: a call site pays one global lookup (:func:`on`). Events are
buffered; a full buffer goes to the process's writer thread, so that an
event added on the event loop never waits for the disk or for gzip.

Examples
--------
>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> path = start(folder, compress=False)
>>> with span("seal", "aimss", stream="s", partition=0):
...     pass
>>> stop() == path, open(path).read().splitlines()[0]
(True, '[')
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

__all__ = ["CATEGORY", "complete", "on", "span", "start", "stop"]

logger = logging.getLogger("aimss_dask")

#: The category of every AIMSS event.
CATEGORY = "aimss"

#: Lines buffered before they are written out.
BUFFER_LINES = 512


class _Tracer:
    """One process's trace file and its buffer."""

    def __init__(self, folder: str, compress: bool) -> None:
        own = os.path.join(folder, f"{socket.gethostname()}-{os.getpid()}")
        os.makedirs(own, exist_ok=True)
        ext = ".pfw.gz" if compress else ".pfw"
        for n in itertools.count():
            path = os.path.join(own, f"aimss-{n}{ext}")
            try:
                raw: IO[bytes] = open(path, "xb")  # never someone else's file, nor an older trace
            except FileExistsError:
                continue
            break
        self.path = path
        self.folder = folder
        self._file: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) if compress else raw
        self._raw = raw
        self._lines: list[str] = ["["]
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.pid = os.getpid()
        self.users = 1
        # Full buffers, encoded; None: the trace stopped.
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._drain, name="aimss-trace-writer", daemon=True)
        self._writer.start()

    def add(self, name: str, cat: str, ts: float, dur: float, args: dict[str, Any]) -> None:
        line = json.dumps(
            {
                "id": next(self._ids), "name": name, "cat": cat, "pid": self.pid, "tid": threading.get_ident(),
                "ts": int(ts * 1e6), "dur": max(int(dur * 1e6), 0), "ph": "X", "args": args,
            },
            separators=(",", ":"),
            default=str,
        )
        with self._lock:
            self._lines.append(line)
            if len(self._lines) >= BUFFER_LINES:
                self._hand_off()

    def _hand_off(self) -> None:
        """Queue the buffered lines for the writer thread (hold ``_lock``)."""
        if self._lines:
            self._chunks.put(("\n".join(self._lines) + "\n").encode())
            self._lines = []

    def _drain(self) -> None:
        """The writer thread: write each chunk until the trace stops; a failed write drops the rest, said once."""
        failed = False
        while (chunk := self._chunks.get()) is not None:
            if failed:
                continue  # keep taking chunks: they must not pile up in memory
            try:
                self._file.write(chunk)
            except OSError as e:
                failed = True
                logger.warning("aimss: trace %s stopped growing: %r; later events are dropped", self.path, e)

    def close(self) -> None:
        with self._lock:
            self._lines.append("]")
            self._hand_off()
            self._chunks.put(None)
        self._writer.join()
        try:
            self._file.close()
        finally:
            if self._raw is not self._file:
                self._raw.close()


_current: _Tracer | None = None
_state_lock = threading.Lock()


def on() -> bool:
    """Whether this process is tracing."""
    return _current is not None


def start(folder: str, *, compress: bool = True) -> str:
    """Trace this process into ``folder`` (made if missing); the path of its file.

    Started again while on (several workers in one process) it keeps the
    same file, which the last matching :func:`stop` closes.
    """
    global _current
    with _state_lock:
        if _current is not None:
            _current.users += 1
            return _current.path
        _current = _Tracer(os.path.abspath(folder), compress)
        return _current.path


def stop() -> str | None:
    """Stop tracing this process (see :func:`start`); the path of the file closed, or None."""
    global _current
    with _state_lock:
        t = _current
        if t is None:
            return None
        t.users -= 1
        if t.users > 0:
            return t.path
        _current = None
    t.close()
    return t.path


def complete(name: str, started: float, seconds: float, **args: Any) -> None:
    """One event that began at ``started`` (``time.time()``) and lasted ``seconds``; nothing when off."""
    t = _current
    if t is not None:
        t.add(name, CATEGORY, started, seconds, args)


@contextmanager
def span(name: str, cat: str = CATEGORY, **args: Any) -> Iterator[dict[str, Any]]:
    """Time the block as one event; yields its ``args``, which the block may add to."""
    t = _current
    if t is None:
        yield args
        return
    t0 = time.time()
    p0 = time.perf_counter()
    try:
        yield args
    finally:
        t.add(name, cat, t0, time.perf_counter() - p0, args)
