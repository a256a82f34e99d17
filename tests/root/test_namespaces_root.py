"""Root tests of the container's namespaces as runc makes them: joined by `path` (pid, mount,
user), or none of its own (the runtime's pid or mount namespace). Each is checked by its real
effect: the container's /proc/PID/ns/* link, what a process inside sees, what is left on the
host (or in the joined namespace) after delete. Bad paths fail naming the spec field.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

from fcrun.errors import SpecError
from fcrun.runtime import Runtime
from fcrun.runtime.holder import new_userns
from fcrun.runtime.options import RunOptions, spec_from_image
from fcrun.runtime.spec import Namespace
from hostcheck import BRIDGE, CGROUP_PARENT, SUBNET
from polling import running, wait_until
from capture import run_captured

pytestmark = [pytest.mark.root]

ALL = ("pid", "mount", "ipc", "uts", "network", "cgroup")


@pytest.fixture
def rootfs(tmp_path, busybox):
    """A bundle's rootfs directory (busybox's layers copied): a container without a mount
    namespace of its own binds it in place (an image's overlay needs one)."""
    path = tmp_path / "rootfs"
    path.mkdir()
    for layer in busybox.layers[::-1]:  # the base first, the top last
        subprocess.run(["cp", "-a", f"{layer}/.", str(path)], check=True)
    return str(path)


@pytest.fixture(params=[False, True], ids=["forked-here", "spawner"])
def forker(request, runtime):
    """The runtime, forking containers itself or through the spawner (which gets the plan's
    pid namespace to join on the wire and forks the child into it)."""
    return Runtime(runtime.paths, cgroup_parent=CGROUP_PARENT, bridge=BRIDGE, subnet=SUBNET, spawner=request.param)


@pytest.fixture
def holder():
    """Start `unshare OPTIONS sleep` (a process in namespaces of its own); killed afterwards."""
    started = []

    def start(*options: str) -> int:
        proc = subprocess.Popen(["unshare", *options, "sleep", "1000"], start_new_session=True)
        started.append(proc)
        return proc.pid

    yield start
    for proc in started:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _spec(busybox, rootfs, name, script, namespaces):
    spec = spec_from_image(busybox, RunOptions(args=["sh", "-c", script], network="none"), name=name)
    spec.root.path = rootfs
    spec.root.readonly = True  # the copied layer stays as it is
    spec.linux.namespaces = namespaces
    if not any(ns.type == "uts" for ns in namespaces):
        spec.hostname = ""
    return spec


def _new(*types: str, **paths: str) -> list[Namespace]:
    """Namespaces of these types, new ones but for those given a path (mount_="..." for mount)."""
    return [Namespace(type=t, path=paths.get(t, paths.get(t + "_", ""))) for t in types]


def _run(rt, name, spec):
    """Run to completion (no init: pid 1 only in a new pid namespace); (exit code, output)."""
    return run_captured(rt, name, spec, init=False)


def _ns(pid, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _wait_unshared(pid: int, kind: str) -> None:
    """Until `unshare` (pid) is in its new namespace (it unshares after its exec)."""
    wait_until(f"unshare in its new {kind} namespace",
               lambda: _ns(pid, kind) != _ns("self", kind.removesuffix("_for_children")), timeout_s=5)


def _mounts_under(path: str, pid="self") -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return [line for line in f if f" {path}" in line]


def test_pid_namespace_joined_by_path_is_the_containers(forker, busybox, rootfs, holder):
    pid = holder("--pid", "--fork")
    _wait_unshared(pid, "pid_for_children")
    target = f"/proc/{pid}/ns/pid_for_children"
    # The container's /proc is mounted in the joined namespace: pid 1 there is unshare's sleep.
    spec = _spec(busybox, rootfs, "t-join-pid", "cat /proc/1/cmdline; echo; readlink /proc/self/ns/pid; echo $$",
                 _new(*ALL, pid=target))
    code, out = _run(forker, "t-join-pid", spec)
    assert code == 0, out
    cmdline, ns, own_pid = out.splitlines()
    assert cmdline.startswith("sleep") and ns == os.readlink(target), out
    assert int(own_pid) > 1  # forked into it, not its pid 1


def test_no_pid_namespace_shares_the_runtimes_and_delete_kills_every_process(forker, busybox, rootfs):
    runtime = forker
    spec = _spec(busybox, rootfs, "t-host-pid", "sleep 1000 & sleep 1000 & wait",
                 _new("mount", "ipc", "uts", "network", "cgroup"))
    container = runtime.run("t-host-pid", spec, detach=True, init=False)
    pid = container.pid
    assert _ns(pid, "pid") == _ns("self", "pid")
    wait_until("the container's 3 processes", lambda: len(runtime.cgroup("t-host-pid").pids()) == 3, timeout_s=5)
    members = set(runtime.cgroup("t-host-pid").pids())
    assert pid in members
    # Its first process ends; the kernel does not end the others (no pid namespace of its own).
    runtime.kill("t-host-pid", signal.SIGKILL)
    container.wait()
    others = members - {pid}
    assert all(running(p) for p in others)
    runtime.delete("t-host-pid")  # by its cgroup, then
    wait_until("the container's other processes gone", lambda: not any(running(p) for p in others), timeout_s=5)


def test_oci_kill_all_reaches_the_processes_a_stopped_container_left(tmp_path, rootfs):
    """fcrun-oci kill --all of a container without a pid namespace whose first process is gone."""
    import json

    from ociruntimes import fcrun_oci_path

    oci = fcrun_oci_path()
    if oci is None:
        pytest.skip("fcrun-oci not installed")
    root, bundle = str(tmp_path / "oci-root"), tmp_path / "bundle"
    bundle.mkdir()
    subprocess.run([oci, "spec", "--bundle", str(bundle)], check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": rootfs, "readonly": False}  # /left: the copied rootfs is the test's
    config["process"].update(args=["sh", "-c", "sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > /left"],
                             terminal=False)
    config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "pid"]
    (bundle / "config.json").write_text(json.dumps(config))

    def oci_run(*args):
        # Output to files: the container (and its holder) keep what create gives them open.
        out, err = tmp_path / "out", tmp_path / "err"
        with open(os.devnull) as stdin, open(out, "w") as stdout, open(err, "w") as stderr:
            code = subprocess.run([oci, "--root", root, *args], stdin=stdin, stdout=stdout, stderr=stderr,
                                  timeout=60).returncode
        return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())

    # create + start (run would delete the container, and its cgroup with the sleep, at its exit)
    result = oci_run("create", "--bundle", str(bundle), "t-kill-all")
    try:
        assert result.returncode == 0, result.stderr
        assert oci_run("start", "t-kill-all").returncode == 0
        wait_until("the container stopped",
                   lambda: json.loads(oci_run("state", "t-kill-all").stdout)["status"] == "stopped", timeout_s=10)
        with open(os.path.join(rootfs, "left")) as f:
            left = int(f.read())  # the host's pid: no pid namespace of its own
        assert running(left)  # the container is stopped, its sleep is not
        assert oci_run("kill", "t-kill-all", "KILL").returncode != 0  # no first process to signal
        result = oci_run("kill", "--all", "t-kill-all", "KILL")
        assert result.returncode == 0, result.stderr
        wait_until("the sleep killed", lambda: not running(left), timeout_s=5)
    finally:
        oci_run("delete", "--force", "t-kill-all")
    assert _mounts_under(rootfs) == []


def test_no_mount_namespace_binds_the_rootfs_in_the_runtimes_and_delete_unmounts_it(forker, busybox, rootfs):
    runtime = forker  # the spawner's child binds it in the spawner's mount namespace: the runtime's
    spec = _spec(busybox, rootfs, "t-host-mnt", "readlink /proc/self/ns/mnt; ls /; cat /proc/1/cmdline",
                 _new("pid", "ipc", "uts", "network", "cgroup"))
    code, out = _run(runtime, "t-host-mnt", spec)
    assert code == 0, out
    lines = out.split()
    assert lines[0] == _ns("self", "mnt")
    assert "bin" in lines and "work" not in lines and "tmp" in lines  # chrooted into the rootfs
    assert _mounts_under(rootfs) == []


def test_a_failed_creation_without_a_mount_namespace_leaves_the_rootfs_as_it_found_it(runtime, busybox, rootfs):
    from fcrun.errors import ContainerError

    subprocess.run(["mount", "--bind", rootfs, rootfs], check=True)  # the bundle's own mount there
    try:
        spec = _spec(busybox, rootfs, "t-host-mnt-fail", "true", _new("pid", "ipc", "uts", "network", "cgroup"))
        spec.process.args = ["/no/such/program"]
        with pytest.raises(ContainerError, match="executable not found"):
            runtime.run("t-host-mnt-fail", spec, init=False)
        assert len(_mounts_under(rootfs)) == 1  # ours went, the bundle's stays
    finally:
        subprocess.run(["umount", rootfs], check=True)


def test_exec_into_a_container_without_a_mount_namespace_of_its_own_gets_its_root(runtime, busybox, rootfs):
    spec = _spec(busybox, rootfs, "t-host-mnt-exec", "sleep 1000", _new("pid", "ipc", "uts", "network", "cgroup"))
    runtime.run("t-host-mnt-exec", spec, detach=True, init=False)
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        code = runtime.exec("t-host-mnt-exec", ["sh", "-c", "ls /; readlink /proc/self/ns/mnt"], stdio=(null, w, w))
    finally:
        os.close(w)
        os.close(null)
    with os.fdopen(r) as out:
        listing = out.read().split()
    runtime.delete("t-host-mnt-exec", force=True)
    assert code == 0, listing
    # The host's mount namespace, but the container's root (not the host's /).
    assert listing[-1] == _ns("self", "mnt") and "bin" in listing and "work" not in listing, listing
    assert _mounts_under(rootfs) == []


def test_mount_namespace_joined_by_path_gets_the_rootfs_and_loses_it_at_delete(runtime, busybox, rootfs, holder):
    pid = holder("--mount", "--propagation", "private")
    _wait_unshared(pid, "mnt")
    target = f"/proc/{pid}/ns/mnt"
    spec = _spec(busybox, rootfs, "t-join-mnt", "readlink /proc/self/ns/mnt; ls /bin/busybox; sleep 1000",
                 _new(*ALL, mount_=target))
    r, w = os.pipe()
    try:
        container = runtime.run("t-join-mnt", spec, stdio=(w, w, w), init=False)
    finally:
        os.close(w)
    with os.fdopen(r) as out:
        assert out.readline().strip() == os.readlink(target)
        assert out.readline().strip() == "/bin/busybox"
        assert _mounts_under(rootfs, pid) != []  # the container's mounts live in that namespace
        assert _mounts_under(rootfs) == []  # and not in ours
        runtime.kill("t-join-mnt", signal.SIGKILL)
        container.wait()
    runtime.delete("t-join-mnt")
    assert _mounts_under(rootfs, pid) == []


def test_user_namespace_joined_by_path_keeps_its_own_id_maps(runtime, busybox, rootfs):
    fd = new_userns(b"0 200000 65536\n", b"0 200000 65536\n")
    try:
        path = f"/proc/{os.getpid()}/fd/{fd}"
        expected = os.readlink(path)
        spec = _spec(busybox, rootfs, "t-join-user", "readlink /proc/self/ns/user; cat /proc/self/uid_map; id -u",
                     _new(*ALL, "user", user=path))
        code, out = _run(runtime, "t-join-user", spec)
    finally:
        os.close(fd)
    assert code == 0, out
    ns, uid_map, uid = out.splitlines()
    assert ns == expected and uid_map.split() == ["0", "200000", "65536"] and uid == "0"


def _plain_file(path) -> str:
    path.write_text("not a namespace")
    return str(path)


@pytest.mark.parametrize("threaded", [False, True], ids=["single-threaded", "threaded"])
def test_an_image_container_in_a_user_namespace_joined_by_path_owns_its_writable_layer(runtime, busybox, threaded):
    # A threaded caller (serve, or this test process with a library's thread left) may not fork
    # Python to read the namespace's maps: it runs a helper; both must record them.
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    if threaded:
        other.start()
    fd = new_userns(b"0 300000 65536\n", b"0 300000 65536\n")
    try:
        path = f"/proc/{os.getpid()}/fd/{fd}"
        spec = spec_from_image(busybox, RunOptions(args=["sh", "-c", "touch /written && stat -c %u /written"],
                                                   network="none"), name="t-join-user-img")
        spec.linux.namespaces = [*spec.linux.namespaces, Namespace(type="user", path=path)]
        r, w = os.pipe()
        null = os.open("/dev/null", os.O_RDONLY)
        try:
            container = runtime.run("t-join-user-img", spec, image=busybox, stdio=(null, w, w), init=False)
        finally:
            os.close(w)
            os.close(null)
        with os.fdopen(r) as out:
            output = out.read()
        code = container.wait()
        # The namespace's maps were read and recorded: the writable layer is its root's.
        assert runtime.state("t-join-user-img").spec.linux.uid_mappings[0].host_id == 300000
        runtime.delete("t-join-user-img")
    finally:
        os.close(fd)
        stop.set()
        if threaded:
            other.join()
    assert (code, output) == (0, "0\n")


@pytest.mark.parametrize("kind,make_path,message", [
    ("network", lambda tmp: str(tmp / "missing"), "No such file"),
    ("pid", lambda tmp: _plain_file(tmp / "plain"), "is not a pid namespace"),
    ("mount", lambda tmp: "/proc/self/ns/net", "is not a mount namespace"),
])
def test_a_bad_namespace_path_names_the_field_and_leaves_nothing(runtime, busybox, rootfs, tmp_path, kind,
                                                                make_path, message):
    namespaces = _new(*ALL)
    index = [ns.type for ns in namespaces].index(kind)
    namespaces[index].path = make_path(tmp_path)
    spec = _spec(busybox, rootfs, "t-bad-ns", "true", namespaces)
    with pytest.raises(SpecError, match=message) as info:
        runtime.run("t-bad-ns", spec, init=False)
    assert info.value.where == f"$.linux.namespaces[{index}].path"
    assert runtime.states.names() == [] and _mounts_under(rootfs) == []
