"""The spill files of a worker that died: found, checked, and chained into what a partition can get back.

A worker killed without warning leaves its spill folder behind (it had no
chance to clean up). With ``replication=1`` those files are the only copy of
the records they hold, so a worker on the same node takes them over
(issue 19, item 4.1):

- Every store writes :data:`OWNER_FILE` into its folder when it makes it:
  the host, the process id, the worker's address and name. A folder is an
  orphan of worker ``W`` only if that file names ``W`` *and* this host,
  and its process is gone. A folder of a live process (a worker that came
  back at the same address has a folder of its own), of another host, or
  without the file is never touched.
- A spill file says what it holds (:func:`aimss_dask.log.spillfile.read_index`);
  :func:`chain` picks, per partition, the run of consecutive segments that
  starts at the first offset a consumer still needs, and stops at the first
  hole (a segment that was still in memory when the worker died). Every
  record of the chain is checked against its checksum before the log takes
  it (:func:`aimss_dask.log.spillfile.verify`); a file that fails ends the
  chain there, so the rest is reported lost, never returned wrong.
- What is left in the folder afterwards (segments nobody needs, a ``.tmp``
  of a spill cut short) goes with the folder: :func:`discard` removes only
  names this module's stores write, then the folder if it is empty.

Pure functions over paths, no locking: the worker plugin runs them in a
thread and hands the chain to :meth:`aimss_dask.log.store.LogStore.adopt`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from aimss_dask.core.errors import SpillCorruptionError
from aimss_dask.log import spillfile

logger = logging.getLogger("aimss_dask")

#: Written into every spill folder as it is made: whose folder it is.
OWNER_FILE = "owner.json"
#: Names a store writes into its folder (a spill in progress ends in ``.tmp``).
_OURS = re.compile(r"segment-\d+\.bin(\.tmp)?")


@dataclass(frozen=True)
class Found:
    """One spill file of a dead worker and what its header says it holds."""

    path: str
    seg: spillfile.SegmentId
    index: spillfile.SpillIndex

    @property
    def end(self) -> int:
        return self.seg.base + len(self.index.spans)


def write_owner(folder: str, owner: Mapping[str, Any]) -> None:
    """Record in ``folder`` (just made by this process) who writes there."""
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), **owner}).encode()
    path = os.path.join(folder, OWNER_FILE)
    with open(path + ".tmp", "xb") as f:
        f.write(body)
    os.replace(path + ".tmp", path)


def remove_owner(folder: str) -> None:
    """The store that wrote :data:`OWNER_FILE` into ``folder`` is closing."""
    for name in (OWNER_FILE, OWNER_FILE + ".tmp"):
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one we may not look at counts).

    A zombie does not: a worker killed a moment ago stays one until its
    nanny reaps it, and its files are already free to take over.
    """
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def orphans(root: str, worker: str, alive: Any = pid_alive) -> list[str]:
    """Folders in ``root`` that a store of ``worker`` (its address) made on this host, whose process is gone.

    ``alive(pid)``: whether a process runs (a parameter for tests).
    """
    return [folder for folder, owner in left_behind(root, alive) if owner.get("worker") == worker]


def left_behind(root: str, alive: Any = pid_alive) -> list[tuple[str, dict[str, Any]]]:
    """Folders in ``root`` that a store on this host made, whose process is gone, with what :data:`OWNER_FILE` says.

    A folder without that file (not a store's, or not finished), of another
    host, or of a process that runs is never listed.
    """
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    host = socket.gethostname()
    out = []
    for name in names:
        folder = os.path.join(root, name)
        try:
            with open(os.path.join(folder, OWNER_FILE), "rb") as f:
                owner = json.loads(f.read(65536))
        except (OSError, ValueError):
            continue  # not a store's folder, or not finished: not ours to read
        if not isinstance(owner, dict) or owner.get("host") != host:
            continue
        pid = owner.get("pid")
        if not isinstance(pid, int) or pid == os.getpid() or alive(pid):
            continue
        out.append((folder, owner))
    return out


def scan(folder: str) -> list[Found]:
    """The segment files in ``folder`` whose header reads; files that do not are skipped, logged."""
    out = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    for name in names:
        if not _OURS.fullmatch(name) or name.endswith(".tmp"):
            continue
        path = os.path.join(folder, name)
        try:
            seg, index = spillfile.read_index(path)
        except (SpillCorruptionError, OSError) as e:
            logger.warning("aimss: spill file %s of a dead worker is unusable: %s", path, e)
            continue
        out.append(Found(path, seg, index))
    return out


def chain(
    found: Iterable[Found], name: str, p: int, epochs: tuple[int, int], need: int
) -> list[Found]:
    """The consecutive segments of partition ``p`` of stream ``name`` that hold offset ``need`` and on.

    Only files of an epoch in ``epochs`` (inclusive: the stream's first and
    current epoch) count; of two files from the same offset, the newer epoch
    wins. Empty if no file holds ``need``: records from there on are lost.

    Examples
    --------
    >>> from aimss_dask.log.spillfile import SegmentId, SpillIndex
    >>> def f(base, n, epoch=3):
    ...     return Found(f"{base}", SegmentId("s", epoch, 0, base), SpillIndex(0, ((0, 1),) * n, (0,) * n))
    >>> [x.path for x in chain([f(0, 10), f(10, 5), f(20, 5)], "s", 0, (3, 3), need=4)]
    ['0', '10']
    >>> chain([f(10, 5)], "s", 0, (3, 3), need=4)
    []
    >>> [x.path for x in chain([f(0, 10, epoch=1), f(0, 10)], "s", 0, (2, 4), need=0)]
    ['0']
    """
    mine = [
        f for f in found
        if f.seg.stream == name and f.seg.partition == p and epochs[0] <= f.seg.epoch <= epochs[1] and f.end > f.seg.base
    ]
    best: dict[int, Found] = {}
    for f in mine:
        old = best.get(f.seg.base)
        if old is None or (f.seg.epoch, f.end) > (old.seg.epoch, old.end):
            best[f.seg.base] = f
    out: list[Found] = []
    at = need
    for base in sorted(best):
        f = best[base]
        if f.end <= at:
            continue
        if base > at:
            break
        out.append(f)
        at = f.end
    return out


def verified(files: Sequence[Found]) -> list[Found]:
    """The head of ``files`` whose every record passes its checksum; stops at the first that does not."""
    out = []
    for f in files:
        try:
            spillfile.verify(f.path, f.seg, f.index)
        except (SpillCorruptionError, OSError) as e:
            logger.warning("aimss: spill file %s of a dead worker fails its check, and ends what is recovered: %s", f.path, e)
            break
        out.append(f)
    return out


def discard(folder: str) -> bool:
    """Remove what a store wrote in ``folder`` (segment files, :data:`OWNER_FILE`), then the folder if empty.

    Anything else in it stays, and so does the folder. True if it is gone.
    """
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    for name in names:
        if _OURS.fullmatch(name):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass
    remove_owner(folder)
    try:
        os.rmdir(folder)
    except OSError as e:
        if e.errno != errno.ENOENT:
            logger.warning("aimss: left %s in place: it holds files aimss did not write", folder)
            return False
    return True
