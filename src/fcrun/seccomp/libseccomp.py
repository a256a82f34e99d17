"""A ctypes binding to the part of libseccomp fcrun uses: build a filter, export its BPF.

libseccomp knows every architecture's syscall table and how to lay out the filter (arch
checks, argument comparisons on 64-bit values split in two 32-bit words), so fcrun never
assembles BPF itself. The library is loaded once per process (`library()`), on first use: a
container without a seccomp profile never loads it.

Every function returns a negative errno on failure; `LibSeccomp` turns that into an OSError
naming the call.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import functools
import os

from ..errors import MissingFeature

LIBRARY = "libseccomp.so.2"

# Actions (seccomp.h). ERRNO and TRACE carry a 16-bit value in the low bits.
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_KILL_THREAD = 0x00000000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_ERRNO = 0x00050000
SCMP_ACT_TRACE = 0x7FF00000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000

# enum scmp_compare.
SCMP_CMP_NE = 1
SCMP_CMP_LT = 2
SCMP_CMP_LE = 3
SCMP_CMP_EQ = 4
SCMP_CMP_GE = 5
SCMP_CMP_GT = 6
SCMP_CMP_MASKED_EQ = 7

# enum scmp_filter_attr.
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_FLTATR_CTL_NNP = 3
SCMP_FLTATR_CTL_OPTIMIZE = 8

# seccomp_syscall_resolve_name's answer for a name it does not know on any architecture.
NR_SCMP_ERROR = -1


class ScmpArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp: (arg index, op, datum_a, datum_b). MASKED_EQ: a = mask, b = value."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class ScmpVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


class LibSeccomp:
    """The loaded library with typed functions. One per process: use `library()`."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.restype = None
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_arch_native.argtypes = []
        lib.seccomp_arch_native.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ScmpArgCmp),
        ]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.seccomp_version.argtypes = []
        lib.seccomp_version.restype = ctypes.POINTER(ScmpVersion)

    @staticmethod
    def _check(call: str, rc: int) -> int:
        if rc < 0:
            raise OSError(-rc, f"{call}: {os.strerror(-rc)}")
        return rc

    def init(self, default_action: int) -> int:
        """A new filter context. Resource handling: the caller must `release` it."""
        ctx = self._lib.seccomp_init(default_action)
        if not ctx:
            raise OSError(_errno.EINVAL, f"seccomp_init(0x{default_action:x}) failed")
        return ctx

    def release(self, ctx: int) -> None:
        self._lib.seccomp_release(ctx)

    def arch_native(self) -> int:
        return self._lib.seccomp_arch_native()

    def version(self) -> tuple[int, int, int]:
        v = self._lib.seccomp_version().contents
        return v.major, v.minor, v.micro

    def arch_resolve_name(self, name: str) -> int:
        """'x86_64' -> the AUDIT_ARCH token; 0 when libseccomp does not know the name."""
        return self._lib.seccomp_arch_resolve_name(name.encode())

    def arch_add(self, ctx: int, token: int) -> None:
        rc = self._lib.seccomp_arch_add(ctx, token)
        if rc != -_errno.EEXIST:  # the native architecture is in every new context already
            self._check(f"seccomp_arch_add(0x{token:x})", rc)

    def syscall_resolve_name(self, name: str) -> int:
        """The native number, a negative pseudo-number for a syscall only other architectures
        have, or NR_SCMP_ERROR when libseccomp knows no syscall of that name."""
        return self._lib.seccomp_syscall_resolve_name(name.encode())

    def rule_add(self, ctx: int, action: int, syscall: int, args: list[tuple[int, int, int, int]]) -> None:
        """Add one rule: `args` are (index, op, datum_a, datum_b), all of which must match."""
        array = (ScmpArgCmp * max(len(args), 1))(*[ScmpArgCmp(*a) for a in args])
        self._check(f"seccomp_rule_add(syscall {syscall})", self._lib.seccomp_rule_add_array(ctx, action, syscall, len(args), array))

    def attr_set(self, ctx: int, attr: int, value: int) -> None:
        self._check(f"seccomp_attr_set({attr})", self._lib.seccomp_attr_set(ctx, attr, value))

    def export_bpf(self, ctx: int) -> bytes:
        """The filter as the kernel loads it: struct sock_filter[] (8 bytes an instruction).

        libseccomp writes it to an fd; a memfd keeps it off any filesystem.
        """
        fd = os.memfd_create("fcrun-seccomp", os.MFD_CLOEXEC)
        try:
            self._check("seccomp_export_bpf", self._lib.seccomp_export_bpf(ctx, fd))
            size = os.fstat(fd).st_size
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)


@functools.cache
def library() -> LibSeccomp:
    """libseccomp, loaded on first use and kept for the process's life.

    Raises:
        MissingFeature: libseccomp.so.2 is not installed.
    """
    try:
        return LibSeccomp(ctypes.CDLL(LIBRARY, use_errno=True))
    except OSError as exc:
        raise MissingFeature(LIBRARY, f"install libseccomp2 to run containers with a seccomp profile ({exc})") from None
