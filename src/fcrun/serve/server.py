"""`fcrun serve`: the proxy, the container manager and the admin API in one process.

Start-up: open the CMDB, reconcile what an earlier serve left (adopt reachable instances,
remove the rest), then listen. SIGTERM/SIGINT: stop accepting, let in-flight requests finish,
stop every instance. SIGHUP: re-read the configuration's reloadable parts and the apps.

Every task serve starts belongs to one `TaskOwner` (tasks.py): the proxy, the manager and the
admin API each get a scope of it, closed in the order above; signal handlers only set a flag
or start a job of it. A service that fails (the lifecycle ticker, the monitor) stops serve,
which then exits non-zero. One clock, injected, serves every deadline of the manager and
the backend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import time
from typing import Callable

from ..cgroups import enter_supervisor
from ..cmdb import open_cmdb
from ..cmdb.base import CMDB, NODE_LEASE_S, CMDBError
from ..cmdb.models import App
from ..errors import FcrunError
from ..forkserver import Supervisor
from ..logs.serverlog import LOG_FORMAT_ENV, AccessLog, configure
from ..proxy.server import ProxyServer
from ..runtime import criu
from ..runtime.lifecycle import Runtime
from .admin_server import AdminServer, admin_options
from .appwatch import AppWatch
from .backend import RuntimeBackend
from ..cluster.node import Capacity, NodeAgent
from ..cluster.placement import Policy
from .config import ServeConfig, advertised_address, check_config, default_config_path, load_config, node_name
from .config import parse_address
from .controller import ManagedController
from .dashboard_page import make_dashboard
from .manager import Manager
from .records import Recorder
from .reload import changed_keys, classify, with_live
from .retention import trim_events_forever
from .sdnotify import Notifier, watchdog_interval_s
from ..tasks import TaskOwner

log = logging.getLogger("fcrun.serve")

TICK_INTERVAL_S = 0.5  # how often idle and max-lifetime checks run
HEARTBEAT_S = 1.0  # a shared CMDB: how often serve says it is alive (its lease: cmdb.base.NODE_LEASE_S)
FORKSERVER_SOCKET_NAME = "forkserver.sock"  # under the run root
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ServeFailed(FcrunError):
    """A part of serve that must keep running failed; serve stopped (the log says why)."""

    exit_code = 1


class Serve:
    """One running `fcrun serve`. Use `await start()`, then `await run_until_stopped()` (or
    `request_stop()` / `stop()`).

    Resource handling: `stop()` releases everything `start()` made, also after a failed start.
    """

    def __init__(self, config: ServeConfig, config_path: str | None = None, *,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.config_path = config_path
        self.access_log: AccessLog | None = None  # fcrun.logs.serverlog, when [proxy] access_log
        # The file's values as serve applies them: a reload diffs the file against this, not
        # against `config`, which command-line overrides (--listen, --cmdb) may have changed.
        self.file_config = config
        self.notifier = Notifier()
        self.controller: ManagedController | None = None
        self.clock = clock
        rc = config.runtime
        self.runtime = Runtime(config.paths, cgroup_parent=rc.cgroup_parent, bridge=rc.bridge, subnet=rc.subnet,
                               docroot_roots=config.docroot_roots)
        self.tasks = TaskOwner("serve", on_failure=lambda exc: self.request_stop())
        self.cmdb: CMDB | None = None
        self.records: Recorder | None = None
        self.backend: RuntimeBackend | None = None
        self.forkserver: Supervisor | None = None
        self.manager: Manager | None = None
        self.proxy: ProxyServer | None = None
        self.admin: AdminServer | None = None
        self._ticker: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._sampler: asyncio.Task | None = None  # the dashboard's, one sample a second
        self._heartbeat: asyncio.Task | None = None  # the heartbeat, or a node's agent (which beats)
        self.agent: NodeAgent | None = None
        self._beat_failing = False
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        cfg = self.config
        self.cmdb = await asyncio.to_thread(open_cmdb, cfg.paths, cfg.cmdb.url)
        node = node_name(cfg)
        self.records = Recorder(self.cmdb, self.tasks.scope("records"), node=node)
        apps = await asyncio.to_thread(self.cmdb.list_apps)
        if cfg.forkserver.enabled:
            self.forkserver = self._make_supervisor(apps)
            await self.forkserver.start()
        self.backend = RuntimeBackend(self.runtime, forkserver=self.forkserver, clock=self.clock)
        # A CMDB other serves share: they count each other's instances against an app's max,
        # and a share is held only while its serve's heartbeat is fresh.
        shared = bool(getattr(self.cmdb, "shared", False))
        if shared and cfg.cluster.role == "all":
            await self._beat(node)
            self._heartbeat = self.tasks.spawn_service(self._beat_forever(node), name="CMDB heartbeat")
        self.manager = Manager(self.cmdb, self.backend, hold_timeout_s=cfg.hold_timeout_s,
                               drain_timeout_s=cfg.drain_timeout_s, clock=self.clock,
                               tasks=self.tasks.scope("manager"), records=self.records, apps=apps, claims=shared)
        self.manager.on_apps_reloaded = self._apps_reloaded
        self._set_access_log(cfg.proxy.access_log)  # apply_live on SIGHUP
        if AppWatch.wanted(self.cmdb):  # a shared CMDB: others change apps too
            watch = AppWatch(self.cmdb, self.manager.reload_apps, self.records.event)
            self._watch = self.tasks.spawn_service(watch.run(), name="CMDB app changes")
        self.proxy = ProxyServer(self.manager, cfg.proxy)
        self.proxy.tasks = self.tasks.scope("proxy")  # its request tasks are serve's too
        self.manager.on_instance_gone = self.proxy.instance_gone
        usable, why = await asyncio.to_thread(criu.availability)
        log.info("checkpoint/restore (CRIU): %s: %s", "available, not used yet" if usable else "unavailable", why)
        self.records.event(None, "criu", f"checkpoint/restore {'available' if usable else 'unavailable'}: {why}")
        result = await self.manager.reconcile()
        if result["adopted"] or result["removed"]:
            log.info("reconciled: adopted %s, removed %s", result["adopted"], result["removed"])
        if cfg.cluster.role == "node":
            await self._join_cluster(node)
        host, port = parse_address(cfg.listen, "listen")
        await self.proxy.start(host, port)
        self.controller = controller = ManagedController(
            self.cmdb, self.manager, cfg.defaults, docroot_roots=cfg.docroot_roots,
            fcrun_roots=(cfg.paths.data_root, cfg.paths.run_root))
        dashboard = make_dashboard(self.manager, controller, self.forkserver)
        self.admin = AdminServer(controller, cfg.admin_socket, dashboard=dashboard, tasks=self.tasks.scope("admin"),
                                 **admin_options(cfg))
        await self.admin.start()
        self._sampler = self.tasks.spawn_service(dashboard.sampler.run(), name="dashboard sampler")
        self._ticker = self.tasks.spawn_service(self._tick_forever(), name="lifecycle ticker")
        if cfg.cmdb.events_keep_days > 0:
            self.tasks.spawn_service(trim_events_forever(self.cmdb, cfg.cmdb.events_keep_days), name="event retention")
        watchdog_s = watchdog_interval_s()
        if watchdog_s is not None and self.notifier.enabled:
            # Kept through stop()'s drains (they may outlast WatchdogSec); tasks.aclose() ends it.
            self.tasks.spawn_service(self._watchdog_forever(watchdog_s), name="systemd watchdog")

    async def _join_cluster(self, node: str) -> None:
        """A node: heartbeats with its figures, and the placements it follows (cluster/node.py)."""
        cfg, cc = self.config, self.config.cluster
        self.agent = NodeAgent(
            self.cmdb, self.manager, name=node, address=advertised_address(cfg),
            capacity=Capacity(cc.cpu_capacity, cc.memory_capacity_bytes),
            policy=Policy(memory_overcommit=cc.memory_overcommit, cpu_overcommit=cc.cpu_overcommit),
            pool=lambda: dict(self.forkserver.pool_sizes) if self.forkserver is not None else {},
            pool_memory_bytes=cfg.forkserver.pool_memory_bytes, event=self.records.event,
            spawn=lambda coro, name: self.tasks.spawn(coro, name=name), clock=self.clock)
        await self.agent.start()
        self._heartbeat = self.tasks.spawn_service(self.agent.run(), name="cluster node")

    def _make_supervisor(self, apps: list[App]) -> Supervisor:
        cfg, rc, fs = self.config, self.config.runtime, self.config.forkserver
        args = ["--data-root", cfg.paths.data_root, "--run-root", cfg.paths.run_root,
                "--cgroup-parent", rc.cgroup_parent, "--bridge", rc.bridge, "--subnet", rc.subnet,
                "--pool-cpu", repr(fs.pool_cpu), "--pool-memory", str(fs.pool_memory_bytes),
                "--pool-max-age", repr(fs.pool_max_age_s)]
        for root in cfg.docroot_roots:
            args += ["--docroot-root", root]
        return Supervisor(os.path.join(cfg.paths.run_root, FORKSERVER_SOCKET_NAME), args,
                          pool_sizes=self._pool_sizes(apps),
                          on_restart=self._forkserver_restarted, on_event=self._forkserver_event,
                          tasks=self.tasks.scope("forkserver"))

    def _pool_sizes(self, apps: list[App]) -> dict[str, int]:
        """Pooled instances per image: for each image that an app able to use one runs."""
        fs = self.config.forkserver
        images = {app.image for app in apps if RuntimeBackend.poolable(app)}
        return {image: fs.pool_sizes.get(image, fs.pool_size) for image in sorted(images)}

    def _apps_reloaded(self, apps: list[App]) -> None:
        if self.forkserver is not None and not self._stopping:
            sizes = self._pool_sizes(apps)
            if sizes != self.forkserver.pool_sizes:
                self.tasks.spawn(self.forkserver.set_pool(sizes), name="set the pool sizes")

    async def _forkserver_restarted(self) -> None:
        """A new fork-server adopted the old one's pool; instances it made but never reported
        (it died mid-request) are adopted or removed like at start-up."""
        result = await self.manager.reconcile()
        log.info("fork-server restarted (pid %s); reconciled: %s", self.forkserver.pid, result)

    def _forkserver_event(self, kind: str, message: str) -> None:
        self.records.event(None, kind, message)

    @property
    def address(self) -> tuple[str, int]:
        return self.proxy.sockets[0].getsockname()[:2]

    async def _beat_forever(self, node: str) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self._beat(node)

    async def _beat(self, node: str) -> None:
        """One heartbeat; a failure is logged once until one succeeds again."""
        try:
            await asyncio.to_thread(self.cmdb.heartbeat, node)
        except CMDBError as exc:
            if not self._beat_failing:
                log.warning("the heartbeat of %s is not recorded (its instances lose their share of their "
                            "apps' max after %g s): %s", node, NODE_LEASE_S, exc)
            self._beat_failing = True
        else:
            if self._beat_failing:
                log.info("the heartbeat of %s is recorded again", node)
            self._beat_failing = False

    async def _watchdog_forever(self, interval_s: float) -> None:
        # From the event loop, so a stuck loop (not just a dead process) trips WatchdogSec.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval_s)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL_S)
            try:
                self.manager.tick()
            except Exception:  # noqa: BLE001 - a bad tick must not end serve; it is logged
                log.exception("lifecycle tick failed")
            if self.access_log is not None:
                self.access_log.flush()  # a line waits at most a tick

    def request_stop(self) -> None:
        """Ask serve to stop (SIGTERM, SIGINT, a failed service): `run_until_stopped` returns."""
        self._stop_requested.set()

    def request_reload(self) -> None:
        """SIGHUP: reload in a job of serve's (a signal handler must not block)."""
        if not self._stopping:
            self.tasks.spawn(self.reload(), name="reload")

    async def reload(self) -> None:
        """Re-read the config file and the apps. Live keys (reload.py) apply now; keys that need
        a restart are logged and recorded as a `reload` event. An unreadable or invalid file
        changes nothing (logged naming the file and key); serve goes on with what it had."""
        self.notifier.reloading()
        try:
            if self.config_path:
                try:
                    fresh = await asyncio.to_thread(load_config, self.config_path, self.config.paths)
                except FcrunError as exc:
                    log.error("reload: %s is refused, keeping the running configuration: %s", self.config_path, exc)
                    self.records.event(None, "reload", f"refused {self.config_path}: {exc}")
                else:
                    self.apply_reloaded(fresh)
            try:
                await self.manager.reload_apps()
            except CMDBError as exc:
                log.error("reload: keeping the apps: %s", exc)
        finally:
            self.notifier.ready(self._status())

    def apply_reloaded(self, fresh: ServeConfig) -> tuple[list[str], list[str]]:
        """Apply the live keys that differ between the file as applied and `fresh`; report the
        others. Returns (applied, need a restart)."""
        live, restart = classify(changed_keys(self.file_config, fresh))
        self.file_config = with_live(self.file_config, fresh, live)
        self.config = with_live(self.config, fresh, live)
        self.apply_live()
        parts = [f"applied {', '.join(live)}" if live else "nothing to apply"]
        if restart:
            parts.append(f"changed but need a restart (still the old values): {', '.join(restart)}")
        message = f"reload of {self.config_path}: " + "; ".join(parts)
        (log.warning if restart else log.info)("%s", message)
        self.records.event(None, "reload", message)
        return live, restart

    def _set_access_log(self, on: bool) -> None:
        """Leases made from now on log (or not); those in flight finish as they began."""
        if on and self.access_log is None:
            self.access_log = AccessLog(os.environ.get(LOG_FORMAT_ENV) or "text")
        elif not on and self.access_log is not None:
            self.access_log.flush()
            self.access_log = None
        self.manager.access_log = self.access_log

    def apply_live(self) -> None:
        """Hand the live settings of `self.config` to the parts that read them."""
        cfg = self.config
        self.manager.hold_timeout_s = cfg.hold_timeout_s
        self.manager.drain_timeout_s = cfg.drain_timeout_s
        self._set_access_log(cfg.proxy.access_log)
        if self.proxy is not None and self.proxy.config != cfg.proxy:
            raise_descriptor_limit(cfg.proxy.max_connections)
            self.proxy.reconfigure(cfg.proxy)
        if self.controller is not None:
            self.controller.defaults = cfg.defaults
        # forkserver.pool_size(s): `reload` re-reads the apps next, and _apps_reloaded resizes
        # the pools from self.config.

    def _status(self) -> str:
        return f"serving on {self.config.listen}"

    async def run_until_stopped(self) -> None:
        """Serve until `request_stop()`, then stop.

        Raises:
            ServeFailed: a service failed (it is logged); everything was stopped all the same.
        """
        await self._stop_requested.wait()
        self.notifier.stopping("draining and stopping instances")
        await self.stop()
        if self.tasks.failure is not None:
            raise ServeFailed(f"serve stopped after a failure: {self.tasks.failure!r} (see the log above)")

    async def stop(self) -> None:
        """Drain and stop everything this serve made. Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._stop_requested.set()
        try:
            for service in (self._ticker, self._watch, self._sampler):
                if service is not None:
                    service.cancel()
                    await asyncio.wait({service})
            if self.proxy is not None:
                await self.proxy.close(self.config.drain_timeout_s)
            if self.access_log is not None:  # the drained requests' lines, not left in the batch
                self.access_log.flush()
            if self.admin is not None:
                await self.admin.close()
            if self.manager is not None:
                await self.manager.shutdown()
            if self._heartbeat is not None:  # beats while its instances drain: they hold shares
                self._heartbeat.cancel()
                await asyncio.wait({self._heartbeat})
            if self.forkserver is not None:
                await self.forkserver.close(remove_pool=True)
            try:  # the bridge outlives containers, not serve
                self.runtime.network.remove_bridge_if_unused()
            except (FcrunError, OSError) as exc:
                log.warning("cannot remove the bridge: %s", exc)
            if self.records is not None:
                await self.records.aclose()
            await self.tasks.aclose()
        finally:
            if self.backend is not None:
                self.backend.close()
            if self.cmdb is not None:
                self.cmdb.close()
            self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()


async def serve_forever(config: ServeConfig, config_path: str | None, ready=None,
                        file_config: ServeConfig | None = None) -> None:
    """Run until SIGTERM/SIGINT. `ready(serve)` is called once listening, and systemd is told
    READY=1 (sdnotify.py). `file_config`: the file's values before command-line overrides.

    Raises:
        ServeFailed: a part of serve failed and it stopped.
    """
    if config.cluster.role == "front":
        from ..cluster.front_server import FrontServe

        server = FrontServe(config, node_name(config))
    else:
        server = Serve(config, config_path)
        server.file_config = file_config or config
    loop = asyncio.get_running_loop()
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, server.request_stop)
    loop.add_signal_handler(signal.SIGHUP, server.request_reload)
    try:
        if ready is not None:
            ready(server)
        server.notifier.ready(server._status())
        await server.run_until_stopped()
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def run(config_path: str | None, listen: str | None, paths=None, ready=None, runtime_overrides=None,
        cmdb_url: str | None = None, log_format: str | None = None, access_log: bool = False,
        cluster_overrides: dict | None = None) -> None:
    """Entry point of `fcrun serve`: uvloop when available. `runtime_overrides` (cgroup_parent,
    bridge, subnet from the command line or environment) apply where the file keeps defaults;
    `cmdb_url` (``fcrun --cmdb``) replaces the file's ``[cmdb] url``."""
    import msgspec

    config_path = default_config_path(config_path)
    config = file_config = load_config(config_path, paths)
    if cmdb_url:
        config = msgspec.structs.replace(config, cmdb=msgspec.structs.replace(config.cmdb, url=cmdb_url))
    if runtime_overrides:
        defaults = type(config.runtime)()
        changes = {k: v for k, v in runtime_overrides.items()
                   if v is not None and getattr(config.runtime, k) == getattr(defaults, k)}
        config = msgspec.structs.replace(config, runtime=msgspec.structs.replace(config.runtime, **changes))
    if listen:
        parse_address(listen, "--listen")
        config = msgspec.structs.replace(config, listen=listen)
    if cluster_overrides:
        changes = {k: v for k, v in cluster_overrides.items() if v is not None}
        config = msgspec.structs.replace(config, cluster=msgspec.structs.replace(config.cluster, **changes))
    check_config(config, "the command line and " + (config_path or "the defaults"))
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        runner = asyncio.run
    if access_log:
        config = msgspec.structs.replace(config, proxy=msgspec.structs.replace(config.proxy, access_log=True))
    # The fork-server (our child) reads FCRUN_LOG_FORMAT too: one format for both.
    os.environ[LOG_FORMAT_ENV] = log_format or os.environ.get(LOG_FORMAT_ENV) or "text"
    configure(os.environ[LOG_FORMAT_ENV], "fcrun serve", os.environ.get("FCRUN_LOG", "INFO"))
    raise_descriptor_limit(config.proxy.max_connections)
    if config.cluster.role != "front" and not config.runtime.cgroup_parent.startswith("/"):
        # Before any child (the fork-server) starts and before the runtime looks for its cgroups.
        leaf = enter_supervisor()
        if leaf is not None:
            log.info("moved into %s: its parent cgroup was delegated to fcrun serve by systemd, and the "
                     "instances' cgroups go beside this one", leaf)
    runner(serve_forever(config, config_path, ready, file_config))


def raise_descriptor_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard one, so that [proxy] max_connections can be
    reached: each client connection may hold an upstream one too. Returns the soft limit now.
    (The default soft limit, 1024, would make accept() fail with EMFILE long before.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max_connections + 1024
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft
