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
(except on a WebSocket-style upgrade, which is re-stated explicitly). A Connection header that
names Content-Length, Transfer-Encoding or Host is refused (NOT_CONNECTION_OPTIONS says why).

Forwarding headers say who the client is (:class:`Forwarding`). The proxy is the edge, so by
default a client's X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, Forwarded and
X-Real-IP never reach the app: they are replaced by what the proxy saw (the TCP peer's address,
its own scheme, the Host). Only a peer inside ``[proxy] trusted_proxies`` (a load balancer in
front of fcrun) is believed, as nginx's realip module believes ``set_real_ip_from``: its
X-Forwarded-For and Forwarded are appended to, its X-Forwarded-Proto/-Host kept, and X-Real-IP
is the rightmost X-Forwarded-For address that is not itself a trusted proxy. Via is always
appended to (it is for loop detection, not trust).

What reaches the upstream is re-serialized from the parsed fields, never copied from the
client's bytes: the request line from method, target and "HTTP/1.1", each header as
``name: value CRLF``, the body re-framed. llhttp, in its strict mode (fcrun sets none of its
"dangerous leniencies"), has already refused every head that could be read two ways: CR, LF,
NUL or another control character (HTAB aside) in a header name or value, obs-fold (a line
starting with SP or HTAB), a bare LF as line end, Content-Length together with
Transfer-Encoding, two Content-Length lines, a Transfer-Encoding whose last coding is not
chunked, a chunk size over 64 bits, a malformed chunk extension. A refused head is answered
400, naming the header at fault where :func:`describe_header_error` can tell which it is.

Expect: 100-continue is answered by the proxy itself, not forwarded: the driver sends
``100 Continue`` once the request has an upstream connection (after a cold start, after the body
limit check), and the upstream never sees Expect. Interim 1xx responses from the upstream are
dropped; a status under 100, or an interim response with a body, is answered 502.

