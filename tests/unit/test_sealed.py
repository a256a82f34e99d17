"""sealed.py: the memfd copy of a host binary, its seals, its cache."""

import fcntl
import os

import pytest

from fcrun.runtime import sealed
def test_sealed_copy_is_remade_when_the_file_changes(tmp_path):
    path = tmp_path / "init"
    path.write_bytes(b"one")
    first = sealed.sealed_copy(str(path))
    again = sealed.sealed_copy(str(path))
    try:
        assert os.fstat(first).st_ino == os.fstat(again).st_ino
        assert fcntl.fcntl(first, sealed.F_GET_SEALS) & sealed.SEALS == sealed.SEALS
        writable = os.open(f"/proc/self/fd/{first}", os.O_RDWR | os.O_CLOEXEC)  # not running: opens
        try:
            changes = [lambda: os.pwrite(writable, b"x", 0), lambda: os.ftruncate(writable, 0),
                       lambda: os.ftruncate(writable, 1 << 20)]
            if fcntl.fcntl(first, sealed.F_GET_SEALS) & sealed.F_SEAL_EXEC:  # Linux 6.3+
                changes.append(lambda: os.fchmod(writable, 0o644))
            for change in changes:
                with pytest.raises(PermissionError):  # EPERM: the seals
                    change()
        finally:
            os.close(writable)
        path.write_bytes(b"two, longer")
        os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))  # a new mtime even on a coarse clock
        changed = sealed.sealed_copy(str(path))
        try:
            assert os.fstat(changed).st_ino != os.fstat(first).st_ino
            assert os.pread(changed, 64, 0) == b"two, longer"
            assert os.pread(first, 64, 0) == b"one"  # what a running container holds stays as it was
        finally:
            os.close(changed)
    finally:
        os.close(first)
        os.close(again)


def test_a_cached_fd_closed_behind_its_back_is_neither_used_nor_closed(tmp_path):
    path = tmp_path / "init"
    path.write_bytes(b"one")
    os.close(sealed.sealed_copy(str(path)))
    _, cached_fd, _ = sealed._copies[str(path)]
    os.close(cached_fd)  # as a forked child's close-all would
    other = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    decoy = os.dup2(other, cached_fd, inheritable=False)  # something else gets the number
    os.close(other)
    try:
        fd = sealed.sealed_copy(str(path))
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:init")
        os.close(fd)
        assert os.readlink(f"/proc/self/fd/{decoy}") == str(path)  # left alone
    finally:
        os.close(decoy)
