"""The stream API of the AIMSS paper: create, write, read, seal, shuffle, destroy.

Every function works from a client process and from inside a Dask task.

=====================  =========================================
Paper                  aimss_dask
=====================  =========================================
``CreateStream``       :func:`create_stream`
``WriteTo``            :func:`write_to` / :meth:`Stream.write`
``ReadFrom``           :func:`read_from` / :meth:`Stream.read`
``ShuffleStream``      :meth:`Stream.seal`
``ShuffleStreams``     :func:`shuffle_streams`
``DestroyStream``      :func:`destroy_stream`
=====================  =========================================
"""

from __future__ import annotations

import numbers
import operator
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from aimss_dask.api import reader
from aimss_dask.api.consume import map_records
from aimss_dask.api.context import Endpoint, current
from aimss_dask.api.extensions import Extension
from aimss_dask.core.errors import (
    InvalidArgumentError,
    InvalidOffsetError,
    InvalidTypeError,
    PartitionLostError,
    StreamNotFoundError,
    describe_lost,
    lost_ranges,
)
from aimss_dask.core.names import PARTITION_TASK_PREFIX
from aimss_dask.core.runs import check_io_priority
from aimss_dask.core.specs import (
    StreamSpec,
    check_name,
    check_partition,
    partition_for_key,
)
from aimss_dask.transport import speccache


def remember(ep: Endpoint, reply: dict[str, Any]) -> StreamSpec:
    """Cache the spec of a coordinator's stream reply, and what it says of seals and losses."""
    spec = StreamSpec.from_wire(reply["spec"])
    speccache.remember(spec)
    if reply.get("sealed"):
        ep.producer.mark_sealed(spec.name, spec.epoch)
    for p in reply.get("lost", ()):
        ep.producer.owner_lost(spec.owners[p], spec.epoch)
    return speccache.used(spec)


def type_name(value: object) -> str:
    """``value``'s type for a message: "an int", "a str", "None"."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def check_int_arg(value: object, what: str, fix: str) -> int:
    """``value`` as a plain int, or :class:`InvalidTypeError` naming its type.

    NumPy integers pass (``operator.index``); ``bool`` does not, though it
    is an int: ``partitions=True`` is a mistake, not a request for 1.
    """
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise InvalidTypeError(f"{what}={value!r} is {type_name(value)}, not an int; {fix}")


def check_str_arg(value: object, what: str = "stream name") -> str:
    """A name: :class:`InvalidTypeError` if not a str, then ``check_name``'s rules."""
    if not isinstance(value, str):
        raise InvalidTypeError(f"{what} {value!r} is {type_name(value)}, not a str; give a non-empty str")
    return check_name(value, what)


def _check_partition(spec: StreamSpec, partition: object) -> int:
    p = check_int_arg(
        partition,
        "partition",
        f"give a partition number 0 .. {spec.partitions - 1} of stream {spec.name!r}, or None",
    )
    return check_partition(spec, p)


def _spec(ep: Endpoint, name: str, refresh: bool = False) -> StreamSpec:
    check_str_arg(name)
    spec = None if refresh else speccache.get(name)
    if spec is None:
        spec = remember(ep, ep.scheduler_op("get", name=name))
    return speccache.used(spec)


