"""The data plane: batches of records over a socket of their own into pooled buffers.

Dask's comms allocate a fresh buffer for every frame they receive, and on
this kind of VM the first write to fresh pages costs more than the copy
itself (see REFERENCE.md: TCP into a fresh buffer runs at ~1 GB/s, into a
touched one at ~2.4 GB/s). Records pushed to an owner are kept in its log, so
the owner receives them straight into buffers from a :class:`BufferPool`:
memory the worker has already touched, handed back to the pool once no record
(stored or being read) refers to it any more.

A connection first proves that both ends belong to the cluster (its secret,
and TLS with its certificates on a TLS cluster: :mod:`aimss_dask.transport.secure`);
nothing is parsed before. Then the wire format of one batch, sender to owner::

    !QQ (header bytes, payload bytes) | pickle(header) | payload frames ...

where ``header`` is ``[[stream, epoch, partition, [(record header, [frame
lengths])...], [record sizes], origin, (writer, at)], ...]``: one entry per
group, ``origin`` the group's ``(input, attempt, seq)`` tuple or ``None`` (a
plain write; see :class:`~aimss_dask.core.specs.Origin`), and the two
optional last fields those of a replicated stream (see :data:`Group`). The owner answers each batch, in
order, with ``!Q`` + ``pickle({"errors": {stream: (class, message)}})``.
``tcp://`` and ``tls://`` clusters use it; other transports (UCX, in-process)
keep Dask's comms (see :class:`aimss_dask.transport.producer.Producer`).
"""

from __future__ import annotations

import logging
import pickle
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from distributed.protocol import Serialized, deserialize
from distributed.utils import ensure_memoryview

from aimss_dask.transport import secure
from aimss_dask.transport.secure import Conn, Credentials, recv_bytes, recv_exact

logger = logging.getLogger("aimss_dask")

_BATCH = struct.Struct("!QQ")
_ACK = struct.Struct("!Q")
#: Pool buffers are rounded up to this, so batches of varying size reuse them.
_GRAIN = 2**20
#: sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
_MAX_IOV = 512
#: A batch header larger than this is refused (a header names records, it does not hold them).
MAX_HEADER = 256 * 2**20
#: Over TLS (no sendmsg), buffers smaller than this are joined before they are sent.
_COALESCE = 256 * 2**10

#: One group of a batch: ``(stream, epoch, partition, records, record sizes,
#: origin[, writer[, at]])``, ``origin`` an ``(input, attempt, seq)`` tuple or
#: ``None``. The origin goes as a plain tuple, not an ``Origin``: pickling a
#: dataclass names its class in every header, and the owner checks the fields
#: anyway. Only groups of replicated streams carry the last two:
#: ``writer``, ``(producer id, sequence number of the first record)``, lets an
#: owner drop records a writer sends again after their first owner died
#: (:mod:`aimss_dask.node.writers`); ``at``, the offset of the first record on
#: the owner, marks a copy the owner sends to a replica. On the receiving
#: side only: a copy's records arrive as ``Serialized`` (the log decodes
#: them when first read), and a replicated stream's group from a writer
#: gets a ninth field, the records' ``Serialized`` wire forms, which its
#: owner forwards to the replicas without encoding them again.
Group = tuple[Any, ...]

#: ``(groups) -> {stream: (error class, message)}``: store one decoded batch.
BatchHandler = Callable[[list[Group]], dict[str, tuple[str, str]]]


def carries(transport: str, address: str) -> bool:
    """Whether pushes to the worker at ``address`` travel over the data plane, ``aimss.transport`` being ``transport``.

    TCP and TLS: other comms (UCX, in-process) go over Dask's; ``"dask"``
    turns the data plane off.

    >>> carries("auto", "tcp://10.0.0.1:8786"), carries("auto", "tls://h:1"), carries("dask", "tcp://h:1")
    (True, True, False)
    >>> carries("auto", "inproc://10.0.0.1/1/2")
    False
    """
    return transport != "dask" and address.startswith(("tcp://", "tls://"))


def credentials(
    transport: str,
    address: str,
    secret: str | None,
    connection_args: dict[str, Any],
    listen_args: dict[str, Any] | None = None,
) -> Credentials | None:
    """A process's data-plane credentials; None where its pushes take Dask's comms.

    ``address``: the process's own (a worker's) or its scheduler's (a
    client's); ``connection_args``/``listen_args``: Dask's for it (the
    ``ssl`` contexts on a TLS cluster). None without a secret (a worker
    plugin pickled without one) or where the data plane does not carry.
    """
    if secret is None or not carries(transport, address):
        return None
    return Credentials.from_connection_args(secret, connection_args, listen_args)


