"""The graph and the tasks of one ``to_zarr`` run.

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

import itertools
import logging
import math
import pickle
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph
from dask.task_spec import List, Task, TaskRef

from aimss_dask.api.runs import finish_run, register_run
from aimss_dask.core.errors import SinkError, StreamNotFoundError
from aimss_dask.core.names import PLUGIN_NAME
from aimss_dask.core.runs import OnLoss
from aimss_dask.node.runs import Run
from aimss_dask.ops import pushrun
from aimss_dask.ops.pieces import chunk_bounds, main_inputs, partition_pieces
from aimss_dask.sink.assembler import UnitAssembler, assemble, row_slabs, unit_regions
from aimss_dask.sink.specs import ZarrWriteSpec, push_write_spec
from aimss_dask.sink.writer import SHARED_KEY, WriteRun, ZarrTarget, writer_for

logger = logging.getLogger("aimss_dask")


def aligned(x_chunks: tuple[tuple[int, ...], ...], unit: tuple[int, ...]) -> bool:
    """Whether every block of ``x`` is a whole number of units (its edges are unit edges)."""
    for c, u in zip(x_chunks, unit):
        edges = np.cumsum(c)[:-1]
        if np.any(edges % u):
            return False
    return True


def write_graph(
    x: da.Array, unit: tuple[int, ...], target: ZarrTarget, raw: bool = False,
    inner: tuple[int, ...] | None = None,
) -> tuple[HighLevelGraph, str]:
    """The run's graph and the key of its last task (which returns the bytes written).

    ``raw``: the direct writer can write rows of the target's units in
    place (uncompressed chunks, or shards of uncompressed full-width chunks).
    ``inner``: the inner chunk shape, where the direct writer can append
    whole inner chunks to the target's shards.
    """
    token = target.run[len("aimss-sink-") :]
    finish_key = f"aimss-sink-finish-{token}"
    # Writes where the blocks are register their run from a task of their
    # own (a push run's create task registers it): writes need not wait for it.
    begin_key = f"aimss-create-{token}"
    begin = Task(begin_key, _begin, ZarrWriteSpec(run_id=target.run, on_loss=OnLoss.RERUN, target=target.describe()))
    groups = _held_groups(x)
    if aligned(x.chunks, unit):
        graph, dep, keys, expected = _aligned_graph(x, target, token, groups)
        graph[begin_key] = begin
        graph[finish_key] = Task(
            finish_key, finish, target, expected, None, List(*(TaskRef(k) for k in keys)),
            TaskRef(begin_key), target.run,
        )
    elif (kind := _in_place_kind(x, unit, raw, inner)) is not None and _one_host():
        graph, dep, keys, njobs, grid = _in_place_graph(x, unit, inner, kind, target, token, groups)
        graph[begin_key] = begin
        graph[finish_key] = Task(
            finish_key, finish_rows, target, njobs, grid, List(*(TaskRef(k) for k in keys)), kind,
            TaskRef(begin_key), target.run,
        )
    else:
        graph, dep, barrier, expected, name = _push_graph(x, unit, target, token, groups)
        graph[finish_key] = Task(finish_key, finish, target, expected, name, List(TaskRef(barrier)))
    return HighLevelGraph.from_collections(finish_key, graph, dependencies=[dep]), finish_key


def _block_keys(x: da.Array) -> dict[tuple[int, ...], Any]:
    return {idx: (x.name, *idx) for idx in np.ndindex(*x.numblocks)}


def _inputs(
    x: da.Array, groups: list[list[tuple[int, ...]]] | None
) -> tuple[list[list[tuple[int, ...]]], Any]:
    """The blocks each task takes (``groups``, or one block per task) and how to refer to a block."""
    keys = _block_keys(x)
    return groups if groups is not None else [[idx] for idx in keys], lambda idx: TaskRef(keys[idx])


def _held_groups(x: da.Array) -> list[list[tuple[int, ...]]] | None:
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
    info = client.scheduler_info().get("workers", {})
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
        groups.extend(_split(blocks, int(info.get(w, {}).get("nthreads", 1) or 1)))
    return groups


def _split(blocks: list[tuple[tuple[int, ...], int]], k: int) -> list[list[tuple[int, ...]]]:
    """``(block, nbytes)`` in order, cut into at most ``k`` runs of about equal bytes."""
    total = sum(n for _, n in blocks)
    out: list[list[tuple[int, ...]]] = [[]]
    done = 0
    for idx, n in blocks:
        # Start the next run once this one has its share of the bytes.
        if out[-1] and len(out) < k and done >= total * len(out) / k:
            out.append([])
        out[-1].append(idx)
        done += n
    return out


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
            _write_block,
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
        graph[key] = Task(key, _write_blocks, target, regions, List(*(ref(idx) for idx in group)))
    return graph, x, list(graph), expected


def _one_host() -> bool:
    """Whether every worker of the cluster (if any) runs on one host, so shares one page cache."""
    try:
        from distributed import default_client

        workers = default_client().scheduler_info()["workers"]
    except (ValueError, ImportError):
        return True  # a local scheduler: one process
    return len({w.get("host") for w in workers.values()}) <= 1


def _in_place_kind(
    x: da.Array, unit: tuple[int, ...], raw: bool, inner: tuple[int, ...] | None
) -> str | None:
    """How ``x``'s blocks can be written in place: ``"rows"``, ``"chunks"``, or None.

    ``"rows"``: blocks cut along the first axis only, into units whose rows
    can be written in place (``raw``). ``"chunks"``: blocks made of whole
    inner chunks (of shape ``inner``) of the shards.
    """
    if raw and aligned(x.chunks[1:], unit[1:]):
        return "rows"
    if inner is not None and aligned(x.chunks, inner):
        return "chunks"
    return None


def _in_place_graph(
    x: da.Array, unit: tuple[int, ...], inner: tuple[int, ...] | None, kind: str,
    target: ZarrTarget, token: str, groups: list[list[tuple[int, ...]]] | None,
) -> tuple[dict[Any, Any], Any, list[Any], int, tuple[int, ...]]:
    """Blocks written in place where they are held: nothing moves between workers.

    ``"rows"``: each piece of a block (the rows it gives one unit) is one
    byte range of that unit's file, so the worker holding the block writes
    it there itself (:meth:`~aimss_dask.sink.direct._RowsInPlace.write_rows`);
    a task's pieces of one unit are one write job (one ``open``, adjacent
    rows in one ``pwritev``).

    ``"chunks"``: each block's inner chunks are encoded by the worker that
    holds the block and appended to their shards' files
    (:meth:`~aimss_dask.sink.direct._ShardWriter.append_chunks`); a task's
    chunks of one shard are one job (one append), and the tasks return where
    their chunks landed, from which the last task writes each shard's index.

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
        func, extra, nsub = _write_rows, (groups is None,), 2

        def pieces_of(idx: tuple[int, ...]) -> Any:
            return _row_pieces(idx, bounds, unit)
    else:
        assert inner is not None
        per_shard = tuple(u // c for u, c in zip(unit, inner))
        func, extra, nsub = _append_chunks, (), x.ndim

        def pieces_of(idx: tuple[int, ...]) -> Any:
            return _inner_chunks(idx, bounds, inner, per_shard)

    graph: dict[Any, Any] = {}
    n = 0
    groups, ref = _inputs(x, groups)
    for i, group in enumerate(groups):
        by_unit: dict[tuple[int, ...], list[Any]] = {}
        for j, idx in enumerate(group):
            for coords, src, sub in pieces_of(idx):
                by_unit.setdefault(coords, []).append((j, src, sub))
        jobs, n = _Jobs.pack(by_unit, n, x.ndim, nsub)
        key = (f"aimss-sink-{kind}-{token}", i)
        graph[key] = Task(key, func, target, jobs, List(*(ref(idx) for idx in group)), *extra)
    grid = tuple(-(-s // u) for s, u in zip(x.shape, unit))
    return graph, x, list(graph), n, grid


def _inner_chunks(
    idx: tuple[int, ...], bounds: list[list[int]], inner: tuple[int, ...], per_shard: tuple[int, ...]
) -> list[tuple[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]], tuple[int, ...]]]:
    """Block ``idx``'s inner chunks: ``(shard coords, (starts, stops) in the block, inner coords in the shard)``.

    The block's edges are inner-chunk edges (the caller checked), so each
    inner chunk it touches lies in it whole (as far as the array goes).
    """
    per_axis = [_cuts(b[i], b[i + 1], c) for b, i, c in zip(bounds, idx, inner)]
    return [
        (
            tuple(a[0] // n for a, n in zip(combo, per_shard)),
            (tuple(a[1] for a in combo), tuple(a[2] for a in combo)),
            tuple(a[0] % n for a, n in zip(combo, per_shard)),
        )
        for combo in itertools.product(*per_axis)
    ]


def _cuts(s: int, e: int, u: int) -> list[tuple[int, int, int, int, int]]:
    """How the grid of step ``u`` cuts ``[s, e)``, per cell ``k`` it touches.

    Each cut is ``(k, start, stop)`` counted from ``s``, then ``(lo, hi)``
    counted from the cell's start.

    Plain integer arithmetic: NumPy calls per block made planning a
    500-block run take 30 ms.
    """
    out = []
    for k in range(s // u, -(-e // u)):
        lo, hi = max(s, k * u), min(e, (k + 1) * u)
        out.append((k, lo - s, hi - s, lo - k * u, hi - k * u))
    return out


class _Jobs:
    """A task's write jobs, as one table of integers: one opaque argument, few objects.

    One row per piece: ``jid, j, *unit coords, *sub, *starts, *stops``, where
    ``j`` is the block (of the task's blocks) the piece is cut from,
    ``starts``/``stops`` where in the block, and ``sub`` where in the unit
    (``(lo, hi)`` rows, or an inner chunk's coordinates). The rows of one job
    follow each other.

    Why a table: a thousand pieces as tuples of slices were ~6000 objects
    kept by the client, the scheduler and each worker for the whole run
    (every few runs they tipped a full garbage collection, 50-100 ms, into
    the write), and the scheduler plugin's walk of every task's lists and
    tuples for fused partition reads took 13 ms. There is nothing to find
    in here.
    """

    __slots__ = ("ndim", "nsub", "table")

    def __init__(self, table: np.ndarray, ndim: int, nsub: int) -> None:
        self.table, self.ndim, self.nsub = table, ndim, nsub

    @classmethod
    def pack(
        cls, by_unit: dict[tuple[int, ...], list[Any]], first: int, ndim: int, nsub: int
    ) -> tuple[_Jobs, int]:
        """One job per unit of ``by_unit`` (``coords -> [(j, (starts, stops), sub)]``), ids from ``first``.

        Returns the jobs and the next free id.
        """
        flat: list[int] = []
        jid = first
        for coords, pieces in by_unit.items():
            for j, (starts, stops), sub in pieces:
                flat += (jid, j, *coords, *sub, *starts, *stops)
            jid += 1
        width = 2 + 3 * ndim + nsub
        return cls(np.array(flat, dtype=np.int64).reshape(-1, width), ndim, nsub), jid

    def __iter__(self) -> Any:
        """``(jid, unit coords, [(j, slices of the block, sub)])`` per job."""
        nd, ns = self.ndim, self.nsub
        rows = self.table.tolist()
        k = 0
        while k < len(rows):
            jid = rows[k][0]
            end = k
            while end < len(rows) and rows[end][0] == jid:
                end += 1
            pieces = [
                (r[1], tuple(map(slice, r[2 + nd + ns : 2 + 2 * nd + ns], r[2 + 2 * nd + ns :])), tuple(r[2 + nd : 2 + nd + ns]))
                for r in rows[k:end]
            ]
            yield jid, tuple(rows[k][2 : 2 + nd]), pieces
            k = end

    def __reduce__(self) -> Any:
        return (_Jobs, (self.table, self.ndim, self.nsub))


def _row_pieces(
    idx: tuple[int, ...], bounds: list[list[int]], unit: tuple[int, ...]
) -> list[tuple[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]], tuple[int, int]]]:
    """Block ``idx``'s pieces: ``(unit coords, (starts, stops) in the block, (lo, hi) rows of the unit)``.

    The block's edges on every axis but the first are unit edges (the
    caller checked), so each piece spans its unit whole on those axes.
    """
    per_axis = [_cuts(b[i], b[i + 1], u) for b, i, u in zip(bounds, idx, unit)]
    return [
        (tuple(c[0] for c in combo), (tuple(c[1] for c in combo), tuple(c[2] for c in combo)), combo[0][3:])
        for combo in itertools.product(*per_axis)
    ]


def _push_graph(
    x: da.Array, unit: tuple[int, ...], target: ZarrTarget, token: str,
    groups: list[list[tuple[int, ...]]] | None,
) -> tuple[dict[Any, Any], Any, str, list[int], str]:
    new = da.core.normalize_chunks(unit, x.shape, dtype=x.dtype)
    grid = tuple(len(c) for c in new)
    name = f"aimss-sink-{token}"
    barrier = f"aimss-seal-{token}"
    create_key = f"aimss-create-{token}"
    keys = _block_keys(x)
    blocks = np.empty(x.numblocks, dtype=object)
    for idx, key in keys.items():
        blocks[idx] = _Keyed(key)
    pieces = {idx: partition_pieces(idx, x.chunks, new, grid) for idx in keys}
    # Each block's pieces carry its flat index as their origin (a task
    # pushes several blocks, so not the task's index): the run's inputs.
    spec = push_write_spec(token, name, target.describe(), inputs=math.prod(x.numblocks))
    graph: dict[Any, Any] = {
        create_key: Task(
            create_key, _create, spec, int(np.prod(grid)),
            main_inputs(blocks, pieces, grid), target, new, x.dtype,
        )
    }
    push_keys = []
    groups, ref = _inputs(x, groups)
    for i, group in enumerate(groups):
        key = (f"aimss-push-{token}", i)
        graph[key] = Task(
            key, _push_blocks, TaskRef(create_key), [pieces[idx] for idx in group],
            List(*(ref(idx) for idx in group)),
            [int(np.ravel_multi_index(idx, x.numblocks)) for idx in group],
        )
        push_keys.append(key)
    graph[barrier] = Task(barrier, pushrun.seal, [name], *(TaskRef(k) for k in push_keys))
    expected = [
        p for p, idx in enumerate(np.ndindex(*grid)) if all(c[i] for c, i in zip(new, idx))
    ]
    return graph, x, barrier, expected, name


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


# -- tasks -----------------------------------------------------------------------------


def _plugin() -> tuple[Any, Any]:
    """This worker and its AIMSS plugin, or ``(None, None)`` off a distributed worker."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return None, None
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None or getattr(plugin, "store", None) is None:
        raise SinkError(
            "aimss_dask.to_zarr runs on workers with the AIMSS plugin: "
            "client.register_plugin(aimss_dask.AIMSS()) first"
        )
    return worker, plugin


def _queue(target: ZarrTarget, region: tuple[slice, ...], data: np.ndarray, rid: int, behind: bool = True) -> str:
    """Write a region (behind, or now); this worker's address."""
    worker, plugin = _plugin()
    if worker is None:  # a local scheduler: write now
        target.open()[region] = data
        return "local"
    wb = writer_for(plugin, target)
    if behind:
        wb.submit(target, region, data, rid)
    else:
        wb.write_now(target, rid, lambda put: put(region, data))
    return str(worker.address)


def _write_block(block: np.ndarray, target: ZarrTarget, block_info: Any = None) -> np.ndarray:
    """An aligned block still to be computed: queue it whole (it is whole units)."""
    info = block_info[0]
    region = tuple(slice(a, b) for a, b in info["array-location"])
    rid = int(np.ravel_multi_index(info["chunk-location"], info["num-chunks"]))
    out = np.empty((1,) * block.ndim, dtype=object)
    out.flat[0] = _queue(target, region, block, rid)
    return out


def _write_blocks(target: ZarrTarget, regions: list[tuple[tuple[slice, ...], int]], blocks: list[np.ndarray]) -> str:
    """Aligned blocks this worker holds in memory: write each whole, now (nothing to overlap)."""
    addr = "local"
    for (region, rid), block in zip(regions, blocks):
        addr = _queue(target, region, block, rid, behind=False)
    return addr


def _write_rows(target: ZarrTarget, jobs: _Jobs, blocks: list[np.ndarray], behind: bool = True) -> str:
    """Write each job (this task's pieces of one unit) in place in the unit's file.

    ``behind``: queue the jobs on the write-behind thread; else write them
    on this thread, now.
    """
    worker, plugin = _plugin()
    token = target.run
    if worker is None:  # a local scheduler: write now
        writer = _in_place_writer(target, "rows")
        for _, coords, pieces in jobs:
            writer.write_rows(coords, [(rows, blocks[j][src]) for j, src, rows in pieces], token)
        return "local"
    wb = writer_for(plugin, target)
    for jid, coords, pieces in jobs:
        parts = [(rows, blocks[j][src]) for j, src, rows in pieces]

        def job(put: Any, coords: Any = coords, parts: Any = parts) -> int:
            if not hasattr(put, "write_rows"):
                raise SinkError(_NOT_RAW)
            return int(put.write_rows(coords, parts, token))

        if behind:
            wb.submit_job(target, jid, sum(int(p.nbytes) for _, p in parts), job)
        else:
            wb.write_now(target, jid, job)
    return str(worker.address)


def _append_chunks(target: ZarrTarget, jobs: _Jobs, blocks: list[np.ndarray]) -> tuple[str, list[Any]]:
    """Append each job's inner chunks to its shard's file, now; where they landed.

    Now, on the task's thread, not behind: the entries are the task's
    result, which is how the last task learns them (and a recomputed task's
    result replaces the lost one's). Returns this worker's address and
    ``(shard coords, entries)`` per job.
    """
    worker, plugin = _plugin()
    token = target.run
    wb = writer_for(plugin, target) if worker is not None else None
    out: list[Any] = []
    for jid, scoords, chunks in jobs:
        parts = [(icoords, blocks[j][src]) for j, src, icoords in chunks]

        def job(put: Any, scoords: Any = scoords, parts: Any = parts) -> int:
            if not hasattr(put, "append_chunks"):
                raise SinkError(_NOT_SHARDS)
            out.append((scoords, put.append_chunks(scoords, parts, token)))
            return sum(int(p.nbytes) for _, p in parts)

        if wb is None:  # a local scheduler
            job(_in_place_writer(target, "chunks"))
        else:
            wb.write_now(target, jid, job)
    return ("local" if worker is None else str(worker.address)), out


_NOT_SHARDS = (
    "this worker cannot append the array's inner chunks to its shards, though the client "
    "found it could (different Zarr versions on client and workers?)"
)

_NOT_RAW = (
    "this worker cannot write the array's chunks uncompressed in place, though the client "
    "found it could (different Zarr versions on client and workers?)"
)


def _in_place_writer(target: ZarrTarget, kind: str) -> Any:
    """The target's writer of rows in place (``kind`` "rows") or of appended inner chunks ("chunks")."""
    from aimss_dask.sink.direct import in_place_writers

    rows, appender = in_place_writers(target.open())
    writer, refusal = (rows, _NOT_RAW) if kind == "rows" else (appender, _NOT_SHARDS)
    if writer is None:
        raise SinkError(refusal)
    return writer


@pushrun.restartable
def _push_blocks(
    names: list[str], pieces: list[Any], blocks: list[np.ndarray], inputs: list[int] | None = None
) -> int:
    """Push the pieces of these blocks to their units' owners.

    ``inputs[i]``: block ``i``'s flat index in the array, its pieces' origin.
    """
    ids = inputs if inputs is not None else [None] * len(blocks)
    return sum(pushrun.push_pieces(b, names, ps, i) for b, ps, i in zip(blocks, pieces, ids))


def _create(
    spec: ZarrWriteSpec,
    npartitions: int,
    prefer: list[Any],
    target: ZarrTarget,
    chunks: tuple[tuple[int, ...], ...],
    dtype: Any,
) -> list[str]:
    """Create the run's stream, then have each owner write its units as they complete.

    The stream is a sink's: partitions stay where they were placed (next to
    their main input) and are not freed at seal; the owners drain them.
    """
    from aimss_dask.api import streams as api
    from aimss_dask.api.context import current

    names = pushrun.create(spec, npartitions, prefer)
    stream = api.operator_stream(names[0]).spec
    by_owner: dict[str, list[int]] = {}
    for p, w in enumerate(stream.owners):
        by_owner.setdefault(w, []).append(p)
    ep = current("to_zarr")
    for w, ps in sorted(by_owner.items()):
        factory = pickle.dumps(AssemblerFactory(stream.name, stream.epoch, ps, target, chunks, np.dtype(dtype)))
        ep.call(ep.ask_worker, w, "run_start", factory=factory)
    return names


@dataclass(frozen=True)
class AssemblerFactory:
    """What ``aimss_run_start`` gets for a push run's owner (pickled: it imports this module)."""

    name: str
    epoch: int
    partitions: list[int]
    target: ZarrTarget
    chunks: Any
    dtype: np.dtype

    def make_run(self, plugin: Any) -> AssemblerRun:
        run = AssemblerRun(self.name, self.epoch)
        run.assembler = attach(plugin, run, self.partitions, self.target, self.chunks, self.dtype)
        return run


class AssemblerRun(Run):
    """A push run's owner: writes each unit held here once all its pieces arrived."""

    assembler: UnitAssembler

    def on_append(self, partition: int, records: list[Any]) -> None:
        self.assembler.on_append(partition, records)


def attach(
    plugin: Any,
    owner: AssemblerRun,
    partitions: list[int],
    target: ZarrTarget,
    chunks: Any,
    dtype: np.dtype,
) -> UnitAssembler:
    """The owner's side of :func:`_create`: an assembler that writes complete units."""
    name, epoch = owner.name, owner.epoch
    # Registers the run's WriteRun here now, once, not per unit on the appending thread.
    wb = writer_for(plugin, target)
    # Runs on the event loop: one vectorised lookup for all units, not a
    # NumPy call per unit (hundreds of units per owner).
    regions = unit_regions(partitions, chunks)
    shapes = {p: tuple(r.stop - r.start for r in region) for p, region in regions.items()}
    # Empty units (a zero-length axis) have nothing to write.
    expected = {p: math.prod(s) for p, s in shapes.items() if math.prod(s)}

    def ready(p: int) -> None:
        # On the appending thread: queue only. Its bytes are in the log
        # (under the budget) until the job reads them, so it holds none.
        wb.submit_job(target, p, 0, lambda put: _unit_job(p, put))

    def _unit_job(p: int, put: Any) -> int:
        try:
            records, _, _ = plugin.store.read(name, epoch, p, 0, None)
            # Pieces cut along the first axis only are written as they are;
            # anything else is assembled into one array first.
            out = row_slabs(records, shapes[p], dtype)
            if out is None:
                out = plugin.scratch.array(shapes[p], dtype)
                if assemble(records, out) != out.size:
                    raise SinkError(f"unit {p} of {name!r} is incomplete; this is a bug, please report it")
            del records
            nbytes = put(regions[p], out)
            del out  # views into the log's records: let them go before the trim
            plugin.store.trim(name, epoch, p)  # durable: free its memory now
        except Exception:
            if plugin.runs.get(name) is not owner:
                return 0  # a run that restarted (or was dropped): the new run rewrites it
            raise
        return int(nbytes)

    asm = UnitAssembler(epoch, expected, ready)
    if expected:  # units will be written here (and flushed): make their directories now
        wb.prepare(target, [regions[p] for p in sorted(expected)])
    return asm


@pushrun.restartable
def _begin(spec: ZarrWriteSpec) -> int | None:
    """Register a run whose writes need no stream; its epoch (None: no cluster to register with)."""
    try:
        from distributed import get_worker

        get_worker()
    except ValueError:
        return None  # a local scheduler
    return register_run(spec).epoch


def _end(run_id: str, epoch: int | None) -> None:
    if epoch is not None:
        finish_run(run_id, epoch)


def finish(
    target: ZarrTarget, expected: list[int], stream: str | None, written: list[Any],
    begun: int | None = None, run_id: str = "",
) -> int:
    """The run's last task: wait for every writer, check every region landed; bytes written.

    ``begun``: the epoch the run was registered under by :func:`_begin`
    (a push run's ends when its stream is destroyed).
    """
    from aimss_dask.api import streams as api

    addresses: set[str] = set()
    if stream is not None:
        addresses.update(api.get_stream(stream).spec.owners)
    else:
        for w in written:  # an address, or a 1-element array of one (a fused block task)
            addresses.update([w] if isinstance(w, str) else np.asarray(w, dtype=object).ravel().tolist())
    addresses.discard("local")
    if not addresses:  # written synchronously by a local scheduler
        _end(run_id, begun)
        return 0
    done, nbytes, errors = _flush(target, addresses)
    if stream is not None:
        api.destroy_stream(stream)
    _raise_for(target, errors, expected, done, "Regions already written are complete")
    _end(run_id, begun)
    return nbytes


def finish_rows(
    target: ZarrTarget, njobs: int, grid: tuple[int, ...], written: list[Any], kind: str = "rows",
    begun: int | None = None, run_id: str = "",
) -> int:
    """The last task of a rows (or chunks) run: wait for every writer, then give every unit its key.

    ``written`` is each task's result: its worker's address (``kind``
    "rows"), or the address and where its chunks landed in which shards
    ("chunks": appended in place), from which each shard's index is written
    first. Writes in place are safe on one host only (checked when the
    graph was built); a run whose writers turn out to span hosts (a
    cluster that grew) fails here instead of committing.

    Only when all ``njobs`` jobs are written does any unit of ``grid`` get
    its key, so a run whose writes fail changes no unit of the array; its
    partial files are removed.
    """
    expected = list(range(njobs))
    addresses: set[str] = set()
    entries: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}
    for w in written:
        if isinstance(w, str):
            addresses.add(w)
        else:
            addresses.add(w[0])
            for scoords, ents in w[1]:
                entries.setdefault(tuple(scoords), []).extend(ents)
    addresses.discard("local")
    done, nbytes, errors = _flush(target, addresses) if addresses else (list(expected), 0, [])
    writer = None
    try:
        writer = _in_place_writer(target, kind)
        _raise_for(target, errors, expected, done, "No chunk of the array was changed")
        hosts = _hosts(addresses)
        if len(hosts) > 1:
            raise SinkError(
                f"to_zarr into {target.store!r}: chunks were written in place from several hosts "
                f"{sorted(hosts)}, which is safe on one host only (the cluster grew during the run). "
                "No chunk of the array was changed; write again."
            )
        units = list(np.ndindex(*grid))
        if kind == "chunks":
            if len(entries) != len(units):  # every shard holds a chunk, so every one had an append
                missing = sorted(set(units) - set(entries))[:5]
                raise SinkError(f"to_zarr: no chunk of shards {missing} was written; this is a bug, please report it")
            sealed = writer.close_shards(entries, target.run)
            writer.commit(units, sealed)
            writer.discard(target.run)  # partial files of late appends, if any: never committed
        else:
            writer.commit(units, target.run)
    except Exception:
        if writer is not None:
            writer.discard(target.run)
        raise
    _end(run_id, begun)
    return nbytes


