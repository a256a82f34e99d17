#!/usr/bin/env python3
"""Container start cost: fcrun's library and CLI against runc, measured in one run.

Each round runs `/bin/true` in the busybox image once per contender, interleaved so that
background noise hits all of them alike:

  (a) library: Runtime.run() + wait() + delete() in this process (as any long-lived user
               of the library: its containers are forked by the spawner, from the second on)
  (b) cli:     `fcrun run --net NET --image busybox -- /bin/true` (a new process each time)
  (c) runc:    `runc run --bundle B` of the same rootfs (runc removes its state on exit)
  and, with --only ...,direct: the library with Runtime(spawner=False), forking each
  container from this process, for comparison.

Prints JSON: median and p99 (ms) of each, and the ratios a/c and b/c of the medians.
Needs root. Usage: bench/runtime.py [--runs 50] [--net none|bridge] [--only library,runc] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from fcrun import Paths, RunOptions, Runtime, spec_from_image
from fcrun.images import ImageStore


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict:
    return {"median_ms": round(statistics.median(values), 2), "p99_ms": round(percentile(values, 99), 2),
            "min_ms": round(min(values), 2), "n": len(values)}


def make_runc_bundle(bundle: str, rootfs: str) -> None:
    """An OCI bundle equivalent to `fcrun run --net none`: runc's default spec, read-only root."""
    subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    config["root"] = {"path": rootfs, "readonly": True}
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/true"]
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--net", choices=["none", "bridge"], default="none")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--only", default="library,cli,runc",
                        help="comma-separated contenders to run (default: all three); add "
                             "'direct' to also time the library without its spawner")
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - {"library", "direct", "cli", "runc"}
    if unknown:
        parser.error(f"--only: unknown contender(s) {sorted(unknown)}")
    if os.geteuid() != 0:
        print("bench/runtime.py: needs root", file=sys.stderr)
        return 77

    work = tempfile.mkdtemp(prefix="fcrun-bench-")
    tag = str(os.getpid())
    paths = Paths(data_root=os.path.join(work, "data"), run_root=os.path.join(work, "run"))
    rt_args = dict(cgroup_parent=f"fcrun-bench-{tag}", bridge=f"fcb{tag}"[:15], subnet="10.236.0.0/24")
    rt = Runtime(paths, **rt_args)
    rt_direct = Runtime(paths, spawner=False, **rt_args)
    contenders = args.only.split(",")
    image = ImageStore(paths).build("busybox", progress=lambda *a: None)
    bundle = os.path.join(work, "bundle")
    os.mkdir(bundle)
    make_runc_bundle(bundle, image.layers[-1])
    cli_env = dict(os.environ, FCRUN_ROOT=paths.data_root, FCRUN_RUN=paths.run_root,
                   FCRUN_CGROUP_PARENT=rt_args["cgroup_parent"], FCRUN_BRIDGE=rt_args["bridge"],
                   FCRUN_SUBNET=rt_args["subnet"])
    fcrun_cli = [os.path.join(os.path.dirname(sys.executable), "fcrun")]
    null = os.open("/dev/null", os.O_RDWR)
    results: dict[str, list[float]] = {label: [] for label in contenders}

    def library(i: int, rt: Runtime = rt, prefix: str = "bench") -> None:
        name = f"{prefix}-{i}"
        spec = spec_from_image(image, RunOptions(args=["/bin/true"], network=args.net), name=name)
        c = rt.run(name, spec, image=image, stdio=(null, null, null))
        if c.wait() != 0:
            raise SystemExit("library run failed")
        rt.delete(name)

    def direct(i: int) -> None:
        library(i, rt_direct, "bdirect")

    def cli(i: int) -> None:
        subprocess.run([*fcrun_cli, "run", "--net", args.net, "--image", "busybox", "--name", f"bcli-{i}", "--", "/bin/true"],
                       env=cli_env, stdin=subprocess.DEVNULL, check=True)

    def runc(i: int) -> None:
        subprocess.run(["runc", "run", "--bundle", bundle, f"fcrun-bench-runc-{tag}-{i}"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, check=True)

    try:
        for i in range(args.warmup + args.runs):
            for label, fn in (("library", library), ("direct", direct), ("cli", cli), ("runc", runc)):
                if label not in contenders:
                    continue
                t0 = time.perf_counter()
                fn(i)
                elapsed_ms = (time.perf_counter() - t0) * 1000
                if i >= args.warmup:
                    results[label].append(elapsed_ms)
    finally:
        for name in rt.states.names():
            rt.delete(name, force=True)
        rt.cgroups.remove_parent_if_empty()
        os.close(null)
        shutil.rmtree(work, ignore_errors=True)

    out = {
        "benchmark": "runtime create+start+wait(+delete) of /bin/true in busybox",
        "net": args.net,
        "runs": args.runs,
        **{label: summary(values) for label, values in results.items()},
    }
    if "runc" in out:
        runc = out["runc"]
        ratios = {}
        for label, key in (("library", "a_library_over_runc"), ("direct", "a_direct_over_runc"), ("cli", "b_cli_over_runc")):
            if label in out:
                ratios[key] = round(out[label]["median_ms"] / runc["median_ms"], 3)
        if "library" in out:
            ratios["a_p99_over_runc_p99"] = round(out["library"]["p99_ms"] / runc["p99_ms"], 3)
        out["ratios"] = ratios
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
