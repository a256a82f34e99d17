"""The proxy's connection driver with fake transports and a fake clock: no sockets, no sleeping."""

import asyncio
import errno
import types

import pytest

from fcrun.proxy import ProxyConfig, ProxyServer, RouteError
from fcrun.proxy.testing import FakeTransport, StaticRouter
from fcrun.proxy.upstream import UpstreamConnection

GET = b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nServer: app\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello"
OK_TO_CLIENT = b"HTTP/1.1 200 OK\r\nServer: app\r\nContent-Length: 5\r\nVia: 1.1 fcrun\r\n\r\nhello"
HEAD_TO_UPSTREAM = (b"GET /x HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 192.0.2.7\r\nX-Real-IP: 192.0.2.7\r\n"
                    b"X-Forwarded-Proto: http\r\nVia: 1.1 fcrun\r\n"
                    b'Forwarded: for=192.0.2.7;host="a.test";proto=http\r\nX-Forwarded-Host: a.test\r\n\r\n')


def make_server(config: ProxyConfig | None = None, **router_args) -> tuple[ProxyServer, StaticRouter]:
    router = StaticRouter({"a.test": ("10.0.0.2", 8080)}, **router_args)
    return ProxyServer(router, config or ProxyConfig()), router


def connect_client(server: ProxyServer):
    transport = FakeTransport()
    conn = server.connection_factory()
    conn.connection_made(transport)
    return conn, transport


def new_upstream(server: ProxyServer, instance_id: str = "a.test-1"):
    transport = FakeTransport(("10.0.0.2", 8080))
    conn = UpstreamConnection(server.upstreams, instance_id)
    conn.connection_made(transport)
    return conn, transport


def pooled_upstream(server: ProxyServer, instance_id: str = "a.test-1"):
    conn, transport = new_upstream(server, instance_id)
    server.upstreams.release(conn, server.now)
    return conn, transport


def proxied(config: ProxyConfig | None = None, **router_args):
    """A proxy with one pooled upstream connection to a.test and one client connected:
    (server, router, upstream, its transport, client, its transport)."""
    server, router = make_server(config, **router_args)
    return (server, router, *pooled_upstream(server), *connect_client(server))


def test_get_is_forwarded_and_the_upstream_connection_reused():
    server, router, up, up_t, client, client_t = proxied()

    client.data_received(GET)
    assert up_t.take() == HEAD_TO_UPSTREAM
    assert server.requests_in_flight == 1
    up.data_received(OK)
    assert client_t.take() == OK_TO_CLIENT
    assert router.leases[0].settled == [(200, len(GET), len(OK_TO_CLIENT), False)]
    assert server.requests_in_flight == 0 and server.upstreams.idle_connections == 1

    client.data_received(GET)
    assert up_t.take() == HEAD_TO_UPSTREAM   # same upstream connection
    up.data_received(OK)
    assert client_t.take() == OK_TO_CLIENT
    assert [lease.settled[0][0] for lease in router.leases] == [200, 200]
    assert router.opened == ["a.test"] and not client_t.closed


def test_http10_client_without_keep_alive_is_closed_after_the_response():
    server, router, up, up_t, client, client_t = proxied()
    client.data_received(b"GET /x HTTP/1.0\r\nHost: a.test\r\n\r\n")
    up.data_received(OK)
    assert b"Connection: close\r\n" in client_t.take()
    assert client_t.eof_written and not client_t.closed   # lingering: the client closes first
    server.check_timeouts(server.now + server.config.linger_s + 0.1)
    assert client_t.closed
    assert server.upstreams.idle_connections == 1   # the upstream side stays pooled


def test_http10_client_with_keep_alive_keeps_it():
    server, _, up, _, client, client_t = proxied()
    client.data_received(b"GET /x HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n")
    up.data_received(OK)
    assert b"Connection: keep-alive\r\n" in client_t.take()
    assert not client_t.eof_written and not client_t.closed


