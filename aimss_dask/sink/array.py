"""``to_zarr`` for Dask Arrays: shard-aligned, one writer per shard, write-behind.

The unit of writing is the Zarr shard (the chunk when the array is not
sharded). Every unit is written whole by one writer, or, for uncompressed
units whose rows come from blocks on several workers of one host, in
disjoint byte ranges of one file that only becomes the unit once every
range is in; either way there are no locks and no read-modify-write of
partial chunks. Where the store is a local directory and the codecs are the
common ones, units are written as the very bytes Zarr would write, without
Zarr's general write path (:mod:`aimss_dask.sink.direct`). The run itself
(aligned blocks written where they are; rows written in place; other blocks
pushed to the unit's owner, which writes each unit as soon as it is
complete) is built in :mod:`aimss_dask.sink._array_run`. This module checks
the arguments and the target array.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import dask.array as da
import numpy as np
from dask.delayed import Delayed

from aimss_dask.errors import (
    InvalidArgumentError,
    StoreNotFoundError,
    StoreReadOnlyError,
)
from aimss_dask.sink._array_run import abort, write_graph
from aimss_dask.sink.direct import in_place_writers
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
        If a run that writes in place fails (a block's computation raised;
        uncompressed chunks, or shards whose blocks hold whole inner
        chunks), ``compute=True`` removes the partial files it wrote; after
        a failed ``compute=False`` run, files ending in
        ``.aimss-sink-<run>.partial`` may remain next to the chunks. Zarr
        never reads them; delete them at will.
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
    rows, appender = in_place_writers(arr)
    hlg, finish_key = write_graph(
        x, unit, target, raw=rows is not None, inner=appender.inner if appender is not None else None,
    )
    out = Delayed(finish_key, hlg)
    if compute:
        try:
            out.compute()
        except BaseException:
            abort(arr, target)
            raise
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


