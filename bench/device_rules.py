#!/usr/bin/env python3
"""What the default device rules cost a container's cgroup creation (tenant isolation).

Times CgroupDriver.create + Cgroup.add (of a sleeping process) on this host's v1 driver
without the devices hierarchy (as before), with it but no rules, and with the default rules
(9 writes to devices.deny / devices.allow); then, on the cgroup2 mount, one BPF program load
and a create with the cached program attached. Groups are made beneath a private parent next
to a kept group (so the parent is not made and removed each time) and destroyed after each.
Needs root. Usage: bench/device_rules.py [--rounds 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

from fcrun.cgroups import Limits, detect
from fcrun.cgroups.devices import assemble, program
from fcrun.runtime.spec import default_spec
from fcrun.runtime import limits_from_spec

PARENT = f"fcrun-bench-devices-{os.getpid()}"
V1_BEFORE = ("cpu", "cpuacct", "memory", "pids", "freezer")


def create_and_add(driver, limits: Limits, rounds: int) -> dict:
    creates, adds = [], []
    keep = driver.create("keep", Limits())
    try:
        for i in range(rounds):
            sleeper = subprocess.Popen(["sleep", "30"])
            t0 = time.perf_counter()
            cg = driver.create(f"b{i}", limits)
            t1 = time.perf_counter()
            cg.add(sleeper.pid)
            t2 = time.perf_counter()
            creates.append(t1 - t0)
            adds.append(t2 - t1)
            cg.destroy()
            sleeper.wait()
    finally:
        keep.destroy()
    return {"create_ms": round(statistics.median(creates) * 1e3, 3), "add_ms": round(statistics.median(adds) * 1e3, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rules = limits_from_spec(default_spec(["true"])).devices
    results: dict = {}
    if detect(parent=PARENT).version == 1:
        before = detect(parent=PARENT, controllers=V1_BEFORE)
        after = detect(parent=PARENT)
        results["v1_no_devices_hierarchy"] = create_and_add(before, Limits(pids_max=100), args.rounds)
        results["v1_devices_hierarchy_no_rules"] = create_and_add(after, Limits(pids_max=100), args.rounds)
        results["v1_default_rules"] = create_and_add(after, Limits(pids_max=100, devices=rules), args.rounds)
    v2 = detect(parent=PARENT, version=2, controllers=())
    code = assemble(program(rules))
    loads = []
    for _ in range(50):
        t0 = time.perf_counter()
        fd = v2.io.load_device_program(code)
        loads.append(time.perf_counter() - t0)
        os.close(fd)
    results["v2_program_load_ms"] = round(statistics.median(loads) * 1e3, 3)
    results["v2_program_instructions"] = len(code) // 8
    results["v2_no_rules"] = create_and_add(v2, Limits(), args.rounds)
    results["v2_default_rules_cached_program"] = create_and_add(v2, Limits(devices=rules), args.rounds)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:36s} {value}")


if __name__ == "__main__":
    main()
