"""Every error case: the right class, the builtin base, a message naming the value.

Each test first stores some records, makes the bad call(s), then reads
everything back: a rejected call must leave the stored data intact.
"""

from __future__ import annotations

import re
import threading

import pytest
from conftest import make_cluster, unique_name, wait_until
from distributed import Client

import aimss_dask
from aimss_dask.api.context import current

PARTS = 2
PER_PARTITION = 5


def fill(partitions: int = PARTS) -> tuple[aimss_dask.Stream, dict[int, list]]:
    """A stream with a few records in every partition, all stored."""
    s = aimss_dask.create_stream(unique_name("err"), partitions=partitions)
    expected = {p: [("rec", p, i) for i in range(PER_PARTITION)] for p in range(partitions)}
    for p, recs in expected.items():
        for r in recs:
            s.write(r, partition=p)
    s.flush()
    return s, expected


def read_existing(s: aimss_dask.Stream, p: int) -> list:
    """What partition ``p`` holds now, whether or not the stream is sealed."""
    out = []
    try:
        for r in s.read(partition=p, timeout=0):
            out.append(r)
    except aimss_dask.ReadTimeoutError:
        pass
    return out


def assert_intact(s: aimss_dask.Stream, expected: dict[int, list]) -> None:
    assert s.info()["records"] == [len(expected[p]) for p in range(s.partitions)]
    for p in range(s.partitions):
        assert read_existing(s, p) == expected[p], f"partition {p} changed"


def q(value) -> str:
    """A regex matching ``value`` as the messages quote it (its repr)."""
    return re.escape(repr(value))


# -- task functions -----------------------------------------------------------------------------


def _task_write(name: str, record, partition=None, key=None) -> None:
    aimss_dask.write_to(name, record, partition=partition, key=key)


def _task_write_lock(name: str) -> None:
    aimss_dask.write_to(name, threading.Lock(), partition=0)


def _task_plain() -> int:
    return 1


def _task_create(name: str) -> None:
    aimss_dask.create_stream(name, partitions=1)


# -- unknown streams ------------------------------------------------------------------------


def test_unknown_stream_raises_lookup_error(client):
    s, expected = fill()
    missing = unique_name("missing")
    calls = {
        "get_stream": lambda: aimss_dask.get_stream(missing),
        "write_to": lambda: aimss_dask.write_to(missing, b"x"),
        "read_from": lambda: list(aimss_dask.read_from(missing)),
        "destroy_stream": lambda: aimss_dask.destroy_stream(missing),
        "shuffle_streams": lambda: aimss_dask.shuffle_streams(missing, timeout=1),
        "create_stream(parent=)": lambda: aimss_dask.create_stream(unique_name(), 1, parent=missing),
    }
    for what, call in calls.items():
        with pytest.raises(aimss_dask.StreamNotFoundError, match=q(missing)) as ei:
            call()
        assert isinstance(ei.value, LookupError), what
    with pytest.raises(aimss_dask.StreamNotFoundError, match=q(missing)) as ei:
        client.submit(_task_write, missing, b"x", pure=False).result()
    assert isinstance(ei.value, LookupError)
    assert_intact(s, expected)


def test_destroyed_stream_is_unknown(client):
    s, expected = fill()
    other, other_expected = fill()
    aimss_dask.destroy_stream(other.name)
    for call in (
        lambda: aimss_dask.get_stream(other.name),
        lambda: other.info(),
        lambda: list(other.read()),
        lambda: aimss_dask.destroy_stream(other.name),
        lambda: aimss_dask.write_to(other.name, b"late"),
        # A write through a stale handle is pushed, rejected by the owner, and
        # reported by the next flush (documented: errors surface at write/flush).
        lambda: (other.write(b"late", partition=0), other.flush()),
    ):
        with pytest.raises(aimss_dask.StreamNotFoundError, match=q(other.name)) as ei:
            call()
        assert isinstance(ei.value, LookupError)
    assert_intact(s, expected)


