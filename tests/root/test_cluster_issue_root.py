"""Issue 15's cluster scenario on one lab (tests/root/cluster.py): 3 nodes and 2 fronts
(`fcrun serve --role node|front`), each a network namespace on the test LAN, one PostgreSQL CMDB.

One test, in steps (each step's assertions say which step failed), because the later steps
kill hosts and so depend on what ran before; one lab keeps the module within its time:

  1. a cold start through front 0 lands on a node (one placement row, one instance row, both
     that node's) and is served; the same app through front 1 reaches the same node;
  2. an app crowded by concurrent requests scales out, and the new instance goes to another
     node (place_scale_out: the loaded node is the busier);
  3. the node of step 1's app is killed (kill -9 of its processes) and unplugged under steady
     GET load through both fronts: no GET fails (the fronts retry elsewhere, the app
     cold-starts on a live node), the app's placement and a ready instance are on a live node
     afterwards, and `fcrun node ls` shows the killed node down;
  4. front 0 is killed under load on front 1: front 1 answers every request;
  5. the lab's teardown checks that nothing is left behind (and lab_leftovers by name).

No timing is asserted: every wait is bounded only so that a broken build cannot hang the suite.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time

import pytest
from cluster import ClusterLab, Load, lab_leftovers
from polling import wait_until

from fcrun.cmdb import App
from fcrun.cmdb.postgres import PostgresCMDB

pytestmark = [pytest.mark.root, pytest.mark.slow]

COLD_APP = "cold.test"
BURST_APP = "burst.test"
# SERVER_ADDR is the instance's own address: it lies in the container subnet of the node running it.
SITE_PHP = "<?php echo 'served at ', $_SERVER['SERVER_ADDR'];"
# ~30 ms per request: a few concurrent clients keep more than one request in flight per instance.
SLOW_PHP = "<?php usleep(30000); echo 'served at ', $_SERVER['SERVER_ADDR'];"
# A small capacity so that one instance's quota (the app's default 1 CPU) is a visible share of
# a node: a node running one reads busier than an idle one by more than the scale-out margin.
NODE_CONFIG = "[forkserver]\npool_size = 0\n[cluster]\ncpu_capacity = 2.0\n"
# A GET whose node dies may wait for the front's upstream connect timeout (5 s) and then a cold
# start elsewhere before it is answered: the load's own timeout must be well above both.
LOAD_TIMEOUT_S = 20.0
CLI_TIMEOUT_S = 60
REFRESH_WAIT_S = 1.0  # > 3 x the fronts' CMDB re-read (front.REFRESH_S = 0.25 s)


def _node_of(body: str, nodes) -> str:
    """The name of the node whose container subnet holds the instance that answered."""
    found = re.match(r"served at (\S+)", body)
    assert found, f"not the site's answer: {body[:300]!r}"
    ip = ipaddress.ip_address(found.group(1))
    hosts = [h for h in nodes if ip in ipaddress.ip_network(h.subnet)]
    assert len(hosts) == 1, f"{ip} is in no node's container subnet: {body[:300]!r}"
    return hosts[0].name


def _live_owners(db: PostgresCMDB, app: str) -> set[str]:
    return {i.owner for i in db.list_instances(app) if i.state != "stopped"}


def test_three_nodes_two_fronts_cold_start_scale_out_node_and_front_failure(tmp_path, apache_php):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.php").write_text(SITE_PHP)
    (site / "slow.php").write_text(SLOW_PHP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCRUN_")}
    env.update(FCRUN_ROOT=str(tmp_path / "cli-data"), FCRUN_RUN=str(tmp_path / "cli-run"))

    with ClusterLab(apache_php, hosts=5) as lab:
        nodes, fronts = lab.hosts[:3], lab.hosts[3:]
        names = [h.name for h in nodes]
        with PostgresCMDB(lab.pg_url) as db:
            db.add_app(App(name=COLD_APP, image="apache-php", docroot=str(site)))
            db.add_app(App(name=BURST_APP, image="apache-php", docroot=str(site), max_instances=2,
                           target_concurrency=1, cooldown_up_s=0.0))
        for host in nodes:
            lab.start(host, NODE_CONFIG, docroot_root=str(tmp_path), role="node", node_name=host.name,
                      advertise=True)
        # After the nodes, whose first heartbeat is in the CMDB before they listen.
        for i, front in enumerate(fronts):
            lab.start(front, role="front", node_name=f"front{i}")
        f0, f1 = fronts

        def via(front, app: str, path: str = "/") -> str:
            status, _, body = lab.request(None, front.ip, front.server.port, app, path)
            assert status == 200, f"{app}{path} through {front.name}: {status} {body[:500]}"
            return _node_of(body, nodes)

        def fcrun(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "fcrun_cli", "--cmdb", lab.pg_url, *args], env=env,
                                  capture_output=True, text=True, timeout=CLI_TIMEOUT_S)

        # --- 1. cold start through a front, then the same app through the other front ---------
        home = via(f0, COLD_APP)
        with PostgresCMDB(lab.pg_url) as db:
            assert [(p.node, p.state) for p in db.list_placements(COLD_APP)] == [(home, "active")], \
                f"step 1: the cold start served on {home} is not placed there alone"
            assert [i.owner for i in db.list_instances(COLD_APP)] == [home], \
                f"step 1: the cold start served on {home} is not its only instance"
        # Front 1 learns the placement from the CMDB (re-read every 0.25 s); without it, it would
        # make a placement of its own and the CMDB's first-choice rule would send it back.
        time.sleep(REFRESH_WAIT_S)
        for _ in range(3):
            assert via(f1, COLD_APP) == home, "step 1: front 1 did not reach the node front 0 placed the app on"
        with PostgresCMDB(lab.pg_url) as db:
            assert [(p.node, p.state) for p in db.list_placements(COLD_APP)] == [(home, "active")], "step 1"
            assert [i.owner for i in db.list_instances(COLD_APP)] == [home], "step 1: a second instance started"

        # --- 2. scale-out to a second node under concurrent load through both fronts ------------
        burst_home = via(f0, BURST_APP, "/slow.php")
        # A node ranks itself, like the others, from its heartbeat as read back from the CMDB
        # (NodeAgent.follow, every 0.25 s; a beat every 1 s). Until a beat with this instance has
        # been read, it sees itself as idle as the others and a scale-out stays local (seen in
        # this test's first runs). The load starts once its own figures show the instance, so
        # what is checked is "a busier node sends its scale-out elsewhere".
        with PostgresCMDB(lab.pg_url) as db:
            running = sum(i.owner == burst_home for app in (COLD_APP, BURST_APP) for i in db.list_instances(app))
            wait_until(f"step 2: {burst_home}'s heartbeat counting its instance of {BURST_APP}",
                       lambda: any(n.name == burst_home and n.figures.get("instances", 0) >= running
                                   for n in db.list_nodes()), 10, 0.1, detail=db.list_nodes)
        time.sleep(REFRESH_WAIT_S)  # > the node's own re-read of the nodes (node.FOLLOW_S = 0.25 s)
        with Load([(f.ip, f.server.port) for f in fronts], BURST_APP, "/slow.php", clients=6,
                  timeout_s=LOAD_TIMEOUT_S) as load:
            with PostgresCMDB(lab.pg_url) as db:
                def spread() -> set[str]:
                    owners = _live_owners(db, BURST_APP)
                    return owners if len(owners) >= 2 else set()

                owners = wait_until(
                    f"step 2: instances of {BURST_APP} (first on {burst_home}) on two nodes under load", spread, 60,
                    0.2, detail=lambda: ([(e.kind, e.message) for e in db.list_events(BURST_APP, 50)],
                                         db.list_instances(BURST_APP), db.list_placements(BURST_APP)))
            load.wait_for(10)  # both serve
        assert load.failures() == [], "step 2: requests failed during the scale-out"
        assert burst_home in owners and owners <= set(names), owners
        [elsewhere] = owners - {burst_home}
        with PostgresCMDB(lab.pg_url) as db:
            events = [(e.kind, e.message) for e in db.list_events(BURST_APP, 500)]
        assert any(kind in ("placement", "scale-out") and elsewhere in message for kind, message in events), \
            f"step 2: no placement or scale-out event names {elsewhere}: {events}"

        # --- 3. kill -9 and unplug the node of the cold app under load through both fronts -------
        [victim] = [h for h in nodes if h.name == home]
        live = set(names) - {home}
        with Load([(f.ip, f.server.port) for f in fronts], COLD_APP, clients=4, timeout_s=LOAD_TIMEOUT_S) as load:
            load.wait_for(10)
            lab.kill_host(victim)
            lab.link_down(victim)
            with PostgresCMDB(lab.pg_url) as db:
                def elsewhere_ready() -> bool:
                    placed = {p.node for p in db.list_placements(COLD_APP) if p.state == "active"}
                    ready = {i.owner for i in db.list_instances(COLD_APP) if i.state == "ready"}
                    return bool(placed & ready & live)

                wait_until(f"step 3: {COLD_APP} placed and ready on a live node ({sorted(live)}) after {home} died",
                           elsewhere_ready, 30, 0.2,
                           detail=lambda: (db.list_placements(COLD_APP), db.list_instances(COLD_APP),
                                           load.outcomes[-3:]))
            load.wait_for(20)
        assert victim.server.proc.returncode == -9
        failed = load.failures()
        assert failed == [], f"step 3: {len(failed)} of {len(load.outcomes)} GETs failed when {home} died: {failed[:5]}"
        assert {_node_of(o.body, nodes) for o in load.outcomes[-10:]} <= live, "step 3: answers from the dead node"

        def shown_down() -> bool:
            listed = fcrun("node", "ls", "--json")
            assert listed.returncode == 0, listed.stderr
            return {n["name"]: n["state"] for n in json.loads(listed.stdout)}.get(home) == "down"

        wait_until(f"step 3: fcrun node ls showing {home} down", shown_down, 30, 0.5)
        # The rest keep serving both apps.
        assert via(f1, COLD_APP) in live and via(f0, BURST_APP, "/slow.php") in live, "step 3"

        # --- 4. a front killed: the other serves every request sent to it -----------------------
        assert via(f0, COLD_APP) in live  # front 0 serves up to its death
        with Load([(f1.ip, f1.server.port)], COLD_APP, clients=2, timeout_s=LOAD_TIMEOUT_S) as load:
            load.wait_for(10)
            lab.kill_host(f0)
            load.wait_for(20)
        assert f0.server.proc.returncode == -9
        assert load.failures() == [], f"step 4: front 1 failed requests after front 0 died: {load.failures()[:5]}"
        with pytest.raises(OSError):
            lab.request(None, f0.ip, f0.server.port, COLD_APP, timeout=5.0)
    # --- 5. the lab's exit checked the machine (hostcheck); and by name: --------------------------
    assert lab_leftovers(lab) == {"netns": [], "links": [], "cgroups": [], "pg": [], "dirs": []}
