"""Integration tests of ``aimss_dask.shuffle`` and ``aimss_dask.merge``.

They run on the real multi-process LocalCluster of ``conftest`` (2 workers).
Expected results come from Dask itself: the inputs are computed with Dask
(``df.compute()``, which for instance turns object strings into pyarrow
strings) and, for joins, merged with pandas. Data sizes are small on purpose.
"""

from __future__ import annotations

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import assert_workers_clean, unique_name
from distributed import get_task_stream

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.api.runs import register_run
from aimss_dask.coordinator.placement import place_partitions
from aimss_dask.core.names import PARTITION_TASK_PREFIX
from aimss_dask.core.runs import RunSpec

#: These also run on a TLS cluster (conftest), the others on TCP only: the
#: data plane under TLS is the same code whatever the frame holds, so a
#: sample covers it (every column type, each join, empty inputs, placement).
ALSO_TLS = (
    "test_shuffle_column_types",
    "test_merge_how",
    "test_merge_with_empty_partitions_and_empty_side",
    "test_shuffle_with_empty_input_partitions",
    "test_read_tasks_run_on_partition_owners",
    "test_shuffle_streams_are_gone_after_compute",
)

NA = "<NA>"  # what a missing key value becomes in key sets (NaN != NaN in a set)


# -- helpers --------------------------------------------------------------------------


def ddf(pdf: pd.DataFrame, npartitions: int, **kwargs) -> dd.DataFrame:
    return dd.from_pandas(pdf, npartitions=npartitions, **kwargs)


def _keys(on: str | list[str]) -> list[str]:
    return [on] if isinstance(on, str) else list(on)


def key_set(frame: pd.DataFrame, on: str | list[str]) -> set[tuple]:
    """The distinct key tuples of ``frame``; NaN / NA / NaT all map to ``NA``."""
    keys = frame[_keys(on)].astype(object)
    keys = keys.where(keys.notna(), NA)
    return set(keys.itertuples(index=False, name=None))


def align_categories(got: pd.DataFrame, exp: pd.DataFrame) -> pd.DataFrame:
    """``got`` with each categorical column's categories in ``exp``'s order.

    Output partitions union their categories in another order than the input
    partitions do; the *set* of categories must be the same.
    """
    got = got.copy()
    for col in exp.columns:
        if isinstance(exp[col].dtype, pd.CategoricalDtype):
            assert isinstance(got[col].dtype, pd.CategoricalDtype), (col, got[col].dtype)
            assert set(got[col].cat.categories) == set(exp[col].cat.categories), col
            got[col] = got[col].cat.reorder_categories(exp[col].cat.categories)
    return got


def assert_clean() -> None:
    """No stream, no log memory, no spill file on any worker."""
    assert_workers_clean(aimss_dask.status())


def partitions(client, out: dd.DataFrame) -> list[pd.DataFrame]:
    """Every output partition, computed in one graph (so every one is released)."""
    return list(client.compute(out.to_delayed(), sync=True))


