"""A push task that Dask runs twice leaves one copy of its input (issue 18, item 2; plan §2.8).

On the real multi-process cluster of ``conftest``. Each test takes the graph
an operator builds and adds, for its push tasks, a second task under another
key that runs the very same push: Dask gives every task execution its own
run id, so the copies carry another attempt, as a re-run after a lost
worker or a second execution of a key would. The owners must keep one copy
of each input's records per partition, whichever arrives first, and the
results must equal pandas / NumPy. Both pushes reach the owners through
every path: the data plane, local appends (an owner pushing to itself) and,
in the ``dask`` transport test, Dask's comms.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import assert_workers_clean, make_cluster, unique_name
from dask.dataframe.utils import make_meta
from dask.task_spec import Task, TaskRef
from distributed import Client, wait

import aimss_dask
from aimss_dask.core.errors import DuplicateOriginError
from aimss_dask.core.names import PARTITION_TASK_PREFIX
from aimss_dask.core.specs import Origin
from aimss_dask.ops import pushrun
from aimss_dask.ops.pushrun import RunWriter
from aimss_dask.shuffle import _tasks, partitioning
from aimss_dask.shuffle.dataframe import _run

#: A graph that hangs fails here instead of stalling the suite.
TIMEOUT = 120


# -- helpers --------------------------------------------------------------------------


def _duplicates() -> int:
    """Groups dropped as copies by every worker so far."""
    return sum(st["reads"]["duplicates"] for st in aimss_dask.status().values())


def _is_push(key: Any) -> bool:
    return isinstance(key, tuple) and str(key[0]).startswith("aimss-push-")


def _push_twice(graph: dict[Any, Any], barrier: str, after: bool = False) -> int:
    """Add a second execution of every push task of ``graph``, under another key.

    The barrier waits for both. ``after``: each copy runs once its original
    is done (else Dask runs them in any order, concurrently too). Returns
    the number of pushes doubled.
    """
    pushes = [k for k in graph if _is_push(k)]
    assert pushes, "no push task in the graph"
    copies = []
    for k in pushes:
        t = graph[k]
        copy = (f"{k[0]}-again", *k[1:])
        extra = (TaskRef(k),) if after else ()
        graph[copy] = Task(copy, _then, t.func, *extra, *t.args, n_after=len(extra), **t.kwargs)
        copies.append(copy)
    seal = graph[barrier]
    graph[barrier] = Task(barrier, seal.func, *seal.args, *(TaskRef(c) for c in copies), **seal.kwargs)
    return len(pushes)


def _then(func: Any, *args: Any, n_after: int = 0, **kwargs: Any) -> Any:
    """``func(*args[n_after:])``: the first ``n_after`` arguments only order the task."""
    return func(*args[n_after:], **kwargs)


def _shards(frame: pd.DataFrame, on: list[str], n: int) -> int:
    """Non-empty shards (groups pushed) of one input partition."""
    if len(frame) == 0:
        return 0
    return len(np.unique(partitioning.partition_index(frame, on, n, None, np.empty)))


def _shuffle_graph(frames: list[dd.DataFrame], on: list[str], n: int, how: str | None = None):
    """The graph of a shuffle (one frame) or an inner merge (two), its barrier and output keys."""
    names, token, sealed, _ = _run(frames, [on] * len(frames), n, [None] * len(frames))
    graph = dict(sealed.__dask_graph__())
    metas = [make_meta(f) for f in frames]
    out = []
    for j in range(n):
        key = (f"{PARTITION_TASK_PREFIX}{token}", names[0], j)
        if how is None:
            graph[key] = Task(key, _tasks.read, names[0], j, metas[0], TaskRef(sealed.key))
        else:
            graph[key] = Task(
                key, _tasks.join, names, j, tuple(metas), {"how": how, "on": on}, TaskRef(sealed.key)
            )
        out.append(key)
    return graph, sealed.key, out


def _get(client: Client, graph: dict[Any, Any], keys: Any) -> Any:
    futures = client.get(graph, keys, sync=False)
    wait(futures, timeout=TIMEOUT)
    return client.gather(futures)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


def _frame(rows: int = 2000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"k": rng.integers(0, 300, rows), "v": np.arange(rows, dtype="f8")})


# -- shuffle and merge ------------------------------------------------------------------


@pytest.mark.parametrize("after", [False, True])
def test_a_shuffle_push_run_twice_keeps_one_copy_of_each_shard(client, after):
    """Every push twice: the output has each row once, and each copy shard was dropped."""
    pdf = _frame()
    df = dd.from_pandas(pdf, npartitions=5)
    n = 7
    graph, barrier, out = _shuffle_graph([df], ["k"], n)
    assert _push_twice(graph, barrier, after) == 5
    before = _duplicates()
    parts = _get(client, graph, out)
    got = pd.concat(parts)
    assert not got.duplicated().any()
    pd.testing.assert_frame_equal(_sorted(got), _sorted(pdf))
    # Each output partition holds its keys only: nothing was misplaced.
    for j, part in enumerate(parts):
        assert set(partitioning.partition_index(part, ["k"], n, None, np.empty)) <= {j}
    # One group per shard of the second copy: every one of them dropped.
    expected = sum(_shards(df.partitions[i].compute(), ["k"], n) for i in range(5))
    assert _duplicates() - before == expected
    assert_workers_clean(aimss_dask.status())


def test_a_seal_never_seals_a_stream_newer_than_its_create_made(client):
    """A seal still running from before a restart must not end the new run's stream.

    It did: it looked the stream up by name, sealed the restarted run's
    empty stream, and the new pushes then met a sealed stream.
    """
    from distributed import Reschedule

    name = unique_name("seal-epoch")
    s = aimss_dask.create_stream(name, partitions=2)
    made = s.spec.epoch
    stale = pushrun.StreamName(name, made - 1)
    assert pickle.loads(pickle.dumps(stale)).epoch == made - 1
    with pytest.raises(Reschedule):
        pushrun.seal([stale], 1, 2)
    assert not s.info()["sealed"]
    # A push whose result came from an execution that wrote to an older
    # stream of the run: not sealed either (the coordinator computes it again).
    old_push = pushrun.Pushed(5, {name: made - 1}, ("aimss-push-x", 0, 1))
    assert pickle.loads(pickle.dumps(old_push)).epochs == {name: made - 1}
    with pytest.raises(Reschedule):
        pushrun.seal([pushrun.StreamName(name, made)], 1, old_push)
    assert not s.info()["sealed"]
    ok = pushrun.Pushed(5, {name: made}, ("aimss-push-x", 0, 1))
    assert pushrun.seal([pushrun.StreamName(name, made)], 1, 2, ok) == 8
    assert s.info()["sealed"]
    aimss_dask.destroy_stream(name)


def test_a_merge_push_run_twice_equals_pandas(client):
    """Both sides pushed twice: each side's ids go into their own stream (per-side ids)."""
    left = _frame(1500, seed=1)
    right = pd.DataFrame({"k": np.arange(0, 300, 2), "w": np.arange(150)})
    frames = [dd.from_pandas(left, npartitions=4), dd.from_pandas(right, npartitions=3)]
    n = 5
    graph, barrier, out = _shuffle_graph(frames, ["k"], n, how="inner")
    assert _push_twice(graph, barrier) == 7
    before = _duplicates()
    got = pd.concat(_get(client, graph, out))
    want = left.merge(right, on="k", how="inner")
    assert len(got) == len(want)
    pd.testing.assert_frame_equal(_sorted(got), _sorted(want))
    expected = sum(
        _shards(f.partitions[i].compute(), ["k"], n) for f in frames for i in range(f.npartitions)
    )
    assert _duplicates() - before == expected
    assert_workers_clean(aimss_dask.status())


