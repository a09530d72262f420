"""The race of a call of a speculative function against its copy on another worker.

Dask keeps one worker per task (``processing_on``), and a task's result can
only come from that worker. So a copy is a *twin*: when the coordinator
finds a call of a marked function straggling, it tells the straggler's
worker where a copy should go; the call (still running there) submits the
same function with the same arguments to that worker under the key
``aimss-copy-<key>`` and waits for whichever finishes first: its own
computation, which runs in a thread beside it, or the twin. The first
result is the task's result, fed back through the original task. The
loser is cancelled if it is the twin; if it is the original computation,
it runs on in its thread until it checks :func:`check_race` (Python cannot
stop a thread) and its result is dropped, which is why only functions
declared idempotent (:func:`aimss_dask.speculative`, or
``dask.annotate(aimss_speculative=True)``), and AIMSS operators' pushes,
whose records the owners deduplicate, are ever copied.

Here, below every other layer, because all of them use it: the public
decorator (``api``), the operators' pushes (``ops``) and the coordinator,
which wraps the tasks of an annotated graph. It needs no cluster code of
ours: the worker's own objects and its connection to the scheduler.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import sys
import threading
from typing import Any, Callable

from aimss_dask.core import threads
from aimss_dask.core.names import COPY_TASK_PREFIX, PLUGIN_NAME, SPECULATIVE, key_text

logger = logging.getLogger("aimss_dask")

#: How often a running call looks for the coordinator's word to copy it (s).
POLL = 0.05

#: Dask priority of a copy (higher runs first): ahead of everything queued.
COPY_PRIORITY = 2**30

# The call racing on this thread: the key of the task it stands for (the
# original's, also in its twin) and, in the original, the event set once the
# twin has won. A speculative function called inside one is a plain call.
_RACE: contextvars.ContextVar[tuple[Any, threading.Event | None] | None] = contextvars.ContextVar(
    "aimss_race", default=None
)


class RaceLost(Exception):
    """Raised in a racing call's own body by :func:`check_race` once its copy has won."""


