"""The OCI runtime spec (config.json, runtime-spec 1.2 on Linux), as msgspec Structs.

Field names follow the spec (camelCase on the wire, snake_case in Python). A spec read from a
bundle's config.json is decoded with `decode_spec`, which reports a bad field with its JSON
path (`at $.linux.resources.memory.limit`), and then checked by `validate_spec` for what the
type system cannot say (absolute paths, known namespaces, fcrun's limits).

Every field of the spec is declared here, strictly: a field the spec does not have is refused
("unknown field", with its path), and a field fcrun does not honour is declared as
`NotSupported` and refused by `validate_spec` when it is set (REFUSED says why), never dropped
in silence: a runtime that ignored `linux.intelRdt` or `process.apparmorProfile` would run the
container with less isolation than its engine asked for. Only `annotations` is free-form.

`default_spec` builds what `fcrun run` and the library start from: runc's defaults (mounts,
masked and read-only paths, rlimits, capabilities), adjusted by options.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Literal

import msgspec

from .capabilities import DEFAULT_CAPABILITIES, capability_mask
from ..errors import SpecError
from ..units import CPU_PERIOD_US, MIN_MEMORY_BYTES

OCI_VERSION = "1.0.2"


class _Base(msgspec.Struct, rename="camel", omit_defaults=True, forbid_unknown_fields=True, kw_only=True):
    pass


# A field of the spec that fcrun declares (so that it is not an "unknown field") but does not
# honour: any value other than absent or null is refused by validate_spec, naming it.
NotSupported = Any
NOT_SET = msgspec.UNSET


class User(_Base, kw_only=True):
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: list[int] = []
    username: NotSupported = NOT_SET  # Windows only


class ConsoleSize(_Base, kw_only=True):
    """process.consoleSize: the terminal's size (rows, columns), for a process with a terminal."""

    height: int = 0
    width: int = 0


class Capabilities(_Base, kw_only=True):
    bounding: list[str] = []
    effective: list[str] = []
    inheritable: list[str] = []
    permitted: list[str] = []
    ambient: list[str] = []


class Rlimit(_Base, kw_only=True):
    type: str
    hard: int
    soft: int


class Scheduler(_Base, kw_only=True):
    """process.scheduler: sched_setattr(2)'s policy and parameters for the process."""

    policy: str
    nice: int = 0
    priority: int = 0
    flags: list[str] = []
    runtime: int = 0
    deadline: int = 0
    period: int = 0


class IOPriority(_Base, kw_only=True):
    """process.ioPriority: ioprio_set(2)'s class and level for the process."""

    class_: str = msgspec.field(name="class")
    priority: int = 0


class CPUAffinity(_Base, kw_only=True):
    """process.execCPUAffinity: CPU lists ("0-3,7") for the process."""

    initial: str = ""
    final: str = ""


class MemoryPolicy(_Base, kw_only=True):
    """linux.memoryPolicy: set_mempolicy(2)'s mode, nodes ("0-1") and flags for the process."""

    mode: str
    nodes: str = ""
    flags: list[str] = []


class Process(_Base, kw_only=True):
    terminal: bool = False
    user: User = msgspec.field(default_factory=User)
    args: list[str]
    env: list[str] = []
    cwd: str = "/"
    capabilities: Capabilities | None = None
    rlimits: list[Rlimit] = []
    no_new_privileges: bool = False  # the OCI default; default_spec() turns it on
    console_size: ConsoleSize | None = None
    oom_score_adj: int | None = None
    apparmor_profile: str = ""  # refused unless empty: this host has no AppArmor policy for it
    selinux_label: str = ""  # refused unless empty
    scheduler: Scheduler | None = None
    io_priority: IOPriority | None = None
    exec_cpu_affinity: CPUAffinity | None = msgspec.field(default=None, name="execCPUAffinity")
    command_line: NotSupported = NOT_SET  # Windows only


class Root(_Base, kw_only=True):
    path: str
    readonly: bool = False


class Mount(_Base, kw_only=True):
    destination: str
    type: str = "bind"
    source: str = ""
    options: list[str] = []
    uid_mappings: NotSupported = NOT_SET  # idmapped bind mounts
    gid_mappings: NotSupported = NOT_SET


class Hook(_Base, kw_only=True):
    """One hook: a host program run with the container's state JSON on stdin."""

    path: str
    args: list[str] = []
    env: list[str] = []
    timeout: int | None = None  # seconds; None: wait for it as long as it runs


class Hooks(_Base, kw_only=True):
    """hooks: when each runs is hooks.py's."""

    prestart: list[Hook] = []  # deprecated by the spec, still sent by engines
    create_runtime: list[Hook] = []
    create_container: list[Hook] = []
    start_container: list[Hook] = []
    poststart: list[Hook] = []
    poststop: list[Hook] = []


