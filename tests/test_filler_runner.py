"""The worker's filler runner, in-process: GPU slices get a stream of their own, exceptions come back as values.

CuPy is replaced by a small fake (its stream API only) where no GPU is
present, so the stream handling of :mod:`aimss_dask.node.filling` runs on
every CI machine; ``tests/gpu/run_gpu_checks.sh`` runs the real one.
"""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import pytest
from distributed.protocol.pickle import dumps

from aimss_dask.node.filling import FillerRunner


class _Stream:
    current: _Stream | None = None

    def __init__(self, null: bool = False, non_blocking: bool = False, priority: int = 0) -> None:
        self.ptr = 0 if null else id(self)
        self.non_blocking, self.priority = non_blocking, priority
        self.synced = 0
        self._prev: _Stream | None = None

    def __enter__(self) -> _Stream:
        self._prev, _Stream.current = _Stream.current, self
        return self

    def __exit__(self, *exc: object) -> None:
        _Stream.current = self._prev

    def synchronize(self) -> None:
        self.synced += 1


NULL = _Stream(null=True)


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    mod = ModuleType("cupy")
    mod.cuda = SimpleNamespace(  # type: ignore[attr-defined]
        Stream=_Stream,
        get_current_stream=lambda: _Stream.current or NULL,
        runtime=SimpleNamespace(deviceGetStreamPriorityRange=lambda: (0, -5)),
    )
    monkeypatch.setitem(sys.modules, "cupy", mod)
    return mod


def stream_seen(budget_s: float) -> bool:
    import cupy

    s = cupy.cuda.get_current_stream()
    stream_seen.seen = (s.ptr, s.non_blocking, s.priority, s)  # type: ignore[attr-defined]
    return True


def broken(budget_s: float) -> bool:
    raise KeyError("no such batch")


def test_a_gpu_slice_runs_on_a_lowest_priority_non_blocking_stream_of_its_own(fake_cupy):
    r = FillerRunner(1)
    try:
        out = r.run_slice("k", dumps((stream_seen, ())), 0.01, True)
        assert out["more"] is True and "error" not in out
        ptr, non_blocking, priority, stream = stream_seen.seen  # type: ignore[attr-defined]
        assert ptr != 0 and non_blocking and priority == 0  # 0: the lowest of (0, -5)
        assert stream.synced == 1  # its work is done when the slice reports
        assert fake_cupy.cuda.get_current_stream() is NULL  # and the thread's stream is back
        # A CPU slice leaves the current stream alone.
        r.run_slice("k", dumps((stream_seen, ())), 0.01, False)
        assert stream_seen.seen[0] == 0  # type: ignore[attr-defined]
        assert r.gpu_running == 0 and r.slices == 2
    finally:
        r.close()


def test_a_slice_that_raises_answers_its_error(fake_cupy):
    r = FillerRunner(1)
    try:
        out = r.run_slice("b", dumps((broken, ())), 0.01, True)
        assert out["more"] is False and out["error"] == "KeyError: 'no such batch'"
        assert "broken" in out["traceback"] and r.gpu_running == 0
        # A payload that cannot be unpickled is an error of the slice too.
        bad = r.run_slice("x", b"not a pickle", 0.01, False)
        assert bad["error"] and bad["more"] is False
    finally:
        r.close()


def test_the_same_key_with_a_new_payload_is_loaded_again():
    r = FillerRunner(1)
    try:
        assert r.run_slice("k", dumps((lambda budget_s: True, ())), 0.01, False)["more"] is True
        assert r.run_slice("k", dumps((lambda budget_s: False, ())), 0.01, False)["more"] is False
    finally:
        r.close()