A head and a trailer section are bounded, whoever sends them: a client's by ``max_header_bytes``
(431), an app's by response.py's MAX_RESPONSE_HEAD_BYTES (502, or a cut once the head went out).
"""

from __future__ import annotations

import ipaddress
from http import HTTPStatus

from .config import ProxyConfig, trusted_networks

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
HEADER_FORWARDED = 10       # Forwarded (RFC 7239)
HEADER_FORWARDED_PROTO = 11
HEADER_FORWARDED_HOST = 12

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


# Headers that a Connection option may not name. RFC 9110 7.6.1: a sender MUST NOT list a field
# meant for every recipient; these frame the message (Content-Length, Transfer-Encoding) or route
# it (Host). llhttp has already framed the message by them here, so dropping one on the way would
# have the next hop frame or route the same bytes otherwise: the body of a request whose
# Content-Length was dropped reads as a second request, smuggled past the proxy. Such a message
# is refused (400 from a client, 502 from an app), not forwarded with the token ignored: a
# sender that asks for this is broken or attacking, and an answer naming the header says so.
NOT_CONNECTION_OPTIONS = frozenset((b"content-length", b"transfer-encoding", b"host"))


def named_end_to_end_headers(tokens: set[bytes]) -> str | None:
    """The NOT_CONNECTION_OPTIONS among a Connection value's tokens, for a message; None if none."""
    named = tokens & NOT_CONNECTION_OPTIONS
    if not named:
        return None
    return ", ".join(sorted(name.decode("ascii") for name in named))


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
    """The forwarding headers' rules, and their bytes precomputed once per server (and per
    client address) for the hot path."""

    def __init__(self, config: ProxyConfig):
        via = config.via.encode("ascii")
        self.via_11 = b"1.1 " + via
        self.via_10 = b"1.0 " + via
        self.via_line = b"Via: 1.1 " + via + CRLF
        self.proto = config.forwarded_proto.encode("ascii")
        self.proto_line = b"X-Forwarded-Proto: " + self.proto + CRLF
        self.max_header_bytes = config.max_header_bytes
        self.trusted = trusted_networks(config.trusted_proxies)

    def trusts(self, client_ip: bytes | str) -> bool:
        """Is this peer address inside ``trusted_proxies`` (its forwarding headers believed)?"""
        if not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(client_ip.decode("ascii") if isinstance(client_ip, bytes)
                                           else client_ip)
        except (ValueError, UnicodeDecodeError):
            return False   # not an IP address (a unix socket peer)
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped   # a dual-stack socket's view of an IPv4 peer
        return any(address in network for network in self.trusted)

    def real_client_ip(self, forwarded_for: bytes | None, peer: bytes) -> bytes:
        """The client's address as nginx's realip (recursive) reads it from a trusted peer:
        X-Forwarded-For from the right, skipping trusted proxies; the peer itself if the list
        is empty; the last valid address before an entry that is not an address."""
        client = peer
        for entry in reversed(forwarded_for.split(b",")) if forwarded_for else ():
            if not self.trusts(client):
                break
            entry = entry.strip()
            try:
                ipaddress.ip_address(entry.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                break
            client = entry
        return client

    def client_tail(self, client_ip: bytes) -> bytes:
        """The common request tail for a client that sent no forwarding header nor Via
        (the host's lines follow: :meth:`host_tail`)."""
        return (b"X-Forwarded-For: " + client_ip + CRLF + b"X-Real-IP: " + client_ip + CRLF
                + self.proto_line + self.via_line)

    def forwarded_element(self, client_ip: bytes, host: bytes) -> bytes:
        """This hop's element of the Forwarded header (RFC 7239): ``for=...;host="...";proto=...``."""
        return b"for=%s;host=\"%s\";proto=%s" % (forwarded_node(client_ip), host, self.proto)

    def host_tail(self, client_ip: bytes, host: bytes) -> bytes:
        """Forwarded and X-Forwarded-Host for a request to ``host`` (a Host value already
        checked by normalize_host, so it needs no escaping inside quotes)."""
        return (b"Forwarded: " + self.forwarded_element(client_ip, host) + CRLF
                + b"X-Forwarded-Host: " + host + CRLF)


def forwarded_node(client_ip: bytes) -> bytes:
    """A peer address as a Forwarded ``for=`` node: IPv6 quoted in brackets, no address "unknown"."""
    if b":" in client_ip:
        return b'"[' + client_ip + b']"'
    if client_ip[:1].isdigit():
        return client_ip
    return b"unknown"


# Bytes a header name may hold (RFC 9110 5.6.2 tchar).
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SHOWN_NAME_CHARS = 64


def _shown(name: bytes) -> str:
    """A header name for an error message: printable ASCII as is, any other byte as \\xNN."""
    text = "".join(chr(byte) if 0x20 < byte < 0x7F and byte != 0x22 else f"\\x{byte:02x}"
                   for byte in name[:_SHOWN_NAME_CHARS])
    return '"' + text + ('..."' if len(name) > _SHOWN_NAME_CHARS else '"')


def describe_header_error(head: bytes) -> str | None:
    """Which line of a refused request head broke the rules, in words naming its header.

    ``head`` holds the head's bytes from its start up to at least the line at fault (more may
    follow). None when no header line is at fault (the request line was, or the reason is
    elsewhere). Called only on the error path, after llhttp refused the head.
    """
    lines = head.lstrip(b"\r\n").split(b"\n")
    if len(lines) < 2:
        return None
    if not lines[0].endswith(b"\r"):
        return "the request line ends with a bare LF (lines end with CRLF)"
    previous = None
    last = len(lines) - 1
    for index in range(1, len(lines)):
        line = lines[index]
        ended = index < last          # the last piece has not reached its LF yet
        crlf = line.endswith(b"\r")
        text = line[:-1] if crlf else line
        if not text:
            return "the head ends with a bare LF (lines end with CRLF)" if ended and not crlf else None
        if text[:1] in (b" ", b"\t"):
            if previous is None:
                return "the first header line starts with whitespace"
            return f"header {_shown(previous)} continues on a folded line (obs-fold is not accepted)"
        name, colon, value = text.partition(b":")
        bad = next((byte for byte in name if byte not in _TCHAR), None)
        if bad is not None:
            return f"header name {_shown(name)} holds the byte 0x{bad:02x}, not allowed in a name"
        if not colon:
            return f"header line {_shown(name)} has no colon" if ended else None
        bad = next((byte for byte in value if (byte < 0x20 and byte != 0x09) or byte == 0x7F), None)
        if bad is not None:
            return f"header {_shown(name)} holds the control byte 0x{bad:02x} in its value"
        if ended and not crlf:
            return f"header {_shown(name)} ends with a bare LF (lines end with CRLF)"
        previous = name
    return None


def cold_start_headers(cold_start: tuple[str, float]) -> bytes:
    """``X-Fcrun-Cold-Start: <ms>`` and ``X-Fcrun-Cold-Start-Path: <start|pool|thaw>`` lines."""
    path, ms = cold_start
    return b"X-Fcrun-Cold-Start: %.1f\r\nX-Fcrun-Cold-Start-Path: %s\r\n" % (
        ms, path.encode("ascii", "replace"))
