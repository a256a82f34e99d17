"""`fcrun node ...` and `fcrun app move`: the operator's side of a cluster (issue 15, docs/cluster.md).

They work on the CMDB directly, as `fcrun cmdb` does (``fcrun --cmdb URL``, env ``FCRUN_CMDB``,
else ``FCRUN_CONFIG``'s ``[cmdb] url``; `chosen_url`): no serve answers for a whole cluster,
and every node and front already follows what is written there. Nodes beat into the ``nodes``
table; a node is shown ``down`` once its heartbeat is older than NODE_LEASE_S, else in its admin
state (``up``, ``cordoned``: no new placement goes there, ``draining``: its placements leave).

    fcrun node ls
    fcrun node cordon n1; fcrun node uncordon n1
    fcrun node drain n1                 # waits until n1 holds no placement and no live instance
    fcrun node rm n1                    # forget a node that is down
    fcrun app move example.test --node n2

Waits poll the CMDB (POLL_S) and print what is left each time it changes; one that runs out of
--timeout exits 1 naming what is left, and undoes nothing (the nodes carry on; run it again to
wait more).
"""

from __future__ import annotations

import time
from typing import Callable

import click
import msgspec

from fcrun.cmdb import open_cmdb
from fcrun.cmdb.base import NODE_LEASE_S
from fcrun.cmdb.nodes import NodeRecord, PlacementRow
from fcrun.errors import FcrunError, IncorrectStatus
from fcrun.paths import Paths
from fcrun.units import format_bytes, parse_duration
from fcrun_cli.cmdb import chosen_url

POLL_S = 0.5  # a wait's CMDB poll (a drain's reads every instance row); nodes act within about 1 s
DEFAULT_TIMEOUT = "120s"  # a drain or move waits this long: a cold start, the 2 s grace, a drain

# What each operator command sets, and the words its output and event use.
_STATE_OF_COMMAND = {"cordon": "cordoned", "uncordon": "up", "drain": "draining"}
_DONE_BY_COMMAND = {"cordon": "cordoned", "uncordon": "uncordoned", "drain": "draining"}
_MEANING = {
    "cordoned": "no new placement goes there; its apps keep serving there",
    "up": "new placements may go there",
    "draining": "its apps leave for other nodes, each once another node has a ready instance",
}


class WaitTimedOut(FcrunError):
    """A --wait ran out of --timeout: the message names what is left. Nothing is undone."""

    exit_code = 1


def open_chosen_cmdb(ctx: click.Context):
    """The CMDB of ``--cmdb`` / FCRUN_CMDB / the config (fcrun_cli.cmdb.chosen_url), else SQLite.

    Resource handling: the caller closes it (it is a context manager).
    """
    paths = getattr(ctx.obj, "paths", None) or Paths.from_env()
    return open_cmdb(paths, chosen_url(ctx))


@click.group()
def node():
    """The nodes of a cluster (fcrun serve --role node): list, cordon, drain, forget.

    \b
      fcrun node ls
      fcrun node cordon n1       # no new placement on n1
      fcrun node drain n1        # move n1's apps away, wait until it runs none
      fcrun node uncordon n1
      fcrun node rm n1           # forget a node that is down
    """


@node.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def ls(ctx: click.Context, as_json: bool):
    """List nodes: name, role, address, state, CPU (capacity/reserved/used), memory
    (capacity/reserved), instances, pooled instances, last heartbeat."""
    with open_chosen_cmdb(ctx) as db:
        nodes = db.list_nodes()
    if as_json:
        rows = [{**msgspec.structs.asdict(n), "state": n.state(NODE_LEASE_S)} for n in nodes]
        click.echo(msgspec.json.format(msgspec.json.encode(rows), indent=2).decode())
        return
    table = [("NAME", "ROLE", "ADDRESS", "STATE", "CPU(CAP/RES/USED)", "MEMORY(CAP/RES)", "INSTANCES", "POOLED",
              "HEARTBEAT")]
    for n in nodes:
        f = n.figures
        table.append((n.name, n.role, n.address or "-", n.state(NODE_LEASE_S),
                      _joined(f, ("cpu_capacity", "cpu_reserved", "cpu_used"), _cpu_text),
                      _joined(f, ("memory_capacity_bytes", "memory_reserved_bytes"), _bytes_text),
                      _count_text(f.get("instances")), _pooled_text(f.get("pooled")), f"{_age_text(n.age_s)} ago"))
    print_table(table)


