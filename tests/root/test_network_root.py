"""BridgeNetwork on the real kernel: real network namespaces, bridge, veths, TCP traffic.

Each test gets its own bridge (fct<pid>-<n>) and subnet (10.234.<n>.0/24), and network
namespaces held by `unshare --net` children of its own. Traffic goes only between the host
and addresses inside those namespaces. The `lab` fixture kills the children it started (by
pid) and deletes every interface it could have made, even when the test fails, then checks
that nothing of ours is left.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from fcrun.errors import KernelError
from fcrun.network import Attachment, BridgeNetwork, host_ifname, mac_for, setup_loopback
from fcrun.network.bridge import BRIDGE_ALIAS
from polling import wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, bridge, veth)"),
]

_counter = itertools.count(1)

# Runs inside a container netns: accept connections on ADDR:PORT and greet each one.
SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
print("ready", flush=True)
s.settimeout(30)
while True:
    conn, _ = s.accept()
    conn.sendall(b"hello from " + sys.argv[1].encode())
    conn.close()
"""

# Runs inside a container netns: try to connect, print "ok" or "fail <reason>".
CLIENT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("ok")
except OSError as exc:
    print("fail", exc)
"""

SERVER_PORT = 8080


def link_names() -> set[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


class Lab:
    """What one test made: namespaces (child pids), owners, a bridge name and subnet."""

    def __init__(self, state_dir: str):
        n = next(_counter)
        assert n < 200, "subnets 10.234.<n>.0/24 are per test"
        self.bridge = f"fct{os.getpid()}-{n}"
        self.subnet = f"10.234.{n}.0/24"
        self.prefix = f"10.234.{n}"
        self.state_dir = state_dir
        self._owners: list[str] = []
        self._children: list[subprocess.Popen] = []
        self._fds: list[int] = []

    def network(self) -> BridgeNetwork:
        return BridgeNetwork(self.state_dir, self.bridge, self.subnet)

    def owner(self) -> str:
        owner = f"test-{os.getpid()}-{self.bridge}-{len(self._owners)}"
        self._owners.append(owner)
        return owner

    def netns(self) -> tuple[int, int]:
        """A fresh network namespace: (pid of the child holding it, an fd of it)."""
        child = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "echo ready; exec sleep 120"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._children.append(child)
        # Wait until unshare has run: before that /proc/<pid>/ns/net is still the host's.
        assert child.stdout.readline().strip() == "ready"
        fd = os.open(f"/proc/{child.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._fds.append(fd)
        return child.pid, fd

    def attached(self, net: BridgeNetwork) -> tuple[str, Attachment, int, int]:
        """A new owner attached to ``net`` in a fresh netns: (owner, attachment, pid, netns fd)."""
        pid, fd = self.netns()
        owner = self.owner()
        return owner, net.attach(owner, fd), pid, fd

    def destroy_netns(self, pid: int, fd: int) -> None:
        """Let the netns die: close our fd of it and kill the child holding it."""
        os.close(fd)
        self._fds.remove(fd)
        child = next(c for c in self._children if c.pid == pid)
        child.kill()
        child.wait()

    def run_in(self, pid: int, *argv: str, timeout_s: float = 10) -> str:
        result = subprocess.run(
            ["nsenter", f"--net=/proc/{pid}/ns/net", *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def serve_in(self, pid: int, ip: str) -> None:
        """Start a greeting TCP server on ip:SERVER_PORT inside netns ``pid``."""
        child = subprocess.Popen(
            [
                "nsenter",
                f"--net=/proc/{pid}/ns/net",
                sys.executable,
                "-c",
                SERVER,
                ip,
                str(SERVER_PORT),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._children.append(child)
        assert child.stdout.readline().strip() == "ready"

    def connect_from(self, pid: int, ip: str, port: int, timeout_s: float = 2.0) -> str:
        return self.run_in(pid, sys.executable, "-c", CLIENT, ip, str(port), str(timeout_s)).strip()

    def ours(self) -> set[str]:
        """Interfaces on the host that this test's network could have made."""
        return link_names() & ({self.bridge} | {host_ifname(owner) for owner in self._owners})

    def clean_up(self) -> None:
        for child in self._children:
            if child.poll() is None:
                child.kill()
            child.wait()
            if child.stdout:
                child.stdout.close()
        for fd in self._fds:
            os.close(fd)
        # A veth dies with its netns; what is left now is the bridge or a veth whose
        # netns lives on somewhere, which a failed test may have caused.
        for name in self.ours():
            subprocess.run(["ip", "link", "del", name], check=False)


