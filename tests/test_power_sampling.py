"""GPU power sampling and ``power_report``.

The sampler's logic runs against an in-process fake of NVML (device
lookup by index and UUID, a metric the device does not support, the
driver's fine power samples); on a real cluster without a GPU every
worker's sampler says it is off and why, and ``power_report`` returns an
empty report that still lists the sync phases. With a GPU (``gpu`` mark)
the real NVML is sampled.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import make_cluster
from distributed import Client

import aimss_dask
from aimss_dask import InvalidArgumentError
from aimss_dask.api.power import PowerReport
from aimss_dask.node.gpupower import GpuSampler, visible_devices
from aimss_dask.power.gpu import gpu_count


class NVMLError_NotSupported(Exception):  # noqa: N801 - the name NVML's bindings use
    pass


def fake_nvml(n: int = 2, *, util_supported: tuple[bool, ...] = (True, False)) -> SimpleNamespace:
    state = {"tick": 0, "inits": 0, "shutdowns": 0}
    handles = [SimpleNamespace(i=i, uuid=f"GPU-{i:04d}") for i in range(n)]

    def util(h):
        if not util_supported[h.i]:
            raise NVMLError_NotSupported()
        return SimpleNamespace(gpu=25 * (h.i + 1))

    def power(h):
        state["tick"] += 1
        return 100_000 + 1000 * h.i + state["tick"]

    def samples(h, kind, last):
        base = 1_000_000 + 10_000 * state["tick"]
        return 1, [SimpleNamespace(timeStamp=base + k * 1000, sampleValue=SimpleNamespace(uiVal=200_000 + k))
                   for k in range(3)]

    nvml = SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_TOTAL_POWER_SAMPLES=0,
        nvmlInit=lambda: state.__setitem__("inits", state["inits"] + 1),
        nvmlShutdown=lambda: state.__setitem__("shutdowns", state["shutdowns"] + 1),
        nvmlDeviceGetCount=lambda: n,
        nvmlDeviceGetHandleByIndex=lambda i: handles[i],
        nvmlDeviceGetHandleByUUID=lambda u: next(h for h in handles if h.uuid.encode() == u),
        nvmlDeviceIsMigDeviceHandle=lambda h: False,
        nvmlDeviceGetUUID=lambda h: h.uuid.encode(),
        nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetTotalEnergyConsumption=lambda h: 5_000_000 + state["tick"] * 10,
        nvmlDeviceGetUtilizationRates=util,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=1 << 30, free=(7 + h.i) << 30),
        nvmlDeviceGetClockInfo=lambda h, c: 1400 + h.i,
        nvmlDeviceGetSamples=samples,
        state=state,
    )
    return nvml


def test_sampler_reads_each_metric_and_leaves_out_what_is_unsupported():
    nvml = fake_nvml()
    s = GpuSampler(0.01, keep=5, nvml=nvml, environ={})
    assert s.start().startswith("on: 2 GPU(s)")
    try:
        rows = s.sample_once()
        assert [r[1] for r in rows] == ["GPU-0000", "GPU-0001"]
        t, gpu, w, e, util, used, free, clock = rows[0]
        assert 100.0 < w < 101.0 and e == pytest.approx(5000.0, abs=1) and util == 0.25
        assert used == 1 << 30 and free == 7 << 30 and clock == 1400
        # The second GPU has no utilisation: None, and not asked again.
        assert rows[1][4] is None and s.unsupported()["GPU-0001"] == ["util"]
        for _ in range(10):
            s.sample_once()
        assert [len(r) for r in s.samples.values()] == [5, 5]  # a ring per GPU
        tl = s.timeline()
        assert tl["columns"]["gpu"][-2:] == ["GPU-0000", "GPU-0001"]
        # The driver's finer samples: three per read, each once.
        fine = tl["power_samples"]
        assert len(fine["t"]) == len(set(zip(fine["t"], fine["gpu"]))) and 200.0 <= min(fine["power_w"])
        assert tl["columns"]["t"] == sorted(tl["columns"]["t"])
    finally:
        s.close()
    assert nvml.state["shutdowns"] == 1


def test_sampler_follows_cuda_visible_devices():
    nvml = fake_nvml(3, util_supported=(True, True, True))
    s = GpuSampler(0.01, keep=5, nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": "GPU-0002,1"})
    s.start()
    try:
        assert [d.uuid for d in s.devices] == ["GPU-0002", "GPU-0001"]
    finally:
        s.close()
    assert visible_devices({"CUDA_VISIBLE_DEVICES": " 0, 2 "}) == ["0", "2"]
    assert visible_devices({}) is None


def test_sampler_is_off_and_says_why_without_nvml_or_a_gpu():
    assert GpuSampler(0.01, 5, nvml=None).start().startswith("off: NVML")
    broken = fake_nvml()
    broken.nvmlInit = lambda: (_ for _ in ()).throw(RuntimeError("driver not loaded"))
    assert "driver not loaded" in GpuSampler(0.01, 5, nvml=broken).start()
    none = fake_nvml(0)
    assert GpuSampler(0.01, 5, nvml=none, environ={}).start() == "off: no GPU visible to this worker"


def test_sampler_thread_samples_and_stops():
    nvml = fake_nvml()
    seen = []
    s = GpuSampler(0.01, keep=1000, nvml=nvml, environ={}, on_sample=seen.append)
    s.start()
    time.sleep(0.2)
    s.close()
    n = sum(len(r) for r in s.samples.values())
    assert n >= 10 and len(seen) >= 5
    time.sleep(0.05)
    assert sum(len(r) for r in s.samples.values()) == n


def _report(rows: list[tuple], phases: list[dict], window_s: float = 1.0) -> PowerReport:
    frame = pd.DataFrame(rows, columns=["t", "worker", "gpu", "power_w", "energy_j", "util", "mem_used", "mem_free",
                                        "sm_clock_mhz"])
    return PowerReport(frame=frame, phases=pd.DataFrame(phases, columns=["name", "workers", "start", "end"]),
                       states={"w": "on: 2 GPU(s)"}, unsupported={}, window_s=window_s, max_ramp_w_per_s=1000.0)


def test_report_aggregates_gpus_and_draws_phases():
    rows = []
    for k in range(40):
        t = 100.0 + 0.1 * k
        busy = not (2.0 <= t - 100.0 < 3.0)
        for g in ("A", "B"):
            rows.append((t + (0.01 if g == "B" else 0.0), "w", g, 600.0 if busy else 100.0, 10.0 * k,
                         0.9 if busy else 0.0, 0, 0, 1400))
    r = _report(rows, [{"name": "ckpt", "workers": ["w"], "start": 102.0, "end": 103.0}])
    t, w = r.aggregate(grid_s=0.1)
    assert w.max() == 1200.0 and w.min() == 200.0
    m = r.metrics()
    assert m["swing_w"] == 1000.0 and m["ramp_limit_exceeded"] is True
    assert m["energy_counter_j"] == pytest.approx(2 * 390.0)
    assert 0.6 < m["utilisation"] < 0.8
    png = r.png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_power_report_on_a_cluster_without_gpus(tmp_path):
    with make_cluster(2) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS())
        t0 = time.time()
        with aimss_dask.sync_phase("ckpt", expected_s=0.2):
            time.sleep(0.2)
        r = aimss_dask.power_report(since=t0)
        assert set(r.states) == set(client.scheduler_info()["workers"])
        if gpu_count() == 0:
            assert all(s.startswith("off:") for s in r.states.values()), r.states
            assert r.frame.empty and r.summary is None and r.metrics() == {"states": r.states}
        assert list(r.phases["name"]) == ["ckpt"]
        assert 0.2 <= r.phases["end"][0] - r.phases["start"][0] < 1.0
        path = tmp_path / "power.png"
        assert r.png(str(path))[:4] == b"\x89PNG" and path.stat().st_size > 1000
        with pytest.raises(InvalidArgumentError, match="window_s=0"):
            aimss_dask.power_report(window_s=0)


@pytest.mark.gpu
def test_real_nvml_is_sampled_on_a_gpu_worker():
    if gpu_count() == 0:
        pytest.skip("no GPU visible to NVML here")
    with make_cluster(1) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(power={"interval": "20ms"}))
        time.sleep(1.0)
        r = aimss_dask.power_report()
        assert all(s.startswith("on:") for s in r.states.values()), r.states
        assert len(r.frame) >= 20
        assert np.nanmax(r.frame["power_w"].to_numpy(dtype=float)) > 0
        assert r.summary is not None and r.summary.energy_j > 0


def test_report_prefers_the_drivers_finer_samples():
    rows = [(100.0 + k, "w", "A", 300.0, 0.0, 0.5, 0, 0, 1400) for k in range(5)]
    r = _report(rows, [])
    t, w = r.aggregate(grid_s=1.0)
    assert set(w.tolist()) == {300.0}
    # The driver saw a 50 ms spike the 1 s samples average away.
    ft = np.arange(100.0, 104.0, 0.01)
    fw = np.where((ft >= 102.0) & (ft < 102.05), 700.0, 300.0)
    r.fine = pd.DataFrame({"t": ft, "worker": "w", "gpu": "A", "power_w": fw})
    t, w = r.aggregate()
    assert w.max() == 700.0 and r.metrics()["swing_w"] == 400.0
