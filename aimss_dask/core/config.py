"""The ``aimss:`` block of Dask's configuration, parsed once into a frozen dataclass.

Defaults ship in ``aimss.yaml`` beside this file; ``DASK_AIMSS__MEMORY_LIMIT=4GiB``
style environment variables and YAML files in Dask's config path override them,
and arguments of ``AIMSS(...)`` override both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

import dask.config
import yaml
from dask.utils import format_bytes, parse_bytes, parse_timedelta

from aimss_dask.core.errors import InvalidArgumentError

# The defaults live at the package's root, where Dask's own config files do.
_YAML = os.path.join(os.path.dirname(os.path.dirname(__file__)), "aimss.yaml")

with open(_YAML) as _f:
    _DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

# Defaults go *under* whatever the user configured (files, environment).
dask.config.update_defaults(_DEFAULTS)


def _bad(key: str, message: str) -> InvalidArgumentError:
    """An error about option ``key`` (``-`` spelling); ``load`` adds where it was set."""
    err = InvalidArgumentError(message)
    err.aimss_key = key.replace("-", "_")  # type: ignore[attr-defined]
    return err


def _bytes(key: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    try:
        n = parse_bytes(value) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as e:
        raise _bad(
            key,
            f"aimss {key}={value!r} is not a size; give a number of bytes or a "
            "string such as '4GiB'",
        ) from e
    if isinstance(value, bool) or n <= 0:
        raise _bad(key, f"aimss {key}={value!r} must be a positive size")
    return n


#: Dask's worker memory thresholds, as fractions of the worker's memory limit.
#: Past ``target`` Dask spills task data, past ``spill`` it spills by process
#: memory, past ``pause`` the worker stops running tasks, past ``terminate``
#: the nanny kills it. The log lives in process memory that Dask cannot
#: spill, so it must stay below the first of them that is enabled.
MEMORY_THRESHOLDS = ("target", "spill", "pause", "terminate")

#: AIMSS memory per byte of log budget: the log, plus its buffers beside it
#: (operator scratch takes up to an eighth of the budget) and a margin.
#: With Dask's defaults (target 0.6) this makes the default memory-fraction,
#: 0.5, the largest budget that fits.
OVERHEAD = 1.2


def dask_memory_thresholds() -> dict[str, float | bool]:
    """This process's ``distributed.worker.memory.*`` fractions (False: disabled)."""
    out: dict[str, float | bool] = {}
    for name in MEMORY_THRESHOLDS:
        value = dask.config.get(f"distributed.worker.memory.{name}", default=False)
        out[name] = False if value in (None, False) else float(value)
    return out


@dataclass(frozen=True)
class BudgetCheck:
    """Whether a log budget fits a worker, and the largest one that does.

    The rule: a worker's log may hold at most ``reference × f / 1.2`` bytes,
    where ``reference`` is the worker's Dask memory limit (the machine's
    memory when it has none), ``f`` the lowest enabled Dask memory threshold
    (``distributed.worker.memory.target``, 0.6, by default; 0.95 with every
    threshold disabled), and 1.2 covers AIMSS's buffers beside the log. With
    Dask's defaults that is half the worker's memory limit.

    Examples
    --------
    >>> c = BudgetCheck.of(2**30, 2**30, {"target": 0.6, "spill": 0.7})
    >>> c.fits, c.largest, c.bound
    (False, 536870912, 'distributed.worker.memory.target=0.6')
    """

    requested: int
    largest: int
    reference: int  # the worker's memory limit, or the machine's memory
    bound: str  # the threshold that sets ``largest``
    no_limit: bool = False  # the worker has no Dask memory limit

    @classmethod
    def of(
        cls,
        requested: int,
        worker_memory_limit: int | None,
        thresholds: dict[str, float | bool],
    ) -> BudgetCheck:
        no_limit = not worker_memory_limit
        reference = int(worker_memory_limit or _system_memory())
        enabled = [(float(v), k) for k, v in thresholds.items() if v not in (False, None) and float(v) > 0]
        if enabled:
            frac, name = min(enabled)
            bound = f"distributed.worker.memory.{name}={frac:g}"
        else:
            frac, bound = 0.95, "95% (every Dask memory threshold is disabled)"
        # round(): 0.6 / 1.2 is a hair under 0.5 in floating point, and the
        # default fraction's budget must fit exactly.
        return cls(requested, int(round(reference * frac / OVERHEAD)), reference, bound, no_limit)

    @property
    def fits(self) -> bool:
        return self.requested <= self.largest

    def explain(self, where: str) -> str:
        """Why the budget does not fit ``where`` (a worker address), with the fix."""
        whose = (
            f"the machine's memory ({format_bytes(self.reference)}; the worker has no "
            "Dask memory limit)"
            if self.no_limit
            else f"its Dask memory limit ({format_bytes(self.reference)})"
        )
        return (
            f"an AIMSS log budget of {self.requested} bytes ({format_bytes(self.requested)}) "
            f"does not fit worker {where}: the log and AIMSS's buffers beside it "
            f"({OVERHEAD:g}x the budget) must stay below {self.bound} of {whose}, "
            f"so the largest budget that fits is {self.largest} bytes "
            f"({format_bytes(self.largest)})"
        )


