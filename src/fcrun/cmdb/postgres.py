"""The CMDB on PostgreSQL: one database that front proxies, the API and every compute host share.

Selected by a ``postgresql://`` URL (``--cmdb``, ``[cmdb] url``); the protocol's methods and
statements are sql.py's, the same as SQLite's, so the two backends cannot drift apart. What
is PostgreSQL's own is here: the connections, the transactions, the locks and the errors.

Connections: psycopg 3, kept open between calls in a small pool of our own (`Connections`,
thread-safe, at most `POOL_MAX_SIZE`, so serve's worker threads each take one). Not
psycopg_pool: it connects in background workers that retry with exponential backoff (1, 2,
4 ... s), so after an outage it came back seconds late, and a caller that timed out learnt only
"couldn't get a connection", not libpq's reason. Here a call with no idle connection connects
in its own thread: a wrong URL, an unreachable server or bad credentials fail that call at
once with libpq's reason and the URL (password masked), and the first call after the server
is back succeeds. An idle connection that the server closed (a restart) fails at BEGIN,
before anything of the call ran: it is replaced then and the call goes on on a new one (no
check before each use: that round trip was a tenth of a claim's time).

Concurrency, and which mechanism guards what:

- Migrations run in one transaction that first takes the transaction-level advisory lock
  `MIGRATION_LOCK`: two processes starting on a new database queue on it, the second finds the
  schema made (DDL is transactional in PostgreSQL, so a crash leaves the old version).
- Changes to the apps and their hostnames (add, update, remove, import) take the advisory lock
  `APPS_LOCK` first. They read, check and write several rows (is the name taken? does another
  app hold this hostname? the current settings an update applies to), which row locks cannot
  guard: the row that would conflict may not exist yet (two adds of one name or hostname at
  once). One lock for all app changes is cheap because they are rare (an operator's command,
  never a request), and it gives the same errors as SQLite, whose writers all queue on one
  lock, instead of a unique-violation for the loser.
- Instance rows and events are single statements (an upsert on the primary key, an insert
  that takes its id from an identity sequence), atomic on their own at READ COMMITTED: they
  take no lock of ours, so serve's records never wait for an operator.
- Reads of more than one statement (an app and its aliases, a whole export) run in one
  REPEATABLE READ, READ ONLY transaction: one snapshot, as SQLite's deferred transactions give.
- Every change to the apps NOTIFYs `APPS_CHANNEL` inside its transaction: PostgreSQL delivers
  it at commit and never for one rolled back (serve/appwatch.py LISTENs with `AppChanges`).
- Each instance row names its owner, the serve (node: host and run root) that runs it (schema
  3); a serve starting removes only its own rows (and unowned ones from before schema 3).
- `claim_instance` (count the app's live rows of every owner, insert only below its max) runs
  in one transaction under a per-app transaction-level advisory lock (namespace
  `INSTANCES_LOCK_NS`, `hashtext(app)`), not row locks: the rows two claims race on do not
  exist yet (the first instance of an app), and SELECT ... FOR UPDATE cannot lock a row that a
  concurrent claim is about to insert; locking the app's row instead would make claims wait for
  operators' app changes, and an app's instances outlive its row while they drain. Claims of
  different apps never wait for each other. SQLite needs nothing more: BEGIN IMMEDIATE.
  Another owner's rows count only while its heartbeat (table `nodes`, written every few
  seconds by each serve, stamped with the server's clock) is younger than NODE_LEASE_S: a
  serve that died frees its share without anyone deleting its rows. serve claims every new
  instance (serve/manager.py) before starting it.

Durability is the server's (synchronous_commit, fsync, replication): a write that returned
was committed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Iterator

import psycopg
from psycopg import pq

from ..errors import SpecError
from .base import CMDBError, CMDBUnavailable
from .migrations import migrate
from .models import Event
from .sql import SqlCMDB, event_row
from .url import mask_url

CONNECT_TIMEOUT_S = 5  # libpq's connect_timeout: whole seconds
POOL_TIMEOUT_S = 5.0  # how long a call waits for a free connection (like SQLite's busy timeout)
POOL_MAX_SIZE = 8  # connections at once; serve's worker threads seldom hold more

# Advisory lock keys (64-bit, one namespace per database): "fcrn" then a number.
MIGRATION_LOCK = 0x6663726E_00000001
APPS_LOCK = 0x6663726E_00000002

TAKE_LOCK = "SELECT pg_advisory_xact_lock(?)"
# Instance claims: one lock per app, (namespace "fcrn", hash of the app's name) in the two-key form.
INSTANCES_LOCK_NS = 0x6663726E
TAKE_APP_INSTANCES_LOCK = "SELECT pg_advisory_xact_lock(CAST(? AS integer), hashtext(?))"
APPS_CHANNEL = "fcrun_apps"  # NOTIFY channel: some app changed (serve re-reads them all)
NOTIFY_APPS_CHANGED = f"NOTIFY {APPS_CHANNEL}"
INSERT_EVENT_WITH_ID = (
    "INSERT INTO events (id, ts, app, kind, message, data) OVERRIDING SYSTEM VALUE VALUES (?, ?, ?, ?, ?, ?)"
)
# An identity column's sequence does not follow ids inserted explicitly: move it on by hand.
ADVANCE_EVENT_IDS = "SELECT setval(pg_get_serial_sequence('events', 'id'), ?)"


@functools.lru_cache(maxsize=256)
def _placeholders(query: str) -> str:
    """sql.py's ``?`` placeholders as psycopg's ``%s`` (the statements hold no other ``?`` or ``%``)."""
    return query.replace("?", "%s")


class QmarkCursor(psycopg.Cursor):
    """A cursor that takes sql.py's statements as they are written."""

    def execute(self, query, params=None, **kwargs):  # type: ignore[override]
        return super().execute(_placeholders(query), params, **kwargs)


