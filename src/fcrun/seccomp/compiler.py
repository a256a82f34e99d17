"""Compile an OCI seccomp profile to the BPF program the kernel loads, with libseccomp.

Runs in the parent, before fork (plan.py): the child only hands the bytes to the kernel.
Results are cached by the profile's encoding, so the default profile, shared by every
container, is compiled once per process; and, given a directory (the runtime's
`<run root>/seccomp`), once per host: compiling the default profile takes ~8 ms, a tenth of a
`fcrun run` without a fork-server and of a `fcrun-oci create`, each a new process. A file
there is named by a hash of the profile, libseccomp's version and the native architecture
(all the program depends on), holds the program behind a hash of it (a torn or damaged file
reads as absent), and is used only if root owns it and nobody else may write it.
"""

from __future__ import annotations

import os
import stat
import _thread  # a lock only: not threading (~1 ms of fcrun run to import)
from collections import OrderedDict

import msgspec

try:  # hashlib would load OpenSSL's bindings first (~2 ms); blake2 is CPython's own either way
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - another Python implementation
    from hashlib import blake2b

from ..atomicfile import write_atomic
from ..errors import FcrunError, SpecError
from ..runtime.spec import Seccomp, SeccompSyscall
from . import libseccomp as ls
from .profile import ACT_ERRNO, ACT_TRACE, ARCHITECTURES, validate_profile

_ACTION_BASE = {
    "SCMP_ACT_KILL": ls.SCMP_ACT_KILL_THREAD,  # the OCI name for kill-thread
    "SCMP_ACT_KILL_THREAD": ls.SCMP_ACT_KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": ls.SCMP_ACT_KILL_PROCESS,
    "SCMP_ACT_TRAP": ls.SCMP_ACT_TRAP,
    ACT_ERRNO: ls.SCMP_ACT_ERRNO,
    ACT_TRACE: ls.SCMP_ACT_TRACE,
    "SCMP_ACT_ALLOW": ls.SCMP_ACT_ALLOW,
    "SCMP_ACT_LOG": ls.SCMP_ACT_LOG,
}
_OPERATORS = {
    "SCMP_CMP_NE": ls.SCMP_CMP_NE, "SCMP_CMP_LT": ls.SCMP_CMP_LT, "SCMP_CMP_LE": ls.SCMP_CMP_LE,
    "SCMP_CMP_EQ": ls.SCMP_CMP_EQ, "SCMP_CMP_GE": ls.SCMP_CMP_GE, "SCMP_CMP_GT": ls.SCMP_CMP_GT,
    "SCMP_CMP_MASKED_EQ": ls.SCMP_CMP_MASKED_EQ,
}
# runc's default when an ERRNO/TRACE action names no errno.
DEFAULT_ERRNO = 1  # EPERM
# libseccomp's binary-tree layout: a syscall is found in O(log n) comparisons instead of a
# linear walk of the ~350 allowed numbers; the kernel runs this on every syscall.
OPTIMIZE_BINARY_TREE = 2

CACHE_SIZE = 32
_cache: OrderedDict[bytes, bytes] = OrderedDict()
_lock = _thread.allocate_lock()  # threading.Lock is this function
_encoder = msgspec.json.Encoder()


def action_value(action: str, errno_ret: int | None) -> int:
    """An OCI action name -> libseccomp's action value."""
    base = _ACTION_BASE[action]
    if action in (ACT_ERRNO, ACT_TRACE):
        return base | ((DEFAULT_ERRNO if errno_ret is None else errno_ret) & 0xFFFF)
    return base


def compile_filter(profile: Seccomp, where: str = "$.linux.seccomp", cache_dir: str | None = None) -> bytes:
    """The profile's BPF program (struct sock_filter[]), from the cache when compiled before
    (in this process, or in `cache_dir` by any process: the module docstring).

    Syscall names that libseccomp knows on no architecture, or that the profile's
    architectures lack, are skipped, as runc does: one profile serves every kernel and machine.

    Raises:
        SpecError: the profile is invalid, or libseccomp refused one of its rules (at its path).
        MissingFeature: libseccomp is not installed.
    """
    key = _encoder.encode(profile)
    with _lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
    validate_profile(profile, where)
    path = _cache_path(cache_dir, key) if cache_dir else None
    bpf = _read_cached(path) if path else None
    if bpf is None:
        bpf = _compile(profile, where)
        if path:
            _write_cached(cache_dir, path, bpf)
    with _lock:
        _cache[key] = bpf
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return bpf


