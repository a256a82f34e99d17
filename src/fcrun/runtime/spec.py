"""The OCI runtime spec (config.json), as msgspec Structs, for the subset fcrun supports.

Field names follow the spec (camelCase on the wire, snake_case in Python). A spec read from a
bundle's config.json is decoded with `decode_spec`, which reports a bad field with its JSON
path (`at $.linux.resources.memory.limit`), and then checked by `validate_spec` for what the
type system cannot say (absolute paths, known namespaces, fcrun's limits).

`default_spec` builds what `fcrun run` and the library start from: runc's defaults (mounts,
masked and read-only paths, rlimits, capabilities), adjusted by options.
"""

from __future__ import annotations

import os
from typing import Literal

import msgspec

from .capabilities import DEFAULT_CAPABILITIES, capability_mask
from ..errors import SpecError
from ..units import CPU_PERIOD_US, MIN_MEMORY_BYTES

OCI_VERSION = "1.0.2"


class _Base(msgspec.Struct, rename="camel", omit_defaults=True, forbid_unknown_fields=False, kw_only=True):
    pass


class User(_Base, kw_only=True):
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = []


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


class Process(_Base, kw_only=True):
    terminal: bool = False
    user: User = msgspec.field(default_factory=User)
    args: list[str]
    env: list[str] = []
    cwd: str = "/"
    capabilities: Capabilities | None = None
    rlimits: list[Rlimit] = []
    no_new_privileges: bool = False  # the OCI default; default_spec() turns it on


class Root(_Base, kw_only=True):
    path: str
    readonly: bool = False


class Mount(_Base, kw_only=True):
    destination: str
    type: str = "bind"
    source: str = ""
    options: list[str] = []


class Namespace(_Base, kw_only=True):
    type: str
    path: str = ""


class MemoryResources(_Base, kw_only=True):
    limit: int | None = None
    swap: int | None = None


class CpuResources(_Base, kw_only=True):
    quota: int | None = None
    period: int | None = None


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
    syscalls: list[SeccompSyscall] = []


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


class Spec(_Base, kw_only=True, omit_defaults=False):
    oci_version: str = OCI_VERSION
    process: Process
    root: Root
    hostname: str = ""
    mounts: list[Mount] = []
    linux: Linux = msgspec.field(default_factory=Linux)
    annotations: dict[str, str] = {}


_decoder = msgspec.json.Decoder(Spec)
_encoder = msgspec.json.Encoder()


def decode_spec(data: bytes, source: str = "config.json") -> Spec:
    """Decode and validate a config.json. Raises SpecError naming the file and JSON path."""
    try:
        spec = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise SpecError(f"invalid OCI spec in {source}: {exc}") from None
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
SUPPORTED_MOUNT_TYPES = {"bind", "proc", "tmpfs", "devpts", "mqueue", "sysfs"}

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
    """bridge/none from the annotation when the spec has a network namespace, else host."""
    if not any(ns.type == "network" for ns in spec.linux.namespaces):
        return "host"
    mode = spec.annotations.get("org.fcrun.network", "none")
    return "bridge" if mode == "bridge" else "none"


def validate_spec(spec: Spec) -> None:
    """Check what the types cannot: paths, names, ranges. Raises SpecError with the JSON path."""
    if not spec.process.args:
        raise SpecError("process.args is empty: nothing to run", "$.process.args")
    if not os.path.isabs(spec.process.cwd):
        raise SpecError(f"cwd {spec.process.cwd!r} must be an absolute path", "$.process.cwd")
    for i, item in enumerate(spec.process.env):
        if "=" not in item or item.startswith("="):
            raise SpecError(f"environment entry {item!r} is not KEY=VALUE", f"$.process.env[{i}]")
    if spec.process.user.uid < 0 or spec.process.user.gid < 0:
        raise SpecError("uid and gid must be >= 0", "$.process.user")
    if spec.process.capabilities:
        for field in ("bounding", "effective", "inheritable", "permitted", "ambient"):
            capability_mask(getattr(spec.process.capabilities, field), f"$.process.capabilities.{field}")
    for i, rl in enumerate(spec.process.rlimits):
        if rl.type not in RLIMIT_NAMES:
            raise SpecError(f"unknown rlimit {rl.type!r}", f"$.process.rlimits[{i}].type")
        if rl.soft > rl.hard:
            raise SpecError("soft limit exceeds hard limit", f"$.process.rlimits[{i}]")
    if len(spec.hostname) > 64 or any(c in spec.hostname for c in "/ \0"):
        raise SpecError(f"invalid hostname {spec.hostname!r}", "$.hostname")
    seen = set()
    for i, ns in enumerate(spec.linux.namespaces):
        if ns.type not in SUPPORTED_NAMESPACES:
            raise SpecError(f"namespace type {ns.type!r} is not supported by fcrun", f"$.linux.namespaces[{i}].type")
        if ns.path:
            raise SpecError("joining an existing namespace by path is not supported yet", f"$.linux.namespaces[{i}].path")
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
    if spec.linux.seccomp is not None:
        from ..seccomp import validate_profile

        validate_profile(spec.linux.seccomp, "$.linux.seccomp")
    if spec.hostname and "uts" not in seen:
        raise SpecError("hostname needs a uts namespace", "$.hostname")
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
        if res.memory and res.memory.limit is not None and res.memory.limit < MIN_MEMORY_BYTES:
            raise SpecError("memory limit below 4 MiB", "$.linux.resources.memory.limit")
        if res.cpu and res.cpu.quota is not None:
            period = res.cpu.period or CPU_PERIOD_US
            if not 1000 <= period <= 1_000_000:
                raise SpecError("cpu period must be 1000..1000000 us", "$.linux.resources.cpu.period")
            if res.cpu.quota < 1000:
                raise SpecError("cpu quota must be >= 1000 us", "$.linux.resources.cpu.quota")
        if res.pids and res.pids.limit < 1:
            raise SpecError("pids limit must be >= 1", "$.linux.resources.pids.limit")
        if res.devices:
            from ..cgroups.devices import check_rule  # the cgroup layer's rules, with the JSON path

            for i, d in enumerate(res.devices):
                check_rule(d.type, d.major, d.minor, d.access, f"$.linux.resources.devices[{i}]")
