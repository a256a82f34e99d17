"""What the dashboard's sampler costs serve: one sample (Manager.stats() of every app, then
the per-app series) and one page of its data, with 1,000 apps, in process.

The manager runs on a fake backend (no containers; the cgroup reads of live instances are
not counted: an idle app has none), so this is the dashboard's own cost on top of what
Manager.stats() already costs /metrics. `--busy N` gives N apps a ready instance and traffic.

    python bench/dashboard_sampler.py [--apps 1000] [--busy 50] [--samples 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import tracemalloc

import msgspec

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "unit"))

from test_manager import FakeBackend  # noqa: E402 - the unit tests' instance backend

from fcrun.cmdb.models import App  # noqa: E402
from fcrun.cmdb.sqlite import SqliteCMDB  # noqa: E402
from fcrun.serve.dashboard import Sampler, cpu_quotas  # noqa: E402
from fcrun.serve.manager import Manager  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--busy", type=int, default=50, help="apps with an instance and requests")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--memory", action="store_true", help="trace memory (slows every figure down)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        cmdb = SqliteCMDB(os.path.join(work, "cmdb.sqlite3"))
        try:
            asyncio.run(measure(cmdb, args))
        finally:
            cmdb.close()


async def measure(cmdb: SqliteCMDB, args: argparse.Namespace) -> None:
    apps = [App(name=f"app-{i}.test", image="apache-php", created_at=1.0) for i in range(args.apps)]
    manager = Manager(cmdb, FakeBackend(), sample_interval_s=0, apps=apps)
    for app in apps[:args.busy]:  # a ready instance each, and requests through it
        lease = await manager.acquire(app.name)
        lease.done(200)
    now = [1000.0]
    sampler = Sampler(manager.stats, lambda: cpu_quotas(manager.apps), clock=lambda: now[0])
    stats_s, sample_s = [], []
    if args.memory:
        tracemalloc.start()
    for _ in range(args.samples):
        for app in apps[:args.busy]:
            for _ in range(20):
                lease = await manager.acquire(app.name)
                lease.done(200)
        now[0] += 1.0
        began = time.perf_counter()
        manager.stats()
        stats_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        sampler.sample()
        sample_s.append(time.perf_counter() - began)
    memory = tracemalloc.get_traced_memory()[0] if args.memory else 0
    tracemalloc.stop()
    began = time.perf_counter()
    for _ in range(100):
        sampler.table(limit=25)
        sampler.series(apps[0].name)
    page_s = (time.perf_counter() - began) / 100
    series_bytes = len(msgspec.json.encode(sampler.series(apps[0].name)))
    print(f"{args.apps} apps ({args.busy} busy), {args.samples} samples: Manager.stats() p50 "
          f"{statistics.median(stats_s) * 1e3:.1f} ms; one sample (stats included) p50 "
          f"{statistics.median(sample_s) * 1e3:.1f} ms, max {max(sample_s) * 1e3:.1f} ms; "
          f"one page of data (25 rows sorted by rate + a full series) {page_s * 1e3:.2f} ms; "
          f"a full series is {series_bytes} bytes of JSON"
          + (f"; memory held after {args.samples} samples ~{memory / 2**20:.1f} MiB (tracemalloc)" if args.memory
             else ""))


if __name__ == "__main__":
    main()
