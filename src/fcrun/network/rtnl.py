"""A small synchronous rtnetlink client: just the requests fcrun's networking needs.

Why not pyroute2's ``IPRoute``: in pyroute2 0.9 it is a sync wrapper over an asyncio core, so
it raises "This event loop is already running" when called from a coroutine (the admin API runs
on uvloop), keeps one socket per thread (a socket made by another thread would land in that
thread's netns), and importing it costs ~90 ms. The few messages below are plain structs.

A netlink socket belongs to the network namespace it was created in, for its whole life.
:func:`open_rtnl` with a netns fd enters that namespace in the calling thread only long enough
to create the socket, then returns to where the thread was; no helper process is spawned.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import KernelError
from ..syscalls import setns  # setns(2) for the calling thread (Python 3.11 has no os.setns)

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
THREAD_NETNS = "/proc/thread-self/ns/net"
LOOPBACK_IFINDEX = 1  # the kernel registers lo first in every netns (LOOPBACK_IFINDEX)

# <linux/netlink.h>
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
RTA_GATEWAY = 5
RTA_OIF = 4

# <linux/if_link.h>, <linux/if_addr.h>, <linux/veth.h>
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MASTER = 10
IFLA_PROTINFO = 12
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFLA_BRPORT_LEARNING = 8
IFLA_BRPORT_UNICAST_FLOOD = 9
IFLA_BRPORT_ISOLATED = 33
IFLA_BRPORT_LOCKED = 39
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFF_UP = 0x1
AF_BRIDGE = 7

# <linux/neighbour.h>
NDA_DST = 1
NDA_LLADDR = 2
NUD_NOARP = 0x40  # for a bridge FDB entry: "static" (NUD_PERMANENT there means "local")
NUD_PERMANENT = 0x80
NTF_MASTER = 0x04  # an FDB request for the bridge the port belongs to, not the port itself
NTF_STICKY = 0x40  # learning on another port cannot move the entry there

_NLMSGHDR = struct.Struct("=IHHII")
_NLMSGERR = struct.Struct("=i")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBi")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")  # family, pad, ifindex, state, flags, type
_RTATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")

_RECV_BUFSIZE = 1 << 16


def same_netns(fd: int, path: str = THREAD_NETNS) -> bool:
    """True if netns fd ``fd`` is the namespace at ``path`` (the calling thread's by default)."""
    a, b = os.fstat(fd), os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _str_attr(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _u32_attr(kind: int, value: int) -> bytes:
    return _attr(kind, _U32.pack(value))


def _nested(kind: int, *attrs: bytes) -> bytes:
    # br_setlink() reads IFLA_PROTINFO without NLA_F_NESTED as the old one-byte port state,
    # so the flag matters there; elsewhere the kernel ignores it.
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _ifinfomsg(index: int = 0, flags: int = 0, change: int = 0, family: int = 0) -> bytes:
    return _IFINFOMSG.pack(family, 0, index, flags, change)


def _parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        start, end = offset + _RTATTR.size, offset + length
        attrs[kind & NLA_TYPE_MASK] = data[start:end]
        offset += (length + 3) & ~3  # attributes are 4-byte aligned (NLA_ALIGN)
    return attrs


def _cstr(payload: bytes | None) -> str | None:
    return None if payload is None else payload.split(b"\0", 1)[0].decode(errors="replace")


def parse_mac(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


@dataclass(frozen=True)
class Link:
    """What fcrun reads back about a network interface."""

    index: int
    name: str
    kind: str | None  # IFLA_INFO_KIND: "bridge", "veth", ...; None for lo and physical NICs
    alias: str | None
    master: int | None  # ifindex of the bridge this link is a port of


def _parse_link(body: bytes) -> Link:
    _family, _type, index, _flags, _change = _IFINFOMSG.unpack_from(body)
    attrs = _parse_attrs(body, _IFINFOMSG.size)
    kind = None
    if IFLA_LINKINFO in attrs:
        kind = _cstr(_parse_attrs(attrs[IFLA_LINKINFO]).get(IFLA_INFO_KIND))
    master = _U32.unpack(attrs[IFLA_MASTER])[0] if IFLA_MASTER in attrs else None
    return Link(
        index=index,
        name=_cstr(attrs.get(IFLA_IFNAME)) or "",
        kind=kind,
        alias=_cstr(attrs.get(IFLA_IFALIAS)),
        master=master,
    )


class Rtnl:
    """One NETLINK_ROUTE socket and the requests fcrun sends on it.

    Every method waits for the kernel's answer and raises KernelError naming the operation
    and the interface. Not thread-safe: one caller at a time (fcrun holds the IPAM lock).

    Resource handling: owns the socket; close() it or use ``with``.
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._seq = itertools.count(1)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------

    def _request(
        self, msg_type: int, flags: int, body: bytes, operation: str, obj: str
    ) -> list[bytes]:
        """Send one request; return the bodies of the kernel's replies (for GET and dumps).

        Raises:
            KernelError: the kernel answered with an error.
        """
        seq = next(self._seq)
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | flags, seq, 0)
        try:
            self._sock.send(header + body)
        except OSError as exc:
            raise KernelError.from_oserror(operation, obj, exc) from None
        replies: list[bytes] = []
        while True:
            try:
                data = self._sock.recv(_RECV_BUFSIZE)
            except OSError as exc:
                raise KernelError.from_oserror(operation, obj, exc) from None
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, reply_seq, _port = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    break
                start, end = offset + _NLMSGHDR.size, offset + length
                payload = data[start:end]
                offset += (length + 3) & ~3  # messages are 4-byte aligned (NLMSG_ALIGN)
                if reply_seq != seq:
                    continue  # an answer to an earlier request that gave up; not ours
                if kind == NLMSG_ERROR:
                    (err,) = _NLMSGERR.unpack_from(payload)
                    if err:
                        raise KernelError(operation, obj, -err)
                    return replies  # the ACK
                if kind == NLMSG_DONE:
                    return replies  # end of a dump
                replies.append(payload)

    # -- links ----------------------------------------------------------------------------

    def get_link(self, name: str) -> Link | None:
        """The interface called ``name`` in this socket's netns, or None."""
        try:
            replies = self._request(
                RTM_GETLINK,
                NLM_F_ACK,
                _ifinfomsg() + _str_attr(IFLA_IFNAME, name),
                "look up link",
                name,
            )
        except KernelError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return _parse_link(replies[0]) if replies else None

    def list_links(self) -> list[Link]:
        """Every interface in this socket's netns."""
        replies = self._request(RTM_GETLINK, NLM_F_DUMP, _ifinfomsg(), "list links", "(all)")
        return [_parse_link(body) for body in replies]

    def create_bridge(self, name: str, mac: str) -> None:
        """Create a bridge, down, with a fixed MAC.

        A fixed MAC matters: a bridge without one takes the lowest MAC among its ports, so it
        would change as containers come and go and stale the gateway's ARP entry in every
        container.
        """
        body = (
            _ifinfomsg()
            + _str_attr(IFLA_IFNAME, name)
            + _attr(IFLA_ADDRESS, parse_mac(mac))
            + _nested(IFLA_LINKINFO, _str_attr(IFLA_INFO_KIND, "bridge"))
        )
        self._request(
            RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body, "create bridge", name
        )

    def set_alias(self, index: int, name: str, alias: str) -> None:
        """``ip link set NAME alias ALIAS``. (rtnl_create_link ignores IFLA_IFALIAS, so it
        cannot be given at creation.)"""
        body = _ifinfomsg(index) + _str_attr(IFLA_IFALIAS, alias)
        self._request(RTM_NEWLINK, NLM_F_ACK, body, "set alias of", name)

    def create_veth(
        self, name: str, master: int, peer_name: str, peer_netns_fd: int, peer_mac: str
    ) -> None:
        """Create a veth pair, both ends down: ``name`` here as a port of bridge ``master``,
        ``peer_name`` directly inside the netns ``peer_netns_fd`` (never visible on the host).
        """
        peer = (
            _ifinfomsg()
            + _str_attr(IFLA_IFNAME, peer_name)
            + _attr(IFLA_ADDRESS, parse_mac(peer_mac))
            + _u32_attr(IFLA_NET_NS_FD, peer_netns_fd)
        )
        body = (
            _ifinfomsg()
            + _str_attr(IFLA_IFNAME, name)
            + _u32_attr(IFLA_MASTER, master)
            + _nested(
                IFLA_LINKINFO,
                _str_attr(IFLA_INFO_KIND, "veth"),
                _nested(IFLA_INFO_DATA, _attr(VETH_INFO_PEER | NLA_F_NESTED, peer)),
            )
        )
        what = f"{name} (peer {peer_name} in netns fd {peer_netns_fd})"
        self._request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body, "create veth", what)

    def set_bridge_port(self, index: int, name: str, options: Mapping[int, bool]) -> None:
        """``bridge link set dev NAME isolated on learning off ...``: the IFLA_BRPORT_* flags
        in ``options`` (attribute -> on/off), all in one request.

        An attribute the kernel does not know is ignored silently (br_setport parses
        IFLA_PROTINFO leniently); kernel 5.18 is the first with IFLA_BRPORT_LOCKED.
        """
        flags = b"".join(_attr(kind, bytes([int(on)])) for kind, on in sorted(options.items()))
        body = _ifinfomsg(index, family=AF_BRIDGE) + _nested(IFLA_PROTINFO, flags)
        self._request(RTM_SETLINK, NLM_F_ACK, body, "set bridge port options of", name)

    def set_up(self, index: int, name: str) -> None:
        body = _ifinfomsg(index, flags=IFF_UP, change=IFF_UP)
        self._request(RTM_NEWLINK, NLM_F_ACK, body, "set link up", name)

    def delete_link(self, name: str) -> bool:
        """Delete interface ``name``; False if there was none."""
        try:
            self._request(
                RTM_DELLINK,
                NLM_F_ACK,
                _ifinfomsg() + _str_attr(IFLA_IFNAME, name),
                "delete link",
                name,
            )
        except KernelError as exc:
            if exc.errno == errno.ENODEV:  # already gone (a veth dies with its netns)
                return False
            raise
        return True

    # -- bridge FDB and neighbours --------------------------------------------------------

    def add_static_fdb(self, port_index: int, port_name: str, mac: str) -> None:
        """``bridge fdb replace MAC dev PORT master static sticky``: the bridge sends frames for
        MAC to PORT only, and no learning anywhere moves the entry. The kernel removes it with
        the port."""
        body = _NDMSG.pack(AF_BRIDGE, port_index, NUD_NOARP, NTF_MASTER | NTF_STICKY, 0) + _attr(
            NDA_LLADDR, parse_mac(mac)
        )
        self._request(
            RTM_NEWNEIGH,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            body,
            "add static fdb entry",
            f"{mac} dev {port_name}",
        )

    def pin_neighbour(self, index: int, name: str, ip: str, mac: str) -> None:
        """``ip neigh replace IP lladdr MAC dev NAME nud permanent``: the kernel never changes
        a permanent entry on ARP input (neigh_update refuses without NEIGH_UPDATE_F_ADMIN),
        so no gratuitous ARP can redirect IP. Replaces whatever entry IP had."""
        body = (
            _NDMSG.pack(socket.AF_INET, index, NUD_PERMANENT, 0, 0)
            + _attr(NDA_DST, ipaddress.IPv4Address(ip).packed)
            + _attr(NDA_LLADDR, parse_mac(mac))
        )
        self._request(
            RTM_NEWNEIGH,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            body,
            "pin neighbour",
            f"{ip} lladdr {mac} dev {name}",
        )

    def delete_neighbour(self, index: int, name: str, ip: str) -> bool:
        """``ip neigh del IP dev NAME``; False if there was no entry."""
        body = _NDMSG.pack(socket.AF_INET, index, 0, 0, 0) + _attr(
            NDA_DST, ipaddress.IPv4Address(ip).packed
        )
        try:
            self._request(RTM_DELNEIGH, NLM_F_ACK, body, "delete neighbour", f"{ip} dev {name}")
        except KernelError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    # -- addresses and routes -------------------------------------------------------------

    def add_address(self, index: int, name: str, ip: str, prefixlen: int) -> None:
        """Add ``ip/prefixlen`` to a link; already having it is fine (NLM_F_REPLACE)."""
        packed = ipaddress.IPv4Address(ip).packed
        body = (
            _IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
            + _attr(IFA_LOCAL, packed)
            + _attr(IFA_ADDRESS, packed)
        )
        self._request(
            RTM_NEWADDR,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            body,
            "add address",
            f"{ip}/{prefixlen} to {name}",
        )

    def add_default_route(self, gateway: str, oif: int, oif_name: str) -> None:
        body = (
            _RTMSG.pack(
                socket.AF_INET,
                0,
                0,
                0,
                RT_TABLE_MAIN,
                RTPROT_BOOT,
                RT_SCOPE_UNIVERSE,
                RTN_UNICAST,
                0,
            )
            + _attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
            + _u32_attr(RTA_OIF, oif)
        )
        self._request(
            RTM_NEWROUTE,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            body,
            "add default route",
            f"via {gateway} dev {oif_name}",
        )


def _new_socket() -> socket.socket:
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    )
    try:
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


def open_rtnl(netns_fd: int | None = None) -> Rtnl:
    """An rtnetlink socket in the calling thread's netns, or in the netns ``netns_fd``.

    Raises:
        KernelError: the netns cannot be entered (bad fd, not a netns, no CAP_SYS_ADMIN) or
            the socket cannot be made.

    Resource handling: ``netns_fd`` stays the caller's. The thread is back in its own netns
    when this returns or raises; if even that fails the thread is unusable and we say so.
    """
    if netns_fd is None:
        try:
            return Rtnl(_new_socket())
        except OSError as exc:
            raise KernelError.from_oserror("open netlink socket", "(host netns)", exc) from None
    obj = f"netns fd {netns_fd}"
    home_fd = os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            setns(netns_fd, CLONE_NEWNET)
        except OSError as exc:
            raise KernelError.from_oserror("enter", obj, exc) from None
        try:
            sock = _new_socket()
        except OSError as exc:
            raise KernelError.from_oserror("open netlink socket in", obj, exc) from None
        finally:
            try:
                setns(home_fd, CLONE_NEWNET)
            except OSError as exc:
                # Cannot happen short of a kernel bug (we hold the fd and were allowed in),
                # but if it does, this thread must not touch the network again.
                log.critical("thread stuck in %s: return to own netns failed: %s", obj, exc)
                raise KernelError.from_oserror("return from", obj, exc) from None
    finally:
        os.close(home_fd)
    return Rtnl(sock)
