"""The coordinator (scheduler plugin) and the application cache (worker plugin)."""

from aimss_dask.plugin.scheduler import AIMSS

__all__ = ["AIMSS"]
