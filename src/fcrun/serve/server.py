"""`fcrun serve`: the proxy, the container manager and the admin API in one process.

Start-up: open the CMDB, reconcile what an earlier serve left (adopt reachable instances,
remove the rest), then listen. SIGTERM/SIGINT: stop accepting, let in-flight requests finish,
stop every instance. SIGHUP: re-read the configuration's reloadable parts and the apps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from ..runtime import criu
from ..cmdb import open_cmdb
from ..forkserver import Supervisor
from ..proxy.server import ProxyServer
from ..runtime.lifecycle import Runtime
from .admin import AdminServer
from .backend import RuntimeBackend
from .config import ServeConfig, load_config, parse_address
from .controller import ManagedController
from .manager import Manager

log = logging.getLogger("fcrun.serve")

TICK_INTERVAL_S = 0.5  # how often idle and max-lifetime checks run
FORKSERVER_SOCKET_NAME = "forkserver.sock"  # under the run root


class Serve:
    """One running `fcrun serve`. Use `await start()`, then `await wait_closed()` or `stop()`."""

    def __init__(self, config: ServeConfig, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        rc = config.runtime
        self.runtime = Runtime(config.paths, cgroup_parent=rc.cgroup_parent, bridge=rc.bridge, subnet=rc.subnet,
                               docroot_roots=config.docroot_roots)
        self.cmdb = None
        self.backend = None
        self.forkserver: Supervisor | None = None
        self.manager: Manager | None = None
        self.proxy: ProxyServer | None = None
        self.admin: AdminServer | None = None
        self._ticker: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        cfg = self.config
        self.cmdb = open_cmdb(cfg.paths)
        if cfg.forkserver.enabled:
            self.forkserver = self._make_supervisor()
            await self.forkserver.start()
        self.backend = RuntimeBackend(self.runtime, forkserver=self.forkserver)
        self.manager = Manager(self.cmdb, self.backend, hold_timeout_s=cfg.hold_timeout_s,
                               drain_timeout_s=cfg.drain_timeout_s)
        self.manager.on_apps_reloaded = self._apps_reloaded
        self.proxy = ProxyServer(self.manager, cfg.proxy)
        self.manager.on_instance_gone = self.proxy.instance_gone
        usable, why = await asyncio.get_running_loop().run_in_executor(None, criu.availability)
        log.info("checkpoint/restore (CRIU): %s: %s", "available, not used yet" if usable else "unavailable", why)
        self._forkserver_event("criu", f"checkpoint/restore {'available' if usable else 'unavailable'}: {why}")
        result = await self.manager.reconcile()
        if result["adopted"] or result["removed"]:
            log.info("reconciled: adopted %s, removed %s", result["adopted"], result["removed"])
        host, port = parse_address(cfg.listen, "listen")
        await self.proxy.start(host, port)
        controller = ManagedController(self.cmdb, self.manager, cfg.defaults, docroot_roots=cfg.docroot_roots,
                                       fcrun_roots=(cfg.paths.data_root, cfg.paths.run_root))
        self.admin = AdminServer(controller, cfg.admin_socket,
                                 tcp_listen=cfg.admin_listen, token=cfg.admin_token)
        await self.admin.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    def _make_supervisor(self) -> Supervisor:
        cfg, rc, fs = self.config, self.config.runtime, self.config.forkserver
        args = ["--data-root", cfg.paths.data_root, "--run-root", cfg.paths.run_root,
                "--cgroup-parent", rc.cgroup_parent, "--bridge", rc.bridge, "--subnet", rc.subnet,
                "--pool-cpu", repr(fs.pool_cpu), "--pool-memory", str(fs.pool_memory_bytes),
                "--pool-max-age", repr(fs.pool_max_age_s)]
        for root in cfg.docroot_roots:
            args += ["--docroot-root", root]
        return Supervisor(os.path.join(cfg.paths.run_root, FORKSERVER_SOCKET_NAME), args,
                          pool_sizes=self._pool_sizes(self.cmdb.list_apps()),
                          on_restart=self._forkserver_restarted, on_event=self._forkserver_event)

    def _pool_sizes(self, apps) -> dict[str, int]:
        """Pooled instances per image: for each image that an app able to use one runs."""
        fs = self.config.forkserver
        images = {app.image for app in apps if RuntimeBackend.poolable(app)}
        return {image: fs.pool_sizes.get(image, fs.pool_size) for image in sorted(images)}

    def _apps_reloaded(self, apps) -> None:
        if self.forkserver is not None and not self._stopping:
            sizes = self._pool_sizes(apps)
            if sizes != self.forkserver.pool_sizes:
                self.manager._spawn(self.forkserver.set_pool(sizes))

    async def _forkserver_restarted(self) -> None:
        """A new fork-server adopted the old one's pool; instances it made but never reported
        (it died mid-request) are adopted or removed like at start-up."""
        result = await self.manager.reconcile()
        log.info("fork-server restarted (pid %s); reconciled: %s", self.forkserver.pid, result)

    def _forkserver_event(self, kind: str, message: str) -> None:
        with contextlib.suppress(Exception):
            self.cmdb.add_event(None, kind, message, {})

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

    def reload(self) -> None:
        """SIGHUP: re-read the apps (and the config file's reloadable values)."""
        if self.config_path:
            try:
                fresh = load_config(self.config_path, self.config.paths)
                self.manager.hold_timeout_s = fresh.hold_timeout_s
                self.manager.drain_timeout_s = fresh.drain_timeout_s
            except Exception as exc:  # noqa: BLE001 - keep serving with the old config
                log.error("reload: %s", exc)
        self.manager.reload_apps()

    async def stop(self) -> None:
        """Drain and stop everything this serve made. Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            if self._ticker is not None:
                self._ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._ticker
            if self.proxy is not None:
                await self.proxy.close(self.config.drain_timeout_s)
            if self.admin is not None:
                await self.admin.close()
            if self.manager is not None:
                await self.manager.shutdown()
            if self.forkserver is not None:
                await self.forkserver.close(remove_pool=True)
            with contextlib.suppress(Exception):  # the bridge outlives containers, not serve
                self.runtime.network.remove_bridge_if_unused()
        finally:
            if self.backend is not None:
                self.backend.close()
            if self.cmdb is not None:
                self.cmdb.close()
            self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()


async def serve_forever(config: ServeConfig, config_path: str | None, ready=None) -> None:
    """Run until SIGTERM/SIGINT. `ready(serve)` is called once listening."""
    server = Serve(config, config_path)
    loop = asyncio.get_running_loop()
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: loop.create_task(server.stop()))
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    if ready is not None:
        ready(server)
    await server.wait_closed()


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
    runner(serve_forever(config, config_path, ready))
