"""Slow sink writers: found from the workers' heartbeats, helped by a hand-over of their queue.

Each worker's write-behind reports, per ``to_zarr`` run, on every heartbeat
(``WriteRun.progress``): bytes written, seconds spent writing (``busy``),
bytes its queued regions will write (``left``), and its hand-overs. The
writers of one run are peers: :func:`~aimss_dask.coordinator.speculation.late_rule`
finds the one whose time left (``left`` over its rate) is far behind theirs.
With speculation on, such a straggler is told on the scheduler's stream to
hand part of its queue over (``aimss_sink_handover``: the run, the helper
chosen by :func:`~aimss_dask.coordinator.speculation.place_copies`, and the
bytes, split so that both are expected to finish together,
:func:`~aimss_dask.coordinator.speculation.split_point`). A hand-over counts
against ``max-fraction`` until the writer reports it over, its run ends, or
:data:`HANDOVER_TTL` passes.

A hand-over is not a race: the regions leave the slow writer's queue before
they are shipped, so each is written once (by the helper, or by the writer
itself where the helper fails). See :mod:`aimss_dask.sink.handover`.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from aimss_dask.coordinator.speculation import (
    Progress,
    Straggler,
    late_report,
    late_rule,
    place_copies,
    split_point,
)
from aimss_dask.core.names import HEARTBEAT_METRIC

if TYPE_CHECKING:
    from aimss_dask.coordinator.stragglers import Stragglers

#: Seconds a helper is expected to need before it writes its first region
#: (the run opened there, the first region shipped).
HANDOVER_STARTUP = 0.5

#: Seconds after which a hand-over no longer counts against the cap, whatever
#: the writer reports (it stopped reporting: it left, or its run ended).
HANDOVER_TTL = 120.0

#: Seconds within which the writer's heartbeat must show a hand-over under
#: way; past that, there was nothing left to hand over (its queue drained).
HANDOVER_APPEAR = 5.0

#: The suffix of a to_zarr run's writer among a worker's runs (``WriteRun.key``).
WRITES_SUFFIX = "/writes"

#: The kind of those runs in the heartbeat (``type(run).__name__``).
WRITER_KIND = "WriteRun"


def writers(scheduler: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """``{run id: {worker: progress}}`` of every sink writer, from the workers' last heartbeats."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for addr, ws in list(scheduler.workers.items()):
        beat = ws.metrics.get(HEARTBEAT_METRIC)
        if not isinstance(beat, dict):
            continue
        for entry in beat.get("runs") or ():
            try:
                name, _, _, kind, progress = entry
            except (TypeError, ValueError):
                continue
            if kind == WRITER_KIND and isinstance(name, str) and name.endswith(WRITES_SUFFIX) and "busy" in progress:
                out.setdefault(name[: -len(WRITES_SUFFIX)], {})[addr] = progress
    return out


def peers(run: str, by_worker: dict[str, dict[str, Any]]) -> list[Progress]:
    """The writers of one run as LATE's peers: bytes written over seconds spent writing, bytes left.

    >>> [p.time_left for p in peers("r", {"w": {"bytes": 100, "busy": 2.0, "left": 50}})]
    [1.0]
    """
    return [
        Progress(f"{run}@{w}", w, float(p.get("busy", 0.0)), float(p.get("bytes", 0)), float(p.get("left", 0)))
        for w, p in sorted(by_worker.items())
    ]


