"""Is an instance ready? The one readiness probe: a TCP connect to its address and port.

An instance counts as ready once something accepts connections on its port (a started
process is not enough: Apache takes a while to bind and fork its workers). On fcrun's own
bridge a port nobody listens on is refused at once, so a refused or unreachable connect means
"not yet", and anything else that fails means "not yet" too (logged at debug level).

The probe comes in two forms, both built on `ConnectProbe`:

- `ConnectProbe` itself, started and then read without ever waiting: the fork-server is one
  thread around one poll loop (forkserver/server.py), and its pool checks warming instances
  between requests, so a probe that waited for an answer would hold up every client;
- `accepting`, awaited on serve's event loop while a request waits for a cold start.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import socket

log = logging.getLogger("fcrun.readiness")

# What a connect to an instance that does not listen yet gets: not worth a log line.
NOT_LISTENING_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
ACCEPT_TIMEOUT_S = 1.0  # `accepting`: a connect unanswered this long counts as not accepting


class ConnectProbe:
    """A non-blocking TCP connect to ip:port, started when the probe is made.

    Resource handling: the probe owns a socket until `close()` (or the end of a `with` block).
    """

    def __init__(self, ip: str, port: int):
        self.ip, self.port = ip, port
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self._outcome: bool | None = None
        err = self.sock.connect_ex((ip, port))
        if err != errno.EINPROGRESS:  # answered at once (a local refusal usually is)
            self._outcome = self._settle(err)

    def outcome(self) -> bool | None:
        """True: the connect was accepted; False: it failed; None: no answer yet. Never waits."""
        if self._outcome is None:
            poller = select.poll()  # not select.select: serve's fds may be above FD_SETSIZE
            poller.register(self.sock, select.POLLOUT)
            if poller.poll(0):
                self._outcome = self._settle(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        return self._outcome

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ConnectProbe:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _settle(self, err: int) -> bool:
        if err and err not in NOT_LISTENING_ERRNOS:
            log.debug("connect %s:%d: %s", self.ip, self.port, errno.errorcode.get(err, err))
        return err == 0


async def accepting(ip: str, port: int, timeout_s: float = ACCEPT_TIMEOUT_S) -> bool:
    """Does something accept TCP connections on ip:port? Waits on the running event loop
    for at most `timeout_s` (then: False)."""
    loop = asyncio.get_running_loop()
    with ConnectProbe(ip, port) as probe:
        if probe.outcome() is None:
            answered = loop.create_future()

            def writable() -> None:
                if not answered.done():
                    answered.set_result(None)

            loop.add_writer(probe.fileno(), writable)
            try:
                await asyncio.wait_for(answered, timeout_s)
            except TimeoutError:
                return False
            finally:
                loop.remove_writer(probe.fileno())
        return bool(probe.outcome())


__all__ = ["ACCEPT_TIMEOUT_S", "NOT_LISTENING_ERRNOS", "ConnectProbe", "accepting"]
