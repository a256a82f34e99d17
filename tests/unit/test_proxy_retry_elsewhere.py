"""The proxy's Router.retry_elsewhere hook on real sockets: a request whose upstream failed before
any byte of a response goes once to the upstream the router offers instead (a front: another
node). Connect failures: any method; a connection closed without an answer: GET and HEAD only."""

import asyncio
import contextlib

import pytest

from fcrun.proxy import ProxyConfig, ProxyServer
from fcrun.proxy.testing import RecordingLease, StaticRouter

from test_proxy_server import App, Client, eventually, get, run  # noqa: F401 - run is a fixture


class DroppingApp(App):
    async def handle_drop(self, method, target, headers, reader, writer):
        """Reads the request and closes without a byte of response (a node that died)."""
        return False


class FailoverRouter(StaticRouter):
    """Routes to `first`; retry_elsewhere offers `second` (or nothing when it is None)."""

    def __init__(self, first: int, second: int | None):
        super().__init__({"a.test": ("127.0.0.1", first)})
        self.second = second
        self.retries: list[tuple[str, RecordingLease]] = []

    def retry_elsewhere(self, host, failed):
        self.retries.append((host, failed))
        if self.second is None:
            return None
        lease = RecordingLease(("127.0.0.1", self.second), instance_id="second")
        self.leases.append(lease)
        return lease


@contextlib.asynccontextmanager
async def proxy(router):
    server = ProxyServer(router, ProxyConfig(timer_resolution_s=0.05))
    await server.start("127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        await server.close(drain_timeout_s=1.0)


async def request(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    client = await Client.connect(port)
    try:
        client.send(f"{method} {path} HTTP/1.1\r\nHost: a.test\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status, _, data = await client.response(head_request=method == "HEAD")
        return status, data
    finally:
        await client.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_an_upstream_that_refuses_connections_is_replaced_for_any_method(run, method, closed_port):
    async def main():
        async with App() as alive:
            router = FailoverRouter(closed_port, alive.port)
            async with proxy(router) as port:
                status, body = await request(port, method, "/hello", b"x" if method == "POST" else b"")
                assert (status, body) == (200, b"hello")  # nothing reached the dead one: safe to resend
                assert [host for host, _ in router.retries] == ["a.test"]
                await eventually("both leases settled", lambda: all(lease.settled for lease in router.leases))
                assert [lease.settled[0][0] for lease in router.leases] == [502, 200]
                assert router.leases[0].settled[0][3] is True and alive.paths(b"/hello") == 1

    run(main)


def test_a_get_whose_upstream_closed_without_an_answer_goes_elsewhere_a_post_does_not(run):
    async def main():
        async with DroppingApp() as dying, DroppingApp() as alive:
            router = FailoverRouter(dying.port, alive.port)
            async with proxy(router) as port:
                alive.handle_drop = alive.handle_hello  # the other node answers
                assert await request(port, "GET", "/drop") == (200, b"hello")
                assert dying.paths(b"/drop") == 1 and alive.paths(b"/drop") == 1
                status, body = await request(port, "POST", "/drop", b"data")
                assert status == 502 and b"a.test" in body  # it may have been processed: not resent
                assert dying.paths(b"/drop") == 2 and alive.paths(b"/drop") == 1

    run(main)


def test_one_retry_only_and_none_without_another_upstream(run):
    async def main():
        async with DroppingApp() as first, DroppingApp() as second:
            router = FailoverRouter(first.port, second.port)
            async with proxy(router) as port:
                status, _ = await request(port, "GET", "/drop")
                assert status == 502 and len(router.retries) == 1  # the second failed too: no third
                assert first.paths(b"/drop") == 1 and second.paths(b"/drop") == 1
            router = FailoverRouter(first.port, None)
            async with proxy(router) as port:
                status, _ = await request(port, "GET", "/drop")
                assert status == 502 and len(router.retries) == 1
                await eventually("the lease settled", lambda: router.leases[0].settled)
                assert [lease.settled[0][0] for lease in router.leases] == [502]

    run(main)
