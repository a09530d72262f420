"""Streams belong to the application that made them: every access rule, from a second client process.

The second application is a real process of its own (``_App``) with its own
``Client``; the unit tests of the rules' logic are at the end.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import pytest
from conftest import make_cluster, unique_name, wait_until
from distributed import Client

import aimss_dask
from aimss_dask.coordinator.access import StreamAccess
from aimss_dask.core.errors import InvalidArgumentError, StreamPermissionError

# -- the other application: a client process taking orders ---------------------------


def _task_writes(name: str) -> str:
    aimss_dask.get_stream(name).write(b"from a task", partition=0)
    return "written"


def _do(client: Client, op: str, *args: Any) -> Any:
    if op == "id":
        return client.id
    if op == "read":
        name, = args
        return sorted(aimss_dask.get_stream(name).read())
    if op == "read_token":
        name, token = args
        return sorted(aimss_dask.get_stream(name, token=token).read())
    if op == "get":
        name, token = args
        aimss_dask.get_stream(name, token=token)
        return "ok"
    if op == "write":
        name, value = args
        s = aimss_dask.get_stream(name) if isinstance(name, str) else name
        s.write(value, partition=0)
        s.flush()
        return "ok"
    if op == "write_to":
        name, value = args
        aimss_dask.write_to(name, value, partition=0)
        aimss_dask.get_stream(name).flush()
        return "ok"
    if op == "task_write":
        name, = args
        return client.submit(_task_writes, name, pure=False).result()
    if op == "seal":
        name, = args
        aimss_dask.get_stream(name).seal()
        return "ok"
    if op == "destroy":
        name, = args
        aimss_dask.destroy_stream(name)
        return "ok"
    if op == "consume":
        name, group = args
        return sorted(aimss_dask.read_from(name, group=group))
    if op == "map":
        name, group = args
        return client.gather(aimss_dask.get_stream(name).map_records(lambda r: r, group=group))
    if op == "grant":
        name, who, mode = args
        aimss_dask.get_stream(name).grant(who, mode)
        return "ok"
    if op == "publish":
        name, n, nbytes = args
        import numpy as np

        s = aimss_dask.create_stream(name, partitions=2, share="read")
        for i in range(n):
            s.write(np.full(nbytes // 8, float(i)))
        s.seal()
        return "ok"
    if op == "total":
        name, = args
        recs = list(aimss_dask.get_stream(name).read())
        return len(recs), float(sum(r.sum() for r in recs))
    if op == "create":
        name, share, persist = args
        s = aimss_dask.create_stream(name, partitions=1, share=share, persist=persist)
        s.write(b"b0", partition=0)
        s.flush()
        return s.token
    raise ValueError(op)


def _serve(address: str, inbox: Any, outbox: Any) -> None:
    with Client(address) as client:
        outbox.put(("ok", client.id))
        while True:
            cmd = inbox.get()
            if cmd is None:
                return
            try:
                outbox.put(("ok", _do(client, *cmd)))
            except Exception as e:
                outbox.put(("err", type(e).__name__, str(e)))


class _App:
    """Another application: a client in a process of its own."""

    def __init__(self, address: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_serve, args=(address, self.inbox, self.outbox), daemon=True)
        self.proc.start()
        self.id = self._answer()

    def _answer(self) -> Any:
        reply = self.outbox.get(timeout=120)
        if reply[0] == "err":
            raise _Refused(reply[1], reply[2])
        return reply[1]

    def __call__(self, *cmd: Any) -> Any:
        self.inbox.put(cmd)
        return self._answer()

    def refused(self, *cmd: Any) -> str:
        """Run ``cmd``, which must raise StreamPermissionError there; its message."""
        with pytest.raises(_Refused) as info:
            self(*cmd)
        assert info.value.kind == "StreamPermissionError", info.value
        return info.value.message

    def close(self) -> None:
        if self.proc.is_alive():
            self.inbox.put(None)
        self.proc.join(60)


class _Refused(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


@pytest.fixture(scope="module")
def cluster():
    with make_cluster(2) as cl:
        yield cl


@pytest.fixture(scope="module")
def other(cluster):
    app = _App(cluster.scheduler_address)
    yield app
    app.close()


def _filled(name: str, share: str | None = None, n: int = 4) -> aimss_dask.Stream:
    s = aimss_dask.create_stream(name, partitions=1, share=share)
    for i in range(n):
        s.write(i, partition=0)
    s.flush()
    return s


# -- the rules, from another application ------------------------------------------------


def test_a_private_stream_refuses_every_other_application_and_stays_intact(client, other):
    name = unique_name("private")
    s = _filled(name)
    msg = other.refused("get", name, None)
    assert name in msg and client.id in msg and other.id in msg  # names the stream, owner and caller
    for cmd in (("read", name), ("write", name, 99), ("write_to", name, 99), ("seal", name),
                ("destroy", name), ("consume", name, "g"), ("grant", name, other.id, "read")):
        other.refused(*cmd)
    # A task the other application submits writes with that application's access.
    other.refused("task_write", name)
    s.seal()
    assert sorted(s.read()) == [0, 1, 2, 3]  # nothing lost, nothing added
    aimss_dask.destroy_stream(name)


def test_a_read_share_lets_others_read_with_groups_of_their_own(client, other):
    name = unique_name("readable")
    s = _filled(name, share="read")
    s.seal()
    assert (s.info()["owner"], s.info()["share"]) == (client.id, "read")
    assert other("read", name) == [0, 1, 2, 3]
    assert other("consume", name, "theirs") == [0, 1, 2, 3]
    mine = s.read(group="mine")
    assert [next(mine), next(mine), next(mine)] == [0, 1, 2]  # commits as it goes
    mine.close()
    # Groups are per application: the other's "mine" is its own, from offset 0,
    # and leaves this one's where it was.
    assert other("consume", name, "mine") == [0, 1, 2, 3]
    assert other("map", name, "mine") == [[]]  # the other's "mine", which it consumed to the end
    assert other("map", name, "theirs2") == [[0, 1, 2, 3]]
    assert set(s.info()["groups"]) == {"mine", f"{other.id}/mine", f"{other.id}/theirs", f"{other.id}/theirs2"}
    assert list(s.read(group="mine")) == [2, 3]  # at least once: 2 was not yet passed
    for cmd in (("write", name, 9), ("seal", name), ("destroy", name)):
        other.refused(*cmd)
    assert sorted(s.read()) == [0, 1, 2, 3]
    aimss_dask.destroy_stream(name)


def test_a_write_share_lets_others_append_and_seal_but_not_destroy(client, other):
    name = unique_name("writable")
    s = _filled(name, share="write", n=2)
    assert other("write", name, 7) == "ok"
    assert other("task_write", name) == "written"
    assert other("seal", name) == "ok"
    other.refused("destroy", name)
    assert sorted(map(str, s.read())) == sorted(map(str, [0, 1, 7, b"from a task"]))
    aimss_dask.destroy_stream(name)


def test_grant_and_revoke_by_client_id(client, other):
    name = unique_name("granted")
    s = _filled(name, n=1)
    other.refused("write", name, 5)
    s.grant(other.id, "write")
    assert other("write", name, 5) == "ok"
    assert s.revoke(other.id) is True
    assert s.revoke(other.id) is False
    other.refused("seal", name)  # at once
    other.refused("get", name, None)
    time.sleep(aimss_dask.api.streams.ACCESS_TTL + 0.2)
    other.refused("write_to", name, 6)  # a writer's cached access ran out
    s.seal()
    assert sorted(s.read()) == [0, 5]
    aimss_dask.destroy_stream(name)


def test_grant_by_token(client, other):
    name = unique_name("token")
    s = _filled(name, n=2)
    s.seal()
    other.refused("read_token", name, "not-the-token")
    s.grant("viewer-token-1", "read")
    assert other("read_token", name, "viewer-token-1") == [0, 1]
    assert other("read", name) == [0, 1]  # it holds the grant now
    other.refused("destroy", name)
    s.revoke("viewer-token-1")
    other.refused("read", name)
    aimss_dask.destroy_stream(name)


def test_an_operators_streams_are_private_to_its_application(client, other):
    from aimss_dask.api.runs import register_run
    from aimss_dask.core.runs import RunSpec

    [s] = register_run(RunSpec(run_id=unique_name("run"), streams=(unique_name("run-s"),)), 2).streams
    s.write(1, partition=0)  # the run's application uses it
    s.flush()
    assert s.info()["owner"] == client.id
    for cmd in (("get", s.name, None), ("read", s.name), ("write", s.name, 2), ("destroy", s.name)):
        other.refused(*cmd)
    s.seal()
    assert list(s.read()) == [1]


def test_only_the_owner_grants_and_bad_arguments_are_named(client, other):
    name = unique_name("rules")
    s = _filled(name, share="write", n=1)
    other.refused("grant", name, other.id, "write")
    with pytest.raises(InvalidArgumentError, match="mode='all'"):
        s.grant(other.id, "all")
    with pytest.raises(InvalidArgumentError, match="share='public'"):
        aimss_dask.create_stream(unique_name("bad"), share="public")
    with pytest.raises(aimss_dask.InvalidTypeError, match="who=3"):
        s.grant(3, "read")
    aimss_dask.destroy_stream(name)


def test_a_persisted_stream_is_claimed_by_its_token(client, cluster):
    name = unique_name("kept")
    app = _App(cluster.scheduler_address)
    token = app("create", name, None, True)
    app.close()  # its creator is gone; persist=True keeps it
    assert name in [st["name"] for st in aimss_dask.status().streams]
    with pytest.raises(StreamPermissionError):
        aimss_dask.get_stream(name)
    with pytest.raises(StreamPermissionError, match="neither its owner's"):
        aimss_dask.get_stream(name, token="guess")
    s = aimss_dask.get_stream(name, token=token)  # claimed: this client owns it now
    s.seal()
    assert list(s.read()) == [b"b0"]
    aimss_dask.destroy_stream(name)


def test_a_client_that_dies_takes_its_private_streams_not_those_others_still_read(client, cluster):
    private, shared = unique_name("mine"), unique_name("ours")
    maker = _App(cluster.scheduler_address)
    reader = _App(cluster.scheduler_address)
    try:
        maker("create", private, None, False)
        maker("create", shared, "read", False)
        maker("seal", shared)
        assert reader("read", shared) == [b"b0"]  # a live application holds a handle
        maker.proc.kill()  # the application dies (SIGKILL), it does not say goodbye

        def names() -> set[str]:
            return {st["name"] for st in aimss_dask.status().streams}

        wait_until(lambda: private not in names(), what="the private stream went with its client")
        assert shared in names()
        assert reader("read", shared) == [b"b0"]  # still readable, intact
        reader.close()
        wait_until(lambda: shared not in names(), what="the shared stream went with its last reader")
    finally:
        maker.close()
        reader.close()


def test_an_application_that_leaves_takes_its_consumer_groups_on_others_streams(client, cluster):
    s = _filled(unique_name("groups-left"), share="read")
    s.seal()
    assert list(s.read(group="mine")) == [0, 1, 2, 3]
    app = _App(cluster.scheduler_address)
    try:
        assert app("consume", s.name, "train") == [0, 1, 2, 3]
        assert set(s.info()["groups"]) == {"mine", f"{app.id}/train"}
        app.close()
        # Its group held records for a client id no application gets back.
        wait_until(lambda: set(s.info()["groups"]) == {"mine"}, what="its group dropped")
        assert list(s.read(partition=0, start=0)) == [0, 1, 2, 3]  # the stream itself intact
    finally:
        app.close()
        aimss_dask.destroy_stream(s.name)


def test_two_applications_read_what_a_third_published_and_memory_holds_one_copy(client, cluster, other):
    name = unique_name("published")
    n, nbytes = 16, 2**20
    producer, reader = _App(cluster.scheduler_address), _App(cluster.scheduler_address)
    try:
        producer("publish", name, n, nbytes)

        def held() -> int:
            [st] = [st for st in aimss_dask.status().streams if st["name"] == name]
            return st["memory_bytes"]

        wait_until(lambda: held() == n * nbytes, what="the heartbeats report the stream")
        want = (n, float(sum(i * (nbytes // 8) for i in range(n))))
        assert other("total", name) == want
        assert reader("total", name) == want
        time.sleep(1.5)  # a heartbeat after the reads
        assert held() == n * nbytes  # one copy in the cluster, however many read it
        other.refused("destroy", name)
        producer("destroy", name)
    finally:
        producer.close()
        reader.close()


# -- the rules' logic -----------------------------------------------------------------


def test_modes_rank_owner_over_grants_over_share():
    a = StreamAccess(owner="A", share=None, token="t")
    assert a.mode("A") == "owner" and a.mode("B") is None
    assert a.mode(None) == "owner"  # unchecked callers: AIMSS's own requests
    a.grant("B", "read")
    assert a.mode("B") == "read"
    a.share = "write"
    assert a.mode("B") == "write"  # the stronger of share and grant
    assert a.present("C", "t", "s") == "owner" and a.owner == "C"
    assert StreamAccess(owner=None).mode("anyone") == "owner"


def test_leaving_keeps_shared_streams_while_a_live_user_holds_them():
    a = StreamAccess(owner="A", share="read")
    a.check("B", "read", "s")
    assert a.leave("A", live={"B"}) is False
    assert a.leave("B", live=set()) is True
    assert StreamAccess(owner="A").leave("B", live={"A"}) is False  # not the owner's leaving
    assert StreamAccess(owner=None).leave("A", live=set()) is False


def test_groups_are_per_application_and_commits_need_read_access():
    a = StreamAccess(owner="A", share=None)
    with pytest.raises(StreamPermissionError, match="may not commit"):
        a.check("B", "commit", "s")
    a.share = "read"
    assert a.check("B", "commit", "s") == "read"
    assert {a.group_key(w, "g") for w in ("A", "B", "C")} == {"g", "B/g", "C/g"}
