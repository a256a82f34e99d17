"""Parsing of /proc/self/mountinfo and /proc/self/cgroup: pure functions of text, no I/O.

The driver reads the two files once, hands the text here, and decides from the result which
cgroup version the host runs and where each hierarchy is mounted.
"""

from __future__ import annotations

import re

import msgspec

from ..errors import SpecError

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class Mount(msgspec.Struct, frozen=True, kw_only=True):
    """One line of mountinfo (proc(5)); only the fields fcrun uses."""

    mount_id: int
    parent_id: int
    root: str  # the path inside the filesystem that is mounted here; "/" for a whole hierarchy
    mountpoint: str
    fstype: str
    source: str
    super_options: tuple[str, ...]


class ProcCgroup(msgspec.Struct, frozen=True, kw_only=True):
    """One line of /proc/<pid>/cgroup: ``hierarchy-id:controller-list:cgroup-path``."""

    hierarchy_id: int
    controllers: tuple[str, ...]  # () for the v2 line "0::/path"
    path: str


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse mountinfo text into Mounts, in file order (a later mount covers an earlier one).

    Raises:
        SpecError: a line does not have the mountinfo layout.
    """
    mounts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            # Optional fields (shared:N master:N) run until the lone "-" separator.
            sep = fields.index("-", 6)
            mounts.append(
                Mount(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    root=_unescape(fields[3]),
                    mountpoint=_unescape(fields[4]),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    super_options=tuple(fields[sep + 3].split(",")),
                )
            )
        except (ValueError, IndexError):
            raise SpecError(f"malformed mountinfo line {line!r}", f"mountinfo line {lineno}") from None
    return mounts


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


def mount_at(mounts: list[Mount], mountpoint: str) -> Mount | None:
    """The mount visible at ``mountpoint``: the last one mounted there wins."""
    found = None
    for mount in mounts:
        if mount.mountpoint == mountpoint:
            found = mount
    return found
