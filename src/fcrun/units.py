"""Parsing of human units: memory sizes, CPU fractions, durations, signals.

Each parser raises SpecError naming the option it was given, so a CLI flag or a config key
is reported where the user wrote it.
"""

from __future__ import annotations

import re
import signal

from .errors import SpecError

CPU_PERIOD_US = 100_000  # the kernel's default CFS period; cpu.max "30000 100000" is 0.3 CPU

# Patterns, compiled by re (and cached there) at their first use: compiling them at import cost
# every `fcrun run` ~0.3 ms, and one without --memory or a duration uses neither.
# ASCII digits only ((?a)): \d would take other scripts' digits, which no user means.
_SIZE = r"(?ai)^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$"
_SIZE_FACTOR = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION = r"(?a)^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$"
_DURATION_FACTOR = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

MIN_MEMORY_BYTES = 4 << 20  # below this a container cannot even exec a shell
MAX_SIZE_BYTES = (1 << 63) - 1  # a signed 64-bit integer: a cgroup limit, the CMDB's BIGINT
_MAX_DURATION_S = 100 * 365 * 86400.0  # a century: more is a typo, and inf or NaN would break timers


def is_decimal(text: str, max_digits: int = 19) -> bool:
    """Whether `text` is a plain number: 1 to `max_digits` ASCII digits (19: any 64-bit one).

    str.isdigit alone also takes other digits ("²", "٣"), which int() refuses or reads, and
    int() refuses more than 4,300 digits: either was a traceback where a clear error belongs.
    """
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


def parse_size(text: str | int, where: str, what: str = "size", example: str = "10M") -> int:
    """'10M', '1G', '1.5g', '65536' (bytes) -> bytes. Powers of 1024, as docker and runc use.

    Raises:
        SpecError: not a size, negative, or above MAX_SIZE_BYTES (naming `what` and `where`).
    """
    if isinstance(text, int):
        value = text
    else:
        m = re.match(_SIZE, text)
        if not m:
            raise SpecError(f"invalid {what} {text!r}: use a number with K, M, G or T (e.g. {example})", where)
        number, factor = m.group(1), _SIZE_FACTOR[m.group(2).lower()]
        if len(number.partition(".")[0]) > 19:  # past any 64-bit size, whatever the unit
            raise SpecError(f"{what} {text[:40]!r}... is too large", where)
        # Whole numbers exactly (a float has 53 bits); a fraction of a unit rounded down.
        value = int(number) * factor if "." not in number else int(float(number) * factor)
    if value < 0:
        raise SpecError(f"{what} {text!r} is negative", where)
    if value > MAX_SIZE_BYTES:
        raise SpecError(f"{what} {text!r} is too large: at most {MAX_SIZE_BYTES} bytes", where)
    return value


def parse_memory(text: str | int, where: str = "--memory") -> int:
    """'512M', '1G', '1.5g', '65536' (bytes) -> bytes, at least MIN_MEMORY_BYTES."""
    value = parse_size(text, where, "memory size", "512M")
    if value < MIN_MEMORY_BYTES:
        raise SpecError(f"memory limit {text!r} is below the minimum of 4M", where)
    return value


def parse_cpu(text: str | float, where: str = "--cpu") -> float:
    """'0.3' -> 0.3 CPUs (fraction of one CPU; 2 means two full CPUs)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SpecError(f"invalid CPU amount {text!r}: use a fraction of one CPU such as 0.3", where) from None
    if not 0.01 <= value <= 1024:
        raise SpecError(f"CPU amount {text!r} is out of range 0.01..1024", where)
    return value


def cpu_to_quota_us(cpus: float, period_us: int = CPU_PERIOD_US) -> int:
    """0.3 CPU over a 100 ms period -> a 30 000 us quota."""
    return max(1000, round(cpus * period_us))


def quota_to_cpu(quota_us: int | None, period_us: int = CPU_PERIOD_US) -> float | None:
    return None if quota_us is None else quota_us / period_us


def parse_duration(text: str | float | int, where: str = "duration") -> float:
    """'60s', '500ms', '5m', '2h', '30' (seconds) -> seconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.match(_DURATION, text)
        if not m:
            raise SpecError(f"invalid duration {text!r}: use e.g. 500ms, 60s, 5m", where)
        value = float(m.group(1)) * _DURATION_FACTOR[m.group(2)]
    if value < 0:
        raise SpecError(f"duration {text!r} is negative", where)
    if not value <= _MAX_DURATION_S:  # also NaN
        raise SpecError(f"duration {str(text)[:40]!r} is too long: at most 100 years", where)
    return value


def parse_signal(text: str, where: str = "SIGNAL") -> int:
    """'KILL', 'SIGTERM', 'usr1', '9' -> the signal's number (`fcrun kill`, `fcrun-oci kill`).

    Raises:
        SpecError: no such signal.
    """
    name = text.upper()
    if name.isascii() and name.isdigit():
        if not is_decimal(name.lstrip("0"), 3) or not 0 < int(name) < signal.NSIG:
            raise SpecError(f"invalid signal number {text!r}: use 1-{signal.NSIG - 1}", where)
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise SpecError(f"unknown signal {text!r}", where) from None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor and n % (factor // 16 or 1) == 0 or n >= factor * 10:
            return f"{n / factor:.4g}{unit}"
    return f"{n}B"
