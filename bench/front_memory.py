#!/usr/bin/env python3
"""A front's memory with many apps (issue 15: <= 300 MiB with 100,000 apps), measured on a real
`fcrun serve --role front` rather than the model of bench/placement_sim.py.

A private PostgreSQL (tests/pgserver.py) gets N apps, each with one alias, 1,000 nodes'
heartbeats and --instances ready instance rows spread over the nodes (7,000: the busiest sample
of bench/placement_sim.py's day had 6,651 running); one front is started on it and its RSS read
once it has loaded everything and run a few refresh rounds, then its CPU use over --idle-s
seconds without a request: what re-reading the cluster every 0.25 s costs it. Prints one JSON
object (apps, nodes, instances, front_rss_mib, front_start_s, front_idle_cpu_percent,
cmdb_load_s, the status line of one request for the last app's alias).

    flock /tmp/fcrun-heavy.lock .venv/bin/python bench/front_memory.py [--apps N] [--instances N] [--idle-s S]

The nodes' addresses are 127.0.0.1 ports where nothing listens (loopback only). Their heartbeats
are old by the time the front reads them, so it takes them for down and routes nowhere: the
request is answered 503, and the figure is the memory of the front's caches, not of traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from pgserver import PgServer, pg_bindir  # noqa: E402

from fcrun.cmdb import App  # noqa: E402
from fcrun.cmdb.models import Instance  # noqa: E402
from fcrun.cmdb.migrations import LATEST_VERSION  # noqa: E402
from fcrun.cmdb.nodes import NodeBeat  # noqa: E402
from fcrun.cmdb.postgres import PostgresCMDB  # noqa: E402
from fcrun.cmdb.sql import Dump  # noqa: E402

NODES = 1000
SETTLE_S = 3.0  # a dozen of the front's CMDB re-reads (front.REFRESH_S = 0.25 s)
NODE_FIGURES = {"cpu_capacity": 8.0, "memory_capacity_bytes": 32 << 30, "cpu_reserved": 1.0,
                "memory_reserved_bytes": 4 << 30, "cpu_used": 0.5, "instances": 10,
                "pooled": {"apache-php": 2}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(url: str, apps: int, instances: int) -> float:
    """The CMDB's apps, instances and nodes; returns the seconds it took."""
    started = time.monotonic()
    now = time.time()
    with PostgresCMDB(url) as db:
        db.import_dump(Dump(schema_version=LATEST_VERSION, apps=[
            App(name=f"site{i}.example", image="apache-php", hostnames=[f"www.site{i}.example"],
                docroot=f"/srv/sites/site{i}") for i in range(apps)], instances=[
            Instance(id=f"site{i}-inst", app=f"site{i % apps}.example", container=f"site{i}-inst", state="ready",
                     ip="10.0.0.2", port=80, started_at=now, owner=f"n{i % NODES}") for i in range(instances)]))
        for n in range(NODES):
            db.node_beat(NodeBeat(name=f"n{n}", role="node", address=f"127.0.0.1:{20000 + n}",
                                  figures=NODE_FIGURES))
    return time.monotonic() - started


def wait_listening(proc: subprocess.Popen, port: int, log_path: str) -> None:
    while True:
        if proc.poll() is not None:
            with open(log_path) as f:
                raise SystemExit(f"the front exited {proc.returncode}:\n{f.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return round(kib / 1024, 1)


def status_line(port: int, host: str) -> str:
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return s.recv(300).split(b"\r\n")[0].decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=100_000)
    parser.add_argument("--instances", type=int, default=7_000)
    parser.add_argument("--idle-s", type=float, default=10.0)
    args = parser.parse_args()
    apps = args.apps
    tmp = tempfile.mkdtemp(prefix="frontmem-")
    pg = PgServer(pg_bindir()).start()
    front = None
    try:
        url = pg.new_database()
        load_s = fill(url, apps, args.instances)
        port = free_port()
        config = os.path.join(tmp, "front.toml")
        with open(config, "w") as f:
            f.write(f'listen = "127.0.0.1:{port}"\n[cmdb]\nurl = "{url}"\n')
        log_path = os.path.join(tmp, "front.log")
        with open(log_path, "wb") as log:
            started = time.monotonic()
            front = subprocess.Popen(
                [sys.executable, "-m", "fcrun_cli", "serve", "--role", "front", "--node-name", "f1"],
                env=dict(os.environ, FCRUN_CONFIG=config), stdout=log, stderr=subprocess.STDOUT)
        wait_listening(front, port, log_path)
        start_s = time.monotonic() - started
        time.sleep(SETTLE_S)
        rss = rss_mib(front.pid)
        cpu0, t0 = cpu_s(front.pid), time.monotonic()
        time.sleep(args.idle_s)
        idle_cpu = (cpu_s(front.pid) - cpu0) / (time.monotonic() - t0) * 100
        print(json.dumps({"apps": apps, "hostnames": 2 * apps, "nodes": NODES, "instances": args.instances,
                          "front_rss_mib": rss, "front_start_s": round(start_s, 2),
                          "front_idle_cpu_percent": round(idle_cpu, 1), "cmdb_load_s": round(load_s, 1),
                          "request_status_line": status_line(port, f"www.site{apps - 1}.example")}))
    finally:
        if front is not None:
            front.terminate()
            front.wait(30)
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
