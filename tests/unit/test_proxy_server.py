"""The proxy on real sockets (127.0.0.1): a tiny app server behind it, a raw client in front.

Every test runs on asyncio's loop and on uvloop's.
"""

import asyncio
import contextlib
import hashlib
import socket

import pytest

from fcrun.proxy import ProxyConfig, ProxyServer, RouteError
from fcrun.proxy.testing import StaticRouter
from fcrun.proxy.upstream import write_parts, writelines_pauses

uvloop = pytest.importorskip("uvloop")

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
CHUNK = 64 * 1024
OPEN_CLIENTS: set["Client"] = set()   # closed by run() whatever the test did


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """Run a coroutine function on a fresh loop of each kind, bounded in time."""

    def runner(main, timeout_s: float = 20.0):
        async def bounded():
            try:
                async with asyncio.timeout(timeout_s):
                    return await main()
            finally:
                # A test that failed half-way left its clients open: close them on their loop,
                # not in some later test's garbage collection (a ResourceWarning there).
                while OPEN_CLIENTS:
                    OPEN_CLIENTS.pop().writer.transport.abort()
                await asyncio.sleep(0)   # abort() closes the socket in a callback

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as loop_runner:
            return loop_runner.run(bounded())

    return runner


class App:
    """A small HTTP/1.1 app for the proxy to talk to; counts connections and requests."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed_connections = 0   # connections the app saw end (the proxy closed or reset them)
        self.requests: list[tuple[bytes, bytes, dict[bytes, bytes]]] = []
        self.sent = 0
        self.release = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> "App":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self.server.wait_closed()

    def paths(self, path: bytes) -> int:
        return sum(1 for _, target, _ in self.requests if target.split(b"?")[0] == path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *lines = head[:-4].split(b"\r\n")
                method, target, _ = request_line.split(b" ")
                headers = {}
                for line in lines:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                self.requests.append((method, target, headers))
                name = target.split(b"?")[0].strip(b"/").decode().replace("-", "_")
                if await getattr(self, f"handle_{name}")(method, target, headers, reader, writer) is False:
                    return
        except ConnectionError:
            return
        finally:
            self.closed_connections += 1
            self._writers.discard(writer)
            writer.close()

    async def handle_hello(self, method, target, headers, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n"
                     + (b"" if method == b"HEAD" else b"hello"))

    async def handle_headers(self, method, target, headers, reader, writer):
        body = b"\n".join(b"%s: %s" % item for item in sorted(headers.items()))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async def handle_echo(self, method, target, headers, reader, writer):
        """Reads the body as it comes (CL or chunked) and answers its length and sha256."""
        if b"wait" in target:
            await self.release.wait()   # the test holds the app back to check backpressure
        digest, length = hashlib.sha256(), 0
        if headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                data = await reader.readexactly(size + 2)
                digest.update(data[:-2])
                length += size
        else:
            remaining = int(headers.get(b"content-length", b"0"))
            while remaining:
                data = await reader.read(min(remaining, CHUNK))
                if not data:
                    return False   # the proxy cut the request short
                digest.update(data)
                length += len(data)
                remaining -= len(data)
        body = b"%d %s" % (length, digest.hexdigest().encode())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async def handle_big(self, method, target, headers, reader, writer):
        """A chunked response of ?n bytes, written as fast as the proxy takes it."""
        total = int(target.split(b"?n=")[1])
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for offset in range(0, total, CHUNK):
            data = pattern(offset, min(CHUNK, total - offset))
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.sent += len(data)
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async def handle_ws(self, method, target, headers, reader, writer):
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
        while data := await reader.read(CHUNK):
            writer.write(data.upper())
            await writer.drain()
        return False

    async def handle_partial(self, method, target, headers, reader, writer):
        """Half a response, then a reset."""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        writer.transport.abort()
        return False

    async def handle_close_after(self, method, target, headers, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return False

    async def handle_hang(self, method, target, headers, reader, writer):
        """Never answers: waits until the proxy gives up on it (its connection ends)."""
        await reader.read()
        return False

    async def handle_stall(self, method, target, headers, reader, writer):
        """Half a response, then silence until the connection ends."""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await reader.read()
        return False

    async def handle_slow(self, method, target, headers, reader, writer):
        await asyncio.sleep(0.2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")


def pattern(offset: int, length: int) -> bytes:
    """Deterministic, position-dependent bytes (a shifted byte or a lost chunk changes the hash)."""
    block = bytes(range(256)) * (CHUNK // 256 + 2)
    start = offset % 256
    return block[start:start + length]


@contextlib.asynccontextmanager
async def proxy(routes: dict[str, int], config: ProxyConfig | None = None, **router_args):
    router = StaticRouter({host: ("127.0.0.1", port) for host, port in routes.items()}, **router_args)
    server = ProxyServer(router, config or ProxyConfig(timer_resolution_s=0.05))
    await server.start("127.0.0.1", 0)
    try:
        yield server, router, server.sockets[0].getsockname()[1]
    finally:
        await server.close(drain_timeout_s=1.0)


class Client:
    """A raw HTTP/1.1 client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> "Client":
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        OPEN_CLIENTS.add(client)
        return client

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split(b" ")[1]), headers

    async def response(self, head_request: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        status, headers = await self.head()
        if head_request or status in (204, 304):
            return status, headers, b""
        if headers.get(b"transfer-encoding") == b"chunked":
            body = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    return status, headers, bytes(body)
                body += (await self.reader.readexactly(size + 2))[:-2]
        if b"content-length" in headers:
            return status, headers, await self.reader.readexactly(int(headers[b"content-length"]))
        return status, headers, await self.reader.read()

    async def at_eof(self) -> bool:
        return await self.reader.read() == b""

    async def close(self) -> None:
        OPEN_CLIENTS.discard(self)
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def get(port: int, path: str = "/hello", host: str = "a.test") -> tuple[int, dict, bytes]:
    client = await Client.connect(port)
    try:
        client.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return await client.response()
    finally:
        await client.close()


async def answered_then_closed(port: int, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """The response to request on a new connection, which the proxy then closes."""
    client = await Client.connect(port)
    try:
        client.send(request)
        response = await client.response()
        assert await client.at_eof(), f"the proxy kept the connection open after {response[0]}"
        return response
    finally:
        await client.close()


async def eventually(what: str, predicate, timeout_s: float = 5.0) -> None:
    """Poll predicate() on the loop until it is true; fail naming `what` if it never is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout_s} s")
        await asyncio.sleep(0.01)


def settled_once(router: StaticRouter) -> list[int]:
    """The status each lease was settled with; each exactly once."""
    assert all(len(lease.settled) == 1 for lease in router.leases), [lease.settled for lease in router.leases]
    return [lease.settled[0][0] for lease in router.leases]


def test_keep_alive_on_both_sides(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}) as (server, router, port):
            for _ in range(2):
                client = await Client.connect(port)
                for _ in range(10):
                    client.send(b"GET /hello HTTP/1.1\r\nHost: a.test\r\nUser-Agent: t\r\n\r\n")
                    status, headers, body = await client.response()
                    assert (status, body) == (200, b"hello")
                    assert b"connection" not in headers and headers[b"via"] == b"1.1 fcrun"
                await client.close()
            assert app.connections == 1   # 20 requests, 2 clients, one pooled upstream connection
            assert settled_once(router) == [200] * 20
            assert server.requests_in_flight == 0

    run(main)


def test_forwarding_headers_reach_the_app(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}) as (_, _, port):
            client = await Client.connect(port)
            client.send(b"GET /headers HTTP/1.1\r\nHost: A.test\r\nX-Forwarded-For: 203.0.113.9\r\n"
                        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\r\n")
            _, _, body = await client.response()
            seen = dict(line.split(b": ", 1) for line in body.split(b"\n"))
            assert seen[b"x-forwarded-for"] == b"127.0.0.1" and seen[b"x-real-ip"] == b"127.0.0.1"  # replaced
            assert seen[b"x-forwarded-proto"] == b"http" and seen[b"x-forwarded-host"] == b"A.test"
            assert seen[b"via"] == b"1.1 fcrun" and seen[b"host"] == b"A.test"
            assert not {b"connection", b"x-hop", b"keep-alive"} & seen.keys()
            await client.close()

    run(main)


def test_large_chunked_upload_and_download_stream_with_backpressure(run):
    async def main():
        total = 24 * 1024 * 1024
        config = ProxyConfig(timer_resolution_s=0.05, max_body_bytes=0)   # 0: unlimited (default 10 MiB)
        async with App() as app, proxy({"a.test": app.port}, config) as (server, router, port):
            # Download: the client does not read; the proxy must hold back the app, not buffer.
            client = await Client.connect(port)
            client.send(b"GET /big?n=%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % total)
            await stalled(lambda: app.sent)
            assert app.sent < total
            assert proxy_buffered(server) <= 1024 * 1024
            status, headers, body = await client.response()
            assert status == 200 and headers[b"transfer-encoding"] == b"chunked"
            assert len(body) == total and body == pattern(0, 0) + b"".join(
                pattern(offset, min(CHUNK, total - offset)) for offset in range(0, total, CHUNK))

            # Upload: the app does not read until released; the client's writes must block.
            client.send(b"POST /echo?wait HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n")
            digest, sent = hashlib.sha256(), 0

            async def upload():
                nonlocal sent
                for offset in range(0, total, CHUNK):
                    data = pattern(offset, CHUNK)
                    digest.update(data)
                    client.send(b"%x\r\n%s\r\n" % (len(data), data))
                    sent += len(data)
                    await client.writer.drain()
                client.send(b"0\r\n\r\n")

            uploading = asyncio.create_task(upload())
            await stalled(lambda: sent)
            assert sent < total and not uploading.done()
            assert proxy_buffered(server) <= 1024 * 1024
            app.release.set()
            await uploading
            status, _, body = await client.response()
            assert (status, body) == (200, b"%d %s" % (total, digest.hexdigest().encode()))
            await client.close()
            assert settled_once(router) == [200, 200]

    run(main, timeout_s=60)


async def stalled(progress, steps: int = 200) -> None:
    """Wait until ``progress()`` stops growing for a few polls (bounded)."""
    last, still = -1, 0
    for _ in range(steps):
        await asyncio.sleep(0.02)
        now = progress()
        still = still + 1 if now == last else 0
        if still >= 5:
            return
        last = now
    raise AssertionError("transfer never stalled: no backpressure")


def test_write_parts_pauses_the_writer_on_a_peer_that_does_not_read(run):
    # The proxy's backpressure rests on this: a write of several parts (a chunk's size line,
    # data and CRLF) must call pause_writing() once the transport's buffer is full, on this
    # Python and loop (asyncio's writelines() did not on 3.12.0-3.12.8 and 3.13.0-3.13.1).
    async def main():
        loop = asyncio.get_running_loop()
        paused = []
        peers: list[asyncio.StreamWriter] = []

        class Writer(asyncio.Protocol):
            def pause_writing(self) -> None:
                paused.append(True)

        server = await asyncio.start_server(lambda _, w: peers.append(w), "127.0.0.1", 0)
        transport, _ = await loop.create_connection(Writer, "127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            part, written = pattern(0, CHUNK), 0
            while not paused and written < 64 * 1024 * 1024:
                write_parts(transport, [b"%x\r\n" % CHUNK, part, b"\r\n"])
                written += CHUNK
            assert paused, f"{written} bytes written, pause_writing() never called"
        finally:
            transport.abort()
            for peer in peers:
                peer.transport.abort()
            server.close()
            await server.wait_closed()

    run(main)


@pytest.mark.parametrize("version, pauses", [
    ((3, 11, 7), True), ((3, 12, 0), False), ((3, 12, 8), False), ((3, 12, 9), True),
    ((3, 13, 0), False), ((3, 13, 1), False), ((3, 13, 2), True), ((3, 14, 0), True)])
def test_writelines_pauses_on_the_releases_with_the_fix(version, pauses):
    assert writelines_pauses(version) is pauses


def proxy_buffered(server: ProxyServer) -> int:
    """Bytes the proxy holds in its transports' write buffers and pending body lists."""
    held = 0
    for conn in server.connections:
        held += conn.transport.get_write_buffer_size()
        if conn.active is not None:
            held += conn.active.pending_bytes
            if conn.active.conn is not None:
                held += conn.active.conn.transport.get_write_buffer_size()
    return held


def test_expect_100_continue(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}) as (_, router, port):
            client = await Client.connect(port)
            client.send(b"PUT /echo HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            assert await client.head() == (100, {})
            client.send(b"hello")
            status, _, body = await client.response()
            assert (status, body) == (200, b"5 " + hashlib.sha256(b"hello").hexdigest().encode())
            assert b"expect" not in app.requests[0][2]
            await client.close()

    run(main)


def test_websocket_style_upgrade_is_tunnelled(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}) as (server, router, port):
            client = await Client.connect(port)
            client.send(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly ")
            status, headers = await client.head()
            assert status == 101 and headers[b"upgrade"] == b"echo" and headers[b"connection"] == b"upgrade"
            client.send(b"bytes")
            received = b""
            while len(received) < len(b"EARLY BYTES"):
                received += await client.reader.read(100)
            assert received == b"EARLY BYTES"
            assert server.requests_in_flight == 1   # the tunnel holds its lease
            client.writer.write_eof()
            assert await client.at_eof()
            await client.close()
            await eventually("the lease to be settled", lambda: router.leases[0].settled)
            assert settled_once(router) == [101]

    run(main)


def test_upstream_down_is_502(run, closed_port):
    async def main():
        async with proxy({"a.test": closed_port}) as (_, router, port):
            status, _, body = await get(port)
            assert status == 502 and b"a.test" in body
            assert settled_once(router) == [502]

    run(main)


@pytest.mark.parametrize("nowait", [True, False], ids=["nowait", "cold"])
def test_route_errors_map_to_statuses(run, nowait):
    async def main():
        errors = {"broken.test": RouteError(502, "cannot start: image 'web' missing"),
                  "late.test": RouteError(504, "instance not ready after 30 s")}
        async with proxy({}, errors=errors, nowait=nowait) as (_, _, port):
            status, _, body = await get(port, host="nobody.test")
            assert status == 404 and b"nobody.test" in body
            status, _, body = await get(port, host="broken.test")
            assert status == 502 and b"image 'web' missing" in body
            status, _, body = await get(port, host="late.test")
            assert status == 504 and b"not ready" in body

    run(main)


def test_cold_start_header_and_lease(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}, cold_start=("start", 42.0),
                                       delay_s=0.01) as (_, router, port):
            status, headers, body = await get(port)
            assert (status, body) == (200, b"hello")
            assert headers[b"x-fcrun-cold-start"] == b"42.0"
            assert headers[b"x-fcrun-cold-start-path"] == b"start"
            assert router.leases[0].settled == [(200, 37, router.leases[0].settled[0][2], False)]

    run(main)


def test_slowloris_head_times_out(run):
    async def main():
        config = ProxyConfig(header_timeout_s=0.2, timer_resolution_s=0.05)
        async with proxy({}, config) as (server, _, port):
            status, headers, _ = await answered_then_closed(port, b"GET / HTTP/1.1\r\nHost: a.te")
            assert status == 408 and headers[b"connection"] == b"close"

    run(main)


def test_idle_keep_alive_connection_is_closed(run):
    async def main():
        config = ProxyConfig(keepalive_timeout_s=0.2, timer_resolution_s=0.05)
        async with App() as app, proxy({"a.test": app.port}, config) as (server, _, port):
            status, _, _ = await answered_then_closed(port, b"GET /hello HTTP/1.1\r\nHost: a.test\r\n\r\n")
            assert status == 200

    run(main)


@pytest.mark.parametrize("method", [b"POST", b"GET"])
def test_reset_mid_response_is_never_retried(run, method):
    async def main():
        async with App() as app, proxy({"a.test": app.port}) as (_, router, port):
            client = await Client.connect(port)
            client.send(method + b" /partial HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n")
            status, headers = await client.head()
            assert status == 200 and headers[b"content-length"] == b"100"
            rest = await client.reader.read()
            assert len(rest) < 100   # truncated, and the connection closed
            await client.close()
            assert app.paths(b"/partial") == 1
            await eventually("the lease to be settled", lambda: router.leases[0].settled)
            assert router.leases[0].settled[0][0] == 200 and router.leases[0].settled[0][3] is True

    run(main)


def test_upstream_that_closes_after_each_response(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}) as (_, router, port):
            client = await Client.connect(port)
            for _ in range(5):
                client.send(b"GET /close-after HTTP/1.1\r\nHost: a.test\r\n\r\n")
                assert (await client.response())[:3:2] == (200, b"ok")
            await client.close()
            assert settled_once(router) == [200] * 5

    run(main)


