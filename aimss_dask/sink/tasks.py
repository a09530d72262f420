"""The tasks of a ``to_zarr`` run: write blocks, push pieces, finish, abort.

They run on workers (or, for :func:`abort`, on the client); the graph that
wires them is built in :mod:`.graphs`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from aimss_dask.api.runs import finish_run, register_run
from aimss_dask.core.errors import SinkError, StreamNotFoundError
from aimss_dask.core.names import PLUGIN_NAME
from aimss_dask.ops import pushrun
from aimss_dask.sink.durable import sync_metadata, sync_units
from aimss_dask.sink.plan import Jobs
from aimss_dask.sink.specs import ZarrWriteSpec
from aimss_dask.sink.writer import SHARED_KEY, WriteRun, ZarrTarget, writer_for

logger = logging.getLogger("aimss_dask")


def _plugin() -> tuple[Any, Any]:
    """This worker and its AIMSS plugin, or ``(None, None)`` off a distributed worker."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return None, None
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None or getattr(plugin, "store", None) is None:
        raise SinkError(
            "aimss_dask.to_zarr runs on workers with the AIMSS plugin: "
            "client.register_plugin(aimss_dask.AIMSS()) first"
        )
    return worker, plugin


def _queue(target: ZarrTarget, region: tuple[slice, ...], data: np.ndarray, rid: int, behind: bool = True) -> str:
    """Write a region (behind, or now); this worker's address."""
    worker, plugin = _plugin()
    if worker is None:  # a local scheduler: write now
        target.open()[region] = data
        return "local"
    wb = writer_for(plugin, target)
    if behind:
        wb.submit(target, region, data, rid)
    else:
        wb.write_now(target, rid, lambda put: put(region, data))
    return str(worker.address)


def write_block(block: np.ndarray, target: ZarrTarget, block_info: Any = None) -> np.ndarray:
    """An aligned block still to be computed: queue it whole (it is whole units)."""
    info = block_info[0]
    region = tuple(slice(a, b) for a, b in info["array-location"])
    rid = int(np.ravel_multi_index(info["chunk-location"], info["num-chunks"]))
    out = np.empty((1,) * block.ndim, dtype=object)
    out.flat[0] = _queue(target, region, block, rid)
    return out


def write_blocks(target: ZarrTarget, regions: list[tuple[tuple[slice, ...], int]], blocks: list[np.ndarray]) -> str:
    """Aligned blocks this worker holds in memory: write each whole, now (nothing to overlap)."""
    addr = "local"
    for (region, rid), block in zip(regions, blocks):
        addr = _queue(target, region, block, rid, behind=False)
    return addr


def write_rows(target: ZarrTarget, jobs: Jobs, blocks: list[np.ndarray], behind: bool = True) -> str:
    """Write each job (this task's pieces of one unit) in place in the unit's file.

    ``behind``: queue the jobs on the write-behind thread; else write them
    on this thread, now.
    """
    worker, plugin = _plugin()
    token = target.run
    if worker is None:  # a local scheduler: write now
        writer = _in_place_writer(target, "rows")
        for _, coords, pieces in jobs:
            writer.write_rows(coords, [(rows, blocks[j][src]) for j, src, rows in pieces], token)
        return "local"
    wb = writer_for(plugin, target)
    for jid, coords, pieces in jobs:
        parts = [(rows, blocks[j][src]) for j, src, rows in pieces]

        def job(put: Any, coords: Any = coords, parts: Any = parts) -> int:
            if not hasattr(put, "write_rows"):
                raise SinkError(_NOT_RAW)
            n = int(put.write_rows(coords, parts, token))
            if target.shared and target.durable:
                # Writers on several hosts: the last task's fsync would
                # reach only its own host's cache.
                put.sync_partial(coords, token)
            return n

        if behind:
            wb.submit_job(target, jid, sum(int(p.nbytes) for _, p in parts), job)
        else:
            wb.write_now(target, jid, job)
    return str(worker.address)


