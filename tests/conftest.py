"""Shared fixtures of the integration tests: a real multi-process LocalCluster.

``cluster`` is module-scoped (process startup costs ~2-3 s, so the tests of
one module share it); ``client`` is per test and checks at teardown that the
test left every worker's log empty: no stream, no memory, no spill file.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import dask
import psutil
import pytest
from distributed import Client, LocalCluster
from distributed.security import Security
from distributed.utils import get_mp_context
from hypothesis import strategies as hst

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.core import threads
from aimss_dask.testing import forget_slow_workers

_names = itertools.count()

# A LocalCluster closes a worker's nanny for good when, ``lost-worker-timeout``
# (15 s) after that worker left, no worker of its name is listed: a check of
# that one instant. A test that kills the same worker again meanwhile (its
# nanny restarting it just then) loses the nanny, and the worker never comes
# back (reproduced without AIMSS: two workers SIGKILLed every 3 s, one round
# in 5 to 10). Tests that kill workers need them back (the chaos test and
# the recovery benchmark set the same).
#
# Worker processes fork from a server that has imported the stack once, as
# in Dask's own test suite: a spawned worker imports numpy, pandas,
# distributed and aimss_dask afresh (about a CPU-second), and the suite starts
# hundreds of them. Users' default (spawn) stays covered: the README's blocks,
# the demo and the entry points run in processes of their own, with Dask's
# defaults. ``AIMSS_TEST_START=spawn`` runs the suite's workers as users' are.
START = os.environ.get("AIMSS_TEST_START", "forkserver")
if START not in ("forkserver", "spawn"):
    raise ValueError(f"AIMSS_TEST_START={START!r}: use 'forkserver' or 'spawn'")
#: Dask settings of the whole suite (``_suite_config`` keeps them).
SUITE_CONFIG: dict[str, Any] = {
    "distributed.deploy.lost-worker-timeout": "600s",
    "distributed.worker.multiprocessing-method": START,
}
# On CPython before 3.11.9, Dask's worker profiler (sys._current_frames every
# 10 ms) deadlocks against a thread that starts or ends (gh-106883): a worker
# hangs for good, with or without AIMSS. The README tells users to upgrade or
# turn the profiler off; the suite does the latter there, so that a test
# never waits on that CPython bug (tests/test_threads.py covers ours).
if threads.frames_deadlock_risk():
    SUITE_CONFIG["distributed.worker.profile.enabled"] = False
dask.config.set(SUITE_CONFIG)
if START == "forkserver":
    get_mp_context().set_forkserver_preload(
        ["distributed", "numpy", "pandas", "dask.array", "dask.dataframe", "aimss_dask", "aimss_dask.node.plugin"]
    )


@pytest.fixture(autouse=True)
def _suite_config() -> Iterator[None]:
    """Puts :data:`SUITE_CONFIG` back after a test whose ``dask.config.refresh()`` dropped it (it drops every ``set``)."""
    yield
    if any(dask.config.get(key, None) != value for key, value in SUITE_CONFIG.items()):
        dask.config.set(SUITE_CONFIG)


# A test that hangs is worth its worker processes' stacks, and a worker
# whose event loop is blocked cannot answer ``client.run``. Processes
# started from here (nanny workers) run with faulthandler on, which prints
# every thread's stack to stderr (captured with the test) when SIGABRT kills
# the process: ``_abort_workers`` does that shortly before the timeout.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
#: Seconds before a test's timeout at which its worker processes are aborted.
DUMP_BEFORE_TIMEOUT = 20.0


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    try:
        return float(item.config.getini("timeout") or 0)
    except ValueError:
        return 0.0


def _is_worker_process(proc: psutil.Process) -> bool:
    """A process that multiprocessing started for a nanny: spawned, or forked by the fork server (not the server itself)."""
    cmdline = " ".join(proc.cmdline())
    if "spawn_main" in cmdline:
        return True
    return "forkserver" in cmdline and proc.ppid() != os.getpid()


def _abort_workers(fired: list[float]) -> None:
    """SIGABRT every multiprocessing child of this process (nanny workers): faulthandler prints their stacks."""
    fired.append(time.monotonic())
    for child in psutil.Process().children(recursive=True):
        try:
            if _is_worker_process(child):
                print(f"conftest: the test hung; aborting worker process {child.pid} for its stacks", flush=True)
                child.send_signal(signal.SIGABRT)
        except psutil.Error:
            pass  # gone meanwhile


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    limit = _timeout_of(item)
    if limit <= DUMP_BEFORE_TIMEOUT:
        return (yield)
    fired: list[float] = []
    timer = threading.Timer(limit - DUMP_BEFORE_TIMEOUT, _abort_workers, args=(fired,))
    timer.daemon = True
    timer.start()
    try:
        result = yield
    finally:
        timer.cancel()
    if fired:
        # Aborted workers come back (nannies), and the test may then pass:
        # a hang must not.
        pytest.fail(f"the test ran past {limit - DUMP_BEFORE_TIMEOUT:.0f} s; its workers' stacks are in its stderr")
    return result


def unique_name(prefix: str = "s") -> str:
    """A stream name no other test (or earlier run) uses."""
    return f"{prefix}-{next(_names)}-{uuid.uuid4().hex[:8]}"


def make_cluster(n_workers: int = 2, **kwargs: Any) -> LocalCluster:
    """Nanny workers of one thread each (``kwargs``: more for ``LocalCluster``, e.g. ``security``)."""
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        **kwargs,
    )


@contextlib.contextmanager
def speculation_client(**speculation: Any) -> Iterator[Client]:
    """A client of 3 one-thread nanny workers with AIMSS under ``aimss.speculation`` overrides.

    The straggler tests' cluster: tasks there are short, so the tests judge
    them sooner than the defaults would (``min_runtime`` and friends).
    """
    with make_cluster(3) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(speculation=speculation))
        client.wait_for_workers(3)
        # aimss_dask leaves pandas and dask's collections to the first task
        # that needs them: loaded there, they would make the first tasks of
        # each worker look slow to rules that compare tasks' times.
        client.run(_load_stacks)
        yield client


def _load_stacks() -> None:
    import importlib

    for name in ("pandas", "dask.array", "dask.dataframe"):
        importlib.import_module(name)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


def spill_files(folder: str) -> list[str]:
    """What a worker's spill folder holds besides the note of whose folder it is."""
    return sorted(n for n in os.listdir(folder) if n != "owner.json") if os.path.isdir(folder) else []


