"""The leaf of the package: names, keys and specs every layer shares.

Nothing here imports another module of aimss_dask but :mod:`aimss_dask.core.errors`,
so any module may import it without pulling in the coordinator.
"""