@node.command("cordon")
@click.argument("name")
@click.pass_context
def cordon(ctx: click.Context, name: str):
    """Place no new app on node NAME; what runs there keeps serving."""
    with open_chosen_cmdb(ctx) as db:
        _set_admin_state(db, name, "cordon")


@node.command("uncordon")
@click.argument("name")
@click.pass_context
def uncordon(ctx: click.Context, name: str):
    """Let new apps be placed on node NAME again (after a cordon or a drain)."""
    with open_chosen_cmdb(ctx) as db:
        _set_admin_state(db, name, "uncordon")


@node.command("drain")
@click.argument("name")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the node holds no placement and no live instance.")
@click.option("--timeout", default=DEFAULT_TIMEOUT, show_default=True, metavar="DURATION",
              help="How long --wait waits (30s, 5m); then exit 1 naming what is left.")
@click.pass_context
def drain(ctx: click.Context, name: str, wait: bool, timeout: str):
    """Move every app off node NAME and place none there: its placements turn leaving, and each
    app's instances there stop once another node has a ready one (no request is refused)."""
    timeout_s = parse_duration(timeout, "--timeout")
    with open_chosen_cmdb(ctx) as db:
        _set_admin_state(db, name, "drain")
        if wait:
            wait_until(lambda: _drain_left(db, name), timeout_s, f"node {name}")
            click.echo(f"{name}: drained: no placement and no live instance left")


@node.command("rm")
@click.argument("name")
@click.pass_context
def rm(ctx: click.Context, name: str):
    """Forget node NAME, which must be down (no heartbeat for a few seconds): its row, its
    placements and the instance rows it left. A node that comes back joins again by itself."""
    with open_chosen_cmdb(ctx) as db:
        record = db.get_node(name)  # NotFound: nothing written
        state = record.state(NODE_LEASE_S)
        if state != "down":
            raise IncorrectStatus(
                f"node {name} is {state} (last heartbeat {_age_text(record.age_s)} ago): `fcrun node rm` forgets "
                f"only a node that is down (no heartbeat for {NODE_LEASE_S:g}s); stop its fcrun serve first"
                + ("" if state == "draining" else f", or `fcrun node drain {name}` to move its apps away"))
        placements = db.list_placements(node=name)
        rows = [i for i in db.list_instances() if i.owner == name]
        # Its instance rows would otherwise show in `fcrun app show` forever. Should it come back
        # after all, its own reconcile removes what it still runs (it reads the containers, not rows).
        for row in rows:
            db.remove_instance(row.id)
        db.remove_node(name)
        db.add_event(None, "node", f"node {name} forgotten by fcrun node rm ({_plural(len(placements), 'placement')}, "
                                   f"{_plural(len(rows), 'instance row')} removed)",
                     {"node": name, "placements": [p.app for p in placements], "instances": [i.id for i in rows]})
    click.echo(f"forgot node {name}: {_plural(len(placements), 'placement')} and "
               f"{_plural(len(rows), 'instance row')} removed")


# -- fcrun app move (registered in the app group by cli/app.py) --------------------------------


@click.command("move")
@click.argument("app_name", metavar="APP")
@click.option("--node", "node_name", required=True, metavar="NAME", help="The node the app moves to.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until NAME has a ready instance and no other node holds the app.")
@click.option("--timeout", default=DEFAULT_TIMEOUT, show_default=True, metavar="DURATION",
              help="How long --wait waits (30s, 5m); then exit 1 naming what is left.")