class PostgresCMDB(SqlCMDB):
    """The CMDB in a PostgreSQL database (see the module docstring for locking).

    Raises (from every method, besides those the CMDB protocol names):
        CMDBError: the server cannot be reached, refused us, or failed the statement; the
            message names the operation and the URL (password masked).

    Resource handling: holds its connections until `close()`; usable as a context manager.
    """

    dialect = "postgresql"
    notifies_changes = True
    shared = True

    def __init__(self, url: str, *, pool_max_size: int = POOL_MAX_SIZE, pool_timeout_s: float = POOL_TIMEOUT_S):
        """Connect, migrate, and open the pool.

        Raises:
            SpecError: the URL is not a valid libpq connection string.
            CMDBError: the server cannot be reached or refused the connection (libpq's reason),
                or the database is from a newer fcrun.
        """
        super().__init__()
        self.url = url
        self.where = mask_url(url)
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise SpecError(f"CMDB URL {self.where!r} is invalid: {_reason(exc)}", "cmdb.url") from None
        self._pool = Connections(url, self.where, max_size=pool_max_size, timeout_s=pool_timeout_s)
        try:
            with _db_errors("open", self.where), self._pool.connection() as conn, conn.cursor() as cur:
                cur.execute(TAKE_LOCK, (MIGRATION_LOCK,))
                self.schema_found = migrate(cur, "postgresql")
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        self._pool.close()

    def _insert_event_with_id(self, cur: Any, event: Event) -> None:
        cur.execute(INSERT_EVENT_WITH_ID, event_row(event))
        cur.execute(ADVANCE_EVENT_IDS, (event.id,))  # the dump's events come in id order

    def listen_app_changes(self) -> "AppChanges":
        """A connection that hears every committed change to the apps (LISTEN).

        Raises:
            CMDBError: the server cannot be reached.
        """
        return AppChanges(self.url, self.where)

    # -- transactions ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self, operation: str, *, apps: bool = False) -> Iterator[psycopg.Cursor]:
        """One write transaction at READ COMMITTED: all of it commits, or none of it. A change
        to the apps (`apps`) first waits for APPS_LOCK."""
        with _db_errors(operation, self.where), self._pool.connection() as conn:
            with conn.cursor() as cur:
                if apps:
                    cur.execute(TAKE_LOCK, (APPS_LOCK,))
                yield cur
                if apps:  # delivered at commit, and only if it commits
                    cur.execute(NOTIFY_APPS_CHANGED)

    def _lock_app_instances(self, cur: psycopg.Cursor, app: str) -> None:
        cur.execute(TAKE_APP_INSTANCES_LOCK, (INSTANCES_LOCK_NS, app))

    @contextlib.contextmanager
    def _read(self, operation: str) -> Iterator[psycopg.Cursor]:
        """One read snapshot: every statement inside sees the same committed state."""
        with _db_errors(operation, self.where), self._pool.connection(read_only=True) as conn:
            with conn.cursor() as cur:
                yield cur


