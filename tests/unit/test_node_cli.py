"""`fcrun node ls|cordon|uncordon|drain|rm` and `fcrun app move`, `fcrun app show`'s nodes: through
the CLI (click's CliRunner on the real main group, or the CLI as a process where it waits)
against a real CMDB, SQLite and PostgreSQL (tests/pgserver.py). The nodes' own side (beats,
instance rows, placements they delete) is written by the test on its own connection: where a
command waits, once the command has said it is waiting."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fcrun.cmdb import App, Instance
from fcrun.cmdb.nodes import NodeBeat
from fcrun_cli.main import main
from fcrun_cli.node import WaitTimedOut, wait_until

from test_cmdb_contract import Backend, backend, db  # noqa: F401 - fixtures
from pgserver import pg_server, pg_url  # noqa: F401 - fixtures

FIGURES = {"cpu_capacity": 4.0, "cpu_reserved": 1.5, "cpu_used": 0.25, "memory_capacity_bytes": 8 << 30,
           "memory_reserved_bytes": 2 << 30, "instances": 3, "pooled": {"apache-php": 2, "busybox": 1}}


@pytest.fixture
def cli_env(backend, monkeypatch, short_dir):
    """The environment of a command in direct mode (for this process and the ones it starts):
    the test's roots, no config, no admin server answers."""
    monkeypatch.setenv("FCRUN_ROOT", backend.paths.data_root)
    monkeypatch.setenv("FCRUN_RUN", backend.paths.run_root)
    monkeypatch.setenv("FCRUN_ADMIN_SOCKET", f"{short_dir}/no-server.sock")
    for name in ("FCRUN_ADMIN_URL", "FCRUN_CONFIG", "FCRUN_CMDB"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cli(backend, cli_env):
    """`fcrun --cmdb URL ARGS...` through click's CliRunner."""
    runner = CliRunner()
    return lambda *args: runner.invoke(main, ["--cmdb", backend.url, *args])


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def beat(db, name, role="node", **figures):
    db.node_beat(NodeBeat(name=name, role=role, address=f"{name}.lan:8080" if role != "front" else "",
                          figures=figures))


def make_stale(backend, name):
    backend.raw("UPDATE nodes SET heartbeat_at = heartbeat_at - 10 WHERE name = ?", name)


def instance(app, owner, n=0, state="ready"):
    return Instance(id=f"{app}-{owner}-{n}", app=app, container=f"{app}-{owner}-{n}", state=state, owner=owner,
                    ip="10.88.0.2", port=80)


def node_events(db):
    return [(e.kind, e.message) for e in db.list_events() if e.kind in ("node", "placement")]


def table(output: str) -> dict[str, dict[str, str]]:
    lines = output.splitlines()
    header = lines[0].split()
    return {cells[0]: dict(zip(header, cells)) for cells in (line.split() for line in lines[1:])}


# -- ls -------------------------------------------------------------------------------------------


def test_ls_shows_each_nodes_figures_and_dashes_for_a_node_without_any(cli, db):
    beat(db, "n1", **FIGURES)
    beat(db, "f1", role="front")
    rows = table(ok(cli("node", "ls")))
    assert list(rows) == ["f1", "n1"]
    n1 = rows["n1"]
    assert (n1["ROLE"], n1["ADDRESS"], n1["STATE"]) == ("node", "n1.lan:8080", "up")
    assert (n1["CPU(CAP/RES/USED)"], n1["MEMORY(CAP/RES)"], n1["INSTANCES"], n1["POOLED"]) == \
        ("4/1.5/0.25", "8G/2G", "3", "3")
    assert re.fullmatch(r"\d+\.\ds", n1["HEARTBEAT"])  # then "ago"
    f1 = rows["f1"]
    assert (f1["ROLE"], f1["ADDRESS"], f1["STATE"]) == ("front", "-", "up")
    assert [f1[k] for k in ("CPU(CAP/RES/USED)", "MEMORY(CAP/RES)", "INSTANCES", "POOLED")] == ["-"] * 4

    beat(db, "n2", cpu_capacity=2)  # some figures only: the missing ones are dashes
    assert table(ok(cli("node", "ls")))["n2"]["CPU(CAP/RES/USED)"] == "2/-/-"


def test_ls_shows_a_node_whose_heartbeat_is_stale_down_and_keeps_its_admin_state_in_json(cli, backend, db):
    beat(db, "n1", **FIGURES)
    beat(db, "n2")
    db.set_node_state("n2", "cordoned")
    make_stale(backend, "n1")
    assert {name: row["STATE"] for name, row in table(ok(cli("node", "ls"))).items()} == \
        {"n1": "down", "n2": "cordoned"}
    shown = {n["name"]: n for n in json.loads(ok(cli("node", "ls", "--json")))}
    assert (shown["n1"]["state"], shown["n1"]["admin_state"], shown["n1"]["figures"]) == ("down", "up", FIGURES)
    assert (shown["n2"]["state"], shown["n2"]["role"], shown["n2"]["address"]) == ("cordoned", "node", "n2.lan:8080")


def test_ls_of_a_cmdb_with_no_node_prints_the_header_only(cli):
    assert ok(cli("node", "ls")).split() == ["NAME", "ROLE", "ADDRESS", "STATE", "CPU(CAP/RES/USED)",
                                             "MEMORY(CAP/RES)", "INSTANCES", "POOLED", "HEARTBEAT"]
    assert json.loads(ok(cli("node", "ls", "--json"))) == []


# -- cordon, uncordon, drain ------------------------------------------------------------------------


def test_cordon_uncordon_and_drain_set_the_admin_state_and_record_events(cli, db):
    beat(db, "n1")
    db.add_app(App(name="a.test", image="apache-php"))
    db.add_placement("a.test", "n1")
    assert ok(cli("node", "cordon", "n1")).startswith("n1: up -> cordoned: no new placement goes there")
    assert db.get_node("n1").admin_state == "cordoned"
    assert ok(cli("node", "cordon", "n1")) == "n1: already cordoned; nothing changed\n"
    assert ok(cli("node", "uncordon", "n1")).startswith("n1: cordoned -> up")
    assert [(p.node, p.state) for p in db.list_placements("a.test")] == [("n1", "active")]  # a cordon moves nothing
    assert ok(cli("node", "drain", "n1", "--no-wait")).startswith("n1: up -> draining: its apps leave")
    assert db.get_node("n1").admin_state == "draining"
    assert [(p.node, p.state) for p in db.list_placements("a.test")] == [("n1", "leaving")]
    assert node_events(db) == [("node", "node n1 cordoned by fcrun node cordon"),
                               ("node", "node n1 uncordoned by fcrun node uncordon"),
                               ("node", "node n1 draining by fcrun node drain")]
    [last] = db.list_events(limit=1)
    assert last.data == {"node": "n1", "admin_state": "draining", "previous": "up"}


def test_drain_waits_until_the_node_holds_no_placement_and_no_live_instance(backend, db, cli_env):
    beat(db, "n1")
    beat(db, "n2")
    db.add_app(App(name="a.test", image="apache-php"))
    db.add_placement("a.test", "n1")
    db.upsert_instance(instance("a.test", "n1"))
    db.upsert_instance(instance("a.test", "n2"))  # another node's: not waited for
    db.upsert_instance(instance("a.test", "n1", 1, state="stopped"))  # not live: not waited for
    with Waiting(backend, "node", "drain", "n1", "--timeout", "60s") as command:
        assert command.lines == ["n1: up -> draining: its apps leave for other nodes, each once another node "
                                 "has a ready instance",
                                 "node n1: waiting: holds 1 placement (a.test) and runs 1 live instance (a.test-n1-0)"]
        # n1's side of the drain, now that the command waits: it stops its instance, then lets go.
        assert [p.state for p in db.list_placements(node="n1")] == ["leaving"]
        db.remove_instance("a.test-n1-0")
        db.remove_placement("a.test", "n1")
    assert command.rest.endswith("n1: drained: no placement and no live instance left\n"), command.rest
    assert command.returncode == 0, command.rest


class Waiting:
    """`fcrun --cmdb URL ARGS` as a process, read until it says it is waiting (its lines in
    `lines`); the test then acts as the nodes would, and leaving the block reads the rest of its
    output (`rest`) and its exit status. The process is killed if it is still there."""

    def __init__(self, backend, *args: str):
        self.argv = [sys.executable, "-m", "fcrun_cli", "--cmdb", backend.url, *args]
        self.lines: list[str] = []
        self.rest = ""
        self.returncode: int | None = None

    def __enter__(self):
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if ": waiting: " in line:
                    return self
            raise AssertionError(f"{self.argv} ended without waiting: {self.lines}")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def __exit__(self, *exc):
        try:
            self.rest, _ = self.proc.communicate(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
        self.returncode = self.proc.returncode


def test_drain_that_runs_out_of_time_exits_1_naming_what_is_left_and_undoes_nothing(cli, db):
    beat(db, "n1")
    db.add_app(App(name="a.test", image="apache-php"))
    db.add_placement("a.test", "n1")
    db.upsert_instance(instance("a.test", "n1"))
    result = cli("node", "drain", "n1", "--timeout", "0.2s")
    assert result.exit_code == 1, result.output
    assert ("fcrun: node n1: still holds 1 placement (a.test) and runs 1 live instance (a.test-n1-0) after 0.2s; "
            "nothing was undone") in result.output
    assert db.get_node("n1").admin_state == "draining"


def test_drain_of_a_down_node_says_so_in_what_is_left(cli, backend, db):
    beat(db, "n1")
    db.upsert_instance(instance("a.test", "n1"))
    make_stale(backend, "n1")
    result = cli("node", "drain", "n1", "--timeout", "0")
    assert result.exit_code == 1
    assert "it is down (no heartbeat for" in result.output and "`fcrun node rm n1` forgets it" in result.output


@pytest.mark.parametrize("args", [("node", "cordon", "n9"), ("node", "uncordon", "n9"), ("node", "drain", "n9"),
                                  ("node", "rm", "n9"), ("app", "move", "a.test", "--node", "n9")])
def test_an_unknown_node_is_refused_and_nothing_is_written(cli, backend, db, args):
    beat(db, "n1")
    db.add_app(App(name="a.test", image="apache-php"))
    db.add_placement("a.test", "n1")
    before = backend.snapshot()
    result = cli(*args)
    assert result.exit_code == 3, result.output
    assert "fcrun: no node named 'n9' in the CMDB (fcrun node ls lists them)" in result.output
    assert backend.snapshot() == before


# -- rm ---------------------------------------------------------------------------------------------


def test_rm_refuses_a_live_node_and_forgets_a_down_one_with_its_rows(cli, backend, db):
    beat(db, "n1")
    beat(db, "n2")
    db.add_app(App(name="a.test", image="apache-php"))
    db.add_placement("a.test", "n1")
    db.upsert_instance(instance("a.test", "n1"))
    db.upsert_instance(instance("a.test", "n2"))
    result = cli("node", "rm", "n1")
    assert result.exit_code == 5, result.output
    assert "fcrun: node n1 is up (last heartbeat" in result.output
    assert "forgets only a node that is down" in result.output
    assert [n.name for n in db.list_nodes()] == ["n1", "n2"] and len(db.list_instances()) == 2

    make_stale(backend, "n1")
    assert ok(cli("node", "rm", "n1")) == "forgot node n1: 1 placement and 1 instance row removed\n"
    assert [n.name for n in db.list_nodes()] == ["n2"]
    assert db.list_placements("a.test") == [] and [i.owner for i in db.list_instances()] == ["n2"]
    assert node_events(db)[-1] == ("node", "node n1 forgotten by fcrun node rm (1 placement, 1 instance row removed)")


# -- app move, app show -----------------------------------------------------------------------------


def test_move_without_wait_makes_the_node_the_apps_active_placement_and_the_others_leave(cli, db):
    beat(db, "n1")
    beat(db, "n2")
    db.add_app(App(name="a.test", image="apache-php"))
    db.add_placement("a.test", "n1")
    db.upsert_instance(instance("a.test", "n1"))
    assert ok(cli("app", "move", "a.test", "--node", "n2", "--no-wait")) == "a.test: placed on n2; leaving n1\n"
    assert [(p.node, p.state) for p in db.list_placements("a.test")] == [("n1", "leaving"), ("n2", "active")]
    [event] = [e for e in db.list_events("a.test") if e.kind == "placement"]
    assert event.message == "a.test moved to n2 by fcrun app move (leaving n1)"
    assert event.data == {"node": "n2", "leaving": ["n1"], "reason": "fcrun app move"}


def test_move_of_an_app_that_runs_nowhere_places_it_and_does_not_wait(cli, db):
    # A node starts an instance for a placement only when the app runs elsewhere: waiting for
    # one would time out. With --timeout 0, a wait would exit 1.
    beat(db, "n2")
    db.add_app(App(name="a.test", image="apache-php"))
    db.upsert_instance(instance("a.test", "n1", state="stopped"))
    assert ok(cli("app", "move", "a.test", "--node", "n2", "--timeout", "0")) == (
        "a.test: placed on n2\na.test: runs nowhere now: nothing to wait for; its next request starts it on a "
        "node chosen by free resources\n")
    assert [(p.node, p.state) for p in db.list_placements("a.test")] == [("n2", "active")]


@pytest.mark.parametrize("state, refusal", [
    ("cordoned", "node n2 is cordoned: an app moves only to a node that is up (`fcrun node uncordon n2` first)"),
    ("draining", "node n2 is draining: an app moves only to a node that is up"),
    ("down", "node n2 is down: an app moves only to a node that is up (no heartbeat for"),
    ("front", "node n2 is a serve of role 'front': only a node"),
])
def test_move_refuses_a_node_that_is_not_up_naming_its_state_and_writes_nothing(cli, backend, db, state, refusal):
    beat(db, "n1")
    beat(db, "n2", role="front" if state == "front" else "node")
    if state == "down":
        make_stale(backend, "n2")
    elif state != "front":
        db.set_node_state("n2", state)
    db.add_app(App(name="a.test", image="apache-php"))
    db.add_placement("a.test", "n1")
    before = backend.snapshot()
    result = cli("app", "move", "a.test", "--node", "n2")
    assert result.exit_code == 5, result.output
    assert f"fcrun: {refusal}" in result.output
    assert backend.snapshot() == before


def test_move_of_an_unknown_app_is_refused(cli, db):
    beat(db, "n1")
    result = cli("app", "move", "nope.test", "--node", "n1")
    assert result.exit_code == 3 and "app 'nope.test' does not exist" in result.output
    assert db.list_placements() == []


def test_move_waits_for_a_ready_instance_on_the_node_and_nothing_left_elsewhere(backend, db, cli_env):
    beat(db, "n1")
    beat(db, "n2")
    db.add_app(App(name="a.test", image="apache-php"))
    db.add_placement("a.test", "n1")
    db.upsert_instance(instance("a.test", "n1"))
    with Waiting(backend, "app", "move", "a.test", "--node", "n2", "--timeout", "60s") as command:
        assert command.lines == ["a.test: placed on n2; leaving n1",
                                 "a.test: waiting: no ready instance on n2 (up); live instances on n1; "
                                 "placements on n1 (leaving)"]
        # The nodes' side: n2 starts an instance; once it is ready, n1 stops its own and lets go.
        db.upsert_instance(instance("a.test", "n2", state="starting"))
        db.upsert_instance(instance("a.test", "n2"))
        db.remove_instance("a.test-n1-0")
        db.remove_placement("a.test", "n1")
    assert command.rest.endswith("a.test: moved: a ready instance on n2, nothing left elsewhere\n"), command.rest
    assert command.returncode == 0, command.rest


def test_move_that_runs_out_of_time_exits_1_naming_what_is_left(cli, db):
    beat(db, "n1")
    beat(db, "n2")
    db.add_app(App(name="a.test", image="apache-php"))
    db.upsert_instance(instance("a.test", "n1"))
    db.upsert_instance(instance("a.test", "n2", state="starting"))
    result = cli("app", "move", "a.test", "--node", "n2", "--timeout", "0.2s")
    assert result.exit_code == 1, result.output
    assert "fcrun: a.test: still no ready instance on n2 (up); live instances on n1 after 0.2s" in result.output
    assert [(p.node, p.state) for p in db.list_placements("a.test")] == [("n2", "active")]  # not undone


def test_app_show_lists_each_instances_node_and_the_apps_placements(cli, db):
    beat(db, "n1")
    beat(db, "n2")
    db.add_app(App(name="a.test", image="apache-php"))
    db.add_placement("a.test", "n1")
    db.upsert_instance(instance("a.test", "n1"))
    db.upsert_instance(Instance(id="a.test-old", app="a.test", container="a.test-old", state="ready"))  # no owner
    ok(cli("app", "move", "a.test", "--node", "n2", "--no-wait"))
    output = ok(cli("app", "show", "a.test"))
    assert "placements:" in output and "n1 (leaving), n2 (active)" in output
    rows = table(output[output.index("INSTANCE"):])
    assert (rows["a.test-n1-0"]["NODE"], rows["a.test-old"]["NODE"]) == ("n1", "-")
    shown = json.loads(ok(cli("app", "show", "a.test", "--json")))
    assert [(p["node"], p["state"]) for p in shown["placements"]] == [("n1", "leaving"), ("n2", "active")]
    assert sorted(i["owner"] for i in shown["instances"]) == ["", "n1"]


def test_the_main_group_lists_node():
    output = CliRunner().invoke(main, ["--help"]).output
    assert re.search(r"^\s+node\s", output, re.M)


# -- the wait loop, on a fake clock ----------------------------------------------------------------


def test_wait_until_prints_what_is_left_when_it_changes_and_times_out_naming_it():
    now = [0.0]
    left = iter(["2 placements", "2 placements", "1 placement", "1 placement", "1 placement"])
    shown: list[str] = []
    with pytest.raises(WaitTimedOut, match="n1: still 1 placement after 1s"):
        wait_until(lambda: next(left), 1.0, "n1", clock=lambda: now[0],
                   sleep=lambda s: now.__setitem__(0, now[0] + 0.25), echo=shown.append)
    assert shown == ["n1: waiting: 2 placements", "n1: waiting: 1 placement"]

    left = iter(["1 placement", None])
    shown.clear()
    wait_until(lambda: next(left), 1.0, "n1", clock=lambda: now[0], sleep=lambda s: None, echo=shown.append)
    assert shown == ["n1: waiting: 1 placement"]

