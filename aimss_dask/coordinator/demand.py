"""Which partitions readers want now: recovery brings those back first (issue 19, item 5).

A reader names the partition it is about to read whenever it asks the
coordinator about a stream: ``read_from(partition=...)``, a reader retrying
after ``PartitionLostError``, a reader whose owner stopped answering. The
coordinator keeps the time of the latest ask per partition, for a while (a
stream destroyed and made again under its name within that time inherits
them: an order, never a result). A recovery that cannot bring everything
back at once (a dead owner's spill files, read and checked partition by
partition) starts with the partitions asked for since their owner died,
then the one asked for last.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

#: How long a reader's ask counts (s): a reader that waits asks again.
RECENT = 60.0

#: Partitions remembered at most, all streams together (the oldest asks go first).
MAX_REMEMBERED = 65536


class ReadDemand:
    """The latest time readers asked for each partition.

    Examples
    --------
    >>> d = ReadDemand()
    >>> d.note("events", [3])
    >>> d.note("events", [1])
    >>> d.wanted("events", range(4))
    [1, 3]
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._asked: OrderedDict[tuple[str, int], float] = OrderedDict()

    def note(self, name: str, partitions: Iterable[int]) -> None:
        """A reader asked for these partitions of stream ``name`` now."""
        now = self._clock()
        for p in partitions:
            key = (name, int(p))
            self._asked.pop(key, None)
            self._asked[key] = now
        while len(self._asked) > MAX_REMEMBERED:
            self._asked.popitem(last=False)

    def now(self) -> float:
        """The clock :meth:`wanted` compares ``since`` with."""
        return self._clock()

    def asked_at(self, name: str, partition: int) -> float | None:
        """When a reader last asked for ``partition`` of ``name``, within :data:`RECENT` seconds; None: not lately."""
        t = self._asked.get((name, partition))
        return t if t is not None and self._clock() - t <= RECENT else None

    def wanted(self, name: str, partitions: Iterable[int], since: float | None = None) -> list[int]:
        """Those of ``partitions`` asked for within :data:`RECENT` seconds (and at ``since`` or later), the latest ask first."""
        asked = []
        for p in partitions:
            t = self.asked_at(name, p)
            if t is not None and (since is None or t >= since):
                asked.append((t, p))
        return [p for _, p in sorted(asked, key=lambda tp: (-tp[0], tp[1]))]

    def clear(self) -> None:
        self._asked.clear()