def assert_workers_clean(status: dict) -> None:
    """Every worker of ``aimss_dask.status()`` holds nothing at all."""
    assert status, "status() reported no worker"
    for addr, st in status.items():
        assert st["streams"] == [], f"{addr} still holds streams {st['streams']}"
        assert st["memory_bytes"] == 0, f"{addr} memory_bytes={st['memory_bytes']}"
        assert st["spilled_bytes"] == 0, f"{addr} spilled_bytes={st['spilled_bytes']}"
        spill = st.get("spill_directory")
        if spill:
            assert spill_files(spill) == [], f"{addr} left spill files {spill_files(spill)}"


@hst.composite
def chunking(draw, shape, max_cuts=4):
    """A hypothesis Dask chunking of ``shape``: up to ``max_cuts`` cuts per axis."""
    out = []
    for n in shape:
        cuts = sorted(draw(hst.sets(hst.integers(1, max(n - 1, 1)), max_size=max_cuts))) if n > 1 else []
        bounds = [0, *[c for c in cuts if 0 < c < n], n]
        out.append(tuple(b - a for a, b in zip(bounds, bounds[1:]) if b > a) or (n,))
    return tuple(out)


def destroy_all_streams() -> None:
    """Destroy every stream any worker still holds (children go with parents)."""
    names = sorted({n for st in aimss_dask.status().values() for n in st["streams"]})
    for name in names:
        try:
            aimss_dask.destroy_stream(name)
        except aimss_dask.StreamNotFoundError:
            pass  # a child already destroyed with its parent


@pytest.fixture(scope="module")
def cluster(request):
    with make_cluster(2, **security_kwargs(getattr(request, "param", SECURITY))) as cl:
        yield cl


#: The comms of the shared ``cluster`` fixture: ``tcp``, or ``tls`` (temporary
#: certificates) with ``AIMSS_TEST_SECURITY=tls``.
SECURITY = os.environ.get("AIMSS_TEST_SECURITY", "tcp")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A module with ``ALSO_TLS = True`` runs its tests on a TCP and on a TLS
    # cluster; with ``ALSO_TLS`` a collection of test names, only those (the
    # others on the TCP cluster, which they share).
    also = getattr(metafunc.module, "ALSO_TLS", False)
    if also is not True and also:
        missing = [n for n in also if not callable(getattr(metafunc.module, n, None))]
        assert not missing, f"ALSO_TLS of {metafunc.module.__name__} names no test {missing}"
    if "cluster" in metafunc.fixturenames and also:
        both = also is True or metafunc.function.__name__ in also
        metafunc.parametrize("cluster", ["tcp", "tls"] if both else ["tcp"], indirect=True, scope="module")


