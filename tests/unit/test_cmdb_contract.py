"""The CMDB protocol's contract, run against both backends with no mocks: SQLite in a temporary
file, and a real PostgreSQL server that the fixtures start (tests/pgserver.py: initdb and
pg_ctl in a temporary directory, a unix socket only) with a new schema per test.

What is SQLite's own (WAL, fsync, full disk, damaged pages) stays in test_cmdb.py.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import msgspec
import pytest

from fcrun.cmdb import App, AppUpdate, CMDBError, Dump, Instance, open_cmdb
from fcrun.cmdb.migrations import LATEST_VERSION
from fcrun.errors import AlreadyExists, NotFound, SpecError
from fcrun.paths import Paths

from pgserver import pg_server, pg_url  # noqa: F401 - fixtures

TABLES = ("schema_version", "apps", "app_hostnames", "instances", "events", "nodes", "placements")


class Backend:
    """One backend's database for one test: open CMDBs on it, and read or write it raw (behind
    the CMDB's back, as another program, disk corruption or an operator would)."""

    def __init__(self, kind: str, url: str, tmp_path):
        self.kind = kind
        self.url = url
        self.paths = Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path / "run"))

    def open(self):
        return open_cmdb(self.paths, self.url)

    def _connect(self):
        if self.kind == "sqlite":
            return sqlite3.connect(self.url.removeprefix("sqlite://"), isolation_level=None)
        import psycopg

        return psycopg.connect(self.url, autocommit=True)

    def raw(self, sql: str, *args) -> list[tuple]:
        conn = self._connect()
        try:
            if self.kind == "postgresql":
                sql = sql.replace("?", "%s")
            cur = conn.execute(sql, args)
            return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def snapshot(self) -> list[list[tuple]]:
        """Every row of every table, by a separate connection."""
        return [self.raw(f"SELECT * FROM {table} ORDER BY 1") for table in TABLES]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite://{tmp_path}/data/cmdb.sqlite3", tmp_path)
    return Backend("postgresql", request.getfixturevalue("pg_url"), tmp_path)


@pytest.fixture
def db(backend):
    cmdb = backend.open()
    yield cmdb
    cmdb.close()


def test_add_get_list_update_remove(db):
    added = db.add_app(App(name="Example.TEST.", image="apache-php:latest", hostnames=["WWW.example.test"],
                           env=["A=1"], cpu=0.3, memory_bytes=256 << 20))
    assert (added.name, added.hostnames, added.image) == ("example.test", ["www.example.test"], "apache-php")
    assert added.generation == 1 and added.created_at > 0 and added.updated_at == added.created_at
    assert db.get_app("example.test") == added
    assert db.list_apps() == [added]

    updated = db.update_app("example.test", AppUpdate(cpu=0.6, max_lifetime_s=3600, port=8080, autoscale=False))
    assert (updated.cpu, updated.max_lifetime_s, updated.port, updated.autoscale) == (0.6, 3600, 8080, False)
    assert updated.generation == 2 and updated.env == ["A=1"]
    assert db.get_app("example.test") == updated

    cleared = db.update_app("example.test", AppUpdate(max_lifetime_s=None, port=None))
    assert cleared.max_lifetime_s is None and cleared.port is None and cleared.generation == 3
    assert db.remove_app("example.test") == cleared
    assert db.list_apps() == []
    with pytest.raises(NotFound, match="example.test"):
        db.get_app("example.test")


def test_every_field_survives_the_round_trip(db):
    app = App(name="full.test", image="apache-php", hostnames=["b.full.test", "a.full.test"],
              env=["K=v=w", "UNICODE=é€"], cpu=0.25, cpu_max=1.5, memory_bytes=300 << 20, min_instances=1,
              max_instances=7, target_concurrency=3, idle_timeout_s=12.5, freeze_after_s=None,
              max_lifetime_s=3600.0, cooldown_up_s=1.0, cooldown_down_s=2.0, max_body_bytes=0, port=8080,
              autoscale=False, pids_max=64, seccomp="unconfined", ready_path="/healthz?full=1&x=%20",
              created_at=1234.5678, updated_at=2345.25, generation=9)
    assert db.add_app(app) == app
    assert db.get_app("full.test") == app
    assert db.app_for_host("a.full.test") == app


