"""The raw data plane: buffer pool reuse rules and batch framing, over real sockets."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pandas as pd
import pytest

from aimss_dask.log.records import encode
from aimss_dask.node.plugin import receive_idle_limit
from aimss_dask.transport import dataplane, secure
from aimss_dask.transport.dataplane import BufferPool, DataServer
from aimss_dask.transport.secure import Credentials

#: The cluster secret of these tests' servers and clients.
CREDS = Credentials(secure.new_secret())


def _connect(srv: DataServer):
    return secure.connect(srv.address, CREDS, tls=False)


def test_pool_reuses_a_buffer_only_when_nothing_refers_to_it():
    pool = BufferPool(lambda: 1 << 30)
    a = pool.take(1000)
    view = np.frombuffer(memoryview(a)[:80], dtype="f8")  # a "record" in the log
    ida = id(a)
    del a
    b = pool.take(1000)
    assert id(b) != ida, "a buffer with a live record view was handed out again"
    del view
    gc.collect()
    c = pool.take(1000)
    assert id(c) == ida  # free again: reused, not a fresh allocation
    del b, c
    assert pool.statistics()["pool_bytes"] == 2 * 2**20


def test_pool_keeps_idle_bytes_within_its_limit():
    limit = [3 * 2**20]
    pool = BufferPool(lambda: limit[0])
    held = [pool.take(2**20) for _ in range(6)]
    del held
    limit[0] = 2**20
    pool.take(10)
    st = pool.statistics()
    assert st["pool_bytes"] <= 2 * 2**20  # one in hand (now free again) plus at most 1 MiB idle


def test_pool_releases_idle_buffers_but_keeps_those_in_use():
    pool = BufferPool(lambda: 1 << 30)
    held = pool.take(3 * 2**20)
    record = np.frombuffer(memoryview(held)[:64], dtype="u8")  # still in a log
    del held
    pool.take(2**20)  # free again at once
    assert pool.statistics()["pool_bytes"] == 4 * 2**20
    assert pool.release_idle() == 2**20
    st = pool.statistics()
    assert st == {"pool_bytes": 3 * 2**20, "pool_free_bytes": 0}
    assert record.sum() >= 0  # the record's memory is intact and still usable
    del record
    gc.collect()
    assert pool.release_idle() == 3 * 2**20
    assert pool.statistics()["pool_bytes"] == 0


def test_pool_trim_keeps_only_its_idle_limit_of_free_buffers():
    limit = [8 * 2**20]
    pool = BufferPool(lambda: limit[0])
    a, b, c = pool.take(4 * 2**20), pool.take(4 * 2**20), pool.take(4 * 2**20)
    del a, b  # freed after their last take: nothing trimmed them
    assert pool.statistics() == {"pool_bytes": 12 * 2**20, "pool_free_bytes": 8 * 2**20}
    assert pool.trim() == 0  # within the limit
    limit[0] = 2**20
    assert pool.trim() == 8 * 2**20
    assert pool.statistics() == {"pool_bytes": 4 * 2**20, "pool_free_bytes": 0}
    c[:] = 1  # the buffer in use is untouched
    assert int(c.sum()) == 4 * 2**20


def test_a_workers_idle_receive_buffers_stay_within_what_its_log_leaves_of_the_budget():
    budget = 3 * 2**30
    assert receive_idle_limit(budget, 0) == budget // 2  # room for a replicated run's pushes and copies
    assert receive_idle_limit(budget, 2 * 2**30) == 2**30
    assert receive_idle_limit(budget, budget + 1) == 0  # a log over its budget: nothing kept idle
    for log in range(0, 2 * budget, budget // 7):
        assert 0 <= receive_idle_limit(budget, log) <= max(0, budget - log)


def _base(view: memoryview) -> int:
    """The address a view starts at."""
    return np.frombuffer(view, dtype="u1").__array_interface__["data"][0]


def test_a_connections_batches_fill_one_chunk_after_another_and_reuse_it_once_free():
    pool = BufferPool(lambda: 1 << 30, chunk=2**20)
    a = pool.take_for("c1", 300_000)
    b = pool.take_for("c1", 300_000)
    # Right after the first, at the next 64-byte boundary, in the same chunk.
    assert _base(b) - _base(a) == 300_032
    c = pool.take_for("c1", 500_000)  # no room left there: another chunk
    assert pool.statistics()["pool_bytes"] == 2 * 2**20
    first, second = _base(a), _base(c)
    del a, b
    gc.collect()
    # Its first chunk is free again, but the connection goes on in the one it fills now.
    d = pool.take_for("c1", 100_000)
    assert _base(d) == second + 500_032
    del c, d
    gc.collect()
    # Nothing refers to that one any more: it starts over at its beginning.
    e = pool.take_for("c1", 300_000)
    assert _base(e) == second and pool.statistics()["pool_bytes"] == 2 * 2**20
    # A batch over half a chunk gets a buffer of its own: here the free first chunk, whole.
    big = pool.take_for("c1", 600_000)
    assert _base(big) == first and pool.statistics()["pool_bytes"] == 2 * 2**20
    pool.forget("c1")
    del e, big


def test_a_chunk_handed_to_another_user_is_never_filled_on_by_its_first_connection():
    pool = BufferPool(lambda: 1 << 30, chunk=2**20)
    a = pool.take_for("c1", 1000)
    start = _base(a)
    del a
    gc.collect()
    other = pool.take(2**20)  # the chunk is free: handed to someone else whole
    assert _base(memoryview(other)) == start
    b = pool.take_for("c1", 1000)
    assert not np.shares_memory(np.frombuffer(b, dtype="u1"), other)
    del other, b


def test_live_batches_never_share_memory_whatever_the_order_of_takes_and_releases():
    """The safety property: a region handed out is never handed out again while anything refers to it."""
    import random

    rng = random.Random(7)
    pool = BufferPool(lambda: rng.choice([0, 2**20, 1 << 30]), chunk=2**20)
    live: list[tuple[int, int, memoryview]] = []
    for step in range(3000):
        op = rng.random()
        if op < 0.5 or not live:
            key = rng.choice(["a", "b", "c"])
            n = rng.choice([1, 64, 1000, 100_000, 400_000, 600_000, 2**20])
            # take() hands out a whole buffer: all of it counts as in use.
            v = pool.take_for(key, n) if op < 0.4 else memoryview(pool.take(n))
            lo, n = _base(v), v.nbytes
            for other_lo, other_n, _ in live:
                assert lo + n <= other_lo or other_lo + other_n <= lo, f"step {step}: overlap"
            np.frombuffer(v, dtype="u1")[:] = step % 251
            live.append((lo, n, v))
        elif op < 0.95:
            live.pop(rng.randrange(len(live)))
        else:
            pool.forget(rng.choice(["a", "b", "c"]))
            pool.trim()
        if step % 500 == 0:
            gc.collect()
    # Every live region still holds what was written to it.
    for lo, n, v in live:
        arr = np.frombuffer(v, dtype="u1")
        assert (arr == arr[0]).all()


def test_pool_prefers_the_smallest_free_buffer_that_fits():
    pool = BufferPool(lambda: 1 << 30)
    big = pool.take(8 * 2**20)
    small = pool.take(2**20)
    ids = {id(big): "big", id(small): "small"}
    del big, small
    assert ids[id(pool.take(100))] == "small"


@pytest.fixture
def server():
    stored: list = []
    lock = threading.Lock()

    def handler(groups):
        with lock:
            if any(g[0] == "bad" for g in groups):
                raise RuntimeError("boom")
            stored.extend(groups)
        return {g[0]: ("StreamSealedError", f"stream {g[0]!r} is sealed") for g in groups if g[0] == "sealed"}

    srv = DataServer("127.0.0.1", handler, BufferPool(lambda: 1 << 30), credentials=CREDS)
    yield srv, stored
    srv.close()


def _batch(name, records, partition=0, origin=None):
    sers = [encode(r, name) for r in records]
    return [(name, 1, partition, [s for s, _ in sers], [n for _, n in sers], origin)]


def test_batches_round_trip_in_order_with_answers(server):
    srv, stored = server
    sock = _connect(srv)
    arrays = [np.arange(n, dtype="f8") for n in (0, 1, 1000, 300_000)]
    df = pd.DataFrame({"a": pd.array([1, None], dtype="Int64"), "b": ["x", "y"]})
    batches = [
        _batch("s", arrays),
        _batch("s", [df, b"raw", {"k": (1, 2)}], partition=3),
        _batch("sealed", [np.ones(3)]),
    ]
    for b in batches:
        dataplane.send_buffers(sock, dataplane.encode_batch(b))
    answers = [dataplane.read_ack(sock) for _ in batches]
    sock.close()
    assert answers[0] == {"errors": {}} and answers[1] == {"errors": {}}
    assert answers[2]["errors"]["sealed"][0] == "StreamSealedError"
    assert [g[2] for g in stored] == [0, 3, 0]
    for got, want in zip(stored[0][3], arrays):
        np.testing.assert_array_equal(got, want)
    pd.testing.assert_frame_equal(stored[1][3][0], df)
    assert stored[1][3][1:] == [b"raw", {"k": (1, 2)}]
    assert stored[0][4] == [a.nbytes for a in arrays]


def test_more_frames_than_one_sendmsg_takes(server):
    srv, stored = server
    sock = _connect(srv)
    records = [np.full(7, i, dtype="i2") for i in range(1500)]  # > IOV_MAX buffers
    dataplane.send_buffers(sock, dataplane.encode_batch(_batch("many", records)))
    assert dataplane.read_ack(sock) == {"errors": {}}
    sock.close()
    assert [int(r[0]) for r in stored[0][3]] == list(range(1500))


def test_a_failing_store_is_answered_not_hung(server):
    srv, _ = server
    sock = _connect(srv)
    sock.settimeout(10)
    dataplane.send_buffers(sock, dataplane.encode_batch(_batch("bad", [np.ones(2)])))
    ack = dataplane.read_ack(sock)
    assert ack["errors"]["bad"][0] == "AIMSSError" and "boom" in ack["errors"]["bad"][1]
    # The connection still works afterwards.
    dataplane.send_buffers(sock, dataplane.encode_batch(_batch("ok", [np.ones(2)])))
    assert dataplane.read_ack(sock) == {"errors": {}}
    sock.close()


def _unreadable():
    raise ImportError("No module named 'only_on_the_writer'")


class _OnlyOnTheWriter:
    """Pickles fine where it is written; reading it back fails (its module is missing on the owner)."""

    def __reduce__(self):
        return (_unreadable, ())


def test_a_record_the_owner_cannot_read_back_refuses_its_stream_and_keeps_the_connection(server):
    srv, stored = server
    sock = _connect(srv)
    sock.settimeout(10)
    batch = _batch("s", [np.ones(2)]) + _batch("odd", [np.ones(1), _OnlyOnTheWriter()], partition=1)
    dataplane.send_buffers(sock, dataplane.encode_batch(batch))
    ack = dataplane.read_ack(sock)
    assert list(ack["errors"]) == ["odd"] and ack["errors"]["odd"][0] == "RecordNotSerializableError"
    assert "only_on_the_writer" in ack["errors"]["odd"][1] and "not stored" in ack["errors"]["odd"][1]
    assert [g[0] for g in stored] == ["s"]  # none of the stream's records, the other stream's all
    # The connection still works afterwards: batches pipelined behind it are not lost.
    dataplane.send_buffers(sock, dataplane.encode_batch(_batch("ok", [np.ones(2)])))
    assert dataplane.read_ack(sock) == {"errors": {}}
    sock.close()


def test_tcp_and_tls_addresses_use_the_data_plane():
    assert dataplane.carries("auto", "tcp://127.0.0.1:4000")
    assert dataplane.carries("auto", "tls://127.0.0.1:4000")
    assert not dataplane.carries("auto", "ucx://10.0.0.1:4000")
    assert not dataplane.carries("dask", "tcp://127.0.0.1:4000")


def test_close_drops_open_connections(server):
    srv, _ = server
    sock = _connect(srv)
    sock.settimeout(10)
    srv.close()
    srv.close()  # idempotent
    try:
        assert sock.recv(1) == b""  # the server hung up
    except ConnectionResetError:
        pass  # hung up while its thread was reading: a reset, as good an answer
    sock.close()


def test_a_closed_server_stops_listening_and_its_accept_thread_ends(server):
    """Closing the socket alone left the accept thread blocked, and the port kept accepting (one thread and socket leaked per in-process worker)."""
    import socket

    srv, _ = server
    accepter = srv._thread
    srv.close()
    accepter.join(timeout=5)
    assert not accepter.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(srv.address, timeout=5).close()


@pytest.mark.parametrize("copies", [False, True])
def test_records_pin_the_receive_buffer_only_when_stored_as_views(copies):
    stored: list = []
    pool = BufferPool(lambda: 1 << 30)
    asked: list[int] = []

    def own_copies(n: int) -> bool:
        asked.append(n)
        return copies

    srv = DataServer("127.0.0.1", lambda groups: stored.extend(groups) or {}, pool, own_copies, credentials=CREDS)
    try:
        sock = _connect(srv)
        arrays = [np.arange(1000, dtype="f8") * i for i in range(4)]
        df = pd.DataFrame({"a": [1.5, 2.5], "b": ["x", "y"]})
        dataplane.send_buffers(sock, dataplane.encode_batch(_batch("s", [*arrays, df])))
        assert dataplane.read_ack(sock) == {"errors": {}}
        sock.close()
    finally:
        srv.close()
    assert asked and asked[0] > sum(a.nbytes for a in arrays)
    for got, want in zip(stored[0][3], arrays):
        np.testing.assert_array_equal(got, want)
    pd.testing.assert_frame_equal(stored[0][3][-1], df)
    gc.collect()
    st = pool.statistics()
    # Stored copies leave the buffer free for the next batch; stored views
    # keep it in use for as long as any record of the batch lives.
    assert (st["pool_free_bytes"] == st["pool_bytes"] > 0) == copies, st


def test_origins_travel_with_their_groups(server):
    """Each group's origin, an ``(input, attempt, seq)`` tuple or None, reaches the owner as sent."""
    srv, stored = server
    sock = _connect(srv)
    batch = [
        *_batch("o", [np.ones(2)], partition=0, origin=(3, 17, 0)),
        *_batch("o", [np.zeros(2)], partition=1, origin=None),
        *_batch("o", [np.ones(1)], partition=1, origin=(2**40, 2**62, 5)),
    ]
    dataplane.send_buffers(sock, dataplane.encode_batch(batch))
    assert dataplane.read_ack(sock) == {"errors": {}}
    sock.close()
    assert [(g[2], g[5]) for g in stored] == [(0, (3, 17, 0)), (1, None), (1, (2**40, 2**62, 5))]
    np.testing.assert_array_equal(stored[1][3][0], np.zeros(2))


