"""Segments and partition logs: the data structures, with no locking or I/O.

A partition log is a list of segments; each segment is a run of records with
dense offsets ``base, base + 1, ...``. A segment is *open* until it holds
``segment_size`` bytes, then *sealed* and immutable, which is what makes it
safe to spill, share between readers, and later replicate or sink.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aimss_dask.log.spillfile import SegmentId, SpillIndex


@dataclass(eq=False)
class Segment:
    """Records ``base .. base + len(sizes) - 1`` of one partition."""

    base: int
    seq: int  # store-wide creation order, used to pick what to spill first
    records: list[Any] | None = field(default_factory=list)  # None once spilled
    sizes: list[int] = field(default_factory=list)
    nbytes: int = 0  # bytes of the records not yet trimmed
    sealed: bool = False
    path: str | None = None  # spill file, once spilled
    index: SpillIndex | None = None  # where each record lies in it, and its checksum
    spilled_as: SegmentId | None = None  # what the file must say it holds
    #: ``time.monotonic()`` of its last failed spill (None: none); ``inf``:
    #: its records cannot be written at all (a record that does not serialise).
    spill_failed: float | None = None

    @property
    def end(self) -> int:
        return self.base + len(self.sizes)

    @property
    def in_memory(self) -> bool:
        return self.records is not None


@dataclass(eq=False)
class PartitionLog:
    """One partition's ordered log. ``start`` is the first offset still kept.

    ``committed``: where readers stop, for a partition whose records are
    copied to replicas: the end of what every copy holds (Kafka's high
    watermark). None: readers see every record up to ``end``.
    """

    segments: list[Segment] = field(default_factory=list)
    start: int = 0
    end: int = 0
    sealed: bool = False
    committed: int | None = None
    #: ``(end, last)``: records from ``end`` on were lost with a worker that
    #: died (``last`` exclusive, None: unknown). A log rebuilt from that
    #: worker's spill files stops where they stop; readers that reach its
    #: end, and writers, get ``PartitionLostError`` naming the range, never
    #: a quiet end of the partition.
    gap: tuple[int, int | None] | None = None

    @property
    def visible(self) -> int:
        """The end of what readers may see."""
        return self.end if self.committed is None else self.committed

    def segment_at(self, offset: int) -> int:
        """Index in ``segments`` of the segment that holds ``offset``."""
        bases = [s.base for s in self.segments]
        return bisect_right(bases, offset) - 1

    def retained_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def spilled_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments if not s.in_memory)
