"""``to_zarr`` for Dask Arrays: shard-aligned, one writer per shard, write-behind.

The unit of writing is the Zarr shard (the chunk when the array is not
sharded). Every unit has exactly one writer and is written whole, so there
are no locks and no read-modify-write of partial chunks:

- **Aligned input** (every Dask chunk is a whole number of units): the task
  that computes a block hands it to its worker's write-behind queue and
  returns; Dask fuses that task with the block's own computation, so the
  data is written where it is produced and never moves.
- **Misaligned input**: a push run (the machinery of :func:`aimss_dask.rechunk`)
  cuts each block along the unit grid while the input is still being
  computed and pushes the pieces to the worker that owns the unit; after the
  barrier that worker assembles the unit in memory it has touched before and
  queues it for writing.

A last task waits until every worker's queue has written its regions of the
run, checks that every region was written exactly as planned, and raises
:class:`SinkError` otherwise.
"""

from __future__ import annotations

import os
import pickle
import uuid
from typing import Any

import dask.array as da
import numpy as np
from dask._task_spec import List, Task, TaskRef
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from aimss_dask.errors import (
    InvalidArgumentError,
    SinkError,
    StoreNotFoundError,
    StoreReadOnlyError,
)
from aimss_dask.shuffle import _tasks as shuffle_tasks
from aimss_dask.shuffle.array import push_run
from aimss_dask.sink.assembler import UnitAssembler, assemble, unit_region
from aimss_dask.sink.writer import ZarrTarget


def to_zarr(
    x: da.Array,
    store: Any,
    *,
    component: str | None = None,
    chunks: Any = None,
    shards: Any = None,
    zarr_format: int = 3,
    overwrite: bool = False,
    compute: bool = True,
    storage_options: dict[str, Any] | None = None,
    **array_kwargs: Any,
) -> Delayed | None:
    """Write ``x`` to a Zarr array, each shard (or chunk) by exactly one writer.

    Parameters
    ----------
    x
        Any Dask array, with any chunking (regular or not).
    store
        A path, an fsspec URL Zarr understands, or a Zarr store.
    component
        The array's path inside the store (``None``: the store's root).
    chunks, shards
        The Zarr chunk and shard shapes. ``chunks`` defaults to the shape of
        ``x``'s first block, like :func:`dask.array.to_zarr`. For an existing
        array they default to (and must match) the array's own.
    zarr_format
        3 (the default) or 2. Shards need format 3.
    overwrite
        Replace an existing array. Without it an existing array must have
        ``x``'s shape and dtype, and its data outside ``x`` is kept.
    compute
        ``False`` returns a ``Delayed`` that does the writing when computed.
    storage_options
        For an fsspec URL: passed to fsspec (e.g. ``{"auto_mkdir": True}``
        for ``file://``).
    **array_kwargs
        Passed to :func:`zarr.create_array` for a new array: ``compressors``
        (``None`` for uncompressed), ``filters``, ``fill_value``,
        ``dimension_names``, ``attributes``, ...

    Examples
    --------
    >>> x = da.random.random((100_000, 64), chunks=(1000, 64))   # doctest: +SKIP
    >>> aimss_dask.to_zarr(x, "out.zarr", chunks=(1024, 64))     # doctest: +SKIP
    >>> zarr.open_array("out.zarr")[:1024].shape                 # doctest: +SKIP
    (1024, 64)
    """
    if not isinstance(x, da.Array):
        raise InvalidArgumentError(f"to_zarr needs a dask.array.Array, got {type(x).__name__}")
    if any(np.isnan(s) for s in x.shape):
        raise InvalidArgumentError(
            f"to_zarr of an array of unknown shape {x.shape}: call x.compute_chunk_sizes() first"
        )
    if zarr_format not in (2, 3):
        raise InvalidArgumentError(f"zarr_format={zarr_format!r}: use 3 (the default) or 2")
    if shards is not None and zarr_format == 2:
        raise InvalidArgumentError(f"shards={shards!r} need zarr_format=3; Zarr v2 has no shards")
    store = _check_store(store)
    path = component or ""
    if storage_options:
        if not isinstance(store, str) or "://" not in store:
            raise InvalidArgumentError(
                f"storage_options={storage_options!r} apply to fsspec URLs only, not to {store!r}"
            )
        array_kwargs = {**array_kwargs, "storage_options": storage_options}
    arr = _open_or_create(x, store, path, chunks, shards, zarr_format, bool(overwrite), array_kwargs)
    unit = tuple(arr.shards or arr.chunks) if zarr_format == 3 else tuple(arr.chunks)
    run = f"aimss-sink-{uuid.uuid4().hex[:16]}"
    target = ZarrTarget(store, path, zarr_format, run, storage_options or None)
    written, keys = _write_collection(x, unit, target)
    finish_key = f"aimss-sink-finish-{target.run[len('aimss-sink-'):]}"
    task = Task(finish_key, finish, target, len(keys), List(*(TaskRef(k) for k in keys)))
    hlg = HighLevelGraph.from_collections(finish_key, {finish_key: task}, dependencies=[written])
    out = Delayed(finish_key, hlg)
    if compute:
        out.compute()
        return None
    return out


