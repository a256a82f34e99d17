"""Seccomp: attacks from inside a container with the default profile are refused, and the same
probe in a container without a filter (--security-opt seccomp=unconfined) gets further.

Where the kernel itself would refuse an attack with the same EPERM (no CAP_SYS_ADMIN for
mount, unprivileged bpf disabled, ...), a third container runs the default profile's rules
with another default errno: seeing that errno proves the profile, not the kernel, refused it.
"""

from __future__ import annotations

import errno
import os

import msgspec
import pytest

from polling import http_get_when_up
from secutil import probe_mount, run_captured
from fcrun.runtime.options import RunOptions, spec_from_image
from fcrun.seccomp import DEFAULT_PROFILE

pytestmark = [pytest.mark.root]

# probe.c's `syscall` subcommands: each is refused by the default profile's default action.
ATTACKS = [
    "unshare-user", "unshare-net", "clone-newuser", "keyctl", "add_key", "bpf", "userfaultfd",
    "ptrace", "mount", "setns", "perf_event_open", "kexec", "personality", "io_uring",
    "open_by_handle",
]
MARK_ERRNO = errno.ENOTRECOVERABLE  # no syscall probed here returns it by itself
MARKED_PROFILE = msgspec.structs.replace(DEFAULT_PROFILE, default_errno_ret=MARK_ERRNO)


def run(rt, image, name, args, *, probe=None, **opts):
    """Run to completion with stdout+stderr captured; returns (exit code, output)."""
    spec = spec_from_image(image, RunOptions(args=args, network="none", **opts), name=name)
    if probe:
        spec.mounts.append(probe_mount(probe))
    return run_captured(rt, name, spec, image)


def probe_all(rt, image, probe, name, seccomp):
    """{attack: probe's answer} from one container, and its Seccomp mode line."""
    # PTRACE_ATTACH (where it succeeds) leaves a SIGSTOP for pid 1, the init holding our pipe:
    # SIGCONT discards it (even pending), so the container can still finish.
    script = ("for a in " + " ".join(ATTACKS) + "; do echo \"$a $(/probe syscall $a)\"; kill -CONT 1; done; "
              "/probe status Seccomp")
    code, out = run(rt, image, name, ["sh", "-c", script], probe=probe, seccomp=seccomp)
    assert code == 0, out
    lines = out.splitlines()
    answers = dict(line.split(" ", 1) for line in lines[:-1])
    assert sorted(answers) == sorted(ATTACKS), out
    return answers, lines[-1].split()


def denied(err: int) -> str:
    return f"denied {errno.errorcode[err]} {err}"


def test_default_profile_refuses_attacks_that_unconfined_gets_further_with(runtime, busybox, probe):
    default, mode = probe_all(runtime, busybox, probe, "t-sc-default", "default")
    assert mode == ["Seccomp:", "2"]  # filter mode
    marked, _ = probe_all(runtime, busybox, probe, "t-sc-marked", MARKED_PROFILE)
    unconfined, mode = probe_all(runtime, busybox, probe, "t-sc-unconfined", "unconfined")
    assert mode == ["Seccomp:", "0"]
    for attack in ATTACKS:
        assert default[attack] == denied(errno.EPERM), (attack, default[attack])
        # The profile's rules, not the kernel, refused it...
        assert marked[attack] == denied(MARK_ERRNO), (attack, marked[attack])
        # ...and without them the call reaches the kernel: it succeeds, or fails for a reason
        # of the kernel's own (missing capabilities, sysctls), never with the profile's errno.
        assert unconfined[attack] != denied(MARK_ERRNO), (attack, unconfined[attack])
    # Attacks the kernel alone would let through (the profile is the only thing in the way):
    let_through = {a for a in ATTACKS if unconfined[a] == "ok"}
    assert {"unshare-user", "clone-newuser", "keyctl", "add_key", "personality", "io_uring"} <= let_through, unconfined


def test_clone3_fails_with_enosys_so_libc_falls_back_to_clone(runtime, busybox):
    # busybox sh forks with glibc's fork() (clone, no namespace flags): allowed by the clone rule.
    code, out = run(runtime, busybox, "t-sc-sh", ["sh", "-c", "echo $(echo forked) ok; cat /proc/self/status | grep ^Seccomp:"])
    assert code == 0, out
    assert out.splitlines()[0] == "forked ok"
    assert out.split()[-1] == "2"


def test_exec_into_a_container_gets_its_profile(runtime, busybox):
    spec = spec_from_image(busybox, RunOptions(args=["sleep", "30"], network="none"), name="t-sc-exec")
    runtime.run("t-sc-exec", spec, image=busybox, detach=True)
    r, w = os.pipe()
    code = runtime.exec("t-sc-exec", ["grep", "^Seccomp:", "/proc/self/status"], stdio=(0, w, w))
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    runtime.delete("t-sc-exec", force=True)
    assert code == 0 and out.split() == ["Seccomp:", "2"], out


@pytest.mark.slow
def test_apache_php_serves_under_the_default_profile(runtime, apache_php):
    spec = spec_from_image(apache_php, RunOptions(cpu=0.5, memory_bytes=256 << 20), name="t-sc-apache")
    assert spec.linux.seccomp is DEFAULT_PROFILE
    container = runtime.run("t-sc-apache", spec, image=apache_php, detach=True)
    status, headers, body = http_get_when_up(container.ip)
    # Every process (init, the Apache master, its prefork workers) runs under the filter.
    r, w = os.pipe()
    code = runtime.exec("t-sc-apache", ["sh", "-c", "grep -h '^Seccomp:' /proc/[0-9]*/status | sort | uniq -c"],
                        stdio=(0, w, w))
    os.close(w)
    with os.fdopen(r) as f:
        modes = f.read().split()
    runtime.delete("t-sc-apache", force=True)
    assert status == 200 and "Apache/2.4" in headers.get("Server", "") + body
    assert code == 0 and modes[1:] == ["Seccomp:", "2"] and int(modes[0]) >= 3, modes