def append_chunks(
    target: ZarrTarget, jobs: Jobs, blocks: list[np.ndarray], reserved: np.ndarray | None = None,
) -> tuple[str, list[Any]]:
    """Append each job's inner chunks to its shard's file, now; where they landed.

    Now, on the task's thread, not behind: the entries are the task's
    result, which is how the last task learns them (and a recomputed task's
    result replaces the lost one's). Returns this worker's address and
    ``(shard coords, entries)`` per job. ``reserved``: writers on several
    hosts (``target.shared``): ``(offset, limit)`` per job, in order, the
    byte range of its shard's file it writes into instead of appending
    (:meth:`~aimss_dask.sink.shards.ShardWriter.write_chunks_at`).
    """
    worker, plugin = _plugin()
    token = target.run
    wb = writer_for(plugin, target) if worker is not None else None
    out: list[Any] = []
    for k, (jid, scoords, chunks) in enumerate(jobs):
        parts = [(icoords, blocks[j][src]) for j, src, icoords in chunks]
        at = None if reserved is None else (int(reserved[k, 0]), int(reserved[k, 1]))

        def job(put: Any, scoords: Any = scoords, parts: Any = parts, at: Any = at) -> int:
            if not hasattr(put, "append_chunks"):
                raise SinkError(_NOT_SHARDS)
            if at is None:
                out.append((scoords, put.append_chunks(scoords, parts, token)))
            else:
                sync = target.shared and target.durable
                out.append((scoords, put.write_chunks_at(scoords, parts, token, at[0], at[1], sync=sync)))
            return sum(int(p.nbytes) for _, p in parts)

        if wb is None:  # a local scheduler
            job(_in_place_writer(target, "chunks"))
        else:
            wb.write_now(target, jid, job)
    return ("local" if worker is None else str(worker.address)), out


_NOT_SHARDS = (
    "this worker cannot append the array's inner chunks to its shards, though the client "
    "found it could (different Zarr versions on client and workers?)"
)


_NOT_RAW = (
    "this worker cannot write the array's chunks uncompressed in place, though the client "
    "found it could (different Zarr versions on client and workers?)"
)


def _in_place_writer(target: ZarrTarget, kind: str) -> Any:
    """The target's writer of rows in place (``kind`` "rows") or of appended inner chunks ("chunks")."""
    from aimss_dask.sink.direct import in_place_writers

    rows, appender = in_place_writers(target.open())
    writer, refusal = (rows, _NOT_RAW) if kind == "rows" else (appender, _NOT_SHARDS)
    if writer is None:
        raise SinkError(refusal)
    return writer


@pushrun.copyable
def push_blocks(
    names: list[str], pieces: list[Any], blocks: list[np.ndarray], inputs: list[int] | None = None
) -> int:
    """Push the pieces of these blocks to their units' owners.

    ``inputs[i]``: block ``i``'s flat index in the array, its pieces' origin.
    """
    ids = inputs if inputs is not None else [None] * len(blocks)
    return sum(pushrun.push_pieces(b, names, ps, i) for b, ps, i in zip(blocks, pieces, ids))


@pushrun.restartable
def begin(spec: ZarrWriteSpec) -> int | None:
    """Register a run whose writes need no stream; its epoch (None: no cluster to register with)."""
    try:
        from distributed import get_worker

        get_worker()
    except ValueError:
        return None  # a local scheduler
    return register_run(spec).epoch


def _end(run_id: str, epoch: int | None) -> None:
    if epoch is not None:
        finish_run(run_id, epoch)


def finish(
    target: ZarrTarget, expected: list[int], stream: str | None, written: list[Any],
    begun: int | None = None, run_id: str = "",
) -> int:
    """The run's last task: wait for every writer, check every region landed; bytes written.

    ``begun``: the epoch the run was registered under by :func:`begin`
    (a push run's ends when its stream is destroyed).
    """
    from aimss_dask.api import streams as api

    addresses: set[str] = set()
    if stream is not None:
        addresses.update(api.get_stream(stream).spec.owners)
    else:
        for w in written:  # an address, or a 1-element array of one (a fused block task)
            addresses.update([w] if isinstance(w, str) else np.asarray(w, dtype=object).ravel().tolist())
    addresses.discard("local")
    if not addresses:  # written synchronously by a local scheduler
        if target.durable:
            _sync_all(target)
        _end(run_id, begun)
        return 0
    done, nbytes, errors, norun = _flush(target, addresses)
    if stream is not None:
        api.destroy_stream(stream)
    _raise_for(target, errors, expected, done, "Regions already written are complete", norun)
    _end(run_id, begun)
    return nbytes


