"""The in-memory, log-structured store each worker keeps (no asyncio here)."""

from aimss_dask.log.budget import ByteBudget
from aimss_dask.log.store import LogStore

__all__ = ["ByteBudget", "LogStore"]
