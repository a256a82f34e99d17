"""atomicfile: whole-or-nothing replacement, stale temporaries, quarantine (no root)."""

from __future__ import annotations

import errno
import os
import signal
import stat

import pytest

from fcrun import atomicfile
from fcrun.atomicfile import create_temp, quarantine, remove_stale_temps, stale_temps, write_atomic
from fcrun.errors import KernelError


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "state.json")
    write_atomic(path, b"one")
    write_atomic(path, b"two", mode=0o644)
    with open(path, "rb") as f:
        assert f.read() == b"two"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.listdir(tmp_path) == ["state.json"]


def test_file_and_directory_are_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    """The order that makes it durable: the data's fsync, then rename, then the directory's."""
    path = str(tmp_path / "f")
    steps = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        steps.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def rename(src, dst):
        steps.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(atomicfile.os, "fsync", fsync)
    monkeypatch.setattr(atomicfile.os, "rename", rename)
    write_atomic(path, b"x")
    assert steps == ["fsync file", "rename", "fsync dir"]


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = str(tmp_path / "leases.json")
    write_atomic(path, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomicfile.os, "fsync", full)
    with pytest.raises(KernelError, match=rf"write leases file {path}: \[Errno 28\] No space left on device") as info:
        write_atomic(path, b"new", what="leases file")
    assert info.value.errno == errno.ENOSPC
    with open(path, "rb") as f:
        assert f.read() == b"old"
    assert os.listdir(tmp_path) == ["leases.json"]


def test_a_writer_killed_before_the_rename_leaves_the_old_file_and_a_stale_temporary(tmp_path):
    """A real kill -9 between write and rename: the file is whole (the old one), and the
    temporary it left is what remove_stale_temps clears, and nothing else."""
    path = str(tmp_path / "state.json")
    write_atomic(path, b"old")
    (tmp_path / "other.json").write_bytes(b"keep")
    pid = os.fork()
    if pid == 0:  # the writer: dies at its rename
        try:
            atomicfile.os.rename = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
            write_atomic(path, b"new" * 1000)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    with open(path, "rb") as f:
        assert f.read() == b"old"
    left = stale_temps(str(tmp_path), "state.json")
    assert len(left) == 1 and os.path.basename(left[0]).startswith(".state.json.")
    assert remove_stale_temps(str(tmp_path), "state.json") == left
    assert sorted(os.listdir(tmp_path)) == ["other.json", "state.json"]


def test_temporaries_are_unique(tmp_path):
    """Two writers (one killed mid-way) never share a temporary, as a fixed name.tmp did."""
    path = str(tmp_path / "state.json")
    stale = tmp_path / ".state.json.abcdefgh.tmp"
    stale.write_bytes(b"half")
    write_atomic(path, b"whole")
    assert stale.read_bytes() == b"half"
    with open(path, "rb") as f:
        assert f.read() == b"whole"


def test_a_temporary_is_new_private_and_never_an_existing_name(tmp_path, monkeypatch):
    """create_temp keeps mkstemp's promises: mode 0600 whatever the umask, close-on-exec, and a
    name already taken (a file, or a symlink planted there) is passed over, never opened."""
    old_umask = os.umask(0)
    try:
        fd, path = create_temp(str(tmp_path), ".f.")
    finally:
        os.umask(old_umask)
    try:
        st = os.fstat(fd)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 0 and not os.get_inheritable(fd)
        assert os.path.basename(path).startswith(".f.") and path.endswith(".tmp") and os.path.samestat(st, os.stat(path))
    finally:
        os.close(fd)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    taken, free = [b"\x01" * 6, b"\x02" * 6], b"\x03" * 6
    os.symlink(victim, tmp_path / f".f.{taken[0].hex()}.tmp")
    (tmp_path / f".f.{taken[1].hex()}.tmp").write_bytes(b"other's")
    tokens = iter([*taken, free])
    monkeypatch.setattr(atomicfile.os, "urandom", lambda n: next(tokens))
    fd, path = create_temp(str(tmp_path), ".f.")
    os.close(fd)
    assert path == str(tmp_path / f".f.{free.hex()}.tmp")
    assert victim.read_bytes() == b"keep" and (tmp_path / f".f.{taken[1].hex()}.tmp").read_bytes() == b"other's"


def test_quarantine_moves_aside_and_keeps_every_copy(tmp_path):
    path = tmp_path / "leases.json"
    path.write_bytes(b"garbage 1")
    first = quarantine(str(path))
    path.write_bytes(b"garbage 2")
    second = quarantine(str(path), into=str(tmp_path / "q"))
    path.write_bytes(b"garbage 3")
    third = quarantine(str(path), into=str(tmp_path / "q"))
    assert not path.exists()
    assert os.path.basename(first).startswith("leases.json.corrupt-")
    assert os.path.dirname(second) == str(tmp_path / "q") and second != third
    assert [read(p) for p in (first, second, third)] == [b"garbage 1", b"garbage 2", b"garbage 3"]


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_write_that_need_not_be_durable_is_not_synced_but_still_replaces_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "f")
    write_atomic(path, b"old")
    synced = []
    monkeypatch.setattr(atomicfile.os, "fsync", lambda fd: synced.append(fd))
    write_atomic(path, b"new", durable=False)
    assert synced == []
    with open(path, "rb") as f:
        assert f.read() == b"new"
    assert os.listdir(tmp_path) == ["f"]  # renamed into place: no temporary left
