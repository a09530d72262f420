"""zstd compression into memory a thread reuses, with the very zstd Zarr uses.

Zarr compresses a chunk with ``numcodecs.Zstd``, which allocates a fresh
output buffer per chunk and then copies the frame into a ``bytes`` of its
size. In a Dask worker that is expensive: the nanny sets
``MALLOC_TRIM_THRESHOLD_``, which turns off glibc's adaptive mmap threshold,
so every chunk-sized buffer is a fresh ``mmap`` whose pages all fault in (and
are zeroed) on first write. On this machine that made compressing and
writing 1 MiB chunks 45% slower in a worker than in a plain process.

:class:`ZstdInto` calls the same library (the zstd that ``numcodecs`` links
and exports) through :mod:`ctypes` with one compression context per thread
and writes each frame into a per-thread :class:`Arena` that is reused from
one unit to the next. It checks itself against ``numcodecs.Zstd`` when made
and is used only if the frames are byte for byte the same, so what lands on
disk is exactly what Zarr would write. :func:`zstd_into` returns None where
the library cannot be loaded; callers then use ``numcodecs``.

ctypes releases the GIL for the call, as ``numcodecs`` does.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import numpy as np

from aimss_dask.sink.assembler import joined

logger = logging.getLogger("aimss_dask")

#: zstd's parameter ids (zstd.h, stable API).
_C_COMPRESSION_LEVEL = 100
_C_CHECKSUM_FLAG = 201

#: An arena larger than this is let go at its next reset (writers reset once
#: a unit is written): one huge shard must not pin its size in every writer
#: thread for good.
KEEP_BYTES = 64 * 2**20

#: A thread's compression context larger than this is freed after each use.
KEEP_CONTEXT_BYTES = 16 * 2**20


class Arena:
    """Bump allocation from one reused buffer, one unit at a time.

    :meth:`reset` at the start of each unit; what :meth:`take` returned
    before stays valid until then (a buffer outgrown mid-unit stays alive
    through the views into it).
    """

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)
        self._pos = 0

    def reset(self) -> None:
        if self._buf.nbytes > KEEP_BYTES:
            self._buf = np.empty(0, dtype=np.uint8)
        self._pos = 0

    def take(self, n: int) -> np.ndarray:
        """``n`` writable bytes; give back what was not used with :meth:`untake`."""
        if self._pos + n > self._buf.nbytes:
            self._buf = np.empty(max(n, 2 * self._buf.nbytes), dtype=np.uint8)
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def untake(self, n: int) -> None:
        """Return the last ``n`` bytes taken (the unused end of a bound)."""
        self._pos -= n


_local = threading.local()


def arena() -> Arena:
    """This thread's arena."""
    a = getattr(_local, "arena", None)
    if a is None:
        a = _local.arena = Arena()
    return a


class _Context:
    """One thread's compression context; freed with the thread's locals."""

    def __init__(self, lib: Any, level: int, checksum: bool) -> None:
        self._lib = lib
        self.ptr = lib.ZSTD_createCCtx()
        if not self.ptr:
            raise MemoryError("ZSTD_createCCtx failed")
        for param, value in ((_C_COMPRESSION_LEVEL, level), (_C_CHECKSUM_FLAG, int(bool(checksum)))):
            _check(lib, lib.ZSTD_CCtx_setParameter(self.ptr, param, value))

    def __del__(self) -> None:
        if getattr(self, "ptr", None):
            self._lib.ZSTD_freeCCtx(self.ptr)
            self.ptr = None


