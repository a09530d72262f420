"""A worker process SIGKILLed in the middle of a shuffle: the result is complete."""

from __future__ import annotations

import os
import signal
import time

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

import aimss_dask

LARGE = os.environ.get("AIMSS_TEST_LARGE") == "1"
PARTS = 32
ROWS = (300_000 if LARGE else 60_000)  # per input partition


def _make(i: int) -> pd.DataFrame:
    rng = np.random.default_rng(i)
    return pd.DataFrame({"key": rng.integers(0, 1 << 40, ROWS), "v": rng.random(ROWS), "i": np.full(ROWS, i)})


def _summary(df: pd.DataFrame) -> pd.DataFrame:
    # Keys are < 2**40, so a partition's sum fits an int64.
    return pd.DataFrame({"rows": [len(df)], "keys": [int(df["key"].sum())], "v": [float(df["v"].sum())]})


@pytest.mark.parametrize("op", ["shuffle", "merge"])
def test_shuffle_survives_a_killed_worker(op):
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        df = dd.from_map(_make, range(PARTS), meta=_make(0).iloc[:0])
        want = pd.concat([_make(i) for i in range(PARTS)])
        if op == "shuffle":
            out = aimss_dask.shuffle(df, "key", npartitions=PARTS)
        else:
            right = dd.from_map(lambda i: _make(i).iloc[::3][["key"]].assign(w=1.0), range(PARTS), meta=pd.DataFrame({"key": pd.Series([], dtype="int64"), "w": pd.Series([], dtype="float64")}))
            out = aimss_dask.merge(df, right, on="key", npartitions=PARTS)
            want = want.merge(pd.concat([_make(i).iloc[::3][["key"]].assign(w=1.0) for i in range(PARTS)]), on="key")
        fut = client.compute(out.map_partitions(_summary, meta=_summary(want.iloc[:0])))
        # Kill a worker once the run is pushing data.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = aimss_dask.status()
            if any(w["memory_bytes"] > 0 for w in st.values()):
                break
            time.sleep(0.02)
        else:
            pytest.fail("the shuffle never started pushing")
        victim = sorted(st)[0]
        pids = client.run(os.getpid)
        os.kill(pids[victim], signal.SIGKILL)

        got = fut.result(timeout=240)
        assert int(got["rows"].sum()) == len(want)
        assert sum(int(k) for k in got["keys"]) == sum(int(k) for k in want["key"])
        assert got["v"].sum() == pytest.approx(want["v"].sum(), rel=1e-9)
        # The restarted run cleaned up after itself too.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            st = aimss_dask.status()
            if all(not w["streams"] and w["memory_bytes"] == 0 for w in st.values()):
                break
            time.sleep(0.1)
        assert all(not w["streams"] and w["memory_bytes"] == 0 for w in st.values()), st
