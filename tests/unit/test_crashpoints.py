"""The crash-point test hook (fcrun/crashpoints.py): parsing, where the code names its steps,
and that a process really dies by SIGKILL at the n-th time, once across processes with a mark."""

from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import sys

import pytest

from fcrun.crashpoints import CRASH_AT_ENV, CRASH_MARK_ENV, STEPS, parse_crash_at

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "fcrun"
CALL = re.compile(r"""crash_point\(["']([^"']+)["']\)""")


def _named_in_code() -> list[str]:
    return [m for path in SRC.rglob("*.py") if path.name != "crashpoints.py" for m in CALL.findall(path.read_text())]


def test_parse_takes_a_step_and_an_optional_count():
    assert parse_crash_at("") == (None, 0)
    assert parse_crash_at("create.cgroup") == ("create.cgroup", 1)
    assert parse_crash_at("delete.network:3") == ("delete.network", 3)


@pytest.mark.parametrize("value", ["create.nothing", "create.cgroup:0", "create.cgroup:x", "create.cgroup:-1"])
def test_a_bad_value_is_refused_so_a_typo_never_passes_a_crash_test(value):
    with pytest.raises(ValueError, match=CRASH_AT_ENV):
        parse_crash_at(value)


def test_every_step_is_named_once_in_the_code_and_the_code_names_no_other():
    named = _named_in_code()
    assert set(named) <= set(STEPS), sorted(set(named) - set(STEPS))
    assert set(STEPS) <= set(named), sorted(set(STEPS) - set(named))
    assert len(STEPS) == len(set(STEPS))


def _run(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = ("from fcrun.crashpoints import crash_point\n"
            "for i in range(3):\n"
            "    crash_point('create.saved')\n"
            "    print(i, flush=True)\n")
    return subprocess.run([sys.executable, "-c", code], env={**env, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)


def test_the_process_dies_by_sigkill_the_nth_time_it_reaches_the_step():
    r = _run({CRASH_AT_ENV: "create.saved:2"})
    assert r.returncode == -signal.SIGKILL
    assert r.stdout.split() == ["0"]


def test_unset_or_another_step_changes_nothing():
    assert _run({}).stdout.split() == ["0", "1", "2"]
    assert _run({CRASH_AT_ENV: "delete.done"}).stdout.split() == ["0", "1", "2"]


def test_with_a_mark_only_the_first_process_dies(tmp_path):
    env = {CRASH_AT_ENV: "create.saved", CRASH_MARK_ENV: str(tmp_path / "crashed")}
    assert _run(env).returncode == -signal.SIGKILL
    second = _run(env)
    assert second.returncode == 0 and second.stdout.split() == ["0", "1", "2"]
