"""Device rules of a container's cgroup: what it may mknod, read and write.

One list of rules, evaluated as the v1 devices controller does: a rule of type "a" with no
numbers and access "rwm" resets the default (deny all, or allow all) and forgets the rules
before it; every other rule is an exception to that default, and the last matching one wins.
The same list becomes writes to devices.deny / devices.allow on cgroup v1 (``v1_writes``) and
an eBPF program of type BPF_PROG_TYPE_CGROUP_DEVICE on cgroup v2 (``program``), since v2 has
no device files: the kernel runs the program on every mknod and open of a device node.

An exception matches a request when the type and numbers match, and:
  - an allow rule, when it grants every access asked for (open O_RDWR asks for r and w);
  - a deny rule, when it refuses any of them.
So a partial rule can only make a request fail, never let more through than each rule says.
(The v1 kernel merges exceptions of one device and drops a deny that exactly matches an
earlier allow; for the lists runc and fcrun write, a reset followed by allows, both agree.)

Everything here is pure; the bpf() syscalls are in bpf.py, behind ``KernelIO``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import msgspec

from ..errors import SpecError

DEVICES_ALLOW = "devices.allow"  # v1
DEVICES_DENY = "devices.deny"

ACCESS_ORDER = "rwm"
MAX_NUMBER = {"major": (1 << 12) - 1, "minor": (1 << 20) - 1}  # the kernel's dev_t: MINORBITS = 20

# linux/bpf.h: bpf_cgroup_dev_ctx.access_type = (access << 16) | type
BPF_DEVCG_ACC_MKNOD, BPF_DEVCG_ACC_READ, BPF_DEVCG_ACC_WRITE = 1, 2, 4
BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR = 1, 2
_ACCESS_BITS = {"m": BPF_DEVCG_ACC_MKNOD, "r": BPF_DEVCG_ACC_READ, "w": BPF_DEVCG_ACC_WRITE}
_TYPE_BITS = {"b": BPF_DEVCG_DEV_BLOCK, "c": BPF_DEVCG_DEV_CHAR}
_ALL_ACCESS = BPF_DEVCG_ACC_MKNOD | BPF_DEVCG_ACC_READ | BPF_DEVCG_ACC_WRITE


class DeviceRule(msgspec.Struct, frozen=True, kw_only=True):
    """One rule: ``type`` a (all devices), b (block) or c (char); ``major``/``minor`` None
    for any; ``access`` a non-empty subset of "rwm". Frozen and hashable: a rule set keys the
    v2 program cache.

    Raises (on construction):
        SpecError: a bad type, number or access, or an "a" rule that is not a whole reset.
    """

    allow: bool
    type: str = "a"
    major: int | None = None
    minor: int | None = None
    access: str = "rwm"

    def __post_init__(self) -> None:
        check_rule(self.type, self.major, self.minor, self.access, "limits.devices")

    @property
    def is_reset(self) -> bool:
        return self.type == "a"

    def v1_text(self) -> str:
        """The line v1's devices.allow / devices.deny take: "c 1:3 rwm", "a"."""
        if self.is_reset:
            return "a"
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.type} {major}:{minor} {''.join(c for c in ACCESS_ORDER if c in self.access)}"


def check_rule(type: str, major: int | None, minor: int | None, access: str, where: str) -> None:
    """Raise SpecError (at ``where``) for a rule the kernel would refuse or read otherwise."""
    if type not in ("a", "b", "c"):
        raise SpecError(f"device type must be a, b or c, not {type!r}", where)
    for field, value in (("major", major), ("minor", minor)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= MAX_NUMBER[field]):
            raise SpecError(f"device {field} {value!r} is not a number 0..{MAX_NUMBER[field]}", where)
    if (not isinstance(access, str) or not access or len(set(access)) != len(access)
            or not set(access) <= set(ACCESS_ORDER)):
        raise SpecError(f"device access {access!r} must be a subset of 'rwm'", where)
    # The v1 kernel reads any "a" rule as a whole reset and ignores its numbers and access:
    # "allow a 1:3 r" would allow everything there. Refuse what the two versions would differ on.
    if type == "a" and (major is not None or minor is not None or set(access) != set(ACCESS_ORDER)):
        raise SpecError("a rule of type a (all devices) takes no major, minor or access but rwm", where)


def effective(rules: Iterable[DeviceRule]) -> tuple[bool, tuple[DeviceRule, ...]]:
    """(default allow?, the exceptions after the last reset, in order). No reset: allow all."""
    default_allow = True
    exceptions: list[DeviceRule] = []
    for rule in rules:
        if rule.is_reset:
            default_allow, exceptions = rule.allow, []
        else:
            exceptions.append(rule)
    return default_allow, tuple(exceptions)


