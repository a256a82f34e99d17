"""The Cgroup / CgroupDriver base classes both cgroup versions share, and the Hierarchy they
work in.

The version-specific classes (v1.py, v2.py) only say which file holds what; creating,
rolling back, killing, waiting and removing is done once, here. The values they take and give
are in limits.py; every kernel access goes through kernel.KernelIO.
"""

from __future__ import annotations

import abc
import errno
import os
import re
import signal
import time
from collections.abc import Callable, Collection, Iterable
from typing import ClassVar

import msgspec

from ..errors import AlreadyExists, KernelError, MissingFeature, SpecError
from ..units import CPU_PERIOD_US
from .kernel import KernelIO, parse_pids
from .limits import CPU_FIELDS, DEVICES_FIELD, LIMIT_FIELDS, Limits, Stats

CGROUP_PROCS = "cgroup.procs"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_POLL_FIRST_S = 0.001
_POLL_MAX_S = 0.05


def check_name(name: str, where: str = "name") -> str:
    """A cgroup name must be one harmless path component.

    Raises:
        SpecError: ``name`` is empty, has a "/", starts with "." or has other characters.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError(
            f"invalid cgroup name {name!r}: use letters, digits, '_', '.', '-', not starting with '.'",
            where,
        )
    return name


def unique(dirs: Iterable[str]) -> list[str]:
    """Distinct dirs in first-seen order (co-mounted v1 hierarchies share one dir)."""
    return list(dict.fromkeys(dirs))


class Hierarchy(msgspec.Struct, frozen=True):
    """One mounted cgroup hierarchy as fcrun uses it.

    ``base_dir`` is the cgroup fcrun runs in (relative parent) or the hierarchy's root (absolute
    parent); fcrun never writes there, except for a cgroup systemd delegated to it on v2
    (``delegated``: fcrun runs in its supervisor leaf, delegation.py), whose
    cgroup.subtree_control is the delegatee's to write. ``parent_parts`` are the components
    beneath it that lead to the parent of the container groups; those fcrun may create and
    configure.
    """

    keys: tuple[str, ...]  # ("unified",) for v2; ("cpu", "cpuacct") for a co-mounted v1 hierarchy
    mountpoint: str
    base_dir: str
    parent_parts: tuple[str, ...]
    # The cgroup fcrun runs in, in this hierarchy ("" where the mount does not show it): where a
    # relative linux.cgroupsPath starts (placement.py).
    own_dir: str = ""
    # A hierarchy a container joins only when its spec needs it (v1 cpuset, blkio, hugetlb,
    # net_cls, net_prio): elsewhere it stays in fcrun's own group, which costs no mkdir or move.
    extra: bool = False
    # v2: base_dir is a cgroup systemd delegated to fcrun, which runs in its supervisor leaf.
    delegated: bool = False

    @property
    def parent_dir(self) -> str:
        return os.path.join(self.base_dir, *self.parent_parts)

    def levels(self) -> list[str]:
        """The dirs from the first component beneath ``base_dir`` down to the parent."""
        return [os.path.join(self.base_dir, *self.parent_parts[: i + 1]) for i in range(len(self.parent_parts))]


# --- the cgroup of one container -------------------------------------------------------------


class Cgroup(abc.ABC):
    """The cgroup(s) of one container: one dir per hierarchy, keyed by controller.

    ``paths`` is what the runtime persists; ``CgroupDriver.load(paths)`` rebuilds this object
    in another fcrun process.
    """

    def __init__(self, driver: "CgroupDriver", paths: dict[str, str], created: list[str] | None = None):
        self._driver = driver
        self._io = driver.io
        self.paths = dict(paths)
        # None: fcrun made every dir of ``paths`` beneath its own parent (the default). A list:
        # the dirs this group's create made (a linux.cgroupsPath: its leaf unless it joined an
        # existing empty one, and the levels above it that did not exist), the only ones
        # destroy() removes.
        self.created = None if created is None else list(created)

    @property
    def name(self) -> str:
        return os.path.basename(next(iter(self.paths.values())))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.paths}>"

    def dirs(self) -> list[str]:
        return unique(self.paths.values())

    def procs_files(self) -> list[str]:
        """Absolute cgroup.procs paths, one per distinct dir.

        The container's child writes b"0" to each of these between fork and exec, before it
        unshares its cgroup namespace, so the list is computed here, in advance.
        """
        return [os.path.join(d, CGROUP_PROCS) for d in self.dirs()]

    def join_files(self) -> list[str]:
        """The files a single-threaded process of ours writes b"0" to, one per distinct dir, to
        join this cgroup itself (CgroupDriver.self_join_file: on v1 `tasks`, which moves only
        the writing thread)."""
        return self._driver.join_files(self.paths)

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this cgroup, in every hierarchy.

        Raises:
            KernelError: a write failed (ESRCH: no such process); hierarchies already written
                keep the process.
        """
        for path in self.procs_files():
            self._io.write(path, str(pid))

    def exists(self) -> bool:
        return any(self._io.exists(d) for d in self.dirs())

    def update(self, limits: Limits, fields: Collection[str] | None = None, read_back: bool = True) -> Limits | None:
        """Change limits of the running cgroup; returns the limits now in force (read from the
        kernel; None with read_back=False, which spares those reads).

        Only ``fields`` (names of Limits fields) are written; None means all of them. A field
        whose value is None is set to unlimited. Changing only one of cpu_quota_us /
        cpu_period_us keeps the other as the kernel has it.

        Raises:
            SpecError: an unknown field name. Nothing is written.
            MissingFeature: a controller needed for a field is not available.
            KernelError: a write failed; fields written before it stay changed (the error
                names the file).
        """
        fields = set(LIMIT_FIELDS if fields is None else fields)
        unknown = fields - set(LIMIT_FIELDS)
        if unknown:
            raise SpecError(f"unknown limit field(s) {sorted(unknown)}; known: {list(LIMIT_FIELDS)}", "fields")
        if fields & CPU_FIELDS and not CPU_FIELDS <= fields:
            # The other half of the cpu pair comes from the kernel, so read before merging.
            merged = msgspec.structs.replace(self.limits(), **{f: getattr(limits, f) for f in fields})
            fields |= CPU_FIELDS
        else:
            merged = limits
        self._check_controllers(merged, fields)
        self._apply(merged, fields)
        return self.limits() if read_back else None

    def pids(self) -> list[int]:
        """Every process in this cgroup and its child cgroups, sorted; [] once it is gone.

        Raises:
            KernelError: a cgroup.procs file could not be read.
        """
        found: set[int] = set()
        for top in self.dirs():
            for d in self._tree(top):
                try:
                    found.update(parse_pids(self._io.read(os.path.join(d, CGROUP_PROCS))))
                except KernelError as exc:
                    if exc.errno != errno.ENOENT:  # removed while we walked it
                        raise
        return sorted(found)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process in the cgroup (v2 SIGKILL: one cgroup.kill write).

        Raises:
            KernelError: listing or a kill write failed.
        """
        for pid in self.pids():
            self._io.kill(pid, sig)

    def destroy(self, timeout_s: float = 5.0) -> None:
        """Kill what is left, wait until empty, remove every dir, then the parent if empty.

        Idempotent: dirs already gone are fine. The parent dirs are removed only if this
        driver created them and they are empty.

        Raises:
            KernelError: processes survived SIGKILL for ``timeout_s`` (EBUSY), or a dir could
                not be removed; what could be removed is gone.
        """
        clock, sleep = self._driver.clock, self._driver.sleep
        deadline = clock() + timeout_s
        dirs = [d for d in self.dirs() if self._io.exists(d)]
        if dirs:
            # Kill before thawing, so frozen processes wake only to die. (A v1-frozen task
            # cannot act on SIGKILL until thawed; v2 lets fatal signals through.)
            self.kill(signal.SIGKILL)
            self._thaw_for_destroy()
            delay = _POLL_FIRST_S
            while left := self.pids():
                if clock() >= deadline:
                    raise KernelError(f"destroy: {len(left)} process(es) survive SIGKILL in", dirs[0], errno.EBUSY)
                sleep(delay)
                delay = min(delay * 2, _POLL_MAX_S)
                self.kill(signal.SIGKILL)  # again: catches a child forked before the first kill
            for top in dirs:
                for d in self._tree(top):
                    # A joined group (not made by us) stays; the groups beneath it are the container's.
                    if d != top or self.created is None or top in self.created:
                        self._rmdir_retrying(d, deadline)
        if self.created is None:
            self._driver._remove_created_parents()
        else:
            leaves = set(self.dirs())
            for d in reversed(self.created):  # the levels above the leaf, deepest first; a busy one stays
                if d not in leaves:
                    self._driver._rmdir_if_empty(d)

    def _rmdir_retrying(self, path: str, deadline: float) -> None:
        # An emptied v1 cgroup can report EBUSY for a moment while exiting tasks are released.
        delay = _POLL_FIRST_S
        while True:
            try:
                self._io.rmdir(path)
                return
            except KernelError as exc:
                if exc.errno == errno.ENOENT:
                    return
                if exc.errno != errno.EBUSY or self._driver.clock() >= deadline:
                    raise
            self._driver.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)

    def _tree(self, top: str) -> list[str]:
        """``top`` and every child cgroup beneath it, deepest first (the order rmdir needs)."""
        out = []
        for name in self._io.subdirs(top):
            out.extend(self._tree(os.path.join(top, name)))
        out.append(top)
        return out

    def _wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        clock, sleep = self._driver.clock, self._driver.sleep
        deadline = clock() + timeout_s
        delay = _POLL_FIRST_S
        while not predicate():
            if clock() >= deadline:
                return False
            sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)
        return True

    def _read_int(self, path: str) -> int:
        text = self._io.read(path).strip()
        try:
            return int(text)
        except ValueError:
            raise KernelError(f"parse {text!r} from", path, errno.EINVAL) from None

    def _read_optional(self, path: str) -> str | None:
        """The file's text, or None where the kernel does not have it (or does not support it)."""
        try:
            return self._io.read(path)
        except KernelError as exc:
            if exc.errno in (errno.ENOENT, errno.EOPNOTSUPP, errno.ENOTSUP):
                return None
            raise

    def _dir(self, key: str) -> str:
        try:
            return self.paths[key]
        except KeyError:
            raise MissingFeature(
                f"cgroup controller {key}", f"this driver manages only {sorted(self.paths)}"
            ) from None

    def _check_controllers(self, limits: Limits, fields: Collection[str]) -> None:
        """Raise MissingFeature before any write if a field needs a controller we lack."""

    @abc.abstractmethod
    def _apply(self, limits: Limits, fields: Collection[str]) -> None:
        """Write ``fields`` of ``limits`` to the kernel (cpu fields always as a pair; devices
        only from create, into a group that has no process yet)."""

    @abc.abstractmethod
    def limits(self) -> Limits:
        """The limits in force, read back from the kernel files."""

    @abc.abstractmethod
    def freeze(self, timeout_s: float = 5.0) -> None:
        """Freeze every process; returns once the kernel reports the cgroup frozen."""

    @abc.abstractmethod
    def thaw(self) -> None:
        """Let frozen processes run again."""

    @abc.abstractmethod
    def is_frozen(self) -> bool:
        """True once the freeze has completed (False while it is still in progress)."""

    @abc.abstractmethod
    def stats(self) -> Stats:
        """Read the accounting files."""

    @abc.abstractmethod
    def _thaw_for_destroy(self) -> None:
        """Thaw (if frozen) so that processes already sent SIGKILL can die."""


