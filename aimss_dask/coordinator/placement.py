"""Where partitions live: pure functions over plain data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aimss_dask.core.errors import InvalidArgumentError, NotRegisteredError
from aimss_dask.core.specs import partition_for_key

__all__ = [
    "SLACK",
    "add_replicas",
    "owners_load",
    "partition_for_key",
    "place_partitions",
    "place_replicas",
    "rebalance",
]

#: How far above the mean a worker's share may be before placement spreads
#: (partitions) or the barrier moves (bytes) partitions elsewhere.
SLACK = 1.1


def place_partitions(
    n: int, load: Mapping[str, int], prefer: Sequence[str | None] | None = None
) -> list[str]:
    """Owners for ``n`` new partitions, balancing partitions per worker.

    ``prefer[p]``, where it names a live worker, places partition ``p`` there
    instead: the worker that already holds most of its input, so the
    operator filling it appends locally instead of sending over the network.
    A worker takes at most ``max(ceil(n / workers), SLACK * n / workers)`` of
    the ``n`` by preference (when every partition prefers one worker, as in
    a rechunk whose input blocks all feed every chunk equally, the rest
    spread out instead of being moved at the barrier); the others go
    to the least loaded.

    ``load`` maps each live worker to the partitions it already owns. Each new
    partition goes to the least-loaded worker (ties broken by address, so the
    result is deterministic); consecutive partitions thus land on different
    workers, which spreads consumers too.

    Examples
    --------
    >>> place_partitions(3, {"tcp://b": 0, "tcp://a": 0})
    ['tcp://a', 'tcp://b', 'tcp://a']
    >>> place_partitions(2, {"tcp://a": 5, "tcp://b": 0})
    ['tcp://b', 'tcp://b']
    """
    if not load:
        raise NotRegisteredError(
            "the cluster has no workers to hold stream partitions; start workers "
            "(or wait for them with client.wait_for_workers) before creating streams"
        )
    counts = dict(load)
    cap = max(-(-n // len(counts)), int(SLACK * n / len(counts)))
    preferred = dict.fromkeys(counts, 0)
    owners: list[str] = []
    for p in range(n):
        w = prefer[p] if prefer is not None and p < len(prefer) else None
        if w in preferred and preferred[w] < cap:
            preferred[w] += 1
        else:
            w = min(counts, key=lambda a: (counts[a], a))
        owners.append(w)
        counts[w] += 1
    return owners


def place_replicas(
    owners: Sequence[str],
    copies: int,
    load: Mapping[str, int],
    host_of: Mapping[str, str] | None = None,
) -> list[tuple[str, ...]]:
    """``copies - 1`` replicas for each partition, never on its owner, spread over hosts.

    Each replica goes to the least-loaded live worker that does not hold the
    partition yet, preferring a host that holds no copy of it: a host that
    goes down (power, network) then takes one copy, not all. ``load`` counts
    partitions and replicas a worker holds already; ``host_of`` maps a
    worker to its host (default: each worker its own host). Raises
    :class:`~aimss_dask.core.errors.InvalidArgumentError` when there are fewer
    workers than copies.

    Examples
    --------
    >>> place_replicas(["a", "b"], 2, {"a": 1, "b": 1, "c": 0})
    [('c',), ('a',)]
    >>> place_replicas(["a"], 2, {"a": 0, "b": 0, "c": 0}, {"a": "h1", "b": "h1", "c": "h2"})
    [('c',)]
    """
    if copies > len(load):
        raise InvalidArgumentError(
            f"replication={copies} needs at least {copies} workers, and the cluster has "
            f"{len(load)}; use replication <= {len(load)} or add workers"
        )
    counts = dict(load)
    return [tuple(add_replicas([owner], copies - 1, counts, host_of)) for owner in owners]


def add_replicas(
    held: Sequence[str], need: int, load: dict[str, int], host_of: Mapping[str, str] | None = None
) -> list[str]:
    """Up to ``need`` more workers for a partition ``held`` by some already; ``load`` is updated.

    Least loaded first, preferring a host that holds no copy yet; fewer
    than ``need`` when the cluster has too few workers left.

    Examples
    --------
    >>> add_replicas(["a"], 1, {"a": 0, "b": 3, "c": 1})
    ['c']
    """
    hosts = host_of or {}
    have = list(held)
    added: list[str] = []
    for _ in range(need):
        free = [a for a in load if a not in have]
        if not free:
            break
        used = {hosts.get(w, w) for w in have}
        w = min(free, key=lambda a: (hosts.get(a, a) in used, load[a], a))
        have.append(w)
        added.append(w)
        load[w] += 1
    return added


def owners_load(owners_by_stream: Sequence[Sequence[str]], workers: Sequence[str]) -> dict[str, int]:
    """Partitions each live worker owns, from the owner lists of all streams."""
    load = {w: 0 for w in workers}
    for owners in owners_by_stream:
        for w in owners:
            if w in load:
                load[w] += 1
    return load


def rebalance(
    sizes: Sequence[int], owners: Sequence[str], workers: Sequence[str], slack: float = SLACK
) -> list[str]:
    """Owners for partitions of known ``sizes``, balanced, moving few bytes.

    Largest partitions first: each stays with its current owner while that
    owner's load stays within ``cap = max(largest, slack * mean)``; otherwise
    it goes to the least-loaded worker. The result keeps every worker within
    ``max(largest partition, slack * mean + largest partition moved)``, and a
    placement that is already balanced is returned unchanged.

    Examples
    --------
    >>> rebalance([60, 10, 10, 10, 10], ["a", "a", "a", "b", "b"], ["a", "b"])
    ['a', 'b', 'b', 'b', 'b']
    """
    live = list(workers)
    if not live:
        return list(owners)
    total = sum(sizes)
    cap = max(max(sizes, default=0), slack * total / len(live))
    load = {w: 0 for w in live}
    out = list(owners)
    for p in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        current = owners[p]
        if current in load and load[current] + sizes[p] <= cap:
            target = current
        else:
            target = min(live, key=lambda w: (load[w], w != current, w))
        load[target] += sizes[p]
        out[p] = target
    return out if _pays_off(sizes, owners, out, max(load.values())) else list(owners)


#: Bytes a move must take off the busiest worker's reads per byte that one
#: worker sends or receives for it. The reads wait for the moves, and a
#: worker receives a byte over the data plane in about half the time it
#: takes to read it back into its output (unpacking, building frames).
MOVE_COST = 0.5


def _pays_off(sizes: Sequence[int], owners: Sequence[str], new: Sequence[str], busiest: int) -> bool:
    """Whether moving to ``new`` shortens the reads by more than the moves take.

    ``busiest``: the bytes ``new`` leaves on its most loaded worker.

    A skewed placement gains about a byte per byte moved; a worker that
    joined an even placement of ``n`` workers gains only ``1/n`` of what
    it receives, and is left out (the peers do not use it either).
    """
    before: dict[str, int] = {}
    into: dict[str, int] = {}
    out_of: dict[str, int] = {}
    for size, old, now in zip(sizes, owners, new):
        before[old] = before.get(old, 0) + size
        if old != now:
            into[now] = into.get(now, 0) + size
            out_of[old] = out_of.get(old, 0) + size
    if not into:
        return False
    gain = max(before.values()) - busiest
    return gain >= MOVE_COST * max(*into.values(), *out_of.values())
