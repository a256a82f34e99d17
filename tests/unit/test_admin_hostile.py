"""The admin API under hostile clients: each attack is sent for real, over real sockets, and
seen to fail (a wrong token with a huge body, too many connections, a slow head or body, an idle
connection, a metrics token on an admin route, plain text on the TLS port). No test measures
time: the server's deadlines are made short, and each test asserts what the server answered."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time

import pytest
import uvloop

from fcrun.cmdb import NewApp, SqliteCMDB
from fcrun.errors import NotPermitted, SpecError
from fcrun.serve.admin_client import AdminClient, ServerUnavailable, TransportError
from fcrun.serve.admin_http import HttpError, RequestParser
from fcrun.serve.admin_protocol import MIN_TLS_VERSION, AdminLimits, client_tls_context, server_tls_context
from fcrun.serve.admin_server import AdminServer, serve_in_thread
from fcrun.serve.controller import DirectController

TOKEN = "admin-s3cret"
METRICS_TOKEN = "scrape-only"
WAIT_S = 20.0  # the longest a test waits for an answer before it fails: never reached when it passes
SHORT = AdminLimits(max_connections=3, keepalive_timeout_s=0.3, header_timeout_s=0.3, body_timeout_s=0.3,
                    max_body_bytes=4096)
# Serve runs on uvloop; the tests run each server on both loops.
LOOPS = pytest.mark.parametrize("loop_factory", [uvloop.new_event_loop, None], ids=["uvloop", "asyncio"])



@pytest.fixture
def cmdb(tmp_path):
    db = SqliteCMDB(str(tmp_path / "cmdb.sqlite3"))
    yield db
    db.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1, and its key: (cert, key) paths."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make a test certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = str(where / "cert.pem"), str(where / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def start(cmdb, short_dir, loop_factory=None, **kwargs):
    """serve_in_thread on the loop asked for, with the TCP listener and the short limits."""
    kwargs.setdefault("tcp_listen", "127.0.0.1:0")
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("limits", SHORT)
    if loop_factory is not None:
        kwargs["loop_factory"] = loop_factory
    return serve_in_thread(DirectController(cmdb), os.path.join(short_dir, "admin.sock"), **kwargs)


def connect(address, tls: ssl.SSLContext | None = None) -> socket.socket:
    sock = socket.create_connection(address, timeout=WAIT_S)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLEOFError):
        pass
    return data


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def head(path="/apps", method="GET", token=TOKEN, extra=""):
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}{extra}\r\n".encode()


# -- the token is checked on the head, before the body ------------------------------------------


@LOOPS
def test_a_wrong_token_with_a_huge_body_is_answered_401_without_waiting_for_the_body(cmdb, short_dir, loop_factory):
    with start(cmdb, short_dir, loop_factory, limits=AdminLimits()) as server:  # the default deadlines
        for token in ("wrong", None, TOKEN + "x"):
            with connect(server.tcp_address) as sock:
                # The head says a megabyte follows; not a byte of it is ever sent.
                sock.sendall(head("/apps", "POST", token, "Content-Length: 1000000\r\n"))
                answer = read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 401 "), answer
            assert b"WWW-Authenticate: Bearer" in answer and b"Connection: close" in answer
        assert cmdb.list_apps() == []


def test_the_head_check_runs_before_the_parser_takes_a_byte_of_the_body():
    seen = []

    def refuse(request):
        seen.append(request.body)
        raise HttpError(401, "no")

    parser = RequestParser(check_head=refuse)
    with pytest.raises(HttpError) as info:
        parser.feed(b"POST /apps HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789")
    assert info.value.status == 401 and seen == [b""] and not parser.complete


def test_a_body_announced_over_the_limit_is_refused_on_its_head(cmdb, short_dir):
    with start(cmdb, short_dir) as server:
        with connect(server.tcp_address) as sock:
            sock.sendall(head("/apps", "POST", TOKEN, f"Content-Length: {SHORT.max_body_bytes + 1}\r\n"))
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 413 "), answer


# -- deadlines -------------------------------------------------------------------------------


@LOOPS
def test_a_slow_head_is_cut_with_408(cmdb, short_dir, loop_factory):
    with start(cmdb, short_dir, loop_factory) as server:
        with connect(server.tcp_address) as sock:
            sock.sendall(b"GET /apps HTTP/1.1\r\nX-Slow: ")
            sock.settimeout(0.05)
            answer = b""
            for _ in range(int(WAIT_S / 0.05)):  # slowloris: a byte at a time, the head never ends
                try:
                    sock.sendall(b"a")
                    answer = sock.recv(65536)
                    break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"request head not complete" in answer
        assert AdminClient(server.socket_path).list_apps() == []  # serve goes on


def test_a_slow_body_is_cut_with_408(cmdb, short_dir):
    with start(cmdb, short_dir) as server:
        with connect(server.tcp_address) as sock:
            sock.sendall(head("/apps", "POST", TOKEN, "Content-Length: 100\r\n") + b'{"name": ')
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request body not complete" in answer
        assert cmdb.list_apps() == []


@LOOPS
def test_an_idle_connection_is_closed(cmdb, short_dir, loop_factory):
    with start(cmdb, short_dir, loop_factory) as server:
        with connect(server.tcp_address) as sock:
            assert read_until_closed(sock) == b""  # nothing sent, nothing answered: closed
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # the unix socket too
            sock.settimeout(WAIT_S)
            sock.connect(server.socket_path)
            sock.sendall(b"GET /apps HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")  # answered, then idle: closed
        wait_until(lambda: all(lst.open_connections == 0 for lst in server.listeners), "all connections closed")


# -- the connection limit ----------------------------------------------------------------------


@LOOPS
def test_connections_over_the_limit_are_refused_and_root_keeps_the_unix_socket(cmdb, short_dir, loop_factory):
    limits = AdminLimits(max_connections=3)  # no short deadline: the held connections stay
    with start(cmdb, short_dir, loop_factory, limits=limits) as server:
        tcp = server.listener("tcp")
        held = [connect(server.tcp_address) for _ in range(limits.max_connections)]
        try:
            wait_until(lambda: tcp.open_connections == limits.max_connections, "the held connections counted")
            with connect(server.tcp_address) as extra:  # sends nothing: the answer comes at accept
                answer = read_until_closed(extra)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"too many admin connections" in answer, answer
            assert tcp.refused_connections >= 1 and tcp.open_connections == limits.max_connections
            assert AdminClient(server.socket_path).list_apps() == []  # the unix socket has a count of its own
            with pytest.raises(ServerUnavailable, match="too many admin connections"):
                AdminClient(f"http://127.0.0.1:{server.tcp_address[1]}", TOKEN).list_apps()
            held.pop().close()
            wait_until(lambda: tcp.open_connections == limits.max_connections - 1, "a held connection ended")
            assert AdminClient(f"http://127.0.0.1:{server.tcp_address[1]}", TOKEN).list_apps() == []
        finally:
            for sock in held:
                sock.close()


# -- the metrics listener and its token ---------------------------------------------------------


@pytest.fixture
def with_metrics(cmdb, short_dir):
    with start(cmdb, short_dir, metrics_listen="127.0.0.1:0", metrics_token=METRICS_TOKEN) as server:
        AdminClient(server.socket_path).add_app(NewApp(name="a.test", image="x"))
        yield server


def raw(address, request: bytes, tls=None) -> bytes:
    with connect(address, tls) as sock:
        sock.sendall(request)
        return read_until_closed(sock)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_the_metrics_listener_serves_metrics_with_its_token_only(with_metrics):
    metrics = with_metrics.listener("metrics").bound_address
    close = "Connection: close\r\n"
    answer = raw(metrics, head("/metrics", token=METRICS_TOKEN, extra=close))
    assert status_of(answer) == 200 and b'fcrun_instances{app="a.test",state="ready"} 0' in answer
    assert status_of(raw(metrics, head("/metrics", token=None, extra=close))) == 401
    assert status_of(raw(metrics, head("/metrics", token=TOKEN, extra=close))) == 401  # not the admin token
    # Nothing but GET /metrics, whatever token: the admin routes do not exist there.
    for method, path, token in [("GET", "/apps", METRICS_TOKEN), ("DELETE", "/apps/a.test", METRICS_TOKEN),
                                ("GET", "/stats", METRICS_TOKEN), ("POST", "/apps", METRICS_TOKEN)]:
        assert status_of(raw(metrics, head(path, method, token, "Content-Length: 0\r\n" + close))) == 404
    assert status_of(raw(metrics, head("/metrics", "POST", METRICS_TOKEN, "Content-Length: 0\r\n" + close))) == 405
    assert [a.name for a in AdminClient(with_metrics.socket_path).list_apps()] == ["a.test"]


def test_a_metrics_token_authorizes_nothing_on_the_admin_listener(with_metrics):
    url = f"http://127.0.0.1:{with_metrics.tcp_address[1]}"
    scraper = AdminClient(url, METRICS_TOKEN)
    for call in (scraper.list_apps, lambda: scraper.remove_app("a.test"), scraper.metrics_text,
                 lambda: scraper.add_app(NewApp(name="b.test", image="x"))):
        with pytest.raises(NotPermitted, match="bearer token"):
            call()
    assert [a.name for a in AdminClient(url, TOKEN).list_apps()] == ["a.test"]  # nothing changed
    assert 'fcrun_instances{app="a.test",state="ready"}' in AdminClient(with_metrics.socket_path).metrics_text()  # root's unix socket


def test_an_open_metrics_listener_still_serves_only_metrics(cmdb, short_dir):
    with start(cmdb, short_dir, tcp_listen=None, token=None, metrics_listen="127.0.0.1:0") as server:
        metrics = server.listener("metrics").bound_address
        close = "Connection: close\r\n"
        assert status_of(raw(metrics, head("/metrics", token=None, extra=close))) == 200
        assert status_of(raw(metrics, head("/apps", token=None, extra=close))) == 404


def test_the_admin_token_cannot_double_as_the_metrics_token(cmdb, short_dir):
    with pytest.raises(SpecError, match="metrics_token must differ"):
        AdminServer(DirectController(cmdb), os.path.join(short_dir, "a.sock"), tcp_listen="127.0.0.1:0",
                    token=TOKEN, metrics_listen="127.0.0.1:0", metrics_token=TOKEN)


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture
def tls_server(cmdb, short_dir, certificate, request):
    cert, key = certificate
    with start(cmdb, short_dir, request.param, tls=server_tls_context(cert, key)) as server:
        yield server


TLS_LOOPS = pytest.mark.parametrize("tls_server", [uvloop.new_event_loop, None], ids=["uvloop", "asyncio"],
                                    indirect=True)


@TLS_LOOPS
def test_tls_with_the_certificate_trusted(tls_server, certificate):
    port = tls_server.tcp_address[1]
    for host in ("127.0.0.1", "localhost"):
        assert AdminClient(f"https://{host}:{port}", TOKEN, ca_file=certificate[0]).list_apps() == []
    with pytest.raises(NotPermitted, match="bearer token"):
        AdminClient(f"https://127.0.0.1:{port}", "wrong", ca_file=certificate[0]).list_apps()


@TLS_LOOPS
def test_a_wrong_token_over_tls_gets_401_without_the_body(tls_server, certificate):
    answer = raw(tls_server.tcp_address, head("/apps", "POST", "wrong", "Content-Length: 1000000\r\n"),
                 client_tls_context(certificate[0]))
    assert answer.startswith(b"HTTP/1.1 401 "), answer


@TLS_LOOPS
def test_plain_http_on_the_tls_port_fails_cleanly(tls_server, certificate):
    port = tls_server.tcp_address[1]
    answer = raw(tls_server.tcp_address, head())
    assert not answer.startswith(b"HTTP/"), answer  # no plain-text answer, no admin route reached
    with pytest.raises(TransportError, match="https://"):
        AdminClient(f"http://127.0.0.1:{port}", TOKEN).list_apps()
    tcp = tls_server.listener("tcp")
    wait_until(lambda: tcp.open_connections == 0, "the failed handshakes' connections closed")
    assert AdminClient(f"https://127.0.0.1:{port}", TOKEN, ca_file=certificate[0]).list_apps() == []


@TLS_LOOPS
def test_a_client_that_does_not_trust_the_certificate_is_told_so(tls_server):
    with pytest.raises(TransportError, match="not trusted.*CA file"):
        AdminClient(f"https://127.0.0.1:{tls_server.tcp_address[1]}", TOKEN).list_apps()  # the system CAs only


@TLS_LOOPS
def test_a_handshake_that_never_comes_is_cut(tls_server):
    with connect(tls_server.tcp_address) as sock:
        assert read_until_closed(sock) == b""  # no ClientHello: closed after header_timeout_s
    tcp = tls_server.listener("tcp")
    wait_until(lambda: tcp.open_connections == 0, "the connection released")


@LOOPS
def test_handshakes_count_against_the_limit_and_a_refused_tls_client_gets_no_plain_text(
        cmdb, short_dir, certificate, loop_factory):
    limits = AdminLimits(max_connections=3)  # no short deadline: the held connections stay
    with start(cmdb, short_dir, loop_factory, tls=server_tls_context(*certificate), limits=limits) as server:
        tcp = server.listener("tcp")
        held = [connect(server.tcp_address) for _ in range(limits.max_connections)]  # no ClientHello, ever
        try:
            wait_until(lambda: tcp.open_connections == limits.max_connections, "the held connections counted")
            with connect(server.tcp_address) as extra:
                assert read_until_closed(extra) == b""
            assert tcp.refused_connections == 1
            with pytest.raises(ServerUnavailable, match="too many admin connections"):
                AdminClient(f"https://127.0.0.1:{server.tcp_address[1]}", TOKEN, ca_file=certificate[0]).list_apps()
            held.pop().close()
            wait_until(lambda: tcp.open_connections == limits.max_connections - 1, "a held connection ended")
            assert AdminClient(f"https://127.0.0.1:{server.tcp_address[1]}", TOKEN,
                               ca_file=certificate[0]).list_apps() == []
        finally:
            for sock in held:
                sock.close()


def test_https_to_a_plain_listener_fails_cleanly(cmdb, short_dir, certificate):
    with start(cmdb, short_dir) as server:
        with pytest.raises(TransportError, match="TLS handshake failed.*http://"):
            AdminClient(f"https://127.0.0.1:{server.tcp_address[1]}", TOKEN, ca_file=certificate[0]).list_apps()


def test_both_sides_refuse_anything_older_than_tls_1_2(certificate):
    assert server_tls_context(*certificate).minimum_version == MIN_TLS_VERSION == ssl.TLSVersion.TLSv1_2
    assert client_tls_context(certificate[0]).minimum_version == MIN_TLS_VERSION


@LOOPS
def test_failed_and_refused_connections_leave_no_file_descriptor_behind(cmdb, short_dir, certificate, loop_factory):
    limits = AdminLimits(max_connections=3)  # no short deadline: the held connections stay
    with start(cmdb, short_dir, loop_factory, tls=server_tls_context(*certificate), limits=limits) as server:
        tcp = server.listener("tcp")
        AdminClient(f"https://127.0.0.1:{server.tcp_address[1]}", TOKEN, ca_file=certificate[0]).list_apps()
        wait_until(lambda: tcp.open_connections == 0, "the first connection closed")
        before = len(os.listdir("/proc/self/fd"))
        held = [connect(server.tcp_address) for _ in range(limits.max_connections)]
        try:
            wait_until(lambda: tcp.open_connections == limits.max_connections, "the held connections counted")
            for _ in range(20):
                assert raw(server.tcp_address, b"") == b""  # refused over the limit
            assert tcp.refused_connections == 20
        finally:
            for sock in held:
                sock.close()
        for _ in range(20):
            raw(server.tcp_address, head())  # plain text to TLS: the handshake fails
        wait_until(lambda: tcp.open_connections == 0, "every connection closed")
        wait_until(lambda: len(os.listdir("/proc/self/fd")) == before, "the server's sockets closed")


@LOOPS
def test_closing_the_server_does_not_wait_for_its_clients(cmdb, short_dir, certificate, loop_factory):
    # Deadlines longer than pytest's own timeout: if close waited for any of these clients
    # (an idle TLS keep-alive, a handshake never begun, a plain keep-alive), the test would fail.
    patient = AdminLimits(keepalive_timeout_s=3600, header_timeout_s=3600, body_timeout_s=3600)
    tls = client_tls_context(certificate[0])
    with start(cmdb, short_dir, loop_factory, tls=server_tls_context(*certificate), limits=patient,
               metrics_listen="127.0.0.1:0") as server:
        idle_tls = connect(server.tcp_address, tls)
        idle_tls.sendall(head())
        assert idle_tls.recv(65536).startswith(b"HTTP/1.1 200 ")
        silent = connect(server.tcp_address)
        idle_plain = connect(server.listener("metrics").bound_address)
        idle_plain.sendall(head("/metrics", token=None))
        assert idle_plain.recv(65536).startswith(b"HTTP/1.1 200 ")
        tcp = server.listener("tcp")
        wait_until(lambda: tcp.open_connections == 2, "both TLS-port connections counted")
    for sock in (idle_tls, silent, idle_plain):
        assert read_until_closed(sock) == b""  # closed by the server as it stopped
        sock.close()