def test_http10_client_without_keep_alive(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}) as (_, _, port):
            status, headers, body = await answered_then_closed(port, b"GET /hello HTTP/1.0\r\nHost: a.test\r\n\r\n")
            assert (status, body, headers[b"connection"]) == (200, b"hello", b"close")

    run(main)


def test_head_request(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}) as (_, _, port):
            client = await Client.connect(port)
            client.send(b"HEAD /hello HTTP/1.1\r\nHost: a.test\r\n\r\n")
            status, headers, _ = await client.response(head_request=True)
            assert status == 200 and headers[b"content-length"] == b"5"
            client.send(b"GET /hello HTTP/1.1\r\nHost: a.test\r\n\r\n")   # nothing stray in between
            assert (await client.response())[2] == b"hello"
            await client.close()

    run(main)


def test_malformed_request_is_400(run):
    async def main():
        async with proxy({}) as (_, _, port):
            status, headers, _ = await answered_then_closed(port, b"GET / HTTP/1.1\r\nHost a.test\r\n\r\n")
            assert status == 400 and headers[b"connection"] == b"close"

    run(main)


def test_close_drains_in_flight_requests(run):
    async def main():
        async with App() as app:
            router = StaticRouter({"a.test": ("127.0.0.1", app.port)})
            server = ProxyServer(router, ProxyConfig(timer_resolution_s=0.05))
            await server.start("127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            client = await Client.connect(port)
            client.send(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n\r\n")
            await eventually("the request to be in flight", lambda: server.requests_in_flight)
            closing = asyncio.create_task(server.close(drain_timeout_s=5))
            status, headers, body = await client.response()
            assert (status, body, headers[b"connection"]) == (200, b"slow", b"close")
            await closing
            assert server.active_connections == 0 and settled_once(router) == [200]
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
            await client.close()

    run(main)


def test_concurrent_clients_share_a_bounded_pool(run):
    async def main():
        config = ProxyConfig(upstream_pool_per_instance=4, timer_resolution_s=0.05)
        async with App() as app, proxy({"a.test": app.port}, config) as (server, router, port):
            results = await asyncio.gather(*(get(port, "/slow") for _ in range(20)))
            assert [(status, body) for status, _, body in results] == [(200, b"slow")] * 20
            assert 1 <= app.connections <= 20
            assert server.upstreams.idle_connections <= 4
            assert settled_once(router) == [200] * 20

    run(main)


# Bounds against slow and hostile clients, on real sockets. The sweep is driven by hand
# (timer_resolution_s is an hour: it never runs by itself): server.check_timeouts(t) is the
# sweep at time t, so the clients are as slow as the test says without the test sleeping.

MANUAL_SWEEP = ProxyConfig(timer_resolution_s=3600.0, body_idle_timeout_s=30.0, body_timeout_s=300.0,
                           upstream_response_timeout_s=60.0, upstream_read_timeout_s=60.0, send_timeout_s=60.0,
                           tunnel_idle_timeout_s=300.0)


async def swept(server: ProxyServer, seconds: float) -> None:
    """Move the proxy's clock on by ``seconds`` and sweep; then let the loop deliver what it did."""
    server.check_timeouts(server.now + seconds)
    for _ in range(5):
        await asyncio.sleep(0.01)


def test_slow_body_is_408_and_frees_the_instance(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}, MANUAL_SWEEP) as (server, router, port):
            client = await Client.connect(port)
            client.send(b"POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100000\r\n\r\nx")
            await eventually("the app to get the request", lambda: app.requests)
            await swept(server, 20)
            client.send(b"y")   # one byte at 20 s: not idle yet
            await asyncio.sleep(0.05)
            await swept(server, 20)
            assert not router.leases[0].settled
            await swept(server, 11)
            status, headers, body = await client.response()
            assert status == 408 and headers[b"connection"] == b"close" and b"body_idle_timeout_s" in body
            client.send(b"z" * 1000)   # still sending while the proxy lingers: dropped
            assert settled_once(router) == [408] and server.requests_in_flight == 0
            await eventually("the app's connection to end", lambda: app.closed_connections == 1)
            await client.close()

    run(main)


def test_body_trickled_past_the_total_timeout_is_408(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}, MANUAL_SWEEP) as (server, router, port):
            client = await Client.connect(port)
            client.send(b"POST /echo HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(15):   # a chunk every 20 s of proxy time: never idle for 30 s
                client.send(b"1\r\nx\r\n")
                await asyncio.sleep(0.01)
                await swept(server, 20)
            status, _, body = await answered(client)
            assert status == 408 and b"not complete within 300 s" in body
            assert settled_once(router) == [408]

    run(main)


async def answered(client: Client) -> tuple[int, dict, bytes]:
    response = await client.response()
    await client.close()
    return response


def test_no_response_head_is_504_naming_the_host_and_the_timeout(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}, MANUAL_SWEEP) as (server, router, port):
            client = await Client.connect(port)
            client.send(b"GET /hang HTTP/1.1\r\nHost: a.test\r\n\r\n")
            await eventually("the app to get the request", lambda: app.requests)
            await swept(server, 59)
            assert not router.leases[0].settled
            await swept(server, 2)
            status, _, body = await client.response()
            assert status == 504 and b"a.test" in body and b"60 s (upstream_response_timeout_s)" in body
            await eventually("the app's connection to end", lambda: app.closed_connections == 1)
            client.send(b"GET /hello HTTP/1.1\r\nHost: a.test\r\n\r\n")   # the client's connection lives on
            assert (await client.response())[2] == b"hello"
            await client.close()
            assert settled_once(router) == [504, 200]

    run(main)