def test_a_replicated_streams_groups_keep_their_wire_form_and_copies_stay_serialised(server):
    """A writer's group of a replicated stream reaches the owner with its records' wire
    forms (forwarded to replicas as they are); an owner's copy (``at`` given) is not decoded."""
    from distributed.protocol import Serialized

    srv, stored = server
    sock = _connect(srv)
    arr = np.arange(4, dtype="f8")
    (g,) = _batch("r", [arr, b"two"])
    batch = [(*g, (7, 0)), (*_batch("c", [arr])[0], None, 12)]
    dataplane.send_buffers(sock, dataplane.encode_batch(batch))
    assert dataplane.read_ack(sock) == {"errors": {}}
    sock.close()
    written, copy = stored
    assert len(written) == 9 and written[6] == (7, 0) and written[7] is None
    np.testing.assert_array_equal(written[3][0], arr)
    assert [type(w) for w in written[8]] == [Serialized, Serialized]
    # The wire form is the very bytes received, and decodes to the record.
    from distributed.protocol import deserialize

    assert deserialize(written[8][1].header, written[8][1].frames) == b"two"
    assert len(copy) == 8 and copy[7] == 12
    (rec,) = copy[3]
    assert type(rec) is Serialized
    np.testing.assert_array_equal(deserialize(rec.header, rec.frames), arr)


def test_records_with_an_origin_never_share_a_group():
    """Plain records of one partition are grouped; one with an origin is a group of its own,
    so that a second write under the same origin reaches the owner's filter as a group."""
    from aimss_dask.core.specs import Origin
    from aimss_dask.transport.producer import _group, _Item

    o = Origin(4, attempt=9)

    def item(p, origin=None):
        ser, n = encode(np.ones(1), "s")
        return _Item("s", 1, p, ser, n, origin)

    groups = _group([item(0), item(0), item(0, o), item(0, o), item(0), item(0), item(1, o), item(1)])
    assert [(g[2], len(g[3]), g[5]) for g in groups] == [
        (0, 2, None), (0, 1, (4, 9, 0)), (0, 1, (4, 9, 0)), (0, 2, None), (1, 1, (4, 9, 0)), (1, 1, None),
    ]
