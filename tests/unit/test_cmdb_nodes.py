"""The CMDB's cluster rows (cmdb/nodes.py) on both backends, no mocks: nodes' heartbeats, figures
and admin states; placements, and the one-winner first placement that fronts race on."""

from __future__ import annotations

import threading

import pytest

from fcrun.cmdb.nodes import NodeBeat
from fcrun.errors import NotFound, SpecError

from test_cmdb_contract import Backend, backend, db  # noqa: F401 - fixtures
from pgserver import pg_server, pg_url  # noqa: F401 - fixtures


def beat(db, name, **figures):
    db.node_beat(NodeBeat(name=name, role="node", address=f"{name}.lan:8080", figures=figures, started_at=1.5))


def test_a_beat_records_role_address_and_figures_and_keeps_the_admin_state(db):
    beat(db, "n1", cpu_capacity=4.0, pooled={"apache-php": 2})
    [node] = db.list_nodes()
    assert (node.name, node.role, node.address, node.admin_state) == ("n1", "node", "n1.lan:8080", "up")
    assert node.figures == {"cpu_capacity": 4.0, "pooled": {"apache-php": 2}}
    assert node.state() == "up" and node.started_at == 1.5
    db.set_node_state("n1", "cordoned")
    beat(db, "n1", cpu_capacity=8.0)  # a restart's beat: new figures, the cordon stays
    node = db.get_node("n1")
    assert node.admin_state == "cordoned" and node.figures == {"cpu_capacity": 8.0}


def test_a_node_is_down_once_its_heartbeat_is_older_than_the_lease(backend, db):
    beat(db, "n1")
    backend.raw("UPDATE nodes SET heartbeat_at = heartbeat_at - 5 WHERE name = 'n1'")
    node = db.get_node("n1")  # its age by the database's clock: 5 s and a little
    assert node.state(3.0) == "down" and node.state(60.0) == "up" and node.admin_state == "up"


def test_bad_node_state_and_unknown_node_are_refused_naming_them_and_change_nothing(backend, db):
    beat(db, "n1")
    before = backend.raw("SELECT name, admin_state FROM nodes")
    with pytest.raises(SpecError, match="'sleeping' is not one of up, cordoned, draining"):
        db.set_node_state("n1", "sleeping")
    with pytest.raises(NotFound, match="no node named 'n9'"):
        db.set_node_state("n9", "cordoned")
    with pytest.raises(NotFound, match="no node named 'n9'"):
        db.get_node("n9")
    with pytest.raises(SpecError, match="role 'boss'"):
        db.node_beat(NodeBeat(name="n2", role="boss"))
    assert backend.raw("SELECT name, admin_state FROM nodes") == before


def test_the_first_placement_wins_while_its_node_is_alive(backend, db):
    beat(db, "n1")
    beat(db, "n2")
    assert db.place_app("a.test", "n1") == ["n1"]
    assert db.place_app("a.test", "n2") == ["n1"]  # another front's choice for the same wave: n1 stays
    assert [(p.app, p.node, p.state) for p in db.list_placements("a.test")] == [("a.test", "n1", "active")]
    backend.raw("UPDATE nodes SET heartbeat_at = heartbeat_at - 10 WHERE name = 'n1'")  # n1 died
    assert db.place_app("a.test", "n2") == ["n2"]  # re-placed on the next request
    assert db.place_app("b.test", "n2") == ["n2"]  # per app


def test_concurrent_first_placements_from_many_connections_agree_on_one_node(backend):
    with backend.open() as db:
        for n in range(6):
            beat(db, f"n{n}")
    answers: list[list[str]] = []
    start = threading.Barrier(6)

    def place(n: int) -> None:
        with backend.open() as db:
            start.wait()
            answers.append(db.place_app("wave.test", f"n{n}"))

    threads = [threading.Thread(target=place, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 6 and len({tuple(a) for a in answers}) == 1 and len(answers[0]) == 1
    with backend.open() as db:
        assert [p.node for p in db.list_placements("wave.test")] == answers[0]


def test_move_and_drain_turn_the_old_placements_leaving(db):
    for n in ("n1", "n2", "n3"):
        beat(db, n)
    db.place_app("a.test", "n1")
    db.add_placement("a.test", "n2")  # a scale-out to another node
    db.place_app("b.test", "n1")
    db.move_app("a.test", "n3")
    states = {p.node: p.state for p in db.list_placements("a.test")}
    assert states == {"n1": "leaving", "n2": "leaving", "n3": "active"}
    db.set_node_state("n1", "draining")
    assert [(p.app, p.state) for p in db.list_placements(node="n1")] == [("a.test", "leaving"), ("b.test", "leaving")]
    assert db.remove_placement("a.test", "n1") is True and db.remove_placement("a.test", "n1") is False
    assert db.remove_node_placements("n2") == 1
    assert db.remove_node("n1") is True
    assert {p.node for p in db.list_placements()} == {"n3"} and [n.name for n in db.list_nodes()] == ["n2", "n3"]


def test_holders_are_the_app_node_pairs_with_a_ready_or_frozen_instance_each_once(db):
    from fcrun.cmdb.models import Instance

    rows = [("a-1", "a.test", "ready", "n1"), ("a-2", "a.test", "frozen", "n1"), ("a-3", "a.test", "ready", "n2"),
            ("b-1", "b.test", "starting", "n1"), ("b-2", "b.test", "stopped", "n2"), ("c-1", "c.test", "ready", "")]
    for id_, app, state, owner in rows:
        db.upsert_instance(Instance(id=id_, app=app, container=id_, state=state, owner=owner))
    assert sorted(db.holders()) == [("a.test", "n1"), ("a.test", "n2")]


def test_apps_on_a_node_gives_all_their_placements_and_ready_holders_and_nothing_of_other_apps(db):
    from fcrun.cmdb.models import Instance

    for app, node, state in (("a.test", "n1", "active"), ("a.test", "n2", "leaving"), ("b.test", "n2", "active"),
                             ("c.test", "n1", "leaving")):
        db.add_placement(app, node, state)
    for id_, app, state, owner in (("a-1", "a.test", "ready", "n2"), ("a-2", "a.test", "ready", "n2"),
                                   ("a-3", "a.test", "frozen", "n1"), ("b-1", "b.test", "ready", "n2"),
                                   ("c-1", "c.test", "starting", "n1")):
        db.upsert_instance(Instance(id=id_, app=app, container=id_, state=state, owner=owner))
    placements, ready = db.apps_on("n1")
    assert [(p.app, p.node, p.state) for p in placements] == [
        ("a.test", "n1", "active"), ("a.test", "n2", "leaving"), ("c.test", "n1", "leaving")]
    assert ready == [("a.test", "n2")]  # b.test is not placed on n1; frozen and starting are not ready
    assert db.apps_on("n9") == ([], [])