def test_stale_write_error_does_not_leak_into_recreated_stream(client):
    """A write to a destroyed stream must not fail writes to a new stream of that name."""
    old = aimss_dask.create_stream(unique_name("reborn"), partitions=2)
    aimss_dask.destroy_stream(old.name)
    old.write(b"late", partition=0)  # through the stale handle: rejected by the owner
    producer = current().producer
    wait_until(lambda: producer.budget.statistics().used == 0, timeout=5, what="the stale write being pushed")

    new = aimss_dask.create_stream(old.name, partitions=2)
    assert new.spec.epoch != old.spec.epoch
    new.write(b"new", partition=0)  # must not raise the old stream's error
    new.flush()
    new.seal()
    assert list(new.read()) == [b"new"]


# -- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [0, -1])
def test_bad_partition_count(client, partitions):
    s, expected = fill()
    name = unique_name("badcount")
    with pytest.raises(aimss_dask.InvalidArgumentError, match=rf"partitions={q(partitions)}") as ei:
        aimss_dask.create_stream(name, partitions=partitions)
    assert isinstance(ei.value, ValueError)
    with pytest.raises(aimss_dask.StreamNotFoundError):
        aimss_dask.get_stream(name)  # nothing half-created
    assert_intact(s, expected)


@pytest.mark.parametrize("partition", [PARTS, -1, 99])
def test_partition_out_of_range_on_write_and_read(client, partition):
    s, expected = fill()
    pattern = rf"partition {q(partition)} is out of range"
    for call in (
        lambda: s.write(b"x", partition=partition),
        lambda: aimss_dask.write_to(s.name, b"x", partition=partition),
        lambda: list(s.read(partition=partition)),
        lambda: list(aimss_dask.read_from(s.name, partition=partition, group="g")),
    ):
        with pytest.raises(aimss_dask.PartitionOutOfRangeError, match=pattern) as ei:
            call()
        assert isinstance(ei.value, ValueError)
    with pytest.raises(aimss_dask.PartitionOutOfRangeError, match=pattern) as ei:
        client.submit(_task_write, s.name, b"x", partition, pure=False).result()
    assert isinstance(ei.value, ValueError)
    assert "g" not in s.info()["groups"]
    assert_intact(s, expected)


@pytest.mark.parametrize("start", [-1, -100])
def test_bad_start_offset(client, start):
    s, expected = fill()
    for kwargs in ({}, {"partition": 0}, {"group": "g"}):
        with pytest.raises(aimss_dask.InvalidOffsetError, match=rf"start={q(start)}") as ei:
            list(s.read(start=start, **kwargs))
        assert isinstance(ei.value, ValueError)
    assert_intact(s, expected)


def test_other_bad_read_arguments(client):
    s, expected = fill()
    with pytest.raises(aimss_dask.InvalidArgumentError, match=r"timeout=-1\b") as ei:
        list(s.read(timeout=-1))
    assert isinstance(ei.value, ValueError)
    with pytest.raises(aimss_dask.InvalidArgumentError, match=r"consumer group ''") as ei:
        list(s.read(group=""))
    assert isinstance(ei.value, ValueError)
    assert_intact(s, expected)


def test_bad_names_and_keys(client):
    s, expected = fill()
    with pytest.raises(aimss_dask.InvalidArgumentError, match=r"stream name '' must be a non-empty str") as ei:
        aimss_dask.create_stream("", partitions=1)
    assert isinstance(ei.value, ValueError)
    with pytest.raises(aimss_dask.InvalidArgumentError, match=re.escape("record key [1, 2]")) as ei:
        s.write(b"x", key=[1, 2])
    assert isinstance(ei.value, ValueError)
    with pytest.raises(aimss_dask.InvalidArgumentError, match=rf"{q(s.name)} cannot be its own parent"):
        aimss_dask.create_stream(s.name, partitions=1, parent=s.name, exist_ok=True)
    assert_intact(s, expected)


# -- arguments of the wrong type: TypeError, naming the type, the value and what to give ----------


def assert_type_error(call, pattern: str) -> None:
    with pytest.raises(aimss_dask.InvalidTypeError, match=pattern) as ei:
        call()
    assert isinstance(ei.value, TypeError) and isinstance(ei.value, aimss_dask.AIMSSError)
    assert not isinstance(ei.value, ValueError)  # a wrong type is not a wrong value


