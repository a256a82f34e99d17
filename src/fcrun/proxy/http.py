"""HTTP/1.1 messages for the reverse proxy, without I/O (sans-IO, as h11 does it).

:class:`RequestReader` turns a client connection's bytes into :class:`Request` objects whose
head is already rewritten for the upstream (hop-by-hop headers removed, X-Forwarded-* and Via
added) and whose body bytes are framed for the upstream. :class:`ResponseReader` turns an
upstream connection's bytes into bytes for the client. Neither touches a socket or a clock:
the driver (server.py, upstream.py) feeds them and reads the results, so tests drive them with
plain bytes.

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
from typing import Protocol

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from ..hostnames import normalize_host
from .config import ProxyConfig

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CRLF = b"\r\n"
HEAD = b"HEAD"
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

# What to do with a request header, by lowercase name. Absent: forwarded unchanged.
_HOST = 0             # forwarded, and its value noted
_CONTENT_LENGTH = 1   # forwarded, and its value noted
_DROP = 2             # hop-by-hop or replaced by ours
# Above _DROP: dropped, and handled on the rare path once the head is complete.
_CONNECTION = 3       # its tokens name more hop-by-hop headers
_TRANSFER_ENCODING = 4
_UPGRADE = 5
_FORWARDED_FOR = 6
_VIA = 7
_EXPECT = 8
_DUPLICATE_HOST = 9   # not a header: a second Host line

_REQUEST_HEADERS = {
    b"host": _HOST,
    b"content-length": _CONTENT_LENGTH,
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"upgrade": _UPGRADE,
    b"x-forwarded-for": _FORWARDED_FOR,
    # The proxy is the edge: a client's own claims about scheme and host are replaced.
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
    b"via": _VIA,
    b"expect": _EXPECT,
}
# Content-Length is not here: llhttp's keep-alive verdict implies it (see on_headers_complete).
_RESPONSE_HEADERS = {
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"upgrade": _UPGRADE,
    b"via": _VIA,
}
_RESPONSE_SPECIAL_LENGTHS = frozenset(len(name) for name in _RESPONSE_HEADERS)
# Connection tokens that are options, not header names.
_CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade", b""))
_CONNECTION_PLAIN = frozenset(spelling for option in (b"close", b"keep-alive", b"upgrade")
                              for spelling in (option, option.title(), option.upper()))

# Response body framing towards the client.
_BODY_NONE = 0        # HEAD, 204, 304, 101
_BODY_RAW = 1         # Content-Length, or close-delimited for an HTTP/1.0 client
_BODY_CHUNKED = 2     # re-chunked: the upstream sent chunked or close-delimited


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


def _connection_tokens(value: bytes, into: set[bytes] | None) -> set[bytes] | None:
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


def _drop_named(lines: list[bytes], start: int, names: set[bytes]) -> list[bytes]:
    """``lines`` without the headers in ``names``; headers are 4 items from ``start``: name, ': ', value, CRLF."""
    kept = lines[:start]
    for i in range(start, len(lines), 4):
        if lines[i].lower() not in names:
            kept += lines[i:i + 4]
    return kept


def _split_absolute_url(url: bytes) -> tuple[bytes, bytes] | None:
    """``http://host:port/path?q`` -> (b"host:port", b"/path?q"); None if not an absolute http(s) URL."""
    lower = url[:8].lower()
    if lower.startswith(b"http://"):
        rest = url[7:]
    elif lower.startswith(b"https://"):
        rest = url[8:]
    else:
        return None
    slash = rest.find(b"/")
    query = rest.find(b"?")
    cut = min(i for i in (slash, query, len(rest)) if i >= 0)
    authority, path = rest[:cut], rest[cut:]
    if b"@" in authority:
        return None
    if path[:1] != b"/":
        path = b"/" + path
    return authority, path


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


