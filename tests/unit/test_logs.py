"""fcrun.logs: rotation bounds, timestamps, tail/since/merge, follow across rotation, the writer."""

from __future__ import annotations

import os
import time

import pytest

from fcrun.logs.files import CURRENT, LogSettings, app_instances, log_files, note_app, remove_expired
from fcrun.logs.reader import STAMP_LEN, end_offset, follow, merge, read_lines, select, since_stamp
from fcrun.logs.rotation import RotatingLog, stamp
from fcrun.logs.writer import start_writer

T0 = 1_796_000_000.25  # 2026-11-30T...Z


class FakeClock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def total_size(directory) -> int:
    return sum(os.path.getsize(p) for p in log_files(str(directory)))


def test_stamp_is_rfc3339_utc_fixed_width():
    assert stamp(0.5) == b"1970-01-01T00:00:00.500000Z "
    assert len(stamp(T0)) == STAMP_LEN + 1


def test_each_line_stamped_once_even_when_split_across_writes(tmp_path):
    clock = FakeClock()
    log = RotatingLog(str(tmp_path / CURRENT), 1 << 20, 2, clock)
    log.write(b"GET / 200\nGET /a")
    clock.now += 1
    log.write(b"bc 404\n")
    log.close()
    lines = list(read_lines(str(tmp_path)))
    assert [line[STAMP_LEN + 1:] for line in lines] == ["GET / 200", "GET /abc 404"]
    assert lines[0][:STAMP_LEN] == lines[1][:STAMP_LEN]  # the second line began in the first write


def test_rotation_keeps_count_files_within_bound_and_whole_lines(tmp_path):
    max_bytes, count = 4096, 2
    log = RotatingLog(str(tmp_path / CURRENT), max_bytes, count, FakeClock())
    for i in range(5000):
        log.write(b"line %05d xxxxxxxxxxxxxxxxxxxxxxxx\n" % i)
    log.close()
    files = log_files(str(tmp_path))
    assert [os.path.basename(p) for p in files] == [f"{CURRENT}.2", f"{CURRENT}.1", CURRENT]
    assert total_size(tmp_path) <= (count + 1) * max_bytes
    lines = list(read_lines(str(tmp_path)))
    assert lines[-1].endswith("line 04999 xxxxxxxxxxxxxxxxxxxxxxxx")
    numbers = [int(line.split()[2]) for line in lines]
    assert numbers == list(range(numbers[0], 5000))  # oldest first, nothing missing in what is kept


def test_count_zero_keeps_only_the_current_file(tmp_path):
    log = RotatingLog(str(tmp_path / CURRENT), 4096, 0, FakeClock())
    log.write(b"y\n" * 10000)
    log.close()
    assert log_files(str(tmp_path)) == [str(tmp_path / CURRENT)]
    assert total_size(tmp_path) <= 4096


def test_a_line_longer_than_a_file_is_split_not_unbounded(tmp_path):
    log = RotatingLog(str(tmp_path / CURRENT), 4096, 1, FakeClock())
    log.write(b"z" * 20000)
    log.close()
    assert total_size(tmp_path) <= 2 * 4096


def test_select_tail_and_since():
    lines = [f"2026-12-05T10:00:0{i}.000000Z l{i}" for i in range(6)]
    assert select(lines, tail=2) == lines[-2:]
    assert select(lines, since="2026-12-05T10:00:03.000000Z") == lines[3:]
    assert select(lines, tail=1, since="2026-12-05T10:00:01.000000Z") == lines[-1:]
    assert select(lines, tail=0) == []


def test_since_accepts_durations_and_timestamps():
    now = 1_796_000_000.0
    assert since_stamp("90s", now) == since_stamp("1.5m", now)
    assert since_stamp("2026-12-05T10:30:00Z", now) == "2026-12-05T10:30:00.000000Z"
    assert since_stamp("2026-12-05T11:30:00+01:00", now) == "2026-12-05T10:30:00.000000Z"
    with pytest.raises(ValueError, match="--since 'yesterday'"):
        since_stamp("yesterday", now)


