"""Per-app metering (the talk's billing by processing time): what each request and instance
cost, counted as the manager goes, and an app's AppStats for the admin API and /metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..cgroups.limits import Stats
from ..cmdb.models import AppStats, InstanceCounts
from .instances import FROZEN, READY, Instance

COLD_PATHS = ("thaw", "pool", "start")  # how a request that found no ready instance got one


class CgroupReader(Protocol):
    """What metering reads of an instance's cgroup (the instance backend has it)."""

    def cpu_seconds(self, name: str) -> float: ...
    def cgroup_stats(self, name: str) -> Stats | None: ...


@dataclass
class Meter:
    """One app's counters since serve started."""

    requests: int = 0
    status: dict[str, int] = field(default_factory=lambda: {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0})
    failed: int = 0
    request_seconds: float = 0.0
    cpu_seconds_stopped: float = 0.0  # from instances already gone
    instance_seconds_stopped: float = 0.0
    starts: int = 0
    cold_start_ms_total: float = 0.0
    cold_paths: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COLD_PATHS, 0))
    freezes: int = 0

    def request_done(self, status: int, elapsed_s: float, failed: bool) -> None:
        self.requests += 1
        self.request_seconds += elapsed_s
        if failed:
            self.failed += 1
        if 100 <= status < 600:
            self.status[f"{status // 100}xx"] += 1

    def started(self, ms: float) -> None:
        """An instance started (or was claimed from the pool) in `ms`."""
        self.starts += 1
        self.cold_start_ms_total += ms

    def stopped(self, instance: Instance, cpu_seconds: float, now: float) -> None:
        """An instance is gone: what it used stays in the app's totals."""
        self.cpu_seconds_stopped += cpu_seconds
        self.instance_seconds_stopped += now - instance.started_mono

    def stats(self, live: Sequence[Instance], cgroups: CgroupReader, now: float) -> AppStats:
        """The app's AppStats: these counters plus its live instances' figures now."""
        memory = {}
        for inst in live:
            figures = cgroups.cgroup_stats(inst.name)
            memory[inst.name] = figures.memory_bytes if figures is not None else 0
        return AppStats(
            requests=self.requests,
            status=dict(self.status),
            failed=self.failed,
            request_seconds=round(self.request_seconds, 6),
            cpu_seconds=round(self.cpu_seconds_stopped + sum(cgroups.cpu_seconds(i.name) for i in live), 6),
            instance_seconds=round(self.instance_seconds_stopped + sum(now - i.started_mono for i in live), 3),
            instances=InstanceCounts(ready=sum(1 for i in live if i.state is READY), total=len(live),
                                     frozen=sum(1 for i in live if i.state is FROZEN)),
            starts=self.starts,
            cold_start_ms_avg=round(self.cold_start_ms_total / self.starts, 1) if self.starts else None,
            cold_paths=dict(self.cold_paths),
            freezes=self.freezes,
            memory_bytes=sum(memory.values()),
            frozen_memory_bytes=sum(memory[i.name] for i in live if i.state is FROZEN),
        )
