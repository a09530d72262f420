"""Pure planning of Zarr sources: where each slab lives, which rows a batch takes.

No I/O and no cluster: the broker, the loader and the tests share these
functions, and the invariants (every sample exactly once per epoch, a batch
plan that covers its samples in order) are property-tested without a cluster.

Layout
------
A *slab* is one row of Zarr chunks along axis 0: slab ``k`` holds samples
``k * slab_rows .. min((k + 1) * slab_rows, rows) - 1``. A read of a slab
touches whole chunks only, so nothing is decoded twice. Slab ``k`` is record
``k // P`` of partition ``k % P`` (round robin over the ``P`` partitions):
the global order is recovered by reading offset 0 of every partition, then
offset 1, and so on, and consecutive slabs come from different workers, so a
sequential reader draws on every broker at once.

Loader position
---------------
A loader's position is the number of samples it has consumed, counted across
epochs: ``position = epoch * rows + sample index within the epoch``. Being a
sample count (not a batch count) it is monotone, survives a change of batch
size, and names the epoch without extra state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

#: Suffix of the consumer group where :func:`aimss_dask.source.loader.batches`
#: commits its position (see :func:`position_group`). Brokers ignore such
#: groups when they compute how far consumers have read.
POSITION_SUFFIX = "#position"


def position_group(group: str) -> str:
    """The companion group that holds a loader's sample position.

    Group ``g`` keeps ordinary record offsets (what the brokers trim behind,
    what :func:`aimss_dask.read_from` uses); ``g#position`` keeps, in its
    partition 0, the number of samples consumed (see the module docstring).

    Examples
    --------
    >>> position_group("trainer")
    'trainer#position'
    """
    return group + POSITION_SUFFIX


@dataclass(frozen=True)
class SourceLayout:
    """How an array of ``rows`` samples is cut into slabs and spread over partitions.

    Examples
    --------
    >>> lay = SourceLayout(rows=10, slab_rows=4, partitions=2)
    >>> lay.slabs, [lay.records(p) for p in range(2)]
    (3, [2, 1])
    >>> lay.location(2), lay.slab_bounds(2)
    ((0, 1), (8, 10))
    """

    rows: int
    slab_rows: int
    partitions: int

    @property
    def slabs(self) -> int:
        return -(-self.rows // self.slab_rows)

    def location(self, slab: int) -> tuple[int, int]:
        """``(partition, offset)`` of slab ``slab``."""
        return slab % self.partitions, slab // self.partitions

    def slab_at(self, partition: int, offset: int) -> int:
        """The slab stored at ``offset`` of ``partition``."""
        return offset * self.partitions + partition

    def records(self, partition: int) -> int:
        """How many slabs ``partition`` holds."""
        return len(range(partition, self.slabs, self.partitions))

    def slab_bounds(self, slab: int) -> tuple[int, int]:
        """Sample range ``[start, stop)`` of slab ``slab``."""
        start = slab * self.slab_rows
        return start, min(start + self.slab_rows, self.rows)

    def records_consumed(self, samples: int) -> list[int]:
        """Per partition: records a sequential reader of ``samples`` samples is done with.

        Only whole slabs count; a slab read half-way is still needed.

        >>> SourceLayout(rows=10, slab_rows=4, partitions=2).records_consumed(9)
        [1, 1]
        """
        done = self.slabs if samples >= self.rows else samples // self.slab_rows
        return [max(0, -(-(done - p) // self.partitions)) for p in range(self.partitions)]


class Take(NamedTuple):
    """Rows ``rows`` of one record, which go to ``positions`` of the batch."""

    partition: int
    offset: int
    rows: np.ndarray
    positions: np.ndarray | slice


def plan_take(layout: SourceLayout, samples: np.ndarray) -> list[Take]:
    """Group a batch's sample indices by the record that holds them.

    ``samples[i]`` is the sample that goes to position ``i`` of the batch.
    Takes come sorted by slab, and rows sorted within a record, so an owner
    walks its records in order. A run of consecutive samples becomes one
    contiguous row range with a ``slice`` of positions (the sequential case:
    the owner answers with a view, the loader copies once).

    Examples
    --------
    >>> lay = SourceLayout(rows=10, slab_rows=4, partitions=2)
    >>> [(t.partition, t.offset, t.rows.tolist()) for t in plan_take(lay, np.arange(2, 7))]
    [(0, 0, [2, 3]), (1, 0, [0, 1, 2])]
    """
    samples = np.asarray(samples, dtype=np.int64)
    if samples.size == 0:
        return []
    slab = samples // layout.slab_rows
    row = samples - slab * layout.slab_rows
    if samples.size == 1 or bool(np.all(np.diff(samples) == 1)):
        # Sequential: already sorted; positions are contiguous ranges.
        cuts = np.flatnonzero(np.diff(slab)) + 1
        bounds = [0, *cuts.tolist(), samples.size]
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            p, o = layout.location(int(slab[a]))
            out.append(Take(p, o, row[a:b], slice(a, b)))
        return out
    order = np.lexsort((row, slab))
    slab_sorted = slab[order]
    cuts = np.flatnonzero(np.diff(slab_sorted)) + 1
    out = []
    for sel in np.split(order, cuts):
        p, o = layout.location(int(slab[sel[0]]))
        out.append(Take(p, o, row[sel], sel))
    return out


def epoch_order(rows: int, epoch: int, seed: int | None, shuffle: bool) -> np.ndarray | None:
    """The sample order of ``epoch``: ``None`` for ``0 .. rows - 1``, else a permutation.

    Each epoch gets a fresh permutation drawn from ``(seed, epoch)``, so an
    epoch's order does not depend on how many epochs came before it (a
    resumed loader recomputes it directly).

    >>> bool((epoch_order(5, 0, 1, True) == epoch_order(5, 0, 1, True)).all())
    True
    """
    if not shuffle:
        return None
    assert seed is not None
    return np.random.default_rng([seed, epoch]).permutation(rows)


def batch_plan(rows: int, batch_size: int, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """Batches from position ``start`` to ``stop``: ``(epoch, first, last)`` each.

    ``first``/``last`` are indices within the epoch's order (``last``
    exclusive). A batch never crosses an epoch: the last batch of an epoch
    may be smaller.

    >>> list(batch_plan(rows=5, batch_size=2, start=0, stop=10))
    [(0, 0, 2), (0, 2, 4), (0, 4, 5), (1, 0, 2), (1, 2, 4), (1, 4, 5)]
    """
    if rows <= 0:
        return
    pos = start
    while pos < stop:
        epoch, i = divmod(pos, rows)
        j = min(i + batch_size, rows, i + (stop - pos))
        yield epoch, i, j
        pos += j - i
