"""Runs as the coordinator sees them: an operator run's frozen spec and its policies.

Every operator (shuffle, merge, rechunk, ``to_zarr``, the streaming sink, the
source) is a *run*: a frozen :class:`RunSpec` registered with the
coordinator. The base fields are plain data and policy enums, and the
coordinator's hooks (:meth:`~RunSpec.output_partition`,
:meth:`~RunSpec.seal_action`, :meth:`~RunSpec.loss_action`) are final methods
over them: the coordinator decides what to pin, what to do at seal and what
to do when a worker leaves without running any operator code. An operator
subclasses the spec under a ``kind``; the whole spec travels pickled in the
wire form's ``payload``, which only workers unpickle.

Examples
--------
>>> @dataclass(frozen=True, kw_only=True)
... class DemoSpec(RunSpec, kind="doc-demo"):
...     npartitions: int = 4
>>> spec = DemoSpec(run_id="abc", streams=("demo-abc",), on_seal=OnSeal.REBALANCE,
...                 free_unread=True, on_loss=OnLoss.RESTART)
>>> spec.seal_action("demo-abc")
(<OnSeal.REBALANCE: 'rebalance'>, True)
>>> KINDS["doc-demo"]
'aimss_dask.core.runs:DemoSpec'
"""

from __future__ import annotations

import numbers
import pickle
from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar, TypedDict, final

from aimss_dask.core.errors import InvalidArgumentError
from aimss_dask.core.names import PARTITION_TASK_PREFIX
from aimss_dask.core.specs import check_name

#: A Dask task key: a str, or a tuple of a str and ints/strs.
Key = Hashable


class OnSeal(str, Enum):
    """At seal: ``KEEP`` partitions where they are (a sink writes each unit where it
    completes), or ``REBALANCE`` the bytes per worker before the outputs run."""

    KEEP = "keep"
    REBALANCE = "rebalance"


class OnLoss(str, Enum):
    """When a worker holding a run's partitions leaves: ``RESTART`` (forget its
    streams, release create..barrier..outputs, Dask runs it again under a new
    epoch), ``RECOVER`` (while its streams are written: keep the partitions
    that survive, re-create the lost ones and run again the pushes that fed
    them, see :mod:`aimss_dask.coordinator.recovery`; once sealed, as
    ``RESTART``), ``RERUN`` (nothing to undo: Dask recomputes the lost tasks),
    or ``FAIL`` (:class:`~aimss_dask.core.errors.PartitionLostError`)."""

    RESTART = "restart"
    RECOVER = "recover"
    RERUN = "rerun"
    FAIL = "fail"


class RunState(str, Enum):
    """Where a run is in its life; DONE, FAILED and CLOSED are final (:data:`FINISHED`)."""

    REGISTERED = "registered"
    RUNNING = "running"
    SEALED = "sealed"
    DONE = "done"
    FAILED = "failed"
    RESTARTING = "restarting"
    CLOSED = "closed"


#: Loss policies under which a run runs again (all of it, or what was lost).
RUNS_AGAIN = frozenset({OnLoss.RESTART, OnLoss.RECOVER})

#: States a run (of one epoch) never leaves.
FINISHED = frozenset({RunState.DONE, RunState.FAILED, RunState.CLOSED})

#: Operator kinds: ``kind -> "module:qualname"`` of its spec class, filled
#: when an operator module is imported (``RunSpec.__init_subclass__``).
KINDS: dict[str, str] = {}