def _check_store(store: Any) -> Any:
    import zarr

    if isinstance(store, os.PathLike):
        return os.fspath(store)
    if isinstance(store, str):
        return store
    if isinstance(store, zarr.storage.MemoryStore):
        raise InvalidArgumentError(
            "a zarr MemoryStore lives in this process, where the workers cannot write to it: "
            "give a path or a shared store"
        )
    if getattr(store, "read_only", False):
        raise StoreReadOnlyError(f"store {store!r} is read-only: open it writable to write to it")
    return store


def _open_or_create(
    x: da.Array,
    store: Any,
    path: str,
    chunks: Any,
    shards: Any,
    zarr_format: int,
    overwrite: bool,
    array_kwargs: dict[str, Any],
) -> Any:
    """The target array: checked against ``x`` if it exists, created otherwise."""
    import zarr

    where = f"{store!r}" + (f" (component {path!r})" if path else "")
    existing = None
    opts = {"storage_options": array_kwargs["storage_options"]} if "storage_options" in array_kwargs else {}
    if not overwrite:
        try:
            existing = zarr.open_array(store, path=path, mode="r", zarr_format=zarr_format, **opts)
        except (FileNotFoundError, KeyError):
            existing = None
        except Exception as e:  # a group there, or unreadable metadata
            if "not found" not in str(e).lower() and "nothing found" not in str(e).lower():
                raise InvalidArgumentError(
                    f"{where} holds something to_zarr cannot write into ({e}); "
                    "pass overwrite=True to replace it"
                ) from None
    if existing is not None:
        if existing.shape != x.shape or existing.dtype != x.dtype:
            raise InvalidArgumentError(
                f"{where} holds an array of shape {existing.shape} and dtype {existing.dtype}, "
                f"but x has shape {x.shape} and dtype {x.dtype}: nothing was written; pass "
                "overwrite=True to replace it, or write to another path"
            )
        for what, want, have in (
            ("chunks", chunks, existing.chunks),
            ("shards", shards, getattr(existing, "shards", None)),
        ):
            if want is not None and _shape(want, x.ndim) != tuple(have or ()):
                raise InvalidArgumentError(
                    f"{what}={want!r} differ from the existing array's {tuple(have or ())} at "
                    f"{where}: leave {what} out, or pass overwrite=True"
                )
        if set(array_kwargs) - {"storage_options"}:
            raise InvalidArgumentError(
                f"{sorted(set(array_kwargs) - {'storage_options'})} apply to a new array, but {where} exists: "
                "leave them out, or pass overwrite=True"
            )
        _check_writable(store, where)
        return existing
    zchunks = _shape(chunks, x.ndim) if chunks is not None else tuple(max(c[0], 1) for c in x.chunks)
    kwargs: dict[str, Any] = dict(
        name=path or None,
        shape=x.shape,
        dtype=x.dtype,
        chunks=zchunks,
        zarr_format=zarr_format,
        overwrite=overwrite,
        **array_kwargs,
    )
    if shards is not None:
        kwargs["shards"] = _shape(shards, x.ndim)
    try:
        return zarr.create_array(store, **kwargs)
    except PermissionError as e:
        raise StoreReadOnlyError(f"cannot write to {where}: {e}") from None
    except FileNotFoundError as e:
        raise StoreNotFoundError(f"cannot create {where}: {e}") from None
    except TypeError as e:
        raise InvalidArgumentError(f"to_zarr cannot create the array at {where}: {e}") from None
    except ValueError as e:
        if "read-only" in str(e) or "read only" in str(e):
            raise StoreReadOnlyError(f"{where} is read-only: {e}") from None
        raise InvalidArgumentError(
            f"cannot create a Zarr array at {where} with chunks={zchunks}, "
            f"shards={kwargs.get('shards')}: {e}"
        ) from None


def _check_writable(store: Any, where: str) -> None:
    if isinstance(store, str) and "://" not in store and not os.access(store, os.W_OK):
        raise StoreReadOnlyError(f"{where} is not writable by this user: nothing was written")


