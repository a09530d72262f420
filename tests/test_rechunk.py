"""``aimss_dask.rechunk`` against NumPy, on the real cluster of conftest."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import assert_workers_clean as _clean
from conftest import chunking, speculation_client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aimss_dask
from aimss_dask.ops.pieces import block_pieces


def assert_workers_clean() -> None:
    _clean(aimss_dask.status())


@st.composite
def case(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(["f8", "i4", "u1", "c16", "bool", "M8[s]"]))
    return shape, dtype, draw(chunking(shape)), draw(chunking(shape))


@settings(max_examples=60, deadline=None)
@given(case())
def test_block_pieces_cover_every_element_once(c):
    shape, _, src, dst = c
    hits = np.zeros(shape, dtype=int)
    starts = [np.concatenate([[0], np.cumsum(ch)]) for ch in src]
    dstarts = [np.concatenate([[0], np.cumsum(ch)]) for ch in dst]
    for idx in np.ndindex(*(len(ch) for ch in src)):
        for out_idx, sl, rng in block_pieces(idx, src, dst):
            glob = tuple(slice(starts[a][i] + s.start, starts[a][i] + s.stop) for a, (i, s) in enumerate(zip(idx, sl)))
            hits[glob] += 1
            # the piece's place in its output chunk matches its global place
            for a, (j, (lo, hi)) in enumerate(zip(out_idx, rng)):
                assert dstarts[a][j] + lo == glob[a].start and dstarts[a][j] + hi == glob[a].stop
    assert (hits == 1).all()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=case())
def test_rechunk_equals_numpy(client, c):
    shape, dtype, src, dst = c
    rng = np.random.default_rng(0)
    a = (rng.random(shape) * 100).astype(dtype)
    x = da.from_array(a, chunks=src)
    y = aimss_dask.rechunk(x, dst)
    assert y.chunks == dst
    got = y.compute()
    assert got.dtype == a.dtype
    np.testing.assert_array_equal(got, a)
    assert_workers_clean()


def test_rechunk_feeds_further_computation(client):
    x = da.arange(200 * 300, dtype="f8").reshape(200, 300).rechunk((10, 300))
    y = aimss_dask.rechunk(x, (200, 30))
    assert float((y * 2).sum().compute()) == float(np.arange(200 * 300).sum() * 2)
    assert_workers_clean()


@pytest.mark.parametrize("chunks", [((5, 5),), ((3, 3), (4,)), "nope"])
def test_chunks_that_do_not_fit_the_shape(client, chunks):
    x = da.ones((10, 4), chunks=(5, 4))
    with pytest.raises(aimss_dask.InvalidArgumentError, match=r"do not|chunks") as info:
        aimss_dask.rechunk(x, chunks)
    assert isinstance(info.value, ValueError)
    assert_workers_clean()


def test_a_rechunk_to_one_chunk_keeps_its_barrier_through_dasks_fusion():
    """One output chunk: the barrier's one dependent would be fused with it under another key, and the
    coordinator, which follows the run by its barrier's key, could not recover or restart it."""
    x = da.ones((4, 4), chunks=2)
    y = aimss_dask.rechunk(x, (4, 4))
    (opt,) = dask.optimize(y)
    seals = [k for k in dict(opt.__dask_graph__()) if "seal" in str(k)]
    assert len(seals) == 1 and isinstance(seals[0], str) and seals[0].startswith("aimss-seal-"), seals


def test_rechunk_of_object_arrays_and_refusal_of_other_block_types(client):
    a = np.empty((6, 4), dtype=object)
    for i in range(6):
        for j in range(4):
            a[i, j] = {"cell": (i, j)}
    # Rows to columns: pieces for other workers are column slices, copied.
    got = aimss_dask.rechunk(da.from_array(a, chunks=(2, 4)), (6, 1)).compute()
    assert got.dtype == object and got.tolist() == a.tolist()
    masked = da.ma.masked_array(da.arange(8, chunks=4), mask=np.arange(8) % 2 == 0)
    with pytest.raises(aimss_dask.InvalidArgumentError, match=r"numpy.ma.*MaskedArray.*x.rechunk"):
        aimss_dask.rechunk(masked, 8)
    assert_workers_clean()


