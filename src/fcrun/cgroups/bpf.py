"""The two bpf(2) commands the cgroup v2 device rules need, through ctypes: load a
BPF_PROG_TYPE_CGROUP_DEVICE program, attach it to a cgroup. Python's os module has no bpf().

Each function raises OSError with the errno; ``KernelIO`` turns that into a KernelError
naming the operation and the cgroup.

Resource handling: ``load_cgroup_device`` returns a program fd the caller owns (O_CLOEXEC,
as every bpf fd). An attached program lives as long as the cgroup it is attached to, whether
or not the fd is still open; closing the fd never detaches it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from ..syscalls import libc

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_MACHINE = os.uname().machine

# linux/bpf.h
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6  # enum bpf_attach_type
# Programs attached with ALLOW_MULTI to a cgroup and its ancestors all run, and all must allow;
# the default (exclusive) flag would fail with EPERM beneath a parent that has a program of
# its own (systemd attaches one to units with a DevicePolicy), and would let none be added below.
BPF_F_ALLOW_MULTI = 2

LICENSE = b"Apache-2.0"  # any string: cgroup device programs call no GPL-only helper
PROG_NAME = b"fcrun_devices"  # shown by bpftool (at most 15 bytes)
VERIFIER_LOG_BYTES = 1 << 16

# union bpf_attr for BPF_PROG_LOAD, up to expected_attach_type: prog_type, insn_cnt, insns,
# license, log_level, log_size, log_buf, kern_version, prog_flags, prog_name[16],
# prog_ifindex, expected_attach_type. A shorter attr than the kernel's is fine: it zero-fills.
_PROG_LOAD = struct.Struct("=IIQQIIQII16sII")
# ... and for BPF_PROG_ATTACH: target_fd, attach_bpf_fd, attach_type, attach_flags, replace_bpf_fd.
_PROG_ATTACH = struct.Struct("=IIIII")


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    result = libc.syscall(ctypes.c_long(_SYS_BPF[_MACHINE]), ctypes.c_long(cmd), attr, ctypes.c_uint(len(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def load_cgroup_device(code: bytes) -> int:
    """Load the eBPF ``code`` (struct bpf_insn, 8 bytes each) as a cgroup device program; returns its fd.

    Raises:
        OSError: the kernel refused it: EINVAL/EACCES from the verifier (then with its log
            as ``verifier_log``), EPERM without CAP_BPF/CAP_SYS_ADMIN.
    """
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(LICENSE)

    def attr(log: ctypes.Array | None) -> ctypes.Array:
        return ctypes.create_string_buffer(_PROG_LOAD.pack(
            BPF_PROG_TYPE_CGROUP_DEVICE, len(code) // 8, ctypes.addressof(insns), ctypes.addressof(license_),
            1 if log is not None else 0, len(log) if log is not None else 0,
            ctypes.addressof(log) if log is not None else 0, 0, 0, PROG_NAME, 0, 0,
        ), _PROG_LOAD.size)

    try:
        return _bpf(BPF_PROG_LOAD, attr(None))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EACCES):
            raise
        first = exc
    # Load again with the verifier's log, only to say why (the first try spares the buffer).
    log = ctypes.create_string_buffer(VERIFIER_LOG_BYTES)
    try:
        fd = _bpf(BPF_PROG_LOAD, attr(log))
    except OSError as exc:
        exc.verifier_log = log.value.decode(errors="replace").strip()  # type: ignore[attr-defined]
        raise
    os.close(fd)  # accepted the second time: should not happen; report the first refusal
    raise first


def attach_cgroup_device(cgroup_fd: int, prog_fd: int) -> None:
    """Attach the loaded program ``prog_fd`` to the cgroup dir open as ``cgroup_fd`` (ALLOW_MULTI).

    Raises:
        OSError: EPERM (an exclusive program above, or no privilege), EBADF, EINVAL.
    """
    attr = ctypes.create_string_buffer(
        _PROG_ATTACH.pack(cgroup_fd, prog_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI, 0), _PROG_ATTACH.size)
    _bpf(BPF_PROG_ATTACH, attr)
