"""Progress bars: shown where someone watches, or when asked; never otherwise."""

from __future__ import annotations

import doctest
import io
import os

import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import unique_name

import aimss_dask
from aimss_dask.api import progress
from aimss_dask.api.progress import Bar, wanted
from aimss_dask.source import from_zarr


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_shown_where_someone_watches_or_when_asked():
    assert wanted(None, io.StringIO()) is False
    assert wanted(None, _Tty()) is True
    assert wanted(True, io.StringIO()) is True and wanted(False, _Tty()) is False
    with pytest.raises(TypeError, match="progress='yes'"):
        wanted("yes")  # type: ignore[arg-type]
    assert doctest.testmod(progress).failed == 0


def test_the_bar_counts_shows_the_share_done_and_redraws_in_place():
    out = io.StringIO()
    bar = Bar(200, "sink of s", "rows", file=out, interval=0)
    bar.update(50)
    bar.update(100)
    bar.close(200)
    lines = out.getvalue().split("\r")[1:]
    assert [ln.split("|")[0].strip() for ln in lines] == ["sink of s:  25%", "sink of s:  50%", "sink of s: 100%"]
    assert lines[-1].endswith("\n") and "200/200 rows" in lines[-1]
    quiet = io.StringIO()
    hidden = Bar(10, "x", "rows", file=quiet, show=False)
    hidden.update(5)
    hidden.close()
    assert quiet.getvalue() == ""
    open_ended = io.StringIO()
    Bar(None, "loader", "batches", file=open_ended, interval=0).close(7)
    assert open_ended.getvalue().startswith("\rloader: 7 batches [")


def test_to_zarr_shows_daskss_bar_only_when_asked(client, tmp_path, capsys):
    x = da.random.default_rng(0).random((400, 20), chunks=(50, 20))
    aimss_dask.to_zarr(x, str(tmp_path / "quiet.zarr"))  # not a terminal: quiet
    assert "Completed" not in capsys.readouterr().out
    aimss_dask.to_zarr(x, str(tmp_path / "shown.zarr"), progress=True)
    assert "100% Completed" in capsys.readouterr().out
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "shown.zarr"))[:], x.compute())
    with pytest.raises(TypeError, match="progress=1"):
        aimss_dask.to_zarr(x, str(tmp_path / "bad.zarr"), progress=1)
    assert not os.path.exists(tmp_path / "bad.zarr")


def test_the_stream_sink_and_the_loader_draw_their_bars_when_asked(client, tmp_path, capsys):
    s = aimss_dask.create_stream(unique_name("bar"), partitions=2)
    sink = s.to_zarr(str(tmp_path / "s.zarr"), chunks=4)
    for i in range(40):
        s.write(np.full((1, 3), i, dtype=np.int64), partition=i % 2)
    s.seal()
    sink.wait(timeout=60, progress=True)
    err = capsys.readouterr().err
    assert f"sink of {s.name}:" in err and err.rstrip().endswith("]") and "40 rows" in err
    path = str(tmp_path / "x.zarr")
    zarr.create_array(path, shape=(64, 2), chunks=(8, 2), dtype="f8")[:] = np.arange(128.0).reshape(64, 2)
    src = from_zarr(path, name=unique_name("src"))
    with src.batches(16, progress=True) as it:
        assert sum(len(b) for b in it) == 64
    err = capsys.readouterr().err
    assert f"batches of {src.name}: 100% |" in err and "4/4 batches" in err
    again = from_zarr(path, name=unique_name("src"))  # a sequential read trims what it consumed
    with again.batches(16) as it:  # not a terminal: quiet
        assert len(list(it)) == 4
    assert capsys.readouterr().err == ""
