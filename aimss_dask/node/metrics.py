"""A worker's AIMSS metrics, as plain data for ``/metrics`` (see :mod:`aimss_dask.core.metrics`).

What one worker's log holds and its budget, and running totals: records
and bytes this process wrote that their owners stored (``path``: sent to
another worker, or appended here by the owner's own tasks), records and
bytes this worker's log received and served, bytes spilled, duplicate
groups dropped, and the push latency (from ``write`` to the owner's
answer, per batch).
"""

from __future__ import annotations

from typing import Any

from aimss_dask.core.metrics import Metric

__all__ = ["worker_metrics"]


def worker_metrics(plugin: Any) -> list[Metric]:
    """The metrics of ``plugin`` (an ``AIMSSWorker``); none before its setup or after its store closed."""
    store, producer = plugin.store, plugin.producer
    if store is None or producer is None or store.closed:
        return []
    stored = {path: list(v) for path, v in producer.stored.items()}
    buckets, total, _ = producer.latency.snapshot()
    return [
        Metric("log_bytes", "gauge", "Bytes held in this worker's log, in memory or spilled to disk.",
               [({"where": "memory"}, store.memory_bytes), ({"where": "disk"}, store.spilled_bytes)]),
        Metric("log_budget_bytes", "gauge", "This worker's log memory budget.", [({}, store.budget)]),
        Metric("log_peak_bytes", "gauge", "Most bytes this worker's log has held in memory.",
               [({}, store.peak_memory)]),
        Metric("pushed_records", "counter", "Records written from this process that their owners stored.",
               [({"path": p}, v[0]) for p, v in sorted(stored.items())]),
        Metric("pushed_bytes", "counter", "Bytes written from this process that their owners stored.",
               [({"path": p}, v[1]) for p, v in sorted(stored.items())]),
        Metric("received_records", "counter", "Records appended to this worker's log (replica copies too).",
               [({}, store.appended[0])]),
        Metric("received_bytes", "counter", "Bytes appended to this worker's log (replica copies too).",
               [({}, store.appended[1])]),
        Metric("read_records", "counter", "Records this worker's log served to readers and replicas.",
               [({}, store.served[0])]),
        Metric("read_bytes", "counter", "Bytes this worker's log served to readers and replicas.",
               [({}, store.served[1])]),
        Metric("spilled_bytes", "counter", "Bytes this worker's log has written to spill files.",
               [({}, store.spilled_total)]),
        Metric("duplicates_dropped", "counter",
               "Groups of records this worker dropped as another attempt's copy of an input.",
               [({}, plugin.reads["duplicates"])]),
        Metric("push_latency_seconds", "histogram",
               "Seconds from a write to its owner's answer, per batch of records pushed to another worker.",
               [({}, (buckets, total))]),
    ]
