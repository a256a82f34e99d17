"""A process's stdio: the caller's, or a terminal (process.terminal, exec --tty) as runc gives one.

runc's protocol with engines: the runtime makes a pty, the slave becomes the process's
stdin, stdout, stderr and controlling terminal, and the master goes to the engine over the
unix socket named by --console-socket, as SCM_RIGHTS (conmon, containerd-shim then copy
between it and the user). The pty must be the container's own (from its /dev/ptmx, so that
the process sees its terminal as /dev/pts/N): fcrun-oci connects to the socket and hands the
connection to the library, whose child makes the pty inside the container and sends the
master itself (fcrun/runtime/console.py).
"""

from __future__ import annotations

import os
import socket

from fcrun_cli.oci import OciError


def inherited_stdio() -> tuple[int, int, int]:
    """Our stdin, stdout and stderr for the container (an engine gives pipes or fifos);
    /dev/null for any that is closed."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
    return fds[0], fds[1], fds[2]


def connect_console_socket(path: str) -> int:
    """A connection to --console-socket, for the library to send the pty master over.

    Raises:
        OciError: it could not be reached, naming it.

    Resource handling: the caller closes the fd.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.connect(path)
    except OSError as exc:
        conn.close()
        raise OciError(f"connect to --console-socket {path}: {exc.strerror or exc}") from None
    return conn.detach()


class Stdio:
    """The process's stdio: ours (an engine's pipes or fifos); with a terminal, also a
    connection to --console-socket (`console_socket`, else -1), over which the library's child
    sends the master of the pty it makes in the container, whose slave then replaces `fds`.

    Resource handling: close() closes the connection and any /dev/null opened for `fds`.
    """

    def __init__(self, terminal: bool, console_socket: str, console_size=None):
        # console_size: the library reads it from the process itself (process.consoleSize).
        if terminal and not console_socket:
            raise OciError("cannot allocate a terminal without --console-socket (fcrun-oci does not proxy one)")
        if console_socket and not terminal:
            raise OciError("--console-socket is only for a process with a terminal (process.terminal, --tty)")
        self.fds = inherited_stdio()
        self.console_socket = -1
        if terminal:
            try:
                self.console_socket = connect_console_socket(console_socket)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self.console_socket >= 0:
            os.close(self.console_socket)
            self.console_socket = -1
        for target, fd in enumerate(self.fds):
            if fd != target:  # a /dev/null of ours
                os.close(fd)
        self.fds = (0, 1, 2)
