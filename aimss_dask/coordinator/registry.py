"""The coordinator's registry of runs: one record per run, one place for their state.

Pure: no asyncio, no scheduler. The scheduler plugin calls it from its hooks
and handlers and acts on what it returns (release tasks, rebalance, drop
streams); unit and property tests drive it directly. Every call is O(1) but
:meth:`RunRegistry.on_worker_lost` and :meth:`RunRegistry.snapshot`, which
walk the runs once.

The rules it keeps:

- each registration gets a new epoch, larger than every epoch seen before,
  so a late message of a restarted run is refused
  (:meth:`~RunRegistry.update` answers False) rather than applied;
- a run's state never goes back (REGISTERED < RUNNING < SEALED), and a
  finished one (DONE, FAILED, CLOSED) never changes again: only a new
  registration, under a new epoch, revives its id;
- a stream has at most one unfinished owner run, whose policies decide its
  seal (:meth:`~RunRegistry.on_seal`) and its loss
  (:meth:`~RunRegistry.on_worker_lost`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from aimss_dask.core.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    RunNotFoundError,
)
from aimss_dask.core.runs import FINISHED, OnLoss, OnSeal, RunSpec, RunState
from aimss_dask.core.specs import check_name

#: Live states in the order a run goes through them; a report never moves it back.
_RANK = {RunState.REGISTERED: 0, RunState.RUNNING: 1, RunState.SEALED: 2}


@dataclass(eq=False)
class RunRecord:
    """What the coordinator knows of one run (of its latest epoch).

    Read it; change it only through :class:`RunRegistry`. ``spec`` is a plain
    :class:`RunSpec` view (base fields); ``payload`` the pickled operator
    spec as it came over the wire, never unpickled here.

    >>> rec = RunRegistry().register(RunSpec(run_id="abc"), client="c1", now=5.0)
    >>> rec.run_id, rec.kind, rec.state.value, rec.finished
    ('abc', 'run', 'registered', False)
    """

    spec: RunSpec
    kind: str
    epoch: int
    state: RunState
    client: str | None
    started: float
    payload: bytes | None = field(default=None, repr=False)
    #: Workers (or clients) that reported for this epoch, and their last progress.
    workers: set[str] = field(default_factory=set)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (error class name, message) once FAILED with a reason.
    error: tuple[str, str] | None = None
    #: Grows with every change (registry-wide), for watchers that poll.
    version: int = 0
    sealed: set[str] = field(default_factory=set)

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def to_status(self) -> dict[str, Any]:
        """Plain data (msgpack-able) for ``status()`` and ``aimss_runs``."""
        return {
            "run_id": self.run_id,
            "kind": self.kind,
            "epoch": self.epoch,
            "state": self.state.value,
            "client": self.client,
            "started": self.started,
            "streams": list(self.spec.streams),
            "reads": list(self.spec.reads),
            "sealed": sorted(self.sealed),
            "on_seal": self.spec.on_seal.value,
            "on_loss": self.spec.on_loss.value,
            "io_priority": self.spec.io_priority,
            "workers": sorted(self.workers),
            "progress": {w: dict(p) for w, p in sorted(self.progress.items())},
            "error": None if self.error is None else list(self.error),
            "version": self.version,
        }


class RunRegistry:
    """Every run of the cluster, by run id: their epochs, states, owners and progress.

    ``keep_finished`` finished runs stay listed (newest first kept) so that
    ``status()`` shows what just ended; older ones are forgotten.

    Examples
    --------
    >>> from aimss_dask.core.runs import OnLoss, OnSeal, RunSpec
    >>> reg = RunRegistry()
    >>> spec = RunSpec(run_id="x", streams=("x-0",), on_seal=OnSeal.REBALANCE, on_loss=OnLoss.RESTART)
    >>> rec = reg.register(spec, client="c1")
    >>> reg.update("x", rec.epoch, "tcp://w1", state="running", progress={"pushed": 3})
    True
    >>> reg.on_seal("x-0"), reg.get("x").state.value
    ((<OnSeal.REBALANCE: 'rebalance'>, False), 'sealed')
    >>> [(r.run_id, action.value) for r, action, _ in reg.on_worker_lost("tcp://w1", {"x-0": {0}})]
    [('x', 'restart')]
    >>> reg.update("x", rec.epoch, "tcp://w1", progress={"pushed": 4})  # that epoch is over
    False
    >>> again = reg.register(spec, client="c1")
    >>> again.epoch > rec.epoch, reg.finish("x", again.epoch), reg.snapshot()[0]["state"]
    (True, True, 'done')
    """

    def __init__(self, keep_finished: int = 100) -> None:
        if not isinstance(keep_finished, int) or keep_finished < 0:
            raise InvalidArgumentError(f"keep_finished={keep_finished!r} must be an int >= 0")
        self.keep_finished = keep_finished
        self._runs: dict[str, RunRecord] = {}
        # stream -> id of its unfinished owner run (RESTARTING ones keep theirs).
        self._owner: dict[str, str] = {}
        # A run's create task key -> its run id: the scheduler's word that a
        # graph is gone comes by key (see AIMSS.transition).
        self._by_create: dict[Any, str] = {}
        # Finished run ids, oldest first: the history that keep_finished bounds.
        self._finished: dict[str, None] = {}
        # Neither counter restarts with clear(): a message from before it stays stale.
        self._epoch = 0
        self._version = 0

    def __len__(self) -> int:
        return len(self._runs)

    def register(
        self, spec: RunSpec | Mapping[str, Any], *, epoch: int | None = None,
        client: str | None = None, now: float | None = None,
    ) -> RunRecord:
        """Register ``spec`` (a spec, or its wire form) under a new epoch; the new record.

        ``epoch``: the coordinator's own (from a counter that only grows),
        else the next of this registry's; either way above every epoch
        registered before. A run registered again (restarted, or recomputed)
        replaces its record. A stream of ``spec`` owned by another
        unfinished run is refused.
        """
        view, kind, payload = _view(spec)
        old = self._runs.get(view.run_id)
        if epoch is None:
            epoch = self._epoch + 1
        elif not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise InvalidArgumentError(f"epoch {epoch!r} of run {view.run_id!r} must be an int >= 1")
        elif epoch <= self._epoch:
            # Checked against every epoch seen, not only this run's: the rule
            # then holds across clear() and forgotten runs, in O(1) memory.
            raise InvalidArgumentError(
                f"epoch {epoch} of run {view.run_id!r} is not newer than epoch {self._epoch}, "
                "the latest registered: epochs only grow (a late registration of a restarted run?)"
            )
        for name in view.streams:
            owner = self._owner.get(name)
            if owner is not None and owner != view.run_id:
                raise InvalidArgumentError(
                    f"stream {name!r} of run {view.run_id!r} already belongs to run {owner!r}, "
                    "which has not finished; finish it first or use another stream name"
                )
        if old is not None:
            self._release(old)
            self._finished.pop(old.run_id, None)
        self._epoch = max(self._epoch, epoch)
        started = time.time() if now is None else now
        rec = RunRecord(view, kind, epoch, RunState.REGISTERED, client, started, payload)
        rec.version = self._bump()
        self._runs[view.run_id] = rec
        for name in view.streams:
            self._owner[name] = view.run_id
        if view.create is not None:
            self._by_create[view.create] = view.run_id
        return rec

    def for_create(self, key: Any) -> RunRecord | None:
        """The listed run whose create task has key ``key``, if any."""
        run_id = self._by_create.get(key)
        return None if run_id is None else self._runs.get(run_id)

    def get(self, run_id: str) -> RunRecord:
        """The record of ``run_id``; :class:`RunNotFoundError` if none."""
        rec = self._runs.get(run_id)
        if rec is None:
            known = sorted(self._runs)
            raise RunNotFoundError(
                f"no run {run_id!r} is registered (never registered, or forgotten after it "
                f"finished); registered: {known[:10]}{' ...' if len(known) > 10 else ''}"
            )
        return rec

    def find(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None."""
        return self._runs.get(run_id)

    def for_stream(self, name: str) -> RunRecord | None:
        """The unfinished run that owns stream ``name``, if any."""
        run_id = self._owner.get(name)
        return None if run_id is None else self._runs[run_id]

    def update(
        self, run_id: str, epoch: int, who: str | None = None, *, state: RunState | str | None = None,
        progress: Mapping[str, Any] | None = None, error: tuple[str, str] | list[str] | None = None,
    ) -> bool:
        """Apply a report of ``who`` about ``run_id``'s ``epoch``; False if nothing applied.

        Refused (False): another epoch's report (stale), a report on a
        finished run, or on a RESTARTING one unless it finishes it. A state
        earlier than the current one is ignored (reports cross on the wire),
        the rest applied. ``error`` goes with ``state=FAILED``.
        """
        rec = self.get(run_id)
        new = None if state is None else _state(state)
        if new is RunState.RESTARTING:
            raise InvalidArgumentError(
                f"run {run_id!r}: RESTARTING is the coordinator's decision (on_worker_lost), not a report"
            )
        if error is not None and (
            new is not RunState.FAILED or not isinstance(error, (tuple, list)) or len(error) != 2
        ):
            raise InvalidArgumentError(
                f"run {run_id!r}: error {error!r} must be (class name, message), with state=FAILED"
            )
        if progress is not None and who is None:
            raise InvalidArgumentError(f"run {run_id!r}: progress needs who reports it")
        if epoch != rec.epoch or rec.finished:
            return False
        if rec.state is RunState.RESTARTING and new not in FINISHED:
            return False
        if who is not None:
            rec.workers.add(who)
            if progress is not None:
                rec.progress[who] = dict(progress)
        if new in FINISHED:
            self._finish(rec, new, error)
        elif new is not None and _RANK[new] > _RANK[rec.state]:
            rec.state = new
        rec.version = self._bump()
        return True

    def finish(
        self, run_id: str, epoch: int, state: RunState | str = RunState.DONE,
        error: tuple[str, str] | list[str] | None = None,
    ) -> bool:
        """End ``run_id``'s ``epoch`` as DONE, FAILED or CLOSED; False if stale or already over."""
        final = _state(state)
        if final not in FINISHED:
            raise InvalidArgumentError(
                f"run {run_id!r} cannot finish as {final.value!r}: use one of "
                f"{sorted(s.value for s in FINISHED)}"
            )
        return self.update(run_id, epoch, state=final, error=error)

    def on_seal(self, stream: str) -> tuple[OnSeal, bool] | None:
        """Stream ``stream`` is sealed: ``(on_seal, free_unread)`` of its owner run, or None.

        None for a stream no unfinished run owns (a user's stream: nothing to
        do, as today) or whose run is restarting. The run is SEALED once all
        its streams are.
        """
        rec = self.for_stream(stream)
        if rec is None or rec.state is RunState.RESTARTING:
            return None
        rec.sealed.add(stream)
        if rec.sealed >= set(rec.spec.streams) and _RANK[rec.state] < _RANK[RunState.SEALED]:
            rec.state = RunState.SEALED
        rec.version = self._bump()
        return rec.spec.seal_action(stream)

    def on_worker_lost(
        self, address: str, lost: Mapping[str, Collection[int]]
    ) -> list[tuple[RunRecord, OnLoss, str | None]]:
        """Worker ``address`` left with partitions ``lost`` (stream -> partitions).

        For each unfinished run that owns or reads one of those streams, by
        run id: ``(record, action, message)`` from its spec's policy, and the
        record moved accordingly: RESTART -> RESTARTING (until registered
        again), FAIL -> FAILED with a ``PartitionLostError`` message, RERUN ->
        unchanged (Dask recomputes). Runs already restarting are not reported
        again.
        """
        out: list[tuple[RunRecord, OnLoss, str | None]] = []
        for run_id in sorted(self._runs):
            # A run failed below may push the oldest finished ones out.
            rec = self._runs.get(run_id)
            if rec is None or rec.finished or rec.state is RunState.RESTARTING:
                continue
            hit = rec.spec.loss_action(lost, address)
            if hit is None:
                continue
            action, message = hit
            if action is OnLoss.RESTART:
                rec.state = RunState.RESTARTING
                rec.sealed.clear()
            elif action is OnLoss.FAIL:
                self._finish(rec, RunState.FAILED, ("PartitionLostError", message or ""))
            rec.version = self._bump()
            out.append((rec, action, message))
        return out

    def unfinished(self) -> list[RunRecord]:
        """Every run not finished, by run id."""
        return [self._runs[r] for r in sorted(self._runs) if not self._runs[r].finished]

    def restartable(self) -> list[RunRecord]:
        """Every run not finished, and every DONE one (Dask may lose its outputs), by run id."""
        return [rec for r in sorted(self._runs) if (rec := self._runs[r]).state is RunState.DONE or not rec.finished]

    def restart(self, run_id: str, epoch: int, *, done: bool = False) -> bool:
        """The coordinator restarts ``run_id``'s ``epoch``: RESTARTING until registered again.

        False if that epoch is stale, finished or already restarting.
        ``done``: a DONE run may restart too (Dask lost outputs of it that
        its graph must compute again, and its streams are gone).
        """
        rec = self.get(run_id)
        again = done and rec.state is RunState.DONE
        if rec.epoch != epoch or (rec.finished and not again) or rec.state is RunState.RESTARTING:
            return False
        rec.state = RunState.RESTARTING
        rec.sealed.clear()
        rec.version = self._bump()
        return True

    def owned_by_client(self, client: str) -> list[str]:
        """Ids of the unfinished runs ``client`` registered (to close when it leaves)."""
        return sorted(r.run_id for r in self._runs.values() if r.client == client and not r.finished)

    def counts(self) -> dict[tuple[str, str], int]:
        """Listed runs by (kind, state), for the metrics.

        >>> reg = RunRegistry(); _ = reg.register(RunSpec(run_id="a")); reg.counts()
        {('run', 'registered'): 1}
        """
        out: dict[tuple[str, str], int] = {}
        for r in self._runs.values():
            k = (r.kind, r.state.value)
            out[k] = out.get(k, 0) + 1
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        """Every listed run once, as plain data, oldest first."""
        recs = sorted(self._runs.values(), key=lambda r: (r.started, r.run_id))
        return [r.to_status() for r in recs]

    def clear(self) -> None:
        """Forget every run (the cluster restarted); epochs keep growing."""
        self._runs.clear()
        self._owner.clear()
        self._by_create.clear()
        self._finished.clear()

    # -- internals ------------------------------------------------------------------

    def _bump(self) -> int:
        self._version += 1
        return self._version

    def _release(self, rec: RunRecord) -> None:
        for name in rec.spec.streams:
            if self._owner.get(name) == rec.run_id:
                del self._owner[name]

    def _finish(self, rec: RunRecord, state: RunState, error: Any) -> None:
        rec.state = state
        if error is not None:
            rec.error = (str(error[0]), str(error[1]))
        self._release(rec)
        self._finished[rec.run_id] = None
        while len(self._finished) > self.keep_finished:
            oldest = next(iter(self._finished))
            del self._finished[oldest]
            gone = self._runs.pop(oldest, None)
            if gone is not None and self._by_create.get(gone.spec.create) == oldest:
                del self._by_create[gone.spec.create]


def _view(spec: RunSpec | Mapping[str, Any]) -> tuple[RunSpec, str, bytes | None]:
    """(base-field view, kind, payload) of a spec or its wire form; nothing unpickled."""
    if isinstance(spec, RunSpec):
        # A plain RunSpec of the same base fields: the coordinator's hooks
        # then run base code only, as for a spec that came over the wire.
        base = {f.name: getattr(spec, f.name) for f in fields(RunSpec)}
        return RunSpec(**base), spec.kind, None
    if isinstance(spec, Mapping):
        kind = check_name(spec.get("kind"), "run kind")
        payload = spec.get("payload")
        if payload is not None and not isinstance(payload, bytes):
            raise InvalidTypeError(f"payload of a wire run spec must be bytes, not {type(payload).__name__}")
        return RunSpec.view_from_wire(spec), kind, payload
    raise InvalidTypeError(
        f"register takes a RunSpec or its to_wire() dict, not {type(spec).__name__}"
    )


def _state(value: RunState | str) -> RunState:
    try:
        return RunState(value)
    except ValueError:
        raise InvalidArgumentError(
            f"run state {value!r} is not one of {[s.value for s in RunState]}"
        ) from None
