"""Unit tests of the log store's promises one at a time, and of ``ByteBudget``."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from aimss_dask.core.errors import (
    InvalidOffsetError,
    PartitionOutOfRangeError,
    SpillCorruptionError,
    SpillError,
    StreamNotFoundError,
    StreamSealedError,
)
from aimss_dask.log import spillfile
from aimss_dask.log.budget import BudgetExhausted, BudgetStatistics, ByteBudget
from aimss_dask.log.store import LogStore


@pytest.fixture
def spill_dir(tmp_path):
    return str(tmp_path / "spill")


@pytest.fixture
def store(spill_dir):
    s = LogStore(budget=2**20, spill_root=spill_dir, segment_size=64)
    s.open("a", 1, [0, 1])
    yield s
    s.close()


def _segment_files(spill_root: str) -> list[str]:
    """Segment files in every store's own folder under ``spill_root``."""
    return [f for _, _, files in os.walk(spill_root) for f in files if f.startswith("segment-")]


# -- zero copy and immutability ---------------------------------------------------


def test_read_of_in_memory_array_is_zero_copy_and_read_only(store):
    arr = np.arange(12, dtype="f8").reshape(3, 4)
    store.append("a", 1, 0, [arr], [arr.nbytes])

    (got,), _, _ = store.read("a", 1, 0, 0)
    assert np.shares_memory(got, arr)
    assert got.flags.writeable is False
    with pytest.raises(ValueError, match="read-only"):
        got[0, 0] = -1.0
    # The writer's own array is left as it was: only the stored view is frozen.
    assert arr.flags.writeable is True
    # A second reader sees the very same buffer again.
    (again,), _, _ = store.read("a", 1, 0, 0)
    assert np.shares_memory(again, got)


def test_a_copy_stored_serialised_is_decoded_once_on_first_read(store):
    """A replica keeps its owner's copies as they arrived; the first read decodes and keeps them."""
    import pandas as pd
    from distributed.protocol import Serialized

    from aimss_dask.log.records import encode

    arr = np.arange(6, dtype="f8")
    df = pd.DataFrame({"k": [1, 2, 3], "x": [0.5, 1.5, 2.5]})
    sers = [encode(arr)[0], encode(df)[0]]
    store.append("a", 1, 0, sers, [arr.nbytes, 48])
    assert all(type(r) is Serialized for r in store._log("a", 1, 0).segments[0].records)

    (got_arr, got_df), _, _ = store.read("a", 1, 0, 0)
    np.testing.assert_array_equal(got_arr, arr)
    assert got_arr.flags.writeable is False  # frozen like a record stored decoded
    pd.testing.assert_frame_equal(got_df, df)
    # Kept decoded: a second reader gets the very same objects, no second decode.
    (again_arr, again_df), _, _ = store.read("a", 1, 0, 0)
    assert again_arr is got_arr and again_df is got_df


def test_a_reader_that_sends_records_on_gets_a_copy_as_stored(store):
    """A promoted copy catching a new one up sends what it holds serialised as it is."""
    from distributed.protocol import Serialized

    from aimss_dask.log.records import encode

    ser = encode(np.arange(4))[0]
    store.append("a", 1, 0, [ser, b"plain"], [32, 5])
    got, _, _ = store.read("a", 1, 0, 0, decode=False)
    assert got[0] is ser and got[1] == b"plain"
    assert type(store._log("a", 1, 0).segments[0].records[0]) is Serialized  # left as stored


def test_a_copy_stored_serialised_spills_and_reads_back(store):
    from aimss_dask.log.records import encode

    arr = np.arange(10, dtype="i8")
    store.append("a", 1, 0, [encode(arr)[0]], [arr.nbytes])
    assert store.spill(0) == arr.nbytes
    (got,), _, _ = store.read("a", 1, 0, 0)
    np.testing.assert_array_equal(got, arr)


def test_a_copy_that_cannot_be_decoded_names_its_record(store):
    from distributed.protocol import Serialized

    from aimss_dask.core.errors import RecordNotSerializableError

    store.append("a", 1, 1, [b"ok", Serialized({"serializer": "pickle"}, [b"not a pickle"])], [2, 12])
    with pytest.raises(RecordNotSerializableError, match=r"record 1 of stream 'a' partition 1"):
        store.read("a", 1, 1, 0)
    # The good record before it still reads.
    assert store.read("a", 1, 1, 0, max_bytes=1)[0] == [b"ok"]