def test_upstream_connect_timeout_is_504(run):
    async def main():
        # A listener whose accept queue is full: the kernel drops further SYNs, connect() hangs.
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = []
        try:
            for _ in range(3):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(listener.getsockname())
                fillers.append(filler)
            config = ProxyConfig(timer_resolution_s=0.05, upstream_connect_timeout_s=0.2)
            async with proxy({"a.test": listener.getsockname()[1]}, config) as (_, router, port):
                status, _, body = await get(port)
                assert status == 504 and b"did not accept a connection within 0.2 s" in body
                assert settled_once(router) == [504]
        finally:
            for sock in fillers + [listener]:
                sock.close()

    run(main)


def test_stalled_instance_mid_response_is_cut(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}, MANUAL_SWEEP) as (server, router, port):
            client = await Client.connect(port)
            client.send(b"GET /stall HTTP/1.1\r\nHost: a.test\r\n\r\n")
            status, headers = await client.head()
            assert status == 200 and headers[b"content-length"] == b"100"
            await swept(server, 61)
            assert await client.reader.read() == b"0123456789"   # truncated, then closed
            await client.close()
            await eventually("the app's connection to end", lambda: app.closed_connections == 1)
            (lease,) = router.leases
            assert lease.settled[0][0] == 200 and lease.settled[0][3] is True

    run(main)


