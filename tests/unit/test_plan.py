import os
import resource
import signal
import stat

import pytest

from fcrun import syscalls as sc
from fcrun.errors import SpecError
from fcrun.runtime.spec import Mount, default_spec
from fcrun.runtime.plan import build_plan, mount_step
from fcrun.runtime.rootfs_setup import secure_join


def _plan(spec, **kw):
    args = dict(rootfs="/run/fcrun/containers/c1/rootfs", overlay_lower=["/l/top", "/l/base"],
                overlay_upper="/u", overlay_work="/w", cgroup_procs=["/sys/fs/cgroup/x/cgroup.procs"],
                cap_last=40, attached=True)
    args.update(kw)
    return build_plan(spec, **args)


def test_plan_unshares_every_namespace_but_pid_which_the_parent_enters():
    plan = _plan(default_spec(["sh"]))
    expected = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET | sc.CLONE_NEWCGROUP
    assert plan.unshare_flags == expected
    assert plan.new_netns
    assert plan.pdeathsig == signal.SIGKILL


def test_plan_host_network_and_detached():
    plan = _plan(default_spec(["sh"], network="host"), attached=False)
    assert not plan.unshare_flags & sc.CLONE_NEWNET
    assert not plan.new_netns
    assert plan.pdeathsig == 0


def test_plan_overlay_and_devices():
    plan = _plan(default_spec(["sh"]))
    assert plan.overlay_data == b"lowerdir=/l/top:/l/base,upperdir=/u,workdir=/w,volatile"
    names = {d[0] for d in plan.devices}
    assert names == {b"null", b"zero", b"full", b"random", b"urandom", b"tty"}
    assert all(stat.S_ISCHR(d[1]) for d in plan.devices)
    assert (b"pts/ptmx", b"ptmx") in plan.dev_symlinks
    assert b"/proc/kcore" in plan.masked_paths and b"/proc/sys" in plan.readonly_paths


def test_plan_capabilities_and_rlimits():
    plan = _plan(default_spec(["sh"]))
    assert plan.cap_bounding & (1 << 10)  # NET_BIND_SERVICE
    assert not plan.cap_bounding & (1 << 21)  # SYS_ADMIN
    assert plan.cap_effective == plan.cap_bounding
    assert plan.rlimits == [(resource.RLIMIT_NOFILE, 1024, 1024)]
    assert plan.no_new_privs
    user_plan = _plan(default_spec(["sh"], uid=33, gid=33))
    assert user_plan.cap_effective == 0 and user_plan.uid == 33


def test_plan_env_is_bytes_dict():
    plan = _plan(default_spec(["sh"], env=["PATH=/bin", "A=b=c"]))
    assert plan.env == {b"PATH": b"/bin", b"A": b"b=c"}


def test_mount_options_split_into_flags_and_data():
    step = mount_step(Mount(destination="/dev", type="tmpfs", source="tmpfs",
                            options=["nosuid", "strictatime", "mode=755", "size=65536k"]), "$.mounts[0]")
    assert step.flags == sc.MS_NOSUID | sc.MS_STRICTATIME
    assert step.data == b"mode=755,size=65536k"


def test_read_only_bind_gets_a_remount(tmp_path):
    src = tmp_path / "site"
    src.mkdir()
    step = mount_step(Mount(destination="/var/www/html", source=str(src), options=["bind", "ro", "nosuid"]), "$.mounts[9]")
    assert step.bind and step.flags == sc.MS_BIND
    assert step.remount_flags == sc.MS_RDONLY | sc.MS_NOSUID
    assert not step.file_target
    f = tmp_path / "hosts"
    f.write_text("x")
    assert mount_step(Mount(destination="/etc/hosts", source=str(f), options=["rbind"]), "m").file_target


def test_bad_mounts_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match=r"does not exist.*\$\.mounts\[3\]"):
        mount_step(Mount(destination="/x", source=str(tmp_path / "missing")), "$.mounts[3]")
    with pytest.raises(SpecError, match="unknown mount option 'wat'"):
        mount_step(Mount(destination="/x", type="tmpfs", options=["wat"]), "$.mounts[0]")


def test_secure_join_keeps_symlinks_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc", root / "abs")          # absolute: must resolve under root
    os.symlink("../../../..", root / "etc" / "up")  # climbing out: clamps at root
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    r = str(root).encode()
    assert secure_join(r, b"/abs/passwd") == r + b"/etc/passwd"
    assert secure_join(r, b"/etc/up/etc/shadow") == r + b"/etc/shadow"
    assert secure_join(r, b"/../../x") == r + b"/x"
    assert secure_join(r, b"/new/dir") == r + b"/new/dir"
    with pytest.raises(OSError):
        secure_join(r, b"/loop1")


