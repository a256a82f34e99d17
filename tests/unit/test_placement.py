"""Placement by free resources (cluster/placement.py): each rule on small hand-made clusters."""

from __future__ import annotations

import random

import pytest

from fcrun.cluster.placement import (Cluster, NodeFigures, Policy, cpu_free, headroom, memory_free, place,
                                     place_scale_out, scale_up_fits)
from fcrun.cmdb.models import App

GIB = 1 << 30
MIB = 1 << 20


def node(name: str, **kw) -> NodeFigures:
    figures = dict(cpu_capacity=8.0, memory_capacity_bytes=16 * GIB)
    figures.update(kw)
    return NodeFigures(name=name, **figures)


def app(**kw) -> App:
    settings = dict(name="site.test", image="apache-php", cpu=0.5, memory_bytes=512 * MIB, max_instances=4)
    settings.update(kw)
    return App(**settings)


def test_the_node_with_most_headroom_is_chosen_and_the_reason_names_it():
    cluster = Cluster([node("a", cpu_used=6.0), node("b", cpu_used=1.0), node("c", cpu_used=3.0)])
    decision = place(cluster, app())
    assert decision.node == "b"
    assert decision.reason.startswith("site.test on b: b has 88% headroom")
    assert decision.figures["node"] == "b" and decision.figures["app_instances_on_node"] == 0


@pytest.mark.parametrize("state", ["down", "cordoned", "draining"])
def test_a_node_that_is_not_up_is_never_chosen(state):
    # The idle node is not up: the busy one takes the instance, however little room it has.
    cluster = Cluster([node("idle", state=state), node("busy", cpu_used=7.5)])
    assert place(cluster, app()).node == "busy"
    only = Cluster([node("idle", state=state)])
    decision = place(only, app())
    assert decision.node is None
    assert f"1 not up (1 {state})" in decision.reason


def test_memory_is_never_promised_past_the_overcommit_ratio():
    # 16 GiB nodes, 15.75 GiB reserved: 256 MiB free at ratio 1, 8.25 GiB at ratio 1.5.
    full = [node("a", memory_reserved_bytes=16 * GIB - 256 * MIB), node("b", memory_reserved_bytes=16 * GIB - 256 * MIB)]
    refused = place(Cluster(full, Policy(memory_overcommit=1.0)), app())
    assert refused.node is None
    assert "2 without 512M of memory free under the overcommit ratio 1; the most is 256M on a" in refused.reason
    assert place(Cluster(full, Policy(memory_overcommit=1.5)), app()).node == "a"
    # Exactly at the ratio fits; one byte over does not.
    edge = Cluster([node("a", memory_reserved_bytes=16 * GIB - 512 * MIB)])
    assert place(edge, app()).node == "a"
    assert place(edge, app(memory_bytes=512 * MIB + 1)).node is None


def test_cpu_quota_is_bounded_by_its_own_ratio():
    cluster = Cluster([node("a", cpu_reserved=31.8)], Policy(cpu_overcommit=4.0))  # 0.2 CPU left of 32
    decision = place(cluster, app(cpu=0.5))
    assert decision.node is None and "1 without 0.5 CPU of quota free under the ratio 4" in decision.reason
    assert place(cluster, app(cpu=0.2)).node == "a"


def test_instances_spread_over_nodes_before_doubling_up():
    cluster = Cluster([node("a"), node("b", cpu_used=4.0), node("c", cpu_used=6.0)])
    # "a" is the idlest, but runs one already: the next idlest without one wins.
    assert place(cluster, app(), {"a": 1}).node == "b"
    assert place(cluster, app(), {"a": 1, "b": 1}).node == "c"
    # Every node runs one: the fewest, then headroom.
    assert place(cluster, app(max_instances=8), {"a": 2, "b": 1, "c": 1}).node == "b"
    decision = place(cluster, app(), {"a": 1, "b": 1, "c": 1})
    assert decision.node == "a" and "runs 1 of its instances" in decision.reason


def test_a_node_with_a_free_pooled_instance_wins_when_comparable():
    nodes = [node("a", cpu_used=0.0), node("b", cpu_used=0.4, pooled={"apache-php": 1}),
             node("c", cpu_used=0.2, pooled={"other": 2})]
    decision = place(Cluster(nodes), app())
    assert decision.node == "b" and decision.pooled
    assert "a pooled apache-php instance is free there" in decision.reason and "preferred to a" in decision.reason
    # Outside the band (0.1 of headroom = 0.8 CPU of 8), headroom wins.
    far = [node("a"), node("b", cpu_used=1.6, pooled={"apache-php": 1})]
    assert place(Cluster(far), app()).node == "a"
    # A pool of 0 free is no pool.
    empty = [node("a"), node("b", cpu_used=0.4, pooled={"apache-php": 0})]
    assert place(Cluster(empty), app()).node == "a"


