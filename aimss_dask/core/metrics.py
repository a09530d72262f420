"""AIMSS metrics on Dask's ``/metrics`` endpoints (Prometheus), from plain-data sources.

The scheduler's and the workers' HTTP servers serve ``/metrics`` from
``prometheus_client``'s default registry, the library Dask itself uses. A
plugin adds a *source* here, a function returning :class:`Metric` values
(plain data: the coordinator and the worker plugin need no Prometheus
code), and one collector per process turns the sources into metric families
under the ``aimss_`` namespace. Sources in one process (several workers of
an in-process cluster) are summed, metric by metric and label set by label
set. Labels have a bounded set of values (kinds, states, directions):
never a record, a task or a stream.

Without ``prometheus_client`` (the ``metrics`` extra) :func:`expose` returns
False and changes nothing: Dask's ``/metrics`` answers as it does without
it.
"""

from __future__ import annotations

import importlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

logger = logging.getLogger("aimss_dask")

__all__ = ["NAMESPACE", "Metric", "available", "counts", "expose", "merge", "withdraw"]

NAMESPACE = "aimss"

#: A histogram's value: ``([(upper bound, cumulative count), ..., (inf, total)], sum)``.
HistogramValue = tuple[list[tuple[float, int]], float]
Value = Union[float, HistogramValue]


@dataclass(frozen=True)
class Metric:
    """One metric of a source: ``name`` (without the namespace; a counter's without ``_total``),
    ``kind`` (``gauge``, ``counter`` or ``histogram``), help text, and
    ``samples``: ``[(labels, value), ...]``.

    >>> Metric("log_budget_bytes", "gauge", "Log budget.", [({}, 1024.0)]).full_name
    'aimss_log_budget_bytes'
    """

    name: str
    kind: str
    doc: str
    samples: list[tuple[dict[str, str], Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ("gauge", "counter", "histogram"):
            raise ValueError(f"metric {self.name!r}: kind {self.kind!r} must be gauge, counter or histogram")

    @property
    def full_name(self) -> str:
        return f"{NAMESPACE}_{self.name}"


def merge(metrics: Iterable[Metric]) -> list[Metric]:
    """The same metrics from several sources, summed per label set (histograms bucket by bucket).

    >>> a = Metric("x", "counter", "X.", [({"k": "a"}, 1.0)])
    >>> b = Metric("x", "counter", "X.", [({"k": "a"}, 2.0), ({"k": "b"}, 5.0)])
    >>> merge([a, b])[0].samples
    [({'k': 'a'}, 3.0), ({'k': 'b'}, 5.0)]
    """
    out: dict[str, tuple[Metric, dict[tuple[tuple[str, str], ...], Any]]] = {}
    for m in metrics:
        if m.name not in out:
            out[m.name] = (m, {})
        first, values = out[m.name]
        if first.kind != m.kind:
            raise ValueError(f"metric {m.name!r} comes as both {first.kind} and {m.kind}")
        for labels, value in m.samples:
            key = tuple(sorted(labels.items()))
            if key not in values:
                values[key] = value
            elif m.kind == "histogram":
                values[key] = _add_histograms(values[key], value)
            else:
                values[key] = values[key] + value
    return [
        Metric(first.name, first.kind, first.doc, [(dict(k), v) for k, v in values.items()])
        for first, values in out.values()
    ]


def _add_histograms(a: HistogramValue, b: HistogramValue) -> HistogramValue:
    (ba, sa), (bb, sb) = a, b
    if [x for x, _ in ba] != [x for x, _ in bb]:
        raise ValueError("histograms with different buckets cannot be summed")
    return [(x, n + m) for (x, n), (_, m) in zip(ba, bb)], sa + sb


def available() -> bool:
    """Whether ``prometheus_client`` can be imported here."""
    try:
        importlib.import_module("prometheus_client")
    except ImportError:
        return False
    return True


Source = Callable[[], list[Metric]]

_lock = threading.Lock()
_sources: list[weakref.WeakMethod[Source] | Callable[[], Source | None]] = []
_registered = False


def expose(source: Source) -> bool:
    """Serve what ``source()`` returns on this process's ``/metrics``; False without ``prometheus_client``.

    A bound method is held weakly: its object's end withdraws it. Call
    :func:`withdraw` on teardown anyway.
    """
    global _registered
    if not available():
        logger.debug("aimss: prometheus_client is not installed; no aimss_ metrics on /metrics")
        return False
    from prometheus_client import REGISTRY

    ref: Any = weakref.WeakMethod(source) if hasattr(source, "__self__") else (lambda: source)
    with _lock:
        _sources.append(ref)
        if not _registered:
            REGISTRY.register(_Collector())
            _registered = True
    return True


def withdraw(source: Source) -> None:
    """Stop serving ``source`` (a plugin's teardown)."""
    with _lock:
        _sources[:] = [r for r in _sources if r() is not None and r() != source]


def _live_sources() -> list[Source]:
    with _lock:
        live = [(r, r()) for r in _sources]
        _sources[:] = [r for r, s in live if s is not None]
    return [s for _, s in live if s is not None]


class _Collector:
    """The process's one collector in ``prometheus_client.REGISTRY``: every live source, merged."""

    def collect(self) -> Iterator[Any]:
        gathered: list[Metric] = []
        for source in _live_sources():
            try:
                gathered.extend(source())
            except Exception:
                # A scrape must not fail for one source (a plugin closing).
                logger.debug("aimss: a metrics source failed", exc_info=True)
        try:
            merged = merge(gathered)
        except ValueError:
            logger.exception("aimss: metrics could not be merged")
            return
        for m in merged:
            yield _family(m)

    def describe(self) -> list[Any]:
        # Names are not fixed up front (sources come and go): no duplicate
        # check at registration, which would also call collect() too early.
        return []


def _family(m: Metric) -> Any:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    names = sorted({k for labels, _ in m.samples for k in labels})
    if m.kind == "histogram":
        fam: Any = HistogramMetricFamily(m.full_name, m.doc, labels=names)
        for labels, (buckets, total) in m.samples:
            fam.add_metric(
                [labels.get(k, "") for k in names],
                [(_bound(b), n) for b, n in buckets],
                total,
            )
        return fam
    cls = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
    fam = cls(m.full_name, m.doc, labels=names)
    for labels, value in m.samples:
        fam.add_metric([labels.get(k, "") for k in names], float(value))
    return fam


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(float(b))


def counts(values: Mapping[str, float], label: str) -> list[tuple[dict[str, str], float]]:
    """``{label value: number}`` as samples.

    >>> counts({"task": 2}, "kind")
    [({'kind': 'task'}, 2.0)]
    """
    return [({label: k}, float(v)) for k, v in sorted(values.items())]