def test_already_read_only_array_is_stored_as_is(store):
    arr = np.arange(5)
    arr.flags.writeable = False
    store.append("a", 1, 0, [arr], [arr.nbytes])
    (got,), _, _ = store.read("a", 1, 0, 0)
    assert got is arr


def test_spilled_array_reads_back_equal_and_read_only(store, spill_dir):
    arr = np.arange(20, dtype="i4")[::2]  # a non-contiguous view
    store.append("a", 1, 0, [arr, b"tail"], [arr.nbytes, 4])
    assert store.spill(0) == arr.nbytes + 4
    assert store.memory_bytes == 0 and store.spilled_bytes == arr.nbytes + 4
    assert _segment_files(spill_dir)

    (got, tail), sealed, end = store.read("a", 1, 0, 0)
    assert (sealed, end) == (False, 2)
    assert got.dtype == arr.dtype and np.array_equal(got, arr)
    assert not np.shares_memory(got, arr)
    assert got.flags.writeable is False
    assert tail == b"tail"


def test_make_room_spills_other_partitions_so_a_whole_read_fits(spill_dir):
    s = LogStore(budget=1000, spill_root=spill_dir, segment_size=100)
    s.open("a", 1, [0, 1, 2])
    for p in (0, 1, 2):  # 300 bytes each, in segments of 100
        s.append("a", 1, p, [bytes(100)] * 3, [100] * 3)
    s.spill(800)  # the oldest segment (partition 0's first) is on disk
    assert (s.memory_bytes, s.spilled_bytes) == (800, 100)
    # Reading partition 0 loads its 100 spilled bytes and builds 300 of
    # output: 400 beyond the log, so the log may keep 600.
    assert s.make_room("a", 1, 0) == 200
    assert s.memory_bytes == 600
    stats = s.stream_stats("a")
    assert stats[0]["spilled_bytes"] == 100  # its own segments stayed put
    assert stats[1]["spilled_bytes"] == 200 and stats[2]["spilled_bytes"] == 0
    assert s.make_room("a", 1, 2) == 0  # 300 to build: 600 + 300 fits
    # One partition's stats, without the others': the same figures.
    assert [s.partition_stats("a", p) for p in (0, 1, 2)] == [stats[p] for p in (0, 1, 2)]
    assert s.partition_stats("a", 3) is None and s.partition_stats("gone", 0) is None
    assert [len(s.read("a", 1, p, 0)[0]) for p in (0, 1, 2)] == [3, 3, 3]
    assert s.make_room("gone", None, 0) == 0


def test_totals_sum_the_partition_stats_of_each_stream(spill_dir):
    """What a heartbeat carries: per stream, records and bytes in memory and spilled."""
    s = LogStore(budget=1000, spill_root=spill_dir, segment_size=100)
    s.open("a", 1, [0, 1])
    s.open("b", 1, [0])
    for p in (0, 1):
        s.append("a", 1, p, [bytes(100)] * 3, [100] * 3)
    s.append("b", 1, 0, [bytes(50)], [50])
    s.spill(500)  # some of a's segments go to disk
    s.trim("a", 1, 1, 1)
    totals = s.totals()
    assert set(totals) == {"a", "b"}
    for name, (records, memory, spilled, epoch, bounds) in totals.items():
        stats = s.stream_stats(name)
        parts = stats.values()
        assert records == sum(st["records"] for st in parts)
        assert spilled == sum(st["spilled_bytes"] for st in parts)
        assert memory == sum(st["bytes"] - st["spilled_bytes"] for st in parts)
        assert epoch == 1
        assert sorted(bounds) == sorted((p, st["start"], st["records"]) for p, st in stats.items())
    assert totals["a"][2] > 0 and totals["b"][:3] == (1, 50, 0)
    assert sorted(totals["a"][4]) == [(0, 0, 3), (1, 1, 3)]  # partition 1 trimmed below offset 1
    assert sum(t[1] for t in totals.values()) == s.memory_bytes


def test_tight_from_half_the_budget_on(spill_dir):
    s = LogStore(budget=1000, spill_root=spill_dir)
    s.open("a", 1, [0])
    s.append("a", 1, 0, [bytes(400)], [400])
    assert not s.tight() and not s.tight(100) and s.tight(101)
    s.append("a", 1, 0, [bytes(101)], [101])
    assert s.tight()


