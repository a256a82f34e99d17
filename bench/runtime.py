#!/usr/bin/env python3
"""Container start cost: fcrun's library and CLI against runc, measured in one run.

Each round runs `/bin/true` in the busybox image once per contender, interleaved so that
background noise hits all of them alike:

  (a) library: Runtime.run() + wait() + delete() in this process (as any long-lived user
               of the library: its containers are forked by the spawner, from the second on)
  (a') library_tmpfs_rootfs: the same with Runtime.run(..., volatile_rootfs=True): the
               writable layer on a tmpfs in the container's own mount namespace (nothing of
               the rootfs on disk; what the container writes is gone when it stops)
  (b) cli:     `fcrun run --net NET --image busybox -- /bin/true` (a new process each time),
               with no fork-server running: the click CLI does all the work in the new process
  (b') cli_daemon: the same command while a fork-server (`fcrun daemon`, started here on its
               own run root) listens: the thin client sends it a Run with its stdio and waits
               for the exit code (fcrun_cli/fast.py, started by the `fcrun` launcher
               cli/fcrun with `python3 -S -E`). Both CLI contenders run with Python's
               bytecode cache allowed (PYTHONDONTWRITEBYTECODE dropped), as an installed command.
  (c) runc:    `runc run --bundle B` on the image's layer as a read-only root (runc removes
               its state on exit). No overlay, no writable layer: less work than (a) does.
  (c') runc_overlay: the same, on a fresh overlay of the layer made for each run the way
               fcrun makes one (upper and work dirs beside fcrun's, the same mount options,
               a writable root), mounted before and unmounted and removed after runc, all
               inside the time. The runc counterpart of what (a) and (b) do.
  and, with --only ...,direct: the library with Runtime(spawner=False), forking each
  container from this process, for comparison.

Both sides keep their state on the same filesystem (runc --root beside fcrun's run root).
--tmpfs puts every root of both sides (fcrun's data and run roots, runc's state and overlay
dirs) on one private tmpfs that the benchmark mounts and removes, as a host whose /run and
/var/lib are in memory would; the JSON says which filesystem the roots were on.

Prints JSON: median and p99 (ms) of each, and the ratios of the medians to runc and to
runc_overlay. Needs root. Usage:
bench/runtime.py [--runs 50] [--net none|bridge] [--only library,runc,...] [--tmpfs] [--gap-ms MS] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from fcrun import Paths, RunOptions, Runtime, spec_from_image
from fcrun import syscalls as sc
from fcrun.images import ImageStore
from fcrun.runtime.plan import build_plan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import preflight, summary  # noqa: E402

CONTENDERS = ("library", "library_tmpfs_rootfs", "direct", "cli", "cli_daemon", "runc", "runc_overlay")


def make_runc_bundle(bundle: str, rootfs: str, readonly: bool = True) -> None:
    """An OCI bundle equivalent to `fcrun run --net none`: runc's default spec."""
    subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    config["root"] = {"path": rootfs, "readonly": readonly}
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/true"]
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--net", choices=["none", "bridge"], default="none")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="pause before each contender (untimed), so that none starts within the kernel's "
                             "cgroup-move grace period of the one before (see bench/README.md)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--only", default="library,library_tmpfs_rootfs,cli,cli_daemon,runc,runc_overlay",
                        help="comma-separated contenders to run (default: all but 'direct'); add "
                             "'direct' to also time the library without its spawner")
    parser.add_argument("--tmpfs", action="store_true",
                        help="put the roots of both sides on a private tmpfs (mounted and removed here)")
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(CONTENDERS)
    if unknown:
        parser.error(f"--only: unknown contender(s) {sorted(unknown)}")
    if code := preflight("bench/runtime.py"):
        return code

    top = tempfile.mkdtemp(prefix="fcrun-bench-")
    work = top
    mounts: list[str] = []  # mounted by us, innermost last: unmounted in the finally below
    if args.tmpfs:
        work = os.path.join(top, "tmpfs")
        os.mkdir(work)
        sc.mount(b"tmpfs", work.encode(), b"tmpfs", 0, b"mode=0700")
        mounts.append(work)
    try:
        return bench(args, top, work, mounts)
    finally:
        for mountpoint in reversed(mounts):
            sc.umount2(mountpoint.encode(), sc.MNT_DETACH)
        shutil.rmtree(top, ignore_errors=True)


