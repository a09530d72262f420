"""AIMSS pages on the scheduler's dashboard, and ``/aimss/panels.json``.

Five Bokeh pages, each a view of the coordinator (:mod:`~aimss_dask.coordinator.panels`
computes their columns), refreshed every second:

- ``/individual-aimss-streams``: runs with a progress bar each, and every
  stream's kind, state, owner client, partitions, records and bytes;
- ``/individual-aimss-memory``: each worker's log in memory and on disk
  against its budget;
- ``/individual-aimss-groups``: consumer groups' committed offsets and lag
  per partition;
- ``/individual-aimss-throughput``: bytes pushed and received per second;
- ``/individual-aimss-events``: recovery, straggler, replica and other events.

How they get onto the dashboard, without patching distributed:

- Importing :mod:`aimss_dask` lists this module in the Dask config key
  ``distributed.scheduler.http.routes``, which names the modules a
  scheduler takes HTTP routes from. A scheduler created afterwards (a
  ``LocalCluster`` or dask-jobqueue cluster made in the same process, or
  ``dask scheduler --preload aimss_dask.preload``) reads ``routes`` here
  before it builds its dashboard; that read adds the pages to
  ``distributed.dashboard.scheduler.applications``, so they are served by the
  dashboard itself and listed in its "More" menu and in
  ``/individual-plots.json`` (which the JupyterLab extension reads).
- The scheduler plugin's ``start`` calls :func:`attach`: on a scheduler made
  before aimss_dask was imported there, it serves the same pages from a
  Bokeh application of its own, added to the scheduler's HTTP application.
  They work at the same addresses, but the menus, built at the scheduler's
  start, do not list them; a log line says so.

Bokeh is imported only when a page is opened or attached (the dashboard
needs it anyway); without it, there are no pages and nothing fails.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import dask
from distributed.http.utils import RequestHandler

from aimss_dask.core.names import PLUGIN_NAME

logger = logging.getLogger("aimss_dask")

__all__ = ["PAGES", "attach", "detach", "enable"]

#: This module, as the scheduler's HTTP routes config names it.
ROUTES_MODULE = __name__

#: Milliseconds between two refreshes of a page.
INTERVAL_MS = 1000


def enable() -> None:
    """List this module in ``distributed.scheduler.http.routes``: schedulers made from now on show the pages.

    Cheap (no Bokeh import); called when :mod:`aimss_dask` is imported.
    """
    routes = list(dask.config.get("distributed.scheduler.http.routes", default=[]) or [])
    if ROUTES_MODULE not in routes:
        dask.config.set({"distributed.scheduler.http.routes": [*routes, ROUTES_MODULE]})


def __getattr__(name: str) -> Any:
    # PEP 562: ``routes`` is read by each scheduler as it starts, right
    # before it builds its dashboard from the applications dict: the moment
    # to add the pages there (the read repeats for every scheduler).
    if name == "routes":
        _register_pages()
        return _ROUTES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_pages() -> None:
    apps = _applications()
    if apps is not None:
        for path, page in PAGES.items():
            apps.setdefault(path, page)


def _applications() -> dict[str, Any] | None:
    """distributed's dict of dashboard pages, if the dashboard module is loaded (the scheduler loads it first)."""
    mod = sys.modules.get("distributed.dashboard.scheduler")
    return getattr(mod, "applications", None) if mod is not None else None


def _bokeh_apps(scheduler: Any) -> list[Any]:
    http = getattr(scheduler, "http_application", None)
    apps = getattr(http, "applications", None) or []
    return [a for a in apps if hasattr(a, "app_paths")]


def _serves_panels(http: Any, path: str) -> bool:
    """Whether ``http`` (a Tornado application) routes ``path`` to :class:`PanelsJSON`."""
    from tornado.httputil import HTTPServerRequest, RequestStartLine

    # HTTP/1.0: no Host header needed to ask the router.
    handler = http.find_handler(HTTPServerRequest(start_line=RequestStartLine("GET", path, "HTTP/1.0")))
    return getattr(handler, "handler_class", None) is PanelsJSON


