import pytest

from fcrun.errors import SpecError
from fcrun.units import cpu_to_quota_us, format_bytes, parse_cpu, parse_duration, parse_memory


@pytest.mark.parametrize("text,expected", [("512M", 512 << 20), ("1G", 1 << 30), ("1.5g", 3 << 29),
                                           ("64MiB", 64 << 20), ("8388608", 8 << 20), ("100k", None)])
def test_parse_memory(text, expected):
    if expected is None:
        with pytest.raises(SpecError, match="below the minimum"):
            parse_memory(text)
    else:
        assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1M", "1X", ""])
def test_parse_memory_rejects_garbage_and_names_the_option(text):
    with pytest.raises(SpecError) as info:
        parse_memory(text, "--memory")
    assert "--memory" in str(info.value)


def test_cpu_fraction_to_quota():
    assert parse_cpu("0.3") == 0.3
    assert cpu_to_quota_us(0.3) == 30_000
    assert cpu_to_quota_us(2) == 200_000
    for bad in ("0", "abc", "-1", "5000"):
        with pytest.raises(SpecError, match="--cpu"):
            parse_cpu(bad)


def test_durations():
    assert parse_duration("500ms") == 0.5
    assert parse_duration("60s") == 60
    assert parse_duration("5m") == 300
    assert parse_duration(12) == 12.0
    with pytest.raises(SpecError, match="idle"):
        parse_duration("soon", "idle-timeout")


def test_format_bytes():
    assert format_bytes(None) == "-"
    assert format_bytes(512 << 20) == "512M"
    assert format_bytes(1 << 30) == "1G"
