#!/usr/bin/env python3
"""How many pooled and frozen apache-php instances fit on this machine (issue 6).

A fork-server (the library's `python -m fcrun.forkserver`, as `fcrun serve` starts it) on
private roots fills a pool of --instances apache-php instances (default limits: 1 CPU, 512M;
all pre-warmed and frozen). Then half of them are claimed for apps (a docroot with phpinfo),
each serves one GET /, and is frozen again: the frozen tier of `fcrun serve`. The host's
memory is read before and after each phase (MemAvailable, so kernel memory for namespaces,
veths, page tables and the page cache counts too), together with the instances' cgroup
figures. Prints JSON: bytes per instance both ways, and the extrapolation to 24 GiB,
(24 GiB - what the host used before) / (host bytes per instance).

Needs root and the apache-php image. Uses a private cgroup parent, bridge (10.240.0.0/22) and
roots; talks only to 127.0.0.1 and the instances' addresses; removes everything at the end.
Usage: bench/pool_density.py [--instances 200] [--warming 4] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from fcrun import Paths
from fcrun.forkserver import Client
from fcrun.forkserver import protocol as p
from fcrun.runtime import Runtime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import preflight  # noqa: E402

GIB = 1 << 30
SUBNET = "10.240.0.0/22"


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def settle() -> int:
    """MemAvailable once it stops moving (the kernel frees netns and slab lazily)."""
    last = mem_available()
    for _ in range(20):
        time.sleep(0.25)
        now = mem_available()
        if abs(now - last) < (4 << 20):
            return now
        last = now
    return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--warming", type=int, default=4, help="instances warming at once while filling")
    parser.add_argument("--image-root", default=os.environ.get("FCRUN_ROOT", "/var/lib/fcrun"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds the pool may take to fill")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if code := preflight("bench/pool_density.py"):
        return code
    tag = str(os.getpid())
    work = tempfile.mkdtemp(prefix="fcrun-density-")
    os.chmod(work, 0o755)
    paths = Paths(data_root=os.path.join(work, "data"), run_root=os.path.join(work, "run"))
    os.makedirs(os.path.join(paths.data_root, "images"))
    os.symlink(os.path.join(args.image_root, "layers"), os.path.join(paths.data_root, "layers"))
    shutil.copy(os.path.join(args.image_root, "images", "apache-php.json"), os.path.join(paths.data_root, "images"))
    site = os.path.join(work, "site")
    os.makedirs(site)
    with open(os.path.join(site, "index.php"), "w") as f:
        f.write("<?php phpinfo();\n")
    cgroup_parent, bridge = f"fcrun-density-{tag}", f"fcd{tag}"[:15]
    runtime = Runtime(paths, cgroup_parent=cgroup_parent, bridge=bridge, subnet=SUBNET)
    sock = os.path.join(paths.run_root, "forkserver.sock")
    before = settle()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "fcrun.forkserver", "--socket", sock,
                             "--data-root", paths.data_root, "--run-root", paths.run_root,
                             "--cgroup-parent", cgroup_parent, "--bridge", bridge, "--subnet", SUBNET,
                             "--pool", f"apache-php={args.instances}", "--pool-warming", str(args.warming),
                             "--docroot-root", work,
                             "--parent-pid", str(os.getpid())], stdout=subprocess.PIPE)
    out: dict = {"benchmark": "memory of pooled and frozen apache-php instances", "instances": args.instances}
    claimed: list[str] = []
    try:
        if not proc.stdout.readline().startswith(b"ready"):
            raise SystemExit("the fork-server did not start")
        with Client(sock, timeout_s=120) as fs:
            while True:
                status = fs.request(p.Status()).images["apache-php"]
                if status.ready >= args.instances:
                    break
                if status.failures:
                    raise SystemExit(f"pool failures: {status.last_error}")
                if time.monotonic() - t0 > args.timeout:
                    raise SystemExit(f"pool not full after {args.timeout:g} s: {status}")
                time.sleep(0.5)
            fill_s = time.monotonic() - t0
            pooled = settle()
            cgroup_pooled = fs.request(p.Status()).images["apache-php"].memory_bytes
            # Then as many as half of them become apps' instances: claimed, one request each, frozen
            # (serve's frozen tier). The pool refills behind them: N pooled + N/2 frozen apps.
            half = args.instances // 2
            for i in range(half):
                made = fs.request(p.Claim(image="apache-php", labels={"fcrun.app": f"app{i}.test"},
                                          limits=p.InstanceLimits(cpu=1.0, memory_bytes=512 << 20), docroot=site))
                if not isinstance(made, p.Made):
                    raise SystemExit(f"claim {i}: {made}")
                claimed.append(made.name)
                conn = http.client.HTTPConnection(made.ip, 80, timeout=10)
                conn.request("GET", "/")
                body = conn.getresponse().read()
                conn.close()
                if b"PHP Version" not in body:
                    raise SystemExit(f"{made.name}: no phpinfo")
                runtime.freeze(made.name)
            while fs.request(p.Status()).images["apache-php"].ready < args.instances:
                if time.monotonic() - t0 > args.timeout:
                    raise SystemExit("the pool did not refill")
                time.sleep(0.5)
        mixed = settle()
        total = len(runtime.states.names())
        cgroup_frozen_apps = [runtime.cgroup(n).stats().memory_bytes for n in claimed]
        per_instance = (before - mixed) / total
        per_pooled = (before - pooled) / args.instances
        out.update({
            "fill_seconds": round(fill_s, 1),
            "host_mem_available_before_bytes": before,
            "host_bytes_per_pooled_instance": int(per_pooled),
            "instances_at_the_end": {"pooled": args.instances, "claimed_served_frozen": len(claimed), "total": total},
            "host_bytes_per_instance_mixed": int(per_instance),
            "cgroup_bytes_pooled_median": int(statistics.median(cgroup_pooled)),
            "cgroup_bytes_claimed_frozen_median": int(statistics.median(cgroup_frozen_apps)) if claimed else None,
            "fit_in_24GiB": int((24 * GIB - (_mem_total() - before)) // per_instance),
            "notes": [
                "host bytes: the drop in MemAvailable divided by the instances (kernel memory, page tables, "
                "page cache and the fork-server included), after it settled",
                "fit_in_24GiB extrapolates linearly from this many instances on this host: (24 GiB - memory in use "
                "before the benchmark) / host bytes per instance; the page cache of the shared image layers is "
                "counted once, so more instances cost slightly less each",
                "memory limits (512M each) are not what bounds density: a frozen instance uses far less",
            ],
        })
    finally:
        with Client(sock, timeout_s=300) as fs:
            fs.request(p.Shutdown(remove_pool=True))
        proc.wait(timeout=300)
        for name in claimed:
            runtime.delete(name, force=True)
        for name in runtime.states.names():  # anything else (should be nothing)
            runtime.delete(name, force=True)
        runtime.cgroups.remove_parent_if_empty()
        runtime.network.remove_bridge_if_unused()
        shutil.rmtree(work, ignore_errors=True)
    out["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


if __name__ == "__main__":
    sys.exit(main())
