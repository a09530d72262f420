"""zstd into reused memory must write the very frames ``numcodecs.Zstd`` (Zarr's codec) writes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from numcodecs import Zstd

from aimss_dask.sink import zstd_into as zi
from aimss_dask.sink.direct import direct_writer


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300_000),  # a chunk is never empty
    level=st.sampled_from([0, 1, 3, 9, -1]),
    checksum=st.booleans(),
    cuts=st.lists(st.integers(0, 300_000), max_size=3),
    kind=st.sampled_from(["random", "smooth", "zeros"]),
)
def test_frames_are_numcodecs_frames(n, level, checksum, cuts, kind):
    rng = np.random.default_rng(n)
    x = {"random": rng.random(n), "smooth": np.sin(np.arange(n) / 50.0), "zeros": np.zeros(n)}[kind]
    enc = zi.zstd_into(level, checksum)
    assert enc is not None
    edges = sorted({0, n, *(c % (n + 1) for c in cuts)})
    parts = [x[a:b] for a, b in zip(edges, edges[1:])] or [x]
    a = zi.arena()
    a.reset()
    [frame] = enc(parts, a)
    assert bytes(frame) == Zstd(level=level, checksum=checksum).encode(x)
    np.testing.assert_array_equal(np.frombuffer(Zstd().decode(frame), dtype=x.dtype), x)


def test_frames_of_one_unit_stay_valid_while_the_arena_grows():
    """Frames taken for one unit stay intact however many follow (the arena
    outgrows its buffer), until the next reset."""
    enc = zi.zstd_into(0, False)
    a = zi.Arena()
    a.reset()
    xs = [np.random.default_rng(i).random(50_000 * (i + 1)) for i in range(6)]
    frames = [enc([x], a)[0] for x in xs]
    for x, f in zip(xs, frames):
        assert bytes(f) == Zstd().encode(x)


def test_an_arena_past_its_keep_size_is_let_go(monkeypatch):
    monkeypatch.setattr(zi, "KEEP_BYTES", 1000)
    a = zi.Arena()
    a.take(5000)
    a.reset()
    assert a.take(10).base.nbytes < 5000
    b = zi.Arena()
    b.take(500)
    b.reset()
    first = b.take(400)
    b.reset()
    assert b.take(400).ctypes.data == first.ctypes.data  # reused, not reallocated


def test_threads_compress_at_once_with_their_own_contexts():
    enc = zi.zstd_into(0, True)
    xs = [np.random.default_rng(i).random(200_000) for i in range(4)]
    want = [Zstd(checksum=True).encode(x) for x in xs]
    bad = []

    def run(i):
        a = zi.arena()
        for _ in range(20):
            a.reset()
            if bytes(enc([xs[i]], a)[0]) != want[i]:
                bad.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not bad


def test_the_writer_uses_it_and_falls_back_to_numcodecs(tmp_path, monkeypatch):
    """Chunks and shards written through it read back; where it cannot be
    had (a numcodecs without the symbols), numcodecs writes the same files."""
    x = np.random.default_rng(0).random((40, 6))
    out = {}
    for name, made in (("into", None), ("numcodecs", {(0, False): None})):
        if made is not None:
            monkeypatch.setattr(zi, "_made", made)
        for shards in (None, (20, 6)):
            path = str(tmp_path / f"{name}-{shards}.zarr")
            z = zarr.create_array(path, shape=x.shape, chunks=(10, 6), shards=shards, dtype="f8")
            w = direct_writer(z)
            assert isinstance(w.encode, zi.ZstdInto) is (name == "into")
            assert w((slice(0, 40), slice(0, 6)), x) == x.nbytes
            np.testing.assert_array_equal(zarr.open_array(path)[...], x)
            with open(f"{path}/c/1/0", "rb") as f:
                out[name, shards] = f.read()
    assert out["into", None] == out["numcodecs", None]
    assert out["into", (20, 6)] == out["numcodecs", (20, 6)]


def test_a_library_that_cannot_load_means_numcodecs(monkeypatch):
    monkeypatch.setattr(zi, "_made", {})
    monkeypatch.setattr(zi, "_lib", None)

    def broken():
        raise OSError("no such library")

    monkeypatch.setattr(zi, "_load", broken)
    assert zi.zstd_into(0, False) is None


def test_a_zstd_error_is_raised_not_written():
    enc = zi.zstd_into(0, False)
    a = zi.Arena()
    # A bound of 0 bytes: zstd reports dstSize_tooSmall.
    monkey = zi.ZstdInto(enc._lib, 0, False)
    monkey._lib = type("L", (), {
        "ZSTD_compressBound": staticmethod(lambda n: 0),
        "ZSTD_compress2": enc._lib.ZSTD_compress2,
        "ZSTD_isError": enc._lib.ZSTD_isError,
        "ZSTD_getErrorName": enc._lib.ZSTD_getErrorName,
        "ZSTD_createCCtx": enc._lib.ZSTD_createCCtx,
        "ZSTD_CCtx_setParameter": enc._lib.ZSTD_CCtx_setParameter,
        "ZSTD_freeCCtx": enc._lib.ZSTD_freeCCtx,
        "ZSTD_sizeof_CCtx": enc._lib.ZSTD_sizeof_CCtx,
    })()
    with pytest.raises(RuntimeError, match="zstd: .*too small"):
        monkey([np.ones(1000)], a)


def test_row_parts_are_joined_in_the_arena():
    """A chunk made of several row parts (a push run's pieces) compresses to
    the frame of the joined chunk, and the join takes no fresh buffer."""
    rng = np.random.default_rng(7)
    x = rng.random((1024, 33))
    parts = [x[:100], x[100:101], x[101:1000], x[1000:]]
    enc = zi.zstd_into(0, False)
    a = zi.Arena()
    a.take(10 * x.nbytes)  # room enough: the join and the frame come from here
    a.reset()
    before = a._buf.ctypes.data
    [frame] = enc(parts, a)
    assert bytes(frame) == Zstd().encode(x)
    assert a._buf.ctypes.data == before  # not outgrown: the join and the frame are in it
    at = np.frombuffer(frame, dtype=np.uint8).ctypes.data
    assert before + x.nbytes <= at < before + a._buf.nbytes  # the frame follows the join


def test_a_large_context_is_not_kept(monkeypatch):
    """A context past the cap (high levels hold tens of MiB) is freed after
    use; a small one is kept for the thread's next chunk."""
    x = np.random.default_rng(3).random(100_000)
    small = zi.zstd_into(0, False)
    a = zi.Arena()
    small([x], a)
    kept = small._local.ctx
    small([x], a)
    assert small._local.ctx is kept
    monkeypatch.setattr(zi, "KEEP_CONTEXT_BYTES", 1)
    [frame] = small([x], a)
    assert small._local.ctx is None
    assert bytes(frame) == Zstd().encode(x)
