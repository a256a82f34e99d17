"""The dashboard's sampler (dashboard.py: percentiles from histogram deltas, rates, marks, the
table's search, sort and paging) driven step by step on a fake clock, and its routes on a real
admin server (dashboard_page.py, admin_server.py): the page, its data, and the metrics
listener's authorization (bearer, and Basic for a browser). The page in a real browser:
tests/root/test_dashboard_root.py."""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import tomllib
from pathlib import Path

import pytest

from fcrun.cmdb import NewApp, SqliteCMDB
from fcrun.cmdb.models import AppStats, InstanceCounts
from fcrun.errors import SpecError
from fcrun.serve.admin_client import AdminClient
from fcrun.serve.admin_server import serve_in_thread
from fcrun.serve.controller import DirectController
from fcrun.serve.dashboard import (MARK_FREEZE, MARK_POOL, MARK_SCALE_IN, MARK_SCALE_OUT, MARK_SCALE_UP, MARK_START,
                                   WINDOW_SAMPLES, Sampler, cpu_quotas, histogram_quantile)
from fcrun.serve.dashboard_page import Dashboard, basic_password, page_bytes, sort_key
from fcrun.serve.metering import COLD_START_BOUNDS_S, REQUEST_BOUNDS_S, DurationHistogram

ROOT = Path(__file__).resolve().parents[2]
METRICS_TOKEN = "scrape-only"
TOKEN = "admin-s3cret"
WAIT_S = 20.0


# -- percentiles ----------------------------------------------------------------------------------


def test_a_quantile_is_interpolated_within_its_bucket_as_prometheus_does():
    bounds = [0.001, 0.002, 0.004]
    # 10 observations in (0.001, 0.002]: the median is half-way through that bucket.
    assert histogram_quantile(0.5, bounds, [0, 10, 10, 10]) == pytest.approx(0.0015)
    # 100 observations: 90 <= 1 ms, 10 in (2 ms, 4 ms]: p99 is 90% into the last finite bucket.
    assert histogram_quantile(0.99, bounds, [90, 90, 100, 100]) == pytest.approx(0.002 + 0.002 * 0.9)
    assert histogram_quantile(0.5, bounds, [5, 10, 10, 10]) == pytest.approx(0.001)  # first bucket: from 0
    assert histogram_quantile(0.99, bounds, [0, 0, 0, 7]) == 0.004  # above every bound: the highest bound
    assert math.isnan(histogram_quantile(0.5, bounds, [0, 0, 0, 0]))


# -- the sampler on a fake clock ---------------------------------------------------------------------


class FakeServe:
    """What the sampler reads of serve: apps' cumulative stats and quotas, changed by the test."""

    def __init__(self, names):
        self.hist = {n: DurationHistogram(REQUEST_BOUNDS_S) for n in names}
        self.stats_of = {n: AppStats() for n in names}
        self.quota = {n: 0.0 for n in names}
        self.now = 1000.0

    def serve(self, name, n, seconds, status=200):
        for _ in range(n):
            self.hist[name].observe(seconds)
        s = self.stats_of[name]
        key = f"{status // 100}xx"
        s.status = {**s.status, key: s.status.get(key, 0) + n}

    def stats(self):
        out = {}
        for name, s in self.stats_of.items():
            snap = self.hist[name].snapshot()
            out[name] = AppStats(requests=snap.count, status=dict(s.status), instances=s.instances,
                                 cold_paths=dict(s.cold_paths), freezes=s.freezes, request_duration=snap,
                                 cold_start_duration=dict(s.cold_start_duration))
        return out

    def quotas(self):
        return dict(self.quota)

    def clock(self):
        return self.now


def in_bucket(figure, above, up_to):
    """Whether a figure (computed from synthetic histograms, not measured) lies in (above, up_to]."""
    return above < figure <= up_to


def sampler_for(fake):
    return Sampler(fake.stats, fake.quotas, clock=fake.clock)


def step(fake, sampler, seconds=1.0):
    fake.now += seconds
    sampler.sample()


