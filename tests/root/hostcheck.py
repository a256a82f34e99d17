"""Names private to this test run, and a snapshot of what a test could leak on the host."""

from __future__ import annotations

import os
import subprocess
import time

TAG = str(os.getpid())
# Relative: beneath the cgroup the tests run in. On a pure-v2 host whose own cgroup does not
# delegate controllers, set FCRUN_TEST_CGROUP_PARENT=/fcrun-test (from the hierarchy root).
CGROUP_PARENT = os.environ.get("FCRUN_TEST_CGROUP_PARENT", "fcrun-test") + f"-{TAG}"
BRIDGE = f"fct{TAG}"[:15]
SUBNET = "10.234.0.0/24"


def host_snapshot(run_root: str) -> dict:
    """What a test could leak on the host: mounts, links, netns, our cgroups, leases, state dirs."""
    # Only mounts that could be ours: other software on the machine may mount things meanwhile.
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line for line in f if "fcrun" in line or run_root in line)
    links = sorted(
        line.split(":")[1].strip().split("@")[0]
        for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.splitlines()
    )
    netns = sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []
    cgroups = []
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        if CGROUP_PARENT in dirpath:
            cgroups.append(dirpath)
            dirnames[:] = []
        elif dirpath.count("/") > 7:
            dirnames[:] = []
    containers = os.path.join(run_root, "containers")
    states = sorted(os.listdir(containers)) if os.path.isdir(containers) else []
    return {"mounts": mounts, "links": links, "netns": netns, "cgroups": cgroups, "states": states}


def settled_snapshot(run_root: str, expected: dict, timeout_s: float = 15.0) -> dict:
    """The snapshot once it equals `expected` (so, `expected`).

    A dead container's network namespace (and the veth in it) is destroyed by the kernel in
    the background, shortly after its last process exits; give that a moment (longer on a
    loaded host: the bound only keeps a leak from hanging the suite).

    Raises:
        AssertionError: it still differs after timeout_s; the message lists what differs.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        snap = host_snapshot(run_root)
        if snap == expected:
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"the host is not as before the test after {timeout_s} s: {snapshot_diff(expected, snap)}")
        time.sleep(0.05)


def snapshot_diff(before: dict, after: dict) -> str:
    """What `after` has that `before` had not (+) and the other way round (-), per kind."""
    parts = []
    for kind in sorted(set(before) | set(after)):
        old, new = set(before.get(kind, ())), set(after.get(kind, ()))
        if old != new:
            parts.append(f"{kind}: +{sorted(new - old)} -{sorted(old - new)}")
    return "; ".join(parts)
