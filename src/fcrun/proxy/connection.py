"""The proxy's per-connection protocol: one client socket, its requests carried to instances in order.

One :class:`ClientConnection` per client socket (an asyncio Protocol, no streams) feeds a
:class:`~fcrun.proxy.request.RequestReader`, asks the Router for a lease, takes a pooled upstream
connection and writes the rewritten head; the upstream side (upstream.py) writes the response
back and reports the end. On the hot path (an instance is ready, a pooled connection is idle)
all of this happens inside two ``data_received`` calls, without a task, a timer or a log line.

Slow paths run as tasks owned by the server (its :class:`~fcrun.tasks.TaskOwner`): waiting for a
cold start, connecting to an instance. A connection's deadline is a number the server's sweep
compares (server.py), so a request costs no timer handle; what each deadline means, and its
handling, live in deadlines.py (the Deadlines half of ClientConnection).

A request's life on a connection::

    client bytes -> RequestReader -> request_head -> _start -> lease (acquire_nowait | acquire task)
                 -> _leased (413 check) -> upstreams.take | connect task -> _attach: head (+ body) upstream
    upstream bytes -> ResponseReader -> client bytes ... -> response_done -> upstreams.release, lease.done
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from .deadlines import BODY, HEADER, IDLE, LINGER, NEVER, NO_DEADLINE, RESPONSE, TUNNEL, Deadlines
from .http import CONTINUE, HEAD, cold_start_headers, error_response
from .request import Request, RequestReader
from .router import Lease, RouteError
from .upstream import UpstreamConnection, write_parts

if TYPE_CHECKING:
    from .server import ProxyServer

log = logging.getLogger("fcrun.proxy")

# Why reading from a client is paused (bits; reading resumes when none is left).
_PAUSE_UPSTREAM = 1   # the upstream's write buffer is full
_PAUSE_BUFFER = 2     # body bytes held while no upstream connection is ready
_PAUSE_PIPELINE = 4   # a pipelined request waits for the one before it


class Exchange(Request):
    """A request plus what the proxy holds for it: lease, upstream connection, slow-path task."""

    lease: Lease | None = None
    conn: UpstreamConnection | None = None
    task: asyncio.Task | None = None
    retried = False
    moved = False                             # sent to another upstream once (Router.retry_elsewhere)
    tunnel_early: list[bytes] | None = None   # bytes after an upgrade request, before the 101
    unsent_head = b""                         # upstream_head until written (kept for a retry)
    body_until = NEVER                        # the body_timeout_s deadline, once the body is awaited
    response_due = NEVER                      # the upstream_response_timeout_s deadline, once sent


class ClientConnection(Deadlines, asyncio.Protocol):
    """One client socket: its requests in order, one at a time towards the upstream."""

    __slots__ = ("server", "transport", "reader", "active", "queue", "paused", "write_paused",
                 "deadline", "deadline_kind", "host", "closed", "tunnel", "in_feed", "eof",
                 "tunnel_eofs", "deferred_error", "peer", "peer_key", "last_read", "paused_since",
                 "write_paused_since")

    def __init__(self, server: ProxyServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.reader: RequestReader | None = None
        self.active: Exchange | None = None          # the request being proxied
        self.queue: deque[Exchange] | None = None     # pipelined requests behind it
        self.paused = 0
        self.write_paused = False
        self.deadline = NEVER
        self.deadline_kind = NO_DEADLINE
        self.host: str | None = None                  # reported to the router's hooks
        self.closed = False
        self.tunnel: UpstreamConnection | None = None
        self.in_feed = False
        self.eof = False
        self.tunnel_eofs = 0
        self.deferred_error: tuple[int, str] | None = None
        self.peer = "?"
        self.peer_key: str | None = None   # set by the server when it counts this connection
        self.last_read = server.now        # coarse time of the last byte from the client
        self.paused_since = 0.0            # when reading from the client was last paused
        self.write_paused_since = 0.0      # when the client last stopped taking our writes

    # asyncio callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self.server
        self.transport = transport   # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "unix"
        self.reader = RequestReader(self, self.peer, server.forwarding, Exchange)
        server.connections.add(self)
        self._set_deadline(HEADER, server.config.header_timeout_s)
        if server.closing:
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.last_read = self.server.now
        tunnel = self.tunnel
        if tunnel is not None:
            self.active.body_bytes += len(data)
            tunnel.transport.write(data)
            return
        reader = self.reader
        if reader.stopped:
            self._received_while_stopped(data)
            return
        if self.deadline_kind == IDLE:
            self._set_deadline(HEADER, self.server.config.header_timeout_s)
        self.in_feed = True
        try:
            reader.feed(data)
        except Exception:
            log.exception("proxy: internal error on a connection from %s", self.peer)
            self.in_feed = False
            self.transport.abort()
            return
        self.in_feed = False
        ex = self.active
        if ex is not None and ex.pending:
            if ex.conn is not None:
                self._flush(ex)
            elif ex.pending_bytes > self.server.config.buffer_bytes:
                self._pause(_PAUSE_BUFFER)
        elif ex is not None and ex.unsent_head and ex.conn is not None:
            # The common case: a request without body, its head still to send.
            ex.conn.transport.write(ex.unsent_head)
            ex.unsent_head = b""
        ex = self.active
        if ex is not None:
            if ex.complete and ex.conn is not None:
                if self.deadline_kind != RESPONSE:
                    self._await_response()
            else:
                self._await(ex)
        elif self.deadline_kind == BODY and self.reader.dropped_body_of is None:
            # The rest of an answered request's body is in (and dropped): a new request may come.
            self._await_next_request()

    def eof_received(self) -> bool:
        self.eof = True
        if self.tunnel is not None:
            upstream = self.tunnel.transport
            if upstream.can_write_eof():
                upstream.write_eof()
            self.tunnel_eofs |= 1
            return self.tunnel_eofs != 3
        ex = self.active
        # A client that half-closes after a complete request still gets its answer.
        return ex is not None and ex.complete and not ex.upgrade

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        server = self.server
        server.connection_closed(self)
        if self.host is not None and server.router_connection_closed is not None:
            server.router_connection_closed(self.host)
        ex = self.active
        if ex is not None:
            status, response_bytes, failed = 499, 0, True
            if ex.task is not None:
                ex.task.cancel()
                ex.task = None
            conn = self.tunnel or ex.conn
            if conn is not None:
                reader = conn.reader
                if conn is self.tunnel:
                    status, failed = 101, False
                    response_bytes = reader.head_bytes + conn.tunnel_bytes
                    conn.close()
                else:
                    if reader.head_sent:
                        status, response_bytes = reader.status, reader.head_bytes + reader.body_bytes
                    conn.abort()
            self.tunnel = None
            ex.conn = None
            self._end(ex, status, response_bytes, failed)
        self.queue = None

    def pause_writing(self) -> None:
        self.write_paused = True
        now = self.write_paused_since = self.server.now
        if self.deadline_kind == RESPONSE:
            self.deadline = min(self.deadline, now + self.server.config.send_timeout_s)
        conn = self.tunnel or (self.active.conn if self.active is not None else None)
        if conn is not None:
            conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        conn = self.tunnel or (self.active.conn if self.active is not None else None)
        if conn is not None:
            conn.last_read = self.server.now   # its silence meanwhile was ours
            conn.resume_reading()

    # RequestReader events ---------------------------------------------------------------------

    def request_head(self, ex: Exchange) -> None:
        if self.active is not None or self.queue:
            # Pipelined: the deadline stays the active request's.
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
            self._pause(_PAUSE_PIPELINE)
            return
        self.deadline = NEVER
        self.deadline_kind = NO_DEADLINE
        self._start(ex)

    def request_error(self, ex: Exchange | None, status: int, message: str) -> None:
        active = self.active
        if ex is not None and ex.discard:
            # The rest of an answered request's body broke a rule (over the body limit, bad
            # chunking, an endless trailer): the client has its response, and a second one would
            # be read as the answer to its next request. Closed without one.
            self._close_gracefully()
        elif active is not None and ex is active:
            # The active request went bad mid-body (413 over the limit, broken chunking).
            conn = ex.conn
            if conn is not None and conn.reader.head_sent:
                # The response is already under way: cut both sides.
                self._end(ex, conn.reader.status, conn.reader.head_bytes + conn.reader.body_bytes, True)
                ex.conn = None
                conn.abort()
                self.transport.close()
                return
            self._reply_error(ex, status, message, close=True)
        elif active is not None or self.queue:
            # A pipelined request went bad: answered in order, after those before it.
            if ex is not None and self.queue and ex in self.queue:
                self.queue.remove(ex)
            self.deferred_error = (status, message)
            self._pause(_PAUSE_PIPELINE)
        else:
            self._reply_and_close(status, message, ex)

    def request_upgrade(self, ex: Exchange, data: bytes) -> None:
        ex.tunnel_early = [data] if data else []

    # The request path -------------------------------------------------------------------------

    def _start(self, ex: Exchange) -> None:
        server = self.server
        self.active = ex
        server.requests_in_flight += 1
        if ex.host != self.host:
            self._switch_host(ex.host)
        acquire_nowait = server.router_acquire_nowait
        if acquire_nowait is not None:
            try:
                lease = acquire_nowait(ex.host)
            except RouteError as err:
                self._reply_error(ex, err.status, err.message)
                return
            if lease is not None:
                self._leased(ex, lease)
                if not self.in_feed and self.active is ex:
                    self._await(ex)
                return
        ex.task = server.tasks.spawn(self._acquire(ex))
        if not self.in_feed:
            self._await(ex)

    async def _acquire(self, ex: Exchange) -> None:
        try:
            lease = await self.server.router.acquire(ex.host)
        except RouteError as err:
            ex.task = None
            self._reply_error(ex, err.status, err.message)
            return
        except Exception:
            ex.task = None
            log.exception("proxy: router failed on host %r", ex.host)
            self._reply_error(ex, 502, f"internal error while routing {ex.host}")
            return
        ex.task = None
        if ex is not self.active or self.closed:
            lease.done(499, ex.head_bytes + ex.body_bytes, 0, True)
            return
        self._leased(ex, lease)

    def _leased(self, ex: Exchange, lease: Lease) -> None:
        ex.lease = lease
        limit = lease.max_body_bytes
        if limit is None:
            limit = self.server.config.max_body_bytes
        if limit:   # None or 0: unlimited
            if ex.body_bytes > limit or (ex.content_length is not None and ex.content_length > limit):
                self._reply_error(ex, 413, f"request body over {limit} bytes", close=True)
                return
            ex.max_body = limit
        conn = self.server.upstreams.take(lease.instance_id)
        if conn is None:
            ex.task = self.server.tasks.spawn(self._connect(ex))
            return
        self._attach(ex, conn)

    async def _connect(self, ex: Exchange) -> None:
        server = self.server
        try:
            conn = await server.upstreams.connect(ex.lease)
        except TimeoutError:
            ex.task = None
            if not self._retry_elsewhere(ex):  # nothing was sent: any method may go elsewhere
                self._reply_error(ex, 504, f"upstream of {ex.host} did not accept a connection within "
                                           f"{server.config.upstream_connect_timeout_s:g} s")
            return
        except OSError as err:
            ex.task = None
            if not self._retry_elsewhere(ex):
                self._reply_error(ex, 502, f"cannot connect to upstream of {ex.host}: {err.strerror or err}")
            return
        ex.task = None
        if ex is not self.active or self.closed:
            server.upstreams.release(conn, server.now)
            return
        self._attach(ex, conn)

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        """Send ``ex`` on ``conn``: its head and buffered body now, or at the end of this read."""
        ex.conn = conn
        ex.unsent_head = ex.upstream_head   # kept in upstream_head for a retry
        cold_start = ex.lease.cold_start
        keep_alive = ex.keep_alive and not self.server.closing and not (self.eof and self._nothing_queued())
        conn.start(self, ex, keep_alive, b"" if cold_start is None else cold_start_headers(cold_start))
        if self.write_paused:
            conn.pause_reading()
        if ex.expect_continue and ex.body_bytes == 0 and not ex.complete:
            self.transport.write(CONTINUE)
        if not self.in_feed:
            self._flush(ex)
            if self.active is ex:
                self._await(ex)
        # else: data_received sends the head with whatever body this read brought, in one write
        # (and sets the deadline)

    def _flush(self, ex: Exchange) -> None:
        """Write what ``ex`` still owes its upstream: the head (once), then pending body bytes."""
        pending = ex.pending
        transport = ex.conn.transport
        if ex.unsent_head:
            if pending:
                pending.insert(0, ex.unsent_head)
            else:
                transport.write(ex.unsent_head)
            ex.unsent_head = b""
        if pending:
            write_parts(transport, pending)
            ex.pending = ()
        if ex.pending_bytes:
            ex.pending_bytes = 0
            self._resume(_PAUSE_BUFFER)

    # Upstream events (from UpstreamConnection) ------------------------------------------------

    def response_done(self, ex: Exchange, conn: UpstreamConnection) -> None:
        server = self.server
        reader = conn.reader
        ex.conn = None
        if reader.reusable and ex.complete:
            server.upstreams.release(conn, server.now)
        else:
            conn.close()
        # _end() and _next() for a finished keep-alive exchange, inlined: this is the hot path.
        self.active = None
        server.requests_in_flight -= 1
        lease = ex.lease
        if lease is not None:
            ex.lease = None
            lease.done(reader.status, ex.head_bytes + ex.body_bytes,
                       reader.head_bytes + reader.body_bytes, False)
        if (ex.complete and not reader.close_client and not self.paused and not self.queue
                and not server.closing and not self.eof and not self.reader.in_message):
            self.deadline_kind = IDLE
            self.deadline = server.now + server.config.keepalive_timeout_s
            return
        if not ex.complete:
            ex.discard = True   # the rest of its body is read and dropped
            ex.pending = ()
        self._next(reader.close_client)

    def upstream_failed(self, ex: Exchange, conn: UpstreamConnection, reason: str) -> None:
        reader = conn.reader
        ex.conn = None
        conn.abort()
        if reader.head_sent:
            # The client has part of this response: cut its connection, so that it sees the
            # truncation instead of a response that looks complete. Never retried.
            self._end(ex, reader.status, reader.head_bytes + reader.body_bytes, True)
            self.transport.close()
            return
        if (conn.reused and not conn.got_bytes and not ex.retried and ex.complete
                and not ex.has_body and ex.idempotent):
            # The pooled connection had gone stale (the instance closed it as we sent): nothing
            # of a response arrived and the request can be repeated, once, on a new connection.
            ex.retried = True
            self.deadline_kind = NO_DEADLINE   # the connect is bounded by its own timeout
            self.deadline = NEVER
            ex.task = self.server.tasks.spawn(self._connect(ex))
            return
        if not conn.got_bytes and ex.complete and not ex.has_body and ex.idempotent and self._retry_elsewhere(ex):
            return  # no byte of a response came: a GET or HEAD goes once to another upstream
        self._reply_error(ex, 502, f"{reason} ({ex.host})")

    def _retry_elsewhere(self, ex: Exchange) -> bool:
        """Send `ex` once to another upstream the router offers (a front: another node); False
        when the router has no such hook, it was done already, or there is none."""
        retry = self.server.router_retry_elsewhere
        if retry is None or ex.moved or ex is not self.active or self.closed or ex.lease is None:
            return False
        lease = retry(ex.host, ex.lease)
        if lease is None:
            return False
        ex.moved = True
        ex.lease.done(502, ex.head_bytes + ex.body_bytes, 0, True)  # the failed upstream's lease
        ex.lease = lease
        self.deadline_kind = NO_DEADLINE   # the connect is bounded by its own timeout
        self.deadline = NEVER
        ex.task = self.server.tasks.spawn(self._connect(ex))
        return True

    def upstream_write_paused(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def upstream_write_resumed(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    def upgraded(self, ex: Exchange, conn: UpstreamConnection) -> None:
        """The upstream answered 101: from now on both connections are a byte pipe."""
        conn.tunnel = True
        self.tunnel = conn
        ex.conn = None
        conn.last_read = self.last_read = self.server.now
        self._set_deadline(TUNNEL, self.server.config.tunnel_idle_timeout_s)
        if conn.reader.tunnel_data:
            conn.tunnel_bytes += len(conn.reader.tunnel_data)
            self.transport.write(conn.reader.tunnel_data)
        if ex.tunnel_early:
            ex.body_bytes += sum(len(b) for b in ex.tunnel_early)
            write_parts(conn.transport, ex.tunnel_early)
        ex.tunnel_early = None
        self._resume(_PAUSE_BUFFER)

    def tunnel_eof_from_upstream(self) -> bool:
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.tunnel_eofs |= 2
        if self.tunnel_eofs == 3:
            self.transport.close()
            return False
        return True

    def tunnel_closed(self) -> None:
        conn = self.tunnel
        self.tunnel = None
        ex = self.active
        conn.detach()
        self._end(ex, 101, conn.reader.head_bytes + conn.tunnel_bytes, False)
        self.transport.close()

    # Ending requests ----------------------------------------------------------------------------

    def _reply_error(self, ex: Exchange, status: int, message: str, close: bool = False) -> None:
        """Answer ``ex`` with a proxy-generated error instead of the upstream's response."""
        if ex is not self.active:
            return
        if ex.task is not None:
            ex.task.cancel()
            ex.task = None
        if ex.conn is not None:
            ex.conn.abort()
            ex.conn = None
        if not ex.complete and (ex.upgrade or (ex.expect_continue and ex.body_bytes == 0)):
            close = True   # the client may still send a body we never asked for
        close = close or not ex.keep_alive or self.server.closing or (self.eof and self._nothing_queued())
        response = error_response(status, message, close=close, head_only=ex.method == HEAD,
                                  http10=ex.http10)
        self.transport.write(response)
        self._end(ex, status, len(response), status >= 500)
        self._next(close)

    def _reply_and_close(self, status: int, message: str, ex: Exchange | None) -> None:
        """Answer a request that never became an exchange (malformed, oversized head)."""
        self.transport.write(error_response(status, message, close=True,
                                            head_only=ex is not None and ex.method == HEAD))
        self._close_gracefully()

    def _end(self, ex: Exchange, status: int, response_bytes: int, failed: bool) -> None:
        """The exchange is over: settle its lease (exactly once)."""
        self.active = None
        self.server.requests_in_flight -= 1
        if not ex.complete:
            ex.discard = True   # the rest of its body is read and dropped
            ex.pending = ()
        lease = ex.lease
        if lease is not None:
            ex.lease = None
            lease.done(status, ex.head_bytes + ex.body_bytes, response_bytes, failed)

    def _next(self, close: bool) -> None:
        """After an exchange: close, start the next pipelined request, or wait for one."""
        if self.paused & (_PAUSE_UPSTREAM | _PAUSE_BUFFER):
            # What held the client back was the ended exchange's (its upstream's full buffer, or
            # its body held while no upstream connection was ready): the next read is another's,
            # or dropped, and a lingering close must read too.
            self._resume(_PAUSE_UPSTREAM | _PAUSE_BUFFER)
        if close or self.server.closing or self.closed or (self.eof and self._nothing_queued()):
            self._close_gracefully()
            return
        queue = self.queue
        if queue:
            self._start(queue.popleft())   # sets the deadline for it
            if not queue and self.deferred_error is None:
                self._resume(_PAUSE_PIPELINE)   # the started request's body may still be coming
            return
        if self.deferred_error is not None:
            status, message = self.deferred_error
            self._reply_and_close(status, message, None)
            return
        if self.paused & _PAUSE_PIPELINE:
            self._resume(_PAUSE_PIPELINE)
        self._await_next_request()

    def _await_next_request(self) -> None:
        """No exchange is active: wait for the rest of an answered request's body, the rest of a
        head, or a new request."""
        reader = self.reader
        dropped = reader.dropped_body_of
        if dropped is not None:
            # A steady upload answered early (a 401, a redirect) is no slow head: its body keeps
            # its own deadlines while it is read and dropped; its end brings data_received here.
            self._await_body(dropped)
        elif reader.in_message:
            self._set_deadline(HEADER, self.server.config.header_timeout_s)
        else:
            self._set_deadline(IDLE, self.server.config.keepalive_timeout_s)

    def _nothing_queued(self) -> bool:
        """No complete request waits behind the active one. (After the client's EOF, which
        ends the connection once those it sent are answered, no other can come.)"""
        queue = self.queue
        return not (queue and queue[0].complete)

    def _close_gracefully(self) -> None:
        """Close after what was written, reading and dropping what the client still sends.

        Closing a socket with unread input makes the kernel send a reset, and a reset can
        destroy our last response before the client read it; so shut down our side and give
        the client linger_s to close its own.
        """
        self.reader.stopped = True
        transport = self.transport
        if self.closed or transport.is_closing():
            return
        if self.eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._set_deadline(LINGER, self.server.config.linger_s)

    def _received_while_stopped(self, data: bytes) -> None:
        ex = self.active
        if ex is not None and ex.tunnel_early is not None:
            # Bytes after an upgrade request, before the upstream's 101: held for the tunnel.
            ex.tunnel_early.append(data)
            ex.pending_bytes += len(data)
            if ex.pending_bytes > self.server.config.buffer_bytes:
                self._pause(_PAUSE_BUFFER)
        # otherwise: lingering after our last response; dropped

    # Flow control, deadlines, hooks -----------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
            self.paused_since = self.server.now
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()
                # The client's body deadlines do not count the time we held it back.
                now = self.server.now
                self.last_read = now
                ex = self.active
                if ex is not None and not ex.complete:
                    ex.body_until += now - self.paused_since

    def shutdown(self) -> None:
        """The server is closing: an idle connection closes now, a busy one after its response."""
        if self.active is None and self.tunnel is None:
            self.transport.close()
        elif self.active is not None and self.active.conn is not None:
            self.active.conn.reader.refuse_keep_alive()

    def _switch_host(self, host: str) -> None:
        server = self.server
        if self.host is not None and server.router_connection_closed is not None:
            server.router_connection_closed(self.host)
        self.host = host
        if server.router_connection_opened is not None:
            server.router_connection_opened(host)
