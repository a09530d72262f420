"""The run specs of the sinks: ``to_zarr`` of an array, and the streaming sink.

Examples
--------
>>> spec = push_write_spec("abc", "aimss-sink-abc")
>>> spec.kind, spec.run_id, spec.on_seal.value, spec.free_unread
('to_zarr', 'aimss-sink-abc', 'keep', False)
"""

from __future__ import annotations

from dataclasses import dataclass

from aimss_dask.core.runs import OnLoss, OnSeal, RunSpec


@dataclass(frozen=True, kw_only=True)
class ZarrWriteSpec(RunSpec, kind="to_zarr"):
    """``to_zarr`` of a Dask Array (every path); ``target`` is the run's array, for status."""

    target: str = ""


@dataclass(frozen=True, kw_only=True)
class StreamSinkSpec(RunSpec, kind="zarr-sink"):
    """A streaming sink: drains a user's stream into a Zarr array; ``target`` as above."""

    target: str = ""


def push_write_spec(
    token: str, name: str, target: str = "", inputs: int = 0, io_priority: int = 0
) -> ZarrWriteSpec:
    """A ``to_zarr`` push run over stream ``name``: its owners write each unit where it
    completes, so partitions never move at seal nor are freed for want of read tasks.

    ``inputs``: the number of input blocks, whose flat indices are the
    pieces' origins (the owners drop a second copy of a block's pieces,
    plan §2.8); 0: no origins."""
    return ZarrWriteSpec(
        run_id=name,  # the stream bears the run's id (ZarrTarget.run), as its writes on workers do
        streams=(name,),
        create=f"aimss-create-{token}",
        barrier=f"aimss-seal-{token}",
        on_seal=OnSeal.KEEP,
        free_unread=False,
        on_loss=OnLoss.RESTART,
        target=target,
        inputs=inputs,
        # One copy: a lost worker restarts the write (its units are rewritten
        # whole), so copies of the pieces would cost memory and buy nothing.
        replication=1,
        io_priority=io_priority,
    )
