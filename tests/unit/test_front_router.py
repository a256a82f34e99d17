"""The front's router (cluster/front.py) on a real SQLite CMDB: which node a request goes to,
the first placement of a cold app, a move in progress, a dead node, the retry elsewhere."""

from __future__ import annotations

import asyncio

import pytest

from fcrun.cmdb import App, Instance, open_cmdb
from fcrun.cmdb.nodes import NodeBeat
from fcrun.cluster.front import FrontRouter
from fcrun.paths import Paths
from fcrun.proxy.router import RouteError

GiB = 1 << 30


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def db(tmp_path):
    cmdb = open_cmdb(Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path / "run")))
    yield cmdb
    cmdb.close()


def beat(db, name, address, cpu_used=0.0, cpu_capacity=4.0, memory_reserved=0):
    db.node_beat(NodeBeat(name=name, role="node", address=address, figures={
        "cpu_capacity": cpu_capacity, "memory_capacity_bytes": 8 * GiB, "cpu_reserved": 0.0,
        "memory_reserved_bytes": memory_reserved, "cpu_used": cpu_used, "instances": 0, "pooled": {}}))


def instance(db, app, node, state="ready"):
    db.upsert_instance(Instance(id=f"{app}-{node}", app=app, container=f"{app}-{node}", state=state, owner=node))


class Front:
    def __init__(self, db, down_after_s=3.0):
        self.db = db
        self.events: list[tuple] = []
        self.jobs: list = []
        self.clock = Clock()
        self.router = FrontRouter(db, name="f1", event=lambda *e: self.events.append(e),
                                  spawn=lambda coro, name: self.jobs.append(coro), clock=self.clock,
                                  down_after_s=down_after_s)

    def refresh(self):
        self.router.set_apps(self.db.list_apps())
        self.router.refresh(self.db.list_nodes(), self.db.list_placements(), self.db.holders())

    def acquire(self, host):
        return self.router.acquire_nowait(host)  # never None: a cold app is placed at once

    def run_jobs(self):
        async def run():
            for job in self.jobs:
                await job
        asyncio.run(run())
        self.jobs.clear()


@pytest.fixture
def front(db):
    db.add_app(App(name="a.test", image="apache-php", cpu=1.0, memory_bytes=GiB, max_instances=3))
    beat(db, "n1", "10.0.0.1:8080", cpu_used=3.0)  # busy
    beat(db, "n2", "10.0.0.2:8080")
    beat(db, "n3", "10.0.0.3:8080", cpu_used=1.0)
    f = Front(db)
    f.refresh()
    yield f
    f.run_jobs()  # placements a test did not wait for: written, not left as unawaited coroutines


def test_a_cold_app_is_placed_on_the_node_with_most_headroom_and_recorded(front, db):
    lease = front.acquire("a.test")
    assert (lease.node, lease.addr) == ("n2", ("10.0.0.2", 8080))
    assert db.list_placements("a.test") == []  # forwarded before the write
    assert front.acquire("a.test").node == "n2"  # the cache holds it meanwhile: one node per wave
    front.run_jobs()
    assert [(p.node, p.state) for p in db.list_placements("a.test")] == [("n2", "active")]
    [(app, kind, message, data)] = front.events
    assert (app, kind, data["node"]) == ("a.test", "placement", "n2") and "headroom" in message
    front.refresh()
    assert front.acquire("a.test").node == "n2"  # placed: no second decision
    assert len(front.events) == 1


def test_another_front_s_placement_wins_a_race(front, db):
    db.place_app("a.test", "n3")  # another front decided first, our cache has not seen it
    assert front.acquire("a.test").node == "n2"  # our choice serves this request
    front.run_jobs()  # the write returns the winner
    assert front.events == [] and [p.node for p in db.list_placements("a.test")] == ["n3"]
    assert front.acquire("a.test").node == "n3"


def test_requests_spread_over_the_nodes_holding_instances_by_outstanding_requests(front, db):
    db.place_app("a.test", "n1")
    db.add_placement("a.test", "n3")
    instance(db, "a.test", "n1")
    instance(db, "a.test", "n3")
    front.refresh()
    leases = [front.acquire("a.test") for _ in range(4)]
    assert sorted(lease.node for lease in leases) == ["n1", "n1", "n3", "n3"]
    for lease in leases[:3]:
        lease.done(200, 0, 0, False)
    assert front.router.outstanding == {leases[3].node: 1}


