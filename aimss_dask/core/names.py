"""Names every process agrees on: the plugin's name and the task-key conventions."""

from __future__ import annotations

#: Name of the scheduler and worker plugins (``worker.plugins[PLUGIN_NAME]``).
PLUGIN_NAME = "aimss"

#: Tasks whose key is ``(PARTITION_TASK_PREFIX + token, stream, partition)`` run
#: on the partition's owner; see ``AIMSS.update_graph``.
PARTITION_TASK_PREFIX = "aimss-partition-"

#: Scheduler metadata key set while the plugin is registered.
REGISTERED_KEY = "aimss-registered"

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
