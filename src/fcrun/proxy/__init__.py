"""fcrun's reactive HTTP/1.1 reverse proxy: Host -> app -> instance, started on demand.

:class:`ProxyServer` accepts client connections and forwards each request to an instance that a
:class:`Router` leases to it; the router (the lifecycle manager) starts instances when none is
ready. See http.py for the protocol rules (request.py and response.py for each side),
connection.py for the request path, server.py for accepting and shutting down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .config import ProxyConfig
from .router import Lease, RouteError, Router
from .server import ProxyServer

__all__ = ["Lease", "ProxyConfig", "ProxyServer", "RouteError", "Router", "event_loop_factory"]


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop when uvloop is importable, asyncio's otherwise.

    Use as ``asyncio.Runner(loop_factory=event_loop_factory())``.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop
