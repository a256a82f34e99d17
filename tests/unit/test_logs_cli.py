"""`fcrun logs` and `fcrun app logs` on log directories made here (no root, no container)."""

from __future__ import annotations

import os

from click.testing import CliRunner

from fcrun.logs.files import CURRENT, note_app
from fcrun_cli.main import main


def make_logs(root, name, app, lines):
    directory = root / "logs" / name
    os.makedirs(directory)
    note_app(str(directory), app)
    (directory / f"{CURRENT}.1").write_text("".join(f"{stamp} {text}\n" for stamp, text in lines[:1]))
    (directory / CURRENT).write_text("".join(f"{stamp} {text}\n" for stamp, text in lines[1:]))


def invoke(root, *args):
    return CliRunner().invoke(main, ["--root", str(root), *args])


def test_logs_tail_since_and_timestamps(tmp_path):
    make_logs(tmp_path, "web-1", "web.test", [("2026-12-05T10:00:01.000000Z", "one"),
                                               ("2026-12-05T10:00:02.000000Z", "two"),
                                               ("2026-12-05T10:00:03.000000Z", "three")])
    result = invoke(tmp_path, "logs", "web-1")
    assert result.exit_code == 0, result.output
    assert result.output == "one\ntwo\nthree\n"  # across the rotated file, oldest first
    assert invoke(tmp_path, "logs", "web-1", "--tail", "1").output == "three\n"
    assert invoke(tmp_path, "logs", "web-1", "--since", "2026-12-05T10:00:02Z", "-t").output == (
        "2026-12-05T10:00:02.000000Z two\n2026-12-05T10:00:03.000000Z three\n")


def test_app_logs_merge_instances_by_time_with_their_names(tmp_path):
    make_logs(tmp_path, "web-1", "web.test", [("2026-12-05T10:00:01.000000Z", "a1"), ("2026-12-05T10:00:04.000000Z", "a4")])
    make_logs(tmp_path, "web-2", "web.test", [("2026-12-05T10:00:02.000000Z", "b2"), ("2026-12-05T10:00:03.000000Z", "b3")])
    make_logs(tmp_path, "other-1", "other.test", [("2026-12-05T10:00:00.000000Z", "x"), ("2026-12-05T10:00:05.000000Z", "y")])
    result = invoke(tmp_path, "app", "logs", "web.test")
    assert result.exit_code == 0, result.output
    assert result.output == "web-1 a1\nweb-2 b2\nweb-2 b3\nweb-1 a4\n"
    assert invoke(tmp_path, "app", "logs", "web.test", "--tail", "2").output == "web-2 b3\nweb-1 a4\n"


def test_errors_name_what_was_wrong(tmp_path):
    result = invoke(tmp_path, "logs", "nope")
    assert result.exit_code == 3 and "no logs for container 'nope'" in result.output
    result = invoke(tmp_path, "logs", "../../etc")  # a name is fcrun's: never a path
    assert result.exit_code == 2, result.output
    make_logs(tmp_path, "web-1", "web.test", [("2026-12-05T10:00:01.000000Z", "one"), ("2026-12-05T10:00:02.000000Z", "two")])
    result = invoke(tmp_path, "logs", "web-1", "--since", "yesterday")
    assert result.exit_code == 2 and "--since 'yesterday'" in result.output
    assert invoke(tmp_path, "app", "logs", "none.test").exit_code == 3


def test_app_logs_follow_prints_new_lines_of_every_instance(tmp_path):
    import subprocess
    import sys

    make_logs(tmp_path, "web-1", "web.test", [("2026-12-05T10:00:01.000000Z", "old1"), ("2026-12-05T10:00:02.000000Z", "old2")])
    make_logs(tmp_path, "web-2", "web.test", [("2026-12-05T10:00:01.000000Z", "old3"), ("2026-12-05T10:00:02.000000Z", "old4")])
    follower = subprocess.Popen([sys.executable, "-m", "fcrun_cli", "--root", str(tmp_path), "app", "logs", "web.test",
                                 "-f", "--tail", "1"], stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout.readline() == "web-2 old4\n"  # the tail is printed once the followers start
        for name, text in (("web-1", "new1"), ("web-2", "new2")):
            with open(tmp_path / "logs" / name / CURRENT, "a") as f:
                f.write(f"2026-12-05T10:00:03.000000Z {text}\n")
        assert sorted([follower.stdout.readline(), follower.stdout.readline()]) == ["web-1 new1\n", "web-2 new2\n"]
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        follower.stdout.close()
