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
complete) is built in :mod:`aimss_dask.sink.graphs`. This module checks
the arguments and the target (before anything is created: a refused call
leaves nothing behind), and writes xarray objects as the group xarray
writes, each Dask-backed variable by one such run
(:mod:`aimss_dask.sink._xarray`).
"""

from __future__ import annotations

import errno
import os
import posixpath
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

import dask
import numpy as np
from dask.delayed import Delayed

from aimss_dask.api.progress import compute as progress_compute
from aimss_dask.api.progress import wanted as progress_wanted
from aimss_dask.core.config import AIMSSConfig
from aimss_dask.core.errors import (
    AIMSSError,
    InvalidArgumentError,
    MissingDependencyError,
    SinkError,
    StoreNotFoundError,
    StoreReadOnlyError,
)
from aimss_dask.core.runs import check_io_priority
from aimss_dask.sink import _xarray as xr_sink
from aimss_dask.sink.direct import in_place_writers
from aimss_dask.sink.durable import sync_metadata, sync_units
from aimss_dask.sink.fstype import decide, fs_kind
from aimss_dask.sink.graphs import worker_hosts, write_graph
from aimss_dask.sink.tasks import abort
from aimss_dask.sink.writer import ZarrTarget

if TYPE_CHECKING:
    # Imported by to_zarr itself, not with aimss_dask (which every worker
    # imports at start).
    import dask.array as da

#: fsspec protocols whose package an extra of aimss-dask installs.
_EXTRAS = {"s3": "s3", "s3a": "s3"}


def to_zarr(
    x: Any,
    store: Any,
    *,
    component: str | None = None,
    chunks: Any = None,
    shards: Any = None,
    zarr_format: int = 3,
    overwrite: bool = False,
    compute: bool = True,
    storage_options: dict[str, Any] | None = None,
    dims: Any = None,
    name: str | None = None,
    durable: bool = False,
    progress: bool | None = None,
    shared_filesystem: bool | None = None,
    io_priority: int = 0,
    **array_kwargs: Any,
) -> Delayed | None:
    """Write ``x`` to Zarr, each shard (or chunk) of each array by exactly one writer.

    Parameters
    ----------
    x
        Any Dask array, with any chunking (regular or not); or an
        ``xarray.DataArray`` or ``xarray.Dataset`` (see *xarray* below).
    store
        A path, an fsspec URL Zarr understands, or a Zarr store.
    component
        The array's path inside the store (``None``: the store's root). For
        xarray data: the group's path (xarray's ``group=``).
    chunks, shards
        The Zarr chunk and shard shapes. ``chunks`` defaults to the shape of
        ``x``'s first block, like :func:`dask.array.to_zarr`. For an existing
        array they default to (and must match) the array's own. For xarray
        data: a dict ``{dim: size}`` or an int (every dim; a tuple for a
        DataArray), applied to its Dask-backed variables.
    zarr_format
        3 (the default) or 2. Shards need format 3.
    overwrite
        Replace an existing array (xarray data: group). Without it an existing
        array must have ``x``'s shape and dtype, and its data outside ``x``
        is kept; an existing xarray group is refused. A folder that holds
        files but no Zarr array or group is never replaced.
    compute
        ``False`` returns a ``Delayed`` that does the writing when computed
        (the metadata, and xarray's in-memory variables, are written at
        once). If a run that writes in place fails (a block's computation
        raised; uncompressed chunks, or shards whose blocks hold whole inner
        chunks), ``compute=True`` removes the partial files it wrote; after
        a failed ``compute=False`` run, files ending in
        ``.aimss-sink-<run>.partial`` may remain next to the chunks. Zarr
        never reads them; delete them at will.
    storage_options
        For an fsspec URL: passed to fsspec (e.g. ``{"auto_mkdir": True}``
        for ``file://``). A protocol whose package is missing (``s3://``
        without ``s3fs``) is refused up front, naming the package.
    dims, name
        For a plain Dask array: write it as an xarray variable, one name per
        axis in ``dims`` (default ``dim_0, dim_1, ...`` when only ``name`` is
        given), stored as v3 ``dimension_names`` or the v2
        ``_ARRAY_DIMENSIONS`` attribute. The array goes to ``component/name``:
        ``component`` is the array's path as always, and ``name``, if given,
        is appended (``component`` is then its group); with neither, it is
        ``"data"`` at the store's root, which becomes a group. The groups the
        call creates get consolidated metadata, as xarray writes it, and so
        do existing groups that have it already, so ``xarray.open_zarr``
        opens the store (or ``group=component``) at once. A v2 array with
        dims gets ``fill_value=None`` unless one is given (xarray would read
        Zarr's default fill value 0 as missing). For a DataArray, ``name``
        names its variable (default: its own name, else ``"data"``).
        Without ``dims`` and ``name``, a plain array is written bare, as it
        always was.
    durable
        ``True``: the run's last task returns only once every unit file it
        wrote, their folders and the metadata are on disk (``fsync``; each
        writer syncs its own files), so a crash of the node right after
        cannot take them. ``False`` (the default, as Zarr and
        ``dask.array.to_zarr``): written files may still sit in the
        operating system's cache. Nothing to do on an object store, where a
        completed write is durable.
    progress
        With ``compute=True``, Dask's progress bar while it writes: ``None``
        where someone watches (a terminal on stderr, a notebook), ``True``
        always, ``False`` never.
    shared_filesystem
        Whether workers on several hosts share the POSIX file system the
        array is written to (a parallel file system), so that each writes
        its rows of uncompressed units in place there, as on one host.
        ``None`` (the default): ``aimss.sink.shared-filesystem``, else found
        from the file system's type (Lustre, GPFS and BeeGFS are shared).
        On NFS, and where it is not known to be shared, workers on several
        hosts push units to one writer each (logged once per call).
    io_priority
        The coordinated I/O scheduler (``aimss.io``) serves the file writes
        of a higher priority first when applications write to one node's
        file system at once; equal priorities take turns. An int, 0 by
        default.
    **array_kwargs
        Passed to :func:`zarr.create_array` for a new array: ``compressors``
        (``None`` for uncompressed), ``filters``, ``fill_value``,
        ``dimension_names``, ``attributes``, ... For xarray data only
        ``encoding={variable: {...}}``, as in ``xarray.Dataset.to_zarr``.

    Notes
    -----
    A DataArray or Dataset is written as the Zarr group that
    ``xarray.Dataset.to_zarr`` writes (variables, coordinates, attributes,
    CF encoding, consolidated metadata), and ``xarray.open_zarr`` opens it
    with identical values. xarray writes the group, every array's metadata
    and the in-memory variables (coordinates; each at most
    :data:`~aimss_dask.sink._xarray.DIRECT_BYTES`); the Dask-backed
    variables are written through AIMSS, in any chunking. xarray is an
    optional dependency (``pip install 'aimss-dask[xarray]'``).

    Examples
    --------
    >>> x = da.random.random((100_000, 64), chunks=(1000, 64))   # doctest: +SKIP
    >>> aimss_dask.to_zarr(x, "out.zarr", chunks=(1024, 64))     # doctest: +SKIP
    >>> zarr.open_array("out.zarr")[:1024].shape                 # doctest: +SKIP
    (1024, 64)
    >>> aimss_dask.to_zarr(x, "named.zarr", dims=("time", "x"), name="t")  # doctest: +SKIP
    >>> xarray.open_zarr("named.zarr").t.dims                    # doctest: +SKIP
    ('time', 'x')
    >>> ds = xarray.Dataset({"t": (("time", "x"), x)}, coords={"time": np.arange(100_000)})  # doctest: +SKIP
    >>> aimss_dask.to_zarr(ds, "ds.zarr")                        # doctest: +SKIP
    >>> xarray.open_zarr("ds.zarr").identical(ds)                # doctest: +SKIP
    True
    """
    if zarr_format not in (2, 3):
        raise InvalidArgumentError(f"zarr_format={zarr_format!r}: use 3 (the default) or 2")
    if not isinstance(durable, bool):
        raise InvalidArgumentError(f"durable={durable!r} must be True or False")
    if shared_filesystem is not None and not isinstance(shared_filesystem, bool):
        raise InvalidArgumentError(
            f"shared_filesystem={shared_filesystem!r} must be True, False or None (found from the file system)"
        )
    if shards is not None and zarr_format == 2:
        raise InvalidArgumentError(f"shards={shards!r} need zarr_format=3; Zarr v2 has no shards")
    progress_wanted(progress)  # a bad value is refused before anything is written
    io_priority = check_io_priority(io_priority, "to_zarr")
    if xr_sink.is_xarray(x):
        return _xarray_to_zarr(
            x, store, component, chunks, shards, zarr_format, bool(overwrite), compute,
            storage_options, dims, name, array_kwargs, durable, progress, shared_filesystem, io_priority,
        )
    import dask.array as da

    if not isinstance(x, da.Array):
        raise InvalidArgumentError(
            f"to_zarr needs a dask.array.Array or an xarray DataArray/Dataset, got "
            f"{type(x).__module__}.{type(x).__name__}"
        )
    if any(np.isnan(s) for s in x.shape):
        raise InvalidArgumentError(
            f"to_zarr of an array of unknown shape {x.shape}: call x.compute_chunk_sizes() first"
        )
    path = (component or "").strip("/")
    named = dims is not None or name is not None
    if named:
        dims = (
            xr_sink.check_dims(dims, x.ndim, f"x (shape {x.shape})")
            if dims is not None
            else xr_sink.default_dims(x.ndim)
        )
        path = xr_sink.variable_path(component, name)
    store = _check_store(store, storage_options)
    where = _where(store, path)
    _check_local_target(store, path, bool(overwrite), where)
    groups = xr_sink.groups_to_consolidate(store, path, storage_options, where) if named else []
    write = _plan(
        x, store, path, chunks, shards, zarr_format, bool(overwrite), array_kwargs, storage_options, dims,
        durable, shared_filesystem, io_priority,
    )
    _consolidate(store, groups, storage_options, where, durable)
    return _run([write], compute, progress)


def _xarray_to_zarr(
    obj: Any,
    store: Any,
    component: str | None,
    chunks: Any,
    shards: Any,
    zarr_format: int,
    overwrite: bool,
    compute: bool,
    storage_options: dict[str, Any] | None,
    dims: Any,
    name: str | None,
    array_kwargs: dict[str, Any],
    durable: bool = False,
    progress: bool | None = None,
    shared_filesystem: bool | None = None,
    io_priority: int = 0,
) -> Delayed | None:
    """``to_zarr`` of a DataArray or Dataset: xarray writes the group, AIMSS the Dask variables."""
    if dims is not None:
        raise InvalidArgumentError(
            f"dims={dims!r} is for a plain Dask array; an xarray {type(obj).__name__} carries its "
            f"own dims {tuple(obj.dims)}: leave dims out (rename with .rename())"
        )
    encoding = array_kwargs.pop("encoding", None)
    if array_kwargs:
        raise InvalidArgumentError(
            f"{sorted(array_kwargs)} are for a plain Dask array; for xarray data give them per "
            "variable, as xarray does: encoding={name: {...}}"
        )
    prepared = xr_sink.prepare(
        obj, name=name, chunks=chunks, shards=shards, zarr_format=zarr_format, encoding=encoding
    )
    store = _check_store(store, storage_options)
    group = (component or "").strip("/")
    where = _where(store, group)
    _check_local_target(store, group, overwrite, where)
    if not overwrite:
        import zarr

        node = xr_sink.open_node(store, group, storage_options)
        if node is not None:
            kind = "array" if isinstance(node, zarr.Array) else "group"
            raise InvalidArgumentError(
                f"{where} holds a Zarr {kind} already: pass overwrite=True to replace it, "
                "or write to another path or component"
            )
    groups = [group, *xr_sink.groups_to_consolidate(store, group, storage_options, where)]
    try:
        xr_sink.write_metadata(prepared, store, group, overwrite, zarr_format, storage_options)
        if durable:
            _sync_in_memory(store, group, storage_options, {vname for vname, _ in prepared.arrays})
    except OSError as e:
        raise _os_error(e, where) from e
    except (ValueError, TypeError) as e:
        raise InvalidArgumentError(f"xarray cannot create the group at {where}: {e}") from e
    writes = [
        _plan(data, store, posixpath.join(group, vname) if group else vname, None, None,
              zarr_format, False, {}, storage_options, None, durable, shared_filesystem, io_priority)
        for vname, data in prepared.arrays
    ]
    _consolidate(store, groups, storage_options, where, durable)
    return _run(writes, compute, progress)


def _sync_in_memory(store: Any, group: str, storage_options: dict[str, Any] | None, dask_vars: set[str]) -> None:
    """fsync the variables xarray wrote from memory here (coordinates): the Dask ones are the writers'."""
    node = xr_sink.open_node(store, group, storage_options)
    if node is None:
        return
    for vname, arr in node.arrays():
        if vname not in dask_vars:
            sync_units(arr, [tuple(slice(0, n) for n in arr.shape)])
            sync_metadata(arr)


class _Write(NamedTuple):
    """One array's run: the graph's last task, and what :func:`abort` needs."""

    delayed: Delayed
    array: Any
    target: ZarrTarget


def _plan(
    x: da.Array,
    store: Any,
    path: str,
    chunks: Any,
    shards: Any,
    zarr_format: int,
    overwrite: bool,
    array_kwargs: dict[str, Any],
    storage_options: dict[str, Any] | None,
    dims: tuple[str, ...] | None,
    durable: bool = False,
    shared_filesystem: bool | None = None,
    io_priority: int = 0,
) -> _Write:
    """Open or create the array at ``path``, and build the graph that writes ``x`` into it."""
    if storage_options:
        array_kwargs = {**array_kwargs, "storage_options": storage_options}
    arr = _open_or_create(x, store, path, chunks, shards, zarr_format, overwrite, array_kwargs, dims)
    if durable:
        sync_metadata(arr, created=True)  # written here, by this process: synced here
    unit = tuple(arr.shards or arr.chunks) if zarr_format == 3 else tuple(arr.chunks)
    run = f"aimss-sink-{uuid.uuid4().hex[:16]}"
    hosts = worker_hosts()
    declared = shared_filesystem if shared_filesystem is not None else AIMSSConfig.load().sink.shared_filesystem
    in_place, why = decide(declared, fs_kind(store) if hosts > 1 else None, hosts)
    target = ZarrTarget(
        store, path, zarr_format, run, storage_options or None, durable, shared=in_place and hosts > 1,
        io_priority=io_priority,
    )
    rows, appender = in_place_writers(arr)
    hlg, finish_key = write_graph(
        x, unit, target, raw=rows is not None, inner=appender.inner if appender is not None else None,
        in_place=in_place, why=why,
        bound=(appender.first_offset(), appender.chunk_bound()) if appender is not None else None,
    )
    return _Write(Delayed(finish_key, hlg), arr, target)


def _run(writes: list[_Write], compute: bool, progress: bool | None = None) -> Delayed | None:
    """Compute the runs together (or return one Delayed doing it): bytes written in all."""
    if not compute:
        return writes[0].delayed if len(writes) == 1 else dask.delayed(sum)([w.delayed for w in writes])
    try:
        progress_compute(*[w.delayed for w in writes], progress=progress)
    except BaseException as e:
        for w in writes:
            abort(w.array, w.target, e)
        raise
    return None


def _consolidate(
    store: Any, groups: list[str], storage_options: dict[str, Any] | None, where: str, durable: bool = False
) -> None:
    try:
        xr_sink.consolidate(store, groups, storage_options)
        for group in groups if durable else ():
            node = xr_sink.open_node(store, group, storage_options)
            if node is not None:
                sync_metadata(node, created=True)
    except OSError as e:
        raise _os_error(e, where) from e


def _where(store: Any, path: str) -> str:
    return f"{store!r}" + (f" (component {path!r})" if path else "")


def _check_store(store: Any, storage_options: dict[str, Any] | None = None) -> Any:
    import zarr

    if storage_options and (not isinstance(store, (str, os.PathLike)) or "://" not in os.fspath(store)):
        raise InvalidArgumentError(
            f"storage_options={storage_options!r} apply to fsspec URLs only, not to {store!r}"
        )
    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    if isinstance(store, str):
        if "://" in store:
            check_fsspec_protocol(store)
            return store
        # Absolute: the workers need not share this process's directory.
        return os.path.abspath(store)
    if isinstance(store, zarr.storage.MemoryStore):
        raise InvalidArgumentError(
            "a zarr MemoryStore lives in this process, where the workers cannot write to it: "
            "give a path or a shared store"
        )
    if getattr(store, "read_only", False):
        raise StoreReadOnlyError(f"store {store!r} is read-only: open it writable to write to it")
    return store


def check_fsspec_protocol(url: str) -> None:
    """Refuse a URL whose fsspec protocol is unknown or whose package is not installed.

    fsspec reports a missing package (``s3fs`` for ``s3://``) as an
    ``ImportError`` deep in the first open, which Zarr's callers then see as
    an unreadable store; named here, up front, it says what to install.

    >>> check_fsspec_protocol("file:///tmp/out.zarr")
    """
    import fsspec

    for part in url.split("::"):
        if "://" not in part:
            continue
        protocol = part.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            from fsspec.registry import known_implementations

            missing = getattr(e.__cause__, "name", None) or str(
                known_implementations.get(protocol, {}).get("class", protocol)
            ).split(".")[0]
            extra = f" (or pip install 'aimss-dask[{_EXTRAS[protocol]}]')" if protocol in _EXTRAS else ""
            raise MissingDependencyError(
                f"store {url!r} needs the package {missing!r} for {protocol}:// URLs, and it is not "
                f"installed: pip install {missing}{extra}"
            ) from e
        except ValueError as e:
            raise InvalidArgumentError(
                f"store {url!r}: fsspec knows no protocol {protocol!r} ({e}); check the URL"
            ) from e


def _local_folder(store: Any) -> str | None:
    """The folder of a local path or ``file://`` URL; None for other stores."""
    if not isinstance(store, str):
        return None
    if store.startswith("file://"):
        return store[len("file://"):]
    return None if "://" in store else store


def _check_local_target(store: Any, path: str, overwrite: bool, where: str) -> None:
    """Refuse, before anything is written, what a local target cannot become.

    A file where the store's folder would be; a read-only file system (or a
    folder this user may not write); and, with ``overwrite``, a folder that
    holds files but no Zarr node: Zarr would delete its contents, and
    to_zarr deletes nothing it did not create.
    """
    root = _local_folder(store)
    if root is None:
        return
    target = os.path.abspath(os.path.join(root, path) if path else root)
    nearest = target  # the nearest existing path on the way to the target
    while not os.path.lexists(nearest) and os.path.dirname(nearest) != nearest:
        nearest = os.path.dirname(nearest)
    if os.path.lexists(nearest) and not os.path.isdir(nearest):
        raise InvalidArgumentError(
            f"cannot write {where}: {nearest!r} is a file, not a folder; a Zarr store is a folder. "
            "Give another path (to_zarr deletes nothing it did not create)"
        )
    if os.path.isdir(nearest) and not os.access(nearest, os.W_OK):
        raise StoreReadOnlyError(
            f"cannot write {where}: {nearest!r} is not writable (a read-only file system, or "
            "no permission); give a path this user can write. Nothing was written"
        )
    if overwrite and os.path.isdir(target):
        entries = sorted(os.listdir(target))
        if entries and not {"zarr.json", ".zarray", ".zgroup"} & set(entries):
            raise InvalidArgumentError(
                f"overwrite=True would delete the contents of {target!r}, which holds "
                f"{entries[:3]}{'...' if len(entries) > 3 else ''} but no Zarr array or group; "
                "to_zarr deletes nothing it did not create: give another path"
            )


def _os_error(e: OSError, where: str) -> AIMSSError:
    """The project's error for an ``OSError`` of creating ``where``, naming the path and the fix."""
    what = f"{e.strerror or e}" + (f" ({e.filename!r})" if e.filename else "")
    if isinstance(e, PermissionError) or e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreReadOnlyError(
            f"cannot write {where}: {what}; give a path on a file system this user can write"
        )
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        return InvalidArgumentError(
            f"cannot create {where}: {what}: a file is where a folder is needed; give another path "
            "(to_zarr deletes nothing it did not create)"
        )
    if isinstance(e, FileNotFoundError):
        return StoreNotFoundError(f"cannot create {where}: {what}")
    return SinkError(f"cannot create {where}: {type(e).__name__}: {what}")


def _open_or_create(
    x: da.Array,
    store: Any,
    path: str,
    chunks: Any,
    shards: Any,
    zarr_format: int,
    overwrite: bool,
    array_kwargs: dict[str, Any],
    dims: tuple[str, ...] | None = None,
) -> Any:
    """The target array: checked against ``x`` if it exists, created otherwise.

    A new array is created twice: first in a ``MemoryStore``, where Zarr
    checks every argument (chunks, shards, codecs, fill value), then in the
    store. So a refused argument leaves nothing behind, not even a folder.
    """
    import zarr

    where = _where(store, path)
    existing = None
    opts = {"storage_options": array_kwargs["storage_options"]} if "storage_options" in array_kwargs else {}
    if not overwrite:
        try:
            # Either format: one of the other format there is not "nothing"
            # (creating ours beside it would leave readers two arrays).
            existing = zarr.open_array(store, path=path, mode="r", **opts)
        except (FileNotFoundError, KeyError):
            existing = None
        except Exception as e:  # a group there, or unreadable metadata
            if "not found" not in str(e).lower() and "nothing found" not in str(e).lower():
                raise InvalidArgumentError(
                    f"{where} holds something to_zarr cannot write into ({e}); "
                    "pass overwrite=True to replace it"
                ) from None
    if existing is not None:
        if existing.metadata.zarr_format != zarr_format:
            raise InvalidArgumentError(
                f"{where} holds a Zarr v{existing.metadata.zarr_format} array, and zarr_format="
                f"{zarr_format}: nothing was written; pass zarr_format={existing.metadata.zarr_format} "
                "to write into it, overwrite=True to replace it, or write to another path"
            )
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
        if dims is not None and xr_sink.dims_of(existing) != dims:
            raise InvalidArgumentError(
                f"{where} holds an array with dimension names {xr_sink.dims_of(existing)}, not "
                f"dims={dims}: nothing was written; pass overwrite=True to replace it, or write "
                "to another path"
            )
        _check_writable(store, where)
        return existing
    if dims is not None:
        array_kwargs = xr_sink.dims_kwargs(dims, zarr_format, array_kwargs, where)
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
    # The rehearsal in memory refuses bad arguments; nothing is in the store yet.
    rehearsal = {k: v for k, v in kwargs.items() if k not in ("storage_options", "overwrite")}
    _create(zarr.storage.MemoryStore(), rehearsal, where)
    return _create(store, kwargs, where)


def _create(store: Any, kwargs: dict[str, Any], where: str) -> Any:
    """``zarr.create_array(store, **kwargs)``, its errors translated to ours."""
    import zarr

    try:
        return zarr.create_array(store, **kwargs)
    except OSError as e:
        raise _os_error(e, where) from e
    except TypeError as e:
        raise InvalidArgumentError(f"to_zarr cannot create the array at {where}: {e}") from None
    except ValueError as e:
        if "read-only" in str(e) or "read only" in str(e):
            raise StoreReadOnlyError(f"{where} is read-only: {e}") from None
        raise InvalidArgumentError(
            f"cannot create a Zarr array at {where} with chunks={kwargs['chunks']}, "
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


