"""The graph of one ``to_zarr`` run: which shape it takes, and its tasks' wiring.

Four shapes of run, chosen by how the input's blocks meet the units (Zarr
shards, or chunks when unsharded):

- **Aligned**: every block is a whole number of units, written whole where
  it is. Blocks still to be computed get one task each, fused by Dask with
  their own computation, and are queued on the worker's write-behind thread
  (the write overlaps the next block's computation); blocks already in
  memory (a persisted array) are grouped by the worker that holds them, so
  a few tasks write many blocks and Dask's per-task cost (about 3 ms here)
  does not dominate, and written at once (there is nothing to overlap).
- **Rows in place**: uncompressed chunks (or shards of uncompressed chunks
  as wide as the shard), blocks cut along the first axis only, every worker
  on one host. A block's rows of a unit are one byte range of the unit's
  file, so the worker holding the block writes them there itself; nothing
  moves between workers. Each unit is written into a partial file named for
  the run, and the last task gives every unit its key once every piece is
  written (:func:`finish_rows`).
- **Chunks appended in place**: a sharded array whose blocks are whole
  inner chunks of shards they do not fill (1024-row blocks, 256-row chunks
  in 4096-row shards), compressed or not, every worker on one host. The
  worker holding a block encodes its inner chunks and appends them to
  their shard's partial file (one ``O_APPEND`` write per task and shard,
  atomic against the other writers); the tasks return where the chunks
  landed, and the last task writes each shard's index from that, then
  gives the shards their keys (:func:`finish_rows`). Nothing moves between
  workers but those few entries.
- **Push**: anything else. Map tasks cut their blocks along the unit grid
  and push the pieces into a stream whose partition ``p`` is unit ``p``,
  placed on the worker that holds most of its input. The owner counts what
  arrives and writes each unit on its write-behind thread the moment it is
  complete, then frees it (:mod:`aimss_dask.sink.assembler`); there are no
  per-unit tasks. The barrier seals the stream (every push has landed).

In every shape a last task waits for the writers (``flush`` of its ``WriteRun`` on every
worker involved), checks that every region was written, and raises
:class:`SinkError` otherwise. A lost worker in a push run restarts the run
(the coordinator's operator-run restart); in the other runs Dask recomputes
the lost write tasks, which write the same bytes again (rows) or append
their chunks again (chunks; only the surviving task's copy is indexed).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from dask.highlevelgraph import HighLevelGraph
from dask.task_spec import List, Task, TaskRef

from aimss_dask._compat import listed_workers
from aimss_dask.core.runs import OnLoss
from aimss_dask.ops import pushrun
from aimss_dask.ops.pieces import chunk_bounds, main_inputs, partition_pieces
from aimss_dask.sink.plan import (
    Jobs,
    aligned,
    in_place_kind,
    inner_chunks,
    row_pieces,
    split_by_bytes,
)
from aimss_dask.sink.push_run import create
from aimss_dask.sink.specs import ZarrWriteSpec, push_write_spec
from aimss_dask.sink.tasks import (
    append_chunks,
    begin,
    finish,
    finish_rows,
    push_blocks,
    write_block,
    write_blocks,
    write_rows,
)
from aimss_dask.sink.writer import ZarrTarget

if TYPE_CHECKING:
    import dask.array as da

logger = logging.getLogger("aimss_dask")


def write_graph(
    x: da.Array, unit: tuple[int, ...], target: ZarrTarget, raw: bool = False,
    inner: tuple[int, ...] | None = None, in_place: bool = True, why: str | None = None,
    bound: tuple[int, int] | None = None,
) -> tuple[HighLevelGraph, str]:
    """The run's graph and the key of its last task (which returns the bytes written).

    ``raw``: the direct writer can write rows of the target's units in
    place (uncompressed chunks, or shards of uncompressed full-width chunks).
    ``inner``: the inner chunk shape, where the direct writer can append
    whole inner chunks to the target's shards, and ``bound`` the most
    bytes one takes encoded. ``in_place``: whether the cluster's writers
    may write units in place (one host, or a shared parallel file system:
    :func:`aimss_dask.sink.fstype.decide`), and ``why`` not, logged when
    that sends the run to the push path.
    """
    token = target.run[len("aimss-sink-") :]
    finish_key = f"aimss-sink-finish-{token}"
    # Writes where the blocks are register their run from a task of their
    # own (a push run's create task registers it): writes need not wait for it.
    begin_key = f"aimss-create-{token}"
    begin_task = Task(begin_key, begin, ZarrWriteSpec(
        run_id=target.run, on_loss=OnLoss.RERUN, target=target.describe(), io_priority=target.io_priority,
    ))
    groups = held_groups(x)
    if aligned(x.chunks, unit):
        graph, dep, keys, expected = _aligned_graph(x, target, token, groups)
        graph[begin_key] = begin_task
        graph[finish_key] = Task(
            finish_key, finish, target, expected, None, List(*(TaskRef(k) for k in keys)),
            TaskRef(begin_key), target.run,
        )
    elif (kind := in_place_kind(x, unit, raw, inner)) is not None and _in_place_here(in_place, why, target):
        graph, dep, keys, njobs, grid = _in_place_graph(x, unit, inner, kind, target, token, groups, bound)
        graph[begin_key] = begin_task
        graph[finish_key] = Task(
            finish_key, finish_rows, target, njobs, grid, List(*(TaskRef(k) for k in keys)), kind,
            TaskRef(begin_key), target.run,
        )
    else:
        graph, dep, barrier, expected, name = _push_graph(x, unit, target, token, groups)
        # The create task too: a barrier whose one dependent is the finish
        # would be fused into it where Dask fuses delayed graphs
        # (``optimization.fuse.delayed``), and the coordinator follows the
        # run by its barrier's key.
        graph[finish_key] = Task(
            finish_key, finish, target, expected, name, List(TaskRef(barrier), TaskRef(_create_key(token)))
        )
    return HighLevelGraph.from_collections(finish_key, graph, dependencies=[dep]), finish_key


def _block_keys(x: da.Array) -> dict[tuple[int, ...], Any]:
    return {idx: (x.name, *idx) for idx in np.ndindex(*x.numblocks)}


def _inputs(
    x: da.Array, groups: list[list[tuple[int, ...]]] | None
) -> tuple[list[list[tuple[int, ...]]], Any]:
    """The blocks each task takes (``groups``, or one block per task) and how to refer to a block."""
    keys = _block_keys(x)
    return groups if groups is not None else [[idx] for idx in keys], lambda idx: TaskRef(keys[idx])


def held_groups(x: da.Array) -> list[list[tuple[int, ...]]] | None:
    """Blocks already in the cluster's memory, grouped by the worker that holds them.

    ``None`` when ``x`` is not persisted (its blocks are yet to be computed).
    A worker's blocks make one group per thread of it (consecutive blocks,
    about equal bytes), so that every thread writes and Dask's cost per task
    (about 3 ms here, plus a gap before the next) is paid a few times per
    worker, not once per block or per 64 MiB (which cost 10% of an
    uncompressed 2 GiB write).
    """
    try:
        from distributed import default_client

        client = default_client()
        futures = client.futures_of(x)
    except (ValueError, ImportError):
        return None
    keys = _block_keys(x)
    if not futures or {f.key for f in futures} != set(keys.values()):
        return None
    who = client.who_has(futures)
    info = listed_workers(client)
    itemsize = x.dtype.itemsize
    held: dict[str, list[tuple[tuple[int, ...], int]]] = {}
    for idx, key in keys.items():
        holders = sorted(who.get(key, ()))
        if not holders:
            return None
        nbytes = math.prod(c[i] for c, i in zip(x.chunks, idx)) * itemsize
        held.setdefault(holders[0], []).append((idx, nbytes))
    groups: list[list[tuple[int, ...]]] = []
    for w, blocks in held.items():
        groups.extend(split_by_bytes(blocks, int(info.get(w, {}).get("nthreads", 1) or 1)))
    return groups


def _aligned_graph(
    x: da.Array, target: ZarrTarget, token: str, groups: list[list[tuple[int, ...]]] | None
) -> tuple[dict[Any, Any], Any, list[Any], list[int]]:
    bounds = [chunk_bounds(c).tolist() for c in x.chunks]

    def region(idx: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(b[i], b[i + 1]) for b, i in zip(bounds, idx))

    def rid(idx: tuple[int, ...]) -> int:
        return int(np.ravel_multi_index(idx, x.numblocks))

    expected = [rid(idx) for idx in np.ndindex(*x.numblocks)]
    if groups is None:
        written = x.map_blocks(
            write_block,
            target,
            dtype=object,
            chunks=tuple((1,) * len(c) for c in x.chunks),
            meta=np.empty((0,) * x.ndim, dtype=object),
            name=f"aimss-sink-write-{token}",
        )
        return {}, written, _flat(written.__dask_keys__()), expected
    _, ref = _inputs(x, groups)
    graph: dict[Any, Any] = {}
    for i, group in enumerate(groups):
        key = (f"aimss-sink-write-{token}", i)
        regions = [(region(idx), rid(idx)) for idx in group]
        graph[key] = Task(key, write_blocks, target, regions, List(*(ref(idx) for idx in group)))
    return graph, x, list(graph), expected


def worker_hosts() -> int:
    """How many hosts the cluster's workers run on (1 without a cluster: a local scheduler)."""
    try:
        from distributed import default_client

        workers = listed_workers(default_client())
    except (ValueError, ImportError):
        return 1  # a local scheduler: one process
    return max(len({w.get("host") for w in workers.values()}), 1)


