#!/usr/bin/env python3
"""A front's memory with many apps (issue 15: <= 300 MiB with 100,000 apps), measured on a real
`fcrun serve --role front` rather than the model of bench/placement_sim.py.

A private PostgreSQL (tests/pgserver.py) gets N apps, each with one alias, and 1,000 nodes'
heartbeats; one front is started on it and its RSS read once it has loaded everything and run a
few refresh rounds. Prints one JSON object (apps, nodes, front_rss_mib, front_start_s,
cmdb_load_s, the status line of one request for the last app's alias).

    flock /tmp/fcrun-heavy.lock .venv/bin/python bench/front_memory.py [--apps N]

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


def fill(url: str, apps: int) -> float:
    """The CMDB's apps and nodes; returns the seconds it took."""
    started = time.monotonic()
    with PostgresCMDB(url) as db:
        db.import_dump(Dump(schema_version=LATEST_VERSION, apps=[
            App(name=f"site{i}.example", image="apache-php", hostnames=[f"www.site{i}.example"],
                docroot=f"/srv/sites/site{i}") for i in range(apps)]))
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
    apps = parser.parse_args().apps
    tmp = tempfile.mkdtemp(prefix="frontmem-")
    pg = PgServer(pg_bindir()).start()
    front = None
    try:
        url = pg.new_database()
        load_s = fill(url, apps)
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
        print(json.dumps({"apps": apps, "hostnames": 2 * apps, "nodes": NODES, "front_rss_mib": rss_mib(front.pid),
                          "front_start_s": round(start_s, 2), "cmdb_load_s": round(load_s, 1),
                          "request_status_line": status_line(port, f"www.site{apps - 1}.example")}))
    finally:
        if front is not None:
            front.terminate()
            front.wait(30)
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