def test_list_apps_orders_by_name_and_keeps_alias_order(db):
    db.add_app(App(name="b.test", image="x", hostnames=["z.test", "y.test"]))
    db.add_app(App(name="a.test", image="x"))
    apps = db.list_apps()
    assert [a.name for a in apps] == ["a.test", "b.test"]
    assert apps[1].all_hostnames == ["b.test", "z.test", "y.test"]


@pytest.mark.parametrize("name", ["nope.test", "a\0b"])  # a NUL: PostgreSQL's text cannot hold one (was a 503)
def test_missing_apps_are_not_found(db, name):
    with pytest.raises(NotFound):
        db.get_app(name)
    with pytest.raises(NotFound):
        db.update_app(name, AppUpdate(cpu=0.5))
    with pytest.raises(NotFound):
        db.remove_app(name)
    assert db.list_instances(name) == [] and db.list_events(name) == []


@pytest.mark.parametrize("host", ["a.test", "A.Test", "a.test.", "a.test:8080", "www.a.test", " WWW.A.TEST.:80 "])
def test_an_app_is_found_by_its_host_as_a_client_writes_it(db, host):
    db.add_app(App(name="a.test", image="x", hostnames=["www.a.test"]))
    assert db.app_for_host(host).name == "a.test"
    assert db.app_for_host("b.test") is None and db.app_for_host("a.test:http") is None


def test_a_hostname_belongs_to_one_app_and_conflicts_write_nothing(db, backend):
    db.add_app(App(name="a.test", image="x", hostnames=["shared.test"]))
    before = backend.snapshot()
    with pytest.raises(AlreadyExists, match=r"hostname 'shared.test' already belongs to app 'a.test'"):
        db.add_app(App(name="b.test", image="x", hostnames=["other.test", "shared.test"]))
    with pytest.raises(AlreadyExists, match=r"'shared.test' already belongs to app 'a.test'"):
        db.add_app(App(name="SHARED.test", image="x"))
    with pytest.raises(AlreadyExists, match=r"app 'a.test' already exists"):
        db.add_app(App(name="a.test", image="y"))
    assert backend.snapshot() == before

    db.add_app(App(name="b.test", image="x"))
    before = backend.snapshot()
    with pytest.raises(AlreadyExists, match=r"'a.test' already belongs to app 'a.test'"):
        db.update_app("b.test", AppUpdate(hostnames=["a.test"]))
    assert backend.snapshot() == before
    db.remove_app("a.test")  # frees its hostnames
    assert db.update_app("b.test", AppUpdate(hostnames=["shared.test"])).hostnames == ["shared.test"]


@pytest.mark.parametrize("fields,where", [
    ({"hostnames": ["ok.test", "bad host"]}, "hostnames[1]"),
    ({"env": ["A=1", "NOEQUALS"]}, "env[1]"),
    ({"docroot": "/nonexistent/fcrun-docroot"}, "docroot"),
    ({"cpu": 0.5, "cpu_max": 0.2}, "cpu_max"),
    ({"min_instances": 3, "max_instances": 2}, "min_instances"),
    ({"port": 65536}, "port"),
    ({"ready_path": "healthz"}, "ready_path"),  # no leading /
    ({"ready_path": "/health z"}, "ready_path"),
    ({"ready_path": "/health\r\nX-Injected: 1"}, "ready_path"),
    ({"ready_path": "/é"}, "ready_path"),
    # Past what the columns hold (INTEGER, BIGINT): refused by the check, not by the database
    # (SQLite raised OverflowError, a 500; PostgreSQL "integer out of range", a 503).
    ({"max_instances": 2**31}, "max_instances"),
    ({"target_concurrency": 2**31}, "target_concurrency"),
    ({"min_instances": 2**31}, "min_instances"),
    ({"memory_bytes": 2**63}, "memory_bytes"),
    ({"max_body_bytes": 2**63}, "max_body_bytes"),
    # An environment no exec can take: a NUL (in the value or the key), an entry over the
    # kernel's MAX_ARG_STRLEN. Every cold start of the app would fail.
    ({"env": ["A=1", "B=x\0y"]}, "env[1]"),
    ({"env": ["A\0B=1"]}, "env[0]"),
    ({"env": ["BIG=" + "x" * (32 * 4096)]}, "env[0]"),
])
def test_invalid_settings_name_the_field_and_write_nothing(db, backend, fields, where):
    db.add_app(App(name="existing.test", image="x"))
    before = backend.snapshot()
    with pytest.raises(SpecError) as info:
        db.add_app(App(**{"name": "new.test", "image": "x", **fields}))
    assert info.value.where == where
    with pytest.raises(SpecError) as info:
        db.update_app("existing.test", AppUpdate(**fields))
    assert info.value.where == where
    assert backend.snapshot() == before


