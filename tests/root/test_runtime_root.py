"""Root integration tests of the runtime core: real namespaces, overlayfs, cgroups and veth.

Every property is checked from inside the container with busybox tools.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fcrun.runtime.capabilities import DEFAULT_CAPABILITIES, capability_mask
from fcrun.errors import AlreadyExists, ContainerError, IncorrectStatus, KernelError, NotFound, SpecError
from fcrun.runtime.spec import Mount
from fcrun.runtime.options import RunOptions, spec_from_image
from hostcheck import CGROUP_PARENT, host_snapshot, settled_snapshot
from polling import http_get_when_up, wait_until
from capture import run_captured

pytestmark = [pytest.mark.root]


def run(rt, image, name, args, *, detach=False, init=True, **opts):
    """Run to completion with stdout+stderr captured; returns (exit code, output)."""
    spec = spec_from_image(image, RunOptions(args=args, **opts), name=name)
    return run_captured(rt, name, spec, image=image, init=init, detach=detach)


def _drain(fd):
    """Everything written to a pipe until its writers are gone; closes fd."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def start_detached(rt, image, name, args, **opts):
    spec = spec_from_image(image, RunOptions(args=args, **opts), name=name)
    return rt.run(name, spec, image=image, detach=True)


def sh(rt, image, name, script, **opts):
    return run(rt, image, name, ["sh", "-c", script], **opts)


# ----- process, exit codes, stdio ----------------------------------------------------------


def test_runs_a_command_and_returns_its_output_and_exit_code(runtime, busybox):
    assert sh(runtime, busybox, "t-echo", "echo hello; echo err >&2", network="none") == (0, "hello\nerr\n")
    assert sh(runtime, busybox, "t-exit", "exit 7", network="none")[0] == 7
    assert sh(runtime, busybox, "t-sig", "kill -9 $$", network="none")[0] == 128 + 9


def test_pid_namespace_and_pid1_init_reaps_orphans(runtime, busybox):
    code, out = sh(runtime, busybox, "t-pid", "echo pid=$$; ls /proc | grep -c '^[0-9]'", network="none")
    assert code == 0
    assert "pid=2\n" in out  # pid 1 is the init, the command is its first child
    assert int(out.split()[-1]) <= 4  # no host process is visible
    # An orphan whose parent exits is re-parented to pid 1, which must reap it: wait (inside,
    # bounded at 30 s) until its /proc entry is gone, then count the zombies left.
    script = ("p=$(sh -c 'sleep 0.1 & echo $!'); i=0; while [ -e /proc/$p ] && [ $i -lt 600 ]; do "
              "sleep 0.05; i=$((i+1)); done; cat /proc/[0-9]*/stat | grep -c ' Z ' || true")
    code, out = sh(runtime, busybox, "t-zombie", script, network="none")
    assert out.strip() == "0", out


def test_stdin_is_passed_through(runtime, busybox):
    spec = spec_from_image(busybox, RunOptions(args=["sh", "-c", "read x; echo got:$x"], network="none"), name="t-stdin")
    rin, win = os.pipe()
    rout, wout = os.pipe()
    c = runtime.run("t-stdin", spec, image=busybox, stdio=(rin, wout, wout))
    os.close(rin)
    os.close(wout)
    os.write(win, b"ping\n")
    os.close(win)
    out = os.read(rout, 4096)
    os.close(rout)
    assert c.wait() == 0
    assert out == b"got:ping\n"
    runtime.delete("t-stdin")


def test_fds_are_closed_and_limits_set(runtime, busybox):
    leak = os.open("/etc/hostname", os.O_RDONLY)
    os.set_inheritable(leak, True)
    try:
        code, out = sh(runtime, busybox, "t-fds", "ls /proc/self/fd | tr '\\n' ' '; echo; ulimit -n", network="none")
    finally:
        os.close(leak)
    fds, nofile = out.splitlines()
    assert fds.split() == ["0", "1", "2", "3"]  # 3 is ls's own directory handle
    assert nofile == "1024"


