"""The container's filesystem, set up by the child (child.py) in its new mount namespace.

`mount_rootfs` mounts the rootfs (overlay, or the bundle's directory bound onto itself) and
everything in it: the plan's mounts, /dev nodes (`make_devices`), masked and read-only paths;
`mount_cgroups` the spec's cgroup mount once the child is in its groups; `pivot_to_rootfs`
makes it the root. Every path inside the container is resolved with `secure_join`, so that a
symlink in the image never sends a mount or a device node onto the host.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import TYPE_CHECKING

from .. import syscalls as sc

if TYPE_CHECKING:
    from .child import ChildPlan, MountStep

MAX_SYMLINKS = 40


def secure_join(root: bytes, path: bytes) -> bytes:
    """Resolve `path` as if `root` were '/': symlinks (absolute or relative) never leave root.

    Components that do not exist yet are kept as written, so the caller can create them.
    (The same idea as runc's securejoin; needed because an image may contain symlinks such
    as /proc -> /etc that would otherwise send a mount onto the host.)
    """
    parts = [p for p in path.split(b"/") if p and p != b"."]
    resolved: list[bytes] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == b"..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + b"/" + b"/".join(resolved + [part])
        try:
            target = os.readlink(candidate)
        except OSError:
            resolved.append(part)  # not a symlink, or does not exist
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(_errno.ELOOP, "too many symlinks", candidate)
        if target.startswith(b"/"):
            resolved = []
        parts = [p for p in target.split(b"/") if p and p != b"."] + parts
    return root + b"/" + b"/".join(resolved)


def make_mountpoint(path: bytes, is_file: bool) -> None:
    if is_file:
        parent = os.path.dirname(path)
        os.makedirs(parent, 0o755, exist_ok=True)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    else:
        os.makedirs(path, 0o755, exist_ok=True)


def mount_one(m: MountStep, target: bytes) -> None:
    try:
        sc.mount(m.source, target, m.fstype, m.flags, m.data)
        if m.remount_flags:
            sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | m.remount_flags, None)
    except OSError as exc:
        if m.fstype != b"sysfs" or exc.errno != _errno.EPERM:
            raise
        # sysfs cannot be mounted without a new network namespace (--net host):
        # bind the host's read-only instead, as runc does.
        sc.mount(b"/sys", target, None, sc.MS_BIND | sc.MS_REC, None)
        sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_REC, None)


def mount_rootfs(plan: ChildPlan) -> None:
    """Mount the container's rootfs and everything in it (still in the host's root).

    Raises:
        OSError: a mount or mknod failed (its filename names the mount's destination).
    """
    root = plan.rootfs
    if not plan.unshare_flags & sc.CLONE_NEWNS:
        _bind_rootfs_in_shared_ns(root)
    else:
        _mount_rootfs_in_own_ns(plan)
    for m in plan.mounts:
        try:
            target = secure_join(root, m.destination)
            make_mountpoint(target, m.file_target)
            mount_one(m, target)
            if m.propagation:
                sc.mount(None, target, None, m.propagation, None)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, b"mount " + m.destination) from None

    make_devices(plan, root)

    for p in plan.masked_paths:
        target = secure_join(root, p)
        if os.path.isdir(target):
            sc.mount(b"tmpfs", target, b"tmpfs", sc.MS_RDONLY, None)
        elif os.path.exists(target):
            sc.mount(b"/dev/null", target, None, sc.MS_BIND, None)
    for p in plan.readonly_paths:
        target = secure_join(root, p)
        if os.path.exists(target):
            sc.mount(target, target, None, sc.MS_BIND | sc.MS_REC, None)
            sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_REC, None)


def _mount_rootfs_in_own_ns(plan: ChildPlan) -> None:
    """The rootfs mount itself, in the container's own mount namespace."""
    root = plan.rootfs
    # Stop our mounts from propagating back to the host, and the host's from reaching us.
    sc.mount(None, b"/", None, sc.MS_REC | plan.propagation, None)
    if plan.propagation == sc.MS_SHARED:
        # Shared (rootfsPropagation "shared"): our mounts are peers of the host's, so the
        # rootfs mounted under them would appear on the host too, and pivot_root refuses a
        # new root (or its parent) that is shared (EINVAL). runc makes the parent private.
        _make_parent_mount_private(root)
    if plan.overlay_tmpfs is not None:
        # The writable layer lives in this mount namespace only: nothing of it on the host's
        # disk, gone when the namespace goes. Its pages are charged to whoever writes them,
        # i.e. the container's memory cgroup, and the tmpfs size caps it.
        sc.mount(b"tmpfs", root, b"tmpfs", 0, plan.overlay_tmpfs)
        for path, mode in plan.overlay_tmpfs_dirs:
            os.mkdir(path, mode)
        if plan.upper_owner is not None:
            os.chown(plan.overlay_tmpfs_dirs[0][0], *plan.upper_owner)
    elif plan.idmapped_lower:
        sc.mount(b"tmpfs", root, b"tmpfs", 0, b"size=64k,mode=700")  # only attach points
    for layer, attach_point in plan.idmapped_lower:
        # A copy of the layer's mount that shows its files through the container's id mapping
        # (host root's files as the container root's), in this mount namespace only.
        os.mkdir(attach_point, 0o700)
        fd = sc.open_tree(layer, sc.OPEN_TREE_CLONE)
        try:
            sc.mount_setattr(fd, sc.MOUNT_ATTR_IDMAP, userns_fd=plan.userns_fd)
            sc.move_mount(fd, attach_point)
        finally:
            os.close(fd)
    if plan.overlay_data is not None:
        sc.mount(b"overlay", root, b"overlay", 0, plan.overlay_data)
    else:
        # pivot_root needs the new root to be a mount point.
        sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC, None)


