"""serve's dashboard in a real browser: headless Chromium (Debian's `chromium`, driven over the
DevTools protocol by cdp.py) loads GET /dashboard from a real `fcrun serve`'s metrics listener
with its token, and reads what the page shows.

- Apps under light load: the table lists them with their figures, the selected app's chart
  follows a forced scale-up (its CPU line goes to 2, a scale-up mark appears, the event log
  says so), an idle app's chart marks its freeze and the thaw of the next request, and a
  screenshot of it is not blank.
- 1,000 apps in the CMDB (no instance started): the page loads, shows one page of the table,
  and its search finds app 999. The page's weight and its time to first render are printed
  (the report's figures; no test asserts a duration).

The browser gets a throw-away profile (removed afterwards) and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
import urllib.request

import pytest
from cdp import Browser, find_chromium, png_colours
from polling import wait_until
from serving import serving

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (scripts/setup.sh)")]

METRICS_TOKEN = "dashboard-scrape-token"
BASIC = "Basic " + base64.b64encode(f"ops:{METRICS_TOKEN}".encode()).decode()  # what a browser sends
WAIT_S = 30.0  # the longest a step waits; never reached when it passes
MIN_COLOURS = 32  # a blank page has 1; the dashboard's text, table and chart have hundreds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, apache_php, request):
    # No pool unless a test asks (parametrized indirectly): cold starts would come from it.
    pool_size = getattr(request, "param", 0)
    metrics_port = free_port()
    config = (f'metrics_listen = "127.0.0.1:{metrics_port}"\nmetrics_token = "{METRICS_TOKEN}"\n'
              f"[forkserver]\npool_size = {pool_size}\n")
    with serving(tmp_path, apache_php, config) as srv:
        srv.dashboard_url = f"http://127.0.0.1:{metrics_port}/dashboard"
        site = tmp_path / "site"
        site.mkdir()
        (site / "hello.txt").write_text("hello\n")
        (site / "oops.php").write_text("<?php http_response_code(503); echo 'down';")
        srv.site = str(site)
        yield srv


def open_dashboard(browser: Browser, url: str) -> None:
    """Load the page as a browser whose user gave the token as the Basic password."""
    browser.page("Network.enable")
    browser.page("Network.setExtraHTTPHeaders", headers={"Authorization": BASIC})
    browser.navigate(url)
    browser.wait_for("performance.getEntriesByName('fcrun-first-data').length", WAIT_S, "the page's first data")


def rows(browser: Browser) -> dict[str, list[str]]:
    """The apps table as the page shows it: name -> its cells' text."""
    return browser.evaluate("Object.fromEntries([...document.querySelectorAll('#apps tbody tr')]"
                            ".map(tr => [tr.dataset.app, [...tr.cells].map(td => td.textContent)]))")


def chart_last(browser: Browser, column: str) -> str | None:
    return browser.evaluate(f"document.querySelector('#chart [data-column=\"{column}\"]')?.dataset.last ?? null")