def test_each_second_has_its_rate_and_percentiles_from_the_histograms_deltas():
    fake = FakeServe(["a.test"])
    sampler = sampler_for(fake)
    sampler.sample()  # the first sample: nothing to take a delta from
    fake.serve("a.test", 100, 0.003)
    step(fake, sampler)
    fake.serve("a.test", 50, 0.2, status=503)  # the next second is slow and failing
    step(fake, sampler)
    step(fake, sampler)  # an idle second
    series = sampler.series("a.test")
    assert series["rps"] == [0.0, 100.0, 50.0, 0.0]
    assert series["errors_per_s"] == [0.0, 0.0, 50.0, 0.0]
    assert series["p50_ms"][0] is None and series["p50_ms"][3] is None  # no request: no percentile
    # Each second's percentiles are of its own requests only (the bucket bounds around them, in ms).
    assert in_bucket(series["p50_ms"][1], 2.5, 5.0) and in_bucket(series["p99_ms"][1], 2.5, 5.0)
    assert in_bucket(series["p50_ms"][2], 100, 250)
    assert series["t"] == [1000.0, 1001.0, 1002.0, 1003.0]
    # Only what is new since the page's last tick.
    assert sampler.series("a.test", since_tick=2)["rps"] == [0.0]
    assert sampler.series("nope.test") is None


def test_marks_say_what_happened_in_a_second():
    fake = FakeServe(["a.test"])
    sampler = sampler_for(fake)
    app = fake.stats_of["a.test"]
    sampler.sample()
    app.cold_paths, app.instances = {"start": 1}, InstanceCounts(ready=1, total=1)
    fake.quota["a.test"] = 1.0
    step(fake, sampler)  # a cold start by a new instance: start and scale-out, no scale-up (a new instance's quota)
    fake.quota["a.test"] = 2.0
    step(fake, sampler)  # the quota raised on the same instance
    app.freezes, app.instances = 1, InstanceCounts(frozen=1, total=1)
    fake.quota["a.test"] = 0.0
    step(fake, sampler)  # frozen: its quota no longer counts, but that is no scale-down
    app.cold_paths, app.instances = {"start": 1, "pool": 1}, InstanceCounts(ready=1, frozen=1, total=2)
    fake.quota["a.test"] = 1.0
    step(fake, sampler)
    app.instances = InstanceCounts(frozen=1, total=1)
    fake.quota["a.test"] = 0.0
    step(fake, sampler)
    assert sampler.series("a.test")["marks"] == [0, MARK_START | MARK_SCALE_OUT, MARK_SCALE_UP, MARK_FREEZE,
                                                 MARK_POOL | MARK_SCALE_OUT, MARK_SCALE_IN]
    assert sampler.series("a.test")["cpu"] == [0.0, 1.0, 2.0, 0.0, 1.0, 0.0]


def test_a_row_has_its_cold_starts_by_path_and_their_median_wait():
    fake = FakeServe(["a.test"])
    sampler = sampler_for(fake)
    waits = DurationHistogram(COLD_START_BOUNDS_S)
    for _ in range(4):
        waits.observe(0.0018)  # in (1 ms, 2 ms]
    app = fake.stats_of["a.test"]
    app.cold_paths, app.cold_start_duration = {"thaw": 4, "pool": 0}, {"thaw": waits.snapshot()}
    sampler.sample()
    (row,) = sampler.table()["rows"]
    assert row["cold"] == {"thaw": 4, "pool": 0} and list(row["cold_p50_ms"]) == ["thaw"]
    assert in_bucket(row["cold_p50_ms"]["thaw"], 1.0, 2.0)


def test_the_series_keeps_the_last_five_minutes_and_forgets_removed_apps():
    fake = FakeServe(["a.test", "b.test"])
    sampler = sampler_for(fake)
    for i in range(WINDOW_SAMPLES + 20):
        fake.serve("a.test", i, 0.001)
        step(fake, sampler)
    series = sampler.series("a.test")
    assert len(series["t"]) == WINDOW_SAMPLES and series["from_tick"] == 20
    assert series["rps"][-1] == WINDOW_SAMPLES + 19  # the newest sample last
    del fake.stats_of["b.test"]
    step(fake, sampler)
    assert sampler.series("b.test") is None and sampler.table()["total"] == 1


def test_the_table_with_1000_apps_sends_one_page_searched_and_sorted():
    names = [f"app-{i}.test" for i in range(1000)]
    fake = FakeServe(names)
    sampler = sampler_for(fake)
    sampler.sample()
    for i in (7, 999, 500):
        fake.serve(f"app-{i}.test", 10 * (i + 1), 0.002)
    fake.serve("app-999.test", 30, 0.002, status=500)
    step(fake, sampler)
    page = sampler.table(limit=50)
    assert page["total"] == page["matched"] == 1000 and len(page["rows"]) == 50
    assert [r["name"] for r in page["rows"][:3]] == ["app-999.test", "app-500.test", "app-7.test"]  # by rate
    top = page["rows"][0]
    assert top["rps"] == 10030.0 and top["errors_per_s"] == 30.0 and in_bucket(top["p50_ms"], 1.0, 2.5)
    found = sampler.table(search="APP-999")
    assert [r["name"] for r in found["rows"]] == ["app-999.test"] and found["matched"] == 1
    assert [r["name"] for r in sampler.table(search="99", sort="name", limit=3)["rows"]] == [
        "app-199.test", "app-299.test", "app-399.test"]
    assert sampler.table(sort="errors", limit=1)["rows"][0]["name"] == "app-999.test"
    last = sampler.table(sort="name", offset=990, limit=50)
    assert len(last["rows"]) == 10 and last["offset"] == 990


