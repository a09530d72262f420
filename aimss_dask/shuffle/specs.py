"""The run specs of the shuffle operators: shuffle, merge and rechunk.

All three are push runs: map tasks push while the map phase runs, the seal
task is the barrier, and each output partition is read on its owner. At
seal the bytes per worker are evened out and partitions no submitted task
reads are freed; a lost worker restarts the run.

Examples
--------
>>> spec = push_spec(ShuffleSpec, "abc", ["aimss-shuffle-abc-0"])
>>> spec.kind, spec.barrier, spec.output_partition(spec.output_key("aimss-shuffle-abc-0", 2))
('shuffle', 'aimss-seal-abc', ('aimss-shuffle-abc-0', 2))
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.core.runs import OnLoss, OnSeal, OutputMap, RunSpec


@dataclass(frozen=True, kw_only=True)
class ShuffleSpec(RunSpec, kind="shuffle"):
    """A DataFrame shuffle: one stream, output frames keyed ``(prefix, stream, p)``."""


@dataclass(frozen=True, kw_only=True)
class MergeSpec(RunSpec, kind="merge"):
    """A hash join: one stream per side, co-located, read together by each output task."""


@dataclass(frozen=True, kw_only=True)
class RechunkSpec(RunSpec, kind="rechunk"):
    """An array rechunk: one stream, output chunks keyed ``(prefix, *index)`` over the grid."""


def push_spec(
    cls: type[RunSpec],
    token: str,
    names: list[str],
    grid: tuple[int, ...] | None = None,
    inputs: int = 0,
    replication: int | None = None,
) -> RunSpec:
    """The spec of a push run ``token`` over streams ``names`` (the first is read by its outputs).

    ``inputs``: how many inputs push into each stream (input partitions of a
    shuffle; of the larger side of a merge, whose sides number their
    partitions each from 0 into their own stream; input blocks of a
    rechunk). Their records then carry their origin, and the owners drop a
    second copy of an input (plan §2.8). 0: no origins. ``replication``:
    copies of each partition (None: the ``aimss.replication`` default).
    """
    if replication is not None:
        try:
            if isinstance(replication, bool):
                raise TypeError
            replication = operator.index(replication)
        except TypeError:
            raise InvalidArgumentError(
                f"replication={replication!r} is not an int; give the copies of each "
                "partition (an int >= 1), or None for the aimss.replication default"
            ) from None
    return cls(
        run_id=token,
        streams=tuple(names),
        create=f"aimss-create-{token}",
        barrier=f"aimss-seal-{token}",
        outputs=OutputMap(names[0], grid),
        on_seal=OnSeal.REBALANCE,
        free_unread=True,
        on_loss=OnLoss.RECOVER,
        inputs=inputs,
        replication=replication,
    )
