"""The admin API of `fcrun serve` on the wire: routes, bodies and limits that its server
(admin_server.py) and its client (admin_client.py) share.

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

Errors: an FcrunError becomes its http_status with ``{"error": message, "kind": class name}``
(an `ErrorBody`); the client raises the same class again from that.

Who may call: the unix socket is created mode 0600 (root-only when serve runs as root) and
each connection's peer credentials are checked again; the optional TCP listener requires
``Authorization: Bearer <token>`` on every request (compared in constant time).
"""

from __future__ import annotations

import msgspec

JSON_CONTENT_TYPE = "application/json"
DEFAULT_EVENT_LIMIT = 100
MAX_EVENT_LIMIT = 10_000
DEFAULT_REMOVE_WAIT_S = 30.0  # DELETE answers 202 if draining takes longer

encode = msgspec.json.Encoder().encode


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """The body of every error response."""

    error: str
    kind: str = "FcrunError"  # the FcrunError subclass's name
    where: str | None = None  # a SpecError's location


class Removal(msgspec.Struct, omit_defaults=True):
    """DELETE /apps/{name}: removed, or still draining (202)."""

    removed: str | None = None
    removing: str | None = None
