"""A new user namespace as an fd: made by a short-lived holder process it is born in.

A namespace needs a process to be born in: a child unshares CLONE_NEWUSER and waits; the
parent writes its maps (as host root, so any mapping is allowed and setgroups stays
permitted), opens its ns file, and lets it exit. The namespace lives on as long as the fd
(or a member) does. userns.py decides the mappings; this only carries them out.

The holder is forked, so the caller must be single-threaded: the library asks its spawner
(spawner/) when it has threads, the spawner calls this itself. Kept apart from userns.py so
that the spawner imports nothing but this.
"""

from __future__ import annotations

import errno
import os

from .. import syscalls as sc
from ..errors import KernelError


def new_userns(uid_map: bytes, gid_map: bytes) -> int:
    """A new user namespace with these uid_map/gid_map texts, as an O_CLOEXEC fd.

    Raises:
        KernelError: the kernel refused (user namespaces disabled, a bad mapping).

    Resource handling: the caller owns the returned fd. The holder is reaped before this
    returns, whether it succeeds or not.
    """
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the holder: no Python beyond these calls, then _exit
        try:
            os.close(ready_r)
            os.close(done_w)
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            os.read(done_r, 1)  # EOF when the parent is done (or dead)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    step = "unshare a user namespace"
    try:
        if os.read(ready_r, 1) != b"u":
            raise OSError(errno.EPERM, "the namespace holder exited first (user namespaces disabled?)")
        step = "write uid_map"
        _write(f"/proc/{pid}/uid_map", uid_map)
        step = "write gid_map"
        _write(f"/proc/{pid}/gid_map", gid_map)
        step = "open the user namespace"
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KernelError.from_oserror(f"{step} of pid {pid}:", exc.filename or "", exc) from None
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
