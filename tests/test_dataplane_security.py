"""Who may use a data plane: the cluster's secret, TLS with the cluster's certificates, and nothing parsed before.

Real sockets against a real :class:`DataServer`; the cluster-level tests are
in ``test_dataplane_cluster.py``.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import ssl
import threading

import dask
import numpy as np
import pytest
from distributed.security import Security

from aimss_dask.log.records import encode
from aimss_dask.transport import dataplane, secure
from aimss_dask.transport.dataplane import BufferPool, DataServer
from aimss_dask.transport.secure import Credentials, HandshakeError


class _Touch:
    """A pickle that, once loaded, creates a file: proof that nothing loaded it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _batch(name, records, partition=0):
    sers = [encode(r, name) for r in records]
    return [(name, 1, partition, [s for s, _ in sers], [n for _, n in sers], None)]


def _tls_pair() -> tuple[Credentials, Credentials, str]:
    """Server and client credentials of one temporary-TLS cluster, and its secret."""
    sec = Security.temporary()
    secret = secure.new_secret()
    server = Credentials.from_connection_args(
        secret, sec.get_connection_args("worker"), sec.get_listen_args("worker")
    )
    client = Credentials.from_connection_args(secret, sec.get_connection_args("client"))
    return server, client, secret


@pytest.fixture(params=["tcp", "tls"])
def served(request):
    """A server, the credentials a member of its cluster has, and what it stored."""
    stored: list = []
    lock = threading.Lock()

    def handler(groups):
        with lock:
            stored.extend(groups)
        return {}

    if request.param == "tls":
        server_creds, client_creds, _ = _tls_pair()
    else:
        server_creds = client_creds = Credentials(secure.new_secret())
    srv = DataServer("127.0.0.1", handler, BufferPool(lambda: 1 << 30), credentials=server_creds)
    yield srv, client_creds, stored, request.param == "tls"
    srv.close()


def _push(srv, creds, tls, records, name="s"):
    sock = secure.connect(srv.address, creds, tls)
    try:
        dataplane.send_buffers(sock, dataplane.encode_batch(_batch(name, records)))
        return dataplane.read_ack(sock)
    finally:
        sock.close()


def test_a_member_of_the_cluster_pushes_and_the_records_arrive_intact(served):
    srv, creds, stored, tls = served
    arrays = [np.arange(n, dtype="f8") for n in (0, 3, 200_000)]
    assert _push(srv, creds, tls, arrays) == {"errors": {}}
    for got, want in zip(stored[0][3], arrays):
        np.testing.assert_array_equal(got, want)
    assert srv.batches == 1


def test_a_wrong_secret_is_refused_logged_and_stores_nothing(served, caplog):
    srv, creds, stored, tls = served
    wrong = Credentials(secure.new_secret(), connect_ssl=creds.connect_ssl)
    with caplog.at_level(logging.WARNING, logger="aimss_dask"):
        with pytest.raises(HandshakeError):
            _push(srv, wrong, tls, [np.ones(4)])
        _wait_for(lambda: any("refused a data connection" in r.getMessage() for r in caplog.records))
    [rec] = [r for r in caplog.records if "refused a data connection" in r.getMessage()]
    assert "wrong cluster secret" in rec.getMessage() and "127.0.0.1" in rec.getMessage()
    assert stored == [] and srv.batches == 0
    # The server goes on serving the cluster's members.
    assert _push(srv, creds, tls, [np.ones(4)]) == {"errors": {}}
    assert len(stored) == 1


