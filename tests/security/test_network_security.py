"""Network attacks between instances on the bridge: taking another's address or MAC, reaching
another tenant, opening a packet socket without CAP_NET_RAW.

Two busybox containers on the test bridge (hostcheck.BRIDGE, 10.234.0.0/24): A serves "A" over
HTTP, B serves "B" and attacks, with the default capabilities (CAP_NET_RAW included) and the
probe at /probe. Every frame stays on the test bridge: the containers' eth0 and the host's
side of it. Each defence is shown to matter by a control that removes it and sees the attack
succeed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass

import msgspec
import pytest

from fcrun.network import mac_for
from fcrun.runtime.options import RunOptions, spec_from_image
from hostcheck import BRIDGE
from polling import retry_until_no_oserror
from secutil import probe_mount

pytestmark = [pytest.mark.root]

HTTP_PORT = 8080
# Serve the instance's own letter, so a reply says who answered.
SERVE = (
    "mkdir -p /tmp/www && echo {letter} > /tmp/www/index.html"
    f" && exec httpd -f -p {HTTP_PORT} -h /tmp/www"
)


@dataclass(frozen=True)
class Instance:
    name: str
    ip: str
    mac: str
    port: str  # its veth on the bridge, host side


def start(
    rt, image, probe: str, name: str, args: list[str], *, drop: tuple[str, ...] = ()
) -> Instance:
    """A detached container with the probe at /probe and the capabilities in `drop` removed."""
    spec = spec_from_image(image, RunOptions(args=args), name=name)
    caps = spec.process.capabilities
    fewer = {
        field: [cap for cap in getattr(caps, field) if cap not in drop]
        for field in ("bounding", "effective", "inheritable", "permitted", "ambient")
    }
    process = msgspec.structs.replace(
        spec.process, capabilities=msgspec.structs.replace(caps, **fewer)
    )
    spec = msgspec.structs.replace(
        spec, mounts=[*spec.mounts, probe_mount(probe)], process=process
    )
    container = rt.run(name, spec, image=image, detach=True)
    network = container.state.network
    return Instance(name=name, ip=network.ip, mac=mac_for(network.ip), port=network.host_ifname)


def exec_in(rt, instance: Instance, *args: str) -> str:
    """Run args in the instance; its stdout+stderr (the exit code is part of what tests read)."""
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        code = rt.exec(instance.name, list(args), stdio=(null, w, w))
    finally:
        os.close(w)
        os.close(null)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    return f"{out}exit {code}\n" if code else out


def host_socket() -> socket.socket:
    """A TCP socket that sends through the test bridge only. Concurrent root test runs each
    have a bridge with hostcheck.SUBNET, so the host's route to an address in it is ambiguous."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, BRIDGE.encode())
    return sock


def http_get(ip: str, timeout_s: float = 30.0) -> str:
    """The body of GET / from ip:HTTP_PORT, retried until the server is up."""

    def get() -> str:
        with host_socket() as conn:
            conn.settimeout(1)
            conn.connect((ip, HTTP_PORT))
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        return reply.partition(b"\r\n\r\n")[2].decode().strip()

    return retry_until_no_oserror(f"the server on {ip}:{HTTP_PORT} to answer", get, timeout_s)


def host_neighbour(ip: str) -> str:
    """The host's entry for ip on the bridge: "10.234.0.2 lladdr 0a:58:... PERMANENT" or ""."""
    fields = subprocess.run(
        ["ip", "neigh", "show", ip, "dev", BRIDGE], capture_output=True, text=True, check=True
    ).stdout.split()
    # busybox's ip adds "used A/B/C probes N" before the state; iproute2 does not.
    return " ".join(fields[:3] + fields[-1:]) if len(fields) > 3 else " ".join(fields)


