"""A cluster on one machine for root tests (issue 15): hosts that are network namespaces on a test LAN.

The LAN is one Linux bridge in the root network namespace with the gateway address
10.231.X.1/24 (X picked free per lab). Each host is a named network namespace (`ip netns add`)
joined to the bridge by a veth, with its own address 10.231.X.(10+i), lo up. A private
PostgreSQL (tests/pgserver.py) listens on the gateway address, so every host reaches the one
CMDB over TCP as real hosts would.

`fcrun serve` runs inside a host's network namespace by ``nsenter --net=/run/netns/NAME``, not
``ip netns exec``: the latter also remounts /sys in a private mount namespace, which hides
/sys/fs/cgroup, and serve must see the host's cgroup mounts. Each host's serve gets its own
data and run roots, cgroup parent (named from hostcheck.CGROUP_PARENT, so the host check sees
it), container bridge (inside its namespace) and container subnet 10.232.i.0/24, and listens on
its LAN address. The test process is in the root namespace and reaches every LAN address
through the bridge; `ClusterLab.request` can also send from inside a host (a thread that
joined its namespace).

Resource handling: everything the lab makes is registered with an undo as it is made and
undone in reverse order on exit, even when the test failed: serves stopped (SIGTERM; a host
already killed is not asked), every process left in a host's namespace or cgroups killed,
what its serve left (containers, mounts, cgroups, leases) removed from inside its namespace,
veths, namespaces (and with them the container bridges in them), the LAN bridge and PostgreSQL.
Then the host must be as before (hostcheck.settled_snapshot); a serve stopped by SIGTERM must
have exited 0 and left nothing. A test process killed before its teardown leaves a lab.json in
the lab's directory: the next lab reaps that lab (netlab.reap_stale_labs). The kernel-facing
pieces (joining a namespace, finding, killing and reaping a host's processes) are in netlab.py.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import pathlib
import random
import secrets
import subprocess
import sys
import tempfile
import threading
from typing import Callable, NamedTuple

import netlab
from hostcheck import CGROUP_PARENT, host_snapshot, settled_snapshot
from netlab import NETNS_DIR, in_netns, ip as _ip
from polling import wait_until
from serving import Server

LAN_NET = "10.231.{x}.0/24"  # X chosen so the /24 is not routed on the machine yet
HOST_OFFSET = 10  # host i has .(10+i); .1 is the gateway (the bridge, where PostgreSQL listens)
CONTAINER_SUBNET = "10.232.{i}.0/24"  # host i's container bridge (inside its namespace)
STOP_TIMEOUT_S = 30.0


def http_request(ip: str, port: int, host: str, path: str = "/", method: str = "GET", timeout: float = 30.0,
                 headers: dict[str, str] | None = None, body: bytes | None = None) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of one HTTP/1.1 request to ip:port with this Host, from the caller's namespace."""
    conn = http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode(errors="replace")
    finally:
        conn.close()


class Outcome(NamedTuple):
    """One request of a Load: answered (status, the body's start) or not (error)."""

    target: str  # ip:port
    status: int | None  # None: no response
    error: str  # repr of what was raised, "" when answered
    body: str


class Load:
    """Steady requests, each client one after another, from one namespace to targets in turn,
    from `with` until its end; every outcome is kept.

    Use: ``with Load([(ip, port)], "app.test") as load: load.wait_for(5); <event>; load.wait_for(5)``,
    then ``assert load.failures() == []``.
    """

    def __init__(self, targets: list[tuple[str, int]], host: str, path: str = "/", *, from_host: "LabHost | None" = None,
                 clients: int = 2, method: str = "GET", timeout_s: float = 30.0):
        self.targets, self.host, self.path, self.method = list(targets), host, path, method
        self.from_host, self.clients, self.timeout_s = from_host, clients, timeout_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Load":
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, args=(i,), name=f"load {self.host} #{i}")
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _client(self, index: int) -> None:
        if self.from_host is not None:
            try:
                netlab.join_netns(self.from_host.netns_path)
            except OSError as exc:
                self._record(Outcome("", None, f"joining {self.from_host}'s namespace: {exc!r}", ""))
                return
        n = index
        while not self._stop.is_set():
            ip, port = self.targets[n % len(self.targets)]
            n += 1
            try:
                status, _, body = http_request(ip, port, self.host, self.path, self.method, self.timeout_s)
                self._record(Outcome(f"{ip}:{port}", status, "", body[:200]))
            except (OSError, http.client.HTTPException) as exc:
                self._record(Outcome(f"{ip}:{port}", None, repr(exc), ""))

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_for(self, n: int, timeout_s: float = 60.0) -> None:
        """Until n more requests have had their outcome (the load ran across what happens next)."""
        goal = self.count() + n
        wait_until(f"{n} more outcomes of the load on {self.host}", lambda: self.count() >= goal, timeout_s,
                   detail=lambda: self.outcomes[-3:])

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.status != 200]


