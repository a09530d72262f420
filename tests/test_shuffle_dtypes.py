"""What a shuffle's output holds when its partitions' dtypes are not the plain ones (a tcp cluster is enough:
the data path is the same on TLS, which ``test_shuffle`` covers)."""

from __future__ import annotations

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

import aimss_dask


def _float_first(df: pd.DataFrame) -> pd.DataFrame:
    """Partition 0 comes out float, as a NaN would make it (Dask checks the columns' order, not their dtypes)."""
    if len(df) and df["k"].iloc[0] == 0:
        return df.assign(v=df["v"] + 0.5)
    return df


def test_shuffle_of_partitions_that_differ_from_their_meta_keeps_their_values(client):
    """Dask lets a partition's dtypes differ from its meta (a column float where meta says int). Packed
    shards carry raw 8-byte values read as meta says: such a partition's shards must go as frames, or its
    values come back as other numbers without a word."""
    pdf = pd.DataFrame({"k": np.arange(40, dtype="i8"), "v": np.arange(40, dtype="i8") * 10})
    df = dd.from_pandas(pdf, npartitions=4, sort=False).map_partitions(_float_first, meta=pdf.iloc[:0])
    got = aimss_dask.shuffle(df, "k", npartitions=3).compute()
    want = pd.concat([_float_first(p) for p in (pdf.iloc[i : i + 10] for i in range(0, 40, 10))])
    got = got[["k", "v"]].sort_values("k").reset_index(drop=True)
    want = want[["k", "v"]].sort_values("k").reset_index(drop=True)
    assert got["k"].tolist() == want["k"].tolist()
    assert got["v"].astype("f8").tolist() == want["v"].astype("f8").tolist()


def test_shuffle_keeps_object_columns_as_they_are(client):
    """Dask's own shuffle keeps an object column's values; the output must not become strings."""
    from decimal import Decimal

    pdf = pd.DataFrame({"k": range(12), "o": [Decimal(i) / 4 for i in range(12)]})
    with dask.config.set({"dataframe.convert-string": False}):
        df = dd.from_pandas(pdf, npartitions=3)
    out = aimss_dask.shuffle(df, "k", npartitions=2)
    got = out.compute().sort_values("k")
    assert out.dtypes["o"] == object and got["o"].dtype == object
    assert got["o"].tolist() == pdf["o"].tolist() and isinstance(got["o"].iloc[1], Decimal)
