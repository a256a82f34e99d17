"""Is an instance ready? A TCP connect to its address and port, then, for an app with a
ready path (`fcrun app add --ready-path /healthz`), a GET of that path answered 2xx or 3xx.

An instance counts as ready once something accepts connections on its port (a started
process is not enough: Apache takes a while to bind and fork its workers). On fcrun's own
bridge a port nobody listens on is refused at once, so a refused or unreachable connect means
"not yet", and anything else that fails means "not yet" too (logged at debug level).

The probe comes in two forms, both built on `ConnectProbe`:

- `ConnectProbe` itself, started and then read without ever waiting: the fork-server is one
  thread around one poll loop (forkserver/server.py), and its pool checks warming instances
  between requests, so a probe that waited for an answer would hold up every client;
- `accepting`, awaited on serve's event loop while a request waits for a cold start.

The HTTP probe (`ready_status`) runs only on serve's event loop, after the instance accepts:
the fork-server's pool warms instances for any app, so it cannot know an app's path, and a
pooled instance is probed once claimed. Its request and the parsing of the answer's status
line are plain functions (`ready_request`, `status_of`); `ready_status` only does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
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


# -- the HTTP probe ---------------------------------------------------------------------------

READY_TIMEOUT_S = 1.0  # `ready_status`: no status line within this long counts as no answer
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?:[ \t][^\r\n]*)?\r?\n")


def ready_request(host: str, path: str) -> bytes:
    """The probe's request: GET `path` with `host` as Host, one request on the connection.

    `path` is one models.check_ready_path accepted (printable ASCII, no space), and `host` a
    normalized hostname, so neither can end the request line or add a header.
    """
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fcrun-readiness\r\nAccept: */*\r\n"
            "Connection: close\r\n\r\n").encode("ascii")


def status_of(first_line: bytes) -> int | None:
    """The status code of a response's first line (b"HTTP/1.1 503 Service Unavailable\\r\\n"),
    None if it is not an HTTP/1.x status line."""
    found = _STATUS_LINE.fullmatch(first_line)
    return int(found[1]) if found else None


def is_ready(status: int | None) -> bool:
    """2xx and 3xx mean ready (a redirect to a login page is a working app)."""
    return status is not None and 200 <= status < 400


async def ready_status(ip: str, port: int, host: str, path: str, timeout_s: float = READY_TIMEOUT_S) -> int | None:
    """GET `path` from ip:port (Host: `host`); the answer's status code, or None when the
    connection failed or no status line came within `timeout_s`. Never raises for the
    instance's behaviour (a failure is logged at debug level).

    Resource handling: the connection is closed before this returns.
    """
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(ip, port)
            try:
                writer.write(ready_request(host, path))
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):  # a reset after our read: nothing is lost
                    await writer.wait_closed()
    except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a first line over the stream's limit
        log.debug("GET %s from %s:%d: %s", path, ip, port, exc or type(exc).__name__)
        return None
    return status_of(line)


__all__ = ["ACCEPT_TIMEOUT_S", "NOT_LISTENING_ERRNOS", "READY_TIMEOUT_S", "ConnectProbe", "accepting", "is_ready",
           "ready_request", "ready_status", "status_of"]
