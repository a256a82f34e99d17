"""The crash suite: `kill -9` at each named step (fcrun/crashpoints.py) of create, start,
freeze, thaw, delete and a pool claim, then the reconcile (`fcrun gc`; for a claim, a new
fork-server's adopt and gc), then the host as before apart from the containers that should run.

Each round runs the operation in a process of its own with FCRUN_CRASH_AT set, sees it die by
SIGKILL, reconciles, and compares the host with the snapshot taken before: mounts, links,
netns, cgroup dirs under the test's parent (v1 and unified), state dirs, leases, id ranges,
upper dirs, and processes the crashed process forked (found by a token in their environment).
A container that survives must be complete and live (pid 1 alive in its own cgroup, its lease
and veth in place); a second `rm -f` then removes it, and the host must equal the snapshot.

The fork-server's rounds: `fcrun daemon` killed at a step of a `fcrun run` it serves (create,
or the removal after the container exited), foreground and detached; the client must return
(no hang), and the next fork-server's start-up (gc, the pool's adopt) is the reconcile.

Rounds: each step once, and create's and start's once more with the spawner forking the
container (the fork-server's way for `fcrun run`): 36 steps, gone through round robin for 100
rounds (the issue's count; ~1 min), plus 16 of the fork-server's. FCRUN_CRASH_ROUNDS=N runs N
rounds instead (at least one per step). Serve's steps
and traffic across crashes: test_crash_serve_root.py.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import subprocess
import sys

import pytest
from hostcheck import BRIDGE, CGROUP_PARENT, SUBNET, host_snapshot, settled_snapshot

from fcrun.crashpoints import CLAIM_STEPS, CREATE_STEPS, DELETE_STEPS, FREEZE_STEPS, START_STEPS, THAW_STEPS
from fcrun.forkserver.pool import Pool
from fcrun import RunOptions, spec_from_image
from fcrun.labels import APP_LABEL, POOL_LABEL
from fcrun.paths import Paths
from fcrun.runtime import Runtime

pytestmark = [pytest.mark.root]

TOKEN_ENV = "FCRUN_CRASH_TEST_TOKEN"  # in the crashed process's environment, so in its forks'
NAME = "crashme"

# What one crashed process does; the container it works on (but for "run") exists already.
DRIVER = r"""
import os, sys
from fcrun.paths import Paths
from fcrun import RunOptions, spec_from_image
from fcrun.labels import APP_LABEL
from fcrun.runtime import Runtime
op, data_root, run_root, docroot, parent, bridge, subnet = sys.argv[1:8]
rt = Runtime(Paths(data_root=data_root, run_root=run_root), cgroup_parent=parent, bridge=bridge, subnet=subnet,
             docroot_roots=[os.path.dirname(docroot)])
name = "crashme"
if op == "run":
    image = rt.images.get("busybox")
    spec = spec_from_image(image, RunOptions(args=["sleep", "1000"], cpu=0.5, memory_bytes=64 << 20, userns=True))
    container = rt.create(name, spec, image=image, detach=True, slot="/srv")
    container.start()
elif op == "freeze":
    rt.freeze(name)
elif op == "thaw":
    rt.thaw(name)
elif op == "delete":
    rt.delete(name, force=True)
elif op == "claim":
    from fcrun.forkserver import protocol as p
    from fcrun.forkserver.pool import Pool
    pool = Pool(rt)
    pool.adopt()
    answers = []  # as the fork-server claims: answered before the state is saved
    reply = pool.claim(p.Claim(image="busybox", labels={APP_LABEL: "crash.test"}, docroot=docroot,
                               limits=p.InstanceLimits(cpu=0.3, memory_bytes=32 << 20)), answer=answers.append)
    assert reply is None and [type(a) for a in answers] == [p.Made], (reply, answers)
