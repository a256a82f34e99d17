"""The CMDB protocol in portable SQL: the statements, rows <-> models, and `SqlCMDB`, which
implements every method of the protocol once for SQLite (sqlite.py) and PostgreSQL
(postgres.py).

A backend supplies the connection and its transactions: `_write(operation, apps=...)` (one
write transaction; ``apps=True`` for a change to the apps and their hostnames, which a backend
whose writers do not already queue on one lock must serialise) and `_read(operation)` (one
consistent snapshot), both yielding a cursor whose ``execute`` takes these statements with
``?`` placeholders and returns the cursor. `where` names the database in messages: the file,
or the URL with its password masked.

Corrupt content is contained: a row whose columns do not decode (JSON that does not parse, a
type or range that cannot be an App's) is a CorruptApp naming that app and column for whoever
asks for it (`get_app`, a Host lookup), is left out of `list_apps` with a warning, and can be
removed (`remove_app`); the other apps keep working.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, ContextManager

import msgspec

from ..errors import AlreadyExists, NotFound, SpecError
from ..hostnames import normalize_host
from .base import NODE_LEASE_S, CorruptApp
from .migrations import DIALECTS
from .nodes import NodeSQL
from .models import App, AppUpdate, Event, Instance, apply_update, validate_app

log = logging.getLogger(__name__)

APP_COLUMNS = (
    "name", "image", "env", "docroot", "cpu", "cpu_max", "memory_bytes", "min_instances", "max_instances",
    "target_concurrency", "idle_timeout_s", "freeze_after_s", "max_lifetime_s", "cooldown_up_s",
    "cooldown_down_s", "max_body_bytes", "port", "autoscale", "created_at", "updated_at", "generation",
    "pids_max", "seccomp", "ready_path",
)
INSTANCE_COLUMNS = (
    "id", "app", "container", "state", "ip", "port", "cpu", "started_at", "last_request_at", "requests",
    "owner",
)
_APP_SELECT = ", ".join(f"a.{c}" for c in APP_COLUMNS)

INSERT_APP = f"INSERT INTO apps ({', '.join(APP_COLUMNS)}) VALUES ({', '.join('?' * len(APP_COLUMNS))})"
UPDATE_APP = (
    f"UPDATE apps SET {', '.join(f'{c} = ?' for c in APP_COLUMNS[1:])} WHERE name = ?"
)
SELECT_APP = f"SELECT {_APP_SELECT} FROM apps a WHERE a.name = ?"
SELECT_APP_IMAGE = "SELECT image FROM apps WHERE name = ?"
SELECT_APPS = f"SELECT {_APP_SELECT} FROM apps a ORDER BY a.name"
SELECT_APP_BY_HOST = f"SELECT {_APP_SELECT} FROM app_hostnames h JOIN apps a ON a.name = h.app WHERE h.hostname = ?"
DELETE_APP = "DELETE FROM apps WHERE name = ?"
COUNT_APPS = "SELECT COUNT(*) FROM apps"
# Changes with every add (count, latest update), update (generations) and remove (count).
APPS_TOKEN = "SELECT COUNT(*), COALESCE(SUM(generation), 0), COALESCE(MAX(updated_at), 0) FROM apps"

SELECT_ALIASES = "SELECT hostname FROM app_hostnames WHERE app = ? AND position > 0 ORDER BY position"
SELECT_ALL_ALIASES = "SELECT app, hostname FROM app_hostnames WHERE position > 0 ORDER BY app, position"
SELECT_HOST_OWNER = "SELECT app FROM app_hostnames WHERE hostname = ?"
INSERT_HOSTNAME = "INSERT INTO app_hostnames (hostname, app, position) VALUES (?, ?, ?)"
DELETE_HOSTNAMES = "DELETE FROM app_hostnames WHERE app = ?"

UPSERT_INSTANCE = (
    f"INSERT INTO instances ({', '.join(INSTANCE_COLUMNS)}) VALUES ({', '.join('?' * len(INSTANCE_COLUMNS))}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in INSTANCE_COLUMNS[1:])}"
)
DELETE_INSTANCE = "DELETE FROM instances WHERE id = ?"
# Record an instance only while its app has fewer live rows than its max that hold a share of
# it: the claimant's own, unowned ones (before schema 3) and those of owners whose heartbeat is
# younger than the lease ({now}: DIALECTS). One statement: a claim is on a cold start's path.
CLAIM_INSTANCE = (
    f"INSERT INTO instances ({', '.join(INSTANCE_COLUMNS)}) SELECT {', '.join('?' * len(INSTANCE_COLUMNS))} "
    "WHERE (SELECT COUNT(*) FROM instances i WHERE i.app = ? AND i.state <> 'stopped' AND i.id <> ? "
    "AND (i.owner = ? OR i.owner = '' OR EXISTS (SELECT 1 FROM nodes n WHERE n.name = i.owner "
    "AND n.heartbeat_at > {now} - ?))) < ? "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in INSTANCE_COLUMNS[1:])}"
)
UPSERT_HEARTBEAT = (
    "INSERT INTO nodes (name, heartbeat_at) VALUES (?, {now}) "
    "ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
)

SELECT_INSTANCES = f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances ORDER BY app, started_at, id"
SELECT_APP_INSTANCES = (
    f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances WHERE app = ? ORDER BY started_at, id"
)

INSERT_EVENT = (
    "INSERT INTO events (ts, app, kind, message, data, token) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (token) DO NOTHING RETURNING id"
)
SELECT_EVENT_BY_TOKEN = "SELECT id, ts FROM events WHERE token = ?"
_EVENT_SELECT = "SELECT id, ts, app, kind, message, data FROM events"
SELECT_EVENTS_SINCE = f"{_EVENT_SELECT} WHERE id > ? ORDER BY id LIMIT ?"
SELECT_APP_EVENTS_SINCE = f"{_EVENT_SELECT} WHERE app = ? AND id > ? ORDER BY id LIMIT ?"
SELECT_EVENTS_LATEST = f"{_EVENT_SELECT} ORDER BY id DESC LIMIT ?"
SELECT_APP_EVENTS_LATEST = f"{_EVENT_SELECT} WHERE app = ? ORDER BY id DESC LIMIT ?"
SELECT_ALL_EVENTS = f"{_EVENT_SELECT} ORDER BY id"
COUNT_EVENTS = "SELECT COUNT(*) FROM events"
# Oldest first by id (the primary key's order, which is time order for one writer and nearly
# so for several): the scan stops after `limit` matches, no index on ts needed.
DELETE_OLD_EVENTS = "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE ts < ? ORDER BY id LIMIT ?)"

_json_encode = msgspec.json.Encoder().encode
_env_decode = msgspec.json.Decoder(list[str]).decode
_data_decode = msgspec.json.Decoder(dict[str, Any]).decode


class CorruptRow(Exception):
    """A row whose columns cannot be what they stand for; says which column and why."""


class Dump(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A whole CMDB as `fcrun cmdb export` writes it and `import` reads it (JSON)."""

    format: str = "fcrun-cmdb"
    schema_version: int
    apps: list[App] = []
    instances: list[Instance] = []
    events: list[Event] = []


