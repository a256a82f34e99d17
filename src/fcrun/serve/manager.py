"""The container manager of `fcrun serve`: FastContainer's request flow and lifecycle.

It is the proxy's Router: `acquire(host)` maps a Host to an app, picks the ready instance with
the fewest outstanding requests, or starts one and holds the request until it accepts
connections (concurrent requests for a cold app share one start). `tick()` applies
mortality (stop after idle-timeout, with draining) and immutability (replace after
max-lifetime); serve calls it periodically, tests call it with a fake clock.

While instances run, the manager also watches them (FastContainer's self-monitoring): every `sample_interval_s`
`sample()` reads each instance's cgroup and request counters (monitor.py), hands each app's figures to the
scaling policy (policy.py, a pure function) and carries out its decisions - a quota raised or lowered live, an
instance started (it joins the rotation once it accepts connections, with a slow start: see instances.py) or
drained and stopped. `scale()` does the same on an operator's order (`fcrun app scale`), with or without
autoscale. Every decision is an event with its reason and figures.

Instances and their states (with the table of allowed moves) live in instances.py, metering in metering.py,
CMDB writes in records.py (off the event loop). Every task it starts belongs to its `TaskOwner` (tasks.py);
every deadline is read from its injected clock.

A request that finds no ready instance is served, fastest first, by thawing a frozen one ("thaw"), by a
pre-warmed instance claimed from the fork-server's pool ("pool"), or by a new one ("start"): the path and its
time go to the client in X-Fcrun-Cold-Start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ..cmdb.base import CMDB, CMDBError
from ..cmdb.models import App, AppStats
from ..crashpoints import crash_point
from ..errors import FcrunError
from ..proxy.router import RouteError
from . import monitor
from .backend import InstanceBackend, StartFailed
from .instances import DRAINING, FREEZING, FROZEN, IDLE_CANDIDATES, READY, REPLACING, STOPPED, adopted_instance
from .instances import SLOW_START_FIRST, UNCAPPED, Instance, InstanceLease, least_loaded, slow_start_cap
from .metering import Meter
from .orders import Orders
from .policy import AppMetrics, Decision, History, Tuning, decide
from .records import Recorder
from .shares import claim_share
from ..tasks import TaskOwner

log = logging.getLogger("fcrun.serve")

DEFAULT_SAMPLE_INTERVAL_S = 0.25


@dataclass
class AppState:
    """The manager's record of one app: its settings, its instances and what it is doing."""

    app: App
    instances: dict[str, Instance] = field(default_factory=dict)
    starting: asyncio.Task | None = None  # the start that requests without an instance wait for
    removing: bool = False
    connections: int = 0  # open client connections for this app's hostnames
    meter: Meter = field(default_factory=Meter)
    pending_starts: int = 0  # instances being started (cold start, scale-out, replacement)
    history: History = field(default_factory=History)  # the scaling policy's memory

    def ready(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state is READY]

    def start_in_progress(self) -> bool:
        return self.starting is not None and not self.starting.done()