def _shape(value: Any, ndim: int) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise InvalidArgumentError(f"{value!r} is not a shape: give a tuple of ints") from None
    if len(out) != ndim or any(v < 1 for v in out):
        raise InvalidArgumentError(f"{value!r} is not a shape for a {ndim}-d array: give {ndim} positive ints")
    return out


def _aligned(x_chunks: tuple[tuple[int, ...], ...], unit: tuple[int, ...]) -> bool:
    """Whether every block of ``x`` is a whole number of units (its edges are unit edges)."""
    for c, u in zip(x_chunks, unit):
        edges = np.cumsum(c)[:-1]
        if np.any(edges % u):
            return False
    return True


def _write_collection(x: da.Array, unit: tuple[int, ...], target: ZarrTarget) -> tuple[Any, list[Any]]:
    """The write tasks of a run, as a Dask collection, and their keys (region order)."""
    if _aligned(x.chunks, unit):
        written = x.map_blocks(
            _write_block,
            target,
            dtype=object,
            chunks=tuple((1,) * len(c) for c in x.chunks),
            meta=np.empty((0,) * x.ndim, dtype=object),
            name=f"aimss-sink-write-{target.run[len('aimss-sink-'):]}",
        )
        return written, _flat(written.__dask_keys__())
    new = da.core.normalize_chunks(unit, x.shape, dtype=x.dtype)
    hlg, out_name = push_run(
        x, new, _write_unit, x.dtype, target, create=_create, create_args=(target, new, x.dtype),
        per_task=lambda idx: (unit_region(int(np.ravel_multi_index(idx, tuple(len(c) for c in new))), new),),
    )
    keys = [(out_name, *i) for i in np.ndindex(*(len(c) for c in new))]
    return _Collection(hlg, keys), keys


class _Collection:
    """The minimal Dask collection protocol around a graph (for ``from_collections``)."""

    def __init__(self, hlg: HighLevelGraph, keys: list[Any]) -> None:
        self._hlg = hlg
        self._keys = keys

    def __dask_graph__(self) -> HighLevelGraph:
        return self._hlg

    def __dask_layers__(self) -> tuple[str, ...]:
        return tuple(self._hlg.layers)

    def __dask_keys__(self) -> list[Any]:
        return self._keys


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


def _queue(target: ZarrTarget, region: tuple[slice, ...], data: np.ndarray, rid: int) -> str:
    """Hand a region to this worker's write-behind queue; this worker's address."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        # Not on a distributed worker (a local scheduler): write now.
        target.open()[region] = data
        return "local"
    plugin = worker.plugins.get("aimss")
    if plugin is None or getattr(plugin, "store", None) is None:
        raise SinkError(
            "aimss_dask.to_zarr runs on workers with the AIMSS plugin: "
            "client.register_plugin(aimss_dask.AIMSS()) first"
        )
    plugin.sink_writer.submit(target, region, data, rid)
    return worker.address


def _write_block(block: np.ndarray, target: ZarrTarget, block_info: Any = None) -> np.ndarray:
    """An aligned block: queue it whole (it is a whole number of units)."""
    info = block_info[0]
    region = tuple(slice(a, b) for a, b in info["array-location"])
    rid = int(np.ravel_multi_index(info["chunk-location"], info["num-chunks"]))
    addr = _queue(target, region, block, rid)
    out = np.empty((1,) * block.ndim, dtype=object)
    out.flat[0] = addr
    return out


def _create(
    names: list[str],
    npartitions: int,
    barrier: str,
    chunk_tasks: str,
    grid: tuple[int, ...],
    prefer: list[Any],
    target: ZarrTarget,
    chunks: tuple[tuple[int, ...], ...],
    dtype: Any,
) -> list[str]:
    """Create the run's stream, then have each owner write its units as they complete.

    Partitions stay where they were placed (next to their main input): a
    unit may be written before the barrier, so it must not move at seal.
    """
    from aimss_dask.stream import api
    from aimss_dask.stream.context import current

    shuffle_tasks.create(names, npartitions, barrier, chunk_tasks, grid, prefer, balance=False)
    spec = api.get_stream(names[0]).spec
    by_owner: dict[str, list[int]] = {}
    for p, w in enumerate(spec.owners):
        by_owner.setdefault(w, []).append(p)
    ep = current("to_zarr")
    run = pickle.dumps((target, chunks, np.dtype(dtype)))
    for w, ps in sorted(by_owner.items()):
        ep.call(ep.ask_worker, w, "sink_attach", name=spec.name, epoch=spec.epoch, partitions=ps, run=run)
    return names


def attach(plugin: Any, name: str, epoch: int, partitions: list[int], run: bytes) -> UnitAssembler:
    """The owner's side of :func:`_create`: an assembler that queues complete units."""
    target, chunks, dtype = pickle.loads(run)
    grid = tuple(len(c) for c in chunks)
    expected = {
        p: int(np.prod([c[i] for c, i in zip(chunks, np.unravel_index(p, grid))])) for p in partitions
    }

    def ready(p: int) -> None:
        # On the appending thread: queue only. Its bytes are in the log
        # (under the budget) until the job reads them, so it holds none.
        plugin.sink_writer.submit_job(target, p, 0, lambda put: _unit_job(plugin, asm, name, p, put))

    def _unit_job(plugin: Any, asm: UnitAssembler, name: str, p: int, put: Any) -> int:
        try:
            records, _, _ = plugin.store.read(name, epoch, p, 0, None)
            shape = tuple(c[i] for c, i in zip(chunks, np.unravel_index(p, grid)))
            out = plugin.scratch.array(shape, dtype)
            if assemble(records, out) != out.size:
                raise SinkError(f"unit {p} of {name!r} is incomplete; this is a bug, please report it")
            del records
            nbytes = put(unit_region(p, chunks), out)
        except Exception as e:
            asm.done(p, f"{type(e).__name__}: {e}")
            if plugin.assemblers.get(name) is not asm:
                return 0  # a run that restarted (or was dropped): the new run rewrites the unit
            raise
        asm.done(p)
        return int(nbytes)

    asm = UnitAssembler(epoch, expected, ready)
    return asm


