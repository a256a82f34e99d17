#!/usr/bin/env python3
"""Memory of `fcrun serve` with many apps registered and some instances running.

Phases, on private roots (one real `fcrun serve` process per phase, the same config):

  1. empty:     serve with no apps, idle (the baseline)
  2. apps_idle: --apps apps written to the CMDB (fcrun.cmdb.open_cmdb(paths).add_app, before
                serve starts), none running
  3. running:   the same serve after one request through the proxy to each of --instances
                different apps (each starts an apache-php instance with a tiny index.php
                docroot and a small memory limit), then one more (hot) request to each

For each phase: serve's VmRSS and VmHWM (/proc/PID/status), also RssAnon/RssFile and PSS, and
its helper processes (descendants outside the instances' cgroups, e.g. the spawner and its
forks), summed as PSS so that pages they share copy-on-write are counted once.
For the running phase also the instances' memory: the sum of their cgroups' memory usage
(`fcrun ps --json` names them; Runtime.state(name) -> cgroup stats().memory_bytes, which on
cgroup v1 includes page cache charged to the cgroup), with rss/cache from memory.stat.
Target (issue 4): serve's RSS with 1,000 apps and 20 instances < 150 MiB.

Needs root and the apache-php image. Private bridge 10.235.0.0/24 and cgroup parent; talks to
127.0.0.1 only (serve talks to its instances). Everything it makes is removed at the end.
Usage: bench/serve_memory.py [--apps 1000] [--instances 20] [--memory 64M] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

from fcrun.cmdb import App, open_cmdb
from fcrun.serve.testing import ServeProcess

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import preflight, process_stats, work_dir_with_site  # noqa: E402

SUBNET = "10.235.0.0/24"
MIB = 1 << 20
TARGET_RSS_BYTES = 150 * MIB


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem and Pss (smaps_rollup) of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid, fields in process_stats().items():
        kids.setdefault(int(fields[1]), []).append(pid)
    return kids


def helpers(pid: int, cgroup_parent: str) -> list[dict]:
    """serve's descendants that are not container processes (not in an instance cgroup)."""
    kids = children_map()
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/cgroup") as f:
                if cgroup_parent in f.read():
                    continue
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
            out.append({"pid": p, "ppid": ppid_of(p), "cmdline": cmdline, **proc_status(p)})
        except OSError:
            continue
        todo.extend(kids.get(p, []))
    return out


def mib(n: int) -> float:
    return round(n / MIB, 1)


class MemoryServe(ServeProcess):
    """`fcrun serve` on private roots that can report its own and its helpers' memory."""

    def memory(self) -> dict:
        own = proc_status(self.proc.pid)
        extra = helpers(self.proc.pid, self.cgroup_parent)
        return {
            "serve_pid": self.proc.pid,
            "vmrss_mib": mib(own["VmRSS"]),
            "vmhwm_mib": mib(own["VmHWM"]),
            "rss_anon_mib": mib(own.get("RssAnon", 0)),
            "rss_file_mib": mib(own.get("RssFile", 0)),
            "helpers": [{"cmdline": h["cmdline"], "parent_is_serve": h["ppid"] == self.proc.pid, "vmrss_mib": mib(h["VmRSS"]), "pss_mib": mib(h.get("Pss", 0))} for h in extra],
            "pss_mib": mib(own.get("Pss", 0)),
            "pss_with_helpers_mib": mib(own.get("Pss", 0) + sum(h.get("Pss", 0) for h in extra)),
        }