def security_kwargs(kind: str) -> dict[str, Any]:
    """``LocalCluster`` arguments for ``kind`` comms (a ``Client(cluster)`` takes the cluster's security)."""
    if kind == "tls":
        return {"security": Security.temporary()}
    if kind != "tcp":
        raise ValueError(f"AIMSS_TEST_SECURITY={kind!r}: use 'tcp' or 'tls'")
    return {}


@pytest.fixture
def client(cluster):
    with Client(cluster) as c:
        c.register_plugin(aimss_dask.AIMSS())
        c.wait_for_workers(len(cluster.workers))
        c.run_on_scheduler(forget_slow_workers)
        yield c
        destroy_all_streams()
        # destroy_stream returns once every worker dropped the logs and files.
        status = aimss_dask.status()
        assert set(status) == set(listed_workers(c))
        assert_workers_clean(status)


def count_fsyncs(dask_worker=None, reset: bool = True) -> list[str]:
    """Install (once) a recorder of the files :mod:`aimss_dask.sink.durable` syncs; what it recorded.

    Run it on the workers (``client.run(count_fsyncs)``) and here; the
    recorder then lists every file each process fsynced since the last call,
    and every folder, with a trailing separator.
    """
    import os

    from aimss_dask.sink import durable

    if not hasattr(durable, "_test_synced"):
        real_file, real_dir = durable.fsync_file, durable.fsync_dir
        durable._test_synced = []

        def recording(path):
            durable._test_synced.append(os.path.realpath(path))
            real_file(path)

        def recording_dir(path):
            durable._test_synced.append(os.path.join(os.path.realpath(path), ""))
            real_dir(path)

        durable.fsync_file = recording
        durable.fsync_dir = recording_dir
    out = list(durable._test_synced)
    if reset:
        durable._test_synced.clear()
    return out


def linked_replicator(follower: Any, copy_store: Any, epoch: int = 1) -> type:
    """A :class:`~aimss_dask.node.replication.Replicator` class whose one copy is ``follower``, in this process.

    The owner's questions and copies reach the copy's real
    :class:`~aimss_dask.node.follower.Follower` (over ``copy_store``, the
    stream at ``epoch``) as a worker's handlers would pass them on. ``cut``:
    what each ``aimss_truncate`` cut. ``deliver(groups)``: apply shipped
    groups, a copy's errors by stream as a worker answers them; a test that
    breaks the link overrides ``_transmit`` around it.
    """
    from distributed.protocol import deserialize

    from aimss_dask.core.errors import AIMSSError
    from aimss_dask.node.replication import Replicator

    class Linked(Replicator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.cut: list[int] = []

        def _replica_end(self, dest: str, name: str, p: int) -> int:
            return copy_store.held(name, epoch, p)

        def _ask(self, dest: str, op: str, **kw: Any) -> dict:
            where = (kw["name"], kw["epoch"], kw["partition"]) if "partition" in kw else None
            if op == "aimss_truncate":
                self.cut.append(follower.truncate(*where, kw["end"]))
            elif op == "aimss_replica_writers":
                follower.learn_writers(*where, dict(kw["table"]), kw["whole"])
            elif op == "aimss_replica_origins":
                follower.learn_origins(*where, [tuple(o) for o in kw["origins"]])
            else:
                raise AssertionError(f"not expected here: {op}")
            return {}

        def deliver(self, groups: list[Any]) -> dict[str, tuple[str, str]]:
            errors: dict[str, tuple[str, str]] = {}
            for name, ep, p, sers, sizes, origin, writer, at in groups:
                if name in errors:
                    continue  # as a worker does: one error per stream and batch
                try:
                    records = [deserialize(x.header, x.frames) for x in sers]
                    follower.append(name, ep, p, records, sizes, origin, writer, at)
                except AIMSSError as e:
                    errors[name] = (type(e).__name__, str(e))
            return errors

        def _transmit(self, d: Any, groups: list[Any], conn: Any) -> tuple[dict[str, Any], Any]:
            return {"errors": self.deliver(groups)}, conn

    return Linked
