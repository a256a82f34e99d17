"""Keep-alive connections to app instances, kept per instance (UpstreamConnections).

A connection carries one request at a time (no pipelining towards apps). It goes back to its
instance's idle list only after the response was read to its end and the whole request was sent;
anything else (an error, a client that went away mid-exchange, a close-delimited response)
closes it. Idle connections are kept newest-first (LIFO), so that a burst's extra connections
age out and get closed after ``upstream_idle_s``.

A pre-forking server (Apache prefork) gives each connection a worker of its own for as long as
the connection stays open, and leaves new connections in the kernel's accept queue while every
worker has one. Kept idle here, a connection would hold its worker until it aged out, and a
queued request would wait seconds (Apache's KeepAliveTimeout, or upstream_idle_s) for nothing.
So a new connection with no byte of its response after ``upstream_queued_after_s`` counts as
queued, and is owed one freed worker: the next connection of that instance to finish is closed
instead of kept; and when one is kept while a new one still waits, a timer at the moment that
one turns queued closes an idle one (the kept ones may hold every worker, and nothing else would
finish). Once per queued connection, and only after that delay: an instance that answers at once
never looks queued (closing its connections for every new one would open a new one per request,
each closing another).
"""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .config import ProxyConfig
from .http import Forwarding
from .response import ResponseReader
from .router import Lease

if TYPE_CHECKING:
    from .connection import ClientConnection, Exchange


def writelines_pauses(version: tuple[int, int, int]) -> bool:
    """Whether asyncio's own socket transport calls ``pause_writing()`` from ``writelines()``.

    Python 3.12 gave that transport a writelines() of its own (sendmsg, no copy) which forgot
    flow control until 3.12.9 and 3.13.2 (gh-127655, CVE-2024-12254): its buffer grows without
    bound and the protocol is never paused, so a client that does not read would make the
    proxy read the whole response from the instance into memory. Before 3.12, writelines()
    joined the parts and called write(), which pauses.
    """
    return not ((3, 12) <= version < (3, 12, 9) or (3, 13) <= version < (3, 13, 2))


if writelines_pauses(tuple(sys.version_info[:3])):
    def write_parts(transport: asyncio.WriteTransport, parts: Sequence[bytes]) -> None:
        """``transport.writelines(parts)``, with flow control (see `writelines_pauses`)."""
        transport.writelines(parts)
