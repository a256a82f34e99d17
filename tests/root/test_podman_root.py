"""A real engine drives the OCI runtimes: podman with `--runtime runc` (the baseline) and `--runtime fcrun-oci`.

Every test runs once per runtime with its own podman: private --root, --runroot, tmp dir, events log, file
locks, CNI config dir and cgroup parent (cgroupfs manager, no systemd), the vfs storage driver (no mounts to
leak), `--network none` (nothing leaves the host) and no registry: the image is fcrun's busybox rootfs loaded
with `podman import`. Whatever the runtime does, podman must give the same results with both; a check that
fcrun-oci does not pass yet is named in KNOWN_GAPS with the reason, and is run anyway: once it passes, the
test fails until the entry is removed. Afterwards nothing of the test's podman is left: no container, process,
mount, cgroup or file.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pty
import select
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest
from ociruntimes import FCRUN_OCI_ABSENT, REPO, fcrun_oci_path, runc_path
from polling import wait_until

sys.path.insert(0, os.path.join(REPO, "bench"))  # the private podman's configuration, shared with bench/oci_cli.py
from podmanlib import BLOB_INFO_CACHE, private_podman, remove_blob_info_cache, remove_cgroup_tree  # noqa: E402

pytestmark = [pytest.mark.root]

IMAGE = "localhost/fcrun-busybox:test"
UNIFIED = os.path.exists("/sys/fs/cgroup/cgroup.controllers")  # pure cgroup v2; else v1 controllers (hybrid too)
# Checks (test names without the runtime) that fcrun-oci does not pass yet -> why. Only ever remove entries.
KNOWN_GAPS: dict[str, str] = {}
_parents = itertools.count()


@pytest.fixture(scope="session")
def busybox_archive(busybox, tmp_path_factory):
    """fcrun's busybox image as a tar of its rootfs (numeric owners), for `podman import`.

    Importing writes containers/image's blob-info cache to /var/lib/containers/cache whatever the storage root
    (no setting moves it for root): removed afterwards if this session made it.
    """
    path = str(tmp_path_factory.mktemp("podman-image") / "busybox.tar")
    with tarfile.open(path, "w") as tar:
        tar.add(busybox.layers[-1], arcname=".", filter=lambda info: setattr(info, "uname", "") or
                setattr(info, "gname", "") or info)
    had_cache = os.path.exists(BLOB_INFO_CACHE)
    yield path
    remove_blob_info_cache(had_cache)


class Podman:
    """podman with everything of its own under `home`, running containers through one OCI runtime."""

    def __init__(self, home: str, runtime: str, runtime_name: str, cgroup_parent: str):
        self.home, self.runtime, self.runtime_name, self.cgroup_parent = home, runtime, runtime_name, cgroup_parent
        argv, self.env = private_podman(home)
        self.argv = [*argv, "--runtime", runtime, "--runtime-flag", f"root={home}/runtime-state"]
        self.run_options = ["--pull", "never", "--network", "none", "--cgroup-parent", cgroup_parent]
        self.gap = None  # set by the fixture: why this check is a known gap of this runtime

    def __call__(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run([*self.argv, *args], env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} ({self.runtime_name}) exited {r.returncode}: {r.stderr.strip()}")
        return r

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """podman run with the test's network and cgroup options before args."""
        return self("run", *self.run_options, *args, check=check)

    def inspect(self, container: str, field: str) -> str:
        return self("inspect", "--format", "{{" + field + "}}", container).stdout.strip()

    @contextlib.contextmanager
    def unless_known_gap(self):
        """The check, as is; for a known gap, the check still runs: it must fail (the test then skips, naming the
        gap), and passing fails the test so that the entry goes."""
        if self.gap is None:
            yield
            return
        try:
            yield
        except Exception as failure:  # any way of failing is the gap showing
            pytest.skip(f"known gap of {self.runtime_name}: {self.gap} (fails: {str(failure)[:300]})")
        pytest.fail(f"passes with {self.runtime_name} now: remove it from KNOWN_GAPS in {__file__}")


def leftovers(podman: Podman) -> list[str]:
    """What the test's podman left: processes that name its home (conmon, a container's init), mounts under it."""
    left = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                if podman.home.encode() in f.read():
                    left.append(f"process {cmdline.split('/')[2]}")
        except OSError:
            continue  # gone meanwhile
    with open("/proc/self/mountinfo") as f:
        left += [f"mount {line.split()[4]}" for line in f if line.split()[4].startswith(podman.home)]
    return left


