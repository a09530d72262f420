"""The sync bridge: where an API call runs and how it reaches the cluster.

The stream API is blocking and works in two places: a client process (the
user's script) and a task thread on a worker. ``current()`` builds an
:class:`Endpoint` for either, with the event loop, the RPC pools and the
process's producer; every remote call goes through ``Endpoint.call``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from distributed import default_client, get_worker
from distributed.utils import sync

from aimss_dask.core.config import AIMSSConfig
from aimss_dask.core.errors import AIMSSError, NotRegisteredError, raise_from_wire
from aimss_dask.core.names import (
    OWNER_LOST_TOPIC,
    PLUGIN_NAME,
    REGISTERED_KEY,
    SEAL_PRODUCERS_TOPIC,
)
from aimss_dask.transport import dataplane
from aimss_dask.transport.liveness import EVERY, call_listed
from aimss_dask.transport.producer import Producer
from aimss_dask.transport.rpc import connect_listed, listed_by

if TYPE_CHECKING:
    from distributed import Client

    from aimss_dask.coordinator.sealing import OwnerLostEvent, SealProducersEvent
    from aimss_dask.node.plugin import AIMSSWorker

T = TypeVar("T")

logger = logging.getLogger("aimss_dask")


@dataclass(eq=False)
class Endpoint:
    """One process's view of the cluster: a client or a worker."""

    loop: Any
    scheduler: Any  # PooledRPCCall to the scheduler
    rpc: Any  # ConnectionPool to workers
    producer: Producer
    address: str | None = None  # the worker's own address, in a task
    plugin: AIMSSWorker | None = None
    client_id: str | None = None
    task_key: Any = None

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run coroutine function ``fn`` on the loop and wait for it.

        Never on the loop itself: waiting there for the loop would wait
        forever (a worker that stops answering, heartbeats included), so
        that raises :class:`AIMSSError` instead.
        """
        if self.on_loop():
            raise AIMSSError(
                f"aimss_dask: {getattr(fn, '__name__', fn)} would wait on the event loop for that very "
                "loop; call the blocking API from a task or a plain thread"
            )
        return sync(self.loop, fn, *args, **kwargs)

    def on_loop(self) -> bool:
        """Whether the calling thread runs this endpoint's event loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return running is getattr(self.loop, "asyncio_loop", self.loop)

    async def ask_scheduler(self, op: str, **kwargs: Any) -> dict[str, Any]:
        reply = await getattr(self.scheduler, f"aimss_{op}")(**kwargs)
        return raise_from_wire(reply, f"aimss_{op}")

    async def ask_worker(self, addr: str, op: str, **kwargs: Any) -> dict[str, Any]:
        """Call ``aimss_<op>`` on worker ``addr``; ``OSError`` once the scheduler no longer lists it.

        Both the connect and the answer give up on a worker the scheduler
        removed: one that died, and one stopped or hung whose connection
        stays up (see :func:`~aimss_dask.transport.liveness.call_listed`).
        """
        listed = listed_by(self.scheduler)
        await connect_listed(self.rpc, addr, listed)
        # The producer's interval: this process's ``aimss.liveness-interval``.
        every = self.producer.liveness.every if self.producer is not None else EVERY
        reply = await call_listed(getattr(self.rpc(addr), f"aimss_{op}")(**kwargs), addr, listed, every=every)
        return raise_from_wire(reply, f"aimss_{op}")

    def scheduler_op(self, op: str, **kwargs: Any) -> dict[str, Any]:
        return self.call(self.ask_scheduler, op, **kwargs)

    def owner_kwargs(self) -> dict[str, Any]:
        """Who the caller acts for: a new stream's owner, and whose access the coordinator checks."""
        return {"client": self.client_id, "task": self.task_key}


_client_producers: weakref.WeakKeyDictionary[Client, Producer] = weakref.WeakKeyDictionary()
_client_lock = threading.Lock()