def test_capabilities_no_new_privs_and_user(runtime, busybox):
    code, out = sh(runtime, busybox, "t-caps", "grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs)' /proc/self/status", network="none")
    status = dict(line.split(":\t") for line in out.splitlines())
    expected = capability_mask(DEFAULT_CAPABILITIES)
    assert int(status["CapBnd"], 16) == expected
    assert int(status["CapEff"], 16) == expected
    assert status["NoNewPrivs"] == "1"
    code, out = sh(runtime, busybox, "t-user", "id -u; id -g; grep CapEff /proc/self/status", user="nobody", network="none")
    uid, gid, capeff = out.splitlines()
    assert (uid, gid) == ("65534", "65534")
    assert int(capeff.split()[1], 16) == 0


# ----- filesystem ----------------------------------------------------------------------------


def test_rootfs_is_overlay_after_pivot_root_and_host_is_invisible(runtime, busybox):
    script = "grep ' / ' /proc/self/mountinfo; test -e /work && echo HOST-VISIBLE; test -e /etc/debian_version && echo HOST-ETC; echo x > /written && cat /written"
    code, out = sh(runtime, busybox, "t-rootfs", script, network="none")
    assert code == 0, out
    assert " - overlay overlay " in out
    assert "HOST" not in out
    assert out.endswith("x\n")
    # The write went to the container's upper dir, never into the shared image layer.
    assert not any(os.path.exists(os.path.join(layer, "written")) for layer in busybox.layers)


def test_each_container_gets_its_own_upper_dir(runtime, busybox):
    sh(runtime, busybox, "t-up1", "echo one > /f", network="none")
    code, out = sh(runtime, busybox, "t-up2", "cat /f 2>&1 || echo missing", network="none")
    assert "missing" in out


def test_rootfs_mount_point_is_shared_and_stays_empty_on_the_host(runtime, busybox, run_root, data_root):
    # The child mounts its overlay on one shared dir inside its own mount namespace: no
    # per-container mount point, and nothing of it is visible on the host, even while it runs.
    start_detached(runtime, busybox, "t-mp", ["sleep", "60"], network="none")
    mountpoint = runtime.state("t-mp").rootfs.mountpoint
    assert mountpoint == os.path.join(run_root, "rootfs")
    assert os.listdir(mountpoint) == []
    with open("/proc/self/mountinfo") as f:
        assert not any(line.split()[4] == mountpoint for line in f)
    assert sorted(os.listdir(os.path.join(data_root, "containers", "t-mp"))) == ["upper", "work"]
    runtime.delete("t-mp", force=True)
    assert not os.path.exists(os.path.join(data_root, "containers", "t-mp"))


def test_volatile_rootfs_is_a_tmpfs_layer_in_memory_only(runtime, busybox, data_root):
    script = "grep ' / ' /proc/self/mountinfo; echo x > /written && cat /written; touch /etc/new && echo etc-ok"
    code, out = sh(runtime, busybox, "t-vol", script, network="none", volatile_rootfs=True)
    assert code == 0, out
    assert " - overlay overlay " in out and "upperdir=" in out
    assert out.endswith("x\netc-ok\n")
    # Nothing of it on disk: no storage dir was made, and the image layers are untouched.
    assert not os.path.exists(os.path.join(data_root, "containers", "t-vol"))
    assert not any(os.path.exists(os.path.join(layer, "written")) for layer in busybox.layers)
    # Files vanish with the container: the next one starts from the image again.
    assert sh(runtime, busybox, "t-vol2", "cat /written 2>&1 || echo missing", network="none",
              volatile_rootfs=True)[1].endswith("missing\n")


def test_volatile_rootfs_counts_against_the_memory_cgroup(runtime, busybox):
    # tmpfs pages are charged to the cgroup of whoever writes them: the container's.
    script = "dd if=/dev/zero of=/big bs=1M count=24 2>/dev/null && echo written && exec sleep 60"
    start_detached(runtime, busybox, "t-volmem", ["sh", "-c", script], memory_bytes=128 << 20,
                   network="none", volatile_rootfs=True)
    state = runtime.state("t-volmem")
    assert state.rootfs.tmpfs_bytes == 128 << 20  # sized to the memory limit
    wait_until("dd to write /big", lambda: b"written" in _read(state.log_path), detail=lambda: _read(state.log_path))
    # 24 MiB stay charged while the file exists, though dd has exited.
    assert runtime.cgroup("t-volmem").stats().memory_bytes >= 24 << 20
    runtime.delete("t-volmem", force=True)


