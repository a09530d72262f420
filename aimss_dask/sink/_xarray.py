"""Zarr output that ``xarray.open_zarr`` opens: dimension names, groups, datasets.

xarray reads a Zarr *group*: each array in it is a variable, whose dimension
names are in the array's metadata (Zarr v3 ``dimension_names``) or in its
``_ARRAY_DIMENSIONS`` attribute (Zarr v2); coordinates are arrays of the
group named in a variable's ``coordinates`` attribute. This module holds what
the sinks need to write that layout:

- dimension names for one array (:func:`dims_kwargs`, :func:`dims_of`), and
  where a named variable goes (:func:`variable_path`);
- the consolidated metadata xarray looks for first (:func:`groups_to_consolidate`,
  :func:`consolidate`), written the way ``xarray.Dataset.to_zarr`` does, so that
  ``xarray.open_zarr(path)`` opens the output without a warning;
- a Dataset or DataArray split into what xarray writes itself (the group,
  every array's metadata, the small in-memory variables) and what the sink
  writes through AIMSS (the Dask-backed variables, CF-encoded exactly as xarray
  would encode them): :func:`prepare` and :func:`write_metadata`.

xarray is optional: this module never imports it at import time, and an
xarray object is recognised by its class's module (:func:`is_xarray`).
Nothing here writes array data of Dask-backed variables; that is the caller's
(:mod:`aimss_dask.sink.array`), so this module imports no other sink module.
"""

from __future__ import annotations

import posixpath
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from aimss_dask.core.errors import InvalidArgumentError

if TYPE_CHECKING:
    import dask.array as da

#: In-memory (NumPy) variables up to this size are written by the client
#: directly with Zarr, as ``xarray.Dataset.to_zarr`` does (coordinates,
#: scalars such as a CRS variable). Larger ones must be Dask arrays so that
#: their bytes are written by the cluster, not pushed through this process.
DIRECT_BYTES = 64 * 2**20

#: The variable name of a plain Dask array written with ``dims=`` or ``name=``
#: and no ``component``.
DEFAULT_NAME = "data"


def is_xarray(x: Any) -> bool:
    """Whether ``x`` is an xarray object, without importing xarray.

    >>> is_xarray(np.ones(3))
    False
    """
    return any(c.__module__.split(".")[0] == "xarray" for c in type(x).__mro__)


def default_dims(ndim: int) -> tuple[str, ...]:
    """xarray's own names for unnamed dimensions.

    >>> default_dims(2)
    ('dim_0', 'dim_1')
    """
    return tuple(f"dim_{i}" for i in range(ndim))


def check_dims(dims: Any, ndim: int | None, what: str) -> tuple[str, ...]:
    """``dims`` as a tuple of distinct non-empty strings, one per axis of ``what``.

    ``ndim=None`` checks everything but the length (an array whose rank is not
    known yet).

    >>> check_dims(["time", "x"], 2, "x")
    ('time', 'x')
    """
    if isinstance(dims, str):
        dims = (dims,)
    try:
        out = tuple(dims)
    except TypeError:
        raise InvalidArgumentError(f"dims={dims!r} is not a sequence of names: give one str per axis") from None
    if not all(isinstance(d, str) and d for d in out) or len(set(out)) != len(out):
        raise InvalidArgumentError(f"dims={dims!r} must be distinct non-empty strings, one per axis")
    if ndim is not None and len(out) != ndim:
        raise InvalidArgumentError(
            f"dims={out!r} names {len(out)} dimension(s), but {what} has {ndim}: give one name per axis"
        )
    return out