def test_the_dashboard_shows_apps_under_load_and_follows_a_forced_scale_up(server, tmp_path):
    for name in ("a.test", "b.test"):  # b.test is frozen once idle for a second
        server.cli("app", "add", name, "--image", "apache-php", "--docroot", server.site, "--cpu", "0.5",
                   "--cpu-max", "2", "--memory", "256M", "--no-autoscale", "--idle-timeout", "600s",
                   "--freeze-after", "600s" if name == "a.test" else "1s")
    server.start()
    stop, b_idle = threading.Event(), threading.Event()
    answered: list[int] = []

    def load():  # light: one request at a time to each app, a few dozen a second
        while not stop.is_set():
            answered.append(server.request("a.test", "/hello.txt")[0])
            if not b_idle.is_set():
                answered.append(server.request("b.test", "/oops.php")[0])
            time.sleep(0.02)

    loader = threading.Thread(target=load, name="dashboard test load")
    loader.start()
    try:
        with Browser() as browser:
            open_dashboard(browser, server.dashboard_url)
            # Both apps with their figures: a request rate, a p50, one ready instance; b's 5xx.
            table = wait_until("both apps listed with a rate and a ready instance", lambda: (
                t if all(n in (t := rows(browser)) and float(t[n][1]) > 0 and t[n][5] == "1"
                         for n in ("a.test", "b.test")) else None), WAIT_S, 0.2, lambda: rows(browser))
            assert table["a.test"][2] != "–" and float(table["a.test"][2]) > 0  # p50 ms
            assert float(table["a.test"][4]) == 0 and float(table["a.test"][8]) == 0.5  # no 5xx, cpu 0.5
            wait_until("b.test's 5xx", lambda: float(rows(browser)["b.test"][4]) > 0, WAIT_S, 0.2)

            browser.evaluate("document.querySelector('#apps tr[data-app=\"a.test\"]').click()")
            browser.wait_for("document.getElementById('chart-title').textContent === 'a.test'", WAIT_S)
            wait_until("a.test's chart at cpu 0.5", lambda: chart_last(browser, "cpu") == "0.5", WAIT_S, 0.2)
            assert not browser.evaluate("document.querySelector('#chart [data-mark=\"scale-up\"]') !== null")

            server.cli("app", "scale", "a.test", "--cpu", "2")
            # The live chart follows: the CPU line at 2, a scale-up mark, the event in the log.
            wait_until("the chart's cpu line at 2", lambda: chart_last(browser, "cpu") == "2", WAIT_S, 0.2,
                       lambda: chart_last(browser, "cpu"))
            browser.wait_for("document.querySelector('#chart [data-mark=\"scale-up\"]') !== null", WAIT_S)
            browser.wait_for("[...document.querySelectorAll('#events td.kind')].some(td => td.textContent === "
                             "'scale-up')", WAIT_S, "the scale-up in the event log")
            assert float(rows(browser)["a.test"][8]) == 2
            browser.evaluate("document.getElementById('all-events').click()")  # serve's own events too
            browser.wait_for("[...document.querySelectorAll('#events td.kind')].some(td => td.textContent === "
                             "'criu')", WAIT_S, "serve's criu event in the log of every app's events")
            assert int(browser.evaluate("document.getElementById('chart').dataset.points")) >= 2

            # Left idle, b.test is frozen; a request thaws it: both marked on its chart.
            b_idle.set()
            browser.evaluate("document.querySelector('#apps tr[data-app=\"b.test\"]').click()")
            browser.wait_for("document.querySelector('#chart [data-mark=\"freeze\"]') !== null", WAIT_S,
                             "b.test's freeze on its chart")
            assert chart_last(browser, "frozen") == "1" and chart_last(browser, "cpu") == "0"  # a frozen one uses none
            assert server.request("b.test", "/hello.txt")[0] == 200
            browser.wait_for("document.querySelector('#chart [data-mark=\"thaw\"]') !== null", WAIT_S,
                             "b.test's thaw (a cold start by thawing) on its chart")
            wait_until("b.test's cold starts: one start, one thaw", lambda: rows(browser)["b.test"][9] == "1 / 0 / 1",
                       WAIT_S, 0.2, lambda: rows(browser)["b.test"])
            waits = browser.evaluate("document.querySelector('#apps tr[data-app=\"b.test\"]').cells[9].title")
            assert re.search(r"thaw [\d.]+ ms, pool –, start [\d.]+ ms", waits), waits  # their median waits

            screenshot = browser.screenshot()
            (tmp_path / "dashboard.png").write_bytes(screenshot)
            assert png_colours(screenshot) > MIN_COLOURS, "the screenshot is blank"
            browser.navigate("about:blank")  # the check can fail: a blank page is one colour
            assert png_colours(browser.screenshot()) == 1
            assert browser.exceptions == [], browser.exceptions
    finally:
        stop.set()
        loader.join()
    assert set(answered) == {200, 503}, set(answered)


@pytest.mark.parametrize("server", [1], indirect=True, ids=["pool_size=1"])
def test_the_dashboard_with_1000_apps_loads_one_page_and_finds_app_999(server):
    from fcrun.cmdb import open_cmdb
    from fcrun.cmdb.models import App
    from fcrun.paths import Paths

    cmdb = open_cmdb(Paths(data_root=server.data_root, run_root=server.run_root))
    try:
        for i in range(1000):  # app-0 brings a docroot: the pool keeps an instance of its image
            cmdb.add_app(App(name=f"app-{i}.test", image="apache-php", docroot=server.site if i == 0 else None))
    finally:
        cmdb.close()
    server.start()
    weight = {path: fetch(server.dashboard_url + path) for path in ("", "/data")}  # the page, its first data
    with Browser() as browser:
        loads = []  # the first load, then two more (warm: the figures for bench/README)
        for _ in range(3):
            open_dashboard(browser, server.dashboard_url)
            loads.append(json.loads(browser.evaluate(TIMING)))
        shown = rows(browser)
        assert len(shown) == 25 and browser.evaluate("document.getElementById('page').textContent") == "1–25 of 1000"
        browser.evaluate("(() => { const box = document.getElementById('search'); box.value = 'app-999';"
                         " box.dispatchEvent(new Event('input')); })()")
        found = wait_until("the search for app-999", lambda: (r if list(r := rows(browser)) == ["app-999.test"]
                                                               else None), WAIT_S, 0.1, lambda: list(rows(browser)))
        assert found["app-999.test"][5:8] == ["0", "0", "0"]  # no instance: serve started none
        browser.wait_for("document.getElementById('pool').textContent === "
                         "'pool (this node): apache-php 1/1 ready'", WAIT_S, "the pooled instance in the header")
        assert browser.exceptions == [], browser.exceptions
    print(f"\ndashboard with 1000 apps: page {weight['']} bytes (HTML+JS+CSS), first /dashboard/data "
          f"{weight['/data']} bytes; per load (ms): " + "; ".join(
              f"response end {t['response']:.1f}, DOMContentLoaded {t['dom']:.1f}, first contentful paint "
              f"{t['fcp']}, table and chart from the first data {t['data']:.1f}" for t in loads))


# Navigation timing of the page as loaded: its response, DOMContentLoaded, first contentful
# paint, and the page's own mark once it rendered its first data (ms from navigation start).
TIMING = ("JSON.stringify({response: performance.getEntriesByType('navigation')[0].responseEnd, "
          "dom: performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd, "
          "fcp: performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null, "
          "data: performance.getEntriesByName('fcrun-first-data')[0].startTime})")


def fetch(url: str) -> int:
    """The size of what `url` answers (with the metrics token)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    with urllib.request.urlopen(request, timeout=WAIT_S) as answer:
        return len(answer.read())
