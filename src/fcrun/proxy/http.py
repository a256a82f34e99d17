"""HTTP/1.1 for the reverse proxy, without I/O (sans-IO, as h11 does it): the rules, and what both sides share.

request.py's :class:`~fcrun.proxy.request.RequestReader` turns a client connection's bytes into
:class:`~fcrun.proxy.request.Request` objects whose head is already rewritten for the upstream
(hop-by-hop headers removed, X-Forwarded-* and Via added) and whose body bytes are framed for the
upstream. response.py's :class:`~fcrun.proxy.response.ResponseReader` turns an upstream
connection's bytes into bytes for the client. Neither touches a socket or a clock: the driver
(connection.py, upstream.py) feeds them and reads the results, so tests drive them with plain
bytes. This module holds what both sides use: the header kinds, the Connection token rule, the
forwarding headers (:class:`Forwarding`) and the responses the proxy writes itself.

Parsing is llhttp through httptools. Its callbacks are the hot path of the proxy, hence the
flat code: at most one dict lookup per header, rare headers handled once the head is complete,
head bytes joined once, no regex and no logging. A request head is rebuilt from the callbacks;
a response head is forwarded as slices of the bytes received (see ResponseReader).

Hop-by-hop headers (RFC 9110 7.6.1) never cross the proxy: Connection and the headers it names,
Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding (bodies are re-framed instead), and Upgrade
(except on a WebSocket-style upgrade, which is re-stated explicitly). A client's
X-Forwarded-Proto and X-Forwarded-Host are replaced (the proxy is the edge); X-Forwarded-For
and Via are appended to.

Expect: 100-continue is answered by the proxy itself, not forwarded: the driver sends
``100 Continue`` once the request has an upstream connection (after a cold start, after the body
limit check), and the upstream never sees Expect. Interim 1xx responses from the upstream are
dropped.
"""

from __future__ import annotations

from http import HTTPStatus

from .config import ProxyConfig

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CRLF = b"\r\n"
HEAD = b"HEAD"

# What to do with a header, by kind (request.py and response.py map lowercase names to these).
HEADER_HOST = 0             # forwarded, and its value noted
HEADER_CONTENT_LENGTH = 1   # forwarded, and its value noted
HEADER_DROP = 2             # hop-by-hop or replaced by ours
# Above HEADER_DROP: dropped, and handled on the rare path once the head is complete.
HEADER_CONNECTION = 3       # its tokens name more hop-by-hop headers
HEADER_TRANSFER_ENCODING = 4
HEADER_UPGRADE = 5
HEADER_FORWARDED_FOR = 6
HEADER_VIA = 7
HEADER_EXPECT = 8
HEADER_DUPLICATE_HOST = 9   # not a header: a second Host line

# Hop-by-hop headers (RFC 9110 7.6.1), in requests and responses alike: never forwarded as
# received. Each side's table adds its own entries to these.
HOP_BY_HOP_HEADERS = {
    b"connection": HEADER_CONNECTION,
    b"keep-alive": HEADER_DROP,
    b"proxy-connection": HEADER_DROP,
    b"te": HEADER_DROP,
    b"trailer": HEADER_DROP,
    b"transfer-encoding": HEADER_TRANSFER_ENCODING,
    b"upgrade": HEADER_UPGRADE,
    b"via": HEADER_VIA,
}

# Connection tokens that are options, not header names.
_CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade", b""))
_CONNECTION_PLAIN = frozenset(spelling for option in (b"close", b"keep-alive", b"upgrade")
                              for spelling in (option, option.title(), option.upper()))


class ProtocolViolation(Exception):
    """A callback stopped the parser; the reason was already recorded (internal)."""


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def error_response(status: int, message: str, *, close: bool, head_only: bool = False,
                   http10: bool = False) -> bytes:
    """A complete proxy-generated response with a short text body naming the problem."""
    reason = reason_phrase(status)
    body = f"{status} {reason}: {message}\n".encode("utf-8", "replace")
    if close:
        connection = b"Connection: close\r\n"
    elif http10:
        connection = b"Connection: keep-alive\r\n"
    else:
        connection = b""
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%s\r\n"
            % (status, reason.encode(), len(body), connection))
    return head if head_only else head + body


def connection_tokens(value: bytes, into: set[bytes] | None) -> set[bytes] | None:
    """Add the header names that a Connection value lists to ``into`` (options are not names)."""
    if value in _CONNECTION_PLAIN:
        return into
    for token in value.lower().split(b","):
        token = token.strip()
        if token not in _CONNECTION_OPTIONS:
            if into is None:
                into = set()
            into.add(token)
    return into


class Forwarding:
    """Header bytes precomputed once per server (and per client address) for the hot path."""

    def __init__(self, config: ProxyConfig):
        via = config.via.encode("ascii")
        self.via_11 = b"1.1 " + via
        self.via_10 = b"1.0 " + via
        self.via_line = b"Via: 1.1 " + via + CRLF
        self.proto_line = b"X-Forwarded-Proto: " + config.forwarded_proto.encode("ascii") + CRLF
        self.max_header_bytes = config.max_header_bytes

    def client_tail(self, client_ip: bytes) -> bytes:
        """The common request tail for a client that sent neither X-Forwarded-For nor Via."""
        return b"X-Forwarded-For: " + client_ip + CRLF + self.proto_line + self.via_line


def cold_start_headers(cold_start: tuple[str, float]) -> bytes:
    """``X-Fcrun-Cold-Start: <ms>`` and ``X-Fcrun-Cold-Start-Path: <start|pool|thaw>`` lines."""
    path, ms = cold_start
    return b"X-Fcrun-Cold-Start: %.1f\r\nX-Fcrun-Cold-Start-Path: %s\r\n" % (
        ms, path.encode("ascii", "replace"))