def test_pool_preference_does_not_override_spreading_or_memory():
    nodes = [node("a"), node("b", cpu_used=0.2, pooled={"apache-php": 1}),
             node("c", cpu_used=0.1, pooled={"apache-php": 1}, memory_reserved_bytes=16 * GIB)]
    assert place(Cluster(nodes), app(), {"b": 1}).node == "a"  # b runs one; c has no memory


def test_scale_out_stays_on_its_node_unless_that_node_is_busier():
    cluster = Cluster([node("home", cpu_used=2.0), node("other", cpu_used=1.5)])
    stay = place_scale_out(cluster, app(), {"home": 1}, "home")
    assert stay.node == "home"
    assert stay.reason.startswith("scale-out of site.test stays on home: its 69% headroom after it is not 10% below "
                                  "the others' (the best other, other, would have 75%)")
    busy = Cluster([node("home", cpu_used=6.0), node("other", cpu_used=1.5)])
    moved = place_scale_out(busy, app(), {"home": 1}, "home")
    assert moved.node == "other"
    assert "leaves home, which is busier (19% headroom after it against 75%)" in moved.reason


def test_scale_out_leaves_a_node_that_cannot_take_it_and_respects_the_max():
    cluster = Cluster([node("home", memory_reserved_bytes=16 * GIB), node("other", cpu_used=7.0)])
    decision = place_scale_out(cluster, app(), {"home": 1}, "home")
    assert decision.node == "other" and "which has no room for it" in decision.reason
    cordoned = Cluster([node("home", state="cordoned"), node("other")])
    assert "which is not up" in place_scale_out(cordoned, app(), {"home": 1}, "home").reason
    at_max = place_scale_out(cluster, app(max_instances=2), {"home": 2}, "home")
    assert at_max.node is None and at_max.reason == "site.test already runs its max of 2 instances"


def test_same_figures_same_node_whatever_the_order_they_came_in():
    rng = random.Random(7)
    nodes = [node(f"n{i:03d}", cpu_used=rng.choice([0.0, 1.0, 2.0]), pooled={"apache-php": rng.randint(0, 1)})
             for i in range(200)]
    first = place(Cluster(nodes), app(), {"n000": 1})
    for _ in range(5):
        shuffled = nodes[:]
        rng.shuffle(shuffled)
        again = place(Cluster(shuffled), app(), {"n000": 1})
        assert (again.node, again.reason, again.figures) == (first.node, first.reason, first.figures)
    # Equal nodes: the name breaks the tie.
    assert place(Cluster([node("b"), node("a"), node("c")]), app()).node == "a"


def test_updates_keep_the_ranking_right():
    cluster = Cluster([node("a"), node("b", cpu_used=1.0)])
    assert place(cluster, app()).node == "a"
    cluster.update(node("a", cpu_used=4.0))
    assert place(cluster, app()).node == "b"
    cluster.update(node("b", state="down"))
    assert place(cluster, app()).node == "a"
    cluster.remove("a")
    assert place(cluster, app()).reason.endswith("of 1 nodes: 1 not up (1 down)")
    cluster.remove("b")
    assert place(cluster, app()).reason.endswith("there are no nodes")
    # A node's pool emptied by an update is no longer preferred.
    pools = Cluster([node("a"), node("b", cpu_used=0.4, pooled={"apache-php": 1})])
    pools.update(node("b", cpu_used=0.4, pooled={"apache-php": 0}))
    assert place(pools, app()).node == "a" and not pools.has_pooled("b", "apache-php")


def test_an_app_at_its_max_gets_no_node():
    decision = place(Cluster([node("a")]), app(max_instances=1), {"a": 1})
    assert decision.node is None and decision.reason == "site.test already runs its max of 1 instances"


def test_headroom_is_the_most_used_resource_share():
    policy = Policy(memory_overcommit=1.0, cpu_overcommit=2.0)
    n = node("a", cpu_used=2.0, cpu_reserved=8.0, memory_reserved_bytes=12 * GIB)
    # CPU used 25%, quota 8 of 16 = 50%, memory 75%: memory decides.
    assert headroom(n, policy) == pytest.approx(0.25)
    assert memory_free(n, policy) == 4 * GIB


