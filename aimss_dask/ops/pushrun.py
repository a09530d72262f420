"""The task bodies every push run shares: create its streams, push array pieces, seal.

A push run is a stream (one per input side) whose partitions are the
output partitions (a shuffle's, a rechunk's chunks, a sink's units). A
create task makes the streams, map tasks push into them while the map phase
is still running, and the seal task is the barrier. The operators build
their graphs from these tasks and add their own pushes and outputs.

Every task of a run survives a restart of the run (a lost worker): the
tasks that write run again in place against the new streams
(:func:`rerun_on_restart`), the others go back to the scheduler
(:func:`restartable`).
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import numpy as np

from aimss_dask._compat import task_attempt
from aimss_dask.api import streams as api
from aimss_dask.api.context import current
from aimss_dask.api.filling import barrier_phase
from aimss_dask.api.runs import register_run
from aimss_dask.api.speculative import speculative
from aimss_dask.core.errors import (
    DuplicateOriginError,
    PartitionLostError,
    PushesPendingError,
    StreamNotFoundError,
    StreamSealedError,
)
from aimss_dask.core.names import RUN_PUSH
from aimss_dask.core.race import Speculative, check_race, task_key
from aimss_dask.core.runs import RunSpec
from aimss_dask.core.specs import Origin, StreamSpec
from aimss_dask.ops import local
from aimss_dask.ops.pieces import Pieces
from aimss_dask.transport import speccache


def restartable(func: Any) -> Any:
    """A task of a run that waits on others (a seal, a read): a restart hands it back.

    When its run restarts under it (the coordinator made a newer stream of
    a name it used, or dropped the old one), ``Reschedule`` hands the task
    back to the scheduler, which runs it once the new run's tasks before it
    are done; the coordinator's restart releases it anyway. A lost
    partition first waits a moment for that restart (the coordinator may
    hear of the loss after this task did). A stream sealed, gone or lost
    for any other reason (destroyed by its user, a run that does not
    restart) is the error it says, never a reschedule loop.

    Examples
    --------
    >>> @restartable
    ... def seal(names, *pushed):  # a PartitionLostError becomes a Reschedule
    ...     ...
    """
    return _on_restart(func, rerun=False)


def rerun_on_restart(func: Any) -> Any:
    """A task of a run that writes (create, push): when the run restarts under it, run again here.

    Like :func:`restartable`, but once the newer streams exist the task runs
    its body again, in place, against them: its writes carry their origin,
    so the owners keep one copy of each input. Not ``Reschedule``: Dask may
    already count this very execution as the restarted task's (a task
    cancelled while it ran and then sent to the same worker again waits for
    it), and a reschedule from there can leave the scheduler waiting on a
    worker that forgot the task.
    """
    return _on_restart(func, rerun=True)


def copyable(func: Any) -> Speculative:
    """A push task: :func:`rerun_on_restart`, and a straggling execution may get a copy.

    A push's writes carry their origin ``(input, attempt)`` and a copy is
    another attempt, so the owners keep the first copy of each partition's
    record and drop the other (first commit wins): the run's output stays
    exactly-once, and no user has to declare anything. The coordinator
    starts a copy only under ``aimss.speculation`` (on by default); see
    :func:`aimss_dask.speculative` for the race, and :class:`RunWriter` for
    how the losing execution stops at its next write. Marked
    :data:`~aimss_dask.core.names.RUN_PUSH`: a push submitted while a worker
    is found slow runs elsewhere.
    """
    marked = speculative(rerun_on_restart(func))
    setattr(marked, RUN_PUSH, True)
    return marked


#: Seconds a task that lost a partition (or found no log) waits for the coordinator to restart or recover its run.
RESTART_WAIT = 30.0
#: Most times one execution runs its body again (each needs a newer run: a kill).
MAX_RERUNS = 10

#: An execution's n-th run of its body writes as attempt ``run_id + n * RERUN_STRIDE``:
#: the owners of partitions that survived a recovery still hold the copies
#: its first run sent, under its first attempt (a second group from one
#: attempt would be refused as a second write). Dask's run ids, from one
#: counter per scheduler, stay far below the stride.
RERUN_STRIDE = 1 << 40

# Which run of its body the task on this thread is in (see RERUN_STRIDE).
_body = threading.local()


def _on_restart(func: Any, rerun: bool) -> Any:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from distributed import Reschedule

        outer = getattr(_body, "run", 0)
        for i in range(MAX_RERUNS):
            with speccache.tracking() as used:
                try:
                    _body.run = i
                    out = func(*args, **kwargs)
                    return _pushed(out, used) if rerun else out
                except (PartitionLostError, StreamSealedError, StreamNotFoundError) as e:
                    if rerun and isinstance(e, StreamSealedError) and _sealed_after_us(used):
                        # Dask runs a push again whose result died with a
                        # worker after the seal; the seal waited for every
                        # push of the streams it used, so its records are in
                        # (copies took over what the worker owned).
                        return _pushed(0, used)
                    lost = isinstance(e, PartitionLostError)
                    # An owner without the log asked for may know of a newer
                    # stream than the coordinator has made public yet (a
                    # restart or a recovery under way): wait for it too. A
                    # sealed stream is final.
                    wait = 0.0 if isinstance(e, StreamSealedError) else RESTART_WAIT
                    news = _restarted(used, wait=wait)
                    if news == "same" or (news == "gone" and not lost and not used):
                        # What the task found, for whoever reads the error.
                        e.add_note(f"aimss: the streams this task used ({used}) were {news} when it gave up")
                        raise
                    # Newer streams: run against them. None used yet and lost:
                    # a create whose streams a restart took while it registered.
                    if rerun and (news == "newer" or not used):
                        continue
                    raise Reschedule() from e
                finally:
                    _body.run = outer
        raise AssertionError(f"{func.__name__} ran {MAX_RERUNS} times, each under a run restarted again")

    return wrapper


class Pushed(int):
    """What a push task returns: its count, with the streams (and epochs) it wrote to and its key.

    The seal checks the epochs: a push whose result comes from an execution
    that wrote to an older stream of the run (it ran on while the run
    restarted, and Dask took its result for the new run's) did not write
    to the stream the seal is about to end (see :func:`seal`).
    """

    epochs: dict[str, int]
    key: Any

    def __new__(cls, n: int, epochs: dict[str, int], key: Any) -> Pushed:
        out = super().__new__(cls, n)
        out.epochs = dict(epochs)
        out.key = key
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return Pushed, (int(self), self.epochs, self.key)


def _pushed(out: Any, used: dict[str, int]) -> Any:
    """A push's count as :class:`Pushed`; anything else (a create's names) as it is."""
    if not isinstance(out, int) or isinstance(out, bool) or not used:
        return out
    try:
        key = task_key()  # a copy's result stands for the straggler's
    except ValueError:
        return out  # not in a Dask task: nothing will check it
    return Pushed(out, used, key)


def _sealed_after_us(used: dict[str, int]) -> bool:
    """Whether every stream a task used is still the one it used, or continues it (a replica took over).

    Not a restart's new stream: that one starts a new line of epochs, and
    the task runs again against it.
    """
    if not used:
        return False
    for name, epoch in used.items():
        spec = _spec_now(name)
        if spec is None or not spec.first_epoch <= epoch <= spec.epoch:
            return False
    return True


def _spec_now(name: str) -> StreamSpec | None:
    """Stream ``name``'s spec as the coordinator has it now (the cached one forgotten); None if it has none."""
    speccache.forget(name)
    try:
        return api.get_stream(name).spec
    except StreamNotFoundError:
        return None


