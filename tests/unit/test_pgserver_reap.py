"""tests/pgserver.py's clean-up of servers whose test run died: the directory of a run that died
with its machine (postmaster.pid naming a pid that no longer runs postgres) is removed without
calling pg_ctl, which would fail on it ("could not send stop signal: No such process") and so
fail every later test that starts a server (CI once did after a VM restart)."""

from __future__ import annotations

import os
import subprocess
import tempfile

from pgserver import DIR_PREFIX, OWNER_FILE, reap_stale


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid  # reaped: nothing runs under it unless the kernel reused it meanwhile


def test_a_directory_whose_owner_and_postmaster_are_gone_is_removed(tmp_path):
    directory = tempfile.mkdtemp(prefix=DIR_PREFIX)
    os.mkdir(os.path.join(directory, "data"))
    with open(os.path.join(directory, OWNER_FILE), "w") as f:
        f.write(str(_dead_pid()))
    with open(os.path.join(directory, "data", "postmaster.pid"), "w") as f:
        f.write(f"{_dead_pid()}\n{directory}/data\n")
    # bindir points nowhere: calling pg_ctl at all would raise FileNotFoundError.
    reaped = reap_stale(str(tmp_path / "no-such-bindir"))
    assert directory in reaped
    assert not os.path.exists(directory)


def test_a_directory_whose_owner_still_runs_is_left_alone(tmp_path):
    directory = tempfile.mkdtemp(prefix=DIR_PREFIX)
    try:
        with open(os.path.join(directory, OWNER_FILE), "w") as f:
            f.write(str(os.getpid()))
        assert directory not in reap_stale(str(tmp_path / "no-such-bindir"))
        assert os.path.exists(directory)
    finally:
        os.remove(os.path.join(directory, OWNER_FILE))
        os.rmdir(directory)