def test_a_big_instance_goes_to_a_big_node():
    # Same headroom (idle), but a 1-CPU instance is half of a 2-CPU node and 1/16 of the other.
    cluster = Cluster([node("a-small", cpu_capacity=2.0), node("b-big", cpu_capacity=16.0)])
    decision = place(cluster, app(cpu=1.0))
    assert decision.node == "b-big" and decision.figures["headroom_after"] == pytest.approx(1 - 1 / 16)


def test_scale_up_needs_quota_under_the_ratio_and_idle_cpu():
    policy = Policy(cpu_overcommit=2.0)
    assert scale_up_fits(node("a", cpu_used=7.0, cpu_reserved=10.0), 1.0, policy)
    assert not scale_up_fits(node("a", cpu_used=7.5, cpu_reserved=10.0), 1.0, policy)  # no idle CPU left
    assert not scale_up_fits(node("a", cpu_used=1.0, cpu_reserved=15.5), 1.0, policy)  # quota past 2 x 8


def reference(nodes: list[NodeFigures], a: App, instances: dict[str, int], policy: Policy) -> str | None:
    """The rules read literally, over every node: the search must find the same node."""
    fits = [n for n in nodes if n.state == "up" and memory_free(n, policy) >= a.memory_bytes
            and cpu_free(n, policy) >= a.cpu - 1e-9]

    def score(n: NodeFigures) -> float:
        pooled = n.pooled.get(a.image, 0) > 0
        return headroom(n, policy) - a.cpu / n.cpu_capacity + (policy.pool_band if pooled else 0.0)

    free = [n for n in fits if n.name not in instances]
    if free:
        return min(free, key=lambda n: (-score(n), n.name)).name
    if fits:
        return min(fits, key=lambda n: (instances[n.name], -score(n), n.name)).name
    return None


@pytest.mark.parametrize("seed", range(20))
def test_the_search_finds_what_reading_every_node_finds(seed):
    rng = random.Random(seed)
    policy = Policy(memory_overcommit=rng.choice([1.0, 1.2]), pool_band=rng.choice([0.0, 0.1, 0.3]))
    nodes = []
    for i in range(rng.randint(1, 60)):
        cpu = rng.choice([2.0, 4.0, 8.0, 16.0])
        nodes.append(node(f"n{i:02d}", cpu_capacity=cpu, memory_capacity_bytes=int(cpu) * 2 * GIB,
                          state=rng.choice(["up"] * 8 + ["down", "cordoned"]),
                          cpu_used=rng.uniform(0, cpu), cpu_reserved=rng.uniform(0, 4 * cpu),
                          memory_reserved_bytes=rng.randint(0, int(cpu) * 2 * GIB),
                          pooled={rng.choice(["apache-php", "nginx"]): rng.randint(0, 2)}))
    cluster = Cluster(nodes, policy)
    for _ in range(20):
        a = app(cpu=rng.choice([0.25, 0.5, 1.0]), memory_bytes=rng.choice([256, 512, 1024]) * MIB,
                image=rng.choice(["apache-php", "nginx"]), max_instances=1000)
        instances = {n.name: rng.randint(1, 2) for n in rng.sample(nodes, rng.randint(0, len(nodes)))}
        assert place(cluster, a, instances).node == reference(nodes, a, instances, policy)


def test_a_pooled_dict_changed_after_update_leaves_no_stale_ranking():
    pooled = {"apache-php": 1}
    cluster = Cluster([node("a"), node("b", cpu_used=0.4, pooled=pooled)])
    pooled["apache-php"] = 0  # the caller's dict, changed in place
    cluster.update(node("b", cpu_used=0.4, pooled={}))
    assert place(cluster, app()).node == "a"
    cluster.remove("b")
    assert place(cluster, app()).node == "a"


def test_nodes_that_refuse_the_app_are_never_chosen_even_crowded_or_pooled():
    # b is best and has a pooled instance, but the app's docroot is not mounted there.
    cluster = Cluster([node("a", cpu_used=6.0), node("b", pooled={"apache-php": 1}), node("c", cpu_used=3.0)])
    assert place(cluster, app(), exclude={"b"}).node == "c"
    assert place(cluster, app(), {"a": 1, "c": 1}, exclude={"b"}).node in ("a", "c")  # crowded, still not b
    decision = place(Cluster([node("b")]), app(docroot="/srv/site"), exclude={"b"})
    assert decision.node is None and "1 without its docroot /srv/site" in decision.reason
    assert place_scale_out(cluster, app(), {"a": 1}, "a", exclude={"b"}).node in ("a", "c")
