"""Assemble a sink's units as their last piece arrives, and write them behind.

In a misaligned ``to_zarr``, each unit (a Zarr shard or chunk) is one
partition of the run's stream, filled with ``(region, piece)`` records pushed
by the map tasks. The owner counts the elements that arrive for each of its
units; the moment a unit is complete (long before the map phase ends, for
most units), its assembly, write and release are queued on the worker's
write-behind thread. No task waits for a unit: the run's last task waits for
the writers.

Counting happens on whatever thread appended (a data-plane receiver or a task
thread), so it is a few integer operations under a lock; the heavy work runs
on the writer thread.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from aimss_dask.ops.pieces import chunk_bounds


class UnitAssembler:
    """Completion tracking for one sink run's units on one worker.

    ``ready(p)`` is called once, when unit ``p`` has received all of its
    ``expected[p]`` elements (on the thread whose append completed it).

    Examples
    --------
    >>> seen = []
    >>> asm = UnitAssembler(epoch=1, expected={0: 6}, ready=seen.append)
    >>> asm.on_append(0, [((0, 2), np.zeros(4)), ((2, 3), np.zeros(2))])
    >>> seen
    [0]
    """

    def __init__(self, epoch: int, expected: dict[int, int], ready: Callable[[int], None]) -> None:
        self.epoch = epoch
        self.expected = dict(expected)
        self.got = {p: 0 for p in expected}
        self._ready = ready
        self._lock = threading.Lock()

    def on_append(self, p: int, records: Iterable[Any]) -> None:
        n = 0
        for rec in records:
            n += int(rec[1].size)
        with self._lock:
            if p not in self.got:
                return
            self.got[p] += n
            complete = self.got[p] == self.expected[p]
        if complete:
            self._ready(p)


def assemble(records: Iterable[Any], out: np.ndarray) -> int:
    """Copy ``(region, piece)`` records into ``out``; the elements copied."""
    filled = 0
    for dst, piece in records:
        out[tuple(slice(a, b) for a, b in dst)] = piece
        filled += piece.size
    return filled


class RowSlabs:
    """A unit's data as row slabs, not yet copied into one array.

    Each slab spans every axis but the first whole, and the slabs follow each
    other along the first axis. That is how a unit arrives when the input's
    blocks are cut along the first axis only (time steps, samples): its bytes
    in C order are the slabs' bytes one after the other, so a chunk can be
    written straight from them, with no assembly copy
    (:mod:`aimss_dask.sink.direct`).

    Examples
    --------
    >>> s = RowSlabs((4, 2), np.dtype("f8"), [0, 1], [np.zeros((1, 2)), np.ones((3, 2))])
    >>> [p.shape for p in s.parts(0, 2)]
    [(1, 2), (1, 2)]
    >>> s.materialize()[:, 0].tolist()
    [0.0, 1.0, 1.0, 1.0]
    """

    def __init__(
        self, shape: tuple[int, ...], dtype: np.dtype, starts: list[int], arrays: list[np.ndarray]
    ) -> None:
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize
        self._starts = list(starts)
        self._arrays = list(arrays)

    def parts(self, a: int, b: int) -> list[np.ndarray]:
        """Views that cover rows ``[a, b)``, in order."""
        out = []
        for start, arr in zip(self._starts, self._arrays):
            lo, hi = max(a, start), min(b, start + arr.shape[0])
            if lo < hi:
                out.append(arr[lo - start : hi - start])
        return out

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` as one array (a view when they lie in one slab)."""
        return joined(self.parts(a, b))

    def materialize(self) -> np.ndarray:
        return self.rows(0, self.shape[0])


def joined(parts: list[np.ndarray], into: Any = None) -> np.ndarray:
    """Consecutive row parts as one array: the part itself when there is one.

    ``into``: an :class:`~aimss_dask.sink.zstd_into.Arena` to join them in,
    instead of a fresh buffer.
    """
    if len(parts) == 1:
        return parts[0]
    if into is None:
        return np.concatenate(parts)
    first = parts[0]
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    out = into.take(math.prod(shape) * first.dtype.itemsize).view(first.dtype).reshape(shape)
    np.concatenate(parts, out=out)
    return out


def row_slabs(records: Iterable[Any], shape: tuple[int, ...], dtype: np.dtype) -> RowSlabs | None:
    """``(region, piece)`` records as :class:`RowSlabs`, or None if they are not row slabs.

    None also when the pieces do not tile the unit exactly (a gap or an
    overlap): the caller then assembles, and its element count catches it.
    """
    got = []
    for dst, piece in records:
        if any((lo, hi) != (0, n) for (lo, hi), n in zip(dst[1:], shape[1:])):
            return None
        if piece.dtype != dtype or not piece.flags.c_contiguous:
            return None
        got.append((dst[0][0], dst[0][1], piece))
    got.sort(key=lambda t: t[0])
    row = 0
    for lo, hi, _ in got:
        if lo != row:
            return None
        row = hi
    if row != (shape[0] if shape else 0) or not shape:
        return None
    return RowSlabs(shape, dtype, [g[0] for g in got], [g[2] for g in got])


def unit_regions(partitions: Iterable[int], chunks: tuple[tuple[int, ...], ...]) -> dict[int, tuple[slice, ...]]:
    """The region of the array that each unit ``p`` (row-major over ``chunks``) covers.

    One index computation for all: an owner looks up its units' regions once,
    when it attaches, and keeps them for the writes; NumPy's scalar calls per
    unit cost more than the lookup itself.

    >>> unit_regions([0, 3], ((2, 2), (3, 3)))[3]
    (slice(2, 4, None), slice(3, 6, None))
    """
    ps = np.fromiter(partitions, dtype=np.int64)
    index = np.unravel_index(ps, tuple(len(c) for c in chunks))
    bounds = [chunk_bounds(c) for c in chunks]
    lo = [b[i].tolist() for b, i in zip(bounds, index)]
    hi = [b[i + 1].tolist() for b, i in zip(bounds, index)]
    return {
        p: tuple(slice(a[k], b[k]) for a, b in zip(lo, hi)) for k, p in enumerate(ps.tolist())
    }
