"""Root tests of the runtime-spec fields fcrun honours beyond its own defaults: hooks, umask,
additionalGids, oomScoreAdj, sysctl, mount propagation, joining a namespace by path.

Each is checked from inside a real container (busybox) or, for hooks, from what the hook saw.
"""

from __future__ import annotations

import json
import os
import sys

import msgspec
import pytest

from fcrun.errors import ContainerError, NotFound, SpecError
from fcrun.runtime.hooks import BUNDLE_LABEL
from fcrun.runtime.options import RunOptions, spec_from_image
from fcrun.runtime.spec import Hook, Hooks, Mount, Namespace
from hostcheck import host_snapshot, settled_snapshot
from capture import run_captured

pytestmark = [pytest.mark.root]


def _spec(image, name, script, **opts):
    return spec_from_image(image, RunOptions(args=["sh", "-c", script], network="none", **opts), name=name)


def _run(rt, image, name, spec, **kw):
    """Run to completion; returns (exit code, output). The container is deleted."""
    return run_captured(rt, name, spec, image=image, **kw)


def _recorder(tmp_path, stage):
    """A host hook that saves its stdin (the state JSON) and its argv/env to tmp_path/STAGE."""
    out = tmp_path / stage
    return Hook(path="/bin/sh", args=["sh", "-c", f'cat > {out}.json; echo "$0 $1 $HOOK_ENV" > {out}.args', "hookname", "arg1"],
                env=["HOOK_ENV=set"], timeout=10)


def test_hooks_run_at_each_stage_with_the_state_on_stdin(runtime, busybox, tmp_path):
    os.chmod(tmp_path, 0o755)
    spec = _spec(busybox, "t-hooks", "cat /start.json; echo; echo done")
    # startContainer runs in the container: its path and output files are the container's.
    spec.hooks = Hooks(
        prestart=[_recorder(tmp_path, "prestart")],
        create_runtime=[_recorder(tmp_path, "createRuntime")],
        create_container=[_recorder(tmp_path, "createContainer")],
        start_container=[Hook(path="/bin/sh", args=["sh", "-c", "cat > /start.json"])],
        poststart=[_recorder(tmp_path, "poststart")],
        poststop=[_recorder(tmp_path, "poststop")],
    )
    container = runtime.create("t-hooks", spec, image=busybox, labels={BUNDLE_LABEL: "/bundles/t-hooks"})
    pid = container.pid
    created = {stage: json.loads((tmp_path / f"{stage}.json").read_text())
               for stage in ("prestart", "createRuntime", "createContainer")}
    assert not (tmp_path / "poststart.json").exists()
    for stage, state in created.items():
        assert state["id"] == "t-hooks" and state["pid"] == pid, stage
        assert state["status"] == "creating" and state["bundle"] == "/bundles/t-hooks", stage
        assert (tmp_path / f"{stage}.args").read_text() == "hookname arg1 set\n", stage
    container.start()
    poststart = json.loads((tmp_path / "poststart.json").read_text())
    assert poststart["status"] == "running" and poststart["pid"] == pid
    assert container.wait() == 0
    runtime.delete("t-hooks")
    poststop = json.loads((tmp_path / "poststop.json").read_text())
    assert poststop["status"] == "stopped" and poststop["id"] == "t-hooks"


def test_a_prestart_hook_finds_the_container_in_its_cgroup(runtime, busybox, tmp_path):
    """With a hook before "J" the parent moves the child before the hook runs (a child's own
    join, as on v1 otherwise, would come after it): the hook sees the container in its groups."""
    out = tmp_path / "cgroup"
    spec = _spec(busybox, "t-hookcg", "true")
    script = (f"import json, sys; pid = json.load(sys.stdin)['pid']; "
              f"open({str(out)!r}, 'w').write(open(f'/proc/{{pid}}/cgroup').read())")
    spec.hooks = Hooks(prestart=[Hook(path=sys.executable, args=[sys.executable, "-c", script], timeout=10)])
    container = runtime.create("t-hookcg", spec, image=busybox)
    try:
        dirs = runtime.cgroup("t-hookcg").dirs()
        lines = out.read_text().splitlines()
        joined = [line for line in lines if line.endswith("/t-hookcg")]
        assert dirs and len(joined) >= len(dirs), lines
    finally:
        container.start()
        container.wait()
        runtime.delete("t-hookcg")


def test_start_container_hook_runs_inside_the_container(runtime, busybox):
    spec = _spec(busybox, "t-hook-in", "cat /start.json")
    spec.hooks = Hooks(start_container=[Hook(path="/bin/sh", args=["sh", "-c", "cat > /start.json"])])
    code, out = _run(runtime, busybox, "t-hook-in", spec)
    assert code == 0
    state = json.loads(out)
    assert state["status"] == "created" and state["id"] == "t-hook-in" and state["pid"] > 1


