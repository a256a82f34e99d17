"""/proc/PID/cgroup: which cgroup a process is in, per hierarchy. A pure function of text;
the driver (cgroups/__init__.py) reads the file and mountinfo (fcrun.mountinfo) together.
"""

from __future__ import annotations

import msgspec

from ..errors import SpecError


class ProcCgroup(msgspec.Struct, frozen=True, kw_only=True):
    """One line of /proc/<pid>/cgroup: ``hierarchy-id:controller-list:cgroup-path``."""

    hierarchy_id: int
    controllers: tuple[str, ...]  # () for the v2 line "0::/path"
    path: str


def parse_proc_cgroup(text: str) -> list[ProcCgroup]:
    """Parse /proc/<pid>/cgroup text.

    Raises:
        SpecError: a line is not ``id:controllers:path``.
    """
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        # The path may itself contain ":", so split only twice.
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].startswith("/"):
            raise SpecError(f"malformed /proc/self/cgroup line {line!r}", f"cgroup line {lineno}")
        controllers = tuple(c for c in parts[1].split(",") if c)
        entries.append(ProcCgroup(hierarchy_id=int(parts[0]), controllers=controllers, path=parts[2]))
    return entries
