"""SIGHUP's rules (serve/reload.py), the default config file and the shipped example
(serve/config_example.py, packaging/fcrun.toml.example)."""

from __future__ import annotations

import pathlib

import msgspec
import pytest

from fcrun.errors import NotFound, SpecError
from fcrun.paths import Paths
from fcrun.proxy.config import ProxyConfig
from fcrun.serve.config import ServeConfig, default_config_path, load_config
from fcrun.serve.config_example import render, uncommented
from fcrun.serve.reload import changed_keys, classify, flatten, is_live, with_live

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "packaging" / "fcrun.toml.example"
PATHS = Paths(data_root="/var/lib/fcrun", run_root="/run/fcrun")


def _config(tmp_path, text: str) -> ServeConfig:
    path = tmp_path / "fcrun.toml"
    path.write_text(text)
    return load_config(str(path), PATHS)


def test_changed_keys_names_nested_keys_by_their_dotted_path(tmp_path):
    old = _config(tmp_path, "")
    new = _config(tmp_path, 'listen = "127.0.0.1:9"\nhold_timeout_s = 3\n[proxy]\nmax_body_bytes = 5\n'
                            '[forkserver]\npool_sizes = {"apache-php" = 4}\n')
    assert changed_keys(old, new) == ["forkserver.pool_sizes", "hold_timeout_s", "listen", "proxy.max_body_bytes"]
    assert changed_keys(old, old) == []


@pytest.mark.parametrize("key", ["hold_timeout_s", "drain_timeout_s", "proxy.max_body_bytes", "proxy.via",
                                 "defaults.cpu", "forkserver.pool_size", "forkserver.pool_sizes"])
def test_live_keys(key):
    assert is_live(key)


@pytest.mark.parametrize("key", ["listen", "admin_socket", "admin_listen", "admin_token", "metrics_listen",
                                 "metrics_interval_s", "docroot_roots", "runtime.cgroup_parent", "runtime.bridge",
                                 "runtime.subnet", "runtime.data_root", "forkserver.enabled", "forkserver.pool_cpu",
                                 "cmdb.url", "proxyish", "a_key_added_later"])
def test_keys_that_need_a_restart(key):
    assert not is_live(key)


def test_classify_splits_and_keeps_the_order():
    assert classify(["hold_timeout_s", "listen", "proxy.via", "runtime.bridge"]) == (
        ["hold_timeout_s", "proxy.via"], ["listen", "runtime.bridge"])


def test_with_live_takes_only_the_live_values(tmp_path):
    old = _config(tmp_path, "")
    new = _config(tmp_path, 'listen = "127.0.0.1:9"\ndrain_timeout_s = 2\n[proxy]\nmax_body_bytes = 5\n'
                            '[runtime]\nbridge = "other0"\n[forkserver]\npool_size = 7\npool_cpu = 0.5\n')
    applied = with_live(old, new, changed_keys(old, new))
    assert applied.drain_timeout_s == 2 and applied.proxy.max_body_bytes == 5 and applied.forkserver.pool_size == 7
    assert applied.listen == old.listen and applied.runtime.bridge == old.runtime.bridge
    assert applied.forkserver.pool_cpu == old.forkserver.pool_cpu
    # Nothing else moved: the proxy's other settings are the old ones.
    assert applied.proxy == msgspec.structs.replace(old.proxy, max_body_bytes=5)
    assert changed_keys(applied, new) == ["forkserver.pool_cpu", "listen", "runtime.bridge"]


def test_flatten_covers_every_field_of_every_table():
    keys = flatten(ServeConfig())
    assert len([k for k in keys if k.startswith("proxy.")]) == len(ProxyConfig.__struct_fields__)
    assert "runtime.cgroup_parent" in keys and "proxy" not in keys


def test_default_config_path_is_read_only_when_present_and_a_named_file_wins(tmp_path):
    default = tmp_path / "fcrun.toml"
    assert default_config_path(None, str(default)) is None
    default.write_text("")
    assert default_config_path(None, str(default)) == str(default)
    assert default_config_path("/etc/other.toml", str(default)) == "/etc/other.toml"
    with pytest.raises(NotFound, match="/nonexistent.toml"):  # a named file stays required
        load_config(default_config_path("/nonexistent.toml", str(default)), PATHS)


def test_the_shipped_example_is_the_generated_one():
    assert EXAMPLE.read_text() == render(), "regenerate: python -m fcrun.serve.config_example > " + str(EXAMPLE)


def test_the_example_as_shipped_and_uncommented_decodes_to_the_defaults(tmp_path):
    defaults = load_config(None, PATHS)
    assert _config(tmp_path, EXAMPLE.read_text()) == defaults
    text = uncommented(EXAMPLE.read_text())
    assert "hold_timeout_s = 30.0" in text and "max_body_bytes = 10485760" in text
    assert _config(tmp_path, text) == defaults
    # Every key with a default is there to uncomment (unset ones are listed as such).
    set_keys = {k for k, v in flatten(defaults).items() if v is not None}
    for key in flatten(defaults):
        name = key.rsplit(".", 1)[-1]
        assert f"# {name} = " in EXAMPLE.read_text(), key
    assert len([line for line in text.splitlines() if " = " in line]) == len(set_keys)


def test_an_invalid_file_names_the_file_and_the_key(tmp_path):
    with pytest.raises(SpecError, match=r"fcrun.toml.*max_body_byte"):
        _config(tmp_path, "[proxy]\nmax_body_byte = 5\n")


def test_fcrun_app_and_cmdb_read_the_default_file_like_serve(tmp_path, monkeypatch):
    import click

    from fcrun_cli.cmdb import chosen_url

    default = tmp_path / "fcrun.toml"
    monkeypatch.setattr("fcrun.serve.config.DEFAULT_CONFIG_PATH", str(default))
    monkeypatch.delenv("FCRUN_CONFIG", raising=False)
    ctx = click.Context(click.Command("x"), obj=None)
    assert chosen_url(ctx) is None
    default.write_text('[cmdb]\nurl = "postgresql://fcrun@db.example/fcrun"\n')
    assert chosen_url(ctx) == "postgresql://fcrun@db.example/fcrun"
    other = tmp_path / "other.toml"
    other.write_text("")
    monkeypatch.setenv("FCRUN_CONFIG", str(other))  # a named file wins
    assert chosen_url(ctx) is None
