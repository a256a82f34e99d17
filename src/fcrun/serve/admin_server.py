"""The admin API's server: HTTP/1.1 JSON on a private unix socket, optionally on TCP with a
bearer token (routes and wire format: admin_protocol.py).

The server only parses and routes; what a route does is the `Controller`'s business
(controller.py). Parsing is sans-IO (`RequestParser`: bytes in, `AdminRequest`s out); the
`AdminServer` owns the sockets and the connections.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import os
import socket
import threading
import urllib.parse
from typing import Any, Iterator

import httptools
import msgspec

from ..cmdb.models import AppUpdate, NewApp, Scale, spec_error
from ..errors import AlreadyExists, FcrunError, KernelError, NotFound, NotPermitted, SpecError
from ..unixsock import bind_private, peer_credentials
from .admin_client import server_answers
from .admin_protocol import (
    DEFAULT_EVENT_LIMIT,
    DEFAULT_REMOVE_WAIT_S,
    JSON_CONTENT_TYPE,
    MAX_EVENT_LIMIT,
    ErrorBody,
    Removal,
    encode,
)
from .config import parse_address
from .controller import Controller
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..tasks import TaskOwner

log = logging.getLogger("fcrun.admin")

MAX_HEAD_BYTES = 64 << 10
MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 30.0  # for a whole request, counted from the end of the previous one

_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable"}


# -- HTTP parsing (no I/O) --------------------------------------------------------------------


class HttpError(Exception):
    """A request the server cannot take: answered with `status`, then the connection closes."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class AdminRequest(msgspec.Struct):
    """One parsed admin API request (proxy.request.Request is a proxied one)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lowercased
    body: bytes
    keep_alive: bool


class RequestParser:
    """Bytes in, complete `AdminRequest`s out (httptools underneath); keeps pipelined requests."""

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES, max_body_bytes: int = MAX_BODY_BYTES):
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self.complete: collections.deque[AdminRequest] = collections.deque()
        self._parser = httptools.HttpRequestParser(self)
        self._reset()

    def feed(self, data: bytes) -> None:
        """Raises HttpError: malformed (400), head too large (431), body too large (413)."""
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

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > self.max_body_bytes:
            raise HttpError(413, f"request body is larger than {self.max_body_bytes} bytes")

    def on_message_complete(self) -> None:
        url = urllib.parse.urlsplit(self._url.decode("latin-1"))
        self.complete.append(AdminRequest(
            method=self._parser.get_method().decode("ascii"),
            path=urllib.parse.unquote(url.path),
            query=urllib.parse.parse_qs(url.query),
            headers=self._headers,
            body=bytes(self._body),
            keep_alive=self._parser.should_keep_alive(),
        ))


class Response(msgspec.Struct):
    status: int
    body: bytes = b""
    content_type: str = JSON_CONTENT_TYPE
    headers: dict[str, str] = {}

    def encode(self, keep_alive: bool) -> bytes:
        head = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Unknown')}",
                f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}"]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        if not keep_alive:
            head.append("Connection: close")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


_NEW_APP = msgspec.json.Decoder(NewApp)
_APP_UPDATE = msgspec.json.Decoder(AppUpdate)
_SCALE = msgspec.json.Decoder(Scale)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, encode(value))


def error_response(exc: FcrunError) -> Response:
    where = exc.where if isinstance(exc, SpecError) else None
    return json_response(ErrorBody(error=str(exc), kind=type(exc).__name__, where=where), exc.http_status)


def _decode_body(decoder: msgspec.json.Decoder, body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise spec_error(exc, "request body") from None


def _query_one(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


def _query_int(query: dict[str, list[str]], key: str, minimum: int, maximum: int | None = None) -> int | None:
    text = _query_one(query, key)
    if text is None:
        return None
    if not text.isdigit() or int(text) < minimum or (maximum is not None and int(text) > maximum):
        span = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise SpecError(f"query parameter {key}={text!r} must be an integer {span}", key)
    return int(text)


def peer_allowed(sock: socket.socket | None) -> bool:
    """Root, or the user serve runs as. The socket's mode says the same; this re-checks it."""
    if sock is None:
        return False
    return peer_credentials(sock).uid in (0, os.geteuid())


