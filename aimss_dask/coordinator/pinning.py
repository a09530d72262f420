"""Which worker runs each output task: partition reads pinned to their owners.

An output task of a run (or of ``Stream.map_partitions``) reads one
partition, and must run on the worker that owns it. Its key says which:
``(PARTITION_TASK_PREFIX + token, stream, p)``, or ``(PARTITION_TASK_PREFIX +
run_id, *chunk index)`` for a run whose :class:`~aimss_dask.core.runs.OutputMap`
has a grid (a rechunk's chunks), resolved once the run is registered. Dask
may also fuse a read into a task under another key (``y.sum()``): such a
task still depends on the run's barrier, and the read inside it is a call of
a function marked with :data:`~aimss_dask.core.names.PARTITION_READ`
(``(stream, partition, ...)`` as its first arguments), so the barrier's
dependents are searched for them (:func:`partition_reads`) -- never the
whole graph, and never by key or function name. A read that still runs
elsewhere (it started before a rebalance moved its partition) hands itself
back to the scheduler with ``Reschedule``; see the operators' read tasks.

The :class:`Pinner` remembers every read task by stream and partition, so
that a stream created (or re-created by a restart) after its readers were
submitted, or a partition moved by a rebalance, gets its readers pinned too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from aimss_dask.core.names import PARTITION_READ, PARTITION_TASK_PREFIX
from aimss_dask.core.runs import RunSpec
from aimss_dask.core.specs import StreamSpec

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger("aimss_dask")

#: Past this many streams remembered, forget those whose streams and tasks are gone.
_PRUNE_AT = 1000


class Pinner:
    """Pins partition reads to the owners of their partitions.

    ``streams`` is the coordinator's name -> :class:`StreamSpec` (read only);
    ``spec_of_run`` finds a registered run's spec by id (None if unknown);
    ``live_runs`` lists the specs of the runs not finished.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        streams: dict[str, StreamSpec],
        spec_of_run: Callable[[str], RunSpec | None],
        live_runs: Callable[[], Iterable[RunSpec]] = tuple,
    ) -> None:
        self.scheduler = scheduler
        self.streams = streams
        self.spec_of_run = spec_of_run
        self.live_runs = live_runs
        #: stream -> partition -> the key of the task that reads it.
        self.readers: dict[str, dict[int, Any]] = {}
        #: Chunk keys of runs not registered yet, by their key prefix (``key[0]``).
        self.pending: dict[str, list[Any]] = {}

    def update_graph(self, tasks: Iterable[Any]) -> None:
        """Remember and pin the read tasks among ``tasks`` (new keys of a graph)."""
        new = set()
        for key in tasks:
            name = key[0] if isinstance(key, tuple) and key else key
            if not (isinstance(key, tuple) and len(key) >= 2 and isinstance(name, str)
                    and name.startswith(PARTITION_TASK_PREFIX)):
                new.add(key)
            elif isinstance(key[1], str):
                self.reader(key[1], key[2], key)
            else:
                self._chunk(key)
        # Reads fused into other tasks, in a graph of a run registered already.
        if new:
            for run in self.live_runs():
                self._fused_reads(run, new)
        if len(self.readers) > _PRUNE_AT:
            tasks_ = self.scheduler.tasks
            self.readers = {
                n: ks for n, ks in self.readers.items()
                if n in self.streams or any(k in tasks_ for k in ks.values())
            }

    def reader(self, stream: str, p: int, key: Any) -> None:
        """``key`` reads partition ``p`` of ``stream``: remember it, and pin it if the stream exists."""
        self.readers.setdefault(stream, {})[p] = key
        spec = self.streams.get(stream)
        # An operator creates its stream inside the graph: then the task is
        # pinned when the stream exists (it cannot run before).
        if spec is not None:
            self.pin(key, spec, p)

    def run_registered(self, run: RunSpec) -> None:
        """``run`` is registered and its streams exist: resolve and pin its readers."""
        prefix = run.output_key()[0]
        for key in self.pending.pop(prefix, []):
            found = run.output_partition(key)
            if found is not None:
                self.readers.setdefault(found[0], {})[found[1]] = key
        self._fused_reads(run, None)
        self.repin(run.streams)

    def repin(
        self, streams: Iterable[str], partitions: Iterable[int] | None = None, stimulus_id: str | None = None
    ) -> None:
        """Pin the known readers of ``streams`` (only of ``partitions``, if given) to today's owners.

        Readers that waited for the old owner (``no-worker``: it left, or
        no longer runs tasks while it retires) are scheduled on the new
        owners now; Dask looks at such tasks again only when a worker joins.
        """
        if stimulus_id is None:
            stimulus_id = f"aimss-repin-{time.time()}"
        only = None if partitions is None else set(partitions)
        stuck = {}
        for name in streams:
            spec = self.streams.get(name)
            if spec is None:
                continue
            for p, key in self.readers.get(name, {}).items():
                if only is None or p in only:
                    self.pin(key, spec, p)
                    ts = self.scheduler.tasks.get(key)
                    if ts is not None and ts.state == "no-worker":
                        stuck[key] = "processing"
        if stuck:
            self.scheduler.transitions(stuck, stimulus_id=stimulus_id)

    def read(self, stream: str, states: Collection[str] | None = None) -> set[int]:
        """Partitions of ``stream`` that a submitted task reads.

        ``states``: only tasks the scheduler has in one of these states
        (those still to run); None: every task remembered.
        """
        readers = self.readers.get(stream, {})
        if states is None:
            return set(readers)
        tasks = self.scheduler.tasks
        return {p for p, key in readers.items() if key in tasks and tasks[key].state in states}

    def pin(self, key: Any, spec: StreamSpec, p: int) -> None:
        ts = self.scheduler.tasks.get(key)
        # A running task keeps its worker: it read the partition there already.
        if ts is None or not 0 <= p < spec.partitions or ts.state == "processing":
            return
        owner = spec.owners[p]
        # An owner that is gone took the partition along: the reader runs
        # anywhere and raises PartitionLostError, instead of waiting forever.
        self.scheduler.set_restrictions({key: owner if owner in self.scheduler.workers else None})

    def unpin_lost(self, lost: Mapping[str, Collection[int]], stimulus_id: str) -> list[Any]:
        """Free the readers of lost partitions to run anywhere; their keys.

        They were pinned to a worker that is gone, and would wait for it
        forever (``no-worker``). Anywhere, they read the coordinator's word
        that the partition is lost and raise ``PartitionLostError``, naming
        the offsets, to whoever waits on them.
        """
        keys = [
            key
            for name, ps in lost.items()
            for p, key in self.readers.get(name, {}).items()
            if p in ps and key in self.scheduler.tasks
        ]
        if not keys:
            return []
        self.scheduler.set_restrictions({key: None for key in keys})
        stuck = {k: "processing" for k in keys if self.scheduler.tasks[k].state == "no-worker"}
        if stuck:
            self.scheduler.transitions(stuck, stimulus_id=stimulus_id)
        return keys

    def clear(self) -> None:
        self.readers.clear()
        self.pending.clear()

    # -- internals ------------------------------------------------------------------

    def _chunk(self, key: tuple[Any, ...]) -> None:
        """An array run's output chunk: pin it now if its run is known, else when it registers."""
        run = self.spec_of_run(key[0][len(PARTITION_TASK_PREFIX):])
        found = None if run is None else run.output_partition(key)
        if found is None:
            self.pending.setdefault(key[0], []).append(key)
        else:
            self.reader(found[0], found[1], key)

    def _after_barrier(self, run: RunSpec) -> list[Any]:
        """The tasks that may hold ``run``'s reads: its barrier's dependents.

        Dask may have fused the barrier itself with a read (one output
        chunk of a small array): then the tasks that come right after the
        run's pushes (its create task's dependents) stand for it.
        """
        tasks = self.scheduler.tasks
        barrier = tasks.get(run.barrier) if run.barrier is not None else None
        if barrier is not None:
            return list(barrier.dependents)
        create = tasks.get(run.create) if run.create is not None else None
        if create is None:
            return []
        return list({d for push in create.dependents for d in push.dependents})

    def _fused_reads(self, run: RunSpec, only: set[Any] | None) -> None:
        """Remember the reads of ``run``'s streams inside its barrier's dependents (of ``only``)."""
        mine = set(run.streams)
        for dep in self._after_barrier(run):
            if (only is not None and dep.key not in only) or dep.state == "memory":
                continue
            for stream, p in partition_reads(dep.run_spec):
                if stream in mine:
                    self.readers.setdefault(stream, {})[p] = dep.key


