"""Thin ctypes wrappers for the Linux system calls Python's os module lacks (3.11).

Each wrapper raises OSError with the errno on failure; callers turn that into a KernelError
naming the operation and object. Nothing here allocates beyond ctypes argument conversion, so
these are safe to call in a freshly forked child between fork and exec.
"""

from __future__ import annotations

# _socket: the C module under `socket`, all this needs, without socket.py's start-up (its enums:
# ~1 ms of a `fcrun run` without a fork-server, which loads this module).
import _socket
import ctypes
import fcntl
import os
import struct

# The C library, loaded once for every ctypes call fcrun makes (seccomp, bpf, netlink's setns,
# the image store's syncfs): one handle, so a function's restype is set in one place.
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long  # syscall(2) returns a long

# Namespace flags (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# The OCI namespace names and the /proc/<pid>/ns file of each.
NAMESPACES = {
    "pid": (CLONE_NEWPID, "pid"),
    "mount": (CLONE_NEWNS, "mnt"),
    "uts": (CLONE_NEWUTS, "uts"),
    "ipc": (CLONE_NEWIPC, "ipc"),
    "network": (CLONE_NEWNET, "net"),
    "cgroup": (CLONE_NEWCGROUP, "cgroup"),
}

# Mount flags (linux/mount.h).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# prctl options (linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "riscv64": 91, "ppc64le": 184, "s390x": 185}
_MACHINE = os.uname().machine  # not platform.machine(): the spawner keeps its imports few
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _check(result: int, what: bytes | None = None) -> int:
    """`result`, or OSError from errno; `what` (the call and its path) becomes the error's filename, so a
    failure deep in a container's set-up says which mount it was."""
    if result == -1:
        err = ctypes.get_errno()
        if what is None:
            raise OSError(err, os.strerror(err))
        raise OSError(err, os.strerror(err), what)
    return result


def unshare(flags: int) -> None:
    _check(libc.unshare(flags))


def setns(fd: int, nstype: int = 0) -> None:
    _check(libc.setns(fd, nstype))


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    _check(libc.mount(source, target, fstype, ctypes.c_ulong(flags), data),
           b"mount " + (fstype or source or b"(remount)") + b" on " + target)


def umount2(target: bytes, flags: int = 0) -> None:
    _check(libc.umount2(target, flags), b"umount " + target)


def pivot_root(new_root: bytes, put_old: bytes) -> None:
    _check(libc.syscall(_SYS_PIVOT_ROOT[_MACHINE], new_root, put_old), b"pivot_root " + new_root)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4), ctypes.c_ulong(arg5))
    )


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets from 64-bit masks (bit N = capability N)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(
        _CapData(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF),
        _CapData(effective >> 32, permitted >> 32, inheritable >> 32),
    )
    _check(libc.syscall(_SYS_CAPSET[_MACHINE], ctypes.byref(header), data))


def cap_last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def syncfs(fd: int) -> None:
    """syncfs(2): write out the dirty data of the filesystem holding `fd`."""
    _check(libc.syncfs(fd))


def sethostname(name: bytes) -> None:
    _check(libc.sethostname(name, len(name)))


def set_loopback_up() -> None:
    """Bring 'lo' up in the current network namespace with one ioctl (no netlink needed).

    Used in the container child right after unshare(CLONE_NEWNET), where a netlink library would
    be far heavier than two ioctls. (_socket, fcntl and struct are imported at module level so
    the child does not import anything.)
    """
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        s.close()


# The new mount API (Linux 5.2+, mount_setattr 5.12+): a detached copy of a tree, its flags set
# before anyone can see it, then attached in one step. The numbers are the same on every
# architecture (they were allocated after the syscall tables were unified).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x100000


AT_FDCWD = -100


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def open_tree(path: bytes, flags: int, dirfd: int = AT_FDCWD) -> int:
    """A detached copy (OPEN_TREE_CLONE) of the mount at `path` (relative to `dirfd`; b"" with
    AT_EMPTY_PATH: the directory `dirfd` itself), as an fd; O_CLOEXEC always."""
    return _check(libc.syscall(_SYS_OPEN_TREE, dirfd, path, ctypes.c_uint(flags | os.O_CLOEXEC)), b"open_tree " + path)


def mount_setattr(fd: int, attr_set: int, attr_clr: int = 0, recursive: bool = False, userns_fd: int = 0,
                  propagation: int = 0) -> None:
    """Change a mount's attributes; with MOUNT_ATTR_IDMAP in attr_set, `userns_fd` gives the
    user namespace whose id mapping the (detached, never attached) mount gets. `propagation`:
    0 (unchanged) or one of MS_PRIVATE, MS_SLAVE, MS_SHARED."""
    attr = _MountAttr(attr_set, attr_clr, propagation, userns_fd)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", ctypes.c_uint(flags), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))))


def move_mount(fd: int, target: bytes) -> None:
    """Attach the detached tree `fd` at `target` (mount propagation applies as for mount(2))."""
    _check(libc.syscall(_SYS_MOVE_MOUNT, fd, b"", -100, target, ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)),
           b"move_mount to " + target)


# openat2 (Linux 5.6+): path resolution the kernel confines. Same number on every architecture.
_SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """open `path` relative to `dir_fd` under the RESOLVE_* rules in `resolve`; O_CLOEXEC always."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _check(libc.syscall(_SYS_OPENAT2, dir_fd, path, ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))))