def attach(scheduler: Any) -> Any | None:
    """Serve the pages and ``/aimss/panels.json`` on ``scheduler`` where it does not yet; the Bokeh application added, or None.

    A scheduler made before :func:`enable`, or after the Dask config was
    refreshed (which drops the route), misses them. Never raises: a
    scheduler without a dashboard or without Bokeh gets no pages, and the
    reason is logged.
    """
    prefix = "/" + (dask.config.get("distributed.scheduler.http.prefix", default="") or "").strip("/")
    http = getattr(scheduler, "http_application", None)
    try:
        path = prefix.rstrip("/") + "/aimss/panels.json"
        if http is not None and not _serves_panels(http, path):
            http.add_handlers(r".*", [(path, PanelsJSON, {"dask_server": scheduler})])
    except Exception as e:
        logger.warning("aimss: no /aimss/panels.json (%r)", e)
    try:
        # Schedulers made later list them (this one's menus are built already).
        _register_pages()
        bokehs = _bokeh_apps(scheduler)
        if not bokehs:
            logger.debug("aimss: the scheduler has no Bokeh dashboard; no AIMSS pages")
            return None
        if set(PAGES) <= set(bokehs[0].app_paths):
            return None  # served by the dashboard itself (see the module's notes)
        from distributed.dashboard.core import BokehApplication
        from tornado.ioloop import IOLoop

        app = BokehApplication(PAGES, scheduler, prefix=prefix)
        scheduler.http_application.add_application(app)
        app.initialize(IOLoop.current())
        logger.info(
            "aimss: dashboard pages served at %s; the dashboard's menus list them only when "
            "aimss_dask is imported before the scheduler starts (--preload aimss_dask.preload)",
            ", ".join(sorted(PAGES)),
        )
        return app
    except Exception as e:
        logger.warning("aimss: no dashboard pages (%r)", e)
        return None


def detach(scheduler: Any, app: Any | None) -> None:
    """Stop serving the pages :func:`attach` added."""
    if app is None:
        return
    try:
        apps = scheduler.http_application.applications
        if app in apps:
            apps.remove(app)
    except Exception as e:
        logger.debug("aimss: could not remove the dashboard pages (%r)", e)


# -- the pages ---------------------------------------------------------------------------


def _coordinator(scheduler: Any) -> Any | None:
    plugin = scheduler.plugins.get(PLUGIN_NAME)
    return plugin if plugin is not None and getattr(plugin, "scheduler", None) is not None else None


def _set(source: Any, data: dict[str, list[Any]]) -> None:
    """Replace a source's data only when it changed (a page left open sends nothing then)."""
    if dict(source.data) != data:
        source.data = data


def _page(doc: Any, title: str, build: Any, scheduler: Any) -> None:
    """Lay out one page: a note while AIMSS is not registered, then ``build``'s models, refreshed."""
    from bokeh.layouts import column
    from bokeh.models import Div

    note = Div(text="", name="aimss-note")
    models, update = build()

    def refresh() -> None:
        try:
            coord = _coordinator(scheduler)
            if coord is None:
                note.text = "AIMSS is not registered on this cluster: <code>client.register_plugin(aimss_dask.AIMSS())</code>"
                return
            note.text = ""
            update(coord)
        except Exception:
            logger.exception("aimss: dashboard page %r failed to refresh", title)

    refresh()
    doc.add_periodic_callback(refresh, INTERVAL_MS)
    doc.add_root(column(note, *models, sizing_mode="stretch_both"))
    doc.title = f"AIMSS: {title}"


def _table(source: Any, columns: list[tuple[str, str]], name: str, height: int = 300) -> Any:
    from bokeh.models import DataTable, NumberFormatter, TableColumn

    def col(field: str, title: str) -> Any:
        numeric = field.endswith(("bytes", "records", "lag", "committed", "end", "partitions"))
        fmt = NumberFormatter(format="0,0") if numeric else None
        return TableColumn(field=field, title=title, **({"formatter": fmt} if fmt else {}))

    return DataTable(
        source=source, columns=[col(f, t) for f, t in columns], name=name,
        sizing_mode="stretch_width", height=height, index_position=None,
    )


def streams_doc(scheduler: Any, extra: Any, doc: Any) -> None:
    """Runs with their progress, and every stream."""
    from bokeh.models import ColumnDataSource, Range1d
    from bokeh.plotting import figure

    from aimss_dask.coordinator import panels

    def build() -> tuple[list[Any], Any]:
        runs = ColumnDataSource(panels.runs_rows(None, {}), name="aimss-runs")
        streams = ColumnDataSource(panels.streams_rows(None, {}), name="aimss-streams")
        bars = figure(
            title="Runs: progress", y_range=[], x_range=Range1d(0, 1), height=220,
            sizing_mode="stretch_width", tools="", toolbar_location=None, name="aimss-runs-plot",
        )
        bars.hbar(y="label", right=1, height=0.7, source=runs, color="#e6e6e6")
        bars.hbar(y="label", right="progress", height=0.7, source=runs, color="#3b7dd8")
        bars.text(x=0.01, y="label", text="percent", source=runs, text_baseline="middle", text_font_size="11px")
        table = _table(streams, [
            ("name", "Stream"), ("kind", "Kind"), ("state", "State"), ("client", "Client"),
            ("partitions", "Partitions"), ("replication", "Copies"), ("records", "Records"),
            ("memory_bytes", "Memory bytes"), ("disk_bytes", "Disk bytes"), ("lost", "Lost partitions"),
        ], "aimss-streams-table")

        def update(coord: Any) -> None:
            snap = coord.run_ops.overview()
            rows = panels.runs_rows(coord, snap)
            recent = _last(rows, 12)
            bars.y_range.factors = list(recent["label"])
            _set(runs, recent)
            _set(streams, panels.streams_rows(coord, snap))

        return [bars, table], update

    _page(doc, "streams and runs", build, scheduler)