def _number(key: str, value: Any, low: float, high: float, *, low_open: bool = False, what: str = "") -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``), or a clear error."""
    try:
        if isinstance(value, bool):
            raise TypeError
        x = float(value)
    except (TypeError, ValueError):
        raise _bad(key, f"aimss {key}={value!r} is not a number; {what}") from None
    if not (low < x if low_open else low <= x) or x > high or x != x:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _bad(key, f"aimss {key}={value!r} must be in {span}; {what}")
    return x


def _duration(key: str, value: Any, *, positive: bool) -> float:
    """Seconds from a number or a string such as ``'500ms'``, or a clear error."""
    try:
        if isinstance(value, bool):
            raise TypeError
        x = float(value) if isinstance(value, (int, float)) else parse_timedelta(value, default="s")
    except (TypeError, ValueError, KeyError):
        x = None
    if x is None or x < 0 or (positive and x == 0) or x != x:
        raise _bad(
            key,
            f"aimss {key}={value!r} is not a {'positive' if positive else 'non-negative'} duration; "
            "give seconds or a string such as '500ms'",
        )
    return float(x)


def _section(cls: Any, section: str, raw: Any, example: str) -> dict[str, Any] | None:
    """A config section's keys as field names; None if it is not set; a clear error if it is not a mapping."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad(section, f"aimss {section}={raw!r} must be a mapping of options such as {example}")
    return _section_keys(cls, section, raw)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(key.split(".")[0], f"aimss {key}={value!r} must be true or false")
    return value


def _section_keys(cls: Any, section: str, raw: dict[Any, Any]) -> dict[str, Any]:
    """A config section's keys as field names; an unknown key is an error naming the known ones."""
    d = {str(k).replace("-", "_"): v for k, v in raw.items()}
    known = {f.name for f in fields(cls)}
    typos = sorted(k for k in d if k not in known)
    if typos:
        raise _bad(
            section,
            f"unknown key(s) {typos} in aimss {section}; known keys: "
            f"{sorted(k.replace('_', '-') for k in known)}",
        )
    return d


