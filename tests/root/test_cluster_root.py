"""A cluster on one machine (issue 15): hosts that are network namespaces on a test LAN bridge,
one PostgreSQL CMDB they all reach over TCP (tests/root/cluster.py).

The lab itself is checked first: hosts reach each other and PostgreSQL over the LAN, a host
unplugged is unreachable, kill_host kills what runs there, and afterwards the machine holds
nothing of it; the lab of a test process killed before its teardown is reaped by the next lab. Then two hosts each run today's `fcrun serve` (role all) on the shared CMDB: an
app added once is served on each host by an instance of that host's own, and a host killed
with kill -9 and unplugged leaves the other serving. And a front (serve --role front) places a
cold app on one of two nodes (serve --role node), which serves it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from cluster import ClusterLab, Load, in_netns, lab_leftovers
from polling import wait_until

from fcrun.cmdb import App
from fcrun.cmdb.postgres import PostgresCMDB

pytestmark = [pytest.mark.root, pytest.mark.slow]

APP = "cluster.test"
# SERVER_ADDR is the instance's own address: it lies in the container subnet of the host that runs it.
SITE_PHP = "<?php echo 'served at ', $_SERVER['SERVER_ADDR'], ' by ', gethostname();"
UNREACHABLE_TIMEOUT_S = 2.0  # how long a connection to an unplugged host is given before it counts as failed


def _served_at(body: str) -> ipaddress.IPv4Address:
    found = re.match(r"served at (\S+) by ", body)
    assert found, f"not the site's answer: {body[:300]!r}"
    return ipaddress.ip_address(found.group(1))


def _listener(ip: str) -> socket.socket:
    s = socket.socket()
    s.bind((ip, 0))
    s.listen()
    return s


def test_the_lab_connects_its_hosts_and_leaves_nothing_behind():
    import psycopg

    with ClusterLab(apache_php=None, hosts=2) as lab:
        a, b = lab.hosts
        # a -> b across the LAN bridge: b's listener (made inside b) sees a's address.
        listener = in_netns(b.netns_path, lambda: _listener(b.ip))
        with listener:
            port = listener.getsockname()[1]
            client = in_netns(a.netns_path, lambda: socket.create_connection((b.ip, port), timeout=10))
            with client:
                conn, peer = listener.accept()
                conn.close()
            assert peer[0] == a.ip
            # The root namespace reaches a host straight through the bridge.
            socket.create_connection((b.ip, port), timeout=10).close()
            listener.accept()[0].close()
            # Unplugged, b is unreachable from a; plugged back, reachable again.
            lab.link_down(b)
            with pytest.raises(OSError):
                in_netns(a.netns_path, lambda: socket.create_connection((b.ip, port), timeout=UNREACHABLE_TIMEOUT_S))
            lab.link_up(b)
        # Every host reaches the lab's PostgreSQL on the gateway address.
        for host in lab.hosts:
            def query():
                with psycopg.connect(lab.pg_url, connect_timeout=10) as db:
                    return db.execute("SELECT inet_client_addr()::text").fetchone()[0]
            assert in_netns(host.netns_path, query).split("/")[0] == host.ip
        # The gateway keeps its MAC while hosts' veths come and go (the hosts' ARP entries stay right).
        assert f"link/ether {lab.gateway_mac} " in subprocess.run(["ip", "link", "show", lab.bridge], capture_output=True,
                                                                  text=True, check=True).stdout
        # kill_host kills what runs in a host's namespace (and reaps it: no zombie).
        sleeper = lab.popen(b, ["sleep", "600"])
        assert sleeper.pid in lab.host_pids(b)
        assert sleeper.pid in lab.kill_host(b)
        assert sleeper.returncode == -9 and lab.host_pids(b) == set()
    assert lab_leftovers(lab) == {"netns": [], "links": [], "cgroups": [], "pg": [], "dirs": []}


# A test process that makes a lab with a process in its host, says where, and waits to be killed.
ORPHANING_LAB = """
import sys, time
sys.path[:0] = sys.argv[1:]
from cluster import ClusterLab
lab = ClusterLab(None, hosts=1).__enter__()
sleeper = lab.popen(lab.hosts[0], ["sleep", "600"])
print(lab.dir, lab.bridge, lab.hosts[0].netns, lab.pg.dir, sleeper.pid, flush=True)
time.sleep(600)
"""


def test_the_lab_of_a_killed_test_process_is_reaped_by_the_next_lab():
    here = os.path.dirname(os.path.abspath(__file__))
    orphaner = subprocess.Popen([sys.executable, "-c", ORPHANING_LAB, here, os.path.dirname(here)],
                                stdout=subprocess.PIPE, text=True)
    try:
        directory, bridge, netns, pg_dir, sleeper = orphaner.stdout.readline().split()
    finally:
        orphaner.send_signal(signal.SIGKILL)  # no teardown: its lab stays behind
        orphaner.wait()
        orphaner.stdout.close()
    assert os.path.exists(f"/run/netns/{netns}") and os.path.exists(f"/proc/{sleeper}")
    with ClusterLab(apache_php=None, hosts=1):
        pass
    assert not os.path.exists(f"/run/netns/{netns}")
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0
    assert not os.path.exists(directory) and not os.path.exists(pg_dir)
    # Its sleep was killed; init reaps it (it was not ours).
    wait_until(f"the orphaned lab's process {sleeper} to be gone", lambda: _dead(int(sleeper)))


def _dead(pid: int) -> bool:
    """Gone, or a zombie that its parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_two_hosts_on_one_postgresql_each_serve_with_their_own_instance_and_one_outlives_the_other(
        tmp_path, apache_php):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.php").write_text(SITE_PHP)
    with ClusterLab(apache_php, hosts=2) as lab:
        a, b = lab.hosts
        with PostgresCMDB(lab.pg_url) as db:  # once, for both: the CMDB is shared
            db.add_app(App(name=APP, image="apache-php", docroot=str(site), max_instances=2))
        for host in (a, b):
            lab.start(host, "[forkserver]\npool_size = 0\n", docroot_root=str(tmp_path))

        # From the root namespace to each host's LAN address: each cold-starts its own instance.
        for host in (a, b):
            status, _, body = lab.request(None, host.ip, host.server.port, APP)
            assert status == 200, body
            assert _served_at(body) in ipaddress.ip_network(host.subnet), (host, body)
        # Host to host across the LAN (a sends to b): b's instance answers.
        status, _, body = lab.request(a, b.ip, b.server.port, APP)
        assert status == 200 and _served_at(body) in ipaddress.ip_network(b.subnet), body
        with PostgresCMDB(lab.pg_url) as db:
            owners = sorted(row.owner for row in db.list_instances(APP))
        assert owners == sorted(f"{socket.gethostname()}:{h.server.run_root}" for h in (a, b))

        # b dies (every process, kill -9) and is unplugged while a is under load: a serves on,
        # every request answered by its own instance.
        with Load([(a.ip, a.server.port)], APP) as load:
            load.wait_for(5)
            lab.kill_host(b)
            lab.link_down(b)
            load.wait_for(5)
        assert b.server.proc.returncode == -9
        assert load.failures() == []
        assert {_served_at(o.body) in ipaddress.ip_network(a.subnet) for o in load.outcomes} == {True}
        with pytest.raises(OSError):
            lab.request(None, b.ip, b.server.port, APP, timeout=UNREACHABLE_TIMEOUT_S)
    # The lab's exit checked the machine (hostcheck) after removing b's leftovers; and by name:
    assert lab_leftovers(lab) == {"netns": [], "links": [], "cgroups": [], "pg": [], "dirs": []}