def check_shuffle(client, df: dd.DataFrame, on, npartitions=None) -> list[pd.DataFrame]:
    """Run ``shuffle`` and check its whole contract; returns the partitions."""
    exp = df.compute()
    out = aimss_dask.shuffle(df, on, npartitions=npartitions)
    n = df.npartitions if npartitions is None else npartitions
    assert out.npartitions == n
    # The collection's meta keeps the input's columns and dtypes.
    assert list(out.columns) == list(df.columns)
    assert out._meta.dtypes.equals(df._meta.dtypes)

    res = out.compute()
    assert_clean()  # the run's streams are released and destroyed at once
    assert list(res.columns) == list(exp.columns)
    assert res.dtypes.equals(exp.dtypes), (res.dtypes, exp.dtypes)
    assert res.index.dtype == exp.index.dtype
    assert res.index.name == exp.index.name
    assert len(res) == len(exp)
    # Every row, exactly once (the inputs have a unique index).
    assert exp.index.is_unique
    pd.testing.assert_frame_equal(align_categories(res, exp).sort_index(), exp.sort_index())

    parts = partitions(client, out)
    assert_clean()
    assert len(parts) == n
    assert sum(len(p) for p in parts) == len(exp)
    for p in parts:
        assert list(p.columns) == list(exp.columns)
        for col in exp.columns:
            if isinstance(exp[col].dtype, pd.CategoricalDtype):
                assert isinstance(p[col].dtype, pd.CategoricalDtype), col
            else:
                assert p[col].dtype == exp[col].dtype, (col, p[col].dtype, exp[col].dtype)
        assert p.index.dtype == exp.index.dtype
    # Every key value lives in exactly one output partition.
    owner: dict[tuple, int] = {}
    for j, p in enumerate(parts):
        for k in key_set(p, on):
            assert k not in owner, f"key {k} in output partitions {owner[k]} and {j}"
            owner[k] = j
    assert set(owner) == key_set(exp, on)
    return parts


