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
from dask.utils import parse_bytes, parse_timedelta

from aimss_dask.errors import InvalidArgumentError

_YAML = os.path.join(os.path.dirname(__file__), "aimss.yaml")

with open(_YAML) as _f:
    _DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

# Defaults go *under* whatever the user configured (files, environment).
dask.config.update_defaults(_DEFAULTS)


def _bytes(key: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    try:
        n = parse_bytes(value) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(
            f"aimss {key}={value!r} is not a size; give a number of bytes or a "
            "string such as '4GiB'"
        ) from e
    if isinstance(value, bool) or n <= 0:
        raise InvalidArgumentError(f"aimss {key}={value!r} must be a positive size")
    return n


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
    segment_size: int = 4 * 2**20
    batch_size: int = 4 * 2**20
    linger: float = 0.005
    max_in_flight: int = 64 * 2**20
    read_batch_size: int = 16 * 2**20
    transport: str = "auto"

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
            if v is not None:
                merged[k] = v
        return cls._parse(merged)

    @classmethod
    def _parse(cls, d: dict[str, Any]) -> AIMSSConfig:
        raw_frac = d.get("memory_fraction", 0.5)
        try:
            frac = float(raw_frac)
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"aimss memory-fraction={raw_frac!r} is not a number; give e.g. 0.5"
            ) from None
        if not 0 < frac <= 1:
            raise InvalidArgumentError(
                f"aimss memory-fraction={frac!r} must be in (0, 1]"
            )
        replication = d.get("replication", 1)
        if not isinstance(replication, int) or isinstance(replication, bool):
            raise InvalidArgumentError(
                f"aimss replication={replication!r} must be an integer"
            )
        if replication != 1:
            raise InvalidArgumentError(
                f"aimss replication={replication!r} is not supported yet; use 1"
            )
        raw_linger = d.get("linger", 0.005)
        try:
            if isinstance(raw_linger, (int, float)) and not isinstance(raw_linger, bool):
                linger = float(raw_linger)
            else:
                linger = parse_timedelta(raw_linger, default="s")
        except (TypeError, ValueError, KeyError):
            raise InvalidArgumentError(
                f"aimss linger={raw_linger!r} is not a duration; give seconds or a "
                "string such as '5ms'"
            ) from None
        if linger is None or linger < 0:
            raise InvalidArgumentError(f"aimss linger={raw_linger!r} must be >= 0")
        spill = d.get("spill_directory")
        transport = d.get("transport", "auto")
        if transport not in ("auto", "dask"):
            raise InvalidArgumentError(
                f"aimss transport={transport!r} is not one of 'auto', 'dask'"
            )
        return cls(
            transport=transport,
            memory_limit=_bytes("memory-limit", d.get("memory_limit"), allow_none=True),
            memory_fraction=frac,
            spill_directory=os.fspath(spill) if spill is not None else None,
            replication=replication,
            segment_size=_bytes("segment-size", d.get("segment_size", "4MiB")) or 0,
            batch_size=_bytes("batch-size", d.get("batch_size", "4MiB")) or 0,
            linger=float(linger),
            max_in_flight=_bytes("max-in-flight", d.get("max_in_flight", "64MiB")) or 0,
            read_batch_size=_bytes("read-batch-size", d.get("read_batch_size", "16MiB"))
            or 0,
        )

    def resolve_for_worker(
        self, worker_memory_limit: int | None, local_directory: str
    ) -> AIMSSConfig:
        """Fill the worker-dependent defaults: the byte budget and spill folder."""
        limit = self.memory_limit
        if limit is None:
            base = worker_memory_limit or _system_memory()
            limit = max(int(base * self.memory_fraction), 16 * 2**20)
        spill = self.spill_directory or os.path.join(local_directory, "aimss-spill")
        return replace(self, memory_limit=limit, spill_directory=spill)


def _system_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)
