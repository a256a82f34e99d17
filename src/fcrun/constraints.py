"""The ranges fcrun accepts for numbers that cross a boundary, as msgspec constraints.

A Struct field typed with one of these (``memory_bytes: MemoryBytes``) is checked wherever
msgspec decodes or converts into the Struct: serve's TOML config, a fork-server message, an app
in `validate_app`. The check is msgspec's, so the error carries the field's path
(``$.forkserver.pool_memory_bytes``) for free, and `spec_error` turns it into a SpecError that
says in words what the field must be::

    fcrun.toml: pool_memory_bytes must be at least 4194304 (at $.forkserver.pool_memory_bytes)

A value built in Python (``App(cpu=0)``) is not checked until it is converted
(``msgspec.convert(msgspec.to_builtins(app), App)``, as `validate_app` does).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Annotated

import msgspec
from msgspec import Meta

from .cgroups.limits import PID_MAX_LIMIT
from .errors import SpecError
from .units import MAX_SIZE_BYTES, MIN_MEMORY_BYTES

MIN_CPU = 0.01  # a fraction of one CPU: the kernel's smallest quota is 1 ms a 100 ms period
MAX_CPU = 1024.0
MACHINE_CPUS = os.cpu_count() or 1
MIN_PIDS_MAX = 8  # an app's own pids limit may not go lower: init, the server and a worker or two
MAX_POOL_SIZE = 1024  # pooled instances of one image
# msgspec has no "finite" constraint: at most the largest float refuses inf (and NaN, which
# fails every comparison).
MAX_FINITE = sys.float_info.max
# Integers end in the CMDB: counts in INTEGER columns, byte sizes in BIGINT ones (PostgreSQL's
# ranges; SQLite's one integer type is 64-bit). Beyond them an app would be refused by the
# database, not by its check, and one stored in SQLite could not move to PostgreSQL.
MAX_INT32 = 2**31 - 1
MAX_INT64 = MAX_SIZE_BYTES

Cpu = Annotated[float, Meta(ge=MIN_CPU, le=MAX_CPU)]  # what units.parse_cpu accepts
MachineCpu = Annotated[float, Meta(ge=MIN_CPU, le=MACHINE_CPUS)]  # and at most this machine's CPUs
MemoryBytes = Annotated[int, Meta(ge=MIN_MEMORY_BYTES, le=MAX_INT64)]
PidsMax = Annotated[int, Meta(ge=MIN_PIDS_MAX, le=PID_MAX_LIMIT)]
Seconds = Annotated[float, Meta(ge=0, le=MAX_FINITE)]
PositiveSeconds = Annotated[float, Meta(gt=0, le=MAX_FINITE)]
Count = Annotated[int, Meta(ge=0, le=MAX_INT32)]
PositiveCount = Annotated[int, Meta(ge=1, le=MAX_INT32)]
BigCount = Annotated[int, Meta(ge=0, le=MAX_INT64)]  # a BIGINT column's: byte sizes, event ids, request counts
Port = Annotated[int, Meta(ge=1, le=65535)]
PoolSize = Annotated[int, Meta(ge=0, le=MAX_POOL_SIZE)]

_BOUND = re.compile(r"Expected `\w+` (>=|>|<=|<) (\S+)")
_WORDS = {">=": "at least", ">": "above", "<=": "at most", "<": "below"}
_FIELD = re.compile(r"([A-Za-z_][\w-]*)((?:\[[^\]]*\])*)$")  # the last key of a path, and any index


def describe(exc: msgspec.ValidationError | msgspec.DecodeError) -> tuple[str, str]:
    """A msgspec error as (message, location): ``("cpu must be at least 0.01", "$.limits.cpu")``.

    msgspec says ``Expected `float` >= 0.01 - at `$.limits.cpu```: a range is put in words
    naming the field, an unknown or missing field gets its own path
    (``unknown key `x``` at ``$.proxy.x``); anything else is msgspec's own words.
    """
    text = str(exc)
    message, sep, location = text.rpartition(" - at `")
    if sep:
        location = location.rstrip("`")
    else:
        message, location = text, "$"
    known = re.fullmatch(r"Object (contains unknown|missing required) field `([^`]*)`", message)
    if known:
        kind = "unknown key" if known.group(1) == "contains unknown" else "missing required key"
        return f"{kind} `{known.group(2)}`", f"{location}.{known.group(2)}"
    bound = _BOUND.fullmatch(message)
    if bound:
        op, value = bound.groups()
        field = _FIELD.search(location)
        if field is None:
            name = "the value"
        elif field.group(2).endswith("[...]"):  # msgspec's path for a value in a dict
            name = f"each value of {field.group(1)}"
        else:
            name = field.group(1) + field.group(2)
        if op == "<=" and float(value) == MAX_FINITE:
            return f"{name} must be a finite number", location
        if op == ">" and float(value) == 0:
            return f"{name} must be positive", location
        return f"{name} must be {_WORDS[op]} {value.removesuffix('.0')}", location
    return message, location


def spec_error(exc: msgspec.ValidationError | msgspec.DecodeError, source: str = "") -> SpecError:
    """A msgspec error as a SpecError located at the field's path (see `describe`), its
    message prefixed with ``<source>: ``."""
    message, location = describe(exc)
    return SpecError(f"{source}: {message}" if source else message, location)


__all__ = [
    "MACHINE_CPUS", "MAX_CPU", "MAX_FINITE", "MAX_INT32", "MAX_INT64", "MAX_POOL_SIZE", "MIN_CPU", "MIN_PIDS_MAX",
    "BigCount", "Count", "Cpu", "MachineCpu", "MemoryBytes", "PidsMax", "PoolSize", "Port", "PositiveCount",
    "PositiveSeconds", "Seconds", "describe", "spec_error",
]
