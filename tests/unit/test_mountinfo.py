"""fcrun.mountinfo: the one parser of /proc/PID/mountinfo, used by the cgroup driver, the
image store and the slot release. No root needed: text in, paths out."""

from __future__ import annotations

import pytest

from fcrun.errors import SpecError
from fcrun.mountinfo import mount_at, mountpoints, parse_mountinfo, read_mountpoints, unescape

# The kernel escapes space, tab, newline and backslash in paths (proc(5), show_mountinfo).
LINES = [
    r"25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw",
    r"301 25 8:1 /srv/my\040site /run/fcrun/containers/c1/slot/content ro,nosuid shared:9 - ext4 /dev/sda1 rw",
    r"302 25 0:50 / /tmp/a\011tab\012newline\134backslash rw - tmpfs tmp\040fs rw,size=64k",
]
TEXT = "\n".join(LINES) + "\n"


def test_paths_with_spaces_and_other_escapes_are_unescaped():
    mounts = parse_mountinfo(TEXT)
    assert mounts[1].root == "/srv/my site"
    assert mounts[2].mountpoint == "/tmp/a\ttab\nnewline\\backslash"
    assert mounts[2].source == "tmp fs" and mounts[2].fstype == "tmpfs"
    assert mounts[2].super_options == ("rw", "size=64k")
    assert mount_at(mounts, "/tmp/a\ttab\nnewline\\backslash") is mounts[2]


def test_mountpoints_agrees_with_the_full_parse():
    assert mountpoints(TEXT) == [m.mountpoint for m in parse_mountinfo(TEXT)]
    assert "/run/fcrun/containers/c1/slot/content" in mountpoints(TEXT)
    assert unescape(r"/a\040b") == "/a b" and unescape("/plain") == "/plain"


def test_a_mount_on_a_directory_with_a_space_is_found(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_text(r"40 25 0:51 / /srv/www/my\040app rw - tmpfs tmpfs rw" + "\n")
    assert read_mountpoints(str(path)) == ["/srv/www/my app"]


@pytest.mark.parametrize("line", ["25 1 8:1 /", "25 1 8:1 / / rw no-separator ext4"])
def test_malformed_lines_are_refused(line):
    with pytest.raises(SpecError, match="malformed mountinfo line"):
        parse_mountinfo(line)
    if len(line.split()) <= 4:
        with pytest.raises(SpecError, match="malformed mountinfo line"):
            mountpoints(line)


def test_this_process_has_a_root_mount():
    assert "/" in read_mountpoints()
