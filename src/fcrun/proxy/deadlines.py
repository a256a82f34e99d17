"""A client connection's deadlines: what it waits for, and what happens when that is late.

:class:`Deadlines` is the part of :class:`~fcrun.proxy.connection.ClientConnection` that the
server's sweep drives: a connection keeps one deadline (a number) and its kind, the sweep calls
``on_deadline()`` for each that passed (server.py, ``check_timeouts``). The hot path only stamps
the coarse clock on each read (``last_read``, and the upstream connection's); an idle deadline
that comes due looks at the stamp and moves itself on if bytes came meanwhile, so no read ever
moves a deadline.

What a connection waits for, and its bound (``[proxy]``: ProxyConfig)::

    HEADER    a request head          header_timeout_s, from its first byte      -> 408, close
    IDLE      the next request        keepalive_timeout_s                         -> close
    BODY      the client's body       body_idle_timeout_s between bytes,
                                      body_timeout_s in all (not while the proxy holds the
                                      client back)                                -> 408, close
              the rest of the body of a request already answered (read and
              dropped): the same bounds                                           -> close
    RESPONSE  the instance's head     upstream_response_timeout_s                 -> 504
              its body's next byte    upstream_read_timeout_s                     -> cut, close
              the client to read      send_timeout_s (the instance is paused)     -> abort
    TUNNEL    a byte either way       tunnel_idle_timeout_s                       -> close both
    LINGER    the client to close     linger_s, after our Connection: close       -> close
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .http import error_response

if TYPE_CHECKING:
    from .connection import Exchange

# What a connection's deadline means (the table above).
NO_DEADLINE = 0   # none: the router and the connect bound what is waited for
HEADER = 1        # a request head must be complete by then (slowloris)
IDLE = 2          # keep-alive between requests
LINGER = 3        # we said Connection: close and are draining what the client still sends
BODY = 4          # the active request's body is still coming from the client
RESPONSE = 5      # the request is with the instance: its response (or the client's reading of it)
TUNNEL = 6        # an upgraded connection
NEVER = math.inf


class Deadlines:
    """The deadline half of ClientConnection (a mixin: its state lives in ClientConnection's slots)."""

    __slots__ = ()

    def _set_deadline(self, kind: int, timeout_s: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.server.now + timeout_s

    def _await(self, ex: Exchange) -> None:
        """Set the deadline for what the active exchange ``ex`` waits for now (see the table
        in the module docstring); a deadline of the same kind already running is kept."""
        if not ex.complete:
            if ex.expect_continue and ex.body_bytes == 0 and ex.conn is None:
                # The client waits for our 100 Continue, sent once an instance is connected:
                # its body's clock starts then.
                if self.deadline_kind != NO_DEADLINE:
                    self.deadline_kind = NO_DEADLINE
                    self.deadline = NEVER
            else:
                self._await_body(ex)
        elif ex.conn is not None:
            if self.deadline_kind != RESPONSE:
                self._await_response()
        elif self.deadline_kind != NO_DEADLINE:
            self.deadline_kind = NO_DEADLINE   # a cold start or a connect: bounded by the router and the connect
            self.deadline = NEVER

    def _await_body(self, ex: Exchange) -> None:
        """Wait for the rest of ``ex``'s body (a BODY deadline already running is kept)."""
        if self.deadline_kind == BODY:
            return
        server = self.server
        now = server.now
        if ex.body_until == NEVER:
            ex.body_until = now + server.config.body_timeout_s
            if self.paused:
                self.paused_since = now   # held before this body's clock started: not added to it
        self.last_read = now
        self.deadline_kind = BODY
        self.deadline = min(now + server.config.body_idle_timeout_s, ex.body_until)

    def _await_response(self) -> None:
        server = self.server
        config = server.config
        now = server.now
        self.active.response_due = now + config.upstream_response_timeout_s
        self.deadline_kind = RESPONSE
        # The head's arrival moves no deadline (the hot path stays free of it), so the sweep
        # looks again within upstream_read_timeout_s, when the body's own bound may be due.
        self.deadline = now + min(config.upstream_response_timeout_s, config.upstream_read_timeout_s)

    def on_deadline(self) -> None:
        """The server's sweep found this connection's deadline passed."""
        kind = self.deadline_kind
        if kind == BODY:
            self._body_deadline()
            return
        if kind == RESPONSE:
            self._response_deadline()
            return
        if kind == TUNNEL:
            self._tunnel_deadline()
            return
        self.deadline = NEVER
        self.deadline_kind = NO_DEADLINE
        if kind == HEADER and self.reader.in_message:
            self.transport.write(error_response(408, "request head not received in time", close=True))
        if kind != NO_DEADLINE:
            self._close_now()

    def _body_deadline(self) -> None:
        server = self.server
        config = server.config
        now = server.now
        ex = self.active
        if ex is None:
            ex = self.reader.dropped_body_of
        if ex is None or ex.complete:   # not reached: the phase's ends set a new deadline
            self.deadline_kind = NO_DEADLINE
            self.deadline = NEVER
            return
        if self.paused:
            # We hold the client back (the instance reads slowly, or is starting): not its fault.
            self.deadline = now + config.body_idle_timeout_s
            return
        idle_due = self.last_read + config.body_idle_timeout_s
        due = min(idle_due, ex.body_until)
        if due > now:
            self.deadline = due   # bytes came meanwhile
            return
        if ex.body_until <= idle_due:
            message = f"request body not complete within {config.body_timeout_s:g} s (body_timeout_s)"
        else:
            message = f"no byte of the request body for {config.body_idle_timeout_s:g} s (body_idle_timeout_s)"
        self.deadline_kind = NO_DEADLINE
        self.deadline = NEVER
        self.reader.stopped = True
        if ex is not self.active:
            # The rest of an answered request's body: the client has its response, and a second
            # one would be read as the answer to its next request. Closed without one.
            self._close_gracefully()
            return
        self.request_error(ex, 408, message)   # settles the lease; the instance's connection is dropped

    def _response_deadline(self) -> None:
        server = self.server
        config = server.config
        now = server.now
        ex = self.active
        conn = ex.conn if ex is not None else None
        if conn is None:   # not reached: a retry's connect clears the deadline
            self.deadline_kind = NO_DEADLINE
            self.deadline = NEVER
            return
        reader = conn.reader
        if not reader.head_sent:
            if ex.response_due > now:
                self.deadline = min(ex.response_due, now + config.upstream_read_timeout_s)
                return
            self._reply_error(ex, 504, f"upstream of {ex.host} sent no response within "
                                       f"{config.upstream_response_timeout_s:g} s (upstream_response_timeout_s)")
            return
        if self.write_paused:
            # A slow reader: the instance is paused for it, so only the transports' buffers are
            # held; it gets send_timeout_s to take some of them.
            due = self.write_paused_since + config.send_timeout_s
            if due > now:
                self.deadline = due
                return
            self.deadline_kind = NO_DEADLINE
            self.deadline = NEVER
            self.transport.abort()   # connection_lost settles the lease as failed
            return
        due = conn.last_read + config.upstream_read_timeout_s
        if due > now:
            self.deadline = due
            return
        # The instance stalled mid-response: cut the client, so that it sees the truncation.
        self.deadline_kind = NO_DEADLINE
        self.deadline = NEVER
        ex.conn = None
        conn.abort()
        self._end(ex, reader.status, reader.head_bytes + reader.body_bytes, True)
        self.reader.stopped = True
        self._close_now()

    def _tunnel_deadline(self) -> None:
        now = self.server.now
        conn = self.tunnel
        if conn is None:
            self.deadline_kind = NO_DEADLINE
            self.deadline = NEVER
            return
        due = max(self.last_read, conn.last_read) + self.server.config.tunnel_idle_timeout_s
        if due > now:
            self.deadline = due
            return
        self.deadline_kind = NO_DEADLINE
        self.deadline = NEVER
        self.transport.abort()   # connection_lost closes the instance's side and settles the lease

    def _close_now(self) -> None:
        """Close the client socket; at once (abort) if it holds bytes the client is not taking,
        since close() would wait for them without end."""
        transport = self.transport
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    @property
    def lingering(self) -> bool:
        """It answered its last request and only waits for the client to close (see _close_gracefully)."""
        return self.deadline_kind == LINGER
