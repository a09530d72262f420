"""Stateful property test: ``LogStore`` against a model of plain lists.

The model keeps, per stream, its epoch and per partition the list of every
record ever appended (offset = list index), the first offset still kept, the
sealed flag, and a little bookkeeping for spilled bytes (see ``_Part.slack``).
Rules open, append, read, seal, spill, trim and drop; the invariants compare
the store's byte counters and spill folder with the model after every step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from aimss_dask.core.errors import (
    InvalidOffsetError,
    PartitionOutOfRangeError,
    StreamNotFoundError,
    StreamSealedError,
)
from aimss_dask.log import records as rec
from aimss_dask.log.store import LogStore

NAMES = ("s0", "s1", "s2")
PARTITIONS = (0, 1, 2, 3)  # a stream holds some of these; the others are "not held"
EPOCHS = (1, 2)

# -- records ---------------------------------------------------------------------

_DTYPES = st.sampled_from(
    ["bool", "int8", "uint16", "int64", "float32", "float64", "complex64", "U3", "S2"]
)


@st.composite
def _arrays(draw: st.DrawFn) -> np.ndarray:
    a = draw(
        hnp.arrays(
            _DTYPES.map(np.dtype),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
        )
    )
    # Non-contiguous views too: the store keeps views, the spill must copy them right.
    if a.ndim >= 2 and draw(st.booleans()):
        a = a.T
    elif a.ndim == 1 and a.size > 1 and draw(st.booleans()):
        a = a[::2]
    return a


_objects = st.recursive(
    st.none() | st.integers() | st.text(max_size=4) | st.floats(allow_nan=False),
    lambda c: st.lists(c, max_size=3)
    | st.tuples(c, c)
    | st.dictionaries(st.text(max_size=2), c, max_size=2),
    max_leaves=6,
)

RECORDS = st.one_of(_arrays(), st.binary(max_size=12), _objects)


def same_record(got: Any, want: Any) -> bool:
    """Equal value and type; arrays bit for bit (NaN included)."""
    if isinstance(want, np.ndarray):
        return (
            isinstance(got, np.ndarray)
            and got.dtype == want.dtype
            and got.shape == want.shape
            and got.tobytes() == want.tobytes()
        )
    return type(got) is type(want) and got == want


def assert_same_records(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        assert same_record(g, w), f"record {i}: {g!r} != {w!r}"


# -- model -----------------------------------------------------------------------


@dataclass
class _Part:
    records: list[Any] = field(default_factory=list)  # index = offset
    sizes: list[int] = field(default_factory=list)
    start: int = 0
    sealed: bool = False
    # Offsets below this may sit in a spill file (a spill ran after they came).
    maybe_spilled_end: int = 0
    # Bytes trimmed from records that may have been spilled. The store frees a
    # spill file a whole segment at a time, so until the trim passes the end of
    # that segment ``spilled_bytes`` may still count them; a bound, not a value.
    slack: int = 0

    @property
    def end(self) -> int:
        return len(self.records)

    @property
    def retained_bytes(self) -> int:
        return sum(self.sizes[self.start :])


@dataclass
class _Stream:
    epoch: int
    parts: dict[int, _Part] = field(default_factory=dict)


class LogStoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="aimss-test-log-")
        self.spill_dir = os.path.join(self.tmp, "spill")
        self.store: LogStore | None = None
        self.model: dict[str, _Stream] = {}

    # -- helpers -------------------------------------------------------------------

    def _part(self, name: str, p: int) -> _Part | None:
        s = self.model.get(name)
        return None if s is None else s.parts.get(p)

    def _epoch_arg(self, name: str, which: str) -> int | None:
        """``None`` (any epoch), the stream's epoch, or one that is stale."""
        if which == "none":
            return None
        s = self.model.get(name)
        current = s.epoch if s is not None else 1
        return current if which == "current" else current + 100

    def _expect_error(self, name: str, epoch: int | None, p: int) -> type[Exception] | None:
        s = self.model.get(name)
        if s is None or (epoch is not None and epoch != s.epoch):
            return StreamNotFoundError
        if p not in s.parts:
            return PartitionOutOfRangeError
        return None

    def _held(self) -> list[tuple[str, int]]:
        return sorted((n, p) for n, s in self.model.items() for p in s.parts)

    def _pick(self, data: st.DataObject) -> tuple[str, int]:
        """A held partition, most of the time; any name and partition otherwise."""
        held = self._held()
        if held and data.draw(st.integers(0, 9), label="held?") > 0:
            return data.draw(st.sampled_from(held), label="partition")
        return (
            data.draw(st.sampled_from(NAMES), label="name"),
            data.draw(st.sampled_from(PARTITIONS), label="p"),
        )

    def _segment_files(self) -> list[str]:
        return sorted(
            f for _, _, files in os.walk(self.spill_dir) for f in files if f.startswith("segment-")
        )

    # -- rules ---------------------------------------------------------------------

    @initialize(segment_size=st.integers(1, 48), budget=st.integers(1, 256))
    def make_store(self, segment_size: int, budget: int) -> None:
        self.store = LogStore(budget=budget, spill_root=self.spill_dir, segment_size=segment_size)
        self.open("s0", 1, {0, 1})

    @rule(
        name=st.sampled_from(NAMES),
        epoch=st.sampled_from(EPOCHS),
        partitions=st.sets(st.sampled_from(PARTITIONS), min_size=1, max_size=3),
    )
    def open(self, name: str, epoch: int, partitions: set[int]) -> None:
        assert self.store is not None
        s = self.model.get(name)
        if s is not None and s.epoch > epoch:
            # A late open of an older stream of the name: refused, nothing changes.
            with pytest.raises(StreamNotFoundError, match="replaced here by a newer one"):
                self.store.open(name, epoch, sorted(partitions))
            return
        self.store.open(name, epoch, sorted(partitions))
        if s is None or s.epoch != epoch:  # a new epoch replaces the old logs
            s = self.model[name] = _Stream(epoch)
        for p in partitions:
            s.parts.setdefault(p, _Part())
        assert self.store.has(name)

    @rule(
        data=st.data(),
        epoch=st.sampled_from(["none", "current", "current", "stale"]),
        batch=st.lists(RECORDS, max_size=6),
    )
    def append(self, data: st.DataObject, epoch: str, batch: list[Any]) -> None:
        assert self.store is not None
        name, p = self._pick(data)
        e = self._epoch_arg(name, epoch)
        sizes = [rec.encode(r)[1] for r in batch]
        err = self._expect_error(name, e, p)
        part = self._part(name, p)
        if err is None and part is not None and part.sealed:
            err = StreamSealedError
        if err is not None:
            before = self.store.bounds(name, None, p) if part is not None else None
            with pytest.raises(err):
                self.store.append(name, e, p, batch, sizes)
            if part is not None:  # a refused write changes nothing
                assert self.store.bounds(name, None, p) == before
            return
        assert part is not None
        first = self.store.append(name, e, p, batch, sizes)
        assert first == part.end
        part.records.extend(batch)
        part.sizes.extend(sizes)

    # Writes are what every other rule needs: give them twice the weight.
    @rule(
        data=st.data(),
        epoch=st.sampled_from(["none", "current"]),
        batch=st.lists(RECORDS, min_size=1, max_size=8),
    )
    def append_more(self, data: st.DataObject, epoch: str, batch: list[Any]) -> None:
        self.append(data, epoch, batch)

    def _check_read(
        self, name: str, e: int | None, p: int, start: int, max_bytes: int | None
    ) -> None:
        assert self.store is not None
        part = self._part(name, p)
        err = self._expect_error(name, e, p)
        if err is None and part is not None and start < part.start:
            err = InvalidOffsetError
        if err is not None:
            with pytest.raises(err):
                self.store.read(name, e, p, start, max_bytes)
            return
        assert part is not None
        got, sealed, new_end = self.store.read(name, e, p, start, max_bytes)
        assert sealed == part.sealed
        if start >= part.end:
            assert got == [] and new_end == part.end
            return
        # The model: records from ``start`` while they fit in ``max_bytes``, and
        # always at least one.
        want: list[Any] = []
        taken = 0
        for off in range(start, part.end):
            n = part.sizes[off]
            if want and max_bytes is not None and taken + n > max_bytes:
                break
            want.append(part.records[off])
            taken += n
        assert_same_records(got, want)
        assert new_end == start + len(want)

    def _check_all_contents(self) -> None:
        """Every retained record of every partition reads back as appended."""
        for name, s in self.model.items():
            for p, part in s.parts.items():
                self._check_read(name, s.epoch, p, part.start, None)

    @rule(
        data=st.data(),
        epoch=st.sampled_from(["none", "current", "current", "stale"]),
        start_back=st.integers(-2, 12),
        max_bytes=st.none() | st.integers(0, 64),
    )
    def read(
        self, data: st.DataObject, epoch: str, start_back: int, max_bytes: int | None
    ) -> None:
        name, p = self._pick(data)
        e = self._epoch_arg(name, epoch)
        part = self._part(name, p)
        # Offsets around the interesting places: before start, inside, past end.
        end = part.end if part is not None else 0
        start = max(0, end - start_back) if start_back >= 0 else end - start_back - 1
        self._check_read(name, e, p, start, max_bytes)
        if part is not None and self._expect_error(name, e, p) is None:
            # Reads are cheap: try every offset still kept with the same limit.
            for off in range(part.start, part.end + 1):
                self._check_read(name, e, p, off, max_bytes)

    @rule(
        name=st.sampled_from(NAMES),
        partitions=st.sets(st.sampled_from(PARTITIONS)),
        now=st.integers(0, 2),
    )
    def seal(self, name: str, partitions: set[int], now: int) -> None:
        assert self.store is not None
        if now:  # rarer than writes, or most runs would seal everything early
            return
        s = self.model.get(name)
        if s is None:
            if partitions:  # (sealing no partition of anything is a no-op)
                with pytest.raises(StreamNotFoundError):
                    self.store.seal(name, None, sorted(partitions))
            return
        held = sorted(partitions & set(s.parts))
        self.store.seal(name, s.epoch, held)
        for p in held:
            s.parts[p].sealed = True
            assert self.store.bounds(name, None, p)[2] is True

    @rule(goal=st.none() | st.just(0) | st.integers(0, 300))
    def spill(self, goal: int | None) -> None:
        assert self.store is not None
        before = self.store.memory_bytes
        spilled = self.store.spill(goal)
        after = self.store.memory_bytes
        assert spilled == before - after
        limit = int(self.store.budget * 0.9) if goal is None else goal
        # Every in-memory segment holding bytes is spillable (the open one is
        # sealed to make it so), so the goal is always reached.
        assert after <= limit
        if goal == 0:
            assert after == 0
        # nothing half-written is left behind
        assert not [f for _, _, fs in os.walk(self.spill_dir) for f in fs if f.endswith(".tmp")]
        if spilled:
            for s in self.model.values():
                for part in s.parts.values():
                    part.maybe_spilled_end = part.end
        self._check_all_contents()  # spilled data reads back identical

    @rule(data=st.data(), upto_back=st.integers(-2, 10))
    def trim(self, data: st.DataObject, upto_back: int) -> None:
        assert self.store is not None
        name, p = self._pick(data)
        part = self._part(name, p)
        end = part.end if part is not None else 0
        upto = max(0, end - upto_back) if upto_back >= 0 else end - upto_back
        err = self._expect_error(name, None, p)
        if err is not None:
            with pytest.raises(err):
                self.store.trim(name, None, p, upto)
            return
        assert part is not None
        total_before = self.store.memory_bytes + self.store.spilled_bytes
        freed = self.store.trim(name, None, p, upto)
        assert freed == total_before - (self.store.memory_bytes + self.store.spilled_bytes)
        new_start = max(part.start, min(upto, part.end))
        for off in range(part.start, new_start):
            if off < part.maybe_spilled_end:
                part.slack += part.sizes[off]
        part.start = new_start
        if part.start == part.end:
            part.slack = 0  # every segment is past ``upto``: all freed
        assert self.store.bounds(name, None, p)[:2] == (part.start, part.end)
        if part.start > 0:
            with pytest.raises(InvalidOffsetError, match="was trimmed"):
                self.store.read(name, None, p, part.start - 1)
        self._check_all_contents()  # the rest is untouched

    @rule(name=st.sampled_from(NAMES), now=st.integers(0, 2))
    def drop(self, name: str, now: int) -> None:
        assert self.store is not None
        if now:  # rarer than writes
            return
        assert self.store.drop(name) is (name in self.model)
        self.model.pop(name, None)
        assert not self.store.has(name)
        with pytest.raises(StreamNotFoundError):
            self.store.read(name, None, 0, 0)
        with pytest.raises(StreamNotFoundError):
            self.store.append(name, None, 0, [b"x"], [1])

    @precondition(lambda self: self.store is not None)
    @rule(now=st.integers(0, 4))
    def drop_all(self, now: int) -> None:
        assert self.store is not None
        if now:  # rare: it resets everything
            return
        for name in list(self.model):
            assert self.store.drop(name)
        self.model.clear()
        assert self.store.memory_bytes == 0
        assert self.store.spilled_bytes == 0
        assert self._segment_files() == []

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def byte_counters_match_model(self) -> None:
        if self.store is None:
            return
        mem, spilled = self.store.memory_bytes, self.store.spilled_bytes
        assert mem >= 0 and spilled >= 0
        parts = [pt for s in self.model.values() for pt in s.parts.values()]
        retained = sum(pt.retained_bytes for pt in parts)
        slack = sum(pt.slack for pt in parts)
        # Memory holds only records still kept; together with the spill files
        # it holds all of them, plus at most the trimmed tails of spilled segments.
        assert mem <= retained
        assert retained <= mem + spilled <= retained + slack
        assert self.store.peak_memory >= mem

    @invariant()
    def spill_files_match_counter(self) -> None:
        if self.store is None:
            return
        # A spilled segment always holds > 0 bytes, so files exist iff bytes do.
        assert bool(self._segment_files()) == (self.store.spilled_bytes > 0)

    @invariant()
    def stats_match_model(self) -> None:
        if self.store is None:
            return
        assert self.store.stats()["streams"] == sorted(self.model)
        for name, s in self.model.items():
            stats = self.store.stream_stats(name)
            assert set(stats) == set(s.parts)
            for p, part in s.parts.items():
                assert stats[p]["records"] == part.end
                assert stats[p]["start"] == part.start
                assert stats[p]["sealed"] == part.sealed

    def teardown(self) -> None:
        try:
            if self.store is not None:
                for name in list(self.model):
                    self.store.drop(name)
                assert self._segment_files() == []
                assert self.store.memory_bytes == 0 and self.store.spilled_bytes == 0
                self.store.close()
                self.store.close()  # idempotent
                assert not os.path.exists(self.spill_dir)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


LogStoreMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    # No "explain" phase: it re-runs the failing case many times over to name
    # lines (mostly NumPy's repr), which doubles the time a failure takes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestLogStore = LogStoreMachine.TestCase
