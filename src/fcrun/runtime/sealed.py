"""Sealed in-memory copies of host binaries that containers run (pid 1's init).

A container whose pid 1 was exec'd from a host file sees that file as /proc/1/exe: its root
can open it, write it where nothing stops a write (CVE-2019-5736, where runc's own binary was
overwritten from inside a container), or hold it open across a host upgrade. runc answers by
exec'ing a sealed memfd copy of itself; fcrun does the same for the init it runs as pid 1.
The copy is a memfd with every seal that stops a change (write, grow, shrink, more seals, and
the exec bits where the kernel has F_SEAL_EXEC), so /proc/1/exe in a container is
"/memfd:NAME (deleted)", a file that nobody, host root included, can change.

One copy is made per path and process, and remade only when the file's (st_dev, st_ino,
st_mtime_ns) change: a long-lived process (the fork-server, a daemon) pays for the copy once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import _thread  # locks only: not threading (~1 ms of fcrun run to import; threading.Lock is _thread.allocate_lock)

# memfd_create flags and seals (linux/memfd.h, linux/fcntl.h); F_SEAL_EXEC and MFD_EXEC are
# Linux 6.3+, and older kernels refuse them with EINVAL.
MFD_CLOEXEC = 0x0001
MFD_ALLOW_SEALING = 0x0002
MFD_EXEC = 0x0010
F_ADD_SEALS = 1033
F_GET_SEALS = 1034
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_EXEC = 0x0020
SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE

_lock = _thread.allocate_lock()
# path -> ((st_dev, st_ino, st_mtime_ns) of the file copied, the memfd, (st_dev, st_ino) of the memfd)
_copies: dict[str, tuple[tuple[int, int, int], int, tuple[int, int]]] = {}


def sealed_copy(path: str) -> int:
    """A new fd of a sealed memfd holding the file at `path` (exec it with os.execve(fd, ...)).

    Raises:
        OSError: the file cannot be read, or the kernel refused the memfd or its seals.

    Resource handling: the returned fd is the caller's (close-on-exec; close it when done);
    this module keeps one more per path for the process's lifetime.
    """
    with _lock:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        cached = _copies.get(path)
        if cached is not None:
            cached_key, fd, memfd_id = cached
            if _still_ours(fd, memfd_id):
                if cached_key == key:
                    return os.dup(fd)
                os.close(fd)  # the file changed (a host upgrade): copy the new one
            del _copies[path]  # an fd number something else closed (and maybe reused) is not ours to close
        fd = _copy_and_seal(path)
        memfd_st = os.fstat(fd)
        _copies[path] = (key, fd, (memfd_st.st_dev, memfd_st.st_ino))
        return os.dup(fd)


def _still_ours(fd: int, memfd_id: tuple[int, int]) -> bool:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return False
        raise
    return (st.st_dev, st.st_ino) == memfd_id


def _copy_and_seal(path: str) -> int:
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = os.fstat(src)
        memfd = _memfd_create(os.path.basename(path))
        try:
            offset = 0
            while offset < before.st_size:
                sent = os.sendfile(memfd, src, offset, before.st_size - offset)
                if sent == 0:
                    break
                offset += sent
            after = os.fstat(src)
            if offset != before.st_size or after.st_size != before.st_size or after.st_mtime_ns != before.st_mtime_ns:
                raise OSError(errno.EAGAIN, "changed while being copied into a memfd", path)
            _add_seals(memfd)
            # execve refuses a file anyone holds open for writing (ETXTBSY), memfd_create's
            # fd included: keep a read-only one instead.
            readonly = os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(memfd)
    finally:
        os.close(src)
    return readonly


def _memfd_create(name: str) -> int:
    # MFD_EXEC says "this memfd is meant to be executed": with vm.memfd_noexec=1 a memfd
    # created without it gets its exec bits removed and sealed away.
    try:
        return os.memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_EXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)


def _add_seals(fd: int) -> None:
    try:
        fcntl.fcntl(fd, F_ADD_SEALS, SEALS | F_SEAL_EXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a kernel before 6.3: no F_SEAL_EXEC
            raise
        fcntl.fcntl(fd, F_ADD_SEALS, SEALS)


def _after_fork_in_child() -> None:
    # A lock another thread held at the fork would never be released in the child.
    global _lock
    _lock = _thread.allocate_lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