@click.pass_context
def app_move(ctx: click.Context, app_name: str, node_name: str, wait: bool, timeout: str):
    """Move APP to node NAME: NAME starts an instance, and the nodes that ran the app stop theirs
    once it is ready (requests keep being served throughout)."""
    timeout_s = parse_duration(timeout, "--timeout")
    with open_chosen_cmdb(ctx) as db:
        app_name = db.get_app(app_name).name  # NotFound: nothing written
        target = db.get_node(node_name)
        state = target.state(NODE_LEASE_S)
        if target.role != "node":
            raise IncorrectStatus(f"node {node_name} is a serve of role {target.role!r}: only a node "
                                  "(fcrun serve --role node) runs the instances of placed apps")
        if state != "up":
            raise IncorrectStatus(f"node {node_name} is {state}: an app moves only to a node that is up"
                                  + (f" (`fcrun node uncordon {node_name}` first)" if state != "down" else
                                     f" (no heartbeat for {_age_text(target.age_s)})"))
        leaving = sorted({p.node for p in db.list_placements(app_name) if p.node != node_name})
        running = [i for i in db.list_instances(app_name) if i.state != "stopped"]
        db.move_app(app_name, node_name)
        db.add_event(app_name, "placement", f"{app_name} moved to {node_name} by fcrun app move"
                     + (f" (leaving {', '.join(leaving)})" if leaving else ""),
                     {"node": node_name, "leaving": leaving, "reason": "fcrun app move"})
        click.echo(f"{app_name}: placed on {node_name}" + (f"; leaving {', '.join(leaving)}" if leaving else ""))
        # A node starts an instance for a placement only when the app runs elsewhere (a move, a
        # scale-out), and drops a placement it holds no instance for after a short grace
        # (cluster/node.py): an app that runs nowhere starts wherever its next request is placed.
        if not running:
            click.echo(f"{app_name}: runs nowhere now: nothing to wait for; its next request starts it on a node "
                       "chosen by free resources")
            return
        if wait:
            wait_until(lambda: _move_left(db, app_name, node_name), timeout_s, app_name)
            click.echo(f"{app_name}: moved: a ready instance on {node_name}, nothing left elsewhere")


def placements_of(admin, app_name: str) -> list[PlacementRow] | None:
    """`fcrun app show`'s placements of an app: read from the CMDB when the command works on it
    directly (`admin.cmdb`, LocalAdmin); None through a server, whose admin API has none."""
    cmdb = getattr(admin, "cmdb", None)
    return None if cmdb is None else cmdb.list_placements(app_name)


def placements_text(placements: list[PlacementRow]) -> str:
    return ", ".join(f"{p.node} ({p.state})" for p in placements) or "none (placed on its next request)"


# -- the commands' work -------------------------------------------------------------------------


def _set_admin_state(db, name: str, command: str) -> NodeRecord:
    """Set node `name`'s admin state for `fcrun node COMMAND`, record a `node` event, say what
    changed. Raises: NotFound (nothing written)."""
    wanted = _STATE_OF_COMMAND[command]
    before = db.get_node(name)
    # A second drain writes again: it turns leaving any placement made there since the first.
    if before.admin_state == wanted and wanted != "draining":
        click.echo(f"{name}: already {wanted}; nothing changed")
        return before
    after = db.set_node_state(name, wanted)
    if before.admin_state != wanted:
        db.add_event(None, "node", f"node {name} {_DONE_BY_COMMAND[command]} by fcrun node {command}",
                     {"node": name, "admin_state": wanted, "previous": before.admin_state})
    live = after.state(NODE_LEASE_S)
    note = f" (it is down: no heartbeat for {_age_text(after.age_s)})" if live == "down" else ""
    click.echo(f"{name}: {before.admin_state} -> {wanted}: {_MEANING[wanted]}{note}")
    return after