@dataclass(frozen=True)
class SpeculationConfig:
    """``aimss.speculation``: which tasks and consumers are stragglers, and how many copies may run.

    A task of a task group is a straggler once ``quantile`` of the group's
    tasks are done and it has run longer than ``multiplier`` times their
    median and at least ``min_runtime`` seconds (Spark's rule); a stream
    consumer, or an operator task that reports progress, is one when its
    estimated time left is ``multiplier`` times the median of its peers' and
    its rate is below theirs (LATE's rule). Stragglers are always reported;
    ``enabled`` lets AIMSS run copies of them (AIMSS operators, and tasks
    marked idempotent), at most ``max_fraction`` of the cluster's threads at
    once. The rules run every ``interval`` seconds.

    Examples
    --------
    >>> AIMSSConfig.load(speculation={"multiplier": 3}).speculation.multiplier
    3.0
    """

    enabled: bool = True
    quantile: float = 0.75
    multiplier: float = 2.0
    min_runtime: float = 1.0
    max_fraction: float = 0.25
    interval: float = 0.5

    @classmethod
    def parse(cls, raw: Any) -> SpeculationConfig:
        d = _section(cls, "speculation", raw, "{'enabled': True, 'multiplier': 2}")
        if d is None:
            return cls()
        return cls(
            enabled=_flag("speculation.enabled", d.get("enabled", True)),
            quantile=_number(
                "speculation.quantile", d.get("quantile", 0.75), 0.0, 1.0, low_open=True,
                what="the fraction of a task group that must be done before its stragglers are judged",
            ),
            multiplier=_number(
                "speculation.multiplier", d.get("multiplier", 2.0), 1.0, float("inf"),
                what="how many times the median a task may run before it is a straggler (>= 1)",
            ),
            min_runtime=_duration("speculation.min-runtime", d.get("min_runtime", 1.0), positive=False),
            max_fraction=_number(
                "speculation.max-fraction", d.get("max_fraction", 0.25), 0.0, 1.0,
                what="the share of the cluster's threads that may run copies",
            ),
            interval=_duration("speculation.interval", d.get("interval", 0.5), positive=True),
        )


@dataclass(frozen=True)
class IOConfig:
    """``aimss.io``: the coordinated I/O scheduler of file writes (Zarr sinks).

    With ``enabled``, a worker asks the coordinator before it writes a
    sink's units to a file system; the coordinator lets at most
    ``max_concurrent_writes_per_node`` writers of one host write to one file
    system at a time, higher ``io_priority`` first, and one application's
    burst at a time: an application keeps the node for ``turn`` seconds
    while others wait, then the one that waited longest gets it; one that
    holds ``share`` of the node's writers goes after the others. A worker
    holds what it was granted for up to ``lease`` seconds of back-to-back
    writes, so it asks about once per lease, not once per chunk.

    Examples
    --------
    >>> IOConfig.parse({"max-concurrent-writes-per-node": 2}).max_concurrent_writes_per_node
    2
    """

    enabled: bool = True
    max_concurrent_writes_per_node: int = 4
    turn: float = 1.0
    lease: float = 0.25
    share: float = 1.0

    @classmethod
    def parse(cls, raw: Any) -> IOConfig:
        d = _section(cls, "io", raw, "{'enabled': True, 'max-concurrent-writes-per-node': 4}")
        if d is None:
            return cls()
        n = d.get("max_concurrent_writes_per_node", 4)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _bad(
                "io",
                f"aimss io.max-concurrent-writes-per-node={n!r} must be an int >= 1 "
                "(writers of one host that may write to one file system at once)",
            )
        return cls(
            enabled=_flag("io.enabled", d.get("enabled", True)),
            max_concurrent_writes_per_node=n,
            turn=_duration("io.turn", d.get("turn", 1.0), positive=True),
            lease=_duration("io.lease", d.get("lease", 0.25), positive=True),
            share=_number(
                "io.share", d.get("share", 1.0), 0.0, 1.0, low_open=True,
                what="the fraction of a node's writers one application may hold while another waits",
            ),
        )


@dataclass(frozen=True)
class SinkConfig:
    """``aimss.sink``: how Zarr sinks write.

    ``shared_filesystem``: whether the workers on several hosts share the
    POSIX file system the arrays are written to, so that they may write
    units in place there (``None``: found from the file system's type;
    Lustre, GPFS and BeeGFS are shared, NFS is not used that way).

    Examples
    --------
    >>> SinkConfig.parse({"shared-filesystem": True}).shared_filesystem
    True
    """

    shared_filesystem: bool | None = None

    @classmethod
    def parse(cls, raw: Any) -> SinkConfig:
        d = _section(cls, "sink", raw, "{'shared-filesystem': True}")
        if d is None:
            return cls()
        shared = d.get("shared_filesystem")
        if shared is not None and not isinstance(shared, bool):
            raise _bad(
                "sink",
                f"aimss sink.shared-filesystem={shared!r} must be true, false or null (found from the file system)",
            )
        return cls(shared_filesystem=shared)


