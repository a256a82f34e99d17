#!/usr/bin/env python3
"""Attaching a container's network namespace to fcrun's bridge and detaching it: BridgeNetwork
against iproute2 doing the same steps, measured in one run.

Each round uses fresh network namespaces (held by `unshare --net` children) and times, in turn:

  attach        BridgeNetwork.attach: a veth with eth0 in the netns, the host end a port of the
                bridge (isolated, no learning or flooding, locked), its static FDB entry and
                permanent neighbour entry, lo and eth0 up, address, default route
  detach_alive  BridgeNetwork.detach while the netns lives (fcrun deletes the veth)
  detach_gone   BridgeNetwork.detach(netns_gone=True) once the netns died (the kernel deletes
                the veth itself, in the background; the next round waits for that, untimed)
  ip_attach     the same steps with iproute2, as a shell script would: on the host `ip -batch -`
                (veth, port options, neighbour), `bridge fdb add`, `ip link set up`, then
                `nsenter --net=... ip -batch -` inside
  ip_detach     `ip -batch -`: delete the veth and the neighbour entry

Rounds alternate the two detaches, so each gets half of --runs. The bridge exists throughout
(a keeper attachment holds it), as it does while a host runs containers. Private names: a state
dir in /tmp, bridge fcn<pid>, subnet 10.241.0.0/24; everything is removed at the end.

Prints JSON: median/p99 (ms) of each step, fcrun's medians over iproute2's, and the targets the
network code was built to (attach <= 20 ms, detach with the netns gone <= 10 ms, with it alive
<= 100 ms; medians). Needs root. Usage: bench/network_attach.py [--runs 20] [--json]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from fcrun.network import BridgeNetwork, host_ifname, mac_for

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import preflight, summary  # noqa: E402

SUBNET = "10.241.0.0/24"
IP_BASELINE_HOST = 250  # the iproute2 side's address: far above what the IPAM hands out here
TARGETS_MS = {"attach": 20.0, "detach_gone": 10.0, "detach_alive": 100.0}
GONE_WAIT_S = 10.0  # how long the kernel may take to delete a dead netns's veth


class Namespaces:
    """Network namespaces held by `unshare --net` children; closes and kills what is left."""

    def __init__(self):
        self.children: dict[int, subprocess.Popen] = {}
        self.fds: set[int] = set()

    def new(self) -> tuple[int, int]:
        """(pid of the child holding it, an fd of it)."""
        child = subprocess.Popen(["unshare", "--net", "sh", "-c", "echo ready; exec sleep 600"],
                                 stdout=subprocess.PIPE, text=True)
        self.children[child.pid] = child
        if child.stdout.readline().strip() != "ready":  # before that, /proc/<pid>/ns/net is the host's
            raise RuntimeError("unshare --net did not start")
        fd = os.open(f"/proc/{child.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.fds.add(fd)
        return child.pid, fd

    def destroy(self, pid: int, fd: int) -> None:
        os.close(fd)
        self.fds.remove(fd)
        child = self.children.pop(pid)
        child.kill()
        child.wait()
        child.stdout.close()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for child in self.children.values():
            child.kill()
            child.wait()
            child.stdout.close()


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


def wait_gone(name: str) -> None:
    """Raises RuntimeError when the kernel has not deleted `name` after GONE_WAIT_S."""
    deadline = time.monotonic() + GONE_WAIT_S
    while link_exists(name):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} still exists {GONE_WAIT_S} s after its netns died")
        time.sleep(0.01)


def batch(tool: str, commands: list[str], netns_pid: int | None = None) -> None:
    """Run commands through one `ip -batch -` or `bridge -batch -` (in netns_pid's netns if given)."""
    argv = [tool, "-batch", "-"]
    if netns_pid is not None:
        argv = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", *argv]
    subprocess.run(argv, input="\n".join(commands) + "\n", text=True, check=True)


class IpBaseline:
    """What BridgeNetwork.attach/detach do, written with iproute2."""

    def __init__(self, bridge: str):
        subnet = ipaddress.ip_network(SUBNET)
        self.bridge = bridge
        self.ip = str(subnet.network_address + IP_BASELINE_HOST)
        self.gateway = str(subnet.network_address + 1)  # the IPAM's gateway: the bridge's address
        self.prefixlen = subnet.prefixlen
        self.mac = mac_for(self.ip)
        self.veth = host_ifname("bench-iproute2")

    def attach(self, netns_pid: int) -> None:
        batch("ip", [
            f"link add {self.veth} master {self.bridge} type veth peer name eth0 address {self.mac} netns {netns_pid}",
            f"link set dev {self.veth} type bridge_slave isolated on learning off flood off locked on",
            f"neigh replace {self.ip} lladdr {self.mac} dev {self.bridge} nud permanent",
        ])
        batch("bridge", [f"fdb add {self.mac} dev {self.veth} master static"])
        batch("ip", [f"link set {self.veth} up"])
        batch("ip", ["link set lo up", f"addr add {self.ip}/{self.prefixlen} dev eth0", "link set eth0 up",
                  f"route add default via {self.gateway} dev eth0"], netns_pid)

    def detach(self) -> None:
        batch("ip", [f"link del {self.veth}", f"neigh del {self.ip} dev {self.bridge}"])


def timed_ms(call, *args, **kwargs) -> float:
    start = time.perf_counter()
    call(*args, **kwargs)
    return (time.perf_counter() - start) * 1000


def measure(net: BridgeNetwork, namespaces: Namespaces, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"attach": [], "detach_alive": [], "detach_gone": [], "ip_attach": [],
                                     "ip_detach": []}
    baseline = IpBaseline(net.bridge)
    for i in range(runs):
        owner = f"bench-{os.getpid()}-{i}"
        pid, fd = namespaces.new()
        times["attach"].append(timed_ms(net.attach, owner, fd))
        if i % 2:
            times["detach_alive"].append(timed_ms(net.detach, owner))
            namespaces.destroy(pid, fd)
        else:
            namespaces.destroy(pid, fd)
            times["detach_gone"].append(timed_ms(net.detach, owner, netns_gone=True))
            wait_gone(host_ifname(owner))
        pid, fd = namespaces.new()
        times["ip_attach"].append(timed_ms(baseline.attach, pid))
        times["ip_detach"].append(timed_ms(baseline.detach))
        namespaces.destroy(pid, fd)
    return times


def report(times: dict[str, list[float]]) -> dict:
    steps = {what: summary(values) for what, values in times.items()}
    median = {what: s["median_ms"] for what, s in steps.items()}
    return {
        "steps": steps,
        "fcrun_over_iproute2": {"attach": round(median["attach"] / median["ip_attach"], 3),
                                "detach_alive": round(median["detach_alive"] / median["ip_detach"], 3)},
        "targets_ms": TARGETS_MS,
        "targets_met": {what: median[what] <= target for what, target in TARGETS_MS.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="rounds (each detach gets half)")
    parser.add_argument("--json", action="store_true", help="print the JSON on one line")
    args = parser.parse_args(argv)
    if code := preflight("bench/network_attach.py", ("ip", "bridge", "nsenter", "unshare")):
        return code
    if args.runs < 2:
        parser.error("--runs must be at least 2")
    state_dir = tempfile.mkdtemp(prefix="fcrun-bench-net-")
    net = BridgeNetwork(state_dir, f"fcn{os.getpid()}"[:15], SUBNET)
    namespaces = Namespaces()
    keeper = f"bench-{os.getpid()}-keeper"
    try:
        _pid, keeper_fd = namespaces.new()
        net.attach(keeper, keeper_fd)  # makes the bridge; it stays while the rounds run
        results = report(measure(net, namespaces, args.runs))
    finally:
        namespaces.close()
        net.gc(set())  # the keeper, and whatever a failed round left; then the bridge
        shutil.rmtree(state_dir)
    print(json.dumps(results) if args.json else json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
