"""Turn an OCI spec into a ChildPlan, and its resources into cgroup Limits: every decision
made before fork (runc's specconv).

Pure functions of the spec and host facts, so they are unit-tested without root.
"""

from __future__ import annotations

import os
import resource
import signal
import stat
import struct

import msgspec

from .. import syscalls as sc
from ..cgroups.limits import Limits
from ..cgroups.devices import DeviceRule
from .capabilities import CAPABILITY_NUMBERS, capability_mask
from ..errors import SpecError
from ..units import CPU_PERIOD_US
from .spec import (
    IOPRIO_CLASSES, MAX_NUMA_NODES, MEMORY_POLICY_FLAGS, MEMORY_POLICY_MODES, PERSONALITY_DOMAINS, SCHED_FLAGS,
    SCHED_POLICIES, LinuxDevice, Mount, Spec, limited, parse_id_list,
)
from ..seccomp import compile_filter, filter_flags
from .child import ChildPlan, HookStep, MountStep

# Mount options that are flags; everything else (mode=, size=, gid=...) is filesystem data.
# <sys/mount.h> flags syscalls.py does not name.
MS_SYNCHRONOUS = 16
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NODIRATIME = 2048
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_RELATIME = 1 << 21
MS_I_VERSION = 1 << 23
MS_LAZYTIME = 1 << 25

_FLAG_OPTIONS = {
    "ro": (sc.MS_RDONLY, True), "rw": (sc.MS_RDONLY, False),
    "nosuid": (sc.MS_NOSUID, True), "suid": (sc.MS_NOSUID, False),
    "nodev": (sc.MS_NODEV, True), "dev": (sc.MS_NODEV, False),
    "noexec": (sc.MS_NOEXEC, True), "exec": (sc.MS_NOEXEC, False),
    "strictatime": (sc.MS_STRICTATIME, True), "nostrictatime": (sc.MS_STRICTATIME, False),
    "noatime": (sc.MS_NOATIME, True), "atime": (sc.MS_NOATIME, False),
    "relatime": (MS_RELATIME, True), "norelatime": (MS_RELATIME, False),
    "nodiratime": (MS_NODIRATIME, True), "diratime": (MS_NODIRATIME, False),
    "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True), "mand": (MS_MANDLOCK, True), "nomand": (MS_MANDLOCK, False),
    "lazytime": (MS_LAZYTIME, True), "nolazytime": (MS_LAZYTIME, False),
    "iversion": (MS_I_VERSION, True), "noiversion": (MS_I_VERSION, False),
    "silent": (MS_SILENT, True), "loud": (MS_SILENT, False),
    "nosymfollow": (MS_NOSYMFOLLOW, True), "symfollow": (MS_NOSYMFOLLOW, False),
    "bind": (sc.MS_BIND, True), "rbind": (sc.MS_BIND | sc.MS_REC, True),
}
# A mount's own propagation (runc's names); set on it once it is mounted.
MOUNT_PROPAGATION = {
    "private": sc.MS_PRIVATE, "rprivate": sc.MS_PRIVATE | sc.MS_REC,
    "slave": sc.MS_SLAVE, "rslave": sc.MS_SLAVE | sc.MS_REC,
    "shared": sc.MS_SHARED, "rshared": sc.MS_SHARED | sc.MS_REC,
    "unbindable": MS_UNBINDABLE, "runbindable": MS_UNBINDABLE | sc.MS_REC,
}
# linux.rootfsPropagation: applied recursively to the container's whole mount tree ("" means
# slave: host mounts still reach the container, nothing goes back). The spawner re-checks it
# against slave/private/shared, so unbindable is refused here, by name.
_PROPAGATION = {"": sc.MS_SLAVE, "slave": sc.MS_SLAVE, "rslave": sc.MS_SLAVE,
                "private": sc.MS_PRIVATE, "rprivate": sc.MS_PRIVATE,
                "shared": sc.MS_SHARED, "rshared": sc.MS_SHARED}

DEVICES = [  # (name, major, minor): the minimal /dev every container gets, as runc's default
    (b"null", 1, 3), (b"zero", 1, 5), (b"full", 1, 7), (b"random", 1, 8), (b"urandom", 1, 9), (b"tty", 5, 0),
]
DEV_SYMLINKS = [
    (b"pts/ptmx", b"ptmx"), (b"/proc/self/fd", b"fd"), (b"/proc/self/fd/0", b"stdin"),
    (b"/proc/self/fd/1", b"stdout"), (b"/proc/self/fd/2", b"stderr"),
]


def mount_step(m: Mount, where: str) -> MountStep:
    """One OCI mount -> a MountStep. Bind mounts that ask for flags get a remount step,
    because the kernel ignores flags like MS_RDONLY on the initial bind."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for opt in m.options:
        if opt in _FLAG_OPTIONS:
            bit, on = _FLAG_OPTIONS[opt]
            flags = flags | bit if on else flags & ~bit
        elif opt in MOUNT_PROPAGATION:
            propagation = MOUNT_PROPAGATION[opt]  # the last one given wins, as in runc
        elif "=" in opt or opt in ("newinstance",):
            data.append(opt)
        else:
            raise SpecError(f"unknown mount option {opt!r}", where)
    dest = m.destination.encode()
    if m.type == "bind":
        if not os.path.exists(m.source):
            raise SpecError(f"bind mount source {m.source!r} does not exist", where)
        bind_flags = sc.MS_BIND | (flags & sc.MS_REC)
        if "rbind" not in m.options:
            bind_flags = sc.MS_BIND
        extra = flags & ~(sc.MS_BIND | sc.MS_REC)
        return MountStep(
            destination=dest, source=m.source.encode(), fstype=None, flags=bind_flags, data=None,
            bind=True, file_target=not os.path.isdir(m.source), remount_flags=extra, propagation=propagation,
        )
    return MountStep(
        destination=dest, source=(m.source or m.type).encode(), fstype=m.type.encode(),
        flags=flags, data=",".join(data).encode() if data else None, propagation=propagation,
    )


def _rlimits(spec: Spec) -> list[tuple[int, int, int]]:
    out = []
    for rl in spec.process.rlimits:
        res = getattr(resource, rl.type)
        out.append((res, rl.soft, rl.hard))
    return out


def _env(spec: Spec) -> dict[bytes, bytes]:
    env: dict[bytes, bytes] = {}
    for item in spec.process.env:
        key, _, value = item.partition("=")
        env[key.encode()] = value.encode()
    return env


def sysctl_file(key: str) -> bytes:
    """linux.sysctl's key -> its file under /proc/sys (net.ipv4.ip_forward -> .../net/ipv4/ip_forward)."""
    return b"/proc/sys/" + key.replace(".", "/").encode()


def _cpu_affinity(spec: Spec) -> list[int]:
    """The CPUs the process runs on: execCPUAffinity's final list (what the process has once it
    is in its cgroup), else its initial one."""
    affinity = spec.process.exec_cpu_affinity
    text = (affinity.final or affinity.initial) if affinity else ""
    return parse_id_list(text, "$.process.execCPUAffinity", os.cpu_count() or 1) if text else []


def _memory_policy(spec: Spec) -> dict:
    policy = spec.linux.memory_policy
    if policy is None:
        return {}
    mode = MEMORY_POLICY_MODES[policy.mode]
    for flag in policy.flags:
        mode |= MEMORY_POLICY_FLAGS[flag]
    nodes = 0
    for node in parse_id_list(policy.nodes, "$.linux.memoryPolicy.nodes", MAX_NUMA_NODES) if policy.nodes else []:
        nodes |= 1 << node
    return {"mempolicy_mode": mode, "mempolicy_nodes": nodes}


def _sched_attr(spec: Spec) -> bytes:
    """process.scheduler as the kernel's struct sched_attr (its first version, 48 bytes)."""
    sched = spec.process.scheduler
    if sched is None:
        return b""
    flags = 0
    for flag in sched.flags:
        flags |= SCHED_FLAGS[flag]
    return struct.pack("=IIQiIQQQ", 48, SCHED_POLICIES[sched.policy], flags, sched.nice, sched.priority,
                       sched.runtime, sched.deadline, sched.period)


_DEVICE_FILE_TYPES = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


def _device(d: LinuxDevice) -> tuple[bytes, int, int, int, int, int]:
    mode = _DEVICE_FILE_TYPES[d.type] | (d.file_mode if d.file_mode is not None else 0o666)
    return (d.path.encode(), mode, d.major, d.minor, d.uid or 0, d.gid or 0)