class Speculative:
    """A function declared idempotent: see :func:`aimss_dask.speculative`."""

    def __init__(self, func: Callable[..., Any]) -> None:
        if not callable(func):
            raise TypeError(
                f"aimss_dask.speculative needs a function, not {type(func).__name__} {func!r}"
            )
        self.func = func
        functools.update_wrapper(self, func)
        setattr(self, SPECULATIVE, True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        place = _in_a_task() if _RACE.get() is None else None
        if place is None:
            return self.func(*args, **kwargs)
        return _race(self, args, kwargs, *place)

    def __repr__(self) -> str:
        return f"speculative({self.func!r})"

    def __reduce__(self) -> Any:
        # A module-level speculative function (a decorator's result) travels
        # by name, like the function it stands for; any other with its function.
        module = sys.modules.get(getattr(self, "__module__", ""))
        name = getattr(self, "__qualname__", "")
        if module is not None and "." not in name and getattr(module, name, None) is self:
            return name
        return (Speculative, (self.func,))


def _in_a_task() -> tuple[Any, Any, Any] | None:
    """``(worker, key, AIMSS worker plugin)`` when running as a Dask task on an AIMSS worker."""
    from distributed import get_worker

    try:
        worker = get_worker()
        key = worker.get_current_task()
    except ValueError:
        return None
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None or getattr(plugin, "copies", None) is None:
        return None
    return worker, key, plugin


def task_key() -> Any:
    """The key of the Dask task this call stands for: the straggler's own in its copy.

    ``Worker.get_current_task()`` gives a copy's own key
    (``aimss-copy-...``); what the call reports about itself (an
    operator's push names its task to the coordinator) is the original's.
    Raises ``ValueError`` outside a Dask task, like ``get_worker``.
    """
    race = _RACE.get()
    if race is not None:
        return race[0]
    from distributed import get_worker

    return get_worker().get_current_task()


def check_race() -> None:
    """Raise :class:`RaceLost` in a call's own body once its copy has won.

    Python cannot stop the losing body's thread; a body that calls this
    between steps (an operator's push, before each write) stops early
    instead of running to its end for nothing. Elsewhere, a no-op.
    """
    race = _RACE.get()
    if race is not None and race[1] is not None and race[1].is_set():
        raise RaceLost("the copy of this call finished first")


class _Of:
    """The straggler's key, as a copy's argument: never read by Dask as a reference to a task."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return _Of, (self.key,)


def _apply(spec: Speculative, packed: tuple[tuple[Any, ...], dict[str, Any]], of: _Of) -> Any:
    """A copy's body: the marked function on the arguments, standing for task ``of``."""
    args, kwargs = packed
    token = _RACE.set((of.key, None))
    try:
        return spec.func(*args, **kwargs)
    finally:
        _RACE.reset(token)


def _race(spec: Speculative, args: tuple[Any, ...], kwargs: dict[str, Any], worker: Any, key: Any, plugin: Any) -> Any:
    func = spec.func
    text = key_text(key)
    box: dict[str, Any] = {}
    finished = threading.Event()  # the call's own body ended
    done = threading.Event()  # it or the copy ended
    lost = threading.Event()  # the copy won: the body may stop (check_race)

    def original() -> None:
        # The call sees the task's context as in the task's own thread:
        # get_worker() (a context variable, copied below) and the worker's
        # get_current_task() (by thread).
        _RACE.set((key, lost))
        ident = threading.get_ident()
        with worker.active_threads_lock:
            worker.active_threads[ident] = key
        try:
            box["value"] = func(*args, **kwargs)
        except BaseException as e:
            box["error"] = e
        finally:
            with worker.active_threads_lock:
                worker.active_threads.pop(ident, None)
            finished.set()
            done.set()

    ctx = contextvars.copy_context()
    # A reused thread, not one per call: see aimss_dask.core.threads.
    threads.start(functools.partial(ctx.run, original), f"aimss-original-{text}"[:64])
    twin: Any = None
    while not done.wait(POLL):
        if twin is None:
            dest = plugin.copies.take(text)
            if dest is not None:
                twin = _launch(spec, args, kwargs, worker, key, dest)
                if twin is not None:
                    twin.add_done_callback(lambda _f: done.set())
    plugin.copies.forget(text)
    if finished.is_set() or twin is None:
        if twin is not None:
            twin.cancel()
            _tell(worker, text, "original won")
        if "error" in box:
            raise box["error"]
        return box["value"]
    # The twin ended first.
    if twin.status == "finished":
        try:
            value = twin.result()
        except Exception as e:  # lost on the way: the original goes on
            logger.warning("aimss: the copy of %s finished but its result could not be fetched (%s)", text, e)
            _tell(worker, text, f"copy lost: {type(e).__name__}")
        else:
            lost.set()
            _tell(worker, text, "copy won")
            twin.release()
            return value
    else:
        _tell(worker, text, f"copy {twin.status}")
    finished.wait()  # the copy failed: the call's own result, then
    if "error" in box:
        raise box["error"]
    return box["value"]


def _launch(spec: Speculative, args: tuple[Any, ...], kwargs: dict[str, Any], worker: Any, key: Any, dest: str) -> Any:
    """Start the copy of this call on ``dest``: the arguments go to it directly; its future, or None."""
    from distributed import get_client

    text = key_text(key)
    try:
        client = get_client()
        [packed] = client.scatter([(args, kwargs)], workers=[dest], direct=True, hash=False)
        # First in the destination's queue: a copy that waits behind the
        # tasks already there starts too late to win.
        return client.submit(
            _apply, spec, packed, _Of(key), key=COPY_TASK_PREFIX + text, workers=[dest],
            allow_other_workers=False, pure=False, priority=COPY_PRIORITY,
        )
    except Exception as e:
        logger.warning("aimss: could not start a copy of %s on %s (%s); the original goes on", text, dest, e)
        _tell(worker, text, f"copy not started: {type(e).__name__}: {e}")
        return None


def _tell(worker: Any, text: str, outcome: str) -> None:
    """The coordinator learns how the race ended (reports it when the task ends).

    Where the copy ran is the destination the coordinator chose: the copy
    is restricted to it.
    """
    from distributed.utils import sync

    try:
        sync(worker.loop, worker.scheduler.aimss_copy_outcome, key=text, outcome=outcome)
    except Exception as e:
        logger.warning("aimss: could not tell the coordinator how the copy of %s ended (%s)", text, e)
