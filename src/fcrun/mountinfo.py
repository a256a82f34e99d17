"""/proc/PID/mountinfo (proc(5)), parsed in one place: pure functions of text, no I/O,
and `read_mountpoints` for the one read callers need.

Every reader of mountinfo goes through here, so every one unescapes alike: the kernel writes
space, tab, newline and backslash in paths as \\040, \\011, \\012 and \\134, and a path
compared unescaped misses a mount on a directory whose name has a space.
"""

from __future__ import annotations

import re

import msgspec

from .errors import SpecError

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


PROC_SELF_MOUNTINFO = "/proc/self/mountinfo"
MOUNTPOINT_FIELD = 4  # 0-based: mount id, parent id, major:minor, root, mount point, ...


def unescape(field: str) -> str:
    """A mountinfo path field as the path it names (\\040 -> " ", \\011, \\012, \\134)."""
    if "\\" not in field:
        return field
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
                    root=unescape(fields[3]),
                    mountpoint=unescape(fields[4]),
                    fstype=fields[sep + 1],
                    source=unescape(fields[sep + 2]),
                    super_options=tuple(fields[sep + 3].split(",")),
                )
            )
        except (ValueError, IndexError):
            raise SpecError(f"malformed mountinfo line {line!r}", f"mountinfo line {lineno}") from None
    return mounts


def mountpoints(text: str) -> list[str]:
    """Every mount point in mountinfo text, unescaped, in file order (a cheaper
    parse_mountinfo for callers that need no other field).

    Raises:
        SpecError: a line has too few fields.
    """
    points = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split(maxsplit=MOUNTPOINT_FIELD + 1)
        if len(fields) > MOUNTPOINT_FIELD:
            points.append(unescape(fields[MOUNTPOINT_FIELD]))
        elif line.strip():
            raise SpecError(f"malformed mountinfo line {line!r}", f"mountinfo line {lineno}")
    return points


def read_mountpoints(path: str = PROC_SELF_MOUNTINFO) -> list[str]:
    """The mount points of this process's mount namespace (or of `path`'s), unescaped.

    Raises:
        OSError: the file cannot be read. SpecError: it is not mountinfo.
    """
    with open(path) as f:
        return mountpoints(f.read())


def mount_at(mounts: list[Mount], mountpoint: str) -> Mount | None:
    """The mount visible at ``mountpoint``: the last one mounted there wins."""
    found = None
    for mount in mounts:
        if mount.mountpoint == mountpoint:
            found = mount
    return found