def test_volatile_rootfs_is_limited_by_the_memory_limit(runtime, busybox):
    # 64 MiB cannot be stored under --memory 32M: the tmpfs is capped at the limit, and the
    # pages it holds are the container's memory (a full write is refused or OOM-killed).
    script = "dd if=/dev/zero of=/big bs=1M count=64 2>/dev/null; echo rc=$?; ls -l /big"
    code, out = sh(runtime, busybox, "t-volcap", script, memory_bytes=32 << 20, network="none",
                   volatile_rootfs=True)
    assert code == 0, out
    assert "rc=0" not in out, out
    size = int(out.split("\n")[1].split()[4])
    assert size <= 32 << 20, out


def test_volatile_rootfs_is_rejected_without_an_image(runtime, busybox, tmp_path, run_root):
    before = host_snapshot(run_root)
    spec = spec_from_image(busybox, RunOptions(args=["true"], network="none"), name="t-volbad")
    spec.root.path = str(tmp_path)
    with pytest.raises(SpecError, match="needs an image"):
        runtime.create("t-volbad", spec, volatile_rootfs=True)
    assert settled_snapshot(run_root, before) == before


def test_read_only_rootfs(runtime, busybox):
    code, out = sh(runtime, busybox, "t-ro", "touch /x 2>&1; echo rc=$?", network="none", readonly_rootfs=True)
    assert "Read-only file system" in out and "rc=1" in out


def test_minimal_dev_and_masked_proc_and_readonly_sys(runtime, busybox):
    script = textwrap.dedent("""\
        ls /dev | tr '\\n' ' '; echo
        for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug; do echo "$f=$(cat $f 2>/dev/null | wc -c)"; done | tr '\n' ' '; echo
        ls /sys/firmware | wc -l
        echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo SYS-WRITABLE
        echo 1 > /proc/sysrq-trigger 2>/dev/null && echo SYSRQ-WRITABLE
        touch /sys/kernel/x 2>/dev/null && echo SYSFS-WRITABLE
        head -c 4 /dev/urandom | wc -c; echo hi > /dev/null && echo null-ok
        grep -E ' /dev/pts | /dev/shm ' /proc/mounts | cut -d' ' -f2,3 | tr '\\n' ' '
    """)
    code, out = sh(runtime, busybox, "t-dev", script, network="none")
    lines = out.splitlines()
    assert set(lines[0].split()) == {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm",
                                     "mqueue", "fd", "stdin", "stdout", "stderr"}
    # Masked files read empty inside, wherever the host kernel has them with content.
    sizes = dict(item.split("=") for item in lines[1].split())
    masked_here = [p for p in sizes if os.path.exists(p)]
    assert masked_here, "none of the masked /proc files exists on this kernel"
    assert all(sizes[p] == "0" for p in masked_here), sizes
    assert lines[2] == "0"  # /sys/firmware is an empty tmpfs
    assert "WRITABLE" not in out
    assert "4" in lines and "null-ok" in lines
    assert "/dev/pts devpts" in out and "/dev/shm tmpfs" in out


def test_image_symlink_cannot_send_a_mount_onto_the_host(runtime, busybox, tmp_path):
    # A bind mount destination that is a symlink to an absolute host path stays inside the rootfs.
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hi")
    spec = spec_from_image(busybox, RunOptions(args=["sh", "-c", "ln -s /tmp /evil 2>/dev/null; cat /mnt/site/index.html"], network="none"), name="t-bind")
    spec.mounts.append(Mount(destination="/mnt/site", source=str(site), options=["bind", "ro"]))
    r, w = os.pipe()
    c = runtime.run("t-bind", spec, image=busybox, stdio=(0, w, w))
    os.close(w)
    out = _drain(r)
    assert c.wait() == 0, out
    assert out == b"hi"
    runtime.delete("t-bind")


