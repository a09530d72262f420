"""``Stream.to_zarr``: drain a stream into a Zarr array that grows as records arrive.

Records are NumPy array slabs of one dtype and one shape except along
``axis``; the array grows along ``axis``. A :class:`Sink` is returned at once
and works in the background, while the stream is still being written.

Design (the decisions, and why)
-------------------------------
**Who does what.** The :class:`Sink` lives in the client process; a driver
thread plans rounds. Bulk data never travels to it: every round, one small
task per busy partition is pinned to the partition's owner
(``workers=[owner], allow_other_workers=False``) and reads the partition from
that worker's own log without a copy. Only the driver writes array metadata
(shape, attributes), serially, so there are no races on ``zarr.json``.

**Chunks have one writer.** ``C`` rows along ``axis`` is the unit of writing:
``chunks[axis]`` if given, else about 8 MiB of rows and at least one record's
rows (an existing array: its shard, or its chunk, along ``axis``). Other axes
span their full extent unless ``chunks`` says otherwise. A round hands out
only *whole* chunk slots, so every chunk of the array is written, whole, by
exactly one task: no locks, no read-modify-write. Rows of a partition that do
not fill a chunk yet stay in its log until they do.

**A round.** The driver polls the stream's ``info`` (one call; it also
reports lost partitions and consumer groups) and starts a round when a
partition may have completed a chunk (estimated from its record count and the
rows per record seen so far), is sealed, or has durable records to trim.
(1) The driver allocates consecutive chunk slots after the committed rows to
every partition whose previous scans counted full chunks, in partition order
(a partition gets one contiguous run of at most ~256 MiB per round), and
resizes the array to cover them; (2) the owner tasks trim durable records,
write their chunks (each task re-opens the array for every chunk: a handle
opened before a resize silently drops writes past its old shape) and scan the
records that arrived since (dtype and shape checked once per record, rows
counted); (3) only when every task of the round succeeded does the driver
commit, in one metadata write, the attribute ``aimss``::

    {"offsets": {"<p>": [offset, row], ...}, "rows": R, "layout": [...],
     "complete": false, "chunk_rows": C, "axis": 0, "run": "...", ...}

``[offset, row]``: records below ``offset`` of partition ``p`` are durable,
and the first ``row`` rows of record ``offset``. ``rows``: the committed
length along ``axis``. Anything past ``rows`` is uncommitted and is cut away
(``resize``, which also deletes those chunks) when a round fails and when a
sink starts on the array. A round with no full chunk writes nothing and
commits nothing; an idle stream costs one ``info`` call per poll (every
20 ms, backing off to 0.5 s).

**Seal and tail.** Once every partition is sealed and has no full chunk left,
the remainders (fewer than ``C`` rows each) are gathered by the driver,
concatenated in partition order and written densely after the last full
chunk, then committed with ``"complete": true``. A completed array does not
grow any more (its last chunk is partial); a sink on it only accepts a replay
of the same records. An empty stream creates no array (its dtype is unknown).

**Order of records.** Within a partition, rows keep their offset order. The
array is a sequence of whole chunks, each holding ``C`` consecutive rows of
one partition; chunks go to partitions in the order their rows became
available (in partition order within a round), followed by the tail. So the
interleaving of partitions depends on timing; it is recorded exactly in
``aimss.layout`` as runs ``[partition, offset, row, array_row, nrows]`` (one
per partition per round at most; see
:func:`aimss_dask.sink._stream_plan.locate`). With one partition, the array
is the partition in offset order.

**Exactly once, across restarts.** Offsets are record positions in the
partition, so the contract is Kafka's: after a crash (a worker, or the
client) the application re-creates the stream and writes the *same records
at the same offsets* (deterministic replay), and ``stream.to_zarr(same
array)`` resumes. The new sink truncates the array to the committed rows,
starts each partition at its committed ``[offset, row]`` and skips what is
durable: every record lands exactly once. A replay that is visibly different
(shorter, a record with fewer rows than already written) raises.

**Fencing.** A sink takes over an existing array only right before its first
write (so a sink that fails on its first records leaves the array as it was):
it writes a fresh ``run`` id into ``aimss``, then cuts the array back to the
committed rows. Owner tasks check it before every chunk write (and that their
stream still exists), so a task left over from a dead client stops instead of
writing over the new run. The window is one chunk write in flight at that
moment: run one sink per array at a time.

**Retention.** Records that are durable (below the committed ``offset``) and
that every consumer group of the stream has committed past are trimmed from
the owner's log by the next round's task, and once more when the sink
completes; a long stream never fills the workers' memory. The sink's own
durable offsets are such a group (``aimss-sink:<array>``), so a second sink
of the stream (another array, another application) never trims what this
one has still to write, and a resumed sink of the array takes it over.
Plain readers without a group are not tracked: read before the sink
passes, or from Zarr.

**Never blocking the loop.** The driver is a plain thread (it uses the
blocking client API, never the event loop); owner tasks run in worker
threads. The thread stops when the sink completes or fails, on
:meth:`Sink.close`, and when the client closes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from typing import Any

from aimss_dask.api.extensions import register_extension
from aimss_dask.api.filling import barrier_phase
from aimss_dask.api.progress import Bar
from aimss_dask.api.progress import wanted as progress_wanted
from aimss_dask.core.errors import InvalidArgumentError, StoreReadOnlyError
from aimss_dask.core.runs import check_io_priority
from aimss_dask.sink import _stream_plan as plan
from aimss_dask.sink import _xarray as xr_sink
from aimss_dask.sink._stream_driver import SinkRun
from aimss_dask.sink._stream_plan import Committed, Template
from aimss_dask.sink._stream_tasks import Target
from aimss_dask.sink.array import check_fsspec_protocol

__all__ = ["Sink", "stream_to_zarr"]


def stream_to_zarr(
    stream: Any,
    store: Any,
    *,
    component: str | None = None,
    axis: int = 0,
    chunks: Any = None,
    dims: Any = None,
    name: str | None = None,
    zarr_format: int = 3,
    durable: bool = True,
    io_priority: int | None = None,
) -> Sink:
    """Drain ``stream`` into a Zarr array growing along ``axis``; returns a running :class:`Sink`.

    Parameters
    ----------
    stream
        A :class:`aimss_dask.Stream` whose records are NumPy arrays of one
        dtype and of one shape except along ``axis``.
    store
        A path, URL or Zarr store every worker can write (not a
        ``MemoryStore``: the writers are other processes).
    component
        Path of the array inside the store; ``None``: the store's root.
    axis
        The axis the array grows along (negative counts from the end).
    chunks
        Rows per chunk along ``axis`` (an int), or one entry per axis (``None``
        for the full extent). Default: about 8 MiB of rows, at least one
        record's. An existing array keeps its own chunks.
    dims, name
        Write the array as an xarray variable, as :func:`aimss_dask.to_zarr`
        does for a plain array: one dimension name per axis in ``dims``
        (default ``dim_0, ...`` when only ``name`` is given; v3
        ``dimension_names``, v2 ``_ARRAY_DIMENSIONS``), at
        ``component/name`` (with neither, ``"data"`` in a group at the
        store's root). The groups the sink creates get consolidated metadata
        once the sink completes (a growing array would make it stale before);
        until then ``xarray.open_zarr(..., consolidated=False)`` reads the
        array as far as it is durable. An existing array must have these
        dimension names.
    zarr_format
        3 (the default) or 2, for a new array.
    durable
        ``True`` (the default): offsets are committed only once the chunks
        they cover, and then the commit itself, are on disk (``fsync`` of
        files and folders on a file system; an object store's write is
        durable when it completes), so a crash of the node loses nothing
        that was committed. ``False``: committed once written (a crash of
        the node may lose the last rounds; a crash of a process does not).
    io_priority
        Priority of the sink's file writes with the coordinated I/O
        scheduler (``aimss.io``; higher first); ``None``: the stream's own
        (``create_stream(..., io_priority=)``).

    Examples
    --------
    >>> s = aimss_dask.create_stream("frames", partitions=4)   # doctest: +SKIP
    >>> sink = s.to_zarr("frames.zarr", chunks=256)            # doctest: +SKIP
    >>> for i in range(1000): s.write(np.full((64, 32), i), partition=i % 4)  # doctest: +SKIP
    >>> s.seal(); sink.wait()                                  # doctest: +SKIP
    >>> zarr.open_array("frames.zarr").shape                   # doctest: +SKIP
    (64000, 32)
    >>> sink = stream_to_zarr(s, "named.zarr", dims=("t", "x"), name="frames")  # doctest: +SKIP
    >>> s.seal(); sink.wait()                                  # doctest: +SKIP
    >>> xarray.open_zarr("named.zarr").frames.dims             # doctest: +SKIP
    ('t', 'x')
    """
    from distributed import get_client

    from aimss_dask.api.context import current
    from aimss_dask.api.streams import remember

    ep = current("to_zarr")
    axis = plan.check_axis_arg(axis)
    chunks = plan.check_chunks_arg(chunks)
    if component is not None and not isinstance(component, str):
        raise InvalidArgumentError(f"component={component!r} must be a str path inside the store, or None")
    if zarr_format not in (2, 3):
        raise InvalidArgumentError(f"zarr_format={zarr_format!r}: use 3 (the default) or 2")
    component = (component or "").strip("/") or None
    named = dims is not None or name is not None
    if dims is not None:
        dims = xr_sink.check_dims(dims, None, f"stream {stream.name!r}")
    if named:
        component = xr_sink.variable_path(component, name)
    store = _check_store(store)
    spec = remember(ep, ep.scheduler_op("get", name=stream.name))
    if not isinstance(durable, bool):
        raise InvalidArgumentError(f"durable={durable!r} must be True or False")
    if io_priority is None:
        io_priority = int(stream.info().get("io_priority", 0))
    io_priority = check_io_priority(io_priority, f"the sink of stream {stream.name!r}")
    target = Target(store, component, uuid.uuid4().hex, _where(store, component), durable)
    groups = tuple(xr_sink.groups_to_consolidate(store, component or "", None, target.where)) if named else ()
    existing = _inspect(target, spec.partitions, axis, chunks, dims, stream.name)
    return Sink(
        SinkRun(
            spec, target, axis, chunks, existing, get_client(), ep,
            dims=dims, named=named, zarr_format=zarr_format, groups=groups, io_priority=io_priority,
        )
    )


def _where(store: Any, component: str | None) -> str:
    return f"array {component!r} of store {str(store)!r}" if component else f"the array at {str(store)!r}"


def _check_store(store: Any) -> Any:
    """The store as the workers will open it; refuse what they cannot write."""
    from zarr.abc.store import Store
    from zarr.storage import MemoryStore, ZipStore

    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    if isinstance(store, str):
        if "://" in store:
            check_fsspec_protocol(store)
            return store
        # Absolute: the workers need not share this process's directory.
        store = os.path.abspath(store)
        if os.path.exists(store) and not os.access(store, os.W_OK):
            raise StoreReadOnlyError(f"store {store!r} is not writable; give a path the workers can write")
        return store
    if isinstance(store, (MemoryStore, ZipStore, dict)):
        raise InvalidArgumentError(
            f"store {store!r} lives in this process only ({type(store).__name__}); the "
            "sink's writers are the workers: give a path, a URL or a LocalStore/FsspecStore"
        )
    if not isinstance(store, Store):
        raise InvalidArgumentError(
            f"store={store!r} ({type(store).__name__}) is not a Zarr store; give a path, "
            "a URL or a zarr.storage store"
        )
    if store.read_only:
        raise StoreReadOnlyError(
            f"store {store!r} is read-only; open it with read_only=False to sink into it"
        )
    return store


def _inspect(
    target: Target,
    partitions: int,
    axis: int,
    chunks: Any,
    dims: tuple[str, ...] | None = None,
    stream: str | None = None,
) -> tuple[Template, int, Committed] | None:
    """``(template, chunk_rows, committed)`` of an existing array; None if there is none.

    ``stream``: the name of the stream to sink; an array whose committed
    offsets are another stream's is refused (they would skip its records).

    Every check that can fail on an existing array happens here, in the
    caller's thread, before anything is written.
    """
    import zarr

    try:
        arr = target.open(mode="r")
    except (zarr.errors.ArrayNotFoundError, FileNotFoundError):
        return None
    except zarr.errors.NodeTypeValidationError as e:
        raise InvalidArgumentError(
            f"{target.where} is a group, not an array; give a component path for the array"
        ) from e
    where = target.where
    if dims is not None and xr_sink.dims_of(arr) != dims:
        raise InvalidArgumentError(
            f"{where} exists with dimension names {xr_sink.dims_of(arr)}, not dims={dims}; "
            "leave dims out, give the array's, or sink into a new array"
        )
    ax = plan.normalize_axis(axis, arr.ndim, f"{where} (shape {arr.shape})")
    template = Template.of(arr.dtype, arr.shape, ax)
    unit = arr.shards or arr.chunks
    chunk_rows = int(unit[ax])
    if chunks is not None:
        have = tuple(int(c) for c in unit)
        want = plan.choose_chunks(template, chunks, chunk_rows)
        if isinstance(chunks, int):  # only the rows along the axis were asked for
            want = tuple(chunks if i == ax else c for i, c in enumerate(have))
        if want != have:
            raise InvalidArgumentError(
                f"chunks={chunks!r} means chunks {want}, but {where} exists with chunks "
                f"{have}; leave chunks=None to use the array's"
            )
    doc = arr.attrs.get("aimss")
    if doc is None:
        rows = int(arr.shape[ax])
        if rows % chunk_rows:
            raise InvalidArgumentError(
                f"{where} has {rows} rows along axis {ax}, not a whole number of its "
                f"{chunk_rows}-row chunks; the sink appends whole chunks only: resize it "
                "to a multiple, or sink into a new array"
            )
        return template, chunk_rows, Committed.fresh(partitions, rows, chunk_rows, ax)
    committed = plan.parse_doc(doc, where)
    if stream is not None and committed.stream is not None and committed.stream != stream:
        # Its offsets say how far *that* stream is durable: taken for this
        # one's, they would drop as many of its records without a word.
        raise InvalidArgumentError(
            f"{where} holds what stream {committed.stream!r} sank into it (offsets "
            f"{[o for o, _ in committed.offsets]}), not stream {stream!r}: a sink resumes only the "
            f"stream it was writing. Sink {committed.stream!r} to resume it, sink into a new array, "
            "or delete the array's 'aimss' attribute to append this stream after its rows"
        )
    if committed.axis != ax:
        raise InvalidArgumentError(
            f"{where} was grown along axis {committed.axis} by an earlier sink, not axis "
            f"{axis}; pass axis={committed.axis}"
        )
    if int(arr.shape[ax]) < committed.rows:
        raise InvalidArgumentError(
            f"{where} has {arr.shape[ax]} rows along axis {ax}, fewer than the {committed.rows} its "
            "sink committed: the array was shrunk by hand; sink into a new array"
        )
    if len(committed.offsets) != partitions:
        raise InvalidArgumentError(
            f"{where} holds offsets of a stream with {len(committed.offsets)} partition(s); "
            f"this stream has {partitions}. Resume with the same partitioning, or sink "
            "into a new array"
        )
    if committed.chunk_rows != chunk_rows:
        raise InvalidArgumentError(
            f"{where} has {chunk_rows}-row chunks but its sink wrote {committed.chunk_rows}; "
            "the array was changed by hand: sink into a new array"
        )
    return template, chunk_rows, committed


class Sink:
    """A running drain of one stream into one Zarr array; see :func:`stream_to_zarr`.

    ``wait()`` blocks until the stream is sealed and everything is durable,
    ``info()`` reports progress, ``close()`` stops early (what is committed
    stays; a later ``to_zarr`` resumes from it). As a context manager, a
    clean exit waits and an exception closes.
    """

    def __init__(self, run: SinkRun) -> None:
        self._run = run
        self._thread = threading.Thread(target=run.main, name=f"aimss-sink-{run.spec.name}", daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------------

    def wait(self, timeout: float | None = None, *, progress: bool | None = None) -> None:
        """Block until the stream is sealed and all of it is durable in the array.

        Raises what stopped the sink: :class:`PartitionLostError` (a worker
        died with a partition), :class:`InvalidArgumentError` (a record that
        does not fit), :class:`SinkError` (a failed write, a closed sink or
        client); ``TimeoutError`` if it is still running after ``timeout``.
        ``progress``: the durable rows as a bar on stderr (``None``: where
        someone watches, a terminal or a notebook).
        """
        # The application waits for its data to be durable (a checkpoint
        # stream's end): a sync phase of the workers idle meanwhile
        # (aimss.power.auto-phases), which idle fillers may use.
        with barrier_phase("aimss-sink-wait") if self._thread.is_alive() else contextlib.nullcontext():
            if progress_wanted(progress):
                self._wait_showing(timeout)
            else:
                self._thread.join(timeout)
        if self._thread.is_alive():
            info = self.info()
            raise TimeoutError(
                f"sink of stream {self._run.spec.name!r} into {self._run.target.where} still running "
                f"after {timeout}s ({info['rows']} rows durable); is the stream sealed?"
            )
        if self._run.error is not None:
            raise self._run.error

    def _wait_showing(self, timeout: float | None) -> None:
        bar = Bar(None, f"sink of {self._run.spec.name}", "rows")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self._thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._thread.join(0.2 if left is None else min(0.2, left))
                bar.update(int(self.info()["rows"]))
        finally:
            bar.close(int(self.info()["rows"]))

    def info(self) -> dict[str, Any]:
        """Progress as a plain dict.

        Keys: ``stream``, ``array`` (where), ``state`` (``starting``,
        ``running``, ``done``, ``failed``, ``closed``), ``rows`` (durable
        length along ``axis``), ``offsets`` (durable ``[offset, row]`` per
        partition), ``pending_rows`` (scanned, not yet durable, per
        partition), ``chunk_rows``, ``chunks_written``, ``rounds``,
        ``complete``, ``error`` (message or None), ``run``.
        """
        return self._run.info()

    def close(self, timeout: float | None = None) -> None:
        """Stop after the round in flight (committed or cut back); idempotent."""
        self._run.stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, exc_type: Any, *args: Any) -> None:
        if exc_type is None:
            self.wait()
        else:
            self.close()

    def __repr__(self) -> str:
        info = self.info()
        return f"<Sink {self._run.spec.name!r} -> {self._run.target.where}: {info['state']}, {info['rows']} rows>"


register_extension("to_zarr", stream_to_zarr)