@pytest.fixture(params=["runc", "fcrun-oci"])
def podman(request, busybox_archive):
    missing = [tool for tool in ("podman", "conmon") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (scripts/setup.sh installs podman and conmon)")
    runtime = runc_path() if request.param == "runc" else fcrun_oci_path()
    if runtime is None:
        pytest.skip(FCRUN_OCI_ABSENT if request.param == "fcrun-oci" else "runc not installed: no baseline")
    home = tempfile.mkdtemp(prefix="fcpm-")  # short: conmon's socket paths have a length limit
    engine = Podman(home, runtime, request.param, f"/fcrun-podman-{os.getpid()}-{next(_parents)}")
    if request.param == "fcrun-oci":
        engine.gap = KNOWN_GAPS.get(request.node.originalname)
    try:
        engine("import", busybox_archive, IMAGE)
        yield engine
    finally:
        ids = engine("ps", "-a", "-q", check=False).stdout.split()
        if ids:
            engine("rm", "-f", "-t", "0", *ids, check=False)
        deadline = time.monotonic() + 15  # conmon exits shortly after its container
        while leftovers(engine) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = leftovers(engine)
        busy = remove_cgroup_tree(engine.cgroup_parent)
        if not left:
            engine("rmi", "-a", "-f", check=False)
            shutil.rmtree(home, ignore_errors=True)
        assert not left and not busy, f"podman left behind: {left} {busy} (home {home} kept)"


def test_run_rm_echo(podman):
    with podman.unless_known_gap():
        r = podman.run("--rm", IMAGE, "echo", "hi")
        assert r.stdout == "hi\n"
        assert podman.run("--rm", IMAGE, "sh", "-c", "exit 3", check=False).returncode == 3
        assert podman("ps", "-a", "-q").stdout == ""


def test_detached_then_stop(podman):
    with podman.unless_known_gap():
        # exits 0 on SIGTERM, so the exit code says whether stop's SIGTERM got there (else SIGKILL: 137)
        cid = podman.run("-d", IMAGE, "sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.1; done").stdout.strip()
        assert podman.inspect(cid, ".State.Status") == "running"
        podman("stop", "-t", "20", cid)
        assert podman.inspect(cid, ".State.Status") == "exited"
        assert podman.inspect(cid, ".State.ExitCode") == "0"
        podman("rm", cid)


def test_exec(podman):
    with podman.unless_known_gap():
        cid = podman.run("-d", IMAGE, "sleep", "600").stdout.strip()
        r = podman("exec", cid, "sh", "-c", "echo exec-$((40 + 2)); tr '\\0' ' ' </proc/1/cmdline; echo")
        assert r.stdout == "exec-42\nsleep 600 \n"
        assert podman("exec", cid, "sh", "-c", "exit 7", check=False).returncode == 7
        podman("rm", "-f", "-t", "0", cid)


def freezer_state(pid: str) -> str:
    """The kernel's freezer state of the cgroup pid is in: FROZEN or THAWED (v1), 1 or 0 (v2)."""
    with open(f"/proc/{pid}/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    if UNIFIED:
        path = next(p for h, c, p in lines if h == "0")
        with open(f"/sys/fs/cgroup{path}/cgroup.freeze") as f:
            return f.read().strip()
    path = next(p for h, c, p in lines if "freezer" in c.split(","))
    with open(f"/sys/fs/cgroup/freezer{path}/freezer.state") as f:
        return f.read().strip()


def test_pause_unpause(podman):
    with podman.unless_known_gap():
        cid = podman.run("-d", IMAGE, "sleep", "600").stdout.strip()
        pid = podman.inspect(cid, ".State.Pid")
        podman("pause", cid)
        assert podman.inspect(cid, ".State.Status") == "paused"
        assert freezer_state(pid) in ("FROZEN", "1")
        podman("unpause", cid)
        assert podman.inspect(cid, ".State.Status") == "running"
        assert freezer_state(pid) in ("THAWED", "0")
        assert podman("exec", cid, "echo", "awake").stdout == "awake\n"
        podman("rm", "-f", "-t", "0", cid)


def test_limits_seen_from_inside(podman):
    if UNIFIED:
        files = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/pids.max"]
        expected = ["67108864", "50000 100000", "42"]
    else:
        files = ["/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
                 "/sys/fs/cgroup/cpu/cpu.cfs_period_us", "/sys/fs/cgroup/pids/pids.max"]
        expected = ["67108864", "50000", "100000", "42"]
    with podman.unless_known_gap():
        r = podman.run("--rm", "--memory", "64m", "--cpus", "0.5", "--pids-limit", "42", IMAGE, "cat", *files)
        assert r.stdout.split("\n")[:-1] == expected


def test_rm_force_kills_a_running_container(podman):
    with podman.unless_known_gap():
        cid = podman.run("-d", IMAGE, "sleep", "600").stdout.strip()
        pid = int(podman.inspect(cid, ".State.Pid"))
        podman("rm", "-f", "-t", "0", cid)
        assert podman("ps", "-a", "-q").stdout == ""
        wait_until(f"the container's process {pid} to be gone", lambda: not os.path.exists(f"/proc/{pid}"),
                   timeout_s=15)


def read_terminal(master: int, proc: subprocess.Popen, timeout_s: float = 60) -> bytes:
    """All that comes out of the pty master until proc exits and the terminal drains (EIO)."""
    out, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: no process holds the terminal any more
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def test_run_it_through_a_terminal(podman):
    with podman.unless_known_gap():
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen([*podman.argv, "run", *podman.run_options, "-it", "--rm", IMAGE, "sh", "-c",
                                     "tty; read line; echo got-$line; exit 5"], env=podman.env,
                                    stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
            os.close(slave)
            slave = -1
            os.write(master, b"typed\n")
            out = read_terminal(master, proc)
            assert proc.wait(timeout=30) == 5, out
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
        assert b"/dev/pts/0" in out and b"got-typed" in out, out
