"""The AIMSS dashboard pages: real HTTP against a running cluster, Bokeh sessions, and a real browser.

- ``/individual-plots.json`` (what the JupyterLab extension reads) and the
  dashboard's "More" menu list the pages;
- each page renders, and a Bokeh client session pulls its document with
  the data of the cluster in its named sources;
- ``/aimss/panels.json`` serves the same columns;
- a scheduler made before aimss_dask configured its routes still serves the
  pages (from the plugin's start);
- a headless Chromium (``browser`` mark; skipped without it) shows the
  streams page with data, and takes the screenshot the README shows.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import wait_until
from distributed import Client, LocalCluster

import aimss_dask
from aimss_dask._compat import listed_workers
from aimss_dask.coordinator import dashboard, panels

pytest.importorskip("bokeh", reason="the dashboard needs bokeh (pip install 'aimss-dask[dashboard]')")

PAGES = sorted(dashboard.PAGES)


@pytest.fixture(autouse=True, scope="module")
def _routes_configured():
    """As right after ``import aimss_dask`` (other tests' ``dask.config.refresh()`` drops the route)."""
    dashboard.enable()
    yield


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _base(cluster: LocalCluster) -> str:
    return cluster.dashboard_link.rsplit("/", 1)[0]


def _pull(url: str) -> dict[str, dict]:
    """Every named ColumnDataSource of the page at ``url``, as a Bokeh client session sees it."""
    from bokeh.client import pull_session
    from bokeh.models import ColumnDataSource

    with pull_session(url=url) as session:
        return {
            m.name: {k: list(v) for k, v in m.data.items()}
            for m in session.document.select({"type": ColumnDataSource})
            if m.name
        }


# -- units: the columns -------------------------------------------------------------------


def test_docstring_examples():
    import doctest

    assert doctest.testmod(panels).failed == 0


def test_groups_rows_lag_per_partition_never_negative():
    rows = panels.groups_rows(
        {"s": {"a": [5, 0, 9], "b": [1, 1, 1]}},
        {"s": {0: (0, 5), 1: (0, 7), 2: (0, 8)}},  # 9 > 8: the bounds are a heartbeat behind
    )
    assert rows["group"] == ["a"] * 3 + ["b"] * 3
    assert rows["lag"] == [0, 7, 0, 4, 6, 7]


def test_memory_rows_skip_workers_without_a_log_and_show_the_budget_fraction():
    beats = {
        "tcp://b": {"log": [50, 10, 200, 10, 7, 60, 3]},
        "tcp://a": {"streams": {}},  # before its setup: no log yet
        "tcp://c": None,
    }
    rows = panels.memory_rows(beats)
    assert rows["worker"] == ["tcp://b"]
    assert rows["fraction"] == [0.25]
    assert panels.log_totals(beats) == {"pushed": 7, "received": 60, "served": 3, "spilled": 10}


def test_events_rows_newest_first_and_bounded():
    events = [(float(i), {"action": f"a{i}", "run": "r"}) for i in range(300)]
    rows = panels.events_rows(events, limit=5)
    assert rows["action"] == ["a299", "a298", "a297", "a296", "a295"]
    assert json.loads(rows["details"][0]) == {"run": "r"}


# -- a real cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dash():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(aimss_dask.AIMSS(memory_limit="64MiB"))
        s = aimss_dask.create_stream("dash-demo", partitions=4)
        for i in range(400):
            s.write(np.full(256, i, dtype="f8"), partition=i % 4)
        s.seal()
        for _ in s.read(partition=1, group="readers"):
            pass
        x = da.ones((1000, 1000), chunks=(125, 1000))
        assert float(aimss_dask.rechunk(x, (1000, 125)).sum().compute()) == 1e6
        # The heartbeats that carry the logs' figures.
        wait_until(lambda: _records() == 400, timeout=30, what="the heartbeats' record counts")
        yield cluster, client


def _records() -> int:
    st = aimss_dask.status()
    return sum(s["records"] for s in st.streams if s["name"] == "dash-demo")


def test_pages_are_listed_in_individual_plots_json_and_the_more_menu(dash):
    cluster, _ = dash
    code, body = _get(_base(cluster) + "/individual-plots.json")
    assert code == 200
    listed = json.loads(body)
    assert set(PAGES) <= set(listed.values()), listed
    code, status = _get(_base(cluster) + "/status")
    assert code == 200
    for page in PAGES:
        assert page.lstrip("/") in status, f"{page} is not in the dashboard's menu"


@pytest.mark.parametrize("page", PAGES)
def test_each_page_renders_with_the_clusters_data(dash, page):
    cluster, client = dash
    code, html = _get(_base(cluster) + page)
    assert code == 200 and "bokeh" in html.lower()
    sources = _pull(_base(cluster) + page)
    workers = sorted(listed_workers(client))
    if page.endswith("streams"):
        streams = sources["aimss-streams"]
        row = streams["name"].index("dash-demo")
        assert streams["records"][row] == 400 and streams["state"][row] == "sealed"
        assert streams["partitions"][row] == 4
        runs = sources["aimss-runs"]
        assert "rechunk" in runs["kind"] and all(0.0 <= f <= 1.0 for f in runs["progress"])
        assert runs["progress"][runs["kind"].index("rechunk")] == 1.0
    elif page.endswith("memory"):
        mem = sources["aimss-memory"]
        assert mem["worker"] == workers
        assert mem["budget"] == [64 * 2**20] * 2
        assert sum(mem["memory"]) + sum(mem["disk"]) >= 400 * 256 * 8
    elif page.endswith("groups"):
        groups = sources["aimss-groups"]
        at = [i for i, (s, g) in enumerate(zip(groups["stream"], groups["group"])) if (s, g) == ("dash-demo", "readers")]
        assert [groups["committed"][i] for i in at] == [0, 100, 0, 0]
        assert [groups["lag"][i] for i in at] == [100, 0, 100, 100]
    elif page.endswith("throughput"):
        assert set(sources["aimss-throughput"]) == {"time", "pushed", "received"}
    elif page.endswith("events"):
        assert "aimss-events" in sources


def test_throughput_page_plots_bytes_per_second_while_data_moves(dash):
    cluster, client = dash
    url = _base(cluster) + "/individual-aimss-throughput"
    # Rates come from two heartbeats of a worker: move data once the history runs.
    wait_until(lambda: len(_pull(url)["aimss-throughput"]["time"]) >= 2, timeout=30, what="a throughput history")
    x = da.random.random((2000, 1000), chunks=(250, 1000))
    y = aimss_dask.rechunk(x, (2000, 125)).persist()
    deadline = time.monotonic() + 30
    while True:
        source = _pull(url)["aimss-throughput"]
        if any(v > 0 for v in source["received"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # A rechunk of 16 MB moves most of it between the two workers.
    assert max(source["received"]) > 0, source
    assert len(source["time"]) == len(source["pushed"]) == len(source["received"]) >= 2
    assert source["time"] == sorted(source["time"])
    del y


def test_panels_json_serves_every_page_s_columns(dash):
    cluster, _ = dash
    code, body = _get(_base(cluster) + "/aimss/panels.json")
    assert code == 200
    data = json.loads(body)
    assert set(data) >= {"runs", "streams", "memory", "groups", "events", "totals"}
    assert "dash-demo" in data["streams"]["name"]
    assert data["totals"]["received"] >= 400 * 256 * 8


def test_a_scheduler_made_before_aimss_configured_its_routes_still_serves_the_pages(monkeypatch):
    """The plugin's start adds the pages and panels.json; the menus, built at the scheduler's start, do not list them."""
    import distributed.dashboard.scheduler as ds

    # As in a process where no scheduler has read the routes yet.
    for page in PAGES:
        monkeypatch.delitem(ds.applications, page, raising=False)
    routes = [r for r in dask.config.get("distributed.scheduler.http.routes") if r != dashboard.ROUTES_MODULE]
    with dask.config.set({"distributed.scheduler.http.routes": routes}), LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
    ) as cluster, Client(cluster) as client:
        base = _base(cluster)
        assert _get(base + "/individual-aimss-streams")[0] == 404
        assert _get(base + "/aimss/panels.json")[0] == 404  # no route at all (as after dask.config.refresh())
        client.register_plugin(aimss_dask.AIMSS())
        wait_until(lambda: _get(base + "/aimss/panels.json")[0] == 200, timeout=10, what="panels.json")
        s = aimss_dask.create_stream("late", partitions=2)
        s.write(b"x", partition=0)
        s.flush()
        wait_until(lambda: _get(base + "/individual-aimss-streams")[0] == 200, timeout=10, what="the page")
        sources = _pull(base + "/individual-aimss-streams")
        assert "late" in sources["aimss-streams"]["name"]
        plots = json.loads(_get(base + "/individual-plots.json")[1])
        assert not any("aimss" in v for v in plots.values())
        # Unregistered (Dask does not close the plugin then): the page says so.
        client.unregister_scheduler_plugin("aimss")
        from bokeh.client import pull_session

        with pull_session(url=base + "/individual-aimss-streams") as session:
            assert "not registered" in session.document.get_model_by_name("aimss-note").text


def test_pages_say_aimss_is_not_registered_until_it_is():
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
    ) as cluster, Client(cluster):
        base = _base(cluster)
        from bokeh.client import pull_session

        with pull_session(url=base + "/individual-aimss-memory") as session:
            note = session.document.get_model_by_name("aimss-note")
            assert "not registered" in note.text
        assert _get(base + "/aimss/panels.json")[0] == 404


# -- a real browser -----------------------------------------------------------------------


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no Chromium and chromedriver here (Debian: apt install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,800"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.browser
def test_a_browser_shows_the_streams_page_with_data(dash, tmp_path):
    cluster, _ = dash
    drv = _browser()
    try:
        drv.get(_base(cluster) + "/individual-aimss-streams")
        script = """
            const docs = (window.Bokeh && Bokeh.documents) || [];
            if (!docs.length) return null;
            const m = docs[0].get_model_by_name('aimss-streams');
            return m ? Array.from(m.data.name) : null;"""
        names = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not names:
            names = drv.execute_script(script)
            time.sleep(0.2)
        assert names and "dash-demo" in names, names
        # Bokeh draws inside nested shadow roots: count the table's rows in all of them.
        count_rows = """
            const count = (root) => root.querySelectorAll('.slick-row').length
                + Array.from(root.querySelectorAll('*')).filter(e => e.shadowRoot)
                       .reduce((n, e) => n + count(e.shadowRoot), 0);
            return count(document);"""
        rows = 0
        while time.monotonic() < deadline and not rows:
            rows = drv.execute_script(count_rows)
            time.sleep(0.2)
        assert rows >= 1, "the table drew no row"
        time.sleep(1.0)  # the plot's first paint
        shot = tmp_path / "aimss-streams.png"
        assert drv.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        keep = os.environ.get("AIMSS_SCREENSHOT_DIR")
        if keep:
            os.makedirs(keep, exist_ok=True)
            shutil.copy(shot, os.path.join(keep, shot.name))
    finally:
        drv.quit()