class Request:
    """One request from a client: its head as parsed and rewritten, and its body's progress.

    The defaults are class attributes, so that a request sets only what differs from them
    (cheaper than an ``__init__`` assigning two dozen fields for every request). The driver
    adds its own per-exchange state (lease, upstream connection) in a subclass, the same way.
    """

    method = b""
    url = b""
    http10 = False
    host = ""
    host_raw: bytes | None = None
    keep_alive = True
    upgrade = False
    expect_continue = False
    content_length: int | None = None
    chunked = False
    head_bytes = 0
    upstream_head = b""
    body_bytes = 0
    max_body: int | None = None   # set by the driver once the app's limit is known
    complete = False
    discard = False               # set by the driver: drop the rest of the body
    pending: list[bytes] | tuple[()] = ()   # body bytes framed for the upstream, not sent yet
    pending_bytes = 0

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS


class RequestSink(Protocol):
    """What a RequestReader reports to its driver. Called from inside ``feed()``."""

    def request_head(self, req: Request) -> None:
        """The head is complete and valid; ``req.upstream_head`` is what to send upstream."""

    def request_error(self, req: Request | None, status: int, message: str) -> None:
        """The request cannot be served (400, 413, 417, 431, 501); the reader has stopped."""

    def request_upgrade(self, req: Request, data: bytes) -> None:
        """The connection leaves HTTP after ``req``; ``data`` are the first tunnel bytes."""


