"""The admin API of `fcrun serve`: a small HTTP/1.1 JSON API, its client, and a controller
that works on the CMDB alone.

Routes (bodies are msgspec Structs from fcrun.cmdb.models, encoded as JSON)::

    GET    /apps                 -> [App]
    POST   /apps                 NewApp -> 201 App
    GET    /apps/{name}          -> App
    PATCH  /apps/{name}          AppUpdate -> App
    DELETE /apps/{name}          -> 200 {"removed": name} once drained and stopped,
                                    202 {"removing": name} if that takes longer than remove_wait_s
    POST   /apps/{name}/scale    Scale ({"instances": N} or {"cpu": x}) -> Scale
    GET    /instances?app=       -> [Instance]
    GET    /events?app=&since=&limit=  -> [Event], oldest first
    GET    /stats?app=           -> {name: AppStats}
    GET    /metrics              -> Prometheus text format

Errors: an FcrunError becomes its http_status with ``{"error": message, "kind": class name}``;
`AdminClient` raises the same class again from that.

Who may call: the unix socket is created mode 0600 (root-only when serve runs as root) and
each connection's peer credentials are checked again; the optional TCP listener requires
``Authorization: Bearer <token>`` on every request (compared in constant time).

The server only parses and routes; what a route does is the `Controller`'s business.
`DirectController` changes the CMDB and nothing else; serve's instance manager wraps it to
also drain and stop instances.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hmac
import http.client
import logging
import os
import socket
import stat
import struct
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any, Callable, Iterator, Protocol

import httptools
import msgspec

from ..cmdb.base import CMDB, CMDBError
from ..cmdb.models import App, AppDefaults, AppStats, AppUpdate, Event, Instance, NewApp, Scale, new_app, spec_error
from ..docroot import DEFAULT_DOCROOT_ROOTS, check_docroot
from ..errors import AlreadyExists, FcrunError, IncorrectStatus, KernelError, NotFound, NotPermitted, SpecError
from ..units import parse_cpu
from .config import parse_address

log = logging.getLogger("fcrun.admin")

MAX_HEAD_BYTES = 64 << 10
MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 30.0  # for a whole request, counted from the end of the previous one
DEFAULT_REMOVE_WAIT_S = 30.0  # DELETE answers 202 if draining takes longer
CLIENT_TIMEOUT_S = 60.0  # longer than the server's remove wait
DEFAULT_EVENT_LIMIT = 100
MAX_EVENT_LIMIT = 10_000
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"

_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable"}


class ServerUnavailable(FcrunError):
    """No admin server answers at the address (no socket, or nobody listening on it)."""

    exit_code = 1
    http_status = 503


class ErrorBody(msgspec.Struct, omit_defaults=True):
    error: str
    kind: str = "FcrunError"
    where: str | None = None


class Removal(msgspec.Struct, omit_defaults=True):
    removed: str | None = None
    removing: str | None = None


# -- the controller ---------------------------------------------------------------------------


class Controller(Protocol):
    """What the admin API's routes do. Every method may raise FcrunError subclasses."""

    async def list_apps(self) -> list[App]: ...

    async def get_app(self, name: str) -> App: ...

    async def add_app(self, spec: NewApp) -> App: ...

    async def update_app(self, name: str, update: AppUpdate) -> App: ...

    async def remove_app(self, name: str) -> Any:
        """Take the app out of routing, drain and stop its instances, delete it."""
        ...

    async def scale(self, name: str, request: Scale) -> Scale: ...

    async def list_instances(self, app: str | None = None) -> list[Instance]: ...

    async def events(self, app: str | None = None, since_id: int | None = None,
                     limit: int = DEFAULT_EVENT_LIMIT) -> list[Event]: ...

    async def stats(self, app: str | None = None) -> dict[str, AppStats]: ...

    async def metrics_text(self) -> str: ...