@pytest.mark.parametrize("stage", ["create_runtime", "prestart", "create_container"])
def test_a_failing_create_hook_fails_create_and_leaves_nothing(runtime, busybox, run_root, stage):
    before = host_snapshot(run_root)
    spec = _spec(busybox, "t-hook-fail", "true")
    setattr(spec, "hooks", Hooks(**{stage: [Hook(path="/bin/sh", args=["sh", "-c", "echo no way >&2; exit 3"])]}))
    with pytest.raises(ContainerError, match="hook /bin/sh failed: exit code 3"):
        runtime.create("t-hook-fail", spec, image=busybox)
    with pytest.raises(NotFound):
        runtime.state("t-hook-fail")
    assert settled_snapshot(run_root, before) == before


def test_a_hook_past_its_timeout_is_killed_and_fails_create(runtime, busybox, run_root):
    before = host_snapshot(run_root)
    spec = _spec(busybox, "t-hook-slow", "true")
    spec.hooks = Hooks(create_runtime=[Hook(path="/bin/sleep", args=["sleep", "30"], timeout=1)])
    with pytest.raises(ContainerError, match="timeout of 1s"):
        runtime.create("t-hook-slow", spec, image=busybox)
    assert settled_snapshot(run_root, before) == before


def test_umask_additional_gids_and_oom_score_adj(runtime, busybox):
    spec = _spec(busybox, "t-proc", "umask; id -G; cat /proc/self/oom_score_adj")
    spec.process.user = msgspec.structs.replace(spec.process.user, umask=0o077, additional_gids=[10, 20])
    spec.process.oom_score_adj = 500
    code, out = _run(runtime, busybox, "t-proc", spec)
    assert code == 0, out
    umask, groups, oom = out.split("\n")[:3]
    assert umask == "0077"
    assert {"10", "20"} <= set(groups.split())
    assert oom == "500"


def test_default_umask_is_runcs(runtime, busybox):
    code, out = _run(runtime, busybox, "t-umask", _spec(busybox, "t-umask", "umask"))
    assert (code, out) == (0, "0022\n")


def test_namespaced_sysctls_are_set_in_the_container_only(runtime, busybox):
    with open("/proc/sys/kernel/shmmni") as f:
        host_shmmni = f.read()
    spec = _spec(busybox, "t-sysctl", "cat /proc/sys/kernel/shmmni /proc/sys/net/ipv4/ip_forward")
    spec.linux.sysctl = {"kernel.shmmni": "1234", "net.ipv4.ip_forward": "1"}
    assert _run(runtime, busybox, "t-sysctl", spec) == (0, "1234\n1\n")
    with open("/proc/sys/kernel/shmmni") as f:
        assert f.read() == host_shmmni


def test_a_host_wide_sysctl_is_refused(runtime, busybox):
    spec = _spec(busybox, "t-sysctl-bad", "true")
    spec.linux.sysctl = {"vm.overcommit_memory": "1"}
    with pytest.raises(SpecError, match="not namespaced"):
        runtime.create("t-sysctl-bad", spec, image=busybox)


def test_mount_propagation_option_is_applied(runtime, busybox, tmp_path):
    src = tmp_path / "shared-src"
    src.mkdir()
    spec = _spec(busybox, "t-prop", "grep ' /mnt/a ' /proc/self/mountinfo; grep ' /mnt/b ' /proc/self/mountinfo")
    spec.mounts = [*spec.mounts,
                   Mount(destination="/mnt/a", source=str(src), options=["rbind", "rprivate"]),
                   Mount(destination="/mnt/b", type="tmpfs", source="tmpfs", options=["shared"])]
    code, out = _run(runtime, busybox, "t-prop", spec)
    assert code == 0, out
    line_a, line_b = out.splitlines()
    optional_a = line_a.split(" - ")[0].split()[6:]
    assert not any(f.startswith(("shared:", "master:")) for f in optional_a), line_a
    assert "shared:" in line_b.split(" - ")[0], line_b


