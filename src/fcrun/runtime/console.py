"""A process's terminal made inside its container, as runc makes it (process.terminal with
runc's --console-socket, exec --tty).

The pty must be one of the container's own: its /dev/ptmx (a link to pts/ptmx, the ptmx of
the container's devpts instance, mounted with newinstance) gives a slave the container sees
as /dev/pts/N, so `tty`, ttyname(3) and a shell's job control work as under runc. A pty made
on the host would be a host /dev/pts entry, which the container cannot name ("not a tty").

    engine (conmon)        fcrun-oci                      child (container's mount namespace)
    listen(console.sock)   connect ------------> fd in the plan (console_socket)
                                                 open /dev/ptmx, unlock, peer = the slave
                                                 [create: bind the slave onto /dev/console]
           <---------------------- SCM_RIGHTS -- the master ("/dev/ptmx" as data, as runc's
                                                 utils.SendFile); master and socket closed
                                                 slave -> stdin, stdout, stderr, and the
                                                 controlling terminal (finish_and_exec)

Runs in the forked child: system calls only, errors raised as OSError naming what failed.
"""

from __future__ import annotations

# _socket: the C module under `socket`, all this needs, without socket.py's start-up (its enums:
# ~1 ms of a `fcrun run` without a fork-server, which loads this module).
import _socket
import array
import fcntl
import os
import stat
import struct
import termios

from .. import syscalls as sc

# <asm-generic/ioctls.h>: the pty number, unlocking it, and opening its slave from the master
# (Linux 4.13; no path lookup, so no way for the container to swap the node in between).
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
PTMX = b"/dev/ptmx"
CONSOLE = b"/dev/console"


def open_console(socket_fd: int, height: int, width: int, bind_console: bool) -> int:
    """Make a pty from the container's /dev/ptmx (we are in its mount namespace, rooted at it),
    send its master over `socket_fd`, and return the slave.

    `height`/`width`: its window size (0: left as the kernel makes it). `bind_console`: bind the
    slave onto /dev/console, as runc does for a container's first process (not for exec).

    Raises:
        OSError: naming the step (open /dev/ptmx, ..., send to the console socket).

    Resource handling: closes `socket_fd` and the master; the caller owns the slave (O_CLOEXEC:
    it lives on as the stdio it is duplicated to).
    """
    try:
        master = os.open(PTMX, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        # The child reports the errno and the filename (fork.failure_to_error): say what it was.
        raise OSError(exc.errno, exc.strerror, "the container's /dev/ptmx (a devpts mounted at /dev/pts?)") from None
    slave = -1
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        if height and width:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        if bind_console:
            number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
            _bind_console(b"/dev/pts/%d" % number)
        try:
            _send(socket_fd, master)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, "the terminal's master to the console socket") from None
        return slave
    except BaseException:
        if slave >= 0:
            os.close(slave)
        raise
    finally:
        os.close(master)
        os.close(socket_fd)


def _send(socket_fd: int, master: int) -> None:
    sock = _socket.socket(fileno=socket_fd)
    try:
        # MSG_NOSIGNAL: the child has SIGPIPE at its default (death); a gone engine is an error to report.
        sock.sendmsg([PTMX], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", [master]).tobytes())],
                     _socket.MSG_NOSIGNAL)
    finally:
        sock.detach()  # the fd stays the caller's to close


def _bind_console(slave_path: bytes) -> None:
    """/dev/console is the container's terminal (runc's mountConsole): a file bound to the slave."""
    try:
        os.mknod(CONSOLE, stat.S_IFREG | 0o600)  # never opens what is there (a device node would be the host's)
    except FileExistsError:
        pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, "create /dev/console") from None
    sc.mount(slave_path, CONSOLE, None, sc.MS_BIND, None)
