"""What the proxy asks of whoever knows where apps run: a host name in, a lease on an instance out.

The lifecycle manager implements :class:`Router`; the proxy only consumes it. A :class:`Lease`
is one request's hold on one upstream instance, so the manager can count outstanding requests
per instance (least-outstanding balancing, draining) and meter processing time.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class RouteError(Exception):
    """The proxy answers this directly with ``status`` and ``message`` as a short text body.

    404: no app serves the host (the message names the host); 502: the app's instance could not
    be started (the message names the reason); 503: the app cannot take requests now (draining,
    removed); 504: the instance did not become ready within the hold timeout.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Lease(Protocol):
    """One request's hold on one upstream instance."""

    addr: tuple[str, int]
    """Instance IP and port."""
    cold_start: tuple[str, float] | None
    """``(path, ms)`` when this request waited for capacity ("start", "pool", "thaw"), else None."""
    max_body_bytes: int | None
    """Per-app request body limit (413 when over); None falls back to ProxyConfig.max_body_bytes;
    0 is no limit."""
    instance_id: str
    """Stable key of the instance for the upstream connection pool."""

    def done(self, status: int, request_bytes: int, response_bytes: int, failed: bool) -> None:
        """Called exactly once per request when its response is finished or aborted.

        ``status`` is the status sent to the client (499 when the client went away before a
        response started; 101 for a tunnel, called when the tunnel closes). ``failed`` is True
        when the exchange did not complete normally: the upstream failed or reset, the client
        went away mid-exchange, or the proxy cut the upstream request short.
        """
        ...


@runtime_checkable
class Router(Protocol):
    async def acquire(self, host: str) -> Lease:
        """A lease on an instance serving ``host`` (lowercase, port stripped).

        May take long (cold start). Must be cancellable: when the client goes away the proxy
        cancels the call, and a cancelled acquire holds no lease afterwards.

        Raises:
            RouteError: the proxy answers the client with its status and message.
        """
        ...

    # Optional hooks, looked up once when the server starts (the proxy works without them):
    #
    # def acquire_nowait(self, host: str) -> Lease | None
    #     A lease when an instance is ready right now, else None (the proxy then awaits
    #     acquire()). Raises RouteError like acquire(). This is the hot path: without it every
    #     request pays for an asyncio task (measurably more proxy CPU per request:
    #     bench/proxy_overhead.py --no-nowait).
    #
    # def retry_elsewhere(self, host: str, failed: Lease) -> Lease | None
    #     Another upstream for a request whose upstream failed before any byte of a response:
    #     it could not be connected to (any method), or it closed or reset the connection (GET
    #     and HEAD without a body only). Called at most once per request; the proxy settles
    #     ``failed`` itself. A front offers another node (cluster/front.py).
    #
    # def connection_opened(self, host: str) -> None
    # def connection_closed(self, host: str) -> None
    #     A client connection started / stopped talking to ``host``: open connections and
    #     tunnels count as activity for the idle timer. Called once per connection and host
    #     (a keep-alive connection that switches hosts closes the old one first).
