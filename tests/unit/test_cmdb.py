"""The CMDB on SQLite: CRUD, hostname ownership, validation that writes nothing, migrations,
WAL, two processes writing at once, events."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time

import msgspec
import pytest

from fcrun.cmdb import App, AppUpdate, CMDBError, Instance, NewApp, SqliteCMDB, open_cmdb
from fcrun.cmdb.migrations import LATEST_VERSION
from fcrun.cmdb.models import AppDefaults, new_app, normalize_hostname, spec_error
from fcrun.errors import AlreadyExists, NotFound, SpecError
from fcrun.paths import Paths


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "data" / "cmdb.sqlite3")


@pytest.fixture
def db(db_path):
    cmdb = SqliteCMDB(db_path)
    yield cmdb
    cmdb.close()


def dump(path: str) -> str:
    """Every row and table of the database, as SQL text, read by a separate connection."""
    conn = sqlite3.connect(path)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def test_open_cmdb_puts_the_file_under_the_data_root(tmp_path):
    cmdb = open_cmdb(Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path / "run")))
    try:
        assert cmdb.path == str(tmp_path / "data" / "cmdb.sqlite3")
        assert stat.S_IMODE(os.stat(cmdb.path).st_mode) == 0o600  # app env may hold secrets
    finally:
        cmdb.close()


def test_add_get_list_update_remove(db):
    added = db.add_app(App(name="Example.TEST.", image="apache-php:latest", hostnames=["WWW.example.test"],
                           env=["A=1"], cpu=0.3, memory_bytes=256 << 20))
    assert added.name == "example.test"
    assert added.hostnames == ["www.example.test"]
    assert added.image == "apache-php"  # canonical: ":latest" dropped
    assert added.generation == 1 and added.created_at > 0 and added.updated_at == added.created_at
    assert db.get_app("example.test") == added
    assert db.list_apps() == [added]

    updated = db.update_app("example.test", AppUpdate(cpu=0.6, max_lifetime_s=3600, port=8080))
    assert (updated.cpu, updated.max_lifetime_s, updated.port) == (0.6, 3600, 8080)
    assert updated.generation == 2 and updated.updated_at >= added.updated_at
    assert updated.memory_bytes == added.memory_bytes and updated.env == ["A=1"]
    assert db.get_app("example.test") == updated

    cleared = db.update_app("example.test", AppUpdate(max_lifetime_s=None, port=None))
    assert cleared.max_lifetime_s is None and cleared.port is None and cleared.generation == 3

    assert db.remove_app("example.test") == cleared
    assert db.list_apps() == []
    with pytest.raises(NotFound, match="example.test"):
        db.get_app("example.test")


def test_list_apps_orders_by_name_and_keeps_alias_order(db):
    db.add_app(App(name="b.test", image="x", hostnames=["z.test", "y.test"]))
    db.add_app(App(name="a.test", image="x"))
    apps = db.list_apps()
    assert [a.name for a in apps] == ["a.test", "b.test"]
    assert apps[1].hostnames == ["z.test", "y.test"]
    assert apps[1].all_hostnames == ["b.test", "z.test", "y.test"]


def test_app_for_host_ignores_port_case_and_trailing_dot(db):
    app = db.add_app(App(name="example.test", image="x", hostnames=["www.example.test"]))
    assert db.app_for_host("example.test") == app
    assert db.app_for_host("WWW.Example.Test:8080") == app
    assert db.app_for_host("www.example.test.") == app
    assert db.app_for_host("other.test") is None
    db.update_app("example.test", AppUpdate(hostnames=["new.example.test"]))
    assert db.app_for_host("www.example.test") is None
    assert db.app_for_host("new.example.test").hostnames == ["new.example.test"]


def test_a_hostname_belongs_to_one_app_and_the_error_names_the_other(db, db_path):
    db.add_app(App(name="a.test", image="x", hostnames=["shared.test"]))
    before = dump(db_path)
    with pytest.raises(AlreadyExists, match=r"hostname 'shared.test' already belongs to app 'a.test'"):
        db.add_app(App(name="b.test", image="x", hostnames=["other.test", "shared.test"]))
    with pytest.raises(AlreadyExists, match=r"'shared.test' already belongs to app 'a.test'"):
        db.add_app(App(name="SHARED.test", image="x"))  # an app's name is one of its hostnames
    with pytest.raises(AlreadyExists, match=r"app 'a.test' already exists"):
        db.add_app(App(name="a.test", image="y"))
    assert dump(db_path) == before

    db.add_app(App(name="b.test", image="x"))
    before = dump(db_path)
    with pytest.raises(AlreadyExists, match=r"'a.test' already belongs to app 'a.test'"):
        db.update_app("b.test", AppUpdate(hostnames=["a.test"]))
    assert dump(db_path) == before


def test_removing_an_app_frees_its_hostnames(db):
    db.add_app(App(name="a.test", image="x", hostnames=["shared.test"]))
    db.remove_app("a.test")
    assert db.add_app(App(name="b.test", image="x", hostnames=["shared.test"])).hostnames == ["shared.test"]


@pytest.mark.parametrize("fields,where", [
    ({"name": "bad_name.test"}, "name"),
    ({"name": "example.test:8080"}, "name"),
    ({"name": "-lead.test"}, "name"),
    ({"name": "a" * 64 + ".test"}, "name"),
    ({"hostnames": ["ok.test", "bad host"]}, "hostnames[1]"),
    ({"hostnames": ["dup.test", "DUP.test"]}, "hostnames[1]"),
    ({"hostnames": ["new.test"], "name": "new.test"}, "hostnames[0]"),
    ({"image": ""}, "image"),
    ({"image": "Not An Image"}, "image"),
    ({"env": ["A=1", "NOEQUALS"]}, "env[1]"),
    ({"docroot": "relative/dir"}, "docroot"),
    ({"docroot": "/nonexistent/fcrun-docroot"}, "docroot"),
    ({"cpu": 0.0}, "cpu"),
    ({"cpu": 0.5, "cpu_max": 0.2}, "cpu_max"),
    ({"memory_bytes": 1 << 20}, "memory_bytes"),
    ({"min_instances": -1}, "min_instances"),
    ({"max_instances": 0, "min_instances": 0}, "max_instances"),
    ({"min_instances": 3, "max_instances": 2}, "min_instances"),
    ({"target_concurrency": 0}, "target_concurrency"),
    ({"idle_timeout_s": -1.0}, "idle_timeout_s"),
    ({"idle_timeout_s": float("nan")}, "idle_timeout_s"),
    ({"freeze_after_s": -5.0}, "freeze_after_s"),
    ({"max_lifetime_s": 0.0}, "max_lifetime_s"),
    ({"cooldown_up_s": -1.0}, "cooldown_up_s"),
    ({"cooldown_down_s": float("inf")}, "cooldown_down_s"),
    ({"max_body_bytes": -1}, "max_body_bytes"),
    ({"port": 0}, "port"),
    ({"port": 65536}, "port"),
    ({"pids_max": 2}, "pids_max"),
    ({"seccomp": "strict"}, "seccomp"),
    ({"seccomp": '{"defaultAction": "SCMP_ACT_NOPE"}'}, "seccomp"),
])
def test_invalid_settings_name_the_field_and_write_nothing(db, db_path, fields, where):
    db.add_app(App(name="existing.test", image="x", hostnames=["alias.test"]))
    before = dump(db_path)
    candidate = {"name": "new.test", "image": "x", **fields}
    with pytest.raises(SpecError) as info:
        db.add_app(App(**candidate))
    assert info.value.where == where, info.value
    assert dump(db_path) == before

    if "name" not in fields:  # the same change to an existing app
        with pytest.raises(SpecError) as info:
            db.update_app("existing.test", AppUpdate(**fields))
        assert info.value.where == where, info.value
        assert dump(db_path) == before


def test_docroot_must_be_an_existing_directory(db, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    assert db.add_app(App(name="a.test", image="x", docroot=str(site) + "/")).docroot == str(site)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpecError, match="is not a directory"):
        db.update_app("a.test", AppUpdate(docroot=str(tmp_path / "file")))


def test_new_app_takes_unset_fields_from_the_defaults():
    defaults = AppDefaults(cpu=0.3, memory_bytes=128 << 20, idle_timeout_s=5.0, max_instances=4)
    app = new_app(NewApp(name="a.test", image="x", max_instances=2), defaults, now=1000.0)
    assert (app.cpu, app.memory_bytes, app.idle_timeout_s, app.max_instances) == (0.3, 128 << 20, 5.0, 2)
    assert app.created_at == app.updated_at == 1000.0 and app.generation == 1
    assert app.cpu_ceiling == 0.3 and app.port_for([8080, 443]) == 8080 and app.port_for([]) == 80


def test_api_bodies_reject_unknown_fields_naming_them():
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(b'{"cpu": 0.5, "memroy_bytes": 1}', type=AppUpdate)
    err = spec_error(info.value, "request body")
    assert err.where == "$.memroy_bytes" and "unknown key" in str(err)
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(b'{"name": "a.test", "image": "x", "cpu": "lots"}', type=NewApp)
    assert spec_error(info.value).where == "$.cpu"


def test_hostname_helpers():
    assert normalize_hostname("Example.TEST.") == "example.test"
    assert normalize_hostname("10.0.0.1") == "10.0.0.1"
    with pytest.raises(SpecError, match="without a scheme or port"):
        normalize_hostname("http://example.test", "--alias")


@pytest.mark.parametrize("host", ["a.test", "A.Test", "a.test.", "a.test:8080", "A.TEST.:80", " www.a.test "])
def test_an_app_is_found_by_its_host_as_a_client_writes_it(db, host):
    db.add_app(App(name="a.test", image="x", hostnames=["www.a.test"]))
    assert db.app_for_host(host).name == "a.test"


@pytest.mark.parametrize("host", ["b.test", "[::1]:8080", "a.test:http", "a test", ""])
def test_other_hosts_find_no_app(db, host):
    db.add_app(App(name="a.test", image="x"))
    assert db.app_for_host(host) is None


def test_events_order_limit_since_and_app(db):
    for i in range(6):
        db.add_event("a.test" if i % 2 == 0 else "b.test", "kind", f"message {i}", {"i": i})
    db.add_event(None, "reconcile", "host-wide")
    latest = db.list_events(limit=3)
    assert [e.message for e in latest] == ["message 4", "message 5", "host-wide"]  # oldest first
    assert [e.id for e in db.list_events(since_id=2, limit=2)] == [3, 4]
    assert [e.data["i"] for e in db.list_events("a.test")] == [0, 2, 4]
    assert [e.data["i"] for e in db.list_events("a.test", since_id=1)] == [2, 4]
    assert db.list_events(since_id=7) == []
    assert db.list_events()[-1].app is None and db.list_events()[-1].data == {}


def test_migrations_create_the_schema_and_reopening_changes_nothing(db_path):
    with SqliteCMDB(db_path) as first:
        first.add_app(App(name="a.test", image="x"))
    before = dump(db_path)
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(LATEST_VERSION,)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"apps", "app_hostnames", "instances", "events", "schema_version"} <= tables
    finally:
        conn.close()
    with SqliteCMDB(db_path) as again:
        assert [a.name for a in again.list_apps()] == ["a.test"]
    assert dump(db_path) == before


def test_a_version_1_database_gets_the_apps_pids_and_seccomp_columns(db_path):
    os.makedirs(os.path.dirname(db_path), exist_ok=True)
    conn = sqlite3.connect(db_path)
    try:
        from fcrun.cmdb.migrations import MIGRATIONS

        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        for statement in MIGRATIONS[0].statements:
            conn.execute(statement.format(serial_pk="INTEGER PRIMARY KEY AUTOINCREMENT"))
        conn.execute("INSERT INTO apps VALUES ('old.test', 'x', '[]', NULL, 1, NULL, 536870912, 0, 4, 8, 60, 30,"
                     " NULL, 10, 30, NULL, NULL, 1, 0, 0, 1)")
        conn.commit()
    finally:
        conn.close()
    with SqliteCMDB(db_path) as db:
        old = db.get_app("old.test")
        assert (old.pids_max, old.seccomp) == (None, "default")  # what it meant before
        db.update_app("old.test", AppUpdate(pids_max=64, seccomp="unconfined"))
        assert (db.get_app("old.test").pids_max, db.get_app("old.test").seccomp) == (64, "unconfined")


def test_a_version_5_database_gets_the_ready_path_column_empty(db_path):
    from fcrun.cmdb.migrations import MIGRATIONS, migrate

    os.makedirs(os.path.dirname(db_path), exist_ok=True)
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (5)")
        for migration in MIGRATIONS[:5]:
            for statement in migration.statements:
                conn.execute(statement.format(serial_pk="INTEGER PRIMARY KEY AUTOINCREMENT", now="0"))
        conn.execute("INSERT INTO apps (name, image, env, cpu, memory_bytes, min_instances, max_instances,"
                     " target_concurrency, idle_timeout_s, cooldown_up_s, cooldown_down_s, autoscale, created_at,"
                     " updated_at, generation) VALUES ('old.test', 'x', '[]', 1, 536870912, 0, 1, 10, 60, 10, 30,"
                     " 1, 0, 0, 1)")
        conn.commit()
        assert migrate(conn.cursor()) == 5
        conn.commit()
    finally:
        conn.close()
    with SqliteCMDB(db_path) as db:
        assert db.get_app("old.test").ready_path is None  # accepting connections, as before
        assert db.update_app("old.test", AppUpdate(ready_path="/up")).ready_path == "/up"


def test_a_database_from_a_newer_fcrun_is_refused(db_path):
    SqliteCMDB(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE schema_version SET version = 999")
    conn.commit()
    conn.close()
    with pytest.raises(CMDBError, match="schema version 999"):
        SqliteCMDB(db_path)


def test_wal_mode_is_on_and_every_commit_is_synced(db, db_path):
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent: the file's
    finally:
        conn.close()
    # Per connection: FULL (2) fsyncs the WAL at every commit, so a returned write survives a
    # power loss (NORMAL, 1, would sync only at checkpoints).
    assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def _raw(db_path: str, sql: str, *args) -> None:
    """Write behind the CMDB's back, as disk corruption or a hand edit would."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute(sql, args)
    finally:
        conn.close()