# -- max_bytes ----------------------------------------------------------------------


@pytest.mark.parametrize("segment_size", [1, 2**20])  # one segment per record, or one for all
def test_read_max_bytes_takes_what_fits_and_at_least_one(spill_dir, segment_size):
    s = LogStore(budget=2**20, spill_root=spill_dir, segment_size=segment_size)
    s.open("a", 1, [0])
    s.append("a", 1, 0, [b"aaaa", b"bbbb", b"cccc"], [4, 4, 4])
    assert s.read("a", 1, 0, 0, max_bytes=8) == ([b"aaaa", b"bbbb"], False, 2)
    assert s.read("a", 1, 0, 0, max_bytes=11) == ([b"aaaa", b"bbbb"], False, 2)
    assert s.read("a", 1, 0, 1, max_bytes=3) == ([b"bbbb"], False, 2)  # too big, yet one
    assert s.read("a", 1, 0, 0, max_bytes=None) == ([b"aaaa", b"bbbb", b"cccc"], False, 3)
    s.close()


def test_read_max_bytes_is_not_exceeded_after_a_zero_byte_record(store):
    # "Up to max_bytes (at least one)": the empty record alone fits in 5 bytes,
    # so the 10-byte record after it must wait for the next read.
    store.append("a", 1, 0, [b"", b"0123456789"], [0, 10])
    got, _, end = store.read("a", 1, 0, 0, max_bytes=5)
    assert got == [b""]
    assert end == 1


# -- trim, seal, errors -------------------------------------------------------------------


def test_trim_of_spilled_segment_frees_its_file(store, spill_dir):
    store.append("a", 1, 0, [b"x" * 10, b"y" * 10, b"z" * 10], [10, 10, 10])
    store.spill(0)
    assert store.spilled_bytes == 30 and len(_segment_files(spill_dir)) == 1

    freed = store.trim("a", 1, 0, 1)
    assert store.read("a", 1, 0, 1)[0] == [b"y" * 10, b"z" * 10]
    with pytest.raises(InvalidOffsetError, match="earliest offset still kept is 1"):
        store.read("a", 1, 0, 0)

    freed += store.trim("a", 1, 0, 10)  # past the end: trims to the end
    assert freed == 30
    assert store.spilled_bytes == 0 and store.memory_bytes == 0
    assert _segment_files(spill_dir) == []
    assert store.bounds("a", 1, 0) == (3, 3, False)
    assert store.trim("a", 1, 0, 2) == 0  # going back is a no-op
    assert store.bounds("a", 1, 0) == (3, 3, False)


def test_error_messages(store):
    store.append("a", 1, 0, [b"x", b"y", b"z"], [1, 1, 1])
    with pytest.raises(InvalidOffsetError, match="offset -1 is negative"):
        store.read("a", 1, 0, -1)
    store.trim("a", 1, 0, 2)
    with pytest.raises(InvalidOffsetError, match=r"offset 1 of stream 'a' partition 0 was trimmed"):
        store.read("a", 1, 0, 1)
    with pytest.raises(PartitionOutOfRangeError, match="partition 5 of stream 'a' is not held"):
        store.read("a", 1, 5, 0)
    with pytest.raises(StreamNotFoundError, match="stream 'nope' has no log on this worker"):
        store.append("nope", None, 0, [b"x"], [1])
    with pytest.raises(StreamNotFoundError, match="stream 'a' has no log"):
        store.read("a", 2, 0, 2)  # a stale (or future) epoch is another stream
    store.seal("a", 1, [0])
    with pytest.raises(StreamSealedError, match="stream 'a' is sealed: partition 0"):
        store.append("a", 1, 0, [b"w"], [1])
    # The other partition still takes writes.
    assert store.append("a", 1, 1, [b"w"], [1]) == 0
    assert store.read("a", 1, 0, 2) == ([b"z"], True, 3)


def test_open_with_new_epoch_replaces_old_logs(store, spill_dir):
    store.append("a", 1, 0, [b"old" * 4], [12])
    store.spill(0)
    assert _segment_files(spill_dir)
    store.open("a", 2, [0])
    assert _segment_files(spill_dir) == []
    assert store.spilled_bytes == 0
    assert store.bounds("a", 2, 0) == (0, 0, False)
    with pytest.raises(StreamNotFoundError):
        store.append("a", 1, 0, [b"stale"], [5])
    # Re-opening with the same epoch keeps the data and adds partitions.
    store.append("a", 2, 0, [b"new"], [3])
    store.open("a", 2, [0, 3])
    assert store.read("a", 2, 0, 0)[0] == [b"new"]
    assert store.bounds("a", 2, 3) == (0, 0, False)


