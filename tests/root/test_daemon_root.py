"""`fcrun daemon` and the thin `fcrun run` client, end to end: a real fork-server on the test's
private roots, real containers attached to the client's stdio, exit codes, signals, -d, bad
input, and a client killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from hostcheck import BRIDGE, CGROUP_PARENT, SUBNET
from polling import wait_until

from fcrun import RunOptions, spec_from_image

pytestmark = [pytest.mark.root]

# Runs the `fcrun` entry point and says at exit which path served it: "thin" (nothing but the
# thin client was imported), "here" (`fcrun run` in this process without click: run_here.py) or
# "click" (the click CLI). (Not from an exit handler: run_here's process ends in one of its own.)
ENTRY = ("import sys\n"
         "from fcrun_cli.fast import main\n"
         "try:\n"
         "    main()\n"
         "finally:\n"
         "    sys.stderr.write('|click' if 'click' in sys.modules else\n"
         "                     '|here' if 'fcrun_cli.run_here' in sys.modules else '|thin')\n")


@pytest.fixture
def env(runtime, data_root, run_root):
    return dict(os.environ, FCRUN_ROOT=data_root, FCRUN_RUN=run_root, FCRUN_CGROUP_PARENT=CGROUP_PARENT,
                FCRUN_BRIDGE=BRIDGE, FCRUN_SUBNET=SUBNET)


@pytest.fixture
def daemon(env, run_root, tmp_path):
    """`fcrun daemon` on the test's roots; stopped (SIGTERM) and checked afterwards."""
    log = open(tmp_path / "daemon.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "fcrun_cli", "daemon"], env=env, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready "), f"{line!r}: {(tmp_path / 'daemon.log').read_text()}"
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        proc.stdout.close()
        log.close()
    assert rc == 0, (tmp_path / "daemon.log").read_text()
    assert not os.path.exists(os.path.join(run_root, "forkserver.sock"))


def fcrun(env, *args, input=None, timeout=60):
    """The `fcrun` entry point. Returns (returncode, stdout, stderr, path)."""
    r = subprocess.run([sys.executable, "-c", ENTRY, *args], env=env, input=input, capture_output=True, text=True,
                       timeout=timeout)
    stderr, _, path = r.stderr.rpartition("|")
    return r.returncode, r.stdout, stderr, path


def names(env) -> list[str]:
    return fcrun(env, "ps", "-q")[1].split()


def settled(run_root) -> None:
    """Return once the fork-server handled what came before: it removes a Run's container
    right after its client got Exited, and before it reads the next request (this Status)."""
    from fcrun.forkserver import Client
    from fcrun.forkserver import protocol as p

    with Client(os.path.join(run_root, "forkserver.sock")) as client:
        assert isinstance(client.request(p.Status()), p.PoolStatus)


def test_exit_codes_and_stdio_pass_through_the_fork_server(daemon, env, run_root):
    assert fcrun(env, "run", "--image", "busybox", "--net", "none", "--", "sh", "-c",
                 "echo hello; echo oops >&2; exit 3") == (3, "hello\n", "oops\n", "thin")
    assert fcrun(env, "run", "--image", "busybox", "--net", "none", "--", "cat", input="piped in\n") == \
        (0, "piped in\n", "", "thin")
    code, _, _, path = fcrun(env, "run", "--image", "busybox", "--net", "none", "--", "sh", "-c", "kill -TERM $$; sleep 5")
    assert (code, path) == (128 + signal.SIGTERM, "thin")
    # The options reach the container: limits, env, user, workdir, hostname, network.
    code, out, err, path = fcrun(
        env, "run", "--image", "busybox", "--name", "opts", "--cpu", "0.5", "-m", "64M", "-e", "GREETING=hi",
        "-u", "1000:1000", "-w", "/tmp", "--hostname", "box", "--net", "bridge", "--",
        "sh", "-c", 'echo "$GREETING $(id -u):$(id -g) $(pwd) $(hostname)"; ip -4 addr show eth0 | grep -c inet')
    assert (code, out, path) == (0, "hi 1000:1000 /tmp box\n1\n", "thin"), err
    settled(run_root)
    assert names(env) == []  # a foreground container is removed once it exited


