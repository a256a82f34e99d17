"""Containers on a host bridge, one veth pair each, unable to reach one another.

::

      host netns                                       container netns
    fcrun0  10.88.0.1/16, MAC 0a:58:0a:58:00:01
      |  (bridge; its alias "fcrun-managed" says fcrun made it and may delete it)
      +-- fcv<hash of owner>  port, isolated ====veth==== eth0  10.88.0.2/16, MAC 0a:58:0a:58:00:02
                                                         lo up; default via 10.88.0.1

Tenant isolation: every container's port has bridge-port isolation on, and the bridge never
forwards between two isolated ports, so a container reaches the host (the gateway address)
and nothing else on the bridge. Nothing is routed further: fcrun never turns on ip_forward,
NAT or masquerading.

No container can take another's address. Isolation is layer 2 only, and a container has
CAP_NET_RAW by default, so it can send any frame to the host: ARP "10.88.0.5 is-at <my MAC>"
would turn the host's traffic for 10.88.0.5 to it, and a frame with a victim's source MAC
would make the bridge learn that MAC on its port. So each address and MAC is told to the
kernel, never learned from the container:

- the host's neighbour entry for the container's IP is permanent, to the MAC fcrun gave its
  eth0 (ARP input never changes a permanent entry);
- the port does not learn; a static, sticky FDB entry says the container's MAC is behind it;
- the port is locked: frames whose source MAC is not its static entry are dropped on entry;
- unicast to an unknown MAC (a container that is gone) is not flooded to container ports.

The container cannot change its eth0's MAC or address either: it has no CAP_NET_ADMIN.

Concurrency: attach, detach and gc run under the IPAM lock of the bridge, so one fcrun
process cannot delete the bridge while another is adding a port to it.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import re
from collections.abc import Callable

import msgspec

from ..errors import KernelError, SpecError
from ..paths import DEFAULT_BRIDGE, DEFAULT_SUBNET
from . import rtnl
from .ipam import IPAM, AddressLease, LeaseTable
from .rtnl import LOOPBACK_IFINDEX, Rtnl

log = logging.getLogger(__name__)

BRIDGE_ALIAS = "fcrun-managed"  # IFLA_IFALIAS of bridges fcrun created, and only those it deletes
HOST_IFNAME_PREFIX = "fcv"
CONTAINER_IFNAME = "eth0"
MAC_PREFIX = "0a:58"  # locally administered, unicast; the other four bytes are the IPv4 address
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ is 16 with the NUL

# bridge link set dev fcv... isolated on learning off flood off locked on: one request.
PORT_OPTIONS = {
    rtnl.IFLA_BRPORT_ISOLATED: True,  # no frames to or from other isolated ports
    rtnl.IFLA_BRPORT_LEARNING: False,  # the port's MAC comes from its static FDB entry only
    rtnl.IFLA_BRPORT_UNICAST_FLOOD: False,  # frames for unknown MACs never reach a container
    rtnl.IFLA_BRPORT_LOCKED: True,  # drop frames whose source MAC is not the port's own
}


class Attachment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How one container is wired to a bridge; persisted in the container's state."""

    owner: str
    ip: str
    prefixlen: int
    gateway: str
    host_ifname: str
    ifname: str = CONTAINER_IFNAME
    bridge: str = DEFAULT_BRIDGE


def host_ifname(owner: str) -> str:
    """The host end of ``owner``'s veth: "fcv" + 10 hex digits of a hash, 13 characters."""
    return HOST_IFNAME_PREFIX + hashlib.blake2b(owner.encode(), digest_size=5).hexdigest()


def mac_for(ip: str | ipaddress.IPv4Address) -> str:
    """A MAC derived from the address, so a reused address keeps its MAC and the host's ARP
    entry for it never points at a container that is gone (Docker does the same)."""
    packed = ipaddress.IPv4Address(ip).packed
    return MAC_PREFIX + "".join(f":{byte:02x}" for byte in packed)


def validate_bridge_name(name: str, where: str = "bridge") -> str:
    """Raises SpecError unless ``name`` is a usable interface name (1-15 of [A-Za-z0-9_.-])."""
    if not isinstance(name, str) or not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise SpecError(
            f"invalid bridge name {name!r}: use 1-15 characters of [A-Za-z0-9_.-]", where
        )
    return name


OpenRtnl = Callable[[int | None], Rtnl]
Undo = tuple[str, Callable[[], object]]


