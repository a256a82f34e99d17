"""``fcrun serve --role front``: the HTTP proxy with `FrontRouter`, and the CMDB reads that keep
its caches current. No containers, no fork-server, no cgroups: a front needs no root.

Its tasks: the proxy; `AppWatch` (LISTEN/NOTIFY, polling when that breaks) re-reading the apps;
a refresh every REFRESH_S of placements and instances, and of the nodes once a second
(nodes_cache.py); a heartbeat with role ``front``
(so that `fcrun node ls` shows it). The CMDB being away does not stop it: it routes from what
it read last, and says so once in the log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from ..cmdb import open_cmdb
from ..cmdb.base import CMDB, CMDBError
from ..cmdb.nodes import NodeBeat
from ..proxy.server import ProxyServer
from ..serve.appwatch import AppWatch
from ..serve.config import ServeConfig, parse_address
from ..serve.records import Recorder
from ..serve.sdnotify import Notifier
from ..tasks import TaskOwner
from .front import REFRESH_S, FrontRouter
from .nodes_cache import NodesCache
from .node import BEAT_S
from .placement import Policy

log = logging.getLogger("fcrun.cluster")


class FrontServe:
    """One running front. `await start()`, then `await run_until_stopped()` (or `request_stop()`).

    Resource handling: `stop()` releases everything `start()` made, also after a failed start.
    """

    def __init__(self, config: ServeConfig, name: str, clock=time.monotonic):
        self.config = config
        self.name = name
        self.clock = clock
        self.tasks = TaskOwner("front", on_failure=lambda exc: self.request_stop())
        self.cmdb: CMDB | None = None
        self.nodes: NodesCache | None = None
        self.records: Recorder | None = None
        self.router: FrontRouter | None = None
        self.proxy: ProxyServer | None = None
        self.started_at = time.time()
        self.notifier = Notifier()  # systemd's Type=notify, as serve's
        self._failing = False
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        cfg = self.config
        self.cmdb = await asyncio.to_thread(open_cmdb, cfg.paths, cfg.cmdb.url)
        self.nodes = NodesCache(self.cmdb.list_nodes, clock=self.clock)  # re-read once a beat, not every REFRESH_S
        self.records = Recorder(self.cmdb, self.tasks.scope("records"), node=self.name)
        policy = Policy(memory_overcommit=cfg.cluster.memory_overcommit, cpu_overcommit=cfg.cluster.cpu_overcommit)
        self.router = FrontRouter(self.cmdb, name=self.name, policy=policy, event=self.records.event,
                                  spawn=lambda coro, name: self.tasks.spawn(coro, name=name), clock=self.clock)
        await self._reload_apps()
        await self._refresh()
        await self._beat()
        self.tasks.spawn_service(AppWatch(self.cmdb, self._reload_apps, self.records.event).run(), name="CMDB app changes")
        self.tasks.spawn_service(self._refresh_forever(), name="cluster refresh")
        self.proxy = ProxyServer(self.router, cfg.proxy)
        self.proxy.tasks = self.tasks.scope("proxy")
        host, port = parse_address(cfg.listen, "listen")
        await self.proxy.start(host, port)
        self.records.event(None, "node", f"front {self.name} serving on {cfg.listen}")

    @property
    def address(self) -> tuple[str, int]:
        return self.proxy.sockets[0].getsockname()[:2]

    async def _reload_apps(self) -> None:
        apps = await asyncio.to_thread(self.cmdb.list_apps)
        self.router.set_apps(apps)
        # Out of the cyclic collector's sight: with 100,000 apps each full collection (which
        # the refreshes' allocations trigger) walked them all, half of an idle front's CPU
        # (bench/front_memory.py). Refcounting still frees the apps a later reload replaces.
        gc.freeze()

    def _read(self):
        return self.nodes.read(), self.cmdb.list_placements(), self.cmdb.holders()

    async def _refresh(self) -> None:
        try:
            nodes, placements, holders = await asyncio.to_thread(self._read)
        except CMDBError as exc:
            if not self._failing:
                log.warning("front %s: cannot read the cluster from the CMDB (routing from the last read): %s",
                            self.name, exc)
            self._failing = True
            return
        if self._failing:
            log.info("front %s: reading the cluster from the CMDB again", self.name)
        self._failing = False
        self.router.refresh(nodes, placements, holders)

    async def _beat(self) -> None:
        beat = NodeBeat(name=self.name, role="front", address="", started_at=self.started_at)
        try:
            await asyncio.to_thread(self.cmdb.node_beat, beat)
        except CMDBError:
            pass  # _refresh says so in the log

    async def _refresh_forever(self) -> None:
        next_beat = self.clock() + BEAT_S
        while True:
            await asyncio.sleep(REFRESH_S)
            await self._refresh()
            if self.clock() >= next_beat:
                next_beat = self.clock() + BEAT_S
                await self._beat()

    def _status(self) -> str:
        return f"front {self.name} serving on {self.config.listen}"

    def request_stop(self) -> None:
        self._stop_requested.set()

    def request_reload(self) -> None:
        if not self._stopping:
            self.tasks.spawn(self._reload_apps(), name="reload")

    async def run_until_stopped(self) -> None:
        await self._stop_requested.wait()
        self.notifier.stopping("draining")
        await self.stop()
        if self.tasks.failure is not None:
            from ..serve.server import ServeFailed

            raise ServeFailed(f"front stopped after a failure: {self.tasks.failure!r} (see the log above)")

    async def stop(self) -> None:
        """Drain in-flight requests, then release everything. Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._stop_requested.set()
        try:
            if self.proxy is not None:
                await self.proxy.close(self.config.drain_timeout_s)
            if self.records is not None:
                await self.records.aclose()
            await self.tasks.aclose()
        finally:
            if self.cmdb is not None:
                self.cmdb.close()
            self._stopped.set()
