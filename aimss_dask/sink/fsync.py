"""``fsync`` of a file and of a folder: the two steps that put a write, and the name it was given, on disk.

Shared by :mod:`aimss_dask.sink.durable` (units and their folders) and
:mod:`aimss_dask.sink.chunkfiles` (the in-place commit's marker, the run's
partial files), which :mod:`~aimss_dask.sink.durable` itself imports.
"""

from __future__ import annotations

import os


def fsync_file(path: str) -> None:
    """Flush ``path``'s data to disk (opened read-only: fsync flushes the file, not the handle).

    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     open(os.path.join(folder, "unit"), "wb").close()
    ...     fsync_file(os.path.join(folder, "unit"))
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush ``path``'s entries (new names, renames) to disk; a no-op where folders cannot be opened.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     fsync_dir(folder)
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # not POSIX (folders cannot be opened): rename is as durable as it gets
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
