"""Idempotent functions whose straggling calls may run twice: :func:`speculative`.

The race between a call and its copy is :mod:`aimss_dask.core.race`.
"""

from __future__ import annotations

from typing import Any, Callable

from aimss_dask.core.race import Speculative

__all__ = ["speculative"]


def speculative(func: Callable[..., Any]) -> Speculative:
    """Declare ``func`` idempotent: a straggling call of it may get a copy on another worker.

    Dask never runs a task twice on purpose, because most tasks have side
    effects. Mark the functions that have none, and AIMSS may run a copy
    of a call that straggles (see ``aimss.speculation``): the first of the
    two to finish gives the result. Calls outside a Dask task, or on a
    cluster without AIMSS, are plain calls.

    Examples
    --------
    >>> import aimss_dask
    >>> @aimss_dask.speculative
    ... def simulate(seed):
    ...     return seed * 2
    >>> simulate(21)
    42
    >>> futures = client.map(simulate, range(100))   # doctest: +SKIP
    """
    if isinstance(func, Speculative):
        return func
    return Speculative(func)
