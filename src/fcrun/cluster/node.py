"""What a compute node (``fcrun serve --role node``) does for the cluster, beside serving.

Every `BEAT_S` it writes its heartbeat: its role, the address fronts forward to, and its
figures (capacity, what its instances and pool reserve, the CPU they used since the last beat),
which fronts rank it by (placement.py). Every `FOLLOW_S` it follows the CMDB's placements of
its apps:

* **move in**: an app is placed here (active) while another node's placement of it is leaving
  (`fcrun app move`, a drain): start one instance here now (Manager.start_surge, one share
  over the app's max), so that the new home is ready before the old one stops taking requests;
  a new placement of an app that another node serves (a scale-out sent here) starts one too,
  within the max; either once per placement;
* **move out**: its own placement of an app is leaving and an active node has a ready
  instance of it: after `GRACE_S` (longer than fronts take to re-read the instances) its
  instances of the app drain and stop (Manager.evacuate), then the placement row goes;
* **forget**: an active placement here whose app has had no instance here for `GRACE_S`
  (they idled out): the row goes, so that the app's next cold request is placed by free
  resources again rather than stuck to this node;
* its admin state: a drain (`fcrun node drain`) turns its placements leaving (the CMDB does);
  each of them gets a new active placement elsewhere by `placement.place`, so that the moves
  above run for every app it had.

A scale-out decided here goes to another node when this one is the busier
(`place_scale_out`): the app gains a placement there, and the fronts spread its requests.

At start-up the placements of apps that have no instance here (what it ran before a crash is
gone) are deleted: those apps are placed afresh on their next request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable

from ..cmdb.base import CMDB, NODE_LEASE_S, CMDBError
from ..cmdb.models import App
from ..cmdb.nodes import NodeBeat, NodeRecord, PlacementRow
from .nodes_cache import NodesCache
from .placement import EVENT_KIND, Cluster, NodeFigures, Policy, place, place_scale_out

log = logging.getLogger("fcrun.cluster")

BEAT_S = 1.0  # heartbeat period; a node is down after NODE_LEASE_S (3 beats) without one
FOLLOW_S = 0.25  # how often placements are re-read
GRACE_S = 2.0  # a move out waits this long after the new home is ready (fronts re-read every 0.25 s)
REFUSES_EVERY_S = 10.0  # how often the apps' docroots are looked for (a stat each)


class Capacity:
    """What a node offers: CPUs and memory ([cluster] cpu_capacity, memory_capacity_bytes;
    by default the machine's)."""

    def __init__(self, cpu: float | None = None, memory_bytes: int | None = None):
        self.cpu = float(cpu or os.cpu_count() or 1)
        self.memory_bytes = int(memory_bytes or _mem_total())


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemTotal")


def node_figures(record: NodeRecord, down_after_s: float = NODE_LEASE_S) -> NodeFigures | None:
    """A node's CMDB row as placement reads it; None for a front or a row without figures."""
    f = record.figures
    if record.role == "front" or "cpu_capacity" not in f:
        return None
    try:
        return NodeFigures(name=record.name, state=record.state(down_after_s), cpu_capacity=float(f["cpu_capacity"]),
                           memory_capacity_bytes=int(f["memory_capacity_bytes"]),
                           cpu_reserved=float(f.get("cpu_reserved", 0.0)),
                           memory_reserved_bytes=int(f.get("memory_reserved_bytes", 0)),
                           cpu_used=float(f.get("cpu_used", 0.0)), instances=int(f.get("instances", 0)),
                           pooled={str(k): int(v) for k, v in dict(f.get("pooled", {})).items()})
    except (KeyError, TypeError, ValueError):
        return None  # a row a broken writer left: not ranked


class NodeAgent:
    """The cluster side of one node's serve. `start()` once serving, `run()` as a service.

    `manager` is serve's Manager (its apps, instances, start_surge, evacuate); `spawn(coro,
    name)` runs a job of serve's; `pool` says the pooled instances per image.
    """

    def __init__(self, cmdb: CMDB, manager, *, name: str, address: str, capacity: Capacity,
                 policy: Policy = Policy(), pool: Callable[[], dict[str, int]] = dict,
                 pool_memory_bytes: int = 0, pool_cpu: float = 0.0,
                 event: Callable[[str | None, str, str, dict[str, Any] | None], None],
                 spawn: Callable[..., Any], clock: Callable[[], float] = time.monotonic):
        self.cmdb = cmdb
        self.manager = manager
        self.name = name
        self.address = address
        self.capacity = capacity
        self.policy = policy
        self.pool = pool
        self.pool_memory_bytes = pool_memory_bytes
        self.nodes = NodesCache(cmdb.list_nodes, clock=clock)  # re-read once a beat, not every FOLLOW_S
        self.pool_cpu = pool_cpu
        self.event = event
        self.spawn = spawn
        self.clock = clock
        self.started_at = time.time()
        self.cluster = Cluster(policy=policy)  # the other nodes' figures, from the last read
        self._cpu_seen: tuple[float, float] | None = None  # (clock, CPU seconds of our instances)
        self._cpu_used = 0.0
        self._moving_in: set[str] = set()  # apps with a start_surge in progress
        self._started_for: dict[str, float] = {}  # app -> the placement (its `since`) an instance was started for
        self._leaving: dict[str, float] = {}  # app -> when its new home was first seen ready
        self._empty: dict[str, float] = {}  # app -> since when it has no instance here
        self._beat_failing = False
        self._refused: list[str] = []
        self._refusals: dict[str, set[str]] = {}  # node -> the apps it refuses (from the last read)
        self._refuses_at = 0.0  # when `_refused` is read again (clock)

    # -- start-up ------------------------------------------------------------------------------

    async def start(self) -> None:
        """First heartbeat; forget placements of apps with no instance here (a restart)."""
        await self.beat()
        placements = await asyncio.to_thread(self.cmdb.list_placements, None, self.name)
        for row in placements:
            if not self._local_instances(row.app):
                await asyncio.to_thread(self.cmdb.remove_placement, row.app, self.name)
        if placements:
            self.event(None, "node", f"node {self.name} rejoined; kept the placements of the apps it still runs", None)
        self.manager.scale_out_elsewhere = self.scale_out_elsewhere

    async def run(self) -> None:
        next_beat = self.clock() + BEAT_S
        while True:
            await asyncio.sleep(FOLLOW_S)
            if self.clock() >= next_beat:
                next_beat = self.clock() + BEAT_S
                await self.beat()
            try:
                await self.follow()
            except CMDBError as exc:  # the database is away: warm traffic goes on; retried next round
                log.debug("following the placements: %s", exc)

    # -- heartbeat -----------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        cpu_reserved = memory_reserved = 0.0
        instances = 0
        cpu_total = 0.0
        for state in self.manager.apps.values():
            for inst in state.instances.values():
                instances += 1
                cpu_reserved += inst.cpu or state.app.cpu
                memory_reserved += state.app.memory_bytes
                cpu_total += self.manager.backend.cpu_seconds(inst.name)
        pooled = self.pool()
        memory_reserved += sum(pooled.values()) * self.pool_memory_bytes
        now = self.clock()
        if self._cpu_seen is not None and now > self._cpu_seen[0]:
            # Stopped instances take their seconds with them: a drop is no use, not negative use.
            self._cpu_used = max(0.0, (cpu_total - self._cpu_seen[1]) / (now - self._cpu_seen[0]))
        self._cpu_seen = (now, cpu_total)
        return {"cpu_capacity": self.capacity.cpu, "memory_capacity_bytes": self.capacity.memory_bytes,
                "cpu_reserved": round(cpu_reserved, 3), "memory_reserved_bytes": int(memory_reserved),
                "cpu_used": round(min(self._cpu_used, self.capacity.cpu), 3), "instances": instances,
                "pooled": pooled, "refuses": self._refuses()}

    def _refuses(self) -> list[str]:
        """The apps whose docroot this node does not have (the DataPool is not mounted here):
        fronts place them elsewhere. Re-checked every REFUSES_EVERY_S (a stat per app)."""
        now = self.clock()
        if now >= self._refuses_at:
            self._refuses_at = now + REFUSES_EVERY_S
            self._refused = sorted(name for name, state in self.manager.apps.items()
                                   if state.app.docroot and not os.path.isdir(state.app.docroot))
        return self._refused

    async def beat(self) -> None:
        """One heartbeat; a failure is logged once until one succeeds again."""
        beat = NodeBeat(name=self.name, role="node", address=self.address, figures=self.figures(),
                        started_at=self.started_at)
        try:
            await asyncio.to_thread(self.cmdb.node_beat, beat)
        except CMDBError as exc:
            if not self._beat_failing:
                log.warning("the heartbeat of %s is not recorded (fronts take it for down after %g s): %s",
                            self.name, NODE_LEASE_S, exc)
            self._beat_failing = True
        else:
            if self._beat_failing:
                log.info("the heartbeat of %s is recorded again", self.name)
            self._beat_failing = False

    # -- placements ----------------------------------------------------------------------------

    async def follow(self) -> None:
        """One round: read nodes, placements and instances; start the moves they call for."""
        nodes, (placements, ready) = await asyncio.to_thread(self._read)
        self._refusals = {}
        for record in nodes:
            figures = node_figures(record)
            if figures is not None:
                self.cluster.update(figures)
                self._refusals[record.name] = set(record.figures.get("refuses", ()))
        by_app: dict[str, list[PlacementRow]] = {}
        for row in placements:
            by_app.setdefault(row.app, []).append(row)
        ready_on: dict[str, set[str]] = {}
        for app, owner in ready:
            ready_on.setdefault(app, set()).add(owner)
        placed_here = {app for app, rows in by_app.items() if any(r.node == self.name for r in rows)}
        for timers in (self._empty, self._leaving):  # a row deleted by someone else: its timer goes too
            for app in set(timers) - placed_here:
                del timers[app]
        for app, rows in by_app.items():
            mine = next((r for r in rows if r.node == self.name), None)
            if mine is None:
                continue
            if mine.state == "active":
                self._follow_active(app, rows, ready_on.get(app, set()))
            else:
                await self._follow_leaving(app, rows, ready_on.get(app, set()), nodes)

    def _read(self) -> tuple[list[NodeRecord], tuple[list[PlacementRow], list[tuple[str, str]]]]:
        # Only the apps placed here matter, but their other placements and instances too.
        return self.nodes.read(), self.cmdb.apps_on(self.name)

    def _local_instances(self, app: str) -> int:
        state = self.manager.apps.get(app)
        return 0 if state is None else len(state.instances) + state.pending_starts

    def _follow_active(self, app: str, rows: list[PlacementRow], ready_elsewhere: set[str]) -> None:
        local = self._local_instances(app)
        mine = next(r for r in rows if r.node == self.name)
        leaving_elsewhere = any(r.state == "leaving" and r.node != self.name for r in rows)
        # A new placement of an app that runs elsewhere (a move, a drain, a scale-out to this
        # node): an instance starts here now, once per placement (an instance that idles out
        # later is not restarted; the placement is then forgotten below).
        new = self._started_for.get(app) != mine.since
        if new and not local and app not in self._moving_in and (leaving_elsewhere or ready_elsewhere - {self.name}):
            self._started_for[app] = mine.since
            self._moving_in.add(app)
            self.spawn(self._move_in(app, surge=1 if leaving_elsewhere else 0), f"start {app} for its placement")
            return
        if local or app in self._moving_in:
            self._empty.pop(app, None)
            return
        since = self._empty.setdefault(app, self.clock())
        if self.clock() - since >= GRACE_S:
            self._empty.pop(app, None)
            self.spawn(self._forget(app), f"forget the placement of {app}")

    async def _move_in(self, app: str, surge: int) -> None:
        try:
            t0 = self.clock()
            await self.manager.start_surge(app, surge)
            ms = (self.clock() - t0) * 1000
            if surge:
                self.event(app, "move", f"{app} moved in to {self.name}: an instance is ready in {ms:.0f} ms; "
                                        "the old ones stop once fronts see it", None)
            else:
                self.event(app, "scale-out", f"{app} scaled out to {self.name}: an instance is ready in {ms:.0f} ms",
                           None)
        except Exception as exc:  # noqa: BLE001 - recorded; the others keep serving meanwhile
            self.event(app, "move-failed", f"{app} could not start on {self.name}: {exc}", None)
        finally:
            self._moving_in.discard(app)

    async def _forget(self, app: str) -> None:
        if not self._local_instances(app):
            await asyncio.to_thread(self.cmdb.remove_placement, app, self.name)

    async def _follow_leaving(self, app: str, rows: list[PlacementRow], ready_on: set[str],
                              nodes: list[NodeRecord]) -> None:
        active = {r.node for r in rows if r.state == "active"}
        if not active:
            await self._place_elsewhere(app, nodes)
            return
        if not (active & ready_on):  # the new home is not serving yet: keep serving here
            self._leaving.pop(app, None)
            return
        since = self._leaving.setdefault(app, self.clock())
        if self.clock() - since < GRACE_S:
            return
        self._leaving.pop(app, None)
        stopped = await self.manager.evacuate(app, f"{app} moved to {', '.join(sorted(active))}")
        await asyncio.to_thread(self.cmdb.remove_placement, app, self.name)
        self.event(app, "move", f"{app} left {self.name} ({stopped} instances drained and stopped); "
                                f"it runs on {', '.join(sorted(active))}", None)

    async def _place_elsewhere(self, app_name: str, nodes: list[NodeRecord]) -> None:
        """A drain: this node's placement of the app leaves and none other is active yet."""
        state = self.manager.apps.get(app_name)
        if state is None:
            await asyncio.to_thread(self.cmdb.remove_placement, app_name, self.name)
            return
        decision = place(self.cluster, state.app, {}, self._refusing(app_name))
        if decision.node is None or decision.node == self.name:
            return  # nowhere to go: it keeps serving here (the event says why, once per reason)
        await asyncio.to_thread(self.cmdb.add_placement, app_name, decision.node)
        self.event(app_name, EVENT_KIND, f"drain of {self.name}: {decision.reason}", decision.figures)

    def _refusing(self, app: str) -> set[str]:
        return {n for n, refuses in self._refusals.items() if app in refuses}

    def scale_out_elsewhere(self, app: App) -> str | None:
        """Manager's hook: where a scale-out of `app` goes, when not here (place_scale_out)."""
        state = self.manager.apps.get(app.name)
        here = 0 if state is None else len(state.instances)
        decision = place_scale_out(self.cluster, app, {self.name: here}, self.name,
                                   exclude=self._refusing(app.name))
        if decision.node is None or decision.node == self.name:
            return None
        self.event(app.name, EVENT_KIND, decision.reason, decision.figures)
        self.spawn(asyncio.to_thread(self.cmdb.add_placement, app.name, decision.node),
                   f"place {app.name} on {decision.node}")
        return decision.node
