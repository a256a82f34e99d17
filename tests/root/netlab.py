"""The kernel-facing pieces of the cluster lab (cluster.py): joining a host's network namespace
from a thread, finding and killing every process of a host, removing what a host's serve left,
and reaping the labs of test runs that died without tearing theirs down.

A host here is anything with the attributes of cluster.LabHost that these use: netns, netns_path,
veth, cgroup_parent, bridge, subnet, dir (its state directory: data/ and run/ beneath).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import types
from typing import Callable, TypeVar

from fcrun import syscalls

T = TypeVar("T")

NETNS_DIR = "/run/netns"
LAN_PREFIX = "fcl"  # a lab's LAN bridge, veths, namespaces and directory all start with fcl<4 hex>
LAB_FILE = "lab.json"  # in a lab's directory: its owner (the test process) and what it makes
KILL_ROUNDS = 200  # a process can fork between our listing and our kill: list again until none
CGROUP_DEPTH = 9  # slashes: how deep under /sys/fs/cgroup a host's cgroup parent is looked for


def ip(*args: str) -> str:
    """`ip ARGS`' output.

    Raises:
        RuntimeError: it failed; the message has the command and its stderr.
    """
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def join_netns(netns_path: str) -> None:
    """Move the calling thread (only it: setns(CLONE_NEWNET) is per thread) into the network
    namespace at netns_path. Sockets it makes afterwards belong to that namespace."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.setns(fd, syscalls.CLONE_NEWNET)
    finally:
        os.close(fd)


def in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """fn()'s result, called in a new thread that joined the network namespace at netns_path
    (the test process itself stays in the root namespace).

    Raises:
        whatever fn raised; OSError if the namespace could not be joined.
    """
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            join_netns(netns_path)
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=body, name=f"in-netns {os.path.basename(netns_path)}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def cgroup_dirs(cgroup_parent: str) -> list[str]:
    """The cgroup named cgroup_parent in each hierarchy under /sys/fs/cgroup (none before a serve made it)."""
    found = []
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(dirpath) == cgroup_parent:
            found.append(dirpath)
            dirnames[:] = []
        elif dirpath.count("/") > CGROUP_DEPTH:
            dirnames[:] = []
    return found


def host_pids(host) -> set[int]:
    """Every process of host: in its network namespace (serve, its fork-server and pool), or in
    its cgroups (its instances, which have network namespaces of their own)."""
    pids: set[int] = set()
    try:
        ns = os.stat(host.netns_path)
    except FileNotFoundError:
        ns = None
    if ns is not None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")  # fails for a zombie: nothing left to kill
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
                pids.add(int(entry))
    for directory in cgroup_dirs(host.cgroup_parent):
        for dirpath, _, _ in os.walk(directory):
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    pids.update(int(p) for p in f.read().split())
            except OSError:
                continue  # removed meanwhile
    return pids


def kill_all(host, also: Callable[[], set[int]] = set) -> list[int]:
    """kill -9 every process of host (and also()'s pids) until none is left; the pids killed.

    Raises:
        AssertionError: some still ran after KILL_ROUNDS rounds.
    """
    killed: list[int] = []
    for _ in range(KILL_ROUNDS):
        pids = host_pids(host) | also()
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"{host} still has processes after {KILL_ROUNDS} rounds of kill -9: {host_pids(host)}")


def reap_state(host) -> list[str]:
    """Remove the containers host's serve left (mounts, cgroups, leases, its container bridge);
    their names. Call it inside host's namespace (in_netns), where the veths and bridge live."""
    from fcrun.paths import Paths
    from fcrun.runtime import Runtime

    if not os.path.isdir(os.path.join(host.dir, "run")):
        return []  # no serve ran there
    rt = Runtime(Paths(data_root=os.path.join(host.dir, "data"), run_root=os.path.join(host.dir, "run")),
                 cgroup_parent=host.cgroup_parent, bridge=host.bridge, subnet=host.subnet)
    left = rt.states.names()
    for name in left:
        rt.delete(name, force=True)
    rt.remove_cgroup_parent_if_unused()  # with a killed fork-server's primer group
    rt.network.remove_bridge_if_unused()
    return left


def netns_links(host) -> list[str]:
    """The links in host's namespace, by name."""
    return sorted(line.split(":")[1].strip().split("@")[0] for line in ip("-n", host.netns, "-o", "link").splitlines())


def del_link(name: str) -> None:
    """Remove a link of the root namespace if it is there (a veth takes its peer along)."""
    if subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0:
        ip("link", "del", name)


def del_netns(host) -> None:
    if os.path.exists(host.netns_path):
        ip("netns", "del", host.netns)


def mounts_under(directory: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(directory + "/")]


def remove_dir(directory: str) -> list[str]:
    """rmtree directory unless something is mounted beneath it (a leftover instance's rootfs
    holds a bind mount of the site: removing through it would delete the site). The mounts."""
    mounted = mounts_under(directory)
    if not mounted:
        shutil.rmtree(directory, ignore_errors=False)
    return mounted


def write_lab_file(directory: str, record: dict) -> None:
    with open(os.path.join(directory, LAB_FILE), "w") as f:
        json.dump({"owner": os.getpid(), **record}, f)


def reap_stale_labs() -> list[str]:
    """Tear down the labs of test runs that died without doing so (a killed pytest runs no
    finalizer): each lab directory whose owner process is gone. Their PostgreSQL servers are
    pgserver.reap_stale's. Returns the directories reaped."""
    reaped = []
    for lab_file in glob.glob(os.path.join(tempfile.gettempdir(), LAN_PREFIX + "*", LAB_FILE)):
        try:
            with open(lab_file) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue  # being written right now, or not ours
        if os.path.exists(f"/proc/{record['owner']}"):
            continue
        for fields in record["hosts"]:
            host = types.SimpleNamespace(**fields)
            kill_all(host)
            if os.path.exists(host.netns_path):
                in_netns(host.netns_path, lambda: reap_state(host))
            else:
                reap_state(host)
            del_link(host.veth)
            del_netns(host)
        del_link(record["bridge"])
        remove_dir(os.path.dirname(lab_file))
        reaped.append(os.path.dirname(lab_file))
    return reaped