else:
    def write_parts(transport: asyncio.WriteTransport, parts: Sequence[bytes]) -> None:
        """``transport.writelines(parts)``, with flow control (see `writelines_pauses`)."""
        # One copy, as writelines() did before 3.12; uvloop's writelines() pauses, but its
        # transport is not told apart here (the cost is one join, on these Python releases only).
        transport.write(b"".join(parts))


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an instance; busy while ``client`` is set."""

    __slots__ = ("upstreams", "instance_id", "transport", "reader", "client", "client_transport",
                 "exchange", "reused", "got_bytes", "idle_since", "closed", "tunnel",
                 "read_paused", "tunnel_bytes", "last_read", "unanswered_since")

    def __init__(self, upstreams: UpstreamConnections, instance_id: str):
        self.upstreams = upstreams
        self.instance_id = instance_id
        self.transport: asyncio.Transport | None = None
        self.reader = ResponseReader(upstreams.forwarding)
        self.client: ClientConnection | None = None
        self.client_transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.reused = False          # served a response before this one: may have gone stale
        self.got_bytes = False       # any byte of the current response arrived
        self.idle_since = 0.0
        self.closed = False
        self.tunnel = False
        self.read_paused = False
        self.tunnel_bytes = 0
        self.last_read = upstreams.now   # coarse time of the last byte from the instance
        self.unanswered_since = 0.0  # loop time its first request went out, until a byte came back

    def start(self, client: ClientConnection, exchange: Exchange, keep_alive: bool,
              extra_headers: bytes) -> None:
        """Carry ``exchange`` (its head is written by the caller); report to ``client``."""
        self.client = client
        self.client_transport = client.transport
        self.exchange = exchange
        self.got_bytes = False
        self.last_read = self.upstreams.now
        self.reader.begin(exchange, keep_alive, extra_headers)
        if not self.reused:
            self.upstreams.watch_unanswered(self)

    def detach(self) -> None:
        self.unanswered_since = 0.0
        self.client = None
        self.client_transport = None
        self.exchange = None

    def close(self) -> None:
        """Close without telling the client side (it already knows)."""
        self.detach()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.detach()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    # asyncio callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport   # type: ignore[assignment]
        self.upstreams._register(self)

    def data_received(self, data: bytes) -> None:
        self.last_read = self.upstreams.now
        self.unanswered_since = 0.0
        if self.tunnel:
            self.tunnel_bytes += len(data)
            self.client_transport.write(data)
            return
        client = self.client
        if client is None:
            # An idle connection must stay silent; whatever this is, the connection is unusable.
            self.close()
            return
        self.got_bytes = True
        reader = self.reader
        reader.feed(data)
        out = reader.out
        if out:
            if len(out) == 1:
                self.client_transport.write(out[0])
            else:
                write_parts(self.client_transport, out)
            out.clear()
        if reader.error is not None:
            client.upstream_failed(self.exchange, self, reader.error)
        elif reader.upgraded:
            client.upgraded(self.exchange, self)
        elif reader.complete:
            client.response_done(self.exchange, self)

    def eof_received(self) -> bool:
        if self.tunnel:
            if self.client is not None:
                return self.client.tunnel_eof_from_upstream()
            return False
        client = self.client
        if client is not None:
            reader = self.reader
            if reader.feed_eof():
                write_parts(self.client_transport, reader.out)
                reader.out.clear()
                client.response_done(self.exchange, self)
            else:
                client.upstream_failed(self.exchange, self, "upstream closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.unanswered_since = 0.0
        self.upstreams._unregister(self)
        client = self.client
        if client is None:
            return
        if self.tunnel:
            client.tunnel_closed()
        else:
            reason = "upstream reset the connection" if exc is not None else "upstream closed the connection"
            client.upstream_failed(self.exchange, self, reason)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_write_paused()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_write_resumed()


class UpstreamConnections:
    """Idle keep-alive connections per instance, and every live one (for instance_gone)."""

    def __init__(self, config: ProxyConfig, forwarding: Forwarding):
        self.config = config
        self.forwarding = forwarding
        self.now = 0.0   # the server's coarse clock (set by expire)
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._live: dict[str, set[UpstreamConnection]] = {}
        # Per instance, new connections in the order they were sent their first request; those
        # answered, closed or already owed a worker are dropped as they reach the front.
        self._unanswered: dict[str, collections.deque[UpstreamConnection]] = {}
        self._unqueue_timers: dict[str, asyncio.TimerHandle] = {}

    def take(self, instance_id: str) -> UpstreamConnection | None:
        """The most recently used idle connection to the instance, or None."""
        idle = self._idle.get(instance_id)
        if idle:
            conn = idle.pop()
            conn.reused = True
            return conn
        return None

    def release(self, conn: UpstreamConnection, now: float) -> None:
        """Keep ``conn`` for the next request to its instance (or close it if not wanted)."""
        conn.client = conn.client_transport = conn.exchange = None
        idle = self._idle.get(conn.instance_id)
        if idle is None:
            if conn.instance_id not in self._live:
                conn.close()   # its instance is gone
                return
            idle = self._idle[conn.instance_id] = []
        if (conn.closed or len(idle) >= self.config.upstream_pool_per_instance
                or (conn.instance_id in self._unanswered and self._queued(conn.instance_id))):
            conn.close()   # (the last: its worker goes to a queued connection; module docstring)
            return
        if conn.read_paused:
            conn.resume_reading()   # an idle connection must notice the instance closing it
        conn.idle_since = now
        idle.append(conn)
        if conn.instance_id in self._unanswered and conn.instance_id not in self._unqueue_timers:
            self._unqueue_later(conn.instance_id)

    async def connect(self, lease: Lease) -> UpstreamConnection:
        """A new connection to the lease's instance.

        Raises:
            TimeoutError: not connected within upstream_connect_timeout_s.
            OSError: refused, unreachable, reset.
        """
        loop = asyncio.get_running_loop()
        instance_id = lease.instance_id
        host, port = lease.addr
        async with asyncio.timeout(self.config.upstream_connect_timeout_s):
            _, conn = await loop.create_connection(lambda: UpstreamConnection(self, instance_id), host, port)
        return conn

    def watch_unanswered(self, conn: UpstreamConnection) -> None:
        """``conn`` was just sent its first request (module docstring)."""
        conn.unanswered_since = asyncio.get_running_loop().time()
        queue = self._unanswered.get(conn.instance_id)
        if queue is None:
            queue = self._unanswered[conn.instance_id] = collections.deque()
        queue.append(conn)

    def _oldest_unanswered(self, instance_id: str) -> UpstreamConnection | None:
        """The instance's oldest new connection still without a byte back (the answered, closed
        or already owed ones dropped from the front; the instance's entry once none is left)."""
        queue = self._unanswered.get(instance_id)
        while queue and not queue[0].unanswered_since:
            queue.popleft()
        if not queue:
            self._unanswered.pop(instance_id, None)
            return None
        return queue[0]

    def _queued(self, instance_id: str) -> bool:
        """Whether a connection of the instance has waited for its first byte for
        upstream_queued_after_s; if so it is owed a worker, and taken off the watch."""
        oldest = self._oldest_unanswered(instance_id)
        if oldest is None or (asyncio.get_running_loop().time() - oldest.unanswered_since
                              < self.config.upstream_queued_after_s):
            return False
        oldest.unanswered_since = 0.0  # owed its worker now: dropped from the watch
        self._oldest_unanswered(instance_id)
        return True

    def _unqueue_later(self, instance_id: str) -> None:
        """Check again when the oldest new connection of the instance turns queued."""
        oldest = self._oldest_unanswered(instance_id)
        if oldest is not None:
            when = oldest.unanswered_since + self.config.upstream_queued_after_s
            self._unqueue_timers[instance_id] = asyncio.get_running_loop().call_at(when, self._unqueue, instance_id)

    def _unqueue(self, instance_id: str) -> None:
        """Free a worker held by an idle connection for each queued new connection."""
        del self._unqueue_timers[instance_id]
        idle = self._idle.get(instance_id)
        while idle and instance_id in self._unanswered and self._queued(instance_id):
            idle.pop().close()
        if idle and instance_id in self._unanswered:
            self._unqueue_later(instance_id)

    def instance_gone(self, instance_id: str) -> None:
        """Close the instance's idle connections; busy ones close when their response ends."""
        for conn in self._idle.pop(instance_id, ()):
            conn.close()
        self._live.pop(instance_id, None)

    def expire(self, now: float) -> None:
        """Advance the coarse clock to ``now``; close idle connections unused for upstream_idle_s."""
        self.now = now
        cutoff = now - self.config.upstream_idle_s
        for idle in self._idle.values():
            while idle and idle[0].idle_since <= cutoff:
                idle.pop(0).close()

    def close(self) -> None:
        for timer in self._unqueue_timers.values():
            timer.cancel()
        self._unqueue_timers.clear()
        for live in list(self._live.values()):
            for conn in list(live):
                conn.abort()
        self._idle.clear()
        self._live.clear()

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    @property
    def unanswered_connections(self) -> int:
        return sum(1 for queue in self._unanswered.values() for conn in queue if conn.unanswered_since)

    def _register(self, conn: UpstreamConnection) -> None:
        live = self._live.get(conn.instance_id)
        if live is None:
            live = self._live[conn.instance_id] = set()
        live.add(conn)

    def _unregister(self, conn: UpstreamConnection) -> None:
        live = self._live.get(conn.instance_id)
        if live is not None:
            live.discard(conn)
            if not live:
                del self._live[conn.instance_id]
        idle = self._idle.get(conn.instance_id)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.instance_id]
