"""The request side of the proxy's HTTP/1.1 (sans-IO): client bytes in, :class:`Request` objects out.

See http.py for the rules both sides follow.
"""

from __future__ import annotations

from typing import Protocol

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from ..hostnames import normalize_host
from .http import (CRLF, HEADER_CONNECTION, HEADER_CONTENT_LENGTH, HEADER_DROP, HEADER_DUPLICATE_HOST,
                   HEADER_EXPECT, HEADER_FORWARDED, HEADER_FORWARDED_FOR, HEADER_FORWARDED_HOST,
                   HEADER_FORWARDED_PROTO, HEADER_HOST, HEADER_TRANSFER_ENCODING, HEADER_UPGRADE, HEADER_VIA,
                   HOP_BY_HOP_HEADERS, Forwarding, ProtocolViolation, connection_tokens, describe_header_error,
                   named_end_to_end_headers)

# The Host value of the connection's previous request, before there was one: a value no Host
# line can have (llhttp refuses a CR in a value), so the first request's Host is always checked.
# (b"" was the sentinel once, and made an empty Host on a first request pass unchecked.)
_NO_HOST_YET = b"\r"

IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

# What to do with a request header, by lowercase name (kinds in http.py). Absent: forwarded unchanged.
_REQUEST_HEADERS = {
    **HOP_BY_HOP_HEADERS,
    b"host": HEADER_HOST,
    b"content-length": HEADER_CONTENT_LENGTH,
    # Forwarding headers: replaced by the proxy's own, or kept/appended to for a trusted peer.
    b"x-forwarded-for": HEADER_FORWARDED_FOR,
    b"x-forwarded-proto": HEADER_FORWARDED_PROTO,
    b"x-forwarded-host": HEADER_FORWARDED_HOST,
    b"forwarded": HEADER_FORWARDED,
    b"x-real-ip": HEADER_DROP,
    b"expect": HEADER_EXPECT,
}


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
    last_chunk_at = -1            # body_bytes at the latest chunk-size line (chunked only)
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

    __slots__ = ("_sink", "_parser", "_forwarding", "_client_ip", "_trusted", "_tail", "_factory", "_req",
                 "_lines", "_special", "_head_len", "_head_raw", "_head_reads", "_in_head", "_limit",
                 "_last_host_raw", "_last_host", "_host_tail", "in_message", "stopped")

    def __init__(self, sink: RequestSink, client_ip: str, forwarding: Forwarding,
                 request_factory: type[Request] = Request):
        self._sink = sink
        self._parser = httptools.HttpRequestParser(self)
        self._forwarding = forwarding
        self._client_ip = client_ip.encode("ascii", "replace")
        self._trusted = forwarding.trusts(client_ip)   # a proxy in front of us: its headers believed
        self._tail = forwarding.client_tail(self._client_ip)
        self._factory = request_factory
        self._req: Request | None = None
        self._lines: list[bytes] = []
        self._special: list[tuple[int, bytes]] | None = None   # rare headers of this head
        self._head_len = 0
        # Bytes fed while a head, or a chunked body's trailer section, was incomplete: llhttp
        # buffers a header field until its end, so these reads are bounded by max_header_bytes.
        self._head_raw = 0
        # The earlier reads of the head being parsed, kept only to name the header at fault when
        # llhttp refuses it; None when the head began inside a read after another request (its
        # start is not known, so the header is not named).
        self._head_reads: tuple[bytes, ...] | None = ()
        self._in_head = True        # between requests or inside a head (not in a body)
        self._limit = forwarding.max_header_bytes
        self._last_host_raw = _NO_HOST_YET
        self._last_host = ""
        self._host_tail = b""
        self.in_message = False     # some bytes of a request have arrived and it is not complete
        self.stopped = False

    def feed(self, data: bytes) -> None:
        in_trailer = None
        if self._in_head:
            self._head_raw += len(data)
        elif self._req.last_chunk_at == self._req.body_bytes:
            # No body byte since the latest chunk-size line: this read holds that chunk's data,
            # or, if it was the last chunk (size 0), the trailer section. Told apart below.
            in_trailer = self._req
            body_before = in_trailer.body_bytes
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
            message = f"malformed request: {err}"
            if self._in_head and self._head_reads is not None:
                detail = describe_header_error(b"".join(self._head_reads) + data)
                if detail is not None:
                    message = f"malformed request: {detail}"
            self.stopped = True
            self.in_message = False
            self._sink.request_error(req, 400, message)
            return
        if self._in_head:
            if self._head_raw > self._limit:
                self.stopped = True
                self._sink.request_error(None, 431, f"request head over {self._limit} bytes")
            elif not self.in_message:
                self._head_reads = ()      # the next head starts with the next read
            elif self._head_reads is not None:
                self._head_reads += (data,)
        elif in_trailer is self._req and in_trailer.body_bytes == body_before:
            self._count_trailer_bytes(in_trailer, len(data))

    def _count_trailer_bytes(self, req: Request, n: int) -> None:
        """A whole read went into a chunked body's trailer section (not its first read, which
        also held the last chunk: the bound is max_header_bytes plus one read)."""
        self._head_raw += n
        if self._head_raw > self._limit:
            self.stopped = True
            self.in_message = False
            self._sink.request_error(req, 431, f"request trailer section over {self._limit} bytes")

    @property
    def dropped_body_of(self) -> Request | None:
        """The request whose body is being read and dropped (it was answered before all of its
        body came), or None."""
        req = self._req
        if self.in_message and not self._in_head and req.discard:
            return req
        return None

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
        elif kind == HEADER_HOST:
            req = self._req
            if req.host_raw is not None:
                kind = HEADER_DUPLICATE_HOST
            req.host_raw = value
            self._lines += (name, b": ", value, CRLF)
        elif kind == HEADER_CONTENT_LENGTH:
            self._req.content_length = int(value)
            self._lines += (name, b": ", value, CRLF)
        if kind is not None and kind > HEADER_DROP:
            if self._special is None:
                self._special = []
            self._special.append((kind, value))

    def on_headers_complete(self) -> None:
        req = self._req
        parser = self._parser
        self._in_head = False
        self._head_raw = 0
        self._head_reads = None   # a next head in this read starts where llhttp does not say
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
            self._host_tail = self._forwarding.host_tail(self._client_ip, host_raw.strip())
            req.host = host
        lines[0] = method
        lines[2] = req.url
        if self._special is None and not http10:
            lines += (self._tail, self._host_tail, CRLF)
        else:
            self._special_headers(req, lines, http10)
            lines.append(CRLF)
        req.upstream_head = b"".join(lines)
        self._lines = []
        self._sink.request_head(req)

    def _special_headers(self, req: Request, lines: list[bytes], http10: bool) -> None:
        """The rare path: headers that change how the request is forwarded, and HTTP/1.0."""
        forwarded_for = via = transfer_encoding = expect = upgrade = tokens = None
        forwarded = forwarded_proto = forwarded_host = None
        for kind, value in self._special or ():
            if kind == HEADER_CONNECTION:
                tokens = connection_tokens(value, tokens)
            elif kind == HEADER_TRANSFER_ENCODING:
                transfer_encoding = value if transfer_encoding is None else b"%s,%s" % (transfer_encoding, value)
            elif kind == HEADER_UPGRADE:
                upgrade = value
            elif kind == HEADER_FORWARDED_FOR:
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            elif kind == HEADER_VIA:
                via = value if via is None else via + b", " + value
            elif kind == HEADER_EXPECT:
                expect = value
            elif kind == HEADER_FORWARDED:
                forwarded = value if forwarded is None else forwarded + b", " + value
            elif kind == HEADER_FORWARDED_PROTO:
                forwarded_proto = value if forwarded_proto is None else forwarded_proto + b", " + value
            elif kind == HEADER_FORWARDED_HOST:
                forwarded_host = value if forwarded_host is None else forwarded_host + b", " + value
            elif kind == HEADER_DUPLICATE_HOST:
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
            named = named_end_to_end_headers(tokens)
            if named is not None:
                # (why refused, not ignored: NOT_CONNECTION_OPTIONS in http.py)
                self._fail(req, 400, f"the Connection header lists {named}: a header that frames or "
                                     f"routes the request cannot be hop-by-hop")
            lines[:] = _drop_named(lines, 4, tokens)
        forwarding = self._forwarding
        client_ip = self._client_ip
        if not self._trusted:
            # The proxy is the edge: what the client says about itself is dropped, every time.
            forwarded_for = forwarded = forwarded_proto = forwarded_host = None
        if forwarded_for is None and via is None and not http10:
            lines.append(self._tail)
        else:
            via_token = forwarding.via_10 if http10 else forwarding.via_11
            lines += (b"X-Forwarded-For: ",
                      client_ip if forwarded_for is None else forwarded_for + b", " + client_ip, CRLF,
                      b"X-Real-IP: ",
                      client_ip if forwarded_for is None else forwarding.real_client_ip(forwarded_for, client_ip),
                      CRLF,
                      forwarding.proto_line if forwarded_proto is None else
                      b"X-Forwarded-Proto: " + forwarded_proto + CRLF,
                      b"Via: ", via_token if via is None else via + b", " + via_token, CRLF)
        if forwarded is None and forwarded_host is None:
            lines.append(self._host_tail)
        else:
            host = req.host_raw.strip()
            element = forwarding.forwarded_element(client_ip, host)
            lines += (b"Forwarded: ", element if forwarded is None else forwarded + b", " + element, CRLF,
                      b"X-Forwarded-Host: ", host if forwarded_host is None else forwarded_host, CRLF)
        if req.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        if self._parser.should_upgrade():
            if req.has_body:
                # llhttp hands the body over as tunnel bytes while the upstream would read it as
                # a body: two readings of the same bytes, so neither is allowed.
                self._fail(req, 400, "an upgrade request cannot have a body")
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
            self._special = [(kind, value) for kind, value in self._special if kind != HEADER_DUPLICATE_HOST]

    def on_chunk_header(self) -> None:
        # Noted for feed(): a read that brings no body byte after this is the trailer section.
        req = self._req
        req.last_chunk_at = req.body_bytes

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