def test_plan_memory_backed_writable_layer():
    plan = _plan(default_spec(["sh"]), rootfs="/run/fcrun/rootfs", overlay_upper="/run/fcrun/rootfs/upper",
                 overlay_work="/run/fcrun/rootfs/work", overlay_tmpfs_bytes=64 << 20)
    assert plan.overlay_tmpfs == b"size=67108864,mode=755"
    assert plan.overlay_tmpfs_dirs == [(b"/run/fcrun/rootfs/upper", 0o755), (b"/run/fcrun/rootfs/work", 0o700)]
    assert plan.overlay_data == (b"lowerdir=/l/top:/l/base,upperdir=/run/fcrun/rootfs/upper,"
                                 b"workdir=/run/fcrun/rootfs/work,volatile")
    # The default: the layer on disk, no tmpfs.
    disk = _plan(default_spec(["sh"]))
    assert disk.overlay_tmpfs is None and disk.overlay_tmpfs_dirs == []


def test_plan_memory_backed_layer_rejects_bad_input():
    with pytest.raises(SpecError, match="needs an image"):
        _plan(default_spec(["sh"]), overlay_lower=None, overlay_tmpfs_bytes=1 << 20)
    with pytest.raises(SpecError, match="directly under"):
        _plan(default_spec(["sh"]), rootfs="/m", overlay_upper="/elsewhere/upper", overlay_work="/m/work",
              overlay_tmpfs_bytes=1 << 20)
    with pytest.raises(SpecError, match="invalid size"):
        _plan(default_spec(["sh"]), rootfs="/m", overlay_upper="/m/upper", overlay_work="/m/work",
              overlay_tmpfs_bytes=-1)


def test_mount_propagation_options_become_a_propagation_step():
    step = mount_step(Mount(destination="/m", type="tmpfs", source="tmpfs", options=["nosuid", "rslave"]), "$.mounts[0]")
    assert step.propagation == sc.MS_SLAVE | sc.MS_REC
    assert step.flags == sc.MS_NOSUID
    shared = mount_step(Mount(destination="/m", type="tmpfs", options=["private", "shared"]), "$.mounts[0]")
    assert shared.propagation == sc.MS_SHARED  # the last one wins
    assert mount_step(Mount(destination="/m", type="tmpfs"), "$.mounts[0]").propagation == 0


def test_more_mount_flags_are_understood():
    step = mount_step(Mount(destination="/m", type="tmpfs", options=["noatime", "atime", "nodiratime", "sync"]), "m")
    assert not step.flags & sc.MS_NOATIME
    assert step.flags & 2048 and step.flags & 16  # MS_NODIRATIME, MS_SYNCHRONOUS


def test_rootfs_propagation_unbindable_is_refused_by_name():
    spec = default_spec(["sh"])
    spec.linux.rootfs_propagation = "runbindable"
    with pytest.raises(SpecError, match="'runbindable' is not supported") as info:
        _plan(spec)
    assert info.value.where == "$.linux.rootfsPropagation"


def test_plan_process_fields_umask_oom_groups_sysctl():
    spec = default_spec(["sh"])
    assert _plan(spec).umask == 0o022 and _plan(spec).oom_score_adj is None  # runc's default umask
    spec.process.user.umask = 0o077
    spec.process.user.additional_gids = [10, 20]
    spec.process.oom_score_adj = -500
    spec.linux.sysctl = {"net.ipv4.ip_forward": "1", "kernel.shmmni": "100"}
    plan = _plan(spec)
    assert plan.umask == 0o077 and plan.groups == [10, 20] and plan.oom_score_adj == -500
    assert plan.sysctl == [(b"/proc/sys/net/ipv4/ip_forward", b"1"), (b"/proc/sys/kernel/shmmni", b"100")]


def test_plan_joins_a_namespace_with_a_path_instead_of_making_it():
    from fcrun.runtime.spec import Namespace

    spec = default_spec(["sh"])
    spec.linux.namespaces = [Namespace(type=ns.type, path="/run/netns/x" if ns.type == "network" else "")
                             for ns in spec.linux.namespaces]
    plan = _plan(spec)
    assert plan.join_namespaces == [(b"/run/netns/x", sc.CLONE_NEWNET)]
    assert not plan.unshare_flags & sc.CLONE_NEWNET and not plan.new_netns
    assert plan.unshare_flags & sc.CLONE_NEWUTS


