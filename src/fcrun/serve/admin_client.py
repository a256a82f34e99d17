"""What `fcrun app` talks to: the admin API of a running `fcrun serve` (`AdminClient`), or the
CMDB directly when no server runs (`LocalAdmin`). Both have the same methods.

This module never imports the admin server (nor the manager and the runtime behind it): the
CLI pays only for a blocking HTTP client.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import socket
import ssl
import urllib.parse
from collections.abc import Sequence
from typing import Any

import msgspec

from ..cmdb.base import CMDB, CMDBError
from ..cmdb.models import App, AppDefaults, AppStats, AppUpdate, Event, Instance, NewApp, Scale
from ..docroot import DEFAULT_DOCROOT_ROOTS
from ..errors import AlreadyExists, FcrunError, KernelError, NotFound, NotPermitted, SpecError
from .admin_protocol import (
    DEFAULT_EVENT_LIMIT,
    DEFAULT_REMOVE_WAIT_S,
    JSON_CONTENT_TYPE,
    ErrorBody,
    Removal,
    client_tls_context,
    encode,
)
from .controller import DirectController

CLIENT_TIMEOUT_S = 2 * DEFAULT_REMOVE_WAIT_S  # longer than the server's remove wait
PROBE_TIMEOUT_S = 1.0


class ServerUnavailable(FcrunError):
    """No admin server answers at the address (no socket, or nobody listening on it)."""

    exit_code = 1
    http_status = 503


class TransportError(FcrunError):
    """The connection to a TCP admin API failed on its way: the TLS handshake (a certificate
    not trusted, one side not speaking TLS), or a server that closed it without an answer."""

    exit_code = 1
    http_status = 502


def server_answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket `path`.

    Raises:
        NotPermitted: the socket exists but the caller may not connect (not root).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT_S)
        try:
            probe.connect(path)
        except PermissionError:
            raise NotPermitted(
                f"connect to admin socket {path}: permission denied (the admin API is root-only)"
            ) from None
        except OSError:
            return False
        return True


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

    `address` is a unix socket path, or ``http://HOST:PORT`` / ``https://HOST:PORT`` for the
    TCP listener (which needs `token`). For https the server's certificate and host name are
    verified against `ca_file` (its CA, or a self-signed certificate itself), else the
    system's CAs. Methods raise the FcrunError subclass the server raised, ServerUnavailable
    when nothing listens (before anything was sent, so retrying elsewhere is safe), and
    TransportError when TLS fails.

    Raises:
        SpecError: `ca_file` cannot be read or holds no certificate.
    """

    def __init__(self, address: str, token: str | None = None, timeout_s: float = CLIENT_TIMEOUT_S,
                 *, ca_file: str | None = None):
        self.address = address
        self.token = token
        self.timeout_s = timeout_s
        self.tls = client_tls_context(ca_file) if address.startswith("https://") else None

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
        """One raw request; returns (status, body).

        Raises:
            ServerUnavailable, NotPermitted, TransportError, KernelError.
        """
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
            except (ConnectionResetError, ssl.SSLEOFError):  # what a server at its connection limit does
                raise ServerUnavailable(f"{self.address} closed the connection at once: too many admin "
                                        "connections open? Try again later") from None
            except ssl.SSLCertVerificationError as exc:
                raise TransportError(
                    f"connect to admin API {self.address}: its TLS certificate is not trusted "
                    f"({exc.verify_message}); give the CA that signed it, or the certificate itself, as the CA file"
                ) from None
            except ssl.SSLError as exc:
                raise TransportError(f"connect to admin API {self.address}: TLS handshake failed ({exc.reason or exc}); "
                                     "if it listens without TLS, use http://") from None
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
                closed = isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError))
                if closed and self.address.startswith("http://"):  # what a TLS listener does to plain HTTP
                    raise TransportError(f"{method} {path} on admin API {self.address}: closed without an answer "
                                         f"({exc}); if it listens with TLS, use https:// (else it may be at its "
                                         "connection limit)") from None
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
        status, data = self.request(method, path, None if body is None else encode(body))
        if not 200 <= status < 300:
            raise remote_error(status, data)
        return data

    def _connection(self) -> http.client.HTTPConnection:
        if self.address.startswith(("http://", "https://")):
            url = urllib.parse.urlsplit(self.address)
            if url.scheme == "https":
                return http.client.HTTPSConnection(url.hostname or "localhost", url.port, timeout=self.timeout_s,
                                                   context=self.tls)
            return http.client.HTTPConnection(url.hostname or "localhost", url.port, timeout=self.timeout_s)
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
