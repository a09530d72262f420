"""Stream specs and the checks and hashing every process applies to them.

Plain data and pure functions: the coordinator, the workers, clients and
operators all import this without importing each other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

from aimss_dask.core.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    PartitionOutOfRangeError,
)


@dataclass(frozen=True)
class StreamSpec:
    """What every process needs to know of a stream; never mutated.

    ``epoch`` is unique per creation, so messages meant for a destroyed stream
    are rejected by a new stream of the same name rather than applied to it.
    ``since`` (0: ``epoch`` itself) is the epoch the stream was created at
    when a run's recovery re-created lost partitions, or a replica took
    over a partition whose owner died, under a newer epoch
    (:meth:`recovered`): the partitions that survived keep their records,
    and owners take writes tagged with any epoch from ``since`` to ``epoch``.

    ``replicas[p]``: the workers that hold a copy of partition ``p`` besides
    its owner (empty for a stream with one copy). The owner forwards what
    it stores to them, in its own order, and answers a writer only once
    every copy is stored (see :mod:`aimss_dask.node.replication`).

    Examples
    --------
    >>> s = StreamSpec("s", 2, ("a", "b"), epoch=3, replicas=(("b",), ("a",)), replication=2)
    >>> r = s.recovered(5, ("a", "c"), (("c",), ()))
    >>> (r.epoch, r.first_epoch, r.owners, r.replication), StreamSpec.from_wire(r.to_wire()) == r
    ((5, 3, ('a', 'c'), 2), True)
    >>> s.holders(1), r.replicas_of(1)
    (('b', 'a'), ())
    """

    name: str
    partitions: int
    owners: tuple[str, ...]
    epoch: int
    parent: str | None = None
    persist: bool = False
    creator: str | None = None
    since: int = 0
    replicas: tuple[tuple[str, ...], ...] = ()
    #: Copies of each partition the stream was made with (its owner's
    #: included); ``replicas`` may hold fewer while workers are missing.
    replication: int = 1

    def replicas_of(self, p: int) -> tuple[str, ...]:
        """The live copies of partition ``p`` other than its owner's."""
        return self.replicas[p] if self.replicas else ()

    def holders(self, p: int) -> tuple[str, ...]:
        """Every worker that holds partition ``p``: its owner first, then its replicas."""
        return (self.owners[p], *self.replicas_of(p))

    @property
    def first_epoch(self) -> int:
        """The epoch the stream was created at (older than ``epoch`` once recovered)."""
        return self.since or self.epoch

    def answers(self, epoch: int) -> bool:
        """Whether a message tagged ``epoch`` is about this stream (its epoch, or an older one it continues)."""
        return self.first_epoch <= epoch <= self.epoch

    def recovered(
        self,
        epoch: int,
        owners: tuple[str, ...],
        replicas: tuple[tuple[str, ...], ...] | None = None,
    ) -> StreamSpec:
        """This stream under a newer ``epoch``, with partitions now on ``owners`` (and ``replicas``)."""
        return replace(
            self,
            epoch=epoch,
            owners=tuple(owners),
            since=self.first_epoch,
            replicas=self.replicas if replicas is None else tuple(tuple(r) for r in replicas),
        )

    def to_wire(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy is slow for thousands of owners.
        return {
            "name": self.name,
            "partitions": self.partitions,
            "owners": list(self.owners),
            "epoch": self.epoch,
            "parent": self.parent,
            "persist": self.persist,
            "creator": self.creator,
            "since": self.since,
            "replicas": [list(r) for r in self.replicas],
            "replication": self.replication,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StreamSpec:
        return cls(
            **{
                **d,
                "owners": tuple(d["owners"]),
                "replicas": tuple(tuple(r) for r in d.get("replicas") or ()),
            }
        )


def check_name(name: object, what: str = "stream name") -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"{what} {name!r} must be a non-empty str")
    return name


def check_partition(spec: StreamSpec, p: object) -> int:
    if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < spec.partitions:
        raise PartitionOutOfRangeError(
            f"stream {spec.name!r} has {spec.partitions} partition(s); partition "
            f"{p!r} is out of range (use 0 .. {spec.partitions - 1})"
        )
    return p


def partition_for_key(key: object, partitions: int) -> int:
    """The partition of a record key: a hash that is stable across processes.

    Python's ``hash`` of a str changes per process, so we hash a canonical
    byte encoding with BLAKE2 instead.
    """
    h = hashlib.blake2b(_key_bytes(key), digest_size=8).digest()
    return int.from_bytes(h, "little") % partitions


def _key_bytes(key: object) -> bytes:
    if isinstance(key, bytes):
        return b"b" + key
    if isinstance(key, str):
        return b"s" + key.encode()
    if isinstance(key, bool):
        return b"o" + bytes([key])
    if isinstance(key, int):
        return b"i" + str(key).encode()
    if isinstance(key, float):
        # float.__repr__ of key + 0.0: -0.0 == 0.0, and np.float64(1.5) keys
        # the same as 1.5 (NumPy 2's repr would say "np.float64(1.5)").
        return b"f" + float.__repr__(float(key) + 0.0).encode()
    if isinstance(key, tuple):
        return b"t" + b"\x00".join(_key_bytes(k) for k in key)
    raise InvalidArgumentError(
        f"record key {key!r} of type {type(key).__name__} has no stable hash; use "
        "a str, bytes, int, float or a tuple of them"
    )


#: The largest attempt an :class:`Origin` may carry: the dedup filter stores
#: ``attempt + 1`` in a signed 64-bit slot (0 meaning "no copy yet").
MAX_ATTEMPT = 2**63 - 2


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a group of records comes from: which input, which execution of it.

    A run's producer tasks tag what they write with an origin so that the
    owner can drop a second copy of the same input (issue 18, item 2). The
    rule, applied per stream, epoch and partition by
    :class:`aimss_dask.node.dedup.OriginFilter`:

        **a second copy of the same input is dropped; first commit wins.**

    Two groups are copies of each other when they carry the same ``input``
    and ``seq`` and go to the same partition; the first one to reach the
    owner is stored, whichever ``attempt`` it belongs to, and a copy from any
    other attempt is dropped whole (a push task re-run by Dask, a speculative
    second execution). Partitions are independent: each one keeps the first
    copy it receives, so a re-run that finishes an interrupted push fills in
    only the partitions the first attempt did not reach. That relies on what
    every operator guarantees: an input writes the same records to a
    partition whichever attempt runs it. A second group with the same origin
    from the *same* attempt is not a copy but a second write: the filter
    raises :class:`~aimss_dask.core.errors.DuplicateOriginError` rather than
    guess (plan risk 9).

    Parameters
    ----------
    input
        The input's id within the stream of the run: the input partition's
        index (shuffle; per side for merge), the input block's flat index
        (rechunk, zarr push). Dense ids ``0 .. inputs - 1`` keep the filter
        small.
    attempt
        The execution of that input: Dask's ``run_id`` of the producer task
        (new at each dispatch), so a re-run or a speculative copy differs.
    seq
        The position of the group among what this execution writes to the
        partition; 0 when it writes one group per partition (every operator
        today). Groups with different ``seq`` are different data.

    Examples
    --------
    >>> a = Origin(input=3, attempt=17)
    >>> a == Origin(3, 17, 0), a.seq
    (True, 0)
    >>> Origin(input=-1, attempt=0)
    Traceback (most recent call last):
    ...
    aimss_dask.core.errors.InvalidArgumentError: origin input -1 must be >= 0 (the input's index in its run)
    """

    input: int
    attempt: int
    seq: int = 0

    def __post_init__(self) -> None:
        # Checked here, once per group on the producer, so that the owner's
        # hot path can trust the three fields (they index arrays there). The
        # common case first: it halves the cost of making an Origin.
        i, a, s = self.input, self.attempt, self.seq
        if type(i) is int and type(a) is int and type(s) is int:
            if i >= 0 and s >= 0 and 0 <= a <= MAX_ATTEMPT:
                return
        for field, value, hint in (
            ("input", self.input, "the input's index in its run"),
            ("attempt", self.attempt, "the producer task's run id"),
            ("seq", self.seq, "the group's position among the attempt's writes"),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidTypeError(
                    f"origin {field} {value!r} must be an int ({hint}), not "
                    f"{type(value).__name__}"
                )
            if value < 0:
                raise InvalidArgumentError(f"origin {field} {value} must be >= 0 ({hint})")
        if self.attempt > MAX_ATTEMPT:
            raise InvalidArgumentError(
                f"origin attempt {self.attempt} is too large: at most {MAX_ATTEMPT}"
            )