def _restarted(used: dict[str, int], wait: float) -> str:
    """What became of the streams a task used: ``"newer"``, ``"gone"`` or ``"same"``.

    ``"newer"``: the coordinator made a newer stream of one of those names
    (its run restarted); ``"gone"``: one is dropped (a restart in progress,
    or destroyed), or the task failed before it used any; ``"same"``: all
    are still the ones used, after ``wait`` seconds of asking. Forgets the
    cached specs, so that a next attempt looks them up.
    """
    if not used:
        return "gone"
    deadline = time.monotonic() + wait
    while True:
        for name, epoch in used.items():
            spec = _spec_now(name)
            if spec is None:
                return "gone"
            if spec.epoch > epoch:
                return "newer"
        if time.monotonic() >= deadline:
            return "same"
        time.sleep(0.1)


class StreamName(str):
    """A stream's name, with the epoch of the stream its create task made.

    What a create task returns: the pushes use it as the name, and the seal
    seals that very stream, never a newer one of the same name (a run
    restarted while an older execution of its seal was still running).
    """

    epoch: int

    def __new__(cls, name: str, epoch: int) -> StreamName:
        out = super().__new__(cls, name)
        out.epoch = int(epoch)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return StreamName, (str(self), self.epoch)


@rerun_on_restart
def create(spec: RunSpec, npartitions: int, prefer: list[Any] | None = None) -> list[StreamName]:
    """The create task: register the run, which creates its streams; their names, with their epoch.

    ``prefer[p]``: the key of the task whose result is most of partition
    ``p``'s input (see :func:`aimss_dask.api.runs.register_run`).
    """
    return [StreamName(s.name, s.spec.epoch) for s in register_run(spec, npartitions, prefer).streams]


