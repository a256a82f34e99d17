"""`fcrun cmdb migrate|export|import` and `fcrun --cmdb URL` / ``[cmdb] url``: a site moved from
SQLite to a real PostgreSQL (tests/pgserver.py) and back, the same CMDB each way."""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from fcrun.cmdb import open_cmdb
from fcrun.paths import Paths
from fcrun_cli.main import main

from pgserver import pg_server, pg_url  # noqa: F401 - fixtures


@pytest.fixture
def roots(monkeypatch, short_dir):
    paths = Paths(data_root=os.path.join(short_dir, "data"), run_root=os.path.join(short_dir, "run"))
    monkeypatch.setenv("FCRUN_ROOT", paths.data_root)
    monkeypatch.setenv("FCRUN_RUN", paths.run_root)
    # Direct mode: no server answers at this socket.
    monkeypatch.setenv("FCRUN_ADMIN_SOCKET", os.path.join(short_dir, "no-server.sock"))
    for name in ("FCRUN_ADMIN_URL", "FCRUN_CONFIG", "FCRUN_CMDB"):
        monkeypatch.delenv(name, raising=False)
    return paths


@pytest.fixture
def cli(roots):
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(main, list(args), input=input)
    return invoke


def ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def test_sqlite_to_postgresql_and_back_gives_the_same_cmdb(cli, roots, pg_url, tmp_path):
    ok(cli("app", "add", "a.test", "--image", "apache-php", "--alias", "www.a.test", "-e", "SECRET=x",
           "--port", "8080", "--max", "3"))
    ok(cli("app", "add", "b.test", "--image", "apache-php", "--cpu", "0.5"))
    ok(cli("app", "update", "b.test", "--memory", "256M"))
    before = json.loads(ok(cli("cmdb", "export")))
    assert [a["name"] for a in before["apps"]] == ["a.test", "b.test"] and len(before["events"]) == 3

    exported = tmp_path / "cmdb.json"
    ok(cli("cmdb", "export", "-o", str(exported)))
    assert stat.S_IMODE(os.stat(exported).st_mode) == 0o600  # app environments hold secrets
    assert "imported 2 apps, 0 instances, 3 events" in ok(cli("--cmdb", pg_url, "cmdb", "import", str(exported)))
    assert json.loads(ok(cli("--cmdb", pg_url, "cmdb", "export"))) == before
    # `fcrun app` works on it (direct mode), and so would serve: the same open_cmdb.
    assert "www.a.test" in ok(cli("--cmdb", pg_url, "app", "show", "a.test"))

    back = f"sqlite://{tmp_path}/back/cmdb.sqlite3"
    ok(cli("--cmdb", back, "cmdb", "import", "-", input=ok(cli("--cmdb", pg_url, "cmdb", "export"))))
    assert json.loads(ok(cli("--cmdb", back, "cmdb", "export"))) == before


def test_import_into_a_cmdb_that_is_not_empty_is_refused_and_writes_nothing(cli, pg_url, tmp_path):
    ok(cli("--cmdb", pg_url, "app", "add", "a.test", "--image", "apache-php"))
    exported = tmp_path / "cmdb.json"
    ok(cli("--cmdb", pg_url, "cmdb", "export", "-o", str(exported)))
    before = ok(cli("--cmdb", pg_url, "cmdb", "export"))
    result = cli("--cmdb", pg_url, "cmdb", "import", str(exported))
    assert result.exit_code == 4 and "is not empty (1 apps, 1 events)" in result.output
    assert ok(cli("--cmdb", pg_url, "cmdb", "export")) == before


@pytest.mark.parametrize("content,where", [
    (b"{not json", "$"),
    (b'{"schema_version": 2, "apps": [{"name": "a.test"}]}', "$.apps[0]"),
    (b'{"schema_version": 2, "apps": [], "extra": 1}', "$.extra"),
])
def test_a_bad_export_file_is_named_with_the_place_and_nothing_is_written(cli, roots, tmp_path, content, where):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    result = cli("cmdb", "import", str(bad))
    assert result.exit_code == 2 and str(bad) in result.output and where in result.output, result.output
    assert not os.path.exists(os.path.join(roots.data_root, "cmdb.sqlite3"))


def test_migrate_reports_the_version_and_config_selects_the_cmdb(cli, pg_url, tmp_path, monkeypatch):
    config = tmp_path / "fcrun.toml"
    config.write_text(f'[cmdb]\nurl = "{pg_url}"\n')
    monkeypatch.setenv("FCRUN_CONFIG", str(config))
    assert "schema version 0 -> " in ok(cli("cmdb", "migrate"))
    assert "nothing to do" in ok(cli("cmdb", "migrate"))
    ok(cli("app", "add", "a.test", "--image", "apache-php"))
    with open_cmdb(Paths(data_root=str(tmp_path), run_root=str(tmp_path)), pg_url) as db:
        assert [a.name for a in db.list_apps()] == ["a.test"]


def test_an_unreachable_cmdb_is_one_line_naming_it_without_the_password(cli, tmp_path):
    url = f"postgresql://fcrun:hunter2@/cmdb?host={tmp_path}"
    result = cli("--cmdb", url, "app", "ls")
    assert result.exit_code == 1
    assert result.output.startswith(f"fcrun: open in CMDB postgresql://fcrun:***@/cmdb?host={tmp_path}: ")
    assert "hunter2" not in result.output
    result = cli("--cmdb", "mysql://root:hunter2@db/cmdb", "cmdb", "migrate")
    assert result.exit_code == 2 and "is not one fcrun knows" in result.output and "hunter2" not in result.output


def test_a_bad_cmdb_url_in_the_config_is_named_with_its_key(cli, tmp_path, monkeypatch):
    config = tmp_path / "fcrun.toml"
    config.write_text('[cmdb]\nurl = "sqlite://relative.db"\n')
    monkeypatch.setenv("FCRUN_CONFIG", str(config))
    result = cli("app", "ls")
    assert result.exit_code == 2 and "$.cmdb.url" in result.output, result.output
