"""Load a compiled filter into the calling process: the container child's last step before
execve. Nothing here allocates beyond one ctypes buffer, so it is safe between fork and exec.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os

from ..syscalls import libc

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_SET_MODE_FILTER = 1
BPF_INSTRUCTION_BYTES = 8  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}
BPF_MAXINSNS = 4096  # the kernel's limit on one classic BPF program
# linux/seccomp.h SECCOMP_FILTER_FLAG_*, those fcrun loads filters with.
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4
SECCOMP_FLAGS_ALLOWED = SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_LOG | SECCOMP_FILTER_FLAG_SPEC_ALLOW
# seccomp(2)'s number, needed only to pass flags (prctl cannot); per os.uname().machine.
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "riscv64": 277, "ppc64le": 358, "s390x": 348}.get(os.uname().machine)


class SockFprog(ctypes.Structure):
    """struct sock_fprog: the instruction count and a pointer to the instructions."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_filter(bpf: bytes, flags: int = 0) -> None:
    """Load `bpf` (struct sock_filter[]) as a seccomp filter of this process, for good.

    Needs no_new_privs, or CAP_SYS_ADMIN in the caller's user namespace (runtime/child.py
    loads it before the capabilities are dropped when the spec turns no_new_privs off, as
    runc does).
    `flags`: SECCOMP_FILTER_FLAG_* bits (profile.filter_flags).

    Raises:
        OSError: the kernel refused the filter (EACCES: neither no_new_privs nor
            CAP_SYS_ADMIN; EINVAL: not a valid program).
    """
    if not bpf or len(bpf) % BPF_INSTRUCTION_BYTES:
        raise OSError(_errno.EINVAL, f"load seccomp filter: {len(bpf)} bytes is not a BPF program")
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = SockFprog(len(bpf) // BPF_INSTRUCTION_BYTES, ctypes.addressof(program))
    if flags:
        if _SYS_SECCOMP is None:
            raise OSError(_errno.ENOSYS, "load seccomp filter: seccomp(2) flags on this machine")
        rc = libc.syscall(ctypes.c_long(_SYS_SECCOMP), ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags), ctypes.byref(fprog))
    else:
        rc = libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"load seccomp filter ({len(bpf) // BPF_INSTRUCTION_BYTES} instructions): {os.strerror(err)}")