def start_daemon(data_root: str, run_root: str, rt_args: dict) -> subprocess.Popen:
    """A fork-server at <run_root>/forkserver.sock, as `fcrun daemon` starts it; returns once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcrun.forkserver", "--socket", os.path.join(run_root, "forkserver.sock"),
         "--data-root", data_root, "--run-root", run_root, "--cgroup-parent", rt_args["cgroup_parent"],
         "--bridge", rt_args["bridge"], "--subnet", rt_args["subnet"]],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    proc.stdout.close()
    if not line.startswith("ready "):
        proc.kill()
        proc.wait()
        raise SystemExit(f"bench/runtime.py: the fork-server did not start ({line!r})")
    return proc


def filesystem_of(path: str) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True).stdout.strip()


def bench(args: argparse.Namespace, top: str, work: str, mounts: list[str]) -> int:
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
    runc_root = os.path.join(work, "runc")  # beside fcrun's run root: the same filesystem
    # runc_overlay: a writable overlay per run, as fcrun makes one (its upper and work dirs
    # beside fcrun's, under the data root; the mount options of fcrun's plan).
    ovl_bundle, ovl_rootfs = os.path.join(work, "bundle-overlay"), os.path.join(work, "overlay-rootfs")
    ovl_storage = os.path.join(paths.data_root, "runc-overlay")
    for d in (ovl_bundle, ovl_rootfs, ovl_storage):
        os.makedirs(d)
    make_runc_bundle(ovl_bundle, ovl_rootfs, readonly=False)
    probe = spec_from_image(image, RunOptions(args=["/bin/true"], network=args.net), name="probe")
    cli_env = dict(os.environ, FCRUN_ROOT=paths.data_root, FCRUN_RUN=paths.run_root,
                   FCRUN_CGROUP_PARENT=rt_args["cgroup_parent"], FCRUN_BRIDGE=rt_args["bridge"],
                   FCRUN_SUBNET=rt_args["subnet"])
    cli_env.pop("PYTHONDONTWRITEBYTECODE", None)
    daemon_run_root = os.path.join(work, "run-daemon")  # its socket: seen by cli_daemon only
    daemon = start_daemon(paths.data_root, daemon_run_root, rt_args) if "cli_daemon" in contenders else None
    fcrun_cli = [os.path.join(os.path.dirname(sys.executable), "fcrun")]
    null = os.open("/dev/null", os.O_RDWR)
    results: dict[str, list[float]] = {label: [] for label in contenders}

    def library(i: int, rt: Runtime = rt, prefix: str = "bench", volatile_rootfs: bool = False) -> None:
        name = f"{prefix}-{i}"
        spec = spec_from_image(image, RunOptions(args=["/bin/true"], network=args.net), name=name)
        c = rt.run(name, spec, image=image, stdio=(null, null, null), volatile_rootfs=volatile_rootfs)
        if c.wait() != 0:
            raise SystemExit("library run failed")
        rt.delete(name)

    def library_tmpfs_rootfs(i: int) -> None:
        library(i, rt, "btmpfs", volatile_rootfs=True)

    def direct(i: int) -> None:
        library(i, rt_direct, "bdirect")

    def cli(i: int) -> None:
        subprocess.run([*fcrun_cli, "run", "--net", args.net, "--image", "busybox", "--name", f"bcli-{i}", "--", "/bin/true"],
                       env=cli_env, stdin=subprocess.DEVNULL, check=True)

    def cli_daemon(i: int) -> None:
        subprocess.run([*fcrun_cli, "run", "--net", args.net, "--image", "busybox", "--name", f"bclid-{i}", "--", "/bin/true"],
                       env=dict(cli_env, FCRUN_RUN=daemon_run_root), stdin=subprocess.DEVNULL, check=True)

    def runc(i: int, bundle: str = bundle, prefix: str = "runc") -> None:
        subprocess.run(["runc", "--root", runc_root, "run", "--bundle", bundle, f"fcrun-bench-{prefix}-{tag}-{i}"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)

    def runc_overlay(i: int) -> None:
        storage = os.path.join(ovl_storage, str(i))
        upper, workdir = os.path.join(storage, "upper"), os.path.join(storage, "work")
        os.makedirs(upper, 0o755)
        os.mkdir(workdir, 0o700)
        plan = build_plan(probe, rootfs=ovl_rootfs, overlay_lower=list(reversed(image.layers)), overlay_upper=upper,
                          overlay_work=workdir, cgroup_procs=[], cap_last=0, attached=True)
        sc.mount(b"overlay", ovl_rootfs.encode(), b"overlay", 0, plan.overlay_data)
        mounts.append(ovl_rootfs)
        try:
            runc(i, ovl_bundle, "runco")
        finally:
            sc.umount2(ovl_rootfs.encode(), 0)
            mounts.remove(ovl_rootfs)
        shutil.rmtree(storage)

    try:
        for i in range(args.warmup + args.runs):
            for label, fn in (("library", library), ("library_tmpfs_rootfs", library_tmpfs_rootfs), ("direct", direct), ("cli", cli), ("cli_daemon", cli_daemon), ("runc", runc),
                              ("runc_overlay", runc_overlay)):
                if label not in contenders:
                    continue
                if args.gap_ms:
                    time.sleep(args.gap_ms / 1000)
                t0 = time.perf_counter()
                fn(i)
                elapsed_ms = (time.perf_counter() - t0) * 1000
                if i >= args.warmup:
                    results[label].append(elapsed_ms)
    finally:
        if daemon is not None:
            daemon.terminate()  # it removes what it still runs
            daemon.wait(timeout=30)
        for name in rt.states.names():
            rt.delete(name, force=True)
        rt.cgroups.remove_parent_if_empty()
        if args.net == "bridge":
            rt.network.remove_bridge_if_unused()  # the idle bridge outlives its containers
        os.close(null)

    out = {
        "benchmark": "runtime create+start+wait(+delete) of /bin/true in busybox",
        "net": args.net,
        "runs": args.runs,
        "gap_ms": args.gap_ms,
        "roots_fs": filesystem_of(work),
        **{label: summary(values) for label, values in results.items()},
    }
    ratios = {}
    for base, suffix in (("runc", "runc"), ("runc_overlay", "runc_overlay")):
        if base not in out:
            continue
        for label, key in (("library", "a_library"), ("library_tmpfs_rootfs", "a_library_tmpfs_rootfs"),
                           ("direct", "a_direct"), ("cli", "b_cli"), ("cli_daemon", "b_cli_daemon")):
            if label in out:
                ratios[f"{key}_over_{suffix}"] = round(out[label]["median_ms"] / out[base]["median_ms"], 3)
        for label, key in (("library", "a"), ("library_tmpfs_rootfs", "a_tmpfs_rootfs")):
            if label in out:
                ratios[f"{key}_p99_over_{suffix}_p99"] = round(out[label]["p99_ms"] / out[base]["p99_ms"], 3)
    if ratios:
        out["ratios"] = ratios
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
