#!/usr/bin/env python3
"""The cluster's request path against one host and against nginx, same run (issue 15, speed).

One private PostgreSQL (tests/pgserver.py, fsync on) holds two CMDBs (a schema each): one for a
single-host serve, one for a small cluster. Three `fcrun serve` run on this machine, each its
own process, on loopback:

  * `all`:   today's single-host serve on PostgreSQL (a shared-CMDB serve);
  * `node`:  `--role node`, the same pool settings; heartbeats, advertises its 127.0.0.1 port;
  * `front`: `--role front`, proxy only; reaches the node over TCP (loopback here: "remote"
             means another process reached through its advertised address, not another machine).

1. Cold start from the pool, GET / (phpinfo) on a new connection to the last byte; the served
   path (X-Fcrun-Cold-Start-Path) must say "pool" on every run. Three contenders, one run each
   per round, the order rotating each round, never overlapping:

   (a) `all`: the app's instance was scaled to 0 before; its pool is full again.
   (b) through the front, as a cold app arrives in a cluster: its instance idled out and the
       node forgot its placement (GRACE_S after its last instance went), so the front places it
       (placement.place on the nodes' figures + CMDB.place_app, one transaction on the path),
       then forwards to the node, whose own proxy claims from its pool as (a) does.
   (b') through the front to an app still placed on the node (the placement row re-added after
       the node forgot it, and seen by the front): the extra hop alone, no placement write.

   b-a is what the cluster adds to a cold start (goal: p50 <= +1 ms); b'-a the hop, b-b' the
   placement write. Every serve's own X-Fcrun-Cold-Start figure is kept too.

2. Warm throughput of one ready instance on the node (freezing off, no autoscaling, max 1, 128
   Apache workers forked at start: enough for both proxies' keep-alive connections), wrk
   keep-alive through (f) front -> node -> instance and (n) nginx -> nginx -> the same
   instance's IP:port (from its CMDB row), rounds alternating; each nginx has one worker and
   upstream keep-alive (bench/proxy_overhead.py's configuration). requests/s, p50/p99 (wrk
   --latency), the CPU per request of the two proxies, and f/n (goal >= 0.9).

--node-netns puts the node (and nginx's node) in a network namespace of its own, reached from
the front over a veth (10.243.0.0/30) instead of loopback; results/cluster-netns.json.

Needs root, PostgreSQL, psycopg, wrk, nginx and the apache-php image. Private roots, cgroup
parents, bridges (10.242.0.0/24, 10.242.1.0/24), high ports on 127.0.0.1; everything it starts
it stops and removes, also on failure, and it checks that the host is as before.
Usage: bench/cluster.py [--runs 30] [--warmup 2] [--rounds 3] [--duration 8] [--node-netns] [--json] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench/'s helpers, also under `fcrun bench`
sys.path.insert(1, os.path.join(HERE, "..", "tests"))
sys.path.insert(2, os.path.join(HERE, "..", "tests", "root"))

from benchlib import preflight, summary, work_dir_with_site  # noqa: E402
from pgserver import PgServer, pg_bindir  # noqa: E402
from proxy_overhead import parse_wrk, start_nginx, stop  # noqa: E402

from fcrun.cluster.front import REFRESH_S  # noqa: E402
from fcrun.cluster.node import GRACE_S  # noqa: E402
from fcrun.cmdb.models import Scale  # noqa: E402
from fcrun.cmdb.postgres import PostgresCMDB  # noqa: E402
from fcrun.serve.testing import ServeProcess, free_port  # noqa: E402

CPU, MEMORY = "1", "512M"
NODE = "bench-node"
FRONT = "bench-front"
SINGLE_APP, PLACED_APP, UNPLACED_APP, WARM_APP = "pool.test", "placed.test", "cold.test", "warm.test"
FRONT_SEES_S = 3 * REFRESH_S  # a change in the CMDB is in the front's caches after this
HELLO_PHP = "<?php echo 'hello from ', gethostname(), \"\\n\";\n"

# The two nginx of the two-hop shape: front -> node, node -> the instance. One worker each,
# upstream keep-alive, Host passed on (the node's nginx stands where fcrun's node proxy does).
HOP_HTTP = """\
    upstream next_hop {{
        server {upstream};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen {listen}:{port} backlog=4096;
        location / {{
            proxy_pass http://next_hop;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
"""


def wait_listening(ip: str, port: int, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args))} exited with {proc.returncode}")
        try:
            socket.create_connection((ip, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {ip}:{port} after {timeout_s:g} s") from None
            time.sleep(0.05)


class NodeNetns:
    """A network namespace for the node, joined to the root one by a veth (a /30 of its own),
    so that front -> node crosses a veth as it would cross a NIC. PostgreSQL stays on its unix
    socket (a path: reachable from any network namespace).

    Resource handling: `remove()` deletes the veth and the namespace (and with it whatever the
    node's serve left in there: its container bridge, its containers' veths); it tolerates a
    half-made state, so call it after a failed `create()` too.
    """

    def __init__(self, tag: str):
        self.name = f"fcrun-clusterbench-{tag}"
        self.path = f"/run/netns/{self.name}"
        self.veth = f"fcv{tag}"[:15]
        self.root_ip, self.ip = "10.243.0.1", "10.243.0.2"
        # `nsenter --net`, not `ip netns exec`: that also remounts /sys privately, hiding
        # /sys/fs/cgroup from serve (tests/root/cluster.py found it). nsenter execs the program,
        # so the pid we hold is serve's (or nginx's) own.
        self.launcher = ["nsenter", f"--net={self.path}", "--"]

    def create(self) -> None:
        ip = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True, text=True)  # noqa: E731
        ip("netns", "add", self.name)
        ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        ip("addr", "add", f"{self.root_ip}/30", "dev", self.veth)
        ip("link", "set", self.veth, "up")
        ip("-n", self.name, "addr", "add", f"{self.ip}/30", "dev", "eth0")
        ip("-n", self.name, "link", "set", "eth0", "up")
        ip("-n", self.name, "link", "set", "lo", "up")

    def remove(self) -> None:
        for args in (("link", "del", self.veth), ("netns", "del", self.name)):
            subprocess.run(["ip", *args], capture_output=True)  # absent already: fine


class Serve(ServeProcess):
    """ServeProcess listening on `ip` (a node's namespace address) and started through `launcher`."""

    def __init__(self, *args, ip: str = "127.0.0.1", launcher: list[str] = (), **options):
        super().__init__(*args, **options)
        self.ip, self.launcher = ip, list(launcher)
        with open(self.config) as f:
            config = f.read()
        with open(self.config, "w") as f:
            f.write(config.replace(f'listen = "127.0.0.1:{self.port}"', f'listen = "{ip}:{self.port}"', 1))

    def start(self, timeout_s: float = 60) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.launcher, sys.executable, "-m", "fcrun_cli", "serve"], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        try:
            wait_listening(self.ip, self.port, self.proc, timeout_s)
            wait_until(lambda: os.path.exists(self.admin_socket), "serve's admin socket", timeout_s)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.log_tail()}") from None


def wait_until(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench/cluster.py: {what}: not within {timeout_s:g} s")
        time.sleep(0.02)


def get(port: int, host: str, path: str = "/", timeout: float = 60) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


class Front:
    """`fcrun serve --role front` on a free 127.0.0.1 port, its config and state in `work`.

    Resource handling: `stop()` (SIGTERM, then SIGKILL after 30 s) ends the process it started.
    """

    def __init__(self, work: str, cmdb_url: str, env: dict):
        self.port = free_port()
        os.makedirs(work)
        config = os.path.join(work, "front.toml")
        with open(config, "w") as f:
            f.write(f'listen = "127.0.0.1:{self.port}"\n[cmdb]\nurl = "{cmdb_url}"\n'
                    f'[cluster]\nrole = "front"\nnode_name = "{FRONT}"\n')
        # Its own roots: a front makes no containers, but must not share a node's run root.
        self.env = dict(env, FCRUN_CONFIG=config, FCRUN_ROOT=os.path.join(work, "data"),
                        FCRUN_RUN=os.path.join(work, "run"))
        self.log_path = os.path.join(work, "front.log")
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fcrun_cli", "serve"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_listening("127.0.0.1", self.port, self.proc)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode


def add_app(serve: ServeProcess, name: str, site: str, *extra: str) -> None:
    serve.cli("app", "add", name, "--image", "apache-php", "--cpu", CPU, "--memory", MEMORY, "--docroot", site,
              "--idle-timeout", "600s", *extra)


class ColdStarts:
    """The three cold-start contenders and their preparation (see the module docstring)."""

    def __init__(self, single: ServeProcess, node: ServeProcess, front: Front, db: PostgresCMDB):
        self.single, self.node, self.front, self.db = single, node, front, db
        self.admins = {"single": single.admin(), "node": node.admin()}
        self.times: dict[str, list[float]] = {"a": [], "b": [], "b_placed": []}
        self.serve_ms: dict[str, list[float]] = {"a": [], "b": [], "b_placed": []}
        self.emptied: dict[str, float] = {}  # app -> when its last instance was seen gone (monotonic)

    def _placed(self, app: str) -> bool:
        return any(p.node == NODE for p in self.db.list_placements(app))

    def _forgotten(self, app: str) -> None:
        """Wait until the node forgot the app's placement (as after an idle-out), then until
        the front has read that."""
        if app in self.emptied:
            wait_until(lambda: not self._placed(app), f"the node forgets the placement of {app}",
                       timeout_s=GRACE_S + 30)
        elif self._placed(app):
            raise RuntimeError(f"{app} is placed before its first run: {self.db.list_placements(app)}")
        time.sleep(FRONT_SEES_S)

    def prepare(self, which: str) -> None:
        if which == "a":
            self.single.wait_pool_ready()
            return
        app = UNPLACED_APP if which == "b" else PLACED_APP
        self.node.wait_pool_ready()
        self._forgotten(app)
        if which == "b_placed":
            # Re-added after the node forgot it: the node's idle clock for the app starts
            # anew, so the row lasts GRACE_S, far longer than the wait and the run.
            self.db.add_placement(app, NODE)
            time.sleep(FRONT_SEES_S)

    def run(self, which: str, record: bool) -> None:
        self.prepare(which)
        if which == "a":
            port, app, admin = self.single.port, SINGLE_APP, self.admins["single"]
        else:
            port, admin = self.front.port, self.admins["node"]
            app = UNPLACED_APP if which == "b" else PLACED_APP
        t0 = time.perf_counter()
        status, headers, body = get(port, app)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        if status != 200 or b"phpinfo()" not in body:
            raise RuntimeError(f"{which}: GET / for {app} gave {status}: {body[:300]!r}")
        if headers.get("X-Fcrun-Cold-Start-Path") != "pool":
            raise RuntimeError(f"{which}: {app} was not served from the pool: {headers}")
        if record:
            self.times[which].append(elapsed_ms)
            self.serve_ms[which].append(float(headers["X-Fcrun-Cold-Start"]))
        admin.scale(app, Scale(instances=0))
        wait_until(lambda: admin.stats(app)[app].instances.total == 0, f"{app} scaled to 0")
        self.emptied[app] = time.monotonic()


def time_place_app(db: PostgresCMDB, runs: int) -> list[float]:
    """CMDB.place_app alone (the front's placement transaction), from this process's own
    connection idle 50 ms before each call, as the front's is between refreshes; each placement
    is removed again (untimed) before the node could act on it."""
    times = []
    for _ in range(runs):
        time.sleep(0.05)
        t0 = time.perf_counter()
        active = db.place_app(UNPLACED_APP, NODE)
        times.append((time.perf_counter() - t0) * 1000)
        db.remove_placement(UNPLACED_APP, NODE)
        if active != [NODE]:
            raise RuntimeError(f"place_app({UNPLACED_APP}, {NODE}) gave {active}")
    return times


def cpu_seconds(pids: list[int], with_children: bool) -> float:
    """User + system CPU seconds of the processes (and their direct children: nginx's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        family = [pid]
        if with_children:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{pid}/children") as f:
                family += [int(c) for c in f.read().split()]
        for p in family:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def wrk(port: int, args: argparse.Namespace, duration_s: int, hops: dict[str, int], with_children: bool) -> dict:
    """One wrk run; `hops` names the proxy processes (front, node) whose CPU is counted."""
    before = {hop: cpu_seconds([pid], with_children) for hop, pid in hops.items()}
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration_s}s", "--latency",
           "-H", f"Host: {WARM_APP}", f"http://127.0.0.1:{port}{args.path}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=duration_s + 60).stdout
    result = parse_wrk(out)
    for hop, pid in hops.items():
        result[f"{hop}_cpu_us_per_request"] = ((cpu_seconds([pid], with_children) - before[hop])
                                               / max(1, result["requests"]) * 1e6)
    result["proxies_cpu_us_per_request"] = sum(result[f"{hop}_cpu_us_per_request"] for hop in hops)
    if result["non_2xx"] or result["socket_errors"] or not result["requests"]:
        raise RuntimeError(f"{' '.join(cmd)}: {result['non_2xx']} non-2xx responses, socket errors "
                           f"{result['socket_errors']}")
    return result


def warm_throughput(args, work: str, node: Serve, front: Front, db: PostgresCMDB) -> dict:
    status, _, body = get(front.port, WARM_APP, args.path)
    if status != 200:
        raise RuntimeError(f"the warm app's first request through the front gave {status}: {body[:300]!r}")
    ready = [i for i in db.list_instances(WARM_APP) if i.state == "ready" and i.owner == NODE]
    if len(ready) != 1:
        raise RuntimeError(f"{WARM_APP} should have one ready instance on {NODE}: {db.list_instances(WARM_APP)}")
    instance = f"{ready[0].ip}:{ready[0].port}"
    tmp = os.path.join(work, "nginx")
    os.makedirs(os.path.join(tmp, "logs"))
    os.chmod(tmp, 0o755)  # nginx workers run as an unprivileged user when started by root
    ports = {"node": free_port(), "front": free_port()}
    listen = {"node": node.ip, "front": "127.0.0.1"}  # nginx's node stands beside fcrun's
    procs: list[subprocess.Popen] = []
    results: dict[str, list[dict]] = {"fcrun": [], "nginx": []}
    try:
        for name, upstream in (("node", instance), ("front", f"{node.ip}:{ports['node']}")):
            proc = start_nginx(tmp, name, HOP_HTTP.format(upstream=upstream, listen=listen[name], port=ports[name]),
                               node.launcher if name == "node" else [])
            procs.append(proc)
            wait_listening(listen[name], ports[name], proc)
        status, _, body = get(ports["front"], WARM_APP, args.path)
        if status != 200:
            raise RuntimeError(f"nginx -> nginx -> {instance} gave {status}: {body[:300]!r}")
        contenders = {"fcrun": (front.port, {"front": front.proc.pid, "node": node.proc.pid}, False),
                      "nginx": (ports["front"], {"front": procs[1].pid, "node": procs[0].pid}, True)}
        for i in range(args.rounds):
            order = ["fcrun", "nginx"] if i % 2 == 0 else ["nginx", "fcrun"]
            for name in order:
                port, hops, children = contenders[name]
                wrk(port, args, 1, hops, children)  # warm-up: connections, workers, caches
                results[name].append(wrk(port, args, args.duration, hops, children))
    finally:
        for proc in reversed(procs):
            stop(proc)
    summary_ = {name: summarize_wrk(runs) for name, runs in results.items()}
    ratio = round(summary_["fcrun"]["rps"] / summary_["nginx"]["rps"], 3)
    return {"path": args.path, "instance": instance,
            "wrk": {"threads": args.threads, "connections": args.connections, "duration_s": args.duration,
                    "rounds": args.rounds},
            "fcrun_front_node": summary_["fcrun"], "nginx_front_node": summary_["nginx"],
            "throughput_fcrun_over_nginx": ratio,
            "proxies_cpu_fcrun_over_nginx": round(summary_["fcrun"]["proxies_cpu_us_per_request"]
                                                  / summary_["nginx"]["proxies_cpu_us_per_request"], 3),
            "goal_ratio": 0.9, "goal_met": ratio >= 0.9}


def summarize_wrk(runs: list[dict]) -> dict:
    return {"rps": round(statistics.median(r["rps"] for r in runs)),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
            **{f"{k}_cpu_us_per_request": round(statistics.median(r[f"{k}_cpu_us_per_request"] for r in runs), 1)
               for k in ("proxies", "front", "node")},
            "runs_rps": [round(r["rps"]) for r in runs], "requests": sum(r["requests"] for r in runs)}


def host_state(marks: list[str]) -> dict:
    """What this run could leave on the host: mounts, links (bridges, veths) and cgroups whose
    line or name holds one of `marks`, and all network namespaces (as tests/root/hostcheck.py
    looks at them)."""
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f if any(m in line for m in marks))
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.splitlines()
    cgroups = []
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):  # relative parents lie beneath our own cgroup
        if any(m in os.path.basename(dirpath) for m in marks):
            cgroups.append(dirpath)
            dirnames[:] = []
        elif dirpath.count("/") > 7:
            dirnames[:] = []
    return {"mounts": mounts, "links": sorted(line.split(":")[1].strip() for line in links
                                              if any(m in line.split(":")[1] for m in marks)),
            "cgroups": sorted(cgroups), "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="timed cold starts per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--rounds", type=int, default=3, help="wrk rounds per warm contender")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--path", default="/hello.php", help="what wrk asks the warm app for")
    parser.add_argument("--image-root", default=os.environ.get("FCRUN_ROOT", "/var/lib/fcrun"),
                        help="data root holding the apache-php image")
    parser.add_argument("--node-netns", action="store_true",
                        help="the node (and nginx's node) in a network namespace of its own, reached over a veth")
    parser.add_argument("--out", default=None,
                        help="where the JSON is written too (default: bench/results/cluster.json, with "
                             "--node-netns cluster-netns.json; '-': nowhere)")
    parser.add_argument("--json", action="store_true", help="print the JSON on one line")
    args = parser.parse_args(argv)
    if code := preflight("bench/cluster.py", ("wrk", "nginx")):
        return code
    bindir = pg_bindir()
    if bindir is None:
        print("bench/cluster.py: PostgreSQL is not installed (apt-get install postgresql)", file=sys.stderr)
        return 1
    tag = str(os.getpid())
    names = [f"fcrun-clusterbench-{tag}", f"fck{tag}"[:13]]  # cgroup parents, bridges (+ 0, 1)
    netns = NodeNetns(tag) if args.node_netns else None
    work, site = work_dir_with_site("fcrun-cluster-bench-", "<?php phpinfo();\n")
    marks = [*names, work] + ([netns.name, netns.veth] if netns else [])
    before = host_state(marks)
    with open(os.path.join(site, "hello.php"), "w") as f:
        f.write(HELLO_PHP)
    t_begin = time.monotonic()
    pg = PgServer(bindir, fsync=True).start()
    serves: dict[str, Serve] = {}
    front: Front | None = None
    left: dict[str, list[str]] = {}
    out: dict = {}
    try:
        if netns is not None:
            netns.create()
        cmdbs = {"single": pg.new_database(), "node": pg.new_database()}
        roles = {"single": "", "node": f'[cluster]\nrole = "node"\nnode_name = "{NODE}"\n'}
        for i, name in enumerate(("single", "node")):
            root = os.path.join(work, name)
            os.makedirs(root)
            where = {"ip": netns.ip, "launcher": netns.launcher} if netns is not None and name == "node" else {}
            serves[name] = Serve(
                root, args.image_root, cgroup_parent=f"{names[0]}-{name}", bridge=f"{names[1]}{i}", **where,
                subnet=f"10.242.{i}.0/24", docroot_roots=(work,),
                extra_config=f'[forkserver]\npool_size = 1\n[cmdb]\nurl = "{cmdbs[name]}"\n{roles[name]}')
        add_app(serves["single"], SINGLE_APP, site)
        for app in (PLACED_APP, UNPLACED_APP):
            add_app(serves["node"], app, site)
        # 128 Apache workers forked at start (as `fcrun bench paper` does): each proxy keeps up to
        # --connections keep-alive connections to the instance, and a prefork worker stays with
        # its connection until KeepAliveTimeout (5 s); with the image's 8, the contender that
        # runs second waits for workers to be forked (seconds) while the other's idle
        # connections hold them.
        add_app(serves["node"], WARM_APP, site, "--max", "1", "--no-autoscale", "--freeze-after", "off",
                "--env", "APACHE_START_SERVERS=128")
        for serve in serves.values():
            serve.start()
        front = Front(os.path.join(work, "front"), cmdbs["node"], serves["node"].env)
        front.start()
        with PostgresCMDB(cmdbs["node"]) as db:
            wait_until(lambda: any(n.name == NODE and n.state() == "up" for n in db.list_nodes()),
                       f"{NODE}'s heartbeat in the CMDB")
            cold = ColdStarts(serves["single"], serves["node"], front, db)
            order = ["a", "b", "b_placed"]
            for i in range(args.warmup + args.runs):
                k = i % len(order)
                for which in order[k:] + order[:k]:
                    cold.run(which, i >= args.warmup)
            place_ms = time_place_app(db, args.runs)
            warm = warm_throughput(args, work, serves["node"], front, db)
            placement_events = [e for e in db.list_events(limit=10_000) if e.kind == "placement"]
        out = report(args, cold, warm, placement_events, place_ms)
    finally:
        if front is not None:
            front.stop()
        for name, serve in serves.items():
            with contextlib.suppress(Exception):
                serve.stop()
            left[name] = serve.reap_leftovers()
        if netns is not None:
            netns.remove()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    after = host_state(marks)
    deadline = time.monotonic() + 15  # veths of dead containers go in the kernel's own time
    while after != before and time.monotonic() < deadline:
        time.sleep(0.2)
        after = host_state(marks)
    out.update({
        "left_after_stop": left,
        "exit_ok": {**{name: serve.exit_codes == [0] for name, serve in serves.items()},
                    "front": front is not None and front.exit_code == 0},
        "host_as_before": after == before,
        "host_after": after,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "wall_s": round(time.monotonic() - t_begin, 1),
    })
    text = json.dumps(out, indent=None if args.json else 2)
    print(text)
    if args.out is None:
        args.out = os.path.join(HERE, "results", "cluster-netns.json" if args.node_netns else "cluster.json")
    if args.out != "-":
        with open(args.out, "w") as f:
            f.write(json.dumps(out, indent=2) + "\n")
    return 0 if after == before and not any(left.values()) else 1


def report(args, cold: ColdStarts, warm: dict, placement_events: list, place_ms: list[float]) -> dict:
    s = {k: summary(v) for k, v in cold.times.items()}
    h = {k: summary(v) for k, v in cold.serve_ms.items()}
    added_p50 = round(s["b"]["median_ms"] - s["a"]["median_ms"], 2)
    front_placements = [e for e in placement_events if f"(front {FRONT})" in e.message]
    return {
        "benchmark": "fcrun bench cluster: cold start through a front to a node's pool vs a single-host pool, and "
                     "warm throughput front -> node -> instance vs nginx -> nginx -> instance",
        "machine": f"one machine, {os.cpu_count()} CPUs: PostgreSQL, both serves, the front, nginx and the "
                   "client share them; " + (
                       "the node (and nginx's node) runs in a network namespace of its own, reached from the front "
                       "over a veth at its advertised address (10.243.0.2); PostgreSQL on its unix socket"
                       if args.node_netns else
                       "the node is another process reached over TCP on 127.0.0.1 (its advertised address), not "
                       "another host or network namespace"),
        "node_netns": args.node_netns,
        "cold_start": {
            "runs": args.runs, "warmup": args.warmup,
            "a_single_host_pool": s["a"],
            "b_front_place_and_node_pool": s["b"],
            "b_placed_front_hop_and_node_pool": s["b_placed"],
            "serve_header_ms": {"a_single_host": h["a"], "b_node": h["b"], "b_placed_node": h["b_placed"]},
            "added_p50_ms_b_minus_a": added_p50,
            "added_p99_ms_b_minus_a": round(s["b"]["p99_ms"] - s["a"]["p99_ms"], 2),
            "hop_p50_ms_b_placed_minus_a": round(s["b_placed"]["median_ms"] - s["a"]["median_ms"], 2),
            "placement_p50_ms_b_minus_b_placed": round(s["b"]["median_ms"] - s["b_placed"]["median_ms"], 2),
            "cmdb_place_app_alone": summary(place_ms),
            "goal_added_p50_ms": 1.0, "goal_met": added_p50 <= 1.0,
            "front_placement_events": len(front_placements),
            "front_placement_events_expected": args.warmup + args.runs + 1,
        },
        "warm": warm,
        "notes": [
            "a: role all on PostgreSQL (its own schema); b, b_placed: role node + role front on another schema of "
            "the same server; pool_size 1 on both serves, apache-php, cpu 1, 512M; GET / (phpinfo) on a new "
            "connection to the last byte; X-Fcrun-Cold-Start-Path 'pool' checked on every run",
            "b: the app's placement was forgotten by the node (as after an idle-out) and the front saw it: the front "
            "places it (placement.place + CMDB.place_app, one transaction) then forwards to the node",
            "b_placed: the app's placement row present and seen by the front: the extra hop only",
            "serve_header_ms: the serving serve's own X-Fcrun-Cold-Start: from its router's acquire until it has an instance (the share claimed in the CMDB, the claim from the pool, the instance ready), before the request is sent to it",
            "warm: f/n is fcrun front+node over nginx front+node, both to the same instance; proxies' CPU is the "
            "front and node serve processes (not the fork-server or instances) vs both nginx masters and workers",
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