def v1_writes(rules: Sequence[DeviceRule]) -> list[tuple[str, str]]:
    """(file, text) writes that give a fresh v1 devices group these rules, in order."""
    default_allow, exceptions = effective(rules)
    writes = []
    if any(r.is_reset for r in rules):
        writes.append((DEVICES_ALLOW if default_allow else DEVICES_DENY, "a"))
    for rule in exceptions:
        writes.append((DEVICES_ALLOW if rule.allow else DEVICES_DENY, rule.v1_text()))
    return writes


def decide(rules: Sequence[DeviceRule], type: str, major: int, minor: int, access: str) -> bool:
    """Whether a request (type b|c, numbers, access like "rw") is allowed: the reference the
    v2 program is tested against."""
    default_allow, exceptions = effective(rules)
    asked = set(access)
    for rule in reversed(exceptions):
        if rule.type != type or rule.major not in (None, major) or rule.minor not in (None, minor):
            continue
        if rule.allow and asked <= set(rule.access):
            return True
        if not rule.allow and asked & set(rule.access):
            return False
    return default_allow


# --- the v2 program --------------------------------------------------------------------------


class Insn(NamedTuple):
    """One eBPF instruction (struct bpf_insn): opcode, dst and src register, offset, immediate."""

    op: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def jumping(self, off: int) -> "Insn":
        """The same instruction with jump offset `off` (relative to the next instruction)."""
        return Insn(self.op, self.dst, self.src, off, self.imm)

    def encode(self) -> bytes:
        # dst_reg is the low nibble of the second byte on little-endian machines (x86_64, arm64).
        return struct.pack("<BBhi", self.op, (self.src << 4) | self.dst, self.off, self.imm)


# Opcodes (linux/bpf_common.h + bpf.h), named by what they do.
LDX_W = 0x61  # dst = *(u32 *)(src + off)
AND32_IMM = 0x54  # dst = (u32)dst & imm
RSH32_IMM = 0x74  # dst = (u32)dst >> imm
MOV32_REG = 0xBC  # dst = (u32)src
MOV64_IMM = 0xB7  # dst = imm
JNE_IMM = 0x55  # if dst != imm: pc += off
JEQ_IMM = 0x15  # if dst == imm: pc += off
JNE_REG = 0x5D  # if dst != src: pc += off
EXIT = 0x95  # return r0

# Registers after the prologue: r1 is the context on entry (struct bpf_cgroup_dev_ctx
# {u32 access_type; u32 major; u32 minor;}), a scratch register once it has been read.
R_RESULT, R_SCRATCH, R_TYPE, R_ACCESS, R_MAJOR, R_MINOR = 0, 1, 2, 3, 4, 5

PROLOGUE = (
    Insn(LDX_W, R_TYPE, 1, 0),
    Insn(AND32_IMM, R_TYPE, imm=0xFFFF),
    Insn(LDX_W, R_ACCESS, 1, 0),
    Insn(RSH32_IMM, R_ACCESS, imm=16),
    Insn(LDX_W, R_MAJOR, 1, 4),
    Insn(LDX_W, R_MINOR, 1, 8),
)


def _block(rule: DeviceRule) -> list[Insn]:
    """The checks of one rule; each jump (off=-1 here) leads past the block, to the next rule."""
    checks = [Insn(JNE_IMM, R_TYPE, imm=_TYPE_BITS[rule.type])]
    bits = sum(_ACCESS_BITS[c] for c in rule.access)
    if bits != _ALL_ACCESS:
        checks += [Insn(MOV32_REG, R_SCRATCH, R_ACCESS), Insn(AND32_IMM, R_SCRATCH, imm=bits)]
        if rule.allow:  # every access asked for is granted: (asked & bits) == asked
            checks.append(Insn(JNE_REG, R_SCRATCH, R_ACCESS, -1))
        else:  # any access asked for is refused: (asked & bits) != 0
            checks.append(Insn(JEQ_IMM, R_SCRATCH, imm=0))
    if rule.major is not None:
        checks.append(Insn(JNE_IMM, R_MAJOR, imm=rule.major))
    if rule.minor is not None:
        checks.append(Insn(JNE_IMM, R_MINOR, imm=rule.minor))
    checks += [Insn(MOV64_IMM, R_RESULT, imm=int(rule.allow)), Insn(EXIT)]
    # Jumps are relative to the next instruction; the next block starts after the last one.
    return [insn.jumping(len(checks) - i - 1) if insn.op in (JNE_IMM, JEQ_IMM, JNE_REG) else insn
            for i, insn in enumerate(checks)]


def program(rules: Sequence[DeviceRule]) -> list[Insn]:
    """The BPF_PROG_TYPE_CGROUP_DEVICE program for ``rules``: the prologue, one block per
    exception, last rule first (the last match wins), then the default. Returns 1 to allow."""
    default_allow, exceptions = effective(rules)
    insns = list(PROLOGUE)
    for rule in reversed(exceptions):
        insns += _block(rule)
    insns += [Insn(MOV64_IMM, R_RESULT, imm=int(default_allow)), Insn(EXIT)]
    return insns


def assemble(insns: Sequence[Insn]) -> bytes:
    return b"".join(insn.encode() for insn in insns)
