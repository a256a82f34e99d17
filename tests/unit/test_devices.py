"""Device rules (fcrun/cgroups/devices.py): the rule checks, the v1 writes and the v2 program.

The program's decisions are checked here by stepping through its instructions with a model of
the nine opcodes it uses, against ``decide`` (the reference); the real kernel runs it in
tests/security/test_devices_security.py.
"""

from __future__ import annotations

import itertools
import struct

import pytest

from fcrun.cgroups.devices import (
    EXIT,
    JEQ_IMM,
    JNE_IMM,
    JNE_REG,
    PROLOGUE,
    DeviceRule,
    Insn,
    assemble,
    decide,
    effective,
    program,
    v1_writes,
)
from fcrun.errors import SpecError
from fcrun.runtime.spec import DEFAULT_DEVICE_RULES, Resources, decode_spec, default_spec, encode_spec
from fcrun.runtime.spec import DeviceRule as OciDeviceRule
from fcrun.runtime.plan import DEVICES
from fcrun.runtime import limits_from_spec

DEFAULT = limits_from_spec(default_spec(["true"])).devices
TYPE_BITS = {"b": 1, "c": 2}
ACCESS_BITS = {"m": 1, "r": 2, "w": 4}


def run_program(insns: list[Insn], type: str, major: int, minor: int, access: str) -> bool:
    """Step through the program as the kernel would for one request (ctx: access_type, major, minor)."""
    ctx = [(sum(ACCESS_BITS[c] for c in access) << 16) | TYPE_BITS[type], major, minor]
    regs = [0] * 11
    pc = 0
    for _ in range(len(insns)):  # no backward jumps: each instruction runs at most once
        op, dst, src, off, imm = insns[pc]
        pc += 1
        if op == 0x61:
            assert src == 1 and off in (0, 4, 8), "loads only from the context"
            regs[dst] = ctx[off // 4]
        elif op == 0x54:
            regs[dst] = (regs[dst] & imm) & 0xFFFFFFFF
        elif op == 0x74:
            regs[dst] = (regs[dst] & 0xFFFFFFFF) >> imm
        elif op == 0xBC:
            regs[dst] = regs[src] & 0xFFFFFFFF
        elif op == 0xB7:
            regs[dst] = imm
        elif op in (JNE_IMM, JEQ_IMM, JNE_REG):
            other = regs[src] if op == JNE_REG else imm
            if (regs[dst] == other) == (op == JEQ_IMM):
                assert off >= 0
                pc += off
        elif op == EXIT:
            assert regs[0] in (0, 1)
            return regs[0] == 1
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
    raise AssertionError("ran off the end")


RULE_SETS = {
    "default": DEFAULT,
    "none": (),
    "deny-block-only": (DeviceRule(allow=False, type="b"),),
    "partial": (DeviceRule(allow=False), DeviceRule(allow=True, type="c", major=1, access="r"),
                DeviceRule(allow=False, type="c", major=1, minor=3, access="w"),
                DeviceRule(allow=True, type="b", minor=0, access="rm")),
    "reset-twice": (DeviceRule(allow=True, type="c", major=1, minor=1), DeviceRule(allow=False),
                    DeviceRule(allow=True, type="c", major=1, minor=5), DeviceRule(allow=True),
                    DeviceRule(allow=False, type="c", major=1, minor=1, access="rw")),
}
REQUESTS = list(itertools.product(
    "bc", (1, 5, 8, 136), (0, 1, 3, 5, 7, 11), ("m", "r", "w", "rw", "rwm")))


@pytest.mark.parametrize("name", RULE_SETS)
def test_program_decides_as_the_reference(name):
    rules = RULE_SETS[name]
    insns = program(rules)
    assert len(assemble(insns)) == 8 * len(insns)
    wrong = [req for req in REQUESTS if run_program(insns, *req) != decide(rules, *req)]
    assert not wrong, wrong


def test_default_rules_allow_only_the_dev_fcrun_makes_and_ptys():
    for name, major, minor in DEVICES:  # plan.DEVICES: made with mknod, then read and written
        assert decide(DEFAULT, "c", major, minor, "rwm"), name
    assert decide(DEFAULT, "c", 5, 2, "rw") and decide(DEFAULT, "c", 136, 7, "rw")  # ptmx, pts/7
    assert not decide(DEFAULT, "c", 136, 7, "m") and not decide(DEFAULT, "c", 5, 2, "m")
    for type, major, minor in [("b", 8, 0), ("b", 259, 0), ("b", 7, 0), ("c", 1, 1), ("c", 1, 11), ("c", 10, 200),
                               ("c", 4, 1), ("c", 5, 1), ("c", 1, 2)]:  # disks, loop, mem, kmsg, tun, tty1, console
        for access in ("m", "r", "w"):
            assert not decide(DEFAULT, type, major, minor, access), (type, major, minor, access)


def test_program_structure():
    insns = program((DeviceRule(allow=False), DeviceRule(allow=True, type="c", major=1, minor=3),
                     DeviceRule(allow=True, type="c", major=136, access="rw")))
    assert insns[:len(PROLOGUE)] == list(PROLOGUE)
    body = insns[len(PROLOGUE):]
    # The last rule first: 136:* rw (type, access: mov/and/jne, major; then r0 = 1, exit) ...
    assert [i.op for i in body[:7]] == [JNE_IMM, 0xBC, 0x54, JNE_REG, JNE_IMM, 0xB7, EXIT]
    assert body[0] == Insn(JNE_IMM, 2, 0, 6, 2) and body[4] == Insn(JNE_IMM, 4, 0, 2, 136)
    # ... then 1:3 rwm (no access check), then the default: deny.
    assert body[7:12] == [Insn(JNE_IMM, 2, 0, 4, 2), Insn(JNE_IMM, 4, 0, 3, 1), Insn(JNE_IMM, 5, 0, 2, 3),
                          Insn(0xB7, 0, 0, 0, 1), Insn(EXIT)]
    assert body[12:] == [Insn(0xB7, 0, 0, 0, 0), Insn(EXIT)]
    assert struct.unpack("<BBhi", Insn(JNE_IMM, 5, 0, 2, 3).encode()) == (0x55, 0x05, 2, 3)
    assert struct.unpack("<BBhi", Insn(JNE_REG, 1, 3, 1).encode()) == (0x5D, 0x31, 1, 0)


def test_v1_writes_and_effective():
    assert v1_writes(()) == []
    assert v1_writes(DEFAULT)[:3] == [("devices.deny", "a"), ("devices.allow", "c 1:3 rwm"),
                                      ("devices.allow", "c 1:5 rwm")]
    assert ("devices.allow", "c 136:* rw") in v1_writes(DEFAULT)
    # Rules before the last reset are forgotten, by the kernel and here alike.
    rules = RULE_SETS["reset-twice"]
    assert effective(rules) == (True, (rules[-1],))
    assert v1_writes(rules) == [("devices.allow", "a"), ("devices.deny", "c 1:1 rw")]
    assert v1_writes((DeviceRule(allow=False, type="b", access="mwr"),)) == [("devices.deny", "b *:* rwm")]


@pytest.mark.parametrize("kwargs, message", [
    (dict(type="x"), "type must be a, b or c"),
    (dict(type="c", access=""), "access '' must be"),
    (dict(type="c", access="rr"), "access 'rr' must be"),
    (dict(type="c", access="rx"), "access 'rx' must be"),
    (dict(type="c", major=4096), "major 4096 is not a number 0..4095"),
    (dict(type="c", minor=-1), "minor -1 is not"),
    (dict(type="c", minor=True), "minor True is not"),
    (dict(type="a", major=1), "type a .* takes no major"),
    (dict(type="a", access="r"), "type a .* takes no major"),
])
def test_rule_checks(kwargs, message):
    with pytest.raises(SpecError, match=message):
        DeviceRule(allow=True, **kwargs)


def test_default_spec_carries_the_rules_and_a_bad_rule_is_located():
    spec = default_spec(["true"])
    assert spec.linux.resources.devices == DEFAULT_DEVICE_RULES
    assert spec.linux.resources.devices[0] is not DEFAULT_DEVICE_RULES[0]  # a copy the caller may edit
    assert decode_spec(encode_spec(spec)).linux.resources.devices == DEFAULT_DEVICE_RULES
    spec.linux.resources.devices.append(OciDeviceRule(allow=True, type="c", major=1, access="rwx"))
    with pytest.raises(SpecError, match=r"access 'rwx' .*at \$\.linux\.resources\.devices\[9\]"):
        decode_spec(encode_spec(spec))


def test_no_rules_in_the_spec_means_none_in_the_limits():
    spec = default_spec(["true"])
    spec.linux.resources = Resources()
    assert limits_from_spec(spec).devices == ()