@dataclass(frozen=True)
class OutputMap:
    """How a run's output task keys map to partitions of its stream ``stream``.

    Keys are ``(PARTITION_TASK_PREFIX + run_id, stream, p)`` when ``grid`` is
    None (a shuffle's output frames), else ``(PARTITION_TASK_PREFIX + run_id,
    *index)`` with the partition ``index`` raveled (C order) over ``grid``
    (a rechunk's output chunks) -- today's two key conventions.

    Examples
    --------
    >>> OutputMap("rechunk-abc-0", grid=(2, 3)).partition_of((1, 2))
    5
    """

    stream: str
    grid: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_name(self.stream, "output stream name")
        if self.grid is not None:
            grid = tuple(self.grid)
            if not grid or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid):
                raise InvalidArgumentError(
                    f"output grid {self.grid!r} of stream {self.stream!r} must be a "
                    "non-empty tuple of positive ints (output chunks per axis)"
                )
            object.__setattr__(self, "grid", grid)

    def partition_of(self, index: tuple[Any, ...]) -> int | None:
        """The partition of an output chunk ``index``; None if outside the grid."""
        assert self.grid is not None
        if len(index) != len(self.grid):
            return None
        p = 0
        for i, n in zip(index, self.grid):
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
                return None
            p = p * n + i
        return p


class RunWire(TypedDict):
    """A spec on the wire: the base fields as plain data, its kind, the pickled spec."""

    run_id: str
    streams: list[str]
    reads: list[str]
    create: Any
    barrier: Any
    outputs: dict[str, Any] | None
    on_seal: str
    free_unread: bool
    on_loss: str
    start_on_owners: bool
    watch_appends: bool
    inputs: int
    io_priority: int
    kind: str
    payload: bytes