def test_on_change_is_called_for_appends_and_seals(spill_dir):
    seen: list[tuple[str, int]] = []
    s = LogStore(budget=100, spill_root=spill_dir, on_change=lambda n, p: seen.append((n, p)))
    s.open("a", 1, [0, 1])
    s.append("a", 1, 1, [b"x"], [1])
    s.seal("a", 1, [0, 1])
    assert seen == [("a", 1), ("a", 0), ("a", 1)]
    s.close()


def test_wait_wakes_on_append_from_another_thread(store):
    result: list[bool] = []
    waiting = threading.Thread(target=lambda: result.append(store.wait("a", 1, 0, 0, 30)))
    waiting.start()
    store.append("a", 1, 0, [b"x"], [1])
    waiting.join(30)
    assert not waiting.is_alive()
    assert result == [True]
    assert store.wait("a", 1, 0, 1, timeout=0.01) is False  # nothing at offset 1 yet
    store.seal("a", 1, [0])
    assert store.wait("a", 1, 0, 1, timeout=0) is True  # sealed: the reader sees the end


def test_drop_and_close_remove_everything(spill_dir):
    s = LogStore(budget=100, spill_root=spill_dir, segment_size=4)
    for name in ("a", "b"):
        s.open(name, 1, [0, 1])
        for p in (0, 1):
            s.append(name, 1, p, [b"1234", b"5678", b"9"], [4, 4, 1])
    s.spill(0)
    assert len(_segment_files(spill_dir)) == 12
    assert s.drop("a") is True
    assert s.drop("a") is False
    assert len(_segment_files(spill_dir)) == 6
    assert s.spilled_bytes == 18 and s.memory_bytes == 0
    s.close()
    assert not os.path.exists(spill_dir)
    assert s.stats()["streams"] == [] and s.spilled_bytes == 0
    s.close()  # safe twice
    assert s.closed


def test_stats_and_peak(store):
    store.append("a", 1, 0, [b"ab", b"cd"], [2, 2])
    store.trim("a", 1, 0, 1)
    stats = store.stats()
    assert stats["memory_bytes"] == 2 and stats["peak_memory"] == 4
    assert stats["streams"] == ["a"]
    assert store.stream_stats("a")[0] == {
        "records": 2,
        "start": 1,
        "bytes": 2,
        "spilled_bytes": 0,
        "sealed": False,
    }
    assert store.stream_stats("missing") == {}
    assert store.over_budget is False


def test_records_docstring_examples():
    import doctest

    from aimss_dask.log import records

    result = doctest.testmod(records)
    assert result.attempted > 0 and result.failed == 0


# -- ByteBudget -------------------------------------------------------------------


def test_budget_acquire_blocks_until_another_thread_releases():
    b = ByteBudget(100)
    assert b.acquire(80) is True
    started, done = threading.Event(), threading.Event()

    def take() -> None:
        started.set()
        assert b.acquire(50, timeout=30) is True
        done.set()

    t = threading.Thread(target=take)
    t.start()
    started.wait(30)
    assert not done.wait(0.05)  # 80 + 50 > 100: it must be waiting
    assert b.statistics().used == 80
    b.release(80)
    t.join(30)
    assert done.is_set()
    stats = b.statistics()
    assert stats.used == 50
    assert stats.peak == 80
    assert stats.waits == 1
    assert stats.waited_seconds > 0


def test_budget_serves_waiters_in_the_order_they_came():
    """A large request waits for room; small ones that come after it wait behind it, not past it."""
    b = ByteBudget(100)
    b.acquire(60)
    order: list[str] = []

    def take(name: str, n: int) -> None:
        assert b.acquire(n, timeout=30) is True
        order.append(name)

    big = threading.Thread(target=take, args=("big", 90))
    big.start()
    deadline = time.monotonic() + 30
    while b.statistics().waits < 1:  # the large one is in line
        assert time.monotonic() < deadline
        time.sleep(0.001)
    small = threading.Thread(target=take, args=("small", 30))  # 60 + 30 fits: it would go first
    small.start()
    while b.statistics().waits < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert order == []
    with pytest.raises(BudgetExhausted, match=r"2 request\(s\) waiting"):  # nor does one that would not wait
        b.acquire_nowait(10)
    b.release(60)  # room for the large one: it goes, and the small one after it has room
    big.join(30)
    assert order[0] == "big"
    b.release(90)
    small.join(30)
    assert order == ["big", "small"] and b.statistics().used == 30


