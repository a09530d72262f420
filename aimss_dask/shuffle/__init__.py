"""Shuffle operators through AIMSS streams: DataFrame shuffle and hash join.

Map tasks split their input and push shards into a stream's partitions while
the map phase is still running; a seal task is the barrier; each output
partition is read on the worker that owns it.
"""

from aimss_dask.shuffle.array import rechunk
from aimss_dask.shuffle.dataframe import merge, shuffle

__all__ = ["merge", "rechunk", "shuffle"]
