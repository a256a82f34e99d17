"""The readiness probe, on loopback: accepted, refused, and the same answer in both forms."""

from __future__ import annotations

import asyncio
import select
import socket

import pytest

from fcrun.readiness import ConnectProbe, accepting


@pytest.fixture
def listening():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def answer(probe: ConnectProbe) -> bool:
    """The probe's outcome once its connect was answered (loopback answers at once)."""
    select.select([], [probe], [], 5.0)
    result = probe.outcome()
    assert result is not None, "loopback did not answer a connect"
    return result


def test_a_listening_port_is_accepting(listening):
    with ConnectProbe("127.0.0.1", listening) as probe:
        assert answer(probe) is True
        assert probe.outcome() is True  # settled: asked again, the same answer


def test_a_port_nobody_listens_on_is_not(closed_port):
    with ConnectProbe("127.0.0.1", closed_port) as probe:
        assert answer(probe) is False


def test_ipv6_addresses_are_probed_too():
    with socket.socket(socket.AF_INET6) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        sock.listen()
        with ConnectProbe("::1", sock.getsockname()[1]) as probe:
            assert answer(probe) is True


def test_the_probe_closes_its_socket(listening):
    probe = ConnectProbe("127.0.0.1", listening)
    probe.close()
    assert probe.sock.fileno() == -1


def test_the_async_form_gives_the_same_answers(listening, closed_port):
    async def both():
        return await accepting("127.0.0.1", listening), await accepting("127.0.0.1", closed_port)

    assert asyncio.run(both()) == (True, False)


# -- the HTTP probe (an app's ready path) -----------------------------------------------------

from fcrun.readiness import is_ready, ready_request, ready_status, status_of  # noqa: E402


@pytest.mark.parametrize("line, status", [
    (b"HTTP/1.1 200 OK\r\n", 200),
    (b"HTTP/1.0 503 Service Unavailable\r\n", 503),
    (b"HTTP/1.1 302\r\n", 302),  # the reason phrase may be empty
    (b"HTTP/1.1 204 No Content\n", 204),
    (b"HTTP/1.1 200 OK", None),  # cut short: no end of line
    (b"", None),  # closed without an answer
    (b"SSH-2.0-OpenSSH_9.2\r\n", None),  # not HTTP on that port
    (b"HTTP/2 200\r\n", None),
    (b"HTTP/1.1 20 OK\r\n", None),
    (b"HTTP/1.1 999 Weird\r\n", None),
])
def test_the_status_line_is_parsed_strictly(line, status):
    assert status_of(line) == status


def test_2xx_and_3xx_are_ready():
    assert [is_ready(s) for s in (None, 101, 200, 204, 302, 399, 400, 404, 500, 503)] == [
        False, False, True, True, True, True, False, False, False, False]


def test_the_request_names_the_path_and_host():
    assert ready_request("shop.example.test", "/healthz?deep=1") == (
        b"GET /healthz?deep=1 HTTP/1.1\r\nHost: shop.example.test\r\nUser-Agent: fcrun-readiness\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n")


class TinyHTTP:
    """A loopback HTTP server whose answers a test scripts: each request gets the next status
    (the last one repeats); it records the request heads it read."""

    def __init__(self, statuses: list[int | bytes]):
        self.statuses = statuses
        self.requests: list[bytes] = []
        self.handlers: list[asyncio.Task] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.append(asyncio.current_task())
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            answer = self.statuses[min(len(self.requests), len(self.statuses)) - 1]
            if answer == b"hang":
                await reader.read()  # until the prober gives up and closes
            elif isinstance(answer, bytes):
                writer.write(answer)
            else:
                writer.write(f"HTTP/1.1 {answer} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()


async def _probe_many(statuses, paths, timeout_s=5.0):
    server_side = TinyHTTP(statuses)
    server = await asyncio.start_server(server_side.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        found = [await ready_status("127.0.0.1", port, "app.test", path, timeout_s=timeout_s) for path in paths]
        await asyncio.gather(*server_side.handlers)  # each ends once the prober closed its connection
    finally:
        server.close()
        await server.wait_closed()
    return found, server_side.requests


def test_a_real_server_is_asked_with_the_apps_host():
    found, requests = asyncio.run(_probe_many([503, 503, 200], ["/healthz"] * 4))
    assert found == [503, 503, 200, 200]
    assert all(r.startswith(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n") for r in requests)


def test_no_answer_is_none_not_an_error(closed_port):
    assert asyncio.run(ready_status("127.0.0.1", closed_port, "app.test", "/")) is None  # refused
    found, _ = asyncio.run(_probe_many([b"garbage\r\n", b"hang"], ["/", "/"], timeout_s=0.2))
    assert found == [None, None]  # not HTTP; no answer within the probe's timeout
