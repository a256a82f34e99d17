"""Per-app stats in the Prometheus text exposition format (0.0.4), for GET /metrics.

The metric names are an interface: dashboards and alerts use them, so they change only on
purpose, with an old -> new table in README's Metrics section (issue 16 renamed them to
Prometheus' conventions: one `fcrun_instances{state}` gauge, a `code` label, histograms).

Cardinality is kept to what an operator can afford with 1,000 apps: `code` is the status
class ("2xx"), not the status (an app may answer any of 500 codes); the request histogram is
per app only; a cold-start histogram appears for a path once the app has a cold start by it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from dataclasses import dataclass

from ..cmdb.models import AppStats, Histogram
from ..mountinfo import PROC_SELF_MOUNTINFO, mount_at, parse_mountinfo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CGROUP_ROOT = "/sys/fs/cgroup"
# What InstanceCounts holds, by the `state` label of fcrun_instances (the CMDB's vocabulary).
INSTANCE_STATES = ("ready", "frozen", "starting", "draining")


@dataclass(frozen=True)
class BuildInfo:
    """The labels of fcrun_build_info."""

    version: str
    python: str
    cgroup: str  # "v1" or "v2" (as cgroups.detect() picks it), "unknown" when mountinfo cannot be read


@functools.cache
def build_info(mountinfo: str = PROC_SELF_MOUNTINFO) -> BuildInfo:
    """This process's BuildInfo (read once: none of it changes while serve runs)."""
    try:
        version = importlib.metadata.version("fcrun")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
        version = "unknown"
    return BuildInfo(version=version, python=platform.python_version(), cgroup=host_cgroup_version(mountinfo))


def host_cgroup_version(mountinfo: str = PROC_SELF_MOUNTINFO) -> str:
    """"v2" when /sys/fs/cgroup itself is a cgroup2 mount, else "v1": the rule cgroups.detect()
    applies (a hybrid host's controller-less cgroup2 at /sys/fs/cgroup/unified is v1 to fcrun)."""
    try:
        with open(mountinfo) as f:
            top = mount_at(parse_mountinfo(f.read()), CGROUP_ROOT)
    except OSError:
        return "unknown"
    return "v2" if top is not None and top.fstype == "cgroup2" else "v1"


def render_metrics(stats: dict[str, AppStats], build: BuildInfo | None = None) -> str:
    """Prometheus text exposition (format 0.0.4) of per-app stats, plus fcrun_build_info
    (`build`: this process's when None)."""
    build = build or build_info()
    apps = [(_escape_label(name), s) for name, s in stats.items()]
    lines: list[str] = []

    def family(metric: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP fcrun_{metric} {help_text}")
        lines.append(f"# TYPE fcrun_{metric} {kind}")

    def samples(metric: str, rows: list[tuple[str, float]]) -> None:
        lines.extend(f"fcrun_{metric}{{{labels}}} {_sample_value(value)}" for labels, value in rows)

    family("build_info", "gauge", "Always 1; the labels say which fcrun, Python and cgroup version serve runs.")
    samples("build_info", [(f'version="{_escape_label(build.version)}",python="{_escape_label(build.python)}",'
                            f'cgroup="{_escape_label(build.cgroup)}"', 1)])

    family("requests_total", "counter", "Requests proxied, by app and status class (code: 1xx..5xx).")
    samples("requests_total", [(f'app="{a}",code="{c}"', n) for a, s in apps for c, n in sorted(s.status.items())])
    family("request_duration_seconds", "histogram",
           "Request duration, first request byte to last response byte (a cold start's wait included).")
    for a, s in apps:
        _histogram(lines, "fcrun_request_duration_seconds", f'app="{a}"', s.request_duration)

    family("cpu_seconds_total", "counter", "Container CPU time (cgroup).")
    samples("cpu_seconds_total", [(f'app="{a}"', s.cpu_seconds) for a, s in apps])
    family("instance_seconds_total", "counter", "Time instances existed.")
    samples("instance_seconds_total", [(f'app="{a}"', s.instance_seconds) for a, s in apps])
    family("instances", "gauge", "Instances by state: ready (serving), frozen (idle for freeze-after; thawed by "
           "the next request), starting, draining (finishing their requests, then stopped).")
    samples("instances", [(f'app="{a}",state="{state}"', getattr(s.instances, state))
                          for a, s in apps for state in INSTANCE_STATES])
    family("memory_bytes", "gauge", "Memory of the app's instances (cgroup), by state.")
    samples("memory_bytes", [(f'app="{a}",state="frozen"', s.frozen_memory_bytes) for a, s in apps]
            + [(f'app="{a}",state="running"', s.memory_bytes - s.frozen_memory_bytes) for a, s in apps])

    family("cold_starts_total", "counter", "Requests that found no ready instance, by how one was found: "
           "thaw (frozen), pool (pre-warmed), start (new).")
    samples("cold_starts_total", [(f'app="{a}",path="{p}"', n)
                                  for a, s in apps for p, n in sorted(s.cold_paths.items())])
    family("cold_start_duration_seconds", "histogram",
           "How long a request that found no ready instance waited for one, by path (thaw, pool, start).")
    for a, s in apps:
        for path, hist in sorted(s.cold_start_duration.items()):
            if hist.count:  # 3 paths x 19 series x 1,000 apps would be mostly zeros
                _histogram(lines, "fcrun_cold_start_duration_seconds", f'app="{a}",path="{_escape_label(path)}"', hist)

    family("freezes_total", "counter", "Instances frozen after freeze-after idle.")
    samples("freezes_total", [(f'app="{a}"', s.freezes) for a, s in apps])
    return "\n".join(lines) + "\n"


def _histogram(lines: list[str], name: str, labels: str, hist: Histogram) -> None:
    """One histogram's series: cumulative _bucket{le} up to +Inf, then _sum and _count."""
    for bound, count in zip(hist.bounds, hist.counts):
        lines.append(f'{name}_bucket{{{labels},le="{_le(bound)}"}} {count}')
    lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {hist.count}')
    lines.append(f"{name}_sum{{{labels}}} {_sample_value(hist.sum)}")
    lines.append(f"{name}_count{{{labels}}} {hist.count}")


@functools.lru_cache(maxsize=256)
def _le(bound: float) -> str:
    # As Prometheus' own clients write it ("0.005", "1.0"), so that le values match across exporters.
    return repr(float(bound))


def _sample_value(value: float) -> str:
    # repr keeps every digit of a large counter, where :g would round it to six.
    return str(value) if isinstance(value, int) else repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
