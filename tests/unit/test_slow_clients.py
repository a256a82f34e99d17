"""The slow-client suite: the proxy in a process of its own, hostile clients on real loopback sockets.

The proxy under test runs as a child process (this file, run as a script): a ProxyServer on
uvloop with a StaticRouter to an upstream app in the same child (``/hello``, ``/big?n=`` and
``/stats``, which reports the proxy's counters). The test process is the clients, so the
child's RSS is the proxy's memory (plus its small app), as serve's would be.

Bounds asserted (the figures with serve itself are bench/slow_clients.py's, in bench/README.md):
- 5,000 idle connections held at once cost the proxy under IDLE_RSS_BOUND_BYTES each (RSS
  growth / connections), and a well-behaved client's requests meanwhile all succeed;
- a slow reader of a 256 MiB response holds the proxy's RSS growth under READER_RSS_BOUND_BYTES
  (the instance is paused at the transports' buffers: 64 KiB high-water marks and the kernel's
  socket buffers), and is dropped after send_timeout_s;
- a slow head gets 408 after header_timeout_s, a slow body 408 after body_idle_timeout_s /
  body_timeout_s, each settling its lease.
No timing is asserted: the timeouts are short and the test waits for their effects.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time

import pytest

IDLE_CONNECTIONS = 5000
IDLE_RSS_BOUND_BYTES = 16 * 1024          # per idle connection
READER_RSS_BOUND_BYTES = 16 * 1024 * 1024  # for one slow reader of a 256 MiB response
BIG_RESPONSE_BYTES = 256 * 1024 * 1024
CHUNK = 64 * 1024

HOLDING = {"header_timeout_s": 600.0, "max_connections": 20000, "max_connections_per_ip": 20000}
BOUNDED = {"header_timeout_s": 1.0, "body_idle_timeout_s": 1.0, "body_timeout_s": 2.5, "send_timeout_s": 1.0,
           "timer_resolution_s": 0.1}


# The child: proxy + app ---------------------------------------------------------------------------

def serve(config_json: str) -> None:
    """Child process: print the proxy's port, serve until stdin closes."""
    from fcrun.proxy import ProxyConfig, ProxyServer, event_loop_factory
    from fcrun.proxy.testing import StaticRouter

    async def main() -> None:
        sent = [0]
        proxy: ProxyServer | None = None

        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    target = head.split(b" ", 2)[1]
                    if target.startswith(b"/big"):
                        total = int(target.split(b"?n=")[1])
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
                        block = b"x" * CHUNK
                        for _ in range(total // CHUNK):
                            writer.write(block)
                            sent[0] += CHUNK
                            await writer.drain()
                        continue
                    if target == b"/upload":   # reads the whole body first
                        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                        await reader.readexactly(length)
                    if target == b"/stats":
                        body = json.dumps({"open_connections": proxy.open_connections, "big_sent": sent[0],
                                           "settled": [lease.settled[0][0] if lease.settled else None
                                                       for lease in router.leases]}).encode()
                    else:
                        body = b"hello"
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        upstream = await asyncio.start_server(app, "127.0.0.1", 0)
        router = StaticRouter({"a.test": ("127.0.0.1", upstream.sockets[0].getsockname()[1])})
        proxy = ProxyServer(router, ProxyConfig(**json.loads(config_json)))
        await proxy.start("127.0.0.1", 0)
        print(proxy.sockets[0].getsockname()[1], flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)   # until the test closes our stdin
        await proxy.close(drain_timeout_s=0.5)
        upstream.close()

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main())


# The test's side ----------------------------------------------------------------------------------

class Proxy:
    """The child process: its port, RSS and counters."""

    def __init__(self, config: dict):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), f"the proxy child did not start: {line!r}"
        self.port = int(line)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/PID/status")

    def stats(self) -> dict:
        status, body = request(self.port, b"/stats")
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def request(port: int, path: bytes, sock: socket.socket | None = None) -> tuple[int, bytes]:
    """One GET (on ``sock`` if given, kept open, else on a new connection)."""
    own = sock is None
    if own:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: a.test\r\n\r\n" % path)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response head: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-body"
            body += chunk
        return int(head.split(b" ")[1]), body
    finally:
        if own:
            sock.close()