def finish_rows(
    target: ZarrTarget, njobs: int, grid: tuple[int, ...], written: list[Any], kind: str = "rows",
    begun: int | None = None, run_id: str = "",
) -> int:
    """The last task of a rows (or chunks) run: wait for every writer, then give every unit its key.

    ``written`` is each task's result: its worker's address (``kind``
    "rows"), or the address and where its chunks landed in which shards
    ("chunks": appended in place), from which each shard's index is written
    first. Writes in place are safe on one host, or on a shared parallel
    file system (``target.shared``: rows, and chunks written at reserved
    offsets; checked when the graph was built); a run whose writers turn out
    to span hosts otherwise (a cluster that grew) fails here instead of
    committing.

    Only when all ``njobs`` jobs are written does any unit of ``grid`` get
    its key, so a run whose writes fail changes no unit of the array; its
    partial files are removed.
    """
    expected = list(range(njobs))
    addresses: set[str] = set()
    entries: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}
    for w in written:
        if isinstance(w, str):
            addresses.add(w)
        else:
            addresses.add(w[0])
            for scoords, ents in w[1]:
                entries.setdefault(tuple(scoords), []).extend(ents)
    addresses.discard("local")
    done, nbytes, errors, norun = _flush(target, addresses) if addresses else (list(expected), 0, [], [])
    resumed = _resume_commit(target, kind)
    if resumed is not None:
        renamed, nbytes = resumed
        # This task ran before and died while it renamed the units: its
        # writers had been flushed and checked then, and what Dask ran
        # again since (write tasks whose results died with that worker)
        # wrote the same bytes, or new partial files that go now.
        logger.warning(
            "aimss: to_zarr into %s: finished a commit of run %s cut short (%d units renamed now)",
            target.store, target.run, renamed,
        )
        _in_place_writer(target, kind).discard(target.run)
        if target.durable:
            _sync_all(target)
        _end(run_id, begun)
        return nbytes
    writer = None
    try:
        writer = _in_place_writer(target, kind)
        _raise_for(target, errors, expected, done, "No chunk of the array was changed", norun)
        hosts = _hosts(addresses)
        if len(hosts) > 1 and not target.shared:
            raise SinkError(
                f"to_zarr into {target.store!r}: chunks were written in place from several hosts "
                f"{sorted(hosts)}, which is safe on one host only (the cluster grew during the run), "
                "or on a shared parallel file system (shared_filesystem=True). "
                "No chunk of the array was changed; write again."
            )
        units = list(np.ndindex(*grid))
        if kind == "chunks":
            if len(entries) != len(units):  # every shard holds a chunk, so every one had an append
                missing = sorted(set(units) - set(entries))[:5]
                raise SinkError(f"to_zarr: no chunk of shards {missing} was written; this is a bug, please report it")
            sealed = writer.close_shards(entries, target.run)
            writer.commit(units, sealed, target.durable, nbytes)
            writer.discard(target.run)  # partial files of late appends, if any: never committed
        else:
            writer.commit(units, target.run, target.durable, nbytes)
    except Exception:
        if writer is not None:
            writer.discard(target.run)
        raise
    if target.durable:
        # On one host, syncing here flushes what every writer there wrote
        # (one page cache); across hosts each writer synced its own. Then
        # the renames of the commit.
        _sync_all(target)
    _end(run_id, begun)
    return nbytes


def _resume_commit(target: ZarrTarget, kind: str) -> tuple[int, int] | None:
    """Finish a commit of ``target``'s run cut short (see ``RowsInPlace.resume_commit``); None: none begun."""
    try:
        writer = _in_place_writer(target, kind)
    except SinkError:
        return None  # not an array written in place: the checks that follow say so
    return writer.resume_commit(target.run)


def _sync_all(target: ZarrTarget) -> None:
    """fsync every unit file of the target array and its metadata (written from this host)."""
    array = target.open()
    sync_units(array, [tuple(slice(0, n) for n in array.shape)])
    sync_metadata(array)


def _hosts(addresses: set[str]) -> set[str]:
    from distributed.comm import get_address_host

    return {get_address_host(a) for a in addresses}


