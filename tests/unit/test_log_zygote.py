"""The writer zygote (fcrun.logs.zygote): writers forked from one small process, each draining
its own pipe; a zygote that is gone is replaced, and a writer is started the old way meanwhile.
Real processes and pipes; no root needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fcrun.logs import zygote as zygote_module
from fcrun.logs.files import CURRENT, LogSettings
from fcrun.logs.reader import read_lines
from fcrun.logs.writer import start_writer

SETTINGS = LogSettings(max_bytes=1 << 20, count=1)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[1])


def writer_of(path: str) -> int:
    """The pid of the process that holds ``path`` open for writing (the instance's writer)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if any(os.readlink(f"/proc/{entry}/fd/{fd}") == path for fd in os.listdir(f"/proc/{entry}/fd")):
                        return int(entry)
                except OSError:
                    continue
        time.sleep(0.02)
    raise AssertionError(f"no process writes {path}")


def last_line(directory: str, expected: str) -> str:
    deadline = time.monotonic() + 10
    lines: list[str] = []
    while time.monotonic() < deadline:  # the writers are not our children: wait for the line
        lines = list(read_lines(directory))
        if lines and lines[-1].endswith(expected):
            break
        time.sleep(0.02)
    return lines[-1] if lines else ""


@pytest.fixture
def fresh_zygote(monkeypatch):
    """This test's own zygote (not one another test started), closed afterwards."""
    z = zygote_module.WriterZygote()
    monkeypatch.setattr(zygote_module, "_shared", z)
    yield z
    z.close()


def test_writers_are_forked_by_one_zygote_each_draining_its_own_pipe(tmp_path, fresh_zygote):
    fds = {name: start_writer(str(tmp_path / name), SETTINGS) for name in ("a-1", "b-1")}
    writers = {name: writer_of(str(tmp_path / name / CURRENT)) for name in fds}
    parents = {parent_of(pid) for pid in writers.values()}
    assert len(set(writers.values())) == 2 and len(parents) == 1 and os.getpid() not in parents
    for name, fd in fds.items():
        os.write(fd, f"hello from {name}\n".encode())
        os.close(fd)
    for name in fds:
        assert last_line(str(tmp_path / name), f"hello from {name}")
    # Closing our end ends the zygote; a writer forked before runs until its pipe's EOF.
    fd = start_writer(str(tmp_path / "c-1"), SETTINGS)
    fresh_zygote.close()
    os.write(fd, b"after the zygote\n")
    os.close(fd)
    assert last_line(str(tmp_path / "c-1"), "after the zygote")


def test_a_zygote_that_died_is_replaced_and_no_output_is_lost_meanwhile(tmp_path, fresh_zygote):
    os.close(start_writer(str(tmp_path / "first"), SETTINGS))
    fd = start_writer(str(tmp_path / "probe"), SETTINGS)
    zygote_pid = parent_of(writer_of(str(tmp_path / "probe" / CURRENT)))
    os.close(fd)
    os.kill(zygote_pid, signal.SIGKILL)
    # The next writer is started the old way (the zygote's socket is found dead) ...
    fd = start_writer(str(tmp_path / "during"), SETTINGS)
    os.write(fd, b"still logged\n")
    os.close(fd)
    assert last_line(str(tmp_path / "during"), "still logged")
    # ... and the one after comes from a new zygote.
    fd = start_writer(str(tmp_path / "after"), SETTINGS)
    new_zygote = parent_of(writer_of(str(tmp_path / "after" / CURRENT)))
    assert new_zygote not in (zygote_pid, os.getpid(), 1)
    os.write(fd, b"new zygote\n")
    os.close(fd)
    assert last_line(str(tmp_path / "after"), "new zygote")


def test_a_process_that_used_the_shared_zygote_closes_it_at_exit(tmp_path):
    """The shared zygote's socket is closed at exit (atexit), not found unclosed by the
    interpreter's teardown (a ResourceWarning, seen at the end of every unit run before), and
    the zygote exits with it."""
    code = ("import os; from fcrun.logs.files import LogSettings; from fcrun.logs.writer import start_writer; "
            "from fcrun.logs import zygote; "
            f"w = start_writer({str(tmp_path / 'c')!r}, LogSettings(max_bytes=1 << 20, count=1)); "
            "os.write(w, b'x\\n'); print(zygote.shared()._sock.fileno() >= 0, flush=True); os.close(w)")
    r = subprocess.run([sys.executable, "-W", "error::ResourceWarning", "-X", "dev", "-c", code], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "True\n", r.stderr
    assert "ResourceWarning" not in r.stderr and "unclosed" not in r.stderr, r.stderr
