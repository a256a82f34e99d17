"""Settings of the HTTP proxy (the ``[proxy]`` table of fcrun.toml)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from ..constraints import PositiveSeconds

MIN_HEADER_BYTES = 1024


class ProxyConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    max_header_bytes: Annotated[int, msgspec.Meta(ge=MIN_HEADER_BYTES)] = 32 * 1024
    """Request line plus headers; a larger head is answered 431."""
    header_timeout_s: PositiveSeconds = 10.0
    """From a connection's first byte (or a keep-alive request's first byte) to the end of the head.
    Over it: 408 when part of a head arrived, a silent close otherwise (slowloris)."""
    keepalive_timeout_s: PositiveSeconds = 60.0
    """How long an idle client connection is kept between requests."""
    upstream_connect_timeout_s: float = 5.0
    """Connecting to an instance; over it the client gets 504."""
    upstream_idle_s: float = 30.0
    """A pooled upstream connection unused this long is closed."""
    upstream_pool_per_instance: int = 64
    """Idle keep-alive connections kept per instance (more are closed when released)."""
    max_body_bytes: int | None = None
    """Request body limit for apps whose lease sets none (413 when over); None: unlimited."""
    via: str = "fcrun"
    """Pseudonym in the Via header added to requests and responses."""
    forwarded_proto: str = "http"
    """Value of X-Forwarded-Proto (the client-facing scheme)."""
    buffer_bytes: int = 256 * 1024
    """Request body held while the upstream is not connected yet (cold start); reading from the
    client pauses above it."""
    linger_s: float = 2.0
    """After answering with Connection: close, how long unread client data is drained before the
    socket closes, so that the client reads the answer instead of a reset."""
    timer_resolution_s: float = 0.5
    """Timeouts are checked this often (one sweep for all connections instead of a timer each)."""
