"""The data plane of a real cluster, on TCP and on TLS: pushes take it, strangers on its port change nothing."""

from __future__ import annotations

import errno
import pickle
import socket

import numpy as np
import pytest
from conftest import unique_name, wait_until
from distributed import Client

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.core.names import SECRET_KEY
from aimss_dask.transport import dataplane, secure
from aimss_dask.transport.secure import Credentials, HandshakeError

#: Every test here runs on a TCP and on a TLS cluster (conftest).
ALSO_TLS = True


class _Touch:
    """A pickle that creates a file when loaded: proof that nothing loaded it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _data_server(dask_worker):
    srv = dask_worker.plugins["aimss"].data_server
    return None if srv is None else {"address": srv.address, "batches": srv.batches, "refused": srv.refused}


def _capture_log(dask_worker, on: bool = True):
    """Collect (on) or return and stop collecting (off) this worker's ``aimss_dask`` log messages."""
    import logging

    log = logging.getLogger("aimss_dask")
    if on:
        class Keep(logging.Handler):
            def emit(self, record):
                self.lines.append(record.getMessage())

        handler = Keep(logging.WARNING)
        handler.lines = []
        log.addHandler(handler)
        dask_worker._aimss_test_handler = handler
        return None
    handler = dask_worker._aimss_test_handler
    log.removeHandler(handler)
    return handler.lines


def _write_from_a_task(name: str, n: int) -> int:
    s = aimss_dask.get_stream(name)
    for i in range(n):
        s.write(np.full(1000, i, dtype="i8"), partition=i % 2)
    s.flush()
    return n


def _records(name: str) -> list[int]:
    return sorted(int(r[0]) for r in aimss_dask.get_stream(name).read())


def test_pushes_travel_the_data_plane_from_workers_and_the_client(client: Client):
    scheme = next(iter(listed_workers(client))).split("://")[0]
    name = unique_name("dp")
    s = aimss_dask.create_stream(name, partitions=2)
    before = client.run(_data_server)
    assert all(v is not None for v in before.values()), f"{scheme}: a worker without a data plane: {before}"
    for addr, v in before.items():
        # Listening on the worker's own interface, not on every one.
        assert v["address"][0] == addr.split("://")[1].rsplit(":", 1)[0] != "0.0.0.0"
    for i in range(40, 60):
        s.write(np.full(1000, i, dtype="i8"), partition=i % 2)
    s.flush()
    assert client.submit(_write_from_a_task, name, 40, pure=False).result() == 40
    s.seal()
    assert _records(name) == list(range(60))
    after = client.run(_data_server)
    received = sum(after[a]["batches"] - before[a]["batches"] for a in after)
    # Both partitions' owners got batches over the data plane (not Dask's comms).
    assert received >= 2, f"{scheme}: pushes took Dask's comms ({before} -> {after})"


def test_strangers_on_the_data_port_change_nothing(client: Client, tmp_path):
    name = unique_name("dp")
    s = aimss_dask.create_stream(name, partitions=2)
    for i in range(10):
        s.write(np.full(1000, i, dtype="i8"), partition=i % 2)
    s.seal()
    servers = client.run(_data_server)
    client.run(_capture_log)
    tls = next(iter(servers)).startswith("tls://")
    marker = tmp_path / "unpickled"
    bomb = pickle.dumps([_Touch(str(marker))])
    wrong = Credentials(secure.new_secret(), connect_ssl=client.connection_args.get("ssl_context"))
    for v in servers.values():
        host, port = v["address"]
        # Garbage, then a batch with a pickled header and no handshake.
        for payload in (b"\xde\xad" * 500, dataplane._BATCH.pack(len(bomb), 0) + bomb):
            with socket.create_connection((host, port), timeout=10) as raw:
                try:
                    raw.sendall(payload)
                    raw.shutdown(socket.SHUT_WR)
                    while raw.recv(4096):
                        pass  # a greeting at most, then it hangs up
                except (ConnectionError, TimeoutError):
                    pass
                except OSError as e:
                    # It may hang up before this side is done sending.
                    if e.errno != errno.ENOTCONN:
                        raise
        # A client that knows the protocol (and on TLS has the certificates) but not the secret.
        with pytest.raises((HandshakeError, OSError)):
            secure.connect((host, port), wrong, tls=tls)
    wait_until(
        lambda: all(v["refused"] >= 3 for v in client.run(_data_server).values()),
        what="every worker refused the three strangers",
    )
    assert not marker.exists(), "a worker unpickled a header from an unauthenticated peer"
    assert _records(name) == list(range(10))  # the stored data is intact
    logs = client.run(_capture_log, on=False)
    for addr in servers:
        refusals = [line for line in logs[addr] if "refused a data connection" in line]
        assert len(refusals) >= 3 and any("wrong cluster secret" in line for line in refusals), logs[addr]
    # The cluster still works, over the data plane.
    again = unique_name("dp")
    s2 = aimss_dask.create_stream(again, partitions=2)
    s2.write(np.zeros(3), partition=0)
    s2.write(np.ones(3), partition=1)
    s2.seal()
    assert len(list(s2.read())) == 2


def test_the_secret_is_the_clusters_and_survives_a_second_registration(client: Client):
    secret = client.get_metadata([SECRET_KEY])
    assert len(bytes.fromhex(secret)) == 32
    client.register_plugin(aimss_dask.AIMSS())  # idempotent: the same secret
    assert client.get_metadata([SECRET_KEY]) == secret
    held = client.run(lambda dask_worker: dask_worker.plugins["aimss"].secret)
    assert set(held.values()) == {secret}