def test_plan_pid_namespace_new_joined_or_the_runtimes():
    from fcrun.runtime.spec import Namespace

    spec = default_spec(["sh"])
    plan = _plan(spec)
    assert plan.new_pid_ns and plan.join_pid_ns == b""
    spec.linux.namespaces = [Namespace(type=ns.type, path="/proc/7/ns/pid" if ns.type == "pid" else "")
                             for ns in spec.linux.namespaces]
    plan = _plan(spec)
    assert not plan.new_pid_ns and plan.join_pid_ns == b"/proc/7/ns/pid"
    assert all(nstype != sc.CLONE_NEWPID for _, nstype in plan.join_namespaces)  # entered around the fork
    spec.linux.namespaces = [ns for ns in spec.linux.namespaces if ns.type != "pid"]
    plan = _plan(spec)
    assert not plan.new_pid_ns and plan.join_pid_ns == b""


def test_plan_joins_the_mount_namespace_last_and_a_user_namespace_by_fd():
    from fcrun.runtime.spec import Namespace

    spec = default_spec(["sh"])
    paths = {"mount": "/proc/7/ns/mnt", "network": "/run/netns/x", "user": "/proc/7/ns/user"}
    spec.linux.namespaces = [Namespace(type=t, path=paths.get(t, "")) for t in ("mount", "user", "network", "pid")]
    plan = _plan(spec, overlay_lower=None)
    # Joining the mount namespace changes our root: the other paths are opened before it.
    assert plan.join_namespaces == [(b"/run/netns/x", sc.CLONE_NEWNET), (b"/proc/7/ns/mnt", sc.CLONE_NEWNS)]
    assert not plan.unshare_flags & (sc.CLONE_NEWNS | sc.CLONE_NEWNET)


def test_plan_an_image_needs_a_mount_namespace_of_its_own():
    spec = default_spec(["sh"])
    spec.linux.namespaces = [ns for ns in spec.linux.namespaces if ns.type != "mount"]
    with pytest.raises(SpecError, match="needs a new mount namespace") as info:
        _plan(spec)
    assert info.value.where == "$.linux.namespaces"
    assert not _plan(spec, overlay_lower=None).unshare_flags & sc.CLONE_NEWNS  # a bundle's rootfs: bound in place


def test_plan_carries_the_hooks_the_child_runs():
    from fcrun.runtime.spec import Hook, Hooks

    spec = default_spec(["sh"])
    spec.hooks = Hooks(create_runtime=[Hook(path="/host/only")],
                       create_container=[Hook(path="/bin/a", args=["a", "1"], env=["X=1"], timeout=5)],
                       start_container=[Hook(path="/bin/b")])
    plan = _plan(spec, hook_state=b'{"id":"c1"}')
    assert [(h.stage, h.path, h.argv, h.env, h.timeout_s) for h in plan.hooks] == [
        ("createContainer", b"/bin/a", [b"a", b"1"], [b"X=1"], 5), ("startContainer", b"/bin/b", [], [], 0)]
    assert plan.hook_state == b'{"id":"c1"}'


def test_cgroup_settings_per_version():
    from fcrun.runtime.plan import cgroup_settings
    from fcrun.runtime.spec import CpuResources, MemoryResources

    spec = default_spec(["sh"])
    spec.linux.resources.memory = MemoryResources(limit=64 << 20, swap=128 << 20, reservation=-1, swappiness=5,
                                                  kernel_tcp=1 << 20)
    spec.linux.resources.cpu = CpuResources(shares=1024)
    v1 = {(c, f): v for c, f, v, _ in cgroup_settings(spec, 1)}
    assert v1 == {("cpu", "cpu.shares"): "1024", ("memory", "memory.soft_limit_in_bytes"): "-1",
                  ("memory", "memory.kmem.tcp.limit_in_bytes"): str(1 << 20),
                  ("memory", "memory.memsw.limit_in_bytes"): str(128 << 20), ("memory", "memory.swappiness"): "5"}
    for field, wire in (("kernel_tcp", "kernelTCP"), ("swappiness", "swappiness")):
        with pytest.raises(SpecError, match="no cgroup v2 file") as info:
            cgroup_settings(spec, 2)
        assert info.value.where == f"$.linux.resources.memory.{wire}"
        setattr(spec.linux.resources.memory, field, None)
    v2 = {(c, f): v for c, f, v, _ in cgroup_settings(spec, 2)}
    assert v2 == {("unified", "cpu.weight"): "39", ("unified", "memory.low"): "max",
                  ("unified", "memory.swap.max"): str(64 << 20)}


