"""A node's cluster side (cluster/node.py) on a real SQLite CMDB with a stand-in manager: its
heartbeat's figures, and what it does for each placement (move in, scale-out in, move out
after the grace, forget, drain, rejoin)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from fcrun.cluster.node import GRACE_S, Capacity, NodeAgent
from fcrun.cmdb import App, Instance, open_cmdb
from fcrun.cmdb.nodes import NodeBeat
from fcrun.paths import Paths

GiB = 1 << 30


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeManager:
    """What NodeAgent reads and calls of serve's Manager."""

    def __init__(self):
        self.apps: dict[str, SimpleNamespace] = {}
        self.calls: list[tuple] = []
        self.backend = SimpleNamespace(cpu_seconds=lambda name: self.cpu.get(name, 0.0))
        self.cpu: dict[str, float] = {}
        self.scale_out_elsewhere = None

    def add(self, app: App, *instances: str, cpu: float | None = None):
        self.apps[app.name] = SimpleNamespace(
            app=app, pending_starts=0,
            instances={name: SimpleNamespace(name=name, cpu=cpu) for name in instances})

    async def start_surge(self, name, surge=1):
        self.calls.append(("start", name, surge))
        self.apps[name].instances[f"{name}-new"] = SimpleNamespace(name=f"{name}-new", cpu=None)

    async def evacuate(self, name, reason):
        self.calls.append(("evacuate", name))
        stopped = len(self.apps[name].instances)
        self.apps[name].instances.clear()
        return stopped


@pytest.fixture
def db(tmp_path):
    cmdb = open_cmdb(Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path / "run")))
    yield cmdb
    cmdb.close()


@pytest.fixture
def agent(db):
    manager = FakeManager()
    clock = Clock()
    events: list[tuple] = []
    jobs: list = []
    node = NodeAgent(db, manager, name="n1", address="10.0.0.1:8080", capacity=Capacity(4.0, 8 * GiB),
                     pool=lambda: {"apache-php": 2}, pool_memory_bytes=GiB,
                     event=lambda *e: events.append(e), spawn=lambda coro, name: jobs.append(coro), clock=clock)
    node.test = SimpleNamespace(manager=manager, clock=clock, events=events, jobs=jobs)
    for other in ("n2", "n3"):
        db.node_beat(NodeBeat(name=other, role="node", address=f"{other}:8080", figures={
            "cpu_capacity": 4.0, "memory_capacity_bytes": 8 * GiB}))
    yield node
    run_jobs(node)


def run_jobs(node):
    async def run():
        while node.test.jobs:
            await node.test.jobs.pop(0)
    asyncio.run(run())


def follow(node):
    asyncio.run(node.follow())
    run_jobs(node)


def app(name="a.test", **kw):
    return App(name=name, image="apache-php", cpu=1.0, memory_bytes=GiB, max_instances=2, **kw)


def ready(db, app_name, node):
    db.upsert_instance(Instance(id=f"{app_name}-{node}", app=app_name, container="c", state="ready", owner=node))


def test_a_beat_says_what_the_node_offers_reserves_and_uses(agent, db):
    agent.test.manager.add(app(), "i1", "i2", cpu=1.5)
    agent.test.manager.cpu = {"i1": 10.0, "i2": 0.0}
    asyncio.run(agent.beat())
    agent.test.manager.cpu = {"i1": 11.0, "i2": 0.5}  # 1.5 CPU-seconds over the next 1 s
    agent.test.clock.now += 1.0
    asyncio.run(agent.beat())
    node = db.get_node("n1")
    assert (node.role, node.address, node.state()) == ("node", "10.0.0.1:8080", "up")
    f = node.figures
    assert (f["cpu_capacity"], f["memory_capacity_bytes"]) == (4.0, 8 * GiB)
    assert (f["cpu_reserved"], f["memory_reserved_bytes"]) == (3.0, 2 * GiB + 2 * GiB)  # 2 instances + 2 pooled
    assert f["cpu_used"] == 1.5 and f["instances"] == 2 and f["pooled"] == {"apache-php": 2}


def test_a_move_in_starts_one_instance_with_a_surge_once(agent, db):
    agent.test.manager.add(app())
    db.place_app("a.test", "n2")
    ready(db, "a.test", "n2")
    db.move_app("a.test", "n1")
    follow(agent)
    follow(agent)
    assert agent.test.manager.calls == [("start", "a.test", 1)]
    assert any(kind == "move" and "moved in to n1" in msg for _, kind, msg, _ in agent.test.events)


def test_a_scale_out_placed_here_starts_one_within_the_max_and_not_again_after_it_idles_out(agent, db):
    agent.test.manager.add(app())
    db.place_app("a.test", "n2")
    ready(db, "a.test", "n2")
    db.add_placement("a.test", "n1")
    follow(agent)
    assert agent.test.manager.calls == [("start", "a.test", 0)]
    agent.test.manager.apps["a.test"].instances.clear()  # it idled out
    follow(agent)
    assert agent.test.manager.calls == [("start", "a.test", 0)]  # not restarted for the same placement
    agent.test.clock.now += GRACE_S
    follow(agent)
    assert [p.node for p in db.list_placements("a.test")] == ["n2"]  # forgotten after the grace


def test_a_move_out_waits_for_the_new_home_then_the_grace_then_drains(agent, db):
    agent.test.manager.add(app(), "i1")
    db.place_app("a.test", "n1")
    db.move_app("a.test", "n2")
    follow(agent)
    agent.test.clock.now += 10
    follow(agent)
    assert agent.test.manager.calls == []  # n2 has no ready instance yet: n1 keeps serving
    ready(db, "a.test", "n2")
    follow(agent)
    assert agent.test.manager.calls == []  # the grace starts now
    agent.test.clock.now += GRACE_S
    follow(agent)
    assert agent.test.manager.calls == [("evacuate", "a.test")]
    assert [(p.node, p.state) for p in db.list_placements("a.test")] == [("n2", "active")]


def test_a_drain_places_each_app_elsewhere_by_free_resources(agent, db):
    agent.test.manager.add(app(), "i1")
    asyncio.run(agent.beat())
    db.place_app("a.test", "n1")
    db.set_node_state("n1", "draining")
    follow(agent)
    placements = {p.node: p.state for p in db.list_placements("a.test")}
    assert placements["n1"] == "leaving" and list(placements.values()).count("active") == 1
    assert any(kind == "placement" and "drain of n1" in msg for _, kind, msg, _ in agent.test.events)


def test_a_restarted_node_forgets_the_placements_of_apps_it_no_longer_runs(agent, db):
    agent.test.manager.add(app("a.test"), "i1")  # adopted at reconcile
    agent.test.manager.add(app("b.test"))
    db.place_app("a.test", "n1")
    db.place_app("b.test", "n1")
    asyncio.run(agent.start())
    assert [p.app for p in db.list_placements(node="n1")] == ["a.test"]
    assert agent.test.manager.scale_out_elsewhere == agent.scale_out_elsewhere


def test_apps_whose_docroot_is_missing_here_are_refused_in_the_beat(agent, db, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    agent.test.manager.add(app("here.test", docroot=str(site)))
    agent.test.manager.add(app("gone.test", docroot=str(tmp_path / "not-mounted")))
    asyncio.run(agent.beat())
    assert db.get_node("n1").figures["refuses"] == ["gone.test"]
