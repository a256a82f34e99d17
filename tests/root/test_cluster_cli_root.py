"""The operator's commands on a real cluster (issue 15): `fcrun app move` and `fcrun node drain`
run as a separate process from the root namespace, on the lab's PostgreSQL (tests/root/cluster.py),
while a steady load goes through a front; two nodes and the front are `fcrun serve --role ...`.
The commands' --wait must end only once the nodes have done the move, and no request may fail.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys

import pytest
from cluster import ClusterLab, Load, lab_leftovers

from fcrun.cmdb import App
from fcrun.cmdb.postgres import PostgresCMDB

pytestmark = [pytest.mark.root, pytest.mark.slow]

APP = "move.test"
SITE_PHP = "<?php echo 'served at ', $_SERVER['SERVER_ADDR'];"
CLI_TIMEOUT_S = 240  # the subprocess's own bound; the commands get --timeout 90s


def _node_of(body: str, nodes) -> str:
    """The name of the node whose container subnet holds the instance that answered."""
    found = re.match(r"served at (\S+)", body)
    assert found, f"not the site's answer: {body[:300]!r}"
    ip = ipaddress.ip_address(found.group(1))
    [host] = [h for h in nodes if ip in ipaddress.ip_network(h.subnet)]
    return host.name


def test_move_and_drain_from_the_cli_under_load_fail_no_request(tmp_path, apache_php):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.php").write_text(SITE_PHP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCRUN_")}
    env.update(FCRUN_ROOT=str(tmp_path / "cli-data"), FCRUN_RUN=str(tmp_path / "cli-run"))

    with ClusterLab(apache_php, hosts=3) as lab:
        nodes, front = lab.hosts[:2], lab.hosts[2]

        def fcrun(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "fcrun_cli", "--cmdb", lab.pg_url, *args], env=env,
                                  capture_output=True, text=True, timeout=CLI_TIMEOUT_S)

        def served_by() -> str:
            status, _, body = lab.request(None, front.ip, front.server.port, APP)
            assert status == 200, body
            return _node_of(body, nodes)

        with PostgresCMDB(lab.pg_url) as db:
            db.add_app(App(name=APP, image="apache-php", docroot=str(site)))
        for host in nodes:
            lab.start(host, "[forkserver]\npool_size = 0\n", docroot_root=str(tmp_path), role="node",
                      node_name=host.name, advertise=True)
        lab.start(front, role="front", node_name="front")

        listed = fcrun("node", "ls", "--json")
        assert listed.returncode == 0, listed.stderr
        assert {(n["name"], n["role"], n["state"]) for n in json.loads(listed.stdout)} == \
            {(nodes[0].name, "node", "up"), (nodes[1].name, "node", "up"), ("front", "front", "up")}

        home = served_by()  # the cold start placed it
        [other] = [h.name for h in nodes if h.name != home]

        # Move it to the other node under load: the command returns once it is done there.
        with Load([(front.ip, front.server.port)], APP) as load:
            load.wait_for(5)
            moved = fcrun("app", "move", APP, "--node", other, "--timeout", "90s")
            load.wait_for(5)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert moved.stdout.startswith(f"{APP}: placed on {other}; leaving {home}\n"), moved.stdout
        assert moved.stdout.endswith(f"{APP}: moved: a ready instance on {other}, nothing left elsewhere\n")
        assert load.failures() == []
        with PostgresCMDB(lab.pg_url) as db:
            assert [(p.node, p.state) for p in db.list_placements(APP)] == [(other, "active")]
            assert {i.owner for i in db.list_instances(APP) if i.state != "stopped"} == {other}
        assert served_by() == other

        # Drain that node under load: the app goes back to the first, and the command waits for it.
        with Load([(front.ip, front.server.port)], APP) as load:
            load.wait_for(5)
            drained = fcrun("node", "drain", other, "--timeout", "90s")
            load.wait_for(5)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert drained.stdout.endswith(f"{other}: drained: no placement and no live instance left\n")
        assert load.failures() == []
        assert served_by() == home
        shown = fcrun("app", "show", APP, "--json")
        assert shown.returncode == 0, shown.stderr
        assert {i["owner"] for i in json.loads(shown.stdout)["instances"] if i["state"] != "stopped"} == {home}
        listed = {n["name"]: n["state"] for n in json.loads(fcrun("node", "ls", "--json").stdout)}
        assert listed[other] == "draining" and listed[home] == "up"
        assert fcrun("node", "uncordon", other).returncode == 0
    assert lab_leftovers(lab) == {"netns": [], "links": [], "cgroups": [], "pg": [], "dirs": []}
