"""The container manager of `fcrun serve`: FastContainer's request flow and lifecycle.

It is the proxy's Router: `acquire(host)` maps a Host to an app, picks the ready instance with
the fewest outstanding requests, or starts one and holds the request until it accepts
connections (concurrent requests for a cold app share one start). `tick(now)` applies
mortality (stop after idle-timeout, with draining) and immutability (replace after
max-lifetime); serve calls it periodically, tests call it with a fake clock.

While instances run, the manager also watches them (FastContainer's self-monitoring): every
`sample_interval_s` `sample()` reads each instance's cgroup and request counters (monitor.py),
hands each app's figures to the scaling policy (policy.py, a pure function) and carries out
its decisions - a quota raised or lowered live, an instance started (it joins the rotation
once it accepts connections, with a slow start: see SLOW_START_FIRST) or drained and
stopped. `scale()` does the same on an operator's order (`fcrun app scale`), with or
without autoscale. Every decision is an event with its reason and figures.

Instance states, checked here only:

    starting -> ready -> draining -> stopped
                | ^ |   (routing)   (no new requests; in-flight ones finish, then stop)
                | | `-> replacing -> draining   (max-lifetime: serves until its successor is ready)
                | `--- frozen <- freezing   (idle for freeze-after: cgroup freezer; the next
                `----------------^           request thaws it; idle for idle-timeout: stopped)

A request that finds no ready instance is served, fastest first, by thawing a frozen one
("thaw"), by a pre-warmed instance claimed from the fork-server's pool ("pool"), or by a
new one ("start"): the path and its time go to the client in X-Fcrun-Cold-Start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import msgspec

from ..cmdb.models import Scale
from ..errors import ContainerError, FcrunError, IncorrectStatus, NotFound
from ..proxy.router import RouteError
from . import monitor
from .backend import InstanceBackend, StartFailed
from .policy import AppMetrics, Decision, History, Tuning, decide

log = logging.getLogger("fcrun.serve")

# An instance being replaced keeps serving until its successor is ready.
ROUTABLE = frozenset({"ready", "replacing"})
DEFAULT_SAMPLE_INTERVAL_S = 0.25

# Slow start: a new instance accepts connections before it can serve many at once. A
# pre-forking server forks its workers after it listens (the apache-php image forks 128: about
# a second at 0.3 CPU when idle, several when it also serves, as the workers and the forking
# parent share the quota); a connection beyond the workers forked so far waits in the kernel's
# accept queue, with keep-alive until a worker's connection closes (seconds). So while other
# instances can take the load, a new one gets at most as many requests in flight as it has
# processes besides the first (its cgroup's pids, read at each sample), or SLOW_START_FIRST
# twice over every SLOW_START_STEP_S if that is more (a server that does not fork), and no
# limit once it is SLOW_START_S old. When every instance is at its limit the least loaded still
# gets the request: the limit only steers, it never refuses.
SLOW_START_FIRST = 4
SLOW_START_STEP_S = 1.0
SLOW_START_S = 5.0
UNCAPPED = 1 << 62


@dataclass(slots=True)  # slots: attribute access on the request path is a little faster
class Instance:
    name: str
    app: str
    ip: str
    port: int
    started_at: float  # wall clock, for display
    started_mono: float
    last_active: float  # monotonic: last request start or end
    state: str = "ready"
    cpu: float = 0.0  # its CPU quota now (the app's cpu, until scaled up or down)
    outstanding: int = 0
    cap: int = UNCAPPED  # most requests in flight while other instances can take more (slow start)
    tunnels: int = 0
    requests: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    start_path: str = "start"  # how it came to be: "start" or "pool"
    freezing: asyncio.Task | None = None
    # Request counters for the monitor, kept where `outstanding` changes anyway.
    busy_s: float = 0.0  # integral of `outstanding` over time, up to busy_at
    busy_at: float = 0.0
    latency_s: float = 0.0  # sum of response times of completed requests (requests - outstanding)
    reading: monitor.Reading | None = None  # the last sample


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
    cold_paths: dict[str, int] = field(default_factory=lambda: {"thaw": 0, "pool": 0, "start": 0})
    freezes: int = 0


@dataclass
class AppState:
    app: object
    instances: dict[str, Instance] = field(default_factory=dict)
    starting: asyncio.Task | None = None
    removing: bool = False
    connections: int = 0  # open client connections for this app's hostnames
    meter: Meter = field(default_factory=Meter)
    pending_starts: int = 0  # instances being started (cold start, scale-out, replacement)
    history: History = field(default_factory=History)  # the scaling policy's memory

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
        sample_interval_s: how often running instances are sampled and the scaling policy
            runs; 0 disables the background monitor (tests then call `sample()` themselves).
        tuning: the scaling policy's thresholds.
        clock: monotonic clock (injected in tests).
    """

    def __init__(
        self,
        cmdb,
        backend: InstanceBackend,
        *,
        hold_timeout_s: float = 30.0,
        drain_timeout_s: float = 10.0,
        sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S,
        tuning: Tuning = Tuning(),
        clock: Callable[[], float] = time.monotonic,
        on_instance_gone: Callable[[str], None] | None = None,
    ):
        self.cmdb = cmdb
        self.backend = backend
        self.hold_timeout_s = hold_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.sample_interval_s = sample_interval_s
        self.tuning = tuning
        self.clock = clock
        self._monitor: asyncio.Task | None = None
        self.on_instance_gone = on_instance_gone or (lambda name: None)
        self.on_apps_reloaded: Callable[[list], None] = lambda apps: None
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
        self.on_apps_reloaded(list(apps.values()))

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
            instance, path = await self._wait_for_instance(state)
            now = self.clock()
            cold = (path, round((now - t0) * 1000, 1))
            state.meter.cold_paths[path] += 1
            # The request is in flight on the instance from now, not from when it began waiting.
            instance.busy_s += instance.outstanding * (now - instance.busy_at)
            instance.busy_at = now
        return self._lease(state, instance, cold, t0)

    def _lease(self, state: AppState, instance: Instance, cold, t0: float) -> InstanceLease:
        outstanding = instance.outstanding
        if cold is None:
            instance.busy_s += outstanding * (t0 - instance.busy_at)
            instance.busy_at = t0
        instance.outstanding = outstanding + 1
        instance.requests += 1
        instance.last_active = t0
        return InstanceLease(self, state, instance, cold, t0)

    @staticmethod
    def _least_loaded(state: AppState) -> Instance | None:
        best = capped = None
        for inst in state.instances.values():
            if inst.state in ROUTABLE:
                if inst.outstanding >= inst.cap:  # slow start: only if no other can take it
                    if capped is None or inst.outstanding < capped.outstanding:
                        capped = inst
                elif best is None or inst.outstanding < best.outstanding:
                    best = inst
        return best or capped

    async def _wait_for_instance(self, state: AppState) -> tuple[Instance, str]:
        """A ready instance for a request that found none: thawed, else started (shared)."""
        for inst in list(state.instances.values()):
            if inst.state in ("frozen", "freezing") and await self._thaw(state, inst):
                return inst, "thaw"
        deadline = self.clock() + self.hold_timeout_s
        while True:
            if state.starting is None or state.starting.done():
                state.starting = self._spawn(self._start_instance(state, time.monotonic() + self.hold_timeout_s))
            try:
                instance = await asyncio.wait_for(asyncio.shield(state.starting), max(0.0, deadline - self.clock()))
            except asyncio.TimeoutError:
                raise RouteError(504, f"{state.app.name}: no instance became ready within {self.hold_timeout_s:g}s") from None
            except StartFailed as exc:
                raise RouteError(exc.http_status, str(exc)) from None
            if instance.state == "ready":
                return instance, instance.start_path
            # It was stopped again before we got it (app removed): try once more unless removing.
            if state.removing:
                raise RouteError(503, f"{state.app.name} is being removed")

    async def _start_instance(self, state: AppState, deadline: float) -> Instance:
        app = state.app
        t0 = self.clock()
        state.pending_starts += 1
        try:
            started = await self.backend.start(app, deadline)
        except StartFailed as exc:
            self._event(app.name, "start-failed", str(exc))
            raise
        finally:
            state.pending_starts -= 1
        now = self.clock()
        instance = Instance(name=started.name, app=app.name, ip=started.ip, port=started.port,
                            started_at=time.time(), started_mono=now, last_active=now, cpu=app.cpu, busy_at=now,
                            cap=SLOW_START_FIRST, start_path=getattr(started, "path", "start"))
        ms = (now - t0) * 1000
        state.meter.starts += 1
        state.meter.cold_start_ms_total += ms
        if state.removing:
            self._spawn(self._stop(state, instance, "app removed"))
            return instance
        state.instances[instance.name] = instance
        self._record_instance(instance)
        how = "claimed from the pool" if instance.start_path == "pool" else "started"
        self._event(app.name, "start", f"{how} {instance.name} at {instance.ip}:{instance.port} in {ms:.0f} ms",
                    {"instance": instance.name, "ms": round(ms, 1), "path": instance.start_path,
                     "forkserver_ms": getattr(started, "forkserver_ms", None)})
        self._watch()
        return instance

    def _release(self, state: AppState, instance: Instance, status: int, t0: float, failed: bool) -> None:
        now = self.clock()
        outstanding = instance.outstanding
        instance.busy_s += outstanding * (now - instance.busy_at)
        instance.busy_at = instance.last_active = now
        instance.outstanding = outstanding - 1
        elapsed = now - t0
        instance.latency_s += elapsed
        meter = state.meter
        meter.requests += 1
        meter.request_seconds += elapsed
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
        """Mortality and immutability: freeze idle instances, stop idler ones, replace old ones.
        Cheap; call often."""
        now = self.clock()
        for state in list(self.apps.values()):
            app = state.app
            keep = getattr(app, "min_instances", 0)
            freeze_after = getattr(app, "freeze_after_s", None)
            if freeze_after is not None and freeze_after >= app.idle_timeout_s:
                freeze_after = None  # it would be stopped first
            for inst in [i for i in state.instances.values() if i.state in ("ready", "frozen")]:
                idle = now - inst.last_active
                if inst.outstanding:
                    continue
                remaining = sum(1 for i in state.instances.values() if i.state in ("ready", "frozen"))
                if idle >= app.idle_timeout_s and remaining > keep and not (remaining == 1 and state.connections):
                    # (an open client connection, keep-alive or stream, is activity too)
                    self._spawn(self._stop(state, inst, f"idle for {idle:.0f}s"))
                elif inst.state == "ready" and freeze_after is not None and idle >= freeze_after:
                    inst.state = "freezing"  # out of routing at once; a request now thaws it
                    inst.freezing = self._spawn(self._freeze(state, inst, idle))
            lifetime = getattr(app, "max_lifetime_s", None)
            if lifetime:
                for inst in state.ready():
                    if now - inst.started_mono >= lifetime and (state.starting is None or state.starting.done()):
                        self._spawn(self._replace(state, inst))

    async def _freeze(self, state: AppState, inst: Instance, idle: float) -> None:
        try:
            await self.backend.freeze(inst.name)
        except Exception as exc:  # noqa: BLE001 - recorded; it keeps serving unfrozen
            if inst.state == "freezing":
                inst.state = "ready"
                self._event(state.app.name, "freeze-failed", f"cannot freeze {inst.name}: {exc}",
                            {"instance": inst.name})
            return
        finally:
            inst.freezing = None
        if inst.state == "freezing":
            inst.state = "frozen"
            state.meter.freezes += 1
            self._record_instance(inst)

    async def _thaw(self, state: AppState, inst: Instance) -> bool:
        """Thaw a frozen instance for a waiting request; False if it cannot serve any more."""
        if inst.freezing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(inst.freezing)
        if inst.state == "ready":
            return True  # thawed meanwhile by another request, or its freeze failed
        if inst.state != "frozen":
            return False
        try:
            self.backend.thaw(inst.name)
        except Exception as exc:  # noqa: BLE001 - recorded; the request gets another instance
            log.warning("thawing %s: %s", inst.name, exc)
            self._event(state.app.name, "thaw-failed", f"cannot thaw {inst.name}: {exc}", {"instance": inst.name})
            self._spawn(self._stop(state, inst, "thaw failed"))
            return False
        inst.state = "ready"
        inst.last_active = inst.busy_at = self.clock()
        return True

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
        known = {i.name for s in self.apps.values() for i in s.instances.values()}
        for found in await self.backend.existing():
            if found.name in known:
                continue  # ours already (a reconcile after a fork-server restart)
            state = self.apps.get(found.app)
            row = recorded.get(found.name)
            port = (row.port if row and row.port else None) or (state.app.port if state else None) or 80
            if state and found.running and found.ip and await self.backend.accepting(found.ip, port):
                now = self.clock()
                inst = Instance(name=found.name, app=found.app, ip=found.ip, port=port, started_at=found.started_at,
                                started_mono=now, last_active=now, cpu=found.cpu or state.app.cpu, busy_at=now)
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
        if adopted:
            self._watch()
        return {"adopted": adopted, "removed": removed}

    async def shutdown(self) -> None:
        """Stop every instance (after draining) and wait for all background work."""
        if self._monitor is not None:
            self._monitor.cancel()
        for state in self.apps.values():
            state.removing = True
        stops = [self._stop(s, i, "serve is stopping") for s in self.apps.values() for i in list(s.instances.values())]
        await asyncio.gather(*stops, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ----- self-monitoring and scaling ------------------------------------------------------

    def _watch(self) -> None:
        """Run the monitor while any instance exists (it ends itself when none is left)."""
        if self.sample_interval_s > 0 and self._monitor is None:
            self._monitor = self._spawn(self._monitor_loop())

    async def _monitor_loop(self) -> None:
        try:
            while any(state.instances for state in self.apps.values()):
                await asyncio.sleep(self.sample_interval_s)
                try:
                    self.sample()
                except Exception:  # noqa: BLE001 - a bad sample must not end monitoring; it is logged
                    log.exception("sampling instances failed")
        finally:
            self._monitor = None

    def sample(self) -> None:
        """Read every instance's figures and, for apps with autoscale on, act on the policy's
        decisions. Cheap (a few kernel-file reads per instance); the monitor calls it every
        sample_interval_s, tests call it with a fake clock."""
        now = self.clock()
        for state in list(self.apps.values()):
            if state.removing:
                continue
            figures = []
            for inst in list(state.instances.values()):
                if inst.state not in ROUTABLE:
                    continue
                stats = self.backend.cgroup_stats(inst.name)
                if inst.cap != UNCAPPED:
                    inst.cap = self._slow_start_cap(now - inst.started_mono, stats.pids_current if stats else 0)
                busy_s = inst.busy_s + inst.outstanding * (now - inst.busy_at)
                cur = monitor.reading(now, stats, busy_s, inst.requests - inst.outstanding, inst.latency_s)
                prev, inst.reading = inst.reading, cur
                if prev is not None and inst.state == "ready":
                    figures.append(monitor.figures(inst.name, inst.cpu, inst.started_mono, prev, cur))
            if not state.app.autoscale:
                state.history = msgspec.structs.replace(state.history, hot_since_s=None, calm_since_s=None)
                continue
            plan = decide(AppMetrics(app=state.app, instances=tuple(figures), starting=state.pending_starts,
                                     history=state.history), now, self.tuning)
            state.history = plan.history
            for decision in plan.decisions:
                self._carry_out(state, decision)

    @staticmethod
    def _slow_start_cap(age_s: float, processes: int) -> int:
        if age_s >= SLOW_START_S:
            return UNCAPPED
        return max(SLOW_START_FIRST << int(max(0.0, age_s) / SLOW_START_STEP_S), processes - 1)

    def _carry_out(self, state: AppState, decision: Decision) -> None:
        app = state.app
        data = {"reason": decision.reason, **decision.figures}
        match decision.action:
            case "scale-up" | "scale-down":
                inst = state.instances.get(decision.instance or "")
                if inst is not None and inst.state == "ready":
                    self._spawn(self._set_cpu(state, inst, decision.cpu, decision.action, decision.reason, data))
            case "scale-out":
                self._event(app.name, "scale-out", decision.reason, data)
                state.starting = self._spawn(self._start_instance(state, time.monotonic() + self.hold_timeout_s))
            case "scale-in":
                inst = state.instances.get(decision.instance or "")
                if inst is not None and inst.state == "ready":
                    self._event(app.name, "scale-in", decision.reason, {**data, "instance": inst.name})
                    self._spawn(self._stop(state, inst, "scaled in"))

    async def _set_cpu(self, state: AppState, inst: Instance, cpu: float, action: str, reason: str,
                       data: dict) -> None:
        """Change one instance's quota live; the event says when it took effect."""
        before, inst.cpu = inst.cpu, cpu  # at once, so the next sample judges the new quota
        t0 = self.clock()
        try:
            await self.backend.set_cpu(inst.name, cpu)
        except Exception as exc:  # noqa: BLE001 - recorded; the instance keeps its old quota
            inst.cpu = before
            if inst.state in ROUTABLE:
                self._event(state.app.name, "scale-failed", f"cannot set cpu of {inst.name} to {cpu:g}: {exc}",
                            {"instance": inst.name, "cpu": cpu})
            return
        ms = (self.clock() - t0) * 1000
        self._record_instance(inst)
        self._event(state.app.name, action, f"{reason} (applied in {ms:.0f} ms)",
                    {**data, "instance": inst.name, "cpu_from": before, "cpu_to": cpu, "ms": round(ms, 1)})

    async def scale(self, name: str, request: Scale) -> Scale:
        """An operator's order (`fcrun app scale`): a number of instances, or a CPU quota for
        every ready instance. Works with autoscale on or off; the policy's cooldowns count it.
        Returns once done: new instances accept connections, removed ones have drained.

        Raises:
            NotFound: no such app.
            IncorrectStatus: a CPU change for an app with no ready instance.
            ContainerError: an instance could not be started (the message says why).
            FcrunError: the kernel refused the new quota.
        """
        state = self.apps.get(name)
        if state is None or state.removing:
            raise NotFound(f"no app named {name!r} is served")
        app = state.app
        ready = state.ready()
        now = self.clock()
        if request.cpu is not None:
            if not ready:
                raise IncorrectStatus(f"cannot set the cpu of {name}: it has no running instance "
                                      f"(new instances start with its --cpu {app.cpu:g})")
            cpu = request.cpu
            for inst in ready:
                before, inst.cpu = inst.cpu, cpu
                try:
                    await self.backend.set_cpu(inst.name, cpu)
                except FcrunError:
                    inst.cpu = before
                    raise
                self._record_instance(inst)
                action = "scale-up" if cpu > before else "scale-down"
                self._event(name, action, f"forced: {inst.name} cpu {before:g} -> {cpu:g} (fcrun app scale)",
                            {"instance": inst.name, "cpu_from": before, "cpu_to": cpu, "forced": True})
                self._count_forced(state, action, now)
            return Scale(cpu=cpu)
        wanted = request.instances
        have = len(ready) + state.pending_starts
        if wanted > have:
            self._event(name, "scale-out", f"forced: {have} -> {wanted} instances (fcrun app scale)",
                        {"instances_from": have, "instances_to": wanted, "forced": True})
            self._count_forced(state, "scale-out", now)
            starts = [self._spawn(self._start_instance(state, time.monotonic() + self.hold_timeout_s))
                      for _ in range(wanted - have)]
            state.starting = starts[-1]
            results = await asyncio.gather(*starts, return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise ContainerError(f"cannot scale {name} out to {wanted} instances: {failed[0]}")
        elif wanted < len(ready):
            self._event(name, "scale-in", f"forced: {len(ready)} -> {wanted} instances (fcrun app scale)",
                        {"instances_from": len(ready), "instances_to": wanted, "forced": True})
            self._count_forced(state, "scale-in", now)
            # Drain the least busy first; among equals the newest.
            victims = sorted(ready, key=lambda i: (i.outstanding, -i.started_mono))[:len(ready) - wanted]
            await asyncio.gather(*(self._stop(state, i, "scaled in (forced)") for i in victims))
        return Scale(instances=len(state.ready()) + state.pending_starts)

    @staticmethod
    def _count_forced(state: AppState, action: str, now: float) -> None:
        """A forced action restarts the policy's cooldown of its family."""
        if action in ("scale-up", "scale-out"):
            state.history = History(last_up_s=now, last_down_s=state.history.last_down_s)
        else:
            state.history = History(last_up_s=state.history.last_up_s, last_down_s=now)

    # ----- metering -----------------------------------------------------------------------------

    def stats(self) -> dict[str, dict]:
        now = self.clock()
        out = {}
        for name, state in self.apps.items():
            m = state.meter
            live = list(state.instances.values())
            memory = {i.name: getattr(self.backend.cgroup_stats(i.name), "memory_bytes", 0) for i in live}
            out[name] = {
                "requests": m.requests,
                "status": dict(m.status),
                "failed": m.failed,
                "request_seconds": round(m.request_seconds, 6),
                "cpu_seconds": round(m.cpu_seconds_stopped + sum(self.backend.cpu_seconds(i.name) for i in live), 6),
                "instance_seconds": round(m.instance_seconds_stopped + sum(now - i.started_mono for i in live), 3),
                "instances": {"ready": len(state.ready()), "total": len(live),
                              "frozen": sum(1 for i in live if i.state == "frozen")},
                "starts": m.starts,
                "cold_start_ms_avg": round(m.cold_start_ms_total / m.starts, 1) if m.starts else None,
                "cold_paths": dict(m.cold_paths),
                "freezes": m.freezes,
                "memory_bytes": sum(memory.values()),
                "frozen_memory_bytes": sum(memory[i.name] for i in live if i.state == "frozen"),
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
                                                  ip=inst.ip, port=inst.port, cpu=inst.cpu or None,
                                                  started_at=inst.started_at))

    def _event(self, app: str | None, kind: str, message: str, data: dict | None = None) -> None:
        with contextlib.suppress(Exception):
            self.cmdb.add_event(app, kind, message, data or {})
