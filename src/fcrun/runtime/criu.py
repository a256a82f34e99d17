"""Is checkpoint/restore (CRIU) usable here? Asked once, answered with the reason.

FastContainer's future work suggests restoring a checkpointed instance instead of starting
one. fcrun's fast paths are the pool of pre-warmed instances and the frozen tier, which need
only the cgroup freezer; CRIU would add restore-from-disk for instances that were stopped.
Where `criu check` fails (this project's reference VM: CRIU 3.17 cannot parse its kernel's
vDSO), fcrun says so once, at serve's start and in its metrics, and everything else works.
The restore path itself is not implemented yet: no machine we test on has a working CRIU.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

CHECK_TIMEOUT_S = 10.0


@functools.lru_cache(maxsize=1)
def availability() -> tuple[bool, str]:
    """(usable, reason). Runs `criu check` at most once per process."""
    criu = shutil.which("criu")
    if criu is None:
        return False, "criu is not installed"
    try:
        r = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"criu check could not run: {exc}"
    output = (r.stdout + r.stderr).strip().splitlines()
    if r.returncode != 0:
        return False, f"criu check failed: {output[-1] if output else f'exit status {r.returncode}'}"
    return True, output[-1] if output else "criu check passed"
