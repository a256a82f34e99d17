"""A front's memory with many apps (issue 15: <= 300 MiB with 100,000 apps): a private PostgreSQL
holding N apps (each with an alias) and 1,000 nodes' heartbeats, one `fcrun serve --role front`
started on it, its RSS once it has read everything. Prints one line of JSON.

    flock /tmp/fcrun-heavy.lock .venv/bin/python bench/front_memory.py [N]

The nodes' addresses are 127.0.0.1 ports where nothing listens (loopback only); their
heartbeats are old by the time the front reads them, so it takes them for down and routes
nowhere: the figure is the memory of the caches, not of traffic.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests")]
from pgserver import PgServer, pg_bindir
from fcrun.cmdb import App
from fcrun.cmdb.postgres import PostgresCMDB
from fcrun.cmdb.sql import Dump
from fcrun.cmdb.migrations import LATEST_VERSION
from fcrun.cmdb.nodes import NodeBeat
N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
tmp = tempfile.mkdtemp(prefix="frontmem-")
pg = PgServer(pg_bindir()).start()
front = None
try:
    url = pg.new_database()
    t = time.monotonic()
    with PostgresCMDB(url) as db:
        apps = [App(name=f"site{i}.example", image="apache-php", hostnames=[f"www.site{i}.example"],
                    docroot=f"/srv/sites/site{i}") for i in range(N)]
        db.import_dump(Dump(schema_version=LATEST_VERSION, apps=apps))
        for n in range(1000):
            db.node_beat(NodeBeat(name=f"n{n}", role="node", address=f"127.0.0.1:{20000 + n}", figures={
                "cpu_capacity": 8.0, "memory_capacity_bytes": 32 << 30, "cpu_reserved": 1.0,
                "memory_reserved_bytes": 4 << 30, "cpu_used": 0.5, "instances": 10, "pooled": {"apache-php": 2}}))
    load_s = time.monotonic() - t
    cfg = os.path.join(tmp, "front.toml")
    open(cfg, "w").write(f'listen = "127.0.0.1:18499"\n[cmdb]\nurl = "{url}"\n')
    log = open(os.path.join(tmp, "front.log"), "wb")
    t = time.monotonic()
    front = subprocess.Popen([sys.executable, "-m", "fcrun_cli", "serve", "--role", "front", "--node-name", "f1"],
                             env=dict(os.environ, FCRUN_CONFIG=cfg), stdout=log, stderr=subprocess.STDOUT)
    while True:
        assert front.poll() is None, open(log.name).read()
        try:
            socket.create_connection(("127.0.0.1", 18499), 0.5).close(); break
        except OSError:
            time.sleep(0.05)
    start_s = time.monotonic() - t
    time.sleep(3)  # a few refresh rounds
    rss = [l for l in open(f"/proc/{front.pid}/status") if l.startswith("VmRSS")][0].split()[1]
    s = socket.create_connection(("127.0.0.1", 18499), 5)
    s.sendall(f"GET / HTTP/1.1\r\nHost: www.site{N-1}.example\r\nConnection: close\r\n\r\n".encode())
    head = s.recv(300).split(b"\r\n")[0]  # 503: every node is down for it (see above), the host known
    s.close()
    print(json.dumps({"apps": N, "nodes": 1000, "front_rss_mib": round(int(rss) / 1024, 1),
                      "front_start_s": round(start_s, 2), "first_request_status_line": head.decode(),
                      "cmdb_load_s": round(load_s, 1)}))
finally:
    if front:
        front.terminate()
        front.wait(30)
    pg.stop()
    subprocess.run(["rm", "-rf", tmp], check=False)