def test_without_a_fork_server_the_installed_launcher_runs_the_container_itself(env, run_root, runtime):
    """No fork-server on these roots: cli/fcrun's own process makes, runs and removes the
    container (run_here.py, without click or site), with the same stdio, exit codes, signals
    and options as through a fork-server; the default profile's seccomp program, compiled by
    the first run, is read back by the next (Paths.seccomp_cache)."""
    launcher = os.path.join(os.path.dirname(sys.executable), "fcrun")
    r = subprocess.run([launcher, "run", "--image", "busybox", "--net", "none", "--", "sh", "-c",
                        "echo hello; echo oops >&2; exit 3"], env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, "hello\n", "oops\n")
    [cached] = os.listdir(os.path.join(run_root, "seccomp"))
    written = os.stat(os.path.join(run_root, "seccomp", cached)).st_mtime_ns
    r = subprocess.run([launcher, "run", "--image", "busybox", "--net", "bridge", "--cpu", "0.5", "-m", "64M",
                        "-e", "GREETING=hi", "-u", "1000:1000", "-w", "/tmp", "--hostname", "box", "--", "sh", "-c",
                        'echo "$GREETING $(id -u):$(id -g) $(pwd) $(hostname)"; ip -4 addr show eth0 | grep -c inet'],
                       env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "hi 1000:1000 /tmp box\n1\n"), r.stderr
    assert os.listdir(os.path.join(run_root, "seccomp")) == [cached]
    assert os.stat(os.path.join(run_root, "seccomp", cached)).st_mtime_ns == written
    # A signal to `fcrun run` reaches the command (through the container's init). Its move
    # primer (cgroups/primer.py, tests/unit/test_run_here.py; v2 only: on v1 the child joins its
    # cgroup itself and none starts) is gone once the container runs.
    from fcrun.cgroups.primer import group_name

    with subprocess.Popen([launcher, "run", "--name", "sig", "--image", "busybox", "--net", "none", "--",
                           "sh", "-c", "echo up; exec sleep 60"], env=env, stdout=subprocess.PIPE, text=True) as client:
        try:
            assert client.stdout.readline() == "up\n"
            primer_dirs = runtime.cgroups.paths_for(group_name(client.pid)).values()
            wait_until("the primer's group removed", lambda: not any(os.path.exists(d) for d in primer_dirs))
            assert runtime.state("sig").status == "running"
            client.send_signal(signal.SIGTERM)
            assert client.wait(timeout=30) == 128 + signal.SIGTERM
        finally:
            client.kill()
    assert runtime.states.names() == []


def test_a_name_is_free_again_as_soon_as_the_client_returns(daemon, env, runtime, busybox):
    """The fork-server answers Exited before it removes the container, holding its lock: the
    same name right after, through the fork-server or in another process, must still work."""
    for i in range(3):
        assert fcrun(env, "run", "--name", "again", "--image", "busybox", "--net", "none", "--", "echo", str(i)) == \
            (0, f"{i}\n", "", "thin")
        # In this process, at once (StateStore.reserve waits for the removal), not via the fork-server.
        spec = spec_from_image(busybox, RunOptions(args=["true"], network="none"), name="again")
        assert runtime.run("again", spec, image=busybox).wait() == 0
        runtime.delete("again")
    assert names(env) == []


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))