CGROUP_TYPES = ("cgroup", "cgroup2")
CGROUP_ROOT = "/sys/fs/cgroup/"


def _cgroup_mount(spec: Spec, cgroup_dirs: dict[str, str] | None) -> dict:
    """The ChildPlan fields of the spec's mount of type cgroup (one at most)."""
    found = [(i, m) for i, m in enumerate(spec.mounts) if m.type in CGROUP_TYPES]
    if not found:
        return {}
    if len(found) > 1:
        raise SpecError("more than one cgroup mount", f"$.mounts[{found[1][0]}]")
    i, m = found[0]
    if cgroup_dirs is None:
        return {}  # a plan for exec: it joins the container's mount namespace, mounts nothing
    step = mount_step(msgspec.structs.replace(m, type="tmpfs"), f"$.mounts[{i}]")
    binds = []
    for key, path in sorted(cgroup_dirs.items()):
        # v1: the hierarchy's name (cpu,cpuacct; memory; ...); v2 ("unified"): the destination itself.
        if key == "unified":
            name = ""
        elif path.startswith(CGROUP_ROOT):
            name = path[len(CGROUP_ROOT):].split("/", 1)[0]
        else:
            name = key
        if (path.encode(), name.encode()) not in binds:
            binds.append((path.encode(), name.encode()))
    return {"cgroup_mount": m.destination.encode(), "cgroup_mount_flags": step.flags, "cgroup_binds": binds}


def _hooks(spec: Spec) -> list[HookStep]:
    """The hooks the child runs itself (hooks.py says which and when)."""
    if spec.hooks is None:
        return []
    return [
        HookStep(stage=stage, path=h.path.encode(), argv=[a.encode() for a in h.args],
                 env=[e.encode() for e in h.env], timeout_s=h.timeout or 0)
        for stage, hooks in (("createContainer", spec.hooks.create_container), ("startContainer", spec.hooks.start_container))
        for h in hooks
    ]


def _console_owner(spec: Spec) -> int:
    """The host uid of the process's user, who owns its terminal (in a user namespace: where
    its uid maps to; -1: unmapped, left to host root)."""
    uid = spec.process.user.uid
    if not any(ns.type == "user" for ns in spec.linux.namespaces):
        return uid
    return next((m.host_id + uid - m.container_id for m in spec.linux.uid_mappings
                 if m.container_id <= uid < m.container_id + m.size), -1)


