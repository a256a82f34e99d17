"""Helpers of the security tests (a module of its own: `conftest` names three modules here)."""

from __future__ import annotations

import os
import subprocess


def probe_mount(probe_path: str):
    """An OCI mount that puts the probe at /probe, read-only, in a container."""
    from fcrun.runtime.spec import Mount

    return Mount(destination="/probe", source=probe_path, options=["bind", "ro", "nosuid", "nodev"])


def run_captured(rt, name: str, spec, image) -> tuple[int, str]:
    """Run a container to completion with stdout+stderr captured; remove it; (exit code, output)."""
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        container = rt.run(name, spec, image=image, stdio=(null, w, w))
    finally:
        os.close(w)
        os.close(null)
    with os.fdopen(r, "rb") as f:
        output = f.read().decode()
    code = container.wait()
    rt.delete(name)
    return code, output


def as_host_user(uid: int, *argv: str) -> subprocess.CompletedProcess:
    """Run argv as a throwaway unprivileged host user (no account needed).

    Not setpriv: it keeps its capabilities across the uid change until the exec, so the exec's
    own path lookup still passes 0700 directories. Python's child setresuid()s without
    PR_SET_KEEPCAPS, which drops every capability before the exec looks anything up.
    """
    try:
        return subprocess.run(list(argv), user=uid, group=uid, extra_groups=[], capture_output=True, text=True,
                              timeout=30)
    except PermissionError as exc:  # the exec itself was refused: report it as a shell would
        return subprocess.CompletedProcess(list(argv), 126, "", f"{argv[0]}: Permission denied ({exc})")
