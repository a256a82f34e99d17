"""linux.resources beyond the cgroup layer's Limits (cpu, memory, pids, devices), as the cgroup
files runc writes for them: `cgroup_settings` gives (controller key of Cgroup.paths, file,
value, JSON path) rows, written after the Limits at create and by Runtime.update_resources.

v1 and v2 differ in names and units (runc's conversions: cpu shares -> cpu.weight, blkio weight
-> io.weight, memory+swap -> swap alone). A field this host's cgroup version has no file for is
refused by name, never dropped: runc ignores linux.resources.network on cgroup v2 (v2 has no
net_cls/net_prio), fcrun refuses it there, as it refuses every field it would not honour.
The controllers a setting needs beyond the driver's own (v1 cpuset, blkio, hugetlb, net_cls,
net_prio; v2 cpuset, io, hugetlb) are joined for that container only (`extra_controllers`).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import msgspec

from ..errors import KernelError, MissingFeature, SpecError

if TYPE_CHECKING:
    from ..cgroups import Cgroup, CgroupDriver
    from .spec import Resources
    from .state import ContainerState

NOT_SET = msgspec.UNSET

Setting = tuple[str, str, str, str]  # (controller key of Cgroup.paths, file, value, JSON path)
AT = "$.linux.resources"

# blockIO's throttle lists: (BlockIO field, JSON name, v1 file, v2 io.max key).
THROTTLES = (
    ("throttle_read_bps_device", "throttleReadBpsDevice", "blkio.throttle.read_bps_device", "rbps"),
    ("throttle_write_bps_device", "throttleWriteBpsDevice", "blkio.throttle.write_bps_device", "wbps"),
    ("throttle_read_iops_device", "throttleReadIOPSDevice", "blkio.throttle.read_iops_device", "riops"),
    ("throttle_write_iops_device", "throttleWriteIOPSDevice", "blkio.throttle.write_iops_device", "wiops"),
)


def _refuse_on_v2(field: str) -> None:
    raise SpecError(f"linux.resources.{field} has no cgroup v2 file: not supported on this host", f"{AT}.{field}")


def blkio_to_io_weight(weight: int) -> int:
    """runc's conversion of a blkio weight (10..1000) to an io.weight (1..10000)."""
    return 1 + (weight - 10) * 9999 // 990


def cgroup_settings(res: "Resources | None", version: int) -> list[Setting]:
    """The rows for ``res`` on a host of cgroup ``version``, in the order to write them.

    Raises:
        SpecError: a field this cgroup version has no file for, naming it.
    """
    out: list[Setting] = []
    if res is None:
        return out
    v1 = version == 1
    _cpu(res, v1, out)
    for key, value in sorted(res.unified.items()):
        where = f"{AT}.unified[{key!r}]"
        if v1:
            raise SpecError("linux.resources.unified needs cgroup v2: not supported on this host", where)
        if "/" in key or "." not in key or key.startswith(("cgroup.", ".")):
            raise SpecError(f"{key!r} is not a controller's file of the container's cgroup", where)
        out.append(("unified", key, value, where))
    _memory(res, v1, out)
    _block_io(res, v1, out)
    for i, hp in enumerate(res.hugepage_limits):
        where = f"{AT}.hugepageLimits[{i}]"
        out.append(("hugetlb", f"hugetlb.{hp.page_size}.limit_in_bytes", str(hp.limit), where) if v1
                   else ("unified", f"hugetlb.{hp.page_size}.max", str(hp.limit), where))
    net = res.network
    if net is not None and (net.class_id is not None or net.priorities):
        if not v1:
            _refuse_on_v2("network")  # no net_cls/net_prio in v2 (runc ignores it there)
        if net.class_id is not None:
            out.append(("net_cls", "net_cls.classid", str(net.class_id), f"{AT}.network.classID"))
        for i, prio in enumerate(net.priorities):
            out.append(("net_prio", "net_prio.ifpriomap", f"{prio.name} {prio.priority}",
                        f"{AT}.network.priorities[{i}]"))
    return out


