"""The worker side of runs: one manager of every operator's run object.

An operator that keeps state on a worker (a sink assembling units from the
records that arrive, a source's brokers reading ahead) does so in a
:class:`Run`. The worker plugin knows this interface, never an operator:
a run is started from a *factory* that travels pickled (``make_run(host)``),
and unpickling it imports the operator's module by reference, the way
distributed's P2P builds its runs from their specs. Per-worker resources that
several runs share (a write-behind queue) live here too, made on first use
and closed with the worker.

Examples
--------
>>> class Count(Run):
...     def __init__(self):
...         super().__init__("s", 1)
...         self.n = 0
...     def on_append(self, partition, records):
...         self.n += len(records)
>>> m = RunManager()
>>> run = m.start(Count())
>>> m.on_append("s", 0, [b"a", b"b"])
>>> run.n
2
>>> m.stop("s")
True
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from distributed.utils import offload

from aimss_dask.core.errors import InvalidArgumentError, StreamNotFoundError

logger = logging.getLogger("aimss_dask")

T = TypeVar("T")


class Run:
    """Worker-side state of one operator run on one stream (``name``, ``epoch``).

    Hooks, all optional:

    - :meth:`on_append`: records just stored in a partition of the run's
      stream on this worker (called on the appending thread: keep it cheap);
    - :meth:`start`: on the event loop, once the manager holds the run;
    - :meth:`call`: an operator RPC (``aimss_run_call``) on the event loop;
    - :meth:`progress`: a plain-data snapshot, from any thread;
    - :meth:`close`: the stream was dropped or the worker closes; idempotent.
      On the event loop (a run of asyncio tasks cancels them there), unless
      ``blocking_close``: a close that waits for threads (writes under way)
      runs in a thread, since those threads may wait for the loop in turn.

    ``run_id``: the id its run is registered under, where that is not the
    run that owns stream ``name`` (the coordinator finds that one by name).
    """

    run_id: str | None = None
    blocking_close = False

    def __init__(self, name: str, epoch: int) -> None:
        self.name = name
        self.epoch = epoch

    def on_append(self, partition: int, records: list[Any]) -> None:
        pass

    async def start(self) -> Any:
        return None

    async def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        raise InvalidArgumentError(
            f"run of stream {self.name!r} ({type(self).__name__}) has no operation {op!r}"
        )

    def progress(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


@runtime_checkable
class RunFactory(Protocol):
    """What ``aimss_run_start`` receives (pickled): it builds the run on a worker."""

    def make_run(self, host: Any) -> Run: ...


class RunManager:
    """Every run object of one worker, keyed by stream name, plus shared resources.

    Thread-safe: appends arrive on data-plane threads and task threads, the
    rest on the event loop. The append hook costs one dict lookup when the
    stream has no run, which is the common case.
    """

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        self._shared: dict[str, Any] = {}
        self._lock = threading.Lock()

    # -- runs ----------------------------------------------------------------------

    def start(self, run: Run) -> Run:
        """Hold ``run`` and return the run held: ``run``, or the one already there.

        An older run of the same stream is closed and replaced. One of the
        same epoch and type is kept (a repeated start is idempotent) and
        ``run``, never started, is dropped. A run of an *older* epoch than
        the one held is refused (a late message of a restarted run):
        :class:`StreamNotFoundError`. From a thread; on the event loop,
        :meth:`start_async`.
        """
        held, replaced = self._swap(run)
        if replaced is not None:
            _close(replaced)
        return held

    async def start_async(self, run: Run) -> Run:
        """:meth:`start` on the event loop: a replaced run whose close blocks closes in a thread."""
        held, replaced = self._swap(run)
        if replaced is not None:
            await _aclose(replaced)
        return held

    def _swap(self, run: Run) -> tuple[Run, Run | None]:
        """The run held once ``run`` is offered (see :meth:`start`), and the one it replaced, still open."""
        with self._lock:
            old = self._runs.get(run.name)
            if old is not None and old.epoch > run.epoch:
                raise StreamNotFoundError(
                    f"a run of stream {run.name!r} epoch {run.epoch} arrived after epoch "
                    f"{old.epoch} started: the stream was re-created meanwhile"
                )
            if old is not None and old.epoch == run.epoch and type(old) is type(run):
                return old, None
            self._runs[run.name] = run
        return run, (old if old is not run else None)

    def get(self, name: str, epoch: int | None = None) -> Run | None:
        """The run of stream ``name`` (of ``epoch``, if given), or None."""
        run = self._runs.get(name)
        if run is None or (epoch is not None and run.epoch != epoch):
            return None
        return run

    def require(self, name: str, epoch: int | None = None) -> Run:
        """:meth:`get`, or :class:`StreamNotFoundError` naming the stream."""
        run = self.get(name, epoch)
        if run is None:
            raise StreamNotFoundError(
                f"no run of stream {name!r}"
                + (f" epoch {epoch}" if epoch is not None else "")
                + " on this worker (never started here, or stopped)"
            )
        return run

    def on_append(self, name: str, partition: int, records: list[Any]) -> None:
        run = self._runs.get(name)
        if run is not None:
            try:
                run.on_append(partition, records)
            except Exception:
                # The records are stored; a run that fails to look at them
                # reports it through its own state, never through the append.
                logger.exception("aimss: run of stream %r failed on append", name)

    def stop(self, name: str, epoch: int | None = None) -> bool:
        """Close and forget the run of ``name`` (only of ``epoch`` or older, if given).

        Older too: dropping a stream's epoch ends whatever ran on its
        predecessors; a newer run of the name is left alone. Not on the
        event loop (see :meth:`astop`).
        """
        run = self._detach(name, epoch)
        if run is None:
            return False
        _close(run)
        return True

    async def astop(self, name: str, epoch: int | None = None) -> bool:
        """:meth:`stop` on the event loop: each run closes where :meth:`Run.close` says."""
        run = self._detach(name, epoch)
        if run is None:
            return False
        await _aclose(run)
        return True

    def _detach(self, name: str, epoch: int | None) -> Run | None:
        with self._lock:
            run = self._runs.get(name)
            if run is None or (epoch is not None and run.epoch > epoch):
                return None
            del self._runs[name]
        return run

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._runs)

    def progress(self) -> dict[str, dict[str, Any]]:
        """``{stream: {"kind", "epoch", "run_id", **run.progress()}}`` of every run here."""
        with self._lock:
            runs = list(self._runs.values())
        out: dict[str, dict[str, Any]] = {}
        for run in runs:
            try:
                snap = run.progress()
            except Exception as e:  # a status view must not fail with one run
                snap = {"error": f"{type(e).__name__}: {e}"}
            out[run.name] = {"kind": type(run).__name__, "epoch": run.epoch, "run_id": run.run_id, **snap}
        return out

    # -- per-worker resources --------------------------------------------------------

    def shared(self, key: str, factory: Callable[[], T]) -> T:
        """The worker's one ``key`` resource, made by ``factory`` on first use.

        It is closed (``close()``, if it has one) when the manager closes.
        """
        with self._lock:
            got = self._shared.get(key)
            if got is None:
                got = self._shared[key] = factory()
            return got

    def peek_shared(self, key: str) -> Any:
        """The ``key`` resource if it was made, without making it."""
        return self._shared.get(key)

    def shared_statistics(self) -> dict[str, Any]:
        """``{f"{key}_{stat}": value}`` of every shared resource with ``statistics()``."""
        with self._lock:
            shared = list(self._shared.items())
        out: dict[str, Any] = {}
        for key, res in shared:
            stats = getattr(res, "statistics", None)
            if stats is not None:
                out.update({f"{key}_{k}": v for k, v in stats().items()})
        return out

    def close_all(self) -> None:
        """Close every run, then every shared resource; safe to call twice. Not on the event loop (see :meth:`aclose_all`)."""
        runs, shared = self._detach_all()
        for run in runs:
            _close(run)
        _close_shared(shared)

    async def aclose_all(self) -> None:
        """:meth:`close_all` on the event loop (a worker's teardown).

        Runs close where :meth:`Run.close` says, shared resources in a
        thread (a write-behind queue waits for its writes). A write may wait
        for the coordinator's answer on this very loop (an I/O grant):
        waiting for it on the loop would wait forever.
        """
        runs, shared = self._detach_all()
        for run in runs:
            await _aclose(run)
        if shared:
            await offload(_close_shared, shared)

    def _detach_all(self) -> tuple[list[Run], list[Any]]:
        with self._lock:
            runs = list(self._runs.values())
            self._runs.clear()
            shared = list(self._shared.values())
            self._shared.clear()
        return runs, shared


def _close(run: Run) -> None:
    try:
        run.close()
    except Exception:
        logger.exception("aimss: closing the run of stream %r failed", run.name)


async def _aclose(run: Run) -> None:
    if run.blocking_close:
        await offload(_close, run)
    else:
        _close(run)


def _close_shared(shared: list[Any]) -> None:
    for res in shared:
        close = getattr(res, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                logger.exception("aimss: closing a shared worker resource failed")