def test_a_request_that_times_out_in_line_lets_the_next_one_go():
    b = ByteBudget(100)
    b.acquire(60)
    assert b.acquire(90, timeout=0.05) is False  # gave up: no longer in line
    assert b.acquire(30, timeout=0) is True
    assert b.statistics().used == 90


def test_budget_acquire_times_out_without_taking_anything():
    b = ByteBudget(10)
    b.acquire(6)
    assert b.acquire(5, timeout=0.01) is False
    stats = b.statistics()
    assert stats.used == 6 and stats.waits == 1


def test_budget_acquire_nowait_raises_when_full():
    b = ByteBudget(100)
    b.acquire_nowait(80)
    with pytest.raises(BudgetExhausted, match="50 bytes do not fit: 80 of 100 in use"):
        b.acquire_nowait(50)
    assert b.statistics().used == 80  # the refused request took nothing
    b.acquire_nowait(20)  # exactly full is fine
    assert b.statistics().used == 100
    assert b.statistics().waits == 0  # nowait never counts as a wait


def test_budget_lets_an_oversize_request_through_when_empty():
    b = ByteBudget(100)
    assert b.acquire(1000, timeout=0) is True
    assert b.statistics() == BudgetStatistics(
        limit=100, used=1000, peak=1000, waits=0, waited_seconds=0.0
    )
    with pytest.raises(BudgetExhausted):
        b.acquire_nowait(1)
    b.release(1000)
    b.acquire_nowait(1000)  # the nowait variant too
    assert b.statistics().used == 1000


def test_budget_release_clamps_and_statistics_is_a_snapshot():
    b = ByteBudget(10)
    b.acquire(4)
    snap = b.statistics()
    b.release(100)
    assert b.statistics().used == 0
    assert snap.used == 4  # a snapshot, not a live view
    with pytest.raises(AttributeError):
        snap.used = 0  # type: ignore[misc]


@pytest.mark.parametrize("limit", [0, -1])
def test_budget_limit_must_be_positive(limit):
    with pytest.raises(ValueError, match=f"budget limit must be positive, got {limit}"):
        ByteBudget(limit)


# -- spill files ---------------------------------------------------------------------


def _root(a: np.ndarray) -> object:
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


SEG = spillfile.SegmentId("s", 3, 1, 100)


def test_a_reload_reads_only_the_records_asked_for_into_one_buffer(tmp_path):
    """Loading records ``lo..hi`` of a spill file reads exactly their bytes,
    and the arrays are views into that one buffer (no per-array copy)."""
    path = str(tmp_path / "seg")
    arrays = [np.full(1000, i, dtype="f8") for i in range(6)]
    index = spillfile.dump([*arrays, b"tail", {"k": 1}], path, SEG)
    got = spillfile.load(path, SEG, index, 1, 4)
    assert [int(a[0]) for a in got] == [1, 2, 3]
    roots = {id(_root(a)) for a in got}
    assert len(roots) == 1
    buf = _root(got[0])
    assert isinstance(buf, bytearray)
    assert len(buf) == index.spans[3][0] + index.spans[3][1] - index.spans[1][0]
    assert not any(a.flags.writeable for a in got)  # the log's records are read-only
    assert spillfile.load(path, SEG, index, 6, 8) == [b"tail", {"k": 1}]
    assert not os.path.exists(path + ".tmp")


def test_a_truncated_spill_file_is_an_error_not_garbage(tmp_path):
    path = str(tmp_path / "seg")
    index = spillfile.dump([np.arange(100.0), np.arange(100.0)], path, SEG)
    with open(path, "r+b") as f:
        f.truncate(index.data_start + index.spans[1][0] + 10)
    with pytest.raises(SpillCorruptionError, match="truncated"):
        spillfile.load(path, SEG, index, 1, 2)


