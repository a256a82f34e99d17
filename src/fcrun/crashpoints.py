"""Crash points: a test hook that kills this process with SIGKILL at a named step.

Test hook only, for the crash suite (tests/root/test_crash_root.py): it shows that whatever a
`kill -9` at any step of create, start, claim, freeze, thaw, delete or serve's scale actions
leaves behind, the next `fcrun gc`, fork-server or serve start reconciles.

    FCRUN_CRASH_AT=create.cgroup        SIGKILL the first time a creation reaches that step
    FCRUN_CRASH_AT=delete.network:2     ... the second time this process reaches it
    FCRUN_CRASH_MARK=/tmp/crashed       only if this process is the first to create that file:
                                        one death in all, not one per process (a restarted
                                        fork-server inherits the environment of the first)

The environment is read once, at import: unset (as in production), `crash_point` is a call
that compares one string to None and returns.
"""

from __future__ import annotations

import os
import signal

# Every step that has a crash point, in the order each operation reaches them. The crash
# suite runs each once; tests/unit/test_crashpoints.py checks that the code names these.
CREATE_STEPS = ("create.reserved", "create.slot", "create.rootfs", "create.spawned", "create.cgroup",
                "create.network", "create.saved", "create.done")
START_STEPS = ("start.go", "start.saved")
FREEZE_STEPS = ("freeze.frozen",)
THAW_STEPS = ("thaw.thawed",)
DELETE_STEPS = ("delete.locked", "delete.slot", "delete.killed", "delete.cgroup", "delete.network",
                "delete.storage", "delete.idrange", "delete.done")
CLAIM_STEPS = ("claim.taken", "claim.limits", "claim.slot", "claim.thawed", "claim.answered", "claim.saved")
SERVE_STEPS = ("serve.scale-up.written", "serve.instance.started", "serve.instance.drained",
               "serve.instance.stopped")
STEPS = CREATE_STEPS + START_STEPS + FREEZE_STEPS + THAW_STEPS + DELETE_STEPS + CLAIM_STEPS + SERVE_STEPS

CRASH_AT_ENV = "FCRUN_CRASH_AT"
CRASH_MARK_ENV = "FCRUN_CRASH_MARK"


def parse_crash_at(value: str) -> tuple[str | None, int]:
    """`step[:n]` -> (step, n); "" -> (None, 0).

    Raises:
        ValueError: an unknown step or a bad n (a typo must not make a crash test pass by
        never crashing).
    """
    if not value:
        return None, 0
    step, _, nth = value.partition(":")
    if step not in STEPS:
        raise ValueError(f"{CRASH_AT_ENV}={value!r}: unknown step {step!r} (one of: {', '.join(STEPS)})")
    if nth and (not nth.isdigit() or int(nth) < 1):
        raise ValueError(f"{CRASH_AT_ENV}={value!r}: the count after ':' must be a whole number >= 1")
    return step, int(nth or 1)


_step, _left = parse_crash_at(os.environ.get(CRASH_AT_ENV, ""))
_mark = os.environ.get(CRASH_MARK_ENV, "")


def crash_point(step: str) -> None:
    """Die by SIGKILL here if FCRUN_CRASH_AT names `step` and this is its n-th time."""
    global _left
    if _step is None or step != _step:
        return
    _left -= 1
    if _left:
        return
    if _mark:
        try:
            os.close(os.open(_mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return  # another process died here already
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["CRASH_AT_ENV", "CRASH_MARK_ENV", "STEPS", "crash_point", "parse_crash_at"]
