"""The admin API's server: HTTP/1.1 JSON on a private unix socket, optionally on TCP with a
bearer token (and TLS), and a read-only metrics listener (routes and wire format:
admin_protocol.py).

The server only routes; what a route does is the `Controller`'s business (controller.py).
Parsing is sans-IO (admin_http.py: bytes in, `AdminRequest`s out, the head checked by the
listener's rules before the body is taken); the `AdminServer` owns the sockets, the
connections and their deadlines.

Against hostile clients (bounds: `AdminLimits`, serve's ``admin_*`` settings): a listener
takes at most `max_connections` and closes one more at accept, so flooding one never locks
root out of the unix socket; the token is checked on the complete head, and a wrong one gets
401 and a closed connection without its body ever being waited for; a head, a body, an idle
keep-alive and a TLS handshake each have a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hmac
import logging
import os
import socket
import ssl
import threading
from typing import Any, Callable, Iterator

import msgspec

from ..cmdb.models import AppUpdate, NewApp, Scale, spec_error
from ..constraints import MAX_INT64
from ..errors import AlreadyExists, FcrunError, KernelError, NotFound, NotPermitted, SpecError
from ..unixsock import bind_private, peer_credentials
from .admin_client import server_answers
from .admin_http import BODY, HEAD, IDLE, AdminRequest, HttpError, RequestParser, Response
from .admin_protocol import (
    DEFAULT_EVENT_LIMIT,
    DEFAULT_REMOVE_WAIT_S,
    MAX_EVENT_LIMIT,
    METRICS_PATH,
    AdminLimits,
    ErrorBody,
    Removal,
    encode,
    is_loopback,
    server_tls_context,
)
from .config import ServeConfig, parse_address
from .controller import Controller
from .dashboard_page import DASHBOARD_PATH, DATA_PATH, DEFAULT_ROWS, MAX_ROWS, Dashboard, basic_password, sort_key
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..tasks import TaskOwner
from ..units import is_decimal

log = logging.getLogger("fcrun.admin")

READ_CHUNK_BYTES = 64 << 10
LISTEN_BACKLOG = 128
# accept() failing with these means the host is short of fds or memory: log, wait, retry.
OVERLOAD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_S = 0.1
DASHBOARD_PATHS = (DASHBOARD_PATH, DATA_PATH)
READ_ONLY_PATHS = (METRICS_PATH, *DASHBOARD_PATHS)  # what the metrics listener serves


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


def _query_int(query: dict[str, list[str]], key: str, minimum: int, maximum: int = MAX_INT64) -> int | None:
    """The integer in query parameter `key`, or None when it is absent.

    Raises:
        SpecError: not plain ASCII digits (str.isdigit also takes "²" and other digits int()
            refuses) or outside minimum..maximum (at most what a database integer holds).
    """
    text = _query_one(query, key)
    if text is None:
        return None
    # The length first: int() of thousands of digits is refused by Python (and slow).
    if not is_decimal(text, len(str(maximum))) or not minimum <= int(text) <= maximum:
        span = f">= {minimum}" if maximum == MAX_INT64 else f"in {minimum}..{maximum}"
        raise SpecError(f"query parameter {key}={text!r} must be an integer {span}", key)
    return int(text)


def peer_allowed(sock: socket.socket | None) -> bool:
    """Root, or the user serve runs as. The socket's mode says the same; this re-checks it."""
    if sock is None:
        return False
    return peer_credentials(sock).uid in (0, os.geteuid())


# -- the server -------------------------------------------------------------------------------