@pytest.mark.parametrize(
    "partitions, type_name", [("4", "a str"), (2.5, "a float"), (True, "a bool"), (None, "None")]
)
def test_partition_count_of_the_wrong_type(client, partitions, type_name):
    s, expected = fill()
    name = unique_name("typecount")
    assert_type_error(
        lambda: aimss_dask.create_stream(name, partitions=partitions),
        rf"partitions={q(partitions)} is {type_name}, not an int; give stream {q(name)} a number "
        r"of partitions, an int >= 1",
    )
    with pytest.raises(aimss_dask.StreamNotFoundError):
        aimss_dask.get_stream(name)  # nothing half-created
    assert_intact(s, expected)


@pytest.mark.parametrize("partition, type_name", [("1", "a str"), (1.0, "a float"), (True, "a bool")])
def test_partition_of_the_wrong_type_on_write_and_read(client, partition, type_name):
    s, expected = fill()
    pattern = rf"partition={q(partition)} is {type_name}, not an int; give a partition number 0 \.\. 1 "
    for call in (
        lambda: s.write(b"x", partition=partition),
        lambda: aimss_dask.write_to(s.name, b"x", partition=partition),
        lambda: list(s.read(partition=partition)),
        lambda: list(aimss_dask.read_from(s.name, partition=partition, group="g")),
        # Raised in a task: it reaches the client with its class.
        lambda: client.submit(_task_write, s.name, b"x", partition, pure=False).result(),
    ):
        assert_type_error(call, pattern)
    assert "g" not in s.info()["groups"]
    assert_intact(s, expected)


def test_offsets_timeouts_and_names_of_the_wrong_type(client):
    s, expected = fill()
    for start, type_name in (("3", "a str"), (1.5, "a float"), (False, "a bool")):
        for kwargs in ({}, {"partition": 0}, {"group": "g"}):
            assert_type_error(
                lambda: list(s.read(start=start, **kwargs)),
                rf"start={q(start)} is {type_name}, not an int; give an offset of stream {q(s.name)}",
            )
    for timeout, type_name in (("1", "a str"), (True, "a bool"), ([1], "a list")):
        assert_type_error(
            lambda: list(s.read(timeout=timeout)),
            rf"timeout={q(timeout)} is {type_name}, not a number; give seconds as an int or float >= 0",
        )
        assert_type_error(
            lambda: aimss_dask.shuffle_streams(s.name, timeout=timeout), rf"timeout={q(timeout)} is {type_name}"
        )
    for bad, type_name in ((123, "an int"), (None, "None"), (b"s", "a bytes")):
        for call in (
            lambda: aimss_dask.create_stream(bad, partitions=1),
            lambda: aimss_dask.get_stream(bad),
            lambda: aimss_dask.write_to(bad, b"x"),
            lambda: list(aimss_dask.read_from(bad)),
            lambda: aimss_dask.destroy_stream(bad),
        ):
            assert_type_error(call, rf"stream name {q(bad)} is {type_name}, not a str; give a non-empty str")
    assert_type_error(lambda: list(s.read(group=7)), r"consumer group 7 is an int, not a str")
    assert_type_error(
        lambda: aimss_dask.create_stream(unique_name(), 1, parent=7), r"parent stream name 7 is an int, not a str"
    )
    assert_type_error(lambda: aimss_dask.shuffle_streams(7), r"parent stream name 7 is an int, not a str")
    assert "g" not in s.info()["groups"]
    assert_intact(s, expected)


def test_invalid_type_error_crosses_the_wire():
    """A coordinator or owner that raises it must re-raise it as itself on the caller's side."""
    exc = aimss_dask.InvalidTypeError("partitions='4' is a str, not an int")
    wire = aimss_dask.core.errors.error_to_wire(exc)
    assert wire["type"] == "InvalidTypeError"
    with pytest.raises(aimss_dask.InvalidTypeError, match=re.escape(exc.args[0])) as ei:
        aimss_dask.core.errors.raise_from_wire(wire, "create")
    assert isinstance(ei.value, TypeError)


def test_shuffle_streams_rejects_negative_timeout(client):
    """Like read_from, shuffle_streams must reject ``timeout < 0`` as a bad argument."""
    s, expected = fill()
    child = aimss_dask.create_stream(f"{s.name}/c", partitions=1, parent=s.name)
    child.seal()
    with pytest.raises(aimss_dask.InvalidArgumentError, match=r"timeout=-1\b") as ei:
        aimss_dask.shuffle_streams(s.name, timeout=-1)
    assert isinstance(ei.value, ValueError)
    assert_intact(s, expected)