def check_name(name: Any) -> str:
    """A variable name: a non-empty str without ``/`` (that would be a group path)."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise InvalidArgumentError(
            f"name={name!r} is not a variable name: give a non-empty str without '/' "
            "(put groups in component=)"
        )
    return name


def variable_path(component: str | None, name: str | None) -> str:
    """Where a named plain array goes: ``component/name``.

    ``component`` is the array's path as always; ``name``, when given, is
    appended to it (``component`` is then the group). Without either, the
    array is :data:`DEFAULT_NAME` at the store's root, which becomes a group.

    >>> variable_path(None, None), variable_path("run1", "t"), variable_path("run1/t", None)
    ('data', 'run1/t', 'run1/t')
    """
    base = (component or "").strip("/")
    if name is not None:
        return posixpath.join(base, check_name(name)) if base else check_name(name)
    return base or DEFAULT_NAME


def dims_kwargs(
    dims: tuple[str, ...], zarr_format: int, array_kwargs: dict[str, Any], where: str
) -> dict[str, Any]:
    """``array_kwargs`` for :func:`zarr.create_array` of an array with dimension names ``dims``.

    Zarr v3 keeps them in the metadata (``dimension_names``), v2 in the
    ``_ARRAY_DIMENSIONS`` attribute, as xarray does. A v2 array also gets
    ``fill_value=None`` unless one is given: xarray masks a v2 array's fill
    value as missing, and Zarr's default of 0 would turn every 0 into NaN.
    """
    out = dict(array_kwargs)
    given = out.pop("dimension_names", None)
    if given is not None and tuple(given) != dims:
        raise InvalidArgumentError(
            f"dimension_names={given!r} and dims={dims!r} disagree for {where}: give only dims="
        )
    if zarr_format == 3:
        out["dimension_names"] = dims
        return out
    attrs = dict(out.get("attributes") or {})
    if "_ARRAY_DIMENSIONS" in attrs and tuple(attrs["_ARRAY_DIMENSIONS"]) != dims:
        raise InvalidArgumentError(
            f"attributes['_ARRAY_DIMENSIONS']={attrs['_ARRAY_DIMENSIONS']!r} and dims={dims!r} "
            f"disagree for {where}: give only dims="
        )
    out["attributes"] = {**attrs, "_ARRAY_DIMENSIONS": list(dims)}
    out.setdefault("fill_value", None)
    return out


def dims_of(arr: Any) -> tuple[str, ...] | None:
    """The dimension names of a Zarr array (v3 metadata, or v2 attribute); None if it has none."""
    names = getattr(arr.metadata, "dimension_names", None)
    if names is None:
        names = arr.attrs.get("_ARRAY_DIMENSIONS")
    if names is None or any(n is None for n in names):
        return None
    return tuple(names)


def open_node(store: Any, path: str, storage_options: dict[str, Any] | None) -> Any:
    """The Zarr node at ``path``, or None where there is none."""
    import zarr

    opts = {"storage_options": storage_options} if storage_options else {}
    try:
        return zarr.open(store, path=path, mode="r", **opts)
    except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
        return None


def groups_to_consolidate(
    store: Any, path: str, storage_options: dict[str, Any] | None, where: str
) -> list[str]:
    """The groups above ``path`` whose consolidated metadata the sink writes, nearest first.

    Called before anything is written. A group the call creates gets
    consolidated metadata (as ``xarray.Dataset.to_zarr`` writes); an existing
    group only if it has some already, so that it stays current. An existing
    group without it is left as it is: consolidated metadata that the next
    writer would not refresh is worse than none. Raises if an ancestor of
    ``path`` is an array: a variable needs a group around it.
    """
    import zarr

    out: list[str] = []
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts) - 1, -1, -1):
        group = "/".join(parts[:i])
        node = open_node(store, group, storage_options)
        if isinstance(node, zarr.Array):
            raise InvalidArgumentError(
                f"{where}: {('group ' + repr(group)) if group else 'the store root'} holds an array, "
                "but a variable needs a group around it: write to another path or component"
            )
        if node is None or node.metadata.consolidated_metadata is not None:
            out.append(group)
    return out


def consolidate(store: Any, groups: Sequence[str], storage_options: dict[str, Any] | None) -> None:
    """Write the consolidated metadata of ``groups`` (nearest first), as xarray does.

    Zarr warns that consolidated metadata is not part of the v3 spec; xarray
    writes it for v3 as well and reads it first, so the warning is expected
    here and silenced. A store that cannot hold it is skipped: xarray then
    reads the metadata of every array, which is slower but correct.
    """
    import zarr

    opts = {"storage_options": storage_options} if storage_options else {}
    for group in groups:
        g = zarr.open_group(store, path=group, mode="r+", **opts)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            try:
                zarr.consolidate_metadata(g.store, path=g.path or None, zarr_format=g.metadata.zarr_format)
            except TypeError:  # a store without consolidated metadata
                return


# -- xarray Datasets ---------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A Dataset split into xarray's part and the sink's part.

    ``template`` is the Dataset xarray writes: every Dask-backed variable is
    replaced by a lazy, never computed, one-chunk array of its shape and
    dtype, so that xarray writes its metadata (dimension names, attributes,
    CF encoding, chunks) and nothing of its data. ``encoding`` is what
    ``to_zarr(encoding=...)`` validates (the variables the caller gave
    encodings for). ``arrays`` are the Dask-backed variables' CF-encoded
    data, by variable name: what the sink writes into the arrays xarray
    created.
    """

    template: Any
    encoding: dict[str, dict[str, Any]]
    arrays: tuple[tuple[str, da.Array], ...]


