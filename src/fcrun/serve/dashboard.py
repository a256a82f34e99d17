"""The dashboard's memory: each app's figures, one sample a second for the last five minutes.

`Sampler.sample()` reads every app's cumulative metering (Manager.stats(): counters and
Prometheus-style cumulative histograms) and keeps, per app and second, what the dashboard
draws: requests/s, p50/p99 latency from the histogram's deltas (as Prometheus'
histogram_quantile over a rate), 5xx/s, instances (ready, frozen, total), the CPU quota, and
marks for what happened in that second (a cold start by its path, a freeze, the quota or
the instance count going up or down).

Cheap with 1,000 apps: one tick reads the stats once and writes a few numbers per app into
fixed-size arrays (about 8 KB an app); an idle app costs a comparison and its zeros. The
table's figures (over the last TABLE_WINDOW_S) are computed only for the rows asked for,
after the apps are filtered and sorted by numbers already at hand.

The clock is injected and `sample()` takes no time of its own, so tests drive it step by
step; `run()` is the loop serve owns (one sample a second while a page polls, else one every
IDLE_INTERVAL_S; each sample stores its own time, so rates and the chart stay right).

The HTTP side (routes, the page) is dashboard_http.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from ..cmdb.models import AppStats, Histogram
from .instances import RECORDED_STATE

log = logging.getLogger("fcrun.dashboard")

INTERVAL_S = 1.0  # one sample a second while the dashboard is watched
# Nobody watching: one sample every IDLE_INTERVAL_S. A sample stalls serve's event loop for as
# long as Manager.stats() takes (about 15 ms with 1,000 apps, bench/dashboard_sampler.py), and
# requests that arrive meanwhile wait: once a second that would show in serve's p99 at high
# rates. The first poll of a page wakes the sampler; the chart's older points are sparser.
IDLE_INTERVAL_S = 10.0
WATCHED_FOR_S = 60.0  # after a page's last poll, the sampler keeps one sample a second this long
WINDOW_SAMPLES = 300  # kept: the last five minutes
TABLE_WINDOW_S = 10  # the table's rates and percentiles are over the last ten seconds
NAN = float("nan")

# What happened in a second, as bits of its mark (the page draws one line per bit).
MARK_THAW, MARK_POOL, MARK_START = 1, 2, 4  # a request's cold start, by its path
MARK_FREEZE = 8
MARK_SCALE_UP, MARK_SCALE_DOWN = 16, 32  # the CPU quota changed
MARK_SCALE_OUT, MARK_SCALE_IN = 64, 128  # the number of instances changed
COLD_MARKS = {"thaw": MARK_THAW, "pool": MARK_POOL, "start": MARK_START}
MARK_NAMES = {MARK_THAW: "thaw", MARK_POOL: "pool", MARK_START: "start", MARK_FREEZE: "freeze",
              MARK_SCALE_UP: "scale-up", MARK_SCALE_DOWN: "scale-down", MARK_SCALE_OUT: "scale-out",
              MARK_SCALE_IN: "scale-in"}

SORT_KEYS = ("rate", "name", "errors", "instances", "cpu")


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float:
    """The q-quantile (0..1) of observations counted in cumulative buckets, as Prometheus'
    histogram_quantile estimates it: linear within the bucket that holds the rank, from the
    bucket below's bound (0 for the first). `counts` has one more entry than `bounds` (+Inf);
    a rank in the +Inf bucket gives the highest finite bound. NaN when nothing was counted."""
    total = counts[-1] if counts else 0
    if total <= 0:
        return NAN
    rank = q * total
    i = bisect_left(counts, rank)  # the first bucket whose cumulative count reaches the rank
    if i >= len(bounds):
        return bounds[-1] if bounds else NAN
    lower = bounds[i - 1] if i > 0 else 0.0
    below = counts[i - 1] if i > 0 else 0
    in_bucket = counts[i] - below
    if in_bucket <= 0:
        return bounds[i]
    return lower + (bounds[i] - lower) * (rank - below) / in_bucket


def cpu_quotas(apps: Mapping[str, Any]) -> dict[str, float]:
    """Each app's CPU quota now: the sum of its unfrozen instances' quotas (a frozen one may
    use none). `apps`: the manager's AppStates by name (their `instances`, each with a `cpu`
    and a `state`)."""
    quotas = {}
    for name, state in apps.items():
        quotas[name] = sum(inst.cpu or 0.0 for inst in state.instances.values()
                           if RECORDED_STATE[inst.state] in ("ready", "draining"))
    return quotas


class _Cumulative(msgspec.Struct, frozen=True, array_like=True):
    """One app's counters as they stood at a sample (for the table's window)."""

    t: float
    requests: int
    errors: int  # 5xx
    counts: tuple[int, ...]  # the request histogram's cumulative buckets


class AppSeries:
    """One app's last WINDOW_SAMPLES samples, in ring buffers indexed by the sampler's tick,
    and what its previous samples saw (for the deltas and the table's window)."""

    __slots__ = ("first_tick", "rps", "p50_ms", "p99_ms", "errors", "ready", "frozen", "total", "cpu", "marks",
                 "bounds", "prev", "recent", "cold", "cold_duration", "freezes", "starting")

    def __init__(self, first_tick: int):
        self.first_tick = first_tick  # the first tick it has a sample for
        n = WINDOW_SAMPLES
        self.rps, self.p50_ms, self.p99_ms, self.errors, self.cpu = (array("f", [0.0]) * n for _ in range(5))
        self.ready, self.frozen, self.total = (array("H", [0]) * n for _ in range(3))
        self.marks = array("B", [0]) * n
        self.bounds: list[float] = []
        self.prev: _Cumulative | None = None
        self.recent: deque[_Cumulative] = deque(maxlen=TABLE_WINDOW_S + 1)
        self.cold: dict[str, int] = {}  # cold starts by path, since serve started
        self.cold_duration: dict[str, Histogram] = {}  # their waits by path, since serve started
        self.freezes = 0
        self.starting = 0


class Sampler:
    """Per-app time series for the dashboard, fed one sample a second.

    Args:
        stats: every app's cumulative metering (Manager.stats).
        quotas: every app's CPU quota now (`cpu_quotas` of the manager's apps).
        clock: wall-clock seconds (the page's time axis, and the events' timestamps, are wall time).
    """

    def __init__(self, stats: Callable[[], dict[str, AppStats]], quotas: Callable[[], dict[str, float]],
                 clock: Callable[[], float] = time.time):
        self.stats = stats
        self.quotas = quotas
        self.clock = clock
        self.tick = -1  # the last sample's tick; -1 before the first
        self.times = array("d", [0.0]) * WINDOW_SAMPLES  # each tick's wall time
        self.apps: dict[str, AppSeries] = {}
        self.sample_cost_s = 0.0  # how long the last sample took
        self._watched_at = float("-inf")  # a page's last poll (the clock's time)
        self._viewer = asyncio.Event()  # set by a page's poll: ends an idle wait early

    def watched(self) -> None:
        """A page polled: one sample a second from now, for WATCHED_FOR_S."""
        if not self.is_watched():
            self._viewer.set()
        self._watched_at = self.clock()

    def is_watched(self) -> bool:
        return self.clock() - self._watched_at < WATCHED_FOR_S

    async def run(self) -> None:
        """Sample every INTERVAL_S while watched, else every IDLE_INTERVAL_S, until cancelled.
        A failed sample is logged; the next goes on."""
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            began = loop.time()
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - the dashboard must not stop serve; it is logged
                if not failing:  # once, not once a second
                    log.exception("dashboard sample failed (logged again once one succeeds and another fails)")
                failing = True
            else:
                failing = False
            self.sample_cost_s = loop.time() - began
            interval_s = INTERVAL_S if self.is_watched() else IDLE_INTERVAL_S
            self._viewer.clear()
            try:  # from the sample's start, so that a slow one does not stretch the period
                async with asyncio.timeout_at(began + interval_s):
                    await self._viewer.wait()
            except TimeoutError:
                pass

    def sample(self) -> None:
        """Take one sample of every app now."""
        now = self.clock()
        stats, quotas = self.stats(), self.quotas()
        self.tick += 1
        slot = self.tick % WINDOW_SAMPLES
        self.times[slot] = now
        for gone in self.apps.keys() - stats.keys():
            del self.apps[gone]
        for name, app_stats in stats.items():
            series = self.apps.get(name)
            if series is None:
                series = self.apps[name] = AppSeries(self.tick)
            self._sample_app(series, slot, now, app_stats, quotas.get(name, 0.0))

    def _sample_app(self, s: AppSeries, slot: int, now: float, stats: AppStats, cpu: float) -> None:
        hist = stats.request_duration
        prev, errors = s.prev, stats.status.get("5xx", 0)
        if prev is not None and hist.count == prev.requests and errors == prev.errors:
            cur = _Cumulative(now, prev.requests, errors, prev.counts)  # idle: most apps, most seconds
        else:
            cur = _Cumulative(now, hist.count, errors, tuple(hist.counts))
        s.prev = cur
        s.recent.append(cur)
        s.bounds = hist.bounds
        counts = stats.instances
        marks = 0
        if prev is None:  # its first sample: no deltas yet
            s.rps[slot] = s.errors[slot] = 0.0
            s.p50_ms[slot] = s.p99_ms[slot] = NAN
        else:
            dt = now - prev.t
            served = cur.requests - prev.requests
            s.rps[slot] = served / dt if dt > 0 else 0.0
            s.errors[slot] = (cur.errors - prev.errors) / dt if dt > 0 else 0.0
            if served > 0 and len(prev.counts) == len(cur.counts):
                s.p50_ms[slot], s.p99_ms[slot] = _percentiles_ms(hist.bounds, prev.counts, cur.counts)
            else:
                s.p50_ms[slot] = s.p99_ms[slot] = NAN
            for path, n in stats.cold_paths.items():
                if n > s.cold.get(path, 0):
                    marks |= COLD_MARKS.get(path, 0)
            if stats.freezes > s.freezes:
                marks |= MARK_FREEZE
            before = (slot - 1) % WINDOW_SAMPLES  # the previous tick's slot: every tick samples every app
            same_set = counts.total == s.total[before] and counts.frozen == s.frozen[before]
            if same_set and cpu > s.cpu[before] + 1e-6:  # not a thaw or a new instance: a quota raised
                marks |= MARK_SCALE_UP
            elif same_set and cpu < s.cpu[before] - 1e-6:
                marks |= MARK_SCALE_DOWN
            if counts.total > s.total[before]:
                marks |= MARK_SCALE_OUT
            elif counts.total < s.total[before]:
                marks |= MARK_SCALE_IN
        s.cold = stats.cold_paths  # fresh dicts each time (Manager.stats): kept, not copied
        s.cold_duration = stats.cold_start_duration
        s.freezes = stats.freezes
        s.starting = counts.starting
        s.cpu[slot] = cpu
        s.ready[slot] = min(counts.ready, 0xFFFF)  # the arrays hold 16 bits
        s.frozen[slot] = min(counts.frozen, 0xFFFF)
        s.total[slot] = min(counts.total, 0xFFFF)
        s.marks[slot] = marks

    # -- what the page asks for --------------------------------------------------------------------

    def table(self, search: str = "", sort: str = "rate", offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """One page of the apps table: those whose name contains `search`, sorted by `sort`
        (SORT_KEYS; descending but for name), `limit` rows from `offset`, each with its figures
        over the last TABLE_WINDOW_S."""
        search = search.strip().lower()
        names = [n for n in self.apps if search in n] if search else list(self.apps)
        slot = self.tick % WINDOW_SAMPLES
        if sort == "name":
            names.sort()
        else:
            key: Callable[[str], float]
            if sort == "errors":
                key = lambda n: self._window(self.apps[n])[1]  # noqa: E731
            elif sort == "instances":
                key = lambda n: self.apps[n].total[slot]  # noqa: E731
            elif sort == "cpu":
                key = lambda n: self.apps[n].cpu[slot]  # noqa: E731
            else:
                key = lambda n: self._window(self.apps[n])[0]  # noqa: E731
            names.sort(key=lambda n: (-key(n), n))
        rows = [self._row(n, slot) for n in names[offset:offset + limit]]
        return {"total": len(self.apps), "matched": len(names), "offset": offset, "rows": rows}

    @staticmethod
    def _span(s: AppSeries) -> tuple[_Cumulative, _Cumulative] | None:
        """The samples the table's figures are taken between: the newest, and the oldest within
        TABLE_WINDOW_S of it, or the one before it when samples were sparser (nobody watched)."""
        if len(s.recent) < 2:
            return None
        last = s.recent[-1]
        first = next((c for c in s.recent if last.t - c.t <= TABLE_WINDOW_S + 0.5), s.recent[-2])
        if first is last:
            first = s.recent[-2]
        return (first, last) if last.t > first.t else None

    def _window(self, s: AppSeries) -> tuple[float, float]:
        """(requests/s, 5xx/s) over the table's window."""
        span = self._span(s)
        if span is None:
            return 0.0, 0.0
        first, last = span
        dt = last.t - first.t
        return (last.requests - first.requests) / dt, (last.errors - first.errors) / dt

    def _row(self, name: str, slot: int) -> dict[str, Any]:
        s = self.apps[name]
        rps, errors = self._window(s)
        p50 = p99 = None
        span = self._span(s)
        if span is not None and span[1].requests > span[0].requests and len(span[0].counts) == len(span[1].counts):
            p50, p99 = (round(v, 2) for v in _percentiles_ms(s.bounds, span[0].counts, span[1].counts))
        return {"name": name, "rps": round(rps, 2), "p50_ms": p50, "p99_ms": p99, "errors_per_s": round(errors, 2),
                "errors": s.recent[-1].errors if s.recent else 0, "ready": s.ready[slot], "frozen": s.frozen[slot],
                "total": s.total[slot], "starting": s.starting, "cpu": round(s.cpu[slot], 3), "cold": s.cold,
                "cold_p50_ms": {path: round(histogram_quantile(0.5, h.bounds, h.counts) * 1000, 2)
                                for path, h in s.cold_duration.items() if h.count}}

    def series(self, name: str, since_tick: int = -1) -> dict[str, Any] | None:
        """The app's samples after `since_tick` (all it has, up to WINDOW_SAMPLES, for -1), as
        columns; None when there is no such app. NaN latencies (no request that second) are
        JSON nulls."""
        s = self.apps.get(name)
        if s is None:
            return None
        first = max(since_tick + 1, s.first_tick, self.tick - WINDOW_SAMPLES + 1, 0)
        slots = [t % WINDOW_SAMPLES for t in range(first, self.tick + 1)]

        def column(values: array, digits: int | None = 3) -> list:
            out = [values[i] for i in slots]
            if digits is None:
                return out
            return [None if math.isnan(v) else round(v, digits) for v in out]

        return {"app": name, "from_tick": first, "tick": self.tick, "t": [round(self.times[i], 3) for i in slots],
                "rps": column(s.rps, 2), "p50_ms": column(s.p50_ms, 2), "p99_ms": column(s.p99_ms, 2),
                "errors_per_s": column(s.errors, 2), "cpu": column(s.cpu), "ready": column(s.ready, None),
                "frozen": column(s.frozen, None), "total": column(s.total, None), "marks": column(s.marks, None)}


def _percentiles_ms(bounds: Sequence[float], before: Sequence[int], after: Sequence[int]) -> tuple[float, float]:
    """p50 and p99 (ms) of the observations counted between two cumulative snapshots."""
    delta = [a - b for a, b in zip(after, before)]
    return histogram_quantile(0.5, bounds, delta) * 1000, histogram_quantile(0.99, bounds, delta) * 1000
