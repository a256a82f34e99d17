"""Settings of the HTTP proxy (the ``[proxy]`` table of fcrun.toml)."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import msgspec

from ..constraints import BigCount, PositiveCount, PositiveSeconds

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
    upstream_queued_after_s: float = 0.02
    """A new connection to an instance with no byte of its response after this long may be
    waiting for a worker (a pre-forking server's accept queue): a kept connection of that
    instance is then closed to free its worker, once per such connection (upstream.py)."""
    max_body_bytes: BigCount | None = 10 * 1024 * 1024
    """Request body limit in bytes for apps that set none of their own (an app's
    ``max_body_bytes`` wins, larger or smaller); over it: 413 and close. 0 (or None from
    Python): unlimited, as nginx's ``client_max_body_size 0``; an app's 0 is unlimited too."""
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
    body_idle_timeout_s: PositiveSeconds = 30.0
    """A request body with no byte for this long: 408 and close; the lease is settled and the
    instance's slot freed. Time the proxy itself holds the client back (the instance reads
    slowly, or is still starting) does not count."""
    body_timeout_s: PositiveSeconds = 300.0
    """The whole request body must arrive within this long of its head (the same time not
    counted); over it: 408 and close. 300 s lets 10 MiB arrive at 35 KB/s."""
    upstream_response_timeout_s: PositiveSeconds = 60.0
    """From the request sent to the instance to its response head; over it: 504 naming the host
    and this timeout (the instance's connection is dropped)."""
    upstream_read_timeout_s: PositiveSeconds = 60.0
    """No byte of a response body from the instance for this long, while the client reads: the
    response is cut (the client's connection closes, so it sees the truncation)."""
    send_timeout_s: PositiveSeconds = 60.0
    """A client that takes none of its response for this long is disconnected. Meanwhile the
    proxy stops reading from the instance: a slow reader holds at most the transports' buffers,
    never the whole response."""
    tunnel_idle_timeout_s: PositiveSeconds = 300.0
    """An upgraded connection (WebSocket) with no byte either way for this long is closed on
    both sides."""
    access_log: bool = False
    """One line per request on serve's log (logger ``fcrun.access``): app, instance, status,
    duration, cold-start path. Off: requests pay nothing for it (``fcrun serve --access-log``)."""
    max_connections: PositiveCount = 10_000
    """Open client connections. A connection beyond it gets a canned 503 and is closed at
    accept, unread (a client that already sent its request may see a reset instead). Keep it
    under the process's RLIMIT_NOFILE less the upstream connections and margin."""
    max_connections_per_ip: PositiveCount = 256
    """Open client connections from one address (an IPv6 peer: from its /64). Beyond it: the
    same 503 at accept. Loopback is not exempt; peers in ``trusted_proxies`` are (a proxy in
    front carries many clients: list a local TLS terminator's 127.0.0.1 there)."""
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs (``"10.0.0.0/8"``, ``"::1/128"``) of proxies in front of fcrun whose forwarding
    headers are believed: from such a peer X-Forwarded-For and Forwarded are appended to and its
    X-Forwarded-Proto/-Host kept. From any other peer all forwarding headers are replaced."""

    def __post_init__(self) -> None:
        trusted_networks(self.trusted_proxies)   # a bad entry fails the config load, named


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(entries: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """``[proxy] trusted_proxies`` as networks (a bare address is a /32 or /128).

    Raises:
        ValueError: an entry is not a CIDR; the message names it and its index.
    """
    networks = []
    for index, entry in enumerate(entries):
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=True))
        except ValueError as err:
            raise ValueError(f"trusted_proxies[{index}]: {entry!r} is not a CIDR ({err})") from None
    return tuple(networks)
