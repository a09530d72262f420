"""Pure splitting and joining of partitions (no cluster)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimss_dask.shuffle import partitioning as part


def _frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "key": rng.integers(-5, 5, n),
            "f": rng.random(n),
            "t": pd.to_datetime(rng.integers(0, 10**18, n)),
            "u": rng.integers(0, 2**63, n, dtype=np.uint64),
            "d": pd.to_timedelta(rng.integers(0, 10**12, n)),
        },
        index=pd.Index(rng.integers(0, 10**9, n), name="row"),
    )
    df.loc[df.index[::7], "f"] = np.nan
    return df


def test_packable_only_for_8_byte_numpy_columns_and_index():
    assert part.packable(_frame(0))
    assert not part.packable(_frame(0).assign(s=pd.Series([], dtype="string")))
    assert not part.packable(_frame(0).assign(b=pd.Series([], dtype=bool)))
    assert not part.packable(_frame(0).assign(i=pd.Series([], dtype="Int64")))
    assert not part.packable(_frame(0).set_index(["key", "u"]))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), npartitions=st.integers(1, 20), seed=st.integers(0, 2**16), lean=st.booleans())
def test_packed_split_then_unpack_keeps_every_row_and_dtype(n, npartitions, seed, lean):
    df = _frame(n, seed)
    index = part.partition_index(df, ["key"], npartitions)
    packed = part.split_packed(df, index, npartitions, lean=lean)
    plain = part.split(df, index, npartitions)
    assert [j for j, _ in packed] == [j for j, _ in plain]
    meta = df.iloc[:0]
    for (_, shard), (_, want) in zip(packed, plain):
        got = part.unpack([shard], meta)
        pd.testing.assert_frame_equal(got, want)  # same rows, order, dtypes, index
    # All shards of one output partition together, as the reader sees them.
    if packed:
        pd.testing.assert_frame_equal(
            part.unpack([s for _, s in packed], meta),
            pd.concat([s for _, s in plain]),
        )


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 300), npartitions=st.integers(1, 20), seed=st.integers(0, 2**16),
    only=st.sets(st.integers(0, 25)), ranged=st.booleans(),
)
def test_a_split_for_some_partitions_gives_exactly_their_shards(n, npartitions, seed, only, ranged):
    """A push run again for the partitions a recovery re-created splits
    only their rows: the same shards, row for row, as a whole split's."""
    df = _frame(n, seed)
    if ranged:
        df = df.reset_index(drop=True)
    index = part.partition_index(df, ["key"], npartitions)
    whole = dict(part.split_packed(df, index, npartitions))
    some = part.split_packed(df, index, npartitions, only=only)
    assert [j for j, _ in some] == sorted(j for j in whole if j in only)
    for j, shard in some:
        np.testing.assert_array_equal(shard, whole[j])
    plain = part.split(df, index, npartitions, only=only)
    assert [j for j, _ in plain] == [j for j, _ in some]


@pytest.mark.parametrize("lean", [False, True], ids=["packed", "lean"])
def test_split_takes_its_temporaries_from_the_allocator_it_is_given(lean):
    """A worker passes its scratch pool: the hash and the row buffers come
    from there (touched pages), and the result is the same as with NumPy's.
    ``lean`` (tight memory) gathers through one column instead of a packed
    copy of the input: one partition's rows of scratch, not two."""
    from aimss_dask.transport.dataplane import BufferPool

    df = _frame(5000, seed=3)
    pool = BufferPool(lambda: 1 << 30)
    asked: list[tuple[tuple[int, ...], object]] = []

    def alloc(shape, dtype):
        asked.append((shape, dtype))
        return pool.array(shape, dtype)

    index = part.partition_index(df, ["key"], 9, None, alloc)
    np.testing.assert_array_equal(index, part.partition_index(df, ["key"], 9))
    assert asked == [((5000,), np.uint64)]
    pooled = part.split_packed(df, index, 9, alloc, lean=lean)
    rows = ((5000, 6), np.uint64)
    # packed: packed rows, then gathered rows; lean: gathered rows and a column
    assert asked[1:] == ([rows, ((5000,), np.uint64)] if lean else [rows, rows])
    plain = part.split_packed(df, index, 9)
    assert [j for j, _ in pooled] == [j for j, _ in plain]
    for (_, a), (_, b) in zip(pooled, plain):
        np.testing.assert_array_equal(a, b)
    # The temporary went back to the pool; the gathered rows are the shards.
    assert pool.statistics()["pool_free_bytes"] >= (5000 * 8 if lean else 5000 * 6 * 8)


def test_packed_output_takes_shards_one_by_one_and_refuses_what_does_not_fit():
    df = _frame(300, seed=5)
    index = part.partition_index(df, ["key"], 4)
    shards = [s for _, s in part.split_packed(df, index, 4)]
    meta = df.iloc[:0]
    out = part.PackedOutput(meta, sum(len(s) for s in shards))
    assert not out.add(shards[0][:, :-1])  # another layout
    assert not out.add(shards[0].view(np.int64))  # another dtype
    assert not out.add(df)  # not a packed shard at all
    for s in shards:
        assert out.add(s)
    assert not out.add(shards[0][:1])  # one row too many
    assert out.filled == 300
    pd.testing.assert_frame_equal(out.frame(), part.unpack(shards, meta))
    with pytest.raises(ValueError, match="not a packed shard"):
        part.unpack([shards[0], shards[1][:, :-1]], meta)  # never dropped in silence
    # A partial fill gives the rows so far.
    partial = part.PackedOutput(meta, 300)
    assert partial.add(shards[1])
    pd.testing.assert_frame_equal(partial.frame(), part.unpack([shards[1]], meta))


def test_unpack_of_nothing_is_the_empty_meta():
    meta = _frame(0)
    assert part.unpack([], meta) is meta


def test_unpacked_frames_own_their_memory():
    df = _frame(50)
    (j, shard), *_ = part.split_packed(df, part.partition_index(df, ["key"], 1), 1)
    out = part.unpack([shard], df.iloc[:0])
    assert not any(np.shares_memory(out[c].to_numpy(), shard) for c in out.columns)


def test_split_keeps_each_keys_rows_together_and_in_input_order():
    df = _frame(200)
    idx = part.partition_index(df, ["key"], 4)
    for j, shard in part.split(df, idx, 4):
        assert (part.partition_index(shard, ["key"], 4) == j).all()
        positions = [df.index.get_loc(i) for i in shard.index]
        assert positions == sorted(positions)


def test_check_columns_names_the_missing_one():
    with pytest.raises(ValueError, match=r"\['nope'\] not in the frame"):
        part.check_columns(["a", "b"], ["a", "nope"])