# -- the server -------------------------------------------------------------------------------


class AdminServer:
    """Serves the admin API on a unix socket and, optionally, on TCP with a bearer token.

    Args:
        tasks: the owner of its connections and of removals that outlast their DELETE
            (serve's scope for the admin API); by default an owner of its own.

    Resource handling: `start()` creates the socket file (replacing a stale one, refusing a
    live one); `close()` stops listening, ends open connections, cancels what is left of
    removals answered with 202, and unlinks the socket.
    """

    def __init__(self, controller: Controller, socket_path: str, *, tcp_listen: str | None = None,
                 token: str | None = None, remove_wait_s: float = DEFAULT_REMOVE_WAIT_S,
                 tasks: TaskOwner | None = None):
        if tcp_listen is not None and not token:
            raise SpecError("the TCP admin listener needs a bearer token", "admin_token")
        self.controller = controller
        self.socket_path = socket_path
        self.tcp_listen = tcp_listen
        self.remove_wait_s = remove_wait_s
        self.tasks = tasks if tasks is not None else TaskOwner("admin")
        self._token = token.encode() if token else None
        self._servers: list[asyncio.Server] = []
        self._socket_inode: tuple[int, int] | None = None

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """Where the TCP listener is bound (its real port when 0 was asked for)."""
        for server in self._servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return sock.getsockname()[:2]
        return None

    async def start(self) -> None:
        """Raises: AlreadyExists (a live server holds the socket), KernelError, SpecError."""
        sock = _bind_admin_socket(self.socket_path)
        try:
            st = os.stat(self.socket_path)
            self._socket_inode = (st.st_dev, st.st_ino)
            self._servers.append(await asyncio.start_unix_server(self._unix_connection, sock=sock))
        except BaseException:
            sock.close()
            self._unlink_socket()
            raise
        if self.tcp_listen is not None:
            host, port = parse_address(self.tcp_listen, "admin_listen")
            try:
                self._servers.append(await asyncio.start_server(self._tcp_connection, host, port))
            except OSError as exc:
                await self.close()
                raise KernelError.from_oserror("listen on", self.tcp_listen, exc) from None

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        await self.tasks.aclose()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._unlink_socket()

    async def __aenter__(self) -> "AdminServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _unlink_socket(self) -> None:
        # Only our own socket: a newer server may have taken the path over.
        try:
            st = os.stat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._socket_inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the admin socket %s: %s", self.socket_path, exc)
        self._socket_inode = None

    # Plain callbacks, not coroutines: asyncio would start an unowned task for a coroutine.
    def _unix_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._adopt(reader, writer, tcp=False)

    def _tcp_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._adopt(reader, writer, tcp=True)

    def _adopt(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, tcp: bool) -> None:
        if self.tasks.closed:  # accepted while closing: nobody would serve it
            writer.close()
            return
        self.tasks.spawn(self._serve_connection(reader, writer, tcp=tcp), name="admin connection")

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, tcp: bool) -> None:
        try:
            if not tcp and not peer_allowed(writer.get_extra_info("socket")):
                writer.write(error_response(NotPermitted("the admin API is for root only")).encode(False))
                return
            parser = RequestParser()
            while True:
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        request = await _next_request(reader, parser)
                except TimeoutError:
                    return
                except HttpError as exc:
                    writer.write(json_response(ErrorBody(error=str(exc), kind="SpecError"), exc.status).encode(False))
                    return
                if request is None:
                    return
                response = await self._dispatch(request, tcp=tcp)
                writer.write(response.encode(request.keep_alive))
                await writer.drain()
                if not request.keep_alive:
                    return
        except ConnectionError as exc:
            log.debug("admin connection ended by the client: %s", exc)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError as exc:  # the client reset it: closed either way
                log.debug("admin connection closed with %s", exc)

    async def _dispatch(self, request: AdminRequest, *, tcp: bool) -> Response:
        if tcp and not self._authorized(request):
            response = json_response(ErrorBody(error="missing or wrong bearer token", kind="NotPermitted"), 401)
            response.headers = {"WWW-Authenticate": 'Bearer realm="fcrun"'}
            return response
        try:
            return await self._route(request)
        except FcrunError as exc:
            return error_response(exc)
        except Exception as exc:  # noqa: BLE001 - a bug in a route: logged, answered 500, serve goes on
            log.exception("admin API %s %s failed", request.method, request.path)
            return json_response(ErrorBody(error=f"internal error: {exc!r}"), 500)

    def _authorized(self, request: AdminRequest) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or self._token is None:
            return False
        return hmac.compare_digest(given.strip().encode(), self._token)

    async def _route(self, request: AdminRequest) -> Response:
        c = self.controller
        query = request.query
        parts = [p for p in request.path.split("/") if p]
        match (request.method, parts):
            case ("GET", ["apps"]):
                return json_response(await c.list_apps())
            case ("POST", ["apps"]):
                return json_response(await c.add_app(_decode_body(_NEW_APP, request.body)), 201)
            case ("GET", ["apps", name]):
                return json_response(await c.get_app(name))
            case ("PATCH", ["apps", name]):
                return json_response(await c.update_app(name, _decode_body(_APP_UPDATE, request.body)))
            case ("DELETE", ["apps", name]):
                return await self._remove(name)
            case ("POST", ["apps", name, "scale"]):
                return json_response(await c.scale(name, _decode_body(_SCALE, request.body)))
            case ("GET", ["instances"]):
                return json_response(await c.list_instances(_query_one(query, "app")))
            case ("GET", ["events"]):
                limit = _query_int(query, "limit", 1, MAX_EVENT_LIMIT) or DEFAULT_EVENT_LIMIT
                return json_response(await c.events(_query_one(query, "app"), _query_int(query, "since", 0), limit))
            case ("GET", ["stats"]):
                return json_response(await c.stats(_query_one(query, "app")))
            case ("GET", ["metrics"]):
                return Response(200, (await c.metrics_text()).encode(), METRICS_CONTENT_TYPE)
            case (_, ["apps"] | ["apps", _] | ["apps", _, "scale"] | ["instances"] | ["events"] | ["stats"]
                  | ["metrics"]):
                return json_response(ErrorBody(error=f"method {request.method} is not allowed on {request.path}",
                                               kind="SpecError"), 405)
            case _:
                raise NotFound(f"no such admin API path: {request.path}")

    async def _remove(self, name: str) -> Response:
        # A removal answered with 202 goes on without its client; its owner logs how it ends
        # (NotFound is the client's answer, not worth a log line).
        task = self.tasks.spawn(self.controller.remove_app(name), name=f"remove app {name}", expected=(NotFound,))
        done, _ = await asyncio.wait({task}, timeout=self.remove_wait_s)
        if task not in done:
            return json_response(Removal(removing=name), 202)
        task.result()  # raises NotFound and the like
        return json_response(Removal(removed=name))


