"""Placement: which compute node takes a new instance of an app, from the nodes' free resources.

The talk names this its open problem ("placing containers on hosts with free resources"). Here
it is a pure decision, like serve/policy.py's `decide`: the nodes' figures and the app in, a
`Placement` out (the node, or none, and a sentence with the figures for the event log). No I/O
and no clock; the caller (a front, a node scaling out) applies it by claiming the instance in
the CMDB (CMDB.claim_instance with the chosen node as owner), which stays the one guard of an
app's max across fronts.

The rules, in the order they decide:

  1. Only a node that is ``up`` takes an instance: cordoned, draining and down nodes are not
     even ranked.
  2. A node must have the app's memory free under the memory overcommit ratio (reserved +
     memory_bytes <= capacity x ratio) and its cpu free under the CPU ratio: memory is never
     overcommitted past the ratio, whatever else a node has.
  3. Spread: a node that runs none of the app's instances beats any that runs one; when every
     node that fits runs one, the one with the fewest of them.
  4. Headroom: the free share of the node's most used resource, 1 - max(CPU used recently /
     capacity, CPU reserved / (capacity x cpu ratio), memory reserved / (capacity x memory
     ratio)), less the share of the node's CPU the new instance's quota is (app.cpu /
     capacity): the node's headroom once the instance uses its quota. Relative, so a 64-CPU
     node and an 8-CPU one fill at the same pace; the most used resource decides, so a node
     with idle CPU but no memory left ranks low; the instance's own share sends a 1-CPU app to
     a big node rather than fill a 2-CPU one.
  5. A node with a free pooled instance of the app's image (a cold start in milliseconds rather
     than a container start) gets `pool_band` added to its score: it wins over a better node
     whose score is within the band.
  6. Ties: the node's name, so that the same figures always give the same node.

Speed: a front decides on a cold request's path, so a decision must not sort the nodes.
`Cluster` keeps the up nodes of each CPU capacity (a cluster has a few sizes of node) in a list
sorted by headroom, re-keyed in O(n) memmove (C speed) when a node's figures change. Within one
size the instance's share is the same, so headroom order is score order: a decision walks
each size's list from the top and stops at the first node whose score could not beat the best
found (headroom - share, plus the pool band if any node has a free pooled instance of the
image). The result is the best over all nodes (a unit test checks it against reading every
node); the nodes read are a few per size when the best ones fit (bench/placement_sim.py
measures it). Only a refusal reads every node, to say why.

Scale-out (`place_scale_out`): the reactive scale-out of a node's instance stays on that node
unless it is busier than the best other node by more than `scale_out_margin` of headroom (both
counted once the new instance uses its quota): a
local instance shares the node's page cache and pool and needs no other node, but a second
instance competing for the CPU of a busy node would not relieve the first.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal

import msgspec

from ..cmdb.models import App
from ..units import format_bytes

NodeState = Literal["up", "cordoned", "draining", "down"]
NODE_STATES: tuple[str, ...] = ("up", "cordoned", "draining", "down")


class NodeFigures(msgspec.Struct, frozen=True, kw_only=True):
    """One compute node as a front sees it: its heartbeat's figures plus the claims made since.

    Reserved amounts are the limits of what runs or is held there (its instances' quotas and
    memory limits, its pool, the system's own share); `cpu_used` is what was actually used over
    the node's last sample. `pooled` maps an image to its pooled instances that are free now.
    """

    name: str
    state: NodeState = "up"
    cpu_capacity: float  # CPUs
    memory_capacity_bytes: int
    cpu_reserved: float = 0.0  # CPUs of quota given out
    memory_reserved_bytes: int = 0
    cpu_used: float = 0.0  # CPUs, recent average
    instances: int = 0
    pooled: dict[str, int] = {}


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How far resources may be promised, and how strongly the soft rules pull."""

    memory_overcommit: float = 1.0  # memory limits may add up to capacity x this, never more
    cpu_overcommit: float = 4.0  # CPU quotas may add up to capacity x this (idle instances are the rule)
    pool_band: float = 0.1  # headroom a node with a free pooled instance may lack and still win
    scale_out_margin: float = 0.1  # headroom by which a node must trail another to lose its scale-out


EVENT_KIND = "placement"  # the CMDB event a decision is recorded as: its reason the message, its figures the data


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """A decision: `node` None means no node can take the instance, and `reason` says why.
    Recorded as an event of kind EVENT_KIND (message `reason`, data `figures` with `node`)."""

    app: str
    node: str | None
    reason: str  # a sentence with the figures, for the event log
    pooled: bool = False  # the node has a free pooled instance of the app's image
    figures: dict[str, Any] = {}  # the event's data: the chosen node's figures and the search's


# One ranked node: (-headroom, name, memory free, cpu free, cpu capacity). A plain tuple, so
# that the list sorts and bisects in C and a decision reads a node without a lookup.
_Entry = tuple[float, str, int, float, float]


def headroom(node: NodeFigures, policy: Policy) -> float:
    """The free share of the node's most used resource (rule 4); <= 0 when one is used up."""
    cpu = max(node.cpu_used / node.cpu_capacity, node.cpu_reserved / (node.cpu_capacity * policy.cpu_overcommit))
    memory = node.memory_reserved_bytes / (node.memory_capacity_bytes * policy.memory_overcommit)
    return 1.0 - max(cpu, memory)


def memory_free(node: NodeFigures, policy: Policy) -> int:
    """Bytes of memory limit the node may still give out under the overcommit ratio."""
    return int(node.memory_capacity_bytes * policy.memory_overcommit) - node.memory_reserved_bytes


def cpu_free(node: NodeFigures, policy: Policy) -> float:
    """CPUs of quota the node may still give out under the CPU ratio."""
    return node.cpu_capacity * policy.cpu_overcommit - node.cpu_reserved


class Ranking:
    """Some up nodes, by CPU capacity, each size's list best first (within one size an
    instance's share of the node is the same, so the order by headroom is the order by score)."""

    __slots__ = ("sizes", "_lists")

    def __init__(self) -> None:
        self._lists: dict[float, list[_Entry]] = {}
        self.sizes: tuple[list[_Entry], ...] = ()  # the lists, the biggest nodes' first (read only)

    def add(self, entry: _Entry) -> None:
        ranking = self._lists.get(entry[4])
        if ranking is None:
            ranking = self._lists[entry[4]] = []
            self.sizes = tuple(lst for _, lst in sorted(self._lists.items(), reverse=True))
        bisect.insort(ranking, entry)

    def discard(self, entry: _Entry) -> None:
        ranking = self._lists[entry[4]]
        del ranking[bisect.bisect_left(ranking, entry)]

    def best(self, app: App, instances: Mapping[str, int],
             exclude: Collection[str] = ()) -> tuple[_Candidate | None, int]:
        """The node that fits `app` with the most headroom once the instance uses its quota,
        among those running none of its instances and not in `exclude` (ties: the name); and
        how many were read."""
        need_memory, need_cpu = app.memory_bytes, app.cpu - _EPSILON
        best: _Candidate | None = None
        checked = 0
        for ranking in self.sizes:
            for entry in ranking:
                checked += 1
                if (entry[2] >= need_memory and entry[3] >= need_cpu and entry[1] not in instances
                        and entry[1] not in exclude):
                    candidate = _Candidate(entry, -entry[0] - app.cpu / entry[4])
                    if best is None or candidate.beats(best):
                        best = candidate
                    break  # the first that fits is the best of its size
        return best, checked


class Cluster:
    """The nodes' figures as a front holds them between heartbeats, ranked for placement.

    The caller owns it and calls `update` when a heartbeat or one of its own claims changes a
    node; the placement functions only read it. Not thread-safe: one owner (the front's loop).
    """

    def __init__(self, nodes: Iterable[NodeFigures] = (), policy: Policy = Policy()):
        self.policy = policy
        self.nodes: dict[str, NodeFigures] = {}
        self.ranking = Ranking()  # the up nodes (read only)
        self._pooled: dict[str, Ranking] = {}  # image -> the up nodes with a free pooled instance of it
        # name -> its entry and the images it was ranked under as pooled (kept, not read back
        # from its figures: a caller that changed their pooled dict since must not leave stale entries)
        self._entries: dict[str, tuple[_Entry, tuple[str, ...]]] = {}
        for node in nodes:
            self.update(node)

    def __len__(self) -> int:
        return len(self.nodes)

    def update(self, node: NodeFigures) -> None:
        """Put in (or replace) one node's figures."""
        self.remove(node.name)
        self.nodes[node.name] = node
        if node.state != "up":
            return
        entry = (-headroom(node, self.policy), node.name, memory_free(node, self.policy),
                 cpu_free(node, self.policy), node.cpu_capacity)
        pooled = tuple(image for image, free in node.pooled.items() if free > 0)
        self._entries[node.name] = (entry, pooled)
        self.ranking.add(entry)
        for image in pooled:
            self._pooled.setdefault(image, Ranking()).add(entry)

    def remove(self, name: str) -> None:
        """Forget a node (it left the cluster)."""
        self.nodes.pop(name, None)
        ranked = self._entries.pop(name, None)
        if ranked is None:  # unknown, or not up
            return
        entry, pooled = ranked
        self.ranking.discard(entry)
        for image in pooled:
            self._pooled[image].discard(entry)

    def pooled(self, image: str) -> Ranking | None:
        """The up nodes with a free pooled instance of `image` (read only), None if none ever had one."""
        return self._pooled.get(image)

    def has_pooled(self, node: str, image: str) -> bool:
        """Whether `node` is up with a free pooled instance of `image`."""
        figures = self.nodes.get(node)
        return figures is not None and figures.state == "up" and figures.pooled.get(image, 0) > 0


def place(cluster: Cluster, app: App, instances: Mapping[str, int] = {}, exclude: Collection[str] = ()) -> Placement:
    """The node for a new instance of `app`, whose live instances run `instances` (node -> how
    many), never one of `exclude` (nodes that refuse the app: its docroot is not mounted there).
    Pure: reads `cluster`, changes nothing; the same figures give the same node."""
    placed = sum(instances.values())
    if placed >= app.max_instances:
        return Placement(app=app.name, node=None, figures={"instances": placed, "max_instances": app.max_instances},
                         reason=f"{app.name} already runs its max of {app.max_instances} instances")
    # The best node by headroom alone, and the best with a free pooled instance: the better of
    # the two by score (rule 5's bonus added) is the best of all, since the bonus only raises
    # pooled nodes, and among those the order is the same with it or without.
    band = cluster.policy.pool_band
    plain, checked = cluster.ranking.best(app, instances, exclude)
    best = None if plain is None else _Candidate(plain.entry, plain.after, band,
                                                 pooled=cluster.has_pooled(plain.entry[1], app.image))
    pool_ranking = cluster.pooled(app.image)
    if pool_ranking is not None:
        found, read = pool_ranking.best(app, instances, exclude)
        checked += read
        if found is not None:
            pooled = _Candidate(found.entry, found.after, band, pooled=True)
            if best is None or pooled.beats(best):
                best = pooled
    if best is None:
        best = _crowded(cluster, app, instances, exclude)
        if best is None:
            return _refusal(cluster, app, exclude)
    instead = plain if best.pooled and plain is not None and plain.entry[1] != best.entry[1] else None
    return _placement(cluster, app, instances, best, checked, instead=instead)


def _crowded(cluster: Cluster, app: App, instances: Mapping[str, int], exclude: Collection[str]) -> _Candidate | None:
    """Rule 3's fallback, when every node that fits runs one of the app's instances: the one with
    the fewest, then the best score (rare: it reads every node)."""
    band = cluster.policy.pool_band
    best: tuple[tuple[int, float, str], _Candidate] | None = None
    for ranking in cluster.ranking.sizes:
        for entry in ranking:
            if entry[2] < app.memory_bytes or entry[3] < app.cpu - _EPSILON or entry[1] in exclude:
                continue
            candidate = _Candidate(entry, -entry[0] - app.cpu / entry[4], band,
                                   pooled=cluster.has_pooled(entry[1], app.image))
            key = (instances.get(entry[1], 0), -candidate.score, entry[1])
            if best is None or key < best[0]:
                best = (key, candidate)
    return None if best is None else best[1]


class _Candidate:
    """A node that fits, with its headroom once the instance uses its quota (`after`) and its
    score: `after`, plus the pool band if it has a free pooled instance of the app's image."""

    __slots__ = ("entry", "after", "score", "pooled")

    def __init__(self, entry: _Entry, after: float, band: float = 0.0, pooled: bool = False):
        self.entry, self.after, self.pooled = entry, after, pooled
        self.score = after + band if pooled else after

    def beats(self, other: "_Candidate") -> bool:
        return self.score > other.score or (self.score == other.score and self.entry[1] < other.entry[1])


def place_scale_out(cluster: Cluster, app: App, instances: Mapping[str, int], current: str,
                    exclude: Collection[str] = ()) -> Placement:
    """The node for a scale-out of `app` decided on node `current` (`instances` counts the app's
    live instances by node, those on `current` included): `current` itself unless, once the new
    instance uses its quota, it has less headroom than the best other node by more than the
    policy's scale_out_margin, or cannot take it. Pure, as `place`."""
    policy = cluster.policy
    other = place(cluster, app, instances, exclude)
    if other.node is None and sum(instances.values()) >= app.max_instances:
        return other
    node = cluster.nodes.get(current)
    if node is None or node.state != "up" or not _fits(node, app, policy):
        if other.node is None:
            return other
        why = "is not up" if node is None or node.state != "up" else "has no room for it"
        return msgspec.structs.replace(other, reason=f"scale-out of {app.name} leaves {current}, which {why}: "
                                                     f"{other.reason}")
    here = headroom(node, policy) - app.cpu / node.cpu_capacity
    versus = ""
    if other.node is not None and other.node != current:
        there = other.figures["headroom_after"]
        if here < there - policy.scale_out_margin:
            return msgspec.structs.replace(
                other, reason=f"scale-out of {app.name} leaves {current}, which is busier ({here:.0%} headroom "
                              f"after it against {there:.0%}): {other.reason}")
        versus = f" (the best other, {other.node}, would have {there:.0%})"
    entry = (-headroom(node, policy), current, memory_free(node, policy), cpu_free(node, policy), node.cpu_capacity)
    stay = _placement(cluster, app, instances, _Candidate(entry, here, pooled=cluster.has_pooled(current, app.image)),
                      other.figures.get("nodes_checked", 0))
    return msgspec.structs.replace(
        stay, reason=f"scale-out of {app.name} stays on {current}: its {here:.0%} headroom after it is not "
                     f"{policy.scale_out_margin:.0%} below the others'{versus}; {stay.reason}")


def scale_up_fits(node: NodeFigures, extra_cpu: float, policy: Policy) -> bool:
    """Whether a node can grant `extra_cpu` more quota to one of its instances: under the CPU
    ratio, and out of CPU it is not using (more quota on a node whose CPU is all used would not
    make the instance faster: the policy then sees it crowded and scales out, to another node
    if this one is the busier)."""
    return (node.cpu_reserved + extra_cpu <= node.cpu_capacity * policy.cpu_overcommit + _EPSILON
            and node.cpu_used + extra_cpu <= node.cpu_capacity + _EPSILON)


def _fits(node: NodeFigures, app: App, policy: Policy) -> bool:
    return memory_free(node, policy) >= app.memory_bytes and cpu_free(node, policy) >= app.cpu - _EPSILON


_EPSILON = 1e-9


def _placement(cluster: Cluster, app: App, instances: Mapping[str, int], chosen: _Candidate, checked: int,
               instead: _Candidate | None = None) -> Placement:
    """The decision for `chosen`, with the sentence and figures an event records."""
    entry = chosen.entry
    node = cluster.nodes[entry[1]]
    score, name, free_memory = -entry[0], entry[1], entry[2]
    own = instances.get(name, 0)
    parts = [f"{name} has {score:.0%} headroom, {chosen.after:.0%} once this instance uses its {app.cpu:g} CPU "
             f"(CPU {node.cpu_used:.2f} used, {node.cpu_reserved:g} reserved of {node.cpu_capacity:g}; "
             f"{format_bytes(free_memory)} of memory free)"]
    parts.append(f"runs {own} of its instances" if own else "runs none of its instances")
    if chosen.pooled:
        parts.append(f"a pooled {app.image} instance is free there")
    if instead is not None:
        parts.append(f"preferred to {instead.entry[1]} ({instead.after:.0%} after it, no free pooled instance)")
    figures: dict[str, Any] = {
        "node": name, "headroom": round(score, 4), "headroom_after": round(chosen.after, 4),
        "cpu_used": round(node.cpu_used, 3), "cpu_reserved": round(node.cpu_reserved, 3),
        "cpu_capacity": node.cpu_capacity, "memory_free_bytes": free_memory,
        "memory_capacity_bytes": node.memory_capacity_bytes, "app_instances_on_node": own,
        "pooled": chosen.pooled, "nodes_checked": checked,
    }
    return Placement(app=app.name, node=name, pooled=chosen.pooled, figures=figures,
                     reason=f"{app.name} on {name}: " + "; ".join(parts))


def _refusal(cluster: Cluster, app: App, exclude: Collection[str] = ()) -> Placement:
    """Why no node can take `app`: every node read, the counts by cause (rare, so it may be slow)."""
    policy = cluster.policy
    not_up: dict[str, int] = {}
    short_memory = short_cpu = 0
    most_memory: tuple[int, str] | None = None
    refusing = 0
    for node in cluster.nodes.values():
        if node.name in exclude:
            refusing += 1
            continue
        if node.state != "up":
            not_up[node.state] = not_up.get(node.state, 0) + 1
            continue
        free = memory_free(node, policy)
        if most_memory is None or free > most_memory[0] or (free == most_memory[0] and node.name < most_memory[1]):
            most_memory = (free, node.name)
        if free < app.memory_bytes:
            short_memory += 1
        elif cpu_free(node, policy) < app.cpu - _EPSILON:
            short_cpu += 1
    causes = []
    if not_up:
        causes.append(f"{sum(not_up.values())} not up (" + ", ".join(f"{n} {s}" for s, n in sorted(not_up.items())) + ")")
    if short_memory:
        most = "" if most_memory is None else f"; the most is {format_bytes(max(most_memory[0], 0))} on {most_memory[1]}"
        causes.append(f"{short_memory} without {format_bytes(app.memory_bytes)} of memory free under the "
                      f"overcommit ratio {policy.memory_overcommit:g}{most}")
    if refusing:
        causes.append(f"{refusing} without its docroot {app.docroot} (the site data is not mounted there)")
    if short_cpu:
        causes.append(f"{short_cpu} without {app.cpu:g} CPU of quota free under the ratio {policy.cpu_overcommit:g}")
    of = f"of {len(cluster.nodes)} nodes: " + ", ".join(causes) if cluster.nodes else "there are no nodes"
    figures = {"nodes": len(cluster.nodes), "not_up": sum(not_up.values()), "short_memory": short_memory,
               "short_cpu": short_cpu, "memory_bytes": app.memory_bytes, "cpu": app.cpu}
    return Placement(app=app.name, node=None, figures=figures,
                     reason=f"no node can take an instance of {app.name} (cpu {app.cpu:g}, memory "
                            f"{format_bytes(app.memory_bytes)}): {of}")