def wait_for(what: str, predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {timeout_s} s"
        time.sleep(0.05)


def closed_by_peer(sock: socket.socket, timeout_s: float = 20.0) -> bytes:
    """Everything ``sock`` receives until the proxy closes it (a reset counts as closed)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.fixture
def raised_nofile():
    """RLIMIT_NOFILE's soft limit raised to the hard one (the child inherits it); restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = IDLE_CONNECTIONS + 512
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is under the {needed} descriptors this test holds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else needed, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def holding_proxy(raised_nofile):
    proxy = Proxy(HOLDING)
    yield proxy
    proxy.stop()


@pytest.fixture
def bounded_proxy():
    proxy = Proxy(BOUNDED)
    yield proxy
    proxy.stop()


def test_5000_idle_connections_are_held_in_bounded_memory_while_a_client_is_served(holding_proxy):
    proxy = holding_proxy
    good = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    for _ in range(50):   # warm: imports, pools and caches settle before the baseline
        assert request(proxy.port, b"/hello", good) == (200, b"hello")
    baseline = proxy.rss_bytes()
    idle: list[socket.socket] = []
    try:
        served = 0
        for batch in range(IDLE_CONNECTIONS // 500):
            for _ in range(500):
                idle.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=10))
            for _ in range(20):   # the well-behaved client, between batches
                assert request(proxy.port, b"/hello", good) == (200, b"hello")
                served += 1
        wait_for("every idle connection to be accepted",
                 lambda: proxy.stats()["open_connections"] >= IDLE_CONNECTIONS + 1)
        for _ in range(200):
            assert request(proxy.port, b"/hello", good) == (200, b"hello")
        held_rss = proxy.rss_bytes()
        per_connection = (held_rss - baseline) / IDLE_CONNECTIONS
        assert per_connection < IDLE_RSS_BOUND_BYTES, (
            f"{per_connection:.0f} bytes of proxy RSS per idle connection (bound {IDLE_RSS_BOUND_BYTES})")
    finally:
        for sock in idle:
            sock.close()
    wait_for("the idle connections to be counted out", lambda: proxy.stats()["open_connections"] <= 2)
    assert request(proxy.port, b"/hello", good) == (200, b"hello")
    good.close()


def test_slow_reader_pauses_the_app_and_is_dropped(bounded_proxy):
    proxy = bounded_proxy
    assert request(proxy.port, b"/hello") == (200, b"hello")
    baseline = proxy.rss_bytes()
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", proxy.port))
    reader.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % BIG_RESPONSE_BYTES)
    reader.recv(100)   # a little of the head, then nothing more
    sent = [-1]

    def stalled() -> bool:
        before, sent[0] = sent[0], proxy.stats()["big_sent"]
        return sent[0] == before

    wait_for("the app to be paused", stalled)
    assert sent[0] < BIG_RESPONSE_BYTES // 8, f"the app wrote {sent[0]} bytes for a client that reads none"
    growth = proxy.rss_bytes() - baseline
    assert growth < READER_RSS_BOUND_BYTES, f"the proxy's RSS grew by {growth} bytes for one slow reader"
    rest = closed_by_peer(reader)   # dropped after send_timeout_s (what was in flight arrives first)
    assert len(rest) < BIG_RESPONSE_BYTES // 8
    reader.close()
    wait_for("the lease to be settled", lambda: proxy.stats()["settled"][1] is not None)
    assert proxy.stats()["settled"][1] == 200   # settled as a failed 200 (the head went out)


def test_slow_head_is_408(bounded_proxy):
    sock = socket.create_connection(("127.0.0.1", bounded_proxy.port), timeout=20)
    sock.sendall(b"GET /hello HTTP/1.1\r\nHo")
    answer = closed_by_peer(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request head not received in time" in answer
    sock.close()


@pytest.mark.parametrize("trickle_s, bound", [(None, b"body_idle_timeout_s"), (0.3, b"body_timeout_s")])
def test_slow_body_is_408_and_settles_the_lease(bounded_proxy, trickle_s, bound):
    proxy = bounded_proxy
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
    sock.sendall(b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100000\r\n\r\nx")
    if trickle_s is not None:   # a byte every 0.3 s: never idle for 1 s, but over 2.5 s in all
        sock.settimeout(trickle_s)
        answer = b""
        while b"\r\n\r\n" not in answer:
            try:
                sock.sendall(b"x")
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        answer += closed_by_peer(sock)
    else:
        answer = closed_by_peer(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and bound in answer
    sock.close()
    wait_for("the lease to be settled", lambda: proxy.stats()["settled"][0] is not None)
    assert proxy.stats()["settled"][0] == 408


if __name__ == "__main__":
    serve(sys.argv[1])
