#!/usr/bin/env python3
"""Why fcrun has its own rtnetlink client and cgroup drivers: pyroute2 and cgroupspy, measured.

pyroute2 and cgroupspy are not dependencies of fcrun; they go into a throwaway venv that
this script drives as a worker process (it imports nothing from fcrun there):

  /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/libs-venv
  /tmp/libs-venv/bin/pip install pyroute2 cgroupspy            # 0.9.7 and 0.2.3 when written
  # optional, for the NetNS of the 0.7 series (a helper process per object):
  /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/libs-venv-07
  /tmp/libs-venv-07/bin/pip install 'pyroute2==0.7.12'
  .venv/bin/python bench/netlink_libs.py --pyroute2-python /tmp/libs-venv/bin/python \
      --legacy-pyroute2-python /tmp/libs-venv-07/bin/python --runs 50 > result.json

1. The per-container operation, as BridgeNetwork._configure_inside does it: open an
   rtnetlink socket in the container's netns, set lo up, look up eth0, add 10.250.0.2/24 to
   it, set it up, add a default route via 10.250.0.1, close. Contenders:
     fcrun       rtnl.open_rtnl(netns fd) (setns in the calling thread, socket, setns back)
     NetNS       pyroute2.NetNS(name)
     IPRoute     pyroute2.IPRoute(netns=name) (pyroute2 >= 0.9.1)
     pushns      pyroute2.netns.pushns(name); IPRoute(); popns(): setns, no fork
   Every run gets a fresh netns (`ip netns add fcbench-PID-N`, then a veth pair eth0/peer0
   made inside it, peer0 up), made and checked with `ip` outside the timed part, and deleted
   right after. Rounds rotate the order of the contenders. Forks are counted with
   os.register_at_fork in the process that does the work (fcrun's in this one, pyroute2's in
   the worker); helper processes are counted from /proc/self/task/*/children while the
   socket is open. Open time (socket ready) and total time are reported. Once more, a
   pushns-opened IPRoute looks up peer0 from its own thread and from another thread.
2. Import time of fcrun.network.rtnl and of pyroute2: a fresh interpreter each time,
   perf_counter around the import, median of --import-runs.
3. cgroupspy against cgroup v2: its source (which file names it knows) and a real try in a
   test group it creates beneath this process's own cgroup on the cgroup2 mount.

Needs root and iproute2. Touches only namespaces named fcbench-PID-N (all deleted at the end,
with their veths) and the test group fcbench-cgroupspy-PID (removed at the end).
Usage: bench/netlink_libs.py --pyroute2-python PATH [--legacy-pyroute2-python PATH]
       [--runs 50] [--warmup 3] [--import-runs 9]
Prints JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time

NETNS_PREFIX = f"fcbench-{os.getpid()}-"
NETNS_DIR = "/run/netns"
CONTAINER_IFNAME = "eth0"
PEER_IFNAME = "peer0"  # the other end of the veth, also inside the netns: nothing on the host
ADDRESS = "10.250.0.2"
GATEWAY = "10.250.0.1"
PREFIXLEN = 24
LOOPBACK_INDEX = 1

_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(before=_count_fork)


def _children() -> list[int]:
    """Live child processes of every thread of this process (needs CONFIG_PROC_CHILDREN)."""
    pids: list[int] = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(path) as f:
            pids.extend(int(pid) for pid in f.read().split())
    return pids


def _threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def _timed(open_socket, configure, close, check=None) -> dict:
    """One run: open, (check, untimed), configure, (count helpers, untimed), close."""
    forks_before, children_before = _forks, set(_children())  # e.g. the driver's workers
    t0 = time.perf_counter()
    handle = open_socket()
    t1 = time.perf_counter()
    if check is not None:
        check(handle)
    t2 = time.perf_counter()
    configure(handle)
    t3 = time.perf_counter()
    children_open, threads_open = set(_children()) - children_before, _threads()
    t4 = time.perf_counter()
    close(handle)
    t5 = time.perf_counter()
    return {
        "open_s": t1 - t0,
        "total_s": (t1 - t0) + (t3 - t2) + (t5 - t4),
        "forks": _forks - forks_before,
        "children_while_open": len(children_open),
        "threads_while_open": threads_open,
        "children_after_close": len(set(_children()) - children_before),
    }


# -- worker: runs under the throwaway venv's python, imports pyroute2 / cgroupspy -------------


def _pyroute2_variants() -> dict:
    import pyroute2
    from pyroute2 import IPRoute, NetNS, netns

    version = tuple(int(part) for part in pyroute2.__version__.split(".")[:3])

    def configure(ipr) -> None:
        ipr.link("set", index=LOOPBACK_INDEX, state="up")
        (index,) = ipr.link_lookup(ifname=CONTAINER_IFNAME)
        ipr.addr("add", index=index, address=ADDRESS, prefixlen=PREFIXLEN)
        ipr.link("set", index=index, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=index)

    def pushns_open(name: str):
        netns.pushns(name)
        try:
            return IPRoute()
        finally:
            netns.popns()

    openers = {"NetNS": NetNS, "pushns": pushns_open}
    if version >= (0, 9, 1):
        openers["IPRoute"] = lambda name: IPRoute(netns=name)
    return {"version": pyroute2.__version__, "configure": configure, "openers": openers}


def _in_netns_guard(ipr) -> None:
    # peer0 exists only inside the benchmark's netns: refuse to touch any other namespace
    # (a socket opened in the host's netns would otherwise add the address to the host's eth0).
    if not ipr.link_lookup(ifname=PEER_IFNAME):
        raise RuntimeError("pyroute2 socket is not in the benchmark netns; nothing changed")


def _thread_probe(lib: dict, name: str) -> dict:
    """Which netns does a pyroute2 object opened in ``name`` talk to from another thread?

    Read-only: looks up peer0, which exists only inside ``name``.
    """
    import threading

    ipr = lib["openers"]["pushns"](name)
    try:
        seen: dict = {"the thread that opened it": bool(ipr.link_lookup(ifname=PEER_IFNAME))}
        other = threading.Thread(
            target=lambda: seen.update(
                {"another thread": bool(ipr.link_lookup(ifname=PEER_IFNAME))}
            )
        )
        other.start()
        other.join()
    finally:
        ipr.close()
    return {f"sees the netns's {PEER_IFNAME} from {key}": value for key, value in seen.items()}


def _worker() -> int:
    lib = _pyroute2_variants()
    print(json.dumps({"version": lib["version"], "variants": sorted(lib["openers"])}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["variant"] == "thread-probe":
            print(json.dumps(_thread_probe(lib, request["netns"])), flush=True)
            continue
        opener = lib["openers"][request["variant"]]
        try:
            result = _timed(
                lambda: opener(request["netns"]),
                lib["configure"],
                lambda ipr: ipr.close(),
                check=_in_netns_guard,
            )
        except Exception as exc:  # reported to the driver, which aborts the benchmark
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
    return 0


def _probe_cgroupspy(mount: str, own: str) -> int:
    """Try cgroupspy on cgroup v2: a test group beneath ``own`` (a path on the v2 mount)."""
    import cgroupspy
    from cgroupspy import controllers, nodes, trees

    package = os.path.dirname(cgroupspy.__file__)
    source = ""
    for path in sorted(glob.glob(os.path.join(package, "*.py"))):
        with open(path) as f:
            source += f.read()
    v2_files = ["cpu.max", "cpu.weight", "memory.max", "memory.high", "pids.max", "io.max",
                "cgroup.subtree_control", "cgroup.controllers", "cgroup.freeze", "cgroup2"]
    out: dict = {
        "source": {
            "controllers": sorted(name.decode() for name in nodes.Node.CONTROLLERS),
            # quoted, so that "memory.max_usage_in_bytes" does not count as memory.max
            "v2_names_in_source": {
                name: f'"{name}"' in source or f"'{name}'" in source for name in v2_files
            },
            "cpu_files": sorted(i.filename.decode() for i in
                                controllers.CpuController(None).list_interfaces().values()),
            "memory_files": sorted(i.filename.decode() for i in
                                   controllers.MemoryController(None).list_interfaces().values()),
        }
    }
    name = f"fcbench-cgroupspy-{os.getpid()}"
    rel = os.path.join(own.strip("/"), name) if own.strip("/") else name
    group_dir = os.path.join(mount, rel)
    with open(os.path.join(mount, own.lstrip("/"), "cgroup.controllers")) as f:
        out["host_v2_controllers_of_parent"] = f.read().split()
    steps: dict = {}

    def attempt(label: str, action) -> None:
        try:
            value = action()
            steps[label] = {"ok": True, "value": value}
        except Exception as exc:
            steps[label] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # Tree's children of root_path are controller hierarchies, named by directory.
        tree = trees.Tree(root_path=os.path.dirname(mount), groups=[os.path.basename(mount)],
                          sub_groups=[rel])
        node = tree.get_node_by_path("/" + os.path.basename(mount) + "/" + rel)
        steps["create test group via Tree(sub_groups=...)"] = {
            "ok": os.path.isdir(group_dir), "value": group_dir}
        steps["node.controller_type / node.controller"] = {
            "ok": node.controller is not None,
            "value": [None if node.controller_type is None else node.controller_type.decode(),
                      repr(node.controller)]}
        attempt("node.controller.procs (read cgroup.procs)", lambda: node.controller.procs)
        generic = controllers.Controller(node)  # the base class, built by hand
        attempt("Controller(node).procs (read)", lambda: generic.procs)

        def move_in() -> list[int]:
            generic.procs = [sleeper.pid]
            return generic.procs

        attempt("Controller(node).procs = [pid] (write)", move_in)
        attempt("Controller(node).tasks (v1 file)", lambda: generic.tasks)
        cpu, memory = controllers.CpuController(node), controllers.MemoryController(node)
        attempt("CpuController(node).cfs_quota_us (read)", lambda: cpu.cfs_quota_us)
        attempt("CpuController(node).get_content('cfs_quota_us')",
                lambda: cpu.get_content("cfs_quota_us"))

        def set_quota() -> None:
            cpu.cfs_quota_us = 50000

        def set_limit() -> None:
            memory.limit_in_bytes = 512 << 20

        attempt("CpuController(node).cfs_quota_us = 50000 (write)", set_quota)
        attempt("MemoryController(node).limit_in_bytes = 512M (write)", set_limit)
        attempt("get_property(b'cpu.max') (raw file read)",
                lambda: generic.get_property(b"cpu.max"))
        attempt("get_property(b'memory.max') (raw file read)",
                lambda: generic.get_property(b"memory.max"))
        attempt("get_property(b'cgroup.procs') (raw file read)",
                lambda: generic.get_property(b"cgroup.procs").split())
    finally:
        # Back to the parent group, so that the test group is empty and can go.
        with open(os.path.join(mount, own.lstrip("/"), "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        sleeper.kill()
        sleeper.wait()
        if os.path.isdir(group_dir):
            os.rmdir(group_dir)
    out["steps"] = steps
    out["test_group_removed"] = not os.path.exists(group_dir)
    print(json.dumps(out))
    return 0


# -- driver: runs under the project's venv, imports fcrun ----------------------------------


def _ip(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _make_netns(name: str, made: set[str]) -> None:
    _ip("netns", "add", name)
    made.add(name)
    _ip("-n", name, "link", "add", CONTAINER_IFNAME, "type", "veth", "peer", "name", PEER_IFNAME)
    _ip("-n", name, "link", "set", PEER_IFNAME, "up")


def _check_configured(name: str) -> None:
    """Raises RuntimeError unless the run configured lo, eth0 and the route inside ``name``."""
    links = {link["ifname"]: link for link in json.loads(_ip("-n", name, "-j", "link", "show"))}
    addrs = json.loads(_ip("-n", name, "-j", "addr", "show", "dev", CONTAINER_IFNAME))
    routes = json.loads(_ip("-n", name, "-j", "route", "show", "default"))
    have = {(a["local"], a["prefixlen"]) for entry in addrs for a in entry["addr_info"]}
    problems = []
    if "UP" not in links["lo"]["flags"]:
        problems.append("lo is down")
    if "UP" not in links[CONTAINER_IFNAME]["flags"]:
        problems.append(f"{CONTAINER_IFNAME} is down")
    if (ADDRESS, PREFIXLEN) not in have:
        problems.append(f"no {ADDRESS}/{PREFIXLEN} on {CONTAINER_IFNAME}: {sorted(have)}")
    if not any(r.get("gateway") == GATEWAY and r.get("dev") == CONTAINER_IFNAME for r in routes):
        problems.append(f"no default via {GATEWAY}: {routes}")
    if problems:
        raise RuntimeError(f"netns {name}: " + "; ".join(problems))


def _delete_netns(name: str, made: set[str]) -> None:
    _ip("netns", "del", name)  # its veth pair goes with it
    made.discard(name)


class Worker:
    """A --worker process under another python; one request at a time, JSON lines."""

    def __init__(self, python: str):
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        hello = json.loads(self.proc.stdout.readline())
        self.version, self.variants = hello["version"], hello["variants"]

    def run(self, variant: str, netns: str) -> dict:
        self.proc.stdin.write(json.dumps({"variant": variant, "netns": netns}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _fcrun_run(netns: str) -> dict:
    from fcrun.network import rtnl

    def open_socket():
        fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return rtnl.open_rtnl(fd)
        finally:
            os.close(fd)  # the socket stays in the netns on its own

    def configure(inner) -> None:
        inner.set_up(rtnl.LOOPBACK_IFINDEX, "lo")
        eth = inner.get_link(CONTAINER_IFNAME)
        inner.add_address(eth.index, CONTAINER_IFNAME, ADDRESS, PREFIXLEN)
        inner.set_up(eth.index, CONTAINER_IFNAME)
        inner.add_default_route(GATEWAY, eth.index, CONTAINER_IFNAME)

    def check(inner) -> None:
        if inner.get_link(PEER_IFNAME) is None:
            raise RuntimeError("fcrun socket is not in the benchmark netns; nothing changed")

    return _timed(open_socket, configure, lambda inner: inner.close(), check=check)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]  # nearest rank


def _summary(runs: list[dict]) -> dict:
    total = [r["total_s"] * 1e3 for r in runs]
    opened = [r["open_s"] * 1e3 for r in runs]
    return {
        "runs": len(runs),
        "total_ms": {"p50": statistics.median(total), "p99": _p99(total), "min": min(total)},
        "open_ms": {"p50": statistics.median(opened), "p99": _p99(opened)},
        "forks_per_run": sorted({r["forks"] for r in runs}),
        "helper_processes_while_open": sorted({r["children_while_open"] for r in runs}),
        "threads_while_open": sorted({r["threads_while_open"] for r in runs}),
        "children_after_close": sorted({r["children_after_close"] for r in runs}),
    }


def _import_ms(python: str, statement: str, runs: int) -> dict:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    times = []
    for _ in range(runs):
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(out.stdout) * 1e3)
    return {"statement": statement, "python": python, "p50_ms": statistics.median(times),
            "min_ms": min(times), "runs": runs}


def _cgroup2_mount() -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return fields[4]
    raise RuntimeError("no cgroup2 mount in /proc/self/mountinfo")


def _own_cgroup2_path() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    raise RuntimeError("this process has no cgroup v2 path in /proc/self/cgroup")


def bench(args: argparse.Namespace) -> dict:
    workers: dict[str, Worker] = {}
    made: set[str] = set()
    try:
        workers["pyroute2"] = Worker(args.pyroute2_python)
        if args.legacy_pyroute2_python:
            workers["legacy"] = Worker(args.legacy_pyroute2_python)
        contenders: list[tuple[str, Worker | None, str]] = [("fcrun", None, "")]
        for key, worker in workers.items():
            # The legacy series is here for its NetNS only (it has no IPRoute(netns=)).
            variants = ["NetNS"] if key == "legacy" else worker.variants
            contenders += [(f"pyroute2 {worker.version} {v}", worker, v) for v in variants]
        samples: dict[str, list[dict]] = {label: [] for label, _, _ in contenders}
        counter = 0
        for round_no in range(args.warmup + args.runs):
            shift = round_no % len(contenders)
            for label, worker, variant in contenders[shift:] + contenders[:shift]:
                name = f"{NETNS_PREFIX}{counter}"
                counter += 1
                _make_netns(name, made)
                result = _fcrun_run(name) if worker is None else worker.run(variant, name)
                if "error" in result:
                    raise RuntimeError(f"{label} in {name}: {result['error']}")
                _check_configured(name)
                _delete_netns(name, made)
                if round_no >= args.warmup:
                    samples[label].append(result)
        name = f"{NETNS_PREFIX}{counter}"
        _make_netns(name, made)
        thread_probe = workers["pyroute2"].run("thread-probe", name)
        _delete_netns(name, made)
        for worker in workers.values():
            worker.close()
    finally:
        for name in sorted(made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for worker in workers.values():
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
    leftovers = [n for n in os.listdir(NETNS_DIR) if n.startswith(NETNS_PREFIX)]
    summaries = {label: _summary(runs) for label, runs in samples.items()}
    base = summaries["fcrun"]
    for label, summary in summaries.items():
        summary["p50_vs_fcrun"] = summary["total_ms"]["p50"] / base["total_ms"]["p50"]
        summary["p99_vs_fcrun"] = summary["total_ms"]["p99"] / base["total_ms"]["p99"]
    versions = {key: worker.version for key, worker in workers.items()}

    imports = {"fcrun.network.rtnl": _import_ms(sys.executable, "import fcrun.network.rtnl",
                                                args.import_runs)}
    for key, python in (("pyroute2", args.pyroute2_python),
                        ("legacy", args.legacy_pyroute2_python)):
        if python:
            imports[f"pyroute2 {versions[key]}"] = _import_ms(
                python, "from pyroute2 import IPRoute, NetNS", args.import_runs)
    base_ms = imports["fcrun.network.rtnl"]["p50_ms"]
    for entry in imports.values():
        entry["p50_vs_fcrun"] = entry["p50_ms"] / base_ms

    mount, own = _cgroup2_mount(), _own_cgroup2_path()
    probe = subprocess.run(
        [args.pyroute2_python, os.path.abspath(__file__), "--probe-cgroupspy", mount, own],
        capture_output=True, text=True,
    )
    if probe.returncode != 0:
        raise RuntimeError(f"cgroupspy probe failed: {probe.stderr.strip()}")
    cgroupspy = json.loads(probe.stdout)
    cgroupspy["mount"], cgroupspy["own_cgroup"] = mount, own

    return {
        "host": {"kernel": os.uname().release, "cpus": os.cpu_count(),
                 "python": sys.version.split()[0]},
        "operation": (f"open rtnetlink socket in a fresh netns; lo up; look up {CONTAINER_IFNAME}; "
                      f"add {ADDRESS}/{PREFIXLEN}; {CONTAINER_IFNAME} up; "
                      f"default via {GATEWAY}; close"),
        "warmup": args.warmup,
        "pyroute2_versions": versions,
        "netns": summaries,
        "pyroute2_pushns_object_used_from_two_threads": thread_probe,
        "import": imports,
        "cgroupspy": cgroupspy,
        "leftover_netns": leftovers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyroute2-python", "--libs-python",
                        help="python of the throwaway venv with pyroute2 and cgroupspy")
    parser.add_argument("--legacy-pyroute2-python", help="python of a venv with pyroute2 0.7")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--import-runs", type=int, default=9)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-cgroupspy", nargs=2, metavar=("MOUNT", "OWN"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker()
    if args.probe_cgroupspy:
        return _probe_cgroupspy(*args.probe_cgroupspy)
    if not args.pyroute2_python:
        parser.error("--pyroute2-python is required (see the setup at the top of this file)")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, cgroups)")
    print(json.dumps(bench(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