class DirectController:
    """The controller on the CMDB alone: used when no instance manager is attached (and by
    `fcrun app` when no server runs). Records an event for every change.

    CMDB calls run in worker threads, so a busy database never stalls the event loop.

    A docroot is accepted only under `docroot_roots` and clear of `fcrun_roots` (the data and
    run roots), reached through no symlink (docroot.py); the runtime checks it again each time
    it mounts it, since the path may change in between.
    """

    def __init__(self, cmdb: CMDB, defaults: AppDefaults | None = None, clock: Callable[[], float] = time.time,
                 *, docroot_roots: Sequence[str] = DEFAULT_DOCROOT_ROOTS, fcrun_roots: Sequence[str] = ()):
        self.cmdb = cmdb
        self.defaults = defaults or AppDefaults()
        self.clock = clock
        self.docroot_roots = tuple(docroot_roots)
        self.fcrun_roots = tuple(fcrun_roots)

    async def list_apps(self) -> list[App]:
        return await asyncio.to_thread(self.cmdb.list_apps)

    async def get_app(self, name: str) -> App:
        return await asyncio.to_thread(self.cmdb.get_app, name)

    async def add_app(self, spec: NewApp) -> App:
        return await asyncio.to_thread(self._add_app, spec)

    def _add_app(self, spec: NewApp) -> App:
        app = new_app(spec, self.defaults, self.clock())
        self._check_docroot(app.docroot)
        app = self.cmdb.add_app(app)
        self.cmdb.add_event(app.name, "app-added", f"added {app.name} (image {app.image})",
                            {"hostnames": app.all_hostnames, "image": app.image})
        return app

    async def update_app(self, name: str, update: AppUpdate) -> App:
        return await asyncio.to_thread(self._update_app, name, update)

    def _update_app(self, name: str, update: AppUpdate) -> App:
        if isinstance(update.docroot, str):
            self._check_docroot(update.docroot)
        app = self.cmdb.update_app(name, update)
        changed = sorted(update.changes())  # names only: env values may be secrets
        message = f"updated {', '.join(changed) or 'nothing'} (generation {app.generation})"
        self.cmdb.add_event(name, "app-updated", message, {"changed": changed, "generation": app.generation})
        return app

    def _check_docroot(self, docroot: str | None) -> None:
        if docroot is not None:
            check_docroot(docroot, self.docroot_roots, self.fcrun_roots, "docroot")

    async def remove_app(self, name: str) -> App:
        return await asyncio.to_thread(self._remove_app, name)

    def _remove_app(self, name: str) -> App:
        app = self.cmdb.remove_app(name)
        # No manager runs instances here, so any rows left are from a server that is gone.
        for instance in self.cmdb.list_instances(name):
            self.cmdb.remove_instance(instance.id)
        self.cmdb.add_event(name, "app-removed", f"removed {name}")
        return app

    async def scale(self, name: str, request: Scale) -> Scale:
        app = await self.get_app(name)
        check_scale(app, request)
        raise IncorrectStatus(f"cannot scale {name!r}: no instance manager is attached (is `fcrun serve` running?)")

    async def list_instances(self, app: str | None = None) -> list[Instance]:
        return await asyncio.to_thread(self.cmdb.list_instances, app)

    async def events(self, app: str | None = None, since_id: int | None = None,
                     limit: int = DEFAULT_EVENT_LIMIT) -> list[Event]:
        return await asyncio.to_thread(self.cmdb.list_events, app, limit, since_id)

    async def stats(self, app: str | None = None) -> dict[str, AppStats]:
        return await asyncio.to_thread(self._stats, app)

    def _stats(self, app: str | None) -> dict[str, AppStats]:
        """What the CMDB knows: instance rows. Metering lives in the manager."""
        names = [self.cmdb.get_app(app).name] if app is not None else [a.name for a in self.cmdb.list_apps()]
        out = {name: AppStats() for name in names}
        for instance in self.cmdb.list_instances(app):
            stats = out.get(instance.app)
            if stats is None or instance.state == "stopped":
                continue
            stats.instances.total += 1
            stats.instances.ready += instance.state == "ready"
            stats.requests += instance.requests
        return out

    async def metrics_text(self) -> str:
        return render_metrics(await self.stats())


