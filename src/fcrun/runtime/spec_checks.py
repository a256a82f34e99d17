"""The checks of an OCI spec that its types cannot say (spec.py's `validate_spec`).

Split out of spec.py, which re-exports every public name here (`fcrun.runtime.spec.validate_spec`
and the tables plan.py uses): absolute paths, known namespaces and sysctls, ranges, and the
fields fcrun declares but does not honour (`NotSupported`, refused by `refuse_not_supported`
with the reason in `_WHY`). Each error is a SpecError with the JSON path of the field.

This module imports spec.py's structs only for type checking, so that spec.py can import it at
its top without a cycle.
"""

from __future__ import annotations

import functools
import os
import re
from typing import TYPE_CHECKING, Any

import msgspec

from .capabilities import capability_mask
from ..errors import SpecError
from ..units import CPU_PERIOD_US, MIN_MEMORY_BYTES, is_decimal

if TYPE_CHECKING:
    from .spec import LinuxDevice, Process, Resources, Spec

# spec.py's marker of a field fcrun declares but does not honour (defined here, re-exported there).
NotSupported = Any
NOT_SET = msgspec.UNSET

SUPPORTED_NAMESPACES = {"pid", "network", "ipc", "uts", "mount", "cgroup", "user"}
RLIMIT_NAMES = {
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS",
    "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME",
}
# Namespaces a spec may join by path: the child setns()es into them where it would make them;
# a pid namespace is entered around the fork (fork.fork_pid1), a user namespace is opened by
# the parent and joined by the child before "created", as a new one is.
JOINABLE_NAMESPACES = ("network", "ipc", "uts", "cgroup", "pid", "mount", "user")
# linux.sysctl keys a container may set, and the namespace each needs of its own (runc's list:
# only namespaced sysctls, so that a container cannot change the host's).
IPC_SYSCTLS = {"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
               "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced"}
UTS_SYSCTLS = {"kernel.hostname", "kernel.domainname"}
_SYSCTL_KEY = r"[a-z0-9_]+(\.[A-Za-z0-9_:@+-]+)+"   # a pattern: re compiles it if a spec has a sysctl
# "cgroup" (and "cgroup2"): the container's own cgroups, read-only (plan.cgroup_mount).
SUPPORTED_MOUNT_TYPES = {"bind", "proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup", "cgroup2"}


# Why each NotSupported field is refused: the spec's fields that fcrun does not (yet) honour.
_WHY = {
    "username": "a Windows field",
    "commandLine": "a Windows field",
    "uidMappings": "idmapped bind mounts are not supported by fcrun",
    "gidMappings": "idmapped bind mounts are not supported by fcrun",
    "timeOffsets": "time namespaces are not supported by fcrun",
    "intelRdt": "Intel RDT (resctrl) is not supported by fcrun",
    "netDevices": "moving network devices into the container is not supported by fcrun",
    "rdma": "the rdma controller is not supported by fcrun's cgroup layer",
    "kernel": "kernel memory limits are not enforced by Linux since 5.16 (memory.kmem.limit_in_bytes is ignored)",
    "listenerPath": "seccomp notify listeners are not supported by fcrun",
    "listenerMetadata": "seccomp notify listeners are not supported by fcrun",
    "solaris": "not a Linux field", "windows": "not a Linux field", "vm": "not a Linux field",
    "zos": "not a Linux field",
}


@functools.cache
def _not_supported_fields(cls: type) -> tuple[tuple[str, str], ...]:
    """(Python name, JSON name) of the fields `cls` declares as NotSupported."""
    return tuple((field, wire) for field, wire in zip(cls.__struct_fields__, cls.__struct_encode_fields__)
                 if cls.__annotations__.get(field) in ("NotSupported", NotSupported))


def _refuse_not_supported(obj: msgspec.Struct | None, where: str) -> None:
    """Refuse every NotSupported field of `obj` that is set (not absent, not null)."""
    if obj is None:
        return
    for field, wire in _not_supported_fields(type(obj)):
        if getattr(obj, field) not in (NOT_SET, None):
            why = _WHY.get(wire, "not supported by fcrun's cgroup layer" if ".resources" in where else "not supported by fcrun")
            raise SpecError(f"{where[2:]}.{wire}: {why}", f"{where}.{wire}")


