"""Security tests: real attacks from inside containers and from unprivileged host users.

They share the root tests' fixtures (tests/root/rootfixtures.py) and add `probe`, a static C
helper (probe.c) that tries one attack per call and prints "ok" or "denied <errno>"; secutil.py
holds what the tests share (running a container with its output captured, a host user).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "root"))

from rootfixtures import apache_php, busybox, data_root, run_root, runtime  # noqa: E402,F401

PROBE_SOURCE = os.path.join(os.path.dirname(__file__), "probe.c")


@pytest.fixture(scope="session")
def probe(tmp_path_factory) -> str:
    """The probe, built statically (so any image can run it) in a directory every uid can read.
    $FCRUN_TEST_PROBE names one built elsewhere (a host without gcc)."""
    prebuilt = os.environ.get("FCRUN_TEST_PROBE")
    if prebuilt:
        return os.path.abspath(prebuilt)
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the probe (scripts/setup.sh installs it)")
    outdir = tmp_path_factory.mktemp("probe")
    os.chmod(outdir, 0o755)
    out = str(outdir / "probe")
    subprocess.run(["gcc", "-static", "-O1", "-o", out, PROBE_SOURCE], check=True, capture_output=True)
    os.chmod(out, 0o755)
    return out
