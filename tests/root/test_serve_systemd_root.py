"""`fcrun serve` as systemd runs it: sd_notify to a real datagram socket the test binds
(NOTIFY_SOCKET), and SIGHUP applying live settings, naming those that need a restart, and
refusing an invalid file. No unit is installed on this host (test_service_cli.py checks the
unit in a temporary root)."""

from __future__ import annotations

import signal
import socket

import pytest
from serving import serving

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()  # the socket's timeout bounds the wait
    return dict(line.split("=", 1) for line in data.splitlines())


@pytest.fixture
def notified(tmp_path, apache_php):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(30)
        with serving(tmp_path, apache_php, "[forkserver]\npool_size = 0\n") as srv:
            srv.env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
            site = tmp_path / "site"
            site.mkdir()
            (site / "index.php").write_text("<?php echo 'got ', strlen(file_get_contents('php://input'));")
            srv.site = str(site)
            yield srv, sock


def test_ready_after_listening_reload_live_and_restart_keys_then_stopping(notified):
    srv, sock = notified
    srv.start()
    ready = _receive(sock)
    assert ready["READY"] == "1" and f"127.0.0.1:{srv.port}" in ready["STATUS"]
    socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()  # listening when READY came

    srv.cli("app", "add", "body.test", "--image", "apache-php", "--docroot", srv.site)
    status, _, text = srv.request("body.test", method="POST", body=b"x" * 2000)
    assert (status, text) == (200, "got 2000")

    # A smaller body limit (live) and another port (needs a restart).
    original = srv.config.read_text()
    srv.config.write_text(original.replace(f'listen = "127.0.0.1:{srv.port}"', 'listen = "127.0.0.1:1"')
                          + "[proxy]\nmax_body_bytes = 1000\n")
    srv.proc.send_signal(signal.SIGHUP)
    assert _receive(sock)["RELOADING"] == "1"
    assert _receive(sock)["READY"] == "1"
    status, _, _ = srv.request("body.test", method="POST", body=b"x" * 2000)
    assert status == 413
    assert srv.request("body.test", method="POST", body=b"x" * 500)[:3:2] == (200, "got 500")
    events = srv.events("reload")
    assert events and "applied proxy.max_body_bytes" in events[-1]
    assert "need a restart" in events[-1] and "listen" in events[-1].split("need a restart")[1]

    # An invalid file: refused, serve keeps running with what it had (the 1000-byte limit).
    srv.config.write_text(original + "[proxy]\nmax_body_byte = 5\n")
    srv.proc.send_signal(signal.SIGHUP)
    assert _receive(sock)["RELOADING"] == "1"
    assert _receive(sock)["READY"] == "1"
    assert srv.proc.poll() is None
    assert srv.request("body.test", method="POST", body=b"x" * 2000)[0] == 413
    assert srv.request("body.test", method="POST", body=b"x" * 500)[0] == 200
    log = srv.read_log()
    assert str(srv.config) in log and "max_body_byte" in log and "keeping the running configuration" in log

    srv.proc.send_signal(signal.SIGTERM)
    assert _receive(sock)["STOPPING"] == "1"
    assert srv.proc.wait(timeout=60) == 0


def test_watchdog_pings_when_the_unit_asks_for_them(notified):
    srv, sock = notified
    srv.env["WATCHDOG_USEC"] = "200000"  # WatchdogSec=0.2s: a ping every 0.1 s
    srv.start()
    seen = set()
    while not {"READY", "WATCHDOG"} <= seen:  # the socket's timeout fails the test if one never comes
        seen |= set(_receive(sock))
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0