# ----- uts / ipc / net ------------------------------------------------------------------------


def test_hostname_and_namespaces_differ_from_host(runtime, busybox):
    code, out = sh(runtime, busybox, "t-ns", "hostname; for n in ipc mnt net pid uts cgroup; do readlink /proc/self/ns/$n; done", network="none")
    lines = out.split()
    assert lines[0] == "t-ns"
    for ns_link in lines[1:]:
        kind = ns_link.split(":")[0]
        own = os.readlink(f"/proc/self/ns/{kind}")
        assert ns_link != own, f"{kind} namespace is shared with the host"


def test_net_none_has_only_loopback(runtime, busybox):
    code, out = sh(runtime, busybox, "t-none", "ls /sys/class/net | tr '\\n' ' '; ip -o addr show lo | grep -c 127.0.0.1", network="none")
    assert out.split() == ["lo", "1"]


def test_bridge_network_host_reaches_container_and_leases_are_unique(runtime, busybox):
    a = start_detached(runtime, busybox, "t-web1", ["httpd", "-f", "-p", "8080", "-h", "/etc"])
    b = start_detached(runtime, busybox, "t-web2", ["sleep", "60"])
    assert a.ip and b.ip and a.ip != b.ip
    assert a.ip.startswith("10.234.0.")
    status, _, body = http_get_when_up(a.ip, "/passwd", port=8080)
    assert status == 200 and "root:x:0:0" in body, (status, body)
    # Interfaces inside: lo and eth0 only, default route via the bridge.
    r, w = os.pipe()
    code = runtime.exec("t-web2", ["sh", "-c", "ls /sys/class/net | tr '\\n' ' '; ip route | grep default"], stdio=(0, w, w))
    os.close(w)
    out = os.read(r, 4096).decode()
    os.close(r)
    assert code == 0
    assert out.split()[:2] == ["eth0", "lo"]
    assert "default via 10.234.0.1" in out
    leases = runtime.network.ipam.leases() if hasattr(runtime.network, "ipam") else None
    runtime.delete("t-web1", force=True)
    runtime.delete("t-web2", force=True)
    if leases is not None:
        assert set(leases) >= {"t-web1", "t-web2"}
        assert runtime.network.ipam.leases() == {}


# ----- cgroups --------------------------------------------------------------------------------


def _cpu_usage_us(cgroup) -> int:
    return cgroup.stats().cpu_usage_us


def test_cpu_quota_is_enforced_and_update_changes_it_live(runtime, busybox):
    """Checked with the kernel's own counters, not against the clock: a busy loop elsewhere on
    the host can slow the container, never make it use more than its quota in a CFS period.
    The live update goes down to the smallest quota (1 ms per 100 ms period), which a busy loop
    exceeds in every period it runs, however loaded the host."""
    start_detached(runtime, busybox, "t-cpu", ["sh", "-c", "while :; do :; done"], cpu=0.6, network="none")
    cgroup = runtime.cgroup("t-cpu")
    assert (cgroup.limits().cpu_quota_us, cgroup.limits().cpu_period_us) == (60000, 100000)
    runtime.update("t-cpu", cpu=0.01)
    assert (cgroup.limits().cpu_quota_us, cgroup.limits().cpu_period_us) == (1000, 100000)
    assert [r.cpu for r in runtime.list() if r.name == "t-cpu"] == [0.01]

    before = cgroup.stats()

    def twenty_periods_later():
        stats = cgroup.stats()
        return stats if stats.nr_periods >= before.nr_periods + 20 else None

    after = wait_until("twenty CFS periods of the busy loop", twenty_periods_later)
    assert after.nr_throttled - before.nr_throttled >= 10, (before, after)  # out of quota, again and again
    # The kernel charges the quota at its tick (4 ms at HZ=250, 10 ms at HZ=100): the loop
    # overruns by up to a tick before it is throttled, and pays it back in the next periods.
    # 20 ms of slack, against the 2 s an unthrottled loop would take in those 2 s on an idle host.
    assert after.cpu_usage_us - before.cpu_usage_us <= 1000 * (after.nr_periods - before.nr_periods) + 20_000, (
        before, after)