# -- create_stream of an existing name -----------------------------------------------------------


def test_create_existing_stream(client):
    s, expected = fill()
    with pytest.raises(aimss_dask.StreamExistsError, match=rf"{q(s.name)} already exists with 2 partition") as ei:
        aimss_dask.create_stream(s.name, partitions=PARTS)
    assert isinstance(ei.value, ValueError)
    with pytest.raises(aimss_dask.StreamExistsError, match=rf"{q(s.name)} already exists .*not 3") as ei:
        aimss_dask.create_stream(s.name, partitions=3, exist_ok=True)
    assert isinstance(ei.value, ValueError)
    assert_intact(s, expected)

    same = aimss_dask.create_stream(s.name, partitions=PARTS, exist_ok=True)
    assert same.spec == s.spec  # same owners, same epoch: the same stream
    assert same.info()["records"] == [PER_PARTITION] * PARTS
    same.write(("rec", 0, PER_PARTITION), partition=0)
    same.flush()
    expected[0].append(("rec", 0, PER_PARTITION))
    assert_intact(s, expected)


# -- records that cannot be serialised ----------------------------------------------------------------


def _gen():
    yield 1


@pytest.mark.parametrize(
    "make, type_name",
    [(threading.Lock, "lock"), (_gen, "generator")],
    ids=["lock", "generator"],
)
def test_unserialisable_record(client, make, type_name):
    s, expected = fill()
    for call in (
        lambda: s.write(make(), partition=0),
        lambda: aimss_dask.write_to(s.name, make()),
        lambda: aimss_dask.write_to(s.name, [1, make()], key="k"),
    ):
        with pytest.raises(
            aimss_dask.RecordNotSerializableError,
            match=rf"record of type \w+ written to stream {q(s.name)} cannot be serialised",
        ) as ei:
            call()
        assert isinstance(ei.value, ValueError)
    with pytest.raises(aimss_dask.RecordNotSerializableError, match=rf"record of type {type_name} written"):
        s.write(make(), partition=1)
    # A good write right after still works and lands after the old records.
    s.write(("rec", 1, PER_PARTITION), partition=1)
    s.flush()
    expected[1].append(("rec", 1, PER_PARTITION))
    assert_intact(s, expected)


def test_unserialisable_record_from_task(client):
    s, expected = fill()
    for w in set(s.spec.owners):  # on an owner and on a non-owner of partition 0
        fut = client.submit(_task_write_lock, s.name, workers=[w], pure=False)
        with pytest.raises(aimss_dask.RecordNotSerializableError, match=rf"type lock written to stream {q(s.name)}") as ei:
            fut.result()
        assert isinstance(ei.value, ValueError)
    assert_intact(s, expected)


# -- writes after seal ------------------------------------------------------------------------------


def test_write_after_seal_from_client(client):
    s, expected = fill()
    s.seal()
    for call in (
        lambda: s.write(b"late", partition=0),
        lambda: aimss_dask.write_to(s.name, b"late"),
        lambda: aimss_dask.write_to(s.name, b"late", key="k"),
    ):
        with pytest.raises(aimss_dask.StreamSealedError, match=rf"stream {q(s.name)} is sealed") as ei:
            call()
        assert isinstance(ei.value, RuntimeError)
    assert_intact(s, expected)
    # The stream stays readable and sealed.
    assert list(s.read()) == expected[0] + expected[1]
    assert s.info()["sealed"] is True


@pytest.mark.parametrize("partition", [0, 1])
def test_write_after_seal_from_task(client, partition):
    s, expected = fill()
    s.seal()
    for w in set(s.spec.owners):  # a local write on the owner, a pushed one elsewhere
        fut = client.submit(_task_write, s.name, b"late", partition, workers=[w], pure=False)
        with pytest.raises(aimss_dask.StreamSealedError, match=rf"stream {q(s.name)} is sealed") as ei:
            fut.result()
        assert isinstance(ei.value, RuntimeError)
    assert_intact(s, expected)


def test_write_after_seal_from_another_client_fails_at_flush(client, cluster):
    """Another client learns of the seal from the owner: its flush() raises."""
    s, expected = fill()
    s.seal()
    with Client(cluster, set_as_default=False) as c2:
        s.grant(c2, "write")  # another application that may write learns of the seal
        with c2.as_current():
            other = aimss_dask.get_stream(s.name)
            with pytest.raises(aimss_dask.StreamSealedError, match=rf"stream {q(s.name)} is sealed") as ei:
                other.write(b"late", partition=0)
                other.flush()
            assert isinstance(ei.value, RuntimeError)
    assert_intact(s, expected)


