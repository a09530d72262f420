"""A worker's GPU power, energy, utilisation, memory and clock, sampled through NVML.

Every ``aimss.power.interval`` a thread of its own reads, per GPU the worker
sees (``CUDA_VISIBLE_DEVICES``, by index or UUID; MIG instances through
their parent GPU for power and clocks): power (mW), the energy counter
(``nvmlDeviceGetTotalEnergyConsumption``, mJ since the driver loaded),
utilisation, memory and SM clock, into a ring of ``aimss.power.keep``
samples. Where the driver keeps its own finer power samples
(``nvmlDeviceGetSamples(..., NVML_TOTAL_POWER_SAMPLES, ...)``) it drains
those too, so a swing shorter than the interval is not missed.

A metric the device does not support (``NVMLError_NotSupported``; MIG has
no utilisation) is left out from then on, and said so. Without NVML, or
without a GPU, the sampler is off and says why; it never fails the worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any

from aimss_dask.power.gpu import optional_import

logger = logging.getLogger("aimss_dask")

#: The columns of a sample, in order.
COLUMNS = ("t", "gpu", "power_w", "energy_j", "util", "mem_used", "mem_free", "sm_clock_mhz")
#: nvmlValueType_t -> the field of nvmlValue_t that holds it.
_VALUE_FIELD = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def visible_devices(environ: dict[str, str] | None = None) -> list[str] | None:
    """The devices ``CUDA_VISIBLE_DEVICES`` names (indices or UUIDs); ``None``: unset (all)."""
    env = os.environ if environ is None else environ
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    return [d.strip() for d in raw.split(",") if d.strip()]


class _Device:
    def __init__(self, nvml: ModuleType, handle: Any, power_handle: Any, uuid: str) -> None:
        self.nvml, self.handle, self.power_handle, self.uuid = nvml, handle, power_handle, uuid
        self.unsupported: set[str] = set()
        self.last_sample_us = 0

    def read(self, name: str, fn: Callable[[], Any]) -> Any:
        if name in self.unsupported:
            return None
        try:
            return fn()
        except Exception as e:
            if type(e).__name__ in ("NVMLError_NotSupported", "NVMLError_FunctionNotFound"):
                self.unsupported.add(name)
            return None


class GpuSampler:
    """NVML samples of the GPUs this worker sees, in a ring; off (with a reason) without them.

    ``nvml``: the module to use (``pynvml`` of ``nvidia-ml-py`` by default;
    tests pass a fake). ``on_sample``: called on the sampling thread with
    each round's samples (the worker forwards what the coordinator needs).

    Examples
    --------
    >>> s = GpuSampler(interval=0.05, keep=100, nvml=None)   # doctest: +SKIP
    >>> s.start(); s.state                                     # doctest: +SKIP
    'off: NVML (the gpu extra, nvidia-ml-py) is not installed'
    """

    def __init__(
        self, interval: float, keep: int, *, nvml: ModuleType | None | bool = True,
        on_sample: Callable[[list[tuple[Any, ...]]], None] | None = None,
        environ: dict[str, str] | None = None, clock: Callable[[], float] = time.time,
    ) -> None:
        self.interval, self.keep = interval, keep
        self._nvml_arg = nvml
        self.nvml: ModuleType | None = None
        self.on_sample = on_sample
        self.environ = environ
        self.clock = clock
        self.devices: list[_Device] = []
        #: Per GPU, its last ``keep`` samples.
        self.samples: dict[str, deque[tuple[Any, ...]]] = {}
        #: Per GPU, the driver's power samples (t, gpu, watts), finer than ``interval`` where supported.
        self.power_samples: dict[str, deque[tuple[float, str, float]]] = {}
        self.state = "off: not started"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Find the GPUs and start sampling; the state (``on: N GPU(s)`` or ``off: why``)."""
        nvml = optional_import("pynvml") if self._nvml_arg is True else self._nvml_arg
        if not nvml:
            self.state = "off: NVML (the gpu extra, nvidia-ml-py) is not installed"
            return self.state
        try:
            nvml.nvmlInit()
        except Exception as e:
            self.state = f"off: NVML did not start ({type(e).__name__}: {e}); no GPU driver here?"
            return self.state
        self.nvml = nvml
        try:
            self.devices = self._find_devices(nvml)
        except Exception as e:
            self.devices = []
            self.state = f"off: NVML could not list the GPUs ({type(e).__name__}: {e})"
        if not self.devices:
            if self.state.startswith("off: not"):
                self.state = "off: no GPU visible to this worker"
            self._shutdown()
            return self.state
        self.state = f"on: {len(self.devices)} GPU(s), every {self.interval:g} s"
        self._thread = threading.Thread(target=self._loop, name="aimss-gpu-sampler", daemon=True)
        self._thread.start()
        return self.state

    def _find_devices(self, nvml: ModuleType) -> list[_Device]:
        wanted = visible_devices(self.environ)
        if wanted is None:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        else:
            handles = []
            for d in wanted:
                if d.isdigit():
                    handles.append(nvml.nvmlDeviceGetHandleByIndex(int(d)))
                else:
                    handles.append(nvml.nvmlDeviceGetHandleByUUID(d.encode() if isinstance(d, str) else d))
        out = []
        for h in handles:
            power = h
            try:
                if nvml.nvmlDeviceIsMigDeviceHandle(h):
                    # Power, energy and clocks are the physical GPU's.
                    power = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(h)
            except Exception:
                pass
            uuid = nvml.nvmlDeviceGetUUID(h)
            out.append(_Device(nvml, h, power, uuid.decode() if isinstance(uuid, bytes) else str(uuid)))
        return out

    def sample_once(self) -> list[tuple[Any, ...]]:
        """One round: a sample per GPU, appended to the ring (and returned)."""
        nvml = self.nvml
        assert nvml is not None
        got = []
        for d in self.devices:
            t = self.clock()
            mw = d.read("power", lambda: nvml.nvmlDeviceGetPowerUsage(d.power_handle))
            mj = d.read("energy", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(d.power_handle))
            util = d.read("util", lambda: nvml.nvmlDeviceGetUtilizationRates(d.handle))
            mem = d.read("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(d.handle))
            clock = d.read("sm_clock", lambda: nvml.nvmlDeviceGetClockInfo(d.power_handle, nvml.NVML_CLOCK_SM))
            row = (
                t, d.uuid,
                None if mw is None else mw / 1000.0,
                None if mj is None else mj / 1000.0,
                None if util is None else util.gpu / 100.0,
                None if mem is None else int(mem.used),
                None if mem is None else int(mem.free),
                None if clock is None else int(clock),
            )
            got.append(row)
            ring = self.samples.get(d.uuid)
            if ring is None:
                ring = self.samples[d.uuid] = deque(maxlen=self.keep)
            ring.append(row)
            self._drain_power_samples(d, t)
        return got

    def _drain_power_samples(self, d: _Device, now: float) -> None:
        nvml = self.nvml
        assert nvml is not None
        kind = getattr(nvml, "NVML_TOTAL_POWER_SAMPLES", None)
        if kind is None:
            return
        got = d.read("power_samples", lambda: nvml.nvmlDeviceGetSamples(d.power_handle, kind, d.last_sample_us))
        if not got:
            return
        vtype, samples = got
        field = _VALUE_FIELD.get(int(vtype), "uiVal")
        # The driver's timestamps are microseconds on its own clock: put
        # the newest at ``now`` and the others before it.
        if not samples:
            return
        newest = max(int(s.timeStamp) for s in samples)
        ring = self.power_samples.get(d.uuid)
        if ring is None:
            ring = self.power_samples[d.uuid] = deque(maxlen=self.keep * 4)
        for s in sorted(samples, key=lambda s: int(s.timeStamp)):
            ts = int(s.timeStamp)
            if ts <= d.last_sample_us:
                continue
            ring.append((now - (newest - ts) / 1e6, d.uuid, getattr(s.sampleValue, field) / 1000.0))
        d.last_sample_us = max(d.last_sample_us, newest)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                rows = self.sample_once()
                if self.on_sample is not None:
                    self.on_sample(rows)
            except Exception as e:  # a sampler that fails stops, and says so; the worker goes on
                self.state = f"off: sampling failed ({type(e).__name__}: {e})"
                logger.warning("aimss: GPU sampling stopped: %r", e)
                return

    def unsupported(self) -> dict[str, list[str]]:
        """Per GPU, the metrics its device or driver does not support."""
        return {d.uuid: sorted(d.unsupported) for d in self.devices}

    def timeline(self, since: float = 0.0) -> dict[str, Any]:
        """The samples taken at or after ``since`` (wall clock), as columns, and the state."""
        rows = sorted((r for ring in list(self.samples.values()) for r in list(ring) if r[0] >= since),
                      key=lambda r: r[0])
        fine = sorted((r for ring in list(self.power_samples.values()) for r in list(ring) if r[0] >= since),
                      key=lambda r: r[0])
        return {
            "state": self.state,
            "columns": {c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)},
            "power_samples": {"t": [r[0] for r in fine], "gpu": [r[1] for r in fine], "power_w": [r[2] for r in fine]},
            "unsupported": self.unsupported(),
        }

    def _shutdown(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # At most one sampling round to wait for; a thread still inside
            # NVML after that keeps it (shut down at the process's exit).
            self._thread.join(timeout=2 * self.interval + 0.1)
            alive = self._thread.is_alive()
            self._thread = None
            if alive:
                return
        self._shutdown()
