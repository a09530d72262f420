"""Who may do what to a stream: its owner, what it shares, and what it grants.

A stream belongs to the application (the Dask client) that created it; one
made inside a task belongs to the client that wants the task. Its owner may
do everything. Others may:

============  =========================================================
``read``      get a handle, read, and commit their consumer groups
``write``     also append and seal
============  =========================================================

by the stream's ``share`` (for every application), or by a grant to their
client id or to a token they present (``get_stream(name, token=...)``).
Destroying, granting and revoking stay with the owner. Consumer groups are
per application: another application's group ``g`` is its own
(:meth:`StreamAccess.group_key`), apart from the owner's ``g``. The token returned at creation is the
owner's: presenting it makes the caller the owner (how a new client claims
a ``persist=True`` stream after its creator left).

Callers that do not say who they are (AIMSS's own internal requests), and a
task whose client cannot be told, are not checked. An operator's streams
are ``internal``: private to the application of their run for other
clients; tasks (the run's own, whichever client wants them) are not checked. Rules keep applications
from damaging each other's data by mistake; a Dask client can run code
anywhere in its cluster, so they are no barrier against a hostile one (use
separate clusters for that).

Examples
--------
>>> a = StreamAccess(owner="alice", share="read", token="t0")
>>> a.mode("alice"), a.mode("bob")
('owner', 'read')
>>> a.grant("bob", "write"); a.mode("bob")
'write'
>>> a.check("carol", "seal", "s")
Traceback (most recent call last):
...
aimss_dask.core.errors.StreamPermissionError: carol may not seal stream 's' (owner: alice; its share: read, carol's access: read); ask the owner for write access: stream.grant(client, 'write')
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from aimss_dask.core.errors import InvalidArgumentError, StreamPermissionError

#: Access modes, weakest first.
MODES = ("read", "write")
_RANK = {None: 0, "read": 1, "write": 2, "owner": 3}
#: What each operation needs.
NEEDS = {
    "read": "read",
    "commit": "read",
    "write": "write",
    "seal": "write",
    "destroy": "owner",
    "grant": "owner",
    "revoke": "owner",
}


def check_mode(mode: object, what: str = "share") -> str | None:
    """``mode`` if it is None, ``"read"`` or ``"write"``; else :class:`InvalidArgumentError` naming it."""
    if mode is None or mode in MODES:
        return mode  # type: ignore[return-value]
    raise InvalidArgumentError(f"{what}={mode!r} is not one of None (private), 'read', 'write'")


@dataclass
class StreamAccess:
    """One stream's owner, share and grants (kept by the coordinator)."""

    owner: str | None
    share: str | None = None
    #: The owner's claim token (returned to the creator only).
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    #: Client id or token -> mode, as the owner granted.
    grants: dict[str, str] = field(default_factory=dict)
    #: Clients that presented a granted token -> that token.
    presented: dict[str, str] = field(default_factory=dict)
    #: Applications other than the owner that hold a handle on it.
    users: set[str] = field(default_factory=set)
    #: An operator run's stream: only client callers are checked.
    internal: bool = False
    #: The default ``io_priority`` of its sinks (coordinated I/O).
    io_priority: int = 0

    def mode(self, who: str | None) -> str | None:
        """``who``'s access: ``"owner"``, ``"write"``, ``"read"`` or None."""
        if self.owner is None or who is None or who == self.owner:
            return "owner"
        best = self.share
        for m in (self.grants.get(who), self.grants.get(self.presented.get(who, ""))):
            if _RANK[m] > _RANK[best]:
                best = m
        return best

    def group_key(self, who: str | None, group: str) -> str:
        """Where ``who``'s consumer group ``group`` keeps its offsets: the owner's (and
        unchecked callers') under its name, another application's under ``<client>/<group>``.

        >>> a = StreamAccess(owner="A")
        >>> a.group_key("A", "train"), a.group_key("B", "train"), a.group_key(None, "train")
        ('train', 'B/train', 'train')
        """
        if self.owner is None or who is None or who == self.owner:
            return group
        return f"{who}/{group}"

    def check(self, who: str | None, op: str, name: str) -> str | None:
        """``who``'s mode if it may do ``op``; else :class:`StreamPermissionError` naming all three."""
        mode = self.mode(who)
        need = NEEDS[op]
        if _RANK[mode] >= _RANK[need]:
            if op in ("read", "commit", "write") and who is not None and who != self.owner:
                self.users.add(who)
            return mode
        fix = (
            "only the owner may do that (or a client that claims the stream with its token)"
            if need == "owner"
            else f"ask the owner for {need} access: stream.grant(client, {need!r})"
        )
        raise StreamPermissionError(
            f"{who} may not {op} stream {name!r} (owner: {self.owner}; its share: {self.share}, "
            f"{who}'s access: {mode}); {fix}"
        )

    def grant(self, who: str, mode: str) -> None:
        if check_mode(mode, "mode") is None:
            raise InvalidArgumentError("mode=None grants nothing; use revoke(who)")
        self.grants[who] = mode

    def revoke(self, who: str) -> bool:
        """Take ``who``'s grant away (a client id or a token); whether it had one."""
        had = self.grants.pop(who, None) is not None
        for client, tok in list(self.presented.items()):
            if tok == who:
                del self.presented[client]
        return had

    def present(self, who: str, token: str, name: str) -> str:
        """``who`` shows ``token``: the owner's (``who`` becomes the owner) or a granted one; the mode it gets."""
        if secrets.compare_digest(token, self.token):
            if self.owner is not None and self.owner != who:
                self.users.discard(who)
            self.owner = who
            return "owner"
        if token in self.grants:
            self.presented[who] = token
            self.users.add(who)
            return self.grants[token]
        raise StreamPermissionError(
            f"the token {who} presented for stream {name!r} is neither its owner's nor one granted; "
            "ask the owner for a grant: stream.grant(token, 'read')"
        )

    def leave(self, client: str, live: set[str]) -> bool:
        """``client`` disconnected; whether the stream should go now (not ``persist``).

        Its private streams go with it; a stream it shared stays while
        another live application holds a handle on it, and goes with the
        last of them.
        """
        self.users.discard(client)
        self.presented.pop(client, None)
        if self.owner is None:
            return False  # no application's: it was never tied to a client
        owner_gone = self.owner == client or self.owner not in live
        return owner_gone and not (self.users & live)