class ClusterServer(Server):
    """`fcrun serve` inside a lab host's network namespace, listening on its LAN address.

    role, node_name and advertise add `--role`, `--node-name` and `--advertise` to serve's
    command line only when given: today's serve (role all) takes none of them. advertise=True
    advertises its own LAN address and port.
    """

    def __init__(self, host: "LabHost", apache_php, extra_config: str, *, docroot_root: str | None,
                 role: str | None = None, node_name: str | None = None, advertise: str | bool | None = None):
        super().__init__(host.dir, apache_php, extra_config, cgroup_parent=host.cgroup_parent, bridge=host.bridge,
                         subnet=host.subnet, docroot_root=docroot_root, ip=host.ip,
                         launcher=("nsenter", f"--net={host.netns_path}", "--"))
        if advertise is True:
            advertise = self.address
        self.role = role
        for flag, value in (("--role", role), ("--node-name", node_name), ("--advertise", advertise)):
            if value:
                self.serve_args += [flag, value]
        self.killed = False  # by ClusterLab.kill_host: its exit status and leftovers are expected

    def ready(self) -> bool:
        # A front has no admin socket (nothing to administer there): listening is being up.
        return self.role == "front" or super().ready()

    @property
    def address(self) -> str:
        """HOST:PORT of its proxy on the LAN (what a node advertises to fronts)."""
        return f"{self.ip}:{self.port}"


class LabHost:
    """One "host": a network namespace on the LAN, its state directory and (once started) its serve."""

    def __init__(self, lab: "ClusterLab", index: int):
        self.index = index
        self.name = f"h{index}"
        self.netns = f"{lab.tag}-{self.name}"
        self.netns_path = os.path.join(NETNS_DIR, self.netns)
        self.veth = f"{lab.tag}{self.name}"  # the root-namespace end, a port of the LAN bridge
        self.ip = str(lab.network.network_address + HOST_OFFSET + index)
        self.dir = lab.dir / self.name
        self.cgroup_parent = f"{CGROUP_PARENT}-{lab.tag}-{self.name}"
        self.bridge = f"{lab.tag}c{index}"  # its serve's container bridge, inside the namespace
        self.subnet = CONTAINER_SUBNET.format(i=index)
        self.server: ClusterServer | None = None
        self.extra_pids: list[subprocess.Popen] = []  # started by ClusterLab.popen

    def __repr__(self) -> str:
        return f"LabHost({self.name}, {self.ip}, netns {self.netns})"