def memory_doc(scheduler: Any, extra: Any, doc: Any) -> None:
    """Each worker's log in memory and on disk, against its budget."""
    from bokeh.models import ColumnDataSource
    from bokeh.plotting import figure

    from aimss_dask.coordinator import panels

    def build() -> tuple[list[Any], Any]:
        source = ColumnDataSource(_with_stack(panels.memory_rows({})), name="aimss-memory")
        fig = figure(
            title="Log bytes per worker: memory (blue), spilled to disk (orange), budget (line)",
            y_range=[], height=320, sizing_mode="stretch_width", tools="", toolbar_location=None,
            name="aimss-memory-plot",
        )
        fig.hbar(y="worker", left=0, right="memory", height=0.6, source=source, color="#3b7dd8")
        fig.hbar(y="worker", left="memory", right="stack", height=0.6, source=source, color="#f08c2e")
        fig.scatter(x="budget", y="worker", marker="dash", size=30, line_width=3, color="black", source=source)

        def update(coord: Any) -> None:
            rows = _with_stack(panels.memory_rows(panels.beats(coord)))
            fig.y_range.factors = list(rows["worker"])
            _set(source, rows)

        return [fig], update

    _page(doc, "log memory", build, scheduler)


def groups_doc(scheduler: Any, extra: Any, doc: Any) -> None:
    """Consumer groups' offsets and lag per partition."""
    from bokeh.models import ColumnDataSource

    from aimss_dask.coordinator import panels

    def build() -> tuple[list[Any], Any]:
        source = ColumnDataSource(panels.groups_rows({}, {}), name="aimss-groups")
        table = _table(source, [
            ("stream", "Stream"), ("group", "Group"), ("partition", "Partition"),
            ("committed", "Committed"), ("end", "End"), ("lag", "Lag"),
        ], "aimss-groups-table", height=500)

        def update(coord: Any) -> None:
            _set(source, panels.groups_rows(coord.state.groups, coord.state.bounds))

        return [table], update

    _page(doc, "consumer groups", build, scheduler)


def throughput_doc(scheduler: Any, extra: Any, doc: Any) -> None:
    """Bytes pushed (stored by their owners) and received per second, over the cluster."""
    from bokeh.models import ColumnDataSource
    from bokeh.plotting import figure

    def build() -> tuple[list[Any], Any]:
        source = ColumnDataSource({"time": [], "pushed": [], "received": []}, name="aimss-throughput")
        fig = figure(
            title="Push throughput, bytes/s (pushed: blue, received incl. copies: orange)",
            x_axis_type="datetime", height=320, sizing_mode="stretch_width", name="aimss-throughput-plot",
            tools="xpan,xwheel_zoom,reset", toolbar_location="above",
        )
        fig.line(x="time", y="pushed", source=source, color="#3b7dd8", line_width=2)
        fig.line(x="time", y="received", source=source, color="#f08c2e", line_width=2)

        def update(coord: Any) -> None:
            _set(source, coord.throughput.rows())

        return [fig], update

    _page(doc, "push throughput", build, scheduler)


def events_doc(scheduler: Any, extra: Any, doc: Any) -> None:
    """Recovery, straggler, replica and run events, newest first."""
    from bokeh.models import ColumnDataSource

    from aimss_dask.coordinator import panels

    def build() -> tuple[list[Any], Any]:
        source = ColumnDataSource(panels.events_rows([]), name="aimss-events")
        table = _table(source, [("clock", "Time"), ("action", "Event"), ("details", "Details")],
                       "aimss-events-table", height=600)

        def update(coord: Any) -> None:
            _set(source, panels.events_rows(scheduler.get_events("aimss")))

        return [table], update

    _page(doc, "events", build, scheduler)


def _last(rows: dict[str, list[Any]], n: int) -> dict[str, list[Any]]:
    return {k: v[-n:] for k, v in rows.items()}


def _with_stack(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
    rows = dict(rows)
    rows["stack"] = [m + d for m, d in zip(rows["memory"], rows["disk"])]
    return rows


#: The pages, by path: what the dashboard serves.
PAGES: dict[str, Any] = {
    "/individual-aimss-streams": streams_doc,
    "/individual-aimss-memory": memory_doc,
    "/individual-aimss-groups": groups_doc,
    "/individual-aimss-throughput": throughput_doc,
    "/individual-aimss-events": events_doc,
}


class PanelsJSON(RequestHandler):
    """``/aimss/panels.json``: every page's columns (404 while AIMSS is not registered)."""

    def get(self) -> None:
        from aimss_dask.coordinator import panels

        coord = _coordinator(self.server)
        if coord is None:
            self.set_status(404)
            self.write({"error": "AIMSS is not registered on this cluster"})
            return
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(panels.panels(coord), default=str))


_ROUTES: list[tuple[str, Any, dict[str, Any]]] = [(r"aimss/panels.json", PanelsJSON, {})]