class Namespace(_Base, kw_only=True):
    type: str
    path: str = ""


class MemoryResources(_Base, kw_only=True):
    limit: int | None = None
    swap: int | None = None  # memory + swap, as the spec has it; -1: unlimited
    reservation: int | None = None
    kernel: NotSupported = NOT_SET
    kernel_tcp: int | None = msgspec.field(default=None, name="kernelTCP")
    swappiness: int | None = None
    disable_oom_killer: bool | None = msgspec.field(default=None, name="disableOOMKiller")
    use_hierarchy: NotSupported = NOT_SET
    check_before_update: NotSupported = NOT_SET


class CpuResources(_Base, kw_only=True):
    quota: int | None = None
    period: int | None = None
    shares: int | None = None
    burst: int | None = None
    realtime_runtime: int | None = None
    realtime_period: int | None = None
    cpus: NotSupported = NOT_SET  # cpuset: a controller fcrun's cgroup layer does not join
    mems: NotSupported = NOT_SET
    idle: int | None = None


class PidsResources(_Base, kw_only=True):
    limit: int


class DeviceRule(_Base, kw_only=True, omit_defaults=False):  # runc needs type and access spelled out
    """linux.resources.devices[]: one cgroup device rule (type a|b|c, None = any number)."""

    allow: bool
    type: str = "a"
    major: int | None = None
    minor: int | None = None
    access: str = "rwm"


class Resources(_Base, kw_only=True):
    memory: MemoryResources | None = None
    cpu: CpuResources | None = None
    pids: PidsResources | None = None
    devices: list[DeviceRule] = []
    block_io: NotSupported = msgspec.field(default=NOT_SET, name="blockIO")
    hugepage_limits: NotSupported = NOT_SET
    network: NotSupported = NOT_SET
    rdma: NotSupported = NOT_SET
    unified: dict[str, str] = {}


class IDMapping(_Base, kw_only=True):
    """linux.uidMappings[] / gidMappings[]: container ids [container_id, +size) are host ids
    [host_id, +size)."""

    container_id: int = msgspec.field(name="containerID")
    host_id: int = msgspec.field(name="hostID")
    size: int


class SeccompArg(_Base, kw_only=True):
    index: int
    value: int
    value_two: int = 0
    op: str


class SeccompSyscall(_Base, kw_only=True):
    names: list[str]
    action: str
    errno_ret: int | None = None
    args: list[SeccompArg] = []


class Seccomp(_Base, kw_only=True):
    """linux.seccomp, the OCI profile format (Docker's profiles use the same fields)."""

    default_action: str
    default_errno_ret: int | None = None
    architectures: list[str] = []
    flags: list[str] = []
    listener_path: NotSupported = NOT_SET
    listener_metadata: NotSupported = NOT_SET
    syscalls: list[SeccompSyscall] = []


class LinuxDevice(_Base, kw_only=True):
    """linux.devices[]: a device node the runtime makes in the container."""

    path: str
    type: str  # c, b, u (= c) or p (a fifo)
    major: int = 0
    minor: int = 0
    file_mode: int | None = None  # permission bits; None: 0666
    uid: int | None = None
    gid: int | None = None


class Personality(_Base, kw_only=True):
    """linux.personality: the execution domain (LINUX or LINUX32), as runc supports it."""

    domain: str
    flags: list[str] = []


class Linux(_Base, kw_only=True):
    namespaces: list[Namespace] = []
    uid_mappings: list[IDMapping] = []
    gid_mappings: list[IDMapping] = []
    resources: Resources | None = None
    seccomp: Seccomp | None = None
    cgroups_path: str = ""
    masked_paths: list[str] = []
    readonly_paths: list[str] = []
    rootfs_propagation: str = ""
    sysctl: dict[str, str] = {}
    devices: list[LinuxDevice] = []
    time_offsets: NotSupported = NOT_SET
    mount_label: str = ""  # refused unless empty (SELinux)
    intel_rdt: NotSupported = msgspec.field(default=NOT_SET, name="intelRdt")
    personality: Personality | None = None
    net_devices: NotSupported = NOT_SET
    memory_policy: MemoryPolicy | None = None


class Spec(_Base, kw_only=True, omit_defaults=False):
    oci_version: str = OCI_VERSION
    process: Process
    root: Root
    hostname: str = ""
    domainname: str = ""
    mounts: list[Mount] = []
    hooks: Hooks | None = None
    linux: Linux = msgspec.field(default_factory=Linux)
    annotations: dict[str, str] = {}
    solaris: NotSupported = NOT_SET  # other platforms' sections
    windows: NotSupported = NOT_SET
    vm: NotSupported = NOT_SET
    zos: NotSupported = NOT_SET


