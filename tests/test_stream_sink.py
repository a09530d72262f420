"""``Stream.to_zarr``: the streaming Zarr sink.

Pure planning first (no cluster, ``hypothesis`` for the invariants), then a
real multi-process cluster: round trips, bad inputs, and crashes for real (a
worker SIGKILLed, a client process SIGKILLed) followed by a resumed sink.

Every record carries its identity in its values: row ``i`` of record
``offset`` of partition ``p`` is ``[p * 10**6 + offset, i]``, so the final
array is checked for duplicates and gaps, row by row.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import zarr
from conftest import count_fsyncs, make_cluster, unique_name, wait_until
from distributed import Client
from hypothesis import given, settings
from hypothesis import strategies as st

import aimss_dask
from aimss_dask.api.streams import create_stream, destroy_stream
from aimss_dask.core.errors import (
    InvalidArgumentError,
    PartitionLostError,
    SinkError,
    StoreReadOnlyError,
)
from aimss_dask.sink import _stream_plan as plan

C = 8  # rows per chunk in the cluster tests: records of 1-5 rows straddle chunks


def _record(p, o):
    """Record ``o`` of partition ``p``: 1-5 rows of ``[p * 10**6 + o, row]``."""
    n = 1 + (o * 7 + p * 3) % 5
    a = np.empty((n, 2), dtype="int64")
    a[:, 0] = p * 10**6 + o
    a[:, 1] = np.arange(n)
    return a


def _write(s, partitions, lo, hi):
    for o in range(lo, hi):
        for p in range(partitions):
            s.write(_record(p, o), partition=p)


def _verify(path, partitions, records, component=None):
    """The array holds every row exactly once, where ``aimss.layout`` says."""
    arr = zarr.open_array(path, path=component, mode="r") if component else zarr.open_array(path, mode="r")
    x = arr[:]
    doc = arr.attrs["aimss"]
    want = {p: np.concatenate([_record(p, o) for o in range(records)]) for p in range(partitions)}
    total = sum(len(w) for w in want.values())
    assert x.shape == (total, 2), (x.shape, total)
    # No duplicate, no gap: the rows are a permutation of the expected ones.
    got = sorted(map(tuple, x.tolist()))
    assert got == sorted(tuple(r) for w in want.values() for r in w.tolist())
    # The layout is exact: every run is the next rows of its partition.
    seen = dict.fromkeys(range(partitions), 0)
    covered = 0
    for p, o, r, start, n in doc["layout"]:
        assert start == covered
        np.testing.assert_array_equal(x[start : start + n], want[p][seen[p] : seen[p] + n])
        assert tuple(want[p][seen[p]]) == (p * 10**6 + o, r)
        seen[p] += n
        covered += n
    assert covered == total and doc["rows"] == total and doc["complete"] is True
    assert doc["offsets"] == {str(p): [records, 0] for p in range(partitions)}
    # Full chunks have one partition each: only the tail mixes partitions.
    return arr


def _no_sink_threads():
    return not [t for t in threading.enumerate() if t.name.startswith("aimss-sink-")]


# -- pure planning ---------------------------------------------------------------------

lengths_st = st.lists(st.integers(0, 6), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, data=st.data())
def test_cut_and_advance_cover_the_rows_exactly(lengths, data):
    total = sum(lengths)
    o = data.draw(st.integers(0, len(lengths) - 1))
    r = data.draw(st.integers(0, max(0, lengths[o] - 1))) if lengths[o] else 0
    avail = sum(lengths[o:]) - r
    n = data.draw(st.integers(0, max(0, avail)))
    chunk = data.draw(st.integers(1, 7))
    rows = [(i, j) for i, k in enumerate(lengths) for j in range(k)]
    first = sum(lengths[:o]) + r
    chunks = plan.cut((o, r), lengths[o:], n, chunk)
    flat = [(o + i, j) for pieces in chunks for i, lo, hi in pieces for j in range(lo, hi)]
    assert flat == rows[first : first + n]
    assert all(sum(hi - lo for _, lo, hi in c) == chunk for c in chunks[:-1])
    end = plan.advance((o, r), lengths[o:], n)
    # The position after n rows: the next row to write, never (o, len(o)).
    if first + n < total:
        nxt = rows[first + n]
        assert (end[1] == 0 and sum(lengths[: end[0]]) == first + n) or end == nxt
        assert end[1] < lengths[end[0]] or end[1] == 0
    else:
        assert sum(lengths[: end[0]]) + end[1] == total


@settings(max_examples=200, deadline=None)
@given(
    rows_chunks=st.integers(0, 5),
    chunk=st.integers(1, 9),
    avail=st.lists(st.integers(-3, 40), min_size=1, max_size=6),
    cap=st.integers(1, 4),
)
def test_allocate_hands_out_whole_aligned_disjoint_chunks(rows_chunks, chunk, avail, cap):
    rows = rows_chunks * chunk
    slots = plan.allocate(rows, chunk, avail, cap)
    start = rows
    for s in slots:
        assert s.start == start and s.start % chunk == 0  # contiguous, aligned
        assert 1 <= s.nchunks <= min(cap, avail[s.p] // chunk)
        start += s.nchunks * chunk
    assert [s.p for s in slots] == sorted({s.p for s in slots})  # partition order, one run each
    assert {s.p for s in slots} == {p for p, a in enumerate(avail) if a >= chunk}


def test_layout_merges_runs_and_locates_rows():
    layout = plan.extend_layout([], [(0, 0, 0, 0, 8), (1, 0, 0, 8, 8)])
    layout = plan.extend_layout(layout, [(1, 3, 2, 16, 8), (0, 2, 1, 24, 0)])
    assert layout == [[0, 0, 0, 0, 8], [1, 0, 0, 8, 16]]
    assert plan.locate(layout, 1, 10) == 18
    assert plan.locate(layout, 0, 8) is None
    assert list(plan.tail_runs([(5, 1), (4, 0), (7, 2)], [3, 0, 2], 24)) == [(0, 5, 1, 24, 3), (2, 7, 2, 27, 2)]


def test_commit_doc_round_trips_and_rejects_garbage():
    c = plan.Committed(((3, 1), (4, 0)), 16, 0, 8, 0, False, ((0, 0, 0, 0, 8), (1, 0, 0, 8, 8)), "r", "s")
    doc = json.loads(json.dumps(c.to_doc()))
    assert plan.parse_doc(doc, "here") == c
    assert doc["offsets"] == {"0": [3, 1], "1": [4, 0]}
    with pytest.raises(InvalidArgumentError, match="attribute 'aimss' of here is malformed"):
        plan.parse_doc({**doc, "rows": 17}, "here")
    with pytest.raises(InvalidArgumentError, match="version"):
        plan.parse_doc({"offsets": {}}, "here")


def test_chunks_and_template_rules():
    t = plan.Template.of("f8", (5, 3), 0)
    assert plan.choose_chunks(t, None, 5) == (max(5, 8 * 2**20 // 24), 3)
    assert plan.choose_chunks(t, 16, 5) == (16, 3)
    assert plan.choose_chunks(t, (None, 2), 5)[1] == 2
    assert plan.default_chunk_rows(row_bytes=2**30, first_rows=7) == 7  # at least one record
    assert t.mismatch(np.dtype("f8"), (9, 3)) is None
    assert "dtype is int32, not float64" in t.mismatch(np.dtype("i4"), (9, 3))
    assert "axis 1 has length 4, not 3" in t.mismatch(np.dtype("f8"), (9, 4))
    assert "3 dimension(s), not 2" in t.mismatch(np.dtype("f8"), (9, 3, 1))
    with pytest.raises(InvalidArgumentError, match=r"axis=2 is out of range .* use an axis in -2 \.\. 1"):
        plan.Template.of("f8", (5, 3), 2)
    for bad in (0, -2, (0, 3), "8", 1.5):
        with pytest.raises(InvalidArgumentError, match="chunks="):
            plan.check_chunks_arg(bad)
    for bad in ("0", True, 1.0):
        with pytest.raises(InvalidArgumentError, match="axis="):
            plan.check_axis_arg(bad)


# -- on a cluster ------------------------------------------------------------------------


def test_sink_drains_partitions_exactly_once_and_buffers_partial_chunks(client, tmp_path):
    path = str(tmp_path / "a.zarr")
    s = create_stream(unique_name("sink"), partitions=3)
    sink = s.to_zarr(path, chunks=C)
    _write(s, 3, 0, 12)
    s.flush()
    # Only whole chunks are written while the stream is open: the rest waits.
    wait_until(lambda: sink.info()["rows"] >= 3 * C, what="first chunks durable")
    # Drained: every row written so far is either durable or pending (scanned),
    # and no partition has a whole chunk pending. Until every record is
    # scanned, a later round may still grow the array.
    total = sum(len(_record(p, o)) for p in range(3) for o in range(12))

    def drained():
        info = sink.info()
        return info["rows"] + sum(info["pending_rows"]) == total and all(0 <= n < C for n in info["pending_rows"])

    wait_until(drained, what="drained")
    info = sink.info()
    assert info["rows"] % C == 0 and info["state"] == "running" and not info["complete"]
    arr = zarr.open_array(path, mode="r")
    assert arr.attrs["aimss"]["rows"] == info["rows"] and arr.shape[0] == info["rows"]
    assert arr.attrs["aimss"]["offsets"] == {str(p): o for p, o in enumerate(info["offsets"])}
    _write(s, 3, 12, 20)
    s.seal()
    sink.wait(timeout=30)
    info = sink.info()
    assert info["state"] == "done" and info["complete"] and info["error"] is None
    assert 0 < info["chunks_written"] * C <= info["rows"]
    _verify(path, 3, 20)
    assert sink.done and _no_sink_threads()
    # Durable records were trimmed from the owners' logs.
    assert all(st["memory_bytes"] == 0 for st in aimss_dask.status().values())
    destroy_stream(s.name)


def test_sink_along_another_axis_into_a_component(client, tmp_path):
    path = str(tmp_path / "g.zarr")
    s = create_stream(unique_name("sink"), partitions=1)
    with s.to_zarr(path, component="grp/x", axis=-1) as sink:
        for o in range(6):
            s.write(_record(0, o).T.copy(), partition=0)  # rows along the last axis
        s.seal()
    arr = zarr.open_array(path, path="grp/x", mode="r")
    expect = np.concatenate([_record(0, o).T for o in range(6)], axis=1)
    np.testing.assert_array_equal(arr[:], expect)  # one partition: offset order
    assert arr.chunks[0] == 2 and arr.chunks[1] >= 8 * 2**20 // 16  # default: ~8 MiB
    assert sink.info()["rows"] == expect.shape[1] and arr.attrs["aimss"]["axis"] == 1
    destroy_stream(s.name)


def test_bad_arguments_fail_before_anything_is_written(client, tmp_path):
    s = create_stream(unique_name("sink"), partitions=2)
    path = str(tmp_path / "e.zarr")
    with pytest.raises(StoreReadOnlyError, match="read-only"):
        s.to_zarr(zarr.storage.LocalStore(path, read_only=True))
    with pytest.raises(InvalidArgumentError, match="MemoryStore"):
        s.to_zarr(zarr.storage.MemoryStore())
    with pytest.raises(InvalidArgumentError, match="axis='0' must be an int"):
        s.to_zarr(path, axis="0")
    with pytest.raises(InvalidArgumentError, match="chunks=0 must be a positive"):
        s.to_zarr(path, chunks=0)
    zarr.create_group(path).create_array("x", shape=(0, 3), chunks=(4, 3), dtype="f4")
    with pytest.raises(InvalidArgumentError, match="is a group, not an array"):
        s.to_zarr(path)
    with pytest.raises(InvalidArgumentError, match=r"axis=2 is out of range for array 'x'.*shape \(0, 3\)"):
        s.to_zarr(path, component="x", axis=2)
    with pytest.raises(InvalidArgumentError, match=r"chunks=5 means chunks \(5, 3\).*exists with chunks \(4, 3\)"):
        s.to_zarr(path, component="x", chunks=5)
    assert not os.path.exists(str(tmp_path / "e.zarr" / "x" / "c"))
    destroy_stream(s.name)


@pytest.mark.parametrize(
    "existing, match",
    [
        (dict(shape=(0, 2), dtype="float32"), "dtype is int64, not float32"),
        (dict(shape=(0, 3), dtype="int64"), "axis 1 has length 2, not 3"),
    ],
)
def test_existing_array_of_another_kind_is_left_untouched(client, tmp_path, existing, match):
    path = str(tmp_path / "x.zarr")
    zarr.create_array(path, chunks=(4, existing["shape"][1]), **existing)
    before = open(os.path.join(path, "zarr.json")).read()
    s = create_stream(unique_name("sink"), partitions=2)
    sink = s.to_zarr(path)
    _write(s, 2, 0, 3)
    s.seal()
    # Whichever partition's first record the sink scans first names the misfit:
    # partition 1's may arrive before partition 0's.
    with pytest.raises(InvalidArgumentError, match=f"record 0 of partition [01] .*does not fit the array: its {match}"):
        sink.wait(timeout=30)
    assert sink.info()["state"] == "failed"
    assert open(os.path.join(path, "zarr.json")).read() == before
    destroy_stream(s.name)


def test_axis_out_of_range_for_the_records(client, tmp_path):
    s = create_stream(unique_name("sink"), partitions=1)
    sink = s.to_zarr(str(tmp_path / "ax.zarr"), axis=2)
    s.write(_record(0, 0), partition=0)
    s.seal()
    with pytest.raises(InvalidArgumentError, match=r"record 0 of partition 0 .*axis=2 is out of range .*2 dimension"):
        sink.wait(timeout=30)
    assert not os.path.exists(str(tmp_path / "ax.zarr"))
    destroy_stream(s.name)


def test_a_bad_record_mid_stream_fails_loudly_and_keeps_what_is_durable(client, tmp_path):
    path = str(tmp_path / "b.zarr")
    s = create_stream(unique_name("sink"), partitions=2)
    sink = s.to_zarr(path, chunks=C)
    _write(s, 2, 0, 10)
    s.flush()
    wait_until(lambda: sink.info()["rows"] >= 2 * C, what="chunks durable")
    s.write(np.zeros((2, 2), dtype="float64"), partition=1)  # record 10 of partition 1
    s.write(np.zeros((2, 2, 1), dtype="int64"), partition=0)  # record 10 of partition 0
    s.seal()
    with pytest.raises(InvalidArgumentError, match=r"record 10 of partition \d .*does not fit the array"):
        sink.wait(timeout=30)
    arr = zarr.open_array(path, mode="r")
    doc = arr.attrs["aimss"]
    assert arr.shape[0] == doc["rows"] == sink.info()["rows"] > 0 and not doc["complete"]
    # What is durable is intact and exactly what the offsets say.
    x = arr[:]
    for p, o, r, start, n in doc["layout"]:
        first = sum(len(_record(p, k)) for k in range(o)) + r
        rows = np.concatenate([_record(p, k) for k in range(10)])[first : first + n]
        np.testing.assert_array_equal(x[start : start + n], rows)
    assert _no_sink_threads()
    destroy_stream(s.name)


def test_close_stops_and_a_new_sink_resumes_past_a_crashed_round(client, tmp_path):
    path = str(tmp_path / "c.zarr")
    s = create_stream(unique_name("sink"), partitions=2)
    sink = s.to_zarr(path, chunks=C)
    # 11 and 13 rows: one full chunk each, the rest stays in the logs.
    _write(s, 2, 0, 4)
    s.flush()
    wait_until(lambda: sink.info()["rows"] == 2 * C, what="two chunks durable")
    sink.close()
    sink.close()  # idempotent
    info = sink.info()
    assert info["state"] == "closed" and _no_sink_threads()
    # Partition 0's chunk ends inside its record 2: (offset 2, row 4).
    assert info["offsets"] == [[2, 4], [3, 0]]
    with pytest.raises(SinkError, match="was closed before it finished.*to resume"):
        sink.wait()
    # A round that crashed after writing, before committing: chunks past the
    # committed rows. The next sink must cut them away, not keep them.
    arr = zarr.open_array(path, mode="r+")
    arr.resize((4 * C, 2))
    arr[2 * C :] = -1
    _write(s, 2, 4, 15)
    s.seal()
    again = s.to_zarr(path)  # the array's chunks, from its committed offsets
    again.wait(timeout=30)
    _verify(path, 2, 15)
    # A completed array only takes a replay: nothing is written twice.
    before = zarr.open_array(path, mode="r").attrs.asdict()
    s.to_zarr(path).wait(timeout=30)
    assert zarr.open_array(path, mode="r").attrs.asdict() == before
    destroy_stream(s.name)


def test_appends_whole_shards_to_a_user_made_array(client, tmp_path):
    path = str(tmp_path / "sh.zarr")
    zarr.create_array(path, shape=(0, 2), chunks=(2, 2), shards=(C, 2), dtype="int64")
    s = create_stream(unique_name("sink"), partitions=2)
    sink = s.to_zarr(path)
    _write(s, 2, 0, 9)
    s.seal()
    sink.wait(timeout=30)
    arr = _verify(path, 2, 9)
    assert arr.shards == (C, 2) and arr.chunks == (2, 2) and sink.info()["chunk_rows"] == C
    destroy_stream(s.name)


def test_retention_keeps_what_a_consumer_group_has_not_read(client, tmp_path):
    s = create_stream(unique_name("sink"), partitions=1)
    _write(s, 1, 0, 10)
    s.seal()
    it = s.read(group="late")
    next(it), next(it)
    it.close()  # the group has consumed (and committed) record 0 only
    assert s.info()["groups"] == {"late": [1]}
    s.to_zarr(str(tmp_path / "r.zarr"), chunks=C).wait(timeout=30)
    # The sink trimmed nothing the group still needs.
    got = [r for r in s.read(group="late")]
    assert [int(r[0, 0]) for r in got] == list(range(1, 10))
    destroy_stream(s.name)


def test_a_sink_holds_the_records_it_has_still_to_write_from_another_sinks_trim(client, tmp_path):
    s = create_stream(unique_name("sink"), partitions=1)
    late = s.to_zarr(str(tmp_path / "late.zarr"), chunks=C)
    hold = wait_until(
        lambda: next((g for g in s.info()["groups"] if g.startswith("aimss-sink:")), None), what="the sink's hold"
    )
    late.close()  # stopped before it wrote anything: its hold stays, for a resumed sink
    assert s.info()["groups"][hold] == [0]
    _write(s, 1, 0, 10)
    s.seal()
    s.to_zarr(str(tmp_path / "early.zarr"), chunks=C).wait(timeout=30)
    # The first sink's records were kept for the late one: nothing trimmed.
    assert [int(r[0, 0]) for r in s.read(partition=0, start=0)] == list(range(10))
    # It resumes under the same hold, writes everything, and then the log is empty.
    s.to_zarr(str(tmp_path / "late.zarr")).wait(timeout=30)
    _verify(str(tmp_path / "late.zarr"), 1, 10)
    _verify(str(tmp_path / "early.zarr"), 1, 10)
    assert s.info()["groups"][hold] == [10]
    wait_until(lambda: all(st["memory_bytes"] == 0 for st in aimss_dask.status().values()), what="trimmed")
    destroy_stream(s.name)


def test_a_destroyed_stream_fails_the_sink(client, tmp_path):
    s = create_stream(unique_name("sink"), partitions=1)
    sink = s.to_zarr(str(tmp_path / "d.zarr"), chunks=C)
    _write(s, 1, 0, 3)
    s.flush()
    destroy_stream(s.name)
    with pytest.raises(SinkError, match="was destroyed while its sink was running"):
        sink.wait(timeout=30)


def test_resume_refuses_another_partitioning(client, tmp_path):
    path = str(tmp_path / "p.zarr")
    name = unique_name("sink")
    s = create_stream(name, partitions=2)
    _write(s, 2, 0, 3)
    s.seal()
    s.to_zarr(path, chunks=C).wait(timeout=30)
    with pytest.raises(InvalidArgumentError, match="grown along axis 0 .*pass axis=0"):
        s.to_zarr(path, axis=1)
    destroy_stream(name)
    t = create_stream(name, partitions=3)  # the same name, re-created otherwise
    with pytest.raises(InvalidArgumentError, match="stream with 2 partition.*this stream has 3"):
        t.to_zarr(path)
    destroy_stream(name)


def test_a_sink_of_another_stream_does_not_take_its_offsets_for_its_own(client, tmp_path):
    """The array's committed offsets are one stream's: another stream sunk into it would have its first
    records dropped as "already durable". Refused (the array untouched), and the way out the message names
    (delete the attribute) appends the other stream after the rows already there."""
    path = str(tmp_path / "o.zarr")
    s = create_stream(unique_name("sink"), partitions=2)
    _write(s, 2, 0, 3)
    s.seal()
    s.to_zarr(path, chunks=C).wait(timeout=30)
    before = zarr.open_array(path, mode="r")
    rows, doc = before[:], before.attrs.asdict()
    t = create_stream(unique_name("other"), partitions=2)
    _write(t, 2, 0, 5)
    t.seal()
    with pytest.raises(InvalidArgumentError, match=f"holds what stream '{s.name}' sank into it .*not stream '{t.name}'"):
        t.to_zarr(path)
    after = zarr.open_array(path, mode="r")
    assert np.array_equal(after[:], rows) and after.attrs.asdict() == doc
    # Shrunk by hand below what its sink committed: refused too.
    arr = zarr.open_array(path, mode="r+")
    arr.resize((C, 2))
    with pytest.raises(InvalidArgumentError, match=f"has {C} rows along axis 0, fewer than the"):
        s.to_zarr(path)
    arr.resize(rows.shape)
    arr[:] = rows
    # Without the attribute: an array of the user's, appended to from its last whole chunk on.
    del arr.attrs["aimss"]
    if rows.shape[0] % C:
        arr.resize((rows.shape[0] // C * C, 2))
    kept = arr[:]
    t.to_zarr(path).wait(timeout=30)
    x = zarr.open_array(path, mode="r")[:]
    assert np.array_equal(x[: len(kept)], kept)
    want = sorted(tuple(r) for p in range(2) for o in range(5) for r in _record(p, o).tolist())
    assert sorted(map(tuple, x[len(kept) :].tolist())) == want
    destroy_stream(s.name)
    destroy_stream(t.name)


def test_sink_thread_stops_when_its_client_closes(cluster, client, tmp_path):
    with Client(cluster, set_as_default=True) as other:
        s = create_stream(unique_name("sink"), partitions=1)
        sink = s.to_zarr(str(tmp_path / "z.zarr"), chunks=C)
        s.write(_record(0, 0), partition=0)
        s.flush()
        assert other.status == "running"
    sink._thread.join(30)
    assert not sink._thread.is_alive() and _no_sink_threads()
    with pytest.raises(SinkError):
        sink.wait()


# -- crashes -----------------------------------------------------------------------------


def test_worker_killed_mid_sink_then_replay_resumes_exactly_once(tmp_path):
    path = str(tmp_path / "k.zarr")
    with make_cluster(2) as cl, Client(cl) as c:
        c.register_plugin(aimss_dask.AIMSS())
        name = unique_name("kill")
        s = create_stream(name, partitions=2)
        sink = s.to_zarr(path, chunks=C)
        _write(s, 2, 0, 15)
        s.flush()
        wait_until(lambda: sink.info()["rows"] >= 2 * C, timeout=30, what="chunks durable")
        victim = s.spec.owners[0]
        os.kill(c.run(os.getpid)[victim], signal.SIGKILL)
        with pytest.raises(PartitionLostError, match=r"partition\(s\) \[0\] .*were lost.*to resume"):
            sink.wait(timeout=60)
        committed = zarr.open_array(path, mode="r").attrs["aimss"]
        assert committed["rows"] >= 2 * C and not committed["complete"]
        assert _no_sink_threads()
        # The application's recovery: re-create the stream, replay the same records.
        destroy_stream(name)
        s = create_stream(name, partitions=2)
        sink = s.to_zarr(path)
        _write(s, 2, 0, 30)
        s.seal()
        sink.wait(timeout=60)
        _verify(path, 2, 30)
        destroy_stream(name)


def test_a_sink_task_whose_result_died_with_its_worker_names_the_lost_partition(monkeypatch):
    """The round's task finished on the owner, which died before the driver took the result.

    Dask marks the future ``lost`` and runs the task again, pinned to the
    dead worker: never. The driver asks the coordinator and raises the
    named ``PartitionLostError``; it said "lost its tasks (its client
    closed?)" before (seen in CI, in the kill test above). A lost result
    whose partition the coordinator does not name lost fails the round
    after a grace, named, instead of waiting forever.
    """
    from types import SimpleNamespace

    from aimss_dask.sink import _stream_owners as owners_mod

    class Lost:
        status = "lost"

        def cancel(self) -> None:
            self.status = "cancelled"

    lost: list[int] = [1]
    asked: list[str] = []

    def scheduler_op(op, name, **kw):
        asked.append(op)
        return {"lost": list(lost)}

    def check_lost(lost_now, involved):
        if lost_now:
            raise PartitionLostError(f"partition(s) {sorted(lost_now)} were lost")

    cut = []
    spec = SimpleNamespace(name="s", owners=("tcp://a:1", "tcp://b:1"), epoch=1)
    client = SimpleNamespace(status="running")
    o = owners_mod.Owners(spec, "run", client, SimpleNamespace(scheduler_op=scheduler_op), check_lost,
                          lambda: cut.append(True))
    with pytest.raises(PartitionLostError, match=r"\[1\]"):
        o.gather({1: Lost()})
    assert cut == [True]  # the array is cut back to the commit, as after any failed round
    # Not named lost: a named SinkError once the grace has passed, not a wait forever.
    lost.clear()
    monkeypatch.setattr(owners_mod, "LOST_RESULT_GRACE", 0.2)
    monkeypatch.setattr(owners_mod, "LOST_CHECK", 0.05)
    with pytest.raises(SinkError, match="partition 1 lost its result with worker tcp://b:1"):
        o.gather({1: Lost()})


_CLIENT_SCRIPT = """
import sys, time
import numpy as np
from distributed import Client
import aimss_dask
{record}
address, path, name = sys.argv[1:]
with Client(address):
    s = aimss_dask.create_stream(name, partitions=2)
    sink = s.to_zarr(path, chunks={C})
    for o in range(15):
        for p in range(2):
            s.write(_record(p, o), partition=p)
    s.flush()
    while sink.info()["rows"] < {C} * 2:
        assert sink.info()["error"] is None, sink.info()
        time.sleep(0.05)
    print("durable", sink.info()["rows"], flush=True)
    time.sleep(600)
