"""The exceptions aimss_dask raises.

Each class subclasses the builtin that users already catch (``LookupError``,
``ValueError``, ``RuntimeError``, ...), so ``except ValueError`` keeps working.
Errors cross the wire as values (``error_to_wire``) and are re-raised with the
same class on the caller's side (``raise_from_wire``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class AIMSSError(Exception):
    """Base class of every error aimss_dask raises on purpose."""


class NotRegisteredError(AIMSSError, RuntimeError):
    """No AIMSS plugin is registered on the cluster (or no cluster at all)."""


class StreamNotFoundError(AIMSSError, LookupError):
    """The named stream does not exist (never created, or destroyed)."""


class RunNotFoundError(AIMSSError, LookupError):
    """No run of that id is registered (never registered, or forgotten after it finished)."""


class StreamExistsError(AIMSSError, ValueError):
    """``create_stream`` of a name that already exists."""


class InvalidArgumentError(AIMSSError, ValueError):
    """A bad argument: a partition count, a name, an option."""


class InvalidTypeError(AIMSSError, TypeError):
    """An argument of the wrong type: ``partitions="4"``, ``timeout="1s"``, ``start=1.5``.

    A ``TypeError``, as Python raises for a wrong type; not a ``ValueError``
    like :class:`InvalidArgumentError`, which is for a wrong value.
    """


class PartitionOutOfRangeError(InvalidArgumentError):
    """A partition number outside ``0 .. partitions - 1``."""


class PartitionNotHeldError(PartitionOutOfRangeError):
    """A worker asked for a partition it does not hold (any more): it moved, and the coordinator knows where."""


class InvalidOffsetError(InvalidArgumentError):
    """A negative offset, or one below what the log still retains."""


class RecordNotSerializableError(AIMSSError, ValueError):
    """A record that Dask cannot serialise."""


class StreamSealedError(AIMSSError, RuntimeError):
    """A write to a stream after ``seal()``."""


class PartitionLostError(AIMSSError, RuntimeError):
    """The worker that owned a partition left the cluster with its data.

    ``lost``: ``{partition: (first_offset, end_offset)}``, the offsets that
    are gone, as far as the coordinator knows them. ``end_offset`` is None
    for a partition that was open: everything from ``first_offset`` on is
    lost, including records written after its owner's last report. A
    write's error names the partitions whose writes failed, which may not be
    the one that call wrote to (an earlier write's failure is told at the
    next call); ``(0, None)`` where the coordinator had not heard of the
    loss yet.

    Examples
    --------
    >>> e = PartitionLostError("partition 2 of 's' was lost", lost={2: (0, 120)})
    >>> e.lost
    {2: (0, 120)}
    """

    def __init__(self, message: str = "", lost: Mapping[int, tuple[int, int | None]] | None = None) -> None:
        super().__init__(message)
        self.lost: dict[int, tuple[int, int | None]] = {
            int(p): (int(r[0]), None if r[1] is None else int(r[1])) for p, r in (lost or {}).items()
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their args only: keep the ranges across processes.
        return (type(self), (self.args[0] if self.args else "", self.lost))


class ReadTimeoutError(AIMSSError, TimeoutError):
    """No new record arrived on an open partition within ``timeout``."""


class StoreNotFoundError(AIMSSError, FileNotFoundError):
    """A Zarr store or array to read from does not exist."""


class StreamPermissionError(AIMSSError, PermissionError):
    """An application did something to a stream its owner has not allowed it (the data is left intact)."""


class StoreReadOnlyError(AIMSSError, PermissionError):
    """A Zarr store to write to is read-only."""


class SinkError(AIMSSError, RuntimeError):
    """A sink failed to make data durable (a failed write, a lost writer)."""


class MissingDependencyError(AIMSSError, ImportError):
    """An optional package a call needs is not installed (``s3fs`` for ``s3://``)."""


class SpillCorruptionError(AIMSSError, OSError):
    """A spilled segment read back from disk is not what the log wrote there."""


class SpillError(AIMSSError, OSError):
    """A worker's log is past its memory budget and cannot spill (its folder full or unwritable): writes are refused, not stored."""


class ReplicaGapError(AIMSSError, RuntimeError):
    """A copy of a partition was sent from an offset past the replica's end (it missed records)."""


class WriteOrderError(AIMSSError, RuntimeError):
    """Records of a writer reached a replicated partition's owner out of order.

    Writes to a replicated stream carry their writer's sequence numbers so
    that an owner drops a record the writer sends again after a failover. A
    batch that skips numbers would make the records in between look stored
    when they are not, so it is refused whole, and the writer is told,
    rather than losing them silently.
    """


class PushesPendingError(AIMSSError, RuntimeError):
    """A run's stream cannot be sealed yet: pushes of its run are being computed again.

    A worker left after the run's barrier task had started, taking records
    that its finished pushes had not sent yet; Dask computes those pushes
    again, and the barrier runs again once they are done. Sealing before
    would end partitions without their records.
    """


class WorkerClosingError(AIMSSError, ConnectionError):
    """The worker asked is closing: its AIMSS plugin is torn down and its log closed.

    Dask lists a closing worker until its connection to the scheduler ends,
    so a message sent to every worker can reach one. It is a
    ``ConnectionError`` (an ``OSError``), like the comm's error a moment
    later: whoever handles a worker leaving handles this one too.
    """


class DuplicateOriginError(AIMSSError, RuntimeError):
    """Two different groups of records carry the same origin.

    An input wrote twice to one partition within one attempt under the same
    ``Origin`` (``seq`` not advanced). The owner keeps the first copy of each
    origin, so a re-run of that input would have both its writes dropped
    while the first attempt may have delivered only one: data would be lost
    on a retry, silently. The write is refused instead (and so is every later
    copy of that origin). Give each group its own ``Origin.seq``, or write
    one group per partition.
    """


_BY_NAME: dict[str, type[AIMSSError]] = {
    cls.__name__: cls
    for cls in (
        AIMSSError,
        NotRegisteredError,
        StreamNotFoundError,
        RunNotFoundError,
        StreamExistsError,
        InvalidArgumentError,
        InvalidTypeError,
        PartitionOutOfRangeError,
        PartitionNotHeldError,
        InvalidOffsetError,
        RecordNotSerializableError,
        StreamSealedError,
        PartitionLostError,
        ReadTimeoutError,
        StoreNotFoundError,
        StoreReadOnlyError,
        StreamPermissionError,
        SinkError,
        MissingDependencyError,
        SpillCorruptionError,
        SpillError,
        DuplicateOriginError,
        PushesPendingError,
        ReplicaGapError,
        WriteOrderError,
        WorkerClosingError,
    )
}


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """Encode an exception as a plain message for a Dask comm reply."""
    name = type(exc).__name__ if type(exc).__name__ in _BY_NAME else "AIMSSError"
    message = exc.args[0] if exc.args else repr(exc)
    if name == "AIMSSError" and not isinstance(exc, AIMSSError):
        message = f"{type(exc).__name__}: {message}"
    out = {"status": "aimss-error", "type": name, "message": str(message)}
    if isinstance(exc, PartitionLostError) and exc.lost:
        out["lost"] = lost_to_wire(exc.lost)
    return out


def error_from_wire(kind: str, message: str, lost: Any = None) -> AIMSSError:
    """The exception a ``(class name, message)`` pair stands for.

    ``lost``: ``[[partition, first, end], ...]`` of a :class:`PartitionLostError`.
    """
    cls = _BY_NAME.get(kind, AIMSSError)
    if cls is PartitionLostError:
        return PartitionLostError(message, lost_ranges(lost))
    return cls(message)


def lost_ranges(wire: Any) -> dict[int, tuple[int, int | None]]:
    """``{partition: (first, end)}`` from its wire form ``[[partition, first, end], ...]``."""
    return {int(p): (int(a), None if b is None else int(b)) for p, a, b in (wire or ())}


def lost_to_wire(lost: Mapping[int, tuple[int, int | None]]) -> list[list[int | None]]:
    """``[[partition, first, end], ...]``: the wire form :func:`lost_ranges` reads."""
    return [[p, a, b] for p, (a, b) in sorted(lost.items())]


def describe_lost(lost: Mapping[int, tuple[int, int | None]]) -> str:
    """Lost offset ranges, for messages.

    >>> describe_lost({2: (0, 120), 5: (40, None), 7: (3, 3)})
    'partition 2 (offsets 0-119), partition 5 (offsets 40 on), partition 7 (no record)'
    """
    return ", ".join(
        f"partition {p} (offsets {a}-{b - 1})" if b is not None and b > a
        else f"partition {p} (no record)" if b is not None
        else f"partition {p} (offsets {a} on)"
        for p, (a, b) in sorted(lost.items())
    )


def raise_from_wire(reply: Any, op: str) -> Any:
    """Return ``reply`` unless it encodes an error, which is raised instead.

    ``None`` is what a Dask server answers for an unknown handler: it means the
    AIMSS plugin is not registered where we sent ``op``.
    """
    if reply is None:
        raise NotRegisteredError(
            f"no AIMSS plugin answered {op!r}: register it first with "
            "`client.register_plugin(aimss_dask.AIMSS())`"
        )
    if isinstance(reply, dict) and reply.get("status") == "aimss-error":
        raise error_from_wire(reply["type"], reply["message"], reply.get("lost"))
    if isinstance(reply, dict) and reply.get("status") == "uncaught-error":
        # A bug on the remote side: Dask sends the exception itself.
        exc = reply.get("exception")
        if isinstance(exc, BaseException):
            raise exc
        raise AIMSSError(f"{op!r} failed remotely: {reply.get('text', reply)}")
    return reply
