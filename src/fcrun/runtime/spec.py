"""The OCI runtime spec (config.json, runtime-spec 1.2 on Linux), as msgspec Structs.

Field names follow the spec (camelCase on the wire, snake_case in Python). A spec read from a
bundle's config.json is decoded with `decode_spec`, which reports a bad field with its JSON
path (`at $.linux.resources.memory.limit`), and then checked by `validate_spec` (in
spec_checks.py, re-exported here) for what the type system cannot say (absolute paths, known
namespaces, fcrun's limits).

Every field of the spec is declared here, strictly: a field the spec does not have is refused
("unknown field", with its path), and a field fcrun does not honour is declared as
`NotSupported` and refused by `validate_spec` when it is set (spec_checks._WHY says why), never dropped
in silence: a runtime that ignored `linux.intelRdt` or `process.apparmorProfile` would run the
container with less isolation than its engine asked for. Only `annotations` is free-form.

`default_spec` builds what `fcrun run` and the library start from: runc's defaults (mounts,
masked and read-only paths, rlimits, capabilities), adjusted by options.
"""

# No `from __future__ import annotations` here: a msgspec Decoder built at import reads these
# Structs' annotations, and string ones are each compiled (~300 compiles across the runtime's
# modules: ~4-6 ms of a `fcrun run` without a fork-server).

import functools
import re
from typing import Any, Literal

import msgspec

from .capabilities import DEFAULT_CAPABILITIES
from ..errors import SpecError
from ..units import CPU_PERIOD_US
# The checks live in spec_checks.py; their public names are this module's too.
from .spec_checks import (  # noqa: F401 (re-exported)
    DEVICE_TYPES, IOPRIO_CLASSES, IPC_SYSCTLS, JOINABLE_NAMESPACES, MAX_NUMA_NODES, MEMORY_POLICY_FLAGS,
    MEMORY_POLICY_MODES, NOT_SET, PERSONALITY_DOMAINS, RLIMIT_NAMES, SCHED_FLAGS, SCHED_POLICIES,
    SUPPORTED_MOUNT_TYPES, SUPPORTED_NAMESPACES, UTS_SYSCTLS, NotSupported, limited, parse_id_list,
    refuse_not_supported, validate_spec,
)

OCI_VERSION = "1.0.2"


class _Base(msgspec.Struct, rename="camel", omit_defaults=True, forbid_unknown_fields=True, kw_only=True):
    pass


# NotSupported (from spec_checks): a field of the spec that fcrun declares (so that it is not an
# "unknown field") but does not honour: any value other than absent or null is refused by
# validate_spec, naming it.


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
    cpus: str = ""  # cpuset.cpus ("0-3,7"); the container then joins the cpuset controller
    mems: str = ""  # cpuset.mems (NUMA nodes)
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


class WeightDevice(_Base, kw_only=True):
    """linux.resources.blockIO.weightDevice[]: a per-device weight (v1 blkio, v2 io.weight)."""

    major: int
    minor: int
    weight: int | None = None
    leaf_weight: int | None = None


class ThrottleDevice(_Base, kw_only=True):
    """linux.resources.blockIO.throttle*Device[]: a per-device rate (bytes or ios per second)."""

    major: int
    minor: int
    rate: int


class BlockIO(_Base, kw_only=True):
    """linux.resources.blockIO (v1 blkio, v2 io)."""

    weight: int | None = None
    leaf_weight: int | None = None
    weight_device: list[WeightDevice] = []
    throttle_read_bps_device: list[ThrottleDevice] = []
    throttle_write_bps_device: list[ThrottleDevice] = []
    throttle_read_iops_device: list[ThrottleDevice] = msgspec.field(default_factory=list, name="throttleReadIOPSDevice")
    throttle_write_iops_device: list[ThrottleDevice] = msgspec.field(default_factory=list, name="throttleWriteIOPSDevice")


class HugepageLimit(_Base, kw_only=True):
    """linux.resources.hugepageLimits[]: bytes of huge pages of one size ("2MB", "1GB")."""

    page_size: str
    limit: int


class InterfacePriority(_Base, kw_only=True):
    name: str
    priority: int


class Network(_Base, kw_only=True):
    """linux.resources.network (v1 net_cls and net_prio only)."""

    class_id: int | None = msgspec.field(default=None, name="classID")
    priorities: list[InterfacePriority] = []