def fdb_port_of(mac: str) -> str | None:
    """The port the bridge sends frames for mac to, or None."""
    out = subprocess.run(
        ["bridge", "fdb", "show", "br", BRIDGE], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        words = line.split()
        if words[0] == mac and words[1] == "dev" and words[2] != BRIDGE:
            return words[2]
    return None


def eventually(check, timeout_s: float = 2.0) -> bool:
    """True as soon as check() is; False if it never was within timeout_s (ARP input is
    processed in softirq, after the attacker's sendto returned)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def pair(runtime, busybox, probe):
    """(A, B): two instances serving "A" and "B"; B is the attacker. Both reachable already."""
    a = start(runtime, busybox, probe, "t-net-a", ["sh", "-c", SERVE.format(letter="A")])
    b = start(runtime, busybox, probe, "t-net-b", ["sh", "-c", SERVE.format(letter="B")])
    assert (http_get(a.ip), http_get(b.ip)) == ("A", "B")
    return a, b


# ----- ARP: nobody takes another instance's address ---------------------------------------------


def test_gratuitous_arp_cannot_take_another_instances_address(runtime, pair):
    a, b = pair
    assert host_neighbour(a.ip) == f"{a.ip} lladdr {a.mac} PERMANENT"

    assert exec_in(runtime, b, "/probe", "garp", "eth0", b.mac, a.ip) == "ok\n"

    assert not eventually(lambda: b.mac in host_neighbour(a.ip), timeout_s=0.5)
    assert host_neighbour(a.ip) == f"{a.ip} lladdr {a.mac} PERMANENT"
    assert http_get(a.ip) == "A"


def test_control_gratuitous_arp_does_poison_an_unpinned_entry(runtime, pair):
    """Without the permanent entry the same frame redirects the host's traffic for A to B."""
    a, b = pair
    subprocess.run(["ip", "neigh", "del", a.ip, "dev", BRIDGE], check=True)
    assert http_get(a.ip) == "A"  # the host resolves A again: a learned entry, A's MAC
    assert a.mac in host_neighbour(a.ip)

    assert exec_in(runtime, b, "/probe", "garp", "eth0", b.mac, a.ip) == "ok\n"

    assert eventually(lambda: b.mac in host_neighbour(a.ip)), host_neighbour(a.ip)


# ----- MAC: nobody takes another instance's MAC on the bridge ----------------------------------


def test_forged_source_mac_cannot_take_another_instances_mac(runtime, pair):
    a, b = pair
    assert fdb_port_of(a.mac) == a.port

    # A frame from B with A's MAC as its source (and a claim to B's own address).
    assert exec_in(runtime, b, "/probe", "garp", "eth0", a.mac, b.ip) == "ok\n"

    assert not eventually(lambda: fdb_port_of(a.mac) != a.port, timeout_s=0.5)
    assert http_get(a.ip) == "A"


def test_control_forged_source_mac_is_learned_on_an_open_port(runtime, pair):
    """With learning on, the port unlocked and A's static entry gone, the bridge moves A's MAC
    to B's port: the host's frames for A would go to B."""
    a, b = pair
    subprocess.run(
        ["bridge", "link", "set", "dev", b.port, "learning", "on", "locked", "off"], check=True
    )
    subprocess.run(["bridge", "fdb", "del", a.mac, "dev", a.port, "master"], check=True)

    assert exec_in(runtime, b, "/probe", "garp", "eth0", a.mac, b.ip) == "ok\n"

    assert eventually(lambda: fdb_port_of(a.mac) == b.port), fdb_port_of(a.mac)


def test_instance_cannot_change_its_own_mac_or_address(runtime, pair):
    """No CAP_NET_ADMIN in the container: its eth0 keeps the MAC and address fcrun gave it."""
    a, b = pair
    out = exec_in(runtime, b, "ip", "link", "set", "dev", "eth0", "address", a.mac)
    assert "Operation not permitted" in out, out
    out = exec_in(runtime, b, "ip", "addr", "add", f"{a.ip}/24", "dev", "eth0")
    assert "Operation not permitted" in out, out
    out = exec_in(runtime, b, "ip", "-o", "link", "show", "eth0")
    out += exec_in(runtime, b, "ip", "-o", "-4", "addr", "show", "eth0")
    assert f"link/ether {b.mac} " in out and f"inet {b.ip}/24" in out and a.ip not in out


# ----- Tenants do not reach each other ----------------------------------------------------------


def test_instances_cannot_reach_each_other_but_the_host_reaches_both(runtime, pair):
    a, b = pair
    assert exec_in(runtime, a, "/probe", "connect", b.ip, str(HTTP_PORT)).startswith("denied")
    assert exec_in(runtime, b, "/probe", "connect", a.ip, str(HTTP_PORT)).startswith("denied")
    assert (http_get(a.ip), http_get(b.ip)) == ("A", "B")
    # The probe's connect works at all: both reach a listener on the host's side of the bridge.
    gateway = a.ip.rsplit(".", 1)[0] + ".1"
    with host_socket() as listener:
        listener.bind((gateway, 0))
        listener.listen(8)
        port = str(listener.getsockname()[1])
        assert exec_in(runtime, a, "/probe", "connect", gateway, port) == "ok\n"
        assert exec_in(runtime, b, "/probe", "connect", gateway, port) == "ok\n"


# ----- CAP_NET_RAW ------------------------------------------------------------------------------


def test_without_cap_net_raw_no_packet_socket(runtime, busybox, probe):
    """What every ARP or MAC forgery needs; app and pool instances drop it."""
    plain = start(runtime, busybox, probe, "t-net-raw", ["sleep", "60"])
    dropped = start(runtime, busybox, probe, "t-net-noraw", ["sleep", "60"], drop=("CAP_NET_RAW",))

    assert exec_in(runtime, plain, "/probe", "rawsock") == "ok\n"  # the default set has it
    assert exec_in(runtime, dropped, "/probe", "rawsock") == "denied EPERM 1\n"
    garp = exec_in(runtime, dropped, "/probe", "garp", "eth0", plain.mac, dropped.ip)
    assert garp == "denied EPERM 1\n"
