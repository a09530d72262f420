"""``aimss_dask.testing.throttled``: a process stopped part of the time, and always left running."""

from __future__ import annotations

import subprocess
import time

import pytest

from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.testing import throttled


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_throttled_process_is_stopped_part_of_the_time_and_left_running():
    child = subprocess.Popen(["sleep", "30"])
    try:
        seen = set()
        with throttled(child.pid, share=0.5, period=0.02):
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and seen != {"T", "S"}:
                seen.add(_state(child.pid))
                time.sleep(0.003)
        assert "T" in seen and "S" in seen, seen  # stopped, and running (asleep) in between
        for _ in range(20):  # never left stopped
            assert _state(child.pid) != "T"
            time.sleep(0.005)
    finally:
        child.kill()
        child.wait()


def test_a_process_that_ends_while_throttled_is_no_error():
    child = subprocess.Popen(["sleep", "0.1"])
    with throttled(child.pid, share=0.5, period=0.02):
        child.wait()


@pytest.mark.parametrize("share", [0, -0.1, 1.5])
def test_a_share_outside_zero_to_one_is_refused_by_value(share):
    with pytest.raises(InvalidArgumentError, match=f"share={share!r}"):
        with throttled(1, share=share):
            pass