def test_merge_orders_by_time_and_names_each_line():
    a = ["2026-12-05T10:00:01.000000Z a1", "2026-12-05T10:00:03.000000Z a3"]
    b = ["2026-12-05T10:00:02.000000Z b2", "2026-12-05T10:00:04.000000Z b4"]
    assert list(merge({"web-1": a, "web-2": b})) == [
        "2026-12-05T10:00:01.000000Z web-1 a1", "2026-12-05T10:00:02.000000Z web-2 b2",
        "2026-12-05T10:00:03.000000Z web-1 a3", "2026-12-05T10:00:04.000000Z web-2 b4"]


def test_follow_continues_across_rotation_without_losing_lines(tmp_path):
    log = RotatingLog(str(tmp_path / CURRENT), 4096, 3, FakeClock())
    log.write(b"before\n")
    start = end_offset(str(tmp_path))
    written = iter(range(300))
    state = {"stop": False}

    def sleep(_s):  # the fake clock of follow: each idle poll, the writer writes some more
        batch = [next(written, None) for _ in range(30)]
        for i in batch:
            if i is not None:
                log.write(b"after %03d padding-padding-padding-padding\n" % i)
        state["stop"] = batch[-1] is None

    lines = list(follow(str(tmp_path), start=start, stop=lambda: state["stop"], sleep=sleep))
    log.close()
    assert len(log_files(str(tmp_path))) == 4  # it did rotate, more than once
    assert [line[STAMP_LEN + 1:] for line in lines] == [f"after {i:03d} padding-padding-padding-padding" for i in range(300)]


def test_settings_from_env_name_the_bad_variable():
    assert LogSettings.from_env({"FCRUN_LOG_MAX_BYTES": "65536", "FCRUN_LOG_COUNT": "1"}).max_bytes == 65536
    with pytest.raises(ValueError, match="FCRUN_LOG_COUNT='x'"):
        LogSettings.from_env({"FCRUN_LOG_COUNT": "x"})
    with pytest.raises(ValueError, match="FCRUN_LOG_MAX_BYTES='10': must be at least 4096"):
        LogSettings.from_env({"FCRUN_LOG_MAX_BYTES": "10"})


def test_app_instances_and_expiry(tmp_path):
    for name, app in (("shop-1", "shop.test"), ("shop-2", "shop.test"), ("blog-1", "blog.test")):
        os.makedirs(tmp_path / name)
        note_app(str(tmp_path / name), app)
        (tmp_path / name / CURRENT).write_text("x\n")
    assert app_instances(str(tmp_path), "shop.test") == ["shop-1", "shop-2"]
    old = time.time() - 100
    os.utime(tmp_path / "shop-1" / CURRENT, (old, old))
    os.utime(tmp_path / "blog-1" / CURRENT, (old, old))
    assert remove_expired(str(tmp_path), 50, alive={"blog-1"}, now=time.time()) == ["shop-1"]
    assert sorted(os.listdir(tmp_path)) == ["blog-1", "shop-2"]


def test_writer_process_drains_a_pipe_until_every_writer_closes(tmp_path):
    directory = tmp_path / "web-1"
    fd = start_writer(str(directory), LogSettings(max_bytes=4096, count=1), app="web.test")
    try:
        for i in range(2000):
            os.write(fd, b"request %04d\n" % i)
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the writer is not our child: wait for its last line
        lines = list(read_lines(str(directory)))
        if lines and lines[-1].endswith("request 1999"):
            break
        time.sleep(0.02)
    assert lines[-1].endswith("request 1999")
    assert total_size(directory) <= 2 * 4096
    assert app_instances(str(tmp_path), "web.test") == ["web-1"]


def test_follow_falling_several_rotations_behind_reads_every_kept_file(tmp_path):
    log = RotatingLog(str(tmp_path / CURRENT), 4096, 20, FakeClock())
    log.write(b"start\n")
    state = {"polls": 0}

    def sleep(_s):  # between two polls the writer rotates several times
        state["polls"] += 1
        if state["polls"] == 1:
            for i in range(400):
                log.write(b"burst %03d padding-padding-padding\n" % i)

    lines = list(follow(str(tmp_path), stop=lambda: state["polls"] >= 2, sleep=sleep))
    log.close()
    assert len(log_files(str(tmp_path))) > 3
    assert [line[STAMP_LEN + 1:] for line in lines] == ["start"] + [f"burst {i:03d} padding-padding-padding" for i in range(400)]
