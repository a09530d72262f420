"""Backup reads of a loader's late takes: when, where, how the race ends (pure, no cluster)."""

from __future__ import annotations

import asyncio

import pytest

from aimss_dask.source import hedge
from aimss_dask.source.hedge import Hedger, race

VIEW = {"enabled": True, "multiplier": 2.0, "cap": 1, "slow": []}


def _hedger(view=None, owners=("a", "b", "c"), latency=0.01) -> Hedger:
    h = Hedger(list(owners), {**VIEW, **(view or {})})
    for w in owners:
        for _ in range(3):
            h.answered(w, latency)
    return h


def test_no_backup_before_the_other_owners_answered_enough_or_with_speculation_off():
    h = Hedger(["a", "b"], VIEW)
    assert h.deadline("a") is None  # nothing known yet of b
    for _ in range(hedge.MIN_SAMPLES):
        h.answered("b", 0.5)
    assert h.deadline("a") == 1.0  # multiplier x b's median
    assert h.deadline("b") is None  # a has answered nothing
    assert _hedger({"enabled": False}).deadline("a") is None
    assert _hedger({"enabled": False}).cap == 0
    assert Hedger(["a"], VIEW).deadline("a") is None  # nobody else to ask


def test_a_slow_owner_is_backed_up_after_a_typical_take_and_never_helps():
    h = _hedger({"slow": ["c"]}, latency=0.1)
    assert h.deadline("c") == pytest.approx(0.1)  # as long as a typical take
    assert h.deadline("a") == pytest.approx(0.2)  # multiplier x
    assert _hedger(latency=0.001).deadline("a") == hedge.FLOOR  # never below the floor
    assert h.helper("a") == "b" and h.helper("b") == "a"  # never c, never itself
    h.in_flight = 1
    assert h.helper("a") is None  # the cap


def test_reports_gather_backups_per_owner():
    h = _hedger()
    h.backed_up("c", "a", 0.3, True)
    h.backed_up("c", "a", 0.5, False)
    [r] = h.due_reports()
    assert r == {"owner": "c", "dest": "a", "copies": 2, "won": 1, "elapsed": 0.5, "rule": "late"}
    assert h.due_reports(force=True) == []  # nothing new


async def _answer(value, delay: float, fail: bool = False):
    await asyncio.sleep(delay)
    if fail:
        raise OSError(f"{value} failed")
    return value


def test_a_late_take_is_answered_by_its_backup_and_the_original_is_dropped():
    h = _hedger()
    asked = []

    async def backup(dest):
        asked.append(dest)
        return await _answer("backup", 0.0)

    assert asyncio.run(race(h, "c", lambda: _answer("own", 5.0), backup)) == "backup"
    assert asked == ["a"] and h.in_flight == 0
    assert h.due_reports()[0]["won"] == 1


def test_a_take_on_time_gets_no_backup_and_its_latency_is_noted():
    h = _hedger()
    asked = []
    assert asyncio.run(race(h, "c", lambda: _answer("own", 0.0), lambda d: asked.append(d))) == "own"
    assert asked == [] and len(h._owners["c"].latencies) == 4


def test_a_failed_backup_leaves_the_answer_to_the_owner_and_a_failed_owner_to_the_backup():
    h = _hedger()
    got = asyncio.run(race(h, "c", lambda: _answer("own", 0.2), lambda d: _answer("backup", 0.0, fail=True)))
    assert got == "own"
    got = asyncio.run(race(h, "c", lambda: _answer("own", 0.1, fail=True), lambda d: _answer("backup", 0.3)))
    assert got == "backup"
    with pytest.raises(OSError, match="own failed"):  # both failed: the owner's error
        asyncio.run(race(h, "c", lambda: _answer("own", 0.1, fail=True), lambda d: _answer("b", 0.0, fail=True)))
    assert [r["won"] for r in h.due_reports()] == [1]


def test_an_owner_not_known_at_start_is_learned_not_a_failure():
    h = _hedger()
    h.answered("d", 0.01)  # took a partition over after its owner died
    h.backed_up("d", "a", 0.3, True)
    assert "d" in h.owners and h.due_reports()[0]["owner"] == "d"
    assert h.helper("a") in {"b", "c", "d"}
