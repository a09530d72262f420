"""Splitting and joining partitions: pure functions over pandas objects."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from dask.dataframe.dispatch import concat
from dask.dataframe.shuffle import partitioning_index

from aimss_dask.errors import InvalidArgumentError


def check_columns(columns: Sequence[str], on: str | Sequence[str], what: str = "on") -> list[str]:
    """``on`` as a list of column names, every one of them present."""
    keys = [on] if isinstance(on, (str, int)) or not isinstance(on, Sequence) else list(on)
    if not keys:
        raise InvalidArgumentError(f"{what}={on!r}: give at least one column name")
    missing = [k for k in keys if k not in columns]
    if missing:
        raise InvalidArgumentError(
            f"{what}={on!r}: column(s) {missing} not in the frame; its columns are "
            f"{list(columns)}"
        )
    return keys


def partition_index(df: pd.DataFrame, on: list[str], npartitions: int, cast: dict[str, str] | None = None) -> np.ndarray:
    """The output partition of every row: Dask's own hash, so results match Dask's."""
    keys = df[on]
    if cast:
        keys = keys.astype(cast)
    # Dask returns the smallest int dtype that fits, which lets the stable
    # argsort in split() use a radix sort: keep it.
    return np.asarray(partitioning_index(keys, npartitions))


def split(df: pd.DataFrame, index: np.ndarray, npartitions: int) -> list[tuple[int, pd.DataFrame]]:
    """``[(partition, rows of df for it), ...]`` for the non-empty partitions.

    One stable sort and one ``take``; the shards are slices of that copy, and
    every shard keeps the input's row order.
    """
    if len(df) == 0:
        return []
    counts = np.bincount(index, minlength=npartitions)
    order = np.argsort(index, kind="stable")
    ordered = df.take(order)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [
        (j, ordered.iloc[bounds[j] : bounds[j + 1]])
        for j in range(npartitions)
        if counts[j]
    ]


def combine(shards: list[pd.DataFrame], meta: pd.DataFrame) -> pd.DataFrame:
    """Concatenate shards; the empty ``meta`` stands in when there are none.

    Dask's ``concat`` unions categoricals whose categories differ by shard.
    """
    if not shards:
        return meta
    if len(shards) == 1:
        return shards[0].copy()  # a read-only view from the log: hand out our own
    return concat(shards)
