"""The coordinator's metadata (``CoordinatorState``) and partition placement."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimss_dask.coordinator.access import StreamAccess
from aimss_dask.coordinator.placement import (
    owners_load,
    partition_for_key,
    place_partitions,
    rebalance,
)
from aimss_dask.coordinator.state import CoordinatorState, StreamSpec
from aimss_dask.core.errors import (
    InvalidArgumentError,
    InvalidOffsetError,
    NotRegisteredError,
    PartitionOutOfRangeError,
    StreamExistsError,
    StreamNotFoundError,
)

W = ["tcp://w1", "tcp://w2", "tcp://w3"]


@pytest.fixture
def state() -> CoordinatorState:
    return CoordinatorState()


# -- create ---------------------------------------------------------------------------


def test_create_returns_a_frozen_spec_placed_on_workers(state):
    spec, created = state.create("s", 4, W, creator="client-1")
    assert created is True
    assert (spec.name, spec.partitions, spec.parent, spec.persist, spec.creator) == (
        "s",
        4,
        None,
        False,
        "client-1",
    )
    assert spec.owners == ("tcp://w1", "tcp://w2", "tcp://w3", "tcp://w1")
    assert state.get("s") is spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.partitions = 5  # type: ignore[misc]
    assert StreamSpec.from_wire(spec.to_wire()) == spec
    assert spec.to_wire()["owners"] == list(spec.owners)


def test_create_existing_name(state):
    first, _ = state.create("s", 2, W)
    with pytest.raises(
        StreamExistsError,
        match=r"stream 's' already exists with 2 partition\(s\); pass exist_ok=True",
    ):
        state.create("s", 2, W)
    again, created = state.create("s", 2, W, exist_ok=True)
    assert created is False
    assert again is first  # same epoch, same owners: it is the same stream
    with pytest.raises(
        StreamExistsError, match=r"already exists with 2 partition\(s\), not 3; use partitions=2"
    ):
        state.create("s", 3, W, exist_ok=True)
    assert issubclass(StreamExistsError, ValueError)
    assert state.get("s") is first


@pytest.mark.parametrize("partitions", [0, -1, True, 1.5, "2", None])
def test_create_needs_at_least_one_int_partition(state, partitions):
    with pytest.raises(
        InvalidArgumentError,
        match=rf"partitions={partitions!r} for stream 's': a stream needs at least 1 partition",
    ):
        state.create("s", partitions, W)
    assert state.streams == {}


@pytest.mark.parametrize("name", ["", None, 3, b"s", ("s",)])
def test_create_rejects_bad_names(state, name):
    with pytest.raises(InvalidArgumentError, match="must be a non-empty str") as info:
        state.create(name, 1, W)
    assert f"stream name {name!r}" in str(info.value)
    with pytest.raises(InvalidArgumentError, match="must be a non-empty str"):
        state.get(name)


def test_parent_rules(state):
    with pytest.raises(
        StreamNotFoundError, match="parent stream 'p' of 'c' does not exist; create the parent first"
    ):
        state.create("c", 1, W, parent="p")
    with pytest.raises(InvalidArgumentError, match="stream 'c' cannot be its own parent"):
        state.create("c", 1, W, parent="c")
    with pytest.raises(InvalidArgumentError, match="parent stream name '' must be a non-empty str"):
        state.create("c", 1, W, parent="")
    assert state.streams == {}
    state.create("p", 1, W)
    spec, _ = state.create("c", 1, W, parent="p")
    assert spec.parent == "p"
    assert state.children("p") == ["c"]
    assert isinstance(StreamNotFoundError("x"), LookupError)


def test_create_without_workers(state):
    with pytest.raises(NotRegisteredError, match="no workers to hold stream partitions"):
        state.create("s", 1, [])
    assert state.streams == {}


def test_create_balances_across_streams_and_ignores_dead_owners(state):
    a, _ = state.create("a", 3, W[:2])
    assert a.owners == ("tcp://w1", "tcp://w2", "tcp://w1")
    b, _ = state.create("b", 1, W[:2])
    assert b.owners == ("tcp://w2",)  # w1 holds 2, w2 held 1
    # w1 and w2 are gone: only w3 and w4 count, both with nothing.
    c, _ = state.create("c", 2, ["tcp://w4", "tcp://w3"])
    assert c.owners == ("tcp://w3", "tcp://w4")


def test_get_missing(state):
    with pytest.raises(StreamNotFoundError, match="stream 'nope' does not exist; create it with"):
        state.get("nope")


# -- destroy ---------------------------------------------------------------------------


def test_destroy_cascades_to_descendants_children_first(state):
    for name, parent in [("a", None), ("b", "a"), ("c", "b"), ("d", "a"), ("other", None)]:
        state.create(name, 2, W, parent=parent)
    state.sealed.update({"a", "c", "other"})
    state.commit("b", "g", {0: 3})
    for w in W:
        state.worker_lost(w)
    assert set(state.lost) == {"a", "b", "c", "d", "other"}

    removed = state.destroy("a")
    assert [s.name for s in removed] == ["c", "b", "d", "a"]
    assert set(state.streams) == {"other"}
    assert state.sealed == {"other"}
    assert state.groups == {}
    assert set(state.lost) == {"other"}
    with pytest.raises(StreamNotFoundError):
        state.destroy("a")
    with pytest.raises(StreamNotFoundError):
        state.offsets("b", "g")


def test_destroy_child_keeps_parent(state):
    state.create("a", 1, W)
    state.create("b", 1, W, parent="a")
    assert [s.name for s in state.destroy("b")] == ["b"]
    assert set(state.streams) == {"a"}
    assert state.children("a") == []


# -- epochs ------------------------------------------------------------------------------


def test_epochs_strictly_increase_across_recreation(state):
    epochs = []
    for _ in range(3):
        spec, _ = state.create("s", 1, W)
        epochs.append(spec.epoch)
        state.destroy("s")
    other, _ = state.create("t", 1, W)
    epochs.append(other.epoch)
    state.clear()
    again, _ = state.create("s", 1, W)
    epochs.append(again.epoch)
    assert epochs == sorted(set(epochs))  # strictly increasing, no repeats
    assert epochs[0] >= 1


def test_epochs_are_per_state_object():
    # Two coordinators (say, a restarted scheduler) each count from their own
    # start; within one they never repeat.
    s1, s2 = CoordinatorState(), CoordinatorState()
    e1 = [s1.create(n, 1, W)[0].epoch for n in "abc"]
    e2 = [s2.create(n, 1, W)[0].epoch for n in "ab"]
    assert len(set(e1)) == 3 and len(set(e2)) == 2


# -- consumer group offsets -----------------------------------------------------------------


def test_commit_is_monotonic(state):
    state.create("s", 3, W)
    assert state.offsets("s", "g") == [0, 0, 0]
    assert state.commit("s", "g", {0: 5, 2: 1}) == [5, 0, 1]
    assert state.commit("s", "g", {0: 3, 1: 4}) == [5, 4, 1]  # 0 does not go back
    assert state.offsets("s", "g") == [5, 4, 1]
    assert state.offsets("s", "other") == [0, 0, 0]  # groups are independent
    view = state.offsets("s", "g")
    view[0] = 0  # a copy: the caller cannot rewind the group
    assert state.offsets("s", "g") == [5, 4, 1]


@pytest.mark.parametrize("p", [3, -1, True, "0", None])
def test_commit_validates_partitions(state, p):
    state.create("s", 3, W)
    with pytest.raises(
        PartitionOutOfRangeError,
        match=rf"stream 's' has 3 partition\(s\); partition {p!r} is out of range \(use 0 .. 2\)",
    ):
        state.commit("s", "g", {p: 1})
    assert state.offsets("s", "g") == [0, 0, 0]


@pytest.mark.parametrize("off", [-1, 1.5, "3", None])
def test_commit_validates_offsets(state, off):
    state.create("s", 2, W)
    with pytest.raises(
        InvalidOffsetError,
        match=rf"offset {off!r} for group 'g' on stream 's' must be a non-negative int",
    ):
        state.commit("s", "g", {0: off})
    assert state.offsets("s", "g") == [0, 0]


def test_commit_rejected_as_a_whole_leaves_offsets_unchanged(state):
    # A commit that raises must not have moved any offset: the caller was told
    # it failed, and offsets never go back, so a half-applied commit is final.
    state.create("s", 2, W)
    with pytest.raises(PartitionOutOfRangeError):
        state.commit("s", "g", {0: 5, 7: 1})
    assert state.offsets("s", "g") == [0, 0]


def test_commit_and_offsets_check_names(state):
    state.create("s", 1, W)
    with pytest.raises(InvalidArgumentError, match="consumer group '' must be a non-empty str"):
        state.commit("s", "", {0: 1})
    with pytest.raises(InvalidArgumentError, match="consumer group None must be a non-empty str"):
        state.offsets("s", None)
    with pytest.raises(StreamNotFoundError, match="stream 'x' does not exist"):
        state.commit("x", "g", {0: 1})


# -- workers and clients ---------------------------------------------------------------------


def test_worker_lost_marks_owned_partitions(state):
    a, _ = state.create("a", 3, W[:2])  # w1, w2, w1
    state.create("b", 1, W[:2])  # w2
    assert state.worker_lost("tcp://w1") == ["a"]
    # Nothing reported yet, open: everything from offset 0 on.
    assert state.lost == {"a": {0: (0, None), 2: (0, None)}}
    assert sorted(state.worker_lost("tcp://w2")) == ["a", "b"]
    assert {n: set(ps) for n, ps in state.lost.items()} == {"a": {0, 1, 2}, "b": {0}}
    assert state.worker_lost("tcp://unknown") == []
    assert {n: set(ps) for n, ps in state.lost.items()} == {"a": {0, 1, 2}, "b": {0}}
    assert a.owners == ("tcp://w1", "tcp://w2", "tcp://w1")  # specs are not mutated


def test_lost_offsets_come_from_the_owners_reports(state):
    """An open partition's end is unknown (None); a sealed one's is the one reported at seal."""
    a, _ = state.create("a", 2, W[:2])  # w1, w2
    b, _ = state.create("b", 1, W[:1])  # w1
    state.note_bounds("a", a.epoch, [(0, 0, 5), (1, 0, 9)])
    state.note_bounds("a", a.epoch, [(0, 2, 4)])  # late, out of order: offsets only grow
    state.note_bounds("a", a.epoch + 99, [(0, 0, 1000)])  # another stream of that name: ignored
    state.note_bounds("b", b.epoch, [(0, 3, 12), (7, 0, 1)])  # no partition 7: ignored
    state.sealed.add("b")
    state.worker_lost("tcp://w1")
    assert state.lost == {"a": {0: (2, None)}, "b": {0: (3, 12)}}
    state.note_bounds("a", a.epoch, [(0, 0, 50)])  # a lost partition's range is frozen
    assert state.lost["a"] == {0: (2, None)}
    assert state.bounds["a"][0] == (2, 5)
    state.destroy("a")
    assert "a" not in state.bounds and "a" not in state.lost


def test_left_with_client_excludes_persist_and_others(state):
    state.create("b", 1, W, creator="c1")
    state.create("a", 1, W, creator="c1")
    state.create("kept", 1, W, creator="c1", persist=True)
    state.create("theirs", 1, W, creator="c2")
    state.create("nobody", 1, W)
    assert state.left_with_client("c1", {"c2"}) == ["a", "b"]
    assert state.left_with_client("c2", {"c1"}) == ["theirs"]
    assert state.left_with_client("c3", {"c1", "c2"}) == []


def test_a_shared_stream_outlives_its_client_while_another_reads_it(state):
    state.create("shared", 1, W, creator="c1")
    state.access["shared"] = StreamAccess(owner="c1", share="read")
    state.access["shared"].check("c2", "read", "shared")  # c2 holds a handle
    assert state.left_with_client("c1", {"c2"}) == []
    assert state.left_with_client("c2", set()) == ["shared"]


def test_clear_returns_everything(state):
    state.create("a", 1, W)
    state.create("b", 1, W, parent="a")
    state.sealed.add("a")
    state.commit("a", "g", {0: 1})
    assert sorted(s.name for s in state.clear()) == ["a", "b"]
    assert (state.streams, state.sealed, state.groups, state.lost) == ({}, set(), {}, {})


# -- placement ---------------------------------------------------------------------------------

LOADS = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3).map(lambda s: "tcp://" + s),
    st.integers(0, 12),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(load=LOADS, n=st.integers(0, 40), data=st.data())
def test_place_partitions_balances(load, n, data):
    owners = place_partitions(n, load)
    assert len(owners) == n
    assert set(owners) <= set(load)
    final = dict(load)
    for w in owners:
        final[w] += 1
    # Never less balanced than before, and at worst off by one.
    spread_before = max(load.values()) - min(load.values())
    assert max(final.values()) - min(final.values()) <= max(1, spread_before)
    # Only the least loaded take new partitions: each ends at most 1 above the minimum.
    lowest = min(final.values())
    for w in set(owners):
        assert final[w] - lowest <= 1
    # Deterministic, whatever order the workers are listed in.
    assert place_partitions(n, load) == owners
    shuffled = dict(data.draw(st.permutations(list(load.items()))))
    assert place_partitions(n, shuffled) == owners


def test_place_partitions_examples():
    assert place_partitions(3, {"tcp://b": 0, "tcp://a": 0}) == ["tcp://a", "tcp://b", "tcp://a"]
    assert place_partitions(2, {"tcp://a": 5, "tcp://b": 0}) == ["tcp://b", "tcp://b"]
    assert place_partitions(0, {"tcp://a": 0}) == []
    with pytest.raises(NotRegisteredError, match="no workers to hold stream partitions"):
        place_partitions(1, {})


def test_owners_load_counts_only_live_workers():
    load = owners_load([["a", "b", "a"], ["gone", "b"]], ["a", "b", "c"])
    assert load == {"a": 2, "b": 2, "c": 0}


# -- partition_for_key ---------------------------------------------------------------------------

KEYS = st.recursive(
    st.text(max_size=8)
    | st.binary(max_size=8)
    | st.integers()
    | st.booleans()
    | st.floats(allow_nan=False),
    lambda c: st.tuples(c) | st.tuples(c, c),
    max_leaves=4,
)

FIXED_KEYS = ["abc", "", "ünïcode", b"abc", 0, 42, -7, 2**70, 3.5, 1e300, True, ("a", 1, (2.5, b"x"))]


@settings(max_examples=200, deadline=None)
@given(key=KEYS, partitions=st.integers(1, 1000))
def test_partition_for_key_in_range_and_equal_for_equal_copies(key, partitions):
    p = partition_for_key(key, partitions)
    assert 0 <= p < partitions
    # An equal key built anew (not the same object) lands on the same partition.
    copy = json.loads(json.dumps(key)) if isinstance(key, str) else key
    if isinstance(key, tuple):
        copy = tuple(list(key))
    assert partition_for_key(copy, partitions) == p
    assert partition_for_key(key, 1) == 0


def test_partition_for_key_is_stable_across_processes():
    parts = 2**31 - 1  # large, so a process-dependent hash would not agree by chance
    here = [partition_for_key(k, parts) for k in FIXED_KEYS]
    code = (
        "import json, sys\n"
        "from aimss_dask.coordinator.placement import partition_for_key\n"
        f"keys = {FIXED_KEYS!r}\n"
        f"print(json.dumps([partition_for_key(k, {parts}) for k in keys]))\n"
    )
    there = []
    for seed in ("0", "12345"):  # a different str hash seed in each child
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        there.append(json.loads(out.stdout))
    assert there == [here, here]
    assert len(set(here)) == len(here)  # and the keys do not all collide


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (0.0, -0.0),  # equal floats, different repr
        (1.5, np.float64(1.5)),  # a float subclass: repr is "np.float64(1.5)" on NumPy 2
    ],
)
def test_partition_for_key_equal_floats_share_a_partition(a, b):
    assert a == b and isinstance(b, float)
    assert partition_for_key(a, 2**61 - 1) == partition_for_key(b, 2**61 - 1)


@pytest.mark.parametrize("key", [{"a": 1}, [1, 2], {1}, None, ("ok", {"a": 1}), object()])
def test_partition_for_key_rejects_keys_without_a_stable_hash(key):
    with pytest.raises(InvalidArgumentError, match="has no stable hash; use a str, bytes, int"):
        partition_for_key(key, 4)


def test_partition_for_key_names_the_bad_key():
    with pytest.raises(InvalidArgumentError, match=r"record key \{'a': 1\} of type dict"):
        partition_for_key({"a": 1}, 4)


def test_place_partitions_follows_live_preferences_only():
    load = {"tcp://a": 0, "tcp://b": 0}
    # Preferred live workers are kept even when that unbalances counts;
    # unknown (lost) workers and None fall back to the least loaded.
    assert place_partitions(4, load, ["tcp://b", "tcp://b", None, "tcp://gone"]) == [
        "tcp://b",
        "tcp://b",
        "tcp://a",
        "tcp://a",
    ]
    assert place_partitions(2, load, ["tcp://a"]) == ["tcp://a", "tcp://b"]


def test_place_partitions_caps_what_one_worker_takes_by_preference():
    # A rechunk from row to column chunks: every input block feeds every
    # chunk equally, so every partition names the same worker.
    load = {"tcp://a": 0, "tcp://b": 0}
    owners = place_partitions(64, load, ["tcp://a"] * 64)
    assert owners.count("tcp://a") == 35 and owners.count("tcp://b") == 29
    assert owners[:35] == ["tcp://a"] * 35  # the first ones keep their preference
    # Balanced within the barrier's slack: nothing moves once sizes are known.
    assert rebalance([100] * 64, owners, list(load)) == owners
    # Few partitions: the cap is never below an even share.
    assert place_partitions(3, load, ["tcp://b"] * 3) == ["tcp://b", "tcp://b", "tcp://a"]


@settings(max_examples=100, deadline=None)
@given(load=LOADS, n=st.integers(0, 40), data=st.data())
def test_place_partitions_never_lets_preferences_pile_up(load, n, data):
    workers = sorted(load)
    prefer = data.draw(st.lists(st.sampled_from([*workers, None]), min_size=n, max_size=n))
    owners = place_partitions(n, load, prefer)
    cap = max(-(-n // len(load)), int(1.1 * n / len(load)))
    # A preference is only overridden once its worker has taken its cap
    # (some of those it may have got as the least loaded, too).
    for p, (o, q) in enumerate(zip(owners, prefer)):
        if q is not None and o != q:
            assert sum(1 for o2, q2 in zip(owners[:p], prefer[:p]) if o2 == q2 == q) >= cap
    # Preferences bound how many partitions one worker gets, whatever they say.
    final = dict(load)
    for w in owners:
        final[w] += 1
    for w in workers:
        if not any(q == w for q in prefer):
            assert final[w] - min(final.values()) <= 1 or final[w] == load[w]


def test_create_places_partitions_with_their_main_input(state):
    spec, _ = state.create("s", 6, W, prefer=["tcp://w3", None, "tcp://w3", None, None, None])
    assert spec.owners[0] == spec.owners[2] == "tcp://w3"
    assert sorted(spec.owners) == sorted(W * 2)


def test_a_loss_named_for_one_stream_leaves_the_others_on_that_worker_alone():
    """A promotion of one stream that cannot take over names that stream's partitions lost, not every
    stream with a partition on the worker (another's promotion may take over its partitions once applied)."""
    from aimss_dask.coordinator.state import CoordinatorState

    st = CoordinatorState()
    st.create("s", 2, ["w", "x"])
    st.create("t", 2, ["w", "x"])
    assert st.worker_lost("w", only={"s": None}) == ["s"]
    assert st.lost == {"s": {0: (0, None)}}
    assert st.worker_lost("w", only={"t": [1]}) == []  # t's partition 1 is not w's
    assert st.worker_lost("w") == ["s", "t"] and st.lost["t"] == {0: (0, None)}


def test_a_partition_re_created_on_a_worker_back_at_its_dead_owners_address_is_no_longer_lost():
    """A nanny on a fixed port brings a worker back at the dead one's address, and recovery may place the
    re-created partition there: it is re-created all the same (the owner did not change by address)."""
    from aimss_dask.coordinator.state import CoordinatorState

    st = CoordinatorState()
    s, _ = st.create("s", 2, ["a", "b"])
    st.worker_lost("b")
    new = st.recovered("s", [1], ["b"])
    assert st.commit_recovery(s, new, [1]) and "s" not in st.lost