@shuffle_tasks._restartable
def _write_unit(
    name: str,
    partition: int,
    shape: tuple[int, ...],
    dtype: Any,
    target: ZarrTarget,
    region: tuple[slice, ...],
    sealed: int,
) -> str:
    """After the barrier: wait for the unit's write-behind, then free the partition.

    A unit that was not written as it completed (an empty unit, or a
    partition that is not where the assembler expected it) is assembled
    from the local log here and queued.
    """
    from distributed import get_worker

    from aimss_dask.stream import api

    worker = get_worker()
    plugin = worker.plugins.get("aimss")
    asm = getattr(plugin, "assemblers", {}).get(name)
    if asm is not None and not asm.start(partition):
        error = asm.wait(partition)
        if error is not None:
            raise SinkError(f"to_zarr could not write unit {partition} on {worker.address}: {error}")
        api.release_partition(name, partition)
        return str(worker.address)
    _, alloc = shuffle_tasks._scratch()
    out = alloc((int(np.prod(shape)),), np.dtype(dtype)).reshape(shape)
    filled = assemble(api.read_from(name, partition=partition), out)
    api.release_partition(name, partition)
    if filled != out.size:
        raise SinkError(
            f"to_zarr unit {partition} of {name!r} got {filled} of {out.size} elements; "
            "this is a bug, please report it"
        )
    return _queue(target, region, out, partition)


def finish(target: ZarrTarget, nregions: int, written: list[Any]) -> int:
    """The run's last task: wait for every writer, check every region landed; bytes written."""
    from aimss_dask.stream.context import current

    addresses: set[str] = set()
    for w in written:  # an address (a unit task) or a 1-element array of one (a block task)
        addresses.update([w] if isinstance(w, str) else np.asarray(w, dtype=object).ravel().tolist())
    addresses.discard("local")
    if not addresses:  # written synchronously by a local scheduler
        return 0
    ep = current("to_zarr")
    done: list[int] = []
    errors: list[str] = []
    nbytes = 0
    for addr in sorted(addresses):
        try:
            reply = ep.call(ep.ask_worker, addr, "sink_flush", run=target.run)
        except Exception as e:  # a writer lost with its queue
            errors.append(f"{addr}: {type(e).__name__}: {e}")
            continue
        done.extend(reply["written"])
        nbytes += reply["bytes"]
        errors.extend(f"{addr}: {m}" for m in reply["errors"])
    if errors:
        raise SinkError(
            f"to_zarr into {target.store!r} (component {target.path!r}) failed: "
            + "; ".join(errors[:5])
            + ("" if len(errors) <= 5 else f" (and {len(errors) - 5} more)")
            + ". Regions already written are complete; fix the cause and write again."
        )
    if sorted(set(done)) != list(range(nregions)):
        missing = sorted(set(range(nregions)) - set(done))
        raise SinkError(
            f"to_zarr into {target.store!r}: regions {missing[:10]} were never written "
            f"({len(missing)} of {nregions}); write again"
        )
    return nbytes

