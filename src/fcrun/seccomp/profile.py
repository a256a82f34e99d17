"""Seccomp profiles in the OCI format (config.json's linux.seccomp; Docker's profile files use
the same fields): the names they may use, their validation, and reading a PROFILE.json.

Validation is pure (no libseccomp): a bad profile is reported with its JSON path before
anything is compiled or created.
"""

from __future__ import annotations

import msgspec

from ..errors import SpecError
from ..runtime.spec import Seccomp
from . import install

ACT_ERRNO = "SCMP_ACT_ERRNO"
ACT_TRACE = "SCMP_ACT_TRACE"
# SCMP_ACT_NOTIFY is absent on purpose: it needs a listener (listenerPath) fcrun does not run.
ACTIONS = {
    "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP",
    ACT_ERRNO, ACT_TRACE, "SCMP_ACT_ALLOW", "SCMP_ACT_LOG",
}
OPERATORS = {
    "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
}
# OCI name -> libseccomp's name for seccomp_arch_resolve_name.
ARCHITECTURES = {
    "SCMP_ARCH_" + name.upper(): name
    for name in (
        "x86", "x86_64", "x32", "arm", "aarch64", "mips", "mips64", "mips64n32", "mipsel",
        "mipsel64", "mipsel64n32", "ppc", "ppc64", "ppc64le", "s390", "s390x", "parisc",
        "parisc64", "riscv64", "loongarch64", "m68k", "sh", "sheb",
    )
}
# linux/seccomp.h SECCOMP_FILTER_FLAG_*: what seccomp(2) is called with. NEW_LISTENER is absent
# (no notify support); WAIT_KILLABLE_RECV only means something with a listener, so it is dropped.
FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": install.SECCOMP_FILTER_FLAG_TSYNC,
    "SECCOMP_FILTER_FLAG_LOG": install.SECCOMP_FILTER_FLAG_LOG,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": install.SECCOMP_FILTER_FLAG_SPEC_ALLOW,
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": 0,
}
MAX_ERRNO = 4095  # the kernel returns -errno only up to this
MAX_ARG_INDEX = 5  # six syscall arguments
U64_MAX = (1 << 64) - 1

# The keys a profile file may hold: those runc reads from config.json's linux.seccomp.
# "comment" (Docker's profiles carry it) is documentation and ignored. Docker's conditional
# keys are refused rather than ignored: dropping "includes": {"caps": ["CAP_SYS_ADMIN"]}
# would turn that rule into an unconditional allow of mount, unshare, setns...
_PROFILE_KEYS = {"defaultAction", "defaultErrnoRet", "architectures", "flags", "syscalls", "comment"}
_SYSCALL_KEYS = {"names", "action", "errnoRet", "args", "comment"}
_ARG_KEYS = {"index", "value", "valueTwo", "op"}
_HINTS = {
    "archMap": "Docker's archMap is resolved by dockerd; list the architectures in \"architectures\"",
    "includes": "Docker's per-capability/arch conditions are not supported; keep only the rules that apply",
    "excludes": "Docker's per-capability/arch conditions are not supported; keep only the rules that apply",
    "name": "use \"names\": [...]",
    "listenerPath": "SCMP_ACT_NOTIFY and seccomp listeners are not supported",
    "listenerMetadata": "SCMP_ACT_NOTIFY and seccomp listeners are not supported",
}


def validate_profile(profile: Seccomp, where: str = "$.linux.seccomp", source: str = "") -> None:
    """Check names and ranges the types cannot. Raises SpecError at the JSON path of the bad
    value (`$.linux.seccomp.syscalls[3].action`).

    Syscall names are not checked: a name this kernel or architecture lacks is skipped when
    compiling (as runc and libseccomp do), so one profile serves every host.
    `source`: the file the profile came from, named in the message.
    """
    prefix = f"seccomp profile {source}: " if source else ""
    _check_action(profile.default_action, profile.default_errno_ret, f"{where}.defaultAction", f"{where}.defaultErrnoRet", prefix)
    for i, arch in enumerate(profile.architectures):
        if arch not in ARCHITECTURES:
            raise SpecError(prefix + f"unknown seccomp architecture {arch!r}", f"{where}.architectures[{i}]")
    for i, flag in enumerate(profile.flags):
        if flag not in FLAGS:
            raise SpecError(prefix + f"unknown or unsupported seccomp flag {flag!r}", f"{where}.flags[{i}]")
    for i, rule in enumerate(profile.syscalls):
        at = f"{where}.syscalls[{i}]"
        if not rule.names:
            raise SpecError(prefix + "a seccomp rule needs at least one syscall name", f"{at}.names")
        for j, name in enumerate(rule.names):
            if not name or not name.replace("_", "").isalnum():
                raise SpecError(prefix + f"invalid syscall name {name!r}", f"{at}.names[{j}]")
        _check_action(rule.action, rule.errno_ret, f"{at}.action", f"{at}.errnoRet", prefix)
        for j, arg in enumerate(rule.args):
            if not 0 <= arg.index <= MAX_ARG_INDEX:
                raise SpecError(prefix + f"argument index {arg.index} is not 0..{MAX_ARG_INDEX}", f"{at}.args[{j}].index")
            if arg.op not in OPERATORS:
                raise SpecError(prefix + f"unknown seccomp operator {arg.op!r}", f"{at}.args[{j}].op")
            for field, value in (("value", arg.value), ("valueTwo", arg.value_two)):
                if not 0 <= value <= U64_MAX:
                    raise SpecError(prefix + f"{value} is not an unsigned 64-bit value", f"{at}.args[{j}].{field}")


