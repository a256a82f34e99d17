"""A private PostgreSQL server for tests: initdb in a new temporary directory, listening only on
a unix socket there (no TCP port to collide with), stopped and removed afterwards.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system user
(Debian's package makes it) and owns its directory. The binaries are Debian's
(``apt-get install postgresql``, which scripts/setup.sh does); without them the tests that
need a server skip, saying so.

Use `PgServer.start()` / `stop()`, or the pytest fixtures `pg_server` (one server per test
session) and `pg_url` (a new, empty database per test).
"""

from __future__ import annotations

import glob
import ipaddress
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile

import pytest

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PG_USER = "postgres"  # the superuser role initdb makes, and (as root) the system user that runs it
PASSWORD_ROLE = "fcrun_password_user"  # must give a password (pg_hba.conf); none other does
DIR_PREFIX = "fcrun-pg-"
OWNER_FILE = "owner.pid"  # the test process that started the server in this directory
PORT = 5432  # only names the socket file (.s.PGSQL.5432) in our private directory


def pg_bindir() -> str | None:
    """The newest installed PostgreSQL's bin directory (with initdb and pg_ctl), or None."""
    found = [d for d in glob.glob(PG_BIN_GLOB) if os.path.exists(os.path.join(d, "pg_ctl"))]
    found.sort(key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
    return found[-1] if found else None


def reap_stale(bindir: str) -> list[str]:
    """Stop and remove the servers of test runs that died without cleaning up (a killed pytest
    runs no finalizer): directories whose owner process is gone. Returns them."""
    reaped = []
    for directory in glob.glob(os.path.join(tempfile.gettempdir(), DIR_PREFIX + "*")):
        try:
            with open(os.path.join(directory, OWNER_FILE)) as f:
                owner = int(f.read())
        except (OSError, ValueError):
            continue  # not ours, or being made right now
        if os.path.exists(f"/proc/{owner}"):
            continue
        server = PgServer(bindir)
        server.dir = directory
        server.stop()
        reaped.append(directory)
    return reaped


class PgServer:
    """One postgres process on a unix socket in its own temporary directory.

    Resource handling: `stop()` stops the server (pg_ctl stop -m fast) and removes the directory.
    """

    def __init__(self, bindir: str, *, fsync: bool = False, listen: str = ""):
        self.bindir = bindir
        self.fsync = fsync  # off for tests (a crash of the host is not what they test); on to measure
        # An IPv4 address to listen on over TCP as well (port PORT), trusted from its /24: the
        # test LAN of tests/root/cluster.py, whose hosts are other network namespaces. "" = none.
        self.listen = listen
        self.dir = ""
        self._names = itertools.count(1)

    @property
    def data(self) -> str:
        return os.path.join(self.dir, "data")

    def url(self, database: str = "postgres") -> str:
        if self.listen:
            return f"postgresql://{PG_USER}@{self.listen}:{PORT}/{database}?sslmode=disable"
        return f"postgresql://{PG_USER}@/{database}?host={self.dir}&port={PORT}"

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as_owner(), *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}")

    def start(self) -> "PgServer":
        reap_stale(self.bindir)
        self.dir = tempfile.mkdtemp(prefix=DIR_PREFIX)
        try:
            with open(os.path.join(self.dir, OWNER_FILE), "w") as f:
                f.write(str(os.getpid()))
            if os.geteuid() == 0:
                owner = pwd.getpwnam(PG_USER)
                os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", PG_USER, "--auth=trust",
                      "--no-sync", "-E", "UTF8", "--locale=C")
            # Trust for everyone but PASSWORD_ROLE, which the tests of wrong credentials use.
            with open(os.path.join(self.data, "pg_hba.conf"), "w") as f:
                f.write(f"local all {PASSWORD_ROLE} scram-sha-256\nlocal all all trust\n")
                if self.listen:
                    f.write(f"host all all {ipaddress.ip_network(self.listen + '/24', strict=False)} trust\n")
            self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", os.path.join(self.dir, "log"),
                      "-o", self._options(), "-w", "-t", "60", "start")
        except BaseException:
            self.stop()
            raise
        return self

    def _options(self) -> str:
        return (f"-c listen_addresses='{self.listen}' -c unix_socket_directories='{self.dir}' -p {PORT} "
                f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=100")

    def restart_stopped(self) -> None:
        """Start again a server that `kill()` stopped (same directory, same socket)."""
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", os.path.join(self.dir, "log"),
                  "-o", self._options(), "-w", "-t", "60", "start")

    def kill(self) -> None:
        """``pg_ctl stop -m immediate``: as a crash would, without a shutdown checkpoint."""
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")

    def new_database(self) -> str:
        """The URL of a new, empty CMDB: a schema of its own in the one database, first in the
        URL's search_path (a schema is made in a millisecond, CREATE DATABASE takes ~0.5 s)."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.url()}&options=-csearch_path%3D{name}"

    def _postmaster_alive(self) -> bool:
        """Whether the postmaster named in the data directory's postmaster.pid still runs. A
        server that died with its machine (power loss, VM restart) leaves the file behind naming a
        pid that is gone or now another program's; pg_ctl stop fails on it ("No such process")."""
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                pid = int(f.readline())
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip() == "postgres"
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        if not self.dir:
            return
        try:
            if self._postmaster_alive():
                self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""


@pytest.fixture(scope="session")
def pg_server():
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip(f"PostgreSQL is not installed (no pg_ctl under {PG_BIN_GLOB}): apt-get install postgresql, "
                    "as scripts/setup.sh does")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install -e '.[test]' (scripts/setup.sh)")
    server = PgServer(bindir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server):
    return pg_server.new_database()
