"""Per-app stats in the Prometheus text exposition format (0.0.4), for GET /metrics.

The metric names are an interface: dashboards and alerts use them, so they do not change.
"""

from __future__ import annotations

from ..cmdb.models import AppStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render_metrics(stats: dict[str, AppStats]) -> str:
    """Prometheus text exposition (format 0.0.4) of per-app stats."""
    lines: list[str] = []

    def family(metric: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP fcrun_{metric} {help_text}")
        lines.append(f"# TYPE fcrun_{metric} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            lines.append(f"fcrun_{metric}{{{label_text}}} {_sample_value(value)}")

    family("requests_total", "counter", "Requests proxied, by app and status class.",
           [({"app": a, "class": c}, n) for a, s in stats.items() for c, n in sorted(s.status.items())])
    family("request_seconds_total", "counter", "Request processing time (first request byte to last response byte).",
           [({"app": a}, s.request_seconds) for a, s in stats.items()])
    family("cpu_seconds_total", "counter", "Container CPU time (cgroup).",
           [({"app": a}, s.cpu_seconds) for a, s in stats.items()])
    family("instance_seconds_total", "counter", "Time instances existed.",
           [({"app": a}, s.instance_seconds) for a, s in stats.items()])
    family("instances", "gauge", "Instances ready to serve.",
           [({"app": a}, s.instances.ready) for a, s in stats.items()])
    family("instances_frozen", "gauge", "Instances frozen (idle for freeze-after; thawed by the next request).",
           [({"app": a}, s.instances.frozen) for a, s in stats.items()])
    family("memory_bytes", "gauge", "Memory of the app's instances (cgroup), by state.",
           [({"app": a, "state": "frozen"}, s.frozen_memory_bytes) for a, s in stats.items()]
           + [({"app": a, "state": "running"}, s.memory_bytes - s.frozen_memory_bytes) for a, s in stats.items()])
    family("cold_starts_total", "counter", "Requests that found no ready instance, by how one was found: "
           "thaw (frozen), pool (pre-warmed), start (new).",
           [({"app": a, "path": p}, n) for a, s in stats.items() for p, n in sorted(s.cold_paths.items())])
    family("freezes_total", "counter", "Instances frozen after freeze-after idle.",
           [({"app": a}, s.freezes) for a, s in stats.items()])
    return "\n".join(lines) + "\n"


def _sample_value(value: float) -> str:
    # repr keeps every digit of a large counter, where :g would round it to six.
    return str(value) if isinstance(value, int) else repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
