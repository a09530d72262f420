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
