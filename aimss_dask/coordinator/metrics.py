"""The coordinator's AIMSS metrics, as plain data for the scheduler's ``/metrics``.

Runs by kind and state, streams, consumer groups and their lag (records
committed behind each partition's end, summed), the logs' bytes over the
cluster as the workers' last heartbeats tell them, and running totals of
stragglers, copies, takeovers, slow workers, recoveries and other events,
and the coordinated I/O scheduler's grants and writers; idle filling's
slices, fillers and sync phases.
See :mod:`aimss_dask.core.metrics`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aimss_dask.core.metrics import Metric, counts
from aimss_dask.core.names import HEARTBEAT_METRIC

if TYPE_CHECKING:
    from aimss_dask.coordinator.plugin import AIMSS

__all__ = ["RECOVERY_ACTIONS", "coordinator_metrics"]

#: Events that are a recovery, and how: ``aimss_recoveries_total{how}``.
RECOVERY_ACTIONS = {
    "run-recovered": "recovered",
    "run-restarted": "restarted",
    "run-kept": "kept",
    "replicas-promoted": "promoted",
    "partitions-salvaged": "salvaged",
}


def coordinator_metrics(coord: AIMSS) -> list[Metric]:
    """The metrics of ``coord`` (the scheduler plugin); none before it started."""
    scheduler = coord.scheduler
    if scheduler is None:
        return []
    state = coord.state
    lag = 0
    groups = 0
    for name, by_group in list(state.groups.items()):
        bounds = state.bounds.get(name, {})
        for offsets in list(by_group.values()):
            groups += 1
            lag += sum(max(bounds.get(p, (0, off))[1] - off, 0) for p, off in enumerate(offsets))
    memory = disk = 0
    for ws in list(scheduler.workers.values()):
        beat: Any = ws.metrics.get(HEARTBEAT_METRIC)
        if isinstance(beat, dict):
            for row in beat.get("streams", {}).values():
                memory += row[1]
                disk += row[2]
    events = dict(coord.ops.event_counts)
    reports = dict(coord.stragglers.counts)
    recoveries = {how: events.get(action, 0) for action, how in RECOVERY_ACTIONS.items()}
    io = coord.io
    resources = io.sched.snapshot().values()
    writing = sum(sum(r["writing"].values()) for r in resources)
    fill = coord.fill
    fillers: dict[str, int] = {}
    for f in list(fill.fillers.values()):
        fillers[f.state] = fillers.get(f.state, 0) + 1
    waiting = sum(sum(r["waiting"].values()) for r in resources)
    return [
        Metric("runs", "gauge", "Operator runs listed by the coordinator, by kind and state.",
               [({"kind": k, "state": s}, n) for (k, s), n in sorted(coord.runs.counts().items())]),
        Metric("streams", "gauge", "Streams in the cluster (operators' own streams included).",
               [({}, len(state.streams))]),
        Metric("consumer_groups", "gauge", "Consumer groups with committed offsets.", [({}, groups)]),
        Metric("group_lag_records", "gauge",
               "Records between the consumer groups' committed offsets and their partitions' ends, summed.",
               [({}, lag)]),
        Metric("cluster_log_bytes", "gauge",
               "Bytes in every worker's log, in memory or spilled, from their last heartbeats.",
               [({"where": "memory"}, memory), ({"where": "disk"}, disk)]),
        Metric("stragglers", "counter", "Stragglers found, by kind (task or consumer).",
               counts({k: n for (a, k), n in reports.items() if a == "straggler"}, "kind")),
        Metric("copies", "counter", "Copies of stragglers started, by kind (task copies, consumer takeovers).",
               counts({k: n for (a, k), n in reports.items() if a == "copy"}, "kind")),
        Metric("slow_workers_found", "counter", "Times a worker was found slow.",
               [({}, reports.get(("slow-worker", "worker"), 0))]),
        Metric("slow_workers", "gauge", "Workers flagged slow now.", [({}, len(coord.stragglers.slow))]),
        Metric("recoveries", "counter", "Runs and partitions recovered after a worker was lost, by how.",
               counts(recoveries, "how")),
        Metric("events", "counter", "Events on the aimss topic, by action.", counts(events, "action")),
        Metric("io_grants", "counter",
               "Grants of the coordinated I/O scheduler to sink writers, by whether they waited for a slot.",
               [({"waited": "no"}, io.grants - io.waited), ({"waited": "yes"}, io.waited)]),
        Metric("io_writers", "gauge", "Sink writers holding or waiting for a host's file system now, by state.",
               [({"state": "writing"}, writing), ({"state": "waiting"}, waiting)]),
        Metric("fill_slices", "counter", "Idle-filling slices run, by kind (gpu or cpu).",
               counts(dict(fill.slices_total), "kind")),
        Metric("fill_seconds", "counter", "Seconds of idle-filling slices, by kind (gpu or cpu).",
               counts(dict(fill.seconds_total), "kind")),
        Metric("fillers", "gauge", "Idle fillers known to the coordinator, by state.",
               counts(fillers, "state")),
        Metric("sync_phases_open", "gauge", "Sync phases open now.", [({}, len(fill.phases))]),
        Metric("sync_phases", "counter", "Sync phases closed.", [({}, fill.phases_closed)]),
    ]