def _cpu(res: "Resources", v1: bool, out: list[Setting]) -> None:
    cpu = res.cpu
    if cpu is None:
        return
    # cpus before mems, and both before anything else: v1 needs them before a process joins.
    for field, value in (("cpus", cpu.cpus), ("mems", cpu.mems)):
        if value:
            out.append(("cpuset" if v1 else "unified", f"cpuset.{field}", value, f"{AT}.cpu.{field}"))
    if cpu.shares is not None:
        if v1:
            out.append(("cpu", "cpu.shares", str(cpu.shares), f"{AT}.cpu.shares"))
        else:  # runc's conversion of shares (2..262144) to a weight (1..10000)
            out.append(("unified", "cpu.weight", str(1 + ((cpu.shares - 2) * 9999) // 262142), f"{AT}.cpu.shares"))
    if cpu.burst is not None:
        out.append(("cpu", "cpu.cfs_burst_us", str(cpu.burst), f"{AT}.cpu.burst") if v1
                   else ("unified", "cpu.max.burst", str(cpu.burst), f"{AT}.cpu.burst"))
    if cpu.idle is not None:
        if v1:
            raise SpecError("linux.resources.cpu.idle needs cgroup v2: not supported on this host", f"{AT}.cpu.idle")
        out.append(("unified", "cpu.idle", str(cpu.idle), f"{AT}.cpu.idle"))
    # The period first: the kernel checks the runtime against it.
    for field, file, wire in (("realtime_period", "cpu.rt_period_us", "realtimePeriod"),
                              ("realtime_runtime", "cpu.rt_runtime_us", "realtimeRuntime")):
        value = getattr(cpu, field)
        if value is not None:
            if not v1:
                _refuse_on_v2(f"cpu.{wire}")
            out.append(("cpu", file, str(value), f"{AT}.cpu.{wire}"))


def _memory(res: "Resources", v1: bool, out: list[Setting]) -> None:
    mem = res.memory
    if mem is None:
        return
    if mem.reservation is not None:
        out.append(("memory", "memory.soft_limit_in_bytes", str(mem.reservation), f"{AT}.memory.reservation") if v1
                   else ("unified", "memory.low", "max" if mem.reservation == -1 else str(mem.reservation),
                         f"{AT}.memory.reservation"))
    if mem.swap is not None:
        if v1:  # memory + swap, as the spec has it; after the memory limit (the kernel wants memsw >= it)
            out.append(("memory", "memory.memsw.limit_in_bytes", str(mem.swap), f"{AT}.memory.swap"))
        else:  # v2 limits swap alone
            swap = "max" if mem.swap == -1 else str(mem.swap - (mem.limit or 0))
            out.append(("unified", "memory.swap.max", swap, f"{AT}.memory.swap"))
    for field, file, wire, value in (
            ("kernel_tcp", "memory.kmem.tcp.limit_in_bytes", "kernelTCP", mem.kernel_tcp),
            ("swappiness", "memory.swappiness", "swappiness", mem.swappiness),
            ("disable_oom_killer", "memory.oom_control", "disableOOMKiller", "1" if mem.disable_oom_killer else None)):
        if value is not None:
            if not v1:
                _refuse_on_v2(f"memory.{wire}")
            out.append(("memory", file, str(value), f"{AT}.memory.{wire}"))


def _block_io(res: "Resources", v1: bool, out: list[Setting]) -> None:
    bio = res.block_io
    if bio is None:
        return
    at = f"{AT}.blockIO"
    # v2: io.bfq.weight takes v1's range; write_setting falls back to io.weight (converted)
    # where the disk's scheduler is not BFQ, as runc does.
    if bio.weight is not None:
        out.append(("blkio", "blkio.weight", str(bio.weight), f"{at}.weight") if v1
                   else ("unified", "io.bfq.weight", str(bio.weight), f"{at}.weight"))
    if bio.leaf_weight is not None:
        if not v1:
            _refuse_on_v2("blockIO.leafWeight")
        out.append(("blkio", "blkio.leaf_weight", str(bio.leaf_weight), f"{at}.leafWeight"))
    for i, wd in enumerate(bio.weight_device):
        where = f"{at}.weightDevice[{i}]"
        dev = f"{wd.major}:{wd.minor}"
        if wd.weight is not None:
            out.append(("blkio", "blkio.weight_device", f"{dev} {wd.weight}", f"{where}.weight") if v1
                       else ("unified", "io.bfq.weight", f"{dev} {wd.weight}", f"{where}.weight"))
        if wd.leaf_weight is not None:
            if not v1:
                _refuse_on_v2(f"blockIO.weightDevice[{i}].leafWeight")
            out.append(("blkio", "blkio.leaf_weight_device", f"{dev} {wd.leaf_weight}", f"{where}.leafWeight"))
    for field, wire, v1_file, v2_key in THROTTLES:
        for i, td in enumerate(getattr(bio, field)):
            where = f"{at}.{wire}[{i}]"
            dev = f"{td.major}:{td.minor}"
            # 0 lifts the limit: v1 takes "0", v2 wants "max" (as runc writes it).
            out.append(("blkio", v1_file, f"{dev} {td.rate}", where) if v1
                       else ("unified", "io.max", f"{dev} {v2_key}={td.rate or 'max'}", where))


def write_setting(cgroup_dir: str, file: str, value: str, where: str) -> None:
    """Write one row of cgroup_settings into the group's dir ``cgroup_dir``; a v2 blkio weight
    goes to io.weight, converted, where there is no io.bfq.weight (runc's choice).

    Raises:
        SpecError: the kernel has no such file, naming the field. KernelError: it refused.
    """
    from .creation import write_cgroup_setting

    if file == "io.bfq.weight" and not os.path.exists(os.path.join(cgroup_dir, file)):
        *dev, weight = value.split()
        file, value = "io.weight", " ".join([*dev, str(blkio_to_io_weight(int(weight)))])
    try:
        write_cgroup_setting(os.path.join(cgroup_dir, file), value, where)
    except KernelError as exc:
        if exc.errno not in (errno.EINVAL, errno.ERANGE, errno.EOVERFLOW, errno.ENODEV):
            raise
        # A value this host cannot take (a NUMA node it lacks, a device it has not): the field's.
        raise SpecError(f"{where[2:]}: this host's kernel refused {value!r} for {file} ({exc.strerror})",
                        where) from None


def extra_controllers(settings: list[Setting], version: int) -> tuple[str, ...]:
    """The controllers these settings need: v1 the hierarchies (keys) they write in, v2 the
    controllers their files belong to ("io" for io.max)."""
    if version == 1:
        names = [key for key, _, _, _ in settings]
    else:
        names = [file.split(".", 1)[0] for _, file, _, _ in settings]
    return tuple(dict.fromkeys(names))


def check_host(settings: list[Setting], driver: "CgroupDriver") -> tuple[str, ...]:
    """The extra controllers the settings need, checked against the host (before anything is
    made); raises SpecError naming the first field whose controller this host lacks."""
    extra = extra_controllers(settings, driver.version)
    try:
        driver.check_extra(extra)
    except MissingFeature:
        for name in extra:
            try:
                driver.check_extra((name,))
            except MissingFeature as exc:
                where = next(s[3] for s in settings if name in (s[0], s[1].split(".", 1)[0]))
                raise SpecError(f"{where[2:]} needs {exc.obj}, which this host lacks ({exc.strerror})", where) from None
        raise
    return extra


def check_files(settings: list[Setting], driver: "CgroupDriver", paths: dict[str, str]) -> None:
    """cgroup v1: raise SpecError, naming the field, for a file the kernel does not have (no
    blkio.weight without CFQ/BFQ, no cpu.rt_* without RT group scheduling), before anything is
    made or written. A v1 group has the files of its hierarchy's root, so a hierarchy the group
    has not joined yet is checked at its root. (v2's root lacks most files: there the write
    names the field, as at create.)"""
    roots = {k: h.mountpoint for h in driver.hierarchies for k in h.keys}
    for key, file, _, where in settings:
        d = paths.get(key) or roots.get(key)
        if d and not driver.io.exists(os.path.join(d, file)):
            raise SpecError(f"this host's kernel has no {file}: not supported here", where)


# --- a live update (Runtime.update_resources, fcrun-oci update) ---------------------------------

_LIMIT_WHERES = {"cpu_quota_us": ("cpu", ("quota", "period")), "memory_bytes": ("memory", ("limit",)),
                 "pids_max": ("pids", ("limit",))}


def _set_fields(part: msgspec.Struct) -> dict[str, object]:
    """The fields of a resources part that an update sets (not absent, not empty)."""
    return {f: getattr(part, f) for f in part.__struct_fields__ if getattr(part, f) not in (None, "", [], {}, NOT_SET)}


def merge_resources(old: "Resources | None", new: "Resources") -> "Resources":
    """runc update's rule: what ``new`` sets replaces the container's value; the rest stays.
    hugepageLimits merge by page size, unified by file."""
    from .spec import Resources

    merged = msgspec.structs.replace(old) if old is not None else Resources()
    for field in ("memory", "cpu", "block_io", "network"):
        part = getattr(new, field)
        if part is not None:
            base = getattr(merged, field)
            setattr(merged, field, part if base is None else msgspec.structs.replace(base, **_set_fields(part)))
    if new.pids is not None:
        merged.pids = new.pids
    if new.hugepage_limits:
        sizes = {h.page_size: h for h in merged.hugepage_limits}
        sizes.update({h.page_size: h for h in new.hugepage_limits})
        merged.hugepage_limits = list(sizes.values())
    if new.unified:
        merged.unified = {**merged.unified, **new.unified}
    return merged


def update_resources(driver: "CgroupDriver", cgroup: "Cgroup", state: "ContainerState", new: "Resources") -> None:
    """Write what ``new`` changes to the live container's cgroup and into ``state`` (the caller
    saves it): the Limits fields through Cgroup.update, the rest as cgroup_settings' rows; a
    controller the container was created without is joined first (placement.add_controllers).

    v1 memory + swap: a new memory limit is written with memsw = memory (the cgroup layer's
    rule), so the container's swap setting is written again after it, not dropped.

    Raises:
        SpecError: a bad value, devices (a live change of device rules is not supported), a
            field this host cannot set; naming its JSON path. Nothing is written for these.
        MissingFeature, KernelError: the kernel refused; what was written before stays.
    """
    from ..cgroups.placement import add_controllers
    from .plan import limits_from_spec
    from .spec_checks import validate_spec

    if new.devices:
        raise SpecError("device rules cannot be changed on a live container", f"{AT}.devices")
    spec = msgspec.structs.replace(state.spec, linux=msgspec.structs.replace(
        state.spec.linux, resources=merge_resources(state.spec.linux.resources, new)))
    validate_spec(spec)
    version = driver.version
    wheres = {where for _, _, _, where in cgroup_settings(new, version)}
    fields = []
    for field, (part, names) in _LIMIT_WHERES.items():
        given = getattr(new, part)
        if given is not None and any(getattr(given, n, None) is not None for n in names):
            fields += ["cpu_quota_us", "cpu_period_us"] if part == "cpu" else [field]
    merged = spec.linux.resources
    if "memory_bytes" in fields and merged.memory.swap is not None:
        wheres.add(f"{AT}.memory.swap")
    # hugepageLimits merge by page size, so their index in the merged list can differ: by file.
    files = {file for _, file, _, _ in cgroup_settings(new, version) if file.startswith("hugetlb.")}
    rows = [row for row in cgroup_settings(merged, version) if row[3] in wheres or row[1] in files]
    extra = check_host(rows, driver)
    if version == 1:
        check_files(rows, driver, cgroup.paths)
    add_controllers(driver, cgroup, [c for c in extra if version == 2 or c not in cgroup.paths],
                    name=state.name, at=spec.linux.cgroups_path or None)
    # Recorded at once: if a write below fails, delete still finds (and removes) what was joined.
    state.cgroup_paths = dict(cgroup.paths)
    state.cgroup_created = None if cgroup.created is None else list(cgroup.created)
    if fields:
        cgroup.update(limits_from_spec(spec), fields, read_back=False)
    for key, file, value, where in rows:
        write_setting(cgroup.paths[key], file, value, where)
    state.spec = spec


# In the state dir, for a group at a linux.cgroupsPath: where it is, written before it is made, so
# that `rm -f`/gc find it after a creation that died before its first state save (that leaves
# only the name; a default group is found by the name alone).
PLACED_FILE = "cgroup-placed.json"


def note_placed(state_dir: str, paths: dict[str, str]) -> None:
    """Record the group's paths (not fsynced: cgroups do not outlive a reboot either)."""
    fd = os.open(os.path.join(state_dir, PLACED_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, msgspec.json.encode(paths))
    finally:
        os.close(fd)


def leftover_cgroup(driver: "CgroupDriver", name: str, state_dir: str) -> "Cgroup":
    """The cgroup a creation that died before saving its state may have left: the one
    note_placed recorded, else the default one of that name. destroy() removes the group (empty
    by then; runc would remove a joined engine's group too) but not the levels above it."""
    try:
        with open(os.path.join(state_dir, PLACED_FILE), "rb") as f:
            paths = msgspec.json.decode(f.read(), type=dict[str, str])
    except FileNotFoundError:
        return driver.load(driver.paths_for(name))
    except (OSError, msgspec.DecodeError) as exc:
        raise SpecError(f"{PLACED_FILE} of container {name!r}: {exc}", "cgroup.paths") from None
    return driver.load(paths)
