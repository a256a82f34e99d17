"""Serve's admin settings as the configuration file gives them: TLS files checked at load with
errors that name the key and the file, the rule for a non-loopback admin_listen, the metrics
listener's token, the connection bounds; and `fcrun app` over https with FCRUN_ADMIN_CA."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest
from click.testing import CliRunner

from fcrun.cmdb import SqliteCMDB
from fcrun.errors import SpecError
from fcrun.paths import Paths
from fcrun.serve.admin_protocol import AdminLimits, client_tls_context, is_loopback
from fcrun.serve.admin_server import admin_options, serve_in_thread
from fcrun.serve.config import ServeConfig, load_config
from fcrun.serve.controller import DirectController
from fcrun_cli.app import app
from fcrun_cli.main import main

main.add_command(app)  # cli/main.py adds it; registering again is harmless




def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """cert.pem/key.pem (a pair), other_key.pem (not theirs), encrypted_key.pem, not_pem.txt."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make test certificates")
    where = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    openssl("req", "-x509", *ec, "-nodes", "-keyout", str(where / "key.pem"), "-out", str(where / "cert.pem"),
            "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(where / "other_key.pem"))
    openssl("pkey", "-in", str(where / "key.pem"), "-aes256", "-passout", "pass:secret",
            "-out", str(where / "encrypted_key.pem"))
    (where / "not_pem.txt").write_text("hello\n")
    return where


def tls_config(cert: str, key: str) -> str:
    return f'admin_listen = "127.0.0.1:0"\nadmin_token = "t"\nadmin_tls_cert = "{cert}"\nadmin_tls_key = "{key}"\n'


def test_the_defaults(paths):
    config = load_config(None, paths)
    limits = AdminLimits()
    assert (config.admin_max_connections, config.admin_keepalive_timeout_s, config.admin_header_timeout_s,
            config.admin_body_timeout_s, config.admin_max_body_bytes) == (
        limits.max_connections, limits.keepalive_timeout_s, limits.header_timeout_s, limits.body_timeout_s,
        limits.max_body_bytes)
    assert config.admin_tls_cert is None and config.metrics_listen is None and not config.admin_allow_plaintext


def test_a_good_pair_loads_and_becomes_the_servers_options(write, paths, tls_files):
    config = load_config(write(tls_config(f"{tls_files}/cert.pem", f"{tls_files}/key.pem") + """
        admin_max_connections = 5
        admin_header_timeout_s = 2.5
        admin_max_body_bytes = 65536
        metrics_listen = "127.0.0.1:0"
        metrics_token = "scrape"
        metrics_tls = true
    """), paths)
    options = admin_options(config)
    assert options["tls"] is not None and options["metrics_tls"] is options["tls"]
    assert (options["tcp_listen"], options["token"], options["metrics_token"]) == ("127.0.0.1:0", "t", "scrape")
    assert options["limits"] == AdminLimits(max_connections=5, header_timeout_s=2.5, max_body_bytes=65536)


@pytest.mark.parametrize("cert,key,where,words", [
    ("missing.pem", "key.pem", "admin_tls_cert", r"missing\.pem: cannot read it: No such file"),
    ("cert.pem", "missing.pem", "admin_tls_key", r"missing\.pem: cannot read it: No such file"),
    ("not_pem.txt", "key.pem", "admin_tls_cert", r"not_pem\.txt: not a PEM certificate"),
    ("key.pem", "key.pem", "admin_tls_cert", r"key\.pem: not a PEM certificate"),
    ("cert.pem", "not_pem.txt", "admin_tls_key", r"not_pem\.txt: not a PEM private key"),
    ("cert.pem", "other_key.pem", "admin_tls_key", r"other_key\.pem: the key does not match admin_tls_cert .*cert\.pem"),
    ("cert.pem", "encrypted_key.pem", "admin_tls_key", r"encrypted_key\.pem: the key is encrypted"),
])
def test_bad_tls_files_are_named_with_their_key(write, paths, tls_files, cert, key, where, words):
    path = write(tls_config(f"{tls_files}/{cert}", f"{tls_files}/{key}"))
    with pytest.raises(SpecError, match=words) as info:
        load_config(path, paths)
    assert info.value.where == f"$.{where}" and str(info.value).startswith(f"{path}: {where} ")


@pytest.mark.parametrize("text,where,words", [
    ('admin_listen = "127.0.0.1:0"\nadmin_token = "t"\nadmin_tls_cert = "/x/cert.pem"', "admin_tls_key",
     "go together"),
    ('admin_listen = "127.0.0.1:0"\nadmin_token = "t"\nadmin_tls_cert = "cert.pem"\nadmin_tls_key = "key.pem"',
     "admin_tls_cert", "not an absolute path"),
    ('admin_listen = "0.0.0.0:8081"\nadmin_token = "t"', "admin_listen", "clear text"),
    ('admin_listen = "[::]:8081"\nadmin_token = "t"', "admin_listen", "clear text"),
    ('admin_listen = "admin.example:8081"\nadmin_token = "t"', "admin_listen", "clear text"),
    ('metrics_token = "m"', "metrics_token", "metrics_listen is not"),
    ('admin_listen = "127.0.0.1:0"\nadmin_token = "t"\nmetrics_listen = "127.0.0.1:0"\nmetrics_token = "t"',
     "metrics_token", "must differ from admin_token"),
    ('metrics_listen = "127.0.0.1:0"\nmetrics_token = ""', "metrics_token", "empty"),
    ('metrics_listen = "127.0.0.1:0"\nmetrics_tls = true', "metrics_tls", "needs admin_tls_cert"),
    ('metrics_listen = "nowhere"', "metrics_listen", "HOST:PORT"),
    ("admin_max_connections = 0", "admin_max_connections", "at least 1"),
    ("admin_header_timeout_s = 0", "admin_header_timeout_s", "positive"),
])
def test_bad_admin_settings_are_named(write, paths, text, where, words):
    with pytest.raises(SpecError, match=words) as info:
        load_config(write(text), paths)
    assert info.value.where == f"$.{where}"


def test_a_certificate_no_listener_uses_is_refused(write, paths, tls_files):
    text = f'admin_tls_cert = "{tls_files}/cert.pem"\nadmin_tls_key = "{tls_files}/key.pem"'
    with pytest.raises(SpecError, match="no listener uses it"):
        load_config(write(text), paths)


@pytest.mark.parametrize("listen", ["127.0.0.1:8081", "127.0.0.2:8081", "[::1]:8081", "localhost:8081"])
def test_loopback_needs_no_tls(write, paths, listen):
    assert load_config(write(f'admin_listen = "{listen}"\nadmin_token = "t"'), paths).admin_listen == listen


def test_a_network_listener_takes_tls_or_an_explicit_plaintext_consent(write, paths, tls_files):
    plain = load_config(write('admin_listen = "0.0.0.0:8081"\nadmin_token = "t"\nadmin_allow_plaintext = true'), paths)
    assert plain.admin_allow_plaintext
    text = tls_config(f"{tls_files}/cert.pem", f"{tls_files}/key.pem").replace("127.0.0.1:0", "0.0.0.0:8081")
    assert load_config(write(text), paths).admin_listen == "0.0.0.0:8081"


def test_is_loopback():
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.9.9.9", "::1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.test", ""]))


def test_a_ca_file_that_is_not_one_is_named(tls_files):
    with pytest.raises(SpecError, match=r"not_pem\.txt: not a PEM certificate"):
        client_tls_context(f"{tls_files}/not_pem.txt")
    with pytest.raises(SpecError, match=r"missing\.pem: cannot read it"):
        client_tls_context(f"{tls_files}/missing.pem")


def test_fcrun_app_over_https_trusts_the_ca_it_is_given(tls_files, tmp_path, monkeypatch):
    base = tempfile.mkdtemp(prefix="fc-", dir="/tmp")
    cmdb = SqliteCMDB(str(tmp_path / "cmdb.sqlite3"))
    try:
        monkeypatch.setenv("FCRUN_ROOT", os.path.join(base, "data"))
        monkeypatch.setenv("FCRUN_RUN", os.path.join(base, "run"))
        for name in ("FCRUN_ADMIN_SOCKET", "FCRUN_CONFIG"):
            monkeypatch.delenv(name, raising=False)
        tls = ServeConfig(admin_listen="127.0.0.1:0", admin_token="t", admin_tls_cert=f"{tls_files}/cert.pem",
                          admin_tls_key=f"{tls_files}/key.pem")
        with serve_in_thread(DirectController(cmdb), os.path.join(base, "admin.sock"), **admin_options(tls)) as srv:
            monkeypatch.setenv("FCRUN_ADMIN_URL", f"https://127.0.0.1:{srv.tcp_address[1]}")
            monkeypatch.setenv("FCRUN_ADMIN_TOKEN", "t")
            monkeypatch.delenv("FCRUN_ADMIN_CA", raising=False)
            result = CliRunner().invoke(main, ["app", "ls"])
            assert result.exit_code != 0 and "not trusted" in result.output, result.output
            monkeypatch.setenv("FCRUN_ADMIN_CA", f"{tls_files}/cert.pem")
            result = CliRunner().invoke(main, ["app", "ls"])
            assert result.exit_code == 0, result.output
    finally:
        cmdb.close()
        shutil.rmtree(base, ignore_errors=True)


def test_a_key_every_user_can_read_is_warned_about(tls_files, tmp_path, caplog):
    key = tmp_path / "key.pem"
    shutil.copy(f"{tls_files}/key.pem", key)
    config = ServeConfig(admin_listen="127.0.0.1:0", admin_token="t", admin_tls_cert=f"{tls_files}/cert.pem",
                         admin_tls_key=str(key))
    key.chmod(0o600)
    admin_options(config)
    assert "can be read by every user" not in caplog.text
    key.chmod(0o644)
    admin_options(config)
    assert f"admin_tls_key {key} can be read by every user" in caplog.text