class RequestReader:
    """Client bytes in, requests out (sans-IO).

    Body bytes, framed for the upstream (re-chunked when the client sent chunked), are appended
    to the current request's ``pending`` list. After ``request_error`` or ``request_upgrade``
    the reader is ``stopped`` and must not be fed again.
    """

    __slots__ = ("_sink", "_parser", "_forwarding", "_client_ip", "_tail", "_factory", "_req",
                 "_lines", "_special", "_head_len", "_head_raw", "_in_head", "_limit",
                 "_last_host_raw", "_last_host", "in_message", "stopped")

    def __init__(self, sink: RequestSink, client_ip: str, forwarding: Forwarding,
                 request_factory: type[Request] = Request):
        self._sink = sink
        self._parser = httptools.HttpRequestParser(self)
        self._forwarding = forwarding
        self._client_ip = client_ip.encode("ascii", "replace")
        self._tail = forwarding.client_tail(self._client_ip)
        self._factory = request_factory
        self._req: Request | None = None
        self._lines: list[bytes] = []
        self._special: list[tuple[int, bytes]] | None = None   # rare headers of this head
        self._head_len = 0
        self._head_raw = 0          # bytes fed while a head was incomplete (bounds llhttp's buffering)
        self._in_head = True        # between requests or inside a head (not in a body)
        self._limit = forwarding.max_header_bytes
        self._last_host_raw = b""
        self._last_host = ""
        self.in_message = False     # some bytes of a request have arrived and it is not complete
        self.stopped = False

    def feed(self, data: bytes) -> None:
        if self._in_head:
            self._head_raw += len(data)
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self.stopped = True
            self._sink.request_upgrade(self._req, data[upgrade.args[0]:])
            return
        except HttpParserCallbackError as err:
            if isinstance(err.__context__, ProtocolViolation):
                return
            raise (err.__context__ or err) from None   # a bug in the sink: let the driver see it
        except HttpParserError as err:
            req = self._req if self.in_message else None
            self.stopped = True
            self.in_message = False
            self._sink.request_error(req, 400, f"malformed request: {err}")
            return
        if self._in_head and self._head_raw > self._limit:
            self.stopped = True
            self._sink.request_error(None, 431, f"request head over {self._limit} bytes")

    def _fail(self, req: Request | None, status: int, message: str) -> None:
        self.stopped = True
        self.in_message = False
        self._sink.request_error(req, status, message)
        raise ProtocolViolation(message)

    # httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.stopped:
            # The driver closed the connection while this read was being parsed.
            raise ProtocolViolation("reader stopped")
        self._req = self._factory()
        self._lines = [b"", b" ", b"", b" HTTP/1.1\r\n"]   # request line filled in at the end
        self._special = None
        self._head_len = 0
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        self._req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return   # a chunked body's trailer fields: dropped with the Trailer header
        self._head_len += len(name) + len(value) + 4
        lname = name.lower()
        kind = _REQUEST_HEADERS.get(lname)
        if kind is None:
            if not lname.startswith(b"proxy-"):
                self._lines += (name, b": ", value, CRLF)
        elif kind == _HOST:
            req = self._req
            if req.host_raw is not None:
                kind = _DUPLICATE_HOST
            req.host_raw = value
            self._lines += (name, b": ", value, CRLF)
        elif kind == _CONTENT_LENGTH:
            self._req.content_length = int(value)
            self._lines += (name, b": ", value, CRLF)
        if kind is not None and kind > _DROP:
            if self._special is None:
                self._special = []
            self._special.append((kind, value))

    def on_headers_complete(self) -> None:
        req = self._req
        parser = self._parser
        self._in_head = False
        self._head_raw = 0
        method = req.method = parser.get_method()
        url = req.url
        req.head_bytes = head_bytes = self._head_len + len(method) + len(url) + 14
        if head_bytes > self._limit:
            self._fail(req, 431, f"request head over {self._limit} bytes")
        req.keep_alive = keep_alive = parser.should_keep_alive()
        # An HTTP/1.0 request is keep-alive only with a Connection header (a special one): the
        # common case, HTTP/1.1 without one, skips asking the parser (it formats a string).
        http10 = False
        if not keep_alive or self._special is not None:
            req.http10 = http10 = parser.get_http_version() == "1.0"
        if method == b"CONNECT":
            self._fail(req, 405, "CONNECT is not supported by this reverse proxy")
        lines = self._lines
        if url[:1] != b"/":
            self._absolute_form(req, lines)
        host_raw = req.host_raw
        if host_raw == self._last_host_raw:
            req.host = self._last_host
        else:
            if host_raw is None:
                self._fail(req, 400, "missing Host header")
            host = normalize_host(host_raw)
            if host is None:
                self._fail(req, 400, "invalid Host header")
            self._last_host_raw, self._last_host = host_raw, host
            req.host = host
        lines[0] = method
        lines[2] = req.url
        if self._special is None and not http10:
            lines.append(self._tail)
        else:
            self._special_headers(req, lines, http10)
        lines += (b"X-Forwarded-Host: ", req.host_raw, CRLF, CRLF)
        req.upstream_head = b"".join(lines)
        self._lines = []
        self._sink.request_head(req)

    def _special_headers(self, req: Request, lines: list[bytes], http10: bool) -> None:
        """The rare path: headers that change how the request is forwarded, and HTTP/1.0."""
        forwarded_for = via = transfer_encoding = expect = upgrade = tokens = None
        for kind, value in self._special or ():
            if kind == _CONNECTION:
                tokens = _connection_tokens(value, tokens)
            elif kind == _TRANSFER_ENCODING:
                transfer_encoding = value if transfer_encoding is None else b"%s,%s" % (transfer_encoding, value)
            elif kind == _UPGRADE:
                upgrade = value
            elif kind == _FORWARDED_FOR:
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            elif kind == _VIA:
                via = value if via is None else via + b", " + value
            elif kind == _EXPECT:
                expect = value
            elif kind == _DUPLICATE_HOST:
                self._fail(req, 400, "more than one Host header")
        if transfer_encoding is not None:
            if transfer_encoding.strip().lower() != b"chunked":
                self._fail(req, 501, "only the chunked transfer coding is supported")
            req.chunked = True
        if expect is not None:
            if expect.strip().lower() != b"100-continue":
                self._fail(req, 417, "only Expect: 100-continue is supported")
            req.expect_continue = not http10 and req.has_body
        if tokens is not None:
            lines[:] = _drop_named(lines, 4, tokens)
        forwarding = self._forwarding
        if forwarded_for is None and via is None and not http10:
            lines.append(self._tail)
        else:
            via_token = forwarding.via_10 if http10 else forwarding.via_11
            lines += (b"X-Forwarded-For: ",
                      self._client_ip if forwarded_for is None else forwarded_for + b", " + self._client_ip,
                      CRLF, forwarding.proto_line,
                      b"Via: ", via_token if via is None else via + b", " + via_token, CRLF)
        if req.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        if self._parser.should_upgrade():
            req.upgrade = True
            req.keep_alive = False   # after an upgrade request the connection is no HTTP anymore
            if upgrade is not None:
                lines += (b"Connection: upgrade\r\nUpgrade: ", upgrade, CRLF)

    def _absolute_form(self, req: Request, lines: list[bytes]) -> None:
        """``GET http://host/path``: the URL's authority replaces Host (RFC 9112 3.2.2)."""
        if req.url == b"*":
            return
        split = _split_absolute_url(req.url)
        if split is None:
            self._fail(req, 400, "invalid request target")
        authority, req.url = split
        lines[:] = _drop_named(lines, 4, {b"host"})
        lines += (b"Host: ", authority, CRLF)
        req.host_raw = authority
        if self._special is not None:
            self._special = [(kind, value) for kind, value in self._special if kind != _DUPLICATE_HOST]

    def on_body(self, data: bytes) -> None:
        req = self._req
        n = len(data)
        req.body_bytes += n
        if req.max_body is not None and req.body_bytes > req.max_body:
            self._fail(req, 413, f"request body over {req.max_body} bytes")
        if req.discard:
            return
        pending = req.pending
        if not pending:
            pending = req.pending = []
        if req.chunked:
            pending += (b"%x\r\n" % n, data, CRLF)
        else:
            pending.append(data)
        req.pending_bytes += n

    def on_message_complete(self) -> None:
        req = self._req
        req.complete = True
        self.in_message = False
        self._in_head = True
        self._head_raw = 0
        if req.chunked and not req.discard:
            if req.pending:
                req.pending.append(b"0\r\n\r\n")
            else:
                req.pending = [b"0\r\n\r\n"]