def _bind_rootfs_in_shared_ns(root: bytes) -> None:
    """The rootfs mount in a mount namespace that is not the container's own (joined by path,
    or the runtime's: none in the spec). Its other mounts are not ours to change, and ours
    outlive the container there: the rootfs is bound onto itself and made private at once,
    so that nothing mounted below it propagates anywhere; unmount_shared_rootfs removes it."""
    sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC, None)
    sc.mount(None, root, None, sc.MS_PRIVATE | sc.MS_REC, None)


def mounts_at(path: bytes) -> int:
    """How many mounts are stacked at `path` in our mount namespace (/proc/self/mountinfo)."""
    # mountinfo escapes space, tab, newline and backslash in paths as octal (\040 ...).
    escaped = path.replace(b"\\", b"\\134").replace(b" ", b"\\040")
    escaped = escaped.replace(b"\t", b"\\011").replace(b"\n", b"\\012")
    with open("/proc/self/mountinfo", "rb") as f:
        return sum(1 for line in f if line.split(b" ", 5)[4] == escaped)


def unmount_shared_rootfs(rootfs: bytes, mount_ns: bytes = b"", mounts_before: int | None = None) -> None:
    """Remove what _bind_rootfs_in_shared_ns left: the rootfs bind (with everything mounted
    below it) in the mount namespace at `mount_ns` (b"": ours). A namespace or mount that is
    gone already is fine. `mounts_before`: mounts_at(rootfs) before the child ran (ours only),
    so that a creation that failed before its bind leaves a mount that was there already.

    Raises:
        OSError: the unmount failed otherwise (in the namespace: EIO, its errno in the message).
    """
    if not mount_ns:
        if mounts_before is None or mounts_at(rootfs) > mounts_before:
            _unmount_if_mounted(rootfs)
        return
    pid = os.fork()  # setns into a mount namespace needs a single-threaded process
    if pid == 0:
        code = 0
        try:
            fd = os.open(mount_ns, os.O_RDONLY | os.O_CLOEXEC)
            sc.setns(fd, sc.CLONE_NEWNS)
            _unmount_if_mounted(rootfs)
        except FileNotFoundError:
            pass  # the namespace is gone, and our mounts with it
        except BaseException as exc:  # noqa: BLE001 - a forked child reports by exit code only
            code = getattr(exc, "errno", None) or 1
        os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code:
        raise OSError(_errno.EIO, f"unmount the rootfs in mount namespace {mount_ns.decode(errors='replace')}: "
                      f"{os.strerror(code) if code > 0 else f'killed by signal {-code}'}", rootfs)


def _unmount_if_mounted(rootfs: bytes) -> None:
    # (os.path.ismount cannot tell: a bind mount of a directory onto itself keeps its device.)
    try:
        sc.umount2(rootfs, sc.MNT_DETACH)
    except OSError as exc:
        if exc.errno not in (_errno.EINVAL, _errno.ENOENT):  # not a mount point (any more), or gone
            raise