@pytest.fixture
def lab(tmp_path):
    forward_before = _ip_forward()
    lab = Lab(str(tmp_path / "network"))
    try:
        yield lab
        # What fcrun's own teardown does (Runtime.gc, serve's stop): drop the idle bridge.
        lab.network().remove_bridge_if_unused()
    finally:
        leftover = lab.ours()
        lab.clean_up()
    assert leftover == set(), "the test left interfaces behind"
    assert _ip_forward() == forward_before


def _ip_forward() -> str:
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        return f.read().strip()


def _host_listener(ip: str) -> socket.socket:
    """A listening socket on the host; connect() completes without accept()."""
    sock = socket.socket()
    sock.bind((ip, 0))
    sock.listen(8)
    return sock


def test_attach_configures_the_container_netns(lab):
    net = lab.network()
    pid, fd = lab.netns()
    owner = lab.owner()

    host_netns = _thread_netns_inode()

    att = net.attach(owner, fd)

    assert _thread_netns_inode() == host_netns
    assert (att.ip, att.prefixlen, att.gateway) == (f"{lab.prefix}.2", 24, f"{lab.prefix}.1")
    assert (att.ifname, att.bridge, att.host_ifname) == ("eth0", lab.bridge, host_ifname(owner))
    addrs = lab.run_in(pid, "ip", "-o", "-4", "addr", "show")
    assert f"eth0    inet {att.ip}/24" in addrs
    assert "lo    inet 127.0.0.1/8" in addrs
    assert "state UP" in lab.run_in(pid, "ip", "link", "show", "eth0")
    assert "UP" in lab.run_in(pid, "ip", "-o", "link", "show", "lo").split(">")[0]
    assert f"default via {att.gateway} dev eth0" in lab.run_in(pid, "ip", "route", "show")

    port = subprocess.run(
        ["bridge", "-d", "link", "show", "dev", att.host_ifname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"master {lab.bridge}" in port and "isolated on" in port and "state forwarding" in port
    bridge = subprocess.run(
        ["ip", "-d", "addr", "show", lab.bridge], capture_output=True, text=True
    ).stdout
    assert f"inet {att.gateway}/24" in bridge and f"alias {BRIDGE_ALIAS}" in bridge
    assert net.ipam.leases() == {owner: att.ip}
    net.detach(owner)


def _out(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def test_attach_pins_address_and_mac_and_detach_unpins(lab):
    net = lab.network()
    pid, fd = lab.netns()
    owner = lab.owner()
    att = net.attach(owner, fd)
    mac = mac_for(att.ip)

    assert f"link/ether {mac} " in lab.run_in(pid, "ip", "-o", "link", "show", "eth0")
    neighbour = _out("ip", "neigh", "show", att.ip, "dev", lab.bridge)
    assert neighbour == f"{att.ip} lladdr {mac} PERMANENT"
    fdb = _out("bridge", "fdb", "show", "br", lab.bridge)
    assert f"{mac} dev {att.host_ifname} sticky master {lab.bridge} static" in fdb.splitlines()
    port = _out("bridge", "-d", "link", "show", "dev", att.host_ifname)
    assert " learning off flood off " in port and " isolated on locked on" in port

    # The neighbour entry is on the bridge, so the kernel keeps it when the veth goes (the FDB
    # entry goes with the port): detach has to delete it.
    subprocess.run(["ip", "link", "del", att.host_ifname], check=True)
    assert "PERMANENT" in _out("ip", "neigh", "show", att.ip, "dev", lab.bridge)
    assert mac not in _out("bridge", "fdb", "show", "br", lab.bridge)
    net.detach(owner)
    assert _out("ip", "neigh", "show", att.ip, "dev", lab.bridge) == ""


def _thread_netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_parallel_attach_from_threads_gets_unique_addresses(lab):
    net = lab.network()
    spaces = [lab.netns() for _ in range(6)]
    owners = [lab.owner() for _ in spaces]
    host_netns = _thread_netns_inode()

    def attach(owner: str, fd: int):
        att = net.attach(owner, fd)
        assert _thread_netns_inode() == host_netns, "the thread must be back in the host netns"
        return att

    with ThreadPoolExecutor(len(spaces)) as pool:
        attachments = list(pool.map(attach, owners, [fd for _pid, fd in spaces]))

    assert len({att.ip for att in attachments}) == len(spaces)
    for (pid, _fd), att in zip(spaces, attachments):
        assert f"inet {att.ip}/24" in lab.run_in(pid, "ip", "-o", "-4", "addr", "show", "eth0")
    with ThreadPoolExecutor(len(spaces)) as pool:
        list(pool.map(net.detach, owners))
    assert lab.ours() == {lab.bridge}
    assert net.ipam.leases() == {}


def test_attach_works_inside_a_running_event_loop(lab):
    net = lab.network()
    _pid, fd = lab.netns()
    owner = lab.owner()

    async def attach_and_detach():
        att = net.attach(owner, fd)
        net.detach(owner)
        return att

    assert asyncio.run(attach_and_detach()).ip == f"{lab.prefix}.2"
    assert lab.ours() == {lab.bridge}


def test_host_and_container_reach_each_other_over_tcp(lab):
    net = lab.network()
    pid, fd = lab.netns()
    owner = lab.owner()
    att = net.attach(owner, fd)

    lab.serve_in(pid, att.ip)
    with socket.create_connection((att.ip, SERVER_PORT), timeout=5) as conn:
        assert conn.recv(100) == f"hello from {att.ip}".encode()

    with _host_listener(att.gateway) as listener:
        assert lab.connect_from(pid, att.gateway, listener.getsockname()[1]) == "ok"
    net.detach(owner)


def test_containers_cannot_reach_each_other_but_both_reach_the_host(lab):
    net = lab.network()
    pid_a, fd_a = lab.netns()
    pid_b, fd_b = lab.netns()
    owner_a, owner_b = lab.owner(), lab.owner()
    a = net.attach(owner_a, fd_a)
    b = net.attach(owner_b, fd_b)
    assert a.ip != b.ip
    lab.serve_in(pid_a, a.ip)
    lab.serve_in(pid_b, b.ip)

    # Positive controls: both servers are up and reachable from the host.
    for att in (a, b):
        with socket.create_connection((att.ip, SERVER_PORT), timeout=5) as conn:
            assert conn.recv(100) == f"hello from {att.ip}".encode()
    with _host_listener(a.gateway) as listener:
        port = listener.getsockname()[1]
        assert lab.connect_from(pid_a, a.gateway, port) == "ok"
        assert lab.connect_from(pid_b, b.gateway, port) == "ok"

    # Port isolation: neither container gets through to the other.
    assert lab.connect_from(pid_b, a.ip, SERVER_PORT, timeout_s=1.5).startswith("fail")
    assert lab.connect_from(pid_a, b.ip, SERVER_PORT, timeout_s=1.5).startswith("fail")

    net.detach(owner_a)
    net.detach(owner_b)


def test_detach_removes_veth_and_lease_and_is_idempotent(lab):
    links_before = link_names()
    net = lab.network()
    _pid, fd = lab.netns()
    owner = lab.owner()
    att = net.attach(owner, fd)
    assert {lab.bridge, att.host_ifname} <= link_names()

    net.detach(owner)

    assert lab.ours() == {lab.bridge}  # kept for the next container
    assert net.ipam.leases() == {}
    net.detach(owner)
    net.detach("never-attached")
    assert net.remove_bridge_if_unused() is True
    assert lab.ours() == set()
    assert link_names() == links_before


def test_bridge_stays_while_another_container_uses_it(lab):
    net = lab.network()
    first, *_ = lab.attached(net)
    second, att2, *_ = lab.attached(net)
    assert att2.ip == f"{lab.prefix}.3"

    net.detach(first)
    assert lab.ours() == {lab.bridge, att2.host_ifname}
    net.detach(second)
    assert lab.ours() == {lab.bridge}  # idle, kept for the next container
    assert net.remove_bridge_if_unused() is True
    assert lab.ours() == set()


def _wait_gone(name: str) -> None:
    """Wait for the kernel to delete ``name``: netns teardown is asynchronous (cleanup_net work)."""
    wait_until(f"the kernel to delete {name} after its netns died", lambda: name not in link_names())


@pytest.mark.parametrize("netns_gone", [False, True])
def test_detach_after_the_netns_died(lab, netns_gone):
    net = lab.network()
    owner, att, pid, fd = lab.attached(net)
    keeper, *_ = lab.attached(net)
    lab.destroy_netns(pid, fd)

    net.detach(owner, netns_gone=netns_gone)

    _wait_gone(att.host_ifname)
    assert lab.ours() == {lab.bridge, host_ifname(keeper)}
    assert net.ipam.leases() == {keeper: f"{lab.prefix}.3"}
    net.detach(keeper)
    assert lab.ours() == {lab.bridge}


def test_gc_removes_the_veth_of_a_netns_that_outlived_detach(lab):
    net = lab.network()
    stray, att, *_ = lab.attached(net)
    keeper, *_ = lab.attached(net)
    net.detach(stray, netns_gone=True)  # wrongly: the netns still lives
    assert att.host_ifname in lab.ours()

    assert net.gc({keeper}) == [att.host_ifname]
    assert lab.ours() == {lab.bridge, host_ifname(keeper)}
    net.detach(keeper)


@pytest.mark.parametrize("how", ["closed fd", "not a netns"])
def test_attach_with_a_bad_netns_fd_makes_nothing(lab, tmp_path, how):
    links_before = link_names()
    net = lab.network()
    if how == "closed fd":
        fd = os.open("/dev/null", os.O_RDONLY)
        os.close(fd)
        expected = errno.EBADF
    else:
        fd = os.open(tmp_path, os.O_RDONLY)
        expected = errno.EINVAL
    try:
        with pytest.raises(KernelError) as exc_info:
            net.attach(lab.owner(), fd)
    finally:
        if how != "closed fd":
            os.close(fd)
    assert exc_info.value.errno == expected
    assert link_names() == links_before
    assert net.ipam.leases() == {}


def test_kernel_failure_mid_attach_rolls_back_bridge_and_lease(lab):
    """The container netns already has an eth0, so creating the veth fails after the
    bridge was made and the lease taken."""
    links_before = link_names()
    net = lab.network()
    pid, fd = lab.netns()
    lab.run_in(pid, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")

    with pytest.raises(KernelError) as exc_info:
        net.attach(lab.owner(), fd)

    assert exc_info.value.errno == errno.EEXIST
    assert exc_info.value.operation.endswith(": create veth")
    assert link_names() == links_before
    assert net.ipam.leases() == {}


def test_failure_after_the_veth_exists_rolls_everything_back(lab, monkeypatch):
    links_before = link_names()
    net = lab.network()
    pid, fd = lab.netns()

    def fail_inside(inner, lease):
        raise KernelError("add default route", "via (injected)", errno.ENETUNREACH)

    monkeypatch.setattr(BridgeNetwork, "_configure_inside", staticmethod(fail_inside))
    owner = lab.owner()
    with pytest.raises(KernelError) as exc_info:
        net.attach(owner, fd)

    # args[0], not str(): fcrun.errors.KernelError inherits OSError.__str__ (errno only)
    assert (
        exc_info.value.args[0]
        == f"attach {owner}: add default route via (injected): [Errno 101] Network is unreachable"
    )

    assert link_names() == links_before
    assert "eth0" not in lab.run_in(pid, "ip", "-o", "link")
    assert net.ipam.leases() == {}


def test_gc_releases_dead_owners(lab):
    net = lab.network()
    live, live_att, *_ = lab.attached(net)
    dead, *_ = lab.attached(net)

    assert net.gc({live}) == [dead]
    assert lab.ours() == {lab.bridge, live_att.host_ifname}
    assert net.ipam.leases() == {live: live_att.ip}

    assert net.gc(set()) == [live]
    assert lab.ours() == set()


def test_existing_bridge_fcrun_did_not_make_is_kept(lab):
    subprocess.run(["ip", "link", "add", lab.bridge, "type", "bridge"], check=True)
    net = lab.network()
    _pid, fd = lab.netns()
    owner = lab.owner()
    net.attach(owner, fd)
    net.detach(owner)
    assert lab.ours() == {lab.bridge}
    subprocess.run(["ip", "link", "del", lab.bridge], check=True)


def test_setup_loopback(lab):
    pid, fd = lab.netns()
    assert "UP" not in lab.run_in(pid, "ip", "-o", "link", "show", "lo").split(">")[0]
    setup_loopback(fd)
    assert "UP" in lab.run_in(pid, "ip", "-o", "link", "show", "lo").split(">")[0]
