"""Serve learns of app changes that other writers make to a shared CMDB (another serve, `fcrun
app` or `fcrun cmdb import` against the same PostgreSQL).

While a LISTEN connection stands, each committed change to the apps wakes `AppWatch` at once
(postgres.py NOTIFYs at commit) and serve re-reads its apps. When that connection breaks (the
server stopped, the network failed), serve goes on routing from its in-memory apps and polls a
cheap change token every `poll_interval_s`, trying to LISTEN again every `listen_retry_s`;
when LISTEN is back it re-reads once (changes made meanwhile were not announced), and records
the outage as an event. A backend with no notification (SQLite, which only this host writes
through serve's admin API) is not watched.

    serve (loop)                     worker thread                 PostgreSQL
    run() --to_thread--> AppChanges.wait(0.25 s) <-- NOTIFY fcrun_apps (at another's commit)
          <-- True ---   (or False: time to look at cancellation)
    reload_apps() --to_thread--> list_apps()
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from ..cmdb.base import CMDB, CMDBError

log = logging.getLogger(__name__)

WAIT_SLICE_S = 0.25  # one wait in the worker thread: how late a cancelled watch notices
POLL_INTERVAL_S = 1.0  # without LISTEN: how often the change token is read
LISTEN_RETRY_S = 2.0  # without LISTEN: how often a new LISTEN connection is tried


class AppWatch:
    """Keeps serve's apps current with a shared CMDB (see the module docstring).

    `reload` re-reads the apps (Manager.reload_apps); `event(app, kind, message)` records an
    event (Recorder.event). `run()` is a service: it returns only when cancelled.
    """

    def __init__(self, cmdb: CMDB, reload: Callable[[], Awaitable[None]],
                 event: Callable[[str | None, str, str], None], *, poll_interval_s: float = POLL_INTERVAL_S,
                 listen_retry_s: float = LISTEN_RETRY_S, clock: Callable[[], float] = time.monotonic):
        self.cmdb = cmdb
        self.reload = reload
        self.event = event
        self.poll_interval_s = poll_interval_s
        self.listen_retry_s = listen_retry_s
        self.clock = clock
        self.reloads = 0  # how many times the apps were re-read for a change (tests, metrics)
        self._token: tuple | None = None
        self._lost_at: float | None = None  # when LISTEN broke, while it stays broken

    @staticmethod
    def wanted(cmdb: CMDB) -> bool:
        """Whether this CMDB tells of changes (and so is shared): PostgreSQL's does, SQLite's not."""
        return bool(getattr(cmdb, "notifies_changes", False))

    async def run(self) -> None:
        self._token = await self._read_token()
        while True:
            changes = await self._listen()
            if changes is not None:
                await self._hear(changes)
            await self._poll_until(self.clock() + self.listen_retry_s)

    async def _listen(self) -> Any:
        try:
            changes = await asyncio.to_thread(self.cmdb.listen_app_changes)
        except CMDBError as exc:
            self._lost(exc)
            return None
        if self._lost_at is not None:
            down_s = self.clock() - self._lost_at
            self._lost_at = None
            log.info("app changes: LISTEN again after %.1f s; re-reading the apps", down_s)
            self.event(None, "cmdb-reconnected", f"the CMDB's change notifications are back after {down_s:.1f} s "
                       "(polled meanwhile)")
            await self._reload()  # changes made while nobody listened were not announced
        return changes

    async def _hear(self, changes: Any) -> None:
        try:
            while True:
                if await asyncio.to_thread(changes.wait, WAIT_SLICE_S):
                    await self._reload()
        except CMDBError as exc:
            self._lost(exc)
        finally:
            changes.close()

    async def _poll_until(self, deadline: float) -> None:
        while self.clock() < deadline:
            await asyncio.sleep(self.poll_interval_s)
            token = await self._read_token()
            if token is not None and token != self._token:
                self._token = token
                await self._reload()

    async def _reload(self) -> None:
        try:
            await self.reload()
        except CMDBError as exc:
            log.warning("app changes: cannot re-read the apps, serving those known: %s", exc)
            return
        self.reloads += 1

    async def _read_token(self) -> tuple | None:
        try:
            return await asyncio.to_thread(self.cmdb.app_changes_token)
        except CMDBError as exc:
            log.debug("app changes: cannot poll: %s", exc)
            return None

    def _lost(self, exc: CMDBError) -> None:
        if self._lost_at is None:
            self._lost_at = self.clock()
            log.warning("app changes: no LISTEN connection (%s); serving the apps known, polling every %g s",
                        exc, self.poll_interval_s)

