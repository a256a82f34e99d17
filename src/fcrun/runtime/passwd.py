"""HOME for a process whose environment has none, as runc sets it: the home directory of its
uid in the container's /etc/passwd, else "/" (libcontainer's setupUser).

Runs in the child, inside the container's root (after pivot_root, or setns into its mount
namespace for exec): the file is the image's, so it is read with care. A FIFO there would
block and a huge file would cost memory: only a regular file, and only its first MAX_BYTES.
"""

from __future__ import annotations

import os
import stat

PASSWD = b"/etc/passwd"
DEFAULT_HOME = b"/"
MAX_BYTES = 1 << 20


def home_of(uid: int, path: bytes = PASSWD) -> bytes:
    """The home directory of `uid` in the passwd file at `path` (the first entry with that
    uid); DEFAULT_HOME when there is none, or no file to read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return DEFAULT_HOME
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return DEFAULT_HOME
        data = os.read(fd, MAX_BYTES)
    except OSError:
        return DEFAULT_HOME
    finally:
        os.close(fd)
    wanted = b"%d" % uid
    for line in data.splitlines():
        fields = line.split(b":")
        # name:password:uid:gid:gecos:home:shell
        if len(fields) >= 6 and fields[2] == wanted and fields[5]:
            return fields[5]
    return DEFAULT_HOME
