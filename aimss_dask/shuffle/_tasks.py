"""The tasks of a push-based shuffle run: create, push, seal, read.

A run is a stream (one per input side) whose partitions are the output
partitions. Map tasks push their shards while the map phase is still running;
the seal task is the barrier; each read task runs on the worker that owns its
partition (the coordinator pins it), reads it locally, then releases it so the
stream is freed as soon as its last partition is read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from aimss_dask.shuffle import partitioning
from aimss_dask.stream import api


def create(
    names: list[str],
    npartitions: int,
    barrier: str,
    chunk_tasks: str | None = None,
    grid: tuple[int, ...] | None = None,
    prefer: list[Any] | None = None,
    sink: bool = False,
) -> list[str]:
    """Create the run's streams (the read tasks are keyed by ``names[0]``).

    An array run's read tasks are its output chunks, keyed ``(chunk_tasks,
    *index)`` over ``grid``. ``prefer``: see ``create_operator_stream``.
    """
    first = names[0]
    api.create_operator_stream(
        first, npartitions, read_by=first, barrier=barrier, chunk_tasks=chunk_tasks, grid=grid,
        prefer=prefer, sink=sink,
    )
    for other in names[1:]:
        api.create_operator_stream(
            other, npartitions, read_by=first, colocate_with=first, barrier=barrier
        )
    return names


def _restartable(func: Any) -> Any:
    """A task of a run: a lost worker restarts the run, so wait for that.

    ``Reschedule`` hands the task back to the scheduler instead of failing
    the whole computation; the coordinator's restart releases it anyway.
    """
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from distributed import Reschedule

        from aimss_dask.errors import PartitionLostError

        try:
            return func(*args, **kwargs)
        except PartitionLostError as e:
            raise Reschedule() from e

    return wrapper


@_restartable
def push(
    df: pd.DataFrame,
    names: list[str],
    side: int,
    on: list[str],
    npartitions: int,
    cast: dict[str, str] | None,
) -> int:
    """Split one input partition by key hash and push every shard; rows pushed."""
    stream = api.operator_stream(names[side])
    here, alloc = _scratch()
    index = partitioning.partition_index(df, on, npartitions, cast, alloc)
    if partitioning.packable(df):
        tight = _memory_tight()
        # The packed gather needs two copies of the input's rows in scratch,
        # the lean one one: lean whenever both would not fit beside the log
        # in half the budget.
        rows_bytes = len(df) * partitioning.packed_row_bytes(df)
        lean = _memory_tight(2 * rows_bytes)
        shards = partitioning.split_packed(df, index, npartitions, alloc, lean=lean)
        owners = stream.spec.owners
        for j, shard in shards:
            # A local shard would keep the whole scratch buffer busy from the
            # log: give it its own memory. Remote ones are sent from the view,
            # which pins the buffer (the whole sorted input) until the last of
            # them is sent; once memory is tight, they get their own too, so
            # the buffer is free when this task ends.
            stream.write(shard.copy() if tight or owners[j] == here else shard, partition=j)
    else:
        for j, shard in partitioning.split(df, index, npartitions):
            stream.write(shard, partition=j)
    # No flush: the seal pushes every worker's buffers and fails the run if
    # any push failed, and the next map task gets the CPU meanwhile.
    return len(df)


@_restartable
def seal(names: list[str], *pushed: int) -> int:
    """The barrier: every map task is done; seal so readers see the end."""
    for name in names:
        api.get_stream(name).seal()
    return sum(pushed)


@_restartable
def read(name: str, partition: int, meta: pd.DataFrame, sealed: int) -> pd.DataFrame:
    """One output partition, read from the local log, then released."""
    _before_read(name, partition)
    plugin = _here()[1]
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
    elif filling is None and rest and isinstance(rest[0], np.ndarray):
        out = partitioning.unpack(rest, meta)
    else:
        head = [filling.frame()] if filling is not None and filling.filled else []
        out = partitioning.combine(
            head + [partitioning.unpack([r], meta) if isinstance(r, np.ndarray) else r for r in rest], meta
        )
    # Views into receive buffers: let go of them before the release, which
    # may drop the stream and hand idle buffers back to the OS.
    del rest, filling
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
    """Hash join of one co-located partition pair."""
    left = read(names[0], partition, metas[0], sealed)
    right = read(names[1], partition, metas[1], sealed)
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
    _, plugin = _here()
    scratch = getattr(plugin, "scratch", None)
    if scratch is not None:
        scratch.trim()
    store = getattr(plugin, "store", None)
    if store is not None:
        store.make_room(name, None, partition)


def _memory_tight(extra: int = 0) -> bool:
    """Whether this worker's log (plus ``extra`` bytes) is past half its budget
    (:meth:`LogStore.tight`, the data plane's threshold for storing records
    as their own copies, too)."""
    store = getattr(_here()[1], "store", None)
    return store is not None and store.tight(extra)


def _scratch() -> tuple[str | None, partitioning.Alloc]:
    """This worker's address and scratch allocator (plain NumPy elsewhere)."""
    address, plugin = _here()
    scratch = getattr(plugin, "scratch", None)
    return address, (scratch.array if scratch is not None else np.empty)


def _here() -> tuple[str | None, Any]:
    """This worker's address and AIMSS plugin (``(None, None)`` off a worker)."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return None, None
    return worker.address, worker.plugins.get("aimss")


# -- Array rechunk: the same run, with array pieces for records ------------------------


@_restartable
def push_pieces(
    block: np.ndarray,
    names: list[str],
    pieces: list[tuple[int, tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]],
) -> int:
    """Push each piece of one input block to its output chunk's partition.

    ``pieces``: ``(partition, (start, stop) per axis in the block, (start,
    stop) per axis in the chunk)``, cut on the client.
    """
    stream = api.operator_stream(names[0])
    here = _here()[0]
    owners = stream.spec.owners
    # A piece for this worker's own partition stays in the log until its
    # chunk is assembled. As a view of the block it needs no copy and no
    # fresh pages; the view keeps the whole block alive, which costs nothing
    # while Dask holds it anyway (a persisted input). Once the log is tight,
    # a local piece gets memory of its own, exactly what the log counts, so
    # the block can go.
    tight = _memory_tight()
    cuts = [(p, tuple(slice(a, b) for a, b in src), dst, owners[p] == here) for p, src, dst in pieces]
    # Pieces for other workers that are not contiguous (column slices) are
    # copied into one scratch buffer: memory this worker touched before,
    # free again once they are sent. Row slices of a C-ordered block are
    # sent as views: Dask never modifies a task's input.
    strided = sum(
        block[src].size for _, src, _, local in cuts if not local and not block[src].flags.c_contiguous
    )
    flat = _scratch()[1]((strided,), block.dtype) if strided else None
    pos = 0
    for p, src, dst, local in cuts:
        view = block[src]
        if local:
            if tight:
                view = view.copy()
        elif not view.flags.c_contiguous:
            assert flat is not None
            piece = flat[pos : pos + view.size].reshape(view.shape)
            np.copyto(piece, view)
            pos += view.size
            view = piece
        stream.write((dst, view), partition=p)
    return int(block.size)


@_restartable
def read_block(name: str, partition: int, shape: tuple[int, ...], dtype: Any, sealed: int) -> np.ndarray:
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
        from aimss_dask.errors import AIMSSError

        raise AIMSSError(
            f"rechunk output chunk {partition} of {name!r} got {filled} of {out.size} "
            "elements; this is a bug, please report it"
        )
    return out