class ResponseReader:
    """Upstream bytes in, client bytes out (sans-IO), one response per ``begin()``.

    After each ``feed()``: ``out`` holds bytes for the client (the driver writes and clears
    it); ``complete`` says the response ended (``reusable``: the upstream connection may serve
    another request); ``upgraded`` says a 101 arrived and ``tunnel_data`` are the first tunnel
    bytes; ``error`` names why the upstream's bytes cannot be used.

    llhttp validates the head and frames the body. The head itself is forwarded from its raw
    bytes (a response always starts a read: nothing is pipelined towards an upstream), with
    the hop-by-hop lines cut out where the per-header callback spotted them: responses carry
    many headers and rarely a hop-by-hop one besides Connection, so the callback only classifies.
    """

    __slots__ = ("_parser", "_forwarding", "_req", "_raw", "_head_start", "_special", "_mode",
                 "_keep_alive", "_extra", "_interim", "_until_eof", "_upstream_keep_alive",
                 "_reset_parser", "out", "status", "head_bytes", "body_bytes", "head_sent",
                 "complete", "reusable", "close_client", "upgraded", "tunnel_data", "error")

    def __init__(self, forwarding: Forwarding):
        self._parser = httptools.HttpResponseParser(self)
        self._forwarding = forwarding
        self._reset_parser = False
        self._req: Request | None = None
        self._keep_alive = True
        self._extra = b""
        self._raw = b""
        self._head_start = 0
        self._special: list[tuple[int, bytes, bytes]] | None = None
        self._mode = _BODY_NONE
        self._interim = False
        self._until_eof = False
        self._upstream_keep_alive = False
        self.out: list[bytes] = []
        self.status = 0
        self.head_bytes = 0
        self.body_bytes = 0
        self.head_sent = False
        self.complete = True
        self.reusable = False
        self.close_client = False
        self.upgraded = False
        self.tunnel_data = b""
        self.error: str | None = None

    def begin(self, req: Request, keep_alive: bool, extra_headers: bytes = b"") -> None:
        """Expect the response to ``req``; ``extra_headers`` (complete lines) go into its head.

        Only what a finished response leaves behind is reset here; the rest is set when the
        head arrives. (A reader whose response failed or upgraded is never used again.)
        """
        if self._reset_parser:
            # llhttp cannot be told that a response answers HEAD, so after one it still waits
            # for the body its Content-Length announced: start over with a fresh parser.
            self._parser = httptools.HttpResponseParser(self)
            self._reset_parser = False
        self._req = req
        self._keep_alive = keep_alive
        self._extra = extra_headers
        self.head_sent = False
        self.complete = False

    def refuse_keep_alive(self) -> None:
        """Say Connection: close in the head, if it is not out yet (the server is closing)."""
        self._keep_alive = False

    def feed(self, data: bytes) -> None:
        if not self.head_sent:
            self._raw = self._raw + data if self._raw else data
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self.tunnel_data = data[upgrade.args[0]:]
        except HttpParserCallbackError as err:
            if not isinstance(err.__context__, ProtocolViolation):
                raise (err.__context__ or err) from None
        except HttpParserError as err:
            self.error = f"malformed response from upstream: {err}"
            self._reset_parser = True

    def feed_eof(self) -> bool:
        """The upstream closed its side; True if that ended a close-delimited response."""
        if not self._until_eof or self.complete or not self.head_sent:
            return False
        if self._mode == _BODY_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self.complete = True
        self.reusable = False
        return True

    def _violation(self, message: str) -> None:
        self.error = message
        self._reset_parser = True
        raise ProtocolViolation(message)

    # httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after the end of the response: the connection is out of step.
            self._violation("upstream sent more than one response")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Most headers are none of ours: a length no special name has, not starting with p/P
        # (Proxy-*), settles that without lowercasing. (llhttp rejects empty names.)
        if len(name) not in _RESPONSE_SPECIAL_LENGTHS and name[0] | 0x20 != 0x70:
            return
        lname = name.lower()
        kind = _RESPONSE_HEADERS.get(lname)
        if kind is None:
            if not lname.startswith(b"proxy-"):
                return
            kind = _DROP
        if self._special is None:
            self._special = []
        self._special.append((kind, name, value))   # trailer fields land here too: unused

    def on_headers_complete(self) -> None:
        parser = self._parser
        raw = self._raw
        start = self._head_start
        end = raw.find(b"\r\n\r\n", start) + 4
        status = parser.get_status_code()
        if status < 200 and status != 101:
            self._interim = True   # 100 Continue, 103 Early Hints: not passed on
            self._head_start = end
            self._special = None
            return
        self._raw = b""
        self._head_start = 0
        self.status = status
        self.body_bytes = 0
        self._upstream_keep_alive = upstream_keep_alive = parser.should_keep_alive()
        req = self._req
        http10 = req.http10
        te = upgrade = via = None
        # The head goes out as slices of raw: the status line (as HTTP/1.1) and the header
        # lines between the ones to cut, without the blank line.
        if raw[start:start + 9] == b"HTTP/1.1 ":
            parts = []
            position = start
        else:
            parts = [b"HTTP/1.1"]
            position = start + 8
        special = self._special
        if special is not None:
            self._special = None
            tokens = None
            for kind, name, value in special:
                if kind == _CONNECTION:
                    tokens = _connection_tokens(value, tokens)
                elif kind == _TRANSFER_ENCODING:
                    value = value.strip().lower()
                    te = value if te is None else te + b"," + value
                elif kind == _UPGRADE:
                    upgrade = value
                elif kind == _VIA:
                    via = value if via is None else via + b", " + value
                # Cut the line. It mostly reads "Name: value": one search finds it exactly.
                # position is a line start (or the head's), so the newline before the next
                # line to cut is at or after position - 1.
                line = b"".join((b"\n", name, b": ", value, b"\r\n"))
                found = raw.find(line, position - 1 if position else 0, end)
                if found >= 0:
                    stop = found + len(line)
                else:
                    found = raw.find(b"\n" + name + b":", position - 1 if position else 0, end)
                    if found < 0:
                        continue   # a trailer field, reported after the head
                    stop = raw.find(b"\n", found + 1) + 1
                parts.append(raw[position:found + 1])
                position = stop
            if tokens is not None:
                parts = _headers_without(raw[start:end], tokens)
                position = end - 2
        parts.append(raw[position:end - 2])
        forwarding = self._forwarding
        if via is None:
            parts.append(forwarding.via_line)
        else:
            parts += (b"Via: ", via, b", ", forwarding.via_11, CRLF)
        close = not self._keep_alive
        if status == 101:
            if not req.upgrade or upgrade is None:
                self._violation("upstream switched protocols without an upgrade request")
            self.upgraded = True
            self._mode = _BODY_NONE
            parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, CRLF)
        else:
            if req.method == HEAD or status == 204 or status == 304:
                self._mode = _BODY_NONE
            elif te is not None:
                if te != b"chunked":
                    self._violation("upstream used a transfer coding other than chunked")
                self._chunk_or_close(parts, http10)
                close = close or http10
            elif upstream_keep_alive or b"\ncontent-length:" in raw[start:end].lower():
                # llhttp keeps a connection alive only when the body's end is known without a
                # close: here (not chunked) that means a Content-Length.
                self._mode = _BODY_RAW
            else:
                # Delimited by the upstream closing: re-chunk for HTTP/1.1 clients so that their
                # connection survives; an HTTP/1.0 client gets the same close.
                self._until_eof = True
                self._upstream_keep_alive = False
                self._chunk_or_close(parts, http10)
                close = close or http10
            if close:
                parts.append(b"Connection: close\r\n")
            elif http10:
                parts.append(b"Connection: keep-alive\r\n")
        self.close_client = close
        if self._extra:
            parts.append(self._extra)
        parts.append(CRLF)
        head = b"".join(parts)
        self.head_bytes = len(head)
        self.out.append(head)
        self.head_sent = True
        if req.method == HEAD and status != 101:
            # llhttp would wait for the body that Content-Length announces; a HEAD has none.
            self._finish()
            self._reset_parser = True

    def _chunk_or_close(self, parts: list[bytes], http10: bool) -> None:
        if http10:
            self._mode = _BODY_RAW
        else:
            self._mode = _BODY_CHUNKED
            parts.append(b"Transfer-Encoding: chunked\r\n")

    def on_body(self, data: bytes) -> None:
        if self.complete or not data:
            return
        self.body_bytes += len(data)
        if self._mode == _BODY_CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, CRLF)
        else:
            self.out.append(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.complete:
            return
        if self._mode == _BODY_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self._finish()

    def _finish(self) -> None:
        self.complete = True
        self.reusable = self._upstream_keep_alive and not self.upgraded


def _headers_without(head: bytes, tokens: set[bytes]) -> list[bytes]:
    """Rare path (Connection names more headers): rebuild the head line by line."""
    lines = head[:-4].split(b"\r\n")
    parts = [b"HTTP/1.1", lines[0][8:], CRLF]
    for line in lines[1:]:
        lname = line.partition(b":")[0].lower()
        if lname in _RESPONSE_HEADERS or lname in tokens or lname.startswith(b"proxy-"):
            continue
        parts += (line, CRLF)
    return parts


def cold_start_headers(cold_start: tuple[str, float]) -> bytes:
    """``X-Fcrun-Cold-Start: <ms>`` and ``X-Fcrun-Cold-Start-Path: <start|pool|thaw>`` lines."""
    path, ms = cold_start
    return b"X-Fcrun-Cold-Start: %.1f\r\nX-Fcrun-Cold-Start-Path: %s\r\n" % (
        ms, path.encode("ascii", "replace"))
