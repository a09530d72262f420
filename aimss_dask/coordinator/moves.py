"""Moving sealed partitions between workers, verified: a partition changes owner only once it arrived whole.

Used where the coordinator moves data: the barrier's rebalance
(:meth:`~aimss_dask.coordinator.runs.RunHandlers.rebalance`) and a
retiring worker's hand-over (:mod:`~aimss_dask.coordinator.retire`). The
old owner keeps its copy, and keeps serving it, until the caller has
switched the owner; a copy that did not arrive whole is dropped at the
target, and the partition stays where it was.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from aimss_dask.coordinator.cluster import ClusterOps
from aimss_dask.core.specs import StreamSpec

logger = logging.getLogger("aimss_dask")

#: Longest wait for a moved partition's records to arrive, without any
#: progress (the old owner may be finishing the move as it closes), s.
ARRIVAL_TIMEOUT = 30.0


async def copy_partitions(
    ops: ClusterOps,
    source: str,
    spec: StreamSpec,
    moved: StreamSpec,
    parts: list[int],
    listed_only: bool = False,
    alive: Callable[[], bool] = lambda: True,
) -> set[int]:
    """Copy ``parts`` of sealed ``spec`` from ``source`` to their owners in ``moved``; those that arrived whole.

    Each from its first kept offset (the target opens it there, so every
    record keeps its offset), then checked at the target against the
    source's end offset, and sealed there. ``source`` may be closing (no
    longer listed by the scheduler): it is asked directly, unless
    ``listed_only`` (then a source the scheduler no longer lists, dead,
    gives nothing, at once). ``alive()`` False: the stream was destroyed
    meanwhile (its run restarted); stop.
    """
    if listed_only and source not in ops.workers():
        return set()
    try:
        stats = await ops.ask(source, {"op": "aimss_stream_stats", "name": spec.name})
    except Exception as e:  # gone: nothing to copy from
        logger.info("aimss: cannot move %s from %s: %r", spec.name, source, e)
        return set()
    held = {p: st for p, st in stats.get("partitions", []) if p in parts}
    if not held:
        return set()
    msg = {"spec": moved.to_wire()}
    by_target: dict[str, list[int]] = {}
    for p in held:
        by_target.setdefault(moved.owners[p], []).append(p)
    for w, ps in by_target.items():
        await ops.broadcast(
            {"op": "aimss_open", **msg, "partitions": ps, "starts": [[p, held[p]["start"]] for p in ps]}, [w]
        )
    try:
        await ops.ask(source, {"op": "aimss_move", **msg, "partitions": sorted(held), "drop": False})
    except Exception as e:  # a closing worker keeps moving as it closes; the targets tell
        logger.info("aimss: move of %s from %s: %r; checking its new owners", spec.name, source, e)
    arrived = await _arrived(ops, moved, by_target, {p: held[p]["records"] for p in held}, alive)
    for w, ps in by_target.items():
        partial = [p for p in ps if p not in arrived]
        if partial:
            await ops.broadcast({"op": "aimss_drop", "name": spec.name, "epoch": spec.epoch, "partitions": partial}, [w])
        whole = [p for p in ps if p in arrived]
        if whole:
            # Only these: others of the stream may still be arriving there.
            await ops.broadcast(
                {"op": "aimss_seal_partitions", "name": spec.name, "epoch": spec.epoch, "partitions": whole}, [w]
            )
    return arrived


async def copy_group(
    ops: ClusterOps,
    specs: list[StreamSpec],
    target: tuple[str, ...],
    parts: list[int],
    listed_only: bool = False,
    alive: Callable[[], bool] = lambda: True,
) -> set[int]:
    """Copy ``parts`` of every stream in ``specs`` (placed alike) to the owners in ``target``; those that arrived.

    A partition counts only if it arrived whole in every stream of the
    group (a join reads both sides on one worker): the copies of the others
    are dropped at their targets. Sources are the streams' current owners;
    ``listed_only``, ``alive``: see :func:`copy_partitions`.
    """
    owners = specs[0].owners
    got: list[set[int]] = []
    for spec in specs:
        moved = replace(spec, owners=target)
        here: set[int] = set()
        for w in sorted({owners[p] for p in parts}):
            here |= await copy_partitions(
                ops, w, spec, moved, [p for p in parts if owners[p] == w], listed_only, alive
            )
        got.append(here)
    arrived = set(parts).intersection(*got)
    for spec, here in zip(specs, got):
        for w in sorted({target[p] for p in here - arrived}):
            await drop_copies(ops, w, spec, sorted(p for p in here - arrived if target[p] == w))
    return arrived


async def drop_copies(ops: ClusterOps, worker: str, spec: StreamSpec, parts: list[int]) -> None:
    """Free ``parts`` of ``spec`` on ``worker`` (moved away, or a copy not used); never raises."""
    if not parts:
        return
    try:
        await ops.ask(worker, {"op": "aimss_drop", "name": spec.name, "epoch": spec.epoch, "partitions": parts})
    except Exception as e:  # closed already, and its log with it
        logger.info("aimss: dropping partitions %s of %s on %s: %r", parts, spec.name, worker, e)


async def _arrived(
    ops: ClusterOps, spec: StreamSpec, by_target: dict[str, list[int]], ends: dict[int, int], alive: Callable[[], bool]
) -> set[int]:
    """Partitions whose new owner holds every record up to ``ends[p]``.

    Asked again while records still arrive, until none did for
    :data:`ARRIVAL_TIMEOUT`.
    """
    last: dict[int, int] = {}
    quiet_since = time.monotonic()
    while True:
        if not alive():
            return set()
        have: dict[int, int] = {}
        for w, ps in by_target.items():
            reply = (await ops.broadcast({"op": "aimss_stream_stats", "name": spec.name}, [w])).get(w)
            # Not a dict: that worker is leaving (its error logged); nothing arrived there.
            for p, st in reply.get("partitions", []) if isinstance(reply, dict) else ():
                if p in ps:
                    have[p] = st["records"]
        done = {p for p, end in ends.items() if have.get(p) == end}
        if len(done) == len(ends):
            return done
        if have != last:
            last, quiet_since = have, time.monotonic()
        elif time.monotonic() - quiet_since > ARRIVAL_TIMEOUT:
            logger.warning(
                "aimss: partitions %s of %s did not arrive whole at their new owners; they stay where they were",
                sorted(set(ends) - done),
                spec.name,
            )
            return done
        await asyncio.sleep(0.05)