@pytest.mark.parametrize("ns_type,proc_name", [("network", "net"), ("ipc", "ipc"), ("uts", "uts"), ("cgroup", "cgroup")])
def test_joining_a_namespace_by_path(runtime, busybox, ns_type, proc_name):
    holder = runtime.run("t-ns-holder", _spec(busybox, "t-ns-holder", "sleep 60"), image=busybox, detach=True)
    try:
        ns_path = f"/proc/{holder.pid}/ns/{proc_name}"
        expected = os.readlink(ns_path)
        spec = _spec(busybox, "t-ns-join", f"readlink /proc/self/ns/{proc_name}")
        spec.linux.namespaces = [Namespace(type=ns.type, path=ns_path if ns.type == ns_type else "")
                                 for ns in spec.linux.namespaces]
        assert _run(runtime, busybox, "t-ns-join", spec) == (0, expected + "\n")
    finally:
        runtime.delete("t-ns-holder", force=True)


@pytest.mark.parametrize("path_of,match", [
    (lambda pid: "/etc/hostname", "is not a network namespace"),
    (lambda pid: f"/proc/{pid}/ns/ipc", "is not a network namespace"),
    (lambda pid: "/nonexistent/ns", "No such file"),
])
def test_a_bad_namespace_path_is_refused_by_name(runtime, busybox, run_root, path_of, match):
    before = host_snapshot(run_root)
    path = path_of(os.getpid())
    spec = _spec(busybox, "t-ns-bad", "true")
    spec.linux.namespaces = [Namespace(type=ns.type, path=path if ns.type == "network" else "")
                             for ns in spec.linux.namespaces]
    with pytest.raises(SpecError, match=match) as info:
        runtime.create("t-ns-bad", spec, image=busybox)
    assert info.value.where.startswith("$.linux.namespaces[") and path in str(info.value)
    assert settled_snapshot(run_root, before) == before



def test_resources_beyond_fcrun_limits_reach_the_cgroup(runtime, busybox):
    from fcrun.runtime.spec import CpuResources, MemoryResources

    spec = _spec(busybox, "t-res", "sleep 60", memory_bytes=64 << 20)
    res = spec.linux.resources
    res.memory = MemoryResources(limit=64 << 20, swap=128 << 20, reservation=32 << 20, swappiness=10,
                                 disable_oom_killer=True, kernel_tcp=8 << 20)
    res.cpu = CpuResources(shares=512)
    runtime.run("t-res", spec, image=busybox, detach=True)
    try:
        paths = runtime.state("t-res").cgroup_paths
        if runtime.cgroups.version != 1:
            pytest.skip("the values checked below are cgroup v1's files; this host runs v2")

        def read(controller, file):
            with open(os.path.join(paths[controller], file)) as f:
                return f.read().split("\n")[0]

        assert read("cpu", "cpu.shares") == "512"
        assert read("memory", "memory.limit_in_bytes") == str(64 << 20)
        assert read("memory", "memory.memsw.limit_in_bytes") == str(128 << 20)
        assert read("memory", "memory.soft_limit_in_bytes") == str(32 << 20)
        assert read("memory", "memory.swappiness") == "10"
        assert read("memory", "memory.oom_control") == "oom_kill_disable 1"
        assert read("memory", "memory.kmem.tcp.limit_in_bytes") == str(8 << 20)
    finally:
        runtime.delete("t-res", force=True)


def test_a_resource_the_host_cannot_set_is_refused_and_leaves_nothing(runtime, busybox, run_root):
    before = host_snapshot(run_root)
    spec = _spec(busybox, "t-res-bad", "true")
    spec.linux.resources.rdma = {"mlx5_0": {"hcaHandles": 3}}  # (test_spec_cgroups_root.py: what this host lacks)
    with pytest.raises(SpecError, match="rdma: the rdma controller is not supported") as info:
        runtime.create("t-res-bad", spec, image=busybox)
    assert info.value.where == "$.linux.resources.rdma"
    assert settled_snapshot(run_root, before) == before


def test_linux_devices_domainname_and_personality(runtime, busybox):
    from fcrun.runtime.spec import DeviceRule, LinuxDevice, Personality

    spec = _spec(busybox, "t-dev", "stat -c '%F %t:%T %a %u:%g' /dev/fuse /dev/sub/pipe /dev/null; "
                                   "cat /proc/sys/kernel/domainname; uname -m")
    spec.hostname = "h"
    spec.domainname = "example.org"
    spec.linux.personality = Personality(domain="LINUX32")
    spec.linux.devices = [LinuxDevice(path="/dev/fuse", type="c", major=10, minor=229, file_mode=0o640, uid=1, gid=2),
                          LinuxDevice(path="/dev/sub/pipe", type="p", file_mode=0o600),
                          LinuxDevice(path="/dev/null", type="c", major=1, minor=3, file_mode=0o600)]
    spec.linux.resources.devices.append(DeviceRule(allow=True, type="c", major=10, minor=229, access="rwm"))
    code, out = _run(runtime, busybox, "t-dev", spec)
    assert code == 0, out
    fuse, pipe, null, domain, machine = out.splitlines()
    assert fuse == "character special file a:e5 640 1:2"
    assert pipe.startswith("fifo") and pipe.endswith(" 600 0:0")
    assert null == "character special file 1:3 600 0:0"  # the spec's replaces fcrun's default
    assert domain == "example.org"
    # LINUX32 makes uname report the 32-bit machine of a 64-bit host.
    assert machine == {"x86_64": "i686", "aarch64": "armv8l"}.get(os.uname().machine, machine)
    assert machine != os.uname().machine


