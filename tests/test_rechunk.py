"""``aimss_dask.rechunk`` against NumPy, on the real cluster of conftest."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aimss_dask
from aimss_dask.shuffle.partitioning import block_pieces

from conftest import assert_workers_clean as _clean
from conftest import chunking


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


def test_rechunk_to_the_same_chunks_is_a_no_op(client):
    x = da.ones((10, 4), chunks=(5, 2))
    assert aimss_dask.rechunk(x, (5, 2)) is x
