"""GPU power and idle filling: the pure planning, metrics and simulation.

Everything GPU-related is imported lazily through :mod:`aimss_dask.power.gpu`,
so CPU-only users never need CuPy or NVML. The modules here are plain data
and NumPy (the policy the coordinator runs, :mod:`~aimss_dask.power.policy`;
phase lengths, :mod:`~aimss_dask.power.phases`; timeline metrics,
:mod:`~aimss_dask.power.metrics`; the simulation, :mod:`~aimss_dask.power.sim`).

Examples
--------
>>> from aimss_dask.power import Workload, simulate
>>> r = simulate(n_gpus=32, workload=Workload(rounds=3))
>>> r.slowdown < 0.05
True
"""

from aimss_dask.power.metrics import PowerSummary, summarize
from aimss_dask.power.phases import PhaseHistory
from aimss_dask.power.policy import Dispatch, FillerView, FillPolicy, WorkerView, plan
from aimss_dask.power.sim import GpuModel, SimReport, Workload, simulate

__all__ = [
    "Dispatch",
    "FillPolicy",
    "FillerView",
    "GpuModel",
    "PhaseHistory",
    "PowerSummary",
    "SimReport",
    "Workload",
    "WorkerView",
    "plan",
    "simulate",
    "summarize",
]
