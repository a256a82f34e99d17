"""`fcrun service install|uninstall` into a temporary root (no unit is installed on this host),
and the unit checked by systemd-analyze where it exists."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fcrun_cli.main import main as cli
from fcrun_cli.service import fcrun_executable, unit_text

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _unit(root: pathlib.Path) -> str:
    return (root / "etc/systemd/system/fcrun.service").read_text()


def test_install_into_a_root_writes_the_unit_and_the_commented_default_config(tmp_path):
    result = CliRunner().invoke(cli, ["service", "install", "--root", str(tmp_path), "--fcrun", "/usr/bin/fcrun"])
    assert result.exit_code == 0, result.output
    unit = _unit(tmp_path)
    for line in ("Type=notify", "ExecStart=/usr/bin/fcrun serve\n", "ExecReload=/bin/kill -HUP $MAINPID",
                 "Delegate=yes", "KillMode=mixed", "TimeoutStopSec=50", "Restart=on-failure",
                 "WantedBy=multi-user.target"):
        assert line in unit
    for hiding in ("PrivateTmp", "ProtectSystem", "ProtectControlGroups", "ProtectKernelTunables", "PrivateDevices"):
        assert hiding not in unit  # they would hide or freeze /sys/fs/cgroup, /run/netns, mounts
    from fcrun.serve.config_example import render

    assert (tmp_path / "etc/fcrun/fcrun.toml").read_text() == render()


def test_install_keeps_an_existing_config_and_follows_its_drain_timeout(tmp_path):
    config = tmp_path / "etc/fcrun/prod.toml"
    config.parent.mkdir(parents=True)
    config.write_text("drain_timeout_s = 40\n")
    result = CliRunner().invoke(cli, ["service", "install", "--root", str(tmp_path), "--fcrun", "/usr/bin/fcrun",
                                      "--config", "/etc/fcrun/prod.toml"])
    assert result.exit_code == 0, result.output
    unit = _unit(tmp_path)
    assert "ExecStart=/usr/bin/fcrun serve --config /etc/fcrun/prod.toml\n" in unit
    assert "TimeoutStopSec=110" in unit  # two drains of 40 s, and 30 s for the rest
    assert config.read_text() == "drain_timeout_s = 40\n"
    assert not (tmp_path / "etc/fcrun/fcrun.toml").exists()


def test_install_refuses_an_invalid_config_naming_it(tmp_path):
    config = tmp_path / "etc/fcrun/fcrun.toml"
    config.parent.mkdir(parents=True)
    config.write_text("drain_timeout = 40\n")
    result = CliRunner().invoke(cli, ["service", "install", "--root", str(tmp_path), "--fcrun", "/usr/bin/fcrun"])
    assert result.exit_code != 0
    assert "fcrun.toml" in result.output and "drain_timeout" in result.output
    assert not (tmp_path / "etc/systemd/system/fcrun.service").exists()


def test_uninstall_removes_the_unit_and_keeps_the_config(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["service", "install", "--root", str(tmp_path), "--fcrun", "/usr/bin/fcrun"]).exit_code == 0
    result = runner.invoke(cli, ["service", "uninstall", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "etc/systemd/system/fcrun.service").exists()
    assert (tmp_path / "etc/fcrun/fcrun.toml").exists()
    again = runner.invoke(cli, ["service", "uninstall", "--root", str(tmp_path)])
    assert again.exit_code != 0 and "not installed" in again.output


def test_the_packaged_unit_is_the_generated_one():
    assert (ROOT / "packaging/systemd/fcrun.service").read_text() == unit_text("/usr/bin/fcrun")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # The real executable: verify checks that ExecStart's program exists.
    unit = tmp_path / "fcrun.service"
    unit.write_text(unit_text(fcrun_executable(), "/etc/fcrun/fcrun.toml", 10.0))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "fcrun.service" not in result.stderr, result.stderr  # no warning about our unit