def test_slow_reader_holds_the_instance_back_then_is_dropped(run):
    async def main():
        total = 64 * 1024 * 1024
        async with App() as app, proxy({"a.test": app.port}, MANUAL_SWEEP) as (server, router, port):
            loop = asyncio.get_running_loop()
            with socket.socket() as reader_sock:
                reader_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                reader_sock.setblocking(False)
                await loop.sock_connect(reader_sock, ("127.0.0.1", port))
                await loop.sock_sendall(reader_sock, b"GET /big?n=%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % total)
                await loop.sock_recv(reader_sock, 1)   # it reads one byte, then nothing
                await stalled(lambda: app.sent)
                assert app.sent < 16 * 1024 * 1024   # the instance was paused, not drained into memory
                assert proxy_buffered(server) <= 1024 * 1024
                await swept(server, 61)
                await eventually("the lease to be settled", lambda: router.leases[0].settled)
                assert router.leases[0].settled[0][3] is True and server.active_connections == 0
                await eventually("the app's connection to end", lambda: app.closed_connections == 1)

    run(main, timeout_s=60)


def test_idle_tunnel_is_closed_on_both_sides(run):
    async def main():
        async with App() as app, proxy({"a.test": app.port}, MANUAL_SWEEP) as (server, router, port):
            client = await Client.connect(port)
            client.send(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            assert (await client.head())[0] == 101
            await swept(server, 250)
            client.send(b"ping")
            assert await client.reader.readexactly(4) == b"PING"
            await swept(server, 250)   # 250 s after the last byte
            assert not router.leases[0].settled
            await swept(server, 51)
            assert await client.reader.read() == b""
            await client.close()
            await eventually("the app's connection to end", lambda: app.closed_connections == 1)
            await eventually("the lease to be settled", lambda: router.leases[0].settled)
            assert settled_once(router) == [101]

    run(main)


async def refused(port: int, source: str = "127.0.0.1") -> bytes:
    """What a new connection from ``source`` is told before the proxy closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        return await reader.read()
    finally:
        writer.close()


async def held(port: int, n: int, source: str = "127.0.0.1") -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(n):
        writers.append((await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)))[1])
    return writers


def test_connections_over_the_global_cap_get_503_at_accept(run):
    async def main():
        config = ProxyConfig(timer_resolution_s=0.05, max_connections=3)
        async with App() as app, proxy({"a.test": app.port}, config) as (server, router, port):
            writers = await held(port, 3)
            await eventually("3 connections to be accepted", lambda: server.open_connections == 3)
            answer = await refused(port)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"too many open connections" in answer
            assert server.refused_connections == 1 and server.open_connections == 3
            writers.pop().close()
            await eventually("a connection to be counted out", lambda: server.open_connections == 2)
            assert (await get(port))[:3:2] == (200, b"hello")
            for writer in writers:
                writer.close()
            await eventually("every connection to be counted out", lambda: server.open_connections == 0)

    run(main)


def test_connections_over_the_per_ip_cap_get_503_and_other_addresses_do_not(run):
    async def main():
        config = ProxyConfig(timer_resolution_s=0.05, max_connections_per_ip=2)
        async with App() as app, proxy({"a.test": app.port}, config) as (server, router, port):
            writers = await held(port, 2)
            await eventually("2 connections to be accepted", lambda: server.open_connections == 2)
            answer = await refused(port)   # loopback is not exempt
            assert answer.startswith(b"HTTP/1.1 503 ") and b"from your address" in answer
            assert (await get_from(port, "127.0.0.2"))[2] == b"hello"   # another address is not capped
            for writer in writers:
                writer.close()
            await eventually("the connections to be counted out", lambda: server.open_connections == 0)
            assert (await get(port))[2] == b"hello"

    run(main)


def test_trusted_proxies_are_exempt_from_the_per_ip_cap(run):
    async def main():
        config = ProxyConfig(timer_resolution_s=0.05, max_connections_per_ip=1, trusted_proxies=("127.0.0.1/32",))
        async with App() as app, proxy({"a.test": app.port}, config) as (server, _, port):
            writers = await held(port, 3)
            await eventually("3 connections to be accepted", lambda: server.open_connections == 3)
            assert server.refused_connections == 0
            for writer in writers:
                writer.close()

    run(main)


async def get_from(port: int, source: str) -> tuple[int, dict, bytes]:
    client = Client(*await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)))
    try:
        client.send(b"GET /hello HTTP/1.1\r\nHost: a.test\r\n\r\n")
        return await client.response()
    finally:
        await client.close()


class PreforkApp(App):
    """An app with `workers` workers, each serving one connection at a time for as long as it
    stays open (Apache prefork with keep-alive); the other connections wait to be served, as
    they would in the kernel's accept queue."""

    def __init__(self, workers: int) -> None:
        super().__init__()
        self.workers = asyncio.Semaphore(workers)
        self.serving = 0
        self.most_serving = 0

    async def _serve(self, reader, writer):
        async with self.workers:
            self.serving += 1
            self.most_serving = max(self.most_serving, self.serving)
            try:
                await super()._serve(reader, writer)
            finally:
                self.serving -= 1


def test_a_finished_connection_frees_its_worker_for_a_queued_one(run):
    """Six requests at once to an app with two workers: the four connections beyond the workers
    are queued. Each finished connection is closed, not kept idle (which would hold its worker
    until upstream_idle_s, an hour here), so every request is answered."""

    async def main():
        config = ProxyConfig(upstream_idle_s=3600.0, timer_resolution_s=0.05)
        app = PreforkApp(workers=2)
        async with app, proxy({"a.test": app.port}, config) as (server, router, port):
            results = await asyncio.gather(*(get(port, "/slow") for _ in range(6)))
            assert [(status, body) for status, _, body in results] == [(200, b"slow")] * 6
            assert app.most_serving == 2 and app.connections == 6
            assert settled_once(router) == [200] * 6
            # Once nothing is queued, connections are kept again: two requests in a row share one.
            connections = app.connections
            for _ in range(2):
                assert (await get(port, "/hello"))[0] == 200
            assert app.connections - connections <= 1
            assert server.upstreams.unanswered_connections == 0

    run(main)


def test_fast_upstream_connections_are_kept_under_concurrency(run):
    """An instance that answers at once never looks queued: its finished connections are kept,
    however many new ones are opening meanwhile (closing them would open new ones, which would
    close others, and so on: a connection per request)."""

    async def main():
        async with App() as app, proxy({"a.test": app.port}) as (server, router, port):
            async def client_loop():
                client = await Client.connect(port)
                try:
                    for _ in range(25):
                        client.send(b"GET /hello HTTP/1.1\r\nHost: a.test\r\n\r\n")
                        status, _, body = await client.response()
                        assert (status, body) == (200, b"hello")
                finally:
                    await client.close()

            await asyncio.gather(*(client_loop() for _ in range(16)))
            assert app.connections <= 16, app.connections  # 400 requests: at most one connection per client
            assert settled_once(router) == [200] * 400

    run(main)


def test_a_queued_connection_gets_the_worker_of_an_idle_kept_one(run):
    """Three quick requests at once to an app with two workers: two are answered at once and
    their connections kept idle, each holding a worker; nothing else finishes to free one, so
    an idle connection is closed once the third has waited upstream_queued_after_s (a timer:
    the sweep, an hour apart here, plays no part)."""

    async def main():
        config = ProxyConfig(upstream_idle_s=3600.0, timer_resolution_s=3600.0, upstream_queued_after_s=0.05)
        app = PreforkApp(workers=2)
        async with app, proxy({"a.test": app.port}, config) as (server, router, port):
            results = await asyncio.gather(*(get(port, "/hello") for _ in range(3)))
            assert [(status, body) for status, _, body in results] == [(200, b"hello")] * 3
            assert app.most_serving == 2 and app.connections == 3
            assert server.upstreams.unanswered_connections == 0

    run(main)