def refuse_not_supported(spec: Spec) -> None:
    """Raise SpecError for the first field of the spec fcrun does not honour, naming it."""
    _refuse_not_supported(spec, "$")
    _refuse_not_supported(spec.process, "$.process")
    _refuse_not_supported(spec.process.user, "$.process.user")
    for i, m in enumerate(spec.mounts):
        _refuse_not_supported(m, f"$.mounts[{i}]")
    _refuse_not_supported(spec.linux, "$.linux")
    _refuse_not_supported(spec.linux.seccomp, "$.linux.seccomp")
    res = spec.linux.resources
    if res is not None:
        _refuse_not_supported(res, "$.linux.resources")
        _refuse_not_supported(res.memory, "$.linux.resources.memory")
        _refuse_not_supported(res.cpu, "$.linux.resources.cpu")
    for field, wire, why in (("apparmor_profile", "apparmorProfile", "AppArmor profiles are not supported by fcrun"),
                             ("selinux_label", "selinuxLabel", "SELinux labels are not supported by fcrun")):
        if getattr(spec.process, field):
            raise SpecError(f"process.{wire}: {why}", f"$.process.{wire}")
    if spec.linux.mount_label:
        raise SpecError("linux.mountLabel: SELinux labels are not supported by fcrun", "$.linux.mountLabel")


# <linux/sched.h> and <linux/ioprio.h>: the names the spec uses.
SCHED_POLICIES = {"SCHED_OTHER": 0, "SCHED_FIFO": 1, "SCHED_RR": 2, "SCHED_BATCH": 3, "SCHED_ISO": 4,
                  "SCHED_IDLE": 5, "SCHED_DEADLINE": 6}
SCHED_FLAGS = {"SCHED_FLAG_RESET_ON_FORK": 0x01, "SCHED_FLAG_RECLAIM": 0x02, "SCHED_FLAG_DL_OVERRUN": 0x04,
               "SCHED_FLAG_KEEP_POLICY": 0x08, "SCHED_FLAG_KEEP_PARAMS": 0x10, "SCHED_FLAG_UTIL_CLAMP_MIN": 0x20,
               "SCHED_FLAG_UTIL_CLAMP_MAX": 0x40}
IOPRIO_CLASSES = {"IOPRIO_CLASS_RT": 1, "IOPRIO_CLASS_BE": 2, "IOPRIO_CLASS_IDLE": 3}


def _check_scheduling(process: Process) -> None:
    sched = process.scheduler
    if sched is not None:
        if sched.policy not in SCHED_POLICIES:
            raise SpecError(f"unknown scheduler policy {sched.policy!r}", "$.process.scheduler.policy")
        for i, flag in enumerate(sched.flags):
            if flag not in SCHED_FLAGS:
                raise SpecError(f"unknown scheduler flag {flag!r}", f"$.process.scheduler.flags[{i}]")
        if not -20 <= sched.nice <= 19:
            raise SpecError("nice must be -20..19", "$.process.scheduler.nice")
        realtime = sched.policy in ("SCHED_FIFO", "SCHED_RR")
        if not (1 <= sched.priority <= 99 if realtime else sched.priority == 0):
            raise SpecError(f"priority {sched.priority} is not valid for {sched.policy} (1..99 for FIFO and RR, "
                            "else 0)", "$.process.scheduler.priority")
        if sched.policy != "SCHED_DEADLINE" and (sched.runtime or sched.deadline or sched.period):
            raise SpecError("runtime, deadline and period are for SCHED_DEADLINE only", "$.process.scheduler")
    io = process.io_priority
    if io is not None:
        if io.class_ not in IOPRIO_CLASSES:
            raise SpecError(f"unknown io priority class {io.class_!r}", "$.process.ioPriority.class")
        if not 0 <= io.priority <= 7:
            raise SpecError("io priority must be 0..7", "$.process.ioPriority.priority")


MEMORY_POLICY_MODES = {"MPOL_DEFAULT": 0, "MPOL_PREFERRED": 1, "MPOL_BIND": 2, "MPOL_INTERLEAVE": 3,
                       "MPOL_LOCAL": 4, "MPOL_PREFERRED_MANY": 5, "MPOL_WEIGHTED_INTERLEAVE": 6}