def _partial_push(df, names, side, on, npartitions, cast, input_id, layout, keep) -> int:
    """A push that stopped half-way: only the shards of partitions in ``keep`` got out."""
    writer = RunWriter(names[side], input_id)
    index = partitioning.partition_index(df, on, npartitions, cast, np.empty)
    for j, shard in partitioning.split(df, index, npartitions):
        if j in keep:
            writer.write(shard, j)
    return 0


def test_a_rerun_completes_an_interrupted_push_and_keeps_its_first_copies(client):
    """The first attempt reached some partitions only; its re-run fills in the rest.

    The partial copies came first, so they are the ones kept (first commit
    wins, per partition); the re-run's copies of those partitions are
    dropped, its others stored: every row once.
    """
    pdf = _frame(1200, seed=2)
    df = dd.from_pandas(pdf, npartitions=3)
    n = 6
    keep = {0, 2, 3}
    graph, barrier, out = _shuffle_graph([df], ["k"], n)
    pushes = [k for k in graph if _is_push(k)]
    for k in pushes:
        t = graph[k]
        first = (f"{k[0]}-interrupted", *k[1:])
        # The same arguments as the push (frame, names, side, on, n, cast, id).
        graph[first] = Task(first, _partial_push, *t.args, keep)
        # The real push runs after the interrupted one: a re-run.
        graph[k] = Task(k, _then, t.func, TaskRef(first), *t.args, n_after=1)
    before = _duplicates()
    got = pd.concat(_get(client, graph, out))
    assert not got.duplicated().any()
    pd.testing.assert_frame_equal(_sorted(got), _sorted(pdf))
    expected = 0
    for i in range(3):
        frame = df.partitions[i].compute()
        expected += len(set(partitioning.partition_index(frame, ["k"], n, None, np.empty)) & keep)
    assert expected > 0
    assert _duplicates() - before == expected
    assert_workers_clean(aimss_dask.status())


