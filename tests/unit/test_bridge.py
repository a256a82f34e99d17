"""BridgeNetwork logic against a recording fake of the rtnetlink layer (no root).

The real kernel is exercised in tests/root/test_network_root.py; here we check validation,
the order of steps and that every failure rolls back what was made.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import pytest

from fcrun.errors import KernelError, SpecError
from fcrun.network import Attachment, BridgeNetwork, host_ifname, mac_for, setup_loopback
from fcrun.network.bridge import PORT_OPTIONS
from fcrun.network.rtnl import (
    IFLA_BRPORT_ISOLATED,
    IFLA_BRPORT_LEARNING,
    IFLA_BRPORT_LOCKED,
    IFLA_BRPORT_UNICAST_FLOOD,
    LOOPBACK_IFINDEX,
    Link,
)


@dataclass
class FakeLink:
    index: int
    kind: str | None
    alias: str | None = None
    master: int | None = None
    up: bool = False
    port_options: dict[int, bool] = field(default_factory=dict)  # IFLA_BRPORT_* -> on
    fdb: list[str] = field(default_factory=list)  # static MACs behind this port; die with it
    addresses: list[str] = field(default_factory=list)
    peer: tuple[int, str] | None = None  # for a host veth end: (netns fd, name) of its peer


class FakeKernel:
    """The host's links and those of each container netns (keyed by fd); ``fail_at``
    ("host.create_veth", "inner.add_address", ...) makes that call raise as the kernel would."""

    def __init__(self):
        self.host: dict[str, FakeLink] = {}
        self.namespaces: dict[int, dict[str, FakeLink]] = {}
        self.routes: list[str] = []
        self.neighbours: dict[tuple[int, str], str] = {}  # host (ifindex, ip) -> permanent MAC
        self.fail_at: str | None = None
        self.calls: list[str] = []
        self._next_index = 100

    def ns(self, netns_fd: int) -> dict[str, FakeLink]:
        return self.namespaces.setdefault(netns_fd, {"lo": FakeLink(LOOPBACK_IFINDEX, None)})

    def open_rtnl(self, netns_fd):
        if netns_fd is None:
            return FakeRtnl(self, self.host, "host")
        self.step("enter")
        return FakeRtnl(self, self.ns(netns_fd), "inner")

    def step(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_at == name:
            raise KernelError(name.split(".")[-1].replace("_", " "), "(fake)", errno.EPERM)

    def new_index(self) -> int:
        self._next_index += 1
        return self._next_index


class FakeRtnl:
    def __init__(self, kernel: FakeKernel, links: dict[str, FakeLink], where: str):
        self.k, self.links, self.where = kernel, links, where

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def _step(self, name):
        self.k.step(f"{self.where}.{name}")

    def _by_index(self, index):
        return next(link for link in self.links.values() if link.index == index)

    def get_link(self, name):
        link = self.links.get(name)
        return None if link is None else Link(link.index, name, link.kind, link.alias, link.master)

    def list_links(self):
        return [self.get_link(name) for name in self.links]

    def create_bridge(self, name, mac):
        self._step("create_bridge")
        assert name not in self.links
        self.links[name] = FakeLink(self.k.new_index(), "bridge")

    def set_alias(self, index, name, alias):
        self._step("set_alias")
        self._by_index(index).alias = alias

    def create_veth(self, name, master, peer_name, peer_netns_fd, peer_mac):
        self._step("create_veth")
        if name in self.links or peer_name in self.k.ns(peer_netns_fd):
            raise KernelError("create veth", name, errno.EEXIST)
        self.links[name] = FakeLink(
            self.k.new_index(), "veth", master=master, peer=(peer_netns_fd, peer_name)
        )
        self.k.ns(peer_netns_fd)[peer_name] = FakeLink(self.k.new_index(), "veth")

    def set_bridge_port(self, index, name, options):
        self._step("set_bridge_port")
        self._by_index(index).port_options.update(options)

    def add_static_fdb(self, port_index, port_name, mac):
        self._step("add_static_fdb")
        self._by_index(port_index).fdb.append(mac)

    def pin_neighbour(self, index, name, ip, mac):
        self._step("pin_neighbour")
        assert self._by_index(index).kind == "bridge"
        self.k.neighbours[(index, ip)] = mac

    def delete_neighbour(self, index, name, ip):
        self._step("delete_neighbour")
        return self.k.neighbours.pop((index, ip), None) is not None

    def set_up(self, index, name):
        self._step("set_up")
        link = self._by_index(index)
        if link.master is not None:
            assert link.port_options == PORT_OPTIONS, "isolate and lock a port before it comes up"
            assert link.fdb, "a port's MAC is in the FDB before it comes up"
            assert link.fdb[0] in self.k.neighbours.values(), "and its address is pinned"
        link.up = True

    def delete_link(self, name):
        self._step("delete_link")
        link = self.links.pop(name, None)
        if link is None:
            return False
        for key in [key for key in self.k.neighbours if key[0] == link.index]:
            del self.k.neighbours[key]  # neighbours die with their device (the bridge)
        if link.peer:
            peer_fd, peer_name = link.peer
            self.k.ns(peer_fd).pop(peer_name)  # a veth's peer dies with it
        return True

    def add_address(self, index, name, ip, prefixlen):
        self._step("add_address")
        self._by_index(index).addresses.append(f"{ip}/{prefixlen}")

    def add_default_route(self, gateway, oif, oif_name):
        self._step("add_default_route")
        self.k.routes.append(f"default via {gateway} dev {oif_name}")


@pytest.fixture
def kernel():
    return FakeKernel()


@pytest.fixture
def make_netns(tmp_path):
    """Fds that stand for container netns: any fd that is not this thread's netns passes the
    own-netns guard, and the fake never enters it."""
    fds: list[int] = []

    def make() -> int:
        fds.append(os.open(tmp_path, os.O_RDONLY))
        return fds[-1]

    yield make
    for fd in fds:
        os.close(fd)


@pytest.fixture
def netns_fd(make_netns):
    return make_netns()


@pytest.fixture
def network(tmp_path, kernel):
    return BridgeNetwork(
        str(tmp_path / "net"), "fctest0", "10.234.5.0/24", open_rtnl=kernel.open_rtnl
    )


@pytest.mark.parametrize("bridge", ["", "a" * 16, "br 0", "br/0", "br:0", "..", "brü"])
def test_bad_bridge_name_is_a_spec_error(tmp_path, bridge):
    with pytest.raises(SpecError) as exc_info:
        BridgeNetwork(str(tmp_path), bridge, "10.234.5.0/24")
    assert exc_info.value.where == "bridge"


def test_bad_subnet_is_a_spec_error_naming_the_subnet(tmp_path):
    with pytest.raises(SpecError) as exc_info:
        BridgeNetwork(str(tmp_path), "fctest0", "10.234.5.0/31")
    assert exc_info.value.where == "subnet"


def test_host_ifname_is_short_stable_and_distinct():
    assert host_ifname("web-1") == host_ifname("web-1")
    assert host_ifname("web-1") != host_ifname("web-2")
    assert host_ifname("x" * 500).startswith("fcv") and len(host_ifname("x" * 500)) <= 15


def test_mac_follows_the_address():
    assert mac_for("10.88.0.2") == "0a:58:0a:58:00:02"


def test_attach_wires_bridge_veth_and_netns(network, kernel, netns_fd):
    att = network.attach("web-1", netns_fd)

    assert att == Attachment(
        owner="web-1",
        ip="10.234.5.2",
        prefixlen=24,
        gateway="10.234.5.1",
        host_ifname=host_ifname("web-1"),
        ifname="eth0",
        bridge="fctest0",
    )
    bridge = kernel.host["fctest0"]
    assert bridge.up and bridge.addresses == ["10.234.5.1/24"] and bridge.alias == "fcrun-managed"
    port = kernel.host[att.host_ifname]
    assert port.master == bridge.index and port.up
    assert port.port_options == {
        IFLA_BRPORT_ISOLATED: True,
        IFLA_BRPORT_LEARNING: False,
        IFLA_BRPORT_UNICAST_FLOOD: False,
        IFLA_BRPORT_LOCKED: True,
    }
    assert port.fdb == ["0a:58:0a:ea:05:02"]
    assert kernel.neighbours == {(bridge.index, "10.234.5.2"): "0a:58:0a:ea:05:02"}
    inside = kernel.ns(netns_fd)
    assert inside["lo"].up
    assert inside["eth0"].up and inside["eth0"].addresses == ["10.234.5.2/24"]
    assert kernel.routes == ["default via 10.234.5.1 dev eth0"]
    assert network.ipam.leases() == {"web-1": "10.234.5.2"}


FAILURE_POINTS = [
    "enter",
    "host.create_bridge",
    "host.set_alias",
    "host.add_address",
    "host.create_veth",
    "host.set_bridge_port",
    "host.add_static_fdb",
    "host.pin_neighbour",
    "host.set_up",
    "inner.set_up",
    "inner.add_address",
    "inner.add_default_route",
]


@pytest.mark.parametrize("fail_at", FAILURE_POINTS)
def test_failed_attach_leaves_nothing_behind(network, kernel, netns_fd, fail_at):
    kernel.fail_at = fail_at
    with pytest.raises(KernelError) as exc_info:
        network.attach("web-1", netns_fd)
    if fail_at != "enter":
        # args[0], not str(): fcrun.errors.KernelError inherits OSError.__str__ (errno only)
        assert exc_info.value.args[0].startswith("attach web-1: "), "the message names the step"
    assert kernel.host == {}
    assert kernel.neighbours == {}
    assert set(kernel.ns(netns_fd)) == {"lo"}
    assert network.ipam.leases() == {}


def test_failed_attach_keeps_a_bridge_that_serves_others(network, kernel, make_netns):
    network.attach("web-1", make_netns())
    kernel.fail_at = "inner.add_default_route"
    second = make_netns()
    with pytest.raises(KernelError):
        network.attach("web-2", second)
    assert set(kernel.ns(second)) == {"lo"}
    assert set(kernel.host) == {"fctest0", host_ifname("web-1")}
    assert list(kernel.neighbours.values()) == [mac_for("10.234.5.2")]
    assert network.ipam.leases() == {"web-1": "10.234.5.2"}


def test_attach_to_own_netns_is_refused(network, kernel):
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        with pytest.raises(SpecError, match="host's own network namespace"):
            network.attach("web-1", fd)
    finally:
        os.close(fd)
    assert kernel.calls == []


def test_attach_with_closed_fd_is_a_kernel_error(network, kernel, netns_fd):
    fd = os.dup(netns_fd)
    os.close(fd)
    with pytest.raises(KernelError) as exc_info:
        network.attach("web-1", fd)
    assert exc_info.value.errno == errno.EBADF
    assert kernel.calls == []


def test_existing_interface_that_is_not_a_bridge_is_a_spec_error(network, kernel, netns_fd):
    kernel.host["fctest0"] = FakeLink(7, "dummy")
    with pytest.raises(SpecError, match="exists and is not a bridge"):
        network.attach("web-1", netns_fd)
    assert set(kernel.host) == {"fctest0"}


def test_detach_removes_veth_and_lease_and_is_idempotent(network, kernel, netns_fd):
    network.attach("web-1", netns_fd)
    network.detach("web-1")
    assert set(kernel.host) == {"fctest0"} and set(kernel.ns(netns_fd)) == {"lo"}  # the bridge stays
    assert kernel.neighbours == {}, "the pinned address is released with the lease"
    assert network.remove_bridge_if_unused() is True
    assert kernel.host == {}
    assert network.ipam.leases() == {}
    network.detach("web-1")
    network.detach("never-attached")


def test_detach_of_a_gone_netns_leaves_the_veth_to_the_kernel(network, kernel, make_netns):
    network.attach("web-1", make_netns())
    network.attach("web-2", make_netns())
    kernel.calls.clear()
    network.detach("web-1", netns_gone=True)
    assert "host.delete_link" not in kernel.calls
    assert network.ipam.leases() == {"web-2": "10.234.5.3"}
    assert list(kernel.neighbours.values()) == [mac_for("10.234.5.3")]  # web-1's unpinned
    # Had the netns lived on after all, gc finds the veth as an orphan port.
    assert network.gc({"web-2"}) == [host_ifname("web-1")]


def test_detach_keeps_the_bridge_while_leases_remain(network, kernel, make_netns):
    network.attach("web-1", make_netns())
    network.attach("web-2", make_netns())
    network.detach("web-1")
    assert set(kernel.host) == {"fctest0", host_ifname("web-2")}


def test_detach_never_deletes_a_bridge_fcrun_did_not_make(network, kernel, netns_fd):
    kernel.host["fctest0"] = FakeLink(7, "bridge", alias=None)
    network.attach("web-1", netns_fd)
    network.detach("web-1")
    assert set(kernel.host) == {"fctest0"}


def test_gc_removes_dead_owners_and_orphan_ports(network, kernel, make_netns):
    network.attach("live", make_netns())
    network.attach("dead", make_netns())
    bridge = kernel.host["fctest0"]
    kernel.host["fcvorphan"] = FakeLink(50, "veth", master=bridge.index)  # a crash left it
    kernel.host["fcvelsewhere"] = FakeLink(51, "veth", master=None)  # not on our bridge

    assert network.gc({"live"}) == ["dead", "fcvorphan"]
    assert set(kernel.host) == {"fctest0", host_ifname("live"), "fcvelsewhere"}
    assert list(kernel.neighbours.values()) == [mac_for("10.234.5.2")]
    assert network.ipam.leases() == {"live": "10.234.5.2"}

    assert network.gc(set()) == ["live"]
    assert set(kernel.host) == {"fcvelsewhere"}


def test_attach_pins_over_an_entry_the_host_learned_before(network, kernel, make_netns):
    """Another container may have claimed the free address by ARP; attach replaces that."""
    network.attach("web-0", make_netns())  # makes the bridge
    bridge = kernel.host["fctest0"].index
    kernel.neighbours[(bridge, "10.234.5.3")] = "0a:58:0a:ea:05:02"  # web-0 said "I am .3"
    network.attach("web-1", make_netns())
    assert kernel.neighbours[(bridge, "10.234.5.3")] == mac_for("10.234.5.3")


def test_setup_loopback_brings_lo_up(kernel, netns_fd):
    setup_loopback(netns_fd, open_rtnl=kernel.open_rtnl)
    assert kernel.ns(netns_fd)["lo"].up


def test_a_name_reused_before_the_kernel_removed_its_old_port_gets_a_new_one(network, kernel, make_netns):
    first = make_netns()
    network.attach("web-1", first)
    network.detach("web-1", netns_gone=True)  # the kernel would delete the veth, later
    stale = kernel.host[host_ifname("web-1")]  # ...and has not yet
    att = network.attach("web-1", make_netns())
    port = kernel.host[att.host_ifname]
    assert port is not stale and port.up and port.peer[0] != first
