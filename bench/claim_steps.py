#!/usr/bin/env python3
"""A pool claim's own steps, back to back and after idle (issue 17: what the fork-server's part
of a claim is made of).

Runtime.hand_over is what the fork-server runs for a claim: under the container's lock, read
its state, set the app's limits, mount the app's docroot on the slot, note the app, thaw, then
answer (serve proxies from there) and save the state. Here it runs in this process on frozen
apache-php instances made as the pool makes them (a slot at the image's docroot, network none:
the network plays no part in a claim), each step timed by a wrapper, for three gaps between
claims: 0 (back to back: the baseline, what the same code costs with warm CPU caches), 10 ms and
200 ms (a claim after the fork-server idled, as every real claim is). The JSON gives each
step's median and p99 per gap, and the ratio of "to answer" (what a request waits for) to the
back-to-back one.

Needs root and the apache-php image (`--image-root`, default the tests' cache). Uses a private
run root and data root (the image's layers linked), cgroup parent fcrun-bench-claim-PID;
removes everything it made.
Usage: bench/claim_steps.py [--claims 16] [--image-root /var/cache/fcrun-test] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time

from fcrun import Paths
from fcrun.runtime import lifecycle
from fcrun.runtime.lifecycle import Runtime
from fcrun.runtime.options import RunOptions, spec_from_image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import preflight, summary, work_dir_with_site  # noqa: E402

GAPS_S = (0.0, 0.01, 0.2)
CPU, MEMORY = 1.0, 512 << 20  # the pool's defaults: a claim with the same limits writes none
SLOT = "/var/www/html"  # the image's docroot, as the pool makes its instances


class StepTimer:
    """Wraps the calls hand_over makes, so that each records how long it took (the thaw and
    the lock are what "to answer" has beyond them)."""

    def __init__(self, runtime: Runtime):
        self.times: dict[str, list[float]] = {}
        self._undo: list[tuple[object, str, object]] = []
        self._wrap(lifecycle, "open_slot_source", "docroot check (open)")
        self._wrap(runtime.states, "load", "state read")
        self._wrap(runtime, "refresh", "state refresh (pid, frozen?)")
        self._wrap(runtime, "_set_limits", "limits")
        self._wrap(lifecycle, "fill_slot", "slot mount")
        self._wrap(lifecycle, "note_app", "app note")
        self._wrap(runtime.states, "save", "state save (after the answer)")

    def _wrap(self, owner: object, attribute: str, label: str) -> None:
        real = getattr(owner, attribute)

        @functools.wraps(real)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.times.setdefault(label, []).append((time.perf_counter() - t0) * 1000)

        self._undo.append((owner, attribute, vars(owner).get(attribute)))  # None: the class's method
        setattr(owner, attribute, timed)

    def restore(self) -> None:
        for owner, attribute, before in reversed(self._undo):
            if before is None:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=int, default=16, help="claims per gap (default 16)")
    parser.add_argument("--image-root", default="/var/cache/fcrun-test", help="a data root holding apache-php")
    parser.add_argument("--json", action="store_true", help="print the JSON on one line")
    args = parser.parse_args(argv)
    if (code := preflight("claim_steps.py")) != 0:
        return code
    work, site = work_dir_with_site("fcrun-bench-claim-", "<?php echo 'hello';\n")
    paths = Paths(data_root=os.path.join(work, "data"), run_root=os.path.join(work, "run"))
    os.makedirs(paths.images)
    os.symlink(os.path.join(args.image_root, "layers"), paths.layers)
    shutil.copy(os.path.join(args.image_root, "images", "apache-php.json"), paths.images)
    runtime = Runtime(paths, cgroup_parent=f"fcrun-bench-claim-{os.getpid()}", docroot_roots=(work,))
    image = runtime.images.get("apache-php")
    names: list[str] = []
    timer = None
    out: dict = {"benchmark": "Runtime.hand_over of frozen apache-php instances, by step, by gap between claims",
                 "claims_per_gap": args.claims, "gaps_ms": [g * 1000 for g in GAPS_S]}
    try:
        for i in range(args.claims * len(GAPS_S)):
            name = f"claim-{i}"
            spec = spec_from_image(image, RunOptions(network="none", cpu=CPU, memory_bytes=MEMORY), name=name)
            runtime.run(name, spec, image=image, detach=True, slot=SLOT)
            names.append(name)
        time.sleep(1.0)  # Apache forks its workers
        for name in names:
            runtime.freeze(name)
        timer = StepTimer(runtime)
        pending = list(names)
        for gap in GAPS_S:
            timer.times.clear()
            answered, whole = [], []
            for _ in range(args.claims):
                name = pending.pop()
                time.sleep(gap)
                t0 = time.perf_counter()
                runtime.hand_over(name, cpu=CPU, memory_bytes=MEMORY, slot_source=site,
                                  labels={"fcrun.app": "claim.test"}, thaw=True,
                                  answer=lambda _state: answered.append((time.perf_counter() - t0) * 1000))
                whole.append((time.perf_counter() - t0) * 1000)
            out[f"gap_{round(gap * 1000)}ms"] = {"to_answer": summary(answered, 3), "whole": summary(whole, 3),
                                                 "steps": {k: summary(v, 3) for k, v in timer.times.items()}}
        base = out["gap_0ms"]["to_answer"]["median_ms"]
        out["to_answer_over_back_to_back"] = {key: round(out[key]["to_answer"]["median_ms"] / base, 2)
                                              for key in out if key.startswith("gap_")}
    finally:
        if timer is not None:
            timer.restore()
        for name in names:
            try:
                runtime.delete(name, force=True)
            except Exception as exc:  # noqa: BLE001 - go on removing the others; say which stayed
                print(f"claim_steps: delete {name}: {exc}", file=sys.stderr)
        runtime.cgroups.remove_parent_if_empty()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