def _refuse_on_loop(fn: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise AIMSSError(
        f"aimss_dask.{fn} blocks until the cluster answers, so it cannot run inside "
        "a coroutine; call it from a task or a plain thread (e.g. loop.run_in_executor)"
    )


def current(fn: str = "call") -> Endpoint:
    """The endpoint of the calling thread: a worker task's, else the client's."""
    _refuse_on_loop(fn)
    try:
        worker = get_worker()
    except ValueError:
        worker = None
    if worker is not None:
        plugin = worker.plugins.get(PLUGIN_NAME)
        if plugin is None or getattr(plugin, "producer", None) is None:
            failed = getattr(plugin, "setup_error", None)
            raise NotRegisteredError(
                f"aimss_dask.{fn}: worker {worker.address} has no AIMSS plugin"
                + (f" (its setup failed: {failed})" if failed else "")
                + "; call `client.register_plugin(aimss_dask.AIMSS())` first"
            )
        try:
            key = worker.get_current_task()
        except Exception:
            key = None
        return Endpoint(
            loop=worker.loop,
            scheduler=worker.scheduler,
            rpc=worker.rpc,
            producer=plugin.producer,
            address=worker.address,
            plugin=plugin,
            task_key=key,
        )
    try:
        client = default_client()
    except ValueError:
        raise NotRegisteredError(
            f"aimss_dask.{fn} needs a Dask cluster: create `client = "
            "distributed.Client(...)` and `client.register_plugin(aimss_dask.AIMSS())`"
        ) from None
    if client.asynchronous:
        raise AIMSSError(
            f"aimss_dask.{fn} is a blocking API and the default client is "
            "asynchronous; use a synchronous distributed.Client"
        )
    with _client_lock:
        producer = _client_producers.get(client)
        if producer is None:
            # The same settings as the workers: this Dask config, overridden
            # by the AIMSS(...) arguments the scheduler plugin was given.
            if not client.get_metadata([REGISTERED_KEY], default=False):
                raise NotRegisteredError(
                    f"aimss_dask.{fn}: the cluster at {client.scheduler.address} has "
                    "no AIMSS plugin; call `client.register_plugin(aimss_dask.AIMSS())` "
                    "first"
                )
            reply = raise_from_wire(
                sync(client.loop, client.scheduler.aimss_config), "aimss_config"
            )
            cfg = AIMSSConfig.load(**reply["overrides"])
            producer = Producer(
                client.loop,
                client.rpc,
                batch_size=cfg.batch_size,
                max_in_flight=cfg.max_in_flight,
                linger=cfg.linger,
                credentials=dataplane.credentials(
                    cfg.transport, client.scheduler.address, reply.get("secret"), client.connection_args
                ),
                # By weak reference: the producer's threads must not keep a
                # closed client (and, through it, this very entry) alive.
                resolve=functools.partial(_resolve, weakref.ref(client)),
                listed=listed_by(client.scheduler),
                liveness_interval=cfg.liveness_interval,
            )
            _client_producers[client] = producer
            # Seals must also push what this client has buffered: the
            # scheduler asks with an event on SEAL_PRODUCERS_TOPIC. The handler
            # is set before registering, and registering subscribes this
            # client on the scheduler at once: the subscribe message sent here
            # travels on the batched stream and may land after the first seal.
            client.subscribe_topic(
                SEAL_PRODUCERS_TOPIC, functools.partial(_on_seal, client, producer)
            )
            # A worker holding partitions died: requests on their way to it
            # are given up now, not after Dask's connect timeout.
            client.subscribe_topic(OWNER_LOST_TOPIC, functools.partial(_on_owner_lost, producer))
            raise_from_wire(
                sync(client.loop, client.scheduler.aimss_register_producer, client=client.id),
                "aimss_register_producer",
            )
    return Endpoint(
        loop=client.loop,
        scheduler=client.scheduler,
        rpc=client.rpc,
        producer=producer,
        client_id=client.id,
    )


def _resolve(ref: weakref.ref[Client], name: str) -> dict[str, Any]:
    """The coordinator's reply about stream ``name`` (the producer's failover asks, from its thread)."""
    client = ref()
    if client is None:
        raise AIMSSError(f"the client that wrote to stream {name!r} is gone")
    return sync(client.loop, client.scheduler.aimss_get, name=name)


def _on_seal(
    client: Client, producer: Producer, event: tuple[float, SealProducersEvent]
) -> None:
    """Topic handler: push the sealed stream's records, then answer.

    ``event`` is ``(timestamp, msg)``. Every subscriber of the topic gets
    every seal event, so one that does not name this client is not its own.
    """
    try:
        _, msg = event
        if client.id not in msg["clients"]:
            return
        name, epoch, token = msg["name"], msg["epoch"], msg["token"]
    except Exception:
        logger.exception("aimss: malformed %s event %r", SEAL_PRODUCERS_TOPIC, event)
        return

    async def seal_and_answer() -> None:
        try:
            await producer.seal(name, epoch)
        finally:
            await client.scheduler.aimss_producers_sealed(
                token=token, client=client.id, failure=producer.failure(name, epoch)
            )

    # A task, not an await: the client awaits an awaitable handler on its
    # report stream, which must not stall behind a flush.
    task = asyncio.ensure_future(seal_and_answer())
    _seal_tasks.add(task)
    task.add_done_callback(_seal_tasks.discard)


_seal_tasks: set[asyncio.Task[None]] = set()


def _on_owner_lost(producer: Producer, event: tuple[float, OwnerLostEvent]) -> None:
    """Topic handler: ``event``'s worker died; see :meth:`Producer.owner_lost`."""
    try:
        _, msg = event
        producer.owner_lost(str(msg["address"]), int(msg["epoch"]))
    except Exception:
        logger.exception("aimss: could not act on %s event %r", OWNER_LOST_TOPIC, event)
