"""cgroups for fcrun containers: ``detect()`` picks the v1 or v2 driver once, from mountinfo.

    driver = detect(parent="fcrun")            # beneath the cgroup fcrun runs in
    cg = driver.create("web-1", Limits(cpu_quota_us=30_000, memory_bytes=256 << 20))
    # the container's child writes b"0" to each of cg.join_files() (v1: `tasks`), or the
    # parent calls cg.add(pid) (v2): either before the container's process execs
    cg.freeze(); cg.thaw(); cg.stats()
    cg.destroy()                               # kills, removes the dirs, then the empty parent

Rules kept throughout: fcrun creates its groups beneath the cgroup it runs in (per hierarchy,
from /proc/self/cgroup) or, for an absolute parent, beneath the hierarchy root; it never
writes to a cgroup it did not create (its own, the root), never moves a process out of its
cgroup, and never mounts or unmounts a hierarchy. One exception, on a pure v2 host only: in a
cgroup systemd delegated to it (`Delegate=yes`), `fcrun serve` moves itself into a
``supervisor`` leaf of that cgroup and enables controllers in the cgroup's subtree_control,
as a delegatee is meant to (delegation.py, `enter_supervisor`).
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Callable, Iterable

from ..errors import MissingFeature, SpecError
from ..lazy import lazy_exports
from . import delegation
from .base import Cgroup, CgroupDriver, Hierarchy, check_name
from .kernel import KernelIO
from .limits import Limits, Stats
from ..mountinfo import PROC_SELF_MOUNTINFO, Mount, mount_at, parse_mountinfo
from .membership import ProcCgroup, parse_proc_cgroup

# A host runs one driver: detect() imports the one it makes (the other, with what only it
# needs, such as v2's device programs, is ~0.5 ms of a one-shot command's start-up).
__getattr__, __dir__ = lazy_exports(__name__, globals(), {"V1Cgroup": "v1", "V1Driver": "v1",
                                                          "V2Cgroup": "v2", "V2Driver": "v2"})

__all__ = [
    "Cgroup",
    "CgroupDriver",
    "KernelIO",
    "Limits",
    "Stats",
    "V1Cgroup",
    "V1Driver",
    "V2Cgroup",
    "V2Driver",
    "detect",
    "enter_supervisor",
]

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"


def detect(
    parent: str = "fcrun",
    *,
    version: int | None = None,
    controllers: Iterable[str] | None = None,
    root: str = CGROUP_ROOT,
    mountinfo: str = PROC_SELF_MOUNTINFO,
    proc_cgroup: str = PROC_CGROUP,
    io: KernelIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> CgroupDriver:
    """Choose the driver for this host: v2 when ``root`` itself is a cgroup2 mount, else v1.

    ``parent`` relative ("fcrun", "a/b"): created beneath the cgroup fcrun runs in, per
    hierarchy. Absolute ("/fcrun"): beneath the hierarchy root. ``version`` forces one (2 on a
    hybrid host uses its controller-less cgroup2 mount, usually with ``controllers=()``).
    ``controllers`` defaults to cpu, cpuacct, memory, pids, freezer, devices (v1) or cpu, memory, pids
    (v2). ``root``, ``mountinfo``, ``proc_cgroup`` and ``io`` are for tests. Reads only.

    Raises:
        SpecError: a bad parent, version or controller name.
        MissingFeature: no cgroup filesystem, a needed hierarchy is not mounted, fcrun's own
            cgroup is not visible under its mount, or (v2) our controllers are not delegated.
    """
    parts, absolute = _parse_parent(parent)
    io = io or KernelIO()
    mounts = parse_mountinfo(io.read(mountinfo))
    own = parse_proc_cgroup(io.read(proc_cgroup))
    root = posixpath.normpath(root)
    top = mount_at(mounts, root)
    unified = top is not None and top.fstype == "cgroup2"
    if version is None:
        version = 2 if unified else 1
    if version == 2:
        mount = top if unified else _cgroup2_mount(mounts, root)
        own_path = next((e.path for e in own if e.hierarchy_id == 0 and not e.controllers), None)
        if own_path is None:
            raise MissingFeature("a cgroup v2 entry (0::/...) in " + proc_cgroup)
        own_dir = _own_dir(mount, own_path)
        from . import v2

        # In a supervisor leaf of a cgroup systemd delegated (delegation.py), fcrun's groups go
        # beside it, beneath the delegated cgroup.
        delegated = None if absolute or not own_dir else delegation.delegated_base(own_dir, io)
        base = delegated or _dir_in_mount(mount, "/" if absolute else own_path)
        hierarchy = Hierarchy(keys=(v2.KEY,), mountpoint=mount.mountpoint, base_dir=base, parent_parts=parts,
                              own_dir=own_dir, delegated=delegated is not None)
        wanted = v2.CONTROLLERS if controllers is None else tuple(controllers)
        _check_controller_names(wanted, v2.CONTROLLERS)
        driver = v2.V2Driver(hierarchy, controllers=wanted, io=io, clock=clock, sleep=sleep)
        driver.check_delegation()
        return driver
    if version == 1:
        if unified:
            raise MissingFeature(f"cgroup v1 hierarchies (this host runs cgroup v2 only at {root})")
        from . import v1

        wanted = v1.CONTROLLERS if controllers is None else tuple(controllers)
        _check_controller_names(wanted, v1.CONTROLLERS)
        hierarchies = _v1_hierarchies(mounts, own, root, wanted, parts, absolute)
        extra = tuple(c for c in v1.EXTRA_CONTROLLERS if c not in wanted)
        hierarchies += _v1_hierarchies(mounts, own, root, extra, parts, absolute, optional=True)
        return v1.V1Driver(hierarchies, io=io, clock=clock, sleep=sleep)
    raise SpecError(f"cgroup version must be 1 or 2, not {version!r}", "version")


def _parse_parent(parent: str) -> tuple[tuple[str, ...], bool]:
    if not isinstance(parent, str):
        raise SpecError(f"cgroup parent must be a string, not {parent!r}", "cgroup_parent")
    absolute = parent.startswith("/")
    parts = tuple(p for p in parent.split("/") if p)
    if not parts:
        raise SpecError(f"cgroup parent {parent!r} must name a cgroup (e.g. fcrun or /fcrun)", "cgroup_parent")
    for part in parts:
        check_name(part, "cgroup_parent")
    return parts, absolute


def _check_controller_names(wanted: tuple[str, ...], known: tuple[str, ...]) -> None:
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise SpecError(f"unknown cgroup controller(s) {unknown}; known: {list(known)}", "controllers")


def enter_supervisor(
    *,
    root: str = CGROUP_ROOT,
    mountinfo: str = PROC_SELF_MOUNTINFO,
    proc_cgroup: str = PROC_CGROUP,
    pid: int | None = None,
    io: KernelIO | None = None,
) -> str | None:
    """On a pure cgroup v2 host, move this process into a ``supervisor`` leaf of the cgroup it
    runs in, when systemd delegated that cgroup to it and nothing else runs there (`fcrun serve`
    under `Delegate=yes`; delegation.py says why). Call it before starting any child, and
    before `detect()`, which then builds fcrun's groups beside the leaf. Returns the leaf's
    dir, or None when nothing was to do (a hybrid or v1 host included).

    Raises:
        KernelError: the move failed.
    """
    io = io or KernelIO()
    mounts = parse_mountinfo(io.read(mountinfo))
    top = mount_at(mounts, posixpath.normpath(root))
    if top is None or top.fstype != "cgroup2":
        return None
    own_path = next((e.path for e in parse_proc_cgroup(io.read(proc_cgroup))
                     if e.hierarchy_id == 0 and not e.controllers), None)
    own_dir = _own_dir(top, own_path) if own_path else ""
    if not own_dir:
        return None
    return delegation.enter_supervisor(own_dir, os.getpid() if pid is None else pid, io)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _cgroup2_mount(mounts: list[Mount], root: str) -> Mount:
    """The cgroup2 mount of a hybrid host (usually <root>/unified); the last one wins."""
    candidates = [m for m in mounts if m.fstype == "cgroup2"]
    preferred = [m for m in candidates if _under(m.mountpoint, root)] or candidates
    if not preferred:
        raise MissingFeature("a cgroup2 mount", f"mount -t cgroup2 none {root}/unified")
    return preferred[-1]


def _dir_in_mount(mount: Mount, cgroup_path: str) -> str:
    """Where the cgroup ``cgroup_path`` (as /proc/self/cgroup names it) appears in ``mount``.

    Raises:
        MissingFeature: the mount shows a sub-tree that does not contain that cgroup.
    """
    # "/.." components appear when our cgroup lies outside our cgroup namespace.
    if ".." in cgroup_path.split("/") or not _under(cgroup_path, mount.root):
        raise MissingFeature(
            f"cgroup {cgroup_path} under the mount at {mount.mountpoint} (it shows only {mount.root})",
            "mount the whole hierarchy, or run fcrun inside the visible tree",
        )
    rel = posixpath.relpath(cgroup_path, mount.root)
    return posixpath.normpath(posixpath.join(mount.mountpoint, rel))


def _v1_hierarchies(
    mounts: list[Mount],
    own: list[ProcCgroup],
    root: str,
    wanted: tuple[str, ...],
    parts: tuple[str, ...],
    absolute: bool,
    optional: bool = False,
) -> list[Hierarchy]:
    """One Hierarchy per distinct v1 mount holding a wanted controller, keyed by controller.
    ``optional``: the extra hierarchies (Hierarchy.extra); one not mounted is left out."""
    found: dict[str, tuple[Mount, str]] = {}  # controller -> (mount, own cgroup path)
    for controller in wanted:
        candidates = [m for m in mounts if m.fstype == "cgroup" and controller in m.super_options]
        preferred = [m for m in candidates if _under(m.mountpoint, root)] or candidates
        entry = next((e for e in own if controller in e.controllers), None)
        if not preferred or entry is None:
            if optional:
                continue
            from . import v1

            raise v1.missing_hierarchy(controller)
        found[controller] = (preferred[-1], entry.path)
    by_mountpoint: dict[str, list[str]] = {}
    for controller, (mount, _) in found.items():
        by_mountpoint.setdefault(mount.mountpoint, []).append(controller)
    hierarchies = []
    for mountpoint, keys in by_mountpoint.items():
        mount, own_path = found[keys[0]]
        try:
            base = _dir_in_mount(mount, "/" if absolute else own_path)
        except MissingFeature:
            if optional:
                continue
            raise
        hierarchies.append(Hierarchy(keys=tuple(keys), mountpoint=mountpoint, base_dir=base, parent_parts=parts,
                                     own_dir=_own_dir(mount, own_path), extra=optional))
    return hierarchies


def _own_dir(mount: Mount, own_path: str) -> str:
    """The cgroup fcrun runs in under ``mount``; "" where the mount does not show it."""
    try:
        return _dir_in_mount(mount, own_path)
    except MissingFeature:
        return ""