MEMORY_POLICY_FLAGS = {"MPOL_F_NUMA_BALANCING": 1 << 13, "MPOL_F_RELATIVE_NODES": 1 << 14, "MPOL_F_STATIC_NODES": 1 << 15}
MAX_NUMA_NODES = 64  # fcrun passes set_mempolicy one 64-bit word of nodes


def parse_id_list(text: str, where: str, limit: int) -> list[int]:
    """"0-3,7" -> [0, 1, 2, 3, 7]. Raises SpecError naming `where`."""
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not is_decimal(low) or (high and not is_decimal(high)):
            raise SpecError(f"{text!r} is not a list like 0-3,7", where)
        first, last = int(low), int(high or low)
        if first > last or last >= limit:
            raise SpecError(f"{part!r} is not a range of ids below {limit}", where)
        out.extend(range(first, last + 1))
    return out


def _check_affinity_and_memory_policy(spec: Spec) -> None:
    affinity = spec.process.exec_cpu_affinity
    if affinity is not None:
        for field in ("initial", "final"):
            if getattr(affinity, field):
                parse_id_list(getattr(affinity, field), f"$.process.execCPUAffinity.{field}", os.cpu_count() or 1)
    policy = spec.linux.memory_policy
    if policy is not None:
        if policy.mode not in MEMORY_POLICY_MODES:
            raise SpecError(f"unknown memory policy mode {policy.mode!r}", "$.linux.memoryPolicy.mode")
        for i, flag in enumerate(policy.flags):
            if flag not in MEMORY_POLICY_FLAGS:
                raise SpecError(f"unknown memory policy flag {flag!r}", f"$.linux.memoryPolicy.flags[{i}]")
        if policy.nodes:
            parse_id_list(policy.nodes, "$.linux.memoryPolicy.nodes", MAX_NUMA_NODES)
        elif policy.mode not in ("MPOL_DEFAULT", "MPOL_LOCAL", "MPOL_PREFERRED"):
            raise SpecError(f"{policy.mode} needs nodes", "$.linux.memoryPolicy.nodes")


PERSONALITY_DOMAINS = {"LINUX": 0x0000, "LINUX32": 0x0008}  # <sys/personality.h> PER_LINUX, PER_LINUX32
DEVICE_TYPES = {"c", "u", "b", "p"}


def _check_devices(devices: list[LinuxDevice]) -> None:
    seen = set()
    for i, d in enumerate(devices):
        where = f"$.linux.devices[{i}]"
        if not os.path.isabs(d.path) or ".." in d.path.split("/") or not d.path.startswith("/dev/"):
            raise SpecError(f"device path {d.path!r} must be absolute, under /dev, without '..'", f"{where}.path")
        if d.path in seen:
            raise SpecError(f"device {d.path!r} listed twice", f"{where}.path")
        seen.add(d.path)
        if d.type not in DEVICE_TYPES:
            raise SpecError(f"device type {d.type!r} is not one of c, b, u, p", f"{where}.type")
        if not (0 <= d.major < 1 << 12 and 0 <= d.minor < 1 << 20):
            raise SpecError("device major/minor out of range", where)
        if d.file_mode is not None and not 0 <= d.file_mode <= 0o7777:
            raise SpecError(f"fileMode {d.file_mode:#o} is not a permission mode", f"{where}.fileMode")
        for field in ("uid", "gid"):
            value = getattr(d, field)
            if value is not None and not 0 <= value < 1 << 32:
                raise SpecError(f"{field} {value} out of range", f"{where}.{field}")


def _check_sysctl(sysctl: dict[str, str], namespaces: set[str]) -> None:
    """Only namespaced sysctls, each with its namespace in the spec. Raises SpecError."""
    for key, value in sysctl.items():
        where = f"$.linux.sysctl[{key!r}]"
        if not re.fullmatch(_SYSCTL_KEY, key) or "/" in key:
            raise SpecError(f"invalid sysctl name {key!r}", where)
        if "\0" in value:
            raise SpecError("a NUL byte in the value", where)
        if key in IPC_SYSCTLS or key.startswith("fs.mqueue."):
            needed = "ipc"
        elif key in UTS_SYSCTLS:
            needed = "uts"
        elif key.startswith("net."):
            needed = "network"
        else:
            raise SpecError(f"sysctl {key!r} is not namespaced: setting it would change the host", where)
        if needed not in namespaces:
            raise SpecError(f"sysctl {key!r} needs the container's own {needed} namespace", where)


