"""The proxy's listener: accepts client connections and owns what they share.

:class:`ProxyServer` accepts sockets in batches (backing off when the host is out of file
descriptors or memory), hands each to a :class:`~fcrun.proxy.connection.ClientConnection`
(connection.py: the request path), and owns what all connections share: the upstream pool,
the slow-path tasks (:class:`TaskOwner`: cold starts, connects, adopting an accepted socket)
and the coarse clock. Timeouts are one sweep every ``timer_resolution_s`` over all
connections' deadlines (a coarse clock, as nginx keeps one), so a request costs no timer handle.

Open client connections are bounded at accept, before a byte is read or a protocol object
made: beyond ``max_connections`` in all, or ``max_connections_per_ip`` from one address (an
IPv6 peer's /64), a connection gets a canned 503 and is closed. So a flood of connections
costs the kernel's socket buffers and a log line every few seconds, never unbounded memory.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import resource
import socket

from ..tasks import TaskOwner
from .config import ProxyConfig
from .connection import ClientConnection
from .http import Forwarding, error_response
from .router import Router
from .upstream import UpstreamConnections

log = logging.getLogger("fcrun.proxy")

# accept() failing with these means the host is out of a resource, not that the peer did
# something: accepting again at once would spin, so stop watching the socket for a while.
_ACCEPT_RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# A peer that gave up between SYN and accept(): nothing to do.
_ACCEPT_PEER_ERRNOS = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM))
_ACCEPT_BATCH = 64
_ACCEPT_BACKOFF_MIN_S = 0.05
_ACCEPT_BACKOFF_MAX_S = 2.0
# Refused connections are logged at most this often (counted meanwhile): a flood must not
# become a flood of log lines.
_REFUSAL_LOG_INTERVAL_S = 10.0
# Written at accept without reading the request (there is no room for its connection).
_REFUSED_FULL = error_response(503, "the server has too many open connections; try again later", close=True)
_REFUSED_PEER = error_response(503, "too many open connections from your address; close some and try again",
                               close=True)


def peer_key(host: str) -> str:
    """What the per-client cap counts by: an IPv4 address itself, an IPv6 address by its /64
    (one subscriber's usual allocation: counting single IPv6 addresses would bound nothing)."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)   # a dual-stack socket's view of an IPv4 peer
    return f"{ipaddress.IPv6Address(int(address) >> 64 << 64)}/64"


class ProxyServer:
    """The HTTP/1.1 reverse proxy: client connections in, leases from ``router``, instances out.

    Resource handling: owns its listening sockets, client connections, upstream connections and
    tasks; ``close()`` releases all of them.
    """

    def __init__(self, router: Router, config: ProxyConfig | None = None):
        self.router = router
        self.config = config = config or ProxyConfig()
        self.forwarding = Forwarding(config)
        self.upstreams = UpstreamConnections(config, self.forwarding)
        self.tasks = TaskOwner("proxy")  # serve replaces it with a scope of its own owner
        self.now = 0.0                 # coarse clock (loop.time() at the last sweep)
        self.closing = False
        self.requests_in_flight = 0
        # The router's optional fast path and hooks, looked up once (ClientConnection calls them).
        self.router_acquire_nowait = getattr(router, "acquire_nowait", None)
        self.router_connection_opened = getattr(router, "connection_opened", None)
        self.router_connection_closed = getattr(router, "connection_closed", None)
        self.router_retry_elsewhere = getattr(router, "retry_elsewhere", None)
        self.connections: set[ClientConnection] = set()   # open client connections (they add themselves)
        self.open_connections = 0   # accepted and not yet closed (counted at accept, against max_connections)
        self.refused_connections = 0   # refused at accept since start (both caps)
        self._per_peer: dict[str, int] = {}   # open connections by peer_key()
        self._refusals = {"max_connections": 0, "max_connections_per_ip": 0}   # since the last log line
        self._refusal_last_peer = ""
        self._refusal_log_due = 0.0
        self._sockets: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._accept_retries: dict[int, asyncio.TimerHandle] = {}
        self._accept_backoff_s = _ACCEPT_BACKOFF_MIN_S

    @property
    def active_connections(self) -> int:
        return len(self.connections)

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    def connection_factory(self) -> ClientConnection:
        return ClientConnection(self)

    async def start(self, host: str = "127.0.0.1", port: int = 8080, *,
                    sock: socket.socket | None = None) -> None:
        """Listen on ``host:port`` (or on ``sock``, already bound and listening) and serve.

        Raises:
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=4096)
        sock.setblocking(False)
        self._loop = loop
        self.now = self.upstreams.now = loop.time()
        self._sockets.append(sock)
        loop.add_reader(sock.fileno(), self._accept, sock)
        self._check_descriptor_limit()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.config.timer_resolution_s, self._sweep)

    def _check_descriptor_limit(self) -> None:
        """Say so when max_connections cannot be reached: accept would fail with EMFILE first
        (handled, with a back-off, but every other open() in the process fails too)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < self.config.max_connections + 256:
            log.warning("proxy: RLIMIT_NOFILE is %d, under [proxy] max_connections=%d plus room for "
                        "upstream connections: raise it (ulimit -n, LimitNOFILE=) or lower max_connections",
                        soft, self.config.max_connections)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                client, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in _ACCEPT_PEER_ERRNOS:
                    continue
                self._pause_accepting(sock, err)
                return
            self._accept_backoff_s = _ACCEPT_BACKOFF_MIN_S
            client.setblocking(False)
            key = self._admit(client, addr)
            if key is None:
                continue
            if client.family != socket.AF_UNIX:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.tasks.spawn(self._adopt(client, key))

    def _admit(self, client: socket.socket, addr: object) -> str | None:
        """Count a new connection against the caps: its peer_key ("" when only the global cap
        applies), or None when it was refused (answered 503 and closed)."""
        config = self.config
        if self.open_connections >= config.max_connections:
            self._refuse(client, _REFUSED_FULL, "max_connections", addr)
            return None
        key = ""
        if client.family in (socket.AF_INET, socket.AF_INET6) and not self.forwarding.trusts(addr[0]):
            key = peer_key(addr[0])
            count = self._per_peer.get(key, 0)
            if count >= config.max_connections_per_ip:
                self._refuse(client, _REFUSED_PEER, "max_connections_per_ip", addr)
                return None
            self._per_peer[key] = count + 1
        self.open_connections += 1
        return key

    def _refuse(self, client: socket.socket, response: bytes, limit: str, addr: object) -> None:
        try:
            client.send(response)   # best effort: it fits an empty socket buffer, or is lost
        except OSError:
            pass
        client.close()
        self.refused_connections += 1
        self._refusals[limit] += 1
        self._refusal_last_peer = addr[0] if isinstance(addr, tuple) else "a unix socket"
        self._log_refusals(self._loop.time())

    def _log_refusals(self, now: float) -> None:
        """One line per _REFUSAL_LOG_INTERVAL_S at most, with the counts since the last one."""
        refusals = self._refusals
        if now < self._refusal_log_due or not (refusals["max_connections"] or refusals["max_connections_per_ip"]):
            return
        log.warning("proxy: refused %d connection(s) at accept over max_connections=%d and %d over "
                    "max_connections_per_ip=%d (the last from %s); %d open",
                    refusals["max_connections"], self.config.max_connections, refusals["max_connections_per_ip"],
                    self.config.max_connections_per_ip, self._refusal_last_peer, self.open_connections)
        refusals["max_connections"] = refusals["max_connections_per_ip"] = 0
        self._refusal_log_due = now + _REFUSAL_LOG_INTERVAL_S

    def connection_closed(self, conn: ClientConnection) -> None:
        """A client connection is gone (ClientConnection.connection_lost): uncount it."""
        self.connections.discard(conn)
        key = conn.peer_key
        if key is None:
            return   # never counted (made by connection_factory), or uncounted already
        conn.peer_key = None
        self.open_connections -= 1
        if key:
            count = self._per_peer[key] - 1
            if count:
                self._per_peer[key] = count
            else:
                del self._per_peer[key]

    def _pause_accepting(self, sock: socket.socket, err: OSError) -> None:
        """Out of file descriptors or memory: log, stop accepting for a while, then retry.

        Pending connections wait in the listen backlog meanwhile; the delay doubles while the
        condition lasts.
        """
        delay = self._accept_backoff_s
        self._accept_backoff_s = min(delay * 2, _ACCEPT_BACKOFF_MAX_S)
        try:
            where = "%s:%s" % sock.getsockname()[:2]
        except OSError:
            where = "the proxy socket"
        level = logging.ERROR if err.errno in _ACCEPT_RESOURCE_ERRNOS else logging.WARNING
        log.log(level, "accept on %s: %s; retrying in %.2f s", where, err, delay)
        fd = sock.fileno()
        self._loop.remove_reader(fd)
        self._accept_retries[fd] = self._loop.call_later(delay, self._resume_accepting, sock)

    def _resume_accepting(self, sock: socket.socket) -> None:
        self._accept_retries.pop(sock.fileno(), None)
        if not self.closing:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def _adopt(self, client: socket.socket, key: str) -> None:
        conn = ClientConnection(self)
        conn.peer_key = key
        try:
            await self._loop.connect_accepted_socket(lambda: conn, client)
        except OSError as err:
            log.warning("proxy: cannot adopt an accepted connection: %s", err)
            client.close()
        finally:
            if conn.transport is None:   # never made (failed, or cancelled by close()): uncount it
                client.close()
                self.connection_closed(conn)

    def _sweep(self) -> None:
        self.check_timeouts(self._loop.time())
        self._sweeper = self._loop.call_later(self.config.timer_resolution_s, self._sweep)

    def check_timeouts(self, now: float) -> None:
        """Advance the coarse clock to ``now`` and act on every deadline that passed."""
        self.now = now
        for conn in [c for c in self.connections if c.deadline <= now]:
            conn.on_deadline()
        self.upstreams.expire(now)
        self._log_refusals(now)

    def reconfigure(self, config: ProxyConfig) -> None:
        """New settings (serve's SIGHUP): read from now on by every connection, request and sweep;
        connections already open keep the forwarding headers they started with."""
        self.config = config
        self.forwarding = Forwarding(config)
        self.upstreams.config = config
        self.upstreams.forwarding = self.forwarding

    def instance_gone(self, instance_id: str) -> None:
        """Drop the pooled connections of a stopped instance (busy ones close after their response)."""
        self.upstreams.instance_gone(instance_id)

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``drain_timeout_s``, then
        abort what is left (open tunnels included) and release everything."""
        if self.closing:
            return
        self.closing = True
        loop = self._loop or asyncio.get_running_loop()
        for sock in self._sockets:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        for handle in self._accept_retries.values():
            handle.cancel()
        self._accept_retries.clear()
        for conn in list(self.connections):
            conn.shutdown()
        # Connections that answered their last request and only wait for the client to close
        # (lingering) count as drained.
        deadline = loop.time() + drain_timeout_s
        while loop.time() < deadline and any(not c.lingering for c in self.connections):
            await asyncio.sleep(min(0.05, self.config.timer_resolution_s))
        # Slow paths still running (cold starts, connects, adoptions) end here; their
        # connections are aborted next.
        await self.tasks.aclose()
        for conn in list(self.connections):
            if conn.lingering:
                conn.transport.close()   # flushes the last response
            else:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        # Let the closed connections' connection_lost run (leases settle) before returning.
        for _ in range(10):
            if not self.connections:
                break
            await asyncio.sleep(0)
        self.upstreams.close()
