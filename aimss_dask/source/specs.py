"""The run specs of the source: a Zarr source stream, and a loader iterating it.

Examples
--------
>>> spec = ZarrSourceSpec(run_id="zarr-source-abc", streams=("images",), on_loss=OnLoss.FAIL)
>>> spec.kind, spec.on_seal.value
('zarr-source', 'keep')
"""

from __future__ import annotations

from dataclasses import dataclass

from aimss_dask.core.runs import OnLoss, RunSpec

__all__ = ["LoaderSpec", "OnLoss", "ZarrSourceSpec"]


@dataclass(frozen=True, kw_only=True)
class ZarrSourceSpec(RunSpec, kind="zarr-source"):
    """``from_zarr``: owns its stream, which brokers on the owners fill from ``target``.

    Its partitions stay where they are (the brokers read ahead there) and a
    lost owner fails it, named: the slabs it held are read again only by a
    new source.
    """

    target: str = ""


@dataclass(frozen=True, kw_only=True)
class LoaderSpec(RunSpec, kind="loader"):
    """A batch iterator over a source stream (``Stream.batches``); ``group``: its consumer group."""

    group: str | None = None
