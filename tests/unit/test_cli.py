"""CLI behaviour that needs no root: option parsing, messages, exit codes."""

import os

import pytest
from click.testing import CliRunner

from fcrun_cli.main import main


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("FCRUN_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("FCRUN_RUN", str(tmp_path / "run"))
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args))


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0, result.output
    for command in ("run", "ps", "kill", "rm", "freeze", "thaw", "update", "exec", "gc", "image"):
        assert f"  {command}" in result.output


def test_not_root_is_refused_before_anything_is_made(cli, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = cli("run", "--image", "busybox", "--", "true")
    assert result.exit_code == 77
    assert "fcrun needs root" in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("args,where", [
    (["run", "--image", "busybox", "--memory", "12Q", "--", "true"], "--memory"),
    (["run", "--image", "busybox", "--cpu", "lots", "--", "true"], "--cpu"),
    (["run", "--image", "busybox", "--pids", "0", "--", "true"], "--pids"),
    (["update", "x"], "nothing to update"),
    (["kill", "x", "NOTASIGNAL"], "unknown signal"),
])
def test_bad_options_exit_2_naming_the_option(cli, args, where):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert where in result.output


def test_ps_on_an_empty_state_root(cli):
    result = cli("ps")
    assert result.exit_code == 0
    assert result.output.split() == ["NAME", "STATE", "PID", "IP", "CPU", "MEMORY", "USED", "IMAGE", "AGE", "APP"]