def limited(value: int | None) -> bool:
    """Whether a linux.resources limit is set: runc reads -1 as "max" and 0 as not set (memory
    limit, cpu quota, pids limit), and so does fcrun."""
    return value is not None and value > 0


def _check_memory_and_cpu_extras(res: Resources) -> None:
    """The linux.resources fields beyond fcrun's own limits (plan.cgroup_settings writes them)."""
    mem, cpu = res.memory, res.cpu
    if mem is not None:
        if mem.swap is not None and mem.swap != -1:
            if not limited(mem.limit):
                raise SpecError("a swap limit needs a memory limit", "$.linux.resources.memory.swap")
            if mem.swap < mem.limit:
                raise SpecError("swap (memory + swap) must be >= the memory limit", "$.linux.resources.memory.swap")
        if mem.reservation is not None and mem.reservation != -1 and mem.reservation < 0:
            raise SpecError("memory reservation must be >= 0 or -1", "$.linux.resources.memory.reservation")
        if mem.swappiness is not None and not 0 <= mem.swappiness <= 100:
            raise SpecError("swappiness must be 0..100", "$.linux.resources.memory.swappiness")
    if cpu is not None:
        if cpu.shares is not None and not 2 <= cpu.shares <= 262144:
            raise SpecError("cpu shares must be 2..262144", "$.linux.resources.cpu.shares")
        if cpu.burst is not None and cpu.burst < 0:
            raise SpecError("cpu burst must be >= 0", "$.linux.resources.cpu.burst")


_PAGE_SIZE = r"[1-9][0-9]*[KMG]B"  # hugetlb's names: 2MB, 1GB, 64KB (a pattern, as _SYSCTL_KEY)
MAX_U32 = (1 << 32) - 1


def _check_cgroup_extras(res: Resources) -> None:
    """cpu.cpus/mems, blockIO, hugepageLimits and network (spec_resources.py writes them)."""
    at = "$.linux.resources"
    if res.cpu is not None:
        if res.cpu.cpus:
            parse_id_list(res.cpu.cpus, f"{at}.cpu.cpus", os.cpu_count() or 1)
        if res.cpu.mems:
            parse_id_list(res.cpu.mems, f"{at}.cpu.mems", MAX_NUMA_NODES)
    bio = res.block_io
    if bio is not None:
        for field, value in (("weight", bio.weight), ("leafWeight", bio.leaf_weight)):
            if value is not None and not 10 <= value <= 1000:
                raise SpecError(f"blkio {field} must be 10..1000", f"{at}.blockIO.{field}")
        for i, wd in enumerate(bio.weight_device):
            where = f"{at}.blockIO.weightDevice[{i}]"
            _check_major_minor(wd.major, wd.minor, where)
            for field, value in (("weight", wd.weight), ("leafWeight", wd.leaf_weight)):
                if value is not None and not 10 <= value <= 1000:
                    raise SpecError(f"blkio {field} must be 10..1000", f"{where}.{field}")
            if wd.weight is None and wd.leaf_weight is None:
                raise SpecError("a weightDevice entry needs a weight or a leafWeight", where)
        for wire in ("throttleReadBpsDevice", "throttleWriteBpsDevice", "throttleReadIOPSDevice",
                     "throttleWriteIOPSDevice"):
            for i, td in enumerate(getattr(bio, THROTTLE_FIELDS[wire])):
                where = f"{at}.blockIO.{wire}[{i}]"
                _check_major_minor(td.major, td.minor, where)
                if td.rate < 0:
                    raise SpecError("rate must be >= 0", f"{where}.rate")
    sizes = set()
    for i, hp in enumerate(res.hugepage_limits):
        where = f"{at}.hugepageLimits[{i}]"
        if not re.fullmatch(_PAGE_SIZE, hp.page_size):
            raise SpecError(f"page size {hp.page_size!r} is not like 2MB or 1GB", f"{where}.pageSize")
        if hp.page_size in sizes:
            raise SpecError(f"page size {hp.page_size} listed twice", f"{where}.pageSize")
        sizes.add(hp.page_size)
        if hp.limit < 0:
            raise SpecError("limit must be >= 0", f"{where}.limit")
    net = res.network
    if net is not None:
        if net.class_id is not None and not 0 <= net.class_id <= MAX_U32:
            raise SpecError("classID must be a 32-bit unsigned number", f"{at}.network.classID")
        for i, prio in enumerate(net.priorities):
            where = f"{at}.network.priorities[{i}]"
            if not prio.name or len(prio.name) > 15 or any(c in prio.name for c in "/ \0:\n"):
                raise SpecError(f"{prio.name!r} is not an interface name", f"{where}.name")
            if not 0 <= prio.priority <= MAX_U32:
                raise SpecError("priority must be a 32-bit unsigned number", f"{where}.priority")


