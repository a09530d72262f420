"""A seal makes writing client processes push first, over Dask's event topics.

The scheduler publishes a seal event (``Scheduler.log_event``) naming the
writing clients; each answers after pushing what it buffered. These tests run
on the real multi-process LocalCluster of conftest, whose scheduler lives in
this process (so a test can patch its module constants and stream handlers).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import dask
import pytest
from conftest import assert_workers_clean, unique_name, wait_until
from distributed import Client

import aimss_dask
from aimss_dask.api import context
from aimss_dask.coordinator import sealing

N = 200
#: A linger far longer than the test: records stay buffered in the client's
#: producer until the seal makes it push them.
LINGER = "30s"
#: The seal timeout for these tests: a seal that waited for it is a failure.
TIMEOUT = 20.0
#: "Well under the timeout": a seal that pushed a few records.
FAST = 5.0


@pytest.fixture
def short_seal_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # The scheduler runs in this process (LocalCluster), so this is its value.
    monkeypatch.setattr(sealing, "SEAL_CLIENT_TIMEOUT", TIMEOUT)


@pytest.fixture
def drop_client_subscriptions(cluster: Any) -> Iterator[list[str]]:
    """Make the scheduler ignore clients' own subscriptions to the seal topic.

    This is the worst case of the race the scheduler-side subscribe in
    ``aimss_register_producer`` closes: the client's ``subscribe-topic``
    message (batched stream) arriving after the first seal, or never.
    """
    handlers = cluster.scheduler.stream_handlers
    original = handlers["subscribe-topic"]
    dropped: list[str] = []

    def subscribe(topic: str, client: str) -> None:
        if topic == context.SEAL_PRODUCERS_TOPIC:
            dropped.append(client)
            return
        original(topic=topic, client=client)

    handlers["subscribe-topic"] = subscribe
    try:
        yield dropped
    finally:
        handlers["subscribe-topic"] = original


def _write_then_seal(c: Client, name: str) -> float:
    """Write N records from the client process of ``c``, seal at once; seconds taken."""
    with dask.config.set({"aimss.linger": LINGER}), c.as_current():
        s = aimss_dask.create_stream(name, partitions=2)
        for i in range(N):
            aimss_dask.write_to(name, i, partition=i % 2)
        t0 = time.monotonic()
        s.seal()
        return time.monotonic() - t0


def _stored(name: str) -> list[int]:
    s = aimss_dask.get_stream(name)
    return sorted(r for p in range(2) for r in s.read(partition=p))


def test_the_topic_names_agree() -> None:
    # Both sides take it from core.names.
    assert context.SEAL_PRODUCERS_TOPIC == sealing.SEAL_PRODUCERS_TOPIC


def test_first_write_then_seal_stores_every_record_quickly(cluster, short_seal_timeout) -> None:
    # A fresh client: its first write registers it as a producer.
    with Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS())
        name = unique_name("cseal")
        took = _write_then_seal(c, name)
        with c.as_current():
            assert _stored(name) == list(range(N))
            assert took < FAST, f"seal took {took:.1f}s (timeout {TIMEOUT}s)"
            aimss_dask.destroy_stream(name)
            assert_workers_clean(aimss_dask.status())


def test_seal_does_not_need_the_clients_own_subscription(
    cluster, short_seal_timeout, drop_client_subscriptions
) -> None:
    with Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS())
        name = unique_name("csub")
        took = _write_then_seal(c, name)
        with c.as_current():
            assert _stored(name) == list(range(N))
            assert took < FAST, f"seal took {took:.1f}s: the client never got the seal event"
            aimss_dask.destroy_stream(name)
            assert_workers_clean(aimss_dask.status())
        # The client did send its own subscription (which was dropped).
        wait_until(lambda: drop_client_subscriptions == [c.id], what="the client's subscribe")


def test_seal_from_another_client_pushes_every_writer_and_skips_one_that_left(
    cluster, short_seal_timeout
) -> None:
    """Two writing clients get one event; the one that left is not waited for."""
    with Client(cluster) as sealer:
        sealer.register_plugin(aimss_dask.AIMSS())
        name = unique_name("cmulti")
        with sealer.as_current():
            s = aimss_dask.create_stream(name, partitions=2, share="write")  # the others write
        writer = Client(cluster, set_as_default=False)
        gone = Client(cluster, set_as_default=False)
        try:
            with dask.config.set({"aimss.linger": LINGER}):
                with writer.as_current():
                    for i in range(N):
                        aimss_dask.write_to(name, i, partition=i % 2)
                with gone.as_current():
                    aimss_dask.write_to(name, -1, partition=0)
                    aimss_dask.get_stream(name).flush()
            gone.close()  # a registered producer that left
            with sealer.as_current():
                t0 = time.monotonic()
                s.seal()
                took = time.monotonic() - t0
                assert _stored(name) == [-1, *range(N)]
                assert took < FAST, f"seal took {took:.1f}s (timeout {TIMEOUT}s)"
            events = sealer.get_events(context.SEAL_PRODUCERS_TOPIC)
            mine = [msg for _, msg in events if msg["name"] == name]
            assert len(mine) == 1
            # Every client that made a call is a producer: the sealer too.
            assert sorted(mine[0]["clients"]) == sorted([sealer.id, writer.id])
        finally:
            writer.close()
            with sealer.as_current():
                aimss_dask.destroy_stream(name)
                assert_workers_clean(aimss_dask.status())


class _FakeProducer:
    def __init__(self) -> None:
        self.sealed: list[tuple[str, int]] = []

    async def seal(self, name: str, epoch: int) -> None:
        self.sealed.append((name, epoch))

    def failure(self, name: str, epoch: int) -> None:
        return None


class _FakeScheduler:
    def __init__(self) -> None:
        self.answers: list[dict[str, Any]] = []

    async def aimss_producers_sealed(self, **kwargs: Any) -> None:
        self.answers.append(kwargs)


class _FakeClient:
    def __init__(self, id: str) -> None:
        self.id = id
        self.scheduler = _FakeScheduler()


def test_a_client_answers_only_the_seals_that_name_it() -> None:
    client, producer = _FakeClient("me"), _FakeProducer()

    async def main() -> None:
        msg = {"name": "s", "epoch": 3, "token": "t1", "clients": ("other",)}
        context._on_seal(client, producer, (0.0, msg))  # type: ignore[arg-type]
        mine = {**msg, "token": "t2", "clients": ("other", "me")}
        context._on_seal(client, producer, (0.0, mine))  # type: ignore[arg-type]
        context._on_seal(client, producer, (0.0, {"clients": ("me",)}))  # type: ignore[arg-type]
        while context._seal_tasks:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert producer.sealed == [("s", 3)]
    assert client.scheduler.answers == [{"token": "t2", "client": "me", "failure": None}]


def _promote_during_the_next_seal(dask_scheduler: Any) -> None:
    """The next seal meets a promotion once (as when an owner dies while it seals), then seals."""
    from aimss_dask.coordinator import streams as coordinator_streams
    from aimss_dask.core.names import PLUGIN_NAME

    ops = dask_scheduler.plugins[PLUGIN_NAME].stream_ops
    real = ops._seal
    calls: list[int] = []

    async def once(name: str, spec: Any) -> Any:
        calls.append(spec.epoch)
        if len(calls) == 1:
            raise coordinator_streams._Promoted()
        ops._seal = real
        return await real(name, spec)

    ops._seal = once
    dask_scheduler.aimss_test_seal_calls = calls


def test_a_seal_that_meets_a_promotion_seals_the_new_owners(client):
    name = unique_name("promoted-seal")
    s = aimss_dask.create_stream(name, partitions=2)
    for i in range(10):
        s.write(i, partition=i % 2)
    s.flush()
    client.run_on_scheduler(_promote_during_the_next_seal)
    s.seal()
    calls = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.aimss_test_seal_calls))
    assert len(calls) == 2
    assert sorted(aimss_dask.read_from(name)) == list(range(10))
    aimss_dask.destroy_stream(name)
