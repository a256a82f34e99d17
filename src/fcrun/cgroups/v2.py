"""cgroup v2: one unified hierarchy; controllers are handed down through cgroup.subtree_control.

A group gets a controller only if its parent enables it in cgroup.subtree_control, and a
group with processes cannot enable any for its children (the "no internal processes" rule).
So fcrun never enables controllers in the cgroup it runs in: the cgroup it runs in (or the
root, for an absolute parent) must already enable them, and fcrun enables them on the way
down through the parent dirs it owns. The exception is a cgroup systemd delegated to fcrun,
from which `fcrun serve` moved itself into a supervisor leaf (delegation.py): that one's
subtree_control fcrun writes too.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Collection

from ..errors import KernelError, MissingFeature
from .base import Cgroup, CgroupDriver, Hierarchy
from .kernel import KernelIO, parse_flat_keyed, parse_max, parse_psi
from .limits import CPU_FIELDS, DEVICES_FIELD, Limits, Stats
from .devices import DeviceRule, assemble, program

KEY = "unified"  # the only key of Cgroup.paths
CONTROLLERS = ("cpu", "memory", "pids")  # those fcrun enables by default

CGROUP_CONTROLLERS = "cgroup.controllers"
CGROUP_SUBTREE_CONTROL = "cgroup.subtree_control"
CGROUP_EVENTS = "cgroup.events"
CGROUP_FREEZE = "cgroup.freeze"
CGROUP_KILL = "cgroup.kill"  # Linux >= 5.14
CPU_MAX = "cpu.max"
CPU_STAT = "cpu.stat"
CPU_PRESSURE = "cpu.pressure"
MEMORY_MAX = "memory.max"
MEMORY_SWAP_MAX = "memory.swap.max"  # only with swap accounting
MEMORY_CURRENT = "memory.current"
MEMORY_PRESSURE = "memory.pressure"
PIDS_MAX = "pids.max"
PIDS_CURRENT = "pids.current"

DEVICE_PROGRAMS_KEPT = 16  # rule sets; fcrun itself uses one (oci.DEFAULT_DEVICE_RULES)

_FIELD_CONTROLLER = {"cpu_quota_us": "cpu", "cpu_period_us": "cpu", "memory_bytes": "memory", "pids_max": "pids"}

DELEGATION_HINT = (
    "run fcrun from a delegated cgroup whose cgroup.subtree_control enables them "
    "(e.g. systemd-run -p Delegate=yes), or pass an absolute cgroup parent"
)


def format_cpu_max(quota_us: int | None, period_us: int) -> str:
    """0.3 CPU -> "30000 100000"; unlimited -> "max 100000"."""
    return f"{'max' if quota_us is None else quota_us} {period_us}"


def parse_cpu_max(text: str) -> tuple[int | None, int]:
    """ "30000 100000" -> (30000, 100000); "max 100000" -> (None, 100000)."""
    quota, period = text.split()
    return (None if quota == "max" else int(quota)), int(period)


class V2Cgroup(Cgroup):
    """A container's group in the unified hierarchy; ``paths`` is {"unified": dir}."""

    _driver: "V2Driver"

    @property
    def dir(self) -> str:
        return self.paths[KEY]

    def _file(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _check_controllers(self, limits: Limits, fields: Collection[str]) -> None:
        for field in fields:
            if field == DEVICES_FIELD:
                continue  # a BPF program, not a controller: every cgroup2 group can have one
            controller = _FIELD_CONTROLLER[field]
            if controller not in self._driver.controllers:
                raise MissingFeature(
                    f"cgroup v2 controller {controller} (for {field})",
                    f"this driver enables only {list(self._driver.controllers) or 'none'}",
                )

    def _apply(self, limits: Limits, fields: Collection[str]) -> None:
        if CPU_FIELDS & set(fields):
            # Quota and period are one write here: no ordering quirk as in v1.
            self._io.write(self._file(CPU_MAX), format_cpu_max(limits.cpu_quota_us, limits.cpu_period_us))
        if "memory_bytes" in fields:
            limited = limits.memory_bytes is not None
            self._io.write(self._file(MEMORY_MAX), str(limits.memory_bytes) if limited else "max")
            # Independent of memory.max in v2 (unlike v1 memsw), so the order does not matter.
            if self._io.exists(self._file(MEMORY_SWAP_MAX)):
                self._io.write(self._file(MEMORY_SWAP_MAX), "0" if limited else "max")
        if "pids_max" in fields:
            self._io.write(self._file(PIDS_MAX), "max" if limits.pids_max is None else str(limits.pids_max))
        if DEVICES_FIELD in fields:
            self._driver.attach_device_rules(self.dir, limits.devices)

    def limits(self) -> Limits:
        """Read back; a controller this driver does not enable reads as unlimited."""
        cpu_max = self._read_optional(self._file(CPU_MAX))
        quota, period = parse_cpu_max(cpu_max) if cpu_max else (None, Limits().cpu_period_us)
        memory_max = self._read_optional(self._file(MEMORY_MAX))
        pids_max = self._read_optional(self._file(PIDS_MAX))
        return Limits(
            cpu_quota_us=quota,
            cpu_period_us=period,
            memory_bytes=parse_max(memory_max) if memory_max else None,
            pids_max=parse_max(pids_max) if pids_max else None,
        )

    def _events(self) -> dict[str, int]:
        return parse_flat_keyed(self._io.read(self._file(CGROUP_EVENTS)))

    def freeze(self, timeout_s: float = 5.0) -> None:
        """Write 1 to cgroup.freeze and wait until cgroup.events says "frozen 1".

        Raises:
            KernelError: ETIMEDOUT when not frozen within ``timeout_s`` (the group is thawed
                again), or a failed write (ENOENT: kernel older than 5.2).
        """
        self._io.write(self._file(CGROUP_FREEZE), "1")
        if not self._wait(self.is_frozen, timeout_s):
            self._io.write(self._file(CGROUP_FREEZE), "0")
            raise KernelError("freeze", self.dir, errno.ETIMEDOUT)

    def thaw(self) -> None:
        self._io.write(self._file(CGROUP_FREEZE), "0")

    def is_frozen(self) -> bool:
        return self._events().get("frozen") == 1

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL: one write to cgroup.kill, which also reaches processes forked meanwhile
        and child groups; other signals (or an older kernel): signal every listed pid."""
        if sig == signal.SIGKILL and self._io.exists(self._file(CGROUP_KILL)):
            self._io.write(self._file(CGROUP_KILL), "1")
        else:
            super().kill(sig)

    def _thaw_for_destroy(self) -> None:
        # v2 lets SIGKILL through to frozen tasks; thawing still makes them exit at once and
        # leaves no frozen state behind if destroy fails.
        freeze = self._read_optional(self._file(CGROUP_FREEZE))
        if freeze is not None and freeze.strip() != "0":
            self.thaw()

    def stats(self) -> Stats:
        """Read the accounting; a counter of a controller not enabled here reads 0."""
        cpu_stat = parse_flat_keyed(self._io.read(self._file(CPU_STAT)))
        memory_current = self._read_optional(self._file(MEMORY_CURRENT))
        pids_current = self._read_optional(self._file(PIDS_CURRENT))
        cpu_pressure = self._read_optional(self._file(CPU_PRESSURE))
        memory_pressure = self._read_optional(self._file(MEMORY_PRESSURE))
        return Stats(
            cpu_usage_us=cpu_stat.get("usage_usec", 0),
            nr_periods=cpu_stat.get("nr_periods", 0),
            nr_throttled=cpu_stat.get("nr_throttled", 0),
            throttled_us=cpu_stat.get("throttled_usec", 0),
            memory_bytes=int(memory_current) if memory_current else 0,
            pids_current=int(pids_current) if pids_current else 0,
            frozen=self.is_frozen(),
            cpu_pressure=parse_psi(cpu_pressure) if cpu_pressure else None,
            memory_pressure=parse_psi(memory_pressure) if memory_pressure else None,
        )


class V2Driver(CgroupDriver):
    """Creates container groups in the unified hierarchy and enables ``controllers`` on the
    way down to them; device rules become a BPF program attached to each group, which needs
    no controller. ``controllers=()`` gives a driver for freeze, kill, stats and device rules
    only (as on a hybrid host's controller-less /sys/fs/cgroup/unified)."""

    version = 2
    cgroup_class = V2Cgroup

    def __init__(
        self,
        hierarchy: Hierarchy,
        *,
        controllers: Collection[str] = CONTROLLERS,
        io: KernelIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        super().__init__([hierarchy], io=io, clock=clock, sleep=sleep)
        self.controllers = tuple(controllers)
        self._device_programs: dict[tuple[DeviceRule, ...], int] = {}
        self._device_programs_lock = threading.Lock()  # creates may run in several threads

    def attach_device_rules(self, cgroup_dir: str, rules: tuple[DeviceRule, ...]) -> None:
        """Attach the device program for ``rules`` to ``cgroup_dir``, loading it on first use.

        One program serves every cgroup with the same rules (a program can be attached to
        any number of cgroups), so a create pays for the verifier once per rule set.

        Raises:
            KernelError: the kernel refused the program or the attach.

        Resource handling: the driver keeps the program fds (close-on-exec) for its lifetime;
        past DEVICE_PROGRAMS_KEPT rule sets it closes them all, which detaches nothing. The
        lock covers the attach too, so no fd is closed between lookup and use.
        """
        with self._device_programs_lock:
            fd = self._device_programs.get(rules)
            if fd is None:
                if len(self._device_programs) >= DEVICE_PROGRAMS_KEPT:
                    for old in self._device_programs.values():
                        self.io.close(old)
                    self._device_programs.clear()
                fd = self._device_programs[rules] = self.io.load_device_program(assemble(program(rules)))
            self.io.attach_device_program(cgroup_dir, fd)

    @property
    def hierarchy(self) -> Hierarchy:
        return self.hierarchies[0]

    def check_delegation(self) -> None:
        """Check, without writing, that the cgroup we build beneath hands down our controllers.

        Raises:
            MissingFeature: ``base_dir``'s cgroup.subtree_control lacks some of them.
        """
        if not self.controllers:
            return
        path = self._handed_down_file()
        enabled = set(self.io.read(path).split())
        missing = [c for c in self.controllers if c not in enabled]
        if missing:
            raise MissingFeature(f"cgroup v2 controllers {' '.join(missing)} delegated to {path}", DELEGATION_HINT)

    def _handed_down_file(self) -> str:
        """What says which controllers ``base_dir`` can hand down: its subtree_control, or, in
        a cgroup delegated to fcrun, which enables them itself, its cgroup.controllers."""
        h = self.hierarchy
        return os.path.join(h.base_dir, CGROUP_CONTROLLERS if h.delegated else CGROUP_SUBTREE_CONTROL)

    def check_extra(self, extra: Collection[str]) -> None:
        """The extra controllers a group needs must be delegated to the cgroup we build beneath
        (checked without writing).

        Raises:
            MissingFeature: naming those ``base_dir`` does not hand down.
        """
        wanted = [c for c in extra if c not in self.controllers]
        if not wanted:
            return
        path = self._handed_down_file()
        missing = [c for c in wanted if c not in self.io.read(path).split()]
        if missing:
            raise MissingFeature(f"cgroup v2 controllers {' '.join(missing)} delegated to {path}", DELEGATION_HINT)

    def _make_parents(self, made: list[str], hierarchies: list[Hierarchy], extra: Collection[str] = ()) -> None:
        h = self.hierarchy
        if h.delegated:  # the delegated cgroup hands our controllers down once we enable them
            self.prepare_parent(h, h.base_dir, extra)
        super()._make_parents(made, hierarchies, extra)

    def prepare_parent(self, hierarchy: Hierarchy, level_dir: str, extra: Collection[str] = ()) -> None:
        """Enable our controllers (and the group's ``extra`` ones: cpuset, io, hugetlb) in
        ``level_dir``'s subtree_control, writing only what lacks."""
        wanted = list(dict.fromkeys([*self.controllers, *extra]))
        if not wanted:
            return
        enabled = set(self.io.read(os.path.join(level_dir, CGROUP_SUBTREE_CONTROL)).split())
        missing = [c for c in wanted if c not in enabled]
        if not missing:
            return
        offered = set(self.io.read(os.path.join(level_dir, CGROUP_CONTROLLERS)).split())
        not_offered = [c for c in missing if c not in offered]
        if not_offered:
            raise MissingFeature(f"cgroup v2 controllers {' '.join(not_offered)} in {level_dir}", DELEGATION_HINT)
        self.io.write(os.path.join(level_dir, CGROUP_SUBTREE_CONTROL), " ".join(f"+{c}" for c in missing))