def test_a_cgroup_mount_shows_the_containers_own_groups_read_only(runtime, busybox):
    # As podman's config.json has it.
    spec = _spec(busybox, "t-cgmount", "", memory_bytes=64 << 20)
    spec.mounts = [*spec.mounts, Mount(destination="/sys/fs/cgroup", type="cgroup", source="cgroup",
                                       options=["rprivate", "nosuid", "noexec", "nodev", "relatime", "ro"])]
    if runtime.cgroups.version == 1:
        script = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes; ls /sys/fs/cgroup/memory/ | grep -c fcrun; "
    else:
        script = "cat /sys/fs/cgroup/memory.max; echo 0; "
    spec.process.args = ["sh", "-c", script + "touch /sys/fs/cgroup/x 2>/dev/null && echo writable || echo read-only"]
    code, out = _run(runtime, busybox, "t-cgmount", spec)
    assert code == 0, out
    limit, nested, writable = out.splitlines()
    assert limit == str(64 << 20)  # its own group, not the host's root
    assert nested == "0"  # no fcrun parent or sibling groups in sight
    assert writable == "read-only"


def test_scheduler_and_io_priority_reach_the_process(runtime, busybox):
    from fcrun.runtime.spec import IOPriority, Scheduler

    # /proc/self/stat after the command name: field 19 is nice, 41 the policy (proc(5)).
    spec = _spec(busybox, "t-sched", "ionice -p $$; cut -d')' -f2- /proc/self/stat | awk '{print $17, $39}'")
    spec.process.scheduler = Scheduler(policy="SCHED_BATCH", nice=5)
    spec.process.io_priority = IOPriority(class_="IOPRIO_CLASS_BE", priority=6)
    code, out = _run(runtime, busybox, "t-sched", spec)
    assert code == 0, out
    ionice, stat_fields = out.splitlines()
    assert ionice == "best-effort: prio 6"
    assert stat_fields == "5 3"  # nice 5, SCHED_BATCH


def test_cpu_affinity_and_memory_policy_reach_the_process(runtime, busybox):
    from fcrun.runtime.spec import CPUAffinity, MemoryPolicy

    if not os.path.exists("/proc/self/numa_maps"):
        pytest.skip("this kernel has no NUMA support (no /proc/PID/numa_maps) to show the memory policy")
    spec = _spec(busybox, "t-affinity", "grep Cpus_allowed_list /proc/self/status; grep -c ' bind:0 ' /proc/self/numa_maps")
    spec.process.exec_cpu_affinity = CPUAffinity(final="0")
    spec.linux.memory_policy = MemoryPolicy(mode="MPOL_BIND", nodes="0")
    code, out = _run(runtime, busybox, "t-affinity", spec)
    assert code == 0, out
    cpus, bound = out.splitlines()
    assert cpus.split() == ["Cpus_allowed_list:", "0"]
    assert int(bound) > 0  # the process's mappings follow the bind policy


def test_runc_default_capabilities_start_and_ambient_ones_reach_a_non_root_user(runtime, busybox):
    from fcrun.runtime.spec import Capabilities

    names = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    spec = _spec(busybox, "t-caps", "grep -E '^Cap(Amb|Eff)' /proc/self/status")
    spec.process.capabilities = Capabilities(bounding=names, effective=names, permitted=names, ambient=names)
    code, out = _run(runtime, busybox, "t-caps", spec)  # runc spec's default: ambient, not inheritable
    assert code == 0, out
    assert "CapAmb:\t0000000000000000" in out
    spec = _spec(busybox, "t-caps-user", "grep -E '^Cap(Amb|Eff)' /proc/self/status", user="1000:1000")
    spec.process.capabilities = Capabilities(bounding=names, effective=names, permitted=names,
                                             inheritable=["CAP_KILL", "CAP_NET_BIND_SERVICE"], ambient=names)
    code, out = _run(runtime, busybox, "t-caps-user", spec)
    assert code == 0, out
    assert "CapAmb:\t0000000000000420" in out  # KILL (5) and NET_BIND_SERVICE (10): a non-root process keeps them
