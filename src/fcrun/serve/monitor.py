"""Self-monitoring of instances while they serve: counters in, per-interval figures out.

Two sources, read together at each sample (every `sample_interval_s`, 250 ms by default):

- the instance's cgroup (`Cgroup.stats()`: cpuacct.usage and cpu.stat on v1, cpu.stat on v2,
  memory, PSI where the kernel has it) - a handful of small reads of kernel files, off the
  request path;
- counters the manager keeps on the request path anyway: requests completed, the sum of their
  response times, and the integral of in-flight requests over time (updated where the
  outstanding count changes, with the timestamp the lease already took - no extra clock read
  or syscall per request).

`figures()` is pure: the difference of two readings, as the policy's InstanceFigures. Besides
the CPU used on average, it gives the share of the quota used over the whole CFS periods
(CPU_PERIOD_US) the interval spans: a saturated instance runs its quota at the start of every
period, so an interval of 2.5 periods holds two or three quotas of CPU time, depending on
where it falls; measured against two, it reads >= 1.0 either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cgroups.limits import Stats
from ..units import CPU_PERIOD_US
from .policy import InstanceFigures


@dataclass(frozen=True, slots=True)
class Reading:
    """Cumulative counters of one instance at one moment (seconds on the manager's clock)."""

    at_s: float
    cpu_usage_us: int = 0
    nr_periods: int = 0
    nr_throttled: int = 0
    memory_bytes: int = 0
    cpu_pressure: float | None = None  # PSI "some" avg10 (%), already an average
    busy_s: float = 0.0  # integral of in-flight requests over time
    completed: int = 0
    latency_s: float = 0.0  # sum of the completed requests' response times


def reading(at_s: float, stats: Stats | None, busy_s: float, completed: int, latency_s: float) -> Reading:
    """A Reading from a cgroup snapshot (None: unreadable, e.g. the instance just went away)."""
    if stats is None:
        return Reading(at_s=at_s, busy_s=busy_s, completed=completed, latency_s=latency_s)
    pressure = None
    if stats.cpu_pressure and "some" in stats.cpu_pressure:
        pressure = stats.cpu_pressure["some"].get("avg10")
    return Reading(at_s=at_s, cpu_usage_us=stats.cpu_usage_us, nr_periods=stats.nr_periods,
                   nr_throttled=stats.nr_throttled, memory_bytes=stats.memory_bytes, cpu_pressure=pressure,
                   busy_s=busy_s, completed=completed, latency_s=latency_s)


def figures(name: str, cpu_limit: float, started_s: float, prev: Reading, cur: Reading) -> InstanceFigures:
    """What happened between two readings of the same instance."""
    dt = cur.at_s - prev.at_s
    if dt <= 0:
        return InstanceFigures(name=name, cpu_limit=cpu_limit, memory_bytes=cur.memory_bytes,
                               cpu_pressure=cur.cpu_pressure, started_s=started_s)
    periods = cur.nr_periods - prev.nr_periods
    completed = cur.completed - prev.completed
    # max(0, ...): a counter read as 0 (cgroup unreadable) must not give a negative rate.
    used_us = max(0, cur.cpu_usage_us - prev.cpu_usage_us)
    whole_periods = max(1, int(dt * 1e6 // CPU_PERIOD_US))
    return InstanceFigures(
        name=name,
        cpu_limit=cpu_limit,
        cpu_used=used_us / 1e6 / dt,
        quota_used=used_us / (cpu_limit * CPU_PERIOD_US * whole_periods) if cpu_limit > 0 else None,
        throttled=max(0, cur.nr_throttled - prev.nr_throttled) / periods if periods > 0 else 0.0,
        inflight=max(0.0, cur.busy_s - prev.busy_s) / dt,
        requests=completed,
        latency_ms=(cur.latency_s - prev.latency_s) / completed * 1000 if completed > 0 else None,
        memory_bytes=cur.memory_bytes,
        cpu_pressure=cur.cpu_pressure,
        started_s=started_s,
    )
