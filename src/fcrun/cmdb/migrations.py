"""The CMDB schema as an ordered list of migrations, applied when a database is opened.

The SQL is portable (SQLite and PostgreSQL read it the same) except for what `DIALECTS`
fills in. The schema version lives in a one-row ``schema_version`` table rather than SQLite's
``PRAGMA user_version``, for the same reason. Migrations only ever get appended: a database
at version N runs migrations N+1.. in one transaction, so a crash leaves it at N.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import CMDBError

# What SQLite and PostgreSQL spell differently.
DIALECTS: dict[str, dict[str, str]] = {
    "sqlite": {"serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT",
               "now": "((julianday('now') - 2440587.5) * 86400.0)"},
    # The database server's clock, not the caller's: serves on several hosts compare heartbeats.
    "postgresql": {"serial_pk": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
                   "now": "EXTRACT(EPOCH FROM clock_timestamp())::DOUBLE PRECISION"},
}


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "apps, hostnames, instances, events", (
        """CREATE TABLE apps (
            name TEXT PRIMARY KEY,
            image TEXT NOT NULL,
            env TEXT NOT NULL,
            docroot TEXT,
            cpu DOUBLE PRECISION NOT NULL,
            cpu_max DOUBLE PRECISION,
            memory_bytes BIGINT NOT NULL,
            min_instances INTEGER NOT NULL,
            max_instances INTEGER NOT NULL,
            target_concurrency INTEGER NOT NULL,
            idle_timeout_s DOUBLE PRECISION NOT NULL,
            freeze_after_s DOUBLE PRECISION,
            max_lifetime_s DOUBLE PRECISION,
            cooldown_up_s DOUBLE PRECISION NOT NULL,
            cooldown_down_s DOUBLE PRECISION NOT NULL,
            max_body_bytes BIGINT,
            port INTEGER,
            autoscale BOOLEAN NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            generation INTEGER NOT NULL
        )""",
        # Every hostname of an app, its name included (position 0), so that the primary key
        # makes a hostname belong to one app only and a Host lookup is one index probe.
        """CREATE TABLE app_hostnames (
            hostname TEXT PRIMARY KEY,
            app TEXT NOT NULL REFERENCES apps (name) ON DELETE CASCADE,
            position INTEGER NOT NULL
        )""",
        "CREATE INDEX app_hostnames_app ON app_hostnames (app)",
        # No foreign key to apps: an instance outlives its app's row while it drains.
        """CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            app TEXT NOT NULL,
            container TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('starting', 'ready', 'draining', 'frozen', 'stopped')),
            ip TEXT NOT NULL,
            port INTEGER NOT NULL,
            cpu DOUBLE PRECISION,
            started_at DOUBLE PRECISION NOT NULL,
            last_request_at DOUBLE PRECISION,
            requests BIGINT NOT NULL
        )""",
        "CREATE INDEX instances_app ON instances (app)",
        """CREATE TABLE events (
            id {serial_pk},
            ts DOUBLE PRECISION NOT NULL,
            app TEXT,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX events_app ON events (app, id)",
    )),
    Migration(2, "apps: pids limit and seccomp profile of their instances", (
        "ALTER TABLE apps ADD COLUMN pids_max INTEGER",
        "ALTER TABLE apps ADD COLUMN seccomp TEXT NOT NULL DEFAULT 'default'",
    )),
    # Several serves may share one database (PostgreSQL): each removes only its own rows at
    # start-up. '' marks rows written before owners existed (one serve per database then).
    Migration(3, "instances: the serve (node) that runs each", (
        "ALTER TABLE instances ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
    )),
    # A serve sharing the database beats here every few seconds; a claim counts another owner's
    # instances only while its heartbeat is fresh (a serve that died frees its share).
    Migration(4, "nodes: the heartbeat of each serve sharing the database", (
        """CREATE TABLE nodes (
            name TEXT PRIMARY KEY,
            heartbeat_at DOUBLE PRECISION NOT NULL
        )""",
    )),
    # serve retries a write whose connection broke, and the break may have come after the
    # server committed it: an event carries the writer's token, so its retry is not a second row.
    Migration(5, "events: the writer's token, unique, so a retried write is recorded once", (
        "ALTER TABLE events ADD COLUMN token TEXT",
        "CREATE UNIQUE INDEX events_token ON events (token)",
    )),
    # NULL: an instance is ready once it accepts connections, as before.
    Migration(6, "apps: an HTTP path that must answer 2xx/3xx before an instance is ready", (
        "ALTER TABLE apps ADD COLUMN ready_path TEXT",
    )),
    # Several hosts (cluster/): a node says where fronts reach it and what it has free; an
    # operator's cordon or drain is kept apart from liveness (the heartbeat's age), so that it
    # survives the node's restarts. A placement says which nodes an app's requests go to.
    Migration(7, "nodes: role, address, admin state, figures; placements of apps on nodes", (
        "ALTER TABLE nodes ADD COLUMN role TEXT NOT NULL DEFAULT 'all'",
        "ALTER TABLE nodes ADD COLUMN address TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE nodes ADD COLUMN admin_state TEXT NOT NULL DEFAULT 'up'",
        "ALTER TABLE nodes ADD COLUMN figures TEXT NOT NULL DEFAULT '{{}}'",
        "ALTER TABLE nodes ADD COLUMN started_at DOUBLE PRECISION",
        """CREATE TABLE placements (
            app TEXT NOT NULL,
            node TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('active', 'leaving')),
            since DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (app, node)
        )""",
        "CREATE INDEX placements_node ON placements (node)",
    )),
)

LATEST_VERSION = MIGRATIONS[-1].version

CREATE_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
SELECT_VERSION = "SELECT version FROM schema_version"
INSERT_VERSION = "INSERT INTO schema_version (version) VALUES (0)"
UPDATE_VERSION = "UPDATE schema_version SET version = ?"


def migrate(cursor, dialect: str = "sqlite") -> int:
    """Bring the schema to LATEST_VERSION; returns the version found before.

    The caller holds a write transaction (so two processes opening a new database do not
    both create it) and commits it.

    Raises:
        CMDBError: the database was written by a newer fcrun.
    """
    names = DIALECTS[dialect]
    cursor.execute(CREATE_VERSION_TABLE)
    row = cursor.execute(SELECT_VERSION).fetchone()
    if row is None:
        cursor.execute(INSERT_VERSION)
        found = 0
    else:
        found = int(row[0])
    if found > LATEST_VERSION:
        raise CMDBError(
            f"the CMDB has schema version {found}, newer than this fcrun knows ({LATEST_VERSION}): upgrade fcrun"
        )
    for migration in MIGRATIONS:
        if migration.version > found:
            for statement in migration.statements:
                cursor.execute(statement.format(**names))
            cursor.execute(UPDATE_VERSION, (migration.version,))
    return found
