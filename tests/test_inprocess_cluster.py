"""An in-process cluster (``LocalCluster(processes=False)``): records come back as they were written.

Its ``inproc://`` comms do not serialise: records pushed over them arrive
still wrapped as serialised, and were once stored (and read back) so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from distributed import Client, LocalCluster

import aimss_dask


def _write(name: str, start: int, n: int) -> int:
    s = aimss_dask.get_stream(name)
    for i in range(start, start + n):
        s.write(np.full(4, i), partition=i % s.partitions)
    s.flush()
    return n


def test_records_written_from_the_client_and_from_tasks_read_back_equal():
    with LocalCluster(n_workers=2, processes=False, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        s = aimss_dask.create_stream("inproc", partitions=2)
        for i in range(10):
            s.write({"i": i, "frame": pd.DataFrame({"x": [i]})}, partition=i % 2)
        assert client.gather([client.submit(_write, "inproc", 100 * k, 10, pure=False) for k in (1, 2)]) == [10, 10]
        s.seal()
        got = [list(s.read(partition=p)) for p in range(2)]
        dicts = [r for part in got for r in part if isinstance(r, dict)]
        arrays = [r for part in got for r in part if isinstance(r, np.ndarray)]
        assert sorted(d["i"] for d in dicts) == list(range(10))
        assert all(d["frame"].x.tolist() == [d["i"]] for d in dicts)
        assert sorted(int(a[0]) for a in arrays) == list(range(100, 110)) + list(range(200, 210))
        assert len(dicts) + len(arrays) == sum(len(p) for p in got) == 30