def test_copies_over_dask_comms_are_dropped_too():
    """``transport="dask"`` (TLS and other transports): origins travel in ``aimss_append``."""
    with make_cluster(2) as cluster, Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS(transport="dask"))
        pdf = _frame(1000, seed=3)
        df = dd.from_pandas(pdf, npartitions=4)
        graph, barrier, out = _shuffle_graph([df], ["k"], 4)
        _push_twice(graph, barrier)
        before = _duplicates()
        got = pd.concat(_get(c, graph, out))
        pd.testing.assert_frame_equal(_sorted(got), _sorted(pdf))
        assert _duplicates() > before
        st = aimss_dask.status()
        assert not any("pool_bytes" in w for w in st.values())  # really Dask's comms
        assert_workers_clean(st)


# -- rechunk and the zarr push sink ---------------------------------------------------------


def test_a_rechunk_push_run_twice_equals_numpy(client):
    """Each output chunk assembled from one copy of each piece (read_block checks the count)."""
    data = np.arange(60 * 44, dtype="i8").reshape(60, 44)
    x = da.from_array(data, chunks=(13, 44))
    y = aimss_dask.rechunk(x, (60, 10))
    graph = dict(y.__dask_graph__())
    barrier = next(k for k in graph if isinstance(k, str) and k.startswith("aimss-seal-"))
    pushed = _push_twice(graph, barrier)
    assert pushed == x.npartitions
    before = _duplicates()
    keys = [(y.name, 0, j) for j in range(y.numblocks[1])]
    got = np.concatenate(_get(client, graph, keys), axis=1)
    np.testing.assert_array_equal(got, data)
    # Each input block sends one piece to each of the 5 output chunks.
    assert _duplicates() - before == x.npartitions * y.npartitions
    assert_workers_clean(aimss_dask.status())


