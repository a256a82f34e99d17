"""Where the OCI runtime binaries that the engine tests compare live: runc (the baseline) and fcrun-oci.

tests/root/test_oci_validation_root.py and test_podman_root.py run the same checks through both.
"""

from __future__ import annotations

import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FCRUN_OCI_ABSENT = "fcrun-oci not installed: issue 13 in progress"


def fcrun_oci_path() -> str | None:
    """The fcrun-oci command: $FCRUN_OCI if set, else beside this Python (the venv's bin), the source tree's cli/,
    then PATH; None if there is none."""
    if os.environ.get("FCRUN_OCI"):
        return os.environ["FCRUN_OCI"]
    for candidate in (os.path.join(os.path.dirname(sys.executable), "fcrun-oci"), os.path.join(REPO, "cli", "fcrun-oci")):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("fcrun-oci")


def runc_path() -> str | None:
    return shutil.which("runc")
