"""GPU power sampling and idle filling.

Everything GPU-related is imported lazily through :mod:`aimss_dask.power.gpu`,
so CPU-only users never need CuPy or NVML.
"""
