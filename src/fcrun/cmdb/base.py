"""The CMDB interface: everything `fcrun serve` and `fcrun app` read and write about apps.

One small protocol, so the embedded SQLite implementation (sqlite.py) can later be joined by
a PostgreSQL one that a front proxy and several compute hosts share (the talk's CMDB behind
its CoreAPI). Implementations validate what they are given and write all of it or nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..errors import FcrunError
from .models import App, AppUpdate, Event, Instance


class CMDBError(FcrunError):
    """The database itself failed: locked past the busy timeout, corrupt, unreadable, too new."""

    exit_code = 1
    http_status = 503


class CorruptApp(CMDBError):
    """One app's row cannot be read back (the message names the app and column); the other
    apps are unaffected, and `remove_app` still removes it."""


class CMDB(Protocol):
    """Apps, their instances and events.

    Methods are blocking and thread-safe; each write is one transaction.
    """

    def add_app(self, app: App) -> App:
        """Validate and store a new app; returns it as stored (normalized).

        Raises:
            SpecError: a setting is invalid (nothing is written).
            AlreadyExists: the name or a hostname belongs to another app (named in the message).
        """
        ...

    def get_app(self, name: str) -> App:
        """Raises: NotFound, CorruptApp."""
        ...

    def app_for_host(self, host: str) -> App | None:
        """The app a Host header value routes to (port and case ignored), or None. Indexed."""
        ...

    def list_apps(self) -> list[App]:
        """Every app, by name."""
        ...

    def update_app(self, name: str, update: AppUpdate) -> App:
        """Apply the set fields of `update`, bump the generation; returns the new app.

        Raises:
            NotFound, SpecError (nothing written), AlreadyExists (a new alias is taken).
        """
        ...

    def remove_app(self, name: str) -> App:
        """Delete an app and its hostnames (not its instance rows); returns what was removed
        (of an app whose row is corrupt: its name and image).

        Raises: NotFound.
        """
        ...

    def upsert_instance(self, instance: Instance) -> None:
        """Insert or replace the instance row with this id."""
        ...

    def remove_instance(self, instance_id: str) -> bool:
        """Delete an instance row; False when there was none."""
        ...

    def list_instances(self, app: str | None = None) -> list[Instance]:
        """Instance rows (of one app, or all), by app then start time."""
        ...

    def add_event(self, app: str | None, kind: str, message: str, data: dict[str, Any] | None = None) -> Event:
        """Record an event; returns it with its id (ids only grow)."""
        ...

    def list_events(self, app: str | None = None, limit: int = 100, since_id: int | None = None) -> list[Event]:
        """Events oldest first: those after `since_id` (the first `limit`), else the latest `limit`."""
        ...

    def close(self) -> None:
        ...