def test_the_installed_fcrun_launcher_goes_through_the_fork_server(daemon, env, runtime):
    """The `fcrun` command beside this interpreter (cli/fcrun, a /bin/sh launcher): its
    container is the fork-server's (forked by it, or by its spawner), not the client's."""
    launcher = os.path.join(os.path.dirname(sys.executable), "fcrun")
    with open(launcher) as f:
        assert f.readline() == "#!/bin/sh\n"
    r = subprocess.run([launcher, "run", "--image", "busybox", "--net", "none", "--", "sh", "-c", "echo hi; exit 5"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (5, "hi\n", "")
    with subprocess.Popen([launcher, "run", "--name", "whose", "--image", "busybox", "--net", "none", "--",
                           "sh", "-c", "echo up; exec sleep 60"], env=env, stdout=subprocess.PIPE, text=True) as client:
        try:
            assert client.stdout.readline() == "up\n"
            parent = _ppid(runtime.state("whose").pid)
            assert daemon.pid in (parent, _ppid(parent)) and client.pid not in (parent, _ppid(parent))
        finally:
            client.kill()
            client.wait()
    # Every other command goes to the click CLI (site loaded then), in the same process. The
    # fork-server removes "whose" once it sees its client's connection closed.
    deadline = time.monotonic() + 15
    while True:
        r = subprocess.run([launcher, "ps", "-q"], env=env, capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
        if r.stdout == "":
            break
        assert time.monotonic() < deadline, r.stdout
        time.sleep(0.05)


def test_signals_are_forwarded_to_the_container(daemon, env):
    client = subprocess.Popen(
        [sys.executable, "-c", ENTRY, "run", "--image", "busybox", "--net", "none", "--", "sh", "-c",
         'trap "echo got TERM; exit 7" TERM; echo ready; while :; do sleep 0.1; done'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline() == "ready\n"
        client.send_signal(signal.SIGTERM)
        out, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert (client.returncode, out, err) == (7, "got TERM\n", "|thin")
    assert names(env) == []


def test_detached_run_answers_with_its_name_at_once(daemon, env):
    assert fcrun(env, "run", "-d", "--name", "bg", "--image", "busybox", "--net", "none", "--", "sleep", "100") == \
        (0, "bg\n", "", "thin")
    try:
        assert names(env) == ["bg"]
        assert fcrun(env, "exec", "bg", "--", "sh", "-c", "echo in there")[:2] == (0, "in there\n")
    finally:
        assert fcrun(env, "rm", "-f", "bg")[0] == 0
    assert names(env) == []


@pytest.mark.parametrize("args, code, message", [
    (["--image", "nope"], 125, "fcrun: image 'nope' not found"),
    (["--image", "busybox", "--cpu", "lots"], 125, "fcrun: invalid CPU amount 'lots'"),
    (["--image", "busybox", "--memory", "12Q"], 125, "(at --memory)"),
    (["--image", "busybox", "--pids", "0"], 125, "fcrun: invalid --pids 0: must be >= 1 (at --pids)"),
    (["--image", "busybox", "--name", "bad name"], 125, "fcrun: invalid container name 'bad name'"),
    (["--image", "busybox", "--user", "nobody-here"], 125, "nobody-here"),
    (["--image", "busybox", "--name", "noprog", "--", "/no/such/program"], 127, "/no/such/program"),
    (["--image", "busybox", "--name", "noexec", "--", "/etc/passwd"], 126, "/etc/passwd: cannot execute"),
    (["--image", "busybox", "--name", "isdir", "--", "/etc"], 126, "Is a directory"),
])
def test_bad_input_gives_the_in_process_error_and_leaves_nothing(daemon, env, tmp_path, args, code, message):
    thin = fcrun(env, "run", "--net", "none", *args)
    assert thin[0] == code and thin[3] == "thin", thin
    assert thin[2].startswith("fcrun: ") and thin[2].count("\n") == 1 and message in thin[2], thin
    # The same command in one process (a run root without a fork-server) says the same.
    in_process = fcrun(dict(env, FCRUN_RUN=str(tmp_path / "run-cli")), "run", "--net", "none", *args)
    assert in_process == (thin[0], thin[1], thin[2], "here")
    assert names(env) == []


def test_a_killed_client_takes_its_container_with_it(daemon, env, runtime):
    with subprocess.Popen(
            [sys.executable, "-c", ENTRY, "run", "--name", "victim", "--image", "busybox", "--net", "none", "--",
             "sh", "-c", "echo up; exec sleep 60"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True) as client:
        try:
            assert client.stdout.readline() == "up\n"
            pid = runtime.state("victim").pid
        finally:
            client.kill()  # SIGKILL: nothing is said to the fork-server, the connection just closes
            client.wait()
    deadline = time.monotonic() + 15
    while names(env) or os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"victim still there: {names(env)}"
        time.sleep(0.05)


def test_a_fork_server_set_up_differently_is_not_used(daemon, env):
    other = dict(env, FCRUN_CGROUP_PARENT=CGROUP_PARENT + "-other")
    code, out, err, path = fcrun(other, "run", "--image", "busybox", "--net", "none", "--", "echo", "in process")
    assert (code, out, err, path) == (0, "in process\n", "", "here")
    subprocess.run([sys.executable, "-m", "fcrun_cli", "--cgroup-parent", CGROUP_PARENT + "-other", "gc"], env=env,
                   capture_output=True, timeout=60)  # its (empty) cgroup parent


def test_a_second_daemon_on_the_same_socket_is_refused(daemon, env):
    r = subprocess.run([sys.executable, "-m", "fcrun_cli", "daemon"], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 4 and "already listens" in r.stderr, r.stderr
    assert fcrun(env, "run", "--image", "busybox", "--net", "none", "--", "true") == (0, "", "", "thin")


def test_sigterm_right_after_ready_stops_the_daemon_cleanly(env, run_root, tmp_path):
    # "ready" is printed only once the SIGTERM handler is in place: a supervisor that stops the
    # daemon the moment it is ready gets a clean exit (0, socket removed), not a death by signal.
    for _ in range(5):
        with open(tmp_path / "daemon.log", "w+") as log:
            proc = subprocess.Popen([sys.executable, "-m", "fcrun_cli", "daemon"], env=env, stdout=subprocess.PIPE,
                                    stderr=log, text=True)
            line = proc.stdout.readline()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=20)
            proc.stdout.close()
        assert line.startswith("ready ") and rc == 0, (line, rc, (tmp_path / "daemon.log").read_text())
        assert not os.path.exists(os.path.join(run_root, "forkserver.sock"))