def test_the_cpu_quota_of_an_app_counts_its_unfrozen_instances():
    from types import SimpleNamespace as NS

    from fcrun.serve.instances import DRAINING, FROZEN, READY

    apps = {"a.test": NS(instances={"i1": NS(cpu=2.0, state=READY), "i2": NS(cpu=1.0, state=FROZEN),
                                    "i3": NS(cpu=0.5, state=DRAINING)}),
            "b.test": NS(instances={})}
    assert cpu_quotas(apps) == {"a.test": 2.5, "b.test": 0.0}


def test_a_sort_key_is_checked():
    assert sort_key(None) == "rate" and sort_key("name") == "name"
    with pytest.raises(SpecError, match="sort='bogus' must be one of rate, name"):
        sort_key("bogus")


def test_the_page_is_package_data_and_needs_no_build():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dashboard.html" in config["tool"]["setuptools"]["package-data"]["fcrun.serve"]
    page = page_bytes().decode()
    assert page.startswith("<!doctype html>") and "<script>" in page and "src=" not in page  # nothing to fetch


def test_basic_credentials_give_their_password():
    assert basic_password(base64.b64encode(b"anyone:se:cret").decode()) == b"se:cret"
    assert basic_password("not base64!") == b""


# -- the routes on a real admin server ------------------------------------------------------------------


@pytest.fixture
def cmdb(tmp_path):
    db = SqliteCMDB(str(tmp_path / "cmdb.sqlite3"))
    yield db
    db.close()


def request(address, path, headers=None, method="GET"):
    """(status, headers, body) of one request on a fresh connection."""
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(address, timeout=WAIT_S) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), found, body


@pytest.fixture
def dashboard_server(cmdb, short_dir):
    controller = DirectController(cmdb)
    fake = FakeServe([])
    sampler = sampler_for(fake)

    async def pool():
        return {"images": {"apache-php": {"size": 2, "ready": 1, "warming": 1, "claimed": 0}}}

    dashboard = Dashboard(sampler, controller.events, pool)
    with serve_in_thread(controller, os.path.join(short_dir, "admin.sock"), tcp_listen="127.0.0.1:0", token=TOKEN,
                         metrics_listen="127.0.0.1:0", metrics_token=METRICS_TOKEN, dashboard=dashboard) as server:
        AdminClient(server.socket_path).add_app(NewApp(name="a.test", image="x"))
        cmdb.add_event(None, "criu", "checkpoint/restore unavailable")  # one of serve's own
        fake.stats_of = {"a.test": AppStats()}
        fake.hist = {"a.test": DurationHistogram(REQUEST_BOUNDS_S)}
        fake.quota = {"a.test": 1.0}
        sampler.sample()
        fake.serve("a.test", 20, 0.004)
        step(fake, sampler)
        yield server


