"""What a worker tells the coordinator about its runs and streams, on each heartbeat.

The worker plugin adds :func:`heartbeat` to the worker's ``metrics`` (a
public parameter of ``distributed.Worker``): Dask calls it for every
heartbeat and the scheduler keeps the latest answer in
``scheduler.workers[address].metrics[HEARTBEAT_METRIC]``, where the
coordinator reads it (:mod:`aimss_dask.coordinator.overview`): no query fans
out to the workers, and a worker that stops answering stops updating its line.

Payload (plain data, msgpack-able)::

    {"runs": [[name, run_id or None, epoch, kind, {progress}], ...],
     "streams": {name: [records, memory bytes, disk bytes, epoch, [[p, start, end], ...]]},
     "log": [memory bytes, disk bytes, budget, bytes spilled in all, bytes pushed from
             here and stored, bytes received, bytes served to readers],
     "time": <worker's clock>}

``log`` is what the dashboard's memory and throughput pages show: running
totals, so the coordinator derives rates from two heartbeats.
"""

from __future__ import annotations

from typing import Any


def heartbeat(plugin: Any) -> dict[str, Any]:
    """The payload of one heartbeat of ``plugin`` (an ``AIMSSWorker``); cheap, any thread."""
    import time

    store = plugin.store
    streams: dict[str, list[int]] = {}
    if store is not None:
        streams = {name: list(t) for name, t in store.totals().items()}
    runs = [
        [name, p.pop("run_id", None), p.pop("epoch", 0), p.pop("kind", ""), p]
        for name, p in plugin.runs.progress().items()
    ]
    out: dict[str, Any] = {"runs": runs, "streams": streams, "time": time.time()}
    gpu = getattr(plugin, "gpu_state", None)
    if gpu is not None:
        # Idle filling's view of this worker's GPU (crossings go at once, apart).
        out["gpu"] = dict(gpu)
    producer = plugin.producer
    if store is not None and not store.closed:
        pushed = sum(v[1] for v in producer.stored.values()) if producer is not None else 0
        out["log"] = [
            store.memory_bytes, store.spilled_bytes, store.budget, store.spilled_total,
            pushed, store.appended[1], store.served[1],
        ]
    return out