def test_a_flipped_bit_in_a_spill_file_is_an_error_not_data(tmp_path):
    path = str(tmp_path / "seg")
    index = spillfile.dump([np.arange(100.0), np.arange(100.0)], path, SEG)
    with open(path, "r+b") as f:
        f.seek(index.data_start + index.spans[1][0] + index.spans[1][1] - 3)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    assert np.array_equal(spillfile.load(path, SEG, index, 0, 1)[0], np.arange(100.0))
    with pytest.raises(SpillCorruptionError, match=r"offset 101 of stream 's'.*crc32"):
        spillfile.load(path, SEG, index, 1, 2)


@pytest.mark.parametrize(
    "other",
    [
        spillfile.SegmentId("t", 3, 1, 100),  # another stream
        spillfile.SegmentId("s", 4, 1, 100),  # a newer epoch
        spillfile.SegmentId("s", 3, 0, 100),  # another partition
        spillfile.SegmentId("s", 3, 1, 0),  # other offsets
    ],
)
def test_a_spill_file_of_other_records_is_refused(tmp_path, other):
    """The file two workers sharing a folder could both write: the same name,
    the same size, other records. Its header gives it away."""
    path = str(tmp_path / "seg")
    records = [np.full(10, 7.0), np.full(10, 8.0)]
    index = spillfile.dump(records, path, SEG)
    theirs = spillfile.dump([np.full(10, 1.0), np.full(10, 2.0)], str(tmp_path / "x"), other)
    os.replace(str(tmp_path / "x"), path)
    assert theirs.spans == index.spans  # only the header tells them apart
    with pytest.raises(SpillCorruptionError, match="not stream 's' epoch 3 partition 1"):
        spillfile.load(path, SEG, index, 0, 2)


def test_a_file_that_is_no_segment_is_refused(tmp_path):
    path = str(tmp_path / "seg")
    index = spillfile.dump([b"abc"], path, SEG)
    with open(path, "wb") as f:
        f.write(b"user data, not ours")
    with pytest.raises(SpillCorruptionError, match="bad magic"):
        spillfile.load(path, SEG, index, 0, 1)


def test_a_failed_spill_write_leaves_no_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("no")

    path = str(tmp_path / "seg")
    with pytest.raises(Exception):
        spillfile.dump([b"a", Unpicklable()], path, SEG)
    assert os.listdir(tmp_path) == []


def test_a_segment_that_cannot_be_written_stays_in_memory_and_the_others_spill(spill_dir, caplog):
    """A record that does not serialise (stored as is by a task on its owner) must not stop the log from
    spilling: its segment stays in memory, said once, and every later spill takes the next segments."""
    import threading as th

    s = LogStore(budget=1000, spill_root=spill_dir, segment_size=100)
    s.open("a", 1, [0, 1, 2])
    bad = {"lock": th.Lock()}  # pickle refuses it
    s.append("a", 1, 0, [bad], [100])
    s.append("a", 1, 1, [np.arange(12)], [100])
    s.append("a", 1, 2, [b"x" * 100], [100])
    with caplog.at_level("ERROR", logger="aimss_dask"):
        assert s.spill(0) == 200  # the two others
        assert s.spill(0) == 0  # not tried again
    assert s.memory_bytes == 100 and s.spilled_bytes == 200
    said = [r.getMessage() for r in caplog.records if "could not spill" in r.getMessage()]
    assert len(said) == 1 and "records 0 to 0 of stream 'a' partition 0" in said[0], said
    assert "cannot be written to disk" in said[0]
    assert s.read("a", 1, 0, 0)[0][0] is bad  # still there, the same object
    assert np.array_equal(s.read("a", 1, 1, 0)[0][0], np.arange(12))
    assert s.read("a", 1, 2, 0)[0][0] == b"x" * 100
    s.close()