def cgroup_memory_stat(memory_dir: str) -> dict[str, int]:
    """rss/cache (v1 total_*, or v2 anon/file) and OOM counts from a memory cgroup dir."""
    out: dict[str, int] = {}
    try:
        with open(os.path.join(memory_dir, "memory.stat")) as f:
            stat = dict((k, int(v)) for k, v in (line.split() for line in f))
    except (OSError, ValueError):
        return out
    out["rss"] = stat.get("total_rss", stat.get("anon", 0))
    out["cache"] = stat.get("total_cache", stat.get("file", 0))
    for name, key in (("memory.oom_control", "oom_kill"), ("memory.events", "oom_kill")):
        try:
            with open(os.path.join(memory_dir, name)) as f:
                for line in f:
                    k, _, v = line.partition(" ")
                    if k == key:
                        out["oom_kill"] = int(v)
        except OSError:
            pass
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--memory", default="64M", help="each app's memory limit (default 64M)")
    parser.add_argument("--cpu", type=float, default=0.5, help="each app's CPU limit (default 0.5)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each sample")
    parser.add_argument("--image-root", default=os.environ.get("FCRUN_ROOT", "/var/lib/fcrun"),
                        help="data root holding the apache-php image")
    parser.add_argument("--json", action="store_true", help="print the JSON on one line")
    args = parser.parse_args()
    if code := preflight("bench/serve_memory.py"):
        return code
    if not 0 < args.instances <= args.apps <= 100_000 or args.instances > 200:
        parser.error("need 0 < --instances <= --apps <= 100000 and --instances <= 200")
    memory_bytes = int(args.memory.rstrip("Mm")) * MIB

    tag = str(os.getpid())
    work, site = work_dir_with_site("fcrun-mem-", "<?php echo 'hi from ', gethostname();")
    serve = MemoryServe(work, args.image_root, cgroup_parent=f"fcrun-mem-{tag}", bridge=f"fcm{tag}"[:15],
                        subnet=SUBNET, hold_timeout_s=60)
    names = [f"app{i:05d}.mem.test" for i in range(args.apps)]
    step = args.apps // args.instances
    targets = [names[i * step] for i in range(args.instances)]
    out: dict = {
        "benchmark": "fcrun serve memory: apps registered, instances running",
        "apps": args.apps,
        "instances": args.instances,
        "app_limits": {"memory_bytes": memory_bytes, "cpu": args.cpu, "docroot": "tiny index.php"},
    }
    t_begin = time.monotonic()
    try:
        # 1. empty
        out["serve_start_s_empty"] = round(serve.start(), 2)
        time.sleep(args.settle)
        out["empty"] = serve.memory()
        serve.stop()

        # 2. apps in the CMDB, then serve
        cmdb = open_cmdb(serve.paths)
        t0 = time.monotonic()
        try:
            for name in names:
                cmdb.add_app(App(name=name, image="apache-php", docroot=site, cpu=args.cpu, memory_bytes=memory_bytes,
                                 idle_timeout_s=3600))
        finally:
            cmdb.close()
        out["add_apps_s"] = round(time.monotonic() - t0, 2)
        out["serve_start_s_with_apps"] = round(serve.start(), 2)
        time.sleep(args.settle)
        out["apps_idle"] = serve.memory()

        # 3. one request to each of `instances` apps, then a hot one each
        cold_ms, statuses = [], []
        t0 = time.monotonic()
        for host in targets:
            status, headers, body = serve.request(host)
            statuses.append(status)
            if status != 200 or not body.startswith(b"hi from "):
                raise SystemExit(f"{host}: {status} {body[:300]!r}")
            cold_ms.append(float(headers.get("X-Fcrun-Cold-Start", "nan")))
        out["start_instances_s"] = round(time.monotonic() - t0, 2)
        for host in targets:
            statuses.append(serve.request(host)[0])
        time.sleep(args.settle)
        out["running"] = serve.memory()

        rows = json.loads(serve.cli("ps", "--json"))
        usage, rss, cache, ooms = [], [], [], 0
        for row in rows:
            state = serve.runtime.state(row["name"])
            usage.append(serve.runtime.cgroup(row["name"]).stats().memory_bytes)
            stat = cgroup_memory_stat(state.cgroup_paths.get("memory", ""))
            rss.append(stat.get("rss", 0))
            cache.append(stat.get("cache", 0))
            ooms += stat.get("oom_kill", 0)
        out["instances_memory"] = {
            "running": sum(1 for r in rows if r["status"] == "running"),
            "cgroup_usage_total_mib": mib(sum(usage)),
            "cgroup_usage_per_instance_median_mib": mib(statistics.median(usage)) if usage else None,
            "cgroup_usage_per_instance_max_mib": mib(max(usage)) if usage else None,
            "rss_total_mib": mib(sum(rss)),
            "cache_total_mib": mib(sum(cache)),
            "oom_kills": ooms,
            "what": "sum of the instances' memory cgroup usage (v1 usage_in_bytes includes page cache charged "
                    "to each; the shared image layer's cache is charged to whichever instance read it first)",
        }
        out["all_200"] = statuses == [200] * len(statuses)
        out["cold_start_header_ms_median"] = round(statistics.median(cold_ms), 1)
        rss_running = out["running"]["vmrss_mib"]
        out["target_rss_mib_max"] = TARGET_RSS_BYTES // MIB
        out["target_met"] = rss_running * MIB < TARGET_RSS_BYTES and out["running"]["vmhwm_mib"] * MIB < TARGET_RSS_BYTES
        out["serve_rss_added_mib"] = {
            "by_apps": round(out["apps_idle"]["vmrss_mib"] - out["empty"]["vmrss_mib"], 1),
            "by_instances": round(rss_running - out["apps_idle"]["vmrss_mib"], 1),
        }
        out["stop_serve_s"] = round(serve.stop(), 2)
    finally:
        serve.stop()
        serve.reap_leftovers()
        out["serve_exit_codes"] = serve.exit_codes
        shutil.rmtree(work, ignore_errors=True)
    out["wall_s"] = round(time.monotonic() - t_begin, 1)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
