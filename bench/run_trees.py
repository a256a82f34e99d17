#!/usr/bin/env python3
"""`fcrun run` without a fork-server, from two source trees, alternately (issue 17).

runtime.py compares `fcrun run` with runc in one run, but runc's own time moves by several ms
between runs, which hides a change worth 1-3 ms. This compares two fcrun trees instead (say a
`git worktree` of the commit before, and this one): each round runs, in turn and in alternating
order, the command line the `fcrun` launcher runs (`python3 -S -E`, fast.py from the tree's
cli/, this venv's site-packages), `fcrun run --net none --image busybox -- /bin/true`, with a
pause before each (--gap-ms: each pays a lone cgroup move, as a single command does). Roots of
its own (busybox built there), no fork-server. Prints JSON: per tree the median, p90 and p99
(ms) and after/before of the medians.

Usage: bench/run_trees.py --before DIR --after DIR [--runs 40] [--gap-ms 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

from fcrun.images import ImageStore
from fcrun.paths import Paths

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import percentile, preflight, summary  # noqa: E402

LAUNCH = "import sys; sys.path[0] = sys.argv.pop(1); import fast; del sys.path[0]; fast.launch()"  # cli/fcrun's


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a source tree (its cli/ and src/ are run)")
    parser.add_argument("--after", required=True, help="another source tree")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--gap-ms", type=float, default=200.0, help="untimed pause before each run")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    for tree in (args.before, args.after):
        if not os.path.isfile(os.path.join(tree, "cli", "fast.py")):
            parser.error(f"{tree}: no cli/fast.py: not an fcrun source tree")
    if code := preflight("bench/run_trees.py"):
        return code
    top = tempfile.mkdtemp(prefix="fcrun-bench-trees-")
    try:
        return bench(args, top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def bench(args: argparse.Namespace, top: str) -> int:
    tag = str(os.getpid())
    paths = Paths(data_root=os.path.join(top, "data"), run_root=os.path.join(top, "run"))
    ImageStore(paths).build("busybox", progress=lambda *a: None)
    env = dict(os.environ, FCRUN_ROOT=paths.data_root, FCRUN_RUN=paths.run_root, FCRUN_CGROUP_PARENT=f"fcrun-bench-{tag}",
               FCRUN_BRIDGE=f"fcb{tag}"[:15], FCRUN_SUBNET="10.236.0.0/24")
    site = sysconfig.get_paths()["purelib"]
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    times: dict[str, list[float]] = {side: [] for side in trees}
    for i in range(args.runs + 2):  # the first two rounds write each tree's bytecode: not counted
        for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
            command = [sys.executable, "-S", "-E", "-c", LAUNCH, os.path.join(trees[side], "cli"), site,
                       "run", "--net", "none", "--image", "busybox", "--", "/bin/true"]
            time.sleep(args.gap_ms / 1000)
            t0 = time.perf_counter()
            subprocess.run(command, env=env, stdin=subprocess.DEVNULL, check=True)
            if i >= 2:
                times[side].append((time.perf_counter() - t0) * 1000)
    result = {
        "benchmark": "fcrun run --net none busybox /bin/true without a fork-server, two source trees alternately",
        "runs": args.runs, "gap_ms": args.gap_ms, "trees": trees,
        **{side: {**summary(v), "p90_ms": round(percentile(v, 90), 2)} for side, v in times.items()},
    }
    result["after_over_before_median"] = round(result["after"]["median_ms"] / result["before"]["median_ms"], 3)
    text = json.dumps(result, indent=None if args.json else 2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
