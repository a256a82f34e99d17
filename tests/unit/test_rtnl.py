"""The bytes fcrun's rtnetlink client sends, against a fake socket (no root).

The expected messages are written out field by field, as iproute2 sends them
(``ip neigh replace ... nud permanent``, ``bridge fdb replace ... master static sticky``,
``bridge link set dev ... learning off flood off isolated on locked on``); the real kernel
takes them in tests/root/test_network_root.py and tests/security/test_network_security.py.
"""

from __future__ import annotations

import errno
import struct
import sys

import pytest

from fcrun.errors import KernelError
from fcrun.network.bridge import PORT_OPTIONS
from fcrun.network.rtnl import Rtnl

pytestmark = pytest.mark.skipif(
    sys.byteorder != "little", reason="the expected bytes are little-endian"
)


class FakeSocket:
    """Records what is sent; answers each request with an ACK, or with ``-errno``."""

    def __init__(self, answer_errno: int = 0):
        self.sent: list[bytes] = []
        self.answer_errno = answer_errno

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, bufsize: int) -> bytes:
        request = self.sent[-1]
        _length, _type, _flags, seq, _port = struct.unpack_from("=IHHII", request)
        # struct nlmsgerr: the error, then the request's own header
        return struct.pack("=IHHIIi", 36, 2, 0, seq, 0, -self.answer_errno) + request[:16]

    def close(self) -> None:
        pass


def sent_by(call) -> bytes:
    sock = FakeSocket()
    call(Rtnl(sock))
    assert len(sock.sent) == 1
    return sock.sent[0]


def test_pin_neighbour_is_a_permanent_ipv4_entry_on_the_bridge():
    message = sent_by(lambda r: r.pin_neighbour(7, "fcrun0", "10.88.0.5", "0a:58:0a:58:00:05"))
    assert message == bytes.fromhex(
        # len 48, RTM_NEWNEIGH, REQUEST|ACK|REPLACE|CREATE, seq 1, port 0
        "30000000" "1c00" "0505" "01000000" "00000000"
        "02" "000000" "07000000" "8000" "00" "00"  # ndmsg: AF_INET, ifindex 7, NUD_PERMANENT
        "0800" "0100" "0a580005"  # NDA_DST 10.88.0.5
        "0a00" "0200" "0a580a580005" "0000"  # NDA_LLADDR, padded to 4
    )


def test_add_static_fdb_is_static_sticky_and_for_the_bridge():
    message = sent_by(lambda r: r.add_static_fdb(12, "fcvabc", "0a:58:0a:58:00:05"))
    assert message == bytes.fromhex(
        "28000000" "1c00" "0505" "01000000" "00000000"  # len 40, RTM_NEWNEIGH, REPLACE|CREATE
        # ndmsg: AF_BRIDGE, port 12, NUD_NOARP, NTF_MASTER|NTF_STICKY
        "07" "000000" "0c000000" "4000" "44" "00"
        "0a00" "0200" "0a580a580005" "0000"  # NDA_LLADDR
    )


def test_delete_neighbour_names_the_address():
    message = sent_by(lambda r: r.delete_neighbour(7, "fcrun0", "10.88.0.5"))
    assert message == bytes.fromhex(
        "24000000" "1d00" "0500" "01000000" "00000000"  # len 36, RTM_DELNEIGH, REQUEST|ACK
        "02" "000000" "07000000" "0000" "00" "00"  # AF_INET, ifindex 7
        "0800" "0100" "0a580005"  # NDA_DST
    )


def test_delete_neighbour_that_is_not_there_is_false():
    assert Rtnl(FakeSocket(errno.ENOENT)).delete_neighbour(7, "fcrun0", "10.88.0.5") is False
    assert Rtnl(FakeSocket()).delete_neighbour(7, "fcrun0", "10.88.0.5") is True


def test_neighbour_errors_name_operation_and_object():
    with pytest.raises(KernelError) as exc_info:
        Rtnl(FakeSocket(errno.EPERM)).pin_neighbour(7, "fcrun0", "10.88.0.5", "0a:58:0a:58:00:05")
    assert exc_info.value.args[0] == (
        "pin neighbour 10.88.0.5 lladdr 0a:58:0a:58:00:05 dev fcrun0:"
        " [Errno 1] Operation not permitted"
    )
    with pytest.raises(KernelError) as exc_info:
        Rtnl(FakeSocket(errno.ENODEV)).delete_neighbour(7, "fcrun0", "10.88.0.5")
    assert exc_info.value.errno == errno.ENODEV


def test_set_bridge_port_sends_every_flag_in_one_nested_protinfo():
    message = sent_by(lambda r: r.set_bridge_port(12, "fcvabc", PORT_OPTIONS))
    assert message == bytes.fromhex(
        "44000000" "1300" "0500" "01000000" "00000000"  # len 68, RTM_SETLINK, REQUEST|ACK
        "07" "00" "0000" "0c000000" "00000000" "00000000"  # ifinfomsg: AF_BRIDGE, index 12
        "2400" "0c80"  # IFLA_PROTINFO | NLA_F_NESTED: without, br_setlink reads a port state
        "0500" "0800" "00" "000000"  # IFLA_BRPORT_LEARNING off
        "0500" "0900" "00" "000000"  # IFLA_BRPORT_UNICAST_FLOOD off
        "0500" "2100" "01" "000000"  # IFLA_BRPORT_ISOLATED on
        "0500" "2700" "01" "000000"  # IFLA_BRPORT_LOCKED on
    )
