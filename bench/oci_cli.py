#!/usr/bin/env python3
"""An OCI runtime CLI as an engine drives it: create + start + delete of /bin/true, fcrun-oci against runc.

Each round times one cycle per runtime, alternating which goes first, on the same busybox bundle (runc's
default spec with its ambient capabilities inheritable too, read-only root, no terminal, /bin/true), each runtime with its own --root beside the other's:

    RUNTIME --root R create --bundle B --pid-file P ID   # the container's init waits for start
    RUNTIME --root R start ID                            # /bin/true runs and exits
    (wait for the init to exit: this process is a child subreaper, as conmon and containerd's shim are)
    RUNTIME --root R delete ID

With podman installed, also `podman run --rm IMAGE /bin/true` per runtime (--podman-runs rounds, alternating):
a private podman (storage, run root, cgroup parent under its own temporary directory; vfs storage, cgroupfs,
--network none, the busybox rootfs imported from a tar: no registry).

The contender is --runtime, else fcrun-oci beside this Python, in the source tree's cli/ or on PATH; without
one (or if it fails a cycle, said on stderr with its error) runc is timed alone. Prints JSON: median and p99
(ms) of each, and the ratios of fcrun-oci's to runc's. Needs root. Usage:
bench/oci_cli.py [--runs 50] [--warmup 3] [--runtime PATH] [--podman-runs 10] [--without-mount DEST] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from fcrun import syscalls as sc
from fcrun.images import ImageStore
from fcrun.paths import Paths

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import preflight, summary  # noqa: E402
from podmanlib import BLOB_INFO_CACHE, private_podman, remove_blob_info_cache, remove_cgroup_tree  # noqa: E402

PHASES = ("create", "start", "wait", "delete")  # a cycle's steps, timed each
PR_SET_CHILD_SUBREAPER = 36  # prctl(2): orphaned descendants (a detached container's init) are reparented to us
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CycleFailed(Exception):
    """A runtime command of a cycle exited non-zero; the message names it and its stderr."""


def find_fcrun_oci() -> str | None:
    for candidate in (os.path.join(os.path.dirname(sys.executable), "fcrun-oci"), os.path.join(REPO, "cli", "fcrun-oci")):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("fcrun-oci")


def make_bundle(bundle: str, rootfs: str, without_mounts: list[str]) -> None:
    """runc's default spec on rootfs (read-only), running /bin/true without a terminal, its ambient capabilities
    inheritable too, less the mounts at the destinations in without_mounts."""
    subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    config["mounts"] = [m for m in config["mounts"] if m["destination"] not in without_mounts]
    # runc's default lists ambient capabilities that are not inheritable, which the kernel refuses to raise: runc
    # goes on without them, fcrun-oci (2026-12-04) fails. Inheritable too, so both raise them.
    caps = config["process"]["capabilities"]
    caps["inheritable"] = list(caps.get("ambient", []))
    config["root"] = {"path": rootfs, "readonly": True}
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/true"]
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)


def call(argv: list[str], stderr_path: str) -> None:
    """Run a runtime command, its stderr to a file: a pipe would be the container's stderr too (its init inherits
    create's stdio), and reading it to EOF would wait for the container."""
    with open(stderr_path, "w+") as stderr:
        returncode = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr).returncode
        if returncode != 0:
            stderr.seek(0)
            raise CycleFailed(f"{' '.join(argv)} exited {returncode}: {stderr.read().strip()[-500:]}")


