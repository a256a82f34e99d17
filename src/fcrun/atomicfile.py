"""Files that a crash leaves whole: atomic replacement, stale temporaries, quarantine.

`write_atomic(path, data)` is how every state file fcrun keeps is written (container states,
IP leases, image records)::

    create .NAME.<random>.tmp in path's directory       O_EXCL: two writers never share one
    write, fsync                                          the bytes are on disk ...
    rename over path                                      ... before the name points at them
    fsync the directory                                   and the rename itself is on disk

so after `kill -9`, a kernel crash or a power loss `path` holds the old content or the new,
never a mix, nothing, or a zero-length file (ext4 without the file's fsync can leave that
after a power loss). On tmpfs both fsyncs cost nothing; on a disk, a fraction of a millisecond
(0.48 ms for both on this VM's ext4, 0.08 ms without).

`durable=False` leaves the two fsyncs out, for a file whose content cannot matter after a
power loss: a running container's state updated in place (its limits, labels, slot), whose
processes die with the machine. The rename is still atomic for every process (the page cache
is shared): `kill -9` of the writer leaves the old content or the new, whole. After a power
loss the file may hold either, or (on a filesystem without ext4's flush on rename-over) be
torn, which its reader quarantines as any corrupt file.

A writer killed between create_temp and rename leaves its temporary behind. Every file's writers
hold a lock (a container's lock, the IPAM lock), so whoever holds that lock knows any such
temporary is stale: `remove_stale_temps` clears them (`fcrun gc` calls it).

A file that cannot be read back (garbage, torn, wrong types) is `quarantine`d: renamed aside,
kept for the operator, never deleted by fcrun, so the caller can go on as if it were absent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

from .errors import KernelError

TEMP_SUFFIX = ".tmp"
CORRUPT_MARK = ".corrupt-"


def temp_prefix(filename: str) -> str:
    """What every temporary of `filename` starts with (hidden: a leading dot)."""
    return f".{filename}."


def write_atomic(path: str, data: bytes, *, mode: int = 0o600, what: str = "file", durable: bool = True) -> None:
    """Replace `path` with `data` atomically and (unless `durable` is False) durably (see the
    module docstring).

    Raises:
        KernelError: "write <what> <path>: [Errno N] ..." (ENOSPC on a full disk, say); `path`
            is then left as it was and no temporary remains.
    """
    directory, filename = os.path.split(path)
    directory = directory or "."
    try:
        fd, tmp = create_temp(directory, temp_prefix(filename))
    except OSError as exc:
        raise KernelError.from_oserror(f"write {what}", path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:  # create_temp makes it 0600
                os.fchmod(f.fileno(), mode)
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise KernelError.from_oserror(f"write {what}", path, exc) from None
        raise
    if durable:
        fsync_dir(directory, what=what)


def create_temp(directory: str, prefix: str, suffix: str = TEMP_SUFFIX) -> tuple[int, str]:
    """A new file ``<prefix><random><suffix>`` in `directory`, mode 0600, opened read-write
    close-on-exec; returns its fd (the caller's to close) and path.

    tempfile.mkstemp's contract without the tempfile module, whose import (random, and what
    that loads) is ~1 ms of a `fcrun run` without a fork-server on this VM.

    Raises:
        OSError: it cannot be created.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}{suffix}")
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", directory)


def fsync_dir(directory: str, *, what: str = "file") -> None:
    """fsync(2) a directory, so that a rename or create in it survives a power loss.

    Raises:
        KernelError: it cannot be opened or synced.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise KernelError.from_oserror(f"sync directory of {what}", directory, exc) from None


def stale_temps(directory: str, filename: str) -> list[str]:
    """Paths of the temporaries `write_atomic` left for `filename` in `directory`."""
    prefix = temp_prefix(filename)
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(
        os.path.join(directory, e) for e in entries if e.startswith(prefix) and e.endswith(TEMP_SUFFIX)
    )


def remove_stale_temps(directory: str, filename: str) -> list[str]:
    """Delete the temporaries crashed writers of `filename` left; returns their paths.

    Call it only while holding the lock every writer of that file holds: then no temporary
    can belong to a write in progress.
    """
    removed = []
    for path in stale_temps(directory, filename):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


def quarantine(path: str, into: str | None = None, *, prefix: str = "") -> str:
    """Move an unreadable file aside (``<prefix><name>.corrupt-<UTC time>``, in `into` or
    beside it) for the operator to look at; returns where it went.

    Call it while holding the file's lock, so that no good file written meanwhile is moved.

    Raises:
        OSError: it could not be moved (FileNotFoundError: someone else moved it first).
    """
    directory, filename = os.path.split(path)
    if into is not None:
        os.makedirs(into, mode=0o700, exist_ok=True)
        directory = into
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = os.path.join(directory, f"{prefix}{filename}{CORRUPT_MARK}{stamp}")
    n = 1
    while os.path.lexists(target):  # two in one second: keep both
        n += 1
        target = os.path.join(directory, f"{prefix}{filename}{CORRUPT_MARK}{stamp}-{n}")
    os.rename(path, target)
    return target
