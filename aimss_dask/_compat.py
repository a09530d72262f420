"""Where AIMSS reads another library's state that is not part of its documented API.

Each function here says what it reads and why nothing documented would do,
so that a change in that library breaks one small function, found by name.
"""

from __future__ import annotations

from typing import Any

__all__ = ["frame_blocks", "listed_workers", "task_attempt"]


def task_attempt() -> int | None:
    """Dask's execution id of the task running on this thread; ``None`` outside a task.

    The scheduler gives a task a new ``run_id`` each time it sends it to a
    worker (``Scheduler._task_to_msg``, from one process-wide counter): a
    re-run after a lost worker, a stolen or a second execution of the same
    key, and two keys running the same work all differ. That is exactly the ``attempt`` of
    an :class:`~aimss_dask.core.specs.Origin` (plan §2.8): the owner keeps the
    first attempt's copy of an input and drops the others.

    Why not a documented name: ``Worker.get_current_task()`` is public, but
    the run id lives on the worker's state machine
    (``Worker.state.tasks[key].run_id``), which distributed documents as
    internal. The attributes read are public ones (no underscore) and have
    been stable since the state machine landed (2022.8); a missing one gives
    ``None``, i.e. records written without an origin (at-least-once, as
    before), never an error in a task.

    Examples
    --------
    >>> task_attempt() is None  # not in a Dask task
    True
    """
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
        ts = worker.state.tasks.get(key)
        run_id = getattr(ts, "run_id", None)
    except (ValueError, KeyError, AttributeError, ImportError):
        # Not on a worker (ValueError), not in a task thread (KeyError), or a
        # distributed without the state machine's run ids.
        return None
    # RUN_ID_SENTINEL (-1): a task state the scheduler never dispatched.
    if type(run_id) is not int or run_id < 0:
        return None
    return run_id


def frame_blocks(frame: Any) -> list[Any] | None:
    """The arrays that hold a pandas DataFrame's columns, one per block; None if unknown.

    The log counts a record's bytes on every append, and dask's ``sizeof``
    of a DataFrame builds a Series per column per call: a tenth of a
    shuffle's map CPU, measured. The block manager (``DataFrame._mgr``)
    gives the buffers directly. Nothing documented does: ``memory_usage``
    builds Series too. Any other layout (a future pandas) gives None, and
    the caller falls back to ``sizeof``.

    Examples
    --------
    >>> import pandas as pd
    >>> [b.shape for b in frame_blocks(pd.DataFrame({"a": [1, 2], "b": [3, 4]}))]
    [(2, 2)]
    """
    try:
        return [b.values for b in frame._mgr.blocks]
    except Exception:
        return None


def listed_workers(client: Any) -> dict[str, dict[str, Any]]:
    """Every worker the scheduler of ``client`` (synchronous) lists now: address -> its identity (``host``, ...).

    Not ``client.scheduler_info()["workers"]``: in recent distributed
    releases (2026.8, for one) that fetches every worker into the client's
    cached identity and returns the cache, which the client's periodic
    refresh replaces with one that lists no worker; when that refresh lands
    in between, the cluster looks empty (two hosts were counted as one).
    The scheduler's ``identity`` call, asked directly, lists every worker.
    """
    return dict(client.sync(client.scheduler.identity)["workers"])