def _check_action(action: str, errno_ret: int | None, where: str, errno_where: str, prefix: str) -> None:
    if action not in ACTIONS:
        raise SpecError(prefix + f"unknown or unsupported seccomp action {action!r}", where)
    if errno_ret is not None:
        if action not in (ACT_ERRNO, ACT_TRACE):
            raise SpecError(prefix + f"an errno is only meaningful with {ACT_ERRNO} or {ACT_TRACE}", errno_where)
        if not 0 <= errno_ret <= MAX_ERRNO:
            raise SpecError(prefix + f"errno {errno_ret} is not 0..{MAX_ERRNO}", errno_where)


def filter_flags(profile: Seccomp) -> int:
    """The SECCOMP_FILTER_FLAG_* bits to load the profile's filter with."""
    bits = 0
    for flag in profile.flags:
        bits |= FLAGS[flag]
    return bits


def _check_keys(obj: object, allowed: set[str], where: str, source: str) -> None:
    if not isinstance(obj, dict):
        return  # msgspec.convert reports the wrong type with its path
    for key in obj:
        if key not in allowed:
            hint = _HINTS.get(key)
            raise SpecError(f"seccomp profile {source}: unknown field {key!r}" + (f" ({hint})" if hint else ""), f"{where}.{key}")


def parse_profile(data: bytes, source: str) -> Seccomp:
    """A profile from JSON text, strictly: unknown fields are errors.

    Raises:
        SpecError: malformed JSON, an unknown field, a wrong type or a bad value, naming
            `source` and the JSON path.
    """
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise SpecError(f"seccomp profile {source}: malformed JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"seccomp profile {source}: expected a JSON object", "$")
    _check_keys(raw, _PROFILE_KEYS, "$", source)
    rules = raw.get("syscalls")
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        _check_keys(rule, _SYSCALL_KEYS, f"$.syscalls[{i}]", source)
        args = rule.get("args") if isinstance(rule, dict) else None
        for j, arg in enumerate(args if isinstance(args, list) else []):
            _check_keys(arg, _ARG_KEYS, f"$.syscalls[{i}].args[{j}]", source)
    raw.pop("comment", None)
    for rule in rules if isinstance(rules, list) else []:
        if isinstance(rule, dict):
            rule.pop("comment", None)
            if rule.get("args") is None:
                rule.pop("args", None)  # Docker writes "args": null
    try:
        profile = msgspec.convert(raw, Seccomp)
    except msgspec.ValidationError as exc:
        raise SpecError(f"seccomp profile {source}: {exc}") from None
    validate_profile(profile, "$", source)
    return profile


def load_profile(path: str) -> Seccomp:
    """Read a PROFILE.json (OCI/Docker seccomp format).

    Raises:
        SpecError: the file cannot be read or is not a valid profile (names the file and the
            JSON path).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SpecError(f"read seccomp profile {path}: [Errno {exc.errno}] {exc.strerror}") from None
    return parse_profile(data, path)


def parse_security_opts(opts: list[str] | tuple[str, ...], where: str = "--security-opt") -> Seccomp | str:
    """`--security-opt` values -> what RunOptions.seccomp takes: "default", "unconfined", or
    the profile read from `seccomp=PROFILE.json`. The last seccomp= wins, as in Docker.
    ("seccomp=default" is fcrun's, for `app update` to go back to the default.)

    Raises:
        SpecError: an option other than seccomp=..., or a bad profile file.
    """
    result: Seccomp | str = "default"
    for opt in opts:
        key, sep, value = opt.partition("=")
        if key != "seccomp" or not sep or not value:
            raise SpecError(f"unsupported security option {opt!r}: fcrun takes seccomp=unconfined|default|PROFILE.json", where)
        result = value if value in ("unconfined", "default") else load_profile(value)
    return result