def test_a_ready_path_is_set_changed_and_cleared(db):
    assert db.add_app(App(name="r.test", image="x")).ready_path is None  # accepting connections is enough
    assert db.update_app("r.test", AppUpdate(ready_path="/healthz")).ready_path == "/healthz"
    assert db.get_app("r.test").ready_path == "/healthz"
    assert db.update_app("r.test", AppUpdate(cpu=0.5)).ready_path == "/healthz"  # other updates keep it
    assert db.update_app("r.test", AppUpdate(ready_path=None)).ready_path is None
    assert db.get_app("r.test").ready_path is None


def test_instances_upsert_list_remove(db):
    first = Instance(id="web-1", app="a.test", container="web-1", state="starting", ip="10.88.0.2", port=80,
                     started_at=100.0)
    db.upsert_instance(first)
    db.upsert_instance(Instance(id="other-1", app="b.test", container="other-1", state="ready", started_at=50.0))
    ready = msgspec.structs.replace(first, state="ready", requests=7, last_request_at=120.0, cpu=0.6)
    db.upsert_instance(ready)
    assert db.list_instances("a.test") == [ready]
    assert [i.id for i in db.list_instances()] == ["web-1", "other-1"]
    assert db.remove_instance("web-1") is True
    assert db.remove_instance("web-1") is False
    assert [i.id for i in db.list_instances()] == ["other-1"]


def test_an_instance_row_keeps_its_owner_and_rows_without_one_read_as_unowned(db):
    """Serves sharing a database tell their rows apart by owner (schema 3); '' is a row from before."""
    db.upsert_instance(Instance(id="a-1", app="a.test", container="a-1", state="ready", owner="host:/run/a"))
    db.upsert_instance(Instance(id="b-1", app="a.test", container="b-1", state="ready"))
    assert {i.id: i.owner for i in db.list_instances()} == {"a-1": "host:/run/a", "b-1": ""}


def test_events_order_limit_since_and_app(db):
    for i in range(6):
        db.add_event("a.test" if i % 2 == 0 else "b.test", "kind", f"message {i}", {"i": i})
    db.add_event(None, "reconcile", "host-wide")
    assert [e.message for e in db.list_events(limit=3)] == ["message 4", "message 5", "host-wide"]
    assert [e.id for e in db.list_events(since_id=2, limit=2)] == [3, 4]
    assert [e.data["i"] for e in db.list_events("a.test")] == [0, 2, 4]
    assert [e.data["i"] for e in db.list_events("a.test", since_id=1)] == [2, 4]
    assert db.list_events(since_id=7) == []
    assert db.list_events()[-1].app is None and db.list_events()[-1].data == {}


def test_old_events_are_trimmed_oldest_first_in_bounded_batches(backend, db):
    for i in range(6):
        db.add_event("a.test", "kind", f"message {i}")
    backend.raw("UPDATE events SET ts = id * 100.0")  # ids 1..6 at 100..600 s
    assert db.trim_events(350.0, limit=2) == 2  # a batch: the two oldest
    assert [e.message for e in db.list_events()] == [f"message {i}" for i in range(2, 6)]
    assert db.trim_events(350.0) == 1  # the last one before the cut
    assert db.trim_events(350.0) == 0
    assert [e.id for e in db.list_events()] == [4, 5, 6]
    assert db.add_event(None, "kind", "after").id == 7  # ids go on growing


