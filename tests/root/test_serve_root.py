"""`fcrun serve` end to end: a real server process, real Apache/PHP containers, real HTTP."""

from __future__ import annotations

import concurrent.futures
import os
import time

import pytest
from serving import serving, warming_site

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def server(tmp_path, apache_php):
    # No pool here (these tests count containers and starts); test_pool_root.py covers it.
    with serving(tmp_path, apache_php, "[forkserver]\npool_size = 0\n") as srv:
        site = tmp_path / "site"
        site.mkdir()
        (site / "index.php").write_text("<?php echo 'site says hi from ', gethostname();")
        srv.site = str(site)
        yield srv


def test_cold_app_serves_phpinfo_and_later_requests_are_hot(server):
    server.cli("app", "add", "php.test", "--image", "apache-php", "--cpu", "0.5", "--memory", "256M")
    server.start()
    status, headers, body = server.request("php.test")
    assert status == 200
    assert "PHP Version 8." in body
    assert float(headers["X-Fcrun-Cold-Start"]) > 0 and headers["X-Fcrun-Cold-Start-Path"] == "start"
    assert "fcrun" in headers.get("Via", "")
    status, headers, _ = server.request("php.test")
    assert status == 200 and "X-Fcrun-Cold-Start" not in headers
    assert len(server.events("start")) == 1
    [row] = server.cli("ps").stdout.splitlines()[1:]  # the instance is an fcrun container of its app
    assert row.split()[1] == "running" and row.split()[-1] == "php.test"


def test_fifty_concurrent_requests_to_a_cold_app_cause_one_start(server):
    server.cli("app", "add", "site.test", "--alias", "www.site.test", "--image", "apache-php", "--docroot", server.site)
    server.start()
    hosts = ["site.test", "www.site.test:8080", "SITE.test"] * 17
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda h: server.request(h), hosts[:50]))
    assert [r[0] for r in results] == [200] * 50
    assert all(r[2].startswith("site says hi from site.test-") for r in results)
    assert len(server.events("start")) == 1
    assert len(server.containers()) == 1


def test_idle_instance_stops_and_the_next_request_starts_it_again(server):
    server.cli("app", "add", "idle.test", "--image", "apache-php", "--docroot", server.site, "--idle-timeout", "1s")
    server.start()
    assert server.request("idle.test")[0] == 200
    deadline = time.monotonic() + 10
    while server.containers():
        assert time.monotonic() < deadline, "the idle instance was not stopped"
        time.sleep(0.1)
    assert len(server.events("stop")) == 1
    status, headers, _ = server.request("idle.test")
    assert status == 200 and "X-Fcrun-Cold-Start" in headers
    assert len(server.events("start")) == 2


def test_protocol_errors(server):
    server.cli("app", "add", "php.test", "--image", "apache-php")
    server.start()
    status, _, body = server.request("unknown.test")
    assert status == 404 and "unknown.test" in body
    assert server.raw(b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    big = b"GET / HTTP/1.1\r\nHost: php.test\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
    assert server.raw(big).startswith(b"HTTP/1.1 431")
    assert server.containers() == []  # none of these started anything


def test_a_start_that_never_becomes_ready_is_504(server, tmp_path):
    server.config.write_text(server.config.read_text().replace("hold_timeout_s = 10", "hold_timeout_s = 2"))
    server.cli("app", "add", "deaf.test", "--image", "apache-php", "--port", "81")  # Apache listens on 80
    server.start()
    status, _, body = server.request("deaf.test")
    assert status == 504, body
    assert server.request("gone.test")[0] == 404


def test_a_ready_path_holds_the_first_request_until_it_answers_2xx(server, tmp_path):
    """/healthz.php answers 503 three times, then 200: the first request is routed only then."""
    site = warming_site(tmp_path / "warming", warming=3)
    server.cli("app", "add", "warm.test", "--image", "apache-php", "--docroot", site, "--ready-path", "/healthz.php")
    server.start()
    status, headers, body = server.request("warm.test")
    assert status == 200 and headers["X-Fcrun-Cold-Start-Path"] == "start", body
    assert body == "probed 4 times, as warm.test"  # 3 x 503, then the 200 that made it ready; Host: the app's
    assert server.request("warm.test")[2] == "probed 4 times, as warm.test"  # hot: no probe more


def test_missing_image_is_502_naming_the_reason(server):
    server.cli("app", "add", "broken.test", "--image", "no-such-image")
    server.start()
    status, _, body = server.request("broken.test")
    assert status == 502 and "no-such-image" in body
    assert len(server.events("start-failed")) == 1


def test_app_rm_under_load_loses_no_in_flight_request(server):
    with open(os.path.join(server.site, "slow.php"), "w") as f:
        f.write("<?php usleep(200000); echo 'done';")
    server.cli("app", "add", "load.test", "--image", "apache-php", "--docroot", server.site)
    server.start()
    assert server.request("load.test")[0] == 200

    def worker(_):
        statuses = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            status, _, body = server.request("load.test", "/slow.php")
            statuses.append(status)
            if status == 404:
                break
            assert body == "done"
        return statuses

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(worker, i) for i in range(8)]
        time.sleep(0.5)
        server.cli("app", "rm", "load.test")
        statuses = [s for f in futures for s in f.result()]
    # Before the removal every request was served; after it, the host is unknown. Nothing else.
    assert set(statuses) <= {200, 404}, statuses
    assert statuses.count(200) >= 8
    assert server.containers() == []


def test_events_older_than_the_kept_days_are_removed_once_serve_starts(server):
    """[cmdb] events_keep_days (default 30): serve/retention.py's first round runs at start."""
    import sqlite3

    from fcrun.cmdb import open_cmdb
    from fcrun.paths import Paths

    with open_cmdb(Paths(data_root=server.data_root, run_root=server.run_root), None) as db:
        old = db.add_event("a.test", "test", "forty days old")
        recent = db.add_event("a.test", "test", "twenty days old")
    raw = sqlite3.connect(os.path.join(server.data_root, "cmdb.sqlite3"), isolation_level=None)
    try:
        raw.execute("UPDATE events SET ts = ts - ? WHERE id = ?", (40 * 86400, old.id))
        raw.execute("UPDATE events SET ts = ts - ? WHERE id = ?", (20 * 86400, recent.id))
        server.start()
        deadline = time.monotonic() + 20
        while raw.execute("SELECT count(*) FROM events WHERE id = ?", (old.id,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the 40-day-old event was not removed"
            time.sleep(0.1)
        assert raw.execute("SELECT message FROM events WHERE id = ?", (recent.id,)).fetchall() == [("twenty days old",)]
    finally:
        raw.close()
