"""Zarr sources (``from_zarr``) and the training loader (``Stream.batches``).

Pure layout planning is property-tested without a cluster; the rest runs on
the module-scoped multi-process LocalCluster of conftest, with small arrays.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time

import numpy as np
import pytest
import zarr
from conftest import unique_name, wait_until
from distributed import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aimss_dask
from aimss_dask.source import from_zarr
from aimss_dask.source.layout import SourceLayout, batch_plan, epoch_order, plan_take
from aimss_dask.source.loader import _count

DTYPES = ["b1", "i1", "u2", "i4", "i8", "f4", "f8", "c8"]


def _write(path: str, x: np.ndarray, chunks: tuple[int, ...]) -> str:
    a = zarr.create_array(store=path, shape=x.shape, chunks=chunks, dtype=x.dtype)
    if x.size:
        a[...] = x
    return path


def _array(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 100).astype(dtype)


@pytest.fixture
def tmp(tmp_path):
    return str(tmp_path)


def _worker_runs(dask_worker, name=None):
    from aimss_dask.source.broker import SourceRun

    runs = dask_worker.plugins["aimss"].runs
    return {
        n: r.status()
        for n in runs.names()
        if isinstance(r := runs.get(n), SourceRun) and (name is None or n == name)
    }


async def _live_broker_tasks(name, dask_worker=None):
    prefix = f"aimss-source-{name}-"
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(prefix) and not t.done()]


def _runs(client, name):
    """Per worker, the broker status of ``name`` (absent where no run)."""
    return {w: r[name] for w, r in client.run(_worker_runs, name=name).items() if name in r}


def _part_states(client, name):
    """The broker state of every partition of ``name``, over all workers."""
    return [st for r in _runs(client, name).values() for _, st in r["parts"]]


# -- pure planning ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 60),
    slab=st.integers(1, 9),
    parts=st.integers(1, 4),
    data=st.data(),
)
def test_plan_take_gives_exactly_the_requested_samples(rows, slab, parts, data):
    lay = SourceLayout(rows, slab, parts)
    x = np.arange(rows) * 10
    # Slabs as the brokers store them: by (partition, offset).
    logs = {lay.location(k): x[slice(*lay.slab_bounds(k))] for k in range(lay.slabs)}
    assert sum(lay.records(p) for p in range(parts)) == lay.slabs
    samples = np.array(data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=20, unique=True)))
    if data.draw(st.booleans()):
        a = data.draw(st.integers(0, rows - 1))
        samples = np.arange(a, data.draw(st.integers(a + 1, rows)))
    out = np.empty(len(samples), dtype=x.dtype)
    for t in plan_take(lay, samples):
        assert 0 <= t.offset < lay.records(t.partition)
        rec = logs[(t.partition, t.offset)]
        out[t.positions] = rec[t.rows]
    assert (out == x[samples]).all()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), bs=st.integers(1, 12), epochs=st.integers(1, 3), start=st.integers(0, 130))
def test_batch_plan_every_sample_once_per_epoch(rows, bs, epochs, start):
    stop = epochs * rows
    start = min(start, stop)
    plan = list(batch_plan(rows, bs, start, stop))
    assert len(plan) == _count(rows, bs, start, stop)
    seen: dict[int, list[int]] = {}
    pos = start
    for e, i, j in plan:
        assert e * rows + i == pos and 0 < j - i <= bs and j <= rows
        pos = e * rows + j
        seen.setdefault(e, []).extend(epoch_order(rows, e, 7, True)[i:j].tolist())
    assert pos == stop
    for e, got in seen.items():
        if e > start // rows or start % rows == 0:
            assert sorted(got) == list(range(rows))


def test_records_consumed_counts_whole_slabs_only():
    lay = SourceLayout(rows=10, slab_rows=4, partitions=2)  # slabs [0,4) [4,8) [8,10)
    assert lay.records_consumed(0) == [0, 0]
    assert lay.records_consumed(3) == [0, 0]
    assert lay.records_consumed(4) == [1, 0]
    assert lay.records_consumed(8) == [1, 1]
    assert lay.records_consumed(10) == [2, 1] == [lay.records(0), lay.records(1)]


# -- round trip ----------------------------------------------------------------------------


@st.composite
def zarr_case(draw):
    ndim = draw(st.integers(1, 3))
    shape = (draw(st.integers(0, 30)), *draw(st.lists(st.integers(1, 4), min_size=ndim - 1, max_size=ndim - 1)))
    chunks = tuple(draw(st.integers(1, max(n, 1))) for n in shape)
    dtype = draw(st.sampled_from(DTYPES))
    parts = draw(st.one_of(st.none(), st.integers(1, 3)))
    batch = draw(st.integers(1, 12))
    return shape, chunks, dtype, parts, batch


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=zarr_case())
def test_round_trip_equals_numpy(client, case):
    shape, chunks, dtype, parts, batch = case
    x = _array(shape, dtype)
    with tempfile.TemporaryDirectory() as d:
        s = from_zarr(_write(os.path.join(d, "x.zarr"), x, chunks), partitions=parts, name=unique_name("rt"))
        try:
            lay = SourceLayout(shape[0], chunks[0], s.partitions)
            by_part = [list(s.read(partition=p)) for p in range(s.partitions)]
            slabs = [by_part[p][o] for p, o in map(lay.location, range(lay.slabs))]
            got = np.concatenate(slabs) if slabs else np.empty(shape, dtype)
            assert got.dtype == x.dtype and got.shape == x.shape
            np.testing.assert_array_equal(got, x)
            bs = list(s.batches(batch))
            assert all(len(b) == batch for b in bs[:-1]) and len(bs) == -(-shape[0] // batch)
            got = np.concatenate(bs) if bs else np.empty(shape, dtype)
            assert got.dtype == x.dtype
            np.testing.assert_array_equal(got, x)
        finally:
            aimss_dask.destroy_stream(s.name)


# -- the loader ----------------------------------------------------------------------------


def test_batches_sequential_epochs_and_last_batch(client, tmp):
    x = _array((50, 3), "f8")
    s = from_zarr(_write(os.path.join(tmp, "x.zarr"), x, (8, 3)))
    try:
        it = s.batches(16, epochs=2)
        assert len(it) == 8
        bs = list(it)
        assert [len(b) for b in bs] == [16, 16, 16, 2] * 2
        np.testing.assert_array_equal(np.concatenate(bs), np.concatenate([x, x]))
        assert it.position == 100
        bs[0][:] = -1  # batches are the caller's to modify
    finally:
        aimss_dask.destroy_stream(s.name)


def test_batches_shuffle_exactly_once_per_epoch_and_reproducible(client, tmp):
    x = np.arange(70 * 2, dtype="i8").reshape(70, 2)
    s = from_zarr(_write(os.path.join(tmp, "x.zarr"), x, (9, 2)), partitions=3)
    try:
        first = list(s.batches(16, shuffle=True, seed=5, epochs=3))
        assert [len(b) for b in first] == [16, 16, 16, 16, 6] * 3
        epochs = [np.concatenate(first[i * 5 : (i + 1) * 5]) for i in range(3)]
        for e in epochs:
            np.testing.assert_array_equal(np.sort(e[:, 0]), x[:, 0])  # every sample exactly once
            np.testing.assert_array_equal(e[:, 1], e[:, 0] + 1)  # whole samples, not mixed rows
        assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
        again = list(s.batches(16, shuffle=True, seed=5, epochs=3))
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
        other = np.concatenate(list(s.batches(16, shuffle=True, seed=6)))
        assert not np.array_equal(other, epochs[0])
    finally:
        aimss_dask.destroy_stream(s.name)


def test_resume_from_group_offsets(client, tmp):
    x = np.arange(40, dtype="f4").reshape(40, 1)
    path = _write(os.path.join(tmp, "x.zarr"), x, (8, 1))
    # Sequential, one epoch: the brokers trim behind the group as it goes.
    s = from_zarr(path)
    try:
        it = s.batches(6, group="g")
        head = [next(it) for _ in range(3)]
        it.close()  # batch 3 was returned but never followed by a next(): not committed
        assert it.position == 12
        info = s.info()
        assert info["groups"]["g#position"][0] == 12
        assert info["groups"]["g"] == [1, 0]  # slab 0 done (partition 0, offset 0)
        rest = list(s.batches(6, group="g"))
        np.testing.assert_array_equal(rest[0], head[2])
        np.testing.assert_array_equal(np.concatenate(head[:2] + rest), x)
        assert list(s.batches(6, group="g")) == []  # that group has read everything
    finally:
        aimss_dask.destroy_stream(s.name)
    # Shuffled over two epochs: resume mid-way replays the same permutation.
    s = from_zarr(path)
    try:
        full = list(s.batches(6, shuffle=True, seed=3, epochs=2))
        it = s.batches(6, shuffle=True, seed=3, epochs=2, group="h")
        head = [next(it) for _ in range(9)]  # 7 batches per epoch: into epoch 2
        it.close()
        rest = list(s.batches(6, shuffle=True, seed=3, epochs=2, group="h"))
        assert len(head) - 1 + len(rest) == len(full) == 14
        for a, b in zip(head[:-1] + rest, full):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(aimss_dask.InvalidArgumentError, match="needs a seed"):
            s.batches(6, shuffle=True, group="h")
    finally:
        aimss_dask.destroy_stream(s.name)


def test_prefetch_window_is_bounded_and_slides(client, tmp):
    slab_rows, cols, window = 4, 256, 3
    x = _array((48 * slab_rows, cols), "f8")  # 48 slabs of 8 KiB, 24 per partition
    slab_bytes = slab_rows * cols * 8
    s = from_zarr(_write(os.path.join(tmp, "x.zarr"), x, (slab_rows, cols)), partitions=2, prefetch=window)
    try:
        # Before anyone reads, the brokers fill the first window and stop.
        wait_until(lambda: sum(st["end"] for st in _part_states(client, s.name)) == 2 * window)
        time.sleep(0.3)
        assert s.info()["records"] == [window, window]
        got, most = [], [0, 0]
        for i, b in enumerate(s.batches(slab_rows)):  # one slab per batch
            got.append(b)
            time.sleep(0.01)  # "compute": the brokers keep up
            if i % 6 == 0:
                info = s.info()
                most = [max(m, n) for m, n in zip(most, info["bytes"])]
        np.testing.assert_array_equal(np.concatenate(got), x)
        assert max(most) <= window * slab_bytes
        runs = _runs(client, s.name)
        for r in runs.values():
            for _, part in r["parts"]:
                assert part["end"] == part["records"] == 24  # the window slid to the end
                assert part["peak"] <= window, part
        # Everything read is trimmed; the brokers then have nothing left to do.
        wait_until(lambda: sum(s.info()["bytes"]) == 0, what="trim behind the loader")
        wait_until(lambda: not any(client.run(_live_broker_tasks, s.name).values()), what="brokers done")
    finally:
        aimss_dask.destroy_stream(s.name)


async def _take_on_owner(name, epoch, takes, dask_worker=None):
    run = dask_worker.plugins["aimss"].runs.require(name, epoch)
    reply = await run.call("take", takes=takes)
    return [None if p is None else np.asarray(getattr(p, "data", p)) for p in reply["parts"]]


def test_take_ahead_of_the_broker_reads_early_and_only_once(client, tmp):
    # A shuffled loader's first batches want records from all over a
    # partition: a take for a record the broker has not reached reads it at
    # once, and the broker later appends that very read (no second read).
    x = _array((40 * 4, 8), "f8")  # 40 slabs of 4 rows, one partition
    s = from_zarr(_write(os.path.join(tmp, "x.zarr"), x, (4, 8)), partitions=1, prefetch=1)
    try:
        wait_until(lambda: [st["end"] for st in _part_states(client, s.name)] == [1])
        (owner,) = _runs(client, s.name)
        epoch = _runs(client, s.name)[owner]["epoch"]
        parts = client.run(_take_on_owner, s.name, epoch, [[0, 35, [1, 3]], [0, 20, [0, 4]]], workers=[owner])[owner]
        np.testing.assert_array_equal(parts[0], x[35 * 4 + 1 : 35 * 4 + 3])
        np.testing.assert_array_equal(parts[1], x[20 * 4 : 21 * 4])
        (st,) = _part_states(client, s.name)
        assert st["early_reads"] == 2, st  # slabs 20 and 35, read for the take
        np.testing.assert_array_equal(np.concatenate(list(s.batches(4))), x)  # in order, all of it
        (st,) = _part_states(client, s.name)
        assert st["end"] == 40 and st["early"] == 0
        assert st["reads"] == 40, st  # each slab once: the broker appended the early reads
    finally:
        aimss_dask.destroy_stream(s.name)


def test_plain_reads_are_not_stuck_behind_a_small_window(client, tmp):
    x = _array((40, 2), "i4")
    s = from_zarr(_write(os.path.join(tmp, "x.zarr"), x, (2, 2)), partitions=2, prefetch=1)
    try:
        # No group: nothing ever commits, yet a reader at the end of the window
        # gets the next record.
        got = list(s.read(partition=0, timeout=30))
        assert len(got) == 10
        got = list(s.read(partition=1, group="r", timeout=30))
        assert len(got) == 10
    finally:
        aimss_dask.destroy_stream(s.name)


# -- errors and lifecycle ----------------------------------------------------------------------


def test_missing_path_raises_before_any_stream(client, tmp):
    before = aimss_dask.status()
    missing = os.path.join(tmp, "nope.zarr")
    with pytest.raises(aimss_dask.StoreNotFoundError, match=re.escape(missing)) as e:
        from_zarr(missing, name=unique_name("missing"))
    assert isinstance(e.value, FileNotFoundError)
    group = zarr.open_group(os.path.join(tmp, "g.zarr"), mode="w")
    group.create_array("x", shape=(4,), chunks=(2,), dtype="i8")
    with pytest.raises(aimss_dask.StoreNotFoundError, match="component 'y'"):
        from_zarr(os.path.join(tmp, "g.zarr"), component="y")
    with pytest.raises(aimss_dask.InvalidArgumentError, match=r"is a group.*\(arrays: 'x'\)"):
        from_zarr(os.path.join(tmp, "g.zarr"))
    with pytest.raises(aimss_dask.InvalidArgumentError, match="prefetch=0"):
        from_zarr(os.path.join(tmp, "g.zarr"), component="x", prefetch=0)
    after = aimss_dask.status()
    assert [st["streams"] for st in after.values()] == [st["streams"] for st in before.values()]
    s = from_zarr(group, component="x")  # a group object with a component works
    try:
        with pytest.raises(aimss_dask.InvalidArgumentError, match="batch_size=0"):
            s.batches(0)
        np.testing.assert_array_equal(np.concatenate(list(s.batches(3))), np.zeros(4, "i8"))
    finally:
        aimss_dask.destroy_stream(s.name)
    plain = aimss_dask.create_stream(unique_name("plain"))
    try:
        with pytest.raises(aimss_dask.StreamNotFoundError, match="not a Zarr source"):
            plain.batches(2)
    finally:
        aimss_dask.destroy_stream(plain.name)


def test_group_error_lists_nested_arrays_and_how_to_open_them(client, tmp):
    """A group names every array under it, at any depth, as ``component=`` takes them."""
    path = os.path.join(tmp, "nested.zarr")
    root = zarr.open_group(path, mode="w")
    grp = root.create_group("grp")
    grp.create_array("arr", shape=(6,), chunks=(3,), dtype="f8")[:] = np.arange(6.0)
    grp.create_group("empty")
    before = aimss_dask.status()
    cases = [
        # (store, component, arrays as component= takes them with that store, path hint)
        (path, None, ["grp/arr"], f"{path}/grp/arr"),
        (path, "grp", ["grp/arr"], f"{path}/grp/arr"),
        (f"{path}/grp", None, ["arr"], f"{path}/grp/arr"),
        (root, None, ["grp/arr"], None),
        (root["grp"], None, ["arr"], None),
    ]
    for store, component, arrays, hint in cases:
        with pytest.raises(aimss_dask.InvalidArgumentError, match="is a group, not an array") as e:
            from_zarr(store, component=component)
        msg = str(e.value)
        assert f"(arrays: {', '.join(map(repr, arrays))})" in msg, msg
        assert f"component={arrays[0]!r}" in msg, msg
        assert (f"or its path {hint!r}" in msg) if hint else ("or its path" not in msg), msg
        # ... and what the message says to pass opens the array.
        s = from_zarr(store, component=arrays[0])
        try:
            np.testing.assert_array_equal(np.concatenate(list(s.read())), np.arange(6.0))
        finally:
            aimss_dask.destroy_stream(s.name)
        if hint:
            s = from_zarr(hint)
            aimss_dask.destroy_stream(s.name)
    with pytest.raises(aimss_dask.InvalidArgumentError, match=r"grp/empty' is a group with no array under it"):
        from_zarr(path, component="grp/empty")
    with pytest.raises(aimss_dask.InvalidTypeError, match=r"component=3 is an int, not a str") as e:
        from_zarr(path, component=3)
    assert isinstance(e.value, TypeError)
    for arg in ("partitions", "prefetch"):
        with pytest.raises(aimss_dask.InvalidTypeError, match=rf"{arg}='2' is a str, not an int; give an int >= 1"):
            from_zarr(path, component="grp/arr", **{arg: "2"})
    after = aimss_dask.status()
    assert [st["streams"] for st in after.values()] == [st["streams"] for st in before.values()]


def test_brokers_stop_after_destroy_and_when_the_client_leaves(client, cluster, tmp):
    x = _array((64, 8), "f4")
    path = _write(os.path.join(tmp, "x.zarr"), x, (2, 8))
    s = from_zarr(path, partitions=2, prefetch=1)  # 16 slabs per partition: brokers wait
    wait_until(lambda: sum(len(v) for v in client.run(_live_broker_tasks, s.name).values()) == 2)
    aimss_dask.destroy_stream(s.name)
    assert not any(client.run(_live_broker_tasks, s.name).values())
    assert not any(client.run(_worker_runs).values())
    with pytest.raises(aimss_dask.StreamNotFoundError):
        s.batches(4)

    with Client(cluster) as other, other.as_current():
        s2 = from_zarr(path, partitions=2, prefetch=1)
        wait_until(lambda: sum(len(v) for v in client.run(_live_broker_tasks, s2.name).values()) == 2)
    # The creating client left: its stream is destroyed and its brokers stop.
    wait_until(lambda: not any(client.run(_live_broker_tasks, s2.name).values()), what="brokers stop")
    wait_until(lambda: not any(client.run(_worker_runs).values()), what="runs forgotten")


def test_store_removed_while_loading_raises_on_read(client, tmp):
    import shutil

    x = _array((40, 4), "f8")
    path = _write(os.path.join(tmp, "x.zarr"), x, (2, 4))
    s = from_zarr(path, partitions=1, prefetch=1)
    try:
        shutil.rmtree(path)
        with pytest.raises(aimss_dask.StoreNotFoundError, match=re.escape(path)):
            list(s.batches(4))
    finally:
        aimss_dask.destroy_stream(s.name)


def test_an_array_of_a_group_removed_while_loading_raises_on_read_not_zeros(client, tmp):
    """The group's folder stays, the array's goes: Zarr would read its chunks as fill values."""
    import shutil

    x = _array((40, 4), "f8") + 1.0  # no zero anywhere: zeros would be the fill value
    group = zarr.open_group(os.path.join(tmp, "g.zarr"), mode="w")
    group.create_array("train", shape=x.shape, chunks=(2, 4), dtype="f8")[:] = x
    s = from_zarr(os.path.join(tmp, "g.zarr"), component="train", partitions=1, prefetch=1)
    try:
        shutil.rmtree(os.path.join(tmp, "g.zarr", "train"))
        with pytest.raises(aimss_dask.StoreNotFoundError, match="train"):
            list(s.batches(4))
    finally:
        aimss_dask.destroy_stream(s.name)


def test_an_array_removed_from_a_store_that_is_not_a_local_folder_raises_not_zeros(client, tmp):
    """An fsspec store (as on an object store): its chunks gone, Zarr reads fill values; the source refuses."""
    import shutil

    import fsspec
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
    from zarr.storage import FsspecStore

    x = _array((40, 4), "f8") + 1.0  # no zero anywhere: zeros would be the fill value
    path = os.path.join(tmp, "remote.zarr")
    fs = AsyncFileSystemWrapper(fsspec.filesystem("file", auto_mkdir=True), asynchronous=True)
    store = FsspecStore(fs, path=path)
    arr = zarr.create_array(store, shape=x.shape, chunks=(2, 4), dtype="f8")
    arr[:] = x
    # Read whole while it is there ...
    s = from_zarr(arr, partitions=1, prefetch=1)
    try:
        np.testing.assert_array_equal(np.concatenate(list(s.batches(4))), x)
    finally:
        aimss_dask.destroy_stream(s.name)
    # ... and refused once it is gone.
    s = from_zarr(arr, partitions=1, prefetch=1)
    try:
        shutil.rmtree(path)
        with pytest.raises(aimss_dask.StoreNotFoundError, match="is gone from"):
            list(s.batches(4))
    finally:
        aimss_dask.destroy_stream(s.name)


def test_the_store_counts_threads_parked_in_wait(tmp):
    """``LogStore.waiting``: the public count the brokers read as "a reader waits".

    It replaced ``threading.Condition._waiters``: only a thread that blocks
    counts, and it stops counting when it returns.
    """
    import threading

    from aimss_dask.log.store import LogStore

    store = LogStore(budget=2**20, spill_root=os.path.join(tmp, "spill"))
    try:
        store.open("w", 1, [0])
        store.append("w", 1, 0, [b"x"], [1])
        assert store.wait("w", 1, 0, 0, timeout=5) is True  # ready: never parked
        assert store.waiting == 0
        assert store.wait("w", 1, 0, 1, timeout=0.01) is False  # timed out
        assert store.waiting == 0

        results: list[bool] = []
        readers = [
            threading.Thread(target=lambda: results.append(store.wait("w", 1, 0, 1, timeout=30)))
            for _ in range(2)
        ]
        for t in readers:
            t.start()
        wait_until(lambda: store.waiting == 2, what="two parked readers")
        store.append("w", 1, 0, [b"y"], [1])
        for t in readers:
            t.join(timeout=10)
        assert results == [True, True]
        assert store.waiting == 0
    finally:
        store.close()


def _read_in_task(name: str, p: int) -> tuple[str, int]:
    from distributed import get_worker

    return get_worker().address, len(list(aimss_dask.get_stream(name).read(partition=p, timeout=30)))


def test_a_task_reading_on_the_owner_is_not_stuck_behind_a_small_window(client, tmp):
    """As above, with the reader a task thread parked in the owner's ``LogStore.wait``.

    The broker sees it through ``LogStore.waiting`` (it read
    ``threading.Condition._waiters`` before).
    """
    x = _array((40, 2), "i4")
    s = from_zarr(_write(os.path.join(tmp, "x.zarr"), x, (2, 2)), partitions=1, prefetch=1)
    try:
        (owner,) = s.info()["owners"]
        fut = client.submit(_read_in_task, s.name, 0, workers=[owner], allow_other_workers=False, pure=False)
        assert fut.result(timeout=60) == (owner, 20)
    finally:
        aimss_dask.destroy_stream(s.name)


def test_a_killed_owner_fails_the_loader_by_name_and_leaves_the_survivors_clean(tmp):
    """A source keeps one copy (``OnLoss.FAIL``): a worker killed mid-epoch is a named error, never a hang."""
    import signal
    import threading

    from conftest import assert_workers_clean
    from distributed import LocalCluster

    x = _array((512, 256), "f8")  # 1 MiB in 128 slabs: the brokers are still reading at the kill
    path = _write(os.path.join(tmp, "x.zarr"), x, (4, 256))
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS())
        s = from_zarr(path, partitions=2, prefetch=1)
        it = s.batches(8)
        np.testing.assert_array_equal(next(it), x[:8])
        victim = s.spec.owners[1]
        os.kill(c.run(os.getpid)[victim], signal.SIGKILL)
        got: list = []

        def drain() -> None:
            try:
                for b in it:
                    got.append(b)
            except Exception as e:  # what the loader raised
                got.append(e)

        t0, wall0 = time.monotonic(), time.time()
        t = threading.Thread(target=drain, daemon=True)
        t.start()
        t.join(120)
        assert not t.is_alive(), "the loader hung after its broker's worker died"
        took = time.monotonic() - t0
        # Promptly once the scheduler knows: closing does not wait out a
        # connect to the dead owner (Dask's 30 s). Until the scheduler
        # notices the loss, nothing tells a dead owner from a slow one.
        removed = [t for t, e in c.get_events(victim) if e.get("action") == "remove-worker"]
        assert removed, f"the scheduler never removed the killed worker {victim}"
        noticed = removed[0] - wall0
        assert took - max(noticed, 0.0) < 15, (
            f"the loader took {took:.1f} s to fail; the scheduler removed the dead owner after {noticed:.1f} s"
        )
        err = got[-1]
        assert isinstance(err, aimss_dask.PartitionLostError), err
        assert s.name in str(err)
        # Every batch it did hand out is exact.
        for i, b in enumerate(got[:-1], start=1):
            np.testing.assert_array_equal(b, x[8 * i : 8 * (i + 1)])
        aimss_dask.destroy_stream(s.name)
        wait_until(lambda: not any(c.run(_worker_runs).values()), what="runs forgotten")
        assert_workers_clean(aimss_dask.status())


def test_a_loader_asking_to_retain_while_a_trim_runs_is_refused():
    """The broker counts records trimmed from the moment it starts the trim.

    The trim runs in a thread while the loop goes on: a loader attaching in
    ``retain`` mode meanwhile was told every record is kept, then found
    the trimmed ones gone when it read them.
    """
    import threading

    from aimss_dask.core.errors import InvalidOffsetError
    from aimss_dask.core.specs import StreamSpec
    from aimss_dask.source.broker import SourceRun

    started, go = threading.Event(), threading.Event()
    trims: list[tuple[int, int]] = []

    class Store:
        budget = 2**30

        def trim(self, name, epoch, p, upto):
            started.set()
            assert go.wait(10), "the test never let the trim finish"
            trims.append((p, upto))

    class Plugin:
        store = Store()

    spec = StreamSpec(name="src", partitions=1, owners=("tcp://a:1",), epoch=1)
    source = {"where": "/nowhere", "rows": 40, "slab_rows": 4, "slab_nbytes": 32}
    run = SourceRun(Plugin(), spec, source, [0])
    st = run.parts[0]
    st.end, st.low = 6, 4  # six slabs appended, every consumer past four

    async def main():
        trim = asyncio.ensure_future(run._trim(st))
        assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        with pytest.raises(InvalidOffsetError, match=r"partition 0 was already trimmed below offset 4"):
            run.control("attach", None, "retain", None)
        assert not run.retain
        go.set()
        await trim

    asyncio.run(main())
    assert trims == [(0, 4)] and st.start == 4
