"""Who may use a worker's data plane: the cluster's secret, over TLS where the cluster has it.

A worker's data plane is a socket of its own, outside Dask's comms, and the
batches it receives carry serialised records. So nothing a peer sends is
parsed before the peer has proven that it belongs to the cluster:

1. On a TLS cluster the socket is wrapped first, server and client side, with
   the very ``ssl`` contexts Dask's :class:`~distributed.security.Security`
   gives the worker (or client): the cluster's certificates, verified both
   ways. A peer without them fails the TLS handshake.
2. Then, on every cluster, a challenge-response over the per-cluster secret
   the coordinator hands the workers and its clients (HMAC-SHA256 over fresh
   nonces from both ends): the connecting side proves it holds the secret,
   then the listening side proves it too, so a producer never sends records
   to a process that merely took over a worker's port.

Wire format of the handshake (fixed sizes; nothing here is unpickled)::

    server -> client: MAGIC | server nonce (32)
    client -> server: MAGIC | client nonce (32) | HMAC(secret, b"client" | s | c)
    server -> client: HMAC(secret, b"server" | c | s)

A TLS connection is a :class:`TLSChannel`: OpenSSL forbids reading and
writing one connection from two threads at once, and a producer sends
batches from one thread while another reads their answers.

The secret authenticates; it does not hide the records. On plain TCP anyone
who can watch the network sees the data (as with Dask's own comms): use TLS
(``security=True`` in dask-jobqueue) where that matters.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Union

import dask
from dask.utils import parse_timedelta

logger = logging.getLogger("aimss_dask")

MAGIC = b"AIMSSDP1"
NONCE = 32
_MAC = hashlib.sha256().digest_size
#: Longest a peer may take to prove itself (a silent connection holds a thread until then).
HANDSHAKE_TIMEOUT = 10.0


#: Plaintext bytes encrypted per step of a TLS send (the lock is held that
#: long). Small enough that each step's ciphertext, a new bytes object, comes
#: from the allocator's heap: larger ones are fresh pages every time, and
#: faulting them in cost more than the encryption.
_TLS_STEP = 1 << 16
#: Ciphertext bytes read from the socket at once (into one reused buffer).
_TLS_READ = 1 << 18


class HandshakeError(ConnectionError):
    """A data connection whose peer did not prove that it belongs to the cluster."""


class TLSChannel:
    """TLS over a blocking socket, safe for one thread that reads while another writes.

    OpenSSL's connection objects must not be used from two threads at once
    (an ``ssl.SSLSocket`` read in one thread and written in another can
    fail or crash). Here OpenSSL only ever works on memory buffers, under a
    lock, and the socket I/O happens outside it: the sender encrypts a step
    and sends it while the reader waits on the socket. Offers the socket
    methods the data plane uses.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool, server_hostname: str | None = None) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self._ssl = threading.Lock()
        self._rbuf = memoryview(bytearray(_TLS_READ))
        # Held from encrypting to sending, so ciphertext leaves in the order made.
        self._send = threading.Lock()
        while True:
            try:
                with self._ssl:
                    self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
        self._flush()

    def _flush(self) -> None:
        with self._send:
            with self._ssl:
                data = self._out.read()
            if data:
                self.sock.sendall(data)

    def _feed(self) -> bool:
        """More ciphertext from the socket; False at its end."""
        k = self.sock.recv_into(self._rbuf)
        with self._ssl:
            if k:
                self._in.write(self._rbuf[:k])
            else:
                self._in.write_eof()
        return bool(k)

    def sendall(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        with self._send:
            while view.nbytes:
                with self._ssl:
                    n = self._obj.write(view[:_TLS_STEP])
                    out = self._out.read()
                self.sock.sendall(out)
                view = view[n:]

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        n = nbytes or view.nbytes
        if not n:
            return 0
        while True:
            got: int | None = None
            with self._ssl:
                # As many records as are here, under one hold of the lock
                # (OpenSSL returns one record, at most 16 KiB, per read).
                done = 0
                while done < n:
                    try:
                        k = self._obj.read(n - done, view[done:])
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:
                        got = done  # the peer closed TLS cleanly
                        break
                    if not k:
                        break
                    done += k
                if done:
                    got = done
                pending = self._out.pending
            # What reading made OpenSSL answer (a key update). Not waiting
            # for a sender blocked on a full socket (its peer may be waiting
            # for us to read): it sends these bytes with its next step.
            if pending and self._send.acquire(blocking=False):
                try:
                    with self._ssl:
                        data = self._out.read()
                    if data:
                        self.sock.sendall(data)
                finally:
                    self._send.release()
            if got is not None:
                return got
            if not self._feed():
                with self._ssl:
                    try:
                        return self._obj.read(n, view)
                    except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                        return 0

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.recv_into(buf)
        return bytes(buf[:got])

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def setsockopt(self, *args: Any) -> None:
        self.sock.setsockopt(*args)

    def getpeername(self) -> Any:
        return self.sock.getpeername()

    def shutdown(self, how: int) -> None:
        # The socket's, not TLS's: another thread may be inside a read.
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()


#: A data connection: a plain socket, or TLS over one.
Conn = Union[socket.socket, TLSChannel]


def new_secret() -> str:
    """A fresh per-cluster secret (hex, so it travels in any message format).

    >>> len(new_secret())
    64
    """
    return secrets.token_hex(32)


@dataclass(frozen=True)
class Credentials:
    """What one process needs to use the data plane of its cluster.

    ``secret``: the coordinator's per-cluster secret (hex). ``listen_ssl`` /
    ``connect_ssl``: Dask's server and client ``ssl`` contexts on a TLS
    cluster, None on plain TCP.

    >>> c = Credentials(new_secret())
    >>> c.serves("tcp://10.0.0.1:8786"), c.serves("tls://10.0.0.1:8786")
    (True, False)
    """

    secret: str
    listen_ssl: ssl.SSLContext | None = None
    connect_ssl: ssl.SSLContext | None = None

    def serves(self, address: str) -> bool:
        """Whether a peer at ``address`` (a Dask address) can be reached on the data plane with these credentials."""
        if address.startswith("tcp://"):
            return True
        return address.startswith("tls://") and self.connect_ssl is not None

    @classmethod
    def from_connection_args(cls, secret: str, connection_args: dict[str, Any], listen_args: dict[str, Any] | None = None) -> Credentials:
        """Credentials from Dask's ``get_connection_args`` / ``get_listen_args`` dicts (``ssl_context`` keys)."""
        return cls(
            secret,
            listen_ssl=(listen_args or {}).get("ssl_context"),
            connect_ssl=connection_args.get("ssl_context"),
        )

    @property
    def _key(self) -> bytes:
        return bytes.fromhex(self.secret)


def _mac(key: bytes, role: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(key, role + a + b, hashlib.sha256).digest()


def recv_exact(sock: Conn, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ``ConnectionError`` if the peer closes first."""
    got = 0
    n = view.nbytes
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError(f"peer closed the data connection after {got} of {n} bytes")
        got += k


def recv_bytes(sock: Conn, n: int) -> bytes:
    """The next ``n`` bytes from ``sock``; ``ConnectionError`` if the peer closes first."""
    buf = bytearray(n)
    recv_exact(sock, memoryview(buf))
    return bytes(buf)


def _recv(sock: Conn, n: int) -> bytes:
    try:
        return recv_bytes(sock, n)
    except ConnectionError as e:
        raise HandshakeError(f"during the handshake: {e}") from e


def tcp_timeout() -> float:
    """Seconds after which a silent peer counts as gone: Dask's ``distributed.comm.timeouts.tcp`` (30 s)."""
    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.tcp", "30s"), default="seconds") or 0)


def watch_peer(sock: Conn, timeout: float | None = None, *, answers_only: bool = False) -> None:
    """Make the kernel fail ``sock`` once its peer's host is silent ``timeout`` s (default :func:`tcp_timeout`).

    A data connection blocks without a timeout (a batch may wait long for
    its receiver's budget), and a peer whose host vanished (power, network:
    no reset ever comes) would hold a thread reading from it for good.
    Keep-alive probes, timed as Dask times its comms', find a silent host
    behind an idle connection (one with data unanswered fails after the
    kernel's retransmissions, minutes).

    Unlike Dask's comms, no ``TCP_USER_TIMEOUT``: with it, the kernel also
    fails a connection whose receiver has read nothing for that long, its
    window shut while its host answers every probe. That is back-pressure,
    or an owner stopped for a while (a long pause, a task holding the GIL):
    waiting on it is right, and failing would call records lost that the
    owner stores once it runs again. A sender waiting on a host that
    vanished is freed once the scheduler removes the worker
    (:mod:`aimss_dask.transport.liveness`).

    ``answers_only``: ``sock`` sends nothing but short answers its peer
    always reads (a data server's acks), so its peer's window never shuts
    and ``TCP_USER_TIMEOUT`` only fails it once the peer's host stopped
    acknowledging: an answer sent just before a producer's node vanished
    then fails the server thread after ``timeout`` instead of the kernel's
    retransmissions (minutes), which keep-alive does not shorten. Options
    the platform lacks are left out; a timeout of 0 or less changes nothing.
    """
    timeout = tcp_timeout() if timeout is None else timeout
    if timeout <= 0:
        return
    t = max(2, int(timeout))
    probes = min(10, t // 2)
    interval = max(1, (t - max(1, t // 4)) // probes)
    idle = max(1, t - interval * probes)
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), interval),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), probes),
    ]
    if answers_only:
        options.append((socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), int(timeout * 1000)))
    for level, option, value in options:
        if option is None:
            continue
        try:
            sock.setsockopt(level, option, value)
        except OSError as e:  # an option this kernel refuses: the others still help
            logger.debug("data connection: could not set socket option %s=%s: %s", option, value, e)


def accept(conn: socket.socket, creds: Credentials) -> Conn:
    """The server side of a new connection: TLS (if the cluster has it), then the secret.

    Returns the socket to use (the TLS one on a TLS cluster), blocking again.
    Raises :class:`HandshakeError` (or ``ssl.SSLError``/``OSError``) for a
    peer that did not prove itself; the caller closes ``conn`` then.
    """
    conn.settimeout(HANDSHAKE_TIMEOUT)
    if creds.listen_ssl is not None:
        conn = TLSChannel(conn, creds.listen_ssl, server_side=True)
    ours = secrets.token_bytes(NONCE)
    conn.sendall(MAGIC + ours)
    hello = _recv(conn, len(MAGIC) + NONCE + _MAC)
    if hello[: len(MAGIC)] != MAGIC:
        raise HandshakeError("not an AIMSS data-plane client (wrong greeting)")
    theirs = hello[len(MAGIC) : len(MAGIC) + NONCE]
    if theirs == ours:
        raise HandshakeError("the peer echoed our nonce")
    key = creds._key
    if not hmac.compare_digest(hello[len(MAGIC) + NONCE :], _mac(key, b"client", ours, theirs)):
        raise HandshakeError("wrong cluster secret")
    conn.sendall(_mac(key, b"server", theirs, ours))
    conn.settimeout(None)
    watch_peer(conn, answers_only=True)  # a data server sends acks alone
    return conn


def connect(address: tuple[str, int], creds: Credentials, tls: bool) -> Conn:
    """A data connection to ``address``, authenticated both ways; ``tls``: the peer is on a TLS cluster.

    Raises :class:`HandshakeError` when the listener does not prove that it
    holds the cluster's secret (a stale address whose port another process
    took), ``OSError`` when it cannot be reached.
    """
    if tls and creds.connect_ssl is None:
        raise HandshakeError(f"{address[0]}:{address[1]} is on a TLS cluster and this process has no TLS context")
    raw = socket.create_connection(address, timeout=HANDSHAKE_TIMEOUT)
    sock: Conn = raw
    try:
        if tls:
            assert creds.connect_ssl is not None
            sock = TLSChannel(raw, creds.connect_ssl, server_side=False, server_hostname=address[0])
        hello = _recv(sock, len(MAGIC) + NONCE)
        if hello[: len(MAGIC)] != MAGIC:
            raise HandshakeError(f"{address[0]}:{address[1]} is not an AIMSS data plane")
        theirs = hello[len(MAGIC) :]
        ours = secrets.token_bytes(NONCE)
        key = creds._key
        sock.sendall(MAGIC + ours + _mac(key, b"client", theirs, ours))
        proof = _recv(sock, _MAC)
        if not hmac.compare_digest(proof, _mac(key, b"server", ours, theirs)):
            raise HandshakeError(f"{address[0]}:{address[1]} does not hold this cluster's secret")
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        watch_peer(sock)
        return sock
    except BaseException:
        raw.close()
        raise
