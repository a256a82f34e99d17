"""One file of an image as its container would see it, read from the layers without mounting.

Layers are hostile input on the host's disk. `os.path.join(layer, "etc/passwd")` follows an
image's `etc -> /root/secrets` to the host's files, and opening a FIFO planted there hangs the
reader. Here the walk takes one component at a time: each is looked at without following it
and opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | ...) relative to the layer
directory it is in, so the kernel itself refuses to leave the layer. The image's own symlinks
are followed by the walk, in the merged view, as the container's kernel would: an absolute
target starts again at the image's root, and ".." stops there.

The merged view is overlayfs' (layer.py writes layers in its format): the topmost layer with
an entry for a name wins; a whiteout (a character device 0:0) hides the name in every layer
below; a directory merges with the directories below it down to the first opaque one
(trusted.overlay.opaque="y") or the first layer where the name is not a directory.
"""

from __future__ import annotations

import errno
import os
import stat

from .. import syscalls as sc
from .layer import OVERLAY_OPAQUE_XATTR

MAX_SYMLINKS = 40  # as the kernel's path walk (then ELOOP)
_RESOLVE = sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS | sc.RESOLVE_NO_XDEV
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW  # O_RDONLY, not O_PATH: fgetxattr needs it
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


def read_file(layers: list[str], path: str, max_bytes: int) -> bytes | None:
    """The content of `path` in the merged view of `layers` (bottom first), or None where it
    does not exist or is not a regular file.

    Raises:
        OSError: EFBIG when the file is larger than max_bytes, ELOOP for too many symlinks,
            or the error of reading a layer.

    Resource handling: every fd opened is closed before it returns.
    """
    opened: list[int] = []
    try:
        roots = []
        for layer in reversed(layers):
            roots.append(_open(opened, os.open(layer, _DIR_FLAGS | os.O_CLOEXEC)))
            if _is_opaque(roots[-1]):
                break
        found = _lookup(roots, path, opened)
        if found is None:
            return None
        dir_fd, name = found
        fd = _open(opened, sc.openat2(dir_fd, name.encode(), _FILE_FLAGS, _RESOLVE))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # replaced since it was looked at
        chunks, size = [], 0
        while chunk := os.read(fd, max_bytes + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", path)
        return b"".join(chunks)
    finally:
        for fd in opened:
            os.close(fd)


def _lookup(roots: list[int], path: str, opened: list[int]) -> tuple[int, str] | None:
    """(dir fd, name) of the regular file `path` names in the merged view, or None."""
    stack = [roots]  # the merged directories from the root down, each its layers' fds, top first
    pending = list(reversed(path.split("/")))
    symlinks = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if len(stack) > 1:
                stack.pop()
            continue
        entry = _topmost(stack[-1], name)
        if entry is None:
            return None
        dir_fd, mode = entry
        if stat.S_ISLNK(mode):
            symlinks += 1
            if symlinks > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(name, dir_fd=dir_fd)
            if target.startswith("/"):
                del stack[1:]
            pending.extend(reversed(target.split("/")))
        elif stat.S_ISDIR(mode):
            stack.append(_merged_dir(stack[-1], name, opened))
        elif any(rest not in ("", ".") for rest in pending):
            return None  # a file where a directory should be (ENOTDIR)
        else:
            return (dir_fd, name) if stat.S_ISREG(mode) else None
    return None  # a directory


def _topmost(dirs: list[int], name: str) -> tuple[int, int] | None:
    """(dir fd, st_mode) of the topmost entry `name` in a merged directory; None where there
    is none or a whiteout hides it."""
    for dir_fd in dirs:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if _is_whiteout(st):
            return None
        return dir_fd, st.st_mode
    return None


def _merged_dir(dirs: list[int], name: str, opened: list[int]) -> list[int]:
    """The layers' directories `name` merges, top first (the topmost entry is a directory)."""
    merged = []
    for dir_fd in dirs:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            break  # a whiteout or a non-directory hides the rest
        merged.append(_open(opened, sc.openat2(dir_fd, name.encode(), _DIR_FLAGS, _RESOLVE)))
        if _is_opaque(merged[-1]):
            break
    return merged


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(dir_fd: int) -> bool:
    try:
        return os.getxattr(dir_fd, OVERLAY_OPAQUE_XATTR) == b"y"
    except OSError as exc:
        # ENODATA: not opaque. trusted.* is invisible without CAP_SYS_ADMIN (ENODATA too).
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return False
        raise


def _open(opened: list[int], fd: int) -> int:
    opened.append(fd)
    return fd