def cycle(runtime: str, state_root: str, bundle: str, container_id: str,
          phases: dict[str, list[float]] | None = None) -> float:
    """One create + start + wait + delete of the bundle's /bin/true; its milliseconds (each
    command's appended to phases[command] too, given phases).

    Raises:
        CycleFailed: a command failed (the container is deleted with --force first).
    """
    pid_file = os.path.join(state_root, f"{container_id}.pid")
    stderr_path = os.path.join(state_root, "stderr")
    base = [runtime, "--root", state_root]
    t0 = time.perf_counter()
    marks = [t0]
    try:
        call([*base, "create", "--bundle", bundle, "--pid-file", pid_file, container_id], stderr_path)
        marks.append(time.perf_counter())
        with open(pid_file) as f:
            pid = int(f.read())
        call([*base, "start", container_id], stderr_path)
        marks.append(time.perf_counter())
        os.waitpid(pid, 0)  # ours to reap: we are a subreaper and the runtime that made it has exited
        marks.append(time.perf_counter())
        call([*base, "delete", container_id], stderr_path)
        marks.append(time.perf_counter())
    except (CycleFailed, OSError, ValueError) as failure:
        subprocess.run([*base, "delete", "--force", container_id], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        raise CycleFailed(str(failure)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file)
    if phases is not None:
        for name, start, end in zip(PHASES, marks, marks[1:]):
            phases[name].append((end - start) * 1000)
    return (time.perf_counter() - t0) * 1000


def reap_orphans() -> None:
    """Reap what else the runtimes left to us (a monitor process, a failed cycle's init)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


class PrivatePodman:
    """podman with everything of its own under `home` (podmanlib.py), its containers in cgroup_parent."""

    def __init__(self, home: str, cgroup_parent: str):
        self.home, self.cgroup_parent = home, cgroup_parent
        self.argv, self.env = private_podman(home)

    def __call__(self, *args: str, runtime: str | None = None) -> None:
        flags = ["--runtime", runtime, "--runtime-flag", f"root={self.home}/state-{os.path.basename(runtime)}"] \
            if runtime else []
        r = subprocess.run([*self.argv, *flags, *args], env=self.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
        if r.returncode != 0:
            raise CycleFailed(f"podman {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-500:]}")

    def run_rm(self, runtime: str) -> float:
        t0 = time.perf_counter()
        self("run", "--rm", "--pull", "never", "--network", "none", "--cgroup-parent", self.cgroup_parent,
             "localhost/fcrun-bench-busybox", "/bin/true", runtime=runtime)
        return (time.perf_counter() - t0) * 1000


def time_rounds(contenders: dict[str, object], rounds: int, warmup: int, timed,
                failed: dict[str, str]) -> dict[str, list[float]]:
    """timed(label, contender, i) for each contender per round, alternating the order; a contender whose run fails
    is dropped, saying why on stderr and in failed[label] (the others go on)."""
    results: dict[str, list[float]] = {label: [] for label in contenders}
    live = list(contenders)
    for i in range(warmup + rounds):
        for label in (live if i % 2 == 0 else list(reversed(live))):
            if label not in live:
                continue
            try:
                elapsed_ms = timed(label, contenders[label], i)
            except (CycleFailed, subprocess.TimeoutExpired) as failure:
                print(f"bench/oci_cli.py: {label} failed, timing the others alone: {failure}", file=sys.stderr)
                live.remove(label)
                failed[label] = str(failure)[:500]
                results.pop(label)
                continue
            if i >= warmup:
                results[label].append(elapsed_ms)
    return results


def with_ratios(results: dict[str, list[float]], failed: dict[str, str]) -> dict:
    out = {label: summary(values) for label, values in results.items() if values}
    if failed:
        out["failed"] = failed
    if "fcrun-oci" in out and "runc" in out:
        out["ratios"] = {"fcrun_oci_over_runc": round(out["fcrun-oci"]["median_ms"] / out["runc"]["median_ms"], 3),
                         "fcrun_oci_p99_over_runc_p99": round(out["fcrun-oci"]["p99_ms"] / out["runc"]["p99_ms"], 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runtime", help="the runtime to compare with runc (default: fcrun-oci, found as above)")
    parser.add_argument("--podman-runs", type=int, default=10, help="rounds of podman run --rm (0: none)")
    parser.add_argument("--without-mount", action="append", default=[], metavar="DEST",
                        help="leave the default spec's mount at DEST out of the bundle (both runtimes; repeatable), "
                             "e.g. /sys/fs/cgroup for a runtime that refuses the cgroup mount")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    if code := preflight("bench/oci_cli.py", ("runc",)):
        return code
    contenders = {"runc": shutil.which("runc")}
    candidate = args.runtime or find_fcrun_oci()
    if candidate is None:
        print("bench/oci_cli.py: no fcrun-oci (not installed, --runtime not given): timing runc alone", file=sys.stderr)
    else:
        contenders["fcrun-oci"] = os.path.abspath(candidate)
    sc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    work = tempfile.mkdtemp(prefix="fcrun-bench-oci-")
    had_blob_cache = os.path.exists(BLOB_INFO_CACHE)
    try:
        return bench(args, contenders, work)
    finally:
        reap_orphans()
        shutil.rmtree(work, ignore_errors=True)
        remove_blob_info_cache(had_blob_cache)


def bench(args: argparse.Namespace, contenders: dict[str, str], work: str) -> int:
    image = ImageStore(Paths(data_root=os.path.join(work, "data"), run_root="/nonexistent")).build(
        "busybox", progress=lambda *a: None)
    bundle = os.path.join(work, "bundle")
    os.mkdir(bundle)
    make_bundle(bundle, image.layers[-1], args.without_mount)
    state_roots = {label: os.path.join(work, f"state-{label}") for label in contenders}
    for d in state_roots.values():
        os.mkdir(d, 0o700)
    tag = os.getpid()

    phases = {label: {name: [] for name in PHASES} for label in contenders}

    def oci_cycle(label: str, runtime: str, i: int) -> float:
        try:
            return cycle(runtime, state_roots[label], bundle, f"fcrun-bench-{tag}-{i}",
                         phases[label] if i >= args.warmup else None)
        finally:
            reap_orphans()

    out = {"benchmark": "OCI runtime CLI: create + start + wait + delete of /bin/true (busybox, read-only root)",
           "runs": args.runs, "runtimes": contenders, "mounts_left_out": args.without_mount}
    failed: dict[str, str] = {}
    out["create_start_delete"] = with_ratios(time_rounds(contenders, args.runs, args.warmup, oci_cycle, failed), failed)
    # Each command's own time (the cycle's runs; `wait`: from start's exit to the init's).
    out["per_command"] = {label: {name: summary(values) for name, values in steps.items() if values}
                          for label, steps in phases.items() if label not in failed}
    if args.podman_runs and shutil.which("podman"):
        home = os.path.join(work, "podman")
        os.mkdir(home, 0o700)
        podman = PrivatePodman(home, f"/fcrun-bench-podman-{tag}")
        try:
            archive = os.path.join(work, "busybox.tar")
            with tarfile.open(archive, "w") as tar:
                tar.add(image.layers[-1], arcname=".")
            podman("import", archive, "localhost/fcrun-bench-busybox")
            failed = {}
            out["podman_run_rm"] = with_ratios(time_rounds(
                contenders, args.podman_runs, 1, lambda label, runtime, i: podman.run_rm(runtime), failed), failed)
        finally:
            with contextlib.suppress(CycleFailed):
                podman("rm", "-a", "-f", "-t", "0")
            # conmon, and fcrun-oci's holder (oci_holder.py: up to EXIT_LINGER_S after the container's exit
            # when the delete goes elsewhere; podman's cleanup leaves --runtime-flag root= out), leave shortly.
            deadline = time.monotonic() + 15
            while remove_cgroup_tree(podman.cgroup_parent) and time.monotonic() < deadline:
                time.sleep(0.2)
    elif args.podman_runs:
        print("bench/oci_cli.py: podman not installed: no podman run --rm figures", file=sys.stderr)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
