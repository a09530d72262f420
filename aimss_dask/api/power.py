"""``aimss_dask.power_report()``: the cluster's GPU power over time, with its sync phases."""

from __future__ import annotations

import io
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aimss_dask.api.context import current
from aimss_dask.core.errors import InvalidArgumentError, MissingDependencyError
from aimss_dask.power.metrics import PowerSummary, aggregate, held, summarize


@dataclass
class PowerReport:
    """What :func:`power_report` returns.

    ``frame``: one row per sample (``t`` wall clock, ``worker``, ``gpu``
    UUID, ``power_w``, ``energy_j``, ``util`` 0-1, ``mem_used``,
    ``mem_free``, ``sm_clock_mhz``); ``phases``: the sync phases (``name``,
    ``workers``, ``start``, ``end``, None while open); ``states``: each
    worker's sampler (``on: ...`` or ``off: why``); ``unsupported``: per GPU,
    the metrics its driver does not report.
    """

    frame: Any
    phases: Any
    states: dict[str, str]
    unsupported: dict[str, list[str]]
    window_s: float
    max_ramp_w_per_s: float | None = None
    fine: Any = field(default=None, repr=False)

    def aggregate(self, grid_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The cluster's power (sum over GPUs) on one grid, over the span every GPU covers.

        From the driver's own power samples where every GPU has them (finer
        than the sampling interval, and not NVML's one-second average of
        newer GPUs), else from the sampled power. A GPU whose samples stop
        (its worker left) ends that span: pass ``since`` to
        :func:`power_report` to look at a stretch they all cover.
        """
        f = self.frame.dropna(subset=["power_w"])
        if f.empty:
            return np.empty(0), np.empty(0)
        fine = self.fine
        if fine is not None and not fine.empty and set(fine["gpu"]) >= set(f["gpu"]):
            f = fine
        if grid_s is None:
            per = f.groupby("gpu")["t"].apply(lambda t: np.median(np.diff(np.sort(t.to_numpy()))) if len(t) > 1 else 1.0)
            grid_s = float(per.median()) or 1.0
        lines = {g: (d["t"].to_numpy(), d["power_w"].to_numpy()) for g, d in f.sort_values("t").groupby("gpu")}
        return aggregate(lines, grid_s)

    @property
    def summary(self) -> PowerSummary | None:
        """Swing per window, maximum ramp, energy and utilisation of the aggregate; None without samples."""
        t, w = self.aggregate()
        if t.size < 2:
            return None
        util = None
        f = self.frame.dropna(subset=["util"])
        if not f.empty:
            # The cluster's utilisation at each point of the power's grid: the
            # mean of each GPU's reading in force then.
            per = [held(d["t"].to_numpy(), d["util"].to_numpy(), t) for _, d in f.sort_values("t").groupby("gpu")]
            util = np.mean(per, axis=0)
        return summarize(t, w, util, window_s=self.window_s, grid_s=float(t[1] - t[0]))

    def metrics(self) -> dict[str, Any]:
        """The summary as a dict, with the energy the GPUs' own counters measured and whether a ramp limit was passed."""
        s = self.summary
        out: dict[str, Any] = {"states": dict(self.states)}
        if s is None:
            return out
        out.update(s.as_dict())
        e = self.frame.dropna(subset=["energy_j"])
        if not e.empty:
            out["energy_counter_j"] = float(sum(d["energy_j"].max() - d["energy_j"].min() for _, d in e.groupby("gpu")))
        if self.max_ramp_w_per_s is not None:
            out["ramp_limit_w_per_s"] = self.max_ramp_w_per_s
            out["ramp_limit_exceeded"] = s.max_ramp_w_per_s > self.max_ramp_w_per_s
        return out

    def png(self, path: str | None = None) -> bytes:
        """A PNG of the cluster's power over time, sync phases shaded; written to ``path`` too if given."""
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise MissingDependencyError(
                "power_report().png() draws with matplotlib: pip install matplotlib"
            ) from e
        t, w = self.aggregate()
        fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
        try:
            t0 = float(t[0]) if t.size else 0.0
            if t.size:
                ax.plot(t - t0, w / 1000.0, lw=1.0, color="tab:blue", label="GPUs, sum")
            end = float(t[-1]) if t.size else t0
            for _, p in self.phases.iterrows():
                b = end if p["end"] is None or p["end"] != p["end"] else float(p["end"])
                ax.axvspan(float(p["start"]) - t0, b - t0, color="tab:orange", alpha=0.2, lw=0)
            ax.set_xlabel("time (s)")
            ax.set_ylabel("power (kW)")
            ax.set_title("GPU power" + ("" if t.size else ": no samples (" + "; ".join(sorted(set(self.states.values()))) + ")"))
            buf = io.BytesIO()
            fig.tight_layout()
            fig.savefig(buf, format="png")
        finally:
            plt.close(fig)
        data = buf.getvalue()
        if path is not None:
            with open(path, "wb") as f:
                f.write(data)
        return data


def power_report(since: float | None = None, window_s: float = 1.0, timeout: float = 10.0) -> PowerReport:
    """The GPU power, energy and utilisation every worker sampled, with the sync phases.

    ``since``: wall-clock time (``time.time()``) of the first sample wanted
    (default: all the workers keep, ``aimss.power.keep`` per GPU).
    ``window_s``: the window of the swing metric. Workers without NVML or a
    GPU say so in ``.states``; the report is then empty, not an error.

    Examples
    --------
    >>> r = aimss_dask.power_report()                  # doctest: +SKIP
    >>> r.metrics()["swing_w"], r.frame.columns[:3]     # doctest: +SKIP
    (2150.0, Index(['t', 'worker', 'gpu'], dtype='object'))
    >>> r.png("power.png")                              # doctest: +SKIP
    """
    import pandas as pd

    if since is not None and (not isinstance(since, numbers.Real) or isinstance(since, bool)):
        raise InvalidArgumentError(f"power_report(since={since!r}): give a time.time() value, or None for all")
    if not isinstance(window_s, numbers.Real) or isinstance(window_s, bool) or not window_s > 0:
        raise InvalidArgumentError(f"power_report(window_s={window_s!r}): give a positive number of seconds")
    ep = current("power_report")
    reply = ep.scheduler_op("power_timelines", since=float(since or 0.0), timeout=float(timeout))
    ramp = reply.get("max_ramp_w_per_s")
    rows: list[pd.DataFrame] = []
    fine: list[pd.DataFrame] = []
    states: dict[str, str] = {}
    unsupported: dict[str, list[str]] = {}
    for worker, tl in sorted(reply["workers"].items()):
        states[worker] = str(tl.get("state"))
        unsupported.update(tl.get("unsupported") or {})
        cols = tl.get("columns") or {}
        if cols.get("t"):
            d = pd.DataFrame(cols)
            d.insert(1, "worker", worker)
            rows.append(d)
        ps = tl.get("power_samples") or {}
        if ps.get("t"):
            d = pd.DataFrame(ps)
            d.insert(1, "worker", worker)
            fine.append(d)
    columns = ["t", "worker", "gpu", "power_w", "energy_j", "util", "mem_used", "mem_free", "sm_clock_mhz"]
    frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    frame = frame.sort_values("t", kind="stable").reset_index(drop=True)
    for c in ("power_w", "energy_j", "util"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    phases = pd.DataFrame(reply["phases"], columns=["name", "workers", "start", "end"])
    return PowerReport(
        frame=frame, phases=phases, states=states, unsupported=unsupported, window_s=float(window_s),
        max_ramp_w_per_s=ramp, fine=pd.concat(fine, ignore_index=True) if fine else None,
    )