class Resources(_Base, kw_only=True):
    memory: MemoryResources | None = None
    cpu: CpuResources | None = None
    pids: PidsResources | None = None
    devices: list[DeviceRule] = []
    block_io: BlockIO | None = msgspec.field(default=None, name="blockIO")
    hugepage_limits: list[HugepageLimit] = []
    network: Network | None = None
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


_encoder = msgspec.json.Encoder()


@functools.cache
def _spec_decoder() -> msgspec.json.Decoder:
    """Made at the first decode, not at import: msgspec compiles the whole spec's types (~1.2 ms),
    which a command that builds its spec in Python (`fcrun run`, serve's instances) never needs."""
    return msgspec.json.Decoder(Spec)


# msgspec's words for an unknown field; no " - at" part when it is at the top level. Patterns,
# not compiled ones: only an error compiles them (re caches them then).
_UNKNOWN_FIELD = r"^Object contains unknown field `(?P<field>[^`]*)`(?: - at `(?P<at>\$.*)`)?$"
_AT = r" - at `(?P<at>\$[^`]*)`$"


def decode_spec(data: bytes, source: str = "config.json") -> Spec:
    """Decode and validate a config.json. Raises SpecError naming the file and JSON path:
    a wrong type, a field the runtime-spec does not have, or one fcrun does not honour."""
    spec = _decode(_spec_decoder(), data, source)
    validate_spec(spec)
    return spec


_resources_decoder = msgspec.json.Decoder(Resources)


def decode_resources(data: bytes, source: str) -> Resources:
    """Decode a LinuxResources document (`fcrun-oci update --resources`), strictly; the paths
    in its errors start at the document ($.memory.limit). Checked by the update itself."""
    return _decode(_resources_decoder, data, source)


def _decode(decoder: msgspec.json.Decoder, data: bytes, source: str) -> Any:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        unknown = re.match(_UNKNOWN_FIELD, text)
        if unknown:
            where = f"{unknown['at'] or '$'}.{unknown['field']}"
            raise SpecError(f"invalid OCI spec in {source}: unknown field {unknown['field']!r} "
                            "(not in the OCI runtime spec)", where) from None
        at = re.search(_AT, text)
        if at:
            raise SpecError(f"invalid OCI spec in {source}: {text[:at.start()]}", at["at"]) from None
        raise SpecError(f"invalid OCI spec in {source}: {text}") from None
    except msgspec.DecodeError as exc:
        raise SpecError(f"malformed JSON in {source}: {exc}") from None


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
# runc's own device rules (libcontainer/specconv.AllowedDevices; what runc 1.1.5 writes), which
# runc adds after a bundle's linux.resources.devices whatever they say: engines count on them
# (podman and `runc spec` give a lone deny-all) for the default /dev nodes, the ptys, tun, and
# mknod of any node. fcrun-oci adds them as runc does (with_runc_device_rules); fcrun's own
# spec keeps its narrower list above.
RUNC_ALLOWED_DEVICE_RULES = [
    DeviceRule(allow=True, type="c", access="m"), DeviceRule(allow=True, type="b", access="m"),
    *(DeviceRule(allow=True, type="c", major=major, minor=minor, access="rwm")
      for major, minor in ((1, 3), (1, 8), (1, 7), (5, 0), (1, 5), (1, 9))),  # null random full tty zero urandom
    DeviceRule(allow=True, type="c", major=136, access="rwm"),  # /dev/pts/*
    DeviceRule(allow=True, type="c", major=5, minor=2, access="rwm"),  # /dev/ptmx
    DeviceRule(allow=True, type="c", major=10, minor=200, access="rwm"),  # /dev/net/tun
]


def with_runc_device_rules(spec: "Spec") -> "Spec":
    """`spec` with runc's rules after its linux.resources.devices, as runc applies a bundle.
    A spec with no device rules is left as it is: its cgroup allows every device anyway."""
    res = spec.linux.resources
    if res is None or not res.devices:
        return spec
    devices = [*res.devices, *(msgspec.structs.replace(r) for r in RUNC_ALLOWED_DEVICE_RULES)]
    linux = msgspec.structs.replace(spec.linux, resources=msgspec.structs.replace(res, devices=devices))
    return msgspec.structs.replace(spec, linux=linux)


DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
DEFAULT_NAMESPACES = ["pid", "network", "ipc", "uts", "mount", "cgroup"]
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
