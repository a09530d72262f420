"""Every run and stream of the cluster, from the registry and the workers' heartbeats.

Each worker's last heartbeat (:mod:`aimss_dask.node.heartbeat`) is in
``scheduler.workers[address].metrics[HEARTBEAT_METRIC]``; ``aimss_runs`` and
``status()`` read it there, so no query fans out to the workers.

Examples
--------
>>> fold({"tcp://w1": {"runs": [["s", None, 1, "SourceRun", {"records": 3}]],
...                    "streams": {"s": [3, 300, 0]}, "time": 1.0}})["streams"]["s"]
{'records': 3, 'memory_bytes': 300, 'disk_bytes': 0, 'workers': {'tcp://w1': [3, 300, 0]}}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from aimss_dask.core.names import HEARTBEAT_METRIC

logger = logging.getLogger("aimss_dask")

def heartbeats(scheduler: Any) -> dict[str, Any]:
    """Each worker's latest heartbeat payload (None before its first), by address."""
    return {a: ws.metrics.get(HEARTBEAT_METRIC) for a, ws in list(scheduler.workers.items())}


def fold(payloads: Mapping[str, Any]) -> dict[str, Any]:
    """The heartbeats of every worker (address -> payload) as cluster-wide totals.

    ``streams``: name -> records, memory and disk bytes in all, and per
    worker. ``runs``: the worker-side runs, by address.
    """
    streams: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[Any]] = {}
    for addr, beat in sorted(payloads.items()):
        if not isinstance(beat, Mapping):
            continue
        for name, (records, mem, disk, *rest) in beat.get("streams", {}).items():
            st = streams.setdefault(name, {"records": 0, "memory_bytes": 0, "disk_bytes": 0, "workers": {}})
            st["records"] += records
            st["memory_bytes"] += mem
            st["disk_bytes"] += disk
            st["workers"][addr] = [records, mem, disk]
            if len(rest) > 1:
                st.setdefault("bounds", {})[addr] = rest[1]
        runs[addr] = list(beat.get("runs", []))
    return {"streams": streams, "runs": runs}


def overview(
    registry: Any,
    streams: Mapping[str, Any],
    sealed: set[str],
    lost: Mapping[str, Mapping[int, tuple[int, int | None]]],
    beats: Mapping[str, Any],
) -> dict[str, Any]:
    """Every run and stream of the cluster, as plain data: what ``aimss_runs`` answers.

    ``registry``: the coordinator's :class:`~aimss_dask.coordinator.registry.RunRegistry`;
    ``streams``: name -> :class:`~aimss_dask.core.specs.StreamSpec`;
    ``lost``: name -> lost partition -> ``(first, end)`` offsets;
    ``beats``: address -> the latest :func:`heartbeat` of that worker. The
    heartbeats are applied to the registry as reports of their workers
    (moving a run that holds records to RUNNING), then listed: each run
    with its streams' partitions and bytes, and its progress per worker.
    """
    folded = fold(beats)
    totals = folded["streams"]
    # Worker-side run objects (a sink's writes, a source's brokers), and the
    # records each worker holds of a run's streams, as reports of that worker.
    for addr, wruns in folded["runs"].items():
        for name, run_id, _epoch, kind, prog in wruns:
            rec = registry.find(run_id) if run_id else registry.for_stream(name)
            if rec is not None and not rec.finished:
                state = "running" if rec.state.value == "registered" else None
                registry.update(rec.run_id, rec.epoch, addr, state=state, progress={**rec.progress.get(addr, {}), **prog})
    for rec in registry.unfinished():
        held: dict[str, list[int]] = {}
        for name in rec.spec.streams:
            for addr, counts in totals.get(name, {}).get("workers", {}).items():
                held[addr] = [a + b for a, b in zip(held.get(addr, [0, 0, 0]), counts)]
        for addr, (records, mem, disk) in held.items():
            prog = {**rec.progress.get(addr, {}), "records": records, "memory_bytes": mem, "disk_bytes": disk}
            state = "running" if records and rec.state.value == "registered" else None
            registry.update(rec.run_id, rec.epoch, addr, state=state, progress=prog)
    runs = registry.snapshot()
    for r in runs:
        held = [totals[n] for n in r["streams"] if n in totals and n in streams]
        r["partitions"] = {n: streams[n].partitions for n in (*r["streams"], *r["reads"]) if n in streams}
        r["memory_bytes"] = sum(t["memory_bytes"] for t in held)
        r["disk_bytes"] = sum(t["disk_bytes"] for t in held)
    listed = []
    for name in sorted(streams):
        spec = streams[name]
        t = totals.get(name, {})
        owner = registry.for_stream(name)
        records = t.get("records", 0)
        if spec.replicas:
            # Replicas report the records they hold too: count each
            # partition once, as its owner reports it.
            records = sum(
                end
                for addr, bounds in t.get("bounds", {}).items()
                for p, _start, end in bounds
                if 0 <= p < spec.partitions and spec.owners[p] == addr
            )
        listed.append({
            "name": name,
            "partitions": spec.partitions,
            "owners": sorted(set(spec.owners)),
            "epoch": spec.epoch,
            "client": spec.creator,
            "persist": spec.persist,
            "sealed": name in sealed,
            "lost": sorted(lost.get(name, ())),
            "lost_offsets": {p: list(r) for p, r in sorted(lost.get(name, {}).items())},
            "run": None if owner is None else owner.run_id,
            "records": records,
            "replication": spec.replication,
            "under_replicated": [
                p for p in range(spec.partitions)
                if spec.replicas and len(spec.holders(p)) < spec.replication and p not in lost.get(name, {})
            ],
            "memory_bytes": t.get("memory_bytes", 0),
            "disk_bytes": t.get("disk_bytes", 0),
        })
    return {"runs": runs, "streams": listed}
