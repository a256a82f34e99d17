"""The front's router (``fcrun serve --role front``): Host -> app -> the node to forward to.

A front holds no state of its own beyond caches of the CMDB (apps, nodes, placements, which
nodes hold a ready instance of which app), re-read every `REFRESH_S` by its server
(front_server.py), so any number of fronts can run side by side. For a request it picks, in
this order:

  1. a live node with an active placement of the app and a ready (or frozen) instance of it;
  2. a live node whose placement is leaving but still has one (a move whose new home is not
     ready yet: the old one serves until it is);
  3. a live node with an active placement (it cold-starts the app on the request);
  4. none: a placement by free resources (placement.place on the nodes' heartbeat figures);
     the request goes there at once, and the placement is written meanwhile with
     CMDB.place_app, which keeps the first front's choice when two race (the cache then
     follows the winner).

Among equals, the node with the fewest of this front's requests in flight, in turn when
tied. A node is live while its heartbeat is under NODE_LEASE_S old and it did not just fail a
request of ours (`SUSPECT_S`). The request goes unchanged (its Host kept) to the node's advertised address;
the node's own proxy routes it to an instance, starting one if needed.

A request whose node could not be connected to, or closed without a byte of a response to a
GET or HEAD, goes once to another node (`retry_elsewhere`, called by the proxy).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from ..cmdb.base import CMDB, NODE_LEASE_S, CMDBError
from ..cmdb.models import App
from ..cmdb.nodes import NodeRecord, PlacementRow
from ..proxy.router import RouteError
from ..units import is_decimal
from .node import node_figures
from .placement import EVENT_KIND, Cluster, Placement, Policy, place

log = logging.getLogger("fcrun.cluster")

REFRESH_S = 0.25  # how often placements and instances are re-read (the nodes: nodes_cache.py, 1 s)
REFUSAL_EVENT_S = 10.0  # a refused placement is recorded at most this often per app (a flood of 503s is not)
SUSPECT_S = NODE_LEASE_S  # a node that failed a request is avoided this long (it is down by then)


class NodeLease:
    """One request's hold on a node (the proxy's Lease)."""

    __slots__ = ("addr", "node", "instance_id", "max_body_bytes", "cold_start", "_router")

    def __init__(self, router: "FrontRouter", node: str, addr: tuple[str, int], max_body_bytes: int | None):
        self._router = router
        self.node = node
        self.addr = addr
        self.instance_id = f"node:{node}"  # the proxy pools connections per node
        self.max_body_bytes = max_body_bytes
        self.cold_start = None  # a node's cold start shows in its own response headers

    def done(self, status: int, request_bytes: int, response_bytes: int, failed: bool) -> None:
        self._router.release(self.node)


def parse_node_address(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not is_decimal(port, 5):
        return None
    return host.strip("[]"), int(port)


class FrontRouter:
    """The proxy's Router on a front. Not thread-safe: the event loop owns it.

    `event(app, kind, message, data)` records an event; `spawn(coro, name)` runs a job.
    """

    def __init__(self, cmdb: CMDB, *, name: str, policy: Policy = Policy(),
                 event: Callable[[str | None, str, str, dict[str, Any] | None], None],
                 spawn: Callable[..., Any], clock: Callable[[], float] = time.monotonic,
                 down_after_s: float = NODE_LEASE_S):
        self.cmdb = cmdb
        self.name = name
        self.event = event
        self.spawn = spawn
        self.clock = clock
        self.down_after_s = down_after_s
        self.cluster = Cluster(policy=policy)
        self.apps: dict[str, App] = {}
        self._by_host: dict[str, App] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self._addresses: dict[str, tuple[str, int]] = {}
        self.placements: dict[str, list[PlacementRow]] = {}
        self.holding: dict[str, set[str]] = {}  # app -> nodes with a ready or frozen instance of it
        self.outstanding: dict[str, int] = {}  # node -> this front's requests in flight there
        self.suspect: dict[str, float] = {}  # node -> until when it is avoided (clock)
        self.refusing: dict[str, set[str]] = {}  # app -> nodes without its docroot (their figures say)
        self._turn = 0  # round-robin among equally loaded nodes
        self._refusal_logged: dict[str, float] = {}  # app -> when its next refusal is recorded (clock)
        self._down: set[str] = set()  # nodes seen down at the last refresh (an event when it changes)
        self.refreshed = False

    # -- the caches ----------------------------------------------------------------------------

    def set_apps(self, apps: Iterable[App]) -> None:
        self.apps = {app.name: app for app in apps}
        self._by_host = {host: app for app in self.apps.values() for host in app.all_hostnames}

    def refresh(self, nodes: list[NodeRecord], placements: list[PlacementRow],
                holders: Iterable[tuple[str, str]]) -> None:
        """Take a new read of the CMDB's cluster rows (`holders`: CMDB.holders(), the (app,
        node) pairs with a ready or frozen instance)."""
        self.nodes = {n.name: n for n in nodes if n.role != "front"}
        self._addresses = {}
        self.refusing = {}
        for record in self.nodes.values():
            for app in record.figures.get("refuses", ()):
                self.refusing.setdefault(str(app), set()).add(record.name)
            addr = parse_node_address(record.address)
            if addr is not None:
                self._addresses[record.name] = addr
            figures = node_figures(record, self.down_after_s)
            if figures is not None:
                if figures.state == "up" and not self._live(record.name):  # suspect: not ranked
                    figures = msgspec.structs.replace(figures, state="down")
                self.cluster.update(figures)
        for gone in set(self.cluster.nodes) - set(self.nodes):
            self.cluster.remove(gone)
        self.placements = {}
        for row in placements:
            self.placements.setdefault(row.app, []).append(row)
        self.holding = {}
        for app, node in holders:
            self.holding.setdefault(app, set()).add(node)
        down = {n.name for n in self.nodes.values() if n.state(self.down_after_s) == "down"}
        for name in sorted(down - self._down):
            if self.refreshed:  # not the nodes that were down before this front started
                self.event(None, "node", f"node {name} is down: no heartbeat for "
                                         f"{self.nodes[name].age_s:.1f} s (seen by front {self.name})",
                           {"node": name, "age_s": round(self.nodes[name].age_s, 2)})
        self._down = down
        self.refreshed = True

    def _live(self, node: str) -> bool:
        record = self.nodes.get(node)
        if record is None or node not in self._addresses or record.state(self.down_after_s) == "down":
            return False
        until = self.suspect.get(node)
        return until is None or until <= self.clock()

    # -- choosing a node -----------------------------------------------------------------------

    def _choose(self, app: str, exclude: str | None = None) -> str | None:
        rows = self.placements.get(app, ())
        holding = self.holding.get(app, ())
        refusing = self.refusing.get(app, ())
        active = [r.node for r in rows if r.state == "active" and r.node != exclude and r.node not in refusing
                  and self._live(r.node)]
        ready = [n for n in active if n in holding]
        if not ready:
            ready = [r.node for r in rows if r.state == "leaving" and r.node != exclude and r.node in holding
                     and self._live(r.node)]
        candidates = ready or active
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        # The fewest in flight; among equals, in turn (one client at a time would otherwise
        # always reach the same node).
        least = min(self.outstanding.get(n, 0) for n in candidates)
        equals = [n for n in candidates if self.outstanding.get(n, 0) == least]
        self._turn += 1
        return equals[self._turn % len(equals)]

    def _lease(self, app: App, node: str) -> NodeLease:
        self.outstanding[node] = self.outstanding.get(node, 0) + 1
        return NodeLease(self, node, self._addresses[node], app.max_body_bytes)

    def release(self, node: str) -> None:
        left = self.outstanding.get(node, 0) - 1
        if left > 0:
            self.outstanding[node] = left
        else:
            self.outstanding.pop(node, None)

    def _app(self, host: str) -> App:
        app = self._by_host.get(host)
        if app is None:
            raise RouteError(404, f"no app is configured for host {host!r}")
        return app

    def acquire_nowait(self, host: str) -> NodeLease:
        """Never waits: a cold app is placed here and now (a pure decision) and its placement
        is written in the background (`_record_placement`)."""
        app = self._app(host)
        node = self._choose(app.name)
        if node is None:
            node = self._place(app)
        return self._lease(app, node)

    async def acquire(self, host: str) -> NodeLease:
        return self.acquire_nowait(host)

    def _place(self, app: App) -> str:
        """A node for an app with none: placement.place on the nodes' figures. The request goes
        there at once, and the placement is written meanwhile: waiting for the transaction
        (~1.3 ms) put it on every cold request's path (bench/cluster.py). Requests that follow
        go to the same node (the cache holds the placement); another front's choice that won the
        write replaces it when the write returns.

        Raises: RouteError 503: no node can take it (recorded once per REFUSAL_EVENT_S).
        """
        counts = {n: 1 for n in self.holding.get(app.name, ()) if self._live(n)}
        decision = place(self.cluster, app, counts, self.refusing.get(app.name, ()))
        if decision.node is None or not self._live(decision.node):
            reason = decision.reason if decision.node is None else f"{decision.node} failed a request just now"
            now = self.clock()
            if now >= self._refusal_logged.get(app.name, now):  # an event per app every REFUSAL_EVENT_S
                self._refusal_logged[app.name] = now + REFUSAL_EVENT_S
                self.event(app.name, EVENT_KIND, f"{reason} (front {self.name}; answered 503)", decision.figures)
            raise RouteError(503, f"{app.name} cannot be placed: {reason}")
        self._cache_placements(app.name, [decision.node])
        self.spawn(self._record_placement(app, decision), f"place {app.name} on {decision.node}")
        return decision.node

    def _cache_placements(self, app: str, active: list[str]) -> None:
        rows = [r for r in self.placements.get(app, ()) if r.node not in active]
        rows += [PlacementRow(app=app, node=n, state="active", since=time.time()) for n in active]
        self.placements[app] = rows

    async def _record_placement(self, app: App, decision: Placement) -> None:
        try:
            active = await asyncio.to_thread(self.cmdb.place_app, app.name, decision.node, self.down_after_s)
        except CMDBError as exc:  # the node serves it all the same; the next refresh places it again
            log.warning("front %s: cannot record the placement of %s on %s: %s", self.name, app.name,
                        decision.node, exc)
            return
        if decision.node in active:
            self.event(app.name, EVENT_KIND, f"{decision.reason} (front {self.name})", decision.figures)
            return
        # Another front placed it first: requests from now on go there (this one's went to ours,
        # which serves them; the app's max still holds, every node claims its instances).
        self.placements[app.name] = [r for r in self.placements.get(app.name, ()) if r.node != decision.node]
        self._cache_placements(app.name, active)
        if self._choose(app.name) is None:
            # ...unless this front cannot use that node (it refuses the app, or failed a request
            # of ours just now): ours is added beside it.
            try:
                await asyncio.to_thread(self.cmdb.add_placement, app.name, decision.node)
            except CMDBError as exc:
                log.warning("front %s: cannot record the placement of %s on %s: %s", self.name, app.name,
                            decision.node, exc)
                return
            self._cache_placements(app.name, [decision.node])
            self.event(app.name, EVENT_KIND, f"{decision.reason} (front {self.name}; beside {', '.join(active)}, "
                                             "which it cannot use)", decision.figures)

    def retry_elsewhere(self, host: str, failed: NodeLease) -> NodeLease | None:
        """The proxy's hook: `failed`'s node did not answer; another node, or None."""
        self.suspect[failed.node] = self.clock() + SUSPECT_S
        figures = self.cluster.nodes.get(failed.node)
        if figures is not None:  # not ranked for placements until the next refresh finds it live
            self.cluster.update(msgspec.structs.replace(figures, state="down"))
        app = self._by_host.get(host)
        if app is None:
            return None
        node = self._choose(app.name, exclude=failed.node)
        if node is None:
            # The app lived on that node only: the best other node takes the request and
            # cold-starts it; the placement is written meanwhile (the next requests go there).
            counts = {n: 1 for n in self.holding.get(app.name, ()) if self._live(n)}
            decision = place(self.cluster, app, counts, self.refusing.get(app.name, ()))
            if decision.node is None or not self._live(decision.node):
                return None
            node = decision.node
            self.spawn(self._replace_placement(app, failed.node, decision.node, decision.reason),
                       f"re-place {app.name}")
        log.info("front %s: %s did not answer a request for %s; sent to %s", self.name, failed.node, host, node)
        return self._lease(app, node)

    async def _replace_placement(self, app: App, dead: str, node: str, reason: str) -> None:
        try:
            await asyncio.to_thread(self.cmdb.add_placement, app.name, node)
        except CMDBError as exc:
            log.warning("front %s: cannot record the placement of %s on %s: %s", self.name, app.name, node, exc)
            return
        self.event(app.name, EVENT_KIND, f"{dead} did not answer; {reason} (front {self.name})", {"node": node})

