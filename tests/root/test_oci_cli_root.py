"""`fcrun-oci` as an engine calls it: the launcher, real bundles, real containers, runc's exit codes.

The bundle's rootfs is the host's static busybox and a few applet links. Each command runs
through cli/fcrun-oci (the installed launcher) with the test's own --root and cgroup parent;
a container's stdio is files, as an engine's fifos would be (a pipe would be held open by
the container, as with runc).
"""

from __future__ import annotations

import array
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from hostcheck import CGROUP_PARENT, host_snapshot, settled_snapshot
from polling import wait_until

from fcrun.paths import Paths
from fcrun.runtime import Runtime
from fcrun_cli.oci import cgroup_parent_for

pytestmark = [pytest.mark.root]

LAUNCHER = os.path.join(os.path.dirname(__file__), "..", "..", "cli", "fcrun-oci")
APPLETS = ("sh", "sleep", "cat", "echo", "true", "id", "ls", "pwd")
OCI_CGROUP_PARENT = CGROUP_PARENT + "-oci"  # inside what the host snapshot watches


class Oci:
    """Runs `fcrun-oci --root ROOT ...`; the container's stdio (create, run) goes to files."""

    def __init__(self, root: str, tmp: str):
        self.root = root
        self.tmp = tmp
        self.env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"],
                        FCRUN_OCI_CGROUP_PARENT=OCI_CGROUP_PARENT)
        self.runtime = self.runtime_of(root)

    def runtime_of(self, root: str) -> Runtime:
        """The library's view of the same world (what fcrun-oci makes of --root)."""
        os.environ["FCRUN_OCI_CGROUP_PARENT"] = OCI_CGROUP_PARENT  # read by cgroup_parent_for
        try:
            return Runtime(Paths(data_root=root, run_root=root), cgroup_parent=cgroup_parent_for(root))
        finally:
            del os.environ["FCRUN_OCI_CGROUP_PARENT"]

    def __call__(self, *args: str, root: str | None = None, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([LAUNCHER, "--root", root or self.root, *args], env=self.env, input=input,
                              capture_output=True, text=True, timeout=60)

    def with_files(self, *args: str, root: str | None = None) -> subprocess.CompletedProcess:
        """A command whose stdio the container inherits: files, read back afterwards."""
        out, err = os.path.join(self.tmp, "out"), os.path.join(self.tmp, "err")
        with open(os.devnull) as stdin, open(out, "w") as stdout, open(err, "w") as stderr:
            code = subprocess.run([LAUNCHER, "--root", root or self.root, *args], env=self.env, stdin=stdin,
                                  stdout=stdout, stderr=stderr, timeout=60).returncode
        with open(err) as f:
            return subprocess.CompletedProcess(args, code, "", f.read())

    def output(self) -> str:
        with open(os.path.join(self.tmp, "out")) as f:
            return f.read()

    def state(self, name: str, root: str | None = None) -> dict:
        r = self("state", name, root=root)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


def make_bundle(directory: str, args: list[str], **changes) -> str:
    """A bundle: `fcrun-oci spec`'s config.json with these args, and a busybox rootfs."""
    rootfs = os.path.join(directory, "rootfs")
    for sub in ("bin", "proc", "dev", "sys", "tmp"):
        os.makedirs(os.path.join(rootfs, sub), exist_ok=True)
    shutil.copy(shutil.which("busybox"), os.path.join(rootfs, "bin", "busybox"))
    for applet in APPLETS:
        os.symlink("busybox", os.path.join(rootfs, "bin", applet))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
    subprocess.run([LAUNCHER, "spec", "--bundle", directory], env=env, check=True)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config["process"]["args"] = args
    config["root"]["readonly"] = False
    config.update(changes)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory


def gone(pid: int) -> bool:
    """Process `pid` has exited (a zombie not reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" in f.read()
    except FileNotFoundError:
        return True


@pytest.fixture
def oci(tmp_path):
    root = str(tmp_path / "oci-root")
    other = str(tmp_path / "other-root")
    before = host_snapshot(root)
    runner = Oci(root, str(tmp_path))
    yield runner
    for r in (root, other):
        listed = runner("list", "-q", root=r).stdout.split()
        for name in listed:
            runner("delete", "--force", name, root=r)
        runner.runtime_of(r).cgroups.remove_parent_if_empty()
    assert settled_snapshot(root, before) == before, "the test left something on the host"
    for r in (root, other):
        holders = os.path.join(r, "oci")
        assert not os.path.isdir(holders) or os.listdir(holders) == [], "a holder socket was left behind"


@pytest.fixture
def sleeper(tmp_path):
    return make_bundle(str(tmp_path / "sleeper"), ["sh", "-c", "echo started; exec sleep 300"])


def test_create_start_state_kill_delete(oci, sleeper, tmp_path):
    pid_file = str(tmp_path / "pid")
    r = oci.with_files("create", "--bundle", sleeper, "--pid-file", pid_file, "c1")
    assert r.returncode == 0, r.stderr
    state = oci.state("c1")
    with open(pid_file) as f:
        assert int(f.read()) == state["pid"] > 0
    assert state["status"] == "created"
    assert (state["id"], state["bundle"], state["rootfs"]) == ("c1", sleeper, os.path.join(sleeper, "rootfs"))
    assert state["ociVersion"].startswith("1.") and state["created"].endswith("Z")
    assert oci.output() == ""  # stopped before the user process

    r = oci("start", "c1")
    assert r.returncode == 0, r.stderr
    assert oci.state("c1")["status"] == "running"
    wait_until("the container's output", lambda: oci.output() == "started\n", detail=oci.output)
    r = oci("start", "c1")
    assert r.returncode == 1 and "already running" in r.stderr

    r = oci("delete", "c1")
    assert r.returncode == 1 and "not stopped" in r.stderr
    assert oci.state("c1")["status"] == "running"

    assert oci("kill", "c1", "KILL").returncode == 0
    wait_until("the container to stop", lambda: oci.state("c1")["status"] == "stopped")
    assert oci.state("c1")["pid"] == 0
    r = oci("start", "c1")
    assert r.returncode == 1 and "stopped" in r.stderr
    assert oci("delete", "c1").returncode == 0
    r = oci("state", "c1")
    assert (r.returncode, r.stderr.strip()) == (1, "container does not exist")


@pytest.mark.parametrize("name", ["f" * 64, "a" * 128])  # podman's and Docker's IDs: 64 hex digits
def test_engine_sized_ids(oci, sleeper, name):
    assert oci.with_files("create", "--bundle", sleeper, name).returncode == 0
    assert oci("start", name).returncode == 0
    assert oci.state(name)["status"] == "running"
    assert oci("delete", "--force", name).returncode == 0


def test_a_created_container_is_deleted_without_force(oci, sleeper):
    assert oci.with_files("create", "--bundle", sleeper, "c2").returncode == 0
    pid = oci.state("c2")["pid"]
    r = oci("delete", "c2")
    assert r.returncode == 0, r.stderr
    assert oci("list", "-q").stdout == ""
    wait_until("the created process to go", lambda: gone(pid))


def test_kill_signals_by_name_and_number_and_all(oci, tmp_path):
    bundle = make_bundle(str(tmp_path / "trap"), ["sh", "-c", "trap 'echo got-usr1' USR1; echo ready; "
                                                 "while true; do sleep 0.05; done"])
    assert oci.with_files("create", "--bundle", bundle, "k1").returncode == 0
    assert oci("start", "k1").returncode == 0
    wait_until("the trap to be set", lambda: "ready" in oci.output())
    assert oci("kill", "k1", str(int(signal.SIGUSR1))).returncode == 0
    wait_until("the trapped USR1", lambda: "got-usr1" in oci.output(), detail=oci.output)
    r = oci("kill", "k1", "NOSUCH")
    assert r.returncode == 1 and "unknown signal" in r.stderr
    assert oci("kill", "--all", "k1", "SIGKILL").returncode == 0
    wait_until("the container to stop", lambda: oci.state("k1")["status"] == "stopped")
    r = oci("kill", "k1", "TERM")
    assert r.returncode == 1 and "not running" in r.stderr
    assert oci("delete", "k1").returncode == 0


def test_pause_resume_exec_ps_update_events(oci, sleeper, tmp_path):
    assert oci.with_files("create", "--bundle", sleeper, "p1").returncode == 0
    assert oci("start", "p1").returncode == 0
    pid = oci.state("p1")["pid"]

    assert oci("pause", "p1").returncode == 0
    assert oci.state("p1")["status"] == "paused"
    r = oci("exec", "p1", "true")
    assert r.returncode == 1 and "paused" in r.stderr
    assert oci("resume", "p1").returncode == 0
    assert oci.state("p1")["status"] == "running"

    r = oci("exec", "--env", "GREETING=hi", "--cwd", "/tmp", "p1", "sh", "-c", "echo $GREETING $(pwd) $(id -u); exit 7")
    assert (r.returncode, r.stdout) == (7, "hi /tmp 0\n"), r.stderr
    r = oci("exec", "--user", "1000:1000", "p1", "id", "-u")
    assert (r.returncode, r.stdout) == (0, "1000\n"), r.stderr
    process = tmp_path / "process.json"
    process.write_text(json.dumps({"args": ["sh", "-c", "echo from-process-json"], "cwd": "/", "env": ["A=1"]}))
    r = oci("exec", "--process", str(process), "p1")
    assert (r.returncode, r.stdout) == (0, "from-process-json\n"), r.stderr

    exec_pid_file = str(tmp_path / "exec.pid")
    # A detached exec keeps the caller's stdio, as runc's: files here (a pipe would stay open).
    r = oci.with_files("exec", "--detach", "--pid-file", exec_pid_file, "p1", "sleep", "300")
    assert r.returncode == 0, r.stderr
    with open(exec_pid_file) as f:
        exec_pid = int(f.read())

    r = oci("ps", "--format", "json", "p1")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {pid, exec_pid}
    r = oci("ps", "p1")
    assert r.stdout.splitlines()[0].split()[1] == "PID" and len(r.stdout.splitlines()) == 3, r.stdout

    assert oci("update", "--memory", "64M", "--pids-limit", "20", "--cpu-quota", "50000", "--cpu-period", "100000",
               "p1").returncode == 0
    limits = oci.runtime.cgroup("p1").limits()
    assert (limits.memory_bytes, limits.pids_max, limits.cpu_quota_us) == (64 << 20, 20, 50000)
    resources = tmp_path / "resources.json"
    resources.write_text(json.dumps({"memory": {"limit": 96 << 20}, "pids": {"limit": 30}}))
    assert oci("update", "--resources", str(resources), "p1").returncode == 0
    limits = oci.runtime.cgroup("p1").limits()
    assert (limits.memory_bytes, limits.pids_max) == (96 << 20, 30)
    r = oci("update", "p1")
    assert r.returncode == 1 and "nothing to update" in r.stderr

    r = oci("events", "--stats", "p1")
    assert r.returncode == 0, r.stderr
    event = json.loads(r.stdout)
    assert (event["type"], event["id"]) == ("stats", "p1")
    assert event["data"]["pids"]["current"] == 2 and event["data"]["memory"]["usage"]["limit"] == 96 << 20

    assert oci("delete", "--force", "p1").returncode == 0
    wait_until("the detached exec to go with it", lambda: gone(exec_pid))


def test_run_waits_and_returns_the_exit_code(oci, tmp_path):
    bundle = make_bundle(str(tmp_path / "three"), ["sh", "-c", "echo ran; exit 3"])
    r = oci.with_files("run", "--bundle", bundle, "r1")
    assert (r.returncode, oci.output()) == (3, "ran\n"), r.stderr
    assert oci("list", "-q").stdout == ""  # removed once it exited, as runc run does


def test_list_shows_containers_as_runc(oci, sleeper):
    assert oci.with_files("create", "--bundle", sleeper, "l1").returncode == 0
    r = oci("list")
    header, row = r.stdout.splitlines()
    assert header.split() == ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
    assert row.split()[:4] == ["l1", str(oci.state("l1")["pid"]), "created", sleeper]
    listed = json.loads(oci("list", "--format", "json").stdout)
    assert [(s["id"], s["status"], s["bundle"]) for s in listed] == [("l1", "created", sleeper)]


def test_two_roots_are_two_worlds(oci, sleeper, tmp_path):
    other = str(tmp_path / "other-root")
    assert oci.with_files("create", "--bundle", sleeper, "same").returncode == 0
    assert oci.with_files("create", "--bundle", sleeper, "same", root=other).returncode == 0, "a separate world"
    first, second = oci.state("same"), oci.state("same", root=other)
    assert first["pid"] != second["pid"]
    assert oci("delete", "same", root=other).returncode == 0
    assert oci.state("same")["status"] == "created"
    assert oci("list", "-q", root=other).stdout == ""


def test_duplicate_id_is_refused_and_changes_nothing(oci, sleeper):
    assert oci.with_files("create", "--bundle", sleeper, "dup").returncode == 0
    pid = oci.state("dup")["pid"]
    r = oci.with_files("create", "--bundle", sleeper, "dup")
    assert (r.returncode, r.stderr.strip()) == (1, "container with id exists: dup")
    assert oci.state("dup")["pid"] == pid and oci.state("dup")["status"] == "created"
    assert oci("start", "dup").returncode == 0  # its holder is still there


@pytest.mark.parametrize("breakage, message", [
    ("missing-rootfs", "is not a directory"),
    ("bad-json", "malformed JSON"),
    ("unknown-field", "frobnicate"),
    ("no-config", "config.json not found"),
])
def test_bad_bundles_fail_with_one_line_and_leave_nothing(oci, tmp_path, breakage, message):
    bundle = make_bundle(str(tmp_path / "bad"), ["true"])
    config = os.path.join(bundle, "config.json")
    if breakage == "missing-rootfs":
        shutil.rmtree(os.path.join(bundle, "rootfs"))
    elif breakage == "bad-json":
        with open(config, "a") as f:
            f.write("{")
    elif breakage == "unknown-field":
        with open(config) as f:
            document = json.load(f)
        document["process"]["frobnicate"] = True
        with open(config, "w") as f:
            json.dump(document, f)
    elif breakage == "no-config":
        os.unlink(config)
    log = str(tmp_path / "log.json")
    r = oci.with_files("--log", log, "--log-format", "json", "create", "--bundle", bundle, "bad1")
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr
    with open(log) as f:
        entry = json.loads(f.read().splitlines()[-1])
    assert entry["level"] == "error" and entry["msg"] == r.stderr.strip() and entry["time"]
    assert oci("list", "-q").stdout == ""
    assert not os.path.exists(os.path.join(oci.root, "containers", "bad1"))


def test_systemd_cgroup_is_refused_clearly(oci):
    r = oci("--systemd-cgroup", "list")
    assert r.returncode == 1 and "--systemd-cgroup is not supported" in r.stderr


class ConsoleSocket:
    """An engine's --console-socket: takes the pty master the runtime sends (SCM_RIGHTS)."""

    def __init__(self, path: str):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)  # the runtime's send waits in the backlog until we accept

    def receive_master(self) -> int:
        conn, _ = self.listener.accept()
        with conn:
            _, ancillary, _, _ = conn.recvmsg(64, socket.CMSG_SPACE(4))
        (level, kind, data), = ancillary
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        return array.array("i", data[:4])[0]

    def close(self) -> None:
        self.listener.close()


