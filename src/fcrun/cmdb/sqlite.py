"""The CMDB on embedded SQLite: one file under the data root, in WAL mode.

One connection per CMDB object, guarded by a lock, so the asyncio server, its worker threads
and the CLI can share it. Writes run in explicit ``BEGIN IMMEDIATE`` transactions (the write
lock is taken up front, so two writers queue on the busy timeout instead of failing on lock
upgrade); reads of more than one statement run in one deferred transaction for a consistent
snapshot. Other processes (`fcrun app` while `fcrun serve` runs) read and write the same file.

The statements below are portable SQL (PostgreSQL takes them as they are, with ``%s`` for
``?``); SQLite-only settings are the PRAGMAs in `_connect`.

Durability: WAL with ``synchronous = FULL``, so a write that returned is on disk: the WAL is
fsynced at every commit (NORMAL would sync it only at checkpoints, and a power loss could
take back an `fcrun app add` that had already answered). Commits are a few per scale action,
never one per request (serve's request counters live in memory), so the fsync costs nothing
that matters. A full disk fails the write that needed the space, with a "no space left"
error naming the file; the transaction is rolled back and every earlier row stays.

Corrupt content is contained: a row whose columns do not decode (JSON that does not parse, a
type or range that cannot be an App's) is a CMDBError naming that app and column for whoever
asks for it (`get_app`, a Host lookup), is left out of `list_apps` with a warning, and can be
removed (`remove_app`); the other apps keep working. A file that is not an SQLite database,
or whose pages are damaged, is a CMDBError naming the file when it is opened or read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import threading
import time
from typing import Any, Iterator

import msgspec

from ..errors import AlreadyExists, KernelError, NotFound
from ..hostnames import normalize_host
from ..paths import Paths
from .base import CMDBError, CorruptApp
from .migrations import migrate
from .models import App, AppUpdate, Event, Instance, apply_update, validate_app

log = logging.getLogger(__name__)

CMDB_FILE = "cmdb.sqlite3"
BUSY_TIMEOUT_S = 5.0

_APP_COLUMNS = (
    "name", "image", "env", "docroot", "cpu", "cpu_max", "memory_bytes", "min_instances", "max_instances",
    "target_concurrency", "idle_timeout_s", "freeze_after_s", "max_lifetime_s", "cooldown_up_s",
    "cooldown_down_s", "max_body_bytes", "port", "autoscale", "created_at", "updated_at", "generation",
    "pids_max", "seccomp",
)
_INSTANCE_COLUMNS = (
    "id", "app", "container", "state", "ip", "port", "cpu", "started_at", "last_request_at", "requests",
)
_APP_SELECT = ", ".join(f"a.{c}" for c in _APP_COLUMNS)

INSERT_APP = f"INSERT INTO apps ({', '.join(_APP_COLUMNS)}) VALUES ({', '.join('?' * len(_APP_COLUMNS))})"
UPDATE_APP = (
    f"UPDATE apps SET {', '.join(f'{c} = ?' for c in _APP_COLUMNS[1:])} WHERE name = ?"
)
SELECT_APP = f"SELECT {_APP_SELECT} FROM apps a WHERE a.name = ?"
SELECT_APP_IMAGE = "SELECT image FROM apps WHERE name = ?"
SELECT_APPS = f"SELECT {_APP_SELECT} FROM apps a ORDER BY a.name"
SELECT_APP_BY_HOST = f"SELECT {_APP_SELECT} FROM app_hostnames h JOIN apps a ON a.name = h.app WHERE h.hostname = ?"
DELETE_APP = "DELETE FROM apps WHERE name = ?"

SELECT_ALIASES = "SELECT hostname FROM app_hostnames WHERE app = ? AND position > 0 ORDER BY position"
SELECT_ALL_ALIASES = "SELECT app, hostname FROM app_hostnames WHERE position > 0 ORDER BY app, position"
SELECT_HOST_OWNER = "SELECT app FROM app_hostnames WHERE hostname = ?"
INSERT_HOSTNAME = "INSERT INTO app_hostnames (hostname, app, position) VALUES (?, ?, ?)"
DELETE_HOSTNAMES = "DELETE FROM app_hostnames WHERE app = ?"

UPSERT_INSTANCE = (
    f"INSERT INTO instances ({', '.join(_INSTANCE_COLUMNS)}) VALUES ({', '.join('?' * len(_INSTANCE_COLUMNS))}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _INSTANCE_COLUMNS[1:])}"
)
DELETE_INSTANCE = "DELETE FROM instances WHERE id = ?"
SELECT_INSTANCES = f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances ORDER BY app, started_at, id"
SELECT_APP_INSTANCES = (
    f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances WHERE app = ? ORDER BY started_at, id"
)

INSERT_EVENT = "INSERT INTO events (ts, app, kind, message, data) VALUES (?, ?, ?, ?, ?) RETURNING id"
_EVENT_SELECT = "SELECT id, ts, app, kind, message, data FROM events"
SELECT_EVENTS_SINCE = f"{_EVENT_SELECT} WHERE id > ? ORDER BY id LIMIT ?"
SELECT_APP_EVENTS_SINCE = f"{_EVENT_SELECT} WHERE app = ? AND id > ? ORDER BY id LIMIT ?"
SELECT_EVENTS_LATEST = f"{_EVENT_SELECT} ORDER BY id DESC LIMIT ?"
SELECT_APP_EVENTS_LATEST = f"{_EVENT_SELECT} WHERE app = ? ORDER BY id DESC LIMIT ?"

_json_encode = msgspec.json.Encoder().encode
_env_decode = msgspec.json.Decoder(list[str]).decode
_data_decode = msgspec.json.Decoder(dict[str, Any]).decode


class CorruptRow(Exception):
    """A row whose columns cannot be what they stand for; says which column and why."""


class SqliteCMDB:
    """The CMDB in one SQLite file (see the module docstring for locking).

    Raises (from every method, besides those the CMDB protocol names):
        CMDBError: the database is locked past the busy timeout, corrupt or unreadable.

    Resource handling: holds one connection until `close()`; usable as a context manager.
    """

    def __init__(self, path: str, *, busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.path = path
        self._lock = threading.Lock()
        self._reported: set[str] = set()  # corrupt rows warned about: once each, not every list
        self._conn = _connect(path, busy_timeout_s)
        try:
            with self._write("open") as cur:
                migrate(cur, "sqlite")
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open(cls, paths: Paths) -> "SqliteCMDB":
        """The CMDB under the data root (created on first use)."""
        return cls(os.path.join(paths.data_root, CMDB_FILE))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "SqliteCMDB":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- apps --------------------------------------------------------------------------------

    def add_app(self, app: App) -> App:
        app = validate_app(app)
        if not app.created_at:
            now = time.time()
            app = msgspec.structs.replace(app, created_at=now, updated_at=now)
        with self._write(f"add app {app.name}") as cur:
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
            aliases = [r[0] for r in cur.execute(SELECT_ALIASES, (row[0],))]
        return self._app(row, aliases)

    def list_apps(self) -> list[App]:
        with self._read("list apps") as cur:
            rows = cur.execute(SELECT_APPS).fetchall()
            aliases: dict[str, list[str]] = {}
            for app, hostname in cur.execute(SELECT_ALL_ALIASES):
                aliases.setdefault(app, []).append(hostname)
        apps = []
        for row in rows:
            try:
                apps.append(self._app(row, aliases.get(row[0], [])))
            except CorruptApp as exc:  # the others keep working
                self._report(f"{exc}; it is left out (fix it or `fcrun app rm` it)")
        return apps

    def update_app(self, name: str, update: AppUpdate) -> App:
        with self._write(f"update app {name}") as cur:
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
        with self._write(f"remove app {name}") as cur:
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

    # -- instances ---------------------------------------------------------------------------

    def upsert_instance(self, instance: Instance) -> None:
        with self._write(f"record instance {instance.id}") as cur:
            cur.execute(UPSERT_INSTANCE, tuple(getattr(instance, c) for c in _INSTANCE_COLUMNS))

    def remove_instance(self, instance_id: str) -> bool:
        with self._write(f"remove instance {instance_id}") as cur:
            return cur.execute(DELETE_INSTANCE, (instance_id,)).rowcount > 0

    def list_instances(self, app: str | None = None) -> list[Instance]:
        with self._read("list instances") as cur:
            if app is None:
                rows = cur.execute(SELECT_INSTANCES).fetchall()
            else:
                rows = cur.execute(SELECT_APP_INSTANCES, (app,)).fetchall()
        instances = []
        for row in rows:
            try:
                instances.append(msgspec.convert(dict(zip(_INSTANCE_COLUMNS, row)), Instance))
            except msgspec.ValidationError as exc:
                self._report(f"instance {row[0]!r} in CMDB {self.path} is corrupt: {exc}; it is left out")
        return instances

    # -- events ------------------------------------------------------------------------------

    def add_event(self, app: str | None, kind: str, message: str, data: dict[str, Any] | None = None) -> Event:
        ts = time.time()
        data = data or {}
        encoded = _json_encode(data).decode()
        with self._write(f"record event {kind}") as cur:
            (event_id,) = cur.execute(INSERT_EVENT, (ts, app, kind, message, encoded)).fetchone()
        return Event(id=event_id, ts=ts, app=app, kind=kind, message=message, data=data)

    def list_events(self, app: str | None = None, limit: int = 100, since_id: int | None = None) -> list[Event]:
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
        return [
            Event(id=r[0], ts=r[1], app=r[2], kind=r[3], message=r[4], data=self._event_data(r[0], r[5]))
            for r in rows
        ]

    # -- rows ------------------------------------------------------------------------------------

    def _app(self, row: tuple, aliases: list[str]) -> App:
        try:
            return _app_from_row(row, aliases)
        except CorruptRow as exc:
            raise CorruptApp(f"app {row[0]!r} in CMDB {self.path} is corrupt: {exc}") from None

    def _get_app(self, cur: sqlite3.Cursor, name: str) -> App | None:
        row = cur.execute(SELECT_APP, (name,)).fetchone()
        if row is None:
            return None
        return self._app(row, [r[0] for r in cur.execute(SELECT_ALIASES, (name,))])

    def _event_data(self, event_id: int, raw: Any) -> dict[str, Any]:
        try:
            return _data_decode(raw)
        except (msgspec.DecodeError, TypeError) as exc:
            self._report(f"event {event_id} in CMDB {self.path}: column data is corrupt ({exc}); shown without it")
            return {}

    def _report(self, message: str) -> None:
        if message not in self._reported:
            self._reported.add(message)
            log.warning("%s", message)

    # -- transactions ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self, operation: str) -> Iterator[sqlite3.Cursor]:
        """One write transaction: all of it commits, or (on any exception) none of it.

        COMMIT is where the WAL is written and synced, so it is where a full disk fails; SQLite
        may then have rolled back already (SQLITE_FULL does): `_end` rolls back only what is
        still open, so the error the caller sees is the one that happened.
        """
        with self._lock, _db_errors(operation, self.path):
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                self._end(cur)
                raise

    @contextlib.contextmanager
    def _read(self, operation: str) -> Iterator[sqlite3.Cursor]:
        """One read snapshot: every statement inside sees the same committed state."""
        with self._lock, _db_errors(operation, self.path):
            cur = self._conn.cursor()
            cur.execute("BEGIN")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                self._end(cur)
                raise

    def _end(self, cur: sqlite3.Cursor) -> None:
        """Roll back what a failed transaction left open (nothing, if SQLite already did)."""
        if self._conn.in_transaction:
            try:
                cur.execute("ROLLBACK")
            except sqlite3.Error as exc:  # the first error is the one to report
                log.warning("roll back in CMDB %s: %s", self.path, exc)


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    """Open (creating) the database file, private to its owner since app env may hold secrets."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        # SQLite gives the -wal and -shm files the main file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise KernelError.from_oserror("open CMDB", exc.filename or path, exc) from None
    with _db_errors("open", path):
        # isolation_level=None: no implicit transactions; we BEGIN and COMMIT ourselves.
        conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            _enable_wal(conn, path, busy_timeout_s)
            # FULL: every commit's WAL is fsynced before it returns (see the module docstring).
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
    return conn