class Listener:
    """One socket of the admin API, who may use it and what for.

    `kind`: "unix" (peer credentials: root or serve's user; every route), "tcp" (the admin
    token on every request; every route) or "metrics" (the metrics token when one is set;
    GET /metrics and the read-only dashboard only).
    """

    def __init__(self, kind: str, address: str, *, token: str | None = None, tls: ssl.SSLContext | None = None):
        self.kind = kind
        self.address = address
        self.token = token.encode() if token else None
        self.tls = tls
        self.open_connections = 0  # from accept (before a TLS handshake) to close
        self.refused_connections = 0  # over max_connections, since start
        self.sock: socket.socket | None = None  # listening (TCP listeners)
        self.unix_server: asyncio.Server | None = None

    @property
    def bound_address(self) -> tuple[str, int] | None:
        """(host, port) of a TCP listener once listening (its real port when 0 was asked for)."""
        return self.sock.getsockname()[:2] if self.sock is not None else None

    def connection_ended(self, _task: asyncio.Task | None = None) -> None:
        self.open_connections -= 1

    def authorized(self, headers: dict[str, str], *, basic: bool = False) -> bool:
        """Whether the request carries this listener's bearer token (constant-time compare).
        With `basic` (the dashboard's GETs: a browser cannot add a bearer token to a page it
        opens), the token is also taken as the password of HTTP Basic authorization, any user."""
        if self.token is None:
            return self.kind != "tcp"  # the admin TCP listener never runs without one
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if basic and scheme.lower() == "basic":
            return hmac.compare_digest(basic_password(given), self.token)
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token)

    def check_head(self, request: AdminRequest) -> None:
        """Refuse a request on its head: a missing or wrong token (401); on the metrics
        listener, anything but GET /metrics (404, 405).

        Raises:
            HttpError: the request is refused.
        """
        if self.kind == "unix":
            return  # peer credentials were checked when the connection came
        dashboard = request.method == "GET" and request.path in DASHBOARD_PATHS
        if not self.authorized(request.headers, basic=dashboard):
            # A browser asks its user for a Basic password (the token) on the dashboard's page.
            challenge = 'Basic realm="fcrun dashboard"' if dashboard else 'Bearer realm="fcrun"'
            raise HttpError(401, "missing or wrong bearer token", "NotPermitted", {"WWW-Authenticate": challenge})
        if self.kind == "metrics" and request.path not in READ_ONLY_PATHS:
            raise HttpError(404, f"the metrics listener serves {', '.join(READ_ONLY_PATHS)} only", "NotFound")
        if self.kind == "metrics" and request.method != "GET":
            raise HttpError(405, f"method {request.method} is not allowed on {request.path}")

    def full(self, limit: int) -> bool:
        """Whether a new connection must be refused; counts and logs the refusal if so."""
        if self.open_connections < limit:
            return False
        if self.refused_connections % 1000 == 0:  # the first of a flood, then one line a thousand
            log.warning("admin %s listener %s: %d connections open, the most allowed; refusing more (%d refused "
                        "so far)", self.kind, self.address, self.open_connections, self.refused_connections + 1)
        self.refused_connections += 1
        return True