def test_a_pickled_header_without_the_handshake_is_never_loaded(served, tmp_path):
    srv, creds, stored, tls = served
    marker = tmp_path / "loaded"
    head = pickle.dumps([_Touch(str(marker))])
    raw = socket.create_connection(srv.address, timeout=10)
    # What an old or hostile client sends: the batch framing with a pickled header.
    try:
        raw.sendall(dataplane._BATCH.pack(len(head), 0) + head)
        try:
            raw.recv(1024)  # the greeting (plain) or a TLS alert
            assert raw.recv(1024) == b""  # then it hangs up
        except (ConnectionResetError, TimeoutError):
            pass
    finally:
        raw.close()
    _wait_for(lambda: srv.refused >= 1)
    assert not marker.exists(), "a header from an unauthenticated peer was unpickled"
    assert stored == []
    assert _push(srv, creds, tls, [np.ones(2)]) == {"errors": {}}


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 3, os.urandom(4096), secure.MAGIC + os.urandom(200)])
def test_garbage_on_the_port_changes_nothing(garbage):
    stored: list = []
    creds = Credentials(secure.new_secret())
    srv = DataServer("127.0.0.1", lambda g: stored.extend(g) or {}, BufferPool(lambda: 1 << 30), credentials=creds)
    try:
        assert _push(srv, creds, False, [np.arange(5)]) == {"errors": {}}
        raw = socket.create_connection(srv.address, timeout=10)
        raw.recv(len(secure.MAGIC) + secure.NONCE)
        try:
            raw.sendall(garbage)
            raw.shutdown(socket.SHUT_WR)
            assert raw.recv(100) == b""  # refused: no proof, no batch answer
        except OSError:
            pass  # refused while we still sent (a reset; then nothing to shut down)
        raw.close()
        _wait_for(lambda: srv.refused == 1)
        assert _push(srv, creds, False, [np.arange(6)]) == {"errors": {}}
    finally:
        srv.close()
    assert [len(g[3][0]) for g in stored] == [5, 6]


def test_a_silent_connection_does_not_hold_up_the_others(monkeypatch):
    monkeypatch.setattr(secure, "HANDSHAKE_TIMEOUT", 0.5)
    creds = Credentials(secure.new_secret())
    srv = DataServer("127.0.0.1", lambda g: {}, BufferPool(lambda: 1 << 30), credentials=creds)
    try:
        silent = socket.create_connection(srv.address)
        assert _push(srv, creds, False, [np.ones(1)]) == {"errors": {}}
        _wait_for(lambda: srv.refused == 1, timeout=5)  # timed out, dropped
        silent.close()
    finally:
        srv.close()


def test_a_plain_client_cannot_reach_a_tls_data_plane(caplog, monkeypatch):
    # A plain client waits for the greeting while the server waits for TLS:
    # both give up at the handshake timeout, which need not be 10 s here.
    monkeypatch.setattr(secure, "HANDSHAKE_TIMEOUT", 1.0)
    server_creds, client_creds, secret = _tls_pair()
    srv = DataServer("127.0.0.1", lambda g: {}, BufferPool(lambda: 1 << 30), credentials=server_creds)
    try:
        with caplog.at_level(logging.WARNING, logger="aimss_dask"):
            # Knowing the secret is not enough without the cluster's certificates.
            with pytest.raises((HandshakeError, OSError)):
                _push(srv, Credentials(secret), False, [np.ones(1)])
            other_cluster = _tls_pair()[1].connect_ssl  # another cluster's certificates
            with pytest.raises((ssl.SSLError, OSError)):
                _push(srv, Credentials(secret, connect_ssl=other_cluster), True, [np.ones(1)])
            _wait_for(lambda: srv.refused >= 2)
        assert srv.batches == 0
        assert _push(srv, client_creds, True, [np.ones(1)]) == {"errors": {}}
    finally:
        srv.close()


def test_a_client_will_not_push_to_a_listener_without_the_secret():
    ours = Credentials(secure.new_secret())
    theirs = Credentials(secure.new_secret())
    stored: list = []
    srv = DataServer("127.0.0.1", lambda g: stored.extend(g) or {}, BufferPool(lambda: 1 << 30), credentials=theirs)
    try:
        with pytest.raises(HandshakeError):
            secure.connect(srv.address, ours, False)
    finally:
        srv.close()
    assert stored == []


def test_credentials_say_which_addresses_they_reach():
    plain = Credentials(secure.new_secret())
    assert plain.serves("tcp://127.0.0.1:1") and not plain.serves("tls://127.0.0.1:1")
    assert not plain.serves("ucx://127.0.0.1:1") and not plain.serves("inproc://x/1/2")
    _, tls, _ = _tls_pair()
    assert tls.serves("tls://127.0.0.1:1")