@dataclass(frozen=True)
class FillConfig:
    """``aimss.fill``: idle filling (:func:`aimss_dask.fill`).

    While fillers wait, the coordinator looks for places every ``tick``
    seconds (and at once when a sync phase opens or a slice ends). A GPU
    below ``util_threshold`` utilisation for ``dip_after`` seconds, or task
    threads idle that long, is in a dip and gets slices of ``dip_slice``
    seconds; in a sync phase a slice gets the phase's expected time left
    less ``safety`` of it. Windows under ``min_slice`` are not filled, and a
    GPU slice never takes more than its device's free memory less
    ``memory_reserve`` of it.

    Examples
    --------
    >>> FillConfig.parse({"dip-slice": "100ms"}).dip_slice
    0.1
    """

    tick: float = 0.1
    util_threshold: float = 0.3
    dip_after: float = 0.2
    dip_slice: float = 0.25
    safety: float = 0.1
    min_slice: float = 0.01
    memory_reserve: float = 0.1

    @classmethod
    def parse(cls, raw: Any) -> FillConfig:
        d = _section(cls, "fill", raw, "{'tick': '100ms', 'dip-slice': '250ms'}")
        if d is None:
            return cls()

        def get(key: str) -> Any:
            name = key.replace("-", "_")
            return d.get(name, getattr(cls, name))

        def share(key: str, what: str) -> float:
            x = _number(f"fill.{key}", get(key), 0.0, 1.0, what=what)
            if x >= 1.0:
                raise _bad("fill", f"aimss fill.{key}={x!r} must be below 1 ({what})")
            return x

        return cls(
            tick=_duration("fill.tick", get("tick"), positive=True),
            util_threshold=share("util-threshold", "the GPU utilisation below which a GPU is idle"),
            dip_after=_duration("fill.dip-after", get("dip-after"), positive=False),
            dip_slice=_duration("fill.dip-slice", get("dip-slice"), positive=True),
            safety=share("safety", "the share of a phase's time left that no slice takes"),
            min_slice=_duration("fill.min-slice", get("min-slice"), positive=False),
            memory_reserve=share("memory-reserve", "the share of a GPU's free memory no slice takes"),
        )


@dataclass(frozen=True)
class PowerConfig:
    """``aimss.power``: GPU power sampling, and sync phases.

    Workers with a GPU (and NVML, the ``gpu`` extra) sample power, energy,
    utilisation, memory and SM clock every ``interval`` seconds into a ring
    of ``keep`` samples per GPU. With ``auto_phases`` AIMSS opens sync
    phases of its own around its barriers (a shuffle's seal, a wait for a
    sink). With ``target_floor`` (W per GPU) the coordinator fills only as
    many GPUs in sync phases as it takes to hold that power on average
    over them (see :class:`aimss_dask.power.policy.FillPolicy`);
    ``max_ramp_w_per_s`` is the ramp the power report flags as exceeded.

    Examples
    --------
    >>> PowerConfig.parse({"interval": "20ms"}).interval
    0.02
    """

    interval: float = 0.05
    keep: int = 12000
    auto_phases: bool = True
    target_floor: float | None = None
    max_ramp_w_per_s: float | None = None

    @classmethod
    def parse(cls, raw: Any) -> PowerConfig:
        d = _section(cls, "power", raw, "{'interval': '50ms'}")
        if d is None:
            return cls()
        keep = d.get("keep", cls.keep)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 2:
            raise _bad("power", f"aimss power.keep={keep!r} must be an int >= 2 (samples kept per GPU)")

        def watts(key: str) -> float | None:
            v = d.get(key.replace("-", "_"))
            if v is None:
                return None
            return _number(f"power.{key}", v, 0.0, 1e9, low_open=True, what="watts (null: off)")

        return cls(
            interval=_duration("power.interval", d.get("interval", cls.interval), positive=True),
            keep=keep,
            auto_phases=_flag("power.auto-phases", d.get("auto_phases", cls.auto_phases)),
            target_floor=watts("target-floor"),
            max_ramp_w_per_s=watts("max-ramp-w-per-s"),
        )


