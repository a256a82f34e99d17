"""The CMDB on embedded SQLite: one file under the data root, in WAL mode.

One connection per CMDB object, guarded by a lock, so the asyncio server, its worker threads
and the CLI can share it. Writes run in explicit ``BEGIN IMMEDIATE`` transactions (the write
lock is taken up front, so two writers queue on the busy timeout instead of failing on lock
upgrade); reads of more than one statement run in one deferred transaction for a consistent
snapshot. Other processes (`fcrun app` while `fcrun serve` runs) read and write the same file.

The statements and the protocol's methods are portable SQL shared with PostgreSQL (sql.py);
what is SQLite's own is here: the connection, its PRAGMAs, the transactions and the errors.

Durability: WAL with ``synchronous = FULL``, so a write that returned is on disk: the WAL is
fsynced at every commit (NORMAL would sync it only at checkpoints, and a power loss could
take back an `fcrun app add` that had already answered). Commits are a few per scale action,
never one per request (serve's request counters live in memory), so the fsync costs nothing
that matters. A full disk fails the write that needed the space, with a "no space left"
error naming the file; the transaction is rolled back and every earlier row stays.

Corrupt content is contained (sql.py says how for rows). A file that is not an SQLite
database, or whose pages are damaged, is a CMDBError naming the file when it is opened or read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from typing import Iterator

from ..errors import KernelError
from ..paths import Paths
from .base import CMDBError
from .migrations import migrate
from .models import Event
from .sql import SqlCMDB, event_row

log = logging.getLogger(__name__)

CMDB_FILE = "cmdb.sqlite3"
BUSY_TIMEOUT_S = 5.0

INSERT_EVENT_WITH_ID = "INSERT INTO events (id, ts, app, kind, message, data) VALUES (?, ?, ?, ?, ?, ?)"


class SqliteCMDB(SqlCMDB):
    """The CMDB in one SQLite file (see the module docstring for locking).

    Raises (from every method, besides those the CMDB protocol names):
        CMDBError: the database is locked past the busy timeout, corrupt or unreadable.

    Resource handling: holds one connection until `close()`; usable as a context manager.
    """

    dialect = "sqlite"

    def __init__(self, path: str, *, busy_timeout_s: float = BUSY_TIMEOUT_S):
        super().__init__()
        self.path = path
        self.where = path
        self._lock = threading.Lock()
        self._conn = _connect(path, busy_timeout_s)
        try:
            with self._write("open") as cur:
                self.schema_found = migrate(cur, "sqlite")
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

    def _insert_event_with_id(self, cur: sqlite3.Cursor, event: Event) -> None:
        # AUTOINCREMENT: sqlite_sequence follows the largest id inserted, so new ids go on from it.
        cur.execute(INSERT_EVENT_WITH_ID, event_row(event))

    # -- transactions ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self, operation: str, *, apps: bool = False) -> Iterator[sqlite3.Cursor]:
        """One write transaction: all of it commits, or (on any exception) none of it. Every
        write takes the database's one write lock (BEGIN IMMEDIATE), so a change to the apps
        (`apps`) needs nothing more to be serialised.

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
