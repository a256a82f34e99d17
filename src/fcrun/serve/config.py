"""`fcrun serve`'s configuration: a TOML file decoded into msgspec Structs.

Every option has a default, so `fcrun serve` runs with no file at all. The file is
``--config`` (env FCRUN_CONFIG), else /etc/fcrun/fcrun.toml when it exists
(packaging/fcrun.toml.example lists every key with its default: config_example.py). A file
names only what it changes::

    listen = "0.0.0.0:80"
    hold_timeout_s = 20
    docroot_roots = ["/srv", "/var/www"]   # apps' docroots must lie under one of these

    [proxy]
    max_header_bytes = 16384

    [defaults]          # what `fcrun app add` gives a new app unless told otherwise
    cpu = 0.3
    memory_bytes = 536870912

Unknown keys and wrong types are errors that name the file and the key
(``fcrun.toml: unknown key `max_header_byte` (at $.proxy.max_header_byte)``).
"""

from __future__ import annotations

import os
import socket
import tomllib

import msgspec

from ..cmdb.models import AppDefaults, check_defaults
from ..cmdb.nodes import ROLES
from ..constraints import MachineCpu, MemoryBytes, PoolSize, PositiveCount, PositiveSeconds, spec_error
from ..docroot import DEFAULT_DOCROOT_ROOTS, check_roots
from ..errors import KernelError, NotFound, SpecError
from ..proxy.config import ProxyConfig  # the [proxy] table is the proxy's own settings
from ..paths import DEFAULT_BRIDGE, DEFAULT_CGROUP_PARENT, DEFAULT_SUBNET, Paths
from ..units import is_decimal
from .admin_protocol import AdminLimits, is_loopback, server_tls_context

ADMIN_SOCKET_NAME = "admin.sock"  # under the run root unless admin_socket says otherwise
DEFAULT_CONFIG_PATH = "/etc/fcrun/fcrun.toml"  # read when present and no other file is named
ADMIN_LIMITS = AdminLimits()  # the admin_* bounds' defaults


class RuntimeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Where instances' state lives and which network they join. Empty roots: from the
    environment (FCRUN_ROOT, FCRUN_RUN) or the defaults; `load_config` fills them in."""

    data_root: str = ""
    run_root: str = ""
    cgroup_parent: str = DEFAULT_CGROUP_PARENT
    bridge: str = DEFAULT_BRIDGE
    subnet: str = DEFAULT_SUBNET


class ForkServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The fork-server that makes instances, and its pool of pre-warmed ones (``[forkserver]``).

    Apps a pooled instance can serve (a docroot, no environment or port of their own) get one
    on a cold start instead of a new container; each image such apps use gets `pool_size`
    pooled instances (or `pool_sizes[image]`).
    """

    enabled: bool = True  # false: serve makes instances itself, and there is no pool
    pool_size: PoolSize = 2
    pool_sizes: dict[str, PoolSize] = {}
    pool_cpu: MachineCpu = 1.0  # while warming and waiting; a claim sets the app's
    pool_memory_bytes: MemoryBytes = 512 << 20
    pool_max_age_s: PositiveSeconds = 600.0  # pooled instances older than this are replaced


class CMDBConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Which CMDB serve and `fcrun app` use (``[cmdb]``): a URL (fcrun.cmdb.url), or none for
    ``<data root>/cmdb.sqlite3``. ``fcrun --cmdb URL`` (env FCRUN_CMDB) overrides it."""

    url: str | None = None  # postgresql://USER:PASSWORD@HOST/DB, or sqlite:///PATH
    events_keep_days: float = 30.0  # older events are removed (serve/retention.py); 0: kept for ever


class ClusterConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Which part of a cluster this serve is, and what it offers (docs/cluster.md).

    ``node`` and ``front`` need a shared CMDB (``[cmdb] url = "postgresql://..."``)."""

    role: str = "all"  # all: one host; node: compute; front: proxy only (checked: a clear message)
    node_name: str = ""  # "": <hostname>:<run root> (a front: <hostname>:front:<listen>)
    advertise: str = ""  # a node's HOST:PORT that fronts forward to; "": listen, unless it is 0.0.0.0
    cpu_capacity: MachineCpu | None = None  # CPUs a node offers; None: all of the machine's
    memory_capacity_bytes: MemoryBytes | None = None  # None: the machine's MemTotal
    memory_overcommit: float = 1.0  # placement: memory limits add up to capacity x this, never more
    cpu_overcommit: float = 4.0  # placement: CPU quotas add up to capacity x this


class ServeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Everything `fcrun serve` can be told. Build it with `load_config`, which checks it."""

    listen: str = "0.0.0.0:8080"  # the HTTP proxy
    admin_socket: str = ""  # root-only unix socket of the admin API; "": <run_root>/admin.sock
    admin_listen: str | None = None  # optional TCP admin listener, e.g. "127.0.0.1:8081"
    admin_token: str | None = None  # bearer token the TCP listener requires
    # TLS for the TCP admin listener: PEM certificate (chain) and unencrypted key, both or
    # neither, absolute paths; loaded and checked with the file (admin_protocol.py).
    admin_tls_cert: str | None = None
    admin_tls_key: str | None = None
    # A TCP admin listener on a non-loopback address must have TLS (the token would cross the
    # network in clear text) unless this says the path is trusted (a private link, a TLS proxy).
    admin_allow_plaintext: bool = False
    # Bounds on each admin connection, on every admin and metrics listener (admin_server.py).
    admin_max_connections: PositiveCount = ADMIN_LIMITS.max_connections  # per listener; more: refused
    admin_keepalive_timeout_s: PositiveSeconds = ADMIN_LIMITS.keepalive_timeout_s  # idle between requests
    admin_header_timeout_s: PositiveSeconds = ADMIN_LIMITS.header_timeout_s  # a head, a TLS handshake
    admin_body_timeout_s: PositiveSeconds = ADMIN_LIMITS.body_timeout_s
    admin_max_body_bytes: PositiveCount = ADMIN_LIMITS.max_body_bytes
    # Read-only listener for Prometheus: GET /metrics only. Its token (none: open) is never the
    # admin token and authorizes nothing else; metrics_tls serves it with admin_tls_cert/key.
    metrics_listen: str | None = None  # e.g. "127.0.0.1:9108"
    metrics_token: str | None = None
    metrics_tls: bool = False
    hold_timeout_s: PositiveSeconds = 30.0  # how long a request waits for a cold start before 504
    drain_timeout_s: PositiveSeconds = 10.0  # how long a stopping instance's requests may take
    metrics_interval_s: PositiveSeconds = 10.0  # how often instances' cgroup CPU time is sampled
    # An app's docroot must lie strictly under one of these (docroot.py): checked by the admin
    # API when it is set, and by the fork-server each time it is mounted.
    docroot_roots: tuple[str, ...] = DEFAULT_DOCROOT_ROOTS
    proxy: ProxyConfig = ProxyConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    defaults: AppDefaults = AppDefaults()
    forkserver: ForkServerConfig = ForkServerConfig()
    cmdb: CMDBConfig = CMDBConfig()
    cluster: ClusterConfig = ClusterConfig()

    @property
    def paths(self) -> Paths:
        return Paths(data_root=self.runtime.data_root, run_root=self.runtime.run_root)


def default_config_path(path: str | None, default: str | None = None) -> str | None:
    """The file to read: `path` (``--config``, FCRUN_CONFIG) when given, else `default` when
    it exists, else None (the built-in defaults). A named file that is missing stays an error
    (load_config), a missing default file does not."""
    if path:
        return path
    default = default or DEFAULT_CONFIG_PATH  # looked up now, so tests can point it elsewhere
    return default if os.path.exists(default) else None


def load_config(path: str | None = None, paths: Paths | None = None) -> ServeConfig:
    """Read, check and complete the configuration.

    `path` None: the defaults. Empty roots in the file are taken from `paths` (default:
    FCRUN_ROOT / FCRUN_RUN or the built-in roots), and an empty admin_socket becomes
    ``<run_root>/admin.sock``.

    Raises:
        NotFound: the file does not exist.
        KernelError: it cannot be read.
        SpecError: it is not TOML, or a key is unknown, mistyped or out of range (named: the
            ranges are the fields' types, constraints.py, checked as the file is decoded).
    """
    source = path or "configuration"
    raw = _read_toml(path) if path is not None else {}
    try:
        config = msgspec.convert(raw, ServeConfig)
    except msgspec.ValidationError as exc:
        raise spec_error(exc, source) from None
    check_config(config, source)

    paths = paths or Paths.from_env()
    runtime = msgspec.structs.replace(
        config.runtime,
        data_root=config.runtime.data_root or paths.data_root,
        run_root=config.runtime.run_root or paths.run_root,
    )
    admin_socket = config.admin_socket or os.path.join(runtime.run_root, ADMIN_SOCKET_NAME)
    return msgspec.structs.replace(config, runtime=runtime, admin_socket=admin_socket)


def check_config(config: ServeConfig, source: str = "configuration") -> None:
    """What the fields' types cannot say: addresses, absolute paths, a token the TCP admin
    listener needs, docroot roots, and the app defaults' rules.

    Raises:
        SpecError: naming the first key that breaks one.
    """

    def fail(message: str, key: str) -> None:
        raise SpecError(f"{source}: {message}", f"$.{key}")

    for key in ("listen", "admin_listen", "metrics_listen"):
        value = getattr(config, key)
        if value is not None:
            try:
                parse_address(value, key)
            except SpecError as exc:
                fail(_bare(exc), key)
    if config.admin_listen is not None and not config.admin_token:
        fail("admin_token is required when admin_listen is set (the TCP admin API needs a bearer token)",
             "admin_token")
    for key in ("admin_token", "metrics_token"):
        token = getattr(config, key)
        # A client sends it in an Authorization header: a space (or the blank the server strips
        # from what it is sent) or a non-ASCII character would make a token nobody can send.
        if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
            fail(f"{key} must be printable ASCII without spaces (a client sends it in an HTTP header)", key)
    _check_admin_tls_and_metrics(config, fail)
    if config.admin_socket and not os.path.isabs(config.admin_socket):
        fail(f"admin_socket {config.admin_socket!r} is not an absolute path", "admin_socket")
    for key in ("data_root", "run_root"):
        value = getattr(config.runtime, key)
        if value and not os.path.isabs(value):
            fail(f"{key} {value!r} is not an absolute path", f"runtime.{key}")
    try:
        check_roots(config.docroot_roots)
    except SpecError as exc:
        fail(_bare(exc), exc.where)
    try:
        check_defaults(config.defaults)
    except SpecError as exc:
        fail(_bare(exc), f"defaults.{exc.where}")
    if not config.cmdb.events_keep_days >= 0:  # (not: NaN too)
        fail(f"events_keep_days must be 0 (keep every event) or more days, not {config.cmdb.events_keep_days}",
             "cmdb.events_keep_days")
    if config.cmdb.url is not None:
        from ..cmdb.url import sqlite_path, url_scheme

        try:
            if url_scheme(config.cmdb.url) == "sqlite":
                sqlite_path(config.cmdb.url)
        except SpecError as exc:
            fail(_bare(exc), "cmdb.url")
    _check_cluster(config, fail)


def _check_admin_tls_and_metrics(config: ServeConfig, fail) -> None:
    """TLS files that load, a non-loopback admin_listen with TLS (or admin_allow_plaintext),
    and a metrics token that is not the admin token."""
    cert, key = config.admin_tls_cert, config.admin_tls_key
    if (cert is None) != (key is None):
        fail("admin_tls_cert and admin_tls_key go together: set both or neither",
             "admin_tls_key" if key is None else "admin_tls_cert")
    if cert is not None:
        if config.admin_listen is None and not config.metrics_tls:
            fail("admin_tls_cert is set but no listener uses it: set admin_listen (or metrics_tls)", "admin_tls_cert")
        try:
            server_tls_context(cert, key)
        except SpecError as exc:
            fail(_bare(exc), exc.where)
    elif config.metrics_tls:
        fail("metrics_tls needs admin_tls_cert and admin_tls_key (the metrics listener uses that certificate)",
             "metrics_tls")
    if config.admin_listen is not None and cert is None and not config.admin_allow_plaintext:
        host, _ = parse_address(config.admin_listen, "admin_listen")
        if not is_loopback(host):
            fail(f"admin_listen {config.admin_listen} is not a loopback address and has no TLS: the admin token "
                 "would cross the network in clear text; set admin_tls_cert and admin_tls_key, or "
                 "admin_allow_plaintext = true if the network path is trusted", "admin_listen")
    if config.metrics_token is not None and config.metrics_listen is None:
        fail("metrics_token is set but metrics_listen is not", "metrics_token")
    if config.metrics_token is not None and config.metrics_token == config.admin_token:
        fail("metrics_token must differ from admin_token: a scrape credential must not be an admin credential",
             "metrics_token")
    if config.metrics_token == "":
        fail("metrics_token is empty: remove it for an open metrics listener, or set a token", "metrics_token")


def _check_cluster(config: ServeConfig, fail) -> None:
    cluster = config.cluster
    if cluster.role not in ROLES:
        fail(f"role {cluster.role!r} is not one of {', '.join(ROLES)}", "cluster.role")
    if cluster.role == "all":
        return
    from ..cmdb.url import url_scheme

    if not config.cmdb.url or url_scheme(config.cmdb.url) != "postgresql":
        fail(f"role {cluster.role} needs a CMDB that every host shares: set [cmdb] url (or fcrun --cmdb) to a "
             "postgresql:// URL", "cluster.role")
    for key in ("memory_overcommit", "cpu_overcommit"):
        if not getattr(cluster, key) > 0:
            fail(f"{key} must be above 0", f"cluster.{key}")
    if cluster.role == "node":
        address = cluster.advertise or config.listen
        try:
            host, _ = parse_address(address, "cluster.advertise")
        except SpecError as exc:
            fail(_bare(exc), "cluster.advertise")
        if host in ("0.0.0.0", "::", ""):
            fail(f"a node must say where fronts reach it: set [cluster] advertise (--advertise HOST:PORT); "
                 f"listen {config.listen} is every address", "cluster.advertise")


def node_name(config: ServeConfig) -> str:
    """This serve's name in the cluster: the owner of its instance rows and its heartbeat's key
    (stable across restarts, so a restarted serve finds its rows)."""
    if config.cluster.node_name:
        return config.cluster.node_name
    if config.cluster.role == "front":
        return f"{socket.gethostname()}:front:{config.listen}"
    return f"{socket.gethostname()}:{config.paths.run_root}"


def advertised_address(config: ServeConfig) -> str:
    return config.cluster.advertise or config.listen


def parse_address(text: str, where: str = "listen") -> tuple[str, int]:
    """'0.0.0.0:8080', '[::]:8080', 'localhost:80' -> (host, port). Port 0: any free port.

    Raises:
        SpecError: no port, or not a number in 0..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not is_decimal(port_text, 5) or int(port_text) > 65535:
        raise SpecError(f"invalid address {text!r}: use HOST:PORT, e.g. 0.0.0.0:8080 or [::]:8080", where)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise NotFound(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise KernelError.from_oserror("read", path, exc) from None


def _bare(exc: SpecError) -> str:
    """The message of a SpecError without its ``(at ...)`` suffix."""
    return exc.message