def test_migrations_run_once_and_reopening_changes_nothing(backend):
    with backend.open() as first:
        first.add_app(App(name="a.test", image="x"))
    before = backend.snapshot()
    assert backend.raw("SELECT version FROM schema_version") == [(LATEST_VERSION,)]
    with backend.open() as again:
        assert [a.name for a in again.list_apps()] == ["a.test"]
    assert backend.snapshot() == before


def test_a_database_from_a_newer_fcrun_is_refused(backend):
    backend.open().close()
    backend.raw("UPDATE schema_version SET version = 999")
    with pytest.raises(CMDBError, match="schema version 999"):
        backend.open()


def test_a_corrupt_app_row_is_named_and_the_other_apps_keep_working(db, backend, caplog):
    db.add_app(App(name="bad.test", image="x", hostnames=["alias.bad.test"]))
    db.add_app(App(name="good.test", image="x"))
    backend.raw("UPDATE apps SET env = ? WHERE name = 'bad.test'", '["A=1')
    with pytest.raises(CMDBError, match="app 'bad.test' in CMDB .* is corrupt: column env"):
        db.get_app("bad.test")
    assert [a.name for a in db.list_apps()] == ["good.test"]
    assert "it is left out" in caplog.text
    with pytest.raises(CMDBError, match="app 'bad.test'"):
        db.export_dump()  # a dump without it would lose it
    assert db.remove_app("bad.test").name == "bad.test"
    assert db.app_for_host("alias.bad.test") is None


def test_concurrent_adds_of_one_name_or_hostname_let_exactly_one_win(backend):
    """Threads, each with its own CMDB object (its own connection), add apps that collide."""
    backend.open().close()  # migrated before the race
    results: list[object] = []
    start = threading.Barrier(8)

    def add(i: int) -> None:
        with backend.open() as db:
            start.wait()
            try:
                # Even threads race for one name, odd ones for one alias under their own names.
                app = App(name="same.test", image="x") if i % 2 == 0 else \
                    App(name=f"app{i}.test", image="x", hostnames=["taken.test"])
                results.append(db.add_app(app))
            except AlreadyExists as exc:
                results.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    added = [r for r in results if isinstance(r, App)]
    assert len(results) == 8 and len(added) == 2, results
    with backend.open() as db:
        assert sorted(a.name for a in db.list_apps()) == sorted(a.name for a in added)


def test_a_claim_records_an_instance_only_below_the_app_s_max_whoever_owns_the_others(db):
    def row(name, app="a.test", owner="host:/run/a", state="starting"):
        return Instance(id=name, app=app, container=name, state=state, owner=owner)

    db.heartbeat("host:/run/b")  # another serve, alive: its rows count
    assert db.claim_instance(row("a-1"), 2) is True
    assert db.claim_instance(row("b-1", owner="host:/run/b"), 2) is True
    assert db.claim_instance(row("a-2"), 2) is False  # two live rows, one of each serve
    assert db.claim_instance(row("x-1", app="b.test"), 2) is True  # another app's count
    db.upsert_instance(row("b-1", owner="host:/run/b", state="stopped"))  # stopped: no longer counted
    assert db.claim_instance(row("a-2"), 2) is True
    assert db.claim_instance(row("a-2"), 2) is True  # a row does not count against itself (re-claim)
    assert sorted(i.id for i in db.list_instances("a.test")) == ["a-1", "a-2", "b-1"]