def test_a_cold_start_through_a_front_lands_on_a_node_and_is_served(tmp_path, apache_php):
    """Two nodes and a front (serve --role node|front): the front places the app on a node, forwards
    there, and that node's instance answers; the placement and the instance are the node's in the CMDB."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.php").write_text(SITE_PHP)
    with ClusterLab(apache_php, hosts=3) as lab:
        nodes, front = lab.hosts[:2], lab.hosts[2]
        with PostgresCMDB(lab.pg_url) as db:
            db.add_app(App(name=APP, image="apache-php", docroot=str(site)))
        for host in nodes:
            lab.start(host, "[forkserver]\npool_size = 0\n", docroot_root=str(tmp_path), role="node",
                      node_name=host.name, advertise=True)
        # Started after the nodes, whose first heartbeat is in the CMDB before they listen: the
        # front reads them before it listens.
        lab.start(front, role="front", node_name="front")
        status, _, body = lab.request(None, front.ip, front.server.port, APP)
        assert status == 200, body
        served_by = [h for h in nodes if _served_at(body) in ipaddress.ip_network(h.subnet)]
        assert len(served_by) == 1, body
        with PostgresCMDB(lab.pg_url) as db:
            assert [(p.app, p.node, p.state) for p in db.list_placements(APP)] == [(APP, served_by[0].name, "active")]
            assert [row.owner for row in db.list_instances(APP)] == [served_by[0].name]
        # Warm now: the next ones go the same way.
        for _ in range(3):
            status, _, body = lab.request(None, front.ip, front.server.port, APP)
            assert status == 200 and _served_at(body) in ipaddress.ip_network(served_by[0].subnet), body
    assert lab_leftovers(lab) == {"netns": [], "links": [], "cgroups": [], "pg": [], "dirs": []}