class Manager(Orders):
    """Routes requests to app instances and runs their lifecycle.

    Args:
        cmdb: the configuration DB (apps, instances, events).
        backend: makes and removes instances (RuntimeBackend, or a fake in tests).
        hold_timeout_s: how long a request may wait for a cold start before 504.
        drain_timeout_s: how long a stopping instance may take to finish in-flight requests.
        sample_interval_s: how often running instances are sampled and the scaling policy
            runs; 0 disables the background monitor (tests then call `sample()` themselves).
        tuning: the scaling policy's thresholds.
        clock: monotonic clock for every deadline and duration (injected in tests; the
            backend must read the same one, since start deadlines are handed to it).
        tasks: owner of the manager's tasks (serve's scope for it); by default its own.
        records: where events and instance rows go; by default a Recorder of its own.
        apps: the apps to serve; by default read from the CMDB (synchronously, once: pass
            them when the event loop already serves something).
        claims: the CMDB is shared with other serves: claim each new instance there first
            (shares.py), so that together they never run more than an app's max_instances.
    """

    def __init__(
        self,
        cmdb: CMDB,
        backend: InstanceBackend,
        *,
        hold_timeout_s: float = 30.0,
        drain_timeout_s: float = 10.0,
        sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S,
        tuning: Tuning = Tuning(),
        clock: Callable[[], float] = time.monotonic,
        on_instance_gone: Callable[[str], None] | None = None,
        tasks: TaskOwner | None = None,
        records: Recorder | None = None,
        apps: list[App] | None = None,
        claims: bool = False,
    ):
        self.cmdb = cmdb
        self.claims = claims
        self.backend = backend
        self.hold_timeout_s = hold_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.sample_interval_s = sample_interval_s
        self.tuning = tuning
        self.clock = clock
        self.tasks = tasks if tasks is not None else TaskOwner("manager")
        self.records = records if records is not None else Recorder(cmdb, self.tasks)
        self.on_instance_gone = on_instance_gone or (lambda name: None)
        self.on_apps_reloaded: Callable[[list[App]], None] = lambda apps: None
        # A node of a cluster: where a scale-out goes if not here (the node's name, or None: here).
        self.scale_out_elsewhere: Callable[[App], str | None] | None = None
        # fcrun.logs.serverlog.AccessLog when the access log is on: (app, instance, status,
        # duration_s, cold start (path, ms) or None, failed). None: requests pay nothing for it.
        self.access_log: Callable[[str, str, int, float, tuple[str, float] | None, bool], None] | None = None
        self.apps: dict[str, AppState] = {}
        self._by_host: dict[str, AppState] = {}
        self._monitor: asyncio.Task | None = None
        self.apply_apps(cmdb.list_apps() if apps is None else apps)

    # ----- configuration -------------------------------------------------------------------

    async def reload_apps(self) -> None:
        """Re-read apps from the CMDB (in a worker thread); running instances keep serving
        with their settings.

        Raises:
            CMDBError: the CMDB cannot be read (the apps served stay as they were).
        """
        self.apply_apps(await asyncio.to_thread(self.cmdb.list_apps))

    def apply_apps(self, apps: list[App]) -> None:
        """Serve these apps from now on; instances of apps no longer listed are kept until
        they stop (removing an app drains them: `remove_app`)."""
        by_name = {app.name: app for app in apps}
        for name, app in by_name.items():
            if name in self.apps:
                self.apps[name].app = app
            else:
                self.apps[name] = AppState(app=app)
        for name in list(self.apps):
            if name not in by_name and not self.apps[name].instances:
                del self.apps[name]
        self._by_host = {}
        for state in self.apps.values():
            if state.app.name in by_name:
                for host in [state.app.name, *state.app.hostnames]:
                    self._by_host[host] = state
        self.on_apps_reloaded(list(by_name.values()))

    # ----- the request path ------------------------------------------------------------------

    def acquire_nowait(self, host: str) -> InstanceLease | None:
        """The hot path: a lease on a ready instance, or None when the app has none (then the
        proxy awaits acquire(), which starts one)."""
        state = self._by_host.get(host)
        if state is None or state.removing:
            raise RouteError(404, f"no app is configured for host {host!r}")
        instance = least_loaded(state.instances.values())
        if instance is None:
            return None
        now = self.clock()
        instance.request_started(now, now)
        if self.access_log is not None:
            return InstanceLease(self._release_logged, (state, None), instance, None, now, state.app.max_body_bytes)
        return InstanceLease(self._release, state, instance, None, now, state.app.max_body_bytes)

    async def acquire(self, host: str) -> InstanceLease:
        state = self._by_host.get(host)
        if state is None or state.removing:
            raise RouteError(404, f"no app is configured for host {host!r}")
        began = now = self.clock()
        instance = least_loaded(state.instances.values())
        cold = None
        if instance is None:
            instance, path = await self._wait_for_instance(state)
            now = self.clock()
            cold = (path, round((now - began) * 1000, 1))
            state.meter.cold_start(path, now - began)
        # In flight on the instance from now, not from when the request began waiting.
        instance.request_started(now, began)
        if self.access_log is not None:
            return InstanceLease(self._release_logged, (state, cold), instance, cold, began, state.app.max_body_bytes)
        return InstanceLease(self._release, state, instance, cold, began, state.app.max_body_bytes)

    async def _wait_for_instance(self, state: AppState) -> tuple[Instance, str]:
        """A ready instance for a request that found none: thawed, else started (shared)."""
        for inst in list(state.instances.values()):
            if inst.state in (FROZEN, FREEZING) and await self._thaw(state, inst):
                return inst, "thaw"
        deadline = self.clock() + self.hold_timeout_s
        while True:
            if not state.start_in_progress():
                state.starting = self._start_soon(state)
            try:
                instance = await asyncio.wait_for(asyncio.shield(state.starting), max(0.0, deadline - self.clock()))
            except asyncio.TimeoutError:
                raise RouteError(504, f"{state.app.name}: no instance became ready within {self.hold_timeout_s:g}s") from None
            except StartFailed as exc:
                raise RouteError(exc.http_status, str(exc)) from None
            if instance.state is READY:
                return instance, instance.start_path
            # It was stopped again before we got it (app removed): try once more unless removing.
            if state.removing:
                raise RouteError(503, f"{state.app.name} is being removed")

    def _start_soon(self, state: AppState, claim: bool = True, surge: int = 0) -> asyncio.Task:
        """Start an instance in the background; its task says how it went (StartFailed).
        `claim=False`: a successor that takes over its predecessor's share (_replace); `surge`:
        shares it may claim over the app's max (a move, whose old instances run until it is ready)."""
        return self.tasks.spawn(self._start_instance(state, self.clock() + self.hold_timeout_s, claim, surge),
                                name=f"start {state.app.name}", expected=(StartFailed,))

    async def _start_instance(self, state: AppState, deadline: float, claim: bool = True, surge: int = 0) -> Instance:
        app = state.app
        t0 = self.clock()
        state.pending_starts += 1
        claimed = None
        try:
            if self.claims and claim:
                claimed = await claim_share(self.records, app, deadline, self.clock, surge=surge,
                                            has_ready=lambda: bool(state.ready()), removing=lambda: state.removing)
            started = await self.backend.start(app, deadline)
        except BaseException as exc:
            if isinstance(exc, StartFailed):
                self.records.event(app.name, "start-failed", str(exc))
            if claimed is not None:
                self.records.instance_gone(claimed)
            raise
        finally:
            state.pending_starts -= 1
        crash_point("serve.instance.started")  # before the manager or the CMDB knows of it
        now = self.clock()
        instance = Instance(name=started.name, app=app.name, ip=started.ip, port=started.port,
                            started_at=time.time(),  # wall clock: shown to people, not a deadline
                            started_mono=now, last_active=now, cpu=app.cpu, busy_at=now,
                            cap=SLOW_START_FIRST, start_path=started.path)
        ms = (now - t0) * 1000
        state.meter.started(ms)
        if state.removing:
            if claimed is not None:
                self.records.instance_gone(claimed)
            self._stop_soon(state, instance, "app removed")
            return instance
        state.instances[instance.name] = instance
        self._record(instance)
        if claimed is not None:  # after the real row: the app's count never dips below the truth
            self.records.instance_gone(claimed)
        how = "claimed from the pool" if instance.start_path == "pool" else "started"
        self.records.event(app.name, "start", f"{how} {instance.name} at {instance.ip}:{instance.port} in {ms:.0f} ms",
                           {"instance": instance.name, "ms": round(ms, 1), "path": instance.start_path,
                            "forkserver_ms": started.forkserver_ms})
        self._watch()
        return instance

    def _release(self, state: AppState, instance: Instance, status: int, began: float, failed: bool) -> None:
        state.meter.request_done(status, instance.request_ended(self.clock(), began), failed)

    def _release_logged(self, owner: tuple[AppState, tuple[str, float] | None], instance: Instance, status: int,
                        began: float, failed: bool) -> None:
        """_release, then the access log's line (only leases made while it is on come here)."""
        state, cold = owner
        self._release(state, instance, status, began, failed)
        if self.access_log is not None:
            self.access_log(state.app.name, instance.name, status, self.clock() - began, cold, failed)

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
            freeze_after = app.freeze_after_s
            if freeze_after is not None and freeze_after >= app.idle_timeout_s:
                freeze_after = None  # it would be stopped first
            for inst in [i for i in state.instances.values() if i.state in IDLE_CANDIDATES]:
                idle = now - inst.last_active
                if inst.outstanding:
                    continue
                remaining = sum(1 for i in state.instances.values() if i.state in IDLE_CANDIDATES)
                if idle >= app.idle_timeout_s and remaining > app.min_instances and not (remaining == 1 and state.connections):
                    # (an open client connection, keep-alive or stream, is activity too)
                    self._stop_soon(state, inst, f"idle for {idle:.0f}s")
                elif inst.state is READY and freeze_after is not None and idle >= freeze_after:
                    inst.move_to(FREEZING)  # out of routing at once; a request now thaws it
                    inst.freezing = self.tasks.spawn(self._freeze(state, inst), name=f"freeze {inst.name}")
            if app.max_lifetime_s:
                for inst in state.ready():
                    if now - inst.started_mono >= app.max_lifetime_s and not state.start_in_progress():
                        inst.move_to(REPLACING)  # still routable until its successor is ready
                        self.tasks.spawn(self._replace(state, inst), name=f"replace {inst.name}")

    async def _freeze(self, state: AppState, inst: Instance) -> None:
        try:
            await self.backend.freeze(inst.name)
        except (FcrunError, OSError) as exc:  # recorded; it keeps serving unfrozen
            if inst.state is FREEZING:
                inst.move_to(READY)
                self.records.event(state.app.name, "freeze-failed", f"cannot freeze {inst.name}: {exc}",
                                   {"instance": inst.name})
            return
        finally:
            inst.freezing = None
        if inst.state is FREEZING:  # not stopped meanwhile
            inst.move_to(FROZEN)
            state.meter.freezes += 1
            self._record(inst)

    async def _thaw(self, state: AppState, inst: Instance) -> bool:
        """Thaw a frozen instance for a waiting request; False if it cannot serve any more."""
        if inst.freezing is not None:
            # wait(), not the task: how the freeze went shows in inst.state (a failure was
            # recorded by _freeze), and a cancelled request must not cancel the freeze.
            await asyncio.wait({inst.freezing})
        if inst.state is READY:
            return True  # thawed meanwhile by another request, or its freeze failed
        if inst.state is not FROZEN:
            return False
        try:
            self.backend.thaw(inst.name)
            crash_point("thaw.thawed")
        except (FcrunError, OSError) as exc:  # recorded; the request gets another instance
            log.warning("thawing %s: %s", inst.name, exc)
            self.records.event(state.app.name, "thaw-failed", f"cannot thaw {inst.name}: {exc}",
                               {"instance": inst.name})
            self._stop_soon(state, inst, "thaw failed")
            return False
        inst.move_to(READY)
        inst.last_active = inst.busy_at = self.clock()
        return True

    async def _replace(self, state: AppState, old: Instance) -> None:
        """Start a successor, move traffic to it, then drain and stop the old one."""
        try:
            state.starting = self._start_soon(state, claim=False)
            await state.starting
        except StartFailed:
            if old.state is REPLACING:  # not stopped meanwhile (app removed)
                old.move_to(READY)  # keep serving with the old one; try again at a later tick
                old.started_mono = self.clock()
            return
        await self._stop(state, old, "max lifetime reached")

    def _stop_soon(self, state: AppState, instance: Instance, reason: str) -> None:
        self.tasks.spawn(self._stop(state, instance, reason), name=f"stop {instance.name}")

    async def _stop(self, state: AppState, instance: Instance, reason: str) -> None:
        """Take out of routing, let in-flight requests finish (up to the drain timeout), stop."""
        if instance.state in (DRAINING, STOPPED):
            return
        instance.move_to(DRAINING)
        try:
            await asyncio.wait_for(instance.drained.wait(), self.drain_timeout_s)
        except asyncio.TimeoutError:
            log.info("%s: %d requests still in flight after %gs of draining; stopping it anyway",
                     instance.name, instance.outstanding, self.drain_timeout_s)
        self.on_instance_gone(instance.name)
        crash_point("serve.instance.drained")
        try:
            cpu = await self.backend.stop(instance.name, state.app)
        except (FcrunError, OSError) as exc:  # recorded; the instance is out of routing either way
            log.warning("stopping %s: %s", instance.name, exc)
            self.records.event(state.app.name, "stop-failed", f"stopping {instance.name}: {exc}")
            cpu = 0.0
        crash_point("serve.instance.stopped")  # its CMDB row still says it runs
        instance.move_to(STOPPED)
        state.instances.pop(instance.name, None)
        state.meter.stopped(instance, cpu, self.clock())
        self.records.instance_gone(instance.name)
        self.records.event(state.app.name, "stop", f"stopped {instance.name}: {reason}", {"instance": instance.name})

    async def remove_app(self, name: str) -> None:
        """Drain and stop every instance of an app; new requests get 404 from now on."""
        state = self.apps.get(name)
        if state is None:
            return
        state.removing = True
        self._by_host = {h: s for h, s in self._by_host.items() if s is not state}
        if state.start_in_progress():
            # Its outcome is for the requests that wait on it (a failed start is recorded);
            # an instance that starts now is stopped at once since the app is removing.
            await asyncio.wait({state.starting})
        await asyncio.gather(*(self._stop(state, i, "app removed") for i in list(state.instances.values())))
        self.apps.pop(name, None)

    async def reconcile(self) -> dict[str, list[str]]:
        """At start-up: adopt instances of known apps that accept connections, remove the rest."""
        adopted, removed = [], []
        try:
            rows = await asyncio.to_thread(self.cmdb.list_instances)
        except CMDBError as exc:
            log.warning("reconcile: cannot read the recorded instances (their ports and rows): %s", exc)
            rows = []
        recorded = {row.id: row for row in rows}
        known = {i.name for s in self.apps.values() for i in s.instances.values()}
        for found in await self.backend.existing():
            if found.name in known:
                continue  # ours already (a reconcile after a fork-server restart)
            state = self.apps.get(found.app)
            row = recorded.get(found.name)
            port = (row.port if row and row.port else None) or (state.app.port if state else None) or 80
            # A frozen one is not asked (its kernel would accept, its server not): a request thaws it.
            if state and found.ip and (found.frozen or found.running and await self.backend.accepting(found.ip, port)):
                inst = adopted_instance(found, port, found.cpu or state.app.cpu, self.clock())
                state.instances[inst.name] = inst
                self._record(inst)
                adopted.append(found.name)
            else:
                try:
                    await self.backend.stop(found.name, state.app if state else None)
                except (FcrunError, OSError) as exc:
                    log.warning("reconcile: cannot remove instance %s: %s", found.name, exc)
                removed.append(found.name)
        known = {i.name for s in self.apps.values() for i in s.instances.values()}
        for row in rows:
            if row.id not in known and row.owner in ("", self.records.node):  # another serve's: not ours
                self.records.instance_gone(row.id)
        if adopted or removed:
            self.records.event(None, "reconcile", f"adopted {len(adopted)}, removed {len(removed)} instances",
                               {"adopted": adopted, "removed": removed})
        if adopted:
            self._watch()
        return {"adopted": adopted, "removed": removed}

    async def settle(self) -> None:
        """Wait until no background job of the manager is left and what it recorded is written."""
        await self.tasks.join()
        await self.records.flush()

    async def shutdown(self) -> None:
        """Stop every instance (after draining), wait for all background work, close the
        manager's task owner."""
        if self._monitor is not None:
            self._monitor.cancel()
        for state in self.apps.values():
            state.removing = True
        stopping = [(i.name, self._stop(s, i, "serve is stopping")) for s in self.apps.values()
                    for i in list(s.instances.values())]
        results = await asyncio.gather(*(stop for _, stop in stopping), return_exceptions=True)
        for (name, _), result in zip(stopping, results):
            if isinstance(result, BaseException):
                log.error("stopping %s at shutdown failed", name, exc_info=result)
        await self.settle()
        await self.tasks.aclose()

    @property
    def monitoring(self) -> bool:
        """Whether the background monitor runs (it does while any instance exists)."""
        return self._monitor is not None

    # ----- self-monitoring and scaling ------------------------------------------------------

    def _watch(self) -> None:
        """Run the monitor while any instance exists (it ends itself when none is left)."""
        if self.sample_interval_s > 0 and self._monitor is None:
            self._monitor = self.tasks.spawn_service(self._monitor_loop(), name="monitor")

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
                if not inst.routable:
                    continue
                stats = self.backend.cgroup_stats(inst.name)
                if inst.cap != UNCAPPED:
                    inst.cap = slow_start_cap(now - inst.started_mono, stats.pids_current if stats else 0)
                cur = monitor.reading(now, stats, inst.busy_until(now), inst.requests - inst.outstanding,
                                      inst.latency_s)
                prev, inst.reading = inst.reading, cur
                if prev is not None and inst.state is READY:
                    figures.append(monitor.figures(inst.name, inst.cpu, inst.started_mono, prev, cur))
            if not state.app.autoscale:
                state.history = msgspec.structs.replace(state.history, hot_since_s=None, calm_since_s=None)
                continue
            plan = decide(AppMetrics(app=state.app, instances=tuple(figures), starting=state.pending_starts,
                                     history=state.history), now, self.tuning)
            state.history = plan.history
            for decision in plan.decisions:
                self._carry_out(state, decision)

    def _carry_out(self, state: AppState, decision: Decision) -> None:
        app = state.app
        data = {"reason": decision.reason, **decision.figures}
        match decision.action:
            case "scale-up" | "scale-down":
                inst = state.instances.get(decision.instance or "")
                if inst is not None and inst.state is READY:
                    self.tasks.spawn(self._set_cpu(state, inst, decision.cpu, decision.action, decision.reason, data),
                                     name=f"{decision.action} {inst.name}")
            case "scale-out":
                elsewhere = self.scale_out_elsewhere(app) if self.scale_out_elsewhere is not None else None
                if elsewhere is not None:  # a node role: cluster/node.py placed it on a less busy node
                    self.records.event(app.name, "scale-out", f"{decision.reason}; on {elsewhere}", data)
                    return
                self.records.event(app.name, "scale-out", decision.reason, data)
                state.starting = self._start_soon(state)
            case "scale-in":
                inst = state.instances.get(decision.instance or "")
                if inst is not None and inst.state is READY:
                    self.records.event(app.name, "scale-in", decision.reason, {**data, "instance": inst.name})
                    self._stop_soon(state, inst, "scaled in")

    async def _set_cpu(self, state: AppState, inst: Instance, cpu: float, action: str, reason: str,
                       data: dict) -> None:
        """Change one instance's quota live; the event says when it took effect."""
        before, inst.cpu = inst.cpu, cpu  # at once, so the next sample judges the new quota
        t0 = self.clock()
        try:
            await self.backend.set_cpu(inst.name, cpu)
            crash_point("serve.scale-up.written")  # cpu.max changed, its CMDB row not yet
        except (FcrunError, OSError) as exc:  # recorded; the instance keeps its old quota
            inst.cpu = before
            if inst.routable:
                self.records.event(state.app.name, "scale-failed", f"cannot set cpu of {inst.name} to {cpu:g}: {exc}",
                                   {"instance": inst.name, "cpu": cpu})
            return
        ms = (self.clock() - t0) * 1000
        self._record(inst)
        self.records.event(state.app.name, action, f"{reason} (applied in {ms:.0f} ms)",
                           {**data, "instance": inst.name, "cpu_from": before, "cpu_to": cpu, "ms": round(ms, 1)})

    # ----- metering and records ---------------------------------------------------------------

    def stats(self) -> dict[str, AppStats]:
        """Each app's metering now (counters plus its live instances' cgroup figures)."""
        now = self.clock()
        return {name: s.meter.stats(list(s.instances.values()), self.backend, now, s.pending_starts)
                for name, s in self.apps.items()}

    def _record(self, inst: Instance) -> None:
        self.records.instance(inst.row())
