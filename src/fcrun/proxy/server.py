"""The proxy's listener: accepts client connections and owns what they share.

:class:`ProxyServer` accepts sockets in batches (backing off when the host is out of file
descriptors or memory), hands each to a :class:`~fcrun.proxy.connection.ClientConnection`
(connection.py: the request path), and owns what all connections share: the upstream pool,
the slow-path tasks (:class:`TaskOwner`: cold starts, connects, adopting an accepted socket)
and the coarse clock. Timeouts are one sweep every ``timer_resolution_s`` over all
connections' deadlines (a coarse clock, as nginx keeps one), so a request costs no timer handle.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from ..tasks import TaskOwner
from .config import ProxyConfig
from .connection import ClientConnection
from .http import Forwarding
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
        self.connections: set[ClientConnection] = set()   # open client connections (they add themselves)
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
        self.now = loop.time()
        self._sockets.append(sock)
        loop.add_reader(sock.fileno(), self._accept, sock)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.config.timer_resolution_s, self._sweep)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                client, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in _ACCEPT_PEER_ERRNOS:
                    continue
                self._pause_accepting(sock, err)
                return
            self._accept_backoff_s = _ACCEPT_BACKOFF_MIN_S
            client.setblocking(False)
            if client.family != socket.AF_UNIX:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.tasks.spawn(self._adopt(client))

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

    async def _adopt(self, client: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self.connection_factory, client)
        except OSError as err:
            log.warning("proxy: cannot adopt an accepted connection: %s", err)
            client.close()

    def _sweep(self) -> None:
        self.check_timeouts(self._loop.time())
        self._sweeper = self._loop.call_later(self.config.timer_resolution_s, self._sweep)

    def check_timeouts(self, now: float) -> None:
        """Advance the coarse clock to ``now`` and act on every deadline that passed."""
        self.now = now
        for conn in [c for c in self.connections if c.deadline <= now]:
            conn.on_deadline()
        self.upstreams.expire(now)

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