ROW_CORRUPTIONS = {
    "env not JSON": ("env", "[\"A=1", "column env: .*truncated"),
    "env not a list": ("env", '{"A": 1}', "column env: Expected `array`, got `object`"),
    "cpu not a number": ("cpu", "lots", r"column cpu: Expected `float`, got `str`"),
    "memory out of range": ("memory_bytes", -5, "column memory_bytes: Expected `int` >= "),
    "autoscale not a boolean": ("autoscale", 7, "column autoscale: 7 is not a boolean"),
    "image not text": ("image", b"\x00\x01", r"column image: Expected `str`, got `bytes`"),
}


@pytest.mark.parametrize("kind", sorted(ROW_CORRUPTIONS))
def test_a_garbage_app_row_is_named_and_the_other_apps_keep_working(db, db_path, caplog, kind):
    column, value, reason = ROW_CORRUPTIONS[kind]
    db.add_app(App(name="bad.test", image="apache-php", hostnames=["alias.bad.test"]))
    db.add_app(App(name="good.test", image="apache-php"))
    _raw(db_path, f"UPDATE apps SET {column} = ? WHERE name = 'bad.test'", value)

    with pytest.raises(CMDBError, match=f"app 'bad.test' in CMDB {db_path} is corrupt: {reason}"):
        db.get_app("bad.test")
    with pytest.raises(CMDBError, match="app 'bad.test'"):
        db.app_for_host("alias.bad.test")
    assert [a.name for a in db.list_apps()] == ["good.test"]
    assert [a.name for a in db.list_apps()] == ["good.test"]
    warned = [r.getMessage() for r in caplog.records if "bad.test" in r.getMessage()]
    assert len(warned) == 1 and "it is left out" in warned[0]  # once, not at every reload
    assert db.app_for_host("good.test").name == "good.test"
    db.update_app("good.test", AppUpdate(cpu=0.5))
    db.add_app(App(name="new.test", image="apache-php"))

    removed = db.remove_app("bad.test")  # how the operator gets rid of it
    assert removed.name == "bad.test"
    assert db.app_for_host("alias.bad.test") is None
    db.add_app(App(name="bad.test", image="apache-php", hostnames=["alias.bad.test"]))
    assert [a.name for a in db.list_apps()] == ["bad.test", "good.test", "new.test"]


