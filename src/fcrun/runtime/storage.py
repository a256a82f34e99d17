"""Where a container's rootfs lives: its writable layer on disk (or none: a tmpfs the child
mounts), and the run root's shared mount point every child mounts its rootfs on.

    <data root>/containers/            0700: no host user reaches a container's files
        <name>/upper  (0755, the container's "/"; owned by its root's host ids in a userns)
        <name>/work   (overlayfs's)
    <run root>/rootfs                  always empty on the host: each child mounts on it in
                                       its own mount namespace (a mkdir and rmdir fewer per
                                       container)
"""

from __future__ import annotations

import contextlib
import os

from ..paths import Paths

ROOTFS_MOUNTPOINT = "rootfs"  # under the run root
STORAGE_DIR = "containers"  # under the data root

# What a container that wrote nothing leaves in its storage dir, deepest first: an empty upper
# dir, and what overlayfs made in the work dir (with "volatile", a marker of unsynced data).
_OVERLAY_LEFTOVER_FILE = "work/work/incompat/volatile/dirty"
_OVERLAY_LEFTOVER_DIRS = ("work/work/incompat/volatile", "work/work/incompat", "work/work", "work", "upper", "")


class Storage:
    """The writable layers of one data root's containers."""

    def __init__(self, paths: Paths):
        self.paths = paths
        self.root = os.path.join(paths.data_root, STORAGE_DIR)
        self._root_checked = False

    def rootfs_mountpoint(self) -> str:
        """The run root's shared mount point for rootfs overlays, made on first use.

        Each child mounts its rootfs there inside its own mount namespace (propagation to the
        host is cut first), so the host never sees a mount on it and it stays empty.
        """
        path = os.path.join(self.paths.run_root, ROOTFS_MOUNTPOINT)
        if not os.path.isdir(path):
            os.makedirs(path, 0o755, exist_ok=True)
        return path

    def make_layer(self, name: str, owner: tuple[int, int] | None) -> tuple[str, str]:
        """Make container `name`'s upper and work dirs; returns them. `owner`: the host ids of
        the container's root (user namespace), who then owns upper (the container's "/").

        Raises:
            OSError: the directories could not be made (FileExistsError: a leftover).

        Resource handling: on failure nothing is left; on success remove(name) undoes it.
        """
        storage = os.path.join(self._checked_root(), name)
        # Root-only from the top: a container's files (a setuid copy of a shell, say) must be
        # out of every host user's reach. upper itself stays 0755, since overlayfs shows it
        # as the container's "/".
        os.mkdir(storage, 0o700)
        try:
            upper, work = os.path.join(storage, "upper"), os.path.join(storage, "work")
            os.mkdir(upper)
            os.chmod(upper, 0o755)  # mkdir obeys the umask
            if owner is not None:
                os.chown(upper, *owner)
            os.mkdir(work, 0o700)
        except BaseException:
            _rmtree(storage)
            raise
        return upper, work

    def remove(self, name: str) -> None:
        """Remove container `name`'s upper and work dirs, if any: by name when they hold only
        what overlayfs leaves (7 system calls where a tree walk makes some 30), else by
        walking the tree."""
        storage = os.path.join(self.root, name)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(storage, _OVERLAY_LEFTOVER_FILE))
            for d in _OVERLAY_LEFTOVER_DIRS:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(os.path.join(storage, d))
        except OSError:  # ENOTEMPTY: the container wrote something
            _rmtree(storage)

    def names(self) -> list[str]:
        """The containers that have a writable layer here."""
        try:
            return os.listdir(self.root)
        except FileNotFoundError:
            return []

    def _checked_root(self) -> str:
        """The layers' parent, made 0700, and made so again if an older fcrun left it open
        (checked once per Storage)."""
        if not self._root_checked:
            os.makedirs(self.root, 0o700, exist_ok=True)
            if os.stat(self.root).st_mode & 0o077:
                os.chmod(self.root, 0o700)
            self._root_checked = True
        return self.root


def _rmtree(path: str) -> None:
    """shutil.rmtree, imported only when a tree is left to walk: its import (bz2, lzma, fnmatch)
    is ~1.5 ms of a `fcrun run` without a fork-server, whose container wrote nothing."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