def check_scale(app: App, request: Scale) -> None:
    """Raises SpecError unless `request` names exactly one of instances (0..max_instances)
    and cpu (up to the app's cpu_max)."""
    if (request.instances is None) == (request.cpu is None):
        raise SpecError('give exactly one of "instances" and "cpu"', "$")
    if request.instances is not None and not 0 <= request.instances <= app.max_instances:
        raise SpecError(f"instances must be in 0..{app.max_instances} (the app's max_instances), "
                        f"not {request.instances}", "$.instances")
    if request.cpu is not None:
        parse_cpu(request.cpu, "$.cpu")
        if request.cpu > app.cpu_ceiling:
            raise SpecError(f"cpu {request.cpu:g} is above the app's cpu_max {app.cpu_ceiling:g}", "$.cpu")


def render_metrics(stats: dict[str, AppStats]) -> str:
    """Prometheus text exposition (format 0.0.4) of per-app stats."""
    lines: list[str] = []

    def family(metric: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP fcrun_{metric} {help_text}")
        lines.append(f"# TYPE fcrun_{metric} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            lines.append(f"fcrun_{metric}{{{label_text}}} {_sample_value(value)}")

    family("requests_total", "counter", "Requests proxied, by app and status class.",
           [({"app": a, "class": c}, n) for a, s in stats.items() for c, n in sorted(s.status.items())])
    family("request_seconds_total", "counter", "Request processing time (first request byte to last response byte).",
           [({"app": a}, s.request_seconds) for a, s in stats.items()])
    family("cpu_seconds_total", "counter", "Container CPU time (cgroup).",
           [({"app": a}, s.cpu_seconds) for a, s in stats.items()])
    family("instance_seconds_total", "counter", "Time instances existed.",
           [({"app": a}, s.instance_seconds) for a, s in stats.items()])
    family("instances", "gauge", "Instances ready to serve.",
           [({"app": a}, s.instances.ready) for a, s in stats.items()])
    family("instances_frozen", "gauge", "Instances frozen (idle for freeze-after; thawed by the next request).",
           [({"app": a}, s.instances.frozen) for a, s in stats.items()])
    family("memory_bytes", "gauge", "Memory of the app's instances (cgroup), by state.",
           [({"app": a, "state": "frozen"}, s.frozen_memory_bytes) for a, s in stats.items()]
           + [({"app": a, "state": "running"}, s.memory_bytes - s.frozen_memory_bytes) for a, s in stats.items()])
    family("cold_starts_total", "counter", "Requests that found no ready instance, by how one was found: "
           "thaw (frozen), pool (pre-warmed), start (new).",
           [({"app": a, "path": p}, n) for a, s in stats.items() for p, n in sorted(s.cold_paths.items())])
    family("freezes_total", "counter", "Instances frozen after freeze-after idle.",
           [({"app": a}, s.freezes) for a, s in stats.items()])
    return "\n".join(lines) + "\n"


def _sample_value(value: float) -> str:
    # repr keeps every digit of a large counter, where :g would round it to six.
    return str(value) if isinstance(value, int) else repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- HTTP parsing (no I/O) --------------------------------------------------------------------


class HttpError(Exception):
    """A request the server cannot take: answered with `status`, then the connection closes."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Request(msgspec.Struct):
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lowercased
    body: bytes
    keep_alive: bool


class RequestParser:
    """Bytes in, complete `Request`s out (httptools underneath); keeps pipelined requests."""

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES, max_body_bytes: int = MAX_BODY_BYTES):
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self.complete: collections.deque[Request] = collections.deque()
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
        self.complete.append(Request(
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


_encode = msgspec.json.Encoder().encode
_NEW_APP = msgspec.json.Decoder(NewApp)
_APP_UPDATE = msgspec.json.Decoder(AppUpdate)
_SCALE = msgspec.json.Decoder(Scale)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, _encode(value))


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


# -- the server -------------------------------------------------------------------------------


class AdminServer:
    """Serves the admin API on a unix socket and, optionally, on TCP with a bearer token.

    Resource handling: `start()` creates the socket file (replacing a stale one, refusing a
    live one); `close()` stops listening, ends open connections and unlinks the socket.
    A DELETE that outlasts remove_wait_s leaves its removal running as a task the server
    owns; `close()` cancels what is left of those.
    """

    def __init__(self, controller: Controller, socket_path: str, *, tcp_listen: str | None = None,
                 token: str | None = None, remove_wait_s: float = DEFAULT_REMOVE_WAIT_S):
        if tcp_listen is not None and not token:
            raise SpecError("the TCP admin listener needs a bearer token", "admin_token")
        self.controller = controller
        self.socket_path = socket_path
        self.tcp_listen = tcp_listen
        self.remove_wait_s = remove_wait_s
        self._token = token.encode() if token else None
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task] = set()
        self._removals: set[asyncio.Task] = set()
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
        sock = _bind_private_unix_socket(self.socket_path)
        try:
            st = os.stat(self.socket_path)
            self._socket_inode = (st.st_dev, st.st_ino)
            self._servers.append(await asyncio.start_unix_server(
                lambda r, w: self._serve_connection(r, w, tcp=False), sock=sock))
        except BaseException:
            sock.close()
            self._unlink_socket()
            raise
        if self.tcp_listen is not None:
            host, port = parse_address(self.tcp_listen, "admin_listen")
            try:
                self._servers.append(await asyncio.start_server(
                    lambda r, w: self._serve_connection(r, w, tcp=True), host, port))
            except OSError as exc:
                await self.close()
                raise KernelError.from_oserror("listen on", self.tcp_listen, exc) from None

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in [*self._connections, *self._removals]:
            task.cancel()
        await asyncio.gather(*self._connections, *self._removals, return_exceptions=True)
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
        with contextlib.suppress(OSError):
            st = os.stat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._socket_inode:
                os.unlink(self.socket_path)
        self._socket_inode = None

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, tcp: bool) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if not tcp and not _peer_allowed(writer.get_extra_info("socket")):
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
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            # close() cancels open connections. Ending normally here matters: asyncio's stream
            # protocol calls task.exception() on this task, which raises for a cancelled one
            # and gets logged as "Exception in callback".
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _dispatch(self, request: Request, *, tcp: bool) -> Response:
        if tcp and not self._authorized(request):
            response = json_response(ErrorBody(error="missing or wrong bearer token", kind="NotPermitted"), 401)
            response.headers = {"WWW-Authenticate": 'Bearer realm="fcrun"'}
            return response
        try:
            return await self._route(request)
        except FcrunError as exc:
            return error_response(exc)
        except Exception as exc:
            log.exception("admin API %s %s failed", request.method, request.path)
            return json_response(ErrorBody(error=f"internal error: {exc!r}"), 500)

    def _authorized(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or self._token is None:
            return False
        return hmac.compare_digest(given.strip().encode(), self._token)

    async def _route(self, request: Request) -> Response:
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
        task = asyncio.get_running_loop().create_task(self.controller.remove_app(name))
        self._removals.add(task)
        task.add_done_callback(self._removal_done)
        done, _ = await asyncio.wait({task}, timeout=self.remove_wait_s)
        if task not in done:
            return json_response(Removal(removing=name), 202)
        task.result()  # raises NotFound and the like
        return json_response(Removal(removed=name))

    def _removal_done(self, task: asyncio.Task) -> None:
        self._removals.discard(task)
        # A removal answered with 202 has nobody waiting for its outcome but the log.
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), NotFound):
            log.error("removing an app failed: %s", task.exception())


async def _next_request(reader: asyncio.StreamReader, parser: RequestParser) -> Request | None:
    """The next complete request, or None when the client closed the connection."""
    while not parser.complete:
        data = await reader.read(65536)
        if not data:
            return None
        parser.feed(data)
    return parser.complete.popleft()


def _peer_allowed(sock: socket.socket | None) -> bool:
    """Root, or the user serve runs as. The socket's mode says the same; this re-checks it."""
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


def _bind_private_unix_socket(path: str) -> socket.socket:
    """A listening unix socket at `path`, mode 0600 from the moment it appears there.

    It is bound inside a fresh 0700 directory, chmod'ed, then renamed into place, so no
    other user can connect in between (a umask change would race with other threads).

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
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SpecError(f"admin socket path {path} exists and is not a socket", "admin_socket")
        if server_answers(path):
            raise AlreadyExists(f"admin socket {path} is in use: is another fcrun serve running?")
    private = tempfile.mkdtemp(prefix=".admin-", dir=directory)
    staging = os.path.join(private, "sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(staging)
        os.chmod(staging, 0o600)
        sock.listen(64)
        os.rename(staging, path)  # replaces a stale socket atomically
    except OSError as exc:
        sock.close()
        raise KernelError.from_oserror("bind admin socket", path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    sock.setblocking(False)
    return sock


def server_answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket `path`.

    Raises:
        NotPermitted: the socket exists but the caller may not connect (not root).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except PermissionError:
            raise NotPermitted(
                f"connect to admin socket {path}: permission denied (the admin API is root-only)"
            ) from None
        except OSError:
            return False
        return True


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


# -- the client -------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _error_classes() -> dict[str, type[FcrunError]]:
    found: dict[str, type[FcrunError]] = {}
    pending: list[type[FcrunError]] = [FcrunError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.__name__, cls)
        pending.extend(cls.__subclasses__())
    return found


_BY_STATUS: dict[int, type[FcrunError]] = {
    400: SpecError, 401: NotPermitted, 403: NotPermitted, 404: NotFound, 409: AlreadyExists, 503: CMDBError,
}


def remote_error(status: int, body: bytes) -> FcrunError:
    """The FcrunError an error response stands for, of the class the server raised."""
    try:
        parsed = msgspec.json.decode(body, type=ErrorBody)
    except (msgspec.ValidationError, msgspec.DecodeError):
        parsed = ErrorBody(error=f"admin API answered {status}: {body[:200].decode(errors='replace')}", kind="")
    cls = _error_classes().get(parsed.kind) or _BY_STATUS.get(status, FcrunError)
    # The message is already complete; skip constructors that would format it again.
    exc = cls.__new__(cls)
    Exception.__init__(exc, parsed.error)
    if isinstance(exc, SpecError):
        exc.where = parsed.where
    return exc


_APP = msgspec.json.Decoder(App)
_APPS = msgspec.json.Decoder(list[App])
_INSTANCES = msgspec.json.Decoder(list[Instance])
_EVENTS = msgspec.json.Decoder(list[Event])
_STATS = msgspec.json.Decoder(dict[str, AppStats])
_REMOVAL = msgspec.json.Decoder(Removal)
_SCALE_RESULT = msgspec.json.Decoder(Scale)


class AdminClient:
    """Blocking client of the admin API, one connection per call.

    `address` is a unix socket path, or ``http://HOST:PORT`` for the TCP listener (which
    needs `token`). Methods raise the FcrunError subclass the server raised, and
    ServerUnavailable when nothing listens (before anything was sent, so retrying elsewhere
    is safe).
    """

    def __init__(self, address: str, token: str | None = None, timeout_s: float = CLIENT_TIMEOUT_S):
        self.address = address
        self.token = token
        self.timeout_s = timeout_s

    # routes
    def list_apps(self) -> list[App]:
        return _APPS.decode(self._call("GET", "/apps"))

    def get_app(self, name: str) -> App:
        return _APP.decode(self._call("GET", f"/apps/{_quote(name)}"))

    def add_app(self, spec: NewApp) -> App:
        return _APP.decode(self._call("POST", "/apps", spec))

    def update_app(self, name: str, update: AppUpdate) -> App:
        return _APP.decode(self._call("PATCH", f"/apps/{_quote(name)}", update))

    def remove_app(self, name: str) -> bool:
        """True once removed; False when the server is still draining it (202)."""
        return _REMOVAL.decode(self._call("DELETE", f"/apps/{_quote(name)}")).removed is not None

    def scale(self, name: str, request: Scale) -> Scale:
        return _SCALE_RESULT.decode(self._call("POST", f"/apps/{_quote(name)}/scale", request))

    def list_instances(self, app: str | None = None) -> list[Instance]:
        return _INSTANCES.decode(self._call("GET", "/instances", query={"app": app}))

    def events(self, app: str | None = None, since_id: int | None = None,
               limit: int = DEFAULT_EVENT_LIMIT) -> list[Event]:
        return _EVENTS.decode(self._call("GET", "/events", query={"app": app, "since": since_id, "limit": limit}))

    def stats(self, app: str | None = None) -> dict[str, AppStats]:
        return _STATS.decode(self._call("GET", "/stats", query={"app": app}))

    def metrics_text(self) -> str:
        return self._call("GET", "/metrics").decode()

    def close(self) -> None:
        pass  # one connection per call: nothing held

    # transport
    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One raw request; returns (status, body). Raises ServerUnavailable, NotPermitted, KernelError."""
        conn = self._connection()
        try:
            try:
                conn.connect()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ServerUnavailable(f"no fcrun serve answers at {self.address}: {exc.strerror}") from None
            except PermissionError:
                raise NotPermitted(
                    f"connect to admin API {self.address}: permission denied (it is root-only)"
                ) from None
            except OSError as exc:
                raise KernelError.from_oserror("connect to admin API", self.address, exc) from None
            all_headers = {"Content-Type": JSON_CONTENT_TYPE, **(headers or {})}
            if self.token:
                all_headers["Authorization"] = f"Bearer {self.token}"
            try:
                conn.request(method, path, body=body, headers=all_headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise KernelError(f"{method} {path} on admin API", self.address,
                                  getattr(exc, "errno", None) or errno.EIO) from None
        finally:
            conn.close()

    def _call(self, method: str, path: str, body: msgspec.Struct | None = None,
              query: dict[str, Any] | None = None) -> bytes:
        if query:
            items = {k: v for k, v in query.items() if v is not None}
            if items:
                path += "?" + urllib.parse.urlencode(items)
        status, data = self.request(method, path, None if body is None else _encode(body))
        if not 200 <= status < 300:
            raise remote_error(status, data)
        return data

    def _connection(self) -> http.client.HTTPConnection:
        if self.address.startswith(("http://", "https://")):
            url = urllib.parse.urlsplit(self.address)
            cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
            return cls(url.hostname or "localhost", url.port, timeout=self.timeout_s)
        return _UnixHTTPConnection(self.address, self.timeout_s)


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


class LocalAdmin:
    """AdminClient's methods on a DirectController: what `fcrun app` uses when no server runs.

    Resource handling: owns the CMDB it is given; `close()` closes it.
    """

    def __init__(self, cmdb: CMDB, defaults: AppDefaults | None = None, *,
                 docroot_roots: Sequence[str] = DEFAULT_DOCROOT_ROOTS, fcrun_roots: Sequence[str] = ()):
        self.cmdb = cmdb
        self.controller = DirectController(cmdb, defaults, docroot_roots=docroot_roots, fcrun_roots=fcrun_roots)

    def list_apps(self) -> list[App]:
        return asyncio.run(self.controller.list_apps())

    def get_app(self, name: str) -> App:
        return asyncio.run(self.controller.get_app(name))

    def add_app(self, spec: NewApp) -> App:
        return asyncio.run(self.controller.add_app(spec))

    def update_app(self, name: str, update: AppUpdate) -> App:
        return asyncio.run(self.controller.update_app(name, update))

    def remove_app(self, name: str) -> bool:
        asyncio.run(self.controller.remove_app(name))
        return True

    def scale(self, name: str, request: Scale) -> Scale:
        return asyncio.run(self.controller.scale(name, request))

    def list_instances(self, app: str | None = None) -> list[Instance]:
        return asyncio.run(self.controller.list_instances(app))

    def events(self, app: str | None = None, since_id: int | None = None,
               limit: int = DEFAULT_EVENT_LIMIT) -> list[Event]:
        return asyncio.run(self.controller.events(app, since_id, limit))

    def stats(self, app: str | None = None) -> dict[str, AppStats]:
        return asyncio.run(self.controller.stats(app))

    def metrics_text(self) -> str:
        return asyncio.run(self.controller.metrics_text())

    def close(self) -> None:
        self.cmdb.close()