def test_garbage_instance_and_event_rows_are_left_out_or_shown_without_their_data(db, db_path, caplog):
    db.upsert_instance(Instance(id="i-1", app="a.test", container="c-1", state="ready", started_at=1.0))
    db.upsert_instance(Instance(id="i-2", app="a.test", container="c-2", state="ready", started_at=2.0))
    _raw(db_path, "UPDATE instances SET requests = 'many' WHERE id = 'i-1'")
    assert [i.id for i in db.list_instances()] == ["i-2"]
    assert f"instance 'i-1' in CMDB {db_path} is corrupt" in caplog.text
    first = db.add_event("a.test", "started", "one", {"n": 1})
    db.add_event("a.test", "started", "two", {"n": 2})
    _raw(db_path, "UPDATE events SET data = '{broken' WHERE id = ?", first.id)
    assert [(e.message, e.data) for e in db.list_events()] == [("one", {}), ("two", {"n": 2})]
    assert f"event {first.id} in CMDB {db_path}: column data is corrupt" in caplog.text


def test_a_file_that_is_not_a_database_is_named_at_open(db_path):
    os.makedirs(os.path.dirname(db_path))
    with open(db_path, "wb") as f:
        f.write(b"this is not an SQLite database, it only sits where one should" * 100)
    with pytest.raises(CMDBError, match=f"open in CMDB {db_path}: the file is corrupt or not an SQLite database"):
        SqliteCMDB(db_path)