# blockIO's throttle lists: JSON name -> BlockIO field.
THROTTLE_FIELDS = {"throttleReadBpsDevice": "throttle_read_bps_device", "throttleWriteBpsDevice": "throttle_write_bps_device",
                   "throttleReadIOPSDevice": "throttle_read_iops_device",
                   "throttleWriteIOPSDevice": "throttle_write_iops_device"}


def _check_major_minor(major: int, minor: int, where: str) -> None:
    if not (0 <= major < 1 << 12 and 0 <= minor < 1 << 20):
        raise SpecError("device major/minor out of range", where)


def validate_spec(spec: Spec) -> None:
    """Check what the types cannot: paths, names, ranges. Raises SpecError with the JSON path."""
    refuse_not_supported(spec)
    if not spec.process.args:
        raise SpecError("process.args is empty: nothing to run", "$.process.args")
    if not os.path.isabs(spec.process.cwd):
        raise SpecError(f"cwd {spec.process.cwd!r} must be an absolute path", "$.process.cwd")
    for i, item in enumerate(spec.process.env):
        if "=" not in item or item.startswith("="):
            raise SpecError(f"environment entry {item!r} is not KEY=VALUE", f"$.process.env[{i}]")
    if spec.process.user.uid < 0 or spec.process.user.gid < 0:
        raise SpecError("uid and gid must be >= 0", "$.process.user")
    for i, gid in enumerate(spec.process.user.additional_gids):
        if not 0 <= gid < 1 << 32:
            raise SpecError(f"gid {gid} is out of range", f"$.process.user.additionalGids[{i}]")
    if spec.process.user.umask is not None and not 0 <= spec.process.user.umask <= 0o777:
        raise SpecError(f"umask {spec.process.user.umask:#o} is not 0..0o777", "$.process.user.umask")
    if spec.process.oom_score_adj is not None and not -1000 <= spec.process.oom_score_adj <= 1000:
        raise SpecError(f"oomScoreAdj {spec.process.oom_score_adj} is not -1000..1000", "$.process.oomScoreAdj")
    if spec.process.capabilities:
        for field in ("bounding", "effective", "inheritable", "permitted", "ambient"):
            capability_mask(getattr(spec.process.capabilities, field), f"$.process.capabilities.{field}")
    rlimit_types = set()
    for i, rl in enumerate(spec.process.rlimits):
        if rl.type not in RLIMIT_NAMES:
            raise SpecError(f"unknown rlimit {rl.type!r}", f"$.process.rlimits[{i}].type")
        if rl.type in rlimit_types:
            raise SpecError(f"rlimit {rl.type} given twice", f"$.process.rlimits[{i}].type")
        rlimit_types.add(rl.type)
        if rl.soft > rl.hard:
            raise SpecError("soft limit exceeds hard limit", f"$.process.rlimits[{i}]")
    if len(spec.hostname) > 64 or any(c in spec.hostname for c in "/ \0"):
        raise SpecError(f"invalid hostname {spec.hostname!r}", "$.hostname")
    seen = set()
    for i, ns in enumerate(spec.linux.namespaces):
        if ns.type not in SUPPORTED_NAMESPACES:
            raise SpecError(f"namespace type {ns.type!r} is not supported by fcrun", f"$.linux.namespaces[{i}].type")
        if ns.path:
            if ns.type not in JOINABLE_NAMESPACES:
                raise SpecError(f"joining an existing {ns.type} namespace by path is not supported by fcrun "
                                f"(only {', '.join(JOINABLE_NAMESPACES)})", f"$.linux.namespaces[{i}].path")
            if not os.path.isabs(ns.path):
                raise SpecError(f"namespace path {ns.path!r} must be absolute", f"$.linux.namespaces[{i}].path")
        if ns.type in seen:
            raise SpecError(f"namespace {ns.type!r} listed twice", f"$.linux.namespaces[{i}]")
        seen.add(ns.type)
    if (spec.linux.uid_mappings or spec.linux.gid_mappings) and "user" not in seen:
        raise SpecError("id mappings need a user namespace", "$.linux.uidMappings")
    if "user" in seen:
        from .userns import check_mappings

        check_mappings(spec.linux.uid_mappings, "$.linux.uidMappings")
        check_mappings(spec.linux.gid_mappings, "$.linux.gidMappings")
        if bool(spec.linux.uid_mappings) != bool(spec.linux.gid_mappings):
            raise SpecError("give both uid and gid mappings, or neither (fcrun then picks a range)", "$.linux.gidMappings")
    _check_sysctl(spec.linux.sysctl, seen)
    from .hooks import check_hooks  # here: hooks.py builds on this module's structs

    check_hooks(spec)
    if spec.linux.seccomp is not None:
        from ..seccomp import validate_profile

        validate_profile(spec.linux.seccomp, "$.linux.seccomp")
    if spec.hostname and "uts" not in seen:
        raise SpecError("hostname needs a uts namespace", "$.hostname")
    if spec.domainname and "uts" not in seen:
        raise SpecError("domainname needs a uts namespace", "$.domainname")
    if len(spec.domainname) > 64 or any(c in spec.domainname for c in "/ \0"):
        raise SpecError(f"invalid domainname {spec.domainname!r}", "$.domainname")
    _check_devices(spec.linux.devices)
    _check_scheduling(spec.process)
    _check_affinity_and_memory_policy(spec)
    if spec.linux.devices and "user" in seen:
        raise SpecError("device nodes in a user namespace are not supported by fcrun (mknod there is "
                        "not allowed; runc bind-mounts them instead)", "$.linux.devices")
    if spec.linux.personality is not None:
        if spec.linux.personality.domain not in PERSONALITY_DOMAINS:
            raise SpecError(f"personality domain {spec.linux.personality.domain!r} is not one of "
                            f"{', '.join(PERSONALITY_DOMAINS)}", "$.linux.personality.domain")
        if spec.linux.personality.flags:
            raise SpecError("personality flags are not supported by fcrun (nor by runc)", "$.linux.personality.flags")
    for i, m in enumerate(spec.mounts):
        if not os.path.isabs(m.destination) or ".." in m.destination.split("/"):
            raise SpecError(f"mount destination {m.destination!r} must be absolute without '..'", f"$.mounts[{i}].destination")
        if m.type not in SUPPORTED_MOUNT_TYPES:
            raise SpecError(f"mount type {m.type!r} is not supported", f"$.mounts[{i}].type")
        if m.type == "bind" and not os.path.isabs(m.source):
            raise SpecError(f"bind mount source {m.source!r} must be an absolute host path", f"$.mounts[{i}].source")
    for field in ("masked_paths", "readonly_paths"):
        for i, p in enumerate(getattr(spec.linux, field)):
            if not os.path.isabs(p) or ".." in p.split("/"):
                raise SpecError(f"path {p!r} must be absolute without '..'", f"$.linux.{field}[{i}]")
    if spec.linux.cgroups_path:
        from ..cgroups.placement import parse_cgroups_path  # the cgroup layer's rule, with the JSON path

        parse_cgroups_path(spec.linux.cgroups_path)
    res = spec.linux.resources
    if res is not None:
        if limited(res.memory.limit if res.memory else None) and res.memory.limit < MIN_MEMORY_BYTES:
            raise SpecError("memory limit below 4 MiB", "$.linux.resources.memory.limit")
        if res.cpu and limited(res.cpu.quota):
            period = res.cpu.period or CPU_PERIOD_US
            if not 1000 <= period <= 1_000_000:
                raise SpecError("cpu period must be 1000..1000000 us", "$.linux.resources.cpu.period")
            if res.cpu.quota < 1000:
                raise SpecError("cpu quota must be >= 1000 us", "$.linux.resources.cpu.quota")
        _check_memory_and_cpu_extras(res)
        _check_cgroup_extras(res)
        if res.devices:
            from ..cgroups.devices import check_rule  # the cgroup layer's rules, with the JSON path

            for i, d in enumerate(res.devices):
                check_rule(d.type, d.major, d.minor, d.access, f"$.linux.resources.devices[{i}]")
