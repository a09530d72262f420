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

import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


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


def unit_region(p: int, chunks: tuple[tuple[int, ...], ...]) -> tuple[slice, ...]:
    """The region of the array that unit ``p`` (row-major over ``chunks``) covers.

    >>> unit_region(3, ((2, 2), (3, 3)))
    (slice(2, 4, None), slice(3, 6, None))
    """
    index = np.unravel_index(p, tuple(len(c) for c in chunks))
    return tuple(
        slice(int(sum(c[:i])), int(sum(c[:i])) + c[i]) for c, i in zip(chunks, index)
    )