#: Bytes of the buffers that a connection's batches fill one after another
#: (:meth:`BufferPool.take_for`); batches over half of it get their own.
CHUNK = 8 * 2**20

#: Where each batch starts in a chunk: a multiple of this (NumPy's widest alignment).
_ALIGN = 64


class BufferPool:
    """Receive buffers that are reused once nothing refers to them.

    A buffer is free when its only references are the pool's own: records
    are NumPy views into it, so while one is stored in the log or held by a
    reader, CPython's reference count says so. ``idle_limit`` bounds the bytes
    of free buffers kept (the rest go back to the OS).

    Batches received on one connection go one after another into buffers of
    one size, ``chunk`` (:meth:`take_for`): any free chunk serves any batch,
    so a worker that received as much before allocates nothing new. Buffers
    sized to each batch, by contrast, kept missing the batch at hand (a
    4 MiB batch, only 2 and 3 MiB buffers free) for several runs.
    """

    def __init__(self, idle_limit: Callable[[], int], chunk: int = CHUNK) -> None:
        self._buffers: list[np.ndarray] = []
        self._idle_limit = idle_limit
        self.chunk = chunk
        self._lock = threading.Lock()
        #: key -> (id of the chunk it fills, where its next batch goes). Only
        #: ids of buffers in ``_buffers`` not handed to anyone else since:
        #: an entry goes whenever its buffer is taken or dropped.
        self._filling: dict[Any, tuple[int, int]] = {}
        # The count of a buffer only the pool refers to, measured through the
        # very code path take() uses (no other name may refer to the probe).
        self._buffers.append(np.empty(1, dtype="u1"))
        self._free_refs = self._refs(0)
        self._buffers.clear()

    def _refs(self, i: int) -> int:
        return sys.getrefcount(self._buffers[i])

    def take_for(self, key: Any, n: int) -> memoryview:
        """``n`` bytes for a batch of ``key`` (a connection), right after its previous batch.

        In the chunk its previous batch went to, where it fits (from the
        start again once nothing refers to that chunk), else in a free
        chunk or a new one. Over half a chunk: a buffer of its own
        (:meth:`take`). Call :meth:`forget` once ``key`` is done.
        """
        if n > self.chunk // 2:
            return memoryview(self.take(n))[:n]
        with self._lock:
            place = self._filling.get(key)
            if place is not None:
                for i in range(len(self._buffers)):
                    if id(self._buffers[i]) != place[0]:
                        continue
                    at = 0 if self._refs(i) <= self._free_refs else place[1]
                    if self._buffers[i].nbytes - at >= n:
                        self._filling[key] = (place[0], -(-(at + n) // _ALIGN) * _ALIGN)
                        return memoryview(self._buffers[i])[at : at + n]
                    break
            buf = self._take(self.chunk)
            self._filling[key] = (id(buf), -(-n // _ALIGN) * _ALIGN)
            return memoryview(buf)[:n]

    def forget(self, key: Any) -> None:
        """``key`` takes no more: its chunk is just a buffer again."""
        with self._lock:
            self._filling.pop(key, None)

    def take(self, n: int) -> np.ndarray:
        """A buffer of at least ``n`` bytes, reused if one is free."""
        with self._lock:
            return self._take(n)

    def _handed(self, buf: np.ndarray) -> None:
        """``buf`` was handed out or dropped: whoever filled it does not go on (hold the lock).

        An id is an address: one dropped may come back as another buffer's.
        """
        if self._filling:
            ident = id(buf)
            for key in [k for k, (b, _) in self._filling.items() if b == ident]:
                del self._filling[key]

    def _take(self, n: int) -> np.ndarray:
        """:meth:`take` (hold the lock)."""
        best = -1
        idle = 0
        for i in range(len(self._buffers)):
            if self._refs(i) > self._free_refs:
                continue
            size = self._buffers[i].nbytes
            idle += size
            if size >= n and (best < 0 or size < self._buffers[best].nbytes):
                best = i
        if best >= 0:
            buf = self._buffers[best]
            idle -= buf.nbytes
        else:
            buf = np.empty(-(-max(n, 1) // _GRAIN) * _GRAIN, dtype="u1")
            self._buffers.append(buf)
        self._handed(buf)
        self._shrink(idle)
        return buf

    def _shrink(self, idle: int, limit: int | None = None) -> int:
        """Drop free buffers until at most ``limit`` (default: the pool's own)
        of the ``idle`` bytes remain; the bytes dropped. Hold the lock."""
        limit = self._idle_limit() if limit is None else limit
        dropped = 0
        i = 0
        while idle - dropped > limit and i < len(self._buffers):
            if self._refs(i) <= self._free_refs:
                dropped += self._buffers[i].nbytes
                self._handed(self._buffers[i])
                del self._buffers[i]
            else:
                i += 1
        return dropped

    def _idle_bytes(self) -> int:
        # Indexing, not iterating: a loop variable would be one more
        # reference and make every buffer look in use. Hold the lock.
        return sum(
            self._buffers[i].nbytes
            for i in range(len(self._buffers))
            if self._refs(i) <= self._free_refs
        )

    def array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised array on a pooled buffer (free again once unreferenced)."""
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        return self.take(n)[:n].view(dt).reshape(shape)

    def trim(self) -> int:
        """Give free buffers beyond the idle limit back to the OS; the bytes released.

        ``take`` does this as it goes; call it when takes have stopped for a
        while (an operator's map phase is over) but buffers freed since.
        """
        with self._lock:
            return self._shrink(self._idle_bytes())

    def release_idle(self) -> int:
        """Give every free buffer back to the OS; the bytes released.

        Reuse only pays while data flows: once no stream is open, idle
        buffers are RSS nobody is using (and the next run, or another
        library's work, would be charged for them).
        """
        with self._lock:
            return self._shrink(self._idle_bytes(), 0)

    def statistics(self) -> dict[str, int]:
        with self._lock:
            total = sum(b.nbytes for b in self._buffers)
            free = self._idle_bytes()
        return {"pool_bytes": total, "pool_free_bytes": free}

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._filling.clear()


def send_buffers(sock: Conn, buffers: Sequence[memoryview]) -> None:
    """``sendall`` for a list of buffers, zero-copy (scatter/gather) on plain sockets."""
    views = [b for b in buffers if b.nbytes]
    if not isinstance(sock, socket.socket):
        _send_tls(sock, views)
        return
    while views:
        chunk = views[:_MAX_IOV]
        sent = sock.sendmsg(chunk)
        # Drop what went out; keep the unsent tail of a partly sent buffer.
        while sent and views:
            head = views[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                views.pop(0)
            else:
                views[0] = head[sent:]
                sent = 0


def _send_tls(sock: Conn, views: list[memoryview]) -> None:
    # TLS has no sendmsg: one sendall per large buffer (OpenSSL encrypts from
    # it directly), small ones joined first so each is not a record of its own.
    small: list[memoryview] = []
    pending = 0
    for v in views:
        if v.nbytes < _COALESCE:
            small.append(v)
            pending += v.nbytes
            if pending < _COALESCE:
                continue
        if small:
            sock.sendall(b"".join(small))
            small, pending = [], 0
        if v.nbytes >= _COALESCE:
            sock.sendall(v)
    if small:
        sock.sendall(b"".join(small))


def encode_batch(groups: Sequence[Group]) -> list[memoryview]:
    """Header and frames of a batch; ``Serialized`` records, frames by reference."""
    header: list[Any] = []
    frames: list[memoryview] = []
    for name, epoch, partition, records, sizes, origin, *rest in groups:
        recs = []
        for ser in records:
            fr = [ensure_memoryview(f) for f in ser.frames]
            frames.extend(fr)
            recs.append((ser.header, [f.nbytes for f in fr]))
        header.append((name, epoch, partition, recs, list(sizes), origin, *rest))
    head = pickle.dumps(header, protocol=5)
    payload = sum(f.nbytes for f in frames)
    return [memoryview(_BATCH.pack(len(head), payload)), memoryview(head), *frames]


def read_ack(sock: Conn) -> dict[str, Any]:
    (n,) = _ACK.unpack(recv_bytes(sock, _ACK.size))
    return pickle.loads(recv_bytes(sock, n))


class DataServer:
    """A worker's listener for pushed batches: one thread per producer connection.

    It listens on ``host`` only (the worker's own interface), and a
    connection carries batches only once its peer has proven, with
    ``credentials``, that it belongs to the cluster (:func:`secure.accept`).
    ``batches`` counts the batches received, ``refused`` the connections
    turned away.
    """

    def __init__(
        self,
        host: str,
        handler: BatchHandler,
        pool: BufferPool,
        own_copies: Callable[[int], bool] | None = None,
        *,
        credentials: Credentials,
    ) -> None:
        self._handler = handler
        self._credentials = credentials
        self.batches = 0
        self.refused = 0
        self._pool = pool
        # Asked per batch (with its payload size): store records as copies
        # of their own instead of views into the shared receive buffer.
        self._own_copies = own_copies
        self._sock = socket.create_server((host, 0))
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="aimss-data-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="aimss-data-recv", daemon=True
            ).start()

    def _admit(self, conn: socket.socket) -> Conn | None:
        """The connection to serve once its peer proved itself; None (logged) when it did not."""
        try:
            peer = conn.getpeername()
        except OSError:
            peer = ("?", 0)
        try:
            served = secure.accept(conn, self._credentials)
        except (OSError, ValueError) as e:  # HandshakeError, SSLError, a timeout
            with self._lock:
                self.refused += 1
            if not self._closed:
                logger.warning(
                    "aimss: refused a data connection from %s:%s: %s", peer[0], peer[1], str(e) or type(e).__name__
                )
            return None
        served.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return served

    def _serve(self, raw: socket.socket) -> None:
        # ``raw`` stays in _conns: shutting it down ends a TLS channel over it too.
        conn = self._admit(raw)
        head = bytearray(_BATCH.size)
        key = object()  # this connection's place in the pool's chunks
        try:
            while conn is not None and not self._closed:
                k = conn.recv_into(head)
                if not k:
                    return  # producer closed the connection between batches
                if k < _BATCH.size:
                    recv_exact(conn, memoryview(head)[k:])
                hlen, plen = _BATCH.unpack(head)
                if hlen > MAX_HEADER:
                    raise ConnectionError(f"a batch header of {hlen} bytes (at most {MAX_HEADER})")
                # The peer proved it holds the cluster's secret: its header is trusted like Dask's comms.
                header = pickle.loads(recv_bytes(conn, hlen))
                errors = self._receive(conn, header, plen, key)
                reply = pickle.dumps({"errors": errors})
                conn.sendall(_ACK.pack(len(reply)) + reply)
        except (OSError, ConnectionError, EOFError) as e:
            if not self._closed:
                logger.info("aimss: data connection closed: %s", e)
        finally:
            self._pool.forget(key)
            with self._lock:
                self._conns.discard(raw)
            (conn or raw).close()

    def _receive(self, conn: Conn, header: list[Any], plen: int, key: Any) -> dict[str, tuple[str, str]]:
        """Read one batch's payload into pool memory (after ``key``'s previous batch) and store its records."""
        view = self._pool.take_for(key, plen)
        recv_exact(conn, view)
        with self._lock:
            self.batches += 1
        # A view pins its whole receive buffer: once the log may spill, a
        # spilled record would free nothing while any other record of its
        # batch stays in memory. Then each record gets memory of its own
        # (one copy), and the buffer is free again as soon as we return.
        copy = self._own_copies is not None and self._own_copies(plen)
        groups = []
        refused: dict[str, tuple[str, str]] = {}
        pos = 0
        for name, epoch, partition, recs, sizes, origin, *rest in header:
            # A copy from a partition's owner (``at`` given) is stored as it
            # came: a replica's records are read only once it takes over,
            # which is rare, so decoding each on arrival is wasted work.
            # Groups of a replicated stream keep their wire form next to
            # their records: the owner forwards it to the replicas as it is.
            as_sent = len(rest) > 1 and rest[1] is not None
            wire: list[Serialized] | None = [] if rest and not as_sent else None
            records = []
            for rheader, lengths in recs:
                frames = []
                for n in lengths:
                    frame = view[pos : pos + n]
                    frames.append(memoryview(bytearray(frame)) if copy else frame)
                    pos += n
                if as_sent:
                    records.append(Serialized(rheader, frames))
                    continue
                if wire is not None:
                    wire.append(Serialized(rheader, frames))
                try:
                    records.append(deserialize(rheader, frames))
                except Exception as e:
                    # A record this worker cannot read back (its type's module
                    # is missing here): that stream's writes are refused, not
                    # stored, and the batch's others go on; the connection stays.
                    refused.setdefault(name, (
                        "RecordNotSerializableError",
                        f"a record of stream {name!r} could not be read back on its owner "
                        f"({type(e).__name__}: {e}); the records were not stored",
                    ))
            if wire is not None:
                rest = [rest[0], None, wire]
            groups.append((name, epoch, partition, records, sizes, origin, *rest))
        # A stream refused in any group of the batch is refused in all of them.
        groups = [g for g in groups if g[0] not in refused]
        try:
            return {**self._handler(groups), **refused}
        except Exception as e:  # a bug: answer anyway, so the producer never hangs
            logger.exception("aimss: storing a pushed batch failed")
            return {**{g[0]: ("AIMSSError", f"{type(e).__name__}: {e}") for g in groups}, **refused}

    def close(self) -> None:
        """Stop accepting and drop every connection; safe to call twice."""
        self._closed = True
        try:
            # Closing alone leaves a thread blocked in accept() there, and the
            # kernel's listening socket with it: shutting it down wakes it.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