def sort_all(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(list(frame.columns), na_position="last").reset_index(drop=True)


def check_merge(client, left: dd.DataFrame, right: dd.DataFrame, **kwargs) -> pd.DataFrame:
    """``aimss_dask.merge`` equals pandas' merge of the computed inputs, up to row order."""
    lpd, rpd = left.compute(), right.compute()
    out = aimss_dask.merge(left, right, **kwargs)
    npartitions = kwargs.pop("npartitions", None)
    if npartitions is None:
        npartitions = max(left.npartitions, right.npartitions)
    assert out.npartitions == npartitions
    got = out.compute()
    assert_clean()
    exp = lpd.merge(rpd, **kwargs)
    assert list(got.columns) == list(exp.columns)
    assert len(got) == len(exp)
    pd.testing.assert_frame_equal(sort_all(got), sort_all(exp))
    return got


def ranked(n: int, seed: int = 0) -> pd.DataFrame:
    """A frame with many column types; ``k`` has repeated int keys."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    return pd.DataFrame(
        {
            "k": rng.integers(0, 40, n),
            "f": rng.random(n),
            "s": [f"s{x % 23}" for x in i],
            "ni": pd.array([None if x % 9 == 0 else int(x % 13) for x in i], dtype="Int64"),
            "nb": pd.array([None if x % 7 == 0 else bool(x % 2) for x in i], dtype="boolean"),
            "t": pd.date_range("2024-03-30", periods=n, freq="37min", tz="Europe/Paris"),
        },
        index=pd.Index(i * 3 + 1, name="rid"),
    )


# -- packed split: the index ----------------------------------------------------------


@pytest.mark.parametrize(
    "index",
    [pd.RangeIndex(12), pd.RangeIndex(7, 43, 3), pd.RangeIndex(50, 26, -2), pd.Index(np.arange(12) ** 2 - 40)],
    ids=["range", "range-start-step", "range-negative-step", "int64"],
)
@pytest.mark.parametrize("lean", [False, True], ids=["packed", "lean"])
def test_packed_split_carries_the_index_without_materialising_a_range_index(index, lean):
    from aimss_dask.shuffle.partitioning import split_packed, unpack

    # A new index object per test: the parametrised one is shared, and the
    # comparison at the end of an earlier test caches its values.
    if isinstance(index, pd.RangeIndex):
        index = pd.RangeIndex(index.start, index.stop, index.step)
    else:
        index = pd.Index(np.asarray(index))
    df = pd.DataFrame({"k": np.arange(12) % 5, "x": np.linspace(0, 1, 12)}, index=index)
    shards = split_packed(df, (np.arange(12) * 7) % 3, 3, lean=lean)
    # np.asarray(RangeIndex) would cache 8 bytes a row on the input's index,
    # held as long as a persisted input lives. (Checked first: comparing
    # frames below materialises it.)
    assert "_data" not in getattr(df.index, "_cache", {})
    out = unpack([shard for _, shard in shards], df.iloc[:0])
    pd.testing.assert_frame_equal(out.sort_index(), df.sort_index(), check_index_type=False)


# -- shuffle: column types and keys ---------------------------------------------------


@pytest.mark.parametrize(
    "on",
    ["k", ["k"], "f", "s", "ni", "nb", "t", ["s", "nb"], ["k", "ni", "t"]],
    ids=["int", "int-list", "float", "string", "Int64", "boolean", "datetime-tz", "str+bool", "int+Int64+tz"],
)
def test_shuffle_column_types(client, on):
    df = ddf(ranked(600), 5)
    check_shuffle(client, df, on, npartitions=7)


def test_shuffle_keeps_a_custom_string_index(client):
    pdf = ranked(300).reset_index()
    pdf.index = pd.Index([f"row-{i:04d}" for i in range(len(pdf))], name="label")
    df = dd.from_pandas(pdf, npartitions=4, sort=False)
    parts = check_shuffle(client, df, "k", npartitions=3)
    assert all(p.index.name == "label" for p in parts)


def test_shuffle_categorical_with_differing_categories_per_partition(client):
    # Sorted by "s", each input partition holds different values, so the
    # unknown categories of each input partition differ.
    pdf = ranked(500).sort_values("s")
    df = dd.from_pandas(pdf, npartitions=4, sort=False)
    df = df.assign(c=df["s"].astype("category"), k=df["k"])
    computed = [d.c.cat.categories.tolist() for d in dask.compute(*df.to_delayed())]
    assert len({tuple(c) for c in computed}) > 1  # the premise of the test
    # Key on the categorical column, and keep one as a plain column.
    check_shuffle(client, df, "c", npartitions=6)
    check_shuffle(client, df, "k", npartitions=6)


def test_shuffle_known_categorical_key(client):
    pdf = ranked(300)
    pdf["c"] = pd.Categorical(pdf["s"], categories=sorted(set(pdf["s"])) + ["unused"])
    df = ddf(pdf, 3)
    parts = check_shuffle(client, df, ["c", "k"], npartitions=4)
    for p in parts:
        assert list(p.c.cat.categories) == list(pdf.c.cat.categories)


def test_shuffle_float_key_with_nans(client):
    pdf = ranked(400)
    pdf["f"] = np.where(np.arange(400) % 5 == 0, np.nan, np.round(pdf["f"] * 10))
    df = ddf(pdf, 4)
    parts = check_shuffle(client, df, "f", npartitions=5)
    with_nan = [j for j, p in enumerate(parts) if p["f"].isna().any()]
    assert len(with_nan) == 1
    assert parts[with_nan[0]]["f"].isna().sum() == 80


def test_shuffle_nullable_int_key_with_na(client):
    pdf = ranked(400)
    df = ddf(pdf, 4)
    parts = check_shuffle(client, df, "ni", npartitions=5)
    with_na = [j for j, p in enumerate(parts) if p["ni"].isna().any()]
    assert len(with_na) == 1
    assert parts[with_na[0]]["ni"].isna().sum() == pdf["ni"].isna().sum()


def test_shuffle_on_tuple_of_columns(client):
    df = ddf(ranked(200), 3)
    check_shuffle(client, df, ("k", "s"), npartitions=4)


def test_shuffle_same_result_for_str_and_list_on(client):
    df = ddf(ranked(300), 4)
    a = partitions(client, aimss_dask.shuffle(df, "k", npartitions=5))
    b = partitions(client, aimss_dask.shuffle(df, ["k"], npartitions=5))
    assert_clean()
    assert [key_set(p, "k") for p in a] == [key_set(p, "k") for p in b]


def test_shuffle_default_npartitions_is_input_npartitions(client):
    df = ddf(ranked(300), 6)
    check_shuffle(client, df, "k")


# -- shuffle: partition edge cases ----------------------------------------------------


def test_shuffle_with_empty_input_partitions(client):
    pdf = ranked(400).sort_values("k")
    df = dd.from_pandas(pdf, npartitions=5, sort=False)
    filtered = df[df["k"] >= 30]
    sizes = [len(d) for d in dask.compute(*filtered.to_delayed())]
    assert 0 in sizes and sum(sizes) > 0  # the premise: some input partitions are empty
    check_shuffle(client, filtered, "k", npartitions=4)


def test_shuffle_with_all_input_partitions_empty(client):
    df = ddf(ranked(100), 3)
    empty = df[df["k"] < 0]
    parts = check_shuffle(client, empty, "s", npartitions=4)
    assert all(len(p) == 0 for p in parts)


def test_shuffle_single_input_partition(client):
    df = ddf(ranked(250), 1)
    assert df.npartitions == 1
    check_shuffle(client, df, "k", npartitions=4)


def test_shuffle_to_one_partition(client):
    df = ddf(ranked(250), 4)
    parts = check_shuffle(client, df, "s", npartitions=1)
    assert len(parts[0]) == 250


def test_shuffle_more_partitions_than_rows(client):
    df = ddf(ranked(10), 3)
    parts = check_shuffle(client, df, "k", npartitions=25)
    assert sum(1 for p in parts if len(p) == 0) >= 15


def test_shuffle_numpy_int_npartitions(client):
    df = ddf(ranked(100), 2)
    check_shuffle(client, df, "k", npartitions=np.int64(3))


# -- shuffle: lifecycle ---------------------------------------------------------------


def test_shuffle_streams_are_gone_after_compute(client):
    assert_clean()
    pdf = pd.DataFrame({"k": np.arange(3000) % 101, "v": np.arange(3000.0)})
    df = ddf(pdf, 4)
    out = aimss_dask.shuffle(df, "k", npartitions=6)
    with get_task_stream(client) as ts:
        res = out.compute()
    assert len(res) == 3000
    # Released and destroyed by the time compute() returns: no waiting.
    after = aimss_dask.status()
    assert_workers_clean(after)
    assert all(st["producer_in_flight"] == 0 for st in after.values())
    # The rows did go through the push / read tasks of the run.
    keys = [t["key"] for t in ts.data if isinstance(t["key"], tuple)]
    assert sum(str(k[0]).startswith("aimss-push-") for k in keys) == 4
    assert sorted(k[2] for k in keys if str(k[0]).startswith(PARTITION_TASK_PREFIX)) == list(range(6))


def test_push_tasks_read_a_persisted_partition_where_it_is(client):
    """A persisted frame's partitions reach Dask as ``Alias`` tasks of the
    persisted keys; the push tasks must depend on the persisted keys
    themselves, so no alias task can drag a partition to another worker."""
    df = ddf(ranked(400), 4).persist()
    held = {f.key for f in client.futures_of(df)}
    out = aimss_dask.shuffle(df, "k", npartitions=3)
    graph = dict(out.__dask_graph__())
    pushes = [t for k, t in graph.items() if isinstance(k, tuple) and str(k[0]).startswith("aimss-push-")]
    assert len(pushes) == 4
    inputs = [set(t.dependencies) & held for t in pushes]
    assert all(len(i) == 1 for i in inputs), inputs
    assert set().union(*inputs) == held
    got = out.compute()
    pd.testing.assert_frame_equal(sort_all(got), sort_all(df.compute()))


def test_shuffle_can_be_computed_twice(client):
    df = ddf(ranked(300), 3)
    out = aimss_dask.shuffle(df, "k", npartitions=4)
    first = out.compute()
    assert_clean()
    second = out.compute()
    assert_clean()
    pd.testing.assert_frame_equal(first.sort_index(), second.sort_index())


def test_shuffle_one_partition_then_all(client):
    """A partial compute (``out.partitions[i]``, ``out.head()``) then a full one."""
    df = ddf(ranked(300), 3)
    out = aimss_dask.shuffle(df, "k", npartitions=4)
    part0 = out.partitions[0].compute()
    full = out.compute()
    assert len(full) == 300
    pd.testing.assert_frame_equal(full.loc[part0.index].sort_index(), part0.sort_index())
    assert_clean()


def test_shuffle_partial_compute_leaves_no_stream(client):
    df = ddf(ranked(300), 3)
    out = aimss_dask.shuffle(df, "k", npartitions=4)
    head = out.partitions[1].compute()
    assert set(head["k"]) <= set(range(40))
    assert_clean()


def _skew_placement(client) -> tuple[list[str], dict[str, int]]:
    """Two helper streams on one worker, so new partitions are not placed 0,1,0,1."""
    # A run's streams are placed together: both land on one worker.
    first, second = register_run(
        RunSpec(run_id=unique_name("helper"), streams=(unique_name("helper"), unique_name("helper"))), 1
    ).streams
    workers = sorted(listed_workers(client))
    load = {w: 0 for w in workers}
    for s in (first, second):
        for w in s.info()["owners"]:
            load[w] += 1
    return [first.name, second.name], load


@pytest.mark.parametrize("op", ["shuffle", "merge"])
def test_read_tasks_run_on_partition_owners(client, op):
    helpers, load = _skew_placement(client)
    n = 8
    expected = place_partitions(n, load)
    assert len(set(expected)) == 2 and expected != sorted(expected)
    pdf = pd.DataFrame({"k": np.arange(800) % 97, "v": np.arange(800.0)})
    df = ddf(pdf, 4)
    if op == "shuffle":
        out = aimss_dask.shuffle(df, "k", npartitions=n)
    else:
        right = dd.from_pandas(pd.DataFrame({"k": np.arange(97), "w": np.arange(97)}), npartitions=2)
        out = aimss_dask.merge(df, right, on="k", npartitions=n)
    before = {w: st["reads"] for w, st in aimss_dask.status().items()}
    with get_task_stream(client) as ts:
        res = out.compute()
    assert len(res) == 800
    ran = {
        t["key"][2]: t["worker"]
        for t in ts.data
        if isinstance(t["key"], tuple) and str(t["key"][0]).startswith(PARTITION_TASK_PREFIX)
    }
    assert sorted(ran) == list(range(n))
    # Every read task read its partition(s) from the log of the worker it ran
    # on. (Owners may differ from the initial placement: the coordinator
    # rebalances by size at the barrier, so the tasks report it themselves.)
    after = {w: st["reads"] for w, st in aimss_dask.status().items()}
    sides = 1 if op == "shuffle" else 2
    assert sum(after[w]["remote"] - before[w]["remote"] for w in after) == 0
    assert sum(after[w]["local"] - before[w]["local"] for w in after) == n * sides
    # Packed frames: every read filled its output batch by batch, sized from
    # the log's byte count (which must therefore be exact, pushed or local).
    assert sum(after[w]["streamed"] - before[w]["streamed"] for w in after) == n * sides
    for name in helpers:
        aimss_dask.destroy_stream(name)
    assert_clean()


# -- shuffle: errors ------------------------------------------------------------------


@pytest.mark.parametrize("on", ["nope", ["k", "nope"]])
def test_shuffle_unknown_column(client, on):
    df = ddf(ranked(50), 2)
    with pytest.raises(aimss_dask.InvalidArgumentError, match="nope") as info:
        aimss_dask.shuffle(df, on, npartitions=2)
    assert isinstance(info.value, ValueError)
    assert_clean()


def test_shuffle_empty_on(client):
    df = ddf(ranked(50), 2)
    with pytest.raises(aimss_dask.InvalidArgumentError):
        aimss_dask.shuffle(df, [], npartitions=2)
    assert_clean()


@pytest.mark.parametrize("npartitions", [0, -3, 2.5, True, "4"])
def test_shuffle_bad_npartitions(client, npartitions):
    df = ddf(ranked(50), 2)
    with pytest.raises(aimss_dask.InvalidArgumentError, match="npartitions"):
        aimss_dask.shuffle(df, "k", npartitions=npartitions)
    assert_clean()


@pytest.mark.parametrize(
    "make",
    [lambda: ranked(20), lambda: ddf(ranked(20), 2)["k"], lambda: [1, 2]],
    ids=["pandas", "dask-series", "list"],
)
def test_shuffle_needs_a_dask_dataframe(client, make):
    with pytest.raises(aimss_dask.InvalidArgumentError, match="dask.dataframe.DataFrame"):
        aimss_dask.shuffle(make(), "k")
    assert_clean()


# -- merge ----------------------------------------------------------------------------


def _sides(nl: int = 300, nr: int = 120) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(7)
    left = pd.DataFrame(
        {"k": rng.integers(0, 60, nl), "a": np.arange(nl), "s": [f"l{i % 11}" for i in range(nl)]}
    )
    # Keys 30..89: some match the left, some do not; repeated on both sides.
    right = pd.DataFrame({"k": rng.integers(30, 90, nr), "b": np.arange(nr) * 1.5})
    return left, right


@pytest.mark.parametrize("how", ["inner", "left", "right", "outer"])
def test_merge_how(client, how):
    lp, rp = _sides()
    got = check_merge(
        client, ddf(lp, 4), ddf(rp, 2), on="k", how=how, npartitions=5
    )
    assert len(got) > 0


def test_merge_default_how_and_npartitions(client):
    lp, rp = _sides()
    left, right = ddf(lp, 3), ddf(rp, 5)
    out = aimss_dask.merge(left, right, on="k")
    assert out.npartitions == 5
    got = out.compute()
    assert_clean()
    pd.testing.assert_frame_equal(sort_all(got), sort_all(left.compute().merge(right.compute(), on="k")))


def test_merge_output_partitions_hold_disjoint_keys(client):
    lp, rp = _sides()
    out = aimss_dask.merge(ddf(lp, 3), ddf(rp, 2), on="k", how="outer", npartitions=6)
    parts = partitions(client, out)
    assert_clean()
    seen: dict[tuple, int] = {}
    for j, p in enumerate(parts):
        for k in key_set(p, "k"):
            assert k not in seen, f"key {k} in output partitions {seen[k]} and {j}"
            seen[k] = j
    assert set(seen) == {(k,) for k in set(lp.k) | set(rp.k)}


@pytest.mark.parametrize("how", ["inner", "left", "right", "outer"])
def test_merge_left_on_right_on(client, how):
    lp, rp = _sides()
    lp = lp.rename(columns={"k": "lk"})
    rp = rp.rename(columns={"k": "rk"})
    got = check_merge(
        client,
        ddf(lp, 3),
        ddf(rp, 2),
        left_on="lk",
        right_on="rk",
        how=how,
        npartitions=4,
    )
    assert {"lk", "rk"} <= set(got.columns)


def test_merge_multi_column_keys(client):
    lp, rp = _sides()
    lp["k2"] = lp["a"] % 3
    rp["k2"] = np.arange(len(rp)) % 3
    lp = lp.rename(columns={"k": "x", "k2": "y"})
    for how in ("inner", "outer"):
        check_merge(
            client,
            ddf(lp, 3),
            ddf(rp, 2),
            left_on=["x", "y"],
            right_on=["k", "k2"],
            how=how,
            npartitions=4,
        )
    rp2 = rp.rename(columns={"k": "x", "k2": "y"})
    check_merge(client, ddf(lp, 3), ddf(rp2, 2), on=["x", "y"], how="left", npartitions=3)


@pytest.mark.parametrize("how", ["inner", "left", "right", "outer"])
def test_merge_int64_with_float64_keys(client, how):
    lp, rp = _sides()
    rp["k"] = rp["k"].astype("float64")
    assert lp.k.dtype == np.int64 and rp.k.dtype == np.float64
    got = check_merge(
        client, ddf(lp, 4), ddf(rp, 3), on="k", how=how, npartitions=7
    )
    if how == "inner":
        # Every common key matched, whatever partition its hash picked.
        assert set(got.k) == set(lp.k) & set(rp.k.astype(int))


def test_merge_int32_with_int64_keys_different_names(client):
    lp, rp = _sides()
    lp = lp.astype({"k": "int32"}).rename(columns={"k": "lk"})
    check_merge(
        client, ddf(lp, 3), ddf(rp, 2), left_on="lk", right_on="k", how="outer", npartitions=5
    )


@pytest.mark.parametrize("how", ["inner", "outer"])
def test_merge_nullable_int_with_int64_keys(client, how):
    lp, rp = _sides()
    lp = lp.astype({"k": "Int64"})
    check_merge(client, ddf(lp, 3), ddf(rp, 2), on="k", how=how, npartitions=4)


@pytest.mark.parametrize("how", ["inner", "left", "outer"])
def test_merge_nan_keys_match_each_other(client, how):
    lp = pd.DataFrame({"k": [1.0, np.nan, 2.0, np.nan, 3.0, 4.0] * 20, "a": np.arange(120)})
    rp = pd.DataFrame({"k": [np.nan, 2.0, 5.0, np.nan] * 5, "b": np.arange(20)})
    got = check_merge(client, ddf(lp, 4), ddf(rp, 2), on="k", how=how, npartitions=5)
    # pandas matches NaN with NaN: 40 NaN rows on the left, 10 on the right.
    nan_rows = got[got.k.isna() & got.a.notna() & got.b.notna()]
    assert len(nan_rows) == 400


def test_merge_nullable_int_na_keys(client):
    lp = pd.DataFrame({"k": pd.array([1, None, 2, None, 3] * 10, dtype="Int64"), "a": np.arange(50)})
    rp = pd.DataFrame({"k": pd.array([None, 2, 7], dtype="Int64"), "b": [10, 20, 30]})
    got = check_merge(client, ddf(lp, 3), ddf(rp, 2), on="k", how="outer", npartitions=4)
    assert (got.k.isna() & got.b.eq(10).fillna(False)).sum() == 20


def test_merge_string_and_datetime_keys(client):
    lp = ranked(300)[["s", "t", "k"]].reset_index(drop=True)
    rp = ranked(100, seed=3)[["s", "t", "f"]].reset_index(drop=True)
    check_merge(client, ddf(lp, 3), ddf(rp, 2), on="s", how="inner", npartitions=4)
    rp2 = pd.DataFrame({"t": lp.t.iloc[::7].to_numpy(), "z": np.arange(len(lp.t.iloc[::7]))})
    check_merge(client, ddf(lp, 3), ddf(rp2, 2), on="t", how="left", npartitions=3)


@pytest.mark.parametrize("suffixes", [None, ("_l", "_r")])
def test_merge_suffixes_for_overlapping_columns(client, suffixes):
    lp, rp = _sides()
    rp["s"] = [f"r{i % 5}" for i in range(len(rp))]
    kwargs = {} if suffixes is None else {"suffixes": suffixes}
    got = check_merge(
        client, ddf(lp, 3), ddf(rp, 2), on="k", how="inner", npartitions=4, **kwargs
    )
    sx, sy = suffixes or ("_x", "_y")
    assert {f"s{sx}", f"s{sy}"} <= set(got.columns) and "s" not in got.columns


def test_merge_many_to_many(client):
    lp = pd.DataFrame({"k": np.repeat(np.arange(10), 30), "a": np.arange(300)})
    rp = pd.DataFrame({"k": np.repeat(np.arange(5, 15), 12), "b": np.arange(120)})
    got = check_merge(client, ddf(lp, 4), ddf(rp, 3), on="k", how="inner", npartitions=3)
    assert len(got) == 5 * 30 * 12


def test_merge_with_empty_partitions_and_empty_side(client):
    lp, rp = _sides()
    left = dd.from_pandas(lp.sort_values("k"), npartitions=4, sort=False)
    left = left[left["k"] >= 45]
    right = ddf(rp, 2)
    assert 0 in [len(d) for d in dask.compute(*left.to_delayed())]
    for how in ("inner", "outer"):
        check_merge(client, left, right, on="k", how=how, npartitions=6)
    nothing = right[right["k"] < 0]
    check_merge(client, left, nothing, on="k", how="left", npartitions=3)


def test_merge_self_join(client):
    lp, _ = _sides(nl=150)
    df = ddf(lp, 3)
    check_merge(client, df, df, on="k", how="inner", npartitions=4)


# -- merge: errors --------------------------------------------------------------------


def _frames():
    lp, rp = _sides(40, 20)
    return ddf(lp, 2), ddf(rp, 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"on": "nope"},
        {"on": ["k", "nope"]},
        {"left_on": "nope", "right_on": "k"},
        {"left_on": "k", "right_on": "nope"},
    ],
    ids=["on", "on-list", "left_on", "right_on"],
)
def test_merge_unknown_column(client, kwargs):
    left, right = _frames()
    with pytest.raises(aimss_dask.InvalidArgumentError, match="nope") as info:
        aimss_dask.merge(left, right, **kwargs)
    assert isinstance(info.value, ValueError)
    assert_clean()


def test_merge_on_column_missing_on_one_side(client):
    left, right = _frames()
    with pytest.raises(aimss_dask.InvalidArgumentError, match="'a'"):
        aimss_dask.merge(left, right, on="a")  # "a" is only in the left frame
    assert_clean()


@pytest.mark.parametrize("how", ["cross", "full", "", None])
def test_merge_bad_how(client, how):
    left, right = _frames()
    with pytest.raises(aimss_dask.InvalidArgumentError, match="how"):
        aimss_dask.merge(left, right, on="k", how=how)
    assert_clean()


@pytest.mark.parametrize("npartitions", [0, -1, 1.5, False])
def test_merge_bad_npartitions(client, npartitions):
    left, right = _frames()
    with pytest.raises(aimss_dask.InvalidArgumentError, match="npartitions"):
        aimss_dask.merge(left, right, on="k", npartitions=npartitions)
    assert_clean()


def test_merge_needs_dask_dataframes(client):
    left, right = _frames()
    with pytest.raises(aimss_dask.InvalidArgumentError, match="left"):
        aimss_dask.merge(left.compute(), right, on="k")
    with pytest.raises(aimss_dask.InvalidArgumentError, match="right"):
        aimss_dask.merge(left, right["k"], on="k")
    assert_clean()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"left_on": "k"},
        {"right_on": "k"},
        {"on": "k", "left_on": "k", "right_on": "k"},
        {"left_on": ["k", "a"], "right_on": ["k"]},
    ],
    ids=["no-keys", "left_on-only", "right_on-only", "on-and-left_on", "unequal-lengths"],
)
def test_merge_bad_key_arguments(client, kwargs):
    left, right = _frames()
    with pytest.raises(aimss_dask.InvalidArgumentError):
        aimss_dask.merge(left, right, **kwargs)
    assert_clean()


def test_merge_incomparable_key_dtypes(client):
    left, right = _frames()
    right = right.assign(k=right["k"].astype(str))
    with pytest.raises(aimss_dask.InvalidArgumentError, match="'k'"):
        aimss_dask.merge(left, right, on="k")
    assert_clean()
