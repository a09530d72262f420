"""The shared operator toolkit: what more than one operator builds a push run from.

- :mod:`aimss_dask.ops.pieces`: pure planning, cutting array blocks into
  pieces along an output grid (chunk bounds, pieces per output partition,
  the main input of each output chunk).
- :mod:`aimss_dask.ops.pushrun`: the task bodies of a push run (create the
  run's streams, push array pieces, seal at the barrier) and the wrappers
  that carry a task through a restart of its run
  (:func:`~aimss_dask.ops.pushrun.restartable`,
  :func:`~aimss_dask.ops.pushrun.rerun_on_restart`).
- :mod:`aimss_dask.ops.local`: what a task body finds on the worker it runs
  on (address, scratch allocator, how tight the log's budget is).

The operators (``shuffle/``, ``sink/``, ``source/``) import from here; this
package imports none of them, only the core layers below (``core/``,
``errors``, ``stream/``). It imports none of its own modules either, so
importing one of them does not import the others.
"""