_decoder = msgspec.json.Decoder(Spec)
_encoder = msgspec.json.Encoder()


# msgspec's words for an unknown field; no " - at" part when it is at the top level.
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`(?: - at `(?P<at>\$.*)`)?$")
_AT = re.compile(r" - at `(?P<at>\$[^`]*)`$")


def decode_spec(data: bytes, source: str = "config.json") -> Spec:
    """Decode and validate a config.json. Raises SpecError naming the file and JSON path:
    a wrong type, a field the runtime-spec does not have, or one fcrun does not honour."""
    try:
        spec = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        unknown = _UNKNOWN_FIELD.match(text)
        if unknown:
            where = f"{unknown['at'] or '$'}.{unknown['field']}"
            raise SpecError(f"invalid OCI spec in {source}: unknown field {unknown['field']!r} "
                            "(not in the OCI runtime spec)", where) from None
        at = _AT.search(text)
        if at:
            raise SpecError(f"invalid OCI spec in {source}: {text[:at.start()]}", at["at"]) from None
        raise SpecError(f"invalid OCI spec in {source}: {text}") from None
    except msgspec.DecodeError as exc:
        raise SpecError(f"malformed JSON in {source}: {exc}") from None
    validate_spec(spec)
    return spec


def encode_spec(spec: Spec) -> bytes:
    return _encoder.encode(spec)


# runc's defaults (libcontainer/specconv.Example and runc's default mounts).
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
DEFAULT_MOUNTS = [
    Mount(destination="/proc", type="proc", source="proc", options=["nosuid", "noexec", "nodev"]),
    Mount(destination="/dev", type="tmpfs", source="tmpfs", options=["nosuid", "strictatime", "mode=755", "size=65536k"]),
    Mount(destination="/dev/pts", type="devpts", source="devpts",
          options=["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
    Mount(destination="/dev/shm", type="tmpfs", source="shm",
          options=["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
    Mount(destination="/dev/mqueue", type="mqueue", source="mqueue", options=["nosuid", "noexec", "nodev"]),
    Mount(destination="/sys", type="sysfs", source="sysfs", options=["nosuid", "noexec", "nodev", "ro"]),
]
DEFAULT_RLIMITS = [Rlimit(type="RLIMIT_NOFILE", hard=1024, soft=1024)]
# Deny every device, then allow the nodes fcrun makes in /dev (plan.DEVICES: made with mknod
# once the child may already be in its cgroup, hence "m") and the container's own ptys.
# runc allows the same plus "c *:* m" and "b *:* m" (mknod of any number, for images that
# carry device nodes). A web app makes no device nodes, so fcrun leaves those out: a container
# cannot even create a node for a host disk. Ptys need no "m": devpts makes them, and a pts
# node made elsewhere would not reach a pty.
DEFAULT_DEVICE_RULES = [
    DeviceRule(allow=False, access="rwm"),
    *(DeviceRule(allow=True, type="c", major=major, minor=minor, access="rwm")
      for major, minor in ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0))),  # null zero full random urandom tty
    DeviceRule(allow=True, type="c", major=5, minor=2, access="rw"),  # /dev/ptmx -> pts/ptmx
    DeviceRule(allow=True, type="c", major=136, access="rw"),  # /dev/pts/*
]
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
DEFAULT_NAMESPACES = ["pid", "network", "ipc", "uts", "mount", "cgroup"]
SUPPORTED_NAMESPACES = {"pid", "network", "ipc", "uts", "mount", "cgroup", "user"}
RLIMIT_NAMES = {
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS",
    "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME",
}
# Namespaces a spec may join by path (the child setns()es into them where it would make
# them). pid, mount and user are made in an order of fcrun's handshake that a joined one would
# break: the parent enters the pid namespace around fork, the rootfs is mounted in the new mount
# namespace, and the user namespace is the parent's, made with its id maps.
JOINABLE_NAMESPACES = ("network", "ipc", "uts", "cgroup")
# linux.sysctl keys a container may set, and the namespace each needs of its own (runc's list:
# only namespaced sysctls, so that a container cannot change the host's).
IPC_SYSCTLS = {"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
               "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced"}
UTS_SYSCTLS = {"kernel.hostname", "kernel.domainname"}
_SYSCTL_KEY = re.compile(r"^[a-z0-9_]+(\.[A-Za-z0-9_:@+-]+)+$")
# "cgroup" (and "cgroup2"): the container's own cgroups, read-only (plan.cgroup_mount).
SUPPORTED_MOUNT_TYPES = {"bind", "proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup", "cgroup2"}

NetworkMode = Literal["bridge", "none", "host"]


def default_spec(
    args: list[str],
    *,
    rootfs: str = "rootfs",
    env: list[str] | None = None,
    cwd: str = "/",
    uid: int = 0,
    gid: int = 0,
    hostname: str = "",
    network: NetworkMode = "bridge",
    cpu_quota_us: int | None = None,
    cpu_period_us: int = CPU_PERIOD_US,
    memory_bytes: int | None = None,
    pids_max: int | None = None,
    readonly_rootfs: bool = False,
) -> Spec:
    """The spec `fcrun run` starts from: runc's defaults plus the given options."""
    from ..seccomp import DEFAULT_PROFILE  # here: fcrun.seccomp builds on this module's structs

    caps = list(DEFAULT_CAPABILITIES)
    # A non-root user keeps the bounding set but no effective capabilities, like Docker.
    live_caps = caps if uid == 0 else []
    namespaces = [Namespace(type=t) for t in DEFAULT_NAMESPACES if not (t == "network" and network == "host")]
    resources = Resources(
        memory=MemoryResources(limit=memory_bytes) if memory_bytes else None,
        cpu=CpuResources(quota=cpu_quota_us, period=cpu_period_us) if cpu_quota_us else None,
        pids=PidsResources(limit=pids_max) if pids_max else None,
        devices=[msgspec.structs.replace(r) for r in DEFAULT_DEVICE_RULES],
    )
    return Spec(
        process=Process(
            args=list(args),
            env=list(env if env is not None else DEFAULT_ENV),
            cwd=cwd,
            user=User(uid=uid, gid=gid),
            capabilities=Capabilities(
                bounding=caps, effective=live_caps, permitted=live_caps, inheritable=[], ambient=[]
            ),
            rlimits=[msgspec.structs.replace(r) for r in DEFAULT_RLIMITS],
            no_new_privileges=True,
        ),
        root=Root(path=rootfs, readonly=readonly_rootfs),
        hostname=hostname,
        mounts=[msgspec.structs.replace(m, options=list(m.options)) for m in DEFAULT_MOUNTS],
        linux=Linux(
            namespaces=namespaces,
            resources=resources,
            seccomp=DEFAULT_PROFILE,  # shared by every default spec, compiled once (read-only)
            masked_paths=list(MASKED_PATHS),
            readonly_paths=list(READONLY_PATHS),
        ),
        annotations={"org.fcrun.network": network},
    )


def network_mode(spec: Spec) -> NetworkMode:
    """bridge/none from the annotation when the spec has a network namespace of its own, none
    when it joins one by path (whoever made it set it up), else host."""
    if not any(ns.type == "network" for ns in spec.linux.namespaces):
        return "host"
    if any(ns.type == "network" and ns.path for ns in spec.linux.namespaces):
        return "none"
    mode = spec.annotations.get("org.fcrun.network", "none")
    return "bridge" if mode == "bridge" else "none"


# Why each NotSupported field is refused: the spec's fields that fcrun does not (yet) honour.
_WHY = {
    "username": "a Windows field",
    "commandLine": "a Windows field",
    "uidMappings": "idmapped bind mounts are not supported by fcrun",
    "gidMappings": "idmapped bind mounts are not supported by fcrun",
    "timeOffsets": "time namespaces are not supported by fcrun",
    "intelRdt": "Intel RDT (resctrl) is not supported by fcrun",
    "netDevices": "moving network devices into the container is not supported by fcrun",
    "cpus": "the cpuset controller is not joined by fcrun's cgroup layer: not supported",
    "mems": "the cpuset controller is not joined by fcrun's cgroup layer: not supported",
    "blockIO": "the blkio controller is not joined by fcrun's cgroup layer: not supported",
    "hugepageLimits": "the hugetlb controller is not joined by fcrun's cgroup layer: not supported",
    "network": "the net_cls/net_prio controllers are not joined by fcrun's cgroup layer: not supported",
    "rdma": "the rdma controller is not joined by fcrun's cgroup layer: not supported",
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
        if not low.isdigit() or (high and not high.isdigit()):
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
        if not _SYSCTL_KEY.match(key) or "/" in key:
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
    for required in ("pid", "mount"):
        if required not in seen:
            raise SpecError(f"fcrun requires a new {required} namespace", "$.linux.namespaces")
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
        if res.devices:
            from ..cgroups.devices import check_rule  # the cgroup layer's rules, with the JSON path

            for i, d in enumerate(res.devices):
                check_rule(d.type, d.major, d.minor, d.access, f"$.linux.resources.devices[{i}]")
