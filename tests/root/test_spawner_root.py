"""Root integration tests of the spawner: containers forked by it (from a warm child or
freshly), the same as when the library forks them itself, and the chain
library -> spawner -> container when something dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import msgspec
import pytest

from fcrun.runtime.spawner import client as spawner
from fcrun.runtime.spawner import protocol
from fcrun.errors import ContainerError
from fcrun.runtime.options import RunOptions, spec_from_image
from fcrun.runtime.plan import build_plan
from fcrun.runtime.userns import FIRST_HOST_ID, RANGE_SIZE
from fcrun.runtime import Runtime
from fcrun.runtime.fork import ChildFailure, read_status
from hostcheck import BRIDGE, CGROUP_PARENT, SUBNET
from polling import wait_until
from test_runtime_root import run as _run  # run to completion, output captured

pytestmark = [pytest.mark.root]


def _runtime(like: Runtime, mode: bool | None) -> Runtime:
    return Runtime(like.paths, cgroup_parent=CGROUP_PARENT, bridge=BRIDGE, subnet=SUBNET, spawner=mode)


@pytest.fixture
def via_spawner(runtime):
    return _runtime(runtime, True)


def _warm_pids(client: spawner.Client) -> set[int]:
    return wait_until("the spawner's warm children", client.warm_pids, interval_s=0.01)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True


def _wait_gone(pids, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(_gone(p) for p in pids):
        assert time.monotonic() < deadline, f"still there: {[p for p in pids if not _gone(p)]}"
        time.sleep(0.02)


@pytest.mark.parametrize("mode", [True, False], ids=["spawner", "direct"])
def test_a_container_is_the_same_whoever_forks_it(runtime, busybox, mode):
    rt = _runtime(runtime, mode)
    script = "echo $$ $(hostname) $(ls /sys/class/net); exit 3"
    code, out = _run(rt, busybox, "t-sp-same", ["sh", "-c", script], network="none")
    assert (code, out) == (3, "2 t-sp-same lo\n")
    assert _run(rt, busybox, "t-sp-sig", ["sh", "-c", "kill -9 $$"], network="none")[0] == 128 + 9
    code, out = _run(rt, busybox, "t-sp-user", ["id", "-u"], network="none", user="nobody")
    assert (code, out) == (0, "65534\n")


def test_warm_children_become_containers_and_are_replaced(via_spawner, busybox):
    client = spawner.for_create(True)
    warm = _warm_pids(client)
    assert warm, "the spawner handed out no warm child"
    spec = spec_from_image(busybox, RunOptions(args=["sleep", "30"], network="none"), name="t-sp-warm")
    c = via_spawner.run("t-sp-warm", spec, image=busybox)
    assert c.pid in warm  # no fork on the way: a warm child took the plan
    with open(f"/proc/{c.pid}/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f)
    assert status["PPid"] == str(client.pid)  # library -> spawner -> container
    assert status["NSpid"].split()[-1] == "1"  # pid 1 of its own pid namespace
    via_spawner.kill("t-sp-warm", signal.SIGKILL)
    assert c.wait() == 128 + 9
    via_spawner.delete("t-sp-warm")
    later = _warm_pids(client)
    assert later and later.isdisjoint({c.pid})


def test_host_network_is_forked_by_the_spawner_itself(via_spawner, busybox):
    # A warm child has its own network namespace already: it cannot take this plan.
    code, out = _run(via_spawner, busybox, "t-sp-host", ["readlink", "/proc/self/ns/net"], network="host")
    assert (code, out.strip()) == (0, os.readlink("/proc/self/ns/net"))


def test_bridge_network_through_a_warm_child(via_spawner, busybox):
    code, out = _run(via_spawner, busybox, "t-sp-br", ["sh", "-c", "ip -o -4 addr show eth0 | awk '{print $4}'"])
    assert code == 0 and out.startswith("10.234.0."), out
    assert via_spawner.network.ipam.leases() == {}


def test_bad_requests_are_refused_where_they_would_be_carried_out(via_spawner, busybox, tmp_path):
    client = spawner.for_create(True)
    _warm_pids(client)

    def bad_plan(network):
        spec = spec_from_image(busybox, RunOptions(args=["true"], network=network), name="t-sp-bad")
        plan = build_plan(spec, rootfs=str(tmp_path), overlay_lower=None, cgroup_procs=[],
                          cap_last=via_spawner.cap_last, attached=True)
        return msgspec.structs.replace(plan, argv=[])

    # The spawner itself (no warm child fits host network): refused before any fork.
    pid, status_r, go_w, report_r = client.send(bad_plan("host"))
    try:
        assert pid == -1
        with pytest.raises(ContainerError, match="argv is empty"):
            spawner.await_spawned(report_r, 5.0)
    finally:
        for fd in (status_r, go_w, report_r):
            os.close(fd)
    # A warm child: it checks the plan itself, says why on the status pipe and exits.
    pid, status_r, go_w, report_r = client.send(bad_plan("none"))
    try:
        assert pid > 0 and report_r == -1  # a warm child's exit is reported once it is claimed
        with pytest.raises(ChildFailure, match="argv is empty") as failure:
            read_status(status_r, 5.0)
        assert failure.value.step == protocol.STEP_CHECK
        _wait_gone([pid])
        time.sleep(0.05)  # the spawner reaps it (its claim has not come: it keeps the status)
        report_r = client.claim(pid)
        assert protocol.read_report(report_r, 5.0) == protocol.Exited(pid=pid, wait_status=127 << 8)
    finally:
        for fd in (status_r, go_w, report_r):
            os.close(fd)


def test_killing_the_spawner_kills_attached_containers_and_the_next_start_recovers(via_spawner, busybox):
    spec = spec_from_image(busybox, RunOptions(args=["sleep", "300"], network="none"), name="t-sp-kill")
    c = via_spawner.run("t-sp-kill", spec, image=busybox)
    client = spawner.current()
    assert client is not None
    warm = _warm_pids(client)
    os.kill(client.pid, signal.SIGKILL)
    assert c.wait() == 128 + 9  # PDEATHSIG: it died with the spawner
    _wait_gone([c.pid, *warm])
    assert via_spawner.state("t-sp-kill").status == "stopped"
    via_spawner.delete("t-sp-kill")
    assert _run(via_spawner, busybox, "t-sp-next", ["true"], network="none")[0] == 0
    assert spawner.current() is not None and spawner.current().pid != client.pid


def test_containers_follow_the_library_process_through_the_spawner(runtime, busybox, data_root, run_root):
    code = textwrap.dedent(f"""
        import time
        from fcrun import Paths, Runtime, RunOptions, spec_from_image
        from fcrun.runtime.spawner import client as spawner
        rt = Runtime(Paths(data_root={data_root!r}, run_root={run_root!r}), cgroup_parent="{CGROUP_PARENT}", spawner=True)
        img = rt.images.get("busybox")
        opts = RunOptions(args=["sleep", "300"], network="none")
        a = rt.run("t-sp-attached", spec_from_image(img, opts, name="t-sp-attached"), image=img)
        d = rt.run("t-sp-detached", spec_from_image(img, opts, name="t-sp-detached"), image=img, detach=True)
        print(a.pid, d.pid, spawner.current().pid, flush=True)
        time.sleep(300)
    """)
    sup = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        attached, detached, spawner_pid = (int(x) for x in sup.stdout.readline().split())
    finally:
        sup.kill()
        sup.wait()
        sup.stdout.close()
    _wait_gone([spawner_pid, attached])  # the spawner follows the library, the container the spawner
    assert runtime.state("t-sp-attached").status == "stopped"
    assert runtime.state("t-sp-detached").status == "running"  # detached: it survives both
    assert not _gone(detached)
    runtime.delete("t-sp-detached", force=True)
    runtime.delete("t-sp-attached")


def test_shutdown_leaves_no_process_behind(via_spawner, busybox):
    assert _run(via_spawner, busybox, "t-sp-end", ["true"], network="none")[0] == 0
    client = spawner.current()
    pids = {client.pid, *_warm_pids(client)}
    spawner.shutdown()
    _wait_gone(pids)
    assert spawner.current() is None


def test_a_threaded_process_forks_through_the_spawner_whatever_it_was_told(runtime, busybox):
    """No Python runs between fork and exec in a threaded process (serve without the
    fork-server creates containers from worker threads): the container and its user
    namespace's holder come from the single-threaded spawner, even with spawner=False."""
    rt = _runtime(runtime, False)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        spec = spec_from_image(busybox, RunOptions(args=["sleep", "30"], network="none", userns=True), name="t-sp-thr")
        c = rt.run("t-sp-thr", spec, image=busybox)
        try:
            client = spawner.current()
            assert client is not None
            with open(f"/proc/{c.pid}/status") as f:
                status = dict(line.rstrip("\n").split(":\t", 1) for line in f)
            assert status["PPid"] == str(client.pid)  # forked by the spawner, not by us
            with open(f"/proc/{c.pid}/uid_map") as f:
                inside, outside, size = f.read().split()
            assert (inside, size) == ("0", str(RANGE_SIZE)) and int(outside) >= FIRST_HOST_ID
        finally:
            rt.kill("t-sp-thr", signal.SIGKILL)
            assert c.wait() == 128 + 9
            rt.delete("t-sp-thr")
    finally:
        stop.set()
        thread.join()
