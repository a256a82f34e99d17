"""Per-app metering (the talk's billing by processing time): what each request and instance
cost, counted as the manager goes, and an app's AppStats for the admin API and /metrics."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Protocol

from ..cgroups.limits import Stats
from ..cmdb.models import AppStats, Histogram, InstanceCounts
from .instances import RECORDED_STATE, Instance

COLD_PATHS = ("thaw", "pool", "start")  # how a request that found no ready instance got one

# Bucket upper bounds (seconds). Fixed, so that every serve's histograms can be summed.
# A request: the proxy adds ~0.5 ms and a PHP page takes a few ms (bench/README.md,
# proxy_overhead.py), a cold start adds 2-75 ms, a slow page takes seconds, and a request gives
# up at the hold timeout (30 s by default): 1-2.5-5 steps over 0.5 ms .. 30 s.
REQUEST_BOUNDS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A cold start: thaw ~2 ms, pool ~5 ms (targets: p50 <= 2 and <= 5 ms, pool p99 <= 15 ms), a new
# instance 50-75 ms (coldstart.py): bounds at each target, finer below 25 ms where thaw and pool
# live, then coarse up to the hold timeout (a start waiting for a share of max_instances).
COLD_START_BOUNDS_S = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                       1.0, 2.5, 10.0, 30.0)


class DurationHistogram:
    """Durations counted into fixed buckets, Prometheus style (a value equal to a bound counts
    in that bucket: le). Per bucket here, cumulative in `snapshot()`, so that `observe()` on
    the request path is one bisect and two additions, with no list, dict or string made; the
    count is the buckets' total, summed when it is read."""

    __slots__ = ("bounds", "buckets", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def snapshot(self) -> Histogram:
        counts = list(accumulate(self.buckets))
        return Histogram(bounds=list(self.bounds), counts=counts, sum=round(self.sum, 6), count=counts[-1])


class CgroupReader(Protocol):
    """What metering reads of an instance's cgroup (the instance backend has it)."""

    def cpu_seconds(self, name: str) -> float: ...
    def cgroup_stats(self, name: str) -> Stats | None: ...


@dataclass
class Meter:
    """One app's counters since serve started. Each figure is kept once: the request histogram
    holds the number of requests and their total time, and the cold-start histograms the
    number of cold starts by path."""

    # Requests by status // 100: [1] is 1xx .. [5] is 5xx; a status outside 100..599 counts in
    # requests only. A list indexed on the request path, not a dict keyed by an f-string: that
    # string cost more than the histogram (bench/meter_overhead.py).
    status_classes: list[int] = field(default_factory=lambda: [0] * 6)
    failed: int = 0
    request_duration: DurationHistogram = field(default_factory=lambda: DurationHistogram(REQUEST_BOUNDS_S))
    cold_start_duration: dict[str, DurationHistogram] = field(
        default_factory=lambda: {path: DurationHistogram(COLD_START_BOUNDS_S) for path in COLD_PATHS})
    cpu_seconds_stopped: float = 0.0  # from instances already gone
    instance_seconds_stopped: float = 0.0
    starts: int = 0
    cold_start_ms_total: float = 0.0
    freezes: int = 0

    def request_done(self, status: int, elapsed_s: float, failed: bool) -> None:
        """The hot path: once per request, with its duration (first byte in to last byte out)."""
        self.request_duration.observe(elapsed_s)
        if failed:
            self.failed += 1
        if 100 <= status < 600:
            self.status_classes[status // 100] += 1

    def cold_start(self, path: str, waited_s: float) -> None:
        """A request found no ready instance and got one by `path` (COLD_PATHS) after `waited_s`."""
        self.cold_start_duration[path].observe(waited_s)

    def started(self, ms: float) -> None:
        """An instance started (or was claimed from the pool) in `ms`."""
        self.starts += 1
        self.cold_start_ms_total += ms

    def stopped(self, instance: Instance, cpu_seconds: float, now: float) -> None:
        """An instance is gone: what it used stays in the app's totals."""
        self.cpu_seconds_stopped += cpu_seconds
        self.instance_seconds_stopped += now - instance.started_mono

    def stats(self, live: Sequence[Instance], cgroups: CgroupReader, now: float, starting: int = 0) -> AppStats:
        """The app's AppStats: these counters plus its live instances' figures now (`starting`:
        the starts in progress, which have no Instance yet)."""
        memory = {}
        for inst in live:
            figures = cgroups.cgroup_stats(inst.name)
            memory[inst.name] = figures.memory_bytes if figures is not None else 0
        frozen = {i.name for i in live if RECORDED_STATE[i.state] == "frozen"}
        counts = InstanceCounts(total=len(live), frozen=len(frozen), starting=starting)
        for inst in live:
            recorded = RECORDED_STATE[inst.state]
            counts.ready += recorded == "ready"
            counts.draining += recorded == "draining"
        request_duration = self.request_duration.snapshot()
        cold_start_duration = {path: h.snapshot() for path, h in self.cold_start_duration.items()}
        return AppStats(
            requests=request_duration.count,
            status={f"{n}xx": self.status_classes[n] for n in range(1, 6)},
            failed=self.failed,
            request_seconds=request_duration.sum,
            cpu_seconds=round(self.cpu_seconds_stopped + sum(cgroups.cpu_seconds(i.name) for i in live), 6),
            instance_seconds=round(self.instance_seconds_stopped + sum(now - i.started_mono for i in live), 3),
            instances=counts,
            starts=self.starts,
            cold_start_ms_avg=round(self.cold_start_ms_total / self.starts, 1) if self.starts else None,
            cold_paths={path: h.count for path, h in cold_start_duration.items()},
            freezes=self.freezes,
            memory_bytes=sum(memory.values()),
            frozen_memory_bytes=sum(memory[name] for name in frozen),
            request_duration=request_duration,
            cold_start_duration=cold_start_duration,
        )
