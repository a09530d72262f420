"""Whether workers on several hosts may write units of a Zarr array in place: the file system's kind.

Rows in place (:mod:`aimss_dask.sink.graphs`) have writers on different
hosts ``pwrite`` disjoint byte ranges of one file. A parallel file system
keeps such writes apart (Lustre, GPFS and BeeGFS lock byte ranges across
clients); NFS does not promise it (its clients cache pages and write them
back whole, close-to-open), so an array there is written through the push
path, one writer per unit. Anything else is shared only if the user says
so (``to_zarr(..., shared_filesystem=True)`` or
``aimss.sink.shared-filesystem``).

The kind is read from ``statfs``'s magic number (Linux), as ``stat -f``
shows it.

Examples
--------
>>> kind_of(0x0BD00BD0), kind_of(0x6969), kind_of(0xEF53)
('lustre', 'nfs', None)
>>> decide(declared=None, kind="gpfs", hosts=2)
(True, None)
>>> decide(declared=None, kind="nfs", hosts=2)[0]
False
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

__all__ = ["PARALLEL", "decide", "fs_kind", "kind_of"]

#: statfs f_type magic numbers (linux/magic.h and the file systems' own headers).
MAGIC: dict[int, str] = {
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x19830326: "beegfs",
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
}

#: Kinds whose clients on several hosts may write disjoint ranges of one file.
PARALLEL = frozenset({"lustre", "gpfs", "beegfs"})

#: Kinds that hold files of several hosts but do not keep their concurrent writes apart.
NOT_SHARED = frozenset({"nfs", "cifs", "smb2"})


def kind_of(magic: int) -> str | None:
    """The file system a ``statfs`` magic number names, if one of :data:`MAGIC`."""
    return MAGIC.get(magic & 0xFFFFFFFF)


def _statfs_magic(path: str) -> int | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if libc.statfs(os.fsencode(path), buf) != 0:
        return None
    # f_type (__fsword_t, a long) is the struct's first member.
    return ctypes.c_long.from_buffer(buf).value


def fs_kind(store: Any) -> str | None:
    """The kind of file system a Zarr store path lives on (its nearest existing folder); None if unknown or not a path."""
    if not isinstance(store, (str, os.PathLike)):
        return None
    path = os.fspath(store)
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        return None  # an object store: nothing is written in place there
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    magic = _statfs_magic(path)
    return None if magic is None else kind_of(magic)


def decide(declared: bool | None, kind: str | None, hosts: int) -> tuple[bool, str | None]:
    """Whether workers on ``hosts`` hosts may write in place; and, when they may not and it matters, why.

    ``declared``: the user's word (``to_zarr(shared_filesystem=...)`` or
    the config key), which wins over the kind, except that NFS and SMB are
    never written in place from several hosts; ``kind``: :func:`fs_kind`.
    """
    if hosts <= 1:
        return True, None
    if kind in NOT_SHARED:
        # Even when declared shared: a wrong word would corrupt units silently.
        return False, (
            f"the array is on {kind.upper()}, which does not keep writes of one file from several hosts "
            "apart: its units are pushed to one writer each"
        )
    if declared is not None:
        return declared, None if declared else "shared_filesystem=False: units are pushed to one writer each"
    if kind in PARALLEL:
        return True, None
    return False, (
        "the workers span several hosts and the file system is not known to be shared (Lustre, GPFS, "
        "BeeGFS): units are pushed to one writer each; pass shared_filesystem=True if every host "
        "mounts it as one POSIX file system"
    )
