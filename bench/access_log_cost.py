#!/usr/bin/env python3
"""serve's CPU cost of the access log: the same serve, the same warm app, access log off and on.

One `fcrun serve` (real fork-server, one apache-php instance of a tiny index.php app), warmed by
a first request. Rounds alternate off, on, off, on...: the access log is switched by rewriting
the config's `[proxy] access_log` and SIGHUP (it is live), so both sides share the process, the
instance and the machine's state. Each round runs wrk (keep-alive, loopback) for --duration
seconds; serve's CPU time (utime + stime of its process, /proc/<pid>/stat) before and after
gives CPU per request. wrk cannot hold a fixed rate, so the figure compared is CPU per request
and the rate achieved is shown beside it. The access log goes to serve's log file on disk.

Usage (root, apache-php image in --image-root): bench/access_log_cost.py [--rounds 2] [--duration 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

from fcrun.cmdb import App, open_cmdb
from fcrun.serve.testing import ServeProcess

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import preflight, work_dir_with_site  # noqa: E402

SUBNET = "10.236.0.0/24"
APP = "acl.bench.test"


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def set_access_log(serve: ServeProcess, base_config: str, on: bool) -> None:
    with open(serve.config, "w") as f:
        f.write(base_config + ("\n[proxy]\naccess_log = true\n" if on else ""))
    serve.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)  # the reload is applied on the event loop; no request is in flight now


def wrk(port: int, duration_s: int, connections: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "-H", f"Host: {APP}",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True,
                         timeout=duration_s + 30).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": requests, "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of (off, on) runs")
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--image-root", default=os.environ.get("FCRUN_TEST_IMAGE_CACHE", "/var/cache/fcrun-test"))
    args = parser.parse_args()
    if code := preflight("bench/access_log_cost.py", tools=("wrk",)):
        return code
    tag = str(os.getpid())
    work, site = work_dir_with_site("fcrun-acl-", "<?php echo 'hi';")
    serve = ServeProcess(work, args.image_root, cgroup_parent=f"fcrun-acl-{tag}", bridge=f"fca{tag}"[:15],
                         subnet=SUBNET, hold_timeout_s=60)
    with open(serve.config) as f:
        base_config = f.read()
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        cmdb = open_cmdb(serve.paths)
        try:
            cmdb.add_app(App(name=APP, image="apache-php", docroot=site, cpu=1.0, idle_timeout_s=3600))
        finally:
            cmdb.close()
        serve.start()
        status, _, body = serve.request(APP)
        if status != 200:
            raise SystemExit(f"{APP}: {status} {body[:200]!r}")
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                set_access_log(serve, base_config, mode == "on")
                before = cpu_s(serve.proc.pid)
                result = wrk(serve.port, args.duration, args.connections)
                result["serve_cpu_s"] = round(cpu_s(serve.proc.pid) - before, 3)
                result["requests_per_s"] = round(result["requests"] / args.duration)
                result["serve_cpu_us_per_request"] = round(result["serve_cpu_s"] / max(result["requests"], 1) * 1e6, 1)
                runs[mode].append(result)
        access_lines = sum(1 for line in open(serve.log_path, errors="replace") if " access app=" in line)
        if not access_lines:
            print(serve.log_tail(3000), file=sys.stderr)
    finally:
        serve.stop()
        serve.reap_leftovers()
        shutil.rmtree(work, ignore_errors=True)
    out = {"benchmark": "fcrun serve CPU, access log off vs on (same serve, same warm instance)",
           "wrk": {"threads": 1, "connections": args.connections, "duration_s": args.duration},
           "runs": runs, "access_log_lines": access_lines}
    for mode in ("off", "on"):
        out[f"median_cpu_us_per_request_{mode}"] = statistics.median(r["serve_cpu_us_per_request"] for r in runs[mode])
        out[f"median_requests_per_s_{mode}"] = statistics.median(r["requests_per_s"] for r in runs[mode])
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
