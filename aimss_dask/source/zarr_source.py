"""``from_zarr``: a stream that storage brokers fill from a Zarr array.

The client (or task) that calls :func:`from_zarr` opens the array once to
check it and learn its shape, creates the stream, and sends each owner worker
an ``aimss_source_start``; the brokers there do all the reading
(:mod:`aimss_dask.source.broker`). Records are *slabs*: one row of Zarr
chunks along axis 0, laid out round robin over the partitions
(:class:`~aimss_dask.source.layout.SourceLayout`).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed.protocol.pickle import dumps

from aimss_dask.api.context import Endpoint, current
from aimss_dask.api.runs import register_run
from aimss_dask.api.streams import Stream, check_int_arg, destroy_stream, type_name
from aimss_dask.core.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    StoreNotFoundError,
)
from aimss_dask.core.specs import StreamSpec, check_name
from aimss_dask.source.broker import SourceFactory
from aimss_dask.source.layout import SourceLayout
from aimss_dask.source.specs import OnLoss, ZarrSourceSpec


def from_zarr(
    store: Any,
    *,
    component: str | None = None,
    name: str | None = None,
    partitions: int | None = None,
    prefetch: int | None = None,
) -> Stream:
    """A stream of a Zarr array's slabs, read ahead by brokers on the owner workers.

    Each record is one *slab*: the rows of one row of Zarr chunks along axis
    0 (``array.chunks[0]`` rows, fewer for the last), as a NumPy array. Slab
    ``k`` is record ``k // partitions`` of partition ``k % partitions``, so
    reading offset 0 of every partition, then offset 1, ... gives the array
    in order. Each partition is sealed once its last slab is in.

    The brokers start at once, in the background of the workers that own
    the partitions, and keep ``prefetch`` records of each partition ahead of
    the slowest consumer group's committed offset, trimming what every group
    has passed (see :mod:`aimss_dask.source.broker`). Read the stream with
    :meth:`Stream.batches` (a training loader) or with :meth:`Stream.read`.
    The stream belongs to the calling client: it is destroyed, and its
    brokers stop, with :func:`aimss_dask.destroy_stream` or when the client
    leaves.

    Parameters
    ----------
    store
        A path or URL of a Zarr store, a Zarr store object, a ``zarr.Array``
        or a ``zarr.Group`` (then with ``component``). Workers open it
        themselves: a local path must be visible to them (the same machine, a
        shared file system).
    component
        Path of the array inside the store, if the store is a group.
    name
        Stream name; default ``zarr-<store name>-<random>``.
    partitions
        Number of partitions; default one per worker (at most one per slab).
    prefetch
        Records (slabs) each broker reads ahead of the consumers, per
        partition. Clamped so that all of a worker's windows fit in a quarter
        of its log budget; ``None`` takes that whole quarter.

    Raises
    ------
    StoreNotFoundError
        The store or the array in it does not exist (before any stream is made).
    InvalidArgumentError
        A 0-d array, a group without ``component``, or a bad argument.

    Examples
    --------
    >>> s = aimss_dask.source.from_zarr("data/images.zarr", prefetch=8)  # doctest: +SKIP
    >>> for x in s.batches(32, shuffle=True, seed=0, epochs=3):          # doctest: +SKIP
    ...     train_step(x)
    >>> aimss_dask.destroy_stream(s.name)                                # doctest: +SKIP
    """
    arr, where, local_root = open_array(store, component)
    if arr.ndim == 0:
        raise InvalidArgumentError(
            f"{where} is a 0-d array; from_zarr streams slabs along axis 0 and needs "
            "at least one dimension"
        )
    for arg, value in (("partitions", partitions), ("prefetch", prefetch)):
        if value is not None and check_int_arg(value, arg, f"give an int >= 1 for {where}, or None") < 1:
            raise InvalidArgumentError(f"{arg}={value!r} for {where}: give an int >= 1, or None")
    partitions = None if partitions is None else int(partitions)
    prefetch = None if prefetch is None else int(prefetch)
    ep = current("from_zarr")
    shape = tuple(int(n) for n in arr.shape)
    slab_rows = max(1, int(arr.chunks[0]))
    slabs = SourceLayout(shape[0], slab_rows, 1).slabs
    if partitions is None:
        workers = len(ep.scheduler_op("status")["workers"])
        partitions = max(1, min(workers, slabs))
    dtype = np.dtype(arr.dtype)
    source = {
        "array": dumps(arr),
        "where": where,
        "rows": shape[0],
        "slab_rows": slab_rows,
        "shape": list(shape),
        "dtype": dtype.str,
        "slab_nbytes": slab_rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize,
        "prefetch": prefetch,
        "local_root": local_root,
    }
    name = check_name(name or _default_name(arr))
    run = ZarrSourceSpec(
        run_id=f"zarr-source-{uuid.uuid4().hex[:16]}", streams=(name,), on_loss=OnLoss.FAIL, target=where,
        # One copy until the source's reader threads follow a promotion (a
        # lost partition fails the source, named, as its policy says).
        replication=1,
    )
    (stream,) = register_run(run, partitions).streams
    try:
        ep.call(_start, ep, stream.spec, source)
    except BaseException:
        try:
            destroy_stream(stream.name)
        except Exception:
            pass  # the original error matters more
        raise
    return stream


def open_array(store: Any, component: str | None) -> tuple[Any, str, str | None]:
    """Open the array to stream, read-only.

    Returns the array, a description for messages, and the store's folder
    when it is a local path (the brokers check it still exists).
    """
    import zarr
    from zarr.errors import NodeTypeValidationError

    if component is not None and not isinstance(component, str):
        raise InvalidTypeError(
            f"component={component!r} is {type_name(component)}, not a str; give the path "
            "of the array inside the store, e.g. component='grp/arr', or None"
        )
    if component == "":
        raise InvalidArgumentError(f"component={component!r} must be a non-empty str or None")
    if isinstance(store, zarr.Array):
        if component is not None:
            raise InvalidArgumentError(
                f"component={component!r} was given with a zarr.Array; pass the array "
                "itself, or its group with the component"
            )
        return store, f"Zarr array {store.store_path}", _local_root(store)
    # What the caller passed: a group error names arrays the way they would pass them.
    given_store, given_component = store, component
    if isinstance(store, zarr.Group):
        if component is None:
            raise InvalidArgumentError(_group_message(f"Zarr group {store.store_path}", store, store, None))
        store_path = store.store_path
        store, component = store_path.store, "/".join(x for x in (store_path.path, component) if x)
    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    if isinstance(store, str) and "://" not in store:
        store = os.path.abspath(store)  # workers may run in another directory
        if not os.path.exists(store):
            raise StoreNotFoundError(
                f"Zarr store {store!r} does not exist; from_zarr reads an existing "
                "array: check the path"
            )
    where = f"Zarr store {store!r}" + (f" component {component!r}" if component else "")
    try:
        arr = zarr.open_array(store=store, path=component or "", mode="r")
    except NodeTypeValidationError:
        group = zarr.open_group(store=store, path=component or "", mode="r")
        raise InvalidArgumentError(_group_message(where, group, given_store, given_component)) from None
    except FileNotFoundError as e:  # zarr's ArrayNotFoundError is one
        raise StoreNotFoundError(
            f"no array in {where} ({e}); check the path and the component"
        ) from e
    return arr, where, _local_root(arr)


def _local_root(arr: Any) -> str | None:
    """The array's own metadata file on a local file system (None: another store).

    Zarr reads a chunk that is not there as the fill value: the brokers
    check that this file still exists around each read, or an array
    removed (its group's folder, or the array alone) would stream zeros.
    """
    from zarr.storage import LocalStore

    if not isinstance(arr.store, LocalStore):
        return None
    name = "zarr.json" if arr.metadata.zarr_format == 3 else ".zarray"
    return os.path.join(str(arr.store.root), arr.path, name) if arr.path else os.path.join(str(arr.store.root), name)


#: Arrays a group error lists by name; a larger hierarchy is summarised.
_LISTED_ARRAYS = 10


def _group_message(where: str, group: Any, store: Any, component: str | None) -> str:
    """Why a group cannot be streamed, and the arrays under it that can.

    Arrays are searched at every depth (``grp/arr`` too, not only direct
    children) and named as ``component=`` takes them with ``store``, as the
    caller passed it: ``component``, the group's own path, comes first.
    """
    import zarr

    prefix = f"{component}/" if component else ""
    arrays = sorted(
        f"{prefix}{path}" for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)
    )
    if not arrays:
        return f"{where} is a group with no array under it; from_zarr streams an array: check the path"
    shown = ", ".join(repr(a) for a in arrays[:_LISTED_ARRAYS])
    if len(arrays) > _LISTED_ARRAYS:
        shown += f", ... ({len(arrays) - _LISTED_ARRAYS} more)"
    how = f"pass component= one of the arrays under it, e.g. component={arrays[0]!r}"
    if isinstance(store, (str, os.PathLike)):
        # A path names an array as well: the store's path joined with the component.
        how += f", or its path {os.fspath(store).rstrip('/') + '/' + arrays[0]!r}"
    return f"{where} is a group, not an array; {how} (arrays: {shown})"


def _default_name(arr: Any) -> str:
    """``zarr-<last part of the array's path>-<random>``: readable in status()."""
    base = str(arr.store_path).rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in base[-40:]).strip("-")
    return f"zarr-{stem or 'array'}-{uuid.uuid4().hex[:8]}"


