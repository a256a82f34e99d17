"""cgroup v1: one hierarchy per controller (or a few co-mounted, e.g. "cpu,cpuacct").

Used on v1 and hybrid hosts, where the controllers live in v1 hierarchies even though a
controller-less cgroup2 tree is mounted at /sys/fs/cgroup/unified.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection

from ..errors import KernelError, MissingFeature
from .base import Cgroup, CgroupDriver, Hierarchy
from .kernel import parse_flat_keyed, parse_max
from .limits import CPU_FIELDS, DEVICES_FIELD, Limits, Stats
from .devices import v1_writes

# The hierarchies fcrun uses, also the keys of Cgroup.paths.
CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer", "devices")
# Those a container joins only when its spec sets something of theirs (linux.resources.cpu.cpus,
# blockIO, hugepageLimits, network): elsewhere it stays in fcrun's own groups, at no cost.
# rdma is not among them: linux.resources.rdma is refused (spec_checks._WHY).
EXTRA_CONTROLLERS = ("cpuset", "blkio", "hugetlb", "net_cls", "net_prio")
CPUSET_FILES = ("cpuset.cpus", "cpuset.mems")

CPU_CFS_QUOTA_US = "cpu.cfs_quota_us"
CPU_CFS_PERIOD_US = "cpu.cfs_period_us"
CPU_STAT = "cpu.stat"
CPUACCT_USAGE = "cpuacct.usage"
MEMORY_LIMIT_IN_BYTES = "memory.limit_in_bytes"
MEMORY_MEMSW_LIMIT_IN_BYTES = "memory.memsw.limit_in_bytes"  # only with swap accounting
MEMORY_USAGE_IN_BYTES = "memory.usage_in_bytes"
PIDS_MAX = "pids.max"
PIDS_CURRENT = "pids.current"
FREEZER_STATE = "freezer.state"

UNLIMITED = "-1"  # cfs_quota_us and the memory limits; pids.max says "max"
# "Unlimited" memory reads back as PAGE_COUNTER_MAX pages (LONG_MAX rounded down to a page).
MEMORY_UNLIMITED_ABOVE = 1 << 62

FROZEN, FREEZING, THAWED = "FROZEN", "FREEZING", "THAWED"

_FIELD_KEY = {"cpu_quota_us": "cpu", "cpu_period_us": "cpu", "memory_bytes": "memory", "pids_max": "pids",
              DEVICES_FIELD: "devices"}


class V1Cgroup(Cgroup):
    """A container's groups in the v1 hierarchies; ``paths`` keys: cpu, cpuacct, memory, pids,
    freezer, devices (co-mounted hierarchies share one dir)."""

    def _check_controllers(self, limits: Limits, fields: Collection[str]) -> None:
        for field in fields:
            self._dir(_FIELD_KEY[field])

    def _apply(self, limits: Limits, fields: Collection[str]) -> None:
        if CPU_FIELDS & set(fields):
            self._write_cpu(limits.cpu_quota_us, limits.cpu_period_us)
        if "memory_bytes" in fields:
            self._write_memory(limits.memory_bytes)
        if "pids_max" in fields:
            value = "max" if limits.pids_max is None else str(limits.pids_max)
            self._io.write(os.path.join(self._dir("pids"), PIDS_MAX), value)
        if DEVICES_FIELD in fields:
            # A fresh group inherits its parent's rules; "a" (deny all) is refused (EINVAL)
            # in a group with children, which a group fcrun just made does not have.
            d = self._dir("devices")
            for name, text in v1_writes(limits.devices):
                self._io.write(os.path.join(d, name), text)

    def _write_cpu(self, quota_us: int | None, period_us: int) -> None:
        d = self._dir("cpu")
        quota_file = os.path.join(d, CPU_CFS_QUOTA_US)
        period_file = os.path.join(d, CPU_CFS_PERIOD_US)
        if quota_us is None:
            # An unlimited quota fits any period, so lifting it first cannot be refused.
            self._io.write(quota_file, UNLIMITED)
            self._io.write(period_file, str(period_us))
            return
        # The kernel checks quota/period as a pair on each single write, against the parent's
        # and the children's bandwidth (EINVAL). Period first is right when the quota shrinks;
        # when the old quota does not fit the new period, write the quota first (as crun does).
        try:
            self._io.write(period_file, str(period_us))
        except KernelError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._io.write(quota_file, str(quota_us))
            self._io.write(period_file, str(period_us))
            return
        self._io.write(quota_file, str(quota_us))

    def _write_memory(self, memory_bytes: int | None) -> None:
        d = self._dir("memory")
        mem_file = os.path.join(d, MEMORY_LIMIT_IN_BYTES)
        memsw_file = os.path.join(d, MEMORY_MEMSW_LIMIT_IN_BYTES)
        value = UNLIMITED if memory_bytes is None else str(memory_bytes)
        if not self._io.exists(memsw_file):
            self._io.write(mem_file, value)
            return
        # v1 refuses (EINVAL) any moment where memory+swap < memory: when raising, raise
        # memsw first; when lowering, lower memory first.
        current = self._read_int(mem_file)
        raising = memory_bytes is None or memory_bytes > current
        order = (memsw_file, mem_file) if raising else (mem_file, memsw_file)
        for path in order:
            self._io.write(path, value)

    def limits(self) -> Limits:
        cpu, memory, pids = self._dir("cpu"), self._dir("memory"), self._dir("pids")
        quota = self._read_int(os.path.join(cpu, CPU_CFS_QUOTA_US))
        memory_bytes = self._read_int(os.path.join(memory, MEMORY_LIMIT_IN_BYTES))
        return Limits(
            cpu_quota_us=None if quota < 0 else quota,
            cpu_period_us=self._read_int(os.path.join(cpu, CPU_CFS_PERIOD_US)),
            memory_bytes=None if not 0 <= memory_bytes <= MEMORY_UNLIMITED_ABOVE else memory_bytes,
            pids_max=parse_max(self._io.read(os.path.join(pids, PIDS_MAX))),
        )

    def _state(self, d: str | None = None) -> str:
        return self._io.read(os.path.join(d or self._dir("freezer"), FREEZER_STATE)).strip()

    def freeze(self, timeout_s: float = 5.0) -> None:
        """Write FROZEN and poll freezer.state until it reads FROZEN (FREEZING: in progress).

        Raises:
            KernelError: ETIMEDOUT when not frozen within ``timeout_s`` (the group is thawed
                again), or a failed write.
        """
        path = os.path.join(self._dir("freezer"), FREEZER_STATE)
        self._io.write(path, FROZEN)

        def frozen() -> bool:
            state = self._state()
            if state == FREEZING:
                # Tasks forked while freezing can be missed; writing FROZEN again catches them.
                self._io.write(path, FROZEN)
            return state == FROZEN

        if not self._wait(frozen, timeout_s):
            self._io.write(path, THAWED)
            raise KernelError("freeze", self._dir("freezer"), errno.ETIMEDOUT)

    def thaw(self) -> None:
        self._io.write(os.path.join(self._dir("freezer"), FREEZER_STATE), THAWED)

    def is_frozen(self) -> bool:
        return self._state() == FROZEN

    def _thaw_for_destroy(self) -> None:
        if "freezer" not in self.paths:
            return
        # A child group frozen on its own stays frozen when its parent thaws: thaw each.
        for d in self._tree(self.paths["freezer"]):
            try:
                if self._state(d) != THAWED:
                    self._io.write(os.path.join(d, FREEZER_STATE), THAWED)
            except KernelError as exc:
                if exc.errno != errno.ENOENT:
                    raise

    def stats(self) -> Stats:
        cpu_stat = parse_flat_keyed(self._io.read(os.path.join(self._dir("cpu"), CPU_STAT)))
        return Stats(
            cpu_usage_us=self._read_int(os.path.join(self._dir("cpuacct"), CPUACCT_USAGE)) // 1000,
            nr_periods=cpu_stat.get("nr_periods", 0),
            nr_throttled=cpu_stat.get("nr_throttled", 0),
            throttled_us=cpu_stat.get("throttled_time", 0) // 1000,  # v1 counts nanoseconds
            memory_bytes=self._read_int(os.path.join(self._dir("memory"), MEMORY_USAGE_IN_BYTES)),
            pids_current=self._read_int(os.path.join(self._dir("pids"), PIDS_CURRENT)),
            frozen=self.is_frozen(),
            cpu_pressure=None,  # v1 has no per-cgroup PSI files
            memory_pressure=None,
        )


class V1Driver(CgroupDriver):
    """Creates container groups in each v1 hierarchy beneath the parent."""

    version = 1
    cgroup_class = V1Cgroup
    # A single-threaded process that writes "0" to a group's `tasks` file moves only itself, and
    # the kernel then skips the cgroup_threadgroup_rwsem that cgroup.procs writes take for
    # writing (kernel commit "cgroup: Optimize single thread migration"): no RCU grace period
    # after a quiet spell. A container's child joins so, once forked (bench/README.md, "Issue
    # 17: the child joins its cgroup itself"): 0.5 ms for every hierarchy against 7 ms median
    # (12 ms p99) for the same move through cgroup.procs.
    self_join_file = "tasks"
    self_join_is_cheap = True
    # Containers created before fcrun used the devices hierarchy have no group there.
    optional_keys = frozenset({"devices"})

    def after_mkdir(self, hierarchy: Hierarchy, new_dir: str) -> None:
        """A new v1 cpuset group has no cpus and no mems, and no process can join it (ENOSPC)
        until it has: give it its parent's, as runc does (cgroup.clone_children is off)."""
        if "cpuset" not in hierarchy.keys:
            return
        parent = os.path.dirname(new_dir)
        for name in CPUSET_FILES:
            if not self._io_read_stripped(os.path.join(new_dir, name)):
                self.io.write(os.path.join(new_dir, name), self._io_read_stripped(os.path.join(parent, name)))

    def _io_read_stripped(self, path: str) -> str:
        return self.io.read(path).strip()


def missing_hierarchy(controller: str) -> MissingFeature:
    return MissingFeature(
        f"cgroup v1 hierarchy for the {controller} controller",
        f"mount it (mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller})",
    )