def read_until(fd: int, wanted: str) -> str:
    """What the pty master gives until `wanted` appears in it."""
    seen = []

    def got() -> bool:
        while select.select([fd], [], [], 0)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every slave is closed
                return True
            if not chunk:
                return True
            seen.append(chunk.decode(errors="replace"))
        return wanted in "".join(seen)

    wait_until(f"{wanted!r} on the terminal", got, detail=lambda: "".join(seen))
    return "".join(seen)


TTY_PROBE = "set -- $(cat /proc/self/stat); echo tty_nr=$7; [ -t 0 ] && echo stdin-is-tty; read line; echo got:$line"


def test_terminal_goes_to_the_console_socket(oci, tmp_path):
    bundle = make_bundle(str(tmp_path / "tty"), ["sh", "-c", TTY_PROBE + "; exec sleep 300"])
    config = os.path.join(bundle, "config.json")
    with open(config) as f:
        document = json.load(f)
    document["process"]["terminal"] = True
    document["process"]["consoleSize"] = {"height": 40, "width": 100}
    with open(config, "w") as f:
        json.dump(document, f)
    console = ConsoleSocket(str(tmp_path / "console.sock"))
    try:
        r = oci.with_files("create", "--bundle", bundle, "--console-socket", console.path, "t1")
        assert r.returncode == 0, r.stderr
        master = console.receive_master()
    finally:
        console.close()
    try:
        assert oci("start", "t1").returncode == 0
        seen = read_until(master, "stdin-is-tty")
        assert "tty_nr=0" not in seen, f"the pty is the process's controlling terminal: {seen}"
        os.write(master, b"hello\n")
        read_until(master, "got:hello")

        console = ConsoleSocket(str(tmp_path / "exec.sock"))
        try:
            r = oci.with_files("exec", "--tty", "--detach", "--console-socket", console.path, "t1", "sh", "-c", TTY_PROBE)
            assert r.returncode == 0, r.stderr
            exec_master = console.receive_master()
        finally:
            console.close()
        try:
            seen = read_until(exec_master, "stdin-is-tty")
            assert "tty_nr=0" not in seen, f"exec --tty: the pty is its controlling terminal: {seen}"
            os.write(exec_master, b"again\n")
            read_until(exec_master, "got:again")
        finally:
            os.close(exec_master)
    finally:
        os.close(master)
    r = oci("create", "--bundle", bundle, "t2")
    assert r.returncode == 1 and "--console-socket" in r.stderr


