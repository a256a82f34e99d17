"""The configuration management DB (CMDB): apps, their instances and events.

`open_cmdb(paths, url)` gives the CMDB `fcrun serve` and `fcrun app` share: by default SQLite in
WAL mode at ``<data root>/cmdb.sqlite3`` (sqlite.py); with a ``postgresql://`` URL a PostgreSQL
database that several hosts share (postgres.py). Everything else sees only the `CMDB`
protocol (base.py), which both implement with the same SQL (sql.py).
"""

from ..hostnames import normalize_host, normalize_hostname
from ..paths import Paths
from .base import CMDB, CMDBError, CMDBUnavailable, CorruptApp
from .models import (
    App,
    AppDefaults,
    AppStats,
    AppUpdate,
    Event,
    Instance,
    InstanceCounts,
    NewApp,
    Scale,
    validate_app,
)
from .sql import Dump
from .sqlite import CMDB_FILE, SqliteCMDB
from .url import mask_url, sqlite_path, url_scheme


def open_cmdb(paths: Paths, url: str | None = None) -> CMDB:
    """The CMDB that `url` names (url.py), else the one under `paths.data_root`; created and
    migrated on first use.

    Raises:
        SpecError: the URL is not one fcrun knows, or not valid.
        KernelError: the data root or the file cannot be created.
        CMDBError: the database is unreadable, locked, unreachable, or from a newer fcrun.
    """
    if not url:
        return SqliteCMDB.open(paths)
    if url_scheme(url) == "sqlite":
        return SqliteCMDB(sqlite_path(url))
    try:
        from .postgres import PostgresCMDB  # psycopg is imported only by those who use it
    except ImportError as exc:
        raise CMDBError(f"CMDB {mask_url(url)}: the PostgreSQL CMDB needs psycopg ({exc}): "
                        "pip install 'fcrun[postgresql]'") from None
    return PostgresCMDB(url)


__all__ = [
    "App", "AppDefaults", "AppStats", "AppUpdate", "CMDB", "CMDBError", "CMDBUnavailable", "CMDB_FILE", "CorruptApp", "Dump", "Event", "Instance",
    "InstanceCounts", "NewApp", "Scale", "SqliteCMDB", "normalize_host", "normalize_hostname", "open_cmdb",
    "mask_url", "validate_app",
]
