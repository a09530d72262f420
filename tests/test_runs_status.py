"""Every operator is a run the coordinator lists: ``status().runs`` on a real cluster.

A shuffle, a ``to_zarr``, a streaming sink, a Zarr source and its loader run
at the same time; ``status()`` lists each with its kind, state, client,
streams and progress, from the registry and the workers' heartbeats (no
query to the workers for it); each ends in a final state.
"""

from __future__ import annotations

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import unique_name, wait_until
from distributed import Client, Event, LocalCluster

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.api.runs import register_run
from aimss_dask.core.errors import StreamExistsError
from aimss_dask.core.runs import RunSpec


@pytest.fixture(scope="module")
def cluster():
    # Tasks below block on an Event: enough threads that the rest still runs.
    with LocalCluster(n_workers=2, threads_per_worker=4, processes=True, dashboard_address=":0") as cl:
        yield cl


@pytest.fixture
def client(cluster):
    with Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS())
        c.wait_for_workers(2)
        yield c


def _gated(part: pd.DataFrame, gate: str) -> pd.DataFrame:
    if len(part) and part["v"].iloc[0] == 0:  # the first input partition waits
        Event(gate).wait()
    return part


def _gated_block(block: np.ndarray, gate: str) -> np.ndarray:
    if block.flat[0] == 0:
        Event(gate).wait()
    return block


def _by_kind(st) -> dict[str, dict]:
    return {r["kind"]: r for r in st.runs}


def test_status_lists_every_operator_running_at_once_with_progress(client, tmp_path):
    gate = unique_name("gate")
    go = Event(gate, client=client)
    # 1. A shuffle whose first input partition waits: the others are pushed.
    pdf = pd.DataFrame({"k": np.arange(4000) % 97, "v": np.arange(4000)})
    df = dd.from_pandas(pdf, npartitions=8).map_partitions(_gated, gate, meta=pdf.iloc[:0])
    shuffled = client.compute(aimss_dask.shuffle(df, "k", npartitions=4))
    # 2. A to_zarr whose first block waits: the others are written.
    x = da.arange(64 * 16, chunks=64).reshape(64, 16).rechunk((8, 16))
    gated = x.map_blocks(_gated_block, gate, dtype=x.dtype)
    written = client.compute(aimss_dask.to_zarr(gated, str(tmp_path / "out.zarr"), chunks=(8, 16), compute=False))
    # 3. A streaming sink on an open stream.
    s = aimss_dask.create_stream(unique_name("frames"), 2)
    sink = s.to_zarr(str(tmp_path / "frames.zarr"), chunks=4)
    for i in range(16):
        s.write(np.full((2, 3), i), partition=i % 2)
    s.flush()
    # 4. A Zarr source and a loader that took one batch.
    src_path = str(tmp_path / "src.zarr")
    zarr.create_array(store=src_path, shape=(40, 5), chunks=(4, 5), dtype="f8")[...] = np.arange(200.0).reshape(40, 5)
    source = aimss_dask.source.from_zarr(src_path, partitions=2)
    loader = source.batches(4)
    first = next(loader)
    assert first.shape == (4, 5)

    def all_running():
        st = aimss_dask.status()
        runs = _by_kind(st)
        if not {"shuffle", "to_zarr", "zarr-sink", "zarr-source", "loader"} <= set(runs):
            return None
        ok = (
            runs["shuffle"]["state"] == "running"
            and any(p.get("records", 0) > 0 for p in runs["shuffle"]["progress"].values())
            and any(p.get("written", 0) > 0 for p in runs["to_zarr"]["progress"].values())
            and any(p.get("rows", 0) > 0 for p in runs["zarr-sink"]["progress"].values())
            and any(p.get("batches", 0) >= 1 for p in runs["loader"]["progress"].values())
            # Counted from the workers' heartbeats: both partitions' owners reported.
            and {x["name"]: x for x in st.streams}[s.name]["records"] == 16
        )
        return st if ok else None

    st = wait_until(all_running, timeout=20, interval=0.2, what="every run listed with progress")
    runs = _by_kind(st)
    for kind in ("shuffle", "to_zarr", "zarr-sink", "zarr-source", "loader"):
        r = runs[kind]
        assert r["state"] in ("registered", "running", "sealed"), (kind, r["state"])
        assert r["client"] == client.id, (kind, r["client"])
        assert r["started"] > 0 and r["run_id"]
    assert runs["shuffle"]["partitions"] == {runs["shuffle"]["streams"][0]: 4}
    assert runs["shuffle"]["memory_bytes"] > 0
    assert runs["zarr-sink"]["reads"] == [s.name] and runs["loader"]["reads"] == [source.name]
    assert runs["zarr-source"]["streams"] == [source.name]
    listed = {x["name"]: x for x in st.streams}
    assert listed[s.name]["run"] is None
    assert listed[source.name]["run"] == runs["zarr-source"]["run_id"]
    # The per-worker view is still the mapping it was.
    assert set(st) == set(listed_workers(client))

    go.set()
    out = shuffled.result()
    pd.testing.assert_frame_equal(out.sort_values("v").reset_index(drop=True), pdf)
    written.result()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[...], np.arange(64 * 16).reshape(64, 16))
    s.seal()
    sink.wait(timeout=30)
    rest = list(loader)
    assert len(rest) == 9
    source_id = runs["zarr-source"]["run_id"]
    aimss_dask.destroy_stream(source.name)
    aimss_dask.destroy_stream(s.name)

    def finished():
        by = _by_kind(aimss_dask.status())
        done = {k: by[k]["state"] for k in by}
        return done if all(v == "done" for v in done.values()) else None

    states = wait_until(finished, timeout=20, interval=0.2, what="every run done")
    assert set(states) == {"shuffle", "to_zarr", "zarr-sink", "zarr-source", "loader"}
    assert [r for r in aimss_dask.status().runs if r["run_id"] == source_id][0]["state"] == "done"