class BridgeNetwork:
    """Attaches containers' network namespaces to the bridge ``bridge`` in ``subnet``.

    ``open_rtnl`` is the kernel access layer (``rtnl.open_rtnl``); unit tests pass a fake.

    Raises:
        SpecError: bad bridge name or subnet.
    """

    def __init__(
        self,
        state_dir: str,
        bridge: str = DEFAULT_BRIDGE,
        subnet: str = DEFAULT_SUBNET,
        *,
        open_rtnl: OpenRtnl = rtnl.open_rtnl,
        recover_leases: Callable[[], dict[str, str]] | None = None,
    ):
        self.bridge = validate_bridge_name(bridge)
        # recover_leases: owner -> address, what a corrupt leases file is rebuilt from (ipam.py).
        self.ipam = IPAM(state_dir, subnet, name=bridge, recover=recover_leases)
        self._open_rtnl = open_rtnl

    def attach(self, owner: str, netns_fd: int) -> Attachment:
        """Give the netns ``netns_fd`` an eth0 on the bridge, with an address and a default route.

        Raises:
            SpecError: empty owner, or ``netns_fd`` is this thread's own netns.
            SubnetFull: no address left.
            KernelError: a step failed; the message names it ("attach web-1: create veth ...").
                Everything made before it (veth, lease, the bridge if this call made it) is
                removed again.

        Resource handling: ``netns_fd`` stays the caller's; pass an fd of /proc/<pid>/ns/net.
        """
        if not owner:
            raise SpecError("network owner must not be empty", "owner")
        self._check_not_own_netns(netns_fd)
        # Enter the netns first: a bad fd fails here, before anything is made.
        with (
            self._open_rtnl(netns_fd) as inner,
            self._open_rtnl(None) as host,
            self.ipam.locked() as table,
        ):
            undo: list[Undo] = []
            try:
                return self._attach(host, inner, table, owner, netns_fd, undo)
            except BaseException as exc:
                # The lease needs no undo: the table is not saved when this block raises.
                self._roll_back(undo, exc)
                if type(exc) is KernelError:  # name the step; subclasses keep their own message
                    raise KernelError(
                        f"attach {owner}: {exc.operation}", exc.obj, exc.errno
                    ) from exc
                raise

    def _attach(
        self,
        host: Rtnl,
        inner: Rtnl,
        table: LeaseTable,
        owner: str,
        netns_fd: int,
        undo: list[Undo],
    ) -> Attachment:
        bridge_index = self._ensure_bridge(host, table, undo)
        lease = table.allocate(owner)

        veth = host_ifname(owner)
        mac = mac_for(lease.ip)
        try:
            host.create_veth(veth, bridge_index, CONTAINER_IFNAME, netns_fd, mac)
        except KernelError as exc:
            if exc.errno != errno.EEXIST:
                raise
            # The port of an earlier container of the same name, whose netns the kernel is
            # still tearing down (detach(netns_gone=True) leaves the veth to it): we hold the
            # name's lease now, so that port is dead. Delete it and make ours.
            host.delete_link(veth)
            host.create_veth(veth, bridge_index, CONTAINER_IFNAME, netns_fd, mac)
        undo.append((f"delete veth {veth}", lambda: host.delete_link(veth)))
        port = host.get_link(veth)
        if port is None:
            raise KernelError("look up link", veth, errno.ENODEV)
        # Isolate, lock and pin before the port comes up, so that it never forwards to another
        # container and no frame it lets in can claim another container's MAC or address.
        host.set_bridge_port(port.index, veth, PORT_OPTIONS)
        host.add_static_fdb(port.index, veth, mac)  # goes with the port
        host.pin_neighbour(bridge_index, self.bridge, lease.ip, mac)
        undo.append(
            (
                f"unpin neighbour {lease.ip}",
                lambda: host.delete_neighbour(bridge_index, self.bridge, lease.ip),
            )
        )
        host.set_up(port.index, veth)

        self._configure_inside(inner, lease)
        return Attachment(
            owner=owner,
            ip=lease.ip,
            prefixlen=lease.prefixlen,
            gateway=lease.gateway,
            host_ifname=veth,
            ifname=CONTAINER_IFNAME,
            bridge=self.bridge,
        )

    def _ensure_bridge(self, host: Rtnl, table: LeaseTable, undo: list[Undo]) -> int:
        """The bridge's ifindex; creates it if missing. Gateway address and up either way,
        both idempotent, which also repairs a bridge left half-made by a crash."""
        link = host.get_link(self.bridge)
        if link is None:
            host.create_bridge(self.bridge, mac_for(table.gateway))
            undo.append((f"delete bridge {self.bridge}", lambda: host.delete_link(self.bridge)))
            link = host.get_link(self.bridge)
            if link is None:
                raise KernelError("look up link", self.bridge, errno.ENODEV)
            host.set_alias(link.index, self.bridge, BRIDGE_ALIAS)
        elif link.kind != "bridge":
            raise SpecError(
                f"interface {self.bridge} exists and is not a bridge (kind {link.kind})", "bridge"
            )
        host.add_address(link.index, self.bridge, str(table.gateway), table.subnet.prefixlen)
        host.set_up(link.index, self.bridge)
        return link.index

    @staticmethod
    def _configure_inside(inner: Rtnl, lease: AddressLease) -> None:
        inner.set_up(LOOPBACK_IFINDEX, "lo")
        eth = inner.get_link(CONTAINER_IFNAME)
        if eth is None:
            raise KernelError(
                "look up link", f"{CONTAINER_IFNAME} in container netns", errno.ENODEV
            )
        inner.add_address(eth.index, CONTAINER_IFNAME, lease.ip, lease.prefixlen)
        inner.set_up(eth.index, CONTAINER_IFNAME)
        # The gateway is on-link only once eth0 is up with its address.
        inner.add_default_route(lease.gateway, eth.index, CONTAINER_IFNAME)

    @staticmethod
    def _roll_back(undo: list[Undo], exc: BaseException) -> None:
        for what, action in reversed(undo):
            try:
                action()
            except Exception as undo_exc:  # keep going: remove as much as we can
                log.error("roll back: %s failed: %s", what, undo_exc)
                exc.add_note(f"roll back: {what} failed: {undo_exc}")

    @staticmethod
    def _check_not_own_netns(netns_fd: int) -> None:
        try:
            own = rtnl.same_netns(netns_fd)
        except OSError as exc:
            raise KernelError.from_oserror("inspect", f"netns fd {netns_fd}", exc) from None
        if own:
            raise SpecError(f"netns fd {netns_fd} is the host's own network namespace", "netns")

    def detach(self, owner: str, *, netns_gone: bool = False) -> None:
        """Remove ``owner``'s veth (its peer dies with it), unpin its address and release its
        lease. Idempotent. The bridge stays (see remove_bridge_if_unused).

        ``netns_gone=True`` says the container's netns is destroyed or being destroyed (its
        last process has exited and no fd holds it). The kernel then deletes the veth itself,
        in the background, and detach does not wait ~15 ms for that: unregistering a veth waits
        for RCU grace periods, and racing the netns teardown for it takes longer still. If the
        netns lives on after all, gc() removes the veth as an orphan port.

        Raises:
            KernelError: an interface could not be deleted; the lease is kept then.
        """
        with self._open_rtnl(None) as host, self.ipam.locked() as table:
            if not netns_gone:
                host.delete_link(host_ifname(owner))
            self._unpin(host, table, owner)
            table.release(owner)
            # The bridge stays for the next container: deleting and re-creating it costs
            # 35-55 ms of RCU waits per container. gc() / remove_bridge_if_unused() remove it.

    def remove_bridge_if_unused(self) -> bool:
        """Delete the bridge if no lease remains and fcrun made it; True if it went.

        Raises:
            KernelError: it could not be listed or deleted.
        """
        with self._open_rtnl(None) as host, self.ipam.locked() as table:
            return self._remove_bridge_if_unused(host, table)

    def gc(self, live_owners: set[str]) -> list[str]:
        """Remove what belongs to no live owner: leases (with their veths) of owners not in
        ``live_owners``, and ports of this bridge named fcv* that no live owner or lease
        accounts for (left by a crash). Deletes the bridge if then unused and fcrun's.

        Returns the owners whose leases were released, then the names of orphan veths deleted.

        Raises:
            KernelError: an interface could not be listed or deleted.
        """
        removed: list[str] = []
        with self._open_rtnl(None) as host, self.ipam.locked() as table:
            self.ipam.remove_stale_temps()  # of writes a crash cut short
            for owner in sorted(table.leases()):
                if owner not in live_owners:
                    host.delete_link(host_ifname(owner))
                    self._unpin(host, table, owner)
                    table.release(owner)
                    removed.append(owner)
            bridge = host.get_link(self.bridge)
            if bridge is not None:
                keep = {host_ifname(owner) for owner in (*live_owners, *table.leases())}
                for link in host.list_links():
                    if (
                        link.master == bridge.index
                        and link.name.startswith(HOST_IFNAME_PREFIX)
                        and link.name not in keep
                    ):
                        host.delete_link(link.name)
                        removed.append(link.name)
            self._remove_bridge_if_unused(host, table)
        return removed

    def _unpin(self, host: Rtnl, table: LeaseTable, owner: str) -> None:
        """Delete the permanent neighbour entry of ``owner``'s address, if it has a lease.

        The entry is on the bridge, not on the veth, so the kernel keeps it when the veth goes
        (the FDB entry goes with the port). The veth is deleted first: with the entry gone
        and the port still there, the host would ARP for the address again and learn it.
        A stale entry left by a crash is harmless: the MAC follows the address, so it is
        re-pinned to the same MAC when the address is leased again, and until then frames
        for it are flooded to no container port.
        """
        lease = table.get(owner)
        if lease is None:
            return
        bridge = host.get_link(self.bridge)
        if bridge is not None:
            host.delete_neighbour(bridge.index, self.bridge, lease.ip)

    def _remove_bridge_if_unused(self, host: Rtnl, table: LeaseTable) -> bool:
        if len(table):
            return False
        link = host.get_link(self.bridge)
        # Never delete a bridge someone else made, even if fcrun used it.
        if link is not None and link.kind == "bridge" and link.alias == BRIDGE_ALIAS:
            host.delete_link(self.bridge)
            return True
        return False


def setup_loopback(netns_fd: int, *, open_rtnl: OpenRtnl = rtnl.open_rtnl) -> None:
    """Bring lo up inside the netns ``netns_fd`` (for ``--net none``).

    Raises:
        KernelError: the netns cannot be entered or lo cannot be set up.

    Resource handling: ``netns_fd`` stays the caller's.
    """
    with open_rtnl(netns_fd) as inner:
        inner.set_up(LOOPBACK_IFINDEX, "lo")
