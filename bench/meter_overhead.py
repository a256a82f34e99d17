#!/usr/bin/env python3
"""The request path's cost of the request-duration histogram (issue 16): Meter.request_done
now against the method as it was before (kept here), in one run, interleaved round by round
so that background noise hits both alike. Both count a request, its status class, its time;
now also into a histogram bucket (and the status class into a list, not an f-string's key).

Prints JSON: per variant the median over rounds of ns per call, and now - before.
before_plus_histogram is before with the histogram's observe() added (its own cost).
Usage: bench/meter_overhead.py [--rounds 15] [--calls 200000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, field

from fcrun.serve.metering import REQUEST_BOUNDS_S, DurationHistogram, Meter


@dataclass
class MeterBefore:
    """Meter's request counters and request_done as they were before the histogram (edd7c5a)."""

    requests: int = 0
    status: dict[str, int] = field(default_factory=lambda: {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0})
    failed: int = 0
    request_seconds: float = 0.0

    def request_done(self, status: int, elapsed_s: float, failed: bool) -> None:
        self.requests += 1
        self.request_seconds += elapsed_s
        if failed:
            self.failed += 1
        if 100 <= status < 600:
            self.status[f"{status // 100}xx"] += 1


@dataclass
class MeterBeforePlusHistogram(MeterBefore):
    """`before` with only the histogram added: the histogram's own cost, apart from the saving."""

    request_duration: DurationHistogram = field(default_factory=lambda: DurationHistogram(REQUEST_BOUNDS_S))

    def request_done(self, status: int, elapsed_s: float, failed: bool) -> None:
        self.requests += 1
        self.request_seconds += elapsed_s
        self.request_duration.observe(elapsed_s)
        if failed:
            self.failed += 1
        if 100 <= status < 600:
            self.status[f"{status // 100}xx"] += 1


def ns_per_call(meter: Meter | MeterBefore, durations: list[float], calls: int) -> float:
    done = meter.request_done
    n = len(durations)
    t0 = time.perf_counter_ns()
    for i in range(calls):
        done(200, durations[i % n], False)
    return (time.perf_counter_ns() - t0) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    rng = random.Random(16)
    # Durations spread over the buckets as a real mix would be: mostly a few ms, some slow.
    durations = [rng.lognormvariate(-5.5, 1.2) for _ in range(4096)]
    variants = {"before": MeterBefore, "now": Meter, "before_plus_histogram": MeterBeforePlusHistogram}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in rng.sample(list(variants), len(variants)):
            times[name].append(ns_per_call(variants[name](), durations, args.calls))
    medians = {name: round(statistics.median(t), 1) for name, t in times.items()}
    print(json.dumps({"rounds": args.rounds, "calls_per_round": args.calls, "ns_per_call_median": medians,
                      "now_minus_before_ns": round(medians["now"] - medians["before"], 1)}, indent=2))


if __name__ == "__main__":
    main()