print("survived", flush=True)
"""

# operation -> steps; which steps leave a container that should run on after the reconcile.
OPERATIONS = {
    "run": CREATE_STEPS + START_STEPS,
    "freeze": FREEZE_STEPS,
    "thaw": THAW_STEPS,
    "delete": DELETE_STEPS,
    "claim": CLAIM_STEPS,
}
KEPT = {
    # exec'd before the crash: it runs (start.go: its state still says "created")
    "start.go", "start.saved",
    "freeze.frozen", "thaw.thawed",
    # `rm -f` died before it killed pid 1: the container runs on, and a second `rm -f` ends it
    "delete.locked", "delete.slot",
    # claim.taken: still an untouched, frozen pooled instance (adopted again);
    # claim.thawed, claim.answered: running, the app noted but its label unsaved: the next
    # fork-server's adopt labels it the app's; claim.saved: the app's (serve's reconcile adopts it)
    "claim.taken", "claim.thawed", "claim.answered", "claim.saved",
}
ROUNDS = [(op, step) for op, steps in OPERATIONS.items() for step in steps]
ROUNDS += [("run-spawner", step) for step in CREATE_STEPS + START_STEPS]
PASSED: collections.Counter = collections.Counter()  # step -> rounds that passed (for the report)


def _rounds() -> list[tuple[str, str]]:
    wanted = int(os.environ.get("FCRUN_CRASH_ROUNDS", "100") or 100)
    if wanted <= len(ROUNDS):
        return ROUNDS
    return [ROUNDS[i % len(ROUNDS)] for i in range(wanted)]


def _runtime(paths: Paths) -> Runtime:
    return Runtime(paths, cgroup_parent=CGROUP_PARENT, bridge=BRIDGE, subnet=SUBNET)


def _forked_by(token: str) -> list[int]:
    """Processes whose environment carries the crashed process's token: its forks that never
    exec'd (an exec'd container process has the spec's environment)."""
    needle = f"{TOKEN_ENV}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue  # gone meanwhile
    return found


def crash_snapshot(rt: Runtime) -> dict:
    """hostcheck's snapshot, plus what lives in fcrun's own files: leases, id ranges, upper dirs."""
    snap = host_snapshot(rt.paths.run_root)
    snap["leases"] = sorted(rt.network.ipam.leases()) if os.path.isdir(rt.paths.network) else []
    snap["idranges"] = sorted(rt.id_ranges.owners().values())
    snap["storage"] = sorted(rt.storage.names())
    return snap


FILE_KINDS = ("leases", "idranges", "storage")


def _settled(rt: Runtime, expected: dict) -> None:
    """The host as `expected` (settled: the kernel removes a dead netns in the background)."""
    settled_snapshot(rt.paths.run_root, {k: v for k, v in expected.items() if k not in FILE_KINDS})
    files = {k: v for k, v in crash_snapshot(rt).items() if k in FILE_KINDS}
    assert files == {k: expected[k] for k in FILE_KINDS}, f"fcrun's files are not as before: {files}"


def _check_complete_and_live(rt: Runtime, name: str, step: str) -> None:
    """A container kept by the reconcile is whole: live pid 1 in its own cgroup, its lease and
    veth, its id range and upper dir; a frozen one is frozen."""
    state = rt.state(name)
    assert state.status in ("created", "running", "frozen"), (step, state.status)
    assert state.pid > 0 and os.path.exists(f"/proc/{state.pid}"), (step, state)
    assert state.pid in rt.cgroup(name).pids(), (step, "pid 1 is not in its cgroup")
    assert state.network and state.network.ip and rt.network.ipam.lease(name) is not None, (step, "no lease")
    assert os.path.exists(f"/sys/class/net/{state.network.host_ifname}"), (step, "no veth")
    assert name in rt.id_ranges.owners().values() and name in rt.storage.names(), step
    with open(f"/proc/{state.pid}/cmdline", "rb") as f:
        assert b"sleep" in f.read(), (step, "pid 1 is not the container's command")


def _prepare(rt: Runtime, op: str, busybox, docroot: str) -> None:
    """The container the operation works on, as it stands before the operation."""
    if op.startswith("run"):
        return
    spec = spec_from_image(busybox, RunOptions(args=["sleep", "1000"], cpu=0.5, memory_bytes=64 << 20, userns=True))
    labels = {POOL_LABEL: "busybox"} if op == "claim" else {}
    rt.create(NAME, spec, image=busybox, detach=True, slot="/srv", labels=labels).start()
    if op in ("thaw", "claim"):
        rt.freeze(NAME)
    if op == "claim":  # as the pool makes them: the pool's own limits
        pool = Pool(rt)
        rt.update(NAME, cpu=pool.cpu, memory_bytes=pool.memory_bytes)