@dataclass(frozen=True)
class AIMSSConfig:
    """Settings of one AIMSS deployment; every size is in bytes.

    Examples
    --------
    >>> AIMSSConfig.load(memory_limit="1GiB").memory_limit
    1073741824
    """

    memory_limit: int | None = None
    memory_fraction: float = 0.5
    spill_directory: str | None = None
    replication: int = 1
    recovery: str = "offsets"
    recovery_rate: int | None = 512 * 2**20
    segment_size: int = 4 * 2**20
    batch_size: int = 4 * 2**20
    linger: float = 0.005
    max_in_flight: int = 64 * 2**20
    read_batch_size: int = 16 * 2**20
    transport: str = "auto"
    speculation: SpeculationConfig = SpeculationConfig()
    sink: SinkConfig = SinkConfig()
    io: IOConfig = IOConfig()
    fill: FillConfig = FillConfig()
    power: PowerConfig = PowerConfig()
    trace: str | None = None
    liveness_interval: float = 2.0
    keep_idle_buffers: float = 60.0

    @classmethod
    def load(cls, **overrides: Any) -> AIMSSConfig:
        """Read ``aimss:`` from Dask's config, then apply non-None ``overrides``."""
        raw = dict(dask.config.get("aimss", default={}) or {})
        merged: dict[str, Any] = {k.replace("-", "_"): v for k, v in raw.items()}
        known = {f.name for f in fields(cls)}
        typos = sorted(k for k in raw if k.replace("-", "_") not in known)
        if typos:
            raise InvalidArgumentError(
                f"unknown key(s) {typos} in the aimss: block of the Dask config "
                f"(files or DASK_AIMSS__* variables); known keys: "
                f"{sorted(k.replace('_', '-') for k in known)}"
            )
        for k, v in overrides.items():
            if k not in known:
                raise InvalidArgumentError(
                    f"unknown AIMSS option {k!r}; known options: {sorted(known)}"
                )
            if v is None:
                continue
            if k in ("speculation", "io", "fill", "power") and isinstance(v, dict) and isinstance(merged.get(k), dict):
                # Options given here go over the configured ones, key by key.
                v = {**merged[k], **{str(o).replace("_", "-"): x for o, x in v.items()}}
            merged[k] = v
        try:
            return cls._parse(merged)
        except InvalidArgumentError as e:
            key = getattr(e, "aimss_key", None)
            var = _env_variable(key, merged) if key else None
            if var is None or overrides.get(key.split(".")[0]) is not None:
                raise
            raise InvalidArgumentError(
                f"{e} (set by the environment variable {var}; fix or unset it)"
            ) from None

    @classmethod
    def _parse(cls, d: dict[str, Any]) -> AIMSSConfig:
        raw_frac = d.get("memory_fraction", 0.5)
        try:
            frac = float(raw_frac)
        except (TypeError, ValueError):
            raise _bad(
                "memory-fraction",
                f"aimss memory-fraction={raw_frac!r} is not a number; give e.g. 0.5",
            ) from None
        if not 0 < frac <= 1:
            raise _bad("memory-fraction", f"aimss memory-fraction={frac!r} must be in (0, 1]")
        replication = d.get("replication", 1)
        if not isinstance(replication, int) or isinstance(replication, bool):
            raise _bad("replication", f"aimss replication={replication!r} must be an integer")
        if replication < 1:
            raise _bad(
                "replication",
                f"aimss replication={replication!r} must be >= 1 (the copies of each partition)",
            )
        raw_linger = d.get("linger", 0.005)
        try:
            if isinstance(raw_linger, (int, float)) and not isinstance(raw_linger, bool):
                linger = float(raw_linger)
            else:
                linger = parse_timedelta(raw_linger, default="s")
        except (TypeError, ValueError, KeyError):
            raise _bad(
                "linger",
                f"aimss linger={raw_linger!r} is not a duration; give seconds or a "
                "string such as '5ms'",
            ) from None
        if linger is None or linger < 0:
            raise _bad("linger", f"aimss linger={raw_linger!r} must be >= 0")
        spill = d.get("spill_directory")
        recovery = d.get("recovery", "offsets")
        if recovery not in ("offsets", "full"):
            raise _bad(
                "recovery",
                f"aimss recovery={recovery!r} is not one of 'offsets' (copy only what a consumer "
                "group has not passed), 'full' (copy every record)",
            )
        transport = d.get("transport", "auto")
        if transport not in ("auto", "dask"):
            raise _bad("transport", f"aimss transport={transport!r} is not one of 'auto', 'dask'")
        trace = d.get("trace")
        if trace is not None and (not isinstance(trace, (str, os.PathLike)) or not os.fspath(trace)):
            raise _bad("trace", f"aimss trace={trace!r} must be a folder (made if missing) or null")
        return cls(
            liveness_interval=_duration("liveness-interval", d.get("liveness_interval", 2.0), positive=True),
            keep_idle_buffers=_duration("keep-idle-buffers", d.get("keep_idle_buffers", 60.0), positive=False),
            trace=None if trace is None else os.path.abspath(os.fspath(trace)),
            transport=transport,
            memory_limit=_bytes("memory-limit", d.get("memory_limit"), allow_none=True),
            memory_fraction=frac,
            spill_directory=os.fspath(spill) if spill is not None else None,
            replication=replication,
            recovery=recovery,
            recovery_rate=_bytes("recovery-rate", d.get("recovery_rate", "512MiB"), allow_none=True),
            segment_size=_bytes("segment-size", d.get("segment_size", "4MiB")) or 0,
            batch_size=_bytes("batch-size", d.get("batch_size", "4MiB")) or 0,
            linger=float(linger),
            max_in_flight=_bytes("max-in-flight", d.get("max_in_flight", "64MiB")) or 0,
            read_batch_size=_bytes("read-batch-size", d.get("read_batch_size", "16MiB"))
            or 0,
            speculation=SpeculationConfig.parse(d.get("speculation")),
            sink=SinkConfig.parse(d.get("sink")),
            io=IOConfig.parse(d.get("io")),
            fill=FillConfig.parse(d.get("fill")),
            power=PowerConfig.parse(d.get("power")),
        )

    def requested_budget(self, worker_memory_limit: int | None) -> int:
        """The log budget asked for on a worker with this Dask memory limit."""
        if self.memory_limit is not None:
            return self.memory_limit
        base = worker_memory_limit or _system_memory()
        return max(int(base * self.memory_fraction), 16 * 2**20)

    def check_budget(
        self,
        worker_memory_limit: int | None,
        thresholds: dict[str, float | bool] | None = None,
    ) -> BudgetCheck:
        """Whether this budget fits a worker; see :class:`BudgetCheck` for the rule."""
        return BudgetCheck.of(
            self.requested_budget(worker_memory_limit),
            worker_memory_limit,
            dask_memory_thresholds() if thresholds is None else thresholds,
        )

    def spill_root(self, local_directory: str) -> str:
        """The folder a worker whose Dask local directory is ``local_directory`` spills under.

        >>> AIMSSConfig().spill_root("/scratch/w1")
        '/scratch/w1/aimss-spill'
        """
        return self.spill_directory or os.path.join(local_directory, "aimss-spill")

    def resolve_for_worker(
        self,
        worker_memory_limit: int | None,
        local_directory: str,
        thresholds: dict[str, float | bool] | None = None,
    ) -> AIMSSConfig:
        """Fill the worker-dependent defaults: the byte budget and spill folder.

        A budget the worker cannot hold (:meth:`check_budget`) is clamped to
        the largest that fits; the caller warns.
        """
        check = self.check_budget(worker_memory_limit, thresholds)
        return replace(
            self,
            memory_limit=min(check.requested, check.largest),
            spill_directory=self.spill_root(local_directory),
        )


def _env_variable(key: str, merged: dict[str, Any]) -> str | None:
    """The ``DASK_AIMSS__*`` variable that set ``key`` (``a.b`` for a nested one) to its value in ``merged``."""
    path = key.split(".")
    var = "DASK_AIMSS__" + "__".join(part.upper() for part in path)
    if var not in os.environ:
        return None
    value: Any = merged
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part, value.get(part.replace("_", "-")))
    env: Any = dask.config.collect_env({var: os.environ[var]}).get("aimss", {})
    for part in path:
        if not isinstance(env, dict):
            return None
        env = env.get(part, env.get(part.replace("_", "-")))
    return var if env == value else None


def _system_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)
