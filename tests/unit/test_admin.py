"""The admin API: every route through AdminClient over a real unix socket, the TCP listener's
bearer token, the socket's mode, error mapping, and the request parser on its own."""

from __future__ import annotations

import asyncio
import os
import socket
import stat

import msgspec
import pytest

from fcrun.cmdb import AppStats, AppUpdate, Instance, NewApp, Scale, SqliteCMDB
from fcrun.errors import AlreadyExists, IncorrectStatus, KernelError, NotFound, NotPermitted, SpecError
from fcrun.serve.admin_client import AdminClient, ServerUnavailable, remote_error
from fcrun.serve.admin_http import HttpError, RequestParser
from fcrun.serve.admin_server import AdminServer, peer_allowed, serve_in_thread
from fcrun.serve.controller import DirectController
from fcrun.serve.metrics import render_metrics
from fcrun.unixsock import peer_credentials

TOKEN = "s3cret-token"



@pytest.fixture
def cmdb(tmp_path):
    db = SqliteCMDB(str(tmp_path / "cmdb.sqlite3"))
    yield db
    db.close()


class ScalingController(DirectController):
    """A controller that can scale (as serve's manager will): records what it was asked."""

    def __init__(self, cmdb, **kwargs):
        super().__init__(cmdb, **kwargs)
        self.scaled: list[tuple[str, Scale]] = []

    async def scale(self, name, request):
        await super().get_app(name)
        self.scaled.append((name, request))
        return request


class SlowRemoval(DirectController):
    """remove_app never finishes (an instance that never drains); says whether it was cancelled."""

    def __init__(self, cmdb):
        super().__init__(cmdb)
        self.removing: list[str] = []
        self.cancelled: list[str] = []

    async def remove_app(self, name):
        self.removing.append(name)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise


@pytest.fixture
def server(cmdb, short_dir, tmp_path):
    controller = ScalingController(cmdb, docroot_roots=(str(tmp_path),))  # the tests' sites live there
    with serve_in_thread(controller, os.path.join(short_dir, "run", "admin.sock"),
                         tcp_listen="127.0.0.1:0", token=TOKEN) as srv:
        yield srv


@pytest.fixture
def client(server):
    return AdminClient(server.socket_path)


def test_the_socket_is_private_and_removed_on_close(cmdb, short_dir):
    path = os.path.join(short_dir, "admin.sock")
    with serve_in_thread(DirectController(cmdb), path):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert os.listdir(short_dir) == ["admin.sock"]  # the private staging dir is gone
    assert not os.path.exists(path)