@restartable
def seal(names: list[str], *pushed: int) -> int:
    """The barrier: every map task is done; seal so readers see the end.

    ``names``: the create task's result; ``pushed``: the pushes' results
    (:class:`Pushed`). A stream made after the create's (the run
    restarted under this execution), or a push that wrote to an older
    stream, means a result that is not this run's: the coordinator has
    those tasks computed again (``aimss_run_stale``), and the seal hands
    itself back to the scheduler, to run after them. Sealing would end the
    stream without all its records.
    """
    from distributed import Reschedule

    streams = [api.get_stream(name) for name in names]
    now = {s.name: s.spec.epoch for s in streams}
    # A result that is not this run's: the create's (its streams were made
    # before a restart) or a push's (it wrote to an older stream). Dask
    # took it from an execution that ran on across the restart. Those
    # tasks run again, and this seal after them.
    # The create's streams may have been recovered since (a newer epoch that
    # continues them: see aimss_dask.coordinator.recovery), not replaced.
    first = {s.name: s.spec.first_epoch for s in streams}
    stale_create = any(not first[str(n)] <= getattr(n, "epoch", now[str(n)]) <= now[str(n)] for n in names)
    older = [p for p in pushed if isinstance(p, Pushed) and any(p.epochs.get(n, e) != e for n, e in now.items())]
    if stale_create or older:
        # The coordinator tells which older epochs still hold every record
        # (only owners changed: a replica took over); the others are stale.
        got = current("get_stream").scheduler_op(
            "run_stale", stream=str(names[0]),
            keys=[list(p.key) if isinstance(p.key, tuple) else p.key for p in older],
            epochs=[dict(p.epochs) for p in older], create=stale_create,
        )
        if stale_create or got.get("stale", len(older)):
            raise Reschedule()
    # The whole cluster waits on this barrier: a sync phase, which idle
    # fillers may use (aimss.power.auto-phases).
    with barrier_phase("aimss-seal"):
        for stream in streams:
            try:
                stream.seal()
            except PushesPendingError:
                # This execution outlived its pushes: a worker left with records
                # they had not sent, and Dask computes them again (and this
                # barrier after them).
                raise Reschedule() from None
    return sum(pushed)


