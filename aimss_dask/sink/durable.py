"""Making written units and metadata durable: fsync on a file system, nothing more elsewhere.

A write that returned is in the operating system's cache, not on disk: a
crash of the node (not only of the process) can take it. A sink that
records "rows up to here are stored" must say so only once they are on
disk. On a local or parallel file system (Zarr's ``LocalStore``) that means
``fsync`` of each unit file and of the folder that holds its name (the
rename that put it there is an entry of that folder), and of every folder
above it up to the array's: a folder a write created (Zarr v3's ``c/0/``)
is itself a new entry of its parent. On an object store, a completed
``PUT`` is durable already, and these functions do nothing.

Every writer syncs the files it wrote itself: on a parallel file system an
``fsync`` from another client would not flush this one's cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from aimss_dask.sink.chunkfiles import unit_coords
from aimss_dask.sink.fsync import fsync_dir, fsync_file


def array_root(array: Any) -> str | None:
    """The folder of ``array`` on a file system, or None (an object store, memory)."""
    import zarr

    if not isinstance(array.store, zarr.storage.LocalStore):
        return None
    root = str(array.store.root)
    return os.path.join(root, array.path) if array.path else root


def sync_units(array: Any, regions: Iterable[tuple[slice, ...]]) -> int:
    """Make the unit files (chunks, or shards) under ``regions`` of ``array`` durable; files synced.

    Units that hold only the fill value may have no file (Zarr skips them):
    nothing to sync. Each folder from a unit's up to the array's is synced
    once, after its files, deepest first.

    Examples
    --------
    >>> import numpy as np, zarr, tempfile
    >>> z = zarr.create_array(tempfile.mkdtemp(), shape=(4, 2), chunks=(2, 2), dtype="f8")
    >>> z[:] = 1.0
    >>> sync_units(z, [(slice(0, 4), slice(0, 2))])
    2
    """
    root = array_root(array)
    if root is None:
        return 0
    unit = tuple(array.shards or array.chunks)
    encode = array.metadata.encode_chunk_key
    folders: set[str] = set()
    synced = 0
    for region in regions:
        for coords in unit_coords(region, unit):
            path = os.path.join(root, encode(coords))
            try:
                fsync_file(path)
            except FileNotFoundError:
                continue  # an empty unit: Zarr wrote no file
            synced += 1
            folders.update(_folders(os.path.dirname(path), root))
    for folder in sorted(folders, key=lambda f: (-f.count(os.sep), f)):
        fsync_dir(folder)
    return synced


def _folders(folder: str, top: str) -> list[str]:
    """``folder`` and each folder above it, up to ``top`` (included; ``folder`` is inside it)."""
    out = [folder]
    top = os.path.normpath(top)
    while os.path.normpath(folder) != top:
        parent = os.path.dirname(folder)
        if parent == folder or len(os.path.normpath(parent)) < len(top):
            break  # not under ``top`` after all: stop at the root
        folder = parent
        out.append(folder)
    return out


def sync_metadata(array: Any, created: bool = False) -> bool:
    """Make ``array``'s (or a group's) metadata durable; False where there is no file to sync.

    Zarr writes the metadata document aside and renames it into place (an
    atomic replace, so a reader never sees half of it); this flushes the
    document and the rename. ``created``: the array's folder may be new,
    and so may the folders above it (a component path, the store's own
    folder): each up to the one holding the store's folder is synced too.
    """
    root = array_root(array)
    if root is None:
        return False
    names = ("zarr.json",) if array.metadata.zarr_format == 3 else (".zarray", ".zgroup", ".zattrs", ".zmetadata")
    for name in names:
        path = os.path.join(root, name)
        if os.path.exists(path):
            fsync_file(path)
    store = str(array.store.root)
    for folder in _folders(root, os.path.dirname(os.path.normpath(store)) if created else root):
        fsync_dir(folder)
    return True