def test_a_stale_socket_is_replaced_and_a_live_one_refused(cmdb, short_dir):
    path = os.path.join(short_dir, "admin.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a crashed server's
    with serve_in_thread(DirectController(cmdb), path):
        assert AdminClient(path).list_apps() == []
        with pytest.raises(AlreadyExists, match="another fcrun serve"):
            with serve_in_thread(DirectController(cmdb), path):
                pass
        assert AdminClient(path).list_apps() == []  # the refused start did not unlink ours


def test_the_admin_socket_appears_only_once_the_tcp_listeners_accept(cmdb, short_dir, monkeypatch):
    """What waits for serve (tests, scripts, `fcrun app`) waits for the admin socket: by then
    the metrics listener must accept too (a dashboard test once met a refused connection)."""
    from fcrun.serve import admin_server

    path = os.path.join(short_dir, "admin.sock")
    seen = []
    real_bind = admin_server._bind_admin_socket

    def bind_admin_socket(socket_path):
        server = servers[-1]
        metrics = server.listener("metrics")
        with socket.create_connection(metrics.sock.getsockname()[:2], timeout=5):  # accepted by the backlog
            seen.append("metrics accepts")
        return real_bind(socket_path)

    servers = []
    real_init = AdminServer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        servers.append(self)

    monkeypatch.setattr(admin_server, "_bind_admin_socket", bind_admin_socket)
    monkeypatch.setattr(AdminServer, "__init__", init)
    with serve_in_thread(DirectController(cmdb), path, metrics_listen="127.0.0.1:0"):
        assert os.path.exists(path)
    assert seen == ["metrics accepts"]


def test_a_non_socket_at_the_path_is_refused(cmdb, short_dir):
    path = os.path.join(short_dir, "admin.sock")
    open(path, "w").close()
    with pytest.raises(SpecError, match="not a socket"):
        with serve_in_thread(DirectController(cmdb), path):
            pass


def test_app_routes(client, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    added = client.add_app(NewApp(name="Example.test", image="apache-php", hostnames=["www.example.test"],
                                  docroot=str(site), cpu=0.3, memory_bytes=512 << 20))
    assert added.name == "example.test" and added.docroot == str(site) and added.generation == 1
    assert client.get_app("example.test") == added
    assert client.list_apps() == [added]

    updated = client.update_app("example.test", AppUpdate(max_instances=3, max_lifetime_s=3600.0))
    assert updated.max_instances == 3 and updated.generation == 2 and updated.cpu == 0.3

    assert client.remove_app("example.test") is True
    assert client.list_apps() == []
    assert [e.kind for e in client.events("example.test")] == ["app-added", "app-updated", "app-removed"]


def test_a_docroot_outside_the_roots_symlinked_or_missing_is_refused_and_nothing_written(client, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (tmp_path / "link").symlink_to(site)
    (tmp_path / "etc").symlink_to("/etc")
    for docroot, words in [("/etc", "outside the allowed docroot roots"), (str(tmp_path / "link"), "symlink"),
                           (str(tmp_path / "etc"), "symlink"), (str(tmp_path / "missing"), "does not exist"),
                           (str(tmp_path), "a docroot root itself")]:
        with pytest.raises(SpecError, match=words):
            client.add_app(NewApp(name="a.test", image="x", docroot=docroot))
    assert client.list_apps() == [] and client.events() == []
    client.add_app(NewApp(name="a.test", image="x", docroot=str(site)))
    with pytest.raises(SpecError, match="symlink"):
        client.update_app("a.test", AppUpdate(docroot=str(tmp_path / "link")))
    assert client.get_app("a.test").docroot == str(site) and client.get_app("a.test").generation == 1


def test_instances_stats_metrics_and_events(client, cmdb):
    client.add_app(NewApp(name="a.test", image="x"))
    client.add_app(NewApp(name="b.test", image="x"))
    cmdb.upsert_instance(Instance(id="a-1", app="a.test", container="a-1", state="ready", ip="10.88.0.2", port=80,
                                  requests=5))
    cmdb.upsert_instance(Instance(id="a-2", app="a.test", container="a-2", state="starting", requests=0))
    assert [i.id for i in client.list_instances()] == ["a-1", "a-2"]
    assert client.list_instances("b.test") == []

    stats = client.stats()
    assert set(stats) == {"a.test", "b.test"}
    counts = stats["a.test"].instances
    # A "starting" row is a start in progress (a claimed share), not yet an instance.
    assert (counts.ready, counts.starting, counts.total, stats["a.test"].requests) == (1, 1, 1, 5)
    assert list(client.stats("b.test")) == ["b.test"]
    with pytest.raises(NotFound):
        client.stats("nope.test")

    text = client.metrics_text()
    assert "# TYPE fcrun_instances gauge" in text
    assert 'fcrun_instances{app="a.test",state="ready"} 1' in text
    assert 'fcrun_instances{app="a.test",state="starting"} 1' in text

    events = client.events()
    assert [e.app for e in events] == ["a.test", "b.test"]
    assert client.events(since_id=events[0].id) == events[1:]
    assert client.events(limit=1) == events[1:]


def test_scale_route(server, cmdb):
    client = AdminClient(server.socket_path)
    client.add_app(NewApp(name="a.test", image="x", max_instances=4))
    assert client.scale("a.test", Scale(instances=3)) == Scale(instances=3)
    assert server.controller.scaled == [("a.test", Scale(instances=3))]
    with pytest.raises(NotFound):
        client.scale("nope.test", Scale(cpu=0.5))


def test_direct_controller_checks_a_scale_request_then_refuses_it(cmdb, short_dir):
    path = os.path.join(short_dir, "admin.sock")
    with serve_in_thread(DirectController(cmdb), path):
        client = AdminClient(path)
        client.add_app(NewApp(name="a.test", image="x", cpu=0.5, max_instances=2))
        with pytest.raises(SpecError, match="exactly one"):
            client.scale("a.test", Scale(instances=1, cpu=0.5))
        with pytest.raises(SpecError, match=r"0\.\.2") as info:
            client.scale("a.test", Scale(instances=3))
        assert info.value.where == "$.instances"
        with pytest.raises(SpecError, match="cpu_max"):
            client.scale("a.test", Scale(cpu=0.8))
        with pytest.raises(IncorrectStatus, match="no instance manager"):
            client.scale("a.test", Scale(instances=2))


def test_errors_come_back_as_the_same_classes(client):
    client.add_app(NewApp(name="a.test", image="x", hostnames=["www.a.test"]))
    with pytest.raises(NotFound, match="'nope.test' does not exist") as info:
        client.get_app("nope.test")
    assert info.value.exit_code == 3
    with pytest.raises(AlreadyExists, match="'www.a.test' already belongs to app 'a.test'") as info:
        client.add_app(NewApp(name="www.a.test", image="x"))
    assert info.value.exit_code == 4
    with pytest.raises(SpecError) as info:
        client.add_app(NewApp(name="b.test", image="x", hostnames=["ok.test", "bad_host"]))
    assert info.value.where == "hostnames[1]" and info.value.exit_code == 2
    with pytest.raises(NotFound):
        client.update_app("nope.test", AppUpdate(cpu=0.5))
    with pytest.raises(NotFound):
        client.remove_app("nope.test")
    assert [a.name for a in client.list_apps()] == ["a.test"]


def test_bad_bodies_queries_paths_and_methods(client):
    status, body = client.request("POST", "/apps", b'{"name": "a.test", "image": "x", "memroy": 1}')
    assert status == 400
    err = remote_error(status, body)
    assert isinstance(err, SpecError) and err.where == "$.memroy" and "unknown key" in str(err)
    status, body = client.request("POST", "/apps", b"{not json")
    assert status == 400 and b"request body" in body
    status, body = client.request("PATCH", "/apps/a.test", b'{"cpu": "lots"}')
    assert status == 400 and b"$.cpu" in body
    status, body = client.request("GET", "/events?since=x")
    assert status == 400 and b"since" in body
    status, body = client.request("GET", "/events?limit=0")
    assert status == 400
    assert client.request("GET", "/nope")[0] == 404
    assert client.request("PUT", "/apps")[0] == 405
    assert client.request("DELETE", "/instances")[0] == 405


@pytest.mark.parametrize("query", [
    "limit=%C2%B2",  # "²": str.isdigit takes it, int() does not (was a 500)
    "since=" + "9" * 5000,  # past Python's int() digit limit (was a 500)
    f"since={2**63}",  # past the database's integer (was a 500 from SQLite)
])
def test_a_query_integer_that_is_no_plain_in_range_number_is_a_400(client, query):
    status, body = client.request("GET", f"/events?{query}")
    err = remote_error(status, body)
    assert status == 400 and isinstance(err, SpecError) and err.where == query.partition("=")[0], body[:300]


@pytest.mark.parametrize("fields", [{"memory_bytes": 2**63}, {"max_instances": 2**31}, {"max_body_bytes": 2**64}])
def test_a_number_past_what_the_cmdb_holds_is_a_400_naming_it_and_stores_nothing(client, fields):
    status, body = client.request("POST", "/apps", msgspec.json.encode({"name": "big.test", "image": "x", **fields}))
    err = remote_error(status, body)
    assert status == 400 and isinstance(err, SpecError) and [*fields][0] in str(err), body[:300]
    assert client.request("GET", "/apps/big.test")[0] == 404


def test_tcp_needs_the_bearer_token(server):
    host, port = server.tcp_address
    url = f"http://{host}:{port}"
    for token in (None, "wrong-token", TOKEN + "x"):
        with pytest.raises(NotPermitted, match="bearer token"):
            AdminClient(url, token).list_apps()
    status, _ = AdminClient(url).request("GET", "/apps", headers={"Authorization": "Basic " + TOKEN})
    assert status == 401
    assert AdminClient(url, TOKEN).list_apps() == []


def test_the_tcp_listener_cannot_run_without_a_token(cmdb, short_dir):
    with pytest.raises(SpecError, match="bearer token"):
        AdminServer(DirectController(cmdb), os.path.join(short_dir, "a.sock"), tcp_listen="127.0.0.1:0")


def test_a_removal_that_outlasts_the_wait_answers_202(cmdb, short_dir):
    path = os.path.join(short_dir, "admin.sock")
    controller = SlowRemoval(cmdb)
    with serve_in_thread(controller, path, remove_wait_s=0.0) as srv:
        client = AdminClient(path)
        client.add_app(NewApp(name="a.test", image="x"))
        assert client.remove_app("a.test") is False
        assert controller.removing == ["a.test"] and controller.cancelled == []  # still going on
    # Owned by the server: cancelled when it closed, and nothing of it is left.
    assert controller.cancelled == ["a.test"] and len(srv.tasks) == 0


def test_keep_alive_serves_several_requests_on_one_connection(server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(server.socket_path)
        sock.sendall(b"GET /apps HTTP/1.1\r\nHost: x\r\n\r\nGET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200") < 2:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        sock.sendall(b"GARBAGE\r\n\r\n")
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert rest.startswith(b"HTTP/1.1 400") and b"Connection: close" in rest


def test_a_client_without_a_server():
    with pytest.raises(ServerUnavailable, match="no fcrun serve answers"):
        AdminClient("/tmp/fcrun-no-such-dir/admin.sock").list_apps()


def test_remote_errors_keep_their_class_for_every_kind():
    err = remote_error(500, b'{"error": "write cpu.max: [Errno 22] Invalid argument", "kind": "KernelError"}')
    assert isinstance(err, KernelError) and str(err) == "write cpu.max: [Errno 22] Invalid argument"
    assert err.exit_code == 125
    err = remote_error(409, b'{"error": "it is frozen", "kind": "IncorrectStatus"}')
    assert isinstance(err, IncorrectStatus) and str(err) == "it is frozen"
    err = remote_error(404, b"<html>not ours</html>")
    assert isinstance(err, NotFound) and "404" in str(err)


def test_peer_credentials_of_the_same_user_are_allowed():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_allowed(a)
        assert peer_credentials(a) == (os.getpid(), os.geteuid(), os.getegid())
    assert not peer_allowed(None)


# -- the request parser, without I/O ----------------------------------------------------------


def test_parser_splits_pipelined_requests_and_keeps_bodies():
    parser = RequestParser()
    parser.feed(b"POST /apps?x=1&x=2 HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nab")
    assert not parser.complete
    parser.feed(b"cdGET /apps/a%2Eb HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    first, second = parser.complete
    assert (first.method, first.path, first.query, first.body) == ("POST", "/apps", {"x": ["1", "2"]}, b"abcd")
    assert first.keep_alive and first.headers["content-length"] == "4"
    assert (second.method, second.path, second.keep_alive) == ("GET", "/apps/a.b", False)


@pytest.mark.parametrize("data,status", [
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 2000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n" + b"a" * 2000, 413),
    (b"NOT HTTP\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", 400),
])
def test_parser_limits_and_malformed_requests(data, status):
    parser = RequestParser(max_head_bytes=1024, max_body_bytes=1024)
    with pytest.raises(HttpError) as info:
        parser.feed(data)
    assert info.value.status == status


def test_render_metrics_escapes_labels_and_keeps_digits():
    stats = {'we"ird\\app': AppStats(requests=3, status={"2xx": 2, "5xx": 1}, cpu_seconds=1234567.125)}
    text = render_metrics(stats)
    assert 'fcrun_requests_total{app="we\\"ird\\\\app",code="2xx"} 2' in text
    assert 'fcrun_cpu_seconds_total{app="we\\"ird\\\\app"} 1234567.125' in text
    assert text.endswith("\n")


def test_a_change_made_whose_event_cannot_be_recorded_is_answered_as_made(client, cmdb, monkeypatch, caplog):
    """The app's write and its event's are two transactions: an event lost after the app was
    written is logged, and the request is answered with the app (not a 503 for a change that
    was made, whose retry would then be refused with 409)."""
    from fcrun.cmdb import CMDBUnavailable

    def unavailable(*args, **kwargs):
        raise CMDBUnavailable("the CMDB went away between the two writes")

    monkeypatch.setattr(cmdb, "add_event", unavailable)
    added = client.add_app(NewApp(name="ev.test", image="x"))
    assert added.name == "ev.test" and cmdb.get_app("ev.test").image == "x"
    assert client.update_app("ev.test", AppUpdate(cpu=0.5)).cpu == 0.5
    assert "its event could not be recorded" in caplog.text
