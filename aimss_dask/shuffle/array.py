"""``rechunk`` of Dask Arrays through AIMSS streams: the shuffle's other face."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
from dask.highlevelgraph import HighLevelGraph
from dask.task_spec import List, Task, TaskRef

from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.ops import pushrun
from aimss_dask.ops.pieces import main_inputs, partition_pieces
from aimss_dask.shuffle import _tasks
from aimss_dask.shuffle.specs import RechunkSpec, push_spec

if TYPE_CHECKING:
    # Imported by rechunk itself, not with aimss_dask (which every worker
    # imports at start).
    import dask.array as da


def rechunk(x: da.Array, chunks: Any, *, replication: int | None = None) -> da.Array:
    """Change the chunking of ``x``, pushing pieces through AIMSS streams.

    Each input block is cut along the new chunk grid and its pieces pushed to
    the worker that owns their output chunk while the input is still being
    computed; each output chunk is then assembled from local memory.
    ``replication``: copies of each output partition (None: the
    ``aimss.replication`` default, capped at the running workers).

    Examples
    --------
    >>> y = aimss_dask.rechunk(x, (x.shape[0], 256))  # row chunks to column chunks  # doctest: +SKIP
    """
    import dask.array as da
    from dask.array.utils import meta_from_array

    if not isinstance(x, da.Array):
        raise InvalidArgumentError(f"rechunk needs a dask.array.Array, got {type(x).__name__}")
    if x.ndim == 0:
        raise InvalidArgumentError("rechunk of a 0-d array: there is nothing to rechunk")
    meta = meta_from_array(x)
    if type(meta) is not np.ndarray:
        # The output chunks are NumPy arrays filled from the pieces: a masked
        # array would lose its mask without a word, a device array fail late.
        raise InvalidArgumentError(
            f"aimss_dask.rechunk moves NumPy blocks; the blocks of this array are "
            f"{type(meta).__module__}.{type(meta).__name__}: use x.rechunk(...), Dask's own"
        )
    try:
        new = da.core.normalize_chunks(chunks, x.shape, dtype=x.dtype, previous_chunks=x.chunks)
    except (ValueError, TypeError) as e:
        raise InvalidArgumentError(
            f"chunks={chunks!r} do not fit an array of shape {x.shape}: {e}"
        ) from None
    if any(sum(c) != s for c, s in zip(new, x.shape)) or len(new) != x.ndim:
        raise InvalidArgumentError(f"chunks={chunks!r} do not add up to the shape {x.shape}")
    if new == x.chunks:
        return x
    hlg, out_name = push_run(x, new, _tasks.read_block, x.dtype, replication=replication)
    return da.Array(hlg, out_name, new, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype))


def push_run(
    x: da.Array,
    new: tuple[tuple[int, ...], ...],
    final: Any,
    *args: Any,
    replication: int | None = None,
) -> tuple[HighLevelGraph, str]:
    """The graph of a push run from ``x``'s chunks to the grid ``new``.

    Returns the graph and the name of its output tasks, one per chunk of
    ``new``, keyed ``(name, *index)``: each calls ``final(stream, partition,
    shape, *args, sealed)`` on the worker that owns the
    chunk's partition (the coordinator pins it), after the barrier
    (``sealed``: the barrier's and the create task's results).

    Each map task gets only its own pieces, cut on the client, so no task
    carries (or the scheduler scans) the chunk tuples of whole arrays.
    """
    grid = tuple(len(c) for c in new)
    token = uuid.uuid4().hex[:16]
    name = f"aimss-rechunk-{token}-0"
    blocks = x.to_delayed()
    # Each push tags its pieces with its block's flat index: the run's inputs.
    spec = push_spec(RechunkSpec, token, [name], grid, inputs=int(blocks.size), replication=replication)
    barrier = spec.barrier
    out_name = spec.output_key()[0]
    create_key = spec.create
    pieces = {idx: partition_pieces(idx, x.chunks, new, grid) for idx in np.ndindex(*blocks.shape)}
    graph: dict[Any, Any] = {
        create_key: Task(
            create_key, pushrun.create, spec, int(np.prod(grid)), main_inputs(blocks, pieces, grid),
        )
    }
    push_keys = []
    for flat, idx in enumerate(np.ndindex(*blocks.shape)):
        key = (f"aimss-push-{token}", *idx)
        graph[key] = Task(
            key, pushrun.push_pieces, TaskRef(blocks[idx].key), TaskRef(create_key), pieces[idx], flat
        )
        push_keys.append(key)
    graph[barrier] = Task(barrier, pushrun.seal, TaskRef(create_key), *(TaskRef(k) for k in push_keys))
    # The output tasks are keyed (PARTITION_TASK_PREFIX + token, *chunk
    # index): the coordinator pins each to the owner of partition
    # ravel(index) of the run's stream.
    # Each also depends on the create task, besides the barrier: with one
    # output chunk, a barrier with one dependent would be fused into it
    # (Dask's linear fusion) under another key, and the coordinator, which
    # follows the run by its barrier's key, could not recover or restart it.
    for idx in np.ndindex(*grid):
        p = int(np.ravel_multi_index(idx, grid))
        shape = tuple(new[a][i] for a, i in enumerate(idx))
        graph[(out_name, *idx)] = Task(
            (out_name, *idx), final, name, p, shape, *args, List(TaskRef(barrier), TaskRef(create_key))
        )
    deps = [blocks.flat[0]] if blocks.size else []
    return HighLevelGraph.from_collections(out_name, graph, dependencies=deps), out_name