def prepare(
    obj: Any,
    *,
    name: str | None,
    chunks: Any,
    shards: Any,
    zarr_format: int,
    encoding: Mapping[str, Mapping[str, Any]] | None,
) -> Prepared:
    """Check a DataArray or Dataset and split it (see :class:`Prepared`).

    Everything that can be refused is refused here, before anything is
    written: the whole write is rehearsed in a Zarr ``MemoryStore``.
    """
    import dask.array as da
    import xarray as xr

    if isinstance(obj, xr.DataArray):
        if name is not None:
            vname = check_name(name)
        else:
            vname = obj.name if isinstance(obj.name, str) and obj.name else DEFAULT_NAME
        if isinstance(chunks, (tuple, list)):
            chunks = _per_dim(chunks, obj.dims, "chunks")
        if isinstance(shards, (tuple, list)):
            shards = _per_dim(shards, obj.dims, "shards")
        try:
            ds = obj.to_dataset(name=vname, promote_attrs=False)
        except ValueError as e:  # a coordinate of that name
            raise InvalidArgumentError(
                f"cannot write the DataArray as variable {vname!r}: {e}; pass another name="
            ) from e
    elif isinstance(obj, xr.Dataset):
        if name is not None:
            raise InvalidArgumentError(
                f"name={name!r} names the variable of a DataArray or a plain array; a Dataset's "
                "variables have their names: leave name out"
            )
        ds = obj
    else:
        raise InvalidArgumentError(
            f"to_zarr takes an xarray DataArray or Dataset, not {type(obj).__module__}.{type(obj).__name__}"
        )
    encoding = {str(k): dict(v) for k, v in (encoding or {}).items()}
    unknown = sorted(set(encoding) - {str(k) for k in ds.variables})
    if unknown:
        raise InvalidArgumentError(
            f"encoding= names {unknown}, which are not variables of the dataset "
            f"({sorted(map(str, ds.variables))})"
        )
    chunk_map = _dim_map(chunks, "chunks", ds.dims)
    shard_map = _dim_map(shards, "shards", ds.dims)
    if shard_map and zarr_format == 2:
        raise InvalidArgumentError(f"shards={shards!r} need zarr_format=3; Zarr v2 has no shards")

    template = ds.copy(deep=False)
    encodings: dict[str, dict[str, Any]] = {}
    real: dict[str, Any] = {}
    for key, var in ds.variables.items():
        k = str(key)
        enc = dict(encoding[k]) if k in encoding else dict(var.encoding)
        if var.chunks is None:
            if var.nbytes > DIRECT_BYTES:
                raise InvalidArgumentError(
                    f"variable {k!r} holds {var.nbytes / 2**20:.0f} MiB in this process, not in a Dask "
                    f"array; to_zarr writes in-memory variables of up to {DIRECT_BYTES // 2**20} MiB "
                    f"directly and the rest through the cluster: chunk it first (ds[{k!r}].chunk())"
                )
            if k in encoding:
                encodings[k] = enc
            continue
        if not isinstance(var.data, da.Array):
            raise InvalidArgumentError(
                f"variable {k!r} is a {type(var.data).__module__}.{type(var.data).__name__}, not a Dask "
                "array: to_zarr writes Dask-backed variables (convert with .chunk() on Dask)"
            )
        if any(np.isnan(s) for s in var.shape):
            raise InvalidArgumentError(
                f"variable {k!r} has unknown shape {var.shape}: call compute_chunk_sizes() on its data first"
            )
        zchunks = _chunks_of(enc.get("chunks"), var, chunk_map)
        enc["chunks"] = zchunks
        enc.pop("preferred_chunks", None)  # a reader's hint from an opened dataset, not ours
        if any(d in shard_map for d in var.dims):
            enc["shards"] = tuple(shard_map.get(d, c) for d, c in zip(var.dims, zchunks))
        encodings[k] = enc
        # Lazy and one chunk: xarray builds a store graph of it, which is dropped.
        lazy = da.zeros(var.shape, dtype=var.dtype, chunks=-1) if var.ndim else da.zeros((), dtype=var.dtype)
        tvar = var.copy(deep=False, data=lazy)
        tvar.encoding = enc
        if key in ds.coords:
            template = template.assign_coords({key: tvar})
        else:
            template[key] = tvar
        rvar = var.copy(deep=False)
        rvar.encoding = dict(enc)
        real[k] = rvar
    given = {k: encodings[k] for k in encoding}
    mem = _rehearse(template, given, zarr_format)
    arrays = []
    for k, var in real.items():
        enc_var = _encode(var, k, zarr_format)
        if not isinstance(enc_var.data, da.Array):
            raise InvalidArgumentError(f"xarray encoded variable {k!r} into memory, not a Dask array")
        made = mem[k]
        if tuple(made.shape) != tuple(enc_var.shape) or np.dtype(made.dtype) != enc_var.dtype:
            raise InvalidArgumentError(
                f"variable {k!r} encodes to {enc_var.dtype}{enc_var.shape} but xarray's array for it "
                f"is {made.dtype}{made.shape}: give its dtype in encoding="
            )
        arrays.append((k, enc_var.data))
    return Prepared(template, given, tuple(arrays))