# -- no plugin ---------------------------------------------------------------------------------------


REGISTER_HINT = re.escape("client.register_plugin(aimss_dask.AIMSS())")


def test_not_registered():
    name = unique_name("noplugin")
    calls = {
        "create_stream": lambda: aimss_dask.create_stream(name, partitions=1),
        "get_stream": lambda: aimss_dask.get_stream(name),
        "write_to": lambda: aimss_dask.write_to(name, b"x"),
        "read_from": lambda: list(aimss_dask.read_from(name)),
        "destroy_stream": lambda: aimss_dask.destroy_stream(name),
        "shuffle_streams": lambda: aimss_dask.shuffle_streams(name, timeout=1),
        "status": lambda: aimss_dask.status(),
    }
    with make_cluster(1) as cl:
        # No client at all.
        for what, call in calls.items():
            with pytest.raises(aimss_dask.NotRegisteredError, match=r"needs a Dask cluster") as ei:
                call()
            assert isinstance(ei.value, RuntimeError), what
            assert "register_plugin" in str(ei.value)
        with Client(cl) as c:
            # A cluster without the plugin: from the client ...
            for what, call in calls.items():
                with pytest.raises(aimss_dask.NotRegisteredError, match=REGISTER_HINT) as ei:
                    call()
                assert isinstance(ei.value, RuntimeError), what
            # ... and from inside a task.
            fut = c.submit(_task_create, name, pure=False)
            with pytest.raises(aimss_dask.NotRegisteredError, match=rf"has no AIMSS plugin.*{REGISTER_HINT}") as ei:
                fut.result()
            assert isinstance(ei.value, RuntimeError)
            assert c.submit(_task_plain, pure=False).result() == 1  # the cluster is unharmed

            # Registering afterwards makes the same calls work.
            c.register_plugin(aimss_dask.AIMSS())
            s = aimss_dask.create_stream(name, partitions=1)
            s.write(b"x")
            s.seal()
            assert list(s.read()) == [b"x"]
            aimss_dask.destroy_stream(name)


def test_a_call_to_a_worker_the_scheduler_no_longer_lists_fails_at_once_not_after_the_connect_timeout():
    """Dask retries a refused connect for 30 s; once the coordinator says the worker left, the call fails
    with an OSError (what callers treat as a lost worker), and a connect that succeeds goes on as before."""
    import asyncio
    import time

    from aimss_dask.api.context import Endpoint
    from aimss_dask.transport.rpc import CONNECT_GRACE

    class _Pool:
        def __init__(self, connects: bool) -> None:
            self.connects, self.reused = connects, []

        async def connect(self, addr):
            await asyncio.sleep(CONNECT_GRACE * 1.5 if self.connects else 60)
            return f"comm-to-{addr}"

        def reuse(self, addr, comm) -> None:
            self.reused.append((addr, comm))

        def __call__(self, addr):
            class _Call:
                async def aimss_read(self, **kwargs):
                    return {"records": [], "sealed": True, "asked": kwargs}
            return _Call()

    class _Scheduler:
        def __init__(self, listed: bool) -> None:
            self.listed, self.asked = listed, 0

        async def aimss_listed(self, address):
            self.asked += 1
            return {"listed": self.listed}

    # Left: an OSError soon after the grace period.
    ep = Endpoint(loop=None, scheduler=_Scheduler(False), rpc=_Pool(False), producer=None)
    t0 = time.monotonic()
    with pytest.raises(OSError, match="tcp://gone:1 left the cluster"):
        asyncio.run(ep.ask_worker("tcp://gone:1", "read", start=0))
    assert time.monotonic() - t0 < CONNECT_GRACE + 2 and ep.scheduler.asked == 1
    # Still listed, and the connect completes: the call goes through on that connection.
    pool = _Pool(True)
    ep = Endpoint(loop=None, scheduler=_Scheduler(True), rpc=pool, producer=None)
    assert asyncio.run(ep.ask_worker("tcp://slow:2", "read", start=3))["asked"] == {"start": 3}
    assert pool.reused == [("tcp://slow:2", "comm-to-tcp://slow:2")] and ep.scheduler.asked >= 1


