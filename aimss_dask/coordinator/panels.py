"""What the dashboard pages show, as plain columns: computed from the coordinator, no Bokeh.

Each function reads one view of the coordinator (a scheduler plugin,
:class:`~aimss_dask.coordinator.plugin.AIMSS`) on the event loop's thread
and returns ``{column: [values]}``, ready for a Bokeh ``ColumnDataSource``
and for ``/aimss/panels.json``. Worker-side figures come from the workers'
last heartbeats (:mod:`aimss_dask.node.heartbeat`): no query fans out.

Examples
--------
>>> groups_rows({"s": {"g": [3, 5]}}, {"s": {0: (0, 10), 1: (0, 5)}})["lag"]
[7, 0]
>>> progress_of(done=3, total=4, finished=False)
0.75
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aimss_dask.coordinator.overview import heartbeats

if TYPE_CHECKING:
    from aimss_dask.coordinator.plugin import AIMSS

__all__ = [
    "beats",
    "events_rows",
    "groups_rows",
    "log_totals",
    "memory_rows",
    "panels",
    "progress_of",
    "runs_rows",
    "streams_rows",
    "Throughput",
]

#: Fields of a heartbeat's ``log`` entry, in order (see :mod:`aimss_dask.node.heartbeat`).
LOG_FIELDS = ("memory", "disk", "budget", "spilled", "pushed", "received", "served")

#: Scheduler states of a run's task that count as done for its progress bar.
_DONE = frozenset({"memory", "released", "forgotten", "erred"})

#: Most events a page lists (the newest).
EVENTS_SHOWN = 200

#: Points of throughput history kept (10 minutes at one a second).
HISTORY = 600

#: A worker whose heartbeats stopped this long ago (s, its clock) no longer counts in the rate.
STALE_BEAT = 5.0


def progress_of(done: int, total: int, finished: bool) -> float:
    """A run's progress in [0, 1]: ``done`` of ``total`` tasks, 1 once it finished."""
    if finished:
        return 1.0
    return min(done / total, 1.0) if total > 0 else 0.0


def beats(coord: AIMSS) -> dict[str, Any]:
    """Each worker's latest heartbeat (none before the coordinator started)."""
    return {} if coord.scheduler is None else heartbeats(coord.scheduler)


def _run_tasks(coord: AIMSS, barrier_key: Any) -> tuple[int, int]:
    """(done, total) of a run's pushes, barrier and outputs, from the scheduler's task states."""
    scheduler = coord.scheduler
    ts = scheduler.tasks.get(barrier_key) if scheduler is not None and barrier_key is not None else None
    if ts is None:
        return 0, 0
    pushes = [d.state == "memory" for d in ts.dependencies]
    sealed = ts.state == "memory"
    # An output released before it ran is still to do; after the barrier,
    # a released output was computed and handed on.
    outputs = [d.state in _DONE if sealed else False for d in ts.dependents]
    return sum(pushes) + sealed + sum(outputs), len(pushes) + 1 + len(outputs)


def runs_rows(coord: AIMSS | None, snapshot: Mapping[str, Any]) -> dict[str, list[Any]]:
    """One row per run: kind, state, client, streams, bytes and a progress fraction."""
    cols: dict[str, list[Any]] = {k: [] for k in (
        "run", "kind", "state", "client", "streams", "memory_bytes", "disk_bytes", "progress", "percent", "label",
    )}
    for r in snapshot.get("runs", []):
        assert coord is not None  # runs listed: a coordinator listed them
        rec = coord.runs.find(r["run_id"])
        barrier = rec.spec.barrier if rec is not None else None
        done, total = _run_tasks(coord, barrier)
        finished = r["state"] in ("done", "failed", "cancelled")
        frac = progress_of(done, total, finished)
        cols["run"].append(r["run_id"])
        cols["kind"].append(r["kind"])
        cols["state"].append(r["state"])
        cols["client"].append(r.get("client") or "")
        cols["streams"].append(", ".join(r.get("streams", [])))
        cols["memory_bytes"].append(int(r.get("memory_bytes", 0)))
        cols["disk_bytes"].append(int(r.get("disk_bytes", 0)))
        cols["progress"].append(frac)
        cols["percent"].append(f"{frac:.0%}")
        cols["label"].append(f"{r['kind']} {r['run_id'][:8]} ({r['state']})")
    return cols


def streams_rows(coord: AIMSS | None, snapshot: Mapping[str, Any]) -> dict[str, list[Any]]:
    """One row per stream: its run's kind and state, owner client, partitions, records and bytes."""
    kinds = {r["run_id"]: (r["kind"], r["state"]) for r in snapshot.get("runs", [])}
    cols: dict[str, list[Any]] = {k: [] for k in (
        "name", "kind", "state", "client", "partitions", "replication", "records",
        "memory_bytes", "disk_bytes", "lost",
    )}
    for s in snapshot.get("streams", []):
        kind, state = kinds.get(s.get("run") or "", ("stream", ""))
        cols["name"].append(s["name"])
        cols["kind"].append(kind)
        cols["state"].append(state or ("sealed" if s["sealed"] else "open"))
        cols["client"].append(s.get("client") or "")
        cols["partitions"].append(int(s["partitions"]))
        cols["replication"].append(int(s.get("replication", 1)))
        cols["records"].append(int(s["records"]))
        cols["memory_bytes"].append(int(s["memory_bytes"]))
        cols["disk_bytes"].append(int(s["disk_bytes"]))
        cols["lost"].append(len(s.get("lost", [])))
    return cols


