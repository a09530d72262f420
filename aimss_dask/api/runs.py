"""The run interface as operators call it: register a run, report on it, finish it.

An operator describes each run with a frozen :class:`~aimss_dask.core.runs.RunSpec`
and registers it here, from a client or from a task of its graph (a push
run's create task). Registering creates the streams the run owns, all with
one placement, and pins the run's output tasks to their partitions' owners.
What the run does at seal and when a worker leaves follows the spec's
policies, on the coordinator.

Examples
--------
>>> handle = register_run(spec, partitions=8)        # doctest: +SKIP
>>> [s.name for s in handle.streams]                  # doctest: +SKIP
['aimss-shuffle-abc-0']
>>> finish_run(handle.run_id, handle.epoch)           # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aimss_dask.api.context import Endpoint, current
from aimss_dask.api.streams import Stream, remember
from aimss_dask.core.errors import InvalidTypeError
from aimss_dask.core.runs import RunSpec, RunState
from aimss_dask.transport import speccache

logger = logging.getLogger("aimss_dask")


@dataclass(frozen=True)
class RunHandle:
    """A registered run: its id, the epoch it was registered under, and its streams."""

    run_id: str
    epoch: int
    streams: tuple[Stream, ...]
    created: bool


def register_run(
    spec: RunSpec, partitions: int | None = None, prefer: list[Any] | None = None, *, ep: Endpoint | None = None
) -> RunHandle:
    """Register ``spec`` with the coordinator and create the streams it owns.

    ``partitions``: of each stream the run owns (required if it owns any).
    ``prefer[p]``: the key of the task whose result is most of partition
    ``p``'s input; where that result is in memory, the partition is placed
    with it. A run registered again while its streams are open gets the
    same streams back (``created`` False). ``ep``: the endpoint to use (a
    driver thread's), else this process's.
    """
    if not isinstance(spec, RunSpec):
        raise InvalidTypeError(f"register_run takes a RunSpec, not {type(spec).__name__}")
    ep = ep or current("register_run")
    reply = ep.scheduler_op(
        "run_register", run=spec.to_wire(), partitions=partitions, prefer=prefer, **ep.owner_kwargs()
    )
    if reply["created"]:
        for name in spec.streams:
            speccache.forget(name)
    streams = tuple(Stream(remember(ep, s)) for s in reply["streams"])
    return RunHandle(reply["run_id"], int(reply["epoch"]), streams, bool(reply["created"]))


def report_run(
    run_id: str, epoch: int, *, state: RunState | str | None = None,
    progress: Mapping[str, Any] | None = None, ep: Endpoint | None = None,
) -> bool:
    """Tell the coordinator how a run does from here (a driver thread); False if stale."""
    ep = ep or current("report_run")
    who = ep.client_id or ep.address
    reply = ep.scheduler_op(
        "run_report", run_id=run_id, epoch=int(epoch), who=who,
        state=None if state is None else RunState(state).value,
        progress=None if progress is None else dict(progress),
    )
    return bool(reply["applied"])


def finish_run(
    run_id: str, epoch: int | None, state: RunState | str = RunState.DONE,
    error: BaseException | None = None, *, ep: Endpoint | None = None,
) -> bool:
    """End a run's epoch: DONE, FAILED (with ``error``) or CLOSED; False if already over.

    ``epoch`` None: whichever epoch is registered (a client cleaning up
    after a failed compute, which never learnt it).
    """
    ep = ep or current("finish_run")
    reply = ep.scheduler_op(
        "run_finish", run_id=run_id, epoch=None if epoch is None else int(epoch), state=RunState(state).value,
        error=None if error is None else [type(error).__name__, str(error)],
    )
    return bool(reply["finished"])


class ListedRun:
    """A run driven from a client (a sink's driver thread) as the coordinator lists it.

    Registered at :meth:`start`, reported when its progress changed (at most
    every ``every`` seconds, or at once with ``force``), finished at
    :meth:`end`. Listing is for people: a failure to report is logged at
    debug level and never stops the run.

    Examples
    --------
    >>> listed = ListedRun(spec, ep)                       # doctest: +SKIP
    >>> listed.start({"rows": 0}); listed.report({"rows": 64})  # doctest: +SKIP
    >>> listed.end("done", None, {"rows": 64})             # doctest: +SKIP
    """

    def __init__(self, spec: RunSpec, ep: Endpoint, every: float = 0.5) -> None:
        self.spec = spec
        self.ep = ep
        self.every = every
        self.handle: RunHandle | None = None
        self._sent_at = 0.0
        self._sent: Mapping[str, Any] | None = None

    def start(self, progress: Mapping[str, Any]) -> None:
        try:
            self.handle = register_run(self.spec, ep=self.ep)
        except Exception as e:
            logger.debug("aimss: run %r not listed: %r", self.spec.run_id, e)
            return
        self.report(progress, force=True)

    def report(self, progress: Mapping[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if self.handle is None or (not force and (now - self._sent_at < self.every or progress == self._sent)):
            return
        self._sent_at, self._sent = now, dict(progress)
        try:
            report_run(self.handle.run_id, self.handle.epoch, state="running", progress=progress, ep=self.ep)
        except Exception as e:
            logger.debug("aimss: progress of run %r not reported: %r", self.spec.run_id, e)

    def end(self, state: RunState | str, error: BaseException | None, progress: Mapping[str, Any]) -> None:
        if self.handle is None:
            return
        self.report(progress, force=True)
        try:
            finish_run(self.handle.run_id, self.handle.epoch, state, error, ep=self.ep)
        except Exception as e:
            logger.debug("aimss: end of run %r not reported: %r", self.spec.run_id, e)