def wait_until(left: Callable[[], str | None], timeout_s: float, what: str, *,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
               echo: Callable[[str], None] = click.echo) -> None:
    """Poll `left()` (None: done, else what is left, in words) until done; print what is left
    whenever it changes. Raises: WaitTimedOut naming what is left after `timeout_s`."""
    deadline = clock() + timeout_s
    shown = None
    while True:
        remaining = left()
        if remaining is None:
            return
        if remaining != shown:
            echo(f"{what}: waiting: {remaining}")
            shown = remaining
        if clock() >= deadline:
            raise WaitTimedOut(f"{what}: still {remaining} after {timeout_s:g}s; nothing was undone (run the "
                               "command again to wait more; fcrun node ls and fcrun app show say where things are)")
        sleep(POLL_S)


def _drain_left(db, name: str) -> str | None:
    """What keeps node `name` from being drained, or None."""
    record = db.get_node(name)
    placements = db.list_placements(node=name)
    live = [i for i in db.list_instances() if i.owner == name and i.state != "stopped"]
    if not placements and not live:
        return None
    parts = []
    if placements:
        parts.append(f"holds {_plural(len(placements), 'placement')} ({_names(p.app for p in placements)})")
    if live:
        parts.append(f"runs {_plural(len(live), 'live instance')} ({_names(i.id for i in live)})")
    text = " and ".join(parts)
    if record.state(NODE_LEASE_S) == "down":
        text += (f"; it is down (no heartbeat for {_age_text(record.age_s)}): its apps are placed elsewhere on "
                 f"their next request, and `fcrun node rm {name}` forgets it")
    return text


def _move_left(db, app: str, node_name: str) -> str | None:
    """What keeps `app`'s move to `node_name` from being done, or None."""
    instances = [i for i in db.list_instances(app) if i.state != "stopped"]
    ready_here = any(i.owner == node_name and i.state == "ready" for i in instances)
    elsewhere = sorted({i.owner or "-" for i in instances if i.owner != node_name})
    placed_elsewhere = [p for p in db.list_placements(app) if p.node != node_name]
    if ready_here and not elsewhere and not placed_elsewhere:
        return None
    parts = []
    if not ready_here:
        state = db.get_node(node_name).state(NODE_LEASE_S)
        parts.append(f"no ready instance on {node_name} ({state})")
    if elsewhere:
        parts.append(f"live instances on {', '.join(elsewhere)}")
    if placed_elsewhere:
        parts.append("placements on " + ", ".join(f"{p.node} ({p.state})" for p in placed_elsewhere))
    return "; ".join(parts)


# -- formatting ---------------------------------------------------------------------------------


def print_table(table: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, two spaces apart (as `fcrun app ls`)."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _joined(figures: dict, keys: tuple[str, ...], text: Callable[[object], str]) -> str:
    """'4/1.5/0.3' for these figures, '-' for each missing one, '-' when all are."""
    if not any(k in figures for k in keys):
        return "-"
    return "/".join(text(figures[k]) if k in figures else "-" for k in keys)


def _cpu_text(value: object) -> str:
    return f"{round(float(value), 2):g}" if isinstance(value, (int, float)) else "?"


def _bytes_text(value: object) -> str:
    return format_bytes(int(value)) if isinstance(value, (int, float)) else "?"


def _count_text(value: object) -> str:
    return str(value) if isinstance(value, int) else "-"


def _pooled_text(pooled: object) -> str:
    if not isinstance(pooled, dict):
        return "-"
    return str(sum(v for v in pooled.values() if isinstance(v, int)))


def _age_text(age_s: float) -> str:
    if age_s < 60:
        return f"{age_s:.1f}s"
    minutes, seconds = divmod(int(age_s), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours < 48 else f"{hours // 24}d"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _names(names, most: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:most]) + (f", +{len(names) - most} more" if len(names) > most else "")


__all__ = ["app_move", "node", "open_chosen_cmdb", "placements_of", "placements_text", "print_table", "wait_until"]
