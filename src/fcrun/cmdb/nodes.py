"""The cluster's rows in the CMDB: nodes (liveness, address, free resources, an operator's
cordon or drain) and placements (which nodes an app's requests go to).

`NodeSQL` is mixed into `SqlCMDB` (sql.py), on the same `_write` / `_read` transactions. The
clock of every age here is the database server's ({now}, migrations.DIALECTS): fronts and
nodes on several hosts compare heartbeats, and their own clocks may disagree.

A placement is ``active`` (fronts send the app's requests there) or ``leaving`` (a move or a
drain: fronts still send requests there until an active node has a ready instance, and the
node then drains its instances of the app and deletes the row). The first placement of an app
is `place_app`: only the first caller's choice is written while the app has an active
placement on a live node, so two fronts deciding the same cold wave agree on one node.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from ..errors import NotFound, SpecError
from .base import NODE_LEASE_S
from .migrations import DIALECTS

AdminState = Literal["up", "cordoned", "draining"]
ADMIN_STATES: tuple[str, ...] = ("up", "cordoned", "draining")
ROLES: tuple[str, ...] = ("all", "node", "front")
PlacementState = Literal["active", "leaving"]


class NodeBeat(msgspec.Struct, kw_only=True, frozen=True):
    """What a serve writes with each heartbeat."""

    name: str
    role: str = "all"
    address: str = ""  # HOST:PORT where fronts reach its proxy ('' for a front)
    figures: dict[str, Any] = {}  # cluster.placement.NodeFigures' fields, its name and state aside
    started_at: float | None = None  # when this serve started (time.time()): a restart shows


class NodeRecord(msgspec.Struct, kw_only=True, frozen=True):
    """One node as the CMDB has it; `age_s` is the time since its last heartbeat."""

    name: str
    role: str
    address: str
    admin_state: AdminState
    figures: dict[str, Any]
    age_s: float
    started_at: float | None = None

    def state(self, down_after_s: float = NODE_LEASE_S) -> str:
        """'down' once its heartbeat is older than `down_after_s`, else its admin state."""
        return "down" if self.age_s > down_after_s else self.admin_state


class PlacementRow(msgspec.Struct, kw_only=True, frozen=True):
    app: str
    node: str
    state: PlacementState
    since: float


_NODE_COLUMNS = "name, role, address, admin_state, figures, {now} - heartbeat_at, started_at"
SELECT_NODES = f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY name"
SELECT_NODE = f"SELECT {_NODE_COLUMNS} FROM nodes WHERE name = ?"
UPSERT_BEAT = (
    "INSERT INTO nodes (name, heartbeat_at, role, address, figures, started_at) VALUES (?, {now}, ?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, role = excluded.role, "
    "address = excluded.address, figures = excluded.figures, started_at = excluded.started_at"
)
SET_ADMIN_STATE = "UPDATE nodes SET admin_state = ? WHERE name = ?"
DELETE_NODE = "DELETE FROM nodes WHERE name = ?"

_PLACEMENT_SELECT = "SELECT app, node, state, since FROM placements"
SELECT_PLACEMENTS = f"{_PLACEMENT_SELECT} ORDER BY app, node"
SELECT_APP_PLACEMENTS = f"{_PLACEMENT_SELECT} WHERE app = ? ORDER BY node"
SELECT_NODE_PLACEMENTS = f"{_PLACEMENT_SELECT} WHERE node = ? ORDER BY app"
# A node's view of its apps (NodeAgent.follow, four times a second): every placement of the
# apps placed on it, and which nodes hold a ready instance of them; two statements, whatever
# the number of apps (it was two per app).
_APPS_ON_NODE = "app IN (SELECT app FROM placements WHERE node = ?)"
SELECT_PLACEMENTS_OF_APPS_ON = f"{_PLACEMENT_SELECT} WHERE {_APPS_ON_NODE} ORDER BY app, node"
SELECT_READY_OF_APPS_ON = (f"SELECT DISTINCT app, owner FROM instances WHERE state = 'ready' AND owner <> '' "
                           f"AND {_APPS_ON_NODE}")
# The app's active placements on nodes whose heartbeat is fresh.
_LIVE_ACTIVE = ("FROM placements p JOIN nodes n ON n.name = p.node WHERE p.app = ? AND p.state = 'active' "
                "AND n.heartbeat_at > {now} - ?")
# One statement: a front's first placement of an app is on a cold request's path.
PLACE_APP = (
    "INSERT INTO placements (app, node, state, since) SELECT ?, ?, 'active', {now} "
    f"WHERE NOT EXISTS (SELECT 1 {_LIVE_ACTIVE}) "
    "ON CONFLICT (app, node) DO UPDATE SET state = 'active', since = excluded.since"
)
SELECT_LIVE_ACTIVE = f"SELECT p.node {_LIVE_ACTIVE} ORDER BY p.node"
# What a front routes by, four times a second: not whole instance rows (decoding thousands of
# them held a front's GIL for tens of milliseconds each time).
SELECT_HOLDERS = "SELECT DISTINCT app, owner FROM instances WHERE state IN ('ready', 'frozen') AND owner <> ''"
UPSERT_PLACEMENT = (
    "INSERT INTO placements (app, node, state, since) VALUES (?, ?, ?, {now}) "
    "ON CONFLICT (app, node) DO UPDATE SET state = excluded.state, since = excluded.since"
)
LEAVE_OTHERS = "UPDATE placements SET state = 'leaving', since = {now} WHERE app = ? AND node <> ? AND state = 'active'"
LEAVE_NODE = "UPDATE placements SET state = 'leaving', since = {now} WHERE node = ? AND state = 'active'"
DELETE_PLACEMENT = "DELETE FROM placements WHERE app = ? AND node = ?"
DELETE_NODE_PLACEMENTS = "DELETE FROM placements WHERE node = ?"

_figures_encode = msgspec.json.Encoder().encode
_figures_decode = msgspec.json.Decoder(dict[str, Any]).decode


class NodeSQL:
    """The nodes and placements methods of `SqlCMDB` (its `_write`, `_read`, `dialect`)."""

    dialect: str

    def _sql(self, statement: str) -> str:
        return statement.format(**DIALECTS[self.dialect])

    # -- nodes -------------------------------------------------------------------------------

    def node_beat(self, beat: NodeBeat) -> None:
        """Record that `beat.name` is alive now, with its role, address and figures; keeps its
        admin state (an operator's cordon outlives restarts)."""
        if beat.role not in ROLES:
            raise SpecError(f"node {beat.name}: role {beat.role!r} is not one of {', '.join(ROLES)}")
        with self._write(f"heartbeat of {beat.name}") as cur:
            cur.execute(self._sql(UPSERT_BEAT), (beat.name, beat.role, beat.address,
                                                 _figures_encode(beat.figures).decode(), beat.started_at))

    def list_nodes(self) -> list[NodeRecord]:
        """Every node that ever beat, by name."""
        with self._read("list nodes") as cur:
            return [_node(row) for row in cur.execute(self._sql(SELECT_NODES)).fetchall()]

    def get_node(self, name: str) -> NodeRecord:
        """Raises: NotFound."""
        with self._read(f"read node {name}") as cur:
            row = cur.execute(self._sql(SELECT_NODE), (name,)).fetchone()
        if row is None:
            raise NotFound(f"no node named {name!r} in the CMDB (fcrun node ls lists them)")
        return _node(row)

    def set_node_state(self, name: str, admin_state: str) -> NodeRecord:
        """Cordon, drain or uncordon a node; draining also turns its placements to leaving.

        Raises: SpecError (not an admin state), NotFound (no such node; nothing written).
        """
        if admin_state not in ADMIN_STATES:
            raise SpecError(f"node state {admin_state!r} is not one of {', '.join(ADMIN_STATES)}")
        with self._write(f"set node {name} {admin_state}") as cur:
            if cur.execute(SET_ADMIN_STATE, (admin_state, name)).rowcount == 0:
                raise NotFound(f"no node named {name!r} in the CMDB (fcrun node ls lists them)")
            if admin_state == "draining":
                cur.execute(self._sql(LEAVE_NODE), (name,))
        return self.get_node(name)

    def remove_node(self, name: str) -> bool:
        """Forget a node and its placements (one that left the cluster); False if unknown."""
        with self._write(f"remove node {name}") as cur:
            cur.execute(DELETE_NODE_PLACEMENTS, (name,))
            return cur.execute(DELETE_NODE, (name,)).rowcount > 0

    # -- placements --------------------------------------------------------------------------

    def list_placements(self, app: str | None = None, node: str | None = None) -> list[PlacementRow]:
        """Placements of one app, or on one node, or all."""
        with self._read("list placements") as cur:
            if app is not None:
                rows = cur.execute(SELECT_APP_PLACEMENTS, (app,)).fetchall()
            elif node is not None:
                rows = cur.execute(SELECT_NODE_PLACEMENTS, (node,)).fetchall()
            else:
                rows = cur.execute(SELECT_PLACEMENTS).fetchall()
        return [PlacementRow(app=r[0], node=r[1], state=r[2], since=float(r[3])) for r in rows]

    def apps_on(self, node: str) -> tuple[list[PlacementRow], list[tuple[str, str]]]:
        """For the apps placed on `node`: all their placements, and the (app, node) pairs with a
        ready instance of them; one snapshot."""
        with self._read(f"read the apps placed on {node}") as cur:
            rows = cur.execute(SELECT_PLACEMENTS_OF_APPS_ON, (node,)).fetchall()
            ready = cur.execute(SELECT_READY_OF_APPS_ON, (node,)).fetchall()
        return ([PlacementRow(app=r[0], node=r[1], state=r[2], since=float(r[3])) for r in rows],
                [(app, owner) for app, owner in ready])

    def place_app(self, app: str, node: str, lease_s: float = NODE_LEASE_S) -> list[str]:
        """Place `app` on `node` unless it already has an active placement on a node whose
        heartbeat is under `lease_s` old; returns the app's active live nodes afterwards (the
        caller's node only if its choice won). Serialised per app with instance claims."""
        with self._write(f"place {app} on {node}") as cur:
            self._lock_app_instances(cur, app)
            cur.execute(self._sql(PLACE_APP), (app, node, app, lease_s))
            return [row[0] for row in cur.execute(self._sql(SELECT_LIVE_ACTIVE), (app, lease_s)).fetchall()]

    def holders(self) -> list[tuple[str, str]]:
        """(app, node) once for each node that holds a ready or frozen instance of the app."""
        with self._read("list the nodes holding instances") as cur:
            return [(app, node) for app, node in cur.execute(SELECT_HOLDERS).fetchall()]

    def add_placement(self, app: str, node: str, state: PlacementState = "active") -> None:
        """Put `app` on `node` too (a scale-out to another node), or set that placement's state."""
        with self._write(f"place {app} on {node}") as cur:
            cur.execute(self._sql(UPSERT_PLACEMENT), (app, node, state))

    def move_app(self, app: str, node: str) -> None:
        """Make `node` the app's one active placement; its others turn leaving (they serve until
        the new node has a ready instance, then drain)."""
        with self._write(f"move {app} to {node}") as cur:
            self._lock_app_instances(cur, app)
            cur.execute(self._sql(LEAVE_OTHERS), (app, node))
            cur.execute(self._sql(UPSERT_PLACEMENT), (app, node, "active"))

    def remove_placement(self, app: str, node: str) -> bool:
        with self._write(f"remove the placement of {app} on {node}") as cur:
            return cur.execute(DELETE_PLACEMENT, (app, node)).rowcount > 0

    def remove_node_placements(self, node: str) -> int:
        """Delete every placement on `node` (it restarted and runs none of them); how many."""
        with self._write(f"remove the placements on {node}") as cur:
            return cur.execute(DELETE_NODE_PLACEMENTS, (node,)).rowcount

    def _lock_app_instances(self, cur: Any, app: str) -> None:  # SqlCMDB's, per backend
        raise NotImplementedError


def _node(row: tuple) -> NodeRecord:
    try:
        figures = _figures_decode(row[4]) if row[4] else {}
    except msgspec.DecodeError:
        figures = {}  # a row from a broken writer: the node shows with no figures, not an error
    return NodeRecord(name=row[0], role=row[1], address=row[2], admin_state=row[3], figures=figures,
                      age_s=max(0.0, float(row[5])), started_at=None if row[6] is None else float(row[6]))