def test_a_full_spill_folder_refuses_new_writes_before_storing_them_and_heals(spill_dir, monkeypatch, caplog):
    """A spill that fails for the disk's sake leaves the records stored and raises nothing; while the log
    stays past its budget, check_room refuses what would come next (nothing stored, so a retry is safe),
    and once spilling works again it spills and lets writes through."""
    import errno

    from aimss_dask.log import store as store_mod

    s = LogStore(budget=450, spill_root=spill_dir, segment_size=100)
    s.open("a", 1, range(4))
    real = spillfile.dump

    def full(records, path, seg):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(spillfile, "dump", full)
    for p in range(4):
        s.append("a", 1, p, [bytes([p]) * 100], [100])
    s.check_room()  # not past the budget yet: nothing to do
    s.append("a", 1, 0, [b"z" * 100], [100])
    assert s.over_budget and s.spill() == 0  # failed, silently for the writer
    with caplog.at_level("ERROR", logger="aimss_dask"), pytest.raises(
        SpillError, match=r"holds 500 bytes, past its budget of 450, and cannot spill .*No space left"
    ):
        s.check_room()
    assert len([r for r in caplog.records if "could not spill" in r.getMessage()]) == 1  # one spell, one word
    assert [s.bounds("a", 1, p)[:2] for p in range(4)] == [(0, 2), (0, 1), (0, 1), (0, 1)]
    # Space again: segments that failed are tried once SPILL_RETRY has passed.
    monkeypatch.setattr(spillfile, "dump", real)
    monkeypatch.setattr(store_mod, "SPILL_RETRY", 0.0)
    s.check_room()
    assert not s.over_budget and s.spill_failure is None and s.spilled_bytes == 100  # down to 90% of the budget
    assert [r for p in range(4) for r in s.read("a", 1, p, 0)[0]] == [
        b"\0" * 100, b"z" * 100, b"\1" * 100, b"\2" * 100, b"\3" * 100,
    ]
    s.close()


def test_the_store_refuses_a_spill_file_changed_on_disk(store):
    """Through the store: a corrupted segment is an error on read, never data."""
    store.append("a", 1, 0, [np.arange(50.0), np.arange(50.0) + 1], [400, 400])
    store.spill(0)
    assert sorted(os.listdir(store.spill_dir)) == ["owner.json", "segment-0.bin", "segment-1.bin"]
    with open(os.path.join(store.spill_dir, "segment-1.bin"), "r+b") as f:  # offset 1
        f.seek(-8, os.SEEK_END)
        f.write(np.float64(-1.0).tobytes())
    assert np.array_equal(store.read("a", 1, 0, 0, max_bytes=400)[0][0], np.arange(50.0))
    with pytest.raises(SpillCorruptionError, match="stream 'a' epoch 1 partition 0"):
        store.read("a", 1, 0, 1)


def test_stores_sharing_a_spill_root_use_folders_of_their_own(tmp_path):
    """Two stores (two workers on one host) given one folder never share a file,
    and each reads back exactly its own records."""
    root = str(tmp_path / "scratch")
    os.makedirs(root)
    with open(os.path.join(root, "user.txt"), "w") as f:
        f.write("mine")
    a = LogStore(budget=100, spill_root=root, segment_size=10)
    b = LogStore(budget=100, spill_root=root, segment_size=10)
    assert a.spill_dir != b.spill_dir
    assert os.path.dirname(a.spill_dir) == os.path.dirname(b.spill_dir) == root
    for s, tag in ((a, b"A"), (b, b"B")):
        s.open("s", 1, [0])
        s.append("s", 1, 0, [tag * 10 for _ in range(20)], [10] * 20)
        s.spill(0)
    assert {f for f in os.listdir(a.spill_dir)} == {f for f in os.listdir(b.spill_dir)}  # same names
    assert a.read("s", 1, 0, 0)[0] == [b"A" * 10] * 20
    assert b.read("s", 1, 0, 0)[0] == [b"B" * 10] * 20
    a.close()
    b.close()
    # Each removed its own folder and nothing else; the root was not ours.
    assert os.listdir(root) == ["user.txt"]


def test_close_leaves_a_file_it_did_not_write(tmp_path):
    root = str(tmp_path / "scratch")
    s = LogStore(budget=100, spill_root=root, segment_size=10)
    s.open("s", 1, [0])
    s.append("s", 1, 0, [b"x" * 10] * 20, [10] * 20)
    s.spill(0)
    stray = os.path.join(s.spill_dir, "notes.txt")
    with open(stray, "w") as f:
        f.write("someone else's")
    s.close()
    assert open(stray).read() == "someone else's"
    assert _segment_files(root) == []


def test_prepare_spill_dir_names_an_unusable_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    s = LogStore(budget=100, spill_root=str(blocker / "spill"))
    with pytest.raises(OSError, match="a-file"):
        s.prepare_spill_dir()
    assert blocker.read_text() == "not a folder"


