#!/usr/bin/env python3
"""What a prefork Apache/PHP worker's first phpinfo costs, without fcrun (issue 17: the part of
a pool claim's "over warm" that is the page's own).

A pooled instance's workers are warmed before it is frozen, with a small PHP script (the pool's
warm-up: forkserver/pool.py), not with the app's page, which the pool cannot know. The first
request for a page to a worker that never served it still touches, for the first time in that
process, the code, read-only data and heap that the page needs: page faults a warm worker no
longer takes. This measures that on a plain `runc run` of the apache-php image (coldstart.py's
runc baseline: its own netns and veth, made once), so nothing of fcrun is in it:

  - each round starts a fresh container, waits for phpinfo (its readiness), warms every worker
    with a small script on a kept-open connection each (so that each worker takes one), then
    sends GET / (phpinfo) on new connections, 2 x workers + 4 times;
  - each request is classed by the worker that served it (the one whose minor-fault count
    moved): the first phpinfo that worker served, or a later one (the baseline);
  - the JSON gives both classes' latency (send to last byte) and the serving worker's minor
    faults, and first over later.

Needs root and runc, and the apache-php image (`--image-root`, default the tests' cache).
Uses 10.239.0.0/30 and a netns and cgroup named fcrun-first-PID; removes everything it made.
Usage: bench/first_request.py [--rounds 5] [--image-root /var/cache/fcrun-test] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from fcrun import Paths
from fcrun.images import ImageStore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import preflight, process_stats, summary  # noqa: E402
from coldstart import HOST, RUNC_CONTAINER_IP, RuncBaseline, is_whole_page  # noqa: E402

WARMUP_PATH = "/fcrun-warmup.php"
WARMUP_SCRIPT = "<?php echo 'warm';\n"  # the pool's (forkserver/pool.py)


def children_faults(parent: int) -> dict[int, int]:
    """Minor-fault counts of `parent`'s children (Apache's workers), by pid."""
    return {pid: int(fields[7]) for pid, fields in process_stats().items() if int(fields[1]) == parent}


def get(path: str, conn: http.client.HTTPConnection | None = None) -> tuple[float, int, bytes]:
    """GET `path` (on a new connection unless `conn`, which stays open); (ms, status, body)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(RUNC_CONTAINER_IP, 80, timeout=10)
    t0 = time.perf_counter()
    try:
        conn.request("GET", path, headers={"Host": HOST})
        response = conn.getresponse()
        body = response.read()
        return (time.perf_counter() - t0) * 1000, response.status, body
    finally:
        if own:
            conn.close()


def container_pid(runc_root: str, cid: str) -> int:
    with open(os.path.join(runc_root, cid, "state.json")) as f:
        return json.load(f)["init_process_pid"]


def one_round(baseline: RuncBaseline, i: int, first: dict, later: dict) -> None:
    baseline.run_once(i, 30.0)  # fresh container; its readiness GET / is one phpinfo in one worker
    parent = container_pid(baseline.state_root, baseline.ids[-1])
    with open(os.path.join(baseline.merged, "var/www/html", WARMUP_PATH.lstrip("/")), "w") as f:
        f.write(WARMUP_SCRIPT)
    time.sleep(0.3)  # Apache's spare workers forked
    workers = children_faults(parent)
    readiness_worker = max(workers, key=lambda pid: workers[pid])  # it took the most faults: phpinfo's
    kept = []
    for _ in workers:  # a kept-open connection holds its worker: the next one goes to another
        conn = http.client.HTTPConnection(RUNC_CONTAINER_IP, 80, timeout=10)
        kept.append(conn)
        if get(WARMUP_PATH, conn)[1] != 200:
            raise SystemExit("first_request: the warm-up script did not answer 200")
    for conn in kept:
        conn.close()
    served_phpinfo = {readiness_worker}
    for _ in range(2 * len(workers) + 4):
        time.sleep(0.05)
        before = children_faults(parent)
        ms, status, body = get("/")
        after = children_faults(parent)
        if not is_whole_page(status, body):
            raise SystemExit(f"first_request: GET / gave {status}")
        moved = {pid: after[pid] - before.get(pid, 0) for pid in after if after[pid] != before.get(pid, 0)}
        if len(moved) != 1:
            continue  # a new worker forked, or none moved: not attributable, left out
        (pid, faults), = moved.items()
        bucket = later if pid in served_phpinfo else first
        bucket["ms"].append(ms)
        bucket["faults"].append(faults)
        served_phpinfo.add(pid)
    baseline.remove(i)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="fresh containers (default 5)")
    parser.add_argument("--image-root", default="/var/cache/fcrun-test", help="a data root holding apache-php")
    parser.add_argument("--json", action="store_true", help="print the JSON on one line")
    args = parser.parse_args(argv)
    if (code := preflight("first_request.py", ("runc", "ip"))) != 0:
        return code
    image = ImageStore(Paths(data_root=args.image_root, run_root="/nonexistent")).get("apache-php")
    work = tempfile.mkdtemp(prefix="fcrun-bench-first-")
    baseline = RuncBaseline(work, image, f"first{os.getpid()}")
    first: dict[str, list] = {"ms": [], "faults": []}
    later: dict[str, list] = {"ms": [], "faults": []}
    try:
        baseline.make_network()
        for i in range(args.rounds):
            one_round(baseline, i, first, later)
    finally:
        baseline.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    if not first["ms"] or not later["ms"]:
        raise SystemExit("first_request: no request could be attributed to a worker")
    out = {"benchmark": "phpinfo from apache-php under runc: a worker's first phpinfo (after a small warm-up "
                        "script) against its later ones",
           "rounds": args.rounds,
           "first_phpinfo_in_worker": {**summary(first["ms"]), "faults_median": statistics.median(first["faults"])},
           "later_phpinfo": {**summary(later["ms"]), "faults_median": statistics.median(later["faults"])}}
    out["first_minus_later_median_ms"] = round(out["first_phpinfo_in_worker"]["median_ms"]
                                               - out["later_phpinfo"]["median_ms"], 2)
    out["first_over_later_median"] = round(out["first_phpinfo_in_worker"]["median_ms"]
                                           / out["later_phpinfo"]["median_ms"], 2)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
