"""Records of every kind survive the stream unchanged: arrays, DataFrames, bytes, objects."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from conftest import assert_workers_clean, make_cluster, unique_name
from distributed import Client, get_worker

import aimss_dask
from aimss_dask._compat import listed_workers


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float
    label: str = "p"


def _base_2d() -> np.ndarray:
    return np.arange(24, dtype="int64").reshape(4, 6)


def array_records() -> list[tuple[str, np.ndarray]]:
    a = _base_2d()
    structured = np.array(
        [(1, 2.5, b"ab"), (-3, np.nan, b"")], dtype=[("i", "<i4"), ("f", "<f8"), ("s", "S3")]
    )
    return [
        ("bool", np.array([True, False, True])),
        ("int8", np.array([-128, 0, 127], dtype="int8")),
        ("uint16", np.array([0, 1, 65535], dtype="uint16")),
        ("int64", np.array([-(2**63), 0, 2**63 - 1], dtype="int64")),
        ("float32", np.array([1.5, -0.0, np.inf], dtype="float32")),
        ("float64", np.array([np.nan, 1e-300, -np.inf, 3.25])),
        ("complex128", np.array([1 + 2j, -3.5j, np.nan + 0j])),
        ("datetime64[ns]", np.array(["2024-02-29T12:00:00.123456789", "NaT", "1970-01-01"], dtype="datetime64[ns]")),
        ("big-endian", np.array([1, 256, -2], dtype=">i4")),
        ("structured", structured),
        ("unicode", np.array(["", "héllo", "日本語"], dtype="<U5")),
        ("2d", a),
        ("fortran", np.asfortranarray(a)),
        ("a[::2]", a[::2]),
        ("1d[::3]", np.arange(20.0)[::3]),
        ("a.T", a.T),
        ("a[:, 1]", a[:, 1]),
        ("negative stride", a[::-1, ::-2]),
        ("0-d", np.array(3.5)),
        ("0-d int", np.array(7, dtype="int64")),
        ("empty (0,)", np.empty((0,), dtype="float64")),
        ("empty (3, 0)", np.empty((3, 0), dtype="int32")),
    ]


def frame_records() -> list[tuple[str, pd.DataFrame]]:
    df = pd.DataFrame(
        {
            "i": pd.array([1, None, 3], dtype="Int64"),
            "b": pd.array([True, None, False], dtype="boolean"),
            "c": pd.Categorical(["x", "y", "x"], categories=["y", "x", "z"], ordered=True),
            "s": pd.array(["a", None, "ccc"], dtype="string"),
            "t": pd.date_range("2024-03-31 00:30", periods=3, freq="h", tz="Europe/Paris"),
            "f": [1.5, np.nan, -2.0],
        },
        index=pd.Index(["r1", "r2", "r3"], name="row"),
    )
    multi = pd.DataFrame(
        {"v": np.arange(4, dtype="float32"), "u": pd.array([1, 2, None, 4], dtype="UInt8")},
        index=pd.MultiIndex.from_product([["a", "b"], [10, 20]], names=["k", "n"]),
    )
    dt_index = pd.DataFrame(
        {"x": [1, 2]}, index=pd.DatetimeIndex(["2020-01-01", "2020-01-02"], tz="UTC", name="when")
    )
    return [("nullable frame", df), ("multi-index frame", multi), ("datetime-index frame", dt_index)]


def object_records() -> list[tuple[str, object]]:
    return [
        ("bytes", b"\x00\xff" * 100),
        ("empty bytes", b""),
        ("dict", {"a": [1, 2, {"b": (3, 4)}], 5: None, ("t", 1): {1.5}}),
        ("tuple", (1, "two", 3.0, None, (4,))),
        ("dataclass", Point(1, 2.5, "q")),
        ("list of dataclasses", [Point(i, i / 2) for i in range(3)]),
        ("None", None),
        ("str", "ünïcode"),
        ("big int", 2**100),
        ("numpy scalar", np.float32(1.25)),
    ]


def all_records() -> list[tuple[str, object]]:
    return array_records() + frame_records() + object_records()


def check_same(got, expected, what: str) -> None:
    """Raise AssertionError unless ``got`` equals ``expected`` in type and content."""
    if isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray), f"{what}: got {type(got)}"
        assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
        assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
        if expected.dtype.names:
            assert got.tobytes() == np.ascontiguousarray(expected).tobytes(), what
        else:
            np.testing.assert_array_equal(got, expected, err_msg=what)
    elif isinstance(expected, pd.DataFrame):
        assert isinstance(got, pd.DataFrame), f"{what}: got {type(got)}"
        pd.testing.assert_frame_equal(got, expected, check_exact=True, obj=what)
    else:
        assert type(got) is type(expected), f"{what}: type {type(got)} != {type(expected)}"
        assert got == expected, f"{what}: {got!r} != {expected!r}"


def check_all(got: list, expected: list[tuple[str, object]]) -> None:
    assert len(got) == len(expected), f"{len(got)} records, expected {len(expected)}"
    for g, (what, e) in zip(got, expected):
        check_same(g, e, what)


# -- task functions ----------------------------------------------------------------------------


def _read_and_check(name: str, p: int) -> tuple[str, int, list[str]]:
    """Read partition ``p`` inside a task, compare there (no second transfer)."""
    got = list(aimss_dask.read_from(name, partition=p))
    check_all(got, all_records())
    read_only = [
        what
        for g, (what, _) in zip(got, all_records())
        if isinstance(g, np.ndarray) and not g.flags.writeable
    ]
    return get_worker().address, len(got), read_only


def _write_locally_and_read_back(name: str, p: int) -> list[str]:
    """On the owner: write arrays, read them back; they must come back read-only."""
    problems = []
    originals = [a for _, a in array_records()]
    for a in originals:
        aimss_dask.write_to(name, a, partition=p)
    it = aimss_dask.read_from(name, partition=p, timeout=0)
    got = [next(it) for _ in originals]
    it.close()
    for g, (what, a) in zip(got, array_records()):
        check_same(g, a, what)
        if g.flags.writeable:
            problems.append(f"{what}: stored array is writeable")
    for what, a in zip((w for w, _ in array_records()), originals):
        if not a.flags.writeable:
            problems.append(f"{what}: writing made the caller's array read-only")
    return problems


# -- tests -----------------------------------------------------------------------------------


def test_record_round_trip_client_to_task_and_client(client):
    name = unique_name("records")
    s = aimss_dask.create_stream(name, partitions=2)
    owners = s.info()["owners"]
    assert owners[0] != owners[1]
    expected = all_records()
    for _, r in expected:
        s.write(r, partition=0)
    s.seal()
    assert s.info()["records"] == [len(expected), 0]

    # From the client (a remote read).
    check_all(list(s.read(partition=0)), expected)
    # From a task on the other worker (remote) and on the owner (local).
    remote_addr, n, _ = client.submit(_read_and_check, name, 0, workers=[owners[1]], pure=False).result()
    assert (remote_addr, n) == (owners[1], len(expected))
    local_addr, n, read_only = client.submit(_read_and_check, name, 0, workers=[owners[0]], pure=False).result()
    assert (local_addr, n) == (owners[0], len(expected))
    # Stored arrays read locally are read-only.
    assert read_only == [what for what, r in expected if isinstance(r, np.ndarray)]


def test_local_write_stores_read_only_view_and_keeps_callers_array_writeable(client):
    name = unique_name("local")
    s = aimss_dask.create_stream(name, partitions=2)
    owners = s.info()["owners"]
    problems = client.submit(_write_locally_and_read_back, name, 1, workers=[owners[1]], pure=False).result()
    assert problems == []
    s.seal()
    # And the client reads the same values remotely.
    check_all(list(s.read(partition=1)), array_records())


def test_writes_from_task_on_non_owner_round_trip(client):
    name = unique_name("nonowner")
    s = aimss_dask.create_stream(name, partitions=2)
    owners = s.info()["owners"]

    def write_all(name):
        for _, r in all_records():
            aimss_dask.write_to(name, r, partition=0)

    client.submit(write_all, name, workers=[owners[1]], pure=False).result()
    s.seal()
    check_all(list(s.read(partition=0)), all_records())


def test_records_survive_spill_to_disk():
    """A tiny budget spills every segment: records come back from disk unchanged."""
    with make_cluster(1) as cl, Client(cl) as c:
        c.register_plugin(aimss_dask.AIMSS(memory_limit="1KiB", segment_size="1KiB"))
        name = unique_name("spilled")
        s = aimss_dask.create_stream(name, partitions=1)
        expected = all_records()
        for _, r in expected:
            s.write(r)
        s.seal()
        info = s.info()
        assert info["records"] == [len(expected)]
        assert info["spilled_bytes"] > 0
        check_all(list(s.read()), expected)
        (w,) = listed_workers(c)
        addr, n, read_only = c.submit(_read_and_check, name, 0, workers=[w], pure=False).result()
        assert n == len(expected)
        assert read_only == [what for what, r in expected if isinstance(r, np.ndarray)]
        aimss_dask.destroy_stream(name)
        assert_workers_clean(aimss_dask.status())


def test_record_larger_than_batch_and_segment(client):
    size = 5 * 2**20  # default batch-size and segment-size are 4 MiB
    name = unique_name("big")
    s = aimss_dask.create_stream(name, partitions=1)
    big = np.arange(size // 8, dtype="float64")
    s.write(b"before")
    s.write(big)
    s.write(b"after")
    s.seal()
    got = list(s.read())
    assert got[0] == b"before" and got[2] == b"after"
    np.testing.assert_array_equal(got[1], big)
    assert size <= s.info()["bytes"][0] < size + 1024
