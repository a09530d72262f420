"""A worker takes over the spill files of one that died on its node, as the coordinator asks (``aimss_salvage``).

Blocking (disk reads to check every record): the worker plugin runs
:func:`take_over` in a thread. What is checked and why:
:mod:`aimss_dask.log.salvage`; what the coordinator asks for and does with
the answer: :mod:`aimss_dask.coordinator.salvage`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aimss_dask.core.specs import StreamSpec
from aimss_dask.log import salvage
from aimss_dask.log.store import LogStore

logger = logging.getLogger("aimss_dask")


def take_over(store: LogStore, dead: str, streams: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild the partitions asked for from ``dead``'s spill folder(s) here (:func:`discard_leftovers` removes the rest).

    ``streams``: ``{"spec": wire of the stream under its new epoch, with
    this worker as the owner of the partitions asked for, "epochs": [first,
    last] that files may carry, "parts": [[partition, first offset needed,
    end or None], ...]}``. Returns ``{"streams": {name: [[partition, start,
    end, bytes read back], ...]}, "folders": n}``: only partitions that got
    at least one record back, opened here under the new epoch and sealed.
    """
    folders = salvage.orphans(store.spill_root, dead)
    found = [f for folder in folders for f in salvage.scan(folder)]
    out: dict[str, list[list[int]]] = {}
    for item in streams:
        spec = StreamSpec.from_wire(item["spec"])
        lo, hi = item["epochs"]
        for p, need, end in item["parts"]:
            files = salvage.verified(salvage.chain(found, spec.name, p, (lo, hi), need))
            if not files:
                continue
            try:
                store.open(spec.name, spec.epoch, [p], starts={p: need}, since=spec.first_epoch)
                got = store.adopt(spec.name, spec.epoch, p, need, files, end)
            except Exception as e:  # another partition may still come back
                logger.warning("aimss: could not rebuild stream %r partition %d from %s's spill files: %r", spec.name, p, dead, e)
                continue
            out.setdefault(spec.name, []).append([p, need, got, sum(f.index.nbytes for f in files)])
    return {"streams": out, "folders": len(folders)}


def discard_leftovers(store: LogStore, dead: str) -> int:
    """Remove what is left of ``dead``'s spill folder(s) once nothing more is taken from them; the folders gone."""
    return sum(salvage.discard(folder) for folder in salvage.orphans(store.spill_root, dead))