def test_memory_limit_oom_kills_inside_the_container_only(runtime, busybox):
    script = "dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null; echo rc=$?"
    code, out = sh(runtime, busybox, "t-oom", script, memory_bytes=16 << 20, network="none")
    assert code == 0  # the shell survived,
    assert "rc=137" in out  # the allocating process was OOM-killed (SIGKILL)


def test_pids_limit_stops_a_fork_loop(runtime, busybox):
    script = "(i=0; while [ $i -lt 30 ]; do sleep 30 & i=$((i+1)); done); exec sleep 30"
    start_detached(runtime, busybox, "t-pids", ["sh", "-c", script], pids_max=8, network="none")
    log_path = runtime.state("t-pids").log_path
    wait_until("the fork loop to be refused", lambda: b"can't fork" in _read(log_path), detail=lambda: _read(log_path))
    stats = runtime.cgroup("t-pids").stats()
    assert 3 <= stats.pids_current <= 8, stats  # the sleeps that did start are still there


def test_freeze_stops_progress_and_thaw_resumes(runtime, busybox):
    start_detached(runtime, busybox, "t-frz", ["sh", "-c", "while :; do :; done"], cpu=0.5, network="none")
    cgroup = runtime.cgroup("t-frz")
    start = _cpu_usage_us(cgroup)
    wait_until("the busy loop to run", lambda: _cpu_usage_us(cgroup) > start + 20_000)
    runtime.freeze("t-frz")
    assert runtime.state("t-frz").status == "frozen"
    assert [r.status for r in runtime.list()] == ["frozen"]
    frozen_at = _cpu_usage_us(cgroup)
    time.sleep(0.5)  # a window in which a running loop would burn CPU: load can only make it burn less
    assert _cpu_usage_us(cgroup) - frozen_at <= 10_000
    with pytest.raises(IncorrectStatus):
        runtime.freeze("t-frz")
    runtime.thaw("t-frz")
    assert runtime.state("t-frz").status == "running"
    thawed_at = _cpu_usage_us(cgroup)
    wait_until("the thawed loop to run again", lambda: _cpu_usage_us(cgroup) > thawed_at + 20_000)
    # Frozen or not is read from the cgroup: a freeze or thaw written to it directly (serve's
    # backend thaws so) leaves state() true, and state.json never says "frozen".
    runtime.cgroup("t-frz").freeze()
    assert runtime.state("t-frz").status == "frozen"
    runtime.cgroup("t-frz").thaw()
    assert runtime.state("t-frz").status == "running"
    with open(os.path.join(runtime.states.dir("t-frz"), "state.json"), "rb") as f:
        assert b'"status":"running"' in f.read()


# ----- exec, kill, rm, state across processes -------------------------------------------------


def test_exec_joins_namespaces_and_cgroup(runtime, busybox):
    c = start_detached(runtime, busybox, "t-exec", ["sleep", "60"], network="none", env=["FOO=bar"])
    r, w = os.pipe()
    code = runtime.exec("t-exec", ["sh", "-c", "hostname; echo $FOO; cat /proc/self/cgroup | head -1; exit 3"], stdio=(0, w, w))
    os.close(w)
    out = os.read(r, 4096).decode().splitlines()
    os.close(r)
    assert code == 3
    assert out[0] == "t-exec" and out[1] == "bar"
    with pytest.raises(ContainerError, match="nope"):
        runtime.exec("t-exec", ["nope"])
    runtime.kill("t-exec", signal.SIGKILL)
    c.wait()
    assert runtime.state("t-exec").status == "stopped"
    with pytest.raises(IncorrectStatus):
        runtime.exec("t-exec", ["true"])


