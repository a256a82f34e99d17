"""The `fcrun` command as a user runs it: real processes, real containers, exit codes, messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hostcheck import BRIDGE, CGROUP_PARENT, SUBNET, host_snapshot, settled_snapshot

pytestmark = [pytest.mark.root]


@pytest.fixture
def fcrun(runtime, data_root, run_root):
    """Run the CLI against the test's private roots. Returns CompletedProcess (text)."""
    env = dict(os.environ, FCRUN_ROOT=data_root, FCRUN_RUN=run_root, FCRUN_CGROUP_PARENT=CGROUP_PARENT,
               FCRUN_BRIDGE=BRIDGE, FCRUN_SUBNET=SUBNET)

    def call(*args, input=None):
        return subprocess.run([sys.executable, "-m", "fcrun_cli", *args], env=env, input=input, capture_output=True,
                              text=True, timeout=60)

    return call


def test_run_passes_stdio_and_exit_codes(fcrun):
    r = fcrun("run", "--image", "busybox", "--net", "none", "--", "sh", "-c", "echo hello; echo oops >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "hello\n", "oops\n")
    r = fcrun("run", "--image", "busybox", "--net", "none", "--", "sh", "-c", "kill -TERM $$; sleep 5")
    assert r.returncode == 128 + 15
    r = fcrun("run", "--image", "busybox", "--net", "none", "--", "cat", input="piped in")
    assert (r.returncode, r.stdout) == (0, "piped in")
    assert fcrun("ps", "-q").stdout == ""  # foreground containers are removed when they exit


def test_detached_lifecycle_through_the_cli(fcrun):
    r = fcrun("run", "-d", "--name", "cli-web", "--image", "busybox", "--cpu", "0.3", "--memory", "64M", "--pids", "50",
              "-e", "GREETING=hi", "--", "sh", "-c", "echo started; exec sleep 300")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "cli-web\n"
    rows = json.loads(fcrun("ps", "--json").stdout)
    assert [(x["name"], x["status"], x["cpu"], x["memory_bytes"], x["image"]) for x in rows] == [
        ("cli-web", "running", 0.3, 64 << 20, "busybox")]
    assert rows[0]["ip"].startswith("10.234.0.") and rows[0]["pid"] > 0
    table = fcrun("ps").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "PID", "IP", "CPU", "MEMORY", "USED", "IMAGE", "AGE", "APP"]
    assert table[1].split()[:2] == ["cli-web", "running"] and "64M" in table[1]
    assert 0 < rows[0]["memory_used_bytes"] < 64 << 20  # what its cgroup holds now, under the limit

    r = fcrun("exec", "cli-web", "--", "sh", "-c", "echo $GREETING from $(hostname); exit 4")
    assert (r.returncode, r.stdout) == (4, "hi from cli-web\n")
    assert fcrun("update", "cli-web", "--cpu", "0.6", "--memory", "128M").returncode == 0
    row = json.loads(fcrun("ps", "--json").stdout)[0]
    assert (row["cpu"], row["memory_bytes"]) == (0.6, 128 << 20)
    assert fcrun("freeze", "cli-web").returncode == 0
    assert json.loads(fcrun("ps", "--json").stdout)[0]["status"] == "frozen"
    assert fcrun("thaw", "cli-web").returncode == 0
    assert fcrun("logs", "cli-web").stdout == "started\n"
    assert fcrun("rm", "cli-web").returncode == 5  # still running
    assert fcrun("rm", "-f", "cli-web").returncode == 0
    assert fcrun("ps", "-q").stdout == ""


