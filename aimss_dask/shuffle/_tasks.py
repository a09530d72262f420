"""The shuffle's own tasks of a push-based run: push, read (and join), read_block.

A run is a stream (one per input side) whose partitions are the output
partitions. Map tasks push their shards while the map phase is still running;
the seal task is the barrier; each read task runs on the worker that owns its
partition (the coordinator pins it), reads it locally, then releases it so the
stream is freed as soon as its last partition is read. The tasks every push
run shares (create, seal, and the rechunk's ``push_pieces``) are in
:mod:`aimss_dask.ops.pushrun`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from aimss_dask.api import streams as api
from aimss_dask.core.names import PARTITION_READ
from aimss_dask.ops import local
from aimss_dask.ops.pushrun import RunWriter, copyable, restartable
from aimss_dask.shuffle import partitioning

if TYPE_CHECKING:
    import pandas as pd


@copyable
def push(
    df: pd.DataFrame,
    names: list[str],
    side: int,
    on: list[str],
    npartitions: int,
    cast: dict[str, str] | None,
    input_id: int | None = None,
    layout: tuple[Any, ...] | None = None,
) -> int:
    """Split one input partition by key hash and push every shard; rows pushed.

    ``input_id``: the input partition's index within its side, the shards'
    origin: a second execution of this push is dropped by the owners
    (:class:`~aimss_dask.ops.pushrun.RunWriter`). ``None``: no origin.
    ``layout``: the side's meta's :func:`~aimss_dask.shuffle.partitioning.pack_signature`;
    shards are packed only when this partition's is the same.
    """
    writer = RunWriter(names[side], input_id)
    here, alloc = local.scratch()
    index = partitioning.partition_index(df, on, npartitions, cast, alloc)
    if layout is not None and partitioning.pack_signature(df) == layout:
        tight = local.memory_tight()
        # The packed gather needs two copies of the input's rows in scratch,
        # the lean one one: lean whenever both would not fit beside the log
        # in half the budget.
        rows_bytes = len(df) * partitioning.packed_row_bytes(df)
        lean = local.memory_tight(2 * rows_bytes)
        shards = partitioning.split_packed(df, index, npartitions, alloc, lean=lean, only=writer.only)
        owners = writer.spec.owners
        for j, shard in shards:
            # A local shard would keep the whole scratch buffer busy from the
            # log: give it its own memory. Remote ones are sent from the view,
            # which pins the buffer (the whole sorted input) until the last of
            # them is sent; once memory is tight, they get their own too, so
            # the buffer is free when this task ends.
            writer.write(shard.copy() if tight or owners[j] == here else shard, j)
    else:
        for j, shard in partitioning.split(df, index, npartitions, only=writer.only):
            writer.write(shard, j)
    # No flush: the seal pushes every worker's buffers and fails the run if
    # any push failed, and the next map task gets the CPU meanwhile.
    return len(df)


@restartable
def read(name: str, partition: int, meta: pd.DataFrame, sealed: int, release: bool = True) -> pd.DataFrame:
    """One output partition, read from the local log, then released (unless ``release`` is False)."""
    _before_read(name, partition)
    plugin = local.here()[1]
    rows = _packed_rows(getattr(plugin, "store", None), name, partition, meta)
    # With the size known, fill the output batch by batch: the read holds the
    # output and one batch of shards (loaded back from spill files, or views
    # into receive buffers), not the whole partition besides. Shards that do
    # not fit what the log's byte count promised are kept aside.
    filling = partitioning.PackedOutput(meta, rows) if rows else None
    rest = [s for s in api.read_from(name, partition=partition) if filling is None or not filling.add(s)]
    if filling is not None and not rest and filling.filled == rows:
        out = filling.frame()
        plugin.reads["streamed"] += 1
    elif filling is None and rest and all(isinstance(r, np.ndarray) for r in rest):
        out = partitioning.unpack(rest, meta)
    else:
        head = [filling.frame()] if filling is not None and filling.filled else []
        out = partitioning.combine(
            head + [partitioning.unpack([r], meta) if isinstance(r, np.ndarray) else r for r in rest], meta
        )
    # Views into receive buffers: let go of them before the release, which
    # may drop the stream and hand idle buffers back to the OS.
    del rest, filling
    if release:
        api.release_partition(name, partition)
    return out


def _packed_rows(store: Any, name: str, partition: int, meta: pd.DataFrame) -> int | None:
    """Rows of a sealed partition of packed shards in ``store``, from its byte count.

    A packed shard is ``rows x (columns + 1)`` uint64 values and the log
    counts exactly its buffer, so the sum is known before anything is
    loaded. ``None`` where that does not hold (not packable, not local,
    not sealed, or a count that is not a whole number of rows).
    """
    if store is None or not partitioning.packable(meta):
        return None
    stats = store.partition_stats(name, partition)
    width = partitioning.packed_row_bytes(meta)
    if stats is None or not stats["sealed"] or stats["start"] or stats["bytes"] % width:
        return None
    return stats["bytes"] // width


def join(
    names: list[str],
    partition: int,
    metas: tuple[pd.DataFrame, pd.DataFrame],
    merge_kwargs: dict[str, Any],
    sealed: int,
) -> pd.DataFrame:
    """Hash join of one co-located partition pair.

    Both sides are read before either is released: a task run again after
    the right side's read handed it back (a loss) finds the left one still
    there, not trimmed away.
    """
    left = read(names[0], partition, metas[0], sealed, release=False)
    right = read(names[1], partition, metas[1], sealed, release=False)
    for name in names:
        api.release_partition(name, partition)
    return left.merge(right, **merge_kwargs)


def _before_read(name: str, partition: int) -> None:
    """Make room for reading ``partition`` whole, within the worker's budget.

    A read task runs after the barrier, so no push needs scratch any more:
    the sorted copies of the last inputs were still referenced by shards in
    flight when their push ended, and nothing trimmed the pool since. Then
    the read loads the partition's spilled records and builds an output as
    large as the partition: other partitions spill first, so that the log
    and the read fit in the budget together.
    """
    _, plugin = local.here()
    scratch = getattr(plugin, "scratch", None)
    if scratch is not None:
        scratch.trim()
    store = getattr(plugin, "store", None)
    if store is not None:
        store.make_room(name, None, partition)


# -- Array rechunk: the same run, with array pieces for records ------------------------


@restartable
def read_block(name: str, partition: int, shape: tuple[int, ...], dtype: Any, sealed: Any) -> np.ndarray:
    """One output chunk, assembled from its pieces in the local log."""
    _before_read(name, partition)
    out = np.empty(shape, dtype=dtype)
    filled = 0
    for dst, piece in api.read_from(name, partition=partition):
        out[tuple(slice(a, b) for a, b in dst)] = piece
        filled += piece.size
        del piece  # a view into a receive buffer: see read()
    api.release_partition(name, partition)
    if filled != out.size:
        from aimss_dask.core.errors import AIMSSError

        raise AIMSSError(
            f"rechunk output chunk {partition} of {name!r} got {filled} of {out.size} "
            "elements; this is a bug, please report it"
        )
    return out


# The coordinator pins tasks that call these to the partition's owner, even
# where Dask fused the call into another task (coordinator/pinning.py).
setattr(read_block, PARTITION_READ, True)
setattr(read, PARTITION_READ, True)