def test_the_container_and_its_execs_are_in_its_cgroup_in_every_hierarchy(runtime, busybox):
    """On v1 the child joins its groups itself (their `tasks` files, cgroups/v1.py), an exec's
    process too; on v2 the parent moves the child. Either way, every hierarchy holds them."""
    start_detached(runtime, busybox, "t-joined", ["sleep", "60"], network="none")
    state = runtime.state("t-joined")
    dirs = runtime.cgroup("t-joined").dirs()
    assert sorted(dirs) == sorted(set(state.cgroup_paths.values()))

    def members(d):
        with open(os.path.join(d, "cgroup.procs")) as f:
            return {int(p) for p in f.read().split()}

    # Its init (pid 1) and the sleep it forks, in every hierarchy alike.
    wait_until("the init and its command in each group", lambda: all(len(members(d)) == 2 for d in dirs))
    first = members(dirs[0])
    assert state.pid in first and all(members(d) == first for d in dirs), [(d, members(d)) for d in dirs]
    pid = runtime.exec("t-joined", ["sleep", "60"], wait=False)
    try:
        assert all(members(d) == first | {pid} for d in dirs), [(d, members(d)) for d in dirs]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    runtime.delete("t-joined", force=True)


def test_another_process_can_list_kill_and_remove(runtime, busybox, data_root, run_root):
    start_detached(runtime, busybox, "t-other", ["sleep", "60"], network="none")
    env = dict(os.environ, FCRUN_ROOT=data_root, FCRUN_RUN=run_root)
    fcrun = [sys.executable, "-m", "fcrun_cli"]
    cli = lambda *a: subprocess.run([*fcrun, "--cgroup-parent", CGROUP_PARENT, *a], env=env, capture_output=True, text=True)  # noqa: E731
    ps = cli("ps")
    assert ps.returncode == 0, ps.stderr
    assert "t-other" in ps.stdout and "running" in ps.stdout
    rm = cli("rm", "t-other")
    assert rm.returncode == 5 and "rm -f" in rm.stderr
    assert cli("kill", "t-other", "KILL").returncode == 0
    wait_until("t-other to be stopped", lambda: runtime.state("t-other").status == "stopped",
               detail=lambda: runtime.state("t-other").status)
    assert cli("rm", "t-other").returncode == 0
    assert runtime.list() == []


def test_container_dies_with_its_supervisor(runtime, busybox, data_root, run_root):
    code = textwrap.dedent(f"""
        import sys, time
        from fcrun import Paths, Runtime, RunOptions, spec_from_image
        rt = Runtime(Paths(data_root={data_root!r}, run_root={run_root!r}), cgroup_parent="{CGROUP_PARENT}")
        img = rt.images.get("busybox")
        c = rt.run("t-orphan", spec_from_image(img, RunOptions(args=["sleep", "300"], network="none"), name="t-orphan"), image=img)
        print(c.pid, flush=True)
        time.sleep(300)
    """)
    sup = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(sup.stdout.readline())
    assert runtime.state("t-orphan").status == "running"
    sup.kill()
    sup.wait()
    sup.stdout.close()
    wait_until("the container to die with its supervisor", lambda: not os.path.exists(f"/proc/{pid}"))
    assert runtime.state("t-orphan").status == "stopped"
    assert [r.status for r in runtime.list()] == ["stopped"]


def test_gc_removes_what_a_crashed_supervisor_left(runtime, busybox):
    c = start_detached(runtime, busybox, "t-gc", ["sleep", "60"])
    os.kill(c.pid, signal.SIGKILL)
    c.wait()
    removed = runtime.gc()
    assert removed[0] == "t-gc"  # then possibly its veth, if the kernel had not dropped it yet
    assert all(item.startswith("lease:") for item in removed[1:]), removed
    assert runtime.list() == []


def test_a_wait_that_records_nothing_still_reads_as_stopped(runtime, busybox, monkeypatch):
    """`fcrun run` without --keep waits with record=False (the container is removed right
    after): the file keeps "running", and every reader still sees the truth (the pid is gone);
    the first one to look saves "stopped", atomically but not fsync'd (a status names nothing
    on disk: state.py)."""
    spec = spec_from_image(busybox, RunOptions(args=["sh", "-c", "exit 6"], network="none"), name="t-norecord")
    null = os.open(os.devnull, os.O_RDWR)
    try:
        c = runtime.run("t-norecord", spec, image=busybox, stdio=(null, null, null))
    finally:
        os.close(null)
    assert c.wait(record=False) == 6
    assert runtime.states.load("t-norecord").status == "running"
    synced = []
    monkeypatch.setattr(os, "fsync", synced.append)
    assert runtime.state("t-norecord").status == "stopped"
    assert runtime.states.load("t-norecord").status == "stopped" and synced == []
    monkeypatch.undo()
    assert runtime.gc() == ["t-norecord"]


