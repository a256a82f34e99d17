"""The values the cgroup drivers take and give: the Limits of one container and a Stats snapshot.

Both are msgspec Structs, so the runtime persists and decodes them; the ranges are the ones the
kernel accepts, checked on construction as well as on decoding.
"""

from __future__ import annotations

import msgspec

from ..errors import SpecError
from ..units import CPU_PERIOD_US
from .devices import DeviceRule

MIN_CPU_PERIOD_US = 1_000  # the kernel refuses periods outside 1 ms .. 1 s (EINVAL)
MAX_CPU_PERIOD_US = 1_000_000
MIN_CPU_QUOTA_US = 1_000  # and quotas under 1 ms
MAX_CPU_QUOTA_US = (1 << 44) - 1  # the kernel's max_cfs_runtime (MAX_BW)
PID_MAX_LIMIT = 1 << 22  # the kernel's PID_MAX_LIMIT on 64-bit

LIMIT_FIELDS = ("cpu_quota_us", "cpu_period_us", "memory_bytes", "pids_max")
# Fields written together: cpu.max holds quota and period in one file, and the v1 pair must be
# ordered against each other, so a change to either rewrites both.
CPU_FIELDS = frozenset({"cpu_quota_us", "cpu_period_us"})
# Written by create only: a live change of device rules could not be made atomic on v1 (deny
# all, then allow one by one) and nothing needs it.
DEVICES_FIELD = "devices"


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Resource limits of one container. ``None`` means unlimited ("max" / -1 in the kernel).

    ``memory_bytes`` also caps swap where the kernel has the file (v2 ``memory.swap.max`` = 0,
    v1 ``memory.memsw.limit_in_bytes`` = memory), so a limited container cannot page out.

    ``devices``: the device rules (devices.py), set at create only; () leaves every device
    allowed, as a fresh cgroup has it.

    Raises (on construction or decoding):
        SpecError: a value is out of the range the kernel accepts, naming the field.
    """

    cpu_quota_us: int | None = None
    cpu_period_us: int = CPU_PERIOD_US
    memory_bytes: int | None = None
    pids_max: int | None = None
    devices: tuple[DeviceRule, ...] = ()

    def __post_init__(self) -> None:
        _check_int("cpu_period_us", self.cpu_period_us, MIN_CPU_PERIOD_US, MAX_CPU_PERIOD_US)
        if self.cpu_quota_us is not None:
            _check_int("cpu_quota_us", self.cpu_quota_us, MIN_CPU_QUOTA_US, MAX_CPU_QUOTA_US)
        if self.memory_bytes is not None:
            _check_int("memory_bytes", self.memory_bytes, 1, 1 << 62)
        if self.pids_max is not None:
            _check_int("pids_max", self.pids_max, 1, PID_MAX_LIMIT)


def _check_int(field: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{field} must be an integer, not {value!r}", f"limits.{field}")
    if not low <= value <= high:
        raise SpecError(f"{field} {value} is out of range {low}..{high}", f"limits.{field}")


Pressure = dict[str, dict[str, float]]  # {"some": {"avg10": 0.5, ..., "total": 1234.0}, "full": {...}}


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one cgroup's accounting. Times in microseconds, memory in bytes.

    ``cpu_pressure`` / ``memory_pressure`` are the parsed PSI files, None where the kernel
    has none for this cgroup (cgroup v1, or PSI disabled). On v2, counters of a controller
    the driver does not enable (memory, pids, throttling) read 0.
    """

    cpu_usage_us: int
    nr_periods: int
    nr_throttled: int
    throttled_us: int
    memory_bytes: int
    pids_current: int
    frozen: bool
    cpu_pressure: Pressure | None = None
    memory_pressure: Pressure | None = None