@pytest.mark.parametrize("args,code,message", [
    # `fcrun run` exits with its command's code: its own failures are 125, 126, 127 (docker's)
    (["run", "--image", "nope", "--", "true"], 125, "image 'nope'"),
    (["run", "--image", "busybox", "--memory", "lots", "--", "true"], 125, "--memory"),
    (["run", "--image", "busybox", "--cpu", "0", "--", "true"], 125, "--cpu"),
    (["run", "--image", "busybox", "--env", "NOVALUE", "--", "true"], 125, "--env"),
    (["run", "--image", "busybox", "--user", "ghost", "--", "true"], 125, "user 'ghost'"),
    (["run", "--image", "busybox", "--name", "bad/name", "--", "true"], 125, "invalid container name"),
    (["run", "--image", "busybox", "--net", "none", "--", "no-such-command"], 127, "no-such-command"),
    (["run", "--image", "busybox", "--net", "none", "--", "/etc/passwd"], 126, "/etc/passwd: cannot execute"),
    (["run", "--image", "busybox", "--net", "none", "--", "/etc"], 126, "Is a directory"),
    (["run", "--image", "busybox", "--net", "none", "--no-init", "--", "/etc/passwd"], 126, "[Errno 13]"),
    (["run", "--image", "busybox", "--net", "none", "-w", "/nowhere", "--", "true"], 125, "working directory"),
    (["exec", "ghost", "--", "true"], 125, "no such container: 'ghost'"),
    (["kill", "ghost"], 3, "no such container: 'ghost'"),
    (["update", "ghost"], 2, "nothing to update"),
])
def test_bad_input_gives_one_clear_line_and_changes_nothing(fcrun, run_root, args, code, message):
    before = host_snapshot(run_root)  # settled: the runtime fixture saw the last test's leftovers go
    r = fcrun(*args)
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("fcrun: ")
    assert settled_snapshot(run_root, before) == before


def test_name_in_use(fcrun):
    assert fcrun("run", "-d", "--name", "dup", "--image", "busybox", "--net", "none", "--", "sleep", "60").returncode == 0
    r = fcrun("run", "-d", "--name", "dup", "--image", "busybox", "--net", "none", "--", "sleep", "60")
    assert r.returncode == 125 and "'dup' is already in use" in r.stderr
    assert fcrun("rm", "-f", "dup").returncode == 0


def test_run_and_exec_exit_codes_are_dockers(fcrun):
    """The command's own code passes through (128+N for signal N); fcrun's usage errors are 125,
    not click's 2; a command that cannot be invoked 126, one not found 127 (also in exec)."""
    r = fcrun("run", "--image", "busybox", "--net", "none", "--", "sh", "-c", "exit 3")
    assert r.returncode == 3, r.stderr
    r = fcrun("run", "--image", "busybox", "--net", "none", "--", "sh", "-c", "kill -9 $$")
    assert r.returncode == 128 + 9, r.stderr
    for args in (["--image", "busybox", "--bogus"], ["--", "true"], ["--image", "busybox", "--net", "wifi"]):
        r = fcrun("run", *args)
        assert r.returncode == 125 and "Error:" in r.stderr, (args, r.stderr)
    assert fcrun("run", "-d", "--name", "codes", "--image", "busybox", "--net", "none", "--",
                 "sleep", "300").returncode == 0
    try:
        for command, code, message in ((["sh", "-c", "exit 7"], 7, ""), (["sh", "-c", "kill -9 $$"], 137, ""),
                                       (["no-such-command"], 127, "executable not found"),
                                       (["/etc/passwd"], 126, "cannot execute"), (["/etc"], 126, "Is a directory")):
            r = fcrun("exec", "codes", "--", *command)
            assert r.returncode == code and message in r.stderr, (command, r.returncode, r.stderr)
        r = fcrun("exec", "codes", "--", "sh", "-c", "printf 'echo hi\\n' > /tmp/bare; chmod +x /tmp/bare")
        assert r.returncode == 0, r.stderr
        r = fcrun("exec", "codes", "--", "/tmp/bare")  # executable, but no #! and no ELF: the kernel's ENOEXEC
        assert r.returncode == 126 and "Exec format error" in r.stderr, r.stderr
        r = fcrun("exec", "--bogus", "codes", "--", "true")
        assert r.returncode == 125 and "--bogus" in r.stderr
    finally:
        assert fcrun("rm", "-f", "codes").returncode == 0



def test_run_userns_maps_root_to_an_unprivileged_host_range(fcrun):
    from fcrun.runtime.userns import FIRST_HOST_ID, RANGE_SIZE

    r = fcrun("run", "--userns", "--image", "busybox", "--net", "none", "--", "sh", "-c", "id -u; cat /proc/self/uid_map")
    assert r.returncode == 0, r.stderr
    uid, inside, host, size = (int(x) for x in r.stdout.split())
    assert (uid, inside, size) == (0, 0, RANGE_SIZE) and host >= FIRST_HOST_ID
    r = fcrun("run", "--image", "busybox", "--net", "none", "--", "cat", "/proc/self/uid_map")
    assert r.stdout.split() == ["0", "0", "4294967295"]  # off by default, as in runc