def test_damaged_pages_are_named(db_path):
    with SqliteCMDB(db_path) as db:
        for i in range(50):
            db.add_app(App(name=f"app{i}.test", image="apache-php", env=[f"K={'v' * 200}"]))
    # Closed: the WAL is checkpointed into the file. Keep the header page, damage the rest.
    size = os.path.getsize(db_path)
    with open(db_path, "r+b") as f:
        f.seek(4096)
        f.write(b"\xa5" * (size - 4096))
    with pytest.raises(CMDBError, match=f"in CMDB {db_path}: the file is corrupt"):
        with SqliteCMDB(db_path) as db:
            db.list_apps()


def test_a_full_database_names_the_file_and_keeps_every_row(db, db_path):
    """SQLITE_FULL, as a full disk gives it (here by capping the file's pages; the root test
    tests/root/test_corrupt_state_root.py fills a real tmpfs)."""
    db.add_app(App(name="kept.test", image="apache-php"))
    pages = db._conn.execute("PRAGMA page_count").fetchone()[0]
    db._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(CMDBError, match=f"add app big.test in CMDB {db_path}: no space left on device"):
        db.add_app(App(name="big.test", image="apache-php", env=[f"K={'v' * 100_000}"]))
    with pytest.raises(CMDBError, match="no space left on device"):
        db.add_event(None, "big", "x" * 100_000)
    assert [a.name for a in db.list_apps()] == ["kept.test"]
    db._conn.execute(f"PRAGMA max_page_count = {pages * 1000}")  # space freed
    db.add_app(App(name="big.test", image="apache-php", env=[f"K={'v' * 100_000}"]))
    assert [a.name for a in db.list_apps()] == ["big.test", "kept.test"]