def partition_reads(spec: Any) -> list[tuple[str, int]]:
    """``(stream, partition)`` of every partition read inside a task spec.

    Dask may fuse a read task into its dependent under a new key; the read
    is still in there: a call of a function marked ``PARTITION_READ``, with
    its stream name and partition as literal first arguments.
    """
    return [read for call in calls_in(spec, leaf=_read_of) if (read := _read_of(call)) is not None]


def _read_of(call: Any) -> tuple[str, int] | None:
    """``(stream, partition)`` if ``call`` is a partition read with literal ones; else None."""
    if getattr(call.func, PARTITION_READ, False) and len(call.args) >= 2:
        stream, p = (_literal(a) for a in call.args[:2])
        if isinstance(stream, str) and isinstance(p, int):
            return stream, p
    return None


def calls_in(spec: Any, leaf: Callable[[Any], Any] = lambda call: False, depth: int = 0) -> Iterator[Any]:
    """Every call (``dask.task_spec.Task``) inside a task spec, even those fused into another task.

    Its arguments are searched too (a fused task holds the calls it
    replaced), down to a depth of 8, except a call for which ``leaf(call)``
    is true: the caller found what it looks for there.
    """
    from dask.task_spec import DataNode, Task

    if depth > 8 or spec is None:
        return
    if isinstance(spec, Task):
        yield spec
        if not leaf(spec):
            for a in (*spec.args, *spec.kwargs.values()):
                yield from calls_in(a, leaf, depth + 1)
    elif isinstance(spec, DataNode):
        yield from calls_in(spec.value, leaf, depth + 1)
    elif isinstance(spec, dict):
        for v in spec.values():
            yield from calls_in(v, leaf, depth + 1)
    elif isinstance(spec, (list, tuple)):
        for v in spec:
            if isinstance(v, _NESTED):
                yield from calls_in(v, leaf, depth + 1)


def _nested() -> tuple[type, ...]:
    from dask.task_spec import GraphNode

    return (GraphNode, dict, list, tuple)


#: What a task spec may hold a read inside (not ints, strs, arrays, ...).
_NESTED = _nested()


def _literal(node: Any) -> Any:
    from dask.task_spec import DataNode

    return node.value if isinstance(node, DataNode) else node