def test_a_writer_asking_a_dead_owner_for_its_data_address_fails_at_once_not_after_the_connect_timeout():
    """A producer that never connected to an owner asks it for its data-plane address first: once the
    scheduler no longer lists that worker, the ask fails with an OSError (its writes then fail over)."""
    import asyncio
    import time

    from aimss_dask.transport.producer import ask_data_address
    from aimss_dask.transport.rpc import CONNECT_GRACE

    class _Pool:
        asked = 0

        async def connect(self, addr):
            await asyncio.sleep(60)  # Dask's retries of a refused connect

        def __call__(self, addr):
            raise AssertionError("never called once the owner is known gone")

    async def listed(address: str) -> bool:
        _Pool.asked += 1
        return address != "tcp://gone:1"

    t0 = time.monotonic()
    with pytest.raises(OSError, match="tcp://gone:1 left the cluster"):
        asyncio.run(ask_data_address(_Pool(), "tcp://gone:1", listed))
    assert time.monotonic() - t0 < CONNECT_GRACE + 2 and _Pool.asked == 1


def test_the_blocking_api_refuses_its_own_loop_and_a_reader_closed_there_commits_without_waiting():
    """Waiting on an event loop for that very loop waits for ever: a worker whose loop did that
    stopped answering, heartbeats included. A group reader freed on the loop (a failed task's
    traceback held it) commits there; it now sends the commit without waiting."""
    import asyncio

    from tornado.ioloop import IOLoop

    from aimss_dask.api.context import Endpoint
    from aimss_dask.api.reader import GroupCommitter

    class _Scheduler:
        def __init__(self) -> None:
            self.commits: list[list[list[int]]] = []

        async def aimss_commit(self, name, group, offsets, client=None, task=None):
            self.commits.append(offsets)
            return {}

    async def main() -> _Scheduler:
        scheduler = _Scheduler()
        ep = Endpoint(loop=IOLoop.current(), scheduler=scheduler, rpc=None, producer=None)
        assert ep.on_loop()
        with pytest.raises(aimss_dask.AIMSSError, match="would wait on the event loop for that very loop"):
            ep.scheduler_op("get", name="s")
        committer = GroupCommitter(ep, "s", "g")
        committer.done = {0: 5}
        committer.commit()  # on the loop: must return at once
        await asyncio.sleep(0.2)
        assert scheduler.commits == [[[0, 5]]]
        # From a thread, it waits for the answer as before.
        committer.done = {0: 7}
        await asyncio.get_running_loop().run_in_executor(None, committer.commit)
        assert scheduler.commits[-1] == [[0, 7]]
        return scheduler

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_reader_follows_a_partition_its_live_old_owner_no_longer_holds():
    """A retirement (or a seal's rebalance) moved a sealed partition while its old owner lives on: that
    owner answers "not held by this worker", and the reader asks the coordinator where it went instead of
    failing. A partition number out of range stays a final answer."""
    from types import SimpleNamespace

    from aimss_dask.api.reader import _moved_to
    from aimss_dask.core.errors import PartitionNotHeldError, PartitionOutOfRangeError
    from aimss_dask.core.specs import StreamSpec

    spec = StreamSpec("s", 2, ("a", "b"), epoch=3)
    now = StreamSpec("s", 2, ("a", "c"), epoch=3)
    asked: list[str] = []

    def scheduler_op(op, **kwargs):
        asked.append(op)
        return {"spec": now.to_wire(), "sealed": True, "lost": []}

    ep = SimpleNamespace(scheduler_op=scheduler_op)
    gone = PartitionNotHeldError("partition 1 of stream 's' is not held by this worker")
    assert _moved_to(ep, spec, 1, "b", gone) == "c" and asked == ["get"]
    assert _moved_to(ep, spec, 1, "b", PartitionOutOfRangeError("partition 7 does not exist")) is None
    assert asked == ["get"]  # a final answer: nobody asked
    # Over the wire, the owner's error keeps its class.
    from aimss_dask.core.errors import error_from_wire, error_to_wire

    wire = error_to_wire(gone)
    assert isinstance(error_from_wire(wire["type"], wire["message"]), PartitionNotHeldError)
