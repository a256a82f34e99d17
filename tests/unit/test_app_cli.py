"""`fcrun app`, `fcrun events`, `fcrun stats`: on the CMDB directly, and through a running
admin server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile

import msgspec
import pytest
from click.testing import CliRunner

from fcrun.cmdb import Instance, SqliteCMDB
from fcrun.paths import Paths
from fcrun.serve.admin_server import serve_in_thread
from fcrun.serve.controller import DirectController
from fcrun_cli.app import app, events, stats
from fcrun_cli.main import main

for command in (app, events, stats):  # cli/main.py adds them; registering again is harmless
    main.add_command(command)


@pytest.fixture
def roots(monkeypatch):
    """Short data and run roots (the admin socket lives in the run root)."""
    base = tempfile.mkdtemp(prefix="fc-", dir="/tmp")
    paths = Paths(data_root=os.path.join(base, "data"), run_root=os.path.join(base, "run"))
    monkeypatch.setenv("FCRUN_ROOT", paths.data_root)
    monkeypatch.setenv("FCRUN_RUN", paths.run_root)
    for name in ("FCRUN_ADMIN_SOCKET", "FCRUN_ADMIN_URL", "FCRUN_ADMIN_TOKEN", "FCRUN_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    yield paths
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cli(roots):
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args))


class CountingController(DirectController):
    """Counts the calls that reach the server, to show the CLI went through it."""

    def __init__(self, cmdb):
        super().__init__(cmdb)
        self.calls = 0

    async def list_apps(self):
        self.calls += 1
        return await super().list_apps()

    async def add_app(self, spec):
        self.calls += 1
        return await super().add_app(spec)


class SlowRemoval(DirectController):
    async def remove_app(self, name):
        await asyncio.Event().wait()


@pytest.fixture
def server(roots):
    cmdb = SqliteCMDB(os.path.join(roots.data_root, "cmdb.sqlite3"))
    controller = CountingController(cmdb)
    with serve_in_thread(controller, os.path.join(roots.run_root, "admin.sock")) as srv:
        yield srv
    cmdb.close()


def test_the_app_commands_do_not_load_the_admin_server_or_the_manager():
    # A fresh interpreter: this one has loaded the server for the other tests.
    code = ("import sys, fcrun_cli.app, fcrun.serve.admin_client; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('fcrun.', 'fcrun_cli.')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "fcrun_cli.app" in loaded and "fcrun.serve.admin_client" in loaded  # it did import them
    assert "fcrun.serve.controller" in loaded  # LocalAdmin's
    for heavy in ("fcrun.serve.admin_server", "fcrun.serve.manager", "fcrun.serve.server", "fcrun.serve.backend",
                  "fcrun.runtime.lifecycle"):
        assert heavy not in loaded, f"`fcrun app` imports {heavy}"


def test_the_app_commands_are_in_the_help(cli):
    result = cli("app", "--help")
    assert result.exit_code == 0, result.output
    for command in ("add", "ls", "show", "update", "rm"):
        assert f"  {command}" in result.output


def _docroot_roots(tmp_path, monkeypatch) -> None:
    """A config file that makes tmp_path the docroot root (the default roots are /srv, /var/www)."""
    config = tmp_path / "fcrun.toml"
    config.write_text(f"docroot_roots = [{str(tmp_path)!r}]\n")
    monkeypatch.setenv("FCRUN_CONFIG", str(config))


def test_add_ls_show_update_rm_without_a_server(cli, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.chdir(tmp_path)
    _docroot_roots(tmp_path, monkeypatch)
    result = cli("app", "add", "Example.TEST", "--image", "apache-php", "--alias", "www.example.test",
                 "--docroot", "site", "--cpu", "0.3", "--cpu-max", "0.6", "--memory", "256M", "--min", "0",
                 "--max", "2", "--idle-timeout", "90s", "--freeze-after", "30s", "--max-lifetime", "1h",
                 "--env", "APP_ENV=prod", "--port", "8080", "--max-body", "10M", "--no-autoscale")
    assert result.exit_code == 0, result.output
    assert result.stdout == "example.test\n"  # stderr: a warning that apache-php is not built here

    result = cli("app", "ls")
    assert result.exit_code == 0, result.output
    header, row = result.output.splitlines()
    assert header.split() == ["NAME", "ALIASES", "IMAGE", "CPU", "MEMORY", "INSTANCES", "REQUESTS"]
    assert row.split()[:3] == ["example.test", "www.example.test", "apache-php"]
    assert "256M" in row and "0/0" in row

    result = cli("app", "show", "example.test", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["app"]
    assert shown["docroot"] == str(site)  # relative on the command line, absolute when stored
    assert (shown["cpu"], shown["cpu_max"], shown["memory_bytes"]) == (0.3, 0.6, 256 << 20)
    assert (shown["idle_timeout_s"], shown["freeze_after_s"], shown["max_lifetime_s"]) == (90.0, 30.0, 3600.0)
    assert (shown["port"], shown["max_body_bytes"], shown["autoscale"]) == (8080, 10 << 20, False)
    assert shown["env"] == ["APP_ENV=prod"]

    result = cli("app", "update", "example.test", "--max-lifetime", "off", "--port", "auto", "--max", "3",
                 "--clear-aliases")
    assert result.exit_code == 0, result.output
    assert "generation 2" in result.output

    result = cli("app", "show", "example.test")
    assert result.exit_code == 0, result.output
    assert "max lifetime: off" in result.output and "aliases:      -" in result.output
    assert "0..3" in result.output and "auto (the image's, else 80)" in result.output

    # --max-body: 'off' is stored as 0 (no limit), 'default' as unset (the proxy's 10 MiB applies)
    for word, stored, shown_text in (("off", 0, "no limit"), ("default", None, "the proxy's default")):
        assert cli("app", "update", "example.test", "--max-body", word).exit_code == 0
        assert json.loads(cli("app", "show", "example.test", "--json").output)["app"]["max_body_bytes"] == stored
        assert shown_text in cli("app", "show", "example.test").output

    result = cli("app", "rm", "example.test")
    assert result.exit_code == 0, result.output
    assert result.output == "removed example.test\n"
    assert cli("app", "ls", "-q").output == ""

    result = cli("events", "example.test")
    assert result.exit_code == 0, result.output
    assert [line.split()[4] for line in result.output.splitlines()] == ["app-added"] + ["app-updated"] * 3 + ["app-removed"]


@pytest.mark.parametrize("args,code,words", [
    (["app", "add", "a.test"], 2, "--image"),
    (["app", "add", "a_b.test", "--image", "x"], 2, "HOSTNAME"),
    (["app", "add", "a.test", "--image", "x", "--memory", "12Q"], 2, "--memory"),
    (["app", "add", "a.test", "--image", "x", "--cpu", "lots"], 2, "--cpu"),
    (["app", "add", "a.test", "--image", "x", "--alias", "b.test:80"], 2, "--alias"),
    (["app", "add", "a.test", "--image", "x", "--idle-timeout", "soon"], 2, "--idle-timeout"),
    (["app", "add", "a.test", "--image", "x", "--docroot", "/nonexistent/fcrun"], 2, "--docroot"),
    (["app", "add", "a.test", "--image", "x", "--env", "NOVALUE"], 2, "--env"),
    (["app", "add", "a.test", "--image", "x", "--port", "http"], 2, "--port"),
    # Each of these ended in a Python traceback: isdigit() takes "²", a float's inf, an int
    # past what the CMDB's columns hold.
    (["app", "add", "a.test", "--image", "x", "--port", "\u00b2"], 2, "--port"),
    (["app", "add", "a.test", "--image", "x", "--pids", "\u00b2"], 2, "--pids"),
    (["app", "add", "a.test", "--image", "x", "--memory", "9" * 400], 2, "--memory"),
    (["app", "add", "a.test", "--image", "x", "--memory", "99999999999T"], 2, "--memory"),
    (["app", "add", "a.test", "--image", "x", "--max", str(2**63)], 2, "max_instances"),
    (["app", "add", "a.test", "--image", "x", "--idle-timeout", "9" * 400], 2, "--idle-timeout"),
    (["app", "add", "a.test", "--image", "x", "--max-body", "big"], 2, "--max-body"),
    (["app", "add", "a.test", "--image", "x", "--min", "2"], 2, "min_instances"),
    (["app", "add", "a.test", "--image", "x", "--ready-path", "healthz"], 2, "does not start with / (at --ready-path)"),
    (["app", "add", "a.test", "--image", "x", "--ready-path", "/a b"], 2, "(at --ready-path)"),
    (["app", "update", "a.test"], 2, "nothing to update"),
    (["app", "update", "nope.test", "--cpu", "0.5"], 3, "does not exist"),
    (["app", "show", "nope.test"], 3, "does not exist"),
    (["app", "rm", "nope.test"], 3, "does not exist"),
])
def test_bad_input_exits_with_the_errors_code_naming_the_option(cli, args, code, words):
    result = cli(*args)
    assert result.exit_code == code, result.output
    assert words in result.output
    assert result.output.startswith("fcrun: ")


def test_a_docroot_outside_the_roots_or_through_a_symlink_is_refused(cli, tmp_path, monkeypatch):
    (tmp_path / "site").mkdir()
    (tmp_path / "etc").symlink_to("/etc")
    result = cli("app", "add", "a.test", "--image", "x", "--docroot", str(tmp_path / "site"))
    assert result.exit_code == 2, result.output  # the default roots: /srv and /var/www
    assert "outside the allowed docroot roots (/srv, /var/www)" in result.output
    _docroot_roots(tmp_path, monkeypatch)
    result = cli("app", "add", "a.test", "--image", "x", "--docroot", str(tmp_path / "etc"))
    assert result.exit_code == 2, result.output
    assert "symlink" in result.output
    assert cli("app", "add", "a.test", "--image", "x", "--docroot", str(tmp_path / "site")).exit_code == 0
    result = cli("app", "update", "a.test", "--docroot", "/etc")
    assert result.exit_code == 2, result.output
    assert "outside the allowed docroot roots" in result.output
    shown = json.loads(cli("app", "show", "a.test", "--json").output)["app"]
    assert shown["docroot"] == str(tmp_path / "site")


def test_a_taken_hostname_names_the_app_that_has_it(cli):
    assert cli("app", "add", "a.test", "--image", "x", "--alias", "shared.test").exit_code == 0
    result = cli("app", "add", "b.test", "--image", "x", "--alias", "shared.test")
    assert result.exit_code == 4, result.output
    assert "'shared.test' already belongs to app 'a.test'" in result.output


def test_new_apps_take_the_config_files_defaults(cli, tmp_path, monkeypatch):
    config = tmp_path / "fcrun.toml"
    config.write_text("[defaults]\ncpu = 0.25\nidle_timeout_s = 15\n")
    monkeypatch.setenv("FCRUN_CONFIG", str(config))
    assert cli("app", "add", "a.test", "--image", "x").exit_code == 0
    shown = json.loads(cli("app", "show", "a.test", "--json").output)["app"]
    assert (shown["cpu"], shown["idle_timeout_s"]) == (0.25, 15.0)


def test_commands_go_through_a_running_server(cli, server):
    result = cli("app", "add", "a.test", "--image", "x", "--max", "2")
    assert result.exit_code == 0, result.output
    result = cli("app", "ls")
    assert result.exit_code == 0, result.output
    assert server.controller.calls == 2
    server.controller.cmdb.upsert_instance(
        Instance(id="a-1", app="a.test", container="a-1", state="ready", ip="10.88.0.9", port=80, requests=4))

    result = cli("app", "show", "a.test")
    assert result.exit_code == 0, result.output
    assert "1 ready / 1" in result.output and "10.88.0.9:80" in result.output

    result = cli("stats", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["a.test"]["requests"] == 4

    result = cli("app", "add", "a.test", "--image", "x")
    assert result.exit_code == 4, result.output  # the server's AlreadyExists, re-raised here

    result = cli("app", "rm", "a.test")
    assert result.exit_code == 0, result.output
    result = cli("events", "--json")
    assert [e["kind"] for e in json.loads(result.output)] == ["app-added", "app-removed"]


def test_rm_reports_a_removal_still_draining(cli, roots):
    cmdb = SqliteCMDB(os.path.join(roots.data_root, "cmdb.sqlite3"))
    try:
        with serve_in_thread(SlowRemoval(cmdb), os.path.join(roots.run_root, "admin.sock"), remove_wait_s=0.0):
            assert cli("app", "add", "a.test", "--image", "x").exit_code == 0
            result = cli("app", "rm", "a.test")
            assert result.exit_code == 0, result.output
            assert "draining" in result.output
    finally:
        cmdb.close()


def test_the_socket_can_be_named_by_environment(cli, roots, monkeypatch):
    cmdb = SqliteCMDB(os.path.join(roots.data_root, "other.sqlite3"))  # not the direct-mode file
    path = os.path.join(roots.run_root, "elsewhere.sock")
    try:
        with serve_in_thread(DirectController(cmdb), path):
            monkeypatch.setenv("FCRUN_ADMIN_SOCKET", path)
            assert cli("app", "add", "a.test", "--image", "x").exit_code == 0
            assert [a.name for a in cmdb.list_apps()] == ["a.test"]
    finally:
        cmdb.close()


def test_a_stale_socket_falls_back_to_the_cmdb(cli, roots):
    import socket

    os.makedirs(roots.run_root)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(roots.run_root, "admin.sock"))
    stale.close()
    result = cli("app", "add", "a.test", "--image", "x")
    assert result.exit_code == 0, result.output
    with SqliteCMDB(os.path.join(roots.data_root, "cmdb.sqlite3")) as cmdb:
        assert [a.name for a in cmdb.list_apps()] == ["a.test"]


def test_stats_and_events_on_an_empty_cmdb(cli):
    result = cli("stats")
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["APP", "REQUESTS", "2XX", "3XX", "4XX", "5XX", "REQUEST-S", "CPU-S",
                                     "INSTANCE-S", "INSTANCES", "FROZEN", "THAW/POOL/START"]
    result = cli("events")
    assert result.exit_code == 0 and result.output == ""


def test_pids_and_seccomp_per_app(cli, tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read", "write"], '
                       '"action": "SCMP_ACT_ALLOW"}]}')
    result = cli("app", "add", "sec.test", "--image", "apache-php", "--pids", "64", "--security-opt", f"seccomp={profile}")
    assert result.exit_code == 0, result.output
    result = cli("app", "show", "sec.test", "--json")
    app = msgspec.json.decode(result.output)["app"]
    assert app["pids_max"] == 64
    assert msgspec.json.decode(app["seccomp"])["syscalls"][0]["names"] == ["read", "write"]  # stored whole
    assert [line.split()[-2:] for line in cli("app", "show", "sec.test").output.splitlines()
            if line.startswith(("pids:", "seccomp:"))] == [["pids:", "64"], ["custom", "profile"]]

    result = cli("app", "update", "sec.test", "--pids", "default", "--security-opt", "seccomp=unconfined")
    assert result.exit_code == 0, result.output
    app = msgspec.json.decode(cli("app", "show", "sec.test", "--json").output)["app"]
    assert (app.get("pids_max"), app["seccomp"]) == (None, "unconfined")

    for args, wanted in ((["--pids", "2"], "pids_max"), (["--pids", "many"], "--pids"),
                         (["--security-opt", "apparmor=x"], "--security-opt"),
                         (["--security-opt", f"seccomp={tmp_path}/missing.json"], "missing.json")):
        result = cli("app", "update", "sec.test", *args)
        assert result.exit_code == 2 and wanted in result.output, result.output


def test_only_apps_on_the_default_seccomp_profile_use_pooled_instances():
    from fcrun.cmdb import App
    from fcrun.serve.backend import RuntimeBackend

    app = App(name="p.test", image="apache-php", docroot="/srv/p")
    assert RuntimeBackend.poolable(app)
    assert not RuntimeBackend.poolable(msgspec.structs.replace(app, seccomp="unconfined"))


def test_add_warns_when_its_image_is_not_in_the_local_store(cli, roots, tmp_path, monkeypatch):
    """The app is added (exit 0) but its first request would fail: stderr names the image and
    how to get it (build, for a recipe; pull)."""
    from test_images import docker_archive, layer_tar, Entry

    from fcrun.images import ImageStore

    recipes = tmp_path / "recipes"
    (recipes / "apache-php").mkdir(parents=True)
    (recipes / "apache-php" / "build.sh").write_text("#!/bin/sh\n")
    monkeypatch.setenv("FCRUN_RECIPES", str(recipes))

    result = cli("app", "add", "a.test", "--image", "apache-php")
    assert result.exit_code == 0, result.output
    assert result.stdout == "a.test\n"
    assert "image 'apache-php' is not in the local image store" in result.stderr, result.stderr
    assert "`fcrun image build apache-php` or `fcrun image pull apache-php`" in result.stderr
    assert cli("app", "ls", "-q").stdout == "a.test\n"  # added all the same

    result = cli("app", "add", "b.test", "--image", "site:1")
    assert result.exit_code == 0 and "`fcrun image pull site:1`" in result.stderr, result.stderr
    assert "image build" not in result.stderr  # no recipe of that name

    archive = docker_archive(tmp_path / "here.tar", [layer_tar(Entry("etc", "d"))], {}, ["here"])
    ImageStore(roots).import_(str(archive))
    result = cli("app", "add", "c.test", "--image", "here")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "c.test\n", "")
    result = cli("app", "update", "c.test", "--image", "gone")
    assert result.exit_code == 0 and "image 'gone' is not in the local image store" in result.stderr


def test_a_ready_path_is_set_shown_and_cleared(cli):
    assert cli("app", "add", "r.test", "--image", "x", "--ready-path", "/healthz").exit_code == 0
    assert json.loads(cli("app", "show", "r.test", "--json").stdout)["app"]["ready_path"] == "/healthz"
    assert "ready:        GET /healthz answers 2xx/3xx" in cli("app", "show", "r.test").stdout
    assert cli("app", "update", "r.test", "--ready-path", "/up?deep=1").exit_code == 0
    assert json.loads(cli("app", "show", "r.test", "--json").stdout)["app"]["ready_path"] == "/up?deep=1"
    assert cli("app", "update", "r.test", "--ready-path", "off").exit_code == 0
    assert json.loads(cli("app", "show", "r.test", "--json").stdout)["app"]["ready_path"] is None
    assert "ready:        accepting connections" in cli("app", "show", "r.test").stdout
