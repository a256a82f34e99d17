"""The container manager of `fcrun serve`: FastContainer's request flow and lifecycle.

It is the proxy's Router: `acquire(host)` maps a Host to an app, picks the ready instance with
the fewest outstanding requests, or starts one and holds the request until it accepts
connections (concurrent requests for a cold app share one start). `tick(now)` applies
mortality (stop after idle-timeout, with draining) and immutability (replace after
max-lifetime); serve calls it periodically, tests call it with a fake clock.

Instance states, checked here only:

    starting -> ready -> draining -> stopped
                  |   (routing)   (no new requests; in-flight ones finish, then stop)
                  `-> replacing -> draining   (max-lifetime: serves until its successor is ready)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from ..proxy.router import RouteError
from .backend import InstanceBackend, StartFailed

log = logging.getLogger("fcrun.serve")

# An instance being replaced keeps serving until its successor is ready.
ROUTABLE = frozenset({"ready", "replacing"})


@dataclass
class Instance:
    name: str
    app: str
    ip: str
    port: int
    started_at: float  # wall clock, for display
    started_mono: float
    last_active: float  # monotonic: last request start or end
    state: str = "ready"
    outstanding: int = 0
    tunnels: int = 0
    requests: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Meter:
    """Per-app metering (the talk's billing by processing time)."""

    requests: int = 0
    status: dict[str, int] = field(default_factory=lambda: {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0})
    failed: int = 0
    request_seconds: float = 0.0
    cpu_seconds_stopped: float = 0.0  # from instances already gone
    instance_seconds_stopped: float = 0.0
    starts: int = 0
    cold_start_ms_total: float = 0.0


@dataclass
class AppState:
    app: object
    instances: dict[str, Instance] = field(default_factory=dict)
    starting: asyncio.Task | None = None
    removing: bool = False
    connections: int = 0  # open client connections for this app's hostnames
    meter: Meter = field(default_factory=Meter)

    def ready(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state == "ready"]


class InstanceLease:
    """One request's hold on one instance (the proxy's Lease)."""

    __slots__ = ("_manager", "_app", "_instance", "addr", "cold_start", "max_body_bytes", "instance_id", "_t0", "_open")

    def __init__(self, manager: "Manager", app: AppState, instance: Instance, cold_start, t0: float):
        self._manager = manager
        self._app = app
        self._instance = instance
        self.addr = (instance.ip, instance.port)
        self.cold_start = cold_start
        self.max_body_bytes = getattr(app.app, "max_body_bytes", None)
        self.instance_id = instance.name
        self._t0 = t0
        self._open = True

    def done(self, status: int, request_bytes: int = 0, response_bytes: int = 0, failed: bool = False) -> None:
        if not self._open:
            return
        self._open = False
        self._manager._release(self._app, self._instance, status, self._t0, failed)


class Manager:
    """Routes requests to app instances and runs their lifecycle.

    Args:
        cmdb: the configuration DB (apps, instances, events).
        backend: makes and removes instances (RuntimeBackend, or a fake in tests).
        hold_timeout_s: how long a request may wait for a cold start before 504.
        drain_timeout_s: how long a stopping instance may take to finish in-flight requests.
        clock: monotonic clock (injected in tests).
    """

    def __init__(
        self,
        cmdb,
        backend: InstanceBackend,
        *,
        hold_timeout_s: float = 30.0,
        drain_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_instance_gone: Callable[[str], None] | None = None,
    ):
        self.cmdb = cmdb
        self.backend = backend
        self.hold_timeout_s = hold_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self.on_instance_gone = on_instance_gone or (lambda name: None)
        self.apps: dict[str, AppState] = {}
        self._by_host: dict[str, AppState] = {}
        self._tasks: set[asyncio.Task] = set()  # owned background work (stops, replacements)
        self.reload_apps()

    # ----- configuration -------------------------------------------------------------------

    def reload_apps(self) -> None:
        """Re-read apps from the CMDB; running instances keep serving with their settings."""
        apps = {app.name: app for app in self.cmdb.list_apps()}
        for name, app in apps.items():
            if name in self.apps:
                self.apps[name].app = app
            else:
                self.apps[name] = AppState(app=app)
        for name in list(self.apps):
            if name not in apps and not self.apps[name].instances:
                del self.apps[name]
        self._by_host = {}
        for state in self.apps.values():
            if state.app.name in apps:
                for host in [state.app.name, *state.app.hostnames]:
                    self._by_host[host] = state

    # ----- the request path ------------------------------------------------------------------

    def acquire_nowait(self, host: str) -> InstanceLease | None:
        """The hot path: a lease on a ready instance, or None when the app has none (then the
        proxy awaits acquire(), which starts one)."""
        state = self._by_host.get(host)
        if state is None or state.removing:
            raise RouteError(404, f"no app is configured for host {host!r}")
        instance = self._least_loaded(state)
        if instance is None:
            return None
        return self._lease(state, instance, None, self.clock())

    async def acquire(self, host: str) -> InstanceLease:
        state = self._by_host.get(host)
        if state is None or state.removing:
            raise RouteError(404, f"no app is configured for host {host!r}")
        t0 = self.clock()
        instance = self._least_loaded(state)
        cold = None
        if instance is None:
            instance = await self._wait_for_instance(state)
            cold = ("start", round((self.clock() - t0) * 1000, 1))
        return self._lease(state, instance, cold, t0)

    def _lease(self, state: AppState, instance: Instance, cold, t0: float) -> InstanceLease:
        instance.outstanding += 1
        instance.requests += 1
        instance.last_active = t0
        return InstanceLease(self, state, instance, cold, t0)

    @staticmethod
    def _least_loaded(state: AppState) -> Instance | None:
        best = None
        for inst in state.instances.values():
            if inst.state in ROUTABLE and (best is None or inst.outstanding < best.outstanding):
                best = inst
        return best

    async def _wait_for_instance(self, state: AppState) -> Instance:
        deadline = self.clock() + self.hold_timeout_s
        while True:
            if state.starting is None or state.starting.done():
                state.starting = self._spawn(self._start_instance(state, time.monotonic() + self.hold_timeout_s))
            try:
                instance = await asyncio.wait_for(asyncio.shield(state.starting), max(0.0, deadline - self.clock()))
            except asyncio.TimeoutError:
                raise RouteError(504, f"{state.app.name}: no instance became ready within {self.hold_timeout_s:g}s") from None
            except StartFailed as exc:
                raise RouteError(502, str(exc)) from None
            if instance.state == "ready":
                return instance
            # It was stopped again before we got it (app removed): try once more unless removing.
            if state.removing:
                raise RouteError(503, f"{state.app.name} is being removed")

    async def _start_instance(self, state: AppState, deadline: float) -> Instance:
        app = state.app
        t0 = self.clock()
        try:
            started = await self.backend.start(app, deadline)
        except StartFailed as exc:
            self._event(app.name, "start-failed", str(exc))
            raise
        now = self.clock()
        instance = Instance(name=started.name, app=app.name, ip=started.ip, port=started.port,
                            started_at=time.time(), started_mono=now, last_active=now)
        ms = (now - t0) * 1000
        state.meter.starts += 1
        state.meter.cold_start_ms_total += ms
        if state.removing:
            self._spawn(self._stop(state, instance, "app removed"))
            return instance
        state.instances[instance.name] = instance
        self._record_instance(instance)
        self._event(app.name, "start", f"started {instance.name} at {instance.ip}:{instance.port} in {ms:.0f} ms",
                    {"instance": instance.name, "ms": round(ms, 1)})
        return instance

    def _release(self, state: AppState, instance: Instance, status: int, t0: float, failed: bool) -> None:
        now = self.clock()
        instance.outstanding -= 1
        instance.last_active = now
        meter = state.meter
        meter.requests += 1
        meter.request_seconds += now - t0
        if failed:
            meter.failed += 1
        if 100 <= status < 600:
            meter.status[f"{status // 100}xx"] += 1
        if instance.outstanding == 0 and instance.state == "draining":
            instance.drained.set()

    def connection_opened(self, host: str) -> None:
        state = self._by_host.get(host)
        if state is not None:
            state.connections += 1

    def connection_closed(self, host: str) -> None:
        state = self._by_host.get(host) or next((s for s in self.apps.values() if host in s.app.all_hostnames), None)
        if state is not None and state.connections > 0:
            state.connections -= 1
            now = self.clock()
            for inst in state.instances.values():  # the idle timer runs from the last activity
                inst.last_active = now

    # ----- lifecycle ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Mortality and immutability: stop idle instances, replace old ones. Cheap; call often."""
        now = self.clock()
        for state in list(self.apps.values()):
            app = state.app
            ready = state.ready()
            keep = getattr(app, "min_instances", 0)
            for inst in ready:
                idle = now - inst.last_active
                remaining = len(state.ready())
                if inst.outstanding or idle < app.idle_timeout_s or remaining <= keep:
                    continue
                if remaining == 1 and state.connections:
                    continue  # an open client connection (keep-alive, stream) is activity too
                self._spawn(self._stop(state, inst, f"idle for {idle:.0f}s"))
            lifetime = getattr(app, "max_lifetime_s", None)
            if lifetime:
                for inst in state.ready():
                    if now - inst.started_mono >= lifetime and (state.starting is None or state.starting.done()):
                        self._spawn(self._replace(state, inst))

    async def _replace(self, state: AppState, old: Instance) -> None:
        """Start a successor, move traffic to it, then drain and stop the old one."""
        old.state = "replacing"  # still routable until the successor is ready
        try:
            state.starting = self._spawn(self._start_instance(state, time.monotonic() + self.hold_timeout_s))
            await state.starting
        except StartFailed:
            old.state = "ready"  # keep serving with the old one; try again at a later tick
            old.started_mono = self.clock()
            return
        await self._stop(state, old, "max lifetime reached")

    async def _stop(self, state: AppState, instance: Instance, reason: str) -> None:
        """Take out of routing, let in-flight requests finish (up to the drain timeout), stop."""
        if instance.state in ("draining", "stopped"):
            return
        instance.state = "draining"
        if instance.outstanding == 0:
            instance.drained.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(instance.drained.wait(), self.drain_timeout_s)
        self.on_instance_gone(instance.name)
        try:
            cpu = await self.backend.stop(instance.name, state.app)
        except Exception as exc:  # noqa: BLE001 - recorded; the instance is out of routing either way
            log.warning("stopping %s: %s", instance.name, exc)
            self._event(state.app.name, "stop-failed", f"stopping {instance.name}: {exc}")
            cpu = 0.0
        instance.state = "stopped"
        state.instances.pop(instance.name, None)
        state.meter.cpu_seconds_stopped += cpu
        state.meter.instance_seconds_stopped += self.clock() - instance.started_mono
        with contextlib.suppress(Exception):
            self.cmdb.remove_instance(instance.name)
        self._event(state.app.name, "stop", f"stopped {instance.name}: {reason}", {"instance": instance.name})

    async def remove_app(self, name: str) -> None:
        """Drain and stop every instance of an app; new requests get 404 from now on."""
        state = self.apps.get(name)
        if state is None:
            return
        state.removing = True
        self._by_host = {h: s for h, s in self._by_host.items() if s is not state}
        if state.starting is not None and not state.starting.done():
            with contextlib.suppress(Exception):
                await state.starting
        await asyncio.gather(*(self._stop(state, i, "app removed") for i in list(state.instances.values())))
        self.apps.pop(name, None)

    async def reconcile(self) -> dict[str, list[str]]:
        """At start-up: adopt instances of known apps that accept connections, remove the rest."""
        adopted, removed = [], []
        recorded = {}
        with contextlib.suppress(Exception):
            recorded = {row.id: row for row in self.cmdb.list_instances()}
        for found in await self.backend.existing():
            state = self.apps.get(found.app)
            row = recorded.get(found.name)
            port = (row.port if row and row.port else None) or (state.app.port if state else None) or 80
            if state and found.running and found.ip and await self.backend.accepting(found.ip, port):
                now = self.clock()
                inst = Instance(name=found.name, app=found.app, ip=found.ip, port=port, started_at=found.started_at,
                                started_mono=now, last_active=now)
                state.instances[inst.name] = inst
                self._record_instance(inst)
                adopted.append(found.name)
            else:
                with contextlib.suppress(Exception):
                    await self.backend.stop(found.name, state.app if state else None)
                removed.append(found.name)
        known = {i.name for s in self.apps.values() for i in s.instances.values()}
        with contextlib.suppress(Exception):
            for row in self.cmdb.list_instances():
                if row.id not in known:
                    self.cmdb.remove_instance(row.id)
        if adopted or removed:
            self._event(None, "reconcile", f"adopted {len(adopted)}, removed {len(removed)} instances",
                        {"adopted": adopted, "removed": removed})
        return {"adopted": adopted, "removed": removed}

    async def shutdown(self) -> None:
        """Stop every instance (after draining) and wait for all background work."""
        for state in self.apps.values():
            state.removing = True
        stops = [self._stop(s, i, "serve is stopping") for s in self.apps.values() for i in list(s.instances.values())]
        await asyncio.gather(*stops, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ----- metering -----------------------------------------------------------------------------

    def stats(self) -> dict[str, dict]:
        now = self.clock()
        out = {}
        for name, state in self.apps.items():
            m = state.meter
            live = list(state.instances.values())
            out[name] = {
                "requests": m.requests,
                "status": dict(m.status),
                "failed": m.failed,
                "request_seconds": round(m.request_seconds, 6),
                "cpu_seconds": round(m.cpu_seconds_stopped + sum(self.backend.cpu_seconds(i.name) for i in live), 6),
                "instance_seconds": round(m.instance_seconds_stopped + sum(now - i.started_mono for i in live), 3),
                "instances": {"ready": len(state.ready()), "total": len(live)},
                "starts": m.starts,
                "cold_start_ms_avg": round(m.cold_start_ms_total / m.starts, 1) if m.starts else None,
            }
        return out

    # ----- helpers ----------------------------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), StartFailed):
            log.error("background task failed: %r", task.exception())

    def _record_instance(self, inst: Instance) -> None:
        from ..cmdb.models import Instance as InstanceRow

        with contextlib.suppress(Exception):
            self.cmdb.upsert_instance(InstanceRow(id=inst.name, app=inst.app, container=inst.name, state=inst.state,
                                                  ip=inst.ip, port=inst.port, started_at=inst.started_at))

    def _event(self, app: str | None, kind: str, message: str, data: dict | None = None) -> None:
        with contextlib.suppress(Exception):
            self.cmdb.add_event(app, kind, message, data or {})