def make_devices(plan: ChildPlan, root: bytes) -> None:
    """The container's /dev nodes and symlinks (the defaults, then linux.devices)."""
    # Inside the rootfs, whatever the image made of /dev (a symlink to a host directory must
    # not get our device nodes there). mknod and symlink never follow a final symlink; the
    # mode is given whole (umask 0), so no chmod, which would follow one.
    dev = secure_join(root, b"/dev")
    umask = os.umask(0)
    try:
        for name, mode, major, minor in plan.devices:
            os.mknod(dev + b"/" + name, mode, os.makedev(major, minor))
    finally:
        os.umask(umask)
    for target, name in plan.dev_symlinks:
        os.symlink(target, dev + b"/" + name)
    if plan.spec_devices:
        umask = os.umask(0)
        try:
            for path, mode, major, minor, uid, gid in plan.spec_devices:
                target = secure_join(root, path)
                os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                if os.path.lexists(target):
                    os.unlink(target)  # one of the defaults above: the spec's says otherwise
                os.mknod(target, mode, os.makedev(major, minor))
                os.lchown(target, uid, gid)
        finally:
            os.umask(umask)


def mount_cgroups(plan: ChildPlan) -> None:
    """The spec's cgroup mount: the container's own groups only (as runc does without a
    cgroup namespace on v1), never the host's hierarchy."""
    target = secure_join(plan.rootfs, plan.cgroup_mount)
    os.makedirs(target, 0o755, exist_ok=True)
    flags = plan.cgroup_mount_flags & (sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    try:
        if any(name for _, name in plan.cgroup_binds):  # v1: a tmpfs holding one dir per hierarchy
            sc.mount(b"tmpfs", target, b"tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, b"mode=755")
        for source, name in plan.cgroup_binds:
            point = target + b"/" + name if name else target
            os.makedirs(point, 0o755, exist_ok=True)
            sc.mount(source, point, None, sc.MS_BIND | sc.MS_REC, None)
            sc.mount(None, point, None, sc.MS_BIND | sc.MS_REMOUNT | flags, None)
        if any(name for _, name in plan.cgroup_binds) and flags & sc.MS_RDONLY:
            sc.mount(None, target, None, sc.MS_REMOUNT | flags, None)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, b"mount " + plan.cgroup_mount) from None


def _make_parent_mount_private(path: bytes) -> None:
    """Make the mount `path` lies on (in this mount namespace) private."""
    while True:
        try:
            sc.mount(None, path, None, sc.MS_PRIVATE, None)
            return
        except OSError as exc:
            if exc.errno != _errno.EINVAL or path == b"/":
                raise
        path = os.path.dirname(path)  # EINVAL: not a mount point; try the one it lies on


def pivot_to_rootfs(plan: ChildPlan) -> None:
    if not plan.unshare_flags & sc.CLONE_NEWNS:
        # pivot_root would move every process of this shared namespace whose root is its
        # root into the container's; chroot moves only us (runc's choice without NEWNS).
        os.chroot(plan.rootfs)
        os.chdir(b"/")
        if plan.readonly_root:
            sc.mount(None, b"/", None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY, None)
        return
    # pivot_root(".", ".") stacks the old root on top of the new one; detaching it then leaves
    # nothing of the host's filesystem reachable (no put_old directory needed, as in runc).
    old_root = os.open(b"/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.chdir(plan.rootfs)
        sc.pivot_root(b".", b".")
        # The old root's mounts may be peers of the host's (rootfsPropagation "shared"): as a
        # slave tree their unmounting below cannot propagate to the host. (From inside it:
        # mount(2) on "." would take the new root, which lies under it.)
        os.fchdir(old_root)
        sc.mount(None, b".", None, sc.MS_SLAVE | sc.MS_REC, None)
    finally:
        os.close(old_root)
    sc.umount2(b".", sc.MNT_DETACH)
    os.chdir(b"/")
    if plan.propagation == sc.MS_SHARED:
        # The container's tree as asked; a peer group of its own, as the rootfs mount was private.
        sc.mount(None, b"/", None, sc.MS_SHARED | sc.MS_REC, None)
    if plan.readonly_root:
        sc.mount(None, b"/", None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY, None)