# --- the driver: one per fcrun process, chosen once by detect() ------------------------------


class CgroupDriver(abc.ABC):
    """Creates and loads container cgroups beneath one parent, for one cgroup version.

    Resource handling: the driver remembers the parent dirs it created; a Cgroup it made or
    loaded removes them on destroy() once they are empty. It never writes to ``base_dir``
    (the cgroup fcrun runs in, or a hierarchy root) nor to anything above it.
    """

    version: ClassVar[int]
    cgroup_class: ClassVar[type[Cgroup]]
    # What a process writes b"0" to in order to join a group itself, and whether that spares the
    # RCU grace period a move of another process waits for after a quiet spell (v1.py).
    self_join_file: ClassVar[str] = CGROUP_PROCS
    self_join_is_cheap: ClassVar[bool] = False
    # Keys that persisted paths may lack: those of hierarchies fcrun took up later.
    optional_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        hierarchies: list[Hierarchy],
        *,
        io: KernelIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not hierarchies:
            raise MissingFeature("a cgroup hierarchy")
        self.hierarchies = list(hierarchies)
        self.io = io or KernelIO()
        self.clock = clock
        self.sleep = sleep
        self._created: list[str] = []  # parent dirs this driver made, in creation order

    def __repr__(self) -> str:
        return f"<{type(self).__name__} parents={self.parent_paths()}>"

    @property
    def keys(self) -> list[str]:
        return [k for h in self.hierarchies for k in h.keys]

    @property
    def extra_keys(self) -> frozenset[str]:
        """The keys of the hierarchies a group joins only when asked (``extra`` of create)."""
        return frozenset(k for h in self.hierarchies if h.extra for k in h.keys)

    def parent_paths(self, extra: Collection[str] = ()) -> list[str]:
        """The dirs the container groups are created in, one per hierarchy (the extra ones
        only where named in ``extra``)."""
        return unique(h.parent_dir for h in self.used_hierarchies(extra))

    def used_hierarchies(self, extra: Collection[str] = ()) -> list[Hierarchy]:
        return [h for h in self.hierarchies if not h.extra or set(h.keys) & set(extra)]

    def paths_for(self, name: str, extra: Collection[str] = ()) -> dict[str, str]:
        """The ``Cgroup.paths`` a container group named ``name`` gets (nothing is created)."""
        check_name(name)
        return {k: os.path.join(h.parent_dir, name) for h in self.used_hierarchies(extra) for k in h.keys}

    def join_files(self, paths: dict[str, str]) -> list[str]:
        """self_join_file in each distinct dir of ``paths`` (a Cgroup's, or planned_paths')."""
        return [os.path.join(d, self.self_join_file) for d in unique(paths.values())]

    def planned_paths(self, name: str, *, at: str | None = None, extra: Collection[str] = ()) -> dict[str, str]:
        """The ``Cgroup.paths`` that create(name, at=at, extra=extra) gives (nothing is made)."""
        if not at:
            return self.paths_for(name, extra)
        return {k: leaf for h, (leaf, _) in self._placed(at, extra).items() for k in h.keys}

    def _placed(self, at: str, extra: Collection[str]) -> dict[Hierarchy, tuple[str, list[str]]]:
        from .placement import leaf_and_levels  # here: placement builds on this module

        return {h: leaf_and_levels(h, at) for h in self.used_hierarchies(extra)}

    def check_extra(self, extra: Collection[str]) -> None:
        """Raise MissingFeature for a controller of ``extra`` this driver cannot give a group."""
        for key in extra:
            if key not in self.keys:
                raise MissingFeature(f"a cgroup v{self.version} {key} hierarchy",
                                     f"mounted here: {', '.join(sorted(self.keys))}")

    def create(self, name: str, limits: Limits, *, at: str | None = None, extra: Collection[str] = ()) -> Cgroup:
        """Create the container group ``name`` in every hierarchy and write ``limits``.

        ``at``: the spec's linux.cgroupsPath, placed as placement.py says (then ``name`` is
        not used). ``extra``: controllers beyond the driver's own that the group needs (v1:
        the extra hierarchies it joins; v2: the controllers enabled on the way down).

        Raises:
            SpecError: a bad name or ``at``. Nothing is created.
            AlreadyExists: a group of that name exists in some hierarchy (``at``: an existing
                group in use: processes or child groups).
            MissingFeature: a limit needs a controller the host does not give us (v1: device
                rules need the devices hierarchy).
            KernelError: a mkdir, limit write or device rule (v2: program load, attach) failed.
            On any failure every dir this call made is removed again.

        Resource handling: the caller owns the returned Cgroup and must destroy() it.
        """
        self.check_extra(extra)
        placed = self._placed(at, extra) if at else {}
        paths = {k: placed[h][0] for h in placed for k in h.keys} if at else self.paths_for(name, extra)
        cgroup = self.cgroup_class(self, paths)
        # A fresh group starts unlimited with the default period, so only the rest is written.
        fields = {f for f in ("memory_bytes", "pids_max") if getattr(limits, f) is not None}
        if limits.cpu_quota_us is not None or limits.cpu_period_us != CPU_PERIOD_US:
            fields |= CPU_FIELDS
        if limits.devices:
            fields.add(DEVICES_FIELD)
        cgroup._check_controllers(limits, fields)
        made: list[str] = []
        try:
            if at:
                from .placement import make_placed

                joined = make_placed(self, placed, made, extra)
                cgroup.created = list(made)
                if joined:  # an existing group has its own limits: write every one
                    fields |= set(LIMIT_FIELDS)
            else:
                self._make_dirs(cgroup.dirs(), made, extra)
            cgroup._apply(limits, fields)
        except BaseException:
            self.rollback(made)
            raise
        return cgroup

    def load(self, paths: dict[str, str], created: list[str] | None = None) -> Cgroup:
        """Rebuild a Cgroup from its persisted ``paths`` and ``created`` (made by another fcrun
        process; ``created`` as Cgroup.created).

        Raises:
            SpecError: ``paths`` do not fit this driver: other keys, a path outside the
                hierarchy's mount, or one that is the cgroup fcrun runs in or above it.
                (Destroying such a cgroup would kill processes that are not ours.)
        """
        required = set(self.keys) - self.optional_keys - self.extra_keys
        if not isinstance(paths, dict) or not required <= set(paths) <= set(self.keys):
            raise SpecError(f"cgroup paths must have the keys {self.keys}, got {paths!r}", "cgroup.paths")
        names = set()
        for h in self.hierarchies:
            for key in h.keys:
                if key not in paths:
                    continue
                path = paths[key]
                where = f"cgroup.paths.{key}"
                if not isinstance(path, str) or not os.path.isabs(path) or os.path.normpath(path) != path:
                    raise SpecError(f"cgroup path {path!r} is not a normalized absolute path", where)
                if os.path.commonpath([path, h.mountpoint]) != h.mountpoint or path == h.mountpoint:
                    raise SpecError(f"cgroup path {path} is not beneath the hierarchy at {h.mountpoint}", where)
                if os.path.commonpath([path, h.base_dir]) == path:
                    raise SpecError(f"cgroup path {path} is fcrun's own cgroup or above it", where)
                names.add(check_name(os.path.basename(path), where))
            if len({paths[k] for k in h.keys if k in paths}) > 1:
                raise SpecError(f"co-mounted controllers {list(h.keys)} must share one dir", "cgroup.paths")
        if len(names) != 1:
            raise SpecError(f"cgroup paths name different groups: {sorted(names)}", "cgroup.paths")
        if created is not None and not all(isinstance(d, str) and any(
                os.path.commonpath([d, h.mountpoint]) == h.mountpoint != d for h in self.hierarchies) for d in created):
            raise SpecError(f"created cgroup dirs {created!r} are not beneath this driver's hierarchies", "cgroup.created")
        return self.cgroup_class(self, {k: paths[k] for k in self.keys if k in paths}, created)

    def remove_parent_if_empty(self) -> list[str]:
        """Remove each parent dir that has no child group and no process; returns those gone now.

        Also removes the intermediate dirs this driver created. The parent belongs to fcrun by
        configuration (a relative parent is created beneath fcrun's own cgroup).

        Raises:
            KernelError: an rmdir failed for another reason than the dir being busy or gone.
        """
        removed = []
        for h in self.hierarchies:
            if h.extra and not self.io.exists(h.parent_dir):
                continue  # no container needed this hierarchy
            for d in reversed(h.levels()):
                if d != h.parent_dir and d not in self._created:
                    break
                if self._rmdir_if_empty(d):
                    removed.append(d)
                else:
                    break
        self._created = [d for d in self._created if d not in removed]
        return removed

    # --- internals ---

    def _make_dirs(self, dirs: list[str], made: list[str], extra: Collection[str] = ()) -> None:
        """Make the parents (as needed) and the group dirs; record each dir made in ``made``."""
        hierarchies = self.used_hierarchies(extra)
        for attempt in range(3):
            self._make_parents(made, hierarchies, extra)
            try:
                for h in hierarchies:
                    d = os.path.join(h.parent_dir, os.path.basename(dirs[0]))
                    if d in made:
                        continue
                    try:
                        self.io.mkdir(d)
                    except KernelError as exc:
                        if exc.errno == errno.EEXIST:
                            raise AlreadyExists(f"cgroup {d} already exists") from None
                        raise
                    made.append(d)
                    self.after_mkdir(h, d)
                return
            except KernelError as exc:
                # ENOENT: another fcrun process removed the (empty) parent between our mkdirs.
                if exc.errno != errno.ENOENT or attempt == 2:
                    raise

    def _make_parents(self, made: list[str], hierarchies: list[Hierarchy], extra: Collection[str] = ()) -> None:
        for h in hierarchies:
            for d in h.levels():
                if not self.io.exists(d):
                    try:
                        self.io.mkdir(d)
                        made.append(d)
                        self._created.append(d)
                        self.after_mkdir(h, d)
                    except KernelError as exc:
                        if exc.errno != errno.EEXIST:  # EEXIST: a concurrent fcrun made it
                            raise
                self.prepare_parent(h, d, extra)

    def prepare_parent(self, hierarchy: Hierarchy, level_dir: str, extra: Collection[str] = ()) -> None:
        """Hook: configure a dir on the way down to the parent (v2 enables controllers)."""

    def after_mkdir(self, hierarchy: Hierarchy, new_dir: str) -> None:
        """Hook: configure a dir this driver just made (v1 cpuset copies cpus and mems)."""

    def rollback(self, made: list[str]) -> None:
        for d in reversed(made):
            try:
                self.io.rmdir(d)
            except KernelError:
                pass  # busy: a concurrent create already uses this parent; gone: fine
            if d in self._created and not self.io.exists(d):
                self._created.remove(d)

    def _remove_created_parents(self) -> None:
        for d in reversed(list(self._created)):
            if self._rmdir_if_empty(d):
                self._created.remove(d)

    def _rmdir_if_empty(self, d: str) -> bool:
        try:
            self.io.rmdir(d)
        except KernelError as exc:
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT):
                return exc.errno == errno.ENOENT
            raise
        return True