def build_plan(
    spec: Spec,
    *,
    rootfs: str,
    overlay_lower: list[str] | None,
    overlay_upper: str = "",
    overlay_work: str = "",
    overlay_tmpfs_bytes: int = 0,
    cgroup_procs: list[str],
    cap_last: int,
    attached: bool,
    init_fd: int = -1,
    stdio: tuple[int, int, int] | None = None,
    userns_fd: int = -1,
    upper_owner: tuple[int, int] | None = None,
    hook_state: bytes = b"{}",
    cgroup_dirs: dict[str, str] | None = None,
    console_socket: int = -1,
    seccomp_cache: str | None = None,
) -> ChildPlan:
    """Everything the container child does, decided here. Raises SpecError for bad mounts.

    `overlay_tmpfs_bytes` > 0: the child first mounts a tmpfs of that size at `rootfs`, makes
    `overlay_upper` and `overlay_work` in it (they must lie directly under `rootfs`), then
    mounts the overlay on top: a writable layer in memory, in the child's mount namespace only.

    `userns_fd` >= 0: the child joins that user namespace last, and the image layers are
    attached idmapped to it under `rootfs` (rootfs/lowerN) as the overlay's lower dirs.
    `upper_owner`: the host (uid, gid) of the container's root, for a tmpfs upper dir.
    `hook_state`: the OCI state JSON (no status, no pid) for the hooks the child runs.
    `cgroup_dirs`: the container's cgroup dirs (Cgroup.paths), for a mount of type cgroup.
    `console_socket`: a connected socket for the master of a pty the child makes in the
    container (console.py), of process.consoleSize; its slave is then the process's stdio.
    `seccomp_cache`: where compiled seccomp programs are kept between processes (Paths.seccomp_cache).
    """
    flags = 0
    namespaces = {ns.type for ns in spec.linux.namespaces}
    paths = {ns.type: ns.path for ns in spec.linux.namespaces if ns.path}
    # The pid namespace is entered by the forking process, around fork (a new one, or the one
    # at its path); the user namespace is the parent's (made by userns.make_userns, or opened
    # at its path) and joined by the child last. Any other with a path is joined by the child.
    # The mount namespace last: joining it changes our root, and the other paths are the host's.
    joined = [(path.encode(), sc.NAMESPACES[t][0]) for t, path in sorted(paths.items(), key=lambda i: i[0] == "mount")
              if t not in ("pid", "user")]
    for ns in namespaces - {"pid", "user"} - set(paths):
        flags |= sc.NAMESPACES[ns][0]
    caps = spec.process.capabilities
    mask = (lambda field: capability_mask(getattr(caps, field), f"$.process.capabilities.{field}")) if caps else (lambda f: 0)
    ambient = [CAPABILITY_NUMBERS[c if c.startswith("CAP_") else "CAP_" + c] for c in (caps.ambient if caps else [])]
    # The kernel holds an ambient capability only while it is both permitted and inheritable;
    # runc's own default spec lists ambient ones it does not make inheritable, and runc skips
    # what it cannot raise (with a warning). So does fcrun, where it is decided: here.
    raisable = mask("permitted") & mask("inheritable")
    ambient = [cap for cap in ambient if raisable & (1 << cap)]
    if overlay_lower is not None and not flags & sc.CLONE_NEWNS:
        raise SpecError("an image's rootfs needs a new mount namespace (fcrun mounts it at a shared mount point)",
                        "$.linux.namespaces")
    overlay_data = None
    idmapped_lower: list[tuple[bytes, bytes]] = []
    if overlay_lower is not None and userns_fd >= 0:
        staged = [os.path.join(rootfs, f"lower{i}") for i in range(len(overlay_lower))]
        idmapped_lower = [(layer.encode(), point.encode()) for layer, point in zip(overlay_lower, staged)]
        overlay_lower = staged
    if overlay_lower is not None:
        # volatile: containers are disposable (their upper dir is deleted on rm), so skip the
        # syncs to the upper filesystem that would otherwise make every unmount wait for disk.
        overlay_data = (
            f"lowerdir={':'.join(overlay_lower)},upperdir={overlay_upper},workdir={overlay_work},volatile"
        ).encode()
    overlay_tmpfs = None
    if overlay_tmpfs_bytes:
        if overlay_lower is None:
            raise SpecError("a memory-backed writable layer needs an image (overlay lower dirs)", "volatile_rootfs")
        if overlay_tmpfs_bytes < 0:
            raise SpecError(f"invalid size {overlay_tmpfs_bytes} for the memory-backed rootfs", "volatile_rootfs")
        for path in (overlay_upper, overlay_work):
            if os.path.dirname(path) != rootfs:
                raise SpecError(f"{path!r} must lie directly under {rootfs!r} (on its tmpfs)", "volatile_rootfs")
        overlay_tmpfs = f"size={overlay_tmpfs_bytes},mode=755".encode()
    propagation = _PROPAGATION.get(spec.linux.rootfs_propagation)
    if propagation is None:
        if spec.linux.rootfs_propagation in MOUNT_PROPAGATION:
            raise SpecError(f"rootfs propagation {spec.linux.rootfs_propagation!r} is not supported by fcrun",
                            "$.linux.rootfsPropagation")
        raise SpecError(f"unknown rootfs propagation {spec.linux.rootfs_propagation!r}", "$.linux.rootfsPropagation")
    return ChildPlan(
        argv=[a.encode() for a in spec.process.args],
        env=_env(spec),
        cwd=spec.process.cwd.encode(),
        rootfs=rootfs.encode(),
        overlay_data=overlay_data,
        overlay_tmpfs=overlay_tmpfs,
        overlay_tmpfs_dirs=[(overlay_upper.encode(), 0o755), (overlay_work.encode(), 0o700)] if overlay_tmpfs else [],
        mounts=[mount_step(m, f"$.mounts[{i}]") for i, m in enumerate(spec.mounts) if m.type not in CGROUP_TYPES],
        devices=[(name, stat.S_IFCHR | 0o666, major, minor) for name, major, minor in DEVICES],
        dev_symlinks=list(DEV_SYMLINKS),
        masked_paths=[p.encode() for p in spec.linux.masked_paths],
        readonly_paths=[p.encode() for p in spec.linux.readonly_paths],
        readonly_root=spec.root.readonly,
        propagation=propagation,
        unshare_flags=flags,
        new_netns=bool(flags & sc.CLONE_NEWNET),
        hostname=spec.hostname.encode() if spec.hostname and "uts" in namespaces else None,
        cgroup_procs=[p.encode() for p in cgroup_procs],
        rlimits=_rlimits(spec),
        uid=spec.process.user.uid,
        gid=spec.process.user.gid,
        groups=list(spec.process.user.additional_gids),
        cap_bounding=mask("bounding"),
        cap_effective=mask("effective"),
        cap_permitted=mask("permitted"),
        cap_inheritable=mask("inheritable"),
        cap_ambient=ambient,
        cap_last=cap_last,
        no_new_privs=spec.process.no_new_privileges,
        # Compiled here, before fork (cached: the default profile costs nothing per container).
        seccomp_filter=(compile_filter(spec.linux.seccomp, cache_dir=seccomp_cache)
                        if spec.linux.seccomp is not None else b""),
        seccomp_flags=filter_flags(spec.linux.seccomp) if spec.linux.seccomp is not None else 0,
        pdeathsig=signal.SIGKILL if attached else 0,
        init_fd=init_fd,
        stdio=stdio,
        keep_fds=[init_fd] if init_fd >= 0 else [],
        userns_fd=userns_fd,
        idmapped_lower=idmapped_lower,
        upper_owner=upper_owner if overlay_tmpfs else None,
        join_namespaces=joined,
        new_pid_ns="pid" in namespaces and "pid" not in paths,
        join_pid_ns=paths.get("pid", "").encode(),
        sysctl=[(sysctl_file(k), v.encode()) for k, v in spec.linux.sysctl.items()],
        umask=spec.process.user.umask if spec.process.user.umask is not None else 0o022,
        oom_score_adj=spec.process.oom_score_adj,
        hooks=_hooks(spec),
        **_cgroup_mount(spec, cgroup_dirs),
        domainname=spec.domainname.encode() if spec.domainname else None,
        sched_attr=_sched_attr(spec),
        cpu_affinity=_cpu_affinity(spec),
        **_memory_policy(spec),
        ioprio=(IOPRIO_CLASSES[spec.process.io_priority.class_] << 13 | spec.process.io_priority.priority
                if spec.process.io_priority else -1),
        personality=PERSONALITY_DOMAINS[spec.linux.personality.domain] if spec.linux.personality else -1,
        spec_devices=[_device(d) for d in spec.linux.devices],
        hook_state=hook_state,
        console_socket=console_socket,
        console_owner=_console_owner(spec) if console_socket >= 0 else -1,
        console_size=(spec.process.console_size.height, spec.process.console_size.width)
        if spec.process.console_size is not None else (0, 0),
    )


def cgroup_settings(spec: Spec, version: int) -> list[tuple[str, str, str, str]]:
    """linux.resources fields beyond the cgroup layer's Limits, as (controller key of
    Cgroup.paths, file, value, JSON path): written after the Limits, at create
    (spec_resources.cgroup_settings, which Runtime.update_resources uses too).

    Raises:
        SpecError: a field this cgroup version has no file for, naming it.
    """
    from .spec_resources import cgroup_settings as settings

    return settings(spec.linux.resources, version)


def limits_from_spec(spec: Spec) -> Limits:
    """The cgroup limits of the spec's linux.resources (none: no limits)."""
    res = spec.linux.resources
    if res is None:
        return Limits()
    return Limits(
        cpu_quota_us=res.cpu.quota if res.cpu and limited(res.cpu.quota) else None,
        cpu_period_us=(res.cpu.period or CPU_PERIOD_US) if res.cpu else CPU_PERIOD_US,
        memory_bytes=res.memory.limit if res.memory and limited(res.memory.limit) else None,
        pids_max=res.pids.limit if res.pids and limited(res.pids.limit) else None,
        devices=tuple(DeviceRule(allow=d.allow, type=d.type, major=d.major, minor=d.minor, access=d.access)
                      for d in res.devices),
    )