def abort(array: Any, target: ZarrTarget, error: BaseException | None = None) -> None:
    """After a failed run: stop its writers everywhere, then remove its partial chunk files.

    A rows run that fails before its last task (a block's computation
    raised) would otherwise leave its partial files next to the chunks:
    never read, but clutter. The writers stop first, so that none writes a
    partial file after the sweep. Best effort: it never hides the failure.
    """
    from aimss_dask.sink.direct import remove_partials

    try:
        try:
            from distributed import default_client

            default_client().run(_abort_run, target.run)
        except ValueError:  # no cluster: a local scheduler's writes are done
            pass
        else:
            finish_run(target.run, None, "failed", error)
        remove_partials(array, target.run)
    except Exception:
        logger.warning("aimss: cleaning up after the failed run %s failed", target.run, exc_info=True)


async def _abort_run(run: str, dask_worker: Any = None) -> int:
    """On a worker: drop the run's queued writes and refuse later ones (off the event loop)."""
    import asyncio

    plugin = dask_worker.plugins.get(PLUGIN_NAME) if dask_worker is not None else None
    writer = plugin.runs.peek_shared(SHARED_KEY) if plugin is not None else None
    if writer is None:
        return 0
    # The queue, not only its WriteRun: a worker with no write of the run yet
    # must refuse any that comes later too.
    dropped = await asyncio.get_running_loop().run_in_executor(None, writer.abort, run)
    await asyncio.get_running_loop().run_in_executor(None, plugin.runs.stop, WriteRun.key(run))
    return dropped


def _flush(target: ZarrTarget, addresses: set[str]) -> tuple[list[int], int, list[str], list[str]]:
    """Wait for the run's writers on ``addresses``, all at once: regions written, bytes, errors, workers without the run.

    Every writer is flushed before any is stopped: a writer that finished
    early stays registered (and in its worker's heartbeats) while a slow
    one drains, so the coordinator still sees its rate to judge the slow one by.
    """
    import asyncio

    from aimss_dask.api.context import current

    ep = current("to_zarr")
    order = sorted(addresses)
    name = WriteRun.key(target.run)

    async def flush_all() -> list[Any]:
        return await asyncio.gather(*(
            ep.ask_worker(a, "run_call", name=name, operation="flush", kwargs={"durable": target.durable})
            for a in order
        ), return_exceptions=True)

    async def stop_all(flushed: list[str]) -> None:
        # Flushed: the workers forget the run (a late write is refused).
        # One leaving takes its runs with it: nothing to do there.
        await asyncio.gather(*(ep.ask_worker(a, "run_stop", name=name) for a in flushed), return_exceptions=True)

    replies = ep.call(flush_all)
    done: list[int] = []
    errors: list[str] = []
    nbytes = 0
    flushed: list[str] = []
    norun: list[str] = []
    for addr, reply in zip(order, replies):
        if isinstance(reply, StreamNotFoundError):
            norun.append(addr)  # no WriteRun there (any more): nothing to wait for
            continue
        if isinstance(reply, BaseException):  # a writer lost with its queue
            errors.append(f"{addr}: {type(reply).__name__}: {reply}")
            continue
        flushed.append(addr)
        done.extend(reply["written"])
        nbytes += reply["bytes"]
        errors.extend(f"{addr}: {m}" for m in reply["errors"])
    ep.call(stop_all, flushed)
    return done, nbytes, errors, norun


def _raise_for(
    target: ZarrTarget, errors: list[str], expected: list[int], done: list[int], kept: str, norun: Sequence[str] = ()
) -> None:
    if errors:
        raise SinkError(
            f"to_zarr into {target.store!r} (component {target.path!r}) failed: "
            + "; ".join(errors[:5])
            + ("" if len(errors) <= 5 else f" (and {len(errors) - 5} more)")
            + f". {kept}; fix the cause and write again."
        )
    missing = sorted(set(expected) - set(done))
    if missing and norun:
        raise SinkError(
            f"to_zarr into {target.store!r}: regions {missing[:10]} ({len(missing)} of {len(expected)}) "
            f"cannot be confirmed: workers {sorted(norun)[:5]}, where tasks wrote, hold no writer of this "
            "run (a worker restarted, or this last task ran before and had stopped them, then died). "
            f"{kept}; write again."
        )
    if missing:
        raise SinkError(
            f"to_zarr into {target.store!r}: regions {missing[:10]} were never written "
            f"({len(missing)} of {len(expected)}); this is a bug, please report it"
        )