"""


def test_client_killed_mid_sink_then_a_new_client_resumes(client, cluster, tmp_path):
    path = str(tmp_path / "cl.zarr")
    name = unique_name("client-kill")
    script = _CLIENT_SCRIPT.format(record=inspect.getsource(_record), C=C)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, cluster.scheduler_address, path, name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("durable"), line + proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    # The dead client's stream goes with it.
    wait_until(lambda: all(name not in st["streams"] for st in aimss_dask.status().values()), what="stream gone")
    wait_until(lambda: not _exists(name), what="stream forgotten")
    committed = zarr.open_array(path, mode="r").attrs["aimss"]
    assert committed["rows"] >= 2 * C
    s = create_stream(name, partitions=2)
    _write(s, 2, 0, 25)
    s.seal()
    sink = s.to_zarr(path)
    sink.wait(timeout=60)
    assert sink.info()["run"] != committed["run"]
    _verify(path, 2, 25)
    destroy_stream(name)


def _exists(name):
    try:
        aimss_dask.get_stream(name)
        return True
    except aimss_dask.StreamNotFoundError:
        return False


@pytest.mark.parametrize("durable", [True, False])
def test_a_durable_sink_syncs_every_chunk_before_committing_it(client, tmp_path, durable):
    path = str(tmp_path / "d.zarr")
    client.run(count_fsyncs)
    count_fsyncs()
    s = create_stream(unique_name("durable"), partitions=2)
    sink = s.to_zarr(path, chunks=C, durable=durable)
    _write(s, 2, 0, 10)
    s.seal()
    sink.wait(timeout=30)
    _verify(path, 2, 10)
    synced = set(count_fsyncs()).union(*client.run(count_fsyncs).values())
    root = os.path.realpath(path)
    chunks = {
        os.path.realpath(os.path.join(d, f))
        for d, _, fs in os.walk(os.path.join(root, "c")) for f in fs
    }
    assert chunks, "the sink wrote no chunk file"
    # The folders the sink made (the array's, c/, c/0/...) are entries of their parents.
    folders = {os.path.join(d, "") for d, _, _ in os.walk(root)} | {os.path.join(os.path.dirname(root), "")}
    if durable:
        # Every chunk the commit covers is on disk, and so is the commit itself.
        assert chunks <= synced, f"not synced: {sorted(chunks - synced)[:3]}"
        assert os.path.join(root, "zarr.json") in synced
        assert folders <= synced, f"folders not synced: {sorted(folders - synced)[:3]}"
    else:
        assert not synced & (chunks | {os.path.join(root, "zarr.json")} | folders)
    destroy_stream(s.name)


def test_durable_must_be_a_bool(client, tmp_path):
    s = create_stream(unique_name("durable-arg"), partitions=1)
    with pytest.raises(InvalidArgumentError, match="durable='yes' must be True or False"):
        s.to_zarr(str(tmp_path / "x.zarr"), durable="yes")
    assert not os.path.exists(tmp_path / "x.zarr")
    destroy_stream(s.name)


def test_a_sink_that_lost_the_array_to_another_neither_rolls_it_back_nor_overwrites_its_document(tmp_path):
    """Two sinks of one array at once (the docs forbid it; the fence is for when it happens anyway): one
    that looked before the other committed must not take the array over with the older document (that
    cuts away the other's rows), and one whose array was taken over must not write its shape and document
    back over the new owner's."""
    from dataclasses import replace

    from aimss_dask.core.errors import SinkError
    from aimss_dask.sink._stream_array import SinkArray
    from aimss_dask.sink._stream_plan import Committed, Template, parse_doc
    from aimss_dask.sink._stream_tasks import Target

    path = str(tmp_path / "two.zarr")
    template = Template.of(np.dtype("int64"), (1, 2), 0)
    a = SinkArray(Target(path, None, "run-a", path, durable=False), "s")
    start = replace(Committed.fresh(1, 0, C, 0), run="run-a", stream="s")
    a.create(template, (C, 2), 3, {"attributes": {"aimss": start.to_doc()}})
    a.resize(template, C)
    zarr.open_array(path, mode="r+")[:C] = 1
    seen = a.commit(start, offsets=((4, 0),), rows=C, layout=((0, 0, 0, 0, C),))
    b = SinkArray(Target(path, None, "run-b", path, durable=False), "s")
    looked = parse_doc(zarr.open_array(path, mode="r").attrs["aimss"], path)  # what b's start saw
    a.resize(template, 2 * C)
    zarr.open_array(path, mode="r+")[C:] = 2
    a.commit(seen, offsets=((8, 0),), rows=2 * C, layout=((0, 0, 0, 0, 2 * C),))
    with pytest.raises(SinkError, match="another sink, run 'run-a', committed into it"):
        b.activate(looked)
    arr = zarr.open_array(path, mode="r")
    assert arr.shape == (2 * C, 2) and arr.attrs["aimss"]["rows"] == 2 * C and (arr[C:] == 2).all()
    # b starting from what is there now takes over; a is fenced out of every metadata write.
    now = parse_doc(arr.attrs["aimss"], path)
    b.activate(now)
    with pytest.raises(SinkError, match="took over"):
        a.resize(template, 3 * C)
    with pytest.raises(SinkError, match="took over"):
        a.commit(now, rows=3 * C)
    arr = zarr.open_array(path, mode="r")
    assert arr.shape == (2 * C, 2) and arr.attrs["aimss"]["run"] == "run-b"
