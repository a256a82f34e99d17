"""The shared ranges (msgspec constraints) and how their errors read."""

from __future__ import annotations

import msgspec
import pytest

from fcrun.constraints import (MACHINE_CPUS, MIN_PIDS_MAX, Count, Cpu, MachineCpu, MemoryBytes, PidsMax, PoolSize,
                               Port, PositiveSeconds, Seconds, describe, spec_error)
from fcrun.errors import SpecError
from fcrun.instance import MIN_PIDS_MAX as INSTANCE_MIN_PIDS_MAX


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    cpu: Cpu = 1.0
    machine_cpu: MachineCpu = 1.0
    memory_bytes: MemoryBytes = 1 << 30
    pids_max: PidsMax | None = None
    timeout_s: PositiveSeconds = 1.0
    delay_s: Seconds = 0.0
    count: Count = 0
    port: Port | None = None
    sizes: dict[str, PoolSize] = {}
    ports: list[Port] = []


@pytest.mark.parametrize("fields, where, message", [
    ({"cpu": 0.001}, "$.cpu", "cpu must be at least 0.01"),
    ({"cpu": 2000}, "$.cpu", "cpu must be at most 1024"),
    ({"machine_cpu": MACHINE_CPUS + 1}, "$.machine_cpu", f"machine_cpu must be at most {MACHINE_CPUS}"),
    ({"memory_bytes": 1024}, "$.memory_bytes", "memory_bytes must be at least 4194304"),
    ({"pids_max": MIN_PIDS_MAX - 1}, "$.pids_max", f"pids_max must be at least {MIN_PIDS_MAX}"),
    ({"pids_max": 1 << 23}, "$.pids_max", "pids_max must be at most 4194304"),
    ({"timeout_s": 0}, "$.timeout_s", "timeout_s must be positive"),
    ({"timeout_s": float("nan")}, "$.timeout_s", "timeout_s must be positive"),
    ({"timeout_s": float("inf")}, "$.timeout_s", "timeout_s must be a finite number"),
    ({"delay_s": -1.0}, "$.delay_s", "delay_s must be at least 0"),
    ({"count": -1}, "$.count", "count must be at least 0"),
    ({"count": True}, "$.count", "Expected `int`, got `bool`"),
    ({"port": 65536}, "$.port", "port must be at most 65535"),
    ({"sizes": {"a": 1025}}, "$.sizes[...]", "each value of sizes must be at most 1024"),
    ({"ports": [80, 0]}, "$.ports[1]", "ports[1] must be at least 1"),
    ({"colour": 1}, "$.colour", "unknown key `colour`"),
])
def test_out_of_range_values_are_named_at_their_path(fields, where, message):
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(fields, Settings)
    assert describe(info.value) == (message, where)
    error = spec_error(info.value, "fcrun.toml")
    assert isinstance(error, SpecError) and error.where == where
    assert str(error) == f"fcrun.toml: {message} (at {where})"


def test_values_in_range_pass_and_ints_are_taken_for_floats():
    settings = msgspec.convert({"cpu": 2, "timeout_s": 5, "pids_max": MIN_PIDS_MAX, "port": 80}, Settings)
    assert settings.cpu == 2.0 and isinstance(settings.cpu, float) and settings.pids_max == MIN_PIDS_MAX


def test_a_struct_built_in_python_is_checked_when_converted():
    built = Settings(memory_bytes=1)  # nothing checks it here
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(msgspec.to_builtins(built), Settings)
    assert describe(info.value) == ("memory_bytes must be at least 4194304", "$.memory_bytes")


def test_the_instance_pids_floor_is_the_same_constant():
    assert INSTANCE_MIN_PIDS_MAX is MIN_PIDS_MAX
