#!/usr/bin/env python3
"""What moving a process into a container's cgroup costs when nothing else moved lately (a
serve's starts are seconds apart), against the same move right after another one, and against
renaming a cgroup the process is already in (issue 17: what is left of a start from nothing).

A move takes the kernel's cgroup_threadgroup_rwsem for writing, which waits for an RCU grace
period unless a move happened within the last one or two; that wait is most of a lone start's
own time in the fork-server (bench/README.md). Each round, with fcrun's cgroup driver on a
private parent beneath the cgroup this runs in: fork a sleeper, create a group, and time
  lone:        Cgroup.add(pid) after --gap seconds without any move (every hierarchy fcrun uses);
  follow-up:   the same, for a second sleeper, at once after the lone move;
  rename:      (cgroup v1 only; v2 refuses rename with EPERM) renaming every dir of the lone
               group, the process in it: what a creation would do with a child placed ahead.
Prints one JSON object: p50/p99 of each and the ratios to the lone move.

    flock /tmp/fcrun-heavy.lock .venv/bin/python bench/cgroup_move.py [--rounds 20] [--gap 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import preflight, summary  # noqa: E402

from fcrun.cgroups import Limits, detect  # noqa: E402


def sleeper() -> int:
    pid = os.fork()
    if pid == 0:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            time.sleep(600)
        finally:
            os._exit(0)
    return pid


def timed(action) -> float:
    t = time.perf_counter()
    action()
    return (time.perf_counter() - t) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.3, help="seconds without a move before the lone one")
    parser.add_argument("--json", action="store_true", help="one line")
    args = parser.parse_args(argv)
    if code := preflight("bench/cgroup_move.py"):
        return code
    driver = detect(parent=f"fcrun-bench-move-{os.getpid()}")
    lone, follow_up, rename = [], [], []
    pids: list[int] = []
    groups = []
    try:
        for i in range(args.rounds):
            first, second = sleeper(), sleeper()
            pids += [first, second]
            a, b = driver.create(f"lone-{i}", Limits()), driver.create(f"next-{i}", Limits())
            groups += [a, b]
            time.sleep(args.gap)
            lone.append(timed(lambda: a.add(first)))
            follow_up.append(timed(lambda: b.add(second)))
            if driver.version == 1:
                renamed = {key: os.path.join(os.path.dirname(path), f"renamed-{i}") for key, path in a.paths.items()}
                rename.append(timed(lambda: [os.rename(a.paths[key], renamed[key]) for key in sorted(set(a.paths))
                                             if os.path.isdir(a.paths[key])]))
                groups[-2] = driver.load(renamed, created=list(renamed.values()))
            for pid in (first, second):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pids.remove(pid)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for group in groups:
            group.destroy()
        driver.remove_parent_if_empty()
    out = {
        "benchmark": "moving a process into a cgroup: lone, right after another move, or renaming its group",
        "cgroup_version": driver.version, "gap_s": args.gap,
        "lone_move": summary(lone), "follow_up_move": summary(follow_up),
        "rename": summary(rename) if rename else "cgroup v2: rename(2) of a cgroup is refused (EPERM)",
        "ratios": {"follow_up_over_lone_p50": round(summary(follow_up)["median_ms"] / summary(lone)["median_ms"], 3)},
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    if rename:
        out["ratios"]["rename_over_lone_p50"] = round(summary(rename)["median_ms"] / summary(lone)["median_ms"], 4)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