def test_the_metrics_listener_serves_the_dashboard_with_the_metrics_token(dashboard_server):
    metrics = dashboard_server.listener("metrics").bound_address
    status, headers, body = request(metrics, "/dashboard", {"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert status == 200 and headers["content-type"].startswith("text/html") and body == page_bytes()
    assert "script-src 'unsafe-inline'" in headers["content-security-policy"]
    # A browser is asked for Basic credentials: the token is the password.
    status, headers, _ = request(metrics, "/dashboard")
    assert status == 401 and headers["www-authenticate"].startswith("Basic ")
    basic = "Basic " + base64.b64encode(f"ops:{METRICS_TOKEN}".encode()).decode()
    status, _, body = request(metrics, "/dashboard/data?app=a.test", {"Authorization": basic})
    assert status == 200
    data = json.loads(body)
    assert data["apps"]["rows"][0]["name"] == "a.test" and data["apps"]["rows"][0]["rps"] == 20.0
    assert data["series"]["rps"] == [0.0, 20.0] and data["series"]["cpu"] == [1.0, 1.0]
    assert [e["kind"] for e in data["events"]] == ["app-added"]  # the selected app's
    status, _, body = request(metrics, "/dashboard/data?app=a.test&events=all", {"Authorization": basic})
    assert [e["kind"] for e in json.loads(body)["events"]] == ["app-added", "criu"]  # serve's own too
    assert data["pool"]["images"]["apache-php"]["ready"] == 1
    wrong = "Basic " + base64.b64encode(b"ops:wrong").decode()
    for auth in (wrong, f"Bearer {TOKEN}", "Basic %%%"):  # a wrong password, the admin token, garbage
        assert request(metrics, "/dashboard/data", {"Authorization": auth})[0] == 401
    # Basic is for the dashboard's GETs only; the rest of the listener is as before.
    assert request(metrics, "/metrics", {"Authorization": basic})[0] == 401
    assert request(metrics, "/dashboard", {"Authorization": f"Bearer {METRICS_TOKEN}"}, "POST")[0] == 405
    assert request(metrics, "/apps", {"Authorization": f"Bearer {METRICS_TOKEN}"})[0] == 404


def test_the_admin_listener_serves_the_dashboard_with_the_admin_token_and_checks_queries(dashboard_server):
    admin = dashboard_server.tcp_address
    assert request(admin, "/dashboard")[0] == 401
    basic = "Basic " + base64.b64encode(f":{TOKEN}".encode()).decode()
    assert request(admin, "/dashboard", {"Authorization": basic})[0] == 200
    # Basic never authorizes a change.
    assert request(admin, "/apps/a.test", {"Authorization": basic}, "DELETE")[0] == 401
    status, _, body = request(admin, "/dashboard/data?q=nothing&since=0", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(body)["apps"]["matched"] == 0
    for query, where in (("sort=bogus", "sort"), ("limit=0", "limit"), ("since=-3", "since")):
        status, _, body = request(admin, f"/dashboard/data?{query}", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 400 and json.loads(body)["where"] == where, body


def test_without_a_dashboard_its_routes_are_404(cmdb, short_dir):
    with serve_in_thread(DirectController(cmdb), os.path.join(short_dir, "admin.sock"),
                         metrics_listen="127.0.0.1:0") as server:
        status, _, body = request(server.listener("metrics").bound_address, "/dashboard")
        assert status == 404 and b"runs within fcrun serve" in body


def test_the_sampler_samples_once_a_second_only_while_a_page_polls(monkeypatch):
    import asyncio

    from fcrun.serve import dashboard

    monkeypatch.setattr(dashboard, "IDLE_INTERVAL_S", 3600.0)  # idle: no second sample within the test
    fake = FakeServe(["a.test"])
    sampler = sampler_for(fake)
    assert not sampler.is_watched()

    async def scenario():
        runner = asyncio.create_task(sampler.run())
        try:
            while sampler.tick < 0:
                await asyncio.sleep(0)
            for _ in range(100):  # idle: it waits (an hour, here)
                await asyncio.sleep(0)
            assert sampler.tick == 0
            sampler.watched()  # a page polls: it samples at once, then once a second
            while sampler.tick < 1:
                await asyncio.sleep(0.01)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), WAIT_S))
    assert sampler.is_watched()
    fake.now += dashboard.WATCHED_FOR_S
    assert not sampler.is_watched()  # a minute after the last poll: idle again


def test_the_tables_window_is_the_last_ten_seconds_or_the_last_two_sparse_samples():
    fake = FakeServe(["a.test"])
    sampler = sampler_for(fake)
    sampler.sample()
    fake.serve("a.test", 1000, 0.001)
    step(fake, sampler, 10.0)  # sparse: nobody watched
    assert sampler.table()["rows"][0]["rps"] == 100.0  # between the two samples there are
    for _ in range(10):  # a page polls: one a second, 10 requests each
        fake.serve("a.test", 10, 0.001)
        step(fake, sampler)
    assert sampler.table()["rows"][0]["rps"] == 10.0  # the last ten seconds only


def test_the_pool_is_asked_once_every_two_seconds_whoever_polls():
    import asyncio

    fake = FakeServe(["a.test"])
    asked = []

    async def pool():
        asked.append(fake.now)
        return {"images": {"apache-php": {"size": 2, "ready": len(asked), "warming": 0, "claimed": 0}}}

    async def no_events(app, since, limit):
        return []

    dashboard = Dashboard(sampler_for(fake), no_events, pool, clock=fake.clock)

    async def polls():
        first = await dashboard.data()
        again = await dashboard.data()  # another page, at once: the same figures
        fake.now += 2.0
        later = await dashboard.data()
        return first, again, later

    first, again, later = asyncio.run(polls())
    assert len(asked) == 2 and first["pool"] == again["pool"]
    assert later["pool"]["images"]["apache-php"]["ready"] == 2
