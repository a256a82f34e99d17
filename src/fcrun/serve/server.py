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

from ..cmdb import open_cmdb
from ..cmdb.base import CMDB, CMDBError
from ..cmdb.models import App
from ..errors import FcrunError
from ..forkserver import Supervisor
from ..proxy.server import ProxyServer
from ..runtime import criu
from ..runtime.lifecycle import Runtime
from .admin_server import AdminServer, admin_options
from .backend import RuntimeBackend
from .config import ServeConfig, load_config, parse_address
from .controller import ManagedController
from .manager import Manager
from .records import Recorder
from ..tasks import TaskOwner

log = logging.getLogger("fcrun.serve")

TICK_INTERVAL_S = 0.5  # how often idle and max-lifetime checks run
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
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        cfg = self.config
        self.cmdb = await asyncio.to_thread(open_cmdb, cfg.paths)
        self.records = Recorder(self.cmdb, self.tasks.scope("records"))
        apps = await asyncio.to_thread(self.cmdb.list_apps)
        if cfg.forkserver.enabled:
            self.forkserver = self._make_supervisor(apps)
            await self.forkserver.start()
        self.backend = RuntimeBackend(self.runtime, forkserver=self.forkserver, clock=self.clock)
        self.manager = Manager(self.cmdb, self.backend, hold_timeout_s=cfg.hold_timeout_s,
                               drain_timeout_s=cfg.drain_timeout_s, clock=self.clock,
                               tasks=self.tasks.scope("manager"), records=self.records, apps=apps)
        self.manager.on_apps_reloaded = self._apps_reloaded
        self.proxy = ProxyServer(self.manager, cfg.proxy)
        self.proxy.tasks = self.tasks.scope("proxy")  # its request tasks are serve's too
        self.manager.on_instance_gone = self.proxy.instance_gone
        usable, why = await asyncio.to_thread(criu.availability)
        log.info("checkpoint/restore (CRIU): %s: %s", "available, not used yet" if usable else "unavailable", why)
        self.records.event(None, "criu", f"checkpoint/restore {'available' if usable else 'unavailable'}: {why}")
        result = await self.manager.reconcile()
        if result["adopted"] or result["removed"]:
            log.info("reconciled: adopted %s, removed %s", result["adopted"], result["removed"])
        host, port = parse_address(cfg.listen, "listen")
        await self.proxy.start(host, port)
        controller = ManagedController(self.cmdb, self.manager, cfg.defaults, docroot_roots=cfg.docroot_roots,
                                       fcrun_roots=(cfg.paths.data_root, cfg.paths.run_root))
        self.admin = AdminServer(controller, cfg.admin_socket, tasks=self.tasks.scope("admin"), **admin_options(cfg))
        await self.admin.start()
        self._ticker = self.tasks.spawn_service(self._tick_forever(), name="lifecycle ticker")

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

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL_S)
            try:
                self.manager.tick()
            except Exception:  # noqa: BLE001 - a bad tick must not end serve; it is logged
                log.exception("lifecycle tick failed")

    def request_stop(self) -> None:
        """Ask serve to stop (SIGTERM, SIGINT, a failed service): `run_until_stopped` returns."""
        self._stop_requested.set()

    def request_reload(self) -> None:
        """SIGHUP: reload in a job of serve's (a signal handler must not block)."""
        if not self._stopping:
            self.tasks.spawn(self.reload(), name="reload")

    async def reload(self) -> None:
        """Re-read the config file's reloadable values and the apps; on an error serve goes on
        with what it had."""
        if self.config_path:
            try:
                fresh = await asyncio.to_thread(load_config, self.config_path, self.config.paths)
            except FcrunError as exc:
                log.error("reload: keeping the configuration: %s", exc)
            else:
                self.manager.hold_timeout_s = fresh.hold_timeout_s
                self.manager.drain_timeout_s = fresh.drain_timeout_s
        try:
            await self.manager.reload_apps()
        except CMDBError as exc:
            log.error("reload: keeping the apps: %s", exc)

    async def run_until_stopped(self) -> None:
        """Serve until `request_stop()`, then stop.

        Raises:
            ServeFailed: a service failed (it is logged); everything was stopped all the same.
        """
        await self._stop_requested.wait()
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
            if self._ticker is not None:
                self._ticker.cancel()
                await asyncio.wait({self._ticker})
            if self.proxy is not None:
                await self.proxy.close(self.config.drain_timeout_s)
            if self.admin is not None:
                await self.admin.close()
            if self.manager is not None:
                await self.manager.shutdown()
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


async def serve_forever(config: ServeConfig, config_path: str | None, ready=None) -> None:
    """Run until SIGTERM/SIGINT. `ready(serve)` is called once listening.

    Raises:
        ServeFailed: a part of serve failed and it stopped.
    """
    server = Serve(config, config_path)
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
        await server.run_until_stopped()
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def run(config_path: str | None, listen: str | None, paths=None, ready=None, runtime_overrides=None) -> None:
    """Entry point of `fcrun serve`: uvloop when available. `runtime_overrides` (cgroup_parent,
    bridge, subnet from the command line or environment) apply where the file keeps defaults."""
    import msgspec

    config = load_config(config_path, paths)
    if runtime_overrides:
        defaults = type(config.runtime)()
        changes = {k: v for k, v in runtime_overrides.items()
                   if v is not None and getattr(config.runtime, k) == getattr(defaults, k)}
        config = msgspec.structs.replace(config, runtime=msgspec.structs.replace(config.runtime, **changes))
    if listen:
        parse_address(listen, "--listen")
        config = msgspec.structs.replace(config, listen=listen)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        runner = asyncio.run
    logging.basicConfig(level=os.environ.get("FCRUN_LOG", "INFO"), format="fcrun serve: %(message)s")
    raise_descriptor_limit(config.proxy.max_connections)
    runner(serve_forever(config, config_path, ready))


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