def test_rechunk_to_the_same_chunks_is_a_no_op(client):
    x = da.ones((10, 4), chunks=(5, 2))
    assert aimss_dask.rechunk(x, (5, 2)) is x




def _inspect_pieces(name: str, partition: int, shape, rows: int, sealed: int) -> tuple[str, list[tuple[int, bool]]]:
    """A push run's final task: this worker, and for each piece of its chunk,
    the input block it came from and whether it shares that block's memory."""
    from distributed import get_worker

    from aimss_dask.api import streams as api

    worker = get_worker()
    store = worker.plugins["aimss"].store
    blocks = {k[1]: v for k, v in worker.data.items() if isinstance(k, tuple) and k[0] == "inp-rechunk"}
    records, _, _ = store.read(name, None, partition, 0)
    out = []
    for dst, piece in records:
        i = dst[0][0] // rows
        out.append((i, i in blocks and bool(np.shares_memory(piece, blocks[i]))))
    del records, piece
    api.release_partition(name, partition)
    return worker.address, out


def _force_tight(on: bool) -> None:
    """On a worker: make the push tasks see a log past half its budget (or undo it)."""
    import importlib

    local = importlib.import_module("aimss_dask.ops.local")
    if not hasattr(local, "_real_memory_tight"):
        local._real_memory_tight = local.memory_tight
    local.memory_tight = (lambda extra=0: True) if on else local._real_memory_tight


@pytest.fixture
def client_without_speculation():
    """A client of its own cluster, speculation off: a worker found slow (this test's own input tasks on a
    loaded machine may flag one) gets no partitions and no pushes, and every piece here would be local:
    nothing left to compare. (The shared cluster forgets earlier tests' findings, not this test's.)
    """
    with speculation_client(enabled=False) as c:
        yield c


@pytest.mark.parametrize("tight", [False, True], ids=["room", "tight"])
def test_pieces_for_the_local_chunk_are_kept_as_views_of_the_block(client_without_speculation, tight):
    """Row to column chunks: every piece is strided. Pieces pushed on the
    worker that owns their chunk are stored as views of the block (no scratch
    copy, no fresh pages); the others crossed the network and share nothing.
    Once the log is tight, local pieces are copies: a view would keep the
    whole block alive while the log counts only the piece."""
    from distributed import get_task_stream, wait

    from aimss_dask.shuffle.array import push_run

    client = client_without_speculation

    # Pieces of 48 KB: the few bytes by which a record's size differs on
    # the wire and in memory must not make the barrier move partitions.
    rows = 8
    a = np.arange(64 * 6000, dtype="f8").reshape(64, 6000)
    x = da.from_array(a, chunks=(rows, 6000), name="inp-rechunk").persist()
    wait(x)
    new = ((64,), (750,) * 8)
    graph, out = push_run(x, new, _inspect_pieces, rows)
    client.run(_force_tight, tight)
    try:
        with get_task_stream() as ts:
            results = client.get(dict(graph), [(out, 0, j) for j in range(8)])
    finally:
        client.run(_force_tight, False)
    # Where each block's push ran (work stealing may move one off its block).
    pushed = {t["key"][1]: t["worker"] for t in ts.data if str(t["key"][0]).startswith("aimss-push-")}
    assert sorted(pushed) == list(range(8))
    pieces = [(pushed[i] == owner, shared) for owner, chunk in results for i, shared in chunk]
    assert len(pieces) == 8 * 8  # every piece of every block, each stored once
    assert 0 < sum(local for local, _ in pieces) < len(pieces)  # some crossed, some did not
    if tight:
        assert not any(shared for _, shared in pieces), results
    else:
        assert [shared for local, shared in pieces] == [local for local, _ in pieces], results
    np.testing.assert_array_equal(aimss_dask.rechunk(x, new).compute(), a)