def test_concurrent_claims_from_many_connections_never_pass_the_max(backend):
    """Threads, each with its own CMDB object (its own connection), as serves sharing one DB."""
    backend.open().close()
    won: list[str] = []
    start = threading.Barrier(6)

    def claim(t: int) -> None:
        with backend.open() as db:
            db.heartbeat(f"node{t}")
            start.wait()
            for i in range(10):
                name = f"t{t}-{i}"
                if db.claim_instance(Instance(id=name, app="a.test", container=name, state="starting",
                                              owner=f"node{t}"), 3):
                    won.append(name)

    threads = [threading.Thread(target=claim, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with backend.open() as db:
        assert sorted(i.id for i in db.list_instances("a.test")) == sorted(won) and len(won) == 3


def test_a_serve_that_stopped_beating_frees_its_share_and_its_rows_stay(backend, db):
    def row(name, owner):
        return Instance(id=name, app="a.test", container=name, state="ready", owner=owner)

    before = time.time()
    db.heartbeat("alive")
    db.heartbeat("dead")
    (beat,) = backend.raw("SELECT heartbeat_at FROM nodes WHERE name = 'alive'")[0]
    assert before - 5 < beat < time.time() + 5  # the server's clock, in seconds since the epoch
    db.upsert_instance(row("alive-1", "alive"))
    db.upsert_instance(row("dead-1", "dead"))
    db.upsert_instance(row("ghost-1", "never-beat"))  # no heartbeat at all: no share
    assert db.claim_instance(row("me-1", "me"), 3) is True  # alive-1, dead-1 (fresh yet), me-1
    assert db.claim_instance(row("me-2", "me"), 3) is False
    backend.raw("UPDATE nodes SET heartbeat_at = heartbeat_at - 60 WHERE name = 'dead'")
    assert db.claim_instance(row("me-2", "me"), 3) is True  # dead's lease ran out
    assert db.claim_instance(row("me-3", "me"), 3) is False  # alive-1, me-1, me-2
    assert db.claim_instance(row("me-3", "me"), 3, lease_s=3600) is False
    db.heartbeat("dead")  # back: its share counts again, nothing was removed behind its back
    assert sorted(i.id for i in db.list_instances("a.test")) == ["alive-1", "dead-1", "ghost-1", "me-1", "me-2"]
    legacy = Instance(id="old-1", app="b.test", container="old-1", state="ready")  # owner '': counted
    db.upsert_instance(legacy)
    assert db.claim_instance(Instance(id="me-4", app="b.test", container="me-4", state="starting", owner="me"),
                             1) is False


WRITER = textwrap.dedent("""
    import os, sys, time
    from fcrun.cmdb import App, Instance, open_cmdb
    from fcrun.paths import Paths
    url, tag, go = sys.argv[1], sys.argv[2], sys.argv[3]
    open(go + "." + tag, "w").close()
    while not os.path.exists(go):  # start together, so the writes interleave
        time.sleep(0.001)
    with open_cmdb(Paths(data_root="/nonexistent", run_root="/nonexistent"), url) as db:
        for i in range(50):
            db.add_app(App(name=f"{tag}{i}.test", image="x", hostnames=[f"www.{tag}{i}.test"]))
            db.upsert_instance(Instance(id=f"{tag}-{i}", app=f"{tag}{i}.test", container="c", state="ready"))
            db.add_event(f"{tag}{i}.test", "added", tag)
""")


def test_two_processes_migrating_and_writing_at_once_lose_nothing(backend, tmp_path):
    go = str(tmp_path / "go")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, backend.url, tag, go], stderr=subprocess.PIPE)
             for tag in ("p", "q")]
    try:
        while not all(os.path.exists(f"{go}.{tag}") for tag in ("p", "q")):
            assert all(p.poll() is None for p in procs), "a writer died before starting"
            time.sleep(0.001)
        open(go, "w").close()
    finally:
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()
    with backend.open() as db:
        assert len(db.list_apps()) == 100 and len(db.list_instances()) == 100
        events = db.list_events(limit=1000)
        assert len(events) == 100 and len({e.id for e in events}) == 100
        assert db.app_for_host("www.q49.test").name == "q49.test"
    assert backend.raw("SELECT COUNT(*) FROM schema_version") == [(1,)]