class Stream:
    """A handle on a named stream; cheap to create, pickle and send to tasks.

    Examples
    --------
    >>> s = aimss_dask.create_stream("temps", partitions=4)   # doctest: +SKIP
    >>> s.write(np.arange(3.0), key="station-7")             # doctest: +SKIP
    >>> s.seal()                                             # doctest: +SKIP
    >>> [x.sum() for x in s.read()]                          # doctest: +SKIP
    [3.0]
    """

    def __init__(self, spec: StreamSpec, token: str | None = None) -> None:
        self.spec = spec
        #: The owner's token, on the creator's handle only (never pickled):
        #: ``get_stream(name, token=...)`` from another client makes it the owner.
        self.token = token

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def partitions(self) -> int:
        return self.spec.partitions

    def __repr__(self) -> str:
        return f"Stream({self.name!r}, partitions={self.partitions})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Stream, (self.spec,))  # not the token: tasks write with their application's access

    def write(self, record: Any, *, partition: int | None = None, key: Any = None) -> None:
        """Append ``record``; see :func:`write_to`."""
        _write(current("write_to"), self.spec, record, partition, key)

    def read(
        self,
        *,
        partition: int | None = None,
        group: str | None = None,
        start: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """Iterate records; see :func:`read_from`."""
        return read_from(self.name, partition=partition, group=group, start=start, timeout=timeout)

    def flush(self) -> None:
        """Return once every record this process wrote to the stream is stored."""
        ep = current("flush")
        try:
            ep.producer.flush_blocking([self.name], epoch=self.spec.epoch)
        except PartitionLostError as e:
            raise _named_loss(ep, self.name, e) from None

    def seal(self) -> None:
        """``ShuffleStream``: no more writes; readers see the end of each partition.

        Everything written before ``seal()`` is called, by any task or client,
        is stored first. A later write raises :class:`StreamSealedError`.
        """
        ep = current("seal")
        ep.producer.flush_blocking([self.name], epoch=self.spec.epoch)
        remember(ep, ep.scheduler_op("seal", name=self.name, epoch=self.spec.epoch, **ep.owner_kwargs()))

    def grant(self, who: Any, mode: str) -> None:
        """Let another application ``"read"`` or ``"write"`` (append and seal) this stream; owner only.

        ``who``: a ``distributed.Client``, a client id, or a token: any string
        the owner hands to the other application, which presents it with
        ``get_stream(name, token=...)``. A grant replaces an earlier one.
        :class:`StreamPermissionError` if the caller is not the owner.

        Examples
        --------
        >>> s = aimss_dask.create_stream("frames", 4)      # doctest: +SKIP
        >>> s.grant("viewer-7c1e", "read")                  # doctest: +SKIP
        >>> # in the other application:
        >>> aimss_dask.get_stream("frames", token="viewer-7c1e").read()  # doctest: +SKIP
        """
        if mode not in ("read", "write"):
            raise InvalidArgumentError(f"mode={mode!r} is not 'read' or 'write'; to take access away use revoke(who)")
        ep = current("grant")
        ep.scheduler_op("grant", name=self.name, who=_principal(who), mode=mode, **ep.owner_kwargs())
        _access_cache.clear()

    def revoke(self, who: Any) -> bool:
        """Take back what :meth:`grant` gave ``who``; whether it had a grant. Owner only.

        Handles the other application holds stop working for writes within
        :data:`ACCESS_TTL` seconds, and at once for reads, seals and commits.
        """
        ep = current("revoke")
        reply = ep.scheduler_op("grant", name=self.name, who=_principal(who), mode=None, **ep.owner_kwargs())
        _access_cache.clear()
        return bool(reply.get("had"))

    def info(self) -> dict[str, Any]:
        """Placement, size and progress of the stream, as a plain dict.

        Keys: ``name``, ``partitions``, ``owners``, ``sealed``, ``records``
        and ``bytes`` (one entry per partition), ``spilled_bytes``, ``groups``
        (committed offsets per consumer group), plus ``epoch``, ``parent``,
        ``persist`` and ``lost``. Replication: ``replication`` (copies asked
        for), ``replicas`` (per partition, the workers holding a copy other
        than its owner) and ``in_sync`` (those of them that hold every record
        readers may have seen, and so may take over if the owner dies; a copy
        placed after a loss joins once it has caught up). Access: ``owner``
        (the client id of the application it belongs to; None: every
        application's) and ``share``; ``io_priority``, the default of its
        sinks with the coordinated I/O scheduler.
        """
        return _plain(current("info").scheduler_op("info", name=self.name)["info"])

    # Operators provide these (no import edge from the core to them):
    # ``to_zarr(store, *, component, axis, chunks, dims, name, zarr_format) -> Sink``
    # is aimss_dask.sink.stream_sink.stream_to_zarr; ``batches(batch_size, *,
    # shuffle, seed, epochs, group)`` is aimss_dask.source.loader.batches.
    to_zarr = Extension("to_zarr", provider="aimss_dask.sink.stream_sink.stream_to_zarr")
    batches = Extension("batches", provider="aimss_dask.source.loader.batches")

    def map_partitions(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``func(records, *args, **kwargs)`` once per partition, on its owner.

        ``records`` iterates the partition (as ``read(partition=p)``). The
        coordinator pins each task to the worker that owns its partition, so
        reads are local. Returns one ``Future`` per partition.

        Examples
        --------
        >>> futs = s.map_partitions(lambda recs: sum(r.sum() for r in recs))  # doctest: +SKIP
        >>> client.gather(futs)                                               # doctest: +SKIP
        """
        from distributed import get_client

        client = get_client()
        token = uuid.uuid4().hex
        return [
            client.submit(
                _partition_task,
                self.spec,
                p,
                func,
                args,
                kwargs,
                key=(f"{PARTITION_TASK_PREFIX}{token}", self.name, p),
                pure=False,
            )
            for p in range(self.partitions)
        ]


    def map_records(
        self, func: Callable[..., Any], *args: Any, group: str | None = None, **kwargs: Any
    ) -> list[Any]:
        """Apply ``func(record, *args, **kwargs)`` to every record; one ``Future`` per partition.

        Each partition's consumer runs on the partition's owner and reads
        until the stream is sealed; its future resolves to the list of
        ``func``'s results, in offset order. ``group``: a consumer group to
        resume from (its committed offsets) and commit to, at-least-once
        across crashes; without one, every record from offset 0.

        A consumer that falls far behind its peers (a slow worker, costlier
        records) hands the rest of its range to a helper on a fast worker,
        when ``aimss.speculation`` is on: the coordinator picks the split from
        the consumers' rates. Each record is still consumed once, and the
        results keep their order. ``func`` should not depend on which worker
        it runs on.

        Examples
        --------
        >>> futs = s.map_records(lambda rec: float(rec.sum()))  # doctest: +SKIP
        >>> [len(r) for r in client.gather(futs)]                # doctest: +SKIP
        [1000, 1000]
        """
        if group is not None:
            check_str_arg(group, "consumer group")
        return map_records(self.spec, func, args, kwargs, group, read_from)


def _plain(obj: Any) -> Any:
    """Tuples from msgpack back to lists, so ``info()`` is plain JSON-like data."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _partition_task(
    spec: StreamSpec, p: int, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return func(read_from(spec.name, partition=p), *args, **kwargs)


def create_stream(
    name: str,
    partitions: int = 1,
    *,
    parent: str | None = None,
    exist_ok: bool = False,
    persist: bool = False,
    replication: int | None = None,
    share: str | None = None,
    io_priority: int = 0,
) -> Stream:
    """``CreateStream``: create a stream and place its partitions on workers.

    Parameters
    ----------
    name
        Cluster-wide unique name.
    partitions
        Number of partitions, an int >= 1 (NumPy integers too), spread
        evenly over the workers. Another type (``"4"``, ``2.5``, ``True``)
        raises :class:`InvalidTypeError`, a ``TypeError``; a value below 1,
        :class:`InvalidArgumentError`.
    parent
        An existing stream this one hangs under (a shuffle's children);
        :func:`shuffle_streams` waits for all children to be sealed, and
        destroying the parent destroys them.
    exist_ok
        Return the existing stream of that name (same partition count) instead
        of raising :class:`StreamExistsError`.
    persist
        Keep the stream when the client that created it disconnects.
    replication
        Copies of each partition, its owner's included, each on another
        worker (another host where there is one); default: the
        ``aimss.replication`` config (1). With 2 or more, ``flush()`` and
        ``seal()`` return once every copy holds the records, readers see a
        record only once every copy holds it, and the death of a worker
        loses nothing: a replica takes its partitions over, consumer groups
        go on from their offsets, and writers send again what the dead
        owner had not stored. More copies than workers is an
        :class:`InvalidArgumentError`.
    share
        What other applications (Dask clients) may do: ``None`` (default,
        private: only this client and its tasks), ``"read"``, or ``"write"``
        (append and seal too). Destroying stays with the owner; see
        :meth:`Stream.grant`. The handle's ``token`` lets another client claim
        the stream (``get_stream(name, token=...)``), e.g. a ``persist=True``
        stream after this client left.
    io_priority
        The priority of the file writes of sinks of this stream
        (``to_zarr(stream, ...)``) with the coordinated I/O scheduler
        (``aimss.io``): higher is served first when applications write to
        one node's file system at once. An int, 0 by default.

    Examples
    --------
    >>> s = aimss_dask.create_stream("events", partitions=8)  # doctest: +SKIP
    >>> safe = aimss_dask.create_stream("results", 4, replication=2)  # doctest: +SKIP
    """
    check_str_arg(name)
    partitions = check_int_arg(
        partitions, "partitions", f"give stream {name!r} a number of partitions, an int >= 1"
    )
    if parent is not None:
        check_str_arg(parent, "parent stream name")
    if replication is not None:
        replication = check_int_arg(
            replication, "replication",
            f"give stream {name!r} a number of copies of each partition, an int >= 1",
        )
    if share is not None and share not in ("read", "write"):
        raise InvalidArgumentError(
            f"share={share!r} for stream {name!r} is not one of None (private), 'read', 'write'"
        )
    io_priority = check_io_priority(io_priority, f"stream {name!r}")
    ep = current("create_stream")
    reply = ep.scheduler_op(
        "create",
        name=name,
        partitions=partitions,
        parent=parent,
        exist_ok=bool(exist_ok),
        persist=bool(persist),
        replication=replication,
        share=share,
        io_priority=io_priority,
        **ep.owner_kwargs(),
    )
    if reply.get("created"):
        speccache.forget(name)
    spec = remember(ep, reply)
    _note_access(ep, spec, reply)
    return Stream(spec, reply.get("token"))


def release_partition(name: str, partition: int) -> None:
    """An operator is done with ``partition`` for good: free it now.

    The owner drops the records at once (no need to wait for the rest); the
    coordinator destroys the stream when every partition has been released.
    """
    ep = current("release_partition")
    spec = _spec(ep, name)
    check_partition(spec, partition)
    if ep.plugin is not None and ep.plugin.store is not None and spec.owners[partition] == ep.address:
        ep.plugin.store.trim(spec.name, spec.epoch, partition)
    ep.scheduler_op("release", name=name, partition=partition)


def operator_stream(name: str) -> Stream:
    """:func:`get_stream` for an operator's own map tasks: this process's cached spec.

    Hundreds of map tasks of one run would otherwise each ask the
    coordinator. The cache is dropped when the stream is (re)created or
    destroyed, so a restarted run never sees a stale epoch.
    """
    return Stream(_spec(current("get_stream"), name))


def get_stream(name: str, *, token: str | None = None) -> Stream:
    """A handle on an existing stream; :class:`StreamNotFoundError` if none.

    Another application's private stream raises
    :class:`StreamPermissionError`. ``token``: one the owner granted
    (:meth:`Stream.grant`), or the owner's own (``Stream.token``), which
    makes this client the owner.
    """
    check_str_arg(name)
    if token is not None and not isinstance(token, str):
        raise InvalidTypeError(f"token={token!r} is {type_name(token)}, not a str")
    ep = current("get_stream")
    reply = ep.scheduler_op("get", name=name, token=token, **ep.owner_kwargs())
    spec = remember(ep, reply)
    _note_access(ep, spec, reply)
    return Stream(spec)


#: How long a process trusts the write access it was told (s): a revoke
#: reaches writers within this.
ACCESS_TTL = 2.0
#: (stream, epoch, caller) -> (may write, when asked), caller a client id or a task key.
_access_cache: dict[tuple[str, int, Any], tuple[bool, float]] = {}
_access_lock = threading.Lock()


def _principal(who: Any) -> str:
    """A grant's subject: a ``Client``'s id, or a client id or token as given."""
    ident = getattr(who, "id", who)
    if not isinstance(ident, str) or not ident:
        raise InvalidTypeError(
            f"who={who!r} is {type_name(who)}; give a distributed.Client, a client id or a token (a non-empty str)"
        )
    return ident


def _note_access(ep: Endpoint, spec: StreamSpec, reply: dict[str, Any]) -> None:
    access = reply.get("access")
    if access is not None:
        with _access_lock:
            if len(_access_cache) > 4096:
                _access_cache.clear()
            _access_cache[(spec.name, spec.epoch, ep.client_id or ep.task_key)] = (
                access in ("write", "owner"), time.monotonic()
            )


def _check_write(ep: Endpoint, spec: StreamSpec) -> None:
    """:class:`StreamPermissionError` unless the caller's application may write to ``spec``."""
    key = (spec.name, spec.epoch, ep.client_id or ep.task_key)
    hit = _access_cache.get(key)
    if hit is not None and hit[0] and time.monotonic() - hit[1] < ACCESS_TTL:
        return
    reply = ep.scheduler_op("get", name=spec.name, need="write", **ep.owner_kwargs())
    _note_access(ep, spec, reply)


def _write(ep: Endpoint, spec: StreamSpec, record: Any, partition: int | None, key: Any) -> None:
    _check_write(ep, spec)
    if partition is not None:
        p = _check_partition(spec, partition)
    elif key is not None:
        p = partition_for_key(key, spec.partitions)
    else:
        p = speccache.next_partition(spec)
    try:
        # own: a small view of a large array would pin all of it where it is
        # stored as it is (on its owner), while the budget counts the view.
        ep.producer.write(spec, p, record, own=True)
    except StreamNotFoundError:
        speccache.forget(spec.name)
        raise
    except PartitionLostError as e:
        raise _named_loss(ep, spec.name, e, p) from None


def _named_loss(ep: Endpoint, name: str, e: PartitionLostError, partition: int | None = None) -> PartitionLostError:
    """``e`` with the offsets of ``.lost`` as the coordinator knows them.

    A producer that learned of the loss by a failed send (a client's, which
    no broadcast reaches) knows the partitions, not the offsets; the
    coordinator does. The partitions are those ``e`` names: a write's own,
    or an earlier write's to another partition, told at this call. Where
    it names none: ``partition``, the one written to, or (None, a flush)
    every lost partition of the stream.
    """
    ranges = lost_ranges(ep.scheduler_op("get", name=name).get("lost_offsets"))
    if e.lost:
        ranges = {p: ranges.get(p, r) for p, r in e.lost.items()}
    elif partition is not None:
        ranges = {partition: ranges.get(partition, (0, None))}
    return PartitionLostError(str(e), ranges)


def write_to(name: str, record: Any, *, partition: int | None = None, key: Any = None) -> None:
    """``WriteTo``: append ``record`` to stream ``name``.

    The partition is ``partition`` if given, else a stable hash of ``key``,
    else round-robin. Records are pushed to the owner in batches (call
    :meth:`Stream.flush` to wait for them). AIMSS stores arrays without a
    copy: do not modify an array after writing it. (A small view of a much
    larger array, such as ``big[:10]``, is copied: stored as it is, it would
    keep all of ``big`` in memory while the log counts ten elements.)

    Examples
    --------
    >>> aimss_dask.write_to("events", np.ones(1024), key="sensor-3")  # doctest: +SKIP
    """
    ep = current("write_to")
    _write(ep, _spec(ep, name), record, partition, key)


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    # numbers.Real takes NumPy scalars too; bool is refused like everywhere else.
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool):
        raise InvalidTypeError(
            f"timeout={timeout!r} is {type_name(timeout)}, not a number; give seconds "
            "as an int or float >= 0, or None to wait without a limit"
        )
    if not timeout >= 0:  # NaN fails this too
        raise InvalidArgumentError(f"timeout={timeout!r} must be >= 0 seconds or None")
    return float(timeout)


def read_from(
    name: str,
    *,
    partition: int | None = None,
    group: str | None = None,
    start: int | None = None,
    timeout: float | None = None,
) -> Iterator[Any]:
    """``ReadFrom``: iterate the records of a stream in offset order.

    Parameters
    ----------
    partition
        One partition, or ``None`` for all of them, one after the other.
    group
        A consumer group: reading starts at its committed offsets and commits
        as it goes. A record counts as consumed once the next one is asked
        for (at-least-once delivery).
    start
        Explicit first offset (overrides the group's).
    timeout
        On an open (unsealed) partition, the longest wait for the next record
        before :class:`ReadTimeoutError`; ``None`` waits until it is sealed.

    Examples
    --------
    >>> for rec in aimss_dask.read_from("events", group="trainer"):  # doctest: +SKIP
    ...     process(rec)
    """
    check_str_arg(name)
    if start is not None:
        start = check_int_arg(start, "start", f"give an offset of stream {name!r}, an int >= 0, or None")
        if start < 0:
            raise InvalidOffsetError(f"start={start!r} for stream {name!r}: offsets are non-negative ints")
    timeout = _check_timeout(timeout)
    if group is not None:
        check_str_arg(group, "consumer group")
    ep = current("read_from")
    # The partition asked for comes back first should it be lost (checked
    # below, with the spec: only a plain integer goes along).
    ok = isinstance(partition, numbers.Integral) and not isinstance(partition, bool)
    wants = {"partition": int(partition)} if ok else {}
    got = ep.scheduler_op("get", name=name, **wants, **ep.owner_kwargs())
    spec = remember(ep, got)
    parts = [_check_partition(spec, partition)] if partition is not None else list(range(spec.partitions))
    committer = None
    if group is not None:
        committed = ep.scheduler_op("offsets", name=name, group=group, **ep.owner_kwargs())["offsets"]
        starts = [committed[p] if start is None else start for p in parts]
        committer = reader.GroupCommitter(ep, name, group)
    else:
        starts = [start or 0] * len(parts)
    ranges = lost_ranges(got.get("lost_offsets"))
    salvaged = set(got.get("salvaged", ()))
    # A partition rebuilt in part is read up to its lost range, which
    # raises there (its log says so): only a read that starts in it fails now.
    hit = {p: ranges[p] for p, s in zip(parts, starts) if p in ranges and (p not in salvaged or s >= ranges[p][0])}
    if hit:
        raise PartitionLostError(
            f"partition(s) {sorted(hit)} of stream {name!r} were lost with their worker "
            f"({describe_lost(hit)}); destroy the stream and write it again",
            hit,
        )
    max_bytes = ep.plugin.config.read_batch_size if ep.plugin and ep.plugin.config else None
    return reader.read_records(ep, spec, parts, starts, timeout, max_bytes, committer)


def shuffle_streams(parent: str, *, timeout: float | None = None) -> list[str]:
    """``ShuffleStreams``: wait until every child stream of ``parent`` is sealed.

    Returns the children's names. This is the shuffle barrier.

    Examples
    --------
    >>> aimss_dask.shuffle_streams("join-1")  # doctest: +SKIP
    ['join-1/left', 'join-1/right']
    """
    check_str_arg(parent, "parent stream name")
    timeout = _check_timeout(timeout)
    ep = current("shuffle_streams")
    return list(ep.scheduler_op("shuffle_wait", parent=parent, timeout=timeout)["children"])


def destroy_stream(name: str) -> None:
    """``DestroyStream``: free the stream's memory and spill files everywhere.

    Child streams are destroyed with their parent.
    """
    check_str_arg(name)
    ep = current("destroy_stream")
    try:
        reply = ep.scheduler_op("destroy", name=name, **ep.owner_kwargs())
    finally:
        speccache.forget(name)
    for n, epoch in zip(reply.get("destroyed", []), reply.get("epochs", [])):
        speccache.forget(n, destroyed=epoch)
        ep.producer.forget(n, epoch)


class ClusterStatus(dict[str, dict[str, Any]]):
    """What :func:`status` returns: worker address -> that worker's stats, plus
    ``runs`` and ``streams``, every run and stream of the cluster.

    Each run: ``run_id``, ``kind`` (shuffle, merge, rechunk, to_zarr,
    zarr-sink, zarr-source, loader), ``state``, owning ``client``,
    ``streams`` it owns and ``reads``, their ``partitions``, ``memory_bytes``
    and ``disk_bytes`` held, ``progress`` per worker (or client), ``started``
    (Unix time), ``epoch`` and ``error``. Each stream: ``name``,
    ``partitions``, ``owners``, ``client``, ``sealed``, ``lost``, ``run``
    (the run that owns it, if any), ``records``, ``replication`` (copies
    asked for), ``under_replicated`` (partitions holding fewer copies, while
    too few workers are left), ``memory_bytes`` and ``disk_bytes`` (of every
    copy). Worker-side figures are those of the workers' last
    heartbeats (about a second old at most).

    ``stragglers``: ``tasks`` and stream ``consumers`` found slow and still
    running, ``slow_workers``, the ``takeovers`` running (helpers of
    ``Stream.map_records`` consumers: ``consumer``, ``dest``, ``range``), and
    the recent ``reports`` (each also an event on the ``aimss-straggler``
    topic): ``kind`` (task or consumer), ``key``, ``group``, ``worker``,
    ``elapsed`` seconds, the ``rule`` that fired (``quantile``, ``late`` or
    ``slow worker``) with its ``bound``, ``estimate`` (time left, LATE),
    ``copy`` (where a copy or helper runs; a helper's report has the
    ``range`` it took over) and ``outcome``.

    ``io``: the coordinated I/O scheduler (``aimss.io``): ``enabled``,
    ``limit`` (writers per host and file system), ``grants`` so far and how
    many of them ``waited``, and per ``resources`` (``host|file system``)
    the writers ``writing`` and ``waiting`` by application and whose
    ``turn`` it is.

    ``fill``: idle filling (:func:`aimss_dask.fill`): the ``fillers`` with
    their state, slices and seconds (and a ``note`` where one waits for a
    GPU), the sync ``phases`` open, the length ``expected`` of each phase
    name, and the workers whose ``gpus`` report to the coordinator.

    ``silent``: workers the scheduler lists that did not answer within 10 s
    (stopped, hung, or holding the GIL in a long call); they have no entry.
    """

    def __init__(self, workers: dict[str, dict[str, Any]], runs: list[dict[str, Any]],
                 streams: list[dict[str, Any]], stragglers: dict[str, Any] | None = None,
                 io: dict[str, Any] | None = None, silent: list[str] | None = None,
                 fill: dict[str, Any] | None = None) -> None:
        super().__init__(workers)
        self.fill = fill or {"fillers": [], "phases": [], "expected": {}, "gpus": []}
        self.silent = silent or []
        self.runs = runs
        self.streams = streams
        self.io = io or {"enabled": False, "limit": 0, "grants": 0, "waited": 0, "resources": {}}
        self.stragglers = stragglers or {
            "tasks": [], "consumers": [], "slow_workers": [], "takeovers": [], "reports": [],
        }

    def run(self, kind: str) -> list[dict[str, Any]]:
        """The runs of one ``kind``, oldest first."""
        return [r for r in self.runs if r["kind"] == kind]


def status(timeout: float = 10.0) -> ClusterStatus:
    """Per worker: log memory, budget, peak, spilled bytes and the streams held;
    and ``.runs`` / ``.streams``: every run and stream of the cluster.

    ``timeout``: seconds to wait for each worker's answer (at most 600); a
    listed worker that has not answered by then (stopped, or hung) is named
    in ``.silent`` instead.

    Examples
    --------
    >>> st = aimss_dask.status()                                   # doctest: +SKIP
    >>> [(r["kind"], r["state"]) for r in st.runs]                 # doctest: +SKIP
    [('shuffle', 'running'), ('loader', 'running')]
    >>> aimss_dask.status(timeout=2).silent                        # doctest: +SKIP
    []
    """
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool):
        raise InvalidTypeError(
            f"status(timeout={timeout!r}): {type_name(timeout)} is not a number; give the seconds "
            "to wait for each worker's answer"
        )
    if not timeout > 0:  # NaN fails this too
        raise InvalidArgumentError(f"status(timeout={timeout!r}): the seconds to wait for each worker must be > 0")
    ep = current("status")
    reply = _plain(ep.scheduler_op("status", timeout=float(timeout)))
    overview = _plain(ep.scheduler_op("runs"))
    return ClusterStatus(
        reply["workers"], overview["runs"], overview["streams"], overview.get("stragglers"), overview.get("io"),
        reply.get("silent"), overview.get("fill"),
    )