class ZstdInto:
    """Compress a chunk's parts into the thread's arena: ``encode(parts, arena) -> [frame]``.

    >>> enc = zstd_into(level=0, checksum=False)         # doctest: +SKIP
    >>> a = arena(); a.reset()                            # doctest: +SKIP
    >>> [frame] = enc([np.zeros(1024)], a)                # doctest: +SKIP
    >>> bytes(frame) == numcodecs.Zstd(0).encode(np.zeros(1024))  # doctest: +SKIP
    True
    """

    def __init__(self, lib: Any, level: int, checksum: bool) -> None:
        self._lib = lib
        self.level, self.checksum = int(level), bool(checksum)
        self._local = threading.local()

    def _ctx(self) -> _Context:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = _Context(self._lib, self.level, self.checksum)
        return ctx

    def _keep_or_free(self) -> None:
        # High levels' contexts hold tens of MiB (81 MiB at level 19 for
        # 8 MiB chunks) that Dask does not see: keep only a small one.
        ctx = getattr(self._local, "ctx", None)
        if ctx is not None and self._lib.ZSTD_sizeof_CCtx(ctx.ptr) > KEEP_CONTEXT_BYTES:
            self._local.ctx = None

    def __call__(self, parts: list[np.ndarray], into: Arena) -> list[memoryview]:
        src = np.ascontiguousarray(joined(parts, into))  # row parts joined in the arena
        lib = self._lib
        bound = int(lib.ZSTD_compressBound(src.nbytes))
        out = into.take(bound)
        n = lib.ZSTD_compress2(self._ctx().ptr, out.ctypes.data, bound, src.ctypes.data, src.nbytes)
        self._keep_or_free()
        _check(lib, n)
        into.untake(bound - n)
        return [memoryview(out[:n])]


def _check(lib: Any, code: int) -> None:
    if lib.ZSTD_isError(code):
        raise RuntimeError(f"zstd: {lib.ZSTD_getErrorName(code).decode()}")


def _load() -> Any:
    import numcodecs.zstd

    lib = ctypes.CDLL(numcodecs.zstd.__file__)
    size_t, p = ctypes.c_size_t, ctypes.c_void_p
    lib.ZSTD_createCCtx.restype = p
    lib.ZSTD_createCCtx.argtypes = []
    lib.ZSTD_freeCCtx.restype = size_t
    lib.ZSTD_freeCCtx.argtypes = [p]
    lib.ZSTD_CCtx_setParameter.restype = size_t
    lib.ZSTD_CCtx_setParameter.argtypes = [p, ctypes.c_int, ctypes.c_int]
    lib.ZSTD_compressBound.restype = size_t
    lib.ZSTD_compressBound.argtypes = [size_t]
    lib.ZSTD_compress2.restype = size_t
    lib.ZSTD_compress2.argtypes = [p, p, size_t, p, size_t]
    lib.ZSTD_isError.restype = ctypes.c_uint
    lib.ZSTD_isError.argtypes = [size_t]
    lib.ZSTD_sizeof_CCtx.restype = size_t
    lib.ZSTD_sizeof_CCtx.argtypes = [p]
    lib.ZSTD_getErrorName.restype = ctypes.c_char_p
    lib.ZSTD_getErrorName.argtypes = [size_t]
    return lib


_lib: Any = None
_lock = threading.Lock()
_made: dict[tuple[int, bool], ZstdInto | None] = {}


def zstd_into(level: int, checksum: bool) -> ZstdInto | None:
    """An encoder that writes the frames ``numcodecs.Zstd(level, checksum)`` writes, or None.

    None where numcodecs' zstd cannot be loaded through ctypes, or where a
    sample frame differs from the one ``numcodecs`` makes.
    """
    key = (int(level), bool(checksum))
    with _lock:
        if key not in _made:
            _made[key] = _make(*key)
        return _made[key]


def _make(level: int, checksum: bool) -> ZstdInto | None:
    global _lib
    try:
        from numcodecs import Zstd

        if _lib is None:
            _lib = _load()
        enc = ZstdInto(_lib, level, checksum)
        sample = np.arange(4096, dtype="<f8") % 97
        a = Arena()
        if bytes(enc([sample], a)[0]) != Zstd(level=level, checksum=checksum).encode(sample):
            logger.info("aimss: zstd through ctypes differs from numcodecs; using numcodecs")
            return None
        return enc
    except Exception:
        logger.debug("aimss: zstd through ctypes is unavailable; using numcodecs", exc_info=True)
        return None
