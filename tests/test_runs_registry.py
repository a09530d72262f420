"""The run spec (``core/runs.py``) and the coordinator's run registry (``coordinator/registry.py``).

Unit tests of every hook, policy and method; a hypothesis state machine of the
registry's invariants; one real multi-process cluster answering ``aimss_runs``.
"""

from __future__ import annotations

import dataclasses
import doctest
import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from aimss_dask.coordinator.registry import RunRecord, RunRegistry
from aimss_dask.core.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    RunNotFoundError,
    error_from_wire,
)
from aimss_dask.core.names import PARTITION_TASK_PREFIX
from aimss_dask.core.runs import (
    FINISHED,
    KINDS,
    OnLoss,
    OnSeal,
    OutputMap,
    RunSpec,
    RunState,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToySpec(RunSpec, kind="test-toy"):
    """An operator spec of the tests: a field of its own, importable by reference."""

    npartitions: int
    label: str = "toy"


def shuffle_like(run_id: str = "r1", **kw) -> RunSpec:
    """Today's shuffle: rebalance and free unread partitions at seal, restart on loss."""
    name = f"aimss-shuffle-{run_id}-0"
    return RunSpec(
        run_id=run_id,
        streams=(name,),
        create=f"aimss-create-{run_id}",
        barrier=f"aimss-seal-{run_id}",
        outputs=OutputMap(name),
        on_seal=OnSeal.REBALANCE,
        free_unread=True,
        on_loss=OnLoss.RESTART,
        **kw,
    )


def msgpack_trip(obj, use_list: bool = True):
    """Plain data through msgpack: tuples come back as lists (Dask's comms: all as tuples)."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False, use_list=use_list)


# -- enums, kinds -------------------------------------------------------------------------------


def test_policies_are_str_enums_with_wire_values():
    assert [m.value for m in OnSeal] == ["keep", "rebalance"]
    assert [m.value for m in OnLoss] == ["restart", "recover", "rerun", "fail"]
    assert isinstance(RunState.DONE, str) and RunState("sealed") is RunState.SEALED
    assert FINISHED == {RunState.DONE, RunState.FAILED, RunState.CLOSED}


def test_a_subclass_registers_its_kind_by_reference():
    assert ToySpec.kind == "test-toy"
    assert KINDS["test-toy"] == f"{__name__}:ToySpec"
    assert RunSpec.kind == "run"  # the base keeps its own


def test_a_subclass_needs_a_kind_of_its_own():
    with pytest.raises(TypeError, match="needs a kind"):

        class NoKind(RunSpec):
            pass

    with pytest.raises(InvalidArgumentError, match="'test-toy'.*already taken by .*ToySpec"):

        class Thief(RunSpec, kind="test-toy"):
            pass


def test_a_subclass_cannot_override_a_coordinator_hook():
    with pytest.raises(TypeError, match=r"overrides \['seal_action'\]"):

        class Sneaky(RunSpec, kind="test-sneaky"):
            def seal_action(self, stream):
                return OnSeal.REBALANCE, True

    assert "test-sneaky" not in KINDS


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Slotted(RunSpec, kind="test-slotted"):
    n: int = 1


def test_a_slots_dataclass_keeps_its_kind():
    # dataclass(slots=True) builds the class twice, the second time without kind=.
    assert Slotted.kind == "test-slotted" and KINDS["test-slotted"] == f"{__name__}:Slotted"
    assert Slotted(run_id="x").n == 1


# -- spec checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"run_id": ""}, "run id '' must be a non-empty str"),
        ({"run_id": "r", "streams": ("a", "a")}, "repeat a stream"),
        ({"run_id": "r", "streams": ("a",), "reads": ("a",)}, r"lists \['a'\] in both streams and reads"),
        ({"run_id": "r", "outputs": OutputMap("x")}, "read stream 'x', which is not one of its streams"),
        ({"run_id": "r", "on_seal": "spread"}, r"OnSeal 'spread' of run 'r' is not one of \['keep', "),
        ({"run_id": "r", "on_loss": "retry"}, "OnLoss 'retry'"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_value(kw, match):
    with pytest.raises(InvalidArgumentError, match=match):
        RunSpec(**kw)


def test_enum_values_and_lists_are_normalised():
    s = RunSpec(run_id="r", streams=["a", "b"], on_seal="rebalance", on_loss="rerun")
    assert s.streams == ("a", "b") and s.on_seal is OnSeal.REBALANCE and s.on_loss is OnLoss.RERUN
    assert hash(s)  # frozen, hashable once normalised


@pytest.mark.parametrize("grid", [(), (0, 2), (2, -1), (True,), ("2",)])
def test_output_grid_must_be_positive_ints(grid):
    with pytest.raises(InvalidArgumentError, match="output grid"):
        OutputMap("s", grid=grid)


# -- hooks --------------------------------------------------------------------------------------


def test_output_partition_of_a_shuffles_keys():
    s = shuffle_like("tok")
    name = "aimss-shuffle-tok-0"
    # Today's key, as shuffle/dataframe.py writes it.
    assert s.output_partition((f"{PARTITION_TASK_PREFIX}tok", name, 7)) == (name, 7)
    assert s.output_key(name, 7) == (f"{PARTITION_TASK_PREFIX}tok", name, 7)
    for key in [
        (f"{PARTITION_TASK_PREFIX}other", name, 7),  # another run
        (f"{PARTITION_TASK_PREFIX}tok", "other-stream", 7),
        (f"{PARTITION_TASK_PREFIX}tok", name, -1),
        (f"{PARTITION_TASK_PREFIX}tok", name, True),
        (f"{PARTITION_TASK_PREFIX}tok", name),
        f"{PARTITION_TASK_PREFIX}tok",
        ("aimss-push-tok", 0, 1),
        (),
    ]:
        assert s.output_partition(key) is None, key
    assert RunSpec(run_id="tok", streams=(name,)).output_partition(s.output_key(name, 0)) is None


@given(grid=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_output_partition_of_a_grid_is_numpys_ravel(grid, data):
    index = tuple(data.draw(st.integers(0, n - 1)) for n in grid)
    s = RunSpec(run_id="rc", streams=("rc-0",), outputs=OutputMap("rc-0", grid=tuple(grid)))
    expected = int(np.ravel_multi_index(index, tuple(grid)))  # today's _h_create
    assert s.output_partition(s.output_key(*index)) == ("rc-0", expected)
    outside = index[:-1] + (grid[-1],)
    assert s.output_partition(s.output_key(*outside)) is None
    assert s.output_partition(s.output_key(*index, 0)) is None


def test_seal_action_is_the_policy_of_an_own_stream_only():
    assert shuffle_like("a").seal_action("aimss-shuffle-a-0") == (OnSeal.REBALANCE, True)
    sink = RunSpec(run_id="z", streams=("aimss-sink-z",), on_loss=OnLoss.RESTART)
    assert sink.seal_action("aimss-sink-z") == (OnSeal.KEEP, False)  # today's _sinks
    with pytest.raises(InvalidArgumentError, match="stream 'user' is not one of the streams"):
        RunSpec(run_id="r", streams=("s",), reads=("user",)).seal_action("user")


def test_loss_action_follows_the_policy_for_own_and_read_streams():
    lost = {"s": {3, 1}, "unrelated": {0}}
    assert RunSpec(run_id="r", streams=("s",), on_loss="restart").loss_action(lost) == (OnLoss.RESTART, None)
    assert RunSpec(run_id="r", reads=("s",), on_loss="rerun").loss_action(lost) == (OnLoss.RERUN, None)
    action, message = RunSpec(run_id="r", reads=("s",)).loss_action(lost, "tcp://w9")
    assert action is OnLoss.FAIL
    assert message == (
        "partition(s) [1, 3] of stream 's' were lost with worker tcp://w9, so run 'r' (run) "
        "failed: it cannot recover them (on_loss='fail'); run it again"
    )
    assert RunSpec(run_id="r", streams=("s",)).loss_action({"s": set()}) is None
    assert RunSpec(run_id="r", streams=("t",)).loss_action(lost) is None


# -- wire ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_list", [True, False])
def test_wire_keeps_the_base_fields_and_carries_the_spec_pickled(use_list):
    spec = ToySpec(
        run_id="t1",
        streams=("t1-0",),
        reads=("user",),
        create=("aimss-create-t1", 0),
        barrier="aimss-seal-t1",
        outputs=OutputMap("t1-0", grid=(2, 3)),
        on_seal=OnSeal.REBALANCE,
        free_unread=True,
        on_loss=OnLoss.RERUN,
        start_on_owners=True,
        watch_appends=True,
        npartitions=6,
    )
    wire = msgpack_trip(spec.to_wire(), use_list)  # the wire form survives a comm
    assert wire["kind"] == "test-toy" and list(wire["create"]) == ["aimss-create-t1", 0]
    view = RunSpec.view_from_wire(wire)
    assert type(view) is RunSpec
    base = {f.name: getattr(spec, f.name) for f in dataclasses.fields(RunSpec)}
    assert view == RunSpec(**base)
    assert view.output_partition(spec.output_key(1, 2)) == ("t1-0", 5)
    # Only a worker unpickles the payload: the operator's own fields are there.
    assert pickle.loads(wire["payload"]) == spec


def test_wire_errors_name_what_is_wrong():
    wire = RunSpec(run_id="r").to_wire()
    del wire["on_loss"]
    with pytest.raises(InvalidArgumentError, match="lacks field 'on_loss'"):
        RunSpec.view_from_wire(wire)
    with pytest.raises(InvalidArgumentError, match="OnLoss 'later'"):
        RunSpec.view_from_wire({**RunSpec(run_id="r").to_wire(), "on_loss": "later"})

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Local(RunSpec, kind="test-local"):
        pass

    with pytest.raises(InvalidArgumentError, match="cannot be pickled by reference"):
        Local(run_id="r").to_wire()


# -- registry: register, get, for_stream --------------------------------------------------------


@pytest.fixture
def reg() -> RunRegistry:
    return RunRegistry()


def test_register_gives_growing_epochs_and_a_registered_record(reg):
    a = reg.register(shuffle_like("a"), client="c1", now=10.0)
    b = reg.register(shuffle_like("b"), now=11.0)
    assert isinstance(a, RunRecord) and (a.epoch, b.epoch) == (1, 2)
    assert (a.state, a.client, a.started, a.kind) == (RunState.REGISTERED, "c1", 10.0, "run")
    assert reg.get("a") is a and len(reg) == 2


def test_register_takes_a_given_epoch_and_refuses_an_old_one(reg):
    assert reg.register(shuffle_like("a"), epoch=40).epoch == 40
    assert reg.register(shuffle_like("b")).epoch == 41  # past every epoch seen
    with pytest.raises(InvalidArgumentError, match="epoch 40 of run 'a' is not newer than epoch 41"):
        reg.register(shuffle_like("a"), epoch=40)
    with pytest.raises(InvalidArgumentError, match="epoch 41 of run 'c' is not newer than epoch 41"):
        reg.register(shuffle_like("c"), epoch=41)  # another run's epoch counts too
    for bad in (0, -3, True, 1.5, "7"):
        with pytest.raises(InvalidArgumentError, match="must be an int >= 1"):
            reg.register(shuffle_like("c"), epoch=bad)
    assert reg.get("a").epoch == 40 and "c" not in {r["run_id"] for r in reg.snapshot()}


def test_register_keeps_a_view_and_the_payload_unopened(reg):
    spec = ToySpec(run_id="t", streams=("t-0",), npartitions=2)
    rec = reg.register(spec)
    assert type(rec.spec) is RunSpec and rec.kind == "test-toy" and rec.payload is None
    wire = msgpack_trip(ToySpec(run_id="w", npartitions=1).to_wire())
    rec = reg.register(wire)
    assert type(rec.spec) is RunSpec and rec.kind == "test-toy" and rec.payload == wire["payload"]
    with pytest.raises(InvalidTypeError, match="not list"):
        reg.register(["t"])
    with pytest.raises(InvalidTypeError, match="payload of a wire run spec must be bytes"):
        reg.register({**wire, "payload": "x"})


def test_a_stream_has_one_unfinished_owner(reg):
    a = reg.register(RunSpec(run_id="a", streams=("s", "t")))
    with pytest.raises(InvalidArgumentError, match="stream 's' of run 'b' already belongs to run 'a'"):
        reg.register(RunSpec(run_id="b", streams=("s",)))
    reg.register(RunSpec(run_id="reader", reads=("s",)))  # reading is no ownership
    assert reg.for_stream("s") is a and reg.for_stream("nothing") is None
    # Registered again with other streams: the old claim goes.
    a2 = reg.register(RunSpec(run_id="a", streams=("s",)))
    assert reg.for_stream("t") is None and reg.for_stream("s") is a2
    reg.finish("a", a2.epoch)
    assert reg.for_stream("s") is None
    assert reg.register(RunSpec(run_id="b", streams=("s",))).state is RunState.REGISTERED


def test_get_of_an_unknown_run_is_a_lookup_error(reg):
    reg.register(RunSpec(run_id="a"))
    with pytest.raises(RunNotFoundError, match=r"no run 'zz' is registered .*registered: \['a'\]") as e:
        reg.get("zz")
    assert isinstance(e.value, LookupError)
    assert type(error_from_wire("RunNotFoundError", "m")) is RunNotFoundError
    with pytest.raises(RunNotFoundError):
        reg.update("zz", 1, state="running")


# -- registry: update, finish -------------------------------------------------------------------


def test_update_moves_state_forward_and_keeps_progress_per_worker(reg):
    rec = reg.register(shuffle_like("a"))
    v = rec.version
    assert reg.update("a", rec.epoch, "tcp://w1", state=RunState.RUNNING, progress={"pushed": 1})
    assert reg.update("a", rec.epoch, "tcp://w2", progress={"pushed": 5})
    assert reg.update("a", rec.epoch, "tcp://w1", progress={"pushed": 2})
    assert rec.state is RunState.RUNNING and rec.workers == {"tcp://w1", "tcp://w2"}
    assert rec.progress == {"tcp://w1": {"pushed": 2}, "tcp://w2": {"pushed": 5}}
    assert rec.version > v
    reg.on_seal("aimss-shuffle-a-0")
    assert reg.update("a", rec.epoch, "tcp://w3", state="running")  # crossed on the wire
    assert rec.state is RunState.SEALED and "tcp://w3" in rec.workers


def test_a_stale_update_changes_nothing(reg):
    old = reg.register(shuffle_like("a"))
    new = reg.register(shuffle_like("a"))
    before = dataclasses.astuple(new)
    assert not reg.update("a", old.epoch, "tcp://w1", state="failed", error=("X", "late"))
    assert not reg.update("a", new.epoch + 1, "tcp://w1", progress={"n": 1})
    assert dataclasses.astuple(new) == before


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"state": "restarting"}, "RESTARTING is the coordinator's decision"),
        ({"state": "running", "error": ("E", "m")}, r"must be \(class name, message\), with state=FAILED"),
        ({"state": "failed", "error": ("E",)}, "class name, message"),
        ({"progress": {"n": 1}}, "progress needs who"),
        ({"state": "paused"}, "run state 'paused' is not one of"),
    ],
)
def test_a_malformed_update_is_refused(reg, kw, match):
    rec = reg.register(RunSpec(run_id="a"))
    with pytest.raises(InvalidArgumentError, match=match):
        reg.update("a", rec.epoch, **kw)
    assert rec.state is RunState.REGISTERED


def test_finish_ends_a_run_for_good(reg):
    rec = reg.register(shuffle_like("a"))
    assert reg.finish("a", rec.epoch, "failed", ["SinkError", "disk full"])
    assert rec.state is RunState.FAILED and rec.error == ("SinkError", "disk full")
    assert not reg.finish("a", rec.epoch, RunState.DONE)  # the first end wins
    assert not reg.update("a", rec.epoch, "tcp://w1", state="running", progress={"n": 1})
    assert rec.state is RunState.FAILED and rec.progress == {}
    with pytest.raises(InvalidArgumentError, match="cannot finish as 'sealed'"):
        reg.finish("a", rec.epoch, RunState.SEALED)


def test_finished_runs_are_kept_up_to_a_bound():
    reg = RunRegistry(keep_finished=2)
    live = reg.register(RunSpec(run_id="live"))
    for i in range(4):
        reg.finish(f"r{i}", reg.register(RunSpec(run_id=f"r{i}")).epoch)
    assert [r["run_id"] for r in reg.snapshot()] == ["live", "r2", "r3"]
    assert reg.get("live") is live
    with pytest.raises(InvalidArgumentError, match="keep_finished=-1"):
        RunRegistry(keep_finished=-1)


# -- registry: seal, loss, clients, snapshot ---------------------------------------------------


def test_on_seal_returns_the_owners_policy_and_seals_the_run(reg):
    merge = RunSpec(
        run_id="m", streams=("m-0", "m-1"), on_seal="rebalance", free_unread=True, on_loss="restart"
    )
    reg.register(merge)
    sink = reg.register(RunSpec(run_id="z", streams=("z-0",), on_loss="restart"))
    assert reg.on_seal("user-stream") is None  # no run: nothing to do, as today
    assert reg.on_seal("m-0") == (OnSeal.REBALANCE, True)
    assert reg.get("m").state is RunState.REGISTERED  # m-1 still open
    assert reg.on_seal("m-1") == (OnSeal.REBALANCE, True)
    assert reg.get("m").state is RunState.SEALED and reg.get("m").sealed == {"m-0", "m-1"}
    assert reg.on_seal("z-0") == (OnSeal.KEEP, False) and sink.state is RunState.SEALED


def test_on_worker_lost_applies_each_runs_policy(reg):
    restart = reg.register(shuffle_like("a"))
    rerun = reg.register(RunSpec(run_id="b", streams=("b-0",), on_loss="rerun"))
    fail = reg.register(RunSpec(run_id="c", reads=("a-user",)))
    other = reg.register(shuffle_like("d"))
    reg.update("b", rerun.epoch, state="running")
    reg.on_seal("aimss-shuffle-a-0")
    lost = {"aimss-shuffle-a-0": {0}, "b-0": {2}, "a-user": {1}, "aimss-shuffle-d-0": set()}
    out = reg.on_worker_lost("tcp://w1", lost)
    assert [(r.run_id, a.value) for r, a, _ in out] == [("a", "restart"), ("b", "rerun"), ("c", "fail")]
    assert restart.state is RunState.RESTARTING and restart.sealed == set()
    assert rerun.state is RunState.RUNNING
    assert fail.state is RunState.FAILED and fail.error[0] == "PartitionLostError"
    assert fail.error[1] == out[2][2] and "tcp://w1" in fail.error[1]
    assert other.state is RunState.REGISTERED
    # A restarting run ignores its old epoch and the next loss; registered again, it lives.
    assert not reg.update("a", restart.epoch, "tcp://w2", state="running")
    assert reg.on_seal("aimss-shuffle-a-0") is None
    assert [r.run_id for r, _, _ in reg.on_worker_lost("tcp://w2", lost)] == ["b"]
    again = reg.register(shuffle_like("a"))
    assert again.epoch > restart.epoch and again.state is RunState.REGISTERED
    # ... or the client that left closes it.
    assert reg.finish("b", rerun.epoch, "closed")


def test_owned_by_client_lists_its_unfinished_runs(reg):
    for rid, client in [("b", "c1"), ("a", "c1"), ("x", "c2"), ("done", "c1")]:
        rec = reg.register(RunSpec(run_id=rid), client=client)
    reg.finish("done", rec.epoch)
    assert reg.owned_by_client("c1") == ["a", "b"] and reg.owned_by_client("nobody") == []


def test_snapshot_is_plain_data_listing_each_run_once(reg):
    assert reg.snapshot() == []
    reg.register(shuffle_like("b"), client="c1", now=2.0)
    a = reg.register(RunSpec(run_id="a", reads=("u",)), now=1.0)
    reg.register(shuffle_like("b"), client="c1", now=3.0)  # again: replaces
    reg.update("a", a.epoch, "tcp://w1", state="failed", error=("SinkError", "boom"), progress={"n": 1})
    snap = reg.snapshot()
    assert msgpack_trip(snap) == snap  # survives the wire unchanged
    assert [s["run_id"] for s in snap] == ["a", "b"]
    assert snap[0] == {
        "run_id": "a", "kind": "run", "epoch": a.epoch, "state": "failed", "client": None,
        "started": 1.0, "streams": [], "reads": ["u"], "sealed": [], "on_seal": "keep",
        "on_loss": "fail", "io_priority": 0, "workers": ["tcp://w1"], "progress": {"tcp://w1": {"n": 1}},
        "error": ["SinkError", "boom"], "version": a.version,
    }
    assert (snap[1]["epoch"], snap[1]["state"], snap[1]["on_seal"]) == (3, "registered", "rebalance")


def test_clear_forgets_runs_but_not_epochs(reg):
    old = reg.register(shuffle_like("a"))
    reg.clear()
    assert len(reg) == 0 and reg.snapshot() == [] and reg.for_stream("aimss-shuffle-a-0") is None
    assert reg.register(shuffle_like("a")).epoch > old.epoch


# -- the invariants, under any sequence of events ------------------------------------------------

RUN_IDS = ("a", "b", "c")
STREAMS = ("s0", "s1", "s2", "s3")
WORKERS = ("w1", "w2")
STATES = [s.value for s in RunState if s is not RunState.RESTARTING]


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.reg = RunRegistry(keep_finished=2)
        self.top: dict[str, int] = {}  # the highest epoch each run id ever had
        self.latest = 0  # the highest epoch registered at all
        self.finished: set[tuple[str, int]] = set()  # (run, epoch) seen finished

    def records(self) -> list[RunRecord]:
        out = []
        for rid in RUN_IDS:
            try:
                out.append(self.reg.get(rid))
            except RunNotFoundError:
                pass
        return out

    def note(self) -> None:
        self.finished |= {(r.run_id, r.epoch) for r in self.records() if r.finished}

    @rule(
        rid=st.sampled_from(RUN_IDS),
        owned=st.sets(st.sampled_from(STREAMS), max_size=2),
        read=st.sets(st.sampled_from(STREAMS), max_size=2),
        on_seal=st.sampled_from(OnSeal),
        on_loss=st.sampled_from(OnLoss),
        jump=st.none() | st.integers(0, 3),
    )
    def register(self, rid, owned, read, on_seal, on_loss, jump):
        spec = RunSpec(
            run_id=rid, streams=tuple(sorted(owned)), reads=tuple(sorted(read - owned)),
            on_seal=on_seal, on_loss=on_loss,
        )
        conflict = any(
            r.run_id != rid and not r.finished and set(r.spec.streams) & owned for r in self.records()
        )
        epoch = None if jump is None else self.latest + jump
        stale = epoch is not None and epoch <= self.latest
        if conflict or stale:
            with pytest.raises(InvalidArgumentError):
                self.reg.register(spec, epoch=epoch)
            return
        rec = self.reg.register(spec, epoch=epoch)
        assert rec.epoch > self.top.get(rid, 0)  # epochs strictly increase per run id
        self.top[rid] = self.latest = rec.epoch

    @precondition(lambda self: self.records())
    @rule(data=st.data(), who=st.sampled_from(WORKERS), state=st.none() | st.sampled_from(STATES),
          skew=st.sampled_from([0, 0, -1, 1]), n=st.integers(0, 9))
    def update(self, data, who, state, skew, n):
        rec = data.draw(st.sampled_from(self.records()))
        before = dataclasses.astuple(rec)
        ends = state is not None and RunState(state) in FINISHED
        restarting = rec.state is RunState.RESTARTING and not ends
        error = ("E", "m") if state == "failed" else None
        applied = self.reg.update(
            rec.run_id, rec.epoch + skew, who, state=state, progress={"n": n}, error=error
        )
        if skew or (rec.run_id, rec.epoch) in self.finished or restarting:
            assert not applied and dataclasses.astuple(rec) == before  # stale: nothing changes
        self.note()

    @precondition(lambda self: self.records())
    @rule(data=st.data(), state=st.sampled_from(sorted(s.value for s in FINISHED)))
    def finish(self, data, state):
        rec = data.draw(st.sampled_from(self.records()))
        self.reg.finish(rec.run_id, rec.epoch, state)
        assert rec.finished
        self.note()

    @rule(stream=st.sampled_from(STREAMS))
    def seal(self, stream):
        owner = self.reg.for_stream(stream)
        got = self.reg.on_seal(stream)
        if owner is None or owner.state is RunState.RESTARTING:
            assert got is None
        else:
            assert got == (owner.spec.on_seal, owner.spec.free_unread)

    @rule(address=st.sampled_from(WORKERS),
          lost=st.dictionaries(st.sampled_from(STREAMS), st.sets(st.integers(0, 3), max_size=2)))
    def lose_worker(self, address, lost):
        hit = {s for s, ps in lost.items() if ps}
        candidates = {
            r.run_id for r in self.records()
            if not r.finished and r.state is not RunState.RESTARTING
            and hit & set(r.spec.streams + r.spec.reads)
        }
        out = self.reg.on_worker_lost(address, lost)
        reported = [r.run_id for r, _, _ in out]
        # Only (and every) run with a stream that lost partitions on that worker, once each.
        assert sorted(reported) == sorted(candidates) and len(set(reported)) == len(reported)
        for rec, action, message in out:
            assert action is rec.spec.on_loss and (message is not None) == (action is OnLoss.FAIL)
        self.note()

    @rule()
    def clear(self):
        self.reg.clear()

    @invariant()
    def finished_runs_stay_finished(self):
        for rec in self.records():
            if (rec.run_id, rec.epoch) in self.finished:
                assert rec.finished and rec.state is not RunState.RUNNING

    @invariant()
    def snapshot_lists_each_run_once(self):
        ids = [s["run_id"] for s in self.reg.snapshot()]
        assert len(ids) == len(set(ids)) == len(self.reg)
        assert set(ids) == {r.run_id for r in self.records()}

    @invariant()
    def each_stream_has_at_most_one_unfinished_owner(self):
        for s in STREAMS:
            owners = [r.run_id for r in self.records() if not r.finished and s in r.spec.streams]
            assert len(owners) <= 1
            got = self.reg.for_stream(s)
            assert (got.run_id if got else None) == (owners[0] if owners else None)


RegistryMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_registry_invariants = RegistryMachine.TestCase


def test_the_docstring_examples_hold():
    import aimss_dask.coordinator.registry
    import aimss_dask.core.runs

    for module in (aimss_dask.core.runs, aimss_dask.coordinator.registry):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# -- the scheduler plugin answers aimss_runs ----------------------------------------------------


def test_aimss_runs_on_a_real_cluster_is_empty_until_operators_register(client):
    reply = client.sync(client.scheduler.aimss_runs)
    assert reply["status"] == "OK" and list(reply["runs"]) == [] and set(reply) == {"status", "runs", "streams", "stragglers", "io", "fill"}
    kind = client.run_on_scheduler(lambda dask_scheduler: type(dask_scheduler.plugins["aimss"].runs).__name__)
    assert kind == "RunRegistry"