class SinkWriters:
    """The coordinator's view of sink writers: judged each check, helped by hand-overs.

    Part of :class:`~aimss_dask.coordinator.stragglers.Stragglers`, whose
    configuration, cap, slow workers and reports it shares.
    """

    def __init__(self, stragglers: Stragglers) -> None:
        self.s = stragglers
        #: Writers flagged and not over: "run@worker" -> their report.
        self.current: dict[str, dict[str, Any]] = {}
        #: Hand-overs told and not over: "run@worker" -> where, since when, what it had done before.
        self.handovers: dict[str, dict[str, Any]] = {}
        #: run id -> worker -> its writer's last progress: a writer whose
        #: queue was flushed (gone from its heartbeats) stays a peer, done,
        #: while others of its run still write.
        self._last: dict[str, dict[str, dict[str, Any]]] = {}

    def clear(self) -> None:
        self.current.clear()
        self.handovers.clear()
        self._last.clear()

    def _with_finished(self, runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
        """``runs`` with the writers that finished since their last heartbeat, as done peers."""
        for run in [r for r in self._last if r not in runs]:
            del self._last[run]  # no writer of it left: the run is over
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for run, live in runs.items():
            last = self._last.setdefault(run, {})
            last.update(live)
            out[run] = {w: p if w in live else {**p, "left": 0, "handing": 0} for w, p in last.items()}
        return out

    def check(self, now: float) -> list[Straggler]:
        """Judge every run's writers; report new stragglers, hand their queues over; the stragglers."""
        scheduler = self.s.scheduler
        assert scheduler is not None
        cfg = self.s.config
        live = writers(scheduler)
        self._end_handovers(live, now)
        runs = self._with_finished(live)
        found: list[Straggler] = []
        flagged: set[str] = set()
        able: list[tuple[Straggler, str, dict[str, Any], float]] = []
        for run, by_worker in runs.items():
            work = peers(run, by_worker)
            late = late_rule(work, multiplier=cfg.multiplier, min_runtime=cfg.min_runtime)
            speeds = {p.key: p.speed for p in work}
            for s in late:
                found.append(s)
                flagged.add(s.key)
                if s.key not in self.current:
                    report = late_report(s, "sink-writer", now, run=run)
                    self.current[s.key] = report
                    self.s._report(report)
                others = [v for k, v in speeds.items() if k != s.key and v > 0]
                if s.key not in self.handovers and others:
                    able.append((s, run, by_worker[s.worker], statistics.median(others)))
        for key in [k for k in self.current if k not in flagged and k not in self.handovers]:
            report = self.current.pop(key)
            self.s._report({**report, "outcome": "caught up", "ended": now})
        self._hand_over(able, now)
        return found

    def _hand_over(self, able: list[tuple[Straggler, str, dict[str, Any], float]], now: float) -> None:
        if not able or not self.s.config.enabled or self.s._tell is None:
            return
        plans: list[tuple[Straggler, str, dict[str, Any], int]] = []
        for s, run, progress, helper_rate in able:
            left = int(progress.get("left", 0))
            rate = float(progress.get("bytes", 0)) / max(float(progress.get("busy", 0.0)), 1e-9)
            split = split_point(0, left, rate, helper_rate, HANDOVER_STARTUP)
            if split is not None and left - split > 0:
                plans.append((s, run, progress, left - split))
        if not plans:
            return
        placed = place_copies(
            [s for s, _, _, _ in plans], self.s._views(), slow=self.s.slow,
            running_copies=self.s._copies_running(), max_fraction=self.s.config.max_fraction,
            need_bytes={s.key: n for s, _, _, n in plans},
        )
        for s, run, progress, nbytes in plans:
            dest = placed.get(s.key)
            if dest is None:
                continue
            if not self.s._tell(s.worker, {"op": "aimss_sink_handover", "run": run, "dest": dest, "nbytes": nbytes}):
                continue
            self.handovers[s.key] = {
                "run": run, "worker": s.worker, "dest": dest, "bytes": nbytes, "since": now,
                "before": int(progress.get("handed", 0)) + int(progress.get("taken_back", 0)),
                "seen": False,
            }
            report = self.current.get(s.key)
            if report is not None:
                report["copy"] = dest
            self.s._report({
                "action": "copy", "kind": "sink-writer", "key": s.key, "worker": s.worker, "dest": dest,
                "elapsed": round(s.elapsed, 3), "rule": s.rule, "bytes": nbytes, "found": now,
            })

    def _end_handovers(self, runs: dict[str, dict[str, dict[str, Any]]], now: float) -> None:
        """Forget hand-overs that are over; the writer's report says how it went."""
        for key, h in list(self.handovers.items()):
            progress = runs.get(h["run"], {}).get(h["worker"])
            gone = progress is None
            if gone:  # its run stopped there: what it said last
                progress = {**self._last.get(h["run"], {}).get(h["worker"], {}), "handing": 0}
                h["seen"] = True
            handing = int(progress.get("handing", 0))
            over = int(progress.get("handed", 0)) + int(progress.get("taken_back", 0)) - h["before"]
            h["seen"] = h["seen"] or handing > 0 or over > 0
            waiting = not h["seen"] and now - h["since"] <= HANDOVER_APPEAR
            if now - h["since"] <= HANDOVER_TTL and (handing or waiting):
                continue
            back, handed = int(progress.get("taken_back", 0)), int(progress.get("handed", 0))
            if not h["seen"]:
                outcome = "nothing left to hand over"
            elif gone and handed <= h["before"]:
                # Heartbeats are coarser than a short hand-over.
                outcome = f"helper on {h['dest']} took over; the run ended before the writer's count was seen"
            else:
                outcome = f"helper on {h['dest']} wrote {handed} regions" + (
                    f", {back} written here after it failed" if back else ""
                )
            del self.handovers[key]
            report = self.current.pop(key, None)
            if report is not None:
                self.s._report({**report, "outcome": outcome, "ended": now})

    def summary(self) -> list[dict[str, Any]]:
        """For ``status().stragglers["sink_writers"]``: writers behind now, with their hand-overs."""
        return [
            {**r, "handover": self.handovers.get(k, {}).get("dest")} for k, r in self.current.items()
        ]