def test_a_cgroup_mount_binds_the_containers_own_groups():
    spec = default_spec(["sh"])
    spec.mounts.append(Mount(destination="/sys/fs/cgroup", type="cgroup", source="cgroup", options=["nosuid", "ro", "rprivate"]))
    v1 = _plan(spec, cgroup_dirs={"cpu": "/sys/fs/cgroup/cpu,cpuacct/fcrun/c1", "cpuacct": "/sys/fs/cgroup/cpu,cpuacct/fcrun/c1",
                                  "memory": "/sys/fs/cgroup/memory/fcrun/c1"})
    assert v1.cgroup_mount == b"/sys/fs/cgroup" and v1.cgroup_mount_flags == sc.MS_NOSUID | sc.MS_RDONLY
    assert v1.cgroup_binds == [(b"/sys/fs/cgroup/cpu,cpuacct/fcrun/c1", b"cpu,cpuacct"),
                               (b"/sys/fs/cgroup/memory/fcrun/c1", b"memory")]
    assert all(m.destination != b"/sys/fs/cgroup" for m in v1.mounts)
    v2 = _plan(spec, cgroup_dirs={"unified": "/sys/fs/cgroup/fcrun/c1"})
    assert v2.cgroup_binds == [(b"/sys/fs/cgroup/fcrun/c1", b"")]
    assert _plan(spec).cgroup_mount is None  # exec's plan: no mounts


def test_unlimited_values_as_runc_reads_them():
    from fcrun.runtime.plan import limits_from_spec
    from fcrun.runtime.spec import CpuResources, MemoryResources, PidsResources, validate_spec

    for unlimited in (-1, 0):
        spec = default_spec(["sh"])
        spec.linux.resources.memory = MemoryResources(limit=unlimited)
        spec.linux.resources.cpu = CpuResources(quota=unlimited, period=100000)
        spec.linux.resources.pids = PidsResources(limit=unlimited)
        validate_spec(spec)
        limits = limits_from_spec(spec)
        assert (limits.memory_bytes, limits.cpu_quota_us, limits.pids_max) == (None, None, None)


def test_cgroup_settings_v2_only_and_v1_only_fields():
    from fcrun.runtime.plan import cgroup_settings
    from fcrun.runtime.spec import CpuResources

    spec = default_spec(["sh"])
    spec.linux.resources.unified = {"memory.high": "50M"}
    with pytest.raises(SpecError, match="needs cgroup v2") as info:
        cgroup_settings(spec, 1)
    assert info.value.where == "$.linux.resources.unified['memory.high']"
    assert cgroup_settings(spec, 2) == [("unified", "memory.high", "50M", "$.linux.resources.unified['memory.high']")]
    spec.linux.resources.unified = {"cgroup.procs": "1"}
    with pytest.raises(SpecError, match="not a controller's file"):
        cgroup_settings(spec, 2)
    spec.linux.resources.unified = {}
    spec.linux.resources.cpu = CpuResources(idle=1)
    with pytest.raises(SpecError, match="needs cgroup v2"):
        cgroup_settings(spec, 1)
    assert cgroup_settings(spec, 2)[0][:3] == ("unified", "cpu.idle", "1")
    spec.linux.resources.cpu = CpuResources(realtime_runtime=1000, realtime_period=100000)
    assert [(f, v) for _, f, v, _ in cgroup_settings(spec, 1)] == [("cpu.rt_period_us", "100000"), ("cpu.rt_runtime_us", "1000")]
    with pytest.raises(SpecError, match="no cgroup v2 file"):
        cgroup_settings(spec, 2)


def test_ambient_capabilities_the_kernel_cannot_hold_are_left_out_as_runc_does():
    from fcrun.runtime.spec import Capabilities

    spec = default_spec(["sh"])
    names = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    # runc spec's default: ambient listed, inheritable not.
    spec.process.capabilities = Capabilities(bounding=names, effective=names, permitted=names, ambient=names)
    assert _plan(spec).cap_ambient == []
    spec.process.capabilities.inheritable = ["CAP_KILL", "CAP_NET_BIND_SERVICE"]
    assert _plan(spec).cap_ambient == [5, 10]


def test_id_map_text_round_trips():
    from fcrun.runtime.userns import map_text, parse_map_text, range_mappings

    mappings = range_mappings(200000)
    assert parse_map_text(map_text(mappings)) == mappings
    # As the kernel shows them: aligned columns.
    assert [(m.container_id, m.host_id, m.size) for m in parse_map_text(b"         0     300000      65536\n")] == [
        (0, 300000, 65536)]
