"""Seals that wait for writing clients: they push what they buffered first.

A client process that writes buffers records like a worker does. Before a
stream is sealed, the coordinator publishes one event on
:data:`~aimss_dask.core.names.SEAL_PRODUCERS_TOPIC`; each writing client named
in it pushes its records for the stream and answers
``aimss_producers_sealed``. Only then do the owners seal.

Writing clients also hear, on :data:`~aimss_dask.core.names.OWNER_LOST_TOPIC`,
that a worker holding partitions died, as workers do: their requests on their
way to it are given up at once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, TypedDict

from aimss_dask.coordinator.cluster import ClusterOps
from aimss_dask.core.names import OWNER_LOST_TOPIC, SEAL_PRODUCERS_TOPIC
from aimss_dask.transport.rpc import replies

logger = logging.getLogger("aimss_dask")

#: How long a seal waits for writing clients to push their buffered records.
SEAL_CLIENT_TIMEOUT = 60.0


class SealProducersEvent(TypedDict):
    """The message of a seal event: push ``name`` (epoch ``epoch``), then answer
    ``aimss_producers_sealed(token=...)``; only the ``clients`` named do."""

    name: str
    epoch: int
    token: str
    clients: list[str]


class OwnerLostEvent(TypedDict):
    """The message of an owner-lost event: ``address`` died; streams up to ``epoch`` had partitions there."""

    address: str
    epoch: int


#: The topics a writing client is subscribed to.
_TOPICS = (SEAL_PRODUCERS_TOPIC, OWNER_LOST_TOPIC)


class ClientSeals:
    """The writing clients, and the seals waiting for them to push."""

    def __init__(self, ops: ClusterOps) -> None:
        self.ops = ops
        # Client processes that write (they buffer records too).
        self.producer_clients: set[str] = set()
        # Seals waiting for clients: token -> (clients yet to answer, done, failures).
        self.waits: dict[str, tuple[set[str], asyncio.Event, dict[str, Any]]] = {}

    def client_left(self, client: str) -> None:
        """``client`` is gone: no seal waits for it any more."""
        assert self.ops.scheduler is not None
        if client in self.producer_clients:
            self.producer_clients.discard(client)
            # Distributed keeps a topic's subscribers after they leave.
            for topic in _TOPICS:
                self.ops.scheduler.unsubscribe_topic(topic, client)
        for pending, done, _ in self.waits.values():
            pending.discard(client)
            if not pending:
                done.set()

    def owner_lost(self, worker: str, epoch: int) -> None:
        """Tell the writing clients that ``worker`` died, losing (or handing to copies) streams up to ``epoch``."""
        assert self.ops.scheduler is not None
        if self.producer_clients:
            event: OwnerLostEvent = {"address": worker, "epoch": int(epoch)}
            self.ops.scheduler.log_event(OWNER_LOST_TOPIC, event)

    async def seal_clients(self, name: str, epoch: int) -> dict[str, Any]:
        """Have every writing client push what it buffered for ``name``."""
        assert self.ops.scheduler is not None
        clients = {c for c in self.producer_clients if c in self.ops.scheduler.client_comms}
        if not clients:
            return {}
        token = uuid.uuid4().hex
        done = asyncio.Event()
        failures: dict[str, Any] = {}
        self.waits[token] = (set(clients), done, failures)
        try:
            # One event to the topic's subscribers (the writing clients); each
            # answers only if it is named in ``clients``.
            event: SealProducersEvent = {
                "name": name,
                "epoch": int(epoch),
                "token": token,
                "clients": sorted(clients),
            }
            self.ops.scheduler.log_event(SEAL_PRODUCERS_TOPIC, event)
            try:
                await asyncio.wait_for(done.wait(), SEAL_CLIENT_TIMEOUT)
            except asyncio.TimeoutError:
                pending = sorted(self.waits[token][0])
                logger.warning(
                    "aimss: seal of %r went ahead without clients %s pushing their writes",
                    name,
                    pending,
                )
        finally:
            del self.waits[token]
        return failures

    @replies
    async def _h_register_producer(self, client: str) -> None:
        assert self.ops.scheduler is not None
        self.producer_clients.add(client)
        # The client subscribes itself too, but on its batched stream, which
        # may arrive after this reply and after a seal it makes right away:
        # subscribing it here means the first seal does not wait
        # SEAL_CLIENT_TIMEOUT for an answer to an event it never got.
        for topic in _TOPICS:
            self.ops.scheduler.subscribe_topic(topic, client)

    @replies
    async def _h_producers_sealed(self, token: str, client: str, failure: Any = None) -> None:
        wait = self.waits.get(token)
        if wait is not None:
            pending, done, failures = wait
            pending.discard(client)
            if failure:
                failures[client] = {"failure": failure}
            if not pending:
                done.set()