def test_a_move_keeps_the_old_node_until_the_new_one_holds_an_instance(front, db):
    db.place_app("a.test", "n1")
    instance(db, "a.test", "n1")
    db.move_app("a.test", "n2")
    front.refresh()
    assert front.acquire("a.test").node == "n1"  # n2 is active but has no instance yet
    instance(db, "a.test", "n2")
    front.refresh()
    assert front.acquire("a.test").node == "n2"


def test_a_dead_node_is_skipped_its_apps_placed_again_and_the_event_says_so(front, db):
    db.place_app("a.test", "n2")
    instance(db, "a.test", "n2")
    front.refresh()
    assert front.acquire("a.test").node == "n2"
    db_raw = db  # n2 stops beating: its heartbeat is 10 s old
    with db_raw._write("age n2") as cur:
        cur.execute("UPDATE nodes SET heartbeat_at = heartbeat_at - 10 WHERE name = 'n2'")
    front.refresh()
    assert any(kind == "node" and "n2 is down" in message for _, kind, message, _ in front.events)
    lease = front.acquire("a.test")
    assert lease.node == "n3"  # n1 is busier
    front.run_jobs()
    assert [p.node for p in db.list_placements("a.test") if p.state == "active"] == ["n2", "n3"]


def test_a_request_whose_node_failed_goes_once_elsewhere_and_that_node_is_avoided(front, db):
    db.place_app("a.test", "n1")
    db.add_placement("a.test", "n3")
    instance(db, "a.test", "n1")
    instance(db, "a.test", "n3")
    front.refresh()
    first = front.acquire("a.test")
    other = front.router.retry_elsewhere("a.test", first)
    assert other is not None and other.node != first.node
    assert all(front.acquire("a.test").node == other.node for _ in range(3))  # the failed one is suspect
    front.clock.now += 10  # suspicion ends; it is live again by its heartbeat
    assert {front.acquire("a.test").node for _ in range(6)} == {"n1", "n3"}


def test_a_retry_for_an_app_on_one_node_goes_to_the_best_other_and_places_it_there(front, db):
    db.place_app("a.test", "n2")
    instance(db, "a.test", "n2")
    front.refresh()
    first = front.acquire("a.test")
    other = front.router.retry_elsewhere("a.test", first)
    assert other.node == "n3"
    front.run_jobs()
    assert {p.node for p in db.list_placements("a.test")} == {"n2", "n3"}


def test_unknown_host_is_404_and_no_node_fits_is_503_naming_why(front, db):
    with pytest.raises(RouteError) as err:
        front.router.acquire_nowait("nope.test")
    assert err.value.status == 404 and "nope.test" in err.value.message
    db.add_app(App(name="big.test", image="apache-php", memory_bytes=64 * GiB))
    front.refresh()
    with pytest.raises(RouteError) as err:
        front.acquire("big.test")
    assert err.value.status == 503 and "no node can take an instance of big.test" in err.value.message
    assert db.list_placements("big.test") == []
    with pytest.raises(RouteError):
        front.acquire("big.test")  # the second refusal: no second event this soon
    refusals = [e for e in front.events if e[1] == "placement" and e[0] == "big.test"]
    assert len(refusals) == 1 and "answered 503" in refusals[0][2]


def test_cordoned_nodes_take_no_new_app_but_keep_serving_theirs(front, db):
    db.place_app("a.test", "n2")
    instance(db, "a.test", "n2")
    db.set_node_state("n2", "cordoned")
    db.add_app(App(name="b.test", image="apache-php", cpu=1.0, memory_bytes=GiB))
    front.refresh()
    assert front.acquire("a.test").node == "n2"
    assert front.acquire("b.test").node == "n3"


def test_a_node_without_the_app_s_docroot_is_not_chosen_nor_routed_to(front, db):
    db.place_app("a.test", "n2")  # placed before n2 lost its mount
    beat(db, "n2", "10.0.0.2:8080")
    with db._write("n2 refuses") as cur:  # its next beat says so
        cur.execute("UPDATE nodes SET figures = ? WHERE name = 'n2'",
                    ('{"cpu_capacity": 4.0, "memory_capacity_bytes": 8589934592, "refuses": ["a.test"]}',))
    front.refresh()
    assert front.acquire("a.test").node == "n3"
    front.run_jobs()  # the CMDB keeps n2's (alive); n3 is added beside it
    assert {p.node for p in db.list_placements("a.test") if p.state == "active"} == {"n2", "n3"}
    assert front.acquire("a.test").node == "n3"