def test_export_then_import_into_an_empty_cmdb_gives_the_same_cmdb(db, backend, tmp_path):
    db.add_app(App(name="a.test", image="x", hostnames=["www.a.test"], env=["K=v"]))
    db.update_app("a.test", AppUpdate(cpu=0.5, ready_path="/ready"))
    db.upsert_instance(Instance(id="a-1", app="a.test", container="a-1", state="ready", started_at=5.0))
    for i in range(3):
        db.add_event("a.test", "k", f"m{i}", {"i": i})
    dump = db.export_dump()
    assert dump.schema_version == LATEST_VERSION and [e.id for e in dump.events] == [1, 2, 3]

    target = open_cmdb(Paths(data_root=str(tmp_path / "other"), run_root=str(tmp_path / "run")))
    with target:
        target.import_dump(msgspec.json.decode(msgspec.json.encode(dump), type=Dump))
        assert target.export_dump() == dump and target.get_app("a.test").ready_path == "/ready"
        assert target.add_event(None, "next", "after the import").id == 4  # ids go on
        before = backend.snapshot()
        with pytest.raises(AlreadyExists, match="is not empty"):
            db.import_dump(target.export_dump())
        assert backend.snapshot() == before


def test_an_import_that_fails_half_way_writes_nothing(db, backend):
    dump = Dump(schema_version=LATEST_VERSION, apps=[
        App(name="a.test", image="x", hostnames=["dup.test"]), App(name="b.test", image="x", hostnames=["dup.test"]),
    ])
    before = backend.snapshot()
    with pytest.raises(AlreadyExists, match="'dup.test' already belongs to app 'a.test'"):
        db.import_dump(dump)
    assert backend.snapshot() == before
    with pytest.raises(SpecError, match="not an fcrun CMDB export"):
        db.import_dump(Dump(format="other", schema_version=1))


@pytest.mark.parametrize("app,where", [
    (App(name="Bad Name/../x", image="x"), "apps[1].name"),
    (App(name="b.test", image="x y"), "apps[1].image"),
    (App(name="b.test", image="x", env=["NOEQUALS"]), "apps[1].env[0]"),
    (App(name="b.test", image="x", min_instances=9, max_instances=1), "apps[1].min_instances"),
    (App(name="b.test", image="x", cpu=2, cpu_max=0.5), "apps[1].cpu_max"),
    (App(name="a.test", image="x"), "apps[1].name"),  # twice in the dump
])
def test_an_import_checks_each_app_as_the_admin_api_does(db, backend, app, where):
    """An app the API would refuse is refused in a dump too (it was stored, then never routed
    and never updatable); nothing is written."""
    dump = Dump(schema_version=LATEST_VERSION, apps=[App(name="a.test", image="x"), app])
    before = backend.snapshot()
    with pytest.raises(SpecError) as info:
        db.import_dump(dump)
    assert info.value.where == where
    assert backend.snapshot() == before


def test_an_import_stores_each_app_as_the_admin_api_would(db):
    """Normalized as an add normalizes: the name and hostnames lowercased, so a request finds them;
    a docroot need not exist on this host (the dump may come from another)."""
    db.import_dump(Dump(schema_version=LATEST_VERSION, apps=[
        App(name="Example.TEST", image="x", hostnames=["WWW.Example.TEST."], docroot="/srv/elsewhere/../site")]))
    app = db.app_for_host("www.example.test")
    assert (app.name, app.hostnames, app.docroot) == ("example.test", ["www.example.test"], "/srv/site")


# -- PostgreSQL's own failures: each one clear line naming the URL, password masked -----------


def test_an_unreachable_server_is_named_with_libpq_s_reason(tmp_path):
    url = f"postgresql://someone:hunter2@/cmdb?host={tmp_path}&port=5999"  # no server there
    with pytest.raises(CMDBError) as info:
        open_cmdb(Paths(data_root=str(tmp_path), run_root=str(tmp_path)), url)
    message = str(info.value)
    assert message.startswith(f"open in CMDB postgresql://someone:***@/cmdb?host={tmp_path}&port=5999: ")
    assert "No such file or directory" in message and "hunter2" not in message