def memory_rows(beats: Mapping[str, Any]) -> dict[str, list[Any]]:
    """One row per worker: its log's bytes in memory and on disk, against its budget."""
    cols: dict[str, list[Any]] = {k: [] for k in ("worker", *LOG_FIELDS, "fraction")}
    for addr in sorted(beats):
        beat = beats[addr]
        log = beat.get("log") if isinstance(beat, Mapping) else None
        if not log or len(log) < len(LOG_FIELDS):
            continue
        cols["worker"].append(addr)
        for k, v in zip(LOG_FIELDS, log):
            cols[k].append(int(v))
        cols["fraction"].append(log[0] / log[2] if log[2] else 0.0)
    return cols


def log_totals(beats: Mapping[str, Any]) -> dict[str, int]:
    """The running totals of every worker's log together (bytes pushed, received, served, spilled)."""
    out = dict.fromkeys(("pushed", "received", "served", "spilled"), 0)
    rows = memory_rows(beats)
    for k in out:
        out[k] = sum(rows[k])
    return out


class Throughput:
    """Bytes per second pushed and received over the cluster, from the heartbeats' running totals.

    Each worker's rate is taken over the interval between its own last two
    heartbeats (their clock), so a heartbeat that comes late gives no spike
    and a worker that joins or leaves no jump; :meth:`sample` sums the
    workers' latest rates into one point.

    Examples
    --------
    >>> t = Throughput()
    >>> t.sample({"w": {"log": [0, 0, 1, 0, 100, 100, 0], "time": 10.0}}, now=10.0)
    >>> t.sample({"w": {"log": [0, 0, 1, 0, 300, 500, 0], "time": 12.0}}, now=12.0)
    >>> t.rows()["pushed"], t.rows()["received"]
    ([100.0], [200.0])
    """

    def __init__(self, keep: int = HISTORY) -> None:
        self.points: deque[tuple[float, float, float]] = deque(maxlen=keep)
        # worker -> (its clock at its last heartbeat, bytes pushed, bytes received, rates)
        self._beats: dict[str, tuple[float, int, int, float, float]] = {}

    def sample(self, beats: Mapping[str, Any], now: float) -> None:
        """Take the workers' latest heartbeats into a point at ``now`` (the first sample gives none)."""
        pushed = received = 0.0
        seen = {}
        first = not self._beats
        for addr, beat in beats.items():
            log = beat.get("log") if isinstance(beat, Mapping) else None
            if not log or len(log) < len(LOG_FIELDS) or "time" not in beat:
                continue
            t, p, r = float(beat["time"]), int(log[4]), int(log[5])
            prev = self._beats.get(addr)
            if prev is None:
                rp = rr = 0.0
            elif t > prev[0]:
                dt = t - prev[0]
                rp, rr = max(p - prev[1], 0) / dt, max(r - prev[2], 0) / dt
            else:
                t, p, r, rp, rr = prev  # no new heartbeat: its last rate holds
            seen[addr] = (t, p, r, rp, rr)
            if now - t <= STALE_BEAT:
                pushed += rp
                received += rr
        self._beats = seen
        if not first:
            self.points.append((now, pushed, received))

    def rows(self) -> dict[str, list[float]]:
        """The history as columns: ``time`` (ms since the epoch, for Bokeh), ``pushed``, ``received``."""
        return {
            "time": [t * 1000 for t, _, _ in self.points],
            "pushed": [p for _, p, _ in self.points],
            "received": [r for _, _, r in self.points],
        }


def groups_rows(
    groups: Mapping[str, Mapping[str, list[int]]],
    bounds: Mapping[str, Mapping[int, tuple[int, int]]],
) -> dict[str, list[Any]]:
    """One row per consumer group and partition: committed offset, partition end and lag.

    ``groups``: stream -> group -> committed offset per partition;
    ``bounds``: stream -> partition -> (start, end), as owners last reported.
    """
    cols: dict[str, list[Any]] = {k: [] for k in ("stream", "group", "partition", "committed", "end", "lag")}
    for name in sorted(groups):
        known = bounds.get(name, {})
        for group in sorted(groups[name]):
            for p, off in enumerate(groups[name][group]):
                end = known.get(p, (0, off))[1]
                cols["stream"].append(name)
                cols["group"].append(group)
                cols["partition"].append(p)
                cols["committed"].append(int(off))
                cols["end"].append(int(end))
                cols["lag"].append(max(int(end) - int(off), 0))
    return cols


def events_rows(events: Any, limit: int = EVENTS_SHOWN) -> dict[str, list[Any]]:
    """The newest ``limit`` events of the ``aimss`` topic, newest first: time, action and details."""
    cols: dict[str, list[Any]] = {k: [] for k in ("time", "clock", "action", "details")}
    for stamp, msg in list(events)[-limit:][::-1]:
        msg = msg if isinstance(msg, Mapping) else {"message": msg}
        cols["time"].append(float(stamp))
        cols["clock"].append(time.strftime("%H:%M:%S", time.localtime(stamp)))
        cols["action"].append(str(msg.get("action", "")))
        rest = {k: v for k, v in msg.items() if k != "action"}
        cols["details"].append(json.dumps(rest, default=str, sort_keys=True)[:500])
    return cols


def panels(coord: AIMSS) -> dict[str, Any]:
    """Every page's columns at once (what ``/aimss/panels.json`` serves)."""
    scheduler = coord.scheduler
    if scheduler is None:
        return {}
    snapshot = coord.run_ops.overview()
    latest = beats(coord)
    return {
        "time": time.time(),
        "runs": runs_rows(coord, snapshot),
        "streams": streams_rows(coord, snapshot),
        "memory": memory_rows(latest),
        "totals": log_totals(latest),
        "groups": groups_rows(coord.state.groups, coord.state.bounds),
        "throughput": coord.throughput.rows(),
        "events": events_rows(scheduler.get_events("aimss")),
    }