class AdminServer:
    """Serves the admin API on a unix socket and, optionally, on TCP with a bearer token, and
    /metrics on a listener of its own.

    Args:
        tcp_listen, token, tls: the TCP admin listener, its bearer token (required) and its TLS
            context (admin_protocol.server_tls_context; None: plain HTTP).
        metrics_listen, metrics_token, metrics_tls: the read-only metrics listener, its
            optional token (not the admin token) and TLS context.
        limits: bounds on every connection (`AdminLimits`).
        dashboard: the read-only dashboard (GET /dashboard and its data), on every listener;
            None: 404 there (an admin API without serve's manager).
        tasks: the owner of its accept loops, connections and removals that outlast their
            DELETE (serve's scope for the admin API); by default an owner of its own.

    Resource handling: `start()` creates the socket file (replacing a stale one, refusing a
    live one) and binds the TCP listeners; `close()` stops listening, ends open connections,
    cancels what is left of removals answered with 202, and unlinks the socket.
    """

    def __init__(self, controller: Controller, socket_path: str, *, tcp_listen: str | None = None,
                 token: str | None = None, tls: ssl.SSLContext | None = None, metrics_listen: str | None = None,
                 metrics_token: str | None = None, metrics_tls: ssl.SSLContext | None = None,
                 limits: AdminLimits = AdminLimits(), remove_wait_s: float = DEFAULT_REMOVE_WAIT_S,
                 dashboard: Dashboard | None = None, tasks: TaskOwner | None = None):
        if tcp_listen is not None and not token:
            raise SpecError("the TCP admin listener needs a bearer token", "admin_token")
        if token and metrics_token and hmac.compare_digest(token.encode(), metrics_token.encode()):
            raise SpecError("metrics_token must differ from admin_token (a scrape credential is not an admin one)",
                            "metrics_token")
        self.controller = controller
        self.socket_path = socket_path
        self.limits = limits
        self.remove_wait_s = remove_wait_s
        self.dashboard = dashboard
        self.tasks = tasks if tasks is not None else TaskOwner("admin")
        self.listeners = [Listener("unix", socket_path)]
        if tcp_listen is not None:
            self.listeners.append(Listener("tcp", tcp_listen, token=token, tls=tls))
        if metrics_listen is not None:
            self.listeners.append(Listener("metrics", metrics_listen, token=metrics_token, tls=metrics_tls))
        self._socket_inode: tuple[int, int] | None = None

    def listener(self, kind: str) -> Listener | None:
        """The listener of `kind` ("unix", "tcp", "metrics"), if serve has one."""
        return next((lst for lst in self.listeners if lst.kind == kind), None)

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """Where the TCP admin listener is bound (its real port when 0 was asked for)."""
        tcp = self.listener("tcp")
        return tcp.bound_address if tcp else None

    async def start(self) -> None:
        """Raises: AlreadyExists (a live server holds the socket), KernelError, SpecError."""
        unix = self.listeners[0]
        _refuse_if_served(self.socket_path)  # before any port is bound: that error says more
        # The TCP listeners first, the admin socket last: once it appears (what `fcrun app`,
        # scripts and tests wait for) every listener of the admin side accepts.
        try:
            for listener in self.listeners[1:]:
                listener.sock = _bind_tcp(listener)
            sock = _bind_admin_socket(self.socket_path)
        except BaseException:
            for listener in self.listeners[1:]:
                if listener.sock is not None:
                    listener.sock.close()
                    listener.sock = None
            raise
        try:
            st = os.stat(self.socket_path)
            self._socket_inode = (st.st_dev, st.st_ino)
            unix.unix_server = await asyncio.start_unix_server(self._unix_accepted, sock=sock)
        except BaseException:
            sock.close()
            self._unlink_socket()
            await self.close()
            raise
        for listener in self.listeners[1:]:
            self.tasks.spawn_service(self._accept_forever(listener), name=f"admin {listener.kind} accept loop")

    async def close(self) -> None:
        unix_server = self.listeners[0].unix_server
        if unix_server is not None:
            unix_server.close()
        await self.tasks.aclose()  # the accept loops first, then every connection
        if unix_server is not None:
            await unix_server.wait_closed()
        for listener in self.listeners:
            if listener.sock is not None:
                listener.sock.close()
            listener.sock = listener.unix_server = None
        self._unlink_socket()

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

    def _unix_accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: asyncio would start an unowned task for a coroutine.
        unix = self.listeners[0]
        if self.tasks.closed or unix.full(self.limits.max_connections):
            if not self.tasks.closed:
                writer.write(_too_many().encode(False))
            writer.close()
            return
        unix.open_connections += 1
        task = self.tasks.spawn(self._serve_connection(unix, reader, writer), name="admin unix connection")
        task.add_done_callback(unix.connection_ended)

    async def _accept_forever(self, listener: Listener) -> None:
        """Accept on a TCP listener, count, refuse over the limit. Own loop rather than
        asyncio.start_server: a connection is counted before its TLS handshake, and one over
        the limit is closed without one."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener.sock)
            except OSError as exc:
                if exc.errno not in OVERLOAD_ERRNOS:
                    raise
                log.warning("admin %s listener %s: accept: %s; retrying in %s s", listener.kind, listener.address,
                            exc, ACCEPT_BACKOFF_S)
                await asyncio.sleep(ACCEPT_BACKOFF_S)
                continue
            if listener.full(self.limits.max_connections):
                _refuse(conn, plain=listener.tls is None)
                continue
            listener.open_connections += 1
            started: list[bool] = []  # `conn` is the coroutine's once it runs; until then, ours
            task = self.tasks.spawn(self._serve_tcp(listener, conn, started), name=f"admin {listener.kind} connection")
            task.add_done_callback(listener.connection_ended)
            task.add_done_callback(functools.partial(_close_unless_started, conn, started))

    async def _serve_tcp(self, listener: Listener, conn: socket.socket, started: list[bool]) -> None:
        """Streams (and TLS, within header_timeout_s) on an accepted socket, then serve it.

        Resource handling: `conn` belongs to the transport once connect_accepted_socket has it,
        which closes it whether or not the handshake succeeds."""
        started.append(True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        timeout_s = self.limits.header_timeout_s
        try:
            peer = conn.getpeername()
        except OSError:  # reset before we got here
            peer = None
        try:
            async with asyncio.timeout(timeout_s):
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, conn, ssl=listener.tls,
                    ssl_handshake_timeout=timeout_s if listener.tls is not None else None)
        except TimeoutError:
            log.debug("admin %s listener: no TLS handshake within %s s from %s", listener.kind, timeout_s, peer)
            return
        except OSError as exc:  # ssl.SSLError among them: a plain-HTTP client, an untrusting one
            log.info("admin %s listener: TLS handshake with %s failed: %s", listener.kind, peer, exc)
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self._serve_connection(listener, reader, writer)

    async def _serve_connection(self, listener: Listener, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        try:
            if listener.kind == "unix" and not peer_allowed(writer.get_extra_info("socket")):
                writer.write(error_response(NotPermitted("the admin API is for root only")).encode(False))
                return
            limits = self.limits
            parser = RequestParser(limits.max_head_bytes, limits.max_body_bytes, check_head=listener.check_head)
            while True:
                try:
                    request = await self._next_request(reader, parser)
                except HttpError as exc:
                    # Refused on its head or cut short: answered, and the connection closes
                    # without reading what else the client sends.
                    writer.write(_error(exc.status, str(exc), exc.kind, exc.headers).encode(False))
                    return
                if request is None:
                    return
                response = await self._dispatch(request)
                writer.write(response.encode(request.keep_alive))
                await writer.drain()
                if not request.keep_alive:
                    return
        except ConnectionError as exc:
            log.debug("admin connection ended by the client: %s", exc)
        finally:
            await self._close(writer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        if asyncio.current_task().cancelling():  # serve is closing: no goodbye to wait for
            writer.transport.abort()
            return
        writer.close()
        try:  # bounded: a TLS client may never answer our close_notify
            async with asyncio.timeout(self.limits.header_timeout_s):
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()
        except OSError as exc:  # the client reset it: closed either way
            log.debug("admin connection closed with %s", exc)

    async def _next_request(self, reader: asyncio.StreamReader, parser: RequestParser) -> AdminRequest | None:
        """The next complete request, or None when the client closed the connection or sent
        nothing for keepalive_timeout_s.

        Raises:
            HttpError: the parser refused it, or its head or body took too long (408).
        """
        loop = asyncio.get_running_loop()
        limits = self.limits
        timeouts = {IDLE: limits.keepalive_timeout_s, HEAD: limits.header_timeout_s, BODY: limits.body_timeout_s}
        phase, deadline = None, 0.0
        while not parser.complete:
            if parser.phase != phase:  # each phase has its own deadline, counted from its start
                phase = parser.phase
                deadline = loop.time() + timeouts[phase]
            try:
                async with asyncio.timeout_at(deadline):
                    data = await reader.read(READ_CHUNK_BYTES)
            except TimeoutError:
                if phase == IDLE:
                    return None
                raise HttpError(408, f"request {phase} not complete within {timeouts[phase]} s") from None
            if not data:
                return None
            parser.feed(data)
        return parser.complete.popleft()

    async def _dispatch(self, request: AdminRequest) -> Response:
        try:
            return await self._route(request)
        except FcrunError as exc:
            return error_response(exc)
        except Exception as exc:  # noqa: BLE001 - a bug in a route: logged, answered 500, serve goes on
            log.exception("admin API %s %s failed", request.method, request.path)
            return _error(500, f"internal error: {exc!r}", "FcrunError")

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
            case ("GET", ["dashboard"]):
                return self._dashboard().page()
            case ("GET", ["dashboard", "data"]):
                return json_response(await self._dashboard().data(
                    search=_query_one(query, "q") or "", sort=sort_key(_query_one(query, "sort")),
                    offset=_query_int(query, "offset", 0) or 0,
                    limit=_query_int(query, "limit", 1, MAX_ROWS) or DEFAULT_ROWS, app=_query_one(query, "app"),
                    since_tick=_query_int(query, "since", 0) if "since" in query else -1,
                    events_since=_query_int(query, "events_since", 0),
                    all_events=_query_one(query, "events") == "all"))
            case (_, ["apps"] | ["apps", _] | ["apps", _, "scale"] | ["instances"] | ["events"] | ["stats"]
                  | ["metrics"] | ["dashboard"] | ["dashboard", "data"]):
                return _error(405, f"method {request.method} is not allowed on {request.path}")
            case _:
                raise NotFound(f"no such admin API path: {request.path}")

    def _dashboard(self) -> Dashboard:
        if self.dashboard is None:
            raise NotFound("no dashboard here: it runs within fcrun serve")
        return self.dashboard

    async def _remove(self, name: str) -> Response:
        # A removal answered with 202 goes on without its client; its owner logs how it ends
        # (NotFound is the client's answer, not worth a log line).
        task = self.tasks.spawn(self.controller.remove_app(name), name=f"remove app {name}", expected=(NotFound,))
        done, _ = await asyncio.wait({task}, timeout=self.remove_wait_s)
        if task not in done:
            return json_response(Removal(removing=name), 202)
        task.result()  # raises NotFound and the like
        return json_response(Removal(removed=name))


def _close_unless_started(conn: socket.socket, started: list[bool], _task: asyncio.Task) -> None:
    if not started:  # cancelled before its first step (serve closing): nobody else has `conn`
        conn.close()


def _too_many() -> Response:
    return _error(503, "too many admin connections open; try again later", "ServerUnavailable")


def _refuse(conn: socket.socket, *, plain: bool) -> None:
    """Close a connection over the limit at once: a 503 for a plain-HTTP client if the socket
    takes it without waiting (a TLS client would not understand it)."""
    conn.setblocking(False)  # neither the send nor the recv may wait
    with contextlib.suppress(OSError):  # best effort: the close is what matters
        if plain:
            conn.send(_too_many().encode(False))
        # What the client already sent is dropped: unread, it would turn the close into a reset
        # that can overtake the 503.
        conn.recv(READ_CHUNK_BYTES)
    conn.close()


def _bind_tcp(listener: Listener) -> socket.socket:
    """A listening, non-blocking socket at the listener's HOST:PORT (its first address).

    Raises:
        SpecError: the address is malformed or its host does not resolve.
        KernelError: bind or listen failed (the port is taken, say).
    """
    where = "admin_listen" if listener.kind == "tcp" else "metrics_listen"
    host, port = parse_address(listener.address, where)
    if listener.tls is None and listener.token is not None and not is_loopback(host):
        log.warning("the %s listener on %s is not loopback and has no TLS: its bearer token crosses the network "
                    "in clear text (admin_tls_cert/admin_tls_key)", where, listener.address)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise SpecError(f"{where} {listener.address}: cannot resolve {host!r}: {exc.strerror}", where) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise KernelError.from_oserror("listen on", listener.address, exc) from None
    return sock


def _error(status: int, message: str, kind: str = "SpecError", headers: dict[str, str] | None = None) -> Response:
    return Response(status, encode(ErrorBody(error=message, kind=kind)), headers=headers or {})


def admin_options(config: ServeConfig) -> dict[str, Any]:
    """AdminServer's keyword arguments from serve's configuration (checked: load_config).

    Raises:
        SpecError: a TLS file no longer loads (it changed since the configuration was read).
    """
    tls = None
    if config.admin_tls_cert is not None and config.admin_tls_key is not None:
        tls = server_tls_context(config.admin_tls_cert, config.admin_tls_key)
        with contextlib.suppress(OSError):  # it was just read: only a race would fail here
            if os.stat(config.admin_tls_key).st_mode & 0o007:
                log.warning("admin_tls_key %s can be read by every user: make it mode 0600", config.admin_tls_key)
    limits = AdminLimits(max_connections=config.admin_max_connections,
                         keepalive_timeout_s=config.admin_keepalive_timeout_s,
                         header_timeout_s=config.admin_header_timeout_s, body_timeout_s=config.admin_body_timeout_s,
                         max_body_bytes=config.admin_max_body_bytes)
    return dict(tcp_listen=config.admin_listen, token=config.admin_token, tls=tls,
                metrics_listen=config.metrics_listen, metrics_token=config.metrics_token,
                metrics_tls=tls if config.metrics_tls else None, limits=limits)


def _refuse_if_served(path: str) -> None:
    """Raises AlreadyExists if a server answers on the admin socket `path` already."""
    if os.path.lexists(path) and server_answers(path):
        raise AlreadyExists(f"admin socket {path} is in use: is another fcrun serve running?")


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
    _refuse_if_served(path)
    sock = bind_private(path, what="admin socket", where="admin_socket")
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def serve_in_thread(controller: Controller, socket_path: str, *,
                    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
                    **kwargs: Any) -> Iterator[AdminServer]:
    """Run an AdminServer on its own event loop in a thread (for tests and tools; `loop_factory`:
    uvloop.new_event_loop for serve's loop).

    Resource handling: on exit the server is closed, the loop stopped and the thread joined.
    """
    loop = loop_factory()
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
