"""sd_notify spoken natively (serve/sdnotify.py), to a real unix datagram socket the test binds."""

from __future__ import annotations

import os
import socket

import pytest

from fcrun.serve.sdnotify import Notifier, watchdog_interval_s


def _receive(sock: socket.socket) -> dict[str, str]:
    sock.settimeout(5)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_a_path_socket_gets_ready_reloading_and_stopping(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        notifier = Notifier(path)
        assert notifier.ready("serving on x")
        assert _receive(sock) == {"READY": "1", "STATUS": "serving on x"}
        assert notifier.reloading()
        got = _receive(sock)
        assert got["RELOADING"] == "1" and int(got["MONOTONIC_USEC"]) > 0
        assert notifier.stopping("draining")
        assert _receive(sock) == {"STOPPING": "1", "STATUS": "draining"}
        assert notifier.watchdog()
        assert _receive(sock) == {"WATCHDOG": "1"}


def test_an_abstract_socket_named_with_at():
    name = f"fcrun-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        assert Notifier("@" + name).ready("ok")
        assert _receive(sock)["READY"] == "1"


def test_no_notify_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled and not notifier.ready("x")


def test_a_socket_nobody_reads_is_logged_once_and_not_raised(tmp_path, caplog):
    notifier = Notifier(str(tmp_path / "gone"))
    assert not notifier.ready("x") and not notifier.stopping("y")
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1
    assert str(tmp_path / "gone") in caplog.records[0].getMessage()


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "4000000"}, 2.0),
    ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}, 2.0),
    ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
])
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(env, expected):
    assert watchdog_interval_s(env) == expected