@dataclass(frozen=True, kw_only=True)  # kw_only: subclasses add fields without defaults
class RunSpec:
    """The frozen description of one operator run, as registered with the coordinator.

    ``run_id`` is the run's token, in all its keys and stream names. It owns
    ``streams`` (their seal and loss follow its policies; a stream has at most
    one unfinished owner) and only reads ``reads`` (a sink or a loader on a
    user's stream: their loss concerns it, their seal does not). ``create``
    and ``barrier`` are the keys ``RESTART`` starts again from; ``outputs``
    maps output keys to the partitions they are pinned to. ``on_seal``,
    ``free_unread`` (free partitions no submitted output reads) and
    ``on_loss`` are the policies. ``start_on_owners``: build the worker-side
    run on the owners at registration; ``watch_appends``: owners push append
    counts (a streaming sink). ``inputs``: how many inputs (ids ``0 ..
    inputs-1``) push into each of its streams, whose records carry their
    :class:`~aimss_dask.core.specs.Origin`; owners then drop a second copy of
    an input (0: records carry no origin, nothing is dropped).
    ``replication``: copies of each partition of its streams (None: the
    ``aimss.replication`` default, as many as there are running workers at
    most); with 2 or more, a lost worker's partitions are taken over by
    their copies instead of being computed again. ``io_priority``: the
    coordinated I/O scheduler serves the file writes of runs with a higher
    priority first (:mod:`aimss_dask.coordinator.io`; 0 is everyone's
    default). A subclass's own ``__post_init__`` must call
    ``super().__post_init__()``, which checks and normalises these fields.

    Examples
    --------
    >>> s = RunSpec(run_id="abc", streams=("shuffle-abc-0",), outputs=OutputMap("shuffle-abc-0"))
    >>> s.output_partition(s.output_key("shuffle-abc-0", 3))
    ('shuffle-abc-0', 3)
    >>> s.loss_action({"other": {0}}) is None
    True
    >>> RunSpec.view_from_wire(s.to_wire()) == s   # what the coordinator keeps
    True
    """

    run_id: str
    streams: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    create: Key | None = None
    barrier: Key | None = None
    outputs: OutputMap | None = None
    on_seal: OnSeal = OnSeal.KEEP
    free_unread: bool = False
    on_loss: OnLoss = OnLoss.FAIL
    start_on_owners: bool = False
    watch_appends: bool = False
    inputs: int = 0
    replication: int | None = None
    io_priority: int = 0
    kind: ClassVar[str] = "run"

    def __init_subclass__(cls, *, kind: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # dataclass(slots=True) re-creates the class without class keywords:
        # it keeps the kind the first creation set.
        kind = kind if kind is not None else cls.__dict__.get("kind")
        if kind is None:
            raise TypeError(
                f"{cls.__qualname__} needs a kind: class {cls.__name__}(RunSpec, kind='my-operator')"
            )
        check_name(kind, "run kind")
        where = f"{cls.__module__}:{cls.__qualname__}"
        if KINDS.get(kind, where) != where:
            raise InvalidArgumentError(
                f"run kind {kind!r} of {where} is already taken by {KINDS[kind]}; "
                "give the spec class another kind"
            )
        # The coordinator keeps a plain RunSpec view of every spec: an override
        # of its hooks would be silently ignored there, so refuse it here.
        overridden = sorted(_HOOKS & set(cls.__dict__))
        if overridden:
            raise TypeError(f"{where} overrides {overridden}: the coordinator's hooks are final")
        cls.kind = kind
        KINDS[kind] = where

    def __post_init__(self) -> None:
        check_name(self.run_id, "run id")
        for field in ("streams", "reads"):
            names = tuple(getattr(self, field))
            for n in names:
                check_name(n, f"stream name in {field} of run {self.run_id!r}")
            if len(set(names)) != len(names):
                raise InvalidArgumentError(f"{field} {names!r} of run {self.run_id!r} repeat a stream")
            object.__setattr__(self, field, names)
        both = sorted(set(self.streams) & set(self.reads))
        if both:
            raise InvalidArgumentError(
                f"run {self.run_id!r} lists {both} in both streams and reads; a stream it "
                "owns belongs in streams only"
            )
        if not isinstance(self.inputs, int) or isinstance(self.inputs, bool) or self.inputs < 0:
            raise InvalidArgumentError(
                f"inputs={self.inputs!r} of run {self.run_id!r} must be an int >= 0 (0: no origins)"
            )
        r = self.replication
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
            raise InvalidArgumentError(
                f"replication={r!r} of run {self.run_id!r} must be an int >= 1, or None for "
                "the aimss.replication default"
            )
        object.__setattr__(self, "io_priority", check_io_priority(self.io_priority, f"run {self.run_id!r}"))
        if self.outputs is not None and self.outputs.stream not in self.streams:
            raise InvalidArgumentError(
                f"outputs of run {self.run_id!r} read stream {self.outputs.stream!r}, which "
                f"is not one of its streams {list(self.streams)}"
            )
        # Accept the enums' values too ("keep"), as they come off the wire.
        for field, enum in (("on_seal", OnSeal), ("on_loss", OnLoss)):
            object.__setattr__(self, field, _member(enum, getattr(self, field), self.run_id))

    # -- coordinator-side hooks: final, driven by the fields above --------------------------

    @final
    def output_key(self, *index: Any) -> tuple[Any, ...]:
        """The key of an output task: ``(stream, p)``, or a chunk index with a grid."""
        return (PARTITION_TASK_PREFIX + self.run_id, *index)

    @final
    def output_partition(self, key: Key) -> tuple[str, int] | None:
        """``(stream, partition)`` whose owner must run the task ``key``; None: not an output."""
        out = self.outputs
        if out is None or not isinstance(key, tuple) or not key or key[0] != self.output_key()[0]:
            return None
        if out.grid is not None:
            p = out.partition_of(key[1:])
            return None if p is None else (out.stream, p)
        if len(key) != 3 or key[1] != out.stream:
            return None
        p = key[2]
        if not isinstance(p, int) or isinstance(p, bool) or p < 0:
            return None
        return out.stream, p

    @final
    def seal_action(self, stream: str) -> tuple[OnSeal, bool]:
        """``(on_seal, free_unread)`` for the run's stream ``stream``, just sealed."""
        if stream not in self.streams:
            raise InvalidArgumentError(
                f"stream {stream!r} is not one of the streams {list(self.streams)} "
                f"that run {self.run_id!r} owns; its seal is not the run's to handle"
            )
        return self.on_seal, self.free_unread

    @final
    def loss_action(
        self, lost: Mapping[str, Collection[int]], address: str | None = None
    ) -> tuple[OnLoss, str | None] | None:
        """What losing ``lost`` (stream -> partitions) does to this run.

        None when none of those partitions is in a stream the run owns or
        reads; else ``(on_loss, message)``, the message (for
        :class:`~aimss_dask.core.errors.PartitionLostError`) only with ``FAIL``.
        """
        hit = {name: sorted(lost[name]) for name in (*self.streams, *self.reads) if lost.get(name)}
        if not hit:
            return None
        if self.on_loss is not OnLoss.FAIL:
            return self.on_loss, None
        what = "; ".join(f"partition(s) {ps} of stream {name!r}" for name, ps in hit.items())
        who = f"worker {address}" if address else "their worker"
        return OnLoss.FAIL, (
            f"{what} were lost with {who}, so run {self.run_id!r} ({self.kind}) failed: "
            "it cannot recover them (on_loss='fail'); run it again"
        )

    # -- wire ---------------------------------------------------------------------------

    def to_wire(self) -> RunWire:
        """The base fields as plain data, the kind, and ``payload``: the pickled spec."""
        out = self.outputs
        return {
            "run_id": self.run_id,
            "streams": list(self.streams),
            "reads": list(self.reads),
            "create": self.create,
            "barrier": self.barrier,
            "outputs": None if out is None else {"stream": out.stream, "grid": out.grid and list(out.grid)},
            "on_seal": self.on_seal.value,
            "free_unread": self.free_unread,
            "on_loss": self.on_loss.value,
            "start_on_owners": self.start_on_owners,
            "watch_appends": self.watch_appends,
            "inputs": self.inputs,
            "replication": self.replication,
            "io_priority": self.io_priority,
            "kind": self.kind,
            # By reference to the class: unpickling imports the operator's
            # module, which is how operators "register" on a worker.
            "payload": _pickle(self),
        }

    @staticmethod
    def view_from_wire(d: Mapping[str, Any]) -> RunSpec:
        """The base fields of a wire spec as a plain :class:`RunSpec` (the payload is not read).

        This is what the coordinator keeps: it never unpickles an operator's spec.
        """
        try:
            outputs = d["outputs"]
            base = {f.name: d[f.name] for f in fields(RunSpec) if f.name != "outputs"}
        except KeyError as e:
            raise InvalidArgumentError(
                f"a wire run spec lacks field {e.args[0]!r}: {dict(d)!r:.200}"
            ) from None
        base.update(create=_as_key(base["create"]), barrier=_as_key(base["barrier"]))
        if outputs is not None:
            grid = outputs.get("grid")
            outputs = OutputMap(outputs["stream"], None if grid is None else tuple(grid))
        return RunSpec(**base, outputs=outputs)


#: The coordinator-side hooks: driven by the base fields, never overridden.
_HOOKS = frozenset(
    {"output_key", "output_partition", "seal_action", "loss_action", "to_wire", "view_from_wire"}
)


def check_io_priority(value: object, of: str) -> int:
    """``value`` as an I/O priority: an int (higher is served first), else a clear error.

    >>> check_io_priority(2, "run 'x'")
    2
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # NumPy ints too
        raise InvalidArgumentError(
            f"io_priority={value!r} of {of} must be an int (higher is served first; 0 is the default)"
        )
    return int(value)


def _pickle(spec: RunSpec) -> bytes:
    try:
        return pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise InvalidArgumentError(
            f"run spec {type(spec).__qualname__} of run {spec.run_id!r} cannot be pickled "
            f"by reference ({e}); define the class at the top level of an importable "
            "module, with picklable fields"
        ) from e


def _member(enum: type[Enum], value: object, run_id: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        allowed = [m.value for m in enum]  # type: ignore[var-annotated]
        raise InvalidArgumentError(
            f"{enum.__name__} {value!r} of run {run_id!r} is not one of {allowed}"
        ) from None


def _as_key(key: Any) -> Any:
    """A Dask key back from the wire, where msgpack turned its tuples into lists."""
    return tuple(_as_key(k) for k in key) if isinstance(key, (list, tuple)) else key
