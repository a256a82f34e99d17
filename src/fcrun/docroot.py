"""Docroots: host directories mounted into app containers, chosen so that none can be turned
against the host.

An app's docroot names a host directory. Whoever may set it (anyone with the admin token) or
may write its parent directory (the tenant whose site it is) could otherwise point it, or swap
it, at ``/``, ``/etc`` or fcrun's own state, and get that into a container. So a docroot:

- lies strictly under one of the docroot roots (``docroot_roots`` in serve's configuration,
  default /srv and /var/www). A root itself is refused: it holds every other app's docroot;
- is reached from that root through no symlink, in any component, resolved by the kernel
  (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), never by a path check that a rename could
  undo between the check and the mount;
- neither lies in, nor holds, fcrun's data or run root, nor holds another docroot root.

It is checked when an app is added or changed (`check_docroot`), and again each time it is
mounted (`open_docroot`), on the very directory that is then mounted: `attach_docroot` works on
the fd `open_docroot` returned, so what was checked is what the container gets.

Why not RESOLVE_NO_XDEV as well: it refuses to cross any mount point, so a docroot on a volume
of its own under /srv (a per-site quota volume, an NFS export) could not be used. Only root can
make mount points, so one under a docroot root is the administrator's, nothing a tenant could
forge; and `attach_docroot` gives every submount the same flags as the docroot.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence

from . import syscalls as sc
from .errors import KernelError, MissingFeature, SpecError

DEFAULT_DOCROOT_ROOTS = ("/srv", "/var/www")

# Read-only, and nothing on it runs as anything but a plain file: no setuid, no device nodes,
# no exec (mod_php and php-fpm read scripts, they do not exec them).
DOCROOT_MOUNT_ATTRS = sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC
_RESOLVE = sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS
_OPEN_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_MAX_DEPTH = 4096  # a walk up the tree ends at "/" long before; this only guards a loop


def open_docroot(path: str, roots: Sequence[str], forbidden: Iterable[str] = (), where: str = "docroot") -> int:
    """Open docroot `path` once, as an O_PATH directory fd, if it follows the rules above.

    `roots`: the docroot roots (each opened following symlinks: they are the administrator's
    configuration). `forbidden`: directories a docroot may neither lie in nor hold (fcrun's
    data and run roots). `where`: the field errors name.

    Raises:
        SpecError: `path` is not absolute, is outside every root or is one, passes through a
            symlink, is missing or not a directory, or overlaps a forbidden directory.
        MissingFeature: the kernel has no openat2 (Linux < 5.6).
        KernelError: the kernel refused otherwise (EACCES, ...).

    Resource handling: the caller owns the returned fd and closes it.
    """
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        raise SpecError(f"docroot {path!r} is not an absolute path", where)
    # Lexical normalisation is safe here: no component may be a symlink, so ".." means the
    # parent on disk too, and RESOLVE_BENEATH keeps the result under the root all the same.
    path = os.path.normpath(path)
    root, rest = _root_holding(path, roots, where)
    try:
        root_fd = os.open(root, _OPEN_DIR)
    except FileNotFoundError:
        raise SpecError(f"docroot {path} does not exist (nor does its docroot root {root})", where) from None
    except OSError as exc:
        raise KernelError.from_oserror("open docroot root", root, exc) from None
    try:
        fd = sc.openat2(root_fd, rest.encode(), _OPEN_DIR, _RESOLVE)
    except OSError as exc:
        raise _open_error(path, root, exc, where) from None
    finally:
        os.close(root_fd)
    try:
        _check_overlaps(fd, path, [*forbidden], [r for r in roots if r != root], where)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_docroot(path: str, roots: Sequence[str], forbidden: Iterable[str] = (), where: str = "docroot") -> str:
    """`path` normalised, if `open_docroot` would accept it now (it is checked again at mount
    time, since the path may change in between). Raises as `open_docroot` does."""
    os.close(open_docroot(path, roots, forbidden, where))
    return os.path.normpath(path)


def attach_docroot(fd: int, target: str, userns_fd: int = -1) -> None:
    """Mount the directory `fd` (from `open_docroot`) on `target`: recursively, read-only,
    nosuid, nodev and noexec on every mount of the copy, idmapped through user namespace
    `userns_fd` when it is >= 0.

    The copy is detached until its flags are set, so nothing ever sees it without them. It is
    recursive because a non-recursive copy would leave what the submounts cover on the host
    disk showing through instead (bubblewrap binds recursively for the same reason), and the
    flags are set recursively because `rbind` alone keeps each submount's own suid and dev.
    It is made private first: a copy of a shared host mount would stay in the host's peer
    group, and mounts the host makes under the docroot later would reach the container with
    their own flags, not these.

    Raises:
        KernelError: a step failed (EINVAL from the idmap: a filesystem in the tree cannot be
            idmapped); nothing is mounted on `target` then.

    Resource handling: `fd` stays the caller's; the detached copy is closed (and so dropped,
    unless it was attached) before returning.
    """
    step = "clone the docroot for"
    try:
        tree = sc.open_tree(b"", sc.OPEN_TREE_CLONE | sc.AT_RECURSIVE | sc.AT_EMPTY_PATH, dirfd=fd)
    except OSError as exc:
        raise _mount_error(step, target, exc) from None
    try:
        attrs, step = DOCROOT_MOUNT_ATTRS, "set ro,nosuid,nodev,noexec on the docroot for"
        if userns_fd >= 0:
            attrs, step = attrs | sc.MOUNT_ATTR_IDMAP, "set ro,nosuid,nodev,noexec,idmap on the docroot for"
        sc.mount_setattr(tree, attrs, recursive=True, propagation=sc.MS_PRIVATE,
                         userns_fd=max(userns_fd, 0))
        step = "attach the docroot on"
        sc.move_mount(tree, target.encode())
    except OSError as exc:
        raise _mount_error(step, target, exc) from None
    finally:
        os.close(tree)


def check_roots(roots: Sequence[str], where: str = "docroot_roots") -> None:
    """Raises SpecError unless every root is a normalised absolute path other than "/"."""
    for i, root in enumerate(roots):
        if not isinstance(root, str) or not os.path.isabs(root) or os.path.normpath(root) != root or "\0" in root:
            raise SpecError(f"docroot root {root!r} is not a normalised absolute path", f"{where}[{i}]")
        if root == "/":
            raise SpecError('docroot root "/" would let a docroot be any host directory', f"{where}[{i}]")


def _root_holding(path: str, roots: Sequence[str], where: str) -> tuple[str, str]:
    """The root `path` lies strictly under (as written, or through the root's real path) and
    the rest of `path` below it."""
    allowed = ", ".join(roots) or "none configured"
    for root in roots:
        for spelling in dict.fromkeys((os.path.normpath(root), os.path.realpath(root))):
            if path == spelling:
                raise SpecError(f"docroot {path} is a docroot root itself, which holds every other app's "
                                f"docroot: use a directory under it", where)
            if spelling != "/" and path.startswith(spelling + "/"):
                return root, path[len(spelling) + 1:]
    raise SpecError(f"docroot {path} is outside the allowed docroot roots ({allowed})", where)


def _open_error(path: str, root: str, exc: OSError, where: str) -> Exception:
    if exc.errno == errno.ENOSYS:
        return MissingFeature("openat2 (Linux 5.6+)", "needed to open docroots without following symlinks")
    if exc.errno in (errno.ELOOP, errno.EXDEV):  # EXDEV: RESOLVE_BENEATH; cannot happen without symlinks
        return SpecError(f"docroot {path} is, or passes below {root} through, a symlink: refused, since a "
                         f"symlink there could lead anywhere on the host", where)
    if exc.errno == errno.ENOENT:
        return SpecError(f"docroot {path} does not exist", where)
    if exc.errno == errno.ENOTDIR:
        return SpecError(f"docroot {path} is not a directory", where)
    return KernelError.from_oserror("open docroot", path, exc)


def _check_overlaps(fd: int, path: str, forbidden: list[str], other_roots: list[str], where: str) -> None:
    """Compare by (st_dev, st_ino), walking up through "..": a path comparison would trust
    names a rename can change, and a bind mount of fcrun's run root is still fcrun's run root."""
    if not forbidden and not other_roots:
        return
    ids: dict[tuple[int, int], str] = {}  # forbidden dir -> its name
    for directory in forbidden:
        with _opened(directory) as dfd:
            if dfd >= 0:
                ids[_dir_id(dfd)] = directory
    for above in _walk_up(fd):
        if above in ids:
            raise SpecError(f"docroot {path} is or lies in fcrun's own {ids[above]}", where)
    docroot = _dir_id(fd)
    for directory in [*forbidden, *other_roots]:
        with _opened(directory) as dfd:
            if dfd >= 0 and docroot in _walk_up(dfd):
                what = "fcrun's own" if directory in forbidden else "the docroot root"
                raise SpecError(f"docroot {path} is or holds {what} {directory}", where)


class _opened:
    """`with _opened(path) as fd`: an O_PATH fd of directory `path`, or -1 if there is none."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self) -> int:
        try:
            self.fd = os.open(self.path, _OPEN_DIR)
        except (FileNotFoundError, NotADirectoryError):
            self.fd = -1
        except OSError as exc:
            raise KernelError.from_oserror("open", self.path, exc) from None
        return self.fd

    def __exit__(self, *exc_info) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def _dir_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _walk_up(fd: int) -> set[tuple[int, int]]:
    """The ids of directory `fd` and of every directory above it, up to this process's "/"
    (where ".." is the directory itself). ".." crosses mount points upwards as a path would."""
    seen = {_dir_id(fd)}
    current = os.dup(fd)
    try:
        for _ in range(_MAX_DEPTH):
            parent = os.open("..", _OPEN_DIR, dir_fd=current)
            os.close(current)
            current = parent
            parent_id = _dir_id(current)
            if parent_id in seen:
                break
            seen.add(parent_id)
    finally:
        os.close(current)
    return seen
