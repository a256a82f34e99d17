"""A process's stdio: the caller's, or a terminal (process.terminal, exec --tty) as runc gives one.

runc's protocol with engines: the runtime makes a pty, the slave becomes the process's
stdin, stdout, stderr and controlling terminal, and the master goes to the engine over the
unix socket named by --console-socket, as SCM_RIGHTS (conmon, containerd-shim then copy
between it and the user). fcrun takes the slave as the process's given stdio, and its
child makes a terminal given so its controlling terminal (runtime/child.py, finish_and_exec).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import termios

from fcrun_cli.oci import OciError


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


def inherited_stdio() -> tuple[int, int, int]:
    """Our stdin, stdout and stderr for the container (an engine gives pipes or fifos);
    /dev/null for any that is closed."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open("/dev/null", os.O_RDWR))
    return fds[0], fds[1], fds[2]


class Stdio:
    """The process's stdio: ours (an engine's pipes or fifos), or a new pty's slave when it
    wants a terminal, whose master then goes to --console-socket (oci_console.py).

    Resource handling: close() closes our copies of the pty (the process holds its own).
    """

    def __init__(self, terminal: bool, console_socket: str, console_size=None):
        if terminal and not console_socket:
            raise OciError("cannot allocate a terminal without --console-socket (fcrun-oci does not proxy one)")
        if console_socket and not terminal:
            raise OciError("--console-socket is only for a process with a terminal (process.terminal, --tty)")
        self.console_socket = console_socket
        self.master = self.slave = -1
        if terminal:
            size = (console_size.height, console_size.width) if console_size is not None else (0, 0)
            self.master, self.slave = open_pty(*size)
            self.fds = (self.slave, self.slave, self.slave)
        else:
            self.fds = inherited_stdio()

    def hand_over_console(self) -> None:
        """Send the pty master to the engine (nothing without a terminal)."""
        if self.master >= 0:
            try:
                send_master(self.console_socket, self.master)
            except OSError as exc:
                raise OciError(f"send the terminal to --console-socket {self.console_socket}: {exc}") from None

    def close(self) -> None:
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1