def _enable_wal(conn: sqlite3.Connection, path: str, busy_timeout_s: float) -> None:
    """Switch the database to WAL (a persistent setting: once per file).

    Changing the journal mode needs an exclusive lock, and SQLite reports "database is locked"
    at once instead of calling the busy handler when another connection holds one (two
    processes opening a new database together). So this retries until the busy timeout.
    """
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)
    if mode.lower() != "wal":
        raise CMDBError(f"open CMDB {path}: cannot switch to WAL mode (journal mode is {mode})")


@contextlib.contextmanager
def _db_errors(operation: str, path: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise CMDBError(f"{operation} in CMDB {path}: {_explain(exc, path)}") from None


def _explain(exc: sqlite3.Error, path: str) -> str:
    """SQLite's message, with what it means for the operator where SQLite's words are terse."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
    if code == sqlite3.SQLITE_FULL or (code == sqlite3.SQLITE_IOERR and _nearly_full(path)):
        # A full disk is SQLITE_FULL when a write runs out of space, but a bare "disk I/O
        # error" when opening cannot make the -shm file (SQLite does not pass on the errno).
        return f"no space left on device ({exc}); nothing was written, free space and retry"
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return (f"the file is corrupt or not an SQLite database ({exc}); restore it from a backup,"
                " or move it aside to start with an empty CMDB")
    return str(exc)


def _nearly_full(path: str) -> bool:
    """Whether the filesystem holding `path` has less room than SQLite's -shm file needs."""
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < SHM_BYTES


# The size of the -shm index a WAL database's first connection makes (SQLite's 32 KiB pages).
SHM_BYTES = 32 << 10


def _app_row(app: App) -> tuple:
    values = []
    for column in _APP_COLUMNS:
        value = getattr(app, column)
        values.append(_json_encode(value).decode() if column == "env" else value)
    return tuple(values)


def _app_from_row(row: tuple, aliases: list[str]) -> App:
    """Raises CorruptRow: a column that cannot be what App says it is."""
    fields = dict(zip(_APP_COLUMNS, row))
    try:
        fields["env"] = _env_decode(fields["env"])
    except (msgspec.DecodeError, TypeError) as exc:
        raise CorruptRow(f"column env: {exc}") from None
    if fields["autoscale"] not in (0, 1):  # a BOOLEAN column: SQLite stores 0 or 1
        raise CorruptRow(f"column autoscale: {fields['autoscale']!r} is not a boolean")
    fields["autoscale"] = bool(fields["autoscale"])
    fields["hostnames"] = aliases
    try:
        return msgspec.convert(fields, App)
    except msgspec.ValidationError as exc:
        # msgspec says "Expected `float`, got `str` - at `$.cpu`": name the column first.
        found = re.fullmatch(r"(.*) - at `\$\.(\w+)`", str(exc))
        raise CorruptRow(f"column {found[2]}: {found[1]}" if found else str(exc)) from None


def _check_hostnames_free(cur: sqlite3.Cursor, app: App) -> None:
    """Raises AlreadyExists naming the app that holds one of `app`'s hostnames."""
    for host in app.all_hostnames:
        row = cur.execute(SELECT_HOST_OWNER, (host,)).fetchone()
        if row is not None and row[0] != app.name:
            raise AlreadyExists(f"hostname {host!r} already belongs to app {row[0]!r}")


def _insert_hostnames(cur: sqlite3.Cursor, app: App) -> None:
    for position, host in enumerate(app.all_hostnames):
        cur.execute(INSERT_HOSTNAME, (host, app.name, position))
