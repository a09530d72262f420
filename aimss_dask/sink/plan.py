"""The pure planning of a ``to_zarr`` run: which blocks meet which units, and how.

No I/O, no cluster: which shape of run fits (:func:`aligned`,
:func:`in_place_kind`), how blocks are cut along units (:func:`cuts`,
:func:`inner_chunks`, :func:`row_pieces`), how they are grouped per task
(:func:`split_by_bytes`, :class:`Jobs`). The graphs (:mod:`.graphs`) and the
tasks (:mod:`.tasks`) act on these plans.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import dask.array as da


def aligned(x_chunks: tuple[tuple[int, ...], ...], unit: tuple[int, ...]) -> bool:
    """Whether every block of ``x`` is a whole number of units (its edges are unit edges)."""
    for c, u in zip(x_chunks, unit):
        edges = np.cumsum(c)[:-1]
        if np.any(edges % u):
            return False
    return True


def split_by_bytes(blocks: list[tuple[tuple[int, ...], int]], k: int) -> list[list[tuple[int, ...]]]:
    """``(block, nbytes)`` in order, cut into at most ``k`` runs of about equal bytes."""
    total = sum(n for _, n in blocks)
    out: list[list[tuple[int, ...]]] = [[]]
    done = 0
    for idx, n in blocks:
        # Start the next run once this one has its share of the bytes.
        if out[-1] and len(out) < k and done >= total * len(out) / k:
            out.append([])
        out[-1].append(idx)
        done += n
    return out


def in_place_kind(
    x: da.Array, unit: tuple[int, ...], raw: bool, inner: tuple[int, ...] | None
) -> str | None:
    """How ``x``'s blocks can be written in place: ``"rows"``, ``"chunks"``, or None.

    ``"rows"``: blocks cut along the first axis only, into units whose rows
    can be written in place (``raw``). ``"chunks"``: blocks made of whole
    inner chunks (of shape ``inner``) of the shards.
    """
    if raw and aligned(x.chunks[1:], unit[1:]):
        return "rows"
    if inner is not None and aligned(x.chunks, inner):
        return "chunks"
    return None


def inner_chunks(
    idx: tuple[int, ...], bounds: list[list[int]], inner: tuple[int, ...], per_shard: tuple[int, ...]
) -> list[tuple[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]], tuple[int, ...]]]:
    """Block ``idx``'s inner chunks: ``(shard coords, (starts, stops) in the block, inner coords in the shard)``.

    The block's edges are inner-chunk edges (the caller checked), so each
    inner chunk it touches lies in it whole (as far as the array goes).
    """
    per_axis = [cuts(b[i], b[i + 1], c) for b, i, c in zip(bounds, idx, inner)]
    return [
        (
            tuple(a[0] // n for a, n in zip(combo, per_shard)),
            (tuple(a[1] for a in combo), tuple(a[2] for a in combo)),
            tuple(a[0] % n for a, n in zip(combo, per_shard)),
        )
        for combo in itertools.product(*per_axis)
    ]


def cuts(s: int, e: int, u: int) -> list[tuple[int, int, int, int, int]]:
    """How the grid of step ``u`` cuts ``[s, e)``, per cell ``k`` it touches.

    Each cut is ``(k, start, stop)`` counted from ``s``, then ``(lo, hi)``
    counted from the cell's start.

    Plain integer arithmetic: NumPy calls per block made planning a
    500-block run take 30 ms.
    """
    out = []
    for k in range(s // u, -(-e // u)):
        lo, hi = max(s, k * u), min(e, (k + 1) * u)
        out.append((k, lo - s, hi - s, lo - k * u, hi - k * u))
    return out


class Jobs:
    """A task's write jobs, as one table of integers: one opaque argument, few objects.

    One row per piece: ``jid, j, *unit coords, *sub, *starts, *stops``, where
    ``j`` is the block (of the task's blocks) the piece is cut from,
    ``starts``/``stops`` where in the block, and ``sub`` where in the unit
    (``(lo, hi)`` rows, or an inner chunk's coordinates). The rows of one job
    follow each other.

    Why a table: a thousand pieces as tuples of slices were ~6000 objects
    kept by the client, the scheduler and each worker for the whole run
    (every few runs they tipped a full garbage collection, 50-100 ms, into
    the write), and the scheduler plugin's walk of every task's lists and
    tuples for fused partition reads took 13 ms. There is nothing to find
    in here.
    """

    __slots__ = ("ndim", "nsub", "table")

    def __init__(self, table: np.ndarray, ndim: int, nsub: int) -> None:
        self.table, self.ndim, self.nsub = table, ndim, nsub

    @classmethod
    def pack(
        cls, by_unit: dict[tuple[int, ...], list[Any]], first: int, ndim: int, nsub: int
    ) -> tuple[Jobs, int]:
        """One job per unit of ``by_unit`` (``coords -> [(j, (starts, stops), sub)]``), ids from ``first``.

        Returns the jobs and the next free id.
        """
        flat: list[int] = []
        jid = first
        for coords, pieces in by_unit.items():
            for j, (starts, stops), sub in pieces:
                flat += (jid, j, *coords, *sub, *starts, *stops)
            jid += 1
        width = 2 + 3 * ndim + nsub
        return cls(np.array(flat, dtype=np.int64).reshape(-1, width), ndim, nsub), jid

    def __iter__(self) -> Any:
        """``(jid, unit coords, [(j, slices of the block, sub)])`` per job."""
        nd, ns = self.ndim, self.nsub
        rows = self.table.tolist()
        k = 0
        while k < len(rows):
            jid = rows[k][0]
            end = k
            while end < len(rows) and rows[end][0] == jid:
                end += 1
            pieces = [
                (r[1], tuple(map(slice, r[2 + nd + ns : 2 + 2 * nd + ns], r[2 + 2 * nd + ns :])), tuple(r[2 + nd : 2 + nd + ns]))
                for r in rows[k:end]
            ]
            yield jid, tuple(rows[k][2 : 2 + nd]), pieces
            k = end

    def __reduce__(self) -> Any:
        return (Jobs, (self.table, self.ndim, self.nsub))


def row_pieces(
    idx: tuple[int, ...], bounds: list[list[int]], unit: tuple[int, ...]
) -> list[tuple[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]], tuple[int, int]]]:
    """Block ``idx``'s pieces: ``(unit coords, (starts, stops) in the block, (lo, hi) rows of the unit)``.

    The block's edges on every axis but the first are unit edges (the
    caller checked), so each piece spans its unit whole on those axes.
    """
    per_axis = [cuts(b[i], b[i + 1], u) for b, i, u in zip(bounds, idx, unit)]
    return [
        (tuple(c[0] for c in combo), (tuple(c[1] for c in combo), tuple(c[2] for c in combo)), combo[0][3:])
        for combo in itertools.product(*per_axis)
    ]
