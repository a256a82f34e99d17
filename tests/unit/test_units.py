import pytest

from fcrun.errors import SpecError
from fcrun.units import MAX_SIZE_BYTES, cpu_to_quota_us, format_bytes, parse_cpu, parse_duration, parse_memory, \
    parse_signal, parse_size


@pytest.mark.parametrize("text,expected", [("512M", 512 << 20), ("1G", 1 << 30), ("1.5g", 3 << 29),
                                           ("64MiB", 64 << 20), ("8388608", 8 << 20), ("100k", None)])
def test_parse_memory(text, expected):
    if expected is None:
        with pytest.raises(SpecError, match="below the minimum"):
            parse_memory(text)
    else:
        assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1M", "1X", "",
                                  "9" * 400,  # a float's inf: int() raised OverflowError (a traceback)
                                  "99999999999T",  # past a 64-bit size
                                  "\u0663M"])  # ARABIC-INDIC DIGIT THREE: \d took it
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


def test_sizes_are_exact_up_to_the_largest_64_bit_one():
    assert parse_size(str(MAX_SIZE_BYTES), "--max-body") == MAX_SIZE_BYTES  # whole numbers not through a float
    assert parse_size("8191.5T", "--max-body") == int(8191.5 * (1 << 40))
    with pytest.raises(SpecError, match="too large"):
        parse_size(str(MAX_SIZE_BYTES + 1), "--max-body")


@pytest.mark.parametrize("text", ["\u00b2", "0" * 400 + "99", "65", "0"])  # "²": isdigit() took it, int() did not
def test_a_signal_number_is_ascii_digits_in_range(text):
    with pytest.raises(SpecError) as info:
        parse_signal(text, "SIGNAL")
    assert info.value.where == "SIGNAL"


def test_durations():
    assert parse_duration("500ms") == 0.5
    assert parse_duration("60s") == 60
    assert parse_duration("5m") == 300
    assert parse_duration(12) == 12.0
    with pytest.raises(SpecError, match="idle"):
        parse_duration("soon", "idle-timeout")
    for too_long in ("9" * 400, float("inf"), float("nan"), "1000000h"):
        with pytest.raises(SpecError, match="idle"):  # inf or NaN would break every timer that uses it
            parse_duration(too_long, "idle-timeout")


def test_format_bytes():
    assert format_bytes(None) == "-"
    assert format_bytes(512 << 20) == "512M"
    assert format_bytes(1 << 30) == "1G"