class ClusterLab:
    """The test LAN, its PostgreSQL and `hosts` hosts; a context manager (see the module docstring).

    Use: ``with ClusterLab(apache_php, hosts=2) as lab: lab.start(lab.hosts[0], config)``.
    `pg_url` is a new empty CMDB on the lab's PostgreSQL, reachable from every host.
    """

    def __init__(self, apache_php, hosts: int = 2):
        from pgserver import PgServer, pg_bindir

        self.apache_php = apache_php
        self.tag = self._free_tag()
        # Not under tmp_path: a unix socket's path holds at most 107 bytes, and serve binds
        # <run root>/.forkserver.sock-XXXXXXXX/sock first; pytest's tmp_path is ~65 already.
        self.dir = pathlib.Path(tempfile.gettempdir()) / self.tag
        self.network = self._free_network()
        self.gateway = str(self.network.network_address + 1)
        self.gateway_mac = "02:fc:" + ":".join(self.tag[3:][i:i + 2] for i in (0, 2)) + ":00:01"  # locally administered
        self.bridge = self.tag
        self.hosts = [LabHost(self, i) for i in range(hosts)]
        bindir = pg_bindir()
        if bindir is None:
            import pytest

            pytest.skip("PostgreSQL is not installed (no pg_ctl): apt-get install postgresql, as scripts/setup.sh does")
        self.pg = PgServer(bindir, listen=self.gateway)
        self.pg_url = ""
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self.problems: list[str] = []  # what teardown found wrong (raised after everything is undone)

    @staticmethod
    def _free_tag() -> str:
        taken = set(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else set()
        links = _ip("-o", "link")
        while True:
            tag = netlab.LAN_PREFIX + secrets.token_hex(2)
            if (tag not in links and not any(n.startswith(tag) for n in taken)
                    and not os.path.exists(os.path.join(tempfile.gettempdir(), tag))):
                return tag

    @staticmethod
    def _free_network() -> ipaddress.IPv4Network:
        """A LAN_NET /24 that no route or address on the machine overlaps (another lab's, say)."""
        used = [ipaddress.ip_network(line.split()[0], strict=False)
                for line in _ip("-4", "route", "show", "table", "all").splitlines()
                if line and line.split()[0][0].isdigit()]
        for x in random.sample(range(256), 256):
            net = ipaddress.ip_network(LAN_NET.format(x=x))
            if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
                return net
        raise RuntimeError(f"no free {LAN_NET} on this machine: every one is routed")

    # --- setting up -------------------------------------------------------------------------

    def __enter__(self) -> "ClusterLab":
        netlab.reap_stale_labs()
        self.dir.mkdir(mode=0o700)
        self.before = host_snapshot(str(self.dir))
        try:
            self._made(f"directory {self.dir}", self._remove_dir)
            # First, so that a run killed at any later point is reaped by the next lab.
            netlab.write_lab_file(str(self.dir), {"bridge": self.bridge, "hosts": [
                {k: str(getattr(h, k)) for k in ("netns", "netns_path", "veth", "cgroup_parent", "bridge", "subnet",
                                                 "dir")} for h in self.hosts]})
            self._made(f"LAN bridge {self.bridge}", lambda: _ip("link", "del", self.bridge))
            # A fixed MAC: a bridge without one takes its ports' lowest, so it changes as hosts'
            # veths come and go, and the hosts' ARP entries for the gateway go stale: their TCP
            # to PostgreSQL then stalls (a serve hung 30 s in psycopg at teardown that way).
            _ip("link", "add", self.bridge, "address", self.gateway_mac, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/{self.network.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            self._made("PostgreSQL", self._stop_pg)
            self.pg.start()
            self.pg_url = self.pg.new_database()
            for host in self.hosts:
                self._add_host(host)
        except BaseException:
            self._teardown()
            raise
        return self

    def _made(self, what: str, undo: Callable[[], None]) -> None:
        """Register undo before making `what`, so a half-made thing is undone too (undo tolerates absence)."""
        self._undo.append((what, undo))

    def _add_host(self, host: LabHost) -> None:
        host.dir.mkdir()
        self._made(f"netns {host.netns}", lambda: netlab.del_netns(host))
        _ip("netns", "add", host.netns)
        self._made(f"veth {host.veth}", lambda: netlab.del_link(host.veth))
        # The inner end is made in the namespace under its final name: no rename, no window
        # where an eth0 exists in the root namespace.
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("link", "set", host.veth, "master", self.bridge, "up")
        ns = ("-n", host.netns)
        _ip(*ns, "addr", "add", f"{host.ip}/{self.network.prefixlen}", "dev", "eth0")
        _ip(*ns, "link", "set", "eth0", "up")
        _ip(*ns, "link", "set", "lo", "up")
        self._made(f"processes of {host.name}", lambda: self._stop_host(host))

    def start(self, host: LabHost, extra_config: str = "", *, docroot_root: str | None = None,
              role: str | None = None, node_name: str | None = None,
              advertise: str | bool | None = None) -> ClusterServer:
        """Start `fcrun serve` in host (on the lab's CMDB unless extra_config names one) and wait until it listens.

        extra_config: TOML added to the config file (before its [runtime] table), e.g. "[forkserver]\\npool_size = 0".
        docroot_root: the directory the apps' docroots lie in (default: the host's own directory).
        """
        assert host.server is None, f"{host} runs a serve already"
        if "[cmdb]" not in extra_config:
            extra_config = f'{extra_config}\n[cmdb]\nurl = "{self.pg_url}"\n'
        host.server = ClusterServer(host, self.apache_php, extra_config, docroot_root=docroot_root, role=role,
                                    node_name=node_name, advertise=advertise)
        host.server.start()
        return host.server

    def popen(self, host: LabHost, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process inside host's network namespace (a load generator, a stand-in server); killed with the host."""
        proc = subprocess.Popen(["nsenter", f"--net={host.netns_path}", "--", *argv], **kwargs)
        host.extra_pids.append(proc)
        return proc

    # --- during the test --------------------------------------------------------------------

    def request(self, host_ns: LabHost | None, ip: str, port: int, host: str, path: str = "/", **options):
        """(status, headers, body) of a request to ip:port with this Host header, sent from inside
        host_ns (None: from the root namespace, through the LAN bridge)."""
        if host_ns is None:
            return http_request(ip, port, host, path, **options)
        return in_netns(host_ns.netns_path, lambda: http_request(ip, port, host, path, **options))

    def link_down(self, host: LabHost) -> None:
        """Unplug host from the LAN: its bridge port goes down (the namespace's eth0 loses carrier)."""
        _ip("link", "set", host.veth, "down")

    def link_up(self, host: LabHost) -> None:
        _ip("link", "set", host.veth, "up")

    @staticmethod
    def _own(host: LabHost) -> list[subprocess.Popen]:
        return [*host.extra_pids, *([host.server.proc] if host.server and host.server.proc else [])]

    def host_pids(self, host: LabHost) -> set[int]:
        """Every process of host: in its network namespace, or in its cgroups (its containers,
        which have namespaces of their own), or started for it by this lab and not reaped yet."""
        return netlab.host_pids(host) | {p.pid for p in self._own(host) if p.poll() is None}

    def kill_host(self, host: LabHost) -> list[int]:
        """kill -9 every process of host (serve, its fork-server, pool and instances); returns the pids killed.

        The host's namespace, veth and what its serve left on disk, in mounts and cgroups stay,
        as after a crash; teardown removes them.
        """
        if host.server is not None:
            host.server.killed = True
        killed = netlab.kill_all(host, also=lambda: {p.pid for p in self._own(host) if p.poll() is None})
        for proc in self._own(host):
            proc.wait(timeout=STOP_TIMEOUT_S)  # ours to reap: no zombie left behind
        return killed

    # --- tearing down -----------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        self._teardown()
        if exc_type is None and self.problems:
            raise AssertionError("the cluster lab's teardown found: " + "; ".join(self.problems))
        if self.problems:  # the test's own failure comes first; these are only reported
            print("cluster lab teardown: " + "; ".join(self.problems), file=sys.stderr)

    def _teardown(self) -> None:
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # go on: the rest must still be undone
                self.problems.append(f"undoing {what}: {exc!r}")
        if hasattr(self, "before"):
            try:
                settled_snapshot(str(self.dir), self.before)
            except AssertionError as exc:
                self.problems.append(str(exc))

    def _stop_host(self, host: LabHost) -> None:
        """Stop host's serve as systemd would (SIGTERM, drain); kill what is left; remove what it left."""
        srv = host.server
        crashed = srv is not None and srv.killed  # by the test: leftovers are expected
        if srv is not None and srv.proc is not None and not crashed:
            srv.stop()
            if srv.proc.returncode != 0:
                self.problems.append(f"serve on {host.name} exited {srv.proc.returncode}: {srv.read_log()[-3000:]}")
        left = self.host_pids(host)
        if left:
            if not crashed:
                self.problems.append(f"{host.name}'s processes outlived its serve: {sorted(left)}")
            self.kill_host(host)
        if srv is not None and getattr(srv, "log", None) is not None and not srv.log.closed:
            srv.log.close()
        # From inside its namespace: the containers' veths and the bridge live there.
        leftover = in_netns(host.netns_path, lambda: netlab.reap_state(host))
        if leftover and not crashed:
            self.problems.append(f"serve on {host.name} left instances behind: {leftover}")
        # The namespace dies with everything in it, but what serve (or the reap of a killed
        # serve) should have removed is a leak all the same: only lo and the LAN's eth0 may remain.
        links = netlab.netns_links(host)
        if links != ["eth0", "lo"]:
            self.problems.append(f"{host.name}'s namespace still holds links {links} (its container bridge?)")

    def _remove_dir(self) -> None:
        mounted = netlab.remove_dir(str(self.dir))
        if mounted:
            self.problems.append(f"{self.dir} still has mounts, so it is left in place: {mounted}")

    def _stop_pg(self) -> None:
        directory = self.pg.dir
        self.pg.stop()
        if directory and os.path.exists(directory):
            self.problems.append(f"PostgreSQL's directory {directory} is still there")


def lab_leftovers(lab: ClusterLab) -> dict[str, list[str]]:
    """What of `lab` the machine still holds: its namespaces, links, cgroups, PostgreSQL directory."""
    netns = _ip("netns", "list")
    links = _ip("-o", "link")
    return {
        "netns": [h.netns for h in lab.hosts if h.netns in netns],
        "links": [n for n in [lab.bridge, *(h.veth for h in lab.hosts)] if f" {n}:" in links or f" {n}@" in links],
        "cgroups": [d for h in lab.hosts for d in netlab.cgroup_dirs(h.cgroup_parent)],
        "pg": [lab.pg.dir] if lab.pg.dir else [],
        "dirs": [str(lab.dir)] if lab.dir.exists() else [],
    }