def test_a_late_open_of_a_destroyed_stream_leaves_nothing():
    store = LogStore(budget=2**20, spill_root="/tmp", segment_size=2**16)
    store.open("s", 3, [0])
    store.tombstone("s", 3)
    store.drop("s")
    with pytest.raises(StreamNotFoundError, match="was destroyed"):
        store.open("s", 3, [0])
    assert not store.has("s")
    store.open("s", 4, [0])  # a new stream of the name
    assert store.has("s")


def test_a_record_stored_on_its_owner_counts_every_byte_it_holds():
    """A task's write on the owner is sized without pickling: every part of a tuple counts (long strings,
    nested pieces), or a log of such records outgrows its budget and never spills."""
    import sys

    from aimss_dask.log.records import encode, local_nbytes

    text = "x" * 10**6
    piece = np.zeros(10**5)
    assert local_nbytes(("name", text)) >= len(text)
    assert local_nbytes(((1, (piece,)),)) >= piece.nbytes
    assert local_nbytes(((0, 1), piece)) >= piece.nbytes  # coordinates and a piece, as operators write
    assert local_nbytes(("k", text)) == sys.getsizeof("k") + sys.getsizeof(text)
    # Within reach of what the wire carries for the same record (pickled once, the remote path).
    for record in [("name", text), ((1, (piece,)),), ((0, 1), piece), piece, b"y" * 1000]:
        assert local_nbytes(record) >= 0.9 * encode(record)[1], record
    # Unknown parts are not guessed: the caller serialises (and so sizes and checks) them.
    assert local_nbytes(("a", object())) is None


def test_a_spill_file_removed_behind_the_stores_back_is_named_lost_not_destroyed(store):
    """A scratch cleaner deleting a spilled segment is lost data, said as such (offsets and file), not the
    "stream destroyed" of a read racing the store's own drop."""
    store.append("a", 1, 0, [np.arange(50.0), np.arange(50.0) + 1], [400, 400])
    store.spill(0)
    os.unlink(os.path.join(store.spill_dir, "segment-1.bin"))  # offset 1
    assert np.array_equal(store.read("a", 1, 0, 0, max_bytes=400)[0][0], np.arange(50.0))
    with pytest.raises(SpillCorruptionError, match=r"segment-1.bin of stream 'a' partition 0 \(offsets 1 to 1\) is gone"):
        store.read("a", 1, 0, 1)


def test_spill_files_of_a_dropped_stream_are_removed_without_holding_the_log(spill_dir, monkeypatch):
    """Removing thousands of spill files takes seconds on a parallel file system: appends and reads of
    other streams go on meanwhile, and an event loop that drops a stream does not wait for them."""
    import asyncio

    from aimss_dask.log import store as store_mod

    s = LogStore(budget=10**6, spill_root=spill_dir, segment_size=100)
    s.open("big", 1, [0])
    s.open("other", 1, [0])
    s.append("big", 1, 0, [bytes(100)] * 20, [100] * 20)
    s.spill(0)
    assert len(_segment_files(spill_dir)) == 20
    real = store_mod._unlink
    others: list[bool] = []

    def slow_unlink(path):
        # Another thread appends while this one removes files: it must not wait for the log's lock.
        t = threading.Thread(target=lambda: others.append(s.append("other", 1, 0, [b"x"], [1]) >= 0))
        t.start()
        t.join(2)
        real(path)

    monkeypatch.setattr(store_mod, "_unlink", slow_unlink)
    assert s.drop("big")  # a task thread: returns once the files are gone
    assert _segment_files(spill_dir) == [] and others == [True] * 20
    # On an event loop, many files go on a thread: the loop does not wait for them.
    s.open("big", 2, [0])
    s.append("big", 2, 0, [bytes(100)] * 20, [100] * 20)
    s.spill(0)
    before = len(_segment_files(spill_dir))  # 20 of "big", and "other"'s
    gate = threading.Event()
    monkeypatch.setattr(store_mod, "_unlink", lambda path: (gate.wait(10), real(path)))

    async def drop_on_the_loop() -> int:
        s.drop("big")
        return len(_segment_files(spill_dir))

    assert asyncio.run(drop_on_the_loop()) == before  # still there: a thread removes them
    gate.set()
    s.close()  # waits for that thread, then removes the folder
    assert not os.path.exists(s.spill_dir)
