"""Where a container's cgroup goes when its spec names one (linux.cgroupsPath), as runc places
it with the cgroupfs driver.

    ""                 fcrun's default: <own cgroup>/<parent>/<container name> (base.py)
    "/docker/abc"      absolute: <hierarchy root>/docker/abc, in each hierarchy (v1) or the
                       unified tree (v2), as the runtime spec says ("relative to the cgroups
                       mount point") and runc does; runtime-tools checks it at
                       /sys/fs/cgroup/<controller>/cgrouptest
    "testdir/c1"       relative: beneath the cgroup fcrun runs in (its own, per hierarchy, from
                       /proc/self/cgroup), as runc does (GetOwnCgroupPath)
    "system.slice:docker:abc"  systemd's form: refused, fcrun has no systemd cgroup driver

The levels above the leaf that do not exist are made (and removed on delete once empty, as
runc does not: it leaves them); an existing leaf is joined only if it is empty (no process,
no child group), as runc 1.2 refuses a non-empty one, and it is then not removed on delete
(runc removes it): fcrun removes only what it made. A path that is (or is above) the cgroup
fcrun runs in, or fcrun's own parent of default groups, is refused: destroying it would kill
processes that are not the container's.
"""

from __future__ import annotations

import errno
import posixpath
from collections.abc import Collection
from typing import TYPE_CHECKING

from ..errors import AlreadyExists, KernelError, MissingFeature, SpecError
from .base import CGROUP_PROCS, Hierarchy, check_name
from .kernel import parse_pids

if TYPE_CHECKING:
    from .base import Cgroup, CgroupDriver

WHERE = "$.linux.cgroupsPath"


def parse_cgroups_path(path: str) -> tuple[bool, tuple[str, ...]]:
    """"/a/b" -> (True, ("a", "b")); "a/b" -> (False, ("a", "b")).

    Raises:
        SpecError: systemd's "slice:prefix:name" form, no component, "." or "..", or a
            component that is not a plain cgroup name; naming $.linux.cgroupsPath.
    """
    if ":" in path:
        raise SpecError(f"cgroupsPath {path!r} is in systemd's slice:prefix:name form, which needs a systemd "
                        "cgroup driver: not supported by fcrun (give a path such as /docker/NAME)", WHERE)
    parts = tuple(p for p in path.split("/") if p)
    if not parts:
        raise SpecError(f"cgroupsPath {path!r} names no cgroup (the root cannot hold a container)", WHERE)
    for part in parts:
        if part in (".", ".."):
            raise SpecError(f"cgroupsPath {path!r} has a {part!r} component", WHERE)
        check_name(part, WHERE)
    return path.startswith("/"), parts


def leaf_and_levels(h: Hierarchy, path: str) -> tuple[str, list[str]]:
    """The group dir for ``path`` in hierarchy ``h`` and the dirs above it, top first, from the
    first component beneath the start (the root, or the cgroup fcrun runs in).

    Raises:
        SpecError: a bad path, or one that is fcrun's own cgroup, one above it, or fcrun's
            parent of default groups (or above it).
        MissingFeature: a relative path where the mount does not show fcrun's own cgroup.
    """
    absolute, parts = parse_cgroups_path(path)
    start = h.mountpoint if absolute else h.own_dir
    if not start:
        raise MissingFeature(f"fcrun's own cgroup under the mount at {h.mountpoint} (for a relative cgroupsPath)",
                             "give an absolute cgroupsPath")
    dirs = [posixpath.join(start, *parts[: i + 1]) for i in range(len(parts))]
    leaf = dirs[-1]
    for mine in (h.own_dir or h.base_dir, h.parent_dir):
        if posixpath.commonpath([leaf, mine]) == leaf:
            raise SpecError(f"cgroupsPath {path!r} is {leaf}, which holds fcrun's own cgroups ({mine}): "
                            "a container cannot have it", WHERE)
    return leaf, dirs[:-1]


def make_placed(driver: "CgroupDriver", placed: dict[Hierarchy, tuple[str, list[str]]], made: list[str],
                extra: Collection[str]) -> bool:
    """Make a cgroupsPath group: the missing levels, then the leaf, or join an existing empty
    leaf. Returns whether it joined one. Records each dir made in ``made`` (the caller rolls
    them back on failure).

    Raises:
        AlreadyExists: the leaf exists and has processes or child groups.
        KernelError: a mkdir or a level's configuration failed.
    """
    io = driver.io
    joined = False
    for h, (leaf, levels) in placed.items():
        for d in levels:
            if not io.exists(d):
                try:
                    io.mkdir(d)
                    made.append(d)
                    driver.after_mkdir(h, d)
                except KernelError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
            driver.prepare_parent(h, d, extra)
        try:
            io.mkdir(leaf)
        except KernelError as exc:
            if exc.errno != errno.EEXIST:
                raise
            if io.subdirs(leaf) or parse_pids(io.read(posixpath.join(leaf, CGROUP_PROCS))):
                raise AlreadyExists(f"cgroup {leaf} (linux.cgroupsPath) exists and is in use (processes or "
                                    "child groups): a container joins only an empty one") from None
            joined = True
            continue
        made.append(leaf)
        driver.after_mkdir(h, leaf)
    return joined


def add_controllers(driver: "CgroupDriver", cgroup: "Cgroup", extra: Collection[str], *, name: str,
                    at: str | None = None) -> None:
    """Give a live container's group the controllers of ``extra`` it was created without (an
    update that sets cpu.cpus on a container that had none), as runc's group always has them.

    v1: its dir is made in each missing hierarchy (and added to ``cgroup.paths``; to
    ``cgroup.created`` for a placed group), then every process is moved in while the group is
    frozen, so that no fork escapes the move. v2: the controllers are enabled above the group,
    in the levels fcrun may write (never in the root or the cgroup fcrun runs in).

    Raises:
        MissingFeature: the host lacks a controller, or (v2) only a cgroup that is not fcrun's
            could enable it.
        KernelError: a mkdir or a move failed (processes moved stay moved).
    """
    driver.check_extra(extra)
    if driver.version == 2:
        h = driver.hierarchies[0]
        levels = leaf_and_levels(h, at)[1] if at else h.levels()
        wanted = [c for c in extra if c not in driver.controllers]
        if wanted and not levels:
            raise MissingFeature(f"cgroup v2 controllers {' '.join(wanted)} above {cgroup.paths['unified']}",
                                 "its parent is not fcrun's to change: give them at create")
        for d in levels:
            driver.prepare_parent(h, d, wanted)
        return
    missing = [k for k in extra if k not in cgroup.paths]
    hierarchies = [h for h in driver.used_hierarchies(missing) if not set(h.keys) & set(cgroup.paths)]
    if not hierarchies:
        return
    placed = {h: leaf_and_levels(h, at) if at else (posixpath.join(h.parent_dir, name), h.levels()) for h in hierarchies}
    made: list[str] = []
    try:
        make_placed(driver, placed, made, missing)
    except BaseException:
        driver.rollback(made)
        raise
    new = {k: leaf for h, (leaf, _) in placed.items() for k in h.keys}
    was_frozen = cgroup.is_frozen()
    if not was_frozen:
        cgroup.freeze()
    try:
        for pid in cgroup.pids():
            for leaf in dict.fromkeys(new.values()):
                driver.io.write(posixpath.join(leaf, CGROUP_PROCS), str(pid))
    finally:
        if not was_frozen:
            cgroup.thaw()
    cgroup.paths.update(new)
    if cgroup.created is not None:
        cgroup.created.extend(made)
