"""The admin API of `fcrun serve` on the wire: routes, bodies, limits and TLS settings that its
server (admin_server.py) and its client (admin_client.py) share.

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
    GET    /dashboard            -> the dashboard's page (HTML; dashboard_page.py)
    GET    /dashboard/data?q=&sort=&offset=&limit=&app=&since=&events_since=&events=all
                                 -> the page's data: one page of the apps table, the
                                    selected app's samples after tick `since`, events

Errors: an FcrunError becomes its http_status with ``{"error": message, "kind": class name}``
(an `ErrorBody`); the client raises the same class again from that.

Who may call: the unix socket is created mode 0600 (root-only when serve runs as root) and
each connection's peer credentials are checked again; the optional TCP listener requires
``Authorization: Bearer <admin_token>`` on every request (compared in constant time, on the
request head: a wrong one is answered 401 before the body is waited for), over TLS when it has
a certificate.

The optional metrics listener (``metrics_listen``) answers ``GET /metrics`` and the read-only
dashboard (``GET /dashboard``, ``GET /dashboard/data``) and nothing else, to anyone, or with
``Authorization: Bearer <metrics_token>`` when one is set. On the dashboard's two routes (and
there only) a listener's token is also taken as the password of HTTP Basic authorization,
which a browser asks its user for. The metrics
token must differ from the admin token and authorizes nothing on the admin listeners; where
the metrics listener has a token, the admin token is not taken there either.
"""

from __future__ import annotations

import ipaddress
import os
import ssl

import msgspec

from ..errors import SpecError

JSON_CONTENT_TYPE = "application/json"
DEFAULT_EVENT_LIMIT = 100
MAX_EVENT_LIMIT = 10_000
DEFAULT_REMOVE_WAIT_S = 30.0  # DELETE answers 202 if draining takes longer

encode = msgspec.json.Encoder().encode

MAX_HEAD_BYTES = 64 << 10
MAX_BODY_BYTES = 1 << 20
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2  # of both sides: server and client refuse anything older
METRICS_PATH = "/metrics"


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """The body of every error response."""

    error: str
    kind: str = "FcrunError"  # the FcrunError subclass's name
    where: str | None = None  # a SpecError's location


class Removal(msgspec.Struct, omit_defaults=True):
    """DELETE /apps/{name}: removed, or still draining (202)."""

    removed: str | None = None
    removing: str | None = None


class AdminLimits(msgspec.Struct, kw_only=True, frozen=True):
    """What one connection to the admin API may hold (serve's ``admin_*`` settings, whose
    defaults these are). Over them: 503 and close at accept, 408 on a deadline, 431, 413."""

    max_connections: int = 32  # open at once, per listener: one more is closed at accept
    keepalive_timeout_s: float = 60.0  # waiting for the first byte of a request
    header_timeout_s: float = 10.0  # first byte of a request to the end of its head; a TLS handshake
    body_timeout_s: float = 30.0  # end of the head to the end of the body
    max_head_bytes: int = MAX_HEAD_BYTES
    max_body_bytes: int = MAX_BODY_BYTES


# -- TLS: the server's certificate, the client's trust ------------------------------------------


class EncryptedKey(Exception):
    """Raised from ssl's password callback: the key file is encrypted (serve has no password)."""


def server_tls_context(cert_file: str, key_file: str, *, cert_field: str = "admin_tls_cert",
                       key_field: str = "admin_tls_key") -> ssl.SSLContext:
    """The TLS context of a TCP listener: `cert_file` (PEM, the chain leaf first) and its
    unencrypted `key_file`, TLS 1.2 at least.

    Raises:
        SpecError: a file cannot be read, holds no PEM certificate or key, the key is
            encrypted or does not match the certificate; the message names the setting (the
            `*_field`s) and the file.
    """
    for field, path in ((cert_field, cert_file), (key_field, key_file)):
        if not os.path.isabs(path):  # serve's working directory is no place to look for it
            raise SpecError(f"{field} {path!r} is not an absolute path", field)
        _check_readable(field, path)
    try:  # the certificate alone first, so that an error can say which file is wrong
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_file)
    except ssl.SSLError as exc:
        raise SpecError(f"{cert_field} {cert_file}: not a PEM certificate ({exc.reason or exc})", cert_field) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_TLS_VERSION
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except EncryptedKey:
        raise SpecError(f"{key_field} {key_file}: the key is encrypted; fcrun needs an unencrypted key "
                        "(readable by root only)", key_field) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{key_field} {key_file}: the key does not match {cert_field} {cert_file}"
        else:
            message = f"{key_field} {key_file}: not a PEM private key ({exc.reason or exc})"
        raise SpecError(message, key_field) from None
    return context


def client_tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """The TLS context of a client of the TCP listener: verifies the server's certificate and
    host name against `ca_file` (a CA, or the server's self-signed certificate itself), or
    against the system's CAs when None. TLS 1.2 at least.

    Raises:
        SpecError: `ca_file` cannot be read or holds no PEM certificate.
    """
    if ca_file is not None:
        _check_readable("CA file", ca_file)
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:
        raise SpecError(f"CA file {ca_file}: not a PEM certificate ({exc.reason or exc})", "ca_file") from None
    context.minimum_version = MIN_TLS_VERSION
    return context


def is_loopback(host: str) -> bool:
    """Whether a listener on `host` is reachable from this machine only ("localhost",
    127.0.0.0/8, ::1). Any other name, and 0.0.0.0 or ::, count as the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_readable(field: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise SpecError(f"{field} {path}: cannot read it: {exc.strerror}", field) from None


def _no_password() -> bytes:
    raise EncryptedKey()