def _reconcile(rt: Runtime, op: str) -> None:
    if op == "claim":  # a new fork-server: adopt what the dead one pooled, then gc
        Pool(rt).adopt()
    rt.gc()


@pytest.fixture
def crash_roots(tmp_path, data_root, busybox):
    paths = Paths(data_root=data_root, run_root=str(tmp_path / "run"))
    docroot = tmp_path / "site"
    docroot.mkdir()
    (docroot / "index.html").write_text("crash test")
    rt = _runtime(paths)
    yield rt, str(docroot)
    for name in rt.states.names():
        rt.delete(name, force=True)
    rt.cgroups.remove_parent_if_empty()
    rt.network.remove_bridge_if_unused()


@pytest.mark.parametrize(("op", "step"), _rounds(), ids=lambda v: v)
def test_kill_9_at_a_step_then_reconcile_leaves_the_host_as_before(crash_roots, busybox, op, step, tmp_path):
    rt, docroot = crash_roots
    before = crash_snapshot(rt)
    _prepare(rt, op, busybox, docroot)
    token = secrets.token_hex(8)
    env = {**os.environ, "FCRUN_CRASH_AT": step, TOKEN_ENV: token, "FCRUN_SPAWNER": "1" if op == "run-spawner" else "0"}
    r = subprocess.run([sys.executable, "-c", DRIVER, op.removesuffix("-spawner"), rt.paths.data_root, rt.paths.run_root, docroot,
                        CGROUP_PARENT, BRIDGE, SUBNET], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, f"{op} did not die at {step}: rc {r.returncode}\n{r.stdout}{r.stderr}"

    rt = _runtime(rt.paths)  # the next fcrun process: nothing cached from before the crash
    _reconcile(rt, op)
    assert _forked_by(token) == [], f"{step}: processes the crashed fcrun forked are left"
    kept = rt.states.names()
    if step in KEPT:
        assert kept == [NAME], f"{step}: a container that runs was lost: {kept}"
        _check_complete_and_live(rt, NAME, step)
        labels = rt.state(NAME).labels
        if step == "claim.taken":
            assert APP_LABEL not in labels and rt.state(NAME).status == "frozen"
        if step in ("claim.thawed", "claim.answered", "claim.saved"):
            assert labels.get(APP_LABEL) == "crash.test" and rt.state(NAME).status == "running"
        rt.delete(NAME, force=True)  # a second `rm -f` finishes what the first began
    else:
        assert kept == [], f"{step}: the reconcile kept a half-made or dead container: {kept}"
    rt.cgroups.remove_parent_if_empty()
    rt.network.remove_bridge_if_unused()
    _settled(rt, before)
    PASSED[step] += 1


@pytest.fixture(scope="module", autouse=True)
def report():
    """$FCRUN_CRASH_RESULTS/crash-runtime.json: the rounds run and passed (host as before)."""
    yield
    out = os.environ.get("FCRUN_CRASH_RESULTS")
    if out and PASSED:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "crash-runtime.json"), "w") as f:
            forkserver = {k: v for k, v in PASSED.items() if k.startswith("forkserver:")}
            runtime = {k: v for k, v in PASSED.items() if k not in forkserver}
            json.dump({"runtime": {"rounds": len(_rounds()), "passed": sum(runtime.values()), "per_step": runtime,
                                   "kept_steps": sorted(KEPT)},
                       "forkserver": {"rounds": len(DAEMON_ROUNDS), "passed": sum(forkserver.values()),
                                      "per_step": forkserver},
                       "meaning": "passed: killed by SIGKILL at the step, reconciled, host as before but for the "
                                  "containers that should run (kept_steps), which were complete and live"},
                      f, indent=2, sort_keys=True)
            f.write("\n")


