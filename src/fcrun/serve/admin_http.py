"""The admin API's HTTP/1.1, sans-IO: bytes in, `AdminRequest`s out (`RequestParser`, httptools
underneath), `Response`s to bytes. The server (admin_server.py) owns the sockets and timers.

The parser hands each request's head to a check (the listener's token and routes) as soon as
it is complete, before a byte of its body is taken, and says which part of a request it is in
(`phase`) so that the server can put a deadline on each.
"""

from __future__ import annotations

import collections
import http
import urllib.parse
from typing import Callable

import httptools
import msgspec

from ..units import is_decimal
from .admin_protocol import JSON_CONTENT_TYPE, MAX_BODY_BYTES, MAX_HEAD_BYTES

class HttpError(Exception):
    """A request the server cannot take: answered with `status`, then the connection closes."""

    def __init__(self, status: int, message: str, kind: str = "SpecError", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = headers or {}


class AdminRequest(msgspec.Struct):
    """One parsed admin API request (proxy.request.Request is a proxied one)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lowercased
    body: bytes
    keep_alive: bool


# Where the parser is in the current request: what the driver's deadline is for.
IDLE, HEAD, BODY = "idle", "head", "body"


class RequestParser:
    """Bytes in, complete `AdminRequest`s out (httptools underneath); keeps pipelined requests.

    Args:
        check_head: called with the request (its body still empty) as soon as its head is
            complete, before a byte of its body is taken; raises HttpError to refuse it (a
            listener's token or routes). The parser stops there: nothing after it is parsed.
    """

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES, max_body_bytes: int = MAX_BODY_BYTES,
                 check_head: Callable[[AdminRequest], None] | None = None):
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self.check_head = check_head
        self.complete: collections.deque[AdminRequest] = collections.deque()
        self.phase = IDLE
        self._parser = httptools.HttpRequestParser(self)
        self._current: AdminRequest | None = None
        self._reset()

    def feed(self, data: bytes) -> None:
        """Raises HttpError: malformed (400), head too large (431), body too large (413), or
        whatever `check_head` raised."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HttpError):
                raise exc.__context__ from None
            raise HttpError(400, f"malformed request: {exc}") from None
        except httptools.HttpParserUpgrade:
            raise HttpError(400, "the admin API does not upgrade connections") from None
        except httptools.HttpParserError as exc:
            raise HttpError(400, f"malformed request: {exc}") from None

    def _reset(self) -> None:
        self._url = bytearray()
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._head_bytes = 0

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_head_bytes:
            raise HttpError(431, f"request head is larger than {self.max_head_bytes} bytes")

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()
        self.phase = HEAD

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        url = urllib.parse.urlsplit(self._url.decode("latin-1"))
        request = AdminRequest(
            method=self._parser.get_method().decode("ascii"),
            path=urllib.parse.unquote(url.path),
            query=urllib.parse.parse_qs(url.query),
            headers=self._headers,
            body=b"",
            keep_alive=self._parser.should_keep_alive(),
        )
        if self.check_head is not None:
            self.check_head(request)
        length = self._headers.get("content-length", "0")
        if is_decimal(length) and int(length) > self.max_body_bytes:  # refused before it is sent
            raise HttpError(413, f"request body is larger than {self.max_body_bytes} bytes")
        self._current = request
        self.phase = BODY

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > self.max_body_bytes:
            raise HttpError(413, f"request body is larger than {self.max_body_bytes} bytes")

    def on_message_complete(self) -> None:
        request, self._current = self._current, None
        request.body = bytes(self._body)
        self.complete.append(request)
        self.phase = IDLE


class Response(msgspec.Struct):
    status: int
    body: bytes = b""
    content_type: str = JSON_CONTENT_TYPE
    headers: dict[str, str] = {}

    def encode(self, keep_alive: bool) -> bytes:
        head = [f"HTTP/1.1 {self.status} {http.HTTPStatus(self.status).phrase}",
                f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}"]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        if not keep_alive:
            head.append("Connection: close")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body
