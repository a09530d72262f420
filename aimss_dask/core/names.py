"""Names every process agrees on: the plugin's name and the task-key conventions."""

from __future__ import annotations

from typing import Any

#: Name of the scheduler and worker plugins (``worker.plugins[PLUGIN_NAME]``).
PLUGIN_NAME = "aimss"

#: Tasks whose key is ``(PARTITION_TASK_PREFIX + token, stream, partition)`` run
#: on the partition's owner; see ``AIMSS.update_graph``.
PARTITION_TASK_PREFIX = "aimss-partition-"

#: Scheduler metadata key holding ``[folder, compress]`` while a trace runs.
TRACE_KEY = "aimss-trace"

#: Scheduler metadata key set while the plugin is registered.
REGISTERED_KEY = "aimss-registered"

#: Scheduler metadata key of the cluster's data-plane secret. It outlives a
#: plugin's close: workers keep the worker plugin (and its secret) when the
#: scheduler plugin is registered again.
SECRET_KEY = "aimss-data-secret"

#: The event topic on which the coordinator asks writing client processes to
#: push what they buffer before a seal (``log_event`` / ``subscribe_topic``).
SEAL_PRODUCERS_TOPIC = "aimss-seal-producers"

#: The event topic on which the coordinator tells writing client processes
#: that a worker holding partitions left (workers hear it as ``aimss_owner_lost``).
OWNER_LOST_TOPIC = "aimss-owner-lost"

#: The event topic of straggler reports: a task or consumer found slow, a
#: slow worker, and how each straggler ended (``client.subscribe_topic``).
STRAGGLER_TOPIC = "aimss-straggler"

#: The attribute (set to True) that marks a function as a partition read:
#: its first two arguments are the stream name and the partition, and it must
#: run on that partition's owner. The coordinator finds such calls inside the
#: tasks that depend on a run's barrier (Dask may fuse a read into them) and
#: pins those tasks; see ``coordinator/pinning.py``.
PARTITION_READ = "__aimss_partition_read__"

#: The key of AIMSS's heartbeat payload under ``worker.metrics`` (and so
#: ``WorkerState.metrics`` on the scheduler).
HEARTBEAT_METRIC = "aimss"

#: Key of a worker's sink write-behind queue among its shared resources
#: (``RunManager.shared``): the worker plugin finds it there to hand a slow
#: writer's queue over (``aimss_sink_handover``) without importing the sink.
SINK_WRITER_KEY = "sink"

#: The attribute (set to True) of a function the user declared idempotent
#: (:func:`aimss_dask.speculative`): a straggling call of it may get a copy on
#: another worker, and the first result wins.
SPECULATIVE = "__aimss_speculative__"

#: The attribute (set to True) of an AIMSS operator's push task function
#: (:func:`aimss_dask.ops.pushrun.copyable`): speculative, and placed by the
#: coordinator off workers found slow (its inputs move instead).
RUN_PUSH = "__aimss_run_push__"

#: The Dask annotation that declares a graph's tasks idempotent, like
#: :func:`aimss_dask.speculative` does a function:
#: ``with dask.annotate(aimss_speculative=True): ...``.
SPECULATIVE_ANNOTATION = "aimss_speculative"

#: Consumer group of a ``Stream.map_records`` call made without one:
#: ``MAP_GROUP_PREFIX + token``.
MAP_GROUP_PREFIX = "aimss-map-"

#: Prefix of the key of a helper that takes over the rest of a slow
#: consumer's range (``Stream.map_records``):
#: ``(TAKEOVER_TASK_PREFIX + token, stream, partition, first offset)``.
TAKEOVER_TASK_PREFIX = "aimss-takeover-"

#: Prefix of the key of a straggler's copy: ``COPY_TASK_PREFIX + key_text(key)``.
COPY_TASK_PREFIX = "aimss-copy-"


def key_text(key: Any) -> str:
    """A task key as text, the same in every process (messages turn tuples into lists).

    >>> key_text(("x", 0, 3)), key_text("y")
    ("('x', 0, 3)", 'y')
    """
    return key if isinstance(key, str) else str(tuple(key) if isinstance(key, list) else key)