def test_no_state_save_is_synced_and_each_reads_back(runtime, busybox, monkeypatch):
    """A container's states are written atomically but never fsync'd (state.py: a power loss
    ends the container; what its state names on disk gc finds by name, test_corrupt_state_root.py):
    a whole run, created, started and waited for, syncs nothing, and the state reads back."""
    spec = spec_from_image(busybox, RunOptions(args=["sh", "-c", "exit 5"], network="none"), name="t-nosync")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    null = os.open(os.devnull, os.O_RDWR)
    try:
        c = runtime.create("t-nosync", spec, image=busybox, stdio=(null, null, null))
        assert runtime.states.load("t-nosync").status == "created"
        c.start()
        assert runtime.states.load("t-nosync").status == "running"
        assert c.wait() == 5
    finally:
        os.close(null)
    assert synced == []
    state = runtime.states.load("t-nosync")
    assert (state.status, state.exit_code) == ("stopped", 5)
    monkeypatch.undo()
    runtime.delete("t-nosync")


# ----- bad input and rollback -----------------------------------------------------------------


def test_bad_input_is_rejected_and_changes_nothing(runtime, busybox, run_root):
    before = host_snapshot(run_root)
    with pytest.raises(NotFound, match="image"):
        runtime.images.get("no-such-image")
    with pytest.raises(SpecError, match="invalid container name"):
        runtime.create("bad/name", spec_from_image(busybox, RunOptions(args=["true"]), name="x"), image=busybox)
    start_detached(runtime, busybox, "t-taken", ["sleep", "60"], network="none")
    with pytest.raises(AlreadyExists, match="t-taken"):
        start_detached(runtime, busybox, "t-taken", ["sleep", "60"], network="none")
    runtime.delete("t-taken", force=True)
    assert settled_snapshot(run_root, before) == before


@pytest.mark.parametrize("network", ["bridge", "none"])
def test_failure_half_way_rolls_back_everything(runtime, busybox, run_root, network):
    before = host_snapshot(run_root)
    # exec of a missing binary: fails after namespaces, rootfs, cgroup and veth exist.
    with pytest.raises(ContainerError, match="no-such-binary"):
        start_detached(runtime, busybox, "t-fail1", ["no-such-binary"], network=network, cpu=0.5, memory_bytes=32 << 20)
    # a mount that the kernel refuses, in the middle of rootfs setup
    spec = spec_from_image(busybox, RunOptions(args=["true"], network=network), name="t-fail2")
    spec.mounts.append(Mount(destination="/proc/sys/kernel/fcrun", type="tmpfs", source="tmpfs"))
    with pytest.raises(KernelError, match="mount /proc/sys/kernel/fcrun"):
        runtime.create("t-fail2", spec, image=busybox)
    assert settled_snapshot(run_root, before) == before
    assert runtime.list() == []
    if network == "bridge":
        assert runtime.network.ipam.leases() == {}


def test_a_created_container_holds_no_lock_on_itself(runtime, busybox):
    """The container child, forked straight from this process, must not inherit the creation's
    lock (an flock on the container's dir) and hold it until its exec: the next locked step of
    the creator before start (fill_slot, label) would wait forever."""
    from fcrun.runtime import Runtime

    rt = Runtime(runtime.paths, cgroup_parent=runtime.cgroup_parent, bridge=runtime.bridge, subnet=runtime.subnet,
                 spawner=False)
    spec = spec_from_image(busybox, RunOptions(args=["true"], network="none"), name="lockfree")
    container = rt.create("lockfree", spec, image=busybox)
    inode = os.stat(rt.states.dir("lockfree")).st_ino
    with open("/proc/locks") as f:
        holders = [line for line in f if f":{inode} " in line]
    assert holders == [], holders
    rt.label("lockfree", {"checked": "yes"})  # would block forever with the lock inherited
    container.start()
    assert container.wait() == 0
    rt.delete("lockfree")