def _in_place_here(in_place: bool, why: str | None, target: ZarrTarget) -> bool:
    """Whether a run that could write in place does, on this cluster; logs why not."""
    if not in_place and why:
        logger.info("aimss: to_zarr into %s: %s", target.describe(), why)
    return in_place


def _in_place_graph(
    x: da.Array, unit: tuple[int, ...], inner: tuple[int, ...] | None, kind: str,
    target: ZarrTarget, token: str, groups: list[list[tuple[int, ...]]] | None,
    bound: tuple[int, int] | None = None,
) -> tuple[dict[Any, Any], Any, list[Any], int, tuple[int, ...]]:
    """Blocks written in place where they are held: nothing moves between workers.

    ``"rows"``: each piece of a block (the rows it gives one unit) is one
    byte range of that unit's file, so the worker holding the block writes
    it there itself (:meth:`~aimss_dask.sink.chunkfiles.RowsInPlace.write_rows`);
    a task's pieces of one unit are one write job (one ``open``, adjacent
    rows in one ``pwritev``).

    ``"chunks"``: each block's inner chunks are encoded by the worker that
    holds the block and appended to their shards' files
    (:meth:`~aimss_dask.sink.shards.ShardWriter.append_chunks`); a task's
    chunks of one shard are one job (one append), and the tasks return where
    their chunks landed, from which the last task writes each shard's index.
    Writers on several hosts (``target.shared``) cannot rely on
    ``O_APPEND``: each job gets a byte range of its shard's file here,
    ``bound = (first offset, most bytes of one encoded chunk)`` times its
    chunks, and writes there.

    Either way the units get their Zarr keys at the end
    (:func:`finish_rows`), once every writer has written every piece; a push
    run would have moved the blocks' rows to each unit's owner first.

    Returns the graph, its dependency, the write tasks' keys, the number of
    jobs (their ids are ``range(n)``) and the grid of units.
    """
    bounds = [chunk_bounds(c).tolist() for c in x.chunks]
    if kind == "rows":
        # Blocks yet to be computed: write behind, overlapping the next
        # block's computation. Blocks in memory: write now, there is
        # nothing to overlap.
        func, extra, nsub = write_rows, (groups is None,), 2

        def pieces_of(idx: tuple[int, ...]) -> Any:
            return row_pieces(idx, bounds, unit)
    else:
        assert inner is not None
        per_shard = tuple(u // c for u, c in zip(unit, inner))
        func, extra, nsub = append_chunks, (), x.ndim

        def pieces_of(idx: tuple[int, ...]) -> Any:
            return inner_chunks(idx, bounds, inner, per_shard)

    graph: dict[Any, Any] = {}
    n = 0
    groups, ref = _inputs(x, groups)
    reserve = kind == "chunks" and target.shared
    if reserve and bound is None:
        raise ValueError("chunks written from several hosts need the bound of an encoded chunk")
    first, per_chunk = bound if bound is not None else (0, 0)
    ends: dict[tuple[int, ...], int] = {}  # per shard: the end of the ranges given so far
    for i, group in enumerate(groups):
        by_unit: dict[tuple[int, ...], list[Any]] = {}
        for j, idx in enumerate(group):
            for coords, src, sub in pieces_of(idx):
                by_unit.setdefault(coords, []).append((j, src, sub))
        jobs, n = Jobs.pack(by_unit, n, x.ndim, nsub)
        key = (f"aimss-sink-{kind}-{token}", i)
        if reserve:
            ranges = []
            for coords, pieces in by_unit.items():  # the jobs' order (Jobs.pack)
                at = ends.get(coords, first)
                ranges.append((at, len(pieces) * per_chunk))
                ends[coords] = at + len(pieces) * per_chunk
            extra = (np.array(ranges, dtype=np.int64),)
        graph[key] = Task(key, func, target, jobs, List(*(ref(idx) for idx in group)), *extra)
    grid = tuple(-(-s // u) for s, u in zip(x.shape, unit))
    return graph, x, list(graph), n, grid


def _push_graph(
    x: da.Array, unit: tuple[int, ...], target: ZarrTarget, token: str,
    groups: list[list[tuple[int, ...]]] | None,
) -> tuple[dict[Any, Any], Any, str, list[int], str]:
    from dask.array.core import normalize_chunks

    new = normalize_chunks(unit, x.shape, dtype=x.dtype)
    grid = tuple(len(c) for c in new)
    name = f"aimss-sink-{token}"
    barrier = f"aimss-seal-{token}"
    create_key = _create_key(token)
    keys = _block_keys(x)
    blocks = np.empty(x.numblocks, dtype=object)
    for idx, key in keys.items():
        blocks[idx] = _Keyed(key)
    pieces = {idx: partition_pieces(idx, x.chunks, new, grid) for idx in keys}
    # Each block's pieces carry its flat index as their origin (a task
    # pushes several blocks, so not the task's index): the run's inputs.
    spec = push_write_spec(token, name, target.describe(), inputs=math.prod(x.numblocks), io_priority=target.io_priority)
    graph: dict[Any, Any] = {
        create_key: Task(
            create_key, create, spec, int(np.prod(grid)),
            main_inputs(blocks, pieces, grid), target, new, x.dtype,
        )
    }
    push_keys = []
    groups, ref = _inputs(x, groups)
    for i, group in enumerate(groups):
        key = (f"aimss-push-{token}", i)
        graph[key] = Task(
            key, push_blocks, TaskRef(create_key), [pieces[idx] for idx in group],
            List(*(ref(idx) for idx in group)),
            [int(np.ravel_multi_index(idx, x.numblocks)) for idx in group],
        )
        push_keys.append(key)
    graph[barrier] = Task(barrier, pushrun.seal, TaskRef(create_key), *(TaskRef(k) for k in push_keys))
    expected = [
        p for p, idx in enumerate(np.ndindex(*grid)) if all(c[i] for c, i in zip(new, idx))
    ]
    return graph, x, barrier, expected, name


def _create_key(token: str) -> str:
    return f"aimss-create-{token}"


class _Keyed:
    """Stands for a block in :func:`~aimss_dask.ops.pieces.main_inputs`, which only needs its ``key``."""

    def __init__(self, key: Any) -> None:
        self.key = key


def _flat(keys: Any) -> list[Any]:
    out: list[Any] = []
    stack = [keys]
    while stack:
        k = stack.pop()
        if isinstance(k, list):
            stack.extend(reversed(k))
        else:
            out.append(k)
    return out