DIGEST_BYTES = 32


def _cache_path(cache_dir: str, key: bytes) -> str:
    lib = ls.library()
    name = blake2b(b"%s\0%r\0%d" % (key, lib.version(), lib.arch_native()), digest_size=DIGEST_BYTES)
    return os.path.join(cache_dir, name.hexdigest() + ".bpf")


def _ours_alone(st: os.stat_result, is_kind) -> bool:
    """Owned by this process's user (root), and nobody else may write it: a file another user
    could have written, or swapped in (by renaming in its directory), is not trusted."""
    return is_kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _read_cached(path: str) -> bytes | None:
    """The program a file in the cache holds; None if it is absent, damaged or not root's alone."""
    try:
        if not _ours_alone(os.lstat(os.path.dirname(path)), stat.S_ISDIR):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not _ours_alone(st, stat.S_ISREG):
            return None
        data = os.read(fd, st.st_size + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    digest, bpf = data[:DIGEST_BYTES], data[DIGEST_BYTES:]
    if not bpf or len(bpf) % 8 or blake2b(bpf, digest_size=DIGEST_BYTES).digest() != digest:
        return None
    return bpf


def _write_cached(cache_dir: str, path: str, bpf: bytes) -> None:
    """Keep the program for the next process; a failure only costs that process a compile."""
    try:
        os.mkdir(cache_dir, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return
    try:
        if not _ours_alone(os.lstat(cache_dir), stat.S_ISDIR):
            return  # not a directory of ours alone: no file of ours goes there
        # Not fsync'd: a file the machine lost power over reads as damaged, and is made again.
        write_atomic(path, blake2b(bpf, digest_size=DIGEST_BYTES).digest() + bpf, what="seccomp cache",
                     durable=False)
    except (OSError, FcrunError):
        return


def _compile(profile: Seccomp, where: str) -> bytes:
    lib = ls.library()
    default = action_value(profile.default_action, profile.default_errno_ret)
    ctx = lib.init(default)
    try:
        # A syscall of an ABI the profile does not list kills the whole process, not one thread
        # of it (libseccomp's default), which would leave the rest running in an odd state.
        lib.attr_set(ctx, ls.SCMP_FLTATR_ACT_BADARCH, ls.SCMP_ACT_KILL_PROCESS)
        lib.attr_set(ctx, ls.SCMP_FLTATR_CTL_OPTIMIZE, OPTIMIZE_BINARY_TREE)
        for i, arch in enumerate(profile.architectures):
            token = lib.arch_resolve_name(ARCHITECTURES[arch])
            if not token:
                raise SpecError(f"libseccomp does not support architecture {arch}", f"{where}.architectures[{i}]")
            try:
                lib.arch_add(ctx, token)
            except OSError as exc:
                raise SpecError(f"add seccomp architecture {arch}: {exc}", f"{where}.architectures[{i}]") from None
        for i, rule in enumerate(profile.syscalls):
            _add_rule(lib, ctx, default, rule, f"{where}.syscalls[{i}]")
        return lib.export_bpf(ctx)
    finally:
        lib.release(ctx)


def _add_rule(lib: ls.LibSeccomp, ctx: int, default: int, rule: SeccompSyscall, where: str) -> None:
    action = action_value(rule.action, rule.errno_ret)
    if action == default:
        return  # libseccomp refuses a rule that repeats the default action; runc skips it too
    conditions = [(a.index, _OPERATORS[a.op], a.value, a.value_two) for a in rule.args]
    # runc's semantics: conditions on distinct arguments must all hold (one rule); several
    # conditions on the same argument are alternatives (one rule each).
    indexes = [a.index for a in rule.args]
    groups = [[c] for c in conditions] if len(set(indexes)) < len(indexes) else [conditions]
    for j, name in enumerate(rule.names):
        number = lib.syscall_resolve_name(name)
        if number == ls.NR_SCMP_ERROR:
            continue  # unknown to libseccomp: not on this kernel generation or machine
        for group in groups:
            try:
                lib.rule_add(ctx, action, number, group)
            except OSError as exc:
                raise SpecError(f"libseccomp refused the rule for {name!r}: {exc}", f"{where}.names[{j}]") from None


def clear_cache() -> None:
    """Forget compiled filters (tests)."""
    with _lock:
        _cache.clear()