async def _start(ep: Endpoint, spec: StreamSpec, source: dict[str, Any]) -> None:
    factory = dumps(SourceFactory(spec.to_wire(), source))
    await asyncio.gather(
        *(ep.ask_worker(w, "run_start", factory=factory) for w in sorted(set(spec.owners)))
    )


@dataclass(frozen=True)
class SourceInfo:
    """What a loader needs to know of a source stream, gathered from its owners."""

    spec: StreamSpec
    layout: SourceLayout
    shape: tuple[int, ...]
    dtype: np.dtype
    windows: tuple[int, ...]  # read-ahead of each partition, in records


def describe(spec: StreamSpec, runs: list[dict[str, Any]]) -> SourceInfo:
    """A source's layout and windows from its owners' run status (``SourceRun.status``)."""
    for r in runs:
        if r["epoch"] != spec.epoch:
            raise InvalidArgumentError(
                f"stream {spec.name!r} was replaced while being opened; open it again"
            )
    first = runs[0]
    windows = [1] * spec.partitions
    for r in runs:
        for p, st in r["parts"]:
            windows[p] = st["window"]
    return SourceInfo(
        spec=spec,
        layout=SourceLayout(first["rows"], first["slab_rows"], first["partitions"]),
        shape=tuple(first["shape"]),
        dtype=np.dtype(first["dtype"]),
        windows=tuple(windows),
    )
