"""What the benchmarks here share: the check that they can run, and how they sum up timings.

A module of bench/, imported by the scripts beside it (each puts bench/ on sys.path first, as
`fcrun bench` loads a script by its path and does not).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile

SKIPPED = 77  # the exit status of a benchmark that cannot run here (automake's "skip")


def preflight(script: str, tools: tuple[str, ...] = ()) -> int:
    """0 if this process is root and every tool is on PATH; else SKIPPED, having said why on stderr."""
    if os.geteuid() != 0:
        print(f"{script}: needs root", file=sys.stderr)
        return SKIPPED
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"{script}: needs {tool}", file=sys.stderr)
            return SKIPPED
    return 0


def process_stats() -> dict[int, list[str]]:
    """Every process's /proc/PID/stat fields after its command name, by pid (fields[1] is the
    parent's pid, fields[7] the minor faults); a process gone meanwhile is left out."""
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        stats[int(entry)] = stat.rpartition(")")[2].split()
    return stats


def percentile(values: list[float], q: float) -> float:
    """The value at percentile q (0..100) of values, nearest rank (no interpolation); nan if none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values_ms: list[float], digits: int = 2) -> dict:
    """median_ms, p99_ms, min_ms, max_ms and n of timings in milliseconds, rounded to digits.

    Raises:
        ValueError: values_ms is empty.
    """
    return {"median_ms": round(statistics.median(values_ms), digits),
            "p99_ms": round(percentile(values_ms, 99), digits),
            "min_ms": round(min(values_ms), digits), "max_ms": round(max(values_ms), digits), "n": len(values_ms)}


def work_dir_with_site(prefix: str, index_php: str) -> tuple[str, str]:
    """A new temporary directory (removed by the caller) holding site/index.php: (work, site).

    Both are world-readable: the site is an app's docroot, mounted into containers whose users
    are not root on the host.
    """
    work = tempfile.mkdtemp(prefix=prefix)
    site = os.path.join(work, "site")
    os.mkdir(site)
    with open(os.path.join(site, "index.php"), "w") as f:
        f.write(index_php)
    os.chmod(work, 0o755)
    return work, site
