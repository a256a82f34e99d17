"""Slots: a directory inside a container (a web server's docroot, say) that stays empty and
read-only until a host directory is mounted there, live, while the container runs. The pool
of pre-started app servers (forkserver/pool.py) is built on it.

    <container dir>/slot            a mount of its own, in a peer group of its own (shared)
    <container dir>/slot/content    bound (rslave) into the container at the slot's path

A mount made on slot/content later propagates into the container; nothing the container
mounts comes back. A slot is filled once: a container that served one app's files never
gets another's.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence

from .. import syscalls as sc
from ..docroot import attach_docroot, open_docroot
from ..errors import IncorrectStatus, KernelError
from ..mountinfo import read_mountpoints
from .state import ContainerState

SLOT_SOURCE_LABEL = "fcrun.slot.source"  # what fill_slot mounted (a slot is filled once)
SLOT_OPTIONS = ["bind", "ro", "nosuid", "nodev", "noexec"]  # how the container sees it


def slot_content(container_dir: str) -> str:
    """The host directory behind a container's slot (what it shows until filled)."""
    return os.path.join(container_dir, "slot", "content")


def make_slot(container_dir: str) -> str:
    """Make `container_dir`/slot a mount of its own in a peer group of its own; returns its
    content dir, to be bound into the container (rslave, like every mount it copies from the
    host), so that its mount is a slave of this peer group.

    Raises:
        OSError: a mkdir or mount failed.

    Resource handling: release_slot undoes it (even half made).
    """
    slot = os.path.join(container_dir, "slot")
    content = slot_content(container_dir)
    os.mkdir(slot, 0o700)
    os.mkdir(content, 0o755)
    path = slot.encode()
    sc.mount(path, path, None, sc.MS_BIND, None)
    sc.mount(None, path, None, sc.MS_PRIVATE, None)  # out of the run root's peer group
    sc.mount(None, path, None, sc.MS_SHARED, None)  # into one of its own
    return content


def release_slot(container_dir: str) -> None:
    """Unmount and remove a container's slot, if it has one. rmdir only, never a recursive
    delete: should an unmount fail, the app's files under it stay untouched.

    Raises:
        KernelError: an unmount failed (other than "not mounted").
    """
    slot = os.path.join(container_dir, "slot")
    content = slot_content(container_dir)
    for path in (content, slot):
        for _ in range(8):  # stacked mounts, one layer per call
            try:
                sc.umount2(path.encode(), sc.MNT_DETACH)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):
                    break
                raise KernelError.from_oserror("unmount slot", path, exc) from None
    if content not in read_mountpoints() and os.path.isdir(content):
        # Our own directory again (nothing on it): files put there for the container (a
        # warm-up script), one level, no recursion.
        for entry in os.scandir(content):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
    for path in (content, slot):
        with contextlib.suppress(FileNotFoundError):  # never made, or gone already
            os.rmdir(path)


def open_slot_source(source: str, docroot_roots: Sequence[str], own_roots: Sequence[str]) -> int:
    """An O_PATH fd of `source` if it may fill a slot (docroot.open_docroot: strictly under
    one of `docroot_roots`, reached through no symlink, clear of fcrun's `own_roots`).

    Raises:
        SpecError: `source` breaks a docroot rule.

    Resource handling: the caller closes the fd.
    """
    return open_docroot(source, docroot_roots, own_roots, "source")


def fill_slot(state: ContainerState, container_dir: str, source: str, source_fd: int) -> None:
    """Mount directory `source_fd` (`open_slot_source(source, ...)`) on the container's slot
    and record `source` in the state's labels.

    What is mounted is the directory that was opened and checked, whatever has been renamed
    since: a recursive, detached copy made read-only, nosuid, nodev and noexec (every
    submount too) before it is attached, so the container never sees it without those flags.

    Raises:
        IncorrectStatus: no slot, or it is filled already. KernelError: the kernel refused.

    Resource handling: `source_fd` stays the caller's.
    """
    name = state.name
    content = slot_content(container_dir)
    if not os.path.isdir(content):
        raise IncorrectStatus(f"container {name!r} has no slot (create it with slot=...)")
    if SLOT_SOURCE_LABEL in state.labels:
        raise IncorrectStatus(f"the slot of container {name!r} is already filled from {state.labels[SLOT_SOURCE_LABEL]}")
    attach_docroot(source_fd, content)
    state.labels[SLOT_SOURCE_LABEL] = source
