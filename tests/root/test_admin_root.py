"""A real `fcrun serve` with its admin API on TLS and a metrics listener, as its configuration
file sets them up: `fcrun app` over https, and the attacks of test_admin_hostile.py sent to
the real process (which must keep serving root on its unix socket, and exit cleanly)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time

import pytest
from serving import serving

pytestmark = [pytest.mark.root, pytest.mark.slow]

TOKEN = "admin-root-token"
METRICS_TOKEN = "scrape-root-token"
MAX_CONNECTIONS = 4
WAIT_S = 20.0  # the longest a step waits before the test fails; never reached when it passes
HANDSHAKE_TIMEOUT_S = 60  # above WAIT_S: a connection the server took would outlast the test's wait
CLI = [sys.executable, "-m", "fcrun_cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, apache_php):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make a test certificate")
    cert, key = tmp_path / "admin.crt", tmp_path / "admin.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    admin_port, metrics_port = free_port(), free_port()
    config = (f'admin_listen = "127.0.0.1:{admin_port}"\nadmin_token = "{TOKEN}"\n'
              f'admin_tls_cert = "{cert}"\nadmin_tls_key = "{key}"\n'
              f'metrics_listen = "127.0.0.1:{metrics_port}"\nmetrics_token = "{METRICS_TOKEN}"\n'
              f"admin_max_connections = {MAX_CONNECTIONS}\nadmin_header_timeout_s = {HANDSHAKE_TIMEOUT_S}\n"
              "[forkserver]\npool_size = 0\n")
    with serving(tmp_path, apache_php, config) as srv:
        srv.start()
        srv.admin_address, srv.metrics_address, srv.cert = ("127.0.0.1", admin_port), ("127.0.0.1", metrics_port), cert
        for address in (srv.admin_address, srv.metrics_address):
            wait_until(lambda: connects(address), f"serve listening on {address}")
        site = tmp_path / "site"
        site.mkdir()
        srv.site = str(site)
        yield srv


def connects(address) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
        return True
    except OSError:
        return False


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def _answered_200(address, data: bytes, tls: ssl.SSLContext) -> bool:
    """Whether the admin API answers 200; until serve has seen the flood's sockets close it is
    still at its cap and closes new ones at accept (a handshake then ends in EOF)."""
    try:
        return exchange(address, data, tls).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def exchange(address, data: bytes, tls: ssl.SSLContext | None = None) -> bytes:
    """Send `data`, return all the server answers until it closes (a reset counts as closed)."""
    sock = socket.create_connection(address, timeout=WAIT_S)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
    with sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, ssl.SSLEOFError):
            pass
        return answer


def request(method: str, path: str, token: str | None, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n{extra}\r\n".encode()


def test_the_admin_api_over_tls_and_the_metrics_listener(server):
    remote = dict(server.env, FCRUN_ADMIN_URL=f"https://127.0.0.1:{server.admin_address[1]}",
                  FCRUN_ADMIN_TOKEN=TOKEN, FCRUN_ADMIN_CA=str(server.cert))
    added = subprocess.run([*CLI, "app", "add", "a.test", "--image", "apache-php", "--docroot", server.site],
                           env=remote, capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    untrusting = {k: v for k, v in remote.items() if k != "FCRUN_ADMIN_CA"}  # the system's CAs only
    listed = subprocess.run([*CLI, "app", "ls"], env=untrusting, capture_output=True, text=True, timeout=60)
    assert listed.returncode != 0 and "not trusted" in listed.stderr

    tls = ssl.create_default_context(cafile=str(server.cert))
    metrics = exchange(server.metrics_address, request("GET", "/metrics", METRICS_TOKEN))
    assert metrics.startswith(b"HTTP/1.1 200 ") and b'fcrun_instances{app="a.test",state="ready"} 0' in metrics
    for token in (METRICS_TOKEN, "wrong"):  # the scrape token is no admin token
        answer = exchange(server.admin_address, request("DELETE", "/apps/a.test", token), tls)
        assert answer.startswith(b"HTTP/1.1 401 "), answer
    answer = exchange(server.admin_address, request("POST", "/apps", "wrong", "Content-Length: 1000000\r\n"), tls)
    assert answer.startswith(b"HTTP/1.1 401 "), answer  # at once: the megabyte never came
    assert not exchange(server.admin_address, request("GET", "/apps", TOKEN)).startswith(b"HTTP/")  # plain text
    assert "a.test" in server.cli("app", "ls").stdout  # root's unix socket, and nothing was removed


def test_a_connection_flood_leaves_root_its_unix_socket(server):
    held = [socket.create_connection(server.admin_address, timeout=WAIT_S) for _ in range(MAX_CONNECTIONS)]
    try:
        # The held ones are accepted first and never shake hands: one more is closed at accept
        # (one the server took would wait for its handshake longer than the test waits).
        assert exchange(server.admin_address, b"") == b""
        assert server.cli("app", "ls").returncode == 0  # the unix socket counts its own connections
        assert "connections open, the most allowed" in server.read_log()
    finally:
        for sock in held:
            sock.close()
    tls = ssl.create_default_context(cafile=str(server.cert))
    wait_until(lambda: _answered_200(server.admin_address, request("GET", "/apps", TOKEN), tls),
               "the TLS admin API served again")
