"""Stream specs and the checks and hashing every process applies to them.

Plain data and pure functions: the coordinator, the workers, clients and
operators all import this without importing each other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from aimss_dask.errors import InvalidArgumentError, PartitionOutOfRangeError


@dataclass(frozen=True)
class StreamSpec:
    """What every process needs to know of a stream; never mutated.

    ``epoch`` is unique per creation, so messages meant for a destroyed stream
    are rejected by a new stream of the same name rather than applied to it.
    """

    name: str
    partitions: int
    owners: tuple[str, ...]
    epoch: int
    parent: str | None = None
    persist: bool = False
    creator: str | None = None

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
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StreamSpec:
        return cls(**{**d, "owners": tuple(d["owners"])})


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
