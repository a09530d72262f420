"""Stream methods that operators provide, without the core importing them."""

from __future__ import annotations

import pytest

import aimss_dask
from aimss_dask.api.extensions import Extension, register_extension
from aimss_dask.sink.stream_sink import stream_to_zarr
from aimss_dask.source.loader import batches


def test_stream_methods_are_the_operators_functions():
    spec = aimss_dask.core.specs.StreamSpec("s", 1, ("tcp://w:1",), 1)
    s = aimss_dask.Stream(spec)
    assert s.to_zarr.func is stream_to_zarr and s.to_zarr.args == (s,)
    assert s.batches.func is batches and s.batches.args == (s,)
    # help() shows the operator's documentation.
    assert s.to_zarr.__doc__ == stream_to_zarr.__doc__
    assert "stream_to_zarr" in aimss_dask.Stream.to_zarr.__doc__


def test_a_missing_provider_is_a_clear_error():
    class Thing:
        fly = Extension("fly-for-test", provider="aimss_dask.wings")

    with pytest.raises(aimss_dask.NotRegisteredError, match=r"Thing\.fly is provided by aimss_dask\.wings"):
        Thing().fly()
    register_extension("fly-for-test", lambda self, how: f"flies {how}")
    assert Thing().fly("high") == "flies high"


def test_any_import_of_the_package_fills_both():
    """A process that holds a Stream has imported aimss_dask (its root package
    runs first), and that registers every provider."""
    import subprocess
    import sys

    code = (
        "import aimss_dask.api.streams\n"
        "from aimss_dask.api import extensions\n"
        "assert {'to_zarr', 'batches'} <= set(extensions._registry), extensions._registry\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
