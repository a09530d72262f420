"""``--preload aimss_dask.preload``: AIMSS for clusters configured by files.

On a scheduler (``dask scheduler --preload aimss_dask.preload``) it registers
the :class:`~aimss_dask.AIMSS` plugin at start-up. On a worker (for example
``worker_extra_args=["--preload", "aimss_dask.preload"]`` in dask-jobqueue,
where the scheduler runs inside the client) it asks the scheduler to register
it; registration is idempotent, so every worker may ask. Settings come from
the ``aimss:`` block of the Dask config on the scheduler.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed import Scheduler, Worker
from distributed.protocol.pickle import dumps

from aimss_dask.coordinator.plugin import AIMSS
from aimss_dask.core.names import PLUGIN_NAME

logger = logging.getLogger("aimss_dask")


async def dask_setup(server: Any) -> None:
    if isinstance(server, Scheduler):
        await server.register_scheduler_plugin(AIMSS(), name=PLUGIN_NAME, idempotent=True)
    elif isinstance(server, Worker):
        await server.scheduler.register_scheduler_plugin(
            plugin=dumps(AIMSS()), name=PLUGIN_NAME, idempotent=True
        )
    else:  # a Nanny: its worker process will run the preload itself
        logger.info("aimss_dask.preload: nothing to do on %s", type(server).__name__)