def _wait_for(predicate, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def _connected(server_creds: Credentials, client_creds: Credentials, tls: bool) -> tuple[secure.Conn, secure.Conn]:
    """Both ends of one data connection, made by the real ``accept`` and ``connect``."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list = []
    thread = threading.Thread(target=lambda: accepted.append(secure.accept(listener.accept()[0], server_creds)))
    thread.start()
    try:
        client = secure.connect(listener.getsockname()[:2], client_creds, tls)
    finally:
        thread.join(timeout=15)
        listener.close()
    return accepted[0], client


def test_a_tls_channel_sends_on_one_thread_while_another_reads():
    """Full duplex over one TLS connection: what an SSLSocket must not do, a TLSChannel does."""
    import hashlib

    server_creds, client_creds, _ = _tls_pair()
    served, conn = _connected(server_creds, client_creds, tls=True)
    chunks, size = 48, 1 << 20
    got = hashlib.sha256()

    def serve():
        buf = memoryview(bytearray(size))
        for i in range(chunks):
            secure.recv_exact(served, buf)
            got.update(buf)
            served.sendall(i.to_bytes(4, "big"))  # an answer per chunk, read while the client still sends
        served.close()

    t = threading.Thread(target=serve)
    t.start()
    answers: list[int] = []

    def read_answers():
        for _ in range(chunks):
            answers.append(int.from_bytes(secure.recv_bytes(conn, 4), "big"))

    reader = threading.Thread(target=read_answers)
    reader.start()
    sent = hashlib.sha256()
    rng = np.random.default_rng(0)
    for _ in range(chunks):
        data = rng.integers(0, 255, size, dtype="u1")
        sent.update(data)
        conn.sendall(memoryview(data))
    reader.join(60)
    t.join(60)
    conn.close()
    assert answers == list(range(chunks))
    assert got.digest() == sent.digest()


def _raw(conn: secure.Conn) -> socket.socket:
    return conn.sock if isinstance(conn, secure.TLSChannel) else conn


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_both_ends_of_a_data_connection_give_up_on_a_peer_silent_past_dasks_tcp_timeout(tls):
    """A host that vanishes sends no reset: the kernel must fail an idle connection to it, after Dask's own timeout."""
    if tls:
        server_creds, client_creds, _ = _tls_pair()
    else:
        server_creds = client_creds = Credentials(secure.new_secret())
    with dask.config.set({"distributed.comm.timeouts.tcp": "20s"}):
        ends = _connected(server_creds, client_creds, tls)
    try:
        for end, user_timeout in zip(map(_raw, ends), [20_000, 0]):
            assert end.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                # Not on the writer's end: with it, a receiver that reads
                # nothing for that long (back-pressure, a stopped owner) would
                # fail its writers. On the server's end, which sends only
                # acks, it frees a thread whose writer's node vanished just
                # after an ack (a send unanswered, so keep-alive is off).
                assert end.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == user_timeout
            if hasattr(socket, "TCP_KEEPIDLE"):  # the probes of an idle connection end within it too
                idle = end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                interval = end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
                probes = end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
                assert idle + interval * probes == 20, (idle, interval, probes)
        # The options change nothing for a live peer.
        ends[1].sendall(b"ping")
        assert secure.recv_bytes(ends[0], 4) == b"ping"
    finally:
        for end in ends:
            end.close()


def test_a_timeout_of_zero_leaves_the_connection_as_the_platform_made_it():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()[:2]) as sock:
            secure.watch_peer(sock, 0)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
            secure.watch_peer(sock, 30)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_writer_that_reads_no_acks_for_longer_than_the_timeout_keeps_its_connection(tls):
    """The server's end fails once its acks go unacknowledged past the timeout: a writer paused
    that long (its kernel still acknowledging) must not lose its connection for that."""
    import time

    if tls:
        server_creds, client_creds, _ = _tls_pair()
    else:
        server_creds = client_creds = Credentials(secure.new_secret())
    with dask.config.set({"distributed.comm.timeouts.tcp": "2s"}):
        served, writer = _connected(server_creds, client_creds, tls)
    try:
        # Many more acks than a producer ever leaves unread (max_in_flight per connection).
        for i in range(64):
            writer.sendall(i.to_bytes(4, "big"))
            assert int.from_bytes(secure.recv_bytes(served, 4), "big") == i
            served.sendall(b"ack:" + i.to_bytes(4, "big"))
        time.sleep(4)  # twice the timeout with every ack unread
        for i in range(64):
            assert secure.recv_bytes(writer, 8) == b"ack:" + i.to_bytes(4, "big")
        writer.sendall(b"more")
        assert secure.recv_bytes(served, 4) == b"more"
        served.sendall(b"done")
        assert secure.recv_bytes(writer, 4) == b"done"
    finally:
        served.close()
        writer.close()
