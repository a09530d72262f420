"""``AIMSSConfig``: shipped defaults, Dask config / environment / argument overrides."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import dask.config
import psutil
import pytest
import yaml

from aimss_dask.core import config as config_module
from aimss_dask.core.config import AIMSSConfig
from aimss_dask.core.errors import InvalidArgumentError

GiB = 2**30
MiB = 2**20


@pytest.fixture(autouse=True)
def _no_aimss_env(monkeypatch):
    """Run each test without ``DASK_AIMSS__*`` variables from the outside."""
    outside = [k for k in os.environ if k.startswith("DASK_AIMSS")]
    for k in outside:
        monkeypatch.delenv(k)
    if outside:
        dask.config.refresh()
    yield
    if outside:
        monkeypatch.undo()
        dask.config.refresh()


def _shipped() -> dict:
    with open(pathlib.Path(config_module.__file__).parent.parent / "aimss.yaml") as f:
        return yaml.safe_load(f)["aimss"]


def test_defaults_come_from_the_shipped_yaml():
    shipped = _shipped()
    assert dask.config.get("aimss") == shipped
    cfg = AIMSSConfig.load()
    assert cfg == AIMSSConfig(
        memory_limit=None,
        memory_fraction=0.5,
        spill_directory=None,
        replication=1,
        recovery="offsets",
        recovery_rate=512 * MiB,
        segment_size=4 * MiB,
        batch_size=4 * MiB,
        linger=0.005,
        max_in_flight=64 * MiB,
        read_batch_size=16 * MiB,
        transport="auto",
        liveness_interval=2.0,
        keep_idle_buffers=60.0,
    )
    # The dataclass defaults and the YAML agree, so code that builds an
    # AIMSSConfig() directly behaves like a deployment with no config at all.
    assert cfg == AIMSSConfig()
    # Every YAML key is a field (with ``-`` for ``_``).
    assert {k.replace("-", "_") for k in shipped} == {f.name for f in dataclasses.fields(AIMSSConfig)}


def test_dask_config_overrides_defaults():
    with dask.config.set({"aimss.memory-limit": "1GiB", "aimss.segment-size": 1000}):
        cfg = AIMSSConfig.load()
    assert cfg.memory_limit == GiB
    assert cfg.segment_size == 1000
    assert cfg.batch_size == 4 * MiB  # untouched keys keep their defaults
    assert AIMSSConfig.load().memory_limit is None  # the context ended


def test_dask_config_underscore_spelling_works_too():
    with dask.config.set({"aimss.memory_limit": "2GiB"}):
        assert AIMSSConfig.load().memory_limit == 2 * GiB


def test_environment_variable_overrides_defaults(monkeypatch):
    monkeypatch.setenv("DASK_AIMSS__MEMORY_LIMIT", "3GiB")
    monkeypatch.setenv("DASK_AIMSS__MEMORY_FRACTION", "0.25")
    dask.config.refresh()  # Dask reads the environment here, not on every get
    try:
        cfg = AIMSSConfig.load()
        assert cfg.memory_limit == 3 * GiB
        assert cfg.memory_fraction == 0.25
        assert cfg.segment_size == 4 * MiB  # defaults still fill the rest
    finally:
        monkeypatch.undo()
        dask.config.refresh()
    assert AIMSSConfig.load().memory_limit is None


def test_arguments_beat_config():
    with dask.config.set({"aimss.memory-limit": "1GiB", "aimss.linger": "1s"}):
        cfg = AIMSSConfig.load(memory_limit="2GiB", linger=None)
    assert cfg.memory_limit == 2 * GiB
    assert cfg.linger == 1.0  # None means "not given", not "reset"


def test_sizes_and_durations_parse():
    cfg = AIMSSConfig.load(
        memory_limit=12345,
        segment_size="1 MiB",
        batch_size="64kB",
        max_in_flight="1GiB",
        read_batch_size=2**20,
        linger="20ms",
        spill_directory=pathlib.Path("/tmp/x"),
    )
    assert cfg.memory_limit == 12345
    assert cfg.segment_size == MiB
    assert cfg.batch_size == 64_000
    assert cfg.max_in_flight == GiB
    assert cfg.read_batch_size == MiB
    assert cfg.linger == pytest.approx(0.02)
    assert AIMSSConfig.load(liveness_interval="250ms").liveness_interval == pytest.approx(0.25)
    assert AIMSSConfig.load(keep_idle_buffers="2 minutes").keep_idle_buffers == 120.0
    assert AIMSSConfig.load(keep_idle_buffers=0).keep_idle_buffers == 0.0
    assert cfg.spill_directory == "/tmp/x" and isinstance(cfg.spill_directory, str)
    assert AIMSSConfig.load(linger=0).linger == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.memory_limit = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"memory_limit": -5}, r"aimss memory-limit=-5 must be a positive size"),
        ({"memory_limit": "-1GiB"}, r"aimss memory-limit='-1GiB' must be a positive size"),
        ({"memory_limit": 0}, r"aimss memory-limit=0 must be a positive size"),
        ({"memory_limit": "lots"}, r"aimss memory-limit='lots' is not a size; give a number"),
        ({"segment_size": True}, r"aimss segment-size=True must be a positive size"),
        ({"batch_size": [1]}, r"aimss batch-size=\[1\] is not a size"),
        ({"max_in_flight": -1}, r"aimss max-in-flight=-1 must be a positive size"),
        ({"read_batch_size": "0B"}, r"aimss read-batch-size='0B' must be a positive size"),
        ({"memory_fraction": 0}, r"aimss memory-fraction=0\.0 must be in \(0, 1\]"),
        ({"memory_fraction": 2}, r"aimss memory-fraction=2\.0 must be in \(0, 1\]"),
        ({"memory_fraction": float("nan")}, r"aimss memory-fraction=nan must be in"),
        ({"replication": 0}, r"aimss replication=0 must be >= 1"),
        ({"replication": "1"}, r"aimss replication='1' must be an integer"),
        ({"replication": True}, r"aimss replication=True must be an integer"),
        ({"transport": "tcp"}, r"aimss transport='tcp' is not one of 'auto', 'dask'"),
        ({"recovery": "fast"}, r"aimss recovery='fast' is not one of 'offsets' \(copy only"),
        ({"recovery_rate": 0}, r"aimss recovery-rate=0 must be a positive size"),
        ({"liveness_interval": 0}, r"aimss liveness-interval=0 is not a positive duration"),
        ({"liveness_interval": "soon"}, r"aimss liveness-interval='soon' is not a positive duration"),
        ({"keep_idle_buffers": -1}, r"aimss keep-idle-buffers=-1 is not a non-negative duration"),
        ({"keep_idle_buffers": "a while"}, r"aimss keep-idle-buffers='a while' is not a non-negative"),
        ({"colour": "blue"}, r"unknown AIMSS option 'colour'; known options: \['batch_size'"),
    ],
)
def test_bad_values_raise_invalid_argument(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        AIMSSConfig.load(**kwargs)
    assert issubclass(InvalidArgumentError, ValueError)


def test_recovery_rate_may_be_unbounded():
    assert AIMSSConfig.load(recovery="full").recovery == "full"
    with dask.config.set({"aimss.recovery-rate": None}):
        assert AIMSSConfig.load().recovery_rate is None
    assert AIMSSConfig.load(recovery_rate="1GiB").recovery_rate == 2**30


def test_transport_choices():
    assert AIMSSConfig.load().transport == "auto"
    assert AIMSSConfig.load(transport="dask").transport == "dask"
    with dask.config.set({"aimss.transport": "dask"}):
        assert AIMSSConfig.load().transport == "dask"


def test_bad_value_from_dask_config_is_rejected_too():
    with dask.config.set({"aimss.segment-size": "lots"}):
        with pytest.raises(InvalidArgumentError, match="aimss segment-size='lots' is not a size"):
            AIMSSConfig.load()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_fraction": "half"},  # float() raises a bare ValueError today
        {"linger": "soon"},  # parse_timedelta raises KeyError today
        {"linger": -1},  # parse_timedelta cannot parse negative numbers: bare ValueError
    ],
    ids=["fraction-half", "linger-soon", "linger-negative"],
)
def test_unparsable_fraction_and_linger_raise_invalid_argument(kwargs):
    (key, value), = kwargs.items()
    option = key.replace("_", "-")
    with pytest.raises(InvalidArgumentError, match=f"aimss {option}={value!r}"):
        AIMSSConfig.load(**kwargs)


# -- resolve_for_worker ----------------------------------------------------------------


def test_resolve_for_worker_uses_fraction_of_worker_limit(tmp_path):
    cfg = AIMSSConfig.load(memory_fraction=0.25)
    r = cfg.resolve_for_worker(8 * GiB, str(tmp_path))
    assert r.memory_limit == 2 * GiB
    assert r.spill_directory == os.path.join(str(tmp_path), "aimss-spill")
    assert r.memory_fraction == 0.25 and r.segment_size == cfg.segment_size
    assert cfg.memory_limit is None and cfg.spill_directory is None  # a new object
    assert AIMSSConfig.load().resolve_for_worker(8 * GiB, "/w").memory_limit == 4 * GiB


def test_resolve_for_worker_keeps_explicit_settings(tmp_path):
    cfg = AIMSSConfig.load(memory_limit="1GiB", spill_directory=str(tmp_path / "mine"))
    r = cfg.resolve_for_worker(8 * GiB, "/elsewhere")
    assert r.memory_limit == GiB
    assert r.spill_directory == str(tmp_path / "mine")


def test_resolve_for_worker_floor_and_no_worker_limit():
    cfg = AIMSSConfig.load()
    # The floor, where the worker can hold it: 25% of 40 MiB is below 16 MiB.
    quarter = AIMSSConfig.load(memory_fraction=0.25)
    assert quarter.resolve_for_worker(40 * MiB, "/w", DEFAULTS).memory_limit == 16 * MiB
    # A worker too small for the floor gets what fits (half of 2 MiB).
    assert cfg.resolve_for_worker(2 * MiB, "/w", DEFAULTS).memory_limit == MiB
    # Dask reports 0 or None for "no memory limit": use the machine's memory.
    expected = max(int(psutil.virtual_memory().total * 0.5), 16 * MiB)
    for no_limit in (None, 0):
        assert cfg.resolve_for_worker(no_limit, "/w").memory_limit == expected


def test_unknown_key_in_the_config_block_is_named():
    with dask.config.set({"aimss.memory-limt": "1GiB"}):
        with pytest.raises(InvalidArgumentError, match=r"unknown key\(s\) \['memory-limt'\]"):
            AIMSSConfig.load()


# -- the budget a worker can hold --------------------------------------------------------

DEFAULTS = {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}


def test_budget_check_uses_the_lowest_enabled_dask_threshold():
    c = AIMSSConfig.load(memory_limit="64GiB").check_budget(16 * GiB, DEFAULTS)
    assert not c.fits
    assert c.largest == round(16 * GiB * 0.6 / 1.2) and c.bound == "distributed.worker.memory.target=0.6"
    msg = c.explain("tcp://w:1")
    assert "68719476736 bytes (64.00 GiB)" in msg and "tcp://w:1" in msg
    assert "16.00 GiB" in msg and f"{round(16 * GiB * 0.6 / 1.2)} bytes" in msg
    # target disabled: the next threshold (spill) bounds it
    c = AIMSSConfig.load(memory_limit="9GiB").check_budget(16 * GiB, {**DEFAULTS, "target": False})
    assert c.fits and c.largest == round(16 * GiB * 0.7 / 1.2)
    # every threshold disabled: 95% of the limit
    off = dict.fromkeys(DEFAULTS, False)
    c = AIMSSConfig.load(memory_limit="13GiB").check_budget(16 * GiB, off)
    assert not c.fits and c.largest == round(16 * GiB * 0.95 / 1.2) and "disabled" in c.bound
    # the default fraction (0.5) is the largest that fits under Dask's defaults
    assert AIMSSConfig.load().check_budget(16 * GiB, DEFAULTS).fits
    assert not AIMSSConfig.load(memory_fraction=0.51).check_budget(16 * GiB, DEFAULTS).fits


def test_budget_check_reads_dask_config_thresholds():
    with dask.config.set({"distributed.worker.memory.target": False,
                          "distributed.worker.memory.spill": 0.4}):
        c = AIMSSConfig.load(memory_limit="1GiB").check_budget(2 * GiB)
    assert c.largest == round(2 * GiB * 0.4 / 1.2) and "spill=0.4" in c.bound


def test_budget_check_without_a_worker_limit_uses_the_machine():
    total = psutil.virtual_memory().total
    c = AIMSSConfig.load(memory_limit=total).check_budget(None, DEFAULTS)
    assert not c.fits and c.largest == int(total * 0.5) and c.no_limit
    assert "machine's memory" in c.explain("tcp://w:1")


def test_resolve_for_worker_clamps_a_budget_that_does_not_fit():
    r = AIMSSConfig.load(memory_limit="64GiB").resolve_for_worker(GiB, "/w", DEFAULTS)
    assert r.memory_limit == GiB // 2


@pytest.mark.parametrize(
    ("var", "value", "match"),
    [
        ("DASK_AIMSS__MEMORY_LIMIT", "banana", r"aimss memory-limit='banana' is not a size"),
        ("DASK_AIMSS__LINGER", "soon", r"aimss linger='soon' is not a duration"),
        ("DASK_AIMSS__TRANSPORT", "carrier-pigeon", r"aimss transport='carrier-pigeon'"),
        ("DASK_AIMSS__MEMORY_FRACTION", "2", r"aimss memory-fraction=2\.0 must be in"),
    ],
)
def test_a_bad_environment_variable_is_named(monkeypatch, var, value, match):
    monkeypatch.setenv(var, value)
    key = var[len("DASK_AIMSS__"):].lower().replace("_", "-")
    with dask.config.set({f"aimss.{key}": dask.config.collect_env({var: value})["aimss"][key.replace("-", "_")]}):
        with pytest.raises(InvalidArgumentError, match=match) as e:
            AIMSSConfig.load()
        assert f"set by the environment variable {var}" in str(e.value)
        # An argument overrides the variable: then the variable is not blamed.
        if key == "memory-limit":
            with pytest.raises(InvalidArgumentError) as e2:
                AIMSSConfig.load(memory_limit="lots")
            assert var not in str(e2.value)


def test_a_bad_value_set_in_the_environment_of_a_fresh_process_is_named(tmp_path):
    """The real path: Dask reads DASK_AIMSS__* when it is imported."""
    import subprocess
    import sys

    env = {**os.environ, "DASK_AIMSS__SEGMENT_SIZE": "huge"}
    out = subprocess.run(
        [sys.executable, "-c", "import aimss_dask; aimss_dask.AIMSSConfig.load()"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    assert "aimss segment-size='huge' is not a size" in out.stderr
    assert "set by the environment variable DASK_AIMSS__SEGMENT_SIZE" in out.stderr


def test_speculation_defaults_and_overrides_merge_key_by_key():
    from aimss_dask.core.config import SpeculationConfig

    spec = AIMSSConfig.load().speculation
    assert spec == SpeculationConfig(
        enabled=True, quantile=0.75, multiplier=2.0, min_runtime=1.0, max_fraction=0.25, interval=0.5
    )
    with dask.config.set({"aimss.speculation.multiplier": 3, "aimss.speculation.interval": "2s"}):
        spec = AIMSSConfig.load(speculation={"min_runtime": "250ms"}).speculation
    # The argument's key goes over the config's; the config's other keys stay.
    assert (spec.multiplier, spec.interval, spec.min_runtime, spec.quantile) == (3.0, 2.0, 0.25, 0.75)
    assert AIMSSConfig.load(speculation={"enabled": False}).speculation.enabled is False


@pytest.mark.parametrize(
    ("speculation", "match"),
    [
        ({"quantile": 0}, r"aimss speculation\.quantile=0 must be in \(0, 1\]"),
        ({"quantile": 1.5}, r"aimss speculation\.quantile=1\.5 must be in \(0, 1\]"),
        ({"multiplier": 0.9}, r"aimss speculation\.multiplier=0\.9 must be in \[1, inf\]"),
        ({"multiplier": "x"}, r"aimss speculation\.multiplier='x' is not a number"),
        ({"max-fraction": -0.1}, r"aimss speculation\.max-fraction=-0\.1 must be in \[0, 1\]"),
        ({"min-runtime": -1}, r"aimss speculation\.min-runtime=-1 is not a non-negative duration"),
        ({"interval": 0}, r"aimss speculation\.interval=0 is not a positive duration"),
        ({"interval": "soon"}, r"aimss speculation\.interval='soon' is not a positive duration"),
        ({"enabled": "yes"}, r"aimss speculation\.enabled='yes' must be true or false"),
        ({"speed": 2}, r"unknown key\(s\) \['speed'\] in aimss speculation; known keys: \['enabled'"),
        (5, r"aimss speculation=5 must be a mapping"),
    ],
)
def test_bad_speculation_options_raise_invalid_argument(speculation, match):
    with pytest.raises(InvalidArgumentError, match=match):
        AIMSSConfig.load(speculation=speculation)


def test_a_bad_nested_option_from_the_environment_names_its_variable(monkeypatch):
    monkeypatch.setenv("DASK_AIMSS__SPECULATION__MULTIPLIER", "0.5")
    dask.config.refresh()
    try:
        with pytest.raises(InvalidArgumentError, match=r"set by the environment variable DASK_AIMSS__SPECULATION__MULTIPLIER"):
            AIMSSConfig.load()
        # Given as an argument instead, the error does not blame the environment.
        with pytest.raises(InvalidArgumentError) as info:
            AIMSSConfig.load(speculation={"multiplier": 0.7})
        assert "environment" not in str(info.value)
    finally:
        monkeypatch.delenv("DASK_AIMSS__SPECULATION__MULTIPLIER")
        dask.config.refresh()
