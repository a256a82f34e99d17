"""The CMDB interface: everything `fcrun serve` and `fcrun app` read and write about apps.

One small protocol, so the embedded SQLite implementation (sqlite.py) can later be joined by
a PostgreSQL one that a front proxy and several compute hosts share (the talk's CMDB behind
its CoreAPI). Implementations validate what they are given and write all of it or nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..errors import FcrunError
from .models import App, AppUpdate, Event, Instance

# How long a serve's instances keep their share of an app's max after its last heartbeat (serve
# beats every HEARTBEAT_S = 1 s, serve/server.py), and how long until fronts take a node for down
# (issue 15: within 3 s). Three beats: one late beat (a busy database, a GC pause) does not free a
# share still in use; a shorter lease would over-run an app's max when two beats are late.
NODE_LEASE_S = 3.0


class CMDBError(FcrunError):
    """The database itself failed: locked past the busy timeout, corrupt, unreadable, too new."""

    exit_code = 1
    http_status = 503


class CMDBUnavailable(CMDBError):
    """The database server cannot be reached now (stopped, restarting, unreachable, every
    connection busy): the same call may succeed later. Nothing of the call was written."""


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

    def claim_instance(self, instance: Instance, max_instances: int, lease_s: float = NODE_LEASE_S) -> bool:
        """Record a new instance only if its app has fewer than `max_instances` live (not
        stopped) rows: its owner's, unowned ones, and those of owners whose last heartbeat is
        under `lease_s` old (one that died frees its share); False (nothing written) at the
        limit. Atomic across processes sharing the database."""
        ...

    def heartbeat(self, node: str) -> None:
        """Record that serve `node` is alive now (the database server's clock)."""
        ...

    # The cluster's rows (nodes.py: NodeSQL has the docstrings).
    def node_beat(self, beat: Any) -> None: ...
    def list_nodes(self) -> list[Any]: ...
    def get_node(self, name: str) -> Any: ...
    def set_node_state(self, name: str, admin_state: str) -> Any: ...
    def remove_node(self, name: str) -> bool: ...
    def list_placements(self, app: str | None = None, node: str | None = None) -> list[Any]: ...
    def holders(self) -> list[tuple[str, str]]: ...
    def apps_on(self, node: str) -> tuple[list[Any], list[tuple[str, str]]]: ...
    def place_app(self, app: str, node: str, lease_s: float = NODE_LEASE_S) -> list[str]: ...
    def add_placement(self, app: str, node: str, state: str = "active") -> None: ...
    def move_app(self, app: str, node: str) -> None: ...
    def remove_placement(self, app: str, node: str) -> bool: ...
    def remove_node_placements(self, node: str) -> int: ...

    def remove_instance(self, instance_id: str) -> bool:
        """Delete an instance row; False when there was none."""
        ...

    def list_instances(self, app: str | None = None) -> list[Instance]:
        """Instance rows (of one app, or all), by app then start time."""
        ...

    def add_event(self, app: str | None, kind: str, message: str, data: dict[str, Any] | None = None,
                  token: str | None = None) -> Event:
        """Record an event; returns it with its id (ids only grow). With a `token` (unique, the
        writer's), a second call with it records nothing and returns the first one's id."""
        ...

    def list_events(self, app: str | None = None, limit: int = 100, since_id: int | None = None) -> list[Event]:
        """Events oldest first: those after `since_id` (the first `limit`), else the latest `limit`."""
        ...

    def trim_events(self, before_ts: float, limit: int = 10_000) -> int:
        """Remove at most `limit` events older than `before_ts` (wall clock), oldest first, in
        one short transaction; returns how many went (== `limit`: there may be more)."""
        ...

    def app_changes_token(self) -> tuple:
        """A value that changes whenever an app is added, updated or removed (cheap to read)."""
        ...

    def listen_app_changes(self) -> Any:
        """An object whose ``wait(timeout_s) -> bool`` says whether some app changed (and
        ``close()``), or None where the backend has no change notification.

        Raises: CMDBError (the server cannot be reached).
        """
        ...

    def export_dump(self) -> Any:
        """Every app, instance row and event in one snapshot (a sql.Dump; `fcrun cmdb export`).

        Raises: CorruptApp (an app that cannot be exported whole is named, not left out).
        """
        ...

    def import_dump(self, dump: Any) -> None:
        """Write a dump into this CMDB, which must be empty: all of it or nothing.

        Raises: SpecError (not a dump, a bad app), AlreadyExists (not empty, a hostname twice).
        """
        ...

    def close(self) -> None:
        ...
