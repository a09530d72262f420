"""Backup reads for a loader: a take a slow owner is late with is read again by a fast one.

A loader asks each owner for the rows of its partitions in the next batch
(a *take*). The owner's broker holds them in its log, or reads them from
Zarr first. When an owner is slow (a busy node, a slow disk), every batch
waits for it. Reads have no side effects, so a late take is simply asked
again of another owner of the same source, which reads those slabs straight
from Zarr (``SourceRun.backup``, past its own log); the first answer is the
batch's, the other is dropped (the Tail at Scale's hedged request, with
LATE's rules for when and where).

When: a take is backed up once it has waited longer than ``multiplier``
times the median latency of the takes that the other owners answered
lately (and at least :data:`FLOOR`); for an owner the coordinator found
slow, once it has waited as long as that median (it will most likely be
late). ``min-runtime`` does not apply: it stands for how coarsely the
scheduler learns a task's elapsed time (heartbeats), while the loader times
its own takes exactly, and a take is far shorter than a task.
Where: the owner whose takes answered fastest lately, never a slow one.
At most :meth:`Hedger.cap` backups are in flight at once, the loader's
share of ``max-fraction``. The coordinator's settings and slow workers are
read at start and every :data:`VIEW_EVERY` seconds; with speculation off,
nothing is backed up.

Pure bookkeeping plus one coroutine (:func:`race`); the fetcher uses both.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

#: Latencies kept per owner.
LATENCIES_KEPT = 32
#: Latencies the other owners must have answered before a take is judged late.
MIN_SAMPLES = 3
#: Seconds between two reads of the coordinator's view (settings, slow workers).
VIEW_EVERY = 2.0
#: Seconds between two reports of backups to the coordinator, per owner.
REPORT_EVERY = 2.0
#: Seconds a take may always wait before it is backed up: below it, owners
#: differ by noise (a thread switch, a garbage collection).
FLOOR = 0.05


@dataclass
class _Owner:
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))
    copies: int = 0  # backups started since the last report
    won: int = 0  # ... of which the backup answered first
    slowest: float = 0.0  # longest wait for this owner since the last report
    rule: str = "late"
    dest: str = ""
    reported: float = 0.0


class Hedger:
    """When to back a take up, where, and what to report.

    ``view``: the coordinator's ``speculation_view`` answer: ``enabled``,
    ``multiplier``, ``cap`` (copies the cluster's threads allow at once) and
    ``slow`` (workers found slow).

    Examples
    --------
    >>> h = Hedger(["a", "b", "c"], {"enabled": True, "multiplier": 2, "cap": 1, "slow": []})
    >>> for w in ("b", "c"):
    ...     for _ in range(3):
    ...         h.answered(w, 0.5)
    >>> h.deadline("a"), h.helper("a")
    (1.0, 'b')
    """

    def __init__(self, owners: list[str], view: dict[str, Any]) -> None:
        self.owners = sorted(set(owners))
        self.view = dict(view)
        self.seen = time.monotonic()
        self.in_flight = 0
        self._owners = {w: _Owner() for w in self.owners}

    def update(self, view: dict[str, Any]) -> None:
        self.view = dict(view)
        self.seen = time.monotonic()

    def stale(self) -> bool:
        return time.monotonic() - self.seen > VIEW_EVERY

    @property
    def cap(self) -> int:
        """Backups in flight at once: the cluster's copy cap, at least one where speculation is on."""
        return max(1, int(self.view.get("cap", 0))) if self.view.get("enabled") else 0

    def answered(self, owner: str, seconds: float) -> None:
        """``owner`` answered a take (its own) after ``seconds``."""
        self._owner(owner).latencies.append(float(seconds))

    def _owner(self, owner: str) -> _Owner:
        # An owner not known at start took a partition over (its owner died).
        st = self._owners.get(owner)
        if st is None:
            st = self._owners[owner] = _Owner()
            self.owners = sorted(self._owners)
        return st

    def _typical(self, owner: str) -> float | None:
        """The median latency of the other owners' recent takes, or None with too few."""
        others = [x for w, st in self._owners.items() if w != owner for x in st.latencies]
        return statistics.median(others) if len(others) >= MIN_SAMPLES else None

    def deadline(self, owner: str) -> float | None:
        """Seconds after which a take of ``owner`` is backed up; None: never (yet)."""
        if not self.view.get("enabled") or len(self.owners) < 2:
            return None
        typical = self._typical(owner)
        if typical is None:
            return None
        if owner in self.view.get("slow", ()):
            return max(FLOOR, typical)  # a slow worker's take will most likely be late
        return max(FLOOR, float(self.view.get("multiplier", 2.0)) * typical)

    def helper(self, owner: str) -> str | None:
        """Where ``owner``'s late take is read again: the fastest other owner lately, never a slow one."""
        if self.in_flight >= self.cap:
            return None
        slow = set(self.view.get("slow", ()))
        best: tuple[float, str] | None = None
        for w, st in self._owners.items():
            if w == owner or w in slow:
                continue
            rank = (statistics.median(st.latencies) if st.latencies else float("inf"), w)
            if best is None or rank < best:
                best = rank
        return None if best is None else best[1]

    def backed_up(self, owner: str, dest: str, waited: float, copy_won: bool) -> None:
        """A backup of ``owner``'s take on ``dest`` ended; ``copy_won``: it answered first."""
        st = self._owner(owner)
        st.copies += 1
        st.won += int(copy_won)
        st.slowest = max(st.slowest, waited)
        st.dest = dest
        st.rule = "slow worker" if owner in self.view.get("slow", ()) else "late"

    def due_reports(self, force: bool = False) -> list[dict[str, Any]]:
        """Reports of the backups since the last ones, per owner, at most every ``REPORT_EVERY`` s."""
        now = time.monotonic()
        out = []
        for w, st in self._owners.items():
            if not st.copies or (not force and now - st.reported < REPORT_EVERY):
                continue
            out.append({
                "owner": w, "dest": st.dest, "copies": st.copies, "won": st.won,
                "elapsed": round(st.slowest, 3), "rule": st.rule,
            })
            st.copies = st.won = 0
            st.slowest = 0.0
            st.reported = now
        return out


async def race(
    hedger: Hedger,
    owner: str,
    primary: Callable[[], Awaitable[Any]],
    backup: Callable[[str], Awaitable[Any]],
) -> Any:
    """``primary()``'s answer, or a backup's on a helper if it is late; whichever answers first.

    A backup that fails leaves the answer to the primary; a primary that
    fails while its backup runs leaves it to the backup. The loser is
    cancelled (its answer, if any, is dropped).
    """
    t0 = time.monotonic()
    first = asyncio.ensure_future(primary())
    deadline = hedger.deadline(owner)
    if deadline is not None:
        done, _ = await asyncio.wait({first}, timeout=deadline)
        if not done:
            dest = hedger.helper(owner)
            if dest is not None:
                return await _with_backup(hedger, owner, dest, first, backup, t0)
    out = await first
    hedger.answered(owner, time.monotonic() - t0)
    return out


async def _with_backup(
    hedger: Hedger,
    owner: str,
    dest: str,
    first: asyncio.Future[Any],
    backup: Callable[[str], Awaitable[Any]],
    t0: float,
) -> Any:
    hedger.in_flight += 1
    second = asyncio.ensure_future(backup(dest))
    try:
        pending = {first, second}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            winner = first if first in done and not first.exception() else (
                second if second in done and not second.exception() else None
            )
            if winner is not None:
                for f in pending:
                    f.cancel()
                if winner is first:
                    hedger.answered(owner, time.monotonic() - t0)
                hedger.backed_up(owner, dest, time.monotonic() - t0, winner is second)
                return winner.result()
        # Both failed: the owner's error is the one that matters.
        hedger.backed_up(owner, dest, time.monotonic() - t0, False)
        return first.result()
    finally:
        hedger.in_flight -= 1
        for f in (first, second):
            if not f.done():
                f.cancel()