def test_wrong_credentials_are_named_and_the_password_is_not_shown(pg_server, tmp_path):
    import psycopg
    from pgserver import PASSWORD_ROLE

    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {PASSWORD_ROLE}")
        conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 'the-right-one'")
    wrong = pg_server.url().replace("postgres@", f"{PASSWORD_ROLE}:not-the-right-one@")
    with pytest.raises(CMDBError) as info:
        open_cmdb(Paths(data_root=str(tmp_path), run_root=str(tmp_path)), wrong)
    message = str(info.value)
    assert f'password authentication failed for user "{PASSWORD_ROLE}"' in message
    assert f"{PASSWORD_ROLE}:***@" in message and "not-the-right-one" not in message
    query_form = pg_server.url().replace("postgres@", f"{PASSWORD_ROLE}@") + "&password=not-the-right-one"
    with pytest.raises(CMDBError, match="password=\\*\\*\\*") as info:
        open_cmdb(Paths(data_root=str(tmp_path), run_root=str(tmp_path)), query_form)
    assert "not-the-right-one" not in str(info.value)


@pytest.mark.parametrize("url,reason", [
    ("mysql://host/db", "is not one fcrun knows"),
    ("cmdb.example", "is not one fcrun knows"),
    ("sqlite://relative/file", "must be an absolute path"),
    ("postgresql://u:secret@/db?nonsense_option=1", "invalid"),
])
def test_bad_urls_are_refused_before_anything_is_written(url, reason, tmp_path):
    with pytest.raises(SpecError, match=reason) as info:
        open_cmdb(Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path)), url)
    assert "secret" not in str(info.value)
    assert not (tmp_path / "data").exists()


def test_a_server_that_stops_fails_calls_clearly_and_is_used_again_when_back(pg_server, pg_url, tmp_path):
    """pg_ctl stop -m immediate under an open CMDB: calls fail naming the CMDB; once the server
    is back the same object works again (the pool replaces its dead connections)."""
    from fcrun.cmdb.postgres import PostgresCMDB

    with PostgresCMDB(pg_url, pool_timeout_s=0.5) as db:
        db.add_app(App(name="a.test", image="x"))
        pg_server.kill()
        try:
            with pytest.raises(CMDBError, match="list apps in CMDB postgresql://"):
                db.list_apps()
            with pytest.raises(CMDBError, match="add app b.test in CMDB postgresql://"):
                db.add_app(App(name="b.test", image="x"))
        finally:
            pg_server.restart_stopped()
        assert [a.name for a in db.list_apps()] == ["a.test"]  # b.test was not half-written
        db.add_app(App(name="b.test", image="x"))
        assert [a.name for a in db.list_apps()] == ["a.test", "b.test"]


def test_the_first_call_after_a_restart_succeeds_on_a_new_connection(pg_server, pg_url):
    """The pooled connections died with the server while idle: each fails at BEGIN, before
    anything of the call ran, and is replaced there; no call sees the restart."""
    from fcrun.cmdb.postgres import PostgresCMDB

    with PostgresCMDB(pg_url) as db:
        db.add_app(App(name="a.test", image="x"))
        assert [a.name for a in db.list_apps()] == ["a.test"]  # a pooled connection, now idle
        pg_server.kill()
        pg_server.restart_stopped()
        assert db.claim_instance(Instance(id="i-1", app="a.test", container="i-1", state="starting"), 1) is True
        assert [i.id for i in db.list_instances()] == ["i-1"]


def test_an_event_retried_under_its_token_is_recorded_once(db):
    first = db.add_event("a.test", "start", "one", {"n": 1}, token="w1-0001")
    again = db.add_event("a.test", "start", "one", {"n": 1}, token="w1-0001")  # the writer's retry
    other = db.add_event("a.test", "start", "two", token="w1-0002")
    untokened = [db.add_event(None, "x", "same") for _ in range(2)]  # no token: two events
    assert again.id == first.id and again.ts == first.ts
    assert [e.message for e in db.list_events()] == ["one", "two", "same", "same"]
    assert other.id > first.id and untokened[1].id > untokened[0].id