class Connections:
    """Open connections to one database, reused from call to call (see the module docstring).

    Resource handling: `close()` closes the idle ones; one in use is closed when it comes back.
    """

    def __init__(self, url: str, where: str, *, max_size: int, timeout_s: float):
        self.url = url
        self.where = where
        self.timeout_s = timeout_s
        self.max_size = max_size
        self._idle: list[psycopg.Connection] = []  # the most recently used last: it is taken first
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_size)
        self._closed = False

    @contextlib.contextmanager
    def connection(self, *, read_only: bool = False) -> Iterator[psycopg.Connection]:
        """A connection inside one transaction: committed when the block ends, rolled back if it
        raises. Read-only ones are REPEATABLE READ (one snapshot), others READ COMMITTED.

        Raises:
            CMDBError: every connection stayed busy for `timeout_s`.
            psycopg.Error: connecting failed (libpq's reason), or the transaction did.
        """
        if not self._slots.acquire(timeout=self.timeout_s):
            raise CMDBUnavailable(f"CMDB {self.where}: all {self.max_size} connections stayed busy for "
                            f"{self.timeout_s:g} s")
        try:
            with contextlib.ExitStack() as stack:
                conn = self._begin(stack, read_only)
                yield conn
        finally:
            self._slots.release()

    def _begin(self, stack: contextlib.ExitStack, read_only: bool) -> psycopg.Connection:
        """A connection in a new transaction; its end (and the connection's return) on `stack`."""
        while True:
            conn, pooled = self._take()
            try:
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ if read_only else None
                conn.read_only = True if read_only else None  # None: the server's default
                transaction = conn.transaction()
                transaction.__enter__()  # BEGIN: nothing of the call has run yet
            except psycopg.OperationalError:
                self._give_back(conn)  # broken: closed, not kept
                if pooled:
                    continue  # the server closed it while idle (a restart): a new one
                raise
            stack.callback(self._give_back, conn)
            stack.push(transaction)  # commits, or rolls back on an exception
            return conn

    def _take(self) -> tuple[psycopg.Connection, bool]:
        """An idle connection (True) or a new one (False)."""
        with self._lock:
            if self._closed:
                raise CMDBError(f"CMDB {self.where} is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is not None and not conn.closed and not conn.broken:
            return conn, True
        if conn is not None:
            conn.close()
        return psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S, cursor_factory=QmarkCursor), False

    def _give_back(self, conn: psycopg.Connection) -> None:
        usable = not conn.closed and not conn.broken and conn.info.transaction_status == pq.TransactionStatus.IDLE
        with self._lock:
            if usable and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class AppChanges:
    """One LISTENing connection of its own (never the pool's: a pooled one may sit in a
    transaction, and LISTEN belongs to the session).

    `wait` runs in one worker thread at a time; `close` may come from another (serve's loop,
    when the task that waits is cancelled) and is then done by `wait` when it returns.

    Resource handling: `close()` closes the connection.
    """

    def __init__(self, url: str, where: str):
        self.where = where
        self._lock = threading.Lock()  # held while waiting
        self._close_requested = False
        with _db_errors("listen for app changes", where):
            self._conn = psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True)
            try:
                self._conn.execute(f"LISTEN {APPS_CHANNEL}")
            except BaseException:
                self._conn.close()
                raise

    def wait(self, timeout_s: float) -> bool:
        """Whether some app changed within `timeout_s` (all notifications waiting are taken).

        Raises:
            CMDBError: the connection broke (the server stopped, the network failed).
        """
        with self._lock, _db_errors("listen for app changes", self.where):
            try:
                if self._close_requested or self._conn.closed:
                    raise CMDBError(f"listen for app changes in CMDB {self.where}: closed")
                heard = any(True for _ in self._conn.notifies(timeout=timeout_s, stop_after=1))
                if heard:  # a burst of changes is one re-read
                    for _ in self._conn.notifies(timeout=0):
                        pass
                return heard
            finally:
                if self._close_requested:
                    self._conn.close()

    def close(self) -> None:
        self._close_requested = True
        if self._lock.acquire(blocking=False):  # else `wait` closes it on its way out
            try:
                self._conn.close()
            finally:
                self._lock.release()


@contextlib.contextmanager
def _db_errors(operation: str, where: str) -> Iterator[None]:
    try:
        yield
    except psycopg.OperationalError as exc:  # connecting failed, or the connection broke
        raise CMDBUnavailable(f"{operation} in CMDB {where}: {_reason(exc)}") from None
    except psycopg.Error as exc:
        raise CMDBError(f"{operation} in CMDB {where}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """libpq's message on one line (it spreads one over several, with tabs and hints)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