def test_head_request_gets_no_body():
    server, router, up, up_t, client, client_t = proxied()
    client.data_received(b"HEAD /x HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert up_t.take().startswith(b"HEAD /x HTTP/1.1\r\n")
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert client_t.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nVia: 1.1 fcrun\r\n\r\n"
    assert router.leases[0].settled[0][0] == 200
    client.data_received(GET)   # the upstream connection is in step for the next request
    up.data_received(OK)
    assert client_t.take() == OK_TO_CLIENT


def first_response(request: bytes, config: ProxyConfig | None = None, **router_args):
    """A new client of a proxy with no upstream connection sends request:
    (server, client, its transport, what the proxy has answered so far)."""
    server, _ = make_server(config, **router_args)
    client, client_t = connect_client(server)
    client.data_received(request)
    return server, client, client_t, client_t.take()


def test_unknown_host_is_404_naming_the_host_and_the_connection_stays():
    server, _, client_t, response = first_response(b"GET / HTTP/1.1\r\nHost: nope.test\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 404 Not Found\r\n") and b"nope.test" in response
    assert not client_t.closed and not client_t.eof_written and server.requests_in_flight == 0


@pytest.mark.parametrize("status", [502, 503, 504])
def test_route_errors_become_the_response(status):
    *_, response = first_response(GET, errors={"a.test": RouteError(status, "image 'web' missing")})
    assert response.startswith(b"HTTP/1.1 %d " % status) and b"image 'web' missing" in response


def test_malformed_request_is_400_and_the_connection_closes():
    _, client, client_t, response = first_response(b"GET / HTTP/1.1\r\nHost a.test\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close" in response
    assert client_t.eof_written
    client.data_received(b"more garbage")   # drained while lingering, never parsed
    assert client_t.take() == b""


def test_oversized_head_is_431():
    *_, response = first_response(b"GET / HTTP/1.1\r\nHost: a.test\r\nCookie: " + b"c" * 300 + b"\r\n\r\n",
                                  ProxyConfig(max_header_bytes=256))
    assert response.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_content_length_over_the_app_limit_is_413_up_front():
    server, router, up, up_t, client, client_t = proxied(max_body_bytes=10)
    client.data_received(b"POST /u HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n\r\n0123456789")
    response = client_t.take()
    assert response.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in response
    assert up_t.take() == b""
    assert router.leases[0].settled == [(413, 55, len(response), False)]


def test_chunked_body_over_the_app_limit_is_413_when_it_crosses():
    server, router, up, up_t, client, client_t = proxied(max_body_bytes=10)
    client.data_received(b"POST /u HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n")
    assert up_t.take().endswith(b"\r\n\r\n8\r\n01234567\r\n")   # streamed, not held
    client.data_received(b"8\r\n89abcdef\r\n")
    assert client_t.take().startswith(b"HTTP/1.1 413 ")
    assert up_t.aborted   # the upstream got a truncated request: never reused
    assert router.leases[0].settled[0][0] == 413 and server.upstreams.idle_connections == 0


def test_global_body_limit_applies_when_the_app_sets_none():
    server, _ = make_server(ProxyConfig(max_body_bytes=4))
    pooled_upstream(server)
    client, client_t = connect_client(server)
    client.data_received(b"POST /u HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\n")
    assert client_t.take().startswith(b"HTTP/1.1 413 ")


def test_expect_continue_is_answered_by_the_proxy():
    server, _, up, up_t, client, client_t = proxied()
    client.data_received(b"PUT /f HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert client_t.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    head = up_t.take()
    assert head.startswith(b"PUT /f HTTP/1.1\r\n") and b"xpect" not in head
    client.data_received(b"hello")
    assert up_t.take() == b"hello"
    up.data_received(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert client_t.take().startswith(b"HTTP/1.1 201 Created\r\n")


def test_expect_continue_over_the_limit_is_413_without_100():
    server, _ = make_server(max_body_bytes=3)
    pooled_upstream(server)
    client, client_t = connect_client(server)
    client.data_received(b"PUT /f HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    response = client_t.take()
    assert response.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in response


def test_slow_head_gets_408_and_a_silent_connection_is_just_closed():
    server, _ = make_server(ProxyConfig(header_timeout_s=10.0))
    client, client_t = connect_client(server)
    client.data_received(b"GET / HTTP/1.1\r\nHost: a.te")
    server.check_timeouts(server.now + 9.0)
    assert not client_t.closed
    server.check_timeouts(server.now + 1.5)
    assert client_t.take().startswith(b"HTTP/1.1 408 Request Timeout\r\n") and client_t.closed

    silent, silent_t = connect_client(server)
    server.check_timeouts(server.now + 10.5)
    assert silent_t.closed and silent_t.take() == b""


def test_idle_keep_alive_timeout_closes_quietly():
    server, _, up, _, client, client_t = proxied(ProxyConfig(keepalive_timeout_s=60.0, header_timeout_s=10.0))
    client.data_received(GET)
    server.check_timeouts(server.now + 30)   # waiting for the upstream: no deadline
    up.data_received(OK)
    client_t.take()
    server.check_timeouts(server.now + 59)
    assert not client_t.closed
    server.check_timeouts(server.now + 2)
    assert client_t.closed and client_t.take() == b""


def test_pipelined_requests_are_answered_in_order():
    server, router, up, up_t, client, client_t = proxied()
    client.data_received(GET + b"GET /y HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert up_t.take() == HEAD_TO_UPSTREAM and not client_t.reading
    up.data_received(OK)
    assert up_t.take().startswith(b"GET /y HTTP/1.1\r\n")
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\ny")
    assert client_t.take() == OK_TO_CLIENT + b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nVia: 1.1 fcrun\r\n\r\ny"
    assert client_t.reading and len(router.leases) == 2


def test_client_gone_mid_response_settles_the_lease_once_and_drops_the_upstream():
    server, router, up, up_t, client, client_t = proxied()
    client.data_received(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    client.connection_lost(None)
    assert up_t.aborted
    up.connection_lost(None)   # the abort's own callback: must not settle again
    (lease,) = router.leases
    assert len(lease.settled) == 1 and lease.settled[0][0] == 200 and lease.settled[0][3] is True
    assert server.requests_in_flight == 0 and server.active_connections == 0
    assert router.closed == ["a.test"]


def test_client_gone_before_the_response_is_499():
    server, router = make_server()
    pooled_upstream(server)
    client, _ = connect_client(server)
    client.data_received(GET)
    client.connection_lost(None)
    assert router.leases[0].settled == [(499, len(GET), 0, True)]


def test_upstream_reset_mid_response_cuts_the_client():
    server, router, up, _, client, client_t = proxied()
    client.data_received(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    up.connection_lost(ConnectionResetError())
    assert client_t.closed
    assert router.leases[0].settled[0][0] == 200 and router.leases[0].settled[0][3] is True


def test_non_idempotent_request_is_not_retried_on_a_stale_connection():
    server, router, up, up_t, client, client_t = proxied()
    client.data_received(b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n")
    assert up_t.take().startswith(b"POST")
    up.connection_lost(None)   # closed before a byte of response: stale
    response = client_t.take()
    assert response.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"a.test" in response
    assert router.leases[0].settled[0][0] == 502 and len(server.tasks) == 0


def test_idempotent_request_is_retried_once_on_a_fresh_connection():
    async def main():
        server, router = make_server()
        stale, stale_t = pooled_upstream(server)
        fresh = []

        async def connect(lease):
            conn, transport = new_upstream(server)
            fresh.append(transport)
            return conn

        server.upstreams.connect = connect
        client, client_t = connect_client(server)
        client.data_received(GET)
        assert stale_t.take() == HEAD_TO_UPSTREAM
        stale.connection_lost(None)
        for _ in range(5):
            await asyncio.sleep(0)
        (fresh_t,) = fresh
        assert fresh_t.take() == HEAD_TO_UPSTREAM
        conn = next(iter(server.upstreams._live["a.test-1"]))
        conn.data_received(OK)
        assert client_t.take() == OK_TO_CLIENT
        assert [lease.settled for lease in router.leases] == [[(200, len(GET), len(OK_TO_CLIENT), False)]]

        # Stale again: retried on a fresh connection, which fails too: 502, no third try.
        client.data_received(GET)
        conn.connection_lost(None)
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(fresh) == 2
        fresh[1].take()
        next(iter(server.upstreams._live["a.test-1"])).connection_lost(None)
        assert client_t.take().startswith(b"HTTP/1.1 502 ")
        await server.tasks.aclose()

    asyncio.run(main())


def test_backpressure_pauses_the_other_side():
    server, _, up, up_t, client, client_t = proxied()
    client.data_received(b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n\r\n")
    client.pause_writing()
    assert not up_t.reading
    client.resume_writing()
    assert up_t.reading
    up.pause_writing()
    assert not client_t.reading
    up.resume_writing()
    assert client_t.reading


def test_cold_start_is_reported_in_the_response():
    server, _, up, _, client, client_t = proxied(cold_start=("pool", 12.5))
    client.data_received(GET)
    up.data_received(OK)
    response = client_t.take()
    assert b"\r\nX-Fcrun-Cold-Start: 12.5\r\nX-Fcrun-Cold-Start-Path: pool\r\n" in response


def test_websocket_upgrade_becomes_a_tunnel():
    server, router, up, up_t, client, client_t = proxied()
    client.data_received(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly")
    assert b"Connection: upgrade\r\nUpgrade: websocket\r\n" in up_t.take()
    client.data_received(b"-more")
    up.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nhi")
    assert client_t.take() == (b"HTTP/1.1 101 Switching Protocols\r\nVia: 1.1 fcrun\r\n"
                               b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\nhi")
    assert up_t.take() == b"early-more"
    client.data_received(b"ping")
    assert up_t.take() == b"ping"
    up.data_received(b"pong")
    assert client_t.take() == b"pong"
    server.check_timeouts(server.now + server.config.tunnel_idle_timeout_s - 1)   # bytes came at 0
    assert not client_t.closed
    assert client.eof_received() is True and up_t.eof_written
    assert up.eof_received() is False and client_t.closed
    up.connection_lost(None)
    client.connection_lost(None)
    (lease,) = router.leases
    assert lease.settled == [(101, lease.settled[0][1], lease.settled[0][2], False)]
    assert lease.settled[0][1] > len(b"early-moreping")


def test_refused_upgrade_is_an_ordinary_response_then_close():
    server, _, up, _, client, client_t = proxied()
    client.data_received(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    up.data_received(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    response = client_t.take()
    assert response.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in response


def test_instance_gone_closes_its_pooled_connections():
    server, _ = make_server()
    _, idle_t = pooled_upstream(server)
    busy, busy_t = pooled_upstream(server)
    client, _ = connect_client(server)
    client.data_received(GET)   # takes the newest: busy
    server.instance_gone("a.test-1")
    assert idle_t.closed and not busy_t.closed
    busy.data_received(OK)
    assert busy_t.closed and server.upstreams.idle_connections == 0


def test_pool_expires_idle_connections():
    server, _ = make_server(ProxyConfig(upstream_idle_s=30.0))
    _, t = pooled_upstream(server)
    server.check_timeouts(server.now + 29)
    assert not t.closed
    server.check_timeouts(server.now + 2)
    assert t.closed


def test_accept_out_of_file_descriptors_backs_off_and_retries():
    class FailingSocket:
        def __init__(self):
            self.calls = 0

        def accept(self):
            self.calls += 1
            raise OSError(errno.EMFILE, "Too many open files")

        def fileno(self):
            return 99

        def getsockname(self):
            return ("127.0.0.1", 8080)

    class Loop:
        def __init__(self):
            self.readers, self.timers = {99: "accept"}, []

        def remove_reader(self, fd):
            self.readers.pop(fd)

        def add_reader(self, fd, callback, *args):
            self.readers[fd] = callback

        def call_later(self, delay, callback, *args):
            self.timers.append((delay, callback, args))
            return types.SimpleNamespace(cancel=lambda: None)

    server, _ = make_server()
    loop = server._loop = Loop()
    sock = FailingSocket()
    server._accept(sock)
    assert sock.calls == 1 and 99 not in loop.readers
    delay, callback, args = loop.timers[-1]
    assert 0 < delay <= 1
    callback(*args)
    assert 99 in loop.readers
    server._accept(sock)
    assert loop.timers[-1][0] == 2 * delay   # backs off further while it lasts


def test_close_lets_in_flight_requests_finish():
    async def main():
        server, router = make_server()
        server._loop = asyncio.get_running_loop()
        up, _ = pooled_upstream(server)
        busy, busy_t = connect_client(server)
        idle, idle_t = connect_client(server)
        busy.data_received(GET)
        closing = asyncio.create_task(server.close(drain_timeout_s=5))
        await asyncio.sleep(0)
        assert idle_t.closed and not busy_t.closed
        idle.connection_lost(None)
        up.data_received(OK)
        assert busy_t.take() == OK_TO_CLIENT.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        busy.connection_lost(None)
        await closing
        assert router.leases[0].settled[0][0] == 200

    asyncio.run(main())


@pytest.mark.parametrize("error, status", [(TimeoutError(), 504), (ConnectionRefusedError(111, "Connection refused"), 502)])
def test_upstream_connect_failures(error, status):
    async def main():
        server, router = make_server()

        async def connect(lease):
            raise error

        server.upstreams.connect = connect
        client, client_t = connect_client(server)
        client.data_received(GET)
        for _ in range(5):
            await asyncio.sleep(0)
        response = client_t.take()
        assert response.startswith(b"HTTP/1.1 %d " % status) and b"a.test" in response
        assert router.leases[0].settled[0][0] == status and router.leases[0].settled[0][3] is True
        assert not client_t.closed   # the client connection survives an upstream failure

    asyncio.run(main())


def test_cold_start_wait_is_cancelled_when_the_client_leaves():
    async def main():
        server, router = make_server(delay_s=60)
        client, _ = connect_client(server)
        client.data_received(GET)
        await asyncio.sleep(0)
        assert len(server.tasks) == 1
        client.connection_lost(None)
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(server.tasks) == 0 and router.leases == [] and server.requests_in_flight == 0

    asyncio.run(main())


# Bounds against slow and hostile clients (and instances), on the coarse clock: check_timeouts(t)
# is the sweep at time t, so nothing sleeps.

POST_100K = b"POST /u HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100000\r\n\r\n"
BOUNDS = ProxyConfig(body_idle_timeout_s=30.0, body_timeout_s=300.0, upstream_response_timeout_s=60.0,
                     upstream_read_timeout_s=60.0, send_timeout_s=60.0, tunnel_idle_timeout_s=300.0)


def test_body_with_no_byte_for_the_idle_timeout_is_408_and_the_lease_settles():
    server, router, up, up_t, client, client_t = proxied(BOUNDS)
    client.data_received(POST_100K + b"x")
    assert up_t.take().endswith(b"\r\n\r\nx")   # streamed to the instance as it comes
    server.check_timeouts(20.0)
    client.data_received(b"y")                  # a byte at 20 s: the idle clock starts again
    server.check_timeouts(45.0)
    assert client_t.take() == b""
    server.check_timeouts(51.0)
    response = client_t.take()
    assert response.startswith(b"HTTP/1.1 408 ") and b"body_idle_timeout_s" in response
    assert b"Connection: close" in response and client_t.eof_written
    assert up_t.aborted   # the instance got a truncated request: dropped, never pooled
    (lease,) = router.leases
    assert lease.settled == [(408, len(POST_100K) + 2, len(response), False)]
    assert server.requests_in_flight == 0 and server.upstreams.idle_connections == 0
    client.data_received(b"z" * 100)   # still trickling while we linger: dropped
    server.check_timeouts(51.0 + server.config.linger_s + 1)
    assert client_t.closed and client_t.take() == b""


def test_body_trickled_past_the_total_timeout_is_408():
    server, router, _, _, client, client_t = proxied(BOUNDS)
    client.data_received(POST_100K)
    for second in range(10, 300, 10):   # a byte every 10 s: never idle for 30 s
        server.check_timeouts(float(second))
        client.data_received(b"x")
    assert client_t.take() == b""
    server.check_timeouts(301.0)
    response = client_t.take()
    assert response.startswith(b"HTTP/1.1 408 ") and b"not complete within 300 s (body_timeout_s)" in response
    assert router.leases[0].settled[0][0] == 408


def test_time_the_proxy_holds_the_body_back_is_not_the_clients():
    server, router, up, _, client, client_t = proxied(BOUNDS)
    client.data_received(POST_100K + b"x")
    up.pause_writing()   # the instance reads slowly: the proxy stops reading the client
    assert not client_t.reading
    server.check_timeouts(1000.0)
    assert client_t.take() == b"" and not client_t.closed
    up.resume_writing()
    assert client_t.reading
    server.check_timeouts(1020.0)
    client.data_received(b"x")
    server.check_timeouts(1040.0)    # 20 s idle, 40 s of reading time in all
    assert client_t.take() == b""
    server.check_timeouts(1051.0)
    assert client_t.take().startswith(b"HTTP/1.1 408 ")


def test_slow_body_during_a_cold_start_is_408_and_the_wait_is_cancelled():
    async def main():
        server, router = make_server(BOUNDS, delay_s=600)
        client, client_t = connect_client(server)
        client.data_received(POST_100K + b"x")
        await asyncio.sleep(0)
        assert len(server.tasks) == 1   # waiting for the instance
        server.check_timeouts(31.0)
        assert client_t.take().startswith(b"HTTP/1.1 408 ")
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(server.tasks) == 0 and router.leases == [] and server.requests_in_flight == 0

    asyncio.run(main())


def test_no_response_head_within_the_timeout_is_504_naming_host_and_timeout():
    server, router, up, up_t, client, client_t = proxied(BOUNDS)
    client.data_received(GET)
    assert up_t.take() == HEAD_TO_UPSTREAM
    server.check_timeouts(59.0)
    assert client_t.take() == b""
    server.check_timeouts(61.0)
    response = client_t.take()
    assert response.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert b"a.test" in response and b"60 s (upstream_response_timeout_s)" in response
    assert up_t.aborted and router.leases[0].settled[0][0] == 504 and router.leases[0].settled[0][3] is True
    assert not client_t.closed   # the client's connection serves its next request


def test_instance_silent_mid_response_is_cut():
    server, router, up, _, client, client_t = proxied(BOUNDS)
    client.data_received(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    server.check_timeouts(50.0)
    up.data_received(b"5")   # a byte at 50 s
    server.check_timeouts(100.0)
    assert not client_t.closed
    server.check_timeouts(111.0)
    assert client_t.closed and client_t.take().endswith(b"012345")
    assert router.leases[0].settled[0][0] == 200 and router.leases[0].settled[0][3] is True


def test_client_that_reads_nothing_is_dropped_after_the_send_timeout():
    server, router, up, up_t, client, client_t = proxied(BOUNDS)
    client.data_received(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    server.check_timeouts(10.0)
    client.pause_writing()   # the client's socket is full: the instance is paused, not buffered
    assert not up_t.reading
    server.check_timeouts(69.0)
    assert not client_t.closed
    server.check_timeouts(71.0)
    assert client_t.aborted
    client.connection_lost(None)
    assert up_t.aborted and router.leases[0].settled[0][3] is True


def test_a_slow_reader_that_reads_gets_its_response():
    server, router, up, up_t, client, client_t = proxied(BOUNDS)
    client.data_received(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    for second in (50.0, 100.0, 150.0):
        client.pause_writing()
        server.check_timeouts(second)
        client.resume_writing()   # it takes some: neither the send nor the read timeout applies
        server.check_timeouts(second + 1)
    assert not client_t.closed
    up.data_received(b"cd")
    assert client_t.take().endswith(b"abcd") and router.leases[0].settled[0][:1] == (200,)


def test_idle_tunnel_is_closed_on_both_sides():
    server, router, up, up_t, client, client_t = proxied(BOUNDS)
    client.data_received(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    up.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    server.check_timeouts(200.0)
    up.data_received(b"ping")          # the instance spoke at 200 s
    server.check_timeouts(450.0)
    client.data_received(b"pong")      # the client at 450 s
    server.check_timeouts(749.0)
    assert not client_t.closed
    server.check_timeouts(751.0)
    assert client_t.aborted
    client.connection_lost(None)
    assert up_t.closed and router.leases[0].settled[0][0] == 101


def test_default_body_limit_is_10_mib_and_0_is_unlimited():
    assert ProxyConfig().max_body_bytes == 10 * 1024 * 1024
    post = b"POST /u HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n"
    *_, response = first_response(post % (10 * 1024 * 1024 + 1))
    assert response.startswith(b"HTTP/1.1 413 ")
    for config, lease_limit in ((ProxyConfig(max_body_bytes=0), None), (ProxyConfig(), 0)):
        server, router, _, up_t, client, client_t = proxied(config, max_body_bytes=lease_limit)
        client.data_received(post % (64 * 1024 * 1024))
        assert client_t.take() == b"" and up_t.take().startswith(b"POST /u ")


def test_send_and_read_timeouts_shorter_than_the_response_timeout_still_apply():
    config = ProxyConfig(upstream_response_timeout_s=600.0, upstream_read_timeout_s=20.0, send_timeout_s=10.0)
    server, router, up, _, client, client_t = proxied(config)
    client.data_received(GET)
    server.check_timeouts(5.0)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01")
    server.check_timeouts(24.0)
    assert not client_t.closed
    server.check_timeouts(26.0)   # nothing from the instance since 5 s
    assert client_t.closed and router.leases[0].settled[0][3] is True

    server, router, up, _, client, client_t = proxied(config)
    client.data_received(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01")
    client.pause_writing()
    server.check_timeouts(11.0)
    assert client_t.aborted


def test_a_client_waiting_for_100_continue_is_not_timed_until_it_is_sent():
    async def main():
        server, router = make_server(BOUNDS)
        connected = asyncio.Event()

        async def connect(lease):   # an instance that takes its time to accept
            await connected.wait()
            return new_upstream(server)[0]

        server.upstreams.connect = connect
        client, client_t = connect_client(server)
        client.data_received(b"PUT /f HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        await asyncio.sleep(0)
        server.check_timeouts(100.0)
        assert client_t.take() == b""   # no 408: the client is right to wait
        connected.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert client_t.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
        server.check_timeouts(131.0)   # now its body is late
        assert client_t.take().startswith(b"HTTP/1.1 408 ")
        await server.tasks.aclose()

    asyncio.run(main())


def test_per_ip_caps_count_ipv6_peers_by_their_64():
    from fcrun.proxy.server import peer_key

    assert peer_key("192.0.2.7") == "192.0.2.7"
    assert peer_key("2001:db8:1:2:aaaa::1") == peer_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert peer_key("2001:db8:1:3::1") != peer_key("2001:db8:1:2::1")
    assert peer_key("::ffff:192.0.2.7") == "192.0.2.7"   # a dual-stack socket's IPv4 peer
    assert peer_key("fe80::1%eth0") == "fe80::/64"


# Framing the proxy and its peers must agree on, and exchanges that end early: what a hostile
# client or app could do with them.

def test_a_request_smuggled_by_a_connection_token_never_reaches_the_upstream():
    server, router, up, up_t, client, client_t = proxied()
    smuggled = b"GET /admin HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"
    client.data_received(b"POST /x HTTP/1.1\r\nHost: a.test\r\nConnection: content-length\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
    response = client_t.take()
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"lists content-length" in response
    assert up_t.take() == b"" and client_t.eof_written and router.leases == []


def test_an_app_s_connection_token_for_content_length_is_502_not_an_unframed_body():
    server, router, up, up_t, client, client_t = proxied()
    client.data_received(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello")
    response = client_t.take()
    assert response.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"lists content-length" in response
    assert b"hello" not in response and up_t.aborted
    assert router.leases[0].settled[0][0] == 502


def test_an_app_s_status_099_puts_no_bytes_of_its_own_in_the_client_connection():
    server, router, up, up_t, client, client_t = proxied()
    client.data_received(GET)
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nSet-Cookie: session=attacker\r\n\r\nforged"
    up.data_received(b"HTTP/1.1 099 X\r\nContent-Length: %d\r\n\r\n%s" % (len(forged), forged))
    response = client_t.take()
    assert response.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"status 099" in response
    assert b"attacker" not in response


def test_an_app_s_endless_response_trailer_cuts_the_client():
    server, router, up, up_t, client, client_t = proxied()
    client.data_received(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: ")
    assert client_t.take().endswith(b"5\r\nhello\r\n")
    for _ in range(20):
        up.data_received(b"a" * 65536)
        if client_t.closed:
            break
    assert client_t.closed and up_t.aborted and client_t.take() == b""   # no end of the body: a truncation


EARLY = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"


def early_answer(config: ProxyConfig = BOUNDS):
    """A chunked upload answered 401 by the app before its body is all in: the rest is dropped."""
    server, router, up, up_t, client, client_t = proxied(config)
    client.data_received(b"POST /upload HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"10\r\n0123456789abcdef\r\n")
    up_t.take()
    up.data_received(EARLY)
    assert client_t.take().startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    return server, router, client, client_t


@pytest.mark.parametrize("rest", [
    b"zz\r\n",                                   # a bad chunk size
    b"400\r\n" + b"x" * 1024 + b"\r\n",          # over max_body_bytes
])
def test_a_dropped_body_that_breaks_a_rule_closes_without_a_second_response(rest):
    server, router, client, client_t = early_answer(ProxyConfig(max_body_bytes=100))
    client.data_received(rest)
    assert client_t.take() == b"" and client_t.eof_written   # a lingering close, no other answer
    assert [lease.settled[0][0] for lease in router.leases] == [401]


def test_a_dropped_body_keeps_the_body_deadlines_not_the_head_s():
    server, router, client, client_t = early_answer()
    for second in range(10, 100, 10):   # a steady upload: past header_timeout_s, never idle 30 s
        server.check_timeouts(float(second))
        client.data_received(b"10\r\n0123456789abcdef\r\n")
    assert client_t.take() == b"" and not client_t.eof_written
    client.data_received(b"0\r\n\r\n")   # its end: the connection waits for the next request
    up, up_t = pooled_upstream(server)   # (the 401's connection was closed: its request was cut short)
    client.data_received(GET)
    assert up_t.take() == HEAD_TO_UPSTREAM
    up.data_received(OK)
    assert client_t.take() == OK_TO_CLIENT and not client_t.eof_written


def test_a_dropped_body_that_stalls_is_closed_without_a_second_response():
    server, router, client, client_t = early_answer()
    server.check_timeouts(31.0)   # body_idle_timeout_s
    assert client_t.take() == b"" and client_t.eof_written


def test_a_dropped_body_then_idle_gets_the_keepalive_timeout():
    server, router, client, client_t = early_answer(ProxyConfig(header_timeout_s=10.0, keepalive_timeout_s=75.0))
    client.data_received(b"0\r\n\r\n")
    server.check_timeouts(server.now + 60.0)   # past header_timeout_s: an idle connection stays
    assert not client_t.closed and not client_t.eof_written and client_t.take() == b""


def test_reading_resumes_after_a_route_error_while_the_body_was_held():
    async def main():
        server, router = make_server(ProxyConfig(buffer_bytes=1024), delay_s=0.01,
                                     errors={"a.test": RouteError(502, "instance failed to start")})
        client, client_t = connect_client(server)
        client.data_received(b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10000\r\n\r\n" + b"x" * 4096)
        assert not client_t.reading   # the body is held while the instance starts
        await asyncio.sleep(0.05)
        assert client_t.take().startswith(b"HTTP/1.1 502 ")
        assert client_t.reading and client.paused == 0   # the rest of the body is read and dropped
        client.data_received(b"x" * (10000 - 4096))
        client.data_received(GET)
        assert server.requests_in_flight == 1   # the next request was read
        await server.tasks.aclose()

    asyncio.run(main())


def test_pipelined_requests_before_a_half_close_are_all_answered():
    server, router, up, up_t, client, client_t = proxied()
    client.data_received(GET.replace(b"/x", b"/a") + GET.replace(b"/x", b"/b"))
    assert client.eof_received()   # shutdown(SHUT_WR) after sending both, as `nc -N` does
    assert up_t.take().startswith(b"GET /a ")
    up.data_received(OK)
    assert client_t.take() == OK_TO_CLIENT and not client_t.eof_written
    assert up_t.take().startswith(b"GET /b ")
    up.data_received(OK)
    assert client_t.take() == OK_TO_CLIENT.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    assert client_t.closed   # the client had closed its side: nothing more can come


def test_a_half_close_before_the_first_request_went_upstream_still_answers_the_queued_one():
    async def main():
        server, router = make_server()
        upstreams = []

        async def connect(lease):
            upstreams.append(new_upstream(server))
            return upstreams[-1][0]

        server.upstreams.connect = connect
        client, client_t = connect_client(server)
        client.data_received(GET.replace(b"/x", b"/a") + GET.replace(b"/x", b"/b"))
        assert client.eof_received()   # before /a has an upstream connection
        for _ in range(5):
            await asyncio.sleep(0)
        ((up, up_t),) = upstreams
        assert up_t.take().startswith(b"GET /a ")
        up.data_received(OK)
        assert client_t.take() == OK_TO_CLIENT   # no Connection: close, /b follows
        assert up_t.take().startswith(b"GET /b ")
        up.data_received(OK)
        assert client_t.take() == OK_TO_CLIENT.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        await server.tasks.aclose()

    asyncio.run(main())