def test_a_run_never_takes_over_a_stream_it_did_not_make(client):
    user = aimss_dask.create_stream(unique_name("mine"), 2)
    user.write(np.arange(3), partition=0)
    user.flush()
    with pytest.raises(StreamExistsError, match=user.name):
        register_run(RunSpec(run_id=unique_name("r"), streams=(user.name,)), 2)
    assert user.info()["records"] == [1, 0]  # untouched
    aimss_dask.destroy_stream(user.name)


def test_a_failed_to_zarr_is_listed_failed_with_its_error(client, tmp_path):
    def boom(block):
        raise ValueError("bad block")

    x = da.ones((16, 4), chunks=(4, 4)).map_blocks(boom, dtype="f8")
    with pytest.raises(ValueError, match="bad block"):
        aimss_dask.to_zarr(x, str(tmp_path / "z.zarr"), chunks=(4, 4))
    failed = [r for r in aimss_dask.status().runs if r["kind"] == "to_zarr"]
    assert failed and failed[-1]["state"] == "failed"
    assert failed[-1]["error"][0] == "ValueError" and "bad block" in failed[-1]["error"][1]


def test_a_restarted_shuffle_registers_again_under_a_newer_epoch(client):
    # Kill nothing: register the same run twice, the way a re-run create task does.
    spec = RunSpec(run_id=unique_name("again"), streams=(unique_name("again-s"),))
    first = register_run(spec, 2)
    same = register_run(spec, 2)
    assert not same.created and same.epoch == first.epoch
    first.streams[0].seal()
    replaced = register_run(spec, 2)  # a sealed leftover of the same run is replaced
    assert replaced.created and replaced.epoch > first.epoch
    assert replaced.streams[0].spec.epoch > first.streams[0].spec.epoch
    aimss_dask.destroy_stream(spec.streams[0])
    by_id = {r["run_id"]: r for r in aimss_dask.status().runs}
    assert by_id[spec.run_id]["state"] == "done" and by_id[spec.run_id]["epoch"] == replaced.epoch