@pytest.mark.parametrize("persist", [False, True])
def test_a_zarr_push_run_twice_writes_the_array_once(client, tmp_path, persist):
    """Units assembled from one copy of each block's pieces: no error, no hang, the array.

    Persisted, a push task takes several blocks (one group per worker
    thread): each block's pieces carry its own flat index.
    """
    x = da.random.default_rng(5).random((3000, 40), chunks=(700, 40))
    want = x.compute()
    if persist:
        x = x.persist()
    path = str(tmp_path / "a.zarr")
    delayed = aimss_dask.to_zarr(x, path, chunks=(1024, 40), compute=False)
    graph = dict(delayed.__dask_graph__())
    barrier = next(k for k in graph if isinstance(k, str) and k.startswith("aimss-seal-"))
    _push_twice(graph, barrier)
    before = _duplicates()
    assert _get(client, graph, delayed.key) == want.nbytes
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], want)
    assert not [f for _, _, fs in os.walk(path) for f in fs if f.endswith(".partial")]
    # Every block's pieces once more: 5 blocks of 700 rows over 3 units of 1024.
    pieces = sum(
        len({a // 1024, (b - 1) // 1024}) for a, b in ((i, min(i + 700, 3000)) for i in range(0, 3000, 700))
    )
    assert _duplicates() - before == pieces
    del x
    assert_workers_clean(aimss_dask.status())


# -- what is not filtered, and what is refused ----------------------------------------------


def _write_with_origins(name: str) -> None:
    from aimss_dask.api.context import current

    spec = aimss_dask.get_stream(name).spec
    producer = current().producer
    for attempt in (1, 2):  # two attempts of one input: copies, for a run's stream
        producer.write(spec, 0, np.array([attempt]), origin=Origin(0, attempt))
    aimss_dask.get_stream(name).flush()


def test_a_plain_stream_keeps_every_write_origins_or_not(client):
    """A user's stream is at-least-once: repeated records, even with origins, all stored."""
    name = unique_name("plain-dups")
    s = aimss_dask.create_stream(name, partitions=2)
    before = _duplicates()
    for _ in range(2):
        s.write(np.array([7]), partition=1)
    client.gather(client.map(_write_with_origins, [name] * 2, pure=False))
    s.seal()
    assert sorted(int(r[0]) for r in s.read(partition=1)) == [7, 7]
    assert sorted(int(r[0]) for r in s.read(partition=0)) == [1, 1, 2, 2]
    assert _duplicates() == before
    aimss_dask.destroy_stream(name)


def _write_twice(name: str) -> str:
    writer = RunWriter(name, 0)
    writer.write(np.ones(3), 0)
    try:
        writer.write(np.ones(3), 0)
    except DuplicateOriginError as e:
        return str(e)
    return ""


def test_an_input_writing_a_partition_twice_is_refused_in_its_task(client):
    """One record per (input, partition): a second one would be dropped as a copy on a re-run."""
    name = unique_name("twice")
    aimss_dask.create_stream(name, partitions=1)
    message = client.submit(_write_twice, name, pure=False).result()
    assert "wrote partition 0 twice" in message
    aimss_dask.destroy_stream(name)


def test_a_create_that_dask_no_longer_wants_registers_nothing(client):
    """An execution of a create task that Dask gave up on must not leave streams behind.

    (A finished run restarted for a lost output, then not wanted any more:
    its create ran on and registered a stream nobody freed.)
    """
    from aimss_dask.api.context import current
    from aimss_dask.core.runs import RunSpec

    name = unique_name("orphan")
    spec = RunSpec(run_id=name, streams=(name,), create=f"aimss-create-{name}")
    ep = current("test")
    with pytest.raises(aimss_dask.StreamNotFoundError, match="no longer wanted"):
        ep.scheduler_op("run_register", run=spec.to_wire(), partitions=2, task=spec.create)
    with pytest.raises(aimss_dask.StreamNotFoundError):
        aimss_dask.get_stream(name)
    # The client's own registrations (no task) are not affected.
    reply = ep.scheduler_op("run_register", run=spec.to_wire(), partitions=2)
    assert reply["created"]
    aimss_dask.destroy_stream(name)