async def _next_request(reader: asyncio.StreamReader, parser: RequestParser) -> AdminRequest | None:
    """The next complete request, or None when the client closed the connection."""
    while not parser.complete:
        data = await reader.read(65536)
        if not data:
            return None
        parser.feed(data)
    return parser.complete.popleft()


def _bind_admin_socket(path: str) -> socket.socket:
    """The admin socket, listening and non-blocking (unixsock.bind_private: 0600 from the start).

    Raises:
        AlreadyExists: a server answers on `path` already.
        SpecError: `path` exists and is not a socket.
        KernelError: binding, renaming or creating the directory failed.
    """
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise KernelError.from_oserror("create directory", directory, exc) from None
    if os.path.lexists(path) and server_answers(path):
        raise AlreadyExists(f"admin socket {path} is in use: is another fcrun serve running?")
    sock = bind_private(path, what="admin socket", where="admin_socket")
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def serve_in_thread(controller: Controller, socket_path: str, **kwargs: Any) -> Iterator[AdminServer]:
    """Run an AdminServer on its own event loop in a thread (for tests and tools).

    Resource handling: on exit the server is closed, the loop stopped and the thread joined.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fcrun-admin", daemon=True)
    thread.start()
    server = AdminServer(controller, socket_path, **kwargs)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result()
        try:
            yield server
        finally:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result()
    finally:
        asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