def write_metadata(
    prepared: Prepared,
    store: Any,
    group: str,
    overwrite: bool,
    zarr_format: int,
    storage_options: dict[str, Any] | None,
) -> None:
    """Let xarray create the group: every array's metadata, and the in-memory variables' data.

    ``compute=False`` makes xarray write metadata and in-memory data only; the
    Delayed it returns (the template's lazy zeros) is dropped uncomputed.
    """
    opts = {"storage_options": storage_options} if storage_options else {}
    prepared.template.to_zarr(
        store,
        group=group or None,
        mode="w" if overwrite else "w-",
        compute=False,
        consolidated=False,  # written by consolidate(), after every array exists
        zarr_format=zarr_format,
        encoding=prepared.encoding,
        **opts,
    )


def _rehearse(template: Any, encoding: dict[str, dict[str, Any]], zarr_format: int) -> Any:
    """Write the template's metadata into memory; the group, or a clear error."""
    import zarr

    mem = zarr.storage.MemoryStore()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # they come again on the real write
            template.to_zarr(
                mem, mode="w", compute=False, consolidated=False, zarr_format=zarr_format, encoding=encoding
            )
    except (ValueError, TypeError, NotImplementedError, KeyError) as e:
        raise InvalidArgumentError(f"xarray cannot write this dataset to Zarr v{zarr_format}: {e}") from e
    return zarr.open_group(mem, mode="r")


def _encode(var: Any, name: str, zarr_format: int) -> Any:
    """``var`` CF-encoded exactly as xarray's Zarr backend encodes it (lazily, for Dask data)."""
    try:
        from xarray.backends.zarr import encode_zarr_variable
    except ImportError:  # pragma: no cover - an xarray that moved it
        from xarray.conventions import encode_cf_variable

        return encode_cf_variable(var, name=name)
    try:
        return encode_zarr_variable(var, name=name, zarr_format=zarr_format)
    except TypeError:  # pragma: no cover - an xarray before zarr_format=
        return encode_zarr_variable(var, name=name)


def _per_dim(value: Sequence[Any], dims: tuple[Any, ...], what: str) -> dict[Any, int]:
    if len(value) != len(dims):
        raise InvalidArgumentError(
            f"{what}={tuple(value)!r} has {len(value)} entries for a DataArray with dims {dims}: "
            "give one per dimension, or a dict {dim: size}"
        )
    return dict(zip(dims, value))


def _dim_map(value: Any, what: str, dims: Mapping[Any, int]) -> dict[Any, int]:
    """``chunks=``/``shards=`` of a Dataset as ``{dim: size}`` (an int means every dim)."""
    if value is None:
        return {}
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = dict.fromkeys(dims, int(value))
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(
            f"{what}={value!r} for a Dataset must be a dict {{dim: size}} or an int; "
            f"its dims are {list(dims)}"
        )
    unknown = [d for d in value if d not in dims]
    if unknown:
        raise InvalidArgumentError(f"{what}={value!r} names dims {unknown} the data does not have ({list(dims)})")
    out = {}
    for d, v in value.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise InvalidArgumentError(f"{what}[{d!r}]={v!r} must be a positive int")
        out[d] = int(v)
    return out


def _chunks_of(enc_chunks: Any, var: Any, chunk_map: Mapping[Any, int]) -> tuple[int, ...]:
    """A Dask-backed variable's Zarr chunks: ``chunks=`` where it names the dim, else
    the encoding's (a dataset opened from Zarr keeps its chunks), else the first block."""
    base: tuple[int, ...]
    if (
        isinstance(enc_chunks, (tuple, list))
        and len(enc_chunks) == var.ndim
        and all(isinstance(c, (int, np.integer)) for c in enc_chunks)
    ):
        base = tuple(int(c) for c in enc_chunks)
    else:
        base = tuple(max(int(c[0]), 1) if c else 1 for c in var.chunks)
    return tuple(chunk_map.get(d, b) for d, b in zip(var.dims, base))