def test_an_unwritable_data_root_is_a_kernel_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(Exception) as info:
        SqliteCMDB(str(tmp_path / "file" / "cmdb.sqlite3"))
    assert "open CMDB" in str(info.value) and "Errno" in str(info.value)


WRITER = textwrap.dedent("""
    import os, sys, time
    from fcrun.cmdb import App, Instance, SqliteCMDB
    path, tag, go = sys.argv[1], sys.argv[2], sys.argv[3]
    open(go + "." + tag, "w").close()
    while not os.path.exists(go):  # start together, so the writes interleave
        time.sleep(0.001)
    with SqliteCMDB(path) as db:
        for i in range(N):
            db.add_app(App(name=f"{tag}{i}.test", image="x", hostnames=[f"www.{tag}{i}.test"]))
            db.upsert_instance(Instance(id=f"{tag}-{i}", app=f"{tag}{i}.test", container="c", state="ready"))
            db.add_event(f"{tag}{i}.test", "added", tag)
""").replace("N", "100")


def test_two_processes_writing_at_once_lose_nothing(db_path, tmp_path):
    # Both processes also race to create and migrate the new database.
    go = str(tmp_path / "go")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db_path, tag, go], stderr=subprocess.PIPE)
             for tag in ("p", "q")]
    try:
        while not all(os.path.exists(f"{go}.{tag}") for tag in ("p", "q")):
            assert all(p.poll() is None for p in procs), "a writer died before starting"
            time.sleep(0.001)
        open(go, "w").close()
    finally:
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
    with SqliteCMDB(db_path) as db:
        assert len(db.list_apps()) == 200
        assert len(db.list_instances()) == 200
        events = db.list_events(limit=1000)
        assert len(events) == 200
        assert [e.id for e in events] == sorted(e.id for e in events)
        assert db.app_for_host("www.q99.test").name == "q99.test"
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1
    finally:
        conn.close()