class RunWriter:
    """The writes of one input of a push run, tagged with where they come from.

    Each record carries the :class:`~aimss_dask.core.specs.Origin` ``(input_id,
    attempt)``, ``attempt`` being Dask's execution id of the task
    (:func:`aimss_dask._compat.task_attempt`): when Dask runs the input's
    push twice, the owners keep the first copy of each partition's record
    and drop the other (plan §2.8). Outside a Dask task there is no attempt,
    and records go without an origin (kept, at-least-once).

    Dedup rests on one record per (input, partition) (plan risk 9): a second
    write to a partition raises here, in the task, before anything is sent,
    so that no future change to an operator can have a re-run drop data.

    Examples
    --------
    >>> w = RunWriter("aimss-shuffle-abc-0", input_id=3)  # doctest: +SKIP
    >>> for p, shard in shards:                          # doctest: +SKIP
    ...     w.write(shard, p)
    """

    __slots__ = ("spec", "origin", "_producer", "_written", "_only")

    def __init__(self, name: str, input_id: int | None) -> None:
        self.spec = api.operator_stream(name).spec
        self._producer = current("write_to").producer
        attempt = task_attempt() if input_id is not None else None
        if attempt is not None:
            attempt += getattr(_body, "run", 0) * RERUN_STRIDE
        self.origin = None if attempt is None else Origin(input_id, attempt)
        self._written: set[int] = set()
        # The stream was recovered: this execution may owe only the
        # partitions the recovery re-created (aimss_dask.coordinator.recovery).
        self._only = _refill(self.spec, self.origin.input) if self.spec.since and self.origin is not None else None

    @property
    def only(self) -> frozenset[int] | None:
        """The partitions this execution must write (a push run again after a recovery); None: all.

        Writes to the others are dropped: a push can skip building them.
        """
        return self._only

    def write(self, record: Any, partition: int) -> None:
        """Write ``record`` (this input's only one) to ``partition``.

        An execution whose copy has already finished stops here
        (:class:`~aimss_dask.core.race.RaceLost`): the owners would drop
        what it still sends.
        """
        check_race()
        if partition in self._written:
            raise DuplicateOriginError(
                f"input {self.origin.input if self.origin else '?'} of stream "
                f"{self.spec.name!r} wrote partition {partition} twice; a push run writes one "
                "record per input and partition, or the owners would drop the second as a copy"
            )
        self._written.add(partition)
        if self._only is not None and partition not in self._only:
            return  # the survivors hold this input's records already
        try:
            self._producer.write(self.spec, partition, record, origin=self.origin)
        except StreamNotFoundError:
            # A stale cached spec (the run restarted): ask again next time.
            speccache.forget(self.spec.name)
            raise


def _refill(spec: StreamSpec, input_id: int) -> frozenset[int] | None:
    """The partitions of recovered ``spec`` the push of input ``input_id`` running here must write; None: all of them."""
    try:
        key = task_key()
    except ValueError:
        return None  # not in a Dask task
    reply = current("write_to").scheduler_op(
        "run_refill", key=list(key) if isinstance(key, tuple) else key, stream=spec.name, epoch=spec.epoch,
        input=input_id,
    )
    ps = reply.get("partitions")
    return None if ps is None else frozenset(ps)


@copyable
def push_pieces(
    block: np.ndarray, names: list[str], pieces: Pieces, input_id: int | None = None
) -> int:
    """Push each piece of one input block to its output chunk's partition.

    ``pieces``: ``(partition, (start, stop) per axis in the block, (start,
    stop) per axis in the chunk)``, cut on the client
    (:func:`aimss_dask.ops.pieces.partition_pieces`). ``input_id``: the block's
    flat index in its array, the pieces' origin (see :class:`RunWriter`);
    ``None``: no origin.
    """
    writer = RunWriter(names[0], input_id)
    here = local.here()[0]
    owners = writer.spec.owners
    # A piece for this worker's own partition stays in the log until its
    # chunk is assembled. As a view of the block it needs no copy and no
    # fresh pages; the view keeps the whole block alive, which costs nothing
    # while Dask holds it anyway (a persisted input). Once the log is tight,
    # a local piece gets memory of its own, exactly what the log counts, so
    # the block can go.
    tight = local.memory_tight()
    only = writer.only
    cuts = [
        (p, tuple(slice(a, b) for a, b in src), dst, owners[p] == here)
        for p, src, dst in pieces
        if only is None or p in only
    ]
    # Pieces for other workers that are not contiguous (column slices) are
    # copied into one scratch buffer: memory this worker touched before,
    # free again once they are sent. Row slices of a C-ordered block are
    # sent as views: Dask never modifies a task's input.
    strided = sum(
        block[src].size for _, src, _, is_local in cuts if not is_local and not block[src].flags.c_contiguous
    )
    # Scratch memory is raw bytes: an array of references (object dtype)
    # cannot live there, and gets memory of its own.
    alloc = np.empty if block.dtype.hasobject else local.scratch()[1]
    flat = alloc((strided,), block.dtype) if strided else None
    pos = 0
    for p, src, dst, is_local in cuts:
        view = block[src]
        if is_local:
            if tight:
                view = view.copy()
        elif not view.flags.c_contiguous:
            assert flat is not None
            piece = flat[pos : pos + view.size].reshape(view.shape)
            np.copyto(piece, view)
            pos += view.size
            view = piece
        writer.write((dst, view), p)
    return int(block.size)