def test_a_process_that_cannot_run_is_reported_not_masked(oci, tmp_path):
    bundle = make_bundle(str(tmp_path / "missing"), ["/no/such/program"])
    r = oci.with_files("run", "--bundle", bundle, "m1")
    assert r.returncode == 1 and "/no/such/program" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert oci.with_files("create", "--bundle", bundle, "m2").returncode == 0
    r = oci("start", "m2")
    assert r.returncode == 1 and "/no/such/program" in r.stderr, r.stderr
    assert oci("list", "-q").stdout == ""  # a failed start removes what create made


def test_events_stream_stats_until_the_container_stops(oci, sleeper):
    assert oci.with_files("create", "--bundle", sleeper, "e1").returncode == 0
    assert oci("start", "e1").returncode == 0
    stream = subprocess.Popen([LAUNCHER, "--root", oci.root, "events", "--interval", "50ms", "e1"], env=oci.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(stream.stdout.readline())
        assert (first["type"], first["id"]) == ("stats", "e1")
        assert oci("kill", "e1", "KILL").returncode == 0
        out, err = stream.communicate(timeout=60)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()
    assert stream.returncode == 0, err
    assert all(json.loads(line)["type"] == "stats" for line in out.splitlines())


def test_concurrent_starts_start_it_once(oci, sleeper):
    assert oci.with_files("create", "--bundle", sleeper, "s1").returncode == 0
    starts = [subprocess.Popen([LAUNCHER, "--root", oci.root, "start", "s1"], env=oci.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in starts]
    for p in starts:
        p.stdout.close()
        p.stderr.close()
    assert sorted(code for code, _ in results) == [0, 1, 1], results
    assert all("already running" in err for code, err in results if code == 1), results
    assert oci.state("s1")["status"] == "running"
    wait_until("the output", lambda: oci.output() == "started\n", detail=oci.output)


def holder_pids(name: str, init: int) -> list[int]:
    """The pids of the holder of container `name`: a fork of `create` (oci_holder.py), so its
    command line is create's, as is that of the container's `init` until its start."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"create" in argv and argv[-2:-1] == [name.encode()] and int(entry) != init and not gone(int(entry)):
                pids.append(int(entry))
    return pids


def test_delete_after_the_exit_leaves_nothing_with_or_without_the_holder(oci, tmp_path):
    """`delete` of an exited container goes to its holder while it lingers (oci_holder.py; h1,
    most likely, though a loaded host may be slower than the linger), else runs itself (h2: the
    holder killed before the start, its socket left as after a crash): either way the
    container, its socket and the holder are gone."""
    bundle = make_bundle(str(tmp_path / "true"), ["true"])
    for name, kill_holder in (("h1", False), ("h2", True)):
        assert oci.with_files("create", "--bundle", bundle, name).returncode == 0
        init = oci.state(name)["pid"]
        (holder,) = holder_pids(name, init)
        if kill_holder:  # as a crash would: its socket stays, the container gives up at its go pipe's EOF
            os.kill(holder, signal.SIGKILL)
            wait_until("the holder to die", lambda: gone(holder))
            assert os.path.exists(os.path.join(oci.root, "oci", f"{name}.sock"))
            r = oci("start", name)
            # The container may have given up already (stopped), or not yet (no holder): either says so.
            assert r.returncode == 1 and ("holding it since create is gone" in r.stderr
                                          or "has stopped" in r.stderr), r.stderr
        else:
            assert oci("start", name).returncode == 0
        wait_until("the container to exit", lambda: gone(init))
        r = oci("delete", name)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(os.path.join(oci.root, "oci", f"{name}.sock"))
        assert oci("state", name).stderr.strip() == "container does not exist"
        wait_until("the holder to leave", lambda: gone(holder))
        r = oci("delete", name)
        assert (r.returncode, r.stderr.strip()) == (1, "container does not exist")
