"""Zarr output that xarray (and tensorstore) open: ``aimss_dask.to_zarr`` of xarray
objects, ``dims=``/``name=`` on plain Dask arrays, and the streaming sink with ``dims=``.

Everything runs on the real multi-process cluster of ``conftest.py``.
:func:`_open` turns every warning of ``xarray.open_zarr`` into an error (its
fallback warning, a ``RuntimeWarning``, says a store has no consolidated
metadata), so a test fails if the output is not what xarray reads first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import assert_workers_clean as _clean
from conftest import unique_name

import aimss_dask
from aimss_dask.api.streams import create_stream, destroy_stream
from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.sink import _xarray as xr_sink
from aimss_dask.sink.stream_sink import stream_to_zarr

xr = pytest.importorskip("xarray")


def _open(path: str, **kwargs) -> "xr.Dataset":
    """``xarray.open_zarr`` that fails on any warning (such as its fallback warning
    when a store has no consolidated metadata)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(path, **kwargs)


def _chunk_files(path: str) -> list[str]:
    return [f for _, _, fs in os.walk(path) for f in fs if f not in ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")]


def _dataset() -> "xr.Dataset":
    """Dask data in irregular blocks (which xarray's own to_zarr refuses), a lazy
    datetime variable (CF-encoded), a Dask coordinate, in-memory coordinates
    (strings too), a scalar in-memory data variable, and attributes."""
    rng = da.random.default_rng(7)
    t = rng.random((37, 6), chunks=((10, 20, 7), (4, 2)))
    t = da.where(t < 0.1, 0.0, t)  # zeros: a v2 fill value of 0 would read back as NaN
    when = da.from_array(np.datetime64("2024-01-01", "ns") + np.arange(37) * np.timedelta64(1, "h"), chunks=9)
    return xr.Dataset(
        {
            "t": (("time", "x"), t, {"units": "K", "long_name": "temperature"}),
            "when": (("time",), when),
            "n": (("x",), da.arange(6, chunks=4, dtype="i4")),
            "crs": ((), np.int32(0), {"grid_mapping_name": "latitude_longitude"}),
        },
        coords={
            "time": np.arange(37),
            "x": np.linspace(0.0, 1.0, 6),
            "label": ("x", np.array(list("abcdef"))),
            "weight": (("time",), da.linspace(0, 1, 37, chunks=11)),
        },
        attrs={"title": "aimss round trip", "version": 3},
    )


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_dataset_round_trips_through_open_zarr(client, tmp_path, zarr_format):
    ds = _dataset()
    path = str(tmp_path / "ds.zarr")
    delayed = aimss_dask.to_zarr(ds, path, zarr_format=zarr_format, chunks={"time": 8}, compute=False)
    # The metadata is there, and the in-memory variables; the Dask ones are AIMSS's to write.
    assert _chunk_files(os.path.join(path, "t")) == []
    assert _chunk_files(os.path.join(path, "x")) != []
    assert any(str(k[0] if isinstance(k, tuple) else k).startswith("aimss-") for k in delayed.dask)
    delayed.compute()
    out = _open(path)
    xr.testing.assert_identical(out.compute(), ds.compute())
    assert out["t"].encoding["chunks"] == (8, 4)  # chunks= for "time", the first block for "x"
    assert out["when"].dtype == np.dtype("M8[ns]") and out["weight"].dims == ("time",)
    meta = zarr.open_group(path, mode="r")
    if zarr_format == 3:
        assert meta["t"].metadata.dimension_names == ("time", "x")
        assert meta.metadata.consolidated_metadata is not None
    else:
        assert meta["t"].attrs["_ARRAY_DIMENSIONS"] == ["time", "x"]
        assert os.path.exists(os.path.join(path, ".zmetadata"))
    _clean(aimss_dask.status())


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_dataarray_round_trips_with_its_name_and_coords(client, tmp_path, zarr_format):
    ds = _dataset()
    arr = ds["t"].rename("temperature")
    path = str(tmp_path / "da.zarr")
    aimss_dask.to_zarr(arr, path, zarr_format=zarr_format, chunks=(16, 6), component="grp")
    out = _open(path, group="grp")
    assert list(out.data_vars) == ["temperature"]
    xr.testing.assert_identical(out["temperature"].compute(), arr.compute())
    assert out["temperature"].encoding["chunks"] == (16, 6)
    # name= renames; an unnamed DataArray is "data".
    aimss_dask.to_zarr(arr, str(tmp_path / "named.zarr"), zarr_format=zarr_format, name="t2")
    xr.testing.assert_identical(_open(str(tmp_path / "named.zarr"))["t2"].compute(), arr.rename("t2").compute())
    aimss_dask.to_zarr(arr.rename(None), str(tmp_path / "unnamed.zarr"), zarr_format=zarr_format)
    assert list(_open(str(tmp_path / "unnamed.zarr")).data_vars) == ["data"]


def test_existing_group_needs_overwrite_and_overwrite_replaces_it(client, tmp_path):
    ds = _dataset()
    path = str(tmp_path / "ds.zarr")
    aimss_dask.to_zarr(ds[["n"]], path)
    with pytest.raises(InvalidArgumentError, match=r"holds a Zarr group already: pass overwrite=True"):
        aimss_dask.to_zarr(ds, path)
    assert list(_open(path).data_vars) == ["n"]
    aimss_dask.to_zarr(ds, path, overwrite=True)
    xr.testing.assert_identical(_open(path).compute(), ds.compute())


def test_encoding_is_xarrays_and_an_opened_dataset_writes_again(client, tmp_path):
    """encoding= (packing floats into int16 with a scale factor) is applied by
    the AIMSS writers exactly as xarray would; a dataset opened from Zarr (its
    encoding carries chunks and packing) is written again, identical; and an
    fsspec URL with storage_options takes a group."""
    ds = _dataset()
    enc = {"t": {"dtype": "int16", "scale_factor": 0.001, "_FillValue": -9999, "compressors": None}}
    p = str(tmp_path / "packed.zarr")
    aimss_dask.to_zarr(ds, p, encoding=enc)
    assert zarr.open_array(p, path="t").dtype == np.dtype("int16")
    packed = _open(p)
    np.testing.assert_allclose(packed["t"].values, ds["t"].values, atol=0.0005)
    q = f"file://{tmp_path}/deep/again.zarr"
    aimss_dask.to_zarr(packed, q, component="g", storage_options={"auto_mkdir": True})
    again = _open(str(tmp_path / "deep" / "again.zarr"), group="g")
    assert zarr.open_array(str(tmp_path / "deep" / "again.zarr"), path="g/t").dtype == np.dtype("int16")
    xr.testing.assert_identical(again.compute(), packed.compute())


@pytest.mark.parametrize("driver, zarr_format", [("zarr3", 3), ("zarr", 2)])
def test_tensorstore_reads_the_arrays(client, tmp_path, driver, zarr_format):
    ts = pytest.importorskip("tensorstore")
    ds = _dataset()
    path = str(tmp_path / "ds.zarr")
    aimss_dask.to_zarr(ds, path, zarr_format=zarr_format, chunks={"time": 8})
    x = da.random.default_rng(3).random((300, 20), chunks=(70, 20))
    kw = {"chunks": (25, 10), "shards": (100, 20)} if zarr_format == 3 else {"chunks": (25, 10)}
    aimss_dask.to_zarr(x, str(tmp_path / "plain.zarr"), zarr_format=zarr_format, **kw)
    for where, want in (
        (os.path.join(path, "t"), ds["t"].values),
        (os.path.join(path, "n"), ds["n"].values),
        (str(tmp_path / "plain.zarr"), x.compute()),
    ):
        arr = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": where}}, open=True).result()
        np.testing.assert_array_equal(arr.read().result(), want)


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_plain_array_with_dims_and_name_is_an_xarray_variable(client, tmp_path, zarr_format):
    x = da.random.default_rng(1).random((50, 4), chunks=(13, 3))
    x = da.where(x < 0.2, 0.0, x)  # zeros survive: a v2 array with dims has no fill value
    want = x.compute()
    # dims only: "data" in a group at the root.
    p = str(tmp_path / "a.zarr")
    aimss_dask.to_zarr(x, p, zarr_format=zarr_format, dims=("time", "x"))
    out = _open(p)
    assert list(out.data_vars) == ["data"] and out["data"].dims == ("time", "x")
    np.testing.assert_array_equal(out["data"].values, want)
    # component= is the array's path, as always: it joins the (consolidated) group.
    aimss_dask.to_zarr(x, p, zarr_format=zarr_format, component="t2", dims=("time", "x"))
    assert sorted(_open(p).data_vars) == ["data", "t2"]
    z = zarr.open_array(p, path="t2", mode="r")
    if zarr_format == 3:
        assert z.metadata.dimension_names == ("time", "x")
    else:
        assert z.attrs["_ARRAY_DIMENSIONS"] == ["time", "x"] and z.fill_value is None
    # name only: xarray's default dims; component + name: component is the group.
    q = str(tmp_path / "b.zarr")
    aimss_dask.to_zarr(x, q, zarr_format=zarr_format, component="run1", name="temp")
    out = _open(q, group="run1")
    assert out["temp"].dims == ("dim_0", "dim_1")
    np.testing.assert_array_equal(out["temp"].values, want)
    # Neither: the bare array of old, no group.
    r = str(tmp_path / "c.zarr")
    aimss_dask.to_zarr(x, r, zarr_format=zarr_format)
    assert isinstance(zarr.open(r, mode="r"), zarr.Array)
    _clean(aimss_dask.status())


def test_an_existing_unconsolidated_group_is_not_consolidated(client, tmp_path):
    """Consolidated metadata that the group's other writers would not refresh is
    worse than none: an existing group without it keeps having none."""
    p = str(tmp_path / "g.zarr")
    zarr.create_group(p).create_array("other", shape=(3,), dtype="i1", dimension_names=["k"])
    aimss_dask.to_zarr(da.ones((4,), chunks=2), p, component="mine", dims=("k2",))
    assert zarr.open_group(p, mode="r").metadata.consolidated_metadata is None
    assert sorted(xr.open_zarr(p, consolidated=False).data_vars) == ["mine", "other"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: aimss_dask.to_zarr(da.ones((4, 3)), p, dims=("a",)), r"dims=\('a',\) names 1 dimension\(s\), but x \(shape \(4, 3\)\) has 2"),
        (lambda p: aimss_dask.to_zarr(da.ones((4, 3)), p, dims=("a", "a")), r"dims=\('a', 'a'\) must be distinct"),
        (lambda p: aimss_dask.to_zarr(da.ones((4, 3)), p, dims=("a", 1)), r"dims=\('a', 1\) must be distinct non-empty strings"),
        (lambda p: aimss_dask.to_zarr(da.ones(3), p, name="a/b"), r"name='a/b' is not a variable name"),
        (lambda p: aimss_dask.to_zarr(da.ones(3), p, dims=("k",), dimension_names=("j",)), r"dimension_names=\('j',\) and dims=\('k',\) disagree"),
        (lambda p: aimss_dask.to_zarr(_dataset()["t"], p, dims=("a", "b")), r"dims=\('a', 'b'\) is for a plain Dask array; an xarray DataArray carries its own dims \('time', 'x'\)"),
        (lambda p: aimss_dask.to_zarr(_dataset(), p, name="t"), r"name='t' names the variable of a DataArray"),
        (lambda p: aimss_dask.to_zarr(_dataset(), p, chunks={"depth": 3}), r"names dims \['depth'\] the data does not have"),
        (lambda p: aimss_dask.to_zarr(_dataset(), p, chunks=(3, 3)), r"chunks=\(3, 3\) for a Dataset must be a dict"),
        (lambda p: aimss_dask.to_zarr(_dataset()["t"], p, chunks=(3,)), r"chunks=\(3,\) has 1 entries for a DataArray with dims \('time', 'x'\)"),
        (lambda p: aimss_dask.to_zarr(_dataset(), p, compressors=None), r"\['compressors'\] are for a plain Dask array; .*encoding=\{name: \{...\}\}"),
        (lambda p: aimss_dask.to_zarr(_dataset(), p, encoding={"nope": {}}), r"encoding= names \['nope'\], which are not variables"),
        (lambda p: aimss_dask.to_zarr(_dataset(), p, encoding={"t": {"bogus": 1}}), r"xarray cannot write this dataset .*bogus"),
        (lambda p: aimss_dask.to_zarr(_dataset(), p, shards={"time": 5}, chunks={"time": 3}), r"cannot write this dataset to Zarr v3: .*divisible"),
        (lambda p: aimss_dask.to_zarr([1, 2, 3], p), r"needs a dask.array.Array or an xarray DataArray/Dataset, got builtins.list"),
        (lambda p: aimss_dask.to_zarr(xr.Variable(("x",), da.ones(3)), p), r"takes an xarray DataArray or Dataset, not xarray\..*Variable"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(client, tmp_path, call, match):
    path = str(tmp_path / "out.zarr")
    with pytest.raises((InvalidArgumentError, TypeError), match=match):
        call(path)
    assert not os.path.exists(path)


def test_a_large_in_memory_variable_must_be_chunked(client, tmp_path, monkeypatch):
    """Small in-memory variables are written directly, large ones are refused
    by name: their bytes would go through this process, not the cluster."""
    monkeypatch.setattr(xr_sink, "DIRECT_BYTES", 100)
    ds = xr.Dataset({"big": (("x",), np.ones(20)), "small": (("y",), np.ones(3))})
    path = str(tmp_path / "out.zarr")
    with pytest.raises(InvalidArgumentError, match=r"variable 'big' holds 0 MiB in this process.*ds\['big'\]\.chunk\(\)"):
        aimss_dask.to_zarr(ds, path)
    assert not os.path.exists(path)
    aimss_dask.to_zarr(ds.assign(big=ds["big"].chunk(7)), path)
    xr.testing.assert_identical(_open(path).compute(), ds)


def test_xarray_stays_optional(tmp_path):
    """Without xarray, aimss_dask imports and writes plain arrays with dims
    (a subprocess in which ``import xarray`` fails)."""
    code = f"""
import sys
sys.modules["xarray"] = None  # import xarray raises ImportError
import dask, dask.array as da, zarr
import aimss_dask
from aimss_dask.sink import _xarray
assert sys.modules["xarray"] is None
with dask.config.set(scheduler="sync"):
    aimss_dask.to_zarr(da.arange(6, chunks=3), {str(tmp_path / "a.zarr")!r}, chunks=(3,), dims=("k",))
print(zarr.open_array({str(tmp_path / "a.zarr")!r}, path="data").metadata.dimension_names)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "('k',)"


# -- the streaming sink ---------------------------------------------------------------------


def _frames(s, n):
    for o in range(n):
        s.write(np.full((3, 4), o, dtype="f8"), partition=0)


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_streaming_sink_writes_dimension_names(client, tmp_path, zarr_format):
    path = str(tmp_path / "frames.zarr")
    s = create_stream(unique_name("xr"), partitions=1)
    sink = s.to_zarr(path, component="frames", dims=("t", "x"), chunks=4, zarr_format=zarr_format)
    _frames(s, 7)  # 21 rows: whole chunks and a tail; zeros among them
    s.seal()
    sink.wait(timeout=60)
    z = zarr.open_array(path, path="frames", mode="r")
    assert z.metadata.zarr_format == zarr_format
    if zarr_format == 3:
        assert z.metadata.dimension_names == ("t", "x")
    else:
        assert z.attrs["_ARRAY_DIMENSIONS"] == ["t", "x"]
    out = _open(path)  # consolidated once complete: the final shape
    assert out["frames"].dims == ("t", "x")
    np.testing.assert_array_equal(out["frames"].values, np.repeat(np.arange(7.0), 3)[:, None] * np.ones(4))
    destroy_stream(s.name)


def test_streaming_sink_default_variable_and_bad_dims(client, tmp_path):
    path = str(tmp_path / "frames.zarr")
    s = create_stream(unique_name("xr"), partitions=1)
    sink = s.to_zarr(path, name="f")  # xarray's default dims
    _frames(s, 2)
    s.seal()
    sink.wait(timeout=60)
    assert _open(path)["f"].dims == ("dim_0", "dim_1")
    # A resumed sink on the same array with other dims is refused up front.
    with pytest.raises(InvalidArgumentError, match=r"exists with dimension names \('dim_0', 'dim_1'\), not dims=\('a', 'b'\)"):
        stream_to_zarr(s, path, name="f", dims=("a", "b"))
    destroy_stream(s.name)
    # dims of the wrong rank: known once the first records arrive, raised by wait().
    s = create_stream(unique_name("xr"), partitions=1)
    sink = stream_to_zarr(s, str(tmp_path / "bad.zarr"), dims=("t",))
    _frames(s, 1)
    s.seal()
    with pytest.raises(InvalidArgumentError, match=r"dims=\('t',\) names 1 dimension\(s\), but the records of stream .* has 2"):
        sink.wait(timeout=60)
    assert not os.path.exists(str(tmp_path / "bad.zarr" / "data"))
    destroy_stream(s.name)


def test_consolidated_metadata_is_what_xarray_writes(client, tmp_path):
    """Same layout as xarray's own to_zarr: the group's consolidated metadata
    lists every variable with its dimension names."""
    ds = _dataset()
    ours, theirs = str(tmp_path / "ours.zarr"), str(tmp_path / "theirs.zarr")
    aimss_dask.to_zarr(ds, ours, chunks={"time": 10})
    ds.chunk({"time": 10}).to_zarr(theirs, zarr_format=3)

    def listing(p):
        doc = json.load(open(os.path.join(p, "zarr.json")))
        meta = doc["consolidated_metadata"]["metadata"]
        return doc["attributes"], {k: (v.get("dimension_names"), v["attributes"]) for k, v in meta.items()}

    assert listing(ours) == listing(theirs)
