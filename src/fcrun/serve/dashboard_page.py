"""What the dashboard's page gets from serve: the page itself (dashboard.html, hand-written,
no build step) and, once a second, its data: one page of the apps table, the selected app's
new samples, the events after the last one it has, and this node's pool.

Only what the page shows is sent: `limit` rows of the table (filtered and sorted here, so a
serve with 1,000 apps sends 25), the selected app's samples after the tick the page already
has, events after its last event id. The routes live in admin_server.py, on the metrics
listener and the admin listeners, with the same authorization as /metrics there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import importlib.resources
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..cmdb.models import Event
from ..errors import FcrunError, SpecError
from .admin_http import Response
from .dashboard import MARK_NAMES, SORT_KEYS, TABLE_WINDOW_S, WINDOW_SAMPLES, Sampler, cpu_quotas

DASHBOARD_PATH = "/dashboard"
DATA_PATH = "/dashboard/data"
PAGE_FILE = "dashboard.html"
HTML_CONTENT_TYPE = "text/html; charset=utf-8"
DEFAULT_ROWS = 25  # as the page asks
MAX_ROWS = 500
EVENTS_PER_POLL = 100
# The fork-server answers one request at a time, cold starts among them: pages that are open
# ask it for its pool's figures every POOL_CACHE_S at most, all of them together.
POOL_CACHE_S = 2.0
# The page's own script and style are inline; it fetches from its own origin only, and
# nothing it shows (app names, event messages) can run as code (it sets textContent only).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}

EventSource = Callable[[str | None, int | None, int], Awaitable[list[Event]]]
PoolSource = Callable[[], Awaitable[dict[str, Any]]]


@functools.cache
def page_bytes() -> bytes:
    """dashboard.html, read once from the package."""
    return importlib.resources.files(__package__).joinpath(PAGE_FILE).read_bytes()


class Dashboard:
    """The dashboard's side of the admin API.

    Args:
        sampler: the per-app series (dashboard.py), sampled by serve once a second.
        events: the CMDB's events (app, since_id, limit), as the admin API's GET /events.
        pool: this node's pool of pre-warmed instances by image, or None without a fork-server.
    """

    def __init__(self, sampler: Sampler, events: EventSource, pool: PoolSource | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.sampler = sampler
        self.events = events
        self.pool = pool
        self.clock = clock
        self._pool_cache: tuple[float, dict[str, Any] | None] = (float("-inf"), None)

    def page(self) -> Response:
        return Response(200, page_bytes(), HTML_CONTENT_TYPE, headers=PAGE_HEADERS)

    async def data(self, *, search: str = "", sort: str = "rate", offset: int = 0, limit: int = DEFAULT_ROWS,
                   app: str | None = None, since_tick: int = -1, events_since: int | None = None,
                   all_events: bool = False) -> dict[str, Any]:
        """What the page shows, as one JSON object (see the module's docstring). Events are the
        selected app's, or every app's and serve's own with `all_events` or no app."""
        sampler = self.sampler
        sampler.watched()
        body: dict[str, Any] = {
            "now": sampler.clock(), "tick": sampler.tick, "window_s": WINDOW_SAMPLES, "table_window_s": TABLE_WINDOW_S,
            "marks": MARK_NAMES, "sort_keys": SORT_KEYS,
            "apps": sampler.table(search, sort, offset, limit),
            "series": sampler.series(app, since_tick) if app else None,
        }
        try:
            body["events"] = await self.events(None if all_events else app, events_since, EVENTS_PER_POLL)
        except FcrunError as exc:  # a CMDB outage: the figures still come
            body["events"], body["events_error"] = [], str(exc)
        body["pool"] = await self._pool()
        return body

    async def _pool(self) -> dict[str, Any] | None:
        if self.pool is None:
            return None
        at, cached = self._pool_cache
        if self.clock() - at < POOL_CACHE_S:
            return cached
        self._pool_cache = (self.clock(), cached)  # pages polling meanwhile get the last figures
        try:
            figures = await self.pool()
        except (FcrunError, OSError, asyncio.TimeoutError) as exc:
            figures = {"error": str(exc)}
        self._pool_cache = (self.clock(), figures)
        return figures


def make_dashboard(manager: Any, controller: Any, forkserver: Any = None) -> Dashboard:
    """serve's dashboard: a Sampler of the manager's stats and quotas (its `run()` is for serve
    to own), the controller's events, the fork-server's pool when there is one."""
    sampler = Sampler(manager.stats, lambda: cpu_quotas(manager.apps))
    pool = functools.partial(pool_figures, forkserver) if forkserver is not None else None
    return Dashboard(sampler, controller.events, pool)


def sort_key(text: str | None) -> str:
    """The table's sort key from the query (`sort=`), or the default.

    Raises:
        FcrunError (SpecError): not one of SORT_KEYS.
    """
    if text is None:
        return "rate"
    if text not in SORT_KEYS:
        raise SpecError(f"query parameter sort={text!r} must be one of {', '.join(SORT_KEYS)}", "sort")
    return text


def basic_password(credentials: str) -> bytes:
    """The password of HTTP Basic credentials (base64 of "user:password"); b"" when they do
    not decode (never equal to a token: tokens are not empty)."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except binascii.Error:
        return b""
    return decoded.partition(b":")[2]


async def pool_figures(supervisor: Any) -> dict[str, Any]:
    """This node's pool by image (size, ready, warming) from the fork-server's Status.

    Raises:
        ForkServerGone (FcrunError): it is restarting or did not answer.
    """
    from ..forkserver import protocol as fsp

    # Its own request timeout: a shorter one would have the supervisor kill a busy fork-server.
    status = await supervisor.request(fsp.Status())
    if not isinstance(status, fsp.PoolStatus):
        return {"error": f"the fork-server answered {type(status).__name__} to Status"}
    return {"images": {image: {"size": p.size, "ready": p.ready, "warming": p.warming, "claimed": p.claimed}
                       for image, p in status.images.items()}}