def _hosts(addresses: set[str]) -> set[str]:
    from distributed.comm import get_address_host

    return {get_address_host(a) for a in addresses}


def abort(array: Any, target: ZarrTarget, error: BaseException | None = None) -> None:
    """After a failed run: stop its writers everywhere, then remove its partial chunk files.

    A rows run that fails before its last task (a block's computation
    raised) would otherwise leave its partial files next to the chunks:
    never read, but clutter. The writers stop first, so that none writes a
    partial file after the sweep. Best effort: it never hides the failure.
    """
    from aimss_dask.sink.direct import remove_partials

    try:
        try:
            from distributed import default_client

            default_client().run(_abort_run, target.run)
        except ValueError:  # no cluster: a local scheduler's writes are done
            pass
        else:
            finish_run(target.run, None, "failed", error)
        remove_partials(array, target.run)
    except Exception:
        logger.warning("aimss: cleaning up after the failed run %s failed", target.run, exc_info=True)


async def _abort_run(run: str, dask_worker: Any = None) -> int:
    """On a worker: drop the run's queued writes and refuse later ones (off the event loop)."""
    import asyncio

    plugin = dask_worker.plugins.get(PLUGIN_NAME) if dask_worker is not None else None
    writer = plugin.runs.peek_shared(SHARED_KEY) if plugin is not None else None
    if writer is None:
        return 0
    # The queue, not only its WriteRun: a worker with no write of the run yet
    # must refuse any that comes later too.
    dropped = await asyncio.get_running_loop().run_in_executor(None, writer.abort, run)
    await asyncio.get_running_loop().run_in_executor(None, plugin.runs.stop, WriteRun.key(run))
    return dropped


def _flush(target: ZarrTarget, addresses: set[str]) -> tuple[list[int], int, list[str]]:
    """Wait for the run's writers on ``addresses``: regions written, bytes, errors."""
    from aimss_dask.api.context import current

    ep = current("to_zarr")
    done: list[int] = []
    errors: list[str] = []
    nbytes = 0
    for addr in sorted(addresses):
        try:
            reply = ep.call(ep.ask_worker, addr, "run_call", name=WriteRun.key(target.run), operation="flush")
        except StreamNotFoundError:
            continue  # no WriteRun there: this run wrote nothing on that worker
        except Exception as e:  # a writer lost with its queue
            errors.append(f"{addr}: {type(e).__name__}: {e}")
            continue
        try:
            # Flushed: the worker forgets the run (a late write is refused).
            ep.call(ep.ask_worker, addr, "run_stop", name=WriteRun.key(target.run))
        except Exception:  # leaving: its runs go with it
            pass
        done.extend(reply["written"])
        nbytes += reply["bytes"]
        errors.extend(f"{addr}: {m}" for m in reply["errors"])
    return done, nbytes, errors


def _raise_for(target: ZarrTarget, errors: list[str], expected: list[int], done: list[int], kept: str) -> None:
    if errors:
        raise SinkError(
            f"to_zarr into {target.store!r} (component {target.path!r}) failed: "
            + "; ".join(errors[:5])
            + ("" if len(errors) <= 5 else f" (and {len(errors) - 5} more)")
            + f". {kept}; fix the cause and write again."
        )
    missing = sorted(set(expected) - set(done))
    if missing:
        raise SinkError(
            f"to_zarr into {target.store!r}: regions {missing[:10]} were never written "
            f"({len(missing)} of {len(expected)}); this is a bug, please report it"
        )
