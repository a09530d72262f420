"""``shuffle`` and ``merge`` of Dask DataFrames through AIMSS streams."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import dask
import numpy as np

from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.core.names import PARTITION_TASK_PREFIX
from aimss_dask.ops import pushrun
from aimss_dask.shuffle import _tasks, partitioning
from aimss_dask.shuffle.specs import MergeSpec, ShuffleSpec, push_spec

if TYPE_CHECKING:
    # Imported by the operators that take frames, not with aimss_dask (which
    # every worker imports at start).
    import dask.dataframe as dd


def _npartitions(n: int | None, default: int) -> int:
    n = default if n is None else n
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise InvalidArgumentError(f"npartitions={n!r} must be a positive int")
    return int(n)


def _partitions(frame: dd.DataFrame) -> list[Any]:
    """``frame``'s partitions as Delayed objects named by the keys that hold them.

    A persisted dask-expr frame hands out its partitions as ``Alias`` tasks of
    the persisted keys. An alias is a task of its own, and the scheduler may
    run it on the worker that is not holding the data (it costs nothing to
    compute, so an idle worker looks best): the whole input partition is then
    copied there, and both copies stay until the push ends. Measured: 3 of 32
    64 MiB partitions per worker in a 4 GiB shuffle. Depending on the target
    key instead lets the push run where its input already is.
    """
    from dask.delayed import Delayed
    from dask.task_spec import Alias

    out = []
    flat: dict[int, dict[Any, Any]] = {}  # the parts share one graph: flatten it once
    for part in frame.to_delayed():
        hlg = part.__dask_graph__()
        if not isinstance(hlg.get(part.key), Alias):
            out.append(part)  # a frame still to compute: its graph is not flattened twice
            continue
        graph = flat.get(id(hlg))
        if graph is None:
            graph = flat[id(hlg)] = dict(hlg)
        key = part.key
        for _ in range(8):  # a chain of aliases, never a cycle
            node = graph.get(key)
            if not isinstance(node, Alias) or node.target == key or node.target not in graph:
                break
            key = node.target
        out.append(part if key == part.key else Delayed(key, graph))
    return out


def _run(
    frames: Sequence[dd.DataFrame],
    ons: Sequence[list[str]],
    npartitions: int,
    casts: Sequence[dict[str, str] | None],
    replication: int | None = None,
) -> tuple[list[str], str, Any, list[Any]]:
    """Delayed create / push / seal of one shuffle run over ``frames``.

    Each push tags its shards with its input partition's index within its
    side (each side pushes into its own stream), so the run declares the
    larger side's partition count as its ``inputs``.
    """
    from dask.dataframe.utils import make_meta

    token = uuid.uuid4().hex[:16]
    names = [f"aimss-shuffle-{token}-{i}" for i in range(len(frames))]
    parts = [_partitions(frame) for frame in frames]
    spec = push_spec(
        MergeSpec if len(frames) > 1 else ShuffleSpec, token, names,
        inputs=max((len(p) for p in parts), default=0), replication=replication,
    )
    barrier = spec.barrier
    created = dask.delayed(pushrun.create, pure=False)(spec, npartitions, dask_key_name=spec.create)
    pushed = []
    for side, (sides, on, cast) in enumerate(zip(parts, ons, casts)):
        layout = partitioning.pack_signature(make_meta(frames[side]))
        for i, part in enumerate(sides):
            pushed.append(
                dask.delayed(_tasks.push, pure=False)(
                    part, created, side, on, npartitions, cast, i, layout,
                    dask_key_name=(f"aimss-push-{token}", side, i),
                )
            )
    sealed = dask.delayed(pushrun.seal, pure=False)(created, *pushed, dask_key_name=barrier)
    return names, token, sealed, pushed


def shuffle(
    df: dd.DataFrame,
    on: str | Sequence[str],
    npartitions: int | None = None,
    *,
    replication: int | None = None,
) -> dd.DataFrame:
    """Repartition ``df`` by the hash of ``on``, pushing shards through AIMSS.

    The same contract as ``df.shuffle(on=...)``: every key lands in exactly one
    output partition, every row is kept, dtypes (and the index) are kept.
    Map tasks push their shards into a stream while the map phase runs; each
    output partition is then read locally on the worker that holds it.

    ``replication``: copies of each output partition, on as many workers
    (None: the ``aimss.replication`` default, capped at the running
    workers). With 2, a worker lost mid-shuffle costs only its own unsent
    pushes: its partitions are taken over by their copies.

    Examples
    --------
    >>> out = aimss_dask.shuffle(df, on="id", npartitions=64)  # doctest: +SKIP
    >>> safe = aimss_dask.shuffle(df, on="id", replication=2)  # doctest: +SKIP
    """
    import dask.dataframe as dd
    from dask.dataframe.utils import make_meta

    if not isinstance(df, dd.DataFrame):
        raise InvalidArgumentError(
            f"shuffle needs a dask.dataframe.DataFrame, got {type(df).__name__}"
        )
    keys = partitioning.check_columns(list(df.columns), on)
    n = _npartitions(npartitions, df.npartitions)
    meta = make_meta(df)
    (name,), token, sealed, _ = _run([df], [keys], n, [None], replication)
    parts = [
        dask.delayed(_tasks.read, pure=False)(
            name, j, meta, sealed, dask_key_name=(f"{PARTITION_TASK_PREFIX}{token}", name, j)
        )
        for j in range(n)
    ]
    return _from_parts(parts, meta)


_HOWS = ("inner", "left", "right", "outer")


def merge(
    left: dd.DataFrame,
    right: dd.DataFrame,
    on: str | Sequence[str] | None = None,
    how: str = "inner",
    *,
    left_on: str | Sequence[str] | None = None,
    right_on: str | Sequence[str] | None = None,
    npartitions: int | None = None,
    suffixes: tuple[str, str] = ("_x", "_y"),
    replication: int | None = None,
) -> dd.DataFrame:
    """Hash join of two Dask DataFrames, co-partitioned through AIMSS streams.

    Both sides are pushed into streams whose partition ``p`` lives on one
    worker, which then joins them with ``pandas.merge``. The result equals
    ``pandas.merge(left, right, ...)`` up to row order. ``replication``:
    copies of each partition of both sides, as for :func:`shuffle`.

    Examples
    --------
    >>> joined = aimss_dask.merge(orders, customers, on="customer_id", how="left")  # doctest: +SKIP
    """
    import dask.dataframe as dd
    from dask.dataframe.utils import make_meta

    if how not in _HOWS:
        raise InvalidArgumentError(f"how={how!r} is not one of {_HOWS}")
    for side, frame in (("left", left), ("right", right)):
        if not isinstance(frame, dd.DataFrame):
            raise InvalidArgumentError(
                f"merge needs dask.dataframe.DataFrames; {side} is a {type(frame).__name__}"
            )
    if on is not None and (left_on is not None or right_on is not None):
        raise InvalidArgumentError("give either on= or left_on=/right_on=, not both")
    if on is None and (left_on is None or right_on is None):
        raise InvalidArgumentError("give on=, or both left_on= and right_on=")
    lkeys = partitioning.check_columns(list(left.columns), on if on is not None else left_on, "left_on" if on is None else "on")
    rkeys = partitioning.check_columns(list(right.columns), on if on is not None else right_on, "right_on" if on is None else "on")
    if len(lkeys) != len(rkeys):
        raise InvalidArgumentError(
            f"left_on={lkeys!r} and right_on={rkeys!r} must name as many columns"
        )
    n = _npartitions(npartitions, max(left.npartitions, right.npartitions))
    # Equal keys must hash equally on both sides: bring each key pair to one
    # dtype first (int64 and float64 hash differently).
    lcast: dict[str, str] = {}
    rcast: dict[str, str] = {}
    lmeta, rmeta = make_meta(left), make_meta(right)
    for lk, rk in zip(lkeys, rkeys):
        ld, rd = lmeta[lk].dtype, rmeta[rk].dtype
        if ld != rd:
            common = _common_dtype(ld, rd, lk, rk)
            lcast[lk] = rcast[rk] = common
    kwargs: dict[str, Any] = {"how": how, "suffixes": suffixes}
    if on is not None:
        kwargs["on"] = lkeys
    else:
        kwargs["left_on"], kwargs["right_on"] = lkeys, rkeys
    meta = lmeta.merge(rmeta, **kwargs)
    names, token, sealed, _ = _run(
        [left, right], [lkeys, rkeys], n, [lcast or None, rcast or None], replication
    )
    parts = [
        dask.delayed(_tasks.join, pure=False)(
            names, j, (lmeta, rmeta), kwargs, sealed,
            dask_key_name=(f"{PARTITION_TASK_PREFIX}{token}", names[0], j),
        )
        for j in range(n)
    ]
    return _from_parts(parts, meta)


def _common_dtype(a: Any, b: Any, lk: str, rk: str) -> str:
    # pandas' own promotion: Int64 with int64 is Int64, which np.result_type
    # (NumPy dtypes only) cannot tell.
    import pandas as pd

    common = pd.concat([pd.Series([], dtype=a), pd.Series([], dtype=b)]).dtype
    if common == object and not (a == object or b == object):
        raise InvalidArgumentError(
            f"join keys {lk!r} ({a}) and {rk!r} ({b}) have dtypes that cannot be "
            "compared; cast one side first"
        )
    return str(common)


def _from_parts(parts: list[Any], meta: Any) -> dd.DataFrame:
    """The output collection, of ``meta``'s dtypes as they are.

    Not converted: with ``dataframe.convert-string`` on (Dask's default),
    ``from_delayed`` would turn every object column into strings (a
    ``Decimal`` into ``'1.5'``), where Dask's own shuffle keeps them.
    """
    import dask.dataframe as dd

    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_delayed(parts, meta=meta, verify_meta=False)
