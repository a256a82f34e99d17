"""`fcrun serve` on a PostgreSQL CMDB (a real server the fixtures start, tests/pgserver.py): apps
another writer adds are served without a reload, and a server stopped with ``pg_ctl stop -m
immediate`` under load stops no warm request (a cold start is refused meanwhile, naming the
CMDB); what serve recorded meanwhile is written once the server is back, and the outage is an
event. Two serves sharing it never run more than an app's max instances together."""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import threading
import time

import pytest
from hostcheck import BRIDGE, CGROUP_PARENT
from serving import Server, serving

from fcrun.cmdb import App
from fcrun.cmdb.postgres import PostgresCMDB

from pgserver import pg_server, pg_url  # noqa: F401 - fixtures

pytestmark = [pytest.mark.root, pytest.mark.slow]

DEADLINE_S = 20.0  # only against hanging


@pytest.fixture
def server(tmp_path, apache_php, pg_url):
    with serving(tmp_path, apache_php, f'[forkserver]\npool_size = 0\n[cmdb]\nurl = "{pg_url}"\n') as srv:
        site = tmp_path / "site"
        site.mkdir()
        (site / "index.php").write_text("<?php echo 'site says hi from ', gethostname();")
        srv.site = str(site)
        srv.pg_url = pg_url
        yield srv


def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_an_app_another_writer_adds_is_served_without_a_reload(server):
    server.start()
    assert server.request("late.test")[0] == 404
    # As another host's serve or `fcrun app` would: straight into the shared database.
    with PostgresCMDB(server.pg_url) as other:
        other.add_app(App(name="late.test", image="apache-php", docroot=server.site))
    _until(lambda: server.request("late.test")[0] != 404, "serve did not hear of the new app")
    status, _, body = server.request("late.test")
    assert status == 200 and body.startswith("site says hi from late.test-")
    assert len(server.events("start")) == 1  # recorded in PostgreSQL, read back by `fcrun events`


def test_warm_traffic_goes_on_while_postgresql_is_down_and_nothing_recorded_is_lost(server, pg_server):
    server.cli("app", "add", "warm.test", "--image", "apache-php", "--docroot", server.site)
    server.cli("app", "add", "cold.test", "--image", "apache-php", "--docroot", server.site)
    server.start()
    assert server.request("warm.test")[0] == 200  # its instance starts: warm from now on
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            statuses.append(server.request("warm.test", timeout=10)[0])

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(0.3)
        pg_server.kill()
        try:
            time.sleep(1.0)
            # A cold start must claim its share of the app's max in the shared CMDB first:
            # refused clearly, naming the CMDB, while warm traffic goes on.
            status, _, body = server.request("cold.test")
            assert status == 503 and "the CMDB cannot record it" in body and "postgresql://" in body
            time.sleep(0.5)
        finally:
            pg_server.restart_stopped()
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join()
    assert len(statuses) > 10 and set(statuses) == {200}, statuses
    _until(lambda: server.events("cmdb-reconnected"), "the outage was not recorded as an event")
    # Once it is back, cold starts claim and record again; the refusal during it was recorded too.
    assert server.request("cold.test")[0] == 200
    _until(lambda: len(server.events("start")) == 2, "the cold start after the outage was not recorded")
    assert len(server.events("start-failed")) == 1
    with PostgresCMDB(server.pg_url) as db:
        assert {i.app for i in db.list_instances()} == {"warm.test", "cold.test"}


@contextlib.contextmanager
def _second_serve(tmp_path, apache_php, config: str, docroot_root: str):
    """Another serve on the same host: its own roots, cgroup parent, bridge and subnet."""
    srv = Server(tmp_path, apache_php, config, cgroup_parent=CGROUP_PARENT + "-b", bridge=BRIDGE[:13] + "b",
                 subnet="10.234.1.0/24", docroot_root=docroot_root)
    try:
        yield srv
    finally:
        srv.stop()
        leftover = srv.reap_leftovers()
    assert srv.proc is None or srv.proc.returncode == 0, srv.read_log()
    assert leftover == [], f"serve left instances behind: {leftover}"


def test_two_serves_on_one_postgresql_never_run_more_than_an_app_s_max_in_a_cold_wave(tmp_path, apache_php, pg_url):
    """200 concurrent cold requests, half to each serve: every one is answered 200, and the
    instances of both together never exceed the app's max (each serve claims a share in the
    CMDB before it starts one; a scale-out past the max is refused there)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.php").write_text("<?php usleep(20000); echo 'hi from ', gethostname();")
    config = f'[forkserver]\npool_size = 0\n[cmdb]\nurl = "{pg_url}"\n'
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # a's `serving` checks the host after both: b's cgroup parent and bridge are named from a's.
    with serving(tmp_path / "a", apache_php, config, docroot_root=str(tmp_path)) as a, \
            _second_serve(tmp_path / "b", apache_php, config, str(tmp_path)) as b:
        with PostgresCMDB(pg_url) as db:
            db.add_app(App(name="wave.test", image="apache-php", docroot=str(site), max_instances=2,
                           target_concurrency=1, cooldown_up_s=0.0))
        a.start()
        b.start()
        peak = 0
        done = threading.Event()

        def count() -> int:
            return sum(len(os.listdir(os.path.join(s.run_root, "containers"))) for s in (a, b)
                       if os.path.isdir(os.path.join(s.run_root, "containers")))

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, count())
                time.sleep(0.005)

        statuses: list[int] = []
        go = threading.Barrier(200)

        def one(srv) -> None:
            go.wait()
            try:
                statuses.append(srv.request("wave.test", timeout=30)[0])
            except OSError as exc:
                statuses.append(repr(exc))

        watcher = threading.Thread(target=watch)
        watcher.start()
        clients = [threading.Thread(target=one, args=(a if i % 2 else b,)) for i in range(200)]
        try:
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            for _ in range(20):  # and while the load it saw settles into scale-out decisions
                a.request("wave.test")
                b.request("wave.test")
        finally:
            done.set()
            watcher.join()
        assert statuses == [200] * 200, collections.Counter(statuses)
        assert peak == 2 and count() == 2  # one each: neither could claim a third (4 without claims)
        with PostgresCMDB(pg_url) as db:
            rows = db.list_instances("wave.test")
        assert sorted(r.owner for r in rows) == sorted(f"{socket.gethostname()}:{s.run_root}" for s in (a, b))
        assert all("~claim-" not in r.id for r in rows)  # no claim row outlives its start
