"""The configuration management DB (CMDB): apps, their instances and events.

`open_cmdb(paths)` gives the CMDB `fcrun serve` and `fcrun app` share: SQLite in WAL mode at
``<data root>/cmdb.sqlite3``. Everything else sees only the `CMDB` protocol (base.py), so a
PostgreSQL implementation can take its place.
"""

from ..hostnames import normalize_host, normalize_hostname
from ..paths import Paths
from .base import CMDB, CMDBError, CorruptApp
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
from .sqlite import CMDB_FILE, SqliteCMDB


def open_cmdb(paths: Paths) -> CMDB:
    """The CMDB under `paths.data_root`, created and migrated on first use.

    Raises:
        KernelError: the data root or the file cannot be created.
        CMDBError: the database is unreadable, locked, or from a newer fcrun.
    """
    return SqliteCMDB.open(paths)


__all__ = [
    "App", "AppDefaults", "AppStats", "AppUpdate", "CMDB", "CMDBError", "CMDB_FILE", "CorruptApp", "Event", "Instance",
    "InstanceCounts", "NewApp", "Scale", "SqliteCMDB", "normalize_host", "normalize_hostname", "open_cmdb",
    "validate_app",
]
