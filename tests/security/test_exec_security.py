"""No host binary within a container's reach (the CVE-2019-5736 class).

pid 1 (tini) runs from a sealed memfd copy, not from the host's /usr/bin/tini-static; and the
process `fcrun exec` forks into a container, a copy of the host's python until its execve,
is non-dumpable until then, so the container's processes cannot open its /proc/PID/exe.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import threading
import time

import pytest

import fcrun.runtime
import fcrun.runtime.child
from secutil import probe_mount
from fcrun.runtime import sealed
from fcrun.runtime.options import RunOptions, spec_from_image

pytestmark = [pytest.mark.root]


def start(rt, image, name, script, probe, stdin=None):
    """Start `sh -c script` with /probe; returns (container, read end of its stdout+stderr)."""
    spec = spec_from_image(image, RunOptions(args=["sh", "-c", script], network="none"), name=name)
    spec.mounts.append(probe_mount(probe))
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        container = rt.run(name, spec, image=image, stdio=(stdin if stdin is not None else null, w, w))
    finally:
        os.close(w)
        os.close(null)
    return container, r


def read_until(fd, marker, timeout_s=10.0):
    """What a pipe delivers up to and including `marker` (bytes)."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while marker not in data:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {marker!r} within {timeout_s}s; got {data!r}"
        chunk = os.read(fd, 4096)
        assert chunk, f"EOF before {marker!r}; got {data!r}"
        data += chunk
    return data.decode()


def test_pid1_runs_from_a_sealed_memfd_the_container_cannot_change(runtime, busybox, probe):
    script = "readlink /proc/1/exe; /probe open /proc/1/exe w; /probe open /proc/1/exe r; sleep 60"
    c1, out1 = start(runtime, busybox, "t-memfd1", script, probe)
    c2, out2 = start(runtime, busybox, "t-memfd2", "sleep 60", probe)
    try:
        lines = read_until(out1, b"ok\n").splitlines()
        assert lines[0].startswith("/memfd:tini-static"), lines
        assert lines[1].startswith(("denied ETXTBSY", "denied EPERM")), lines  # not the host's file
        assert lines[2] == "ok", lines  # control: the probe does reach /proc/1/exe
        # Host root cannot change it either: sealed (and busy while it runs).
        with pytest.raises(OSError) as busy:
            os.open(f"/proc/{c1.pid}/exe", os.O_WRONLY | os.O_CLOEXEC)
        assert busy.value.errno == errno.ETXTBSY
        exe = os.open(f"/proc/{c1.pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert fcntl.fcntl(exe, sealed.F_GET_SEALS) & sealed.SEALS == sealed.SEALS
            # One copy per process, however many containers: the second runs the same memfd.
            assert os.stat(f"/proc/{c2.pid}/exe").st_ino == os.fstat(exe).st_ino
        finally:
            os.close(exe)
    finally:
        for c, out in ((c1, out1), (c2, out2)):
            runtime.kill(c.name, 9)
            c.wait()
            os.close(out)


def test_exec_child_is_closed_to_the_container_until_it_execs(runtime, busybox, probe, monkeypatch):
    # The container probes each pid it is sent: the capabilities it has next to the
    # container's own, then /proc/PID/exe and /proc/PID/mem.
    script = ("while read pid; do grep CapEff /proc/$pid/status /proc/self/status | cut -f2 | uniq | wc -l;"
              " /probe open /proc/$pid/exe r; /probe open /proc/$pid/mem r; echo end; done")
    stdin_r, stdin_w = os.pipe()
    container, out = start(runtime, busybox, "t-execdump", script, probe, stdin=stdin_r)
    os.close(stdin_r)

    # Hold the exec child at its last step before execve: in the container's namespaces,
    # with the container's capabilities (which no longer keep the container's root out, as
    # a full set would), still the host's python. The window a container process would race for.
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    find_executable = fcrun.runtime.child._find_executable

    def hold_before_exec(name, search_path, **kwargs):
        os.write(report_w, f"{os.getpid()}\n".encode())  # its pid in the container's pid ns
        os.read(release_r, 1)
        return find_executable(name, search_path, **kwargs)

    monkeypatch.setattr(fcrun.runtime.child, "_find_executable", hold_before_exec)
    exec_in_r, exec_in_w = os.pipe()
    exec_out_r, exec_out_w = os.pipe()
    result = {}

    def exec_in_container():
        result["code"] = runtime.exec("t-execdump", ["sh", "-c", "echo execd; read x"], stdio=(exec_in_r, exec_out_w, exec_out_w))

    thread = threading.Thread(target=exec_in_container)
    thread.start()
    try:
        pid = read_until(report_r, b"\n").strip()
        os.write(stdin_w, f"{pid}\n".encode())
        before = read_until(out, b"end\n").splitlines()
        assert before[0] == "1", before  # the same capabilities as the container's processes
        assert before[1].startswith("denied EACCES"), before  # exe: the host's python
        assert before[2].startswith("denied EACCES"), before  # mem
        os.write(release_w, b"x")
        assert read_until(exec_out_r, b"execd\n") == "execd\n"
        # Control: once it runs the container's own sh, the kernel made it dumpable again and
        # the same probes reach it.
        os.write(stdin_w, f"{pid}\n".encode())
        assert read_until(out, b"end\n").splitlines() == ["1", "ok", "ok", "end"]
        os.write(exec_in_w, b"\n")
    finally:
        os.write(release_w, b"x")  # a child still held goes on (a stray byte otherwise)
        os.close(exec_in_w)
        thread.join(30)
        runtime.kill("t-execdump", 9)
        container.wait()
        for fd in (out, stdin_w, report_r, report_w, release_r, release_w, exec_in_r, exec_out_r, exec_out_w):
            os.close(fd)
    assert result.get("code") == 0
    assert fcrun.runtime.lifecycle.sc.prctl(fcrun.runtime.lifecycle.sc.PR_GET_DUMPABLE) == 1  # the parent got its flag back