def test_every_step_of_the_runtime_has_a_round():
    covered = {step for _, step in ROUNDS}
    assert covered == set(CREATE_STEPS + START_STEPS + FREEZE_STEPS + THAW_STEPS + DELETE_STEPS + CLAIM_STEPS)
    assert KEPT <= covered


# ----- the fork-server: kill -9 while it runs a `fcrun run` (the thin client's path) -----------

# (step, detached) -> whether the container runs on after the next fork-server's start
DAEMON_ROUNDS = {
    **{(step, False): False for step in CREATE_STEPS if step != "create.slot"},  # attached: dies with it
    # (create.saved comes before the child is told to go: it dies with the fork-server, unstarted)
    **{(step, True): step == "create.done" for step in ("create.network", "create.saved", "create.done")},
    # a foreground Run's container exited; the fork-server died removing it: gc finishes
    **{(step, False): False for step in ("delete.locked", "delete.killed", "delete.cgroup", "delete.network",
                                         "delete.storage", "delete.done")},
}


def _daemon(env: dict, log_path) -> subprocess.Popen:
    log = open(log_path, "a")
    proc = subprocess.Popen([sys.executable, "-m", "fcrun_cli", "daemon"], env=env, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    log.close()
    line = proc.stdout.readline()
    assert line.startswith("ready "), f"{line!r}: {_read(log_path)}"
    return proc


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _stop(proc: subprocess.Popen, socket_path: str) -> int:
    """SIGTERM once it serves (it says "ready" just before it sets its signal handlers)."""
    from fcrun.forkserver import Client
    from fcrun.forkserver import protocol as p

    with Client(socket_path) as client:
        client.request(p.Status())
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    proc.stdout.close()
    return rc


@pytest.mark.parametrize(("step", "detached"), sorted(DAEMON_ROUNDS), ids=lambda v: str(v))
def test_kill_9_of_the_forkserver_in_a_run_then_its_restart_reconciles(crash_roots, step, detached, tmp_path):
    rt, _ = crash_roots
    before = crash_snapshot(rt)
    token = secrets.token_hex(8)
    env = {**os.environ, "FCRUN_ROOT": rt.paths.data_root, "FCRUN_RUN": rt.paths.run_root,
           "FCRUN_CGROUP_PARENT": CGROUP_PARENT, "FCRUN_BRIDGE": BRIDGE, "FCRUN_SUBNET": SUBNET,
           "FCRUN_SPAWNER": "1", TOKEN_ENV: token}
    log_path = tmp_path / "daemon.log"
    daemon = _daemon({**env, "FCRUN_CRASH_AT": step}, log_path)
    command = ["sh", "-c", "exit 3"] if step.startswith("delete.") else ["sleep", "1000"]
    client = subprocess.run([sys.executable, "-m", "fcrun_cli", "run", *(["-d"] if detached else []), "--name", NAME,
                             "--image", "busybox", "--", *command], env=env, capture_output=True, text=True,
                            timeout=60)  # a hang fails here
    assert daemon.wait(timeout=30) == -signal.SIGKILL, _read(log_path)
    daemon.stdout.close()
    assert client.returncode != 0 or step.startswith("delete."), (client.returncode, client.stderr)

    restarted = _daemon(env, log_path)  # its start-up is the reconcile: gc, then the pool's adopt
    assert _stop(restarted, os.path.join(rt.paths.run_root, "forkserver.sock")) == 0, _read(log_path)
    rt = _runtime(rt.paths)
    assert _forked_by(token) == [], f"{step}: processes the crashed fork-server forked are left"
    kept = rt.states.names()
    if DAEMON_ROUNDS[(step, detached)]:
        assert kept == [NAME], f"{step}: a detached container that runs was lost: {kept}"
        state = rt.state(NAME)
        assert state.status == "running" and state.pid in rt.cgroup(NAME).pids(), state
        rt.delete(NAME, force=True)
    else:
        assert kept == [], f"{step}: the restarted fork-server kept {kept}"
    rt.cgroups.remove_parent_if_empty()
    rt.network.remove_bridge_if_unused()
    _settled(rt, before)
    PASSED[f"forkserver:{step}"] += 1
