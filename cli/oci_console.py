"""A terminal for a container's process (process.terminal, exec --tty), as runc gives one.

runc's protocol with engines: the runtime makes a pty, the slave becomes the process's
stdin, stdout, stderr and controlling terminal, and the master goes to the engine over the
unix socket named by --console-socket, as SCM_RIGHTS (conmon, containerd-shim then copy
between it and the user). fcrun's child takes the slave as given stdio and makes it its
controlling terminal (runtime/child.py: a tty given as stdio).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import termios


def open_pty(height: int = 0, width: int = 0) -> tuple[int, int]:
    """A new pty (master, slave), O_CLOEXEC, with this window size if given.

    Resource handling: the caller closes both.
    """
    master, slave = os.openpty()
    for fd in (master, slave):
        os.set_inheritable(fd, False)
    if height and width:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
    return master, slave


def send_master(socket_path: str, master: int) -> None:
    """Send the pty master over --console-socket (SCM_RIGHTS, with its name as the data, as
    runc's utils.SendFile does).

    Raises:
        OSError: the socket could not be reached or took nothing.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
        conn.connect(socket_path)
        fds = array.array("i", [master])
        conn.sendmsg([b"/dev/ptmx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