class SqlCMDB(NodeSQL):
    """The CMDB protocol on a backend's `_write` / `_read` transactions (module docstring).

    Raises (from every method, besides those the CMDB protocol names):
        CMDBError: the database failed (the backend says how: locked, unreachable, corrupt).
    """

    where: str  # the database, as messages name it
    dialect: str  # "sqlite" or "postgresql" (migrations.DIALECTS)
    schema_found: int  # the schema version the database had when this opened it (0: new)
    notifies_changes = False  # whether `listen_app_changes` hears other writers' app changes
    # Whether serves on other hosts may share it: each serve then beats and claims its
    # instances (serve/server.py); one host's embedded database needs neither.
    shared = False

    def __init__(self) -> None:
        self._reported: set[str] = set()  # corrupt rows warned about: once each, not every list

    # What a backend provides.

    def _write(self, operation: str, *, apps: bool = False) -> ContextManager[Any]:
        raise NotImplementedError

    def _read(self, operation: str) -> ContextManager[Any]:
        raise NotImplementedError

    def _insert_event_with_id(self, cur: Any, event: Event) -> None:
        """Store an event under the id it had (import)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- apps --------------------------------------------------------------------------------

    def add_app(self, app: App) -> App:
        app = validate_app(app)
        if not app.created_at:
            now = time.time()
            app = msgspec.structs.replace(app, created_at=now, updated_at=now)
        with self._write(f"add app {app.name}", apps=True) as cur:
            if cur.execute(SELECT_APP, (app.name,)).fetchone() is not None:
                raise AlreadyExists(f"app {app.name!r} already exists")
            _check_hostnames_free(cur, app)
            cur.execute(INSERT_APP, _app_row(app))
            _insert_hostnames(cur, app)
        return app

    def get_app(self, name: str) -> App:
        with self._read(f"read app {name}") as cur:
            app = self._get_app(cur, name)
        if app is None:
            raise NotFound(f"app {name!r} does not exist")
        return app

    def app_for_host(self, host: str) -> App | None:
        """The app answering to `host` (a Host header's value, port and case as a client sent
        them), or None."""
        name = normalize_host(host)
        if name is None:
            return None  # not a host name: no app can have it
        with self._read(f"look up host {host}") as cur:
            row = cur.execute(SELECT_APP_BY_HOST, (name,)).fetchone()
            if row is None:
                return None
            aliases = [r[0] for r in cur.execute(SELECT_ALIASES, (row[0],)).fetchall()]
        return self._app(row, aliases)

    def list_apps(self) -> list[App]:
        with self._read("list apps") as cur:
            rows = cur.execute(SELECT_APPS).fetchall()
            aliases: dict[str, list[str]] = {}
            for app, hostname in cur.execute(SELECT_ALL_ALIASES).fetchall():
                aliases.setdefault(app, []).append(hostname)
        apps = []
        for row in rows:
            try:
                apps.append(self._app(row, aliases.get(row[0], [])))
            except CorruptApp as exc:  # the others keep working
                self._report(f"{exc}; it is left out (fix it or `fcrun app rm` it)")
        return apps

    def update_app(self, name: str, update: AppUpdate) -> App:
        with self._write(f"update app {name}", apps=True) as cur:
            current = self._get_app(cur, name)
            if current is None:
                raise NotFound(f"app {name!r} does not exist")
            app = apply_update(current, update, time.time())
            if app.hostnames != current.hostnames:
                cur.execute(DELETE_HOSTNAMES, (name,))
                _check_hostnames_free(cur, app)
                _insert_hostnames(cur, app)
            cur.execute(UPDATE_APP, (*_app_row(app)[1:], name))
        return app

    def remove_app(self, name: str) -> App:
        """Also removes an app whose row is corrupt (returned with its name and image only)."""
        with self._write(f"remove app {name}", apps=True) as cur:
            try:
                app = self._get_app(cur, name)
            except CorruptApp as exc:
                log.warning("%s; removing it", exc)
                image = cur.execute(SELECT_APP_IMAGE, (name,)).fetchone()[0]
                app = App(name=name, image=image if isinstance(image, str) else "")
            if app is None:
                raise NotFound(f"app {name!r} does not exist")
            cur.execute(DELETE_HOSTNAMES, (name,))
            cur.execute(DELETE_APP, (name,))
        return app

    def app_changes_token(self) -> tuple:
        """A value that changes when the apps do: what serve polls when it cannot LISTEN."""
        with self._read("poll for app changes") as cur:
            return tuple(cur.execute(APPS_TOKEN).fetchone())

    def listen_app_changes(self) -> Any:
        """None: this backend cannot tell of changes (see postgres.py's, which can)."""
        return None

    # -- instances ---------------------------------------------------------------------------

    def upsert_instance(self, instance: Instance) -> None:
        with self._write(f"record instance {instance.id}") as cur:
            cur.execute(UPSERT_INSTANCE, tuple(getattr(instance, c) for c in INSTANCE_COLUMNS))

    def claim_instance(self, instance: Instance, max_instances: int, lease_s: float = NODE_LEASE_S) -> bool:
        """Record `instance` only if its app has fewer than `max_instances` live rows (its
        owner's, and those of owners that beat within `lease_s`); the count and the insert are
        one transaction that the backend serialises per app (`_lock_app_instances`), so serves
        sharing the database never claim past the limit."""
        claim = CLAIM_INSTANCE.format(**DIALECTS[self.dialect])
        values = tuple(getattr(instance, c) for c in INSTANCE_COLUMNS)
        with self._write(f"claim instance {instance.id}") as cur:
            self._lock_app_instances(cur, instance.app)
            cur.execute(claim, (*values, instance.app, instance.id, instance.owner, lease_s, max_instances))
            return cur.rowcount == 1

    def _lock_app_instances(self, cur: Any, app: str) -> None:
        """Make claims of one app's instances queue (a backend whose writers do not already)."""

    def heartbeat(self, node: str) -> None:
        with self._write(f"heartbeat of {node}") as cur:
            cur.execute(UPSERT_HEARTBEAT.format(**DIALECTS[self.dialect]), (node,))

    def remove_instance(self, instance_id: str) -> bool:
        with self._write(f"remove instance {instance_id}") as cur:
            return cur.execute(DELETE_INSTANCE, (instance_id,)).rowcount > 0

    def list_instances(self, app: str | None = None) -> list[Instance]:
        if app is not None and not _could_be_stored(app):
            return []
        with self._read("list instances") as cur:
            if app is None:
                rows = cur.execute(SELECT_INSTANCES).fetchall()
            else:
                rows = cur.execute(SELECT_APP_INSTANCES, (app,)).fetchall()
        instances = []
        for row in rows:
            try:
                instances.append(msgspec.convert(dict(zip(INSTANCE_COLUMNS, row)), Instance))
            except msgspec.ValidationError as exc:
                self._report(f"instance {row[0]!r} in CMDB {self.where} is corrupt: {exc}; it is left out")
        return instances

    # -- events ------------------------------------------------------------------------------

    def add_event(self, app: str | None, kind: str, message: str, data: dict[str, Any] | None = None,
                  token: str | None = None) -> Event:
        ts = time.time()
        data = data or {}
        encoded = _json_encode(data).decode()
        with self._write(f"record event {kind}") as cur:
            row = cur.execute(INSERT_EVENT, (ts, app, kind, message, encoded, token)).fetchone()
            if row is not None:
                (event_id,) = row
            else:  # recorded before under this token (a retry of a write that had committed)
                event_id, ts = cur.execute(SELECT_EVENT_BY_TOKEN, (token,)).fetchone()
        return Event(id=event_id, ts=ts, app=app, kind=kind, message=message, data=data)

    def list_events(self, app: str | None = None, limit: int = 100, since_id: int | None = None) -> list[Event]:
        if app is not None and not _could_be_stored(app):
            return []
        with self._read("list events") as cur:
            if since_id is not None:
                if app is None:
                    rows = cur.execute(SELECT_EVENTS_SINCE, (since_id, limit)).fetchall()
                else:
                    rows = cur.execute(SELECT_APP_EVENTS_SINCE, (app, since_id, limit)).fetchall()
            else:
                if app is None:
                    rows = cur.execute(SELECT_EVENTS_LATEST, (limit,)).fetchall()
                else:
                    rows = cur.execute(SELECT_APP_EVENTS_LATEST, (app, limit)).fetchall()
                rows.reverse()
        return [self._event(r) for r in rows]

    def trim_events(self, before_ts: float, limit: int = 10_000) -> int:
        with self._write("trim old events") as cur:
            return cur.execute(DELETE_OLD_EVENTS, (before_ts, limit)).rowcount

    # -- export and import -------------------------------------------------------------------

    def export_dump(self) -> Dump:
        """Every app, instance row and event, read in one snapshot."""
        from .migrations import LATEST_VERSION

        with self._read("export") as cur:
            rows = cur.execute(SELECT_APPS).fetchall()
            aliases: dict[str, list[str]] = {}
            for app, hostname in cur.execute(SELECT_ALL_ALIASES).fetchall():
                aliases.setdefault(app, []).append(hostname)
            instance_rows = cur.execute(SELECT_INSTANCES).fetchall()
            event_rows = cur.execute(SELECT_ALL_EVENTS).fetchall()
        # A corrupt row stops the export (CorruptApp names it): a dump that silently lacked
        # an app would lose it on import.
        apps = [self._app(row, aliases.get(row[0], [])) for row in rows]
        instances = [msgspec.convert(dict(zip(INSTANCE_COLUMNS, r)), Instance) for r in instance_rows]
        return Dump(schema_version=LATEST_VERSION, apps=apps, instances=instances,
                    events=[self._event(r) for r in event_rows])

    def import_dump(self, dump: Dump) -> None:
        """Write a dump into this CMDB, which must hold no app and no event: all of it, in one
        transaction, or nothing. Rows are written as they were exported (times, generations,
        event ids kept); each app is checked as the admin API checks one (validate_app), and
        stored as it would store it (names lowercased, ...), except that its docroot need not
        exist on this host.

        Raises:
            SpecError: the dump is not fcrun's, or an app in it breaks a rule, or is in it twice.
            AlreadyExists: this CMDB is not empty, or two apps in the dump share a hostname.
        """
        if dump.format != "fcrun-cmdb":
            raise SpecError(f"not an fcrun CMDB export (format {dump.format!r})", "format")
        checked, names = [], set()
        for i, app in enumerate(dump.apps):
            try:
                app = validate_app(app, host_paths=False)
            except SpecError as exc:
                raise SpecError(f"app {app.name!r}: {exc.message}", f"apps[{i}].{exc.where}") from None
            if app.name in names:
                raise SpecError(f"app {app.name!r} is in the dump twice", f"apps[{i}].name")
            names.add(app.name)
            checked.append(app)
        with self._write("import", apps=True) as cur:
            (apps,) = cur.execute(COUNT_APPS).fetchone()
            (events,) = cur.execute(COUNT_EVENTS).fetchone()
            if apps or events:
                raise AlreadyExists(f"CMDB {self.where} is not empty ({apps} apps, {events} events): "
                                    "import only into a new CMDB")
            for app in checked:
                _check_hostnames_free(cur, app)
                cur.execute(INSERT_APP, _app_row(app))
                _insert_hostnames(cur, app)
            for instance in dump.instances:
                cur.execute(UPSERT_INSTANCE, tuple(getattr(instance, c) for c in INSTANCE_COLUMNS))
            for event in dump.events:
                self._insert_event_with_id(cur, event)

    # -- rows --------------------------------------------------------------------------------

    def _app(self, row: tuple, aliases: list[str]) -> App:
        try:
            return _app_from_row(row, aliases)
        except CorruptRow as exc:
            raise CorruptApp(f"app {row[0]!r} in CMDB {self.where} is corrupt: {exc}") from None

    def _get_app(self, cur: Any, name: str) -> App | None:
        if not _could_be_stored(name):
            return None
        row = cur.execute(SELECT_APP, (name,)).fetchone()
        if row is None:
            return None
        return self._app(row, [r[0] for r in cur.execute(SELECT_ALIASES, (name,)).fetchall()])

    def _event(self, row: tuple) -> Event:
        return Event(id=row[0], ts=row[1], app=row[2], kind=row[3], message=row[4],
                     data=self._event_data(row[0], row[5]))

    def _event_data(self, event_id: int, raw: Any) -> dict[str, Any]:
        try:
            return _data_decode(raw)
        except (msgspec.DecodeError, TypeError) as exc:
            self._report(f"event {event_id} in CMDB {self.where}: column data is corrupt ({exc}); shown without it")
            return {}

    def _report(self, message: str) -> None:
        if message not in self._reported:
            self._reported.add(message)
            log.warning("%s", message)


def _could_be_stored(name: str) -> bool:
    """False for a name no row can hold: one with a NUL, which PostgreSQL's text refuses (an
    error, where a lookup of it must simply find nothing, as SQLite's does)."""
    return "\0" not in name


def event_row(event: Event) -> tuple:
    """An event's columns, id first, as INSERT ... (id, ts, app, kind, message, data) takes them."""
    return (event.id, event.ts, event.app, event.kind, event.message, _json_encode(event.data).decode())


def _app_row(app: App) -> tuple:
    values = []
    for column in APP_COLUMNS:
        value = getattr(app, column)
        values.append(_json_encode(value).decode() if column == "env" else value)
    return tuple(values)


def _app_from_row(row: tuple, aliases: list[str]) -> App:
    """Raises CorruptRow: a column that cannot be what App says it is."""
    fields = dict(zip(APP_COLUMNS, row))
    try:
        fields["env"] = _env_decode(fields["env"])
    except (msgspec.DecodeError, TypeError) as exc:
        raise CorruptRow(f"column env: {exc}") from None
    # A BOOLEAN column: SQLite stores 0 or 1, PostgreSQL gives False or True (equal to 0 and 1).
    if fields["autoscale"] not in (0, 1):
        raise CorruptRow(f"column autoscale: {fields['autoscale']!r} is not a boolean")
    fields["autoscale"] = bool(fields["autoscale"])
    fields["hostnames"] = aliases
    try:
        return msgspec.convert(fields, App)
    except msgspec.ValidationError as exc:
        # msgspec says "Expected `float`, got `str` - at `$.cpu`": name the column first.
        found = re.fullmatch(r"(.*) - at `\$\.(\w+)`", str(exc))
        raise CorruptRow(f"column {found[2]}: {found[1]}" if found else str(exc)) from None


def _check_hostnames_free(cur: Any, app: App) -> None:
    """Raises AlreadyExists naming the app that holds one of `app`'s hostnames."""
    for host in app.all_hostnames:
        row = cur.execute(SELECT_HOST_OWNER, (host,)).fetchone()
        if row is not None and row[0] != app.name:
            raise AlreadyExists(f"hostname {host!r} already belongs to app {row[0]!r}")


def _insert_hostnames(cur: Any, app: App) -> None:
    for position, host in enumerate(app.all_hostnames):
        cur.execute(INSERT_HOSTNAME, (host, app.name, position))
