"""RotatingLog: the file side of a log writer.

Every line gets an RFC3339 UTC timestamp with microseconds (``2026-12-05T10:30:00.123456Z ``),
fixed width, so text order is time order: merging instances and ``--since`` compare strings.
A line split across reads is stamped once, when its first byte arrives.

Rotation is by size, like logrotate's ``copytruncate``-free rename scheme: when the current
file would pass ``max_bytes`` it is renamed ``.1`` (``.1`` -> ``.2`` ...; the oldest beyond
``count`` is removed) and a new current file is opened. A reader following by name notices the
new inode and drains the old file first (reader.follow).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

# Nothing from fcrun is imported here: the writer process loads this file alone (writer._BOOT),
# so that each instance's writer holds an interpreter and this module, no more.


def rotated(path: str, index: int) -> str:
    """The name of the ``index``-th rotated file (0: the current one)."""
    return path if index == 0 else f"{path}.{index}"


def stamp(now: float) -> bytes:
    """RFC3339 UTC with microseconds, and a space: the prefix of each line."""
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%06dZ " % micros


class RotatingLog:
    """Appends timestamped lines to ``path``, keeping at most ``count`` rotated files.

    Resource handling: owns one fd on the current file; close() releases it.
    """

    def __init__(self, path: str, max_bytes: int, count: int, clock: Callable[[], float] = time.time):
        self.path = path
        self.max_bytes = max_bytes
        self.count = count
        self.clock = clock
        self.at_line_start = True
        self.fd = -1
        self.size = 0
        self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(self.fd).st_size

    def _rotate(self) -> None:
        os.close(self.fd)
        if self.count == 0:
            os.unlink(self.path)
        else:
            for index in range(self.count, 0, -1):
                older = rotated(self.path, index - 1)
                if os.path.exists(older):
                    os.replace(older, rotated(self.path, index))
        self._open()

    def write(self, data: bytes) -> None:
        """Stamp and append ``data`` (any chunk of the stream), rotating as needed.

        Raises:
            OSError: the disk refused the write (ENOSPC...): the caller decides.
        """
        if not data:
            return
        prefix = stamp(self.clock())
        # One replace, not a loop over lines: the writer must keep up with a busy Apache.
        out = data.replace(b"\n", b"\n" + prefix)
        if self.at_line_start:
            out = prefix + out
        self.at_line_start = data.endswith(b"\n")
        if self.at_line_start:
            out = out[: -len(prefix)]  # the next line is stamped when it arrives
        self._append(out)

    def _append(self, out: bytes) -> None:
        # Cut at line ends, so each file holds whole lines where lines are shorter than the bound.
        while out:
            room = self.max_bytes - self.size
            if len(out) <= room:
                chunk, out = out, b""
            else:
                cut = out.rfind(b"\n", 0, max(room, 0))
                if cut < 0:
                    if self.size > 0:
                        self._rotate()
                        continue
                    cut = self.max_bytes - 1  # one line longer than a file: split it
                chunk, out = out[: cut + 1], out[cut + 1:]
            view = memoryview(chunk)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            self.size += len(chunk)
            if out:
                self._rotate()
        if self.size >= self.max_bytes:
            self._rotate()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


READ_BYTES = 256 * 1024


def drain(fd: int, log: RotatingLog) -> int:
    """Copy ``fd`` to ``log`` until EOF; the number of bytes dropped for want of disk at the end."""
    dropped = 0
    while True:
        try:
            data = os.read(fd, READ_BYTES)
        except InterruptedError:
            continue
        if not data:
            return dropped
        try:
            if dropped:
                log.write(b"[fcrun: %d bytes of output dropped: the disk refused them]\n" % dropped)
                dropped = 0
            log.write(data)
        except OSError:
            dropped += len(data)


def main(argv: list[str]) -> int:
    """The writer process: ``PATH MAX_BYTES COUNT``, draining its stdin."""
    path, max_bytes, count = argv[0], int(argv[1]), int(argv[2])
    log = RotatingLog(path, max_bytes, count)
    try:
        drain(0, log)
    finally:
        log.close()
    return 0


ZYGOTE_FORKED, ZYGOTE_REFUSED = b"\x01", b"\x00"  # its answer to each request


def zygote(sock_fd: int) -> int:
    """The writer zygote (logs/zygote.py): for each request on the SOCK_SEQPACKET socket
    ``sock_fd`` (a pipe's read end, and ``PATH\0MAX_BYTES\0COUNT``) it forks a writer that
    drains the pipe as `main` does, and answers ZYGOTE_FORKED (or ZYGOTE_REFUSED); it exits at
    EOF, when its creator closed the other end. Its writers run on after it. A forked writer
    shares this process's pages (an interpreter with this module) until it writes them:
    ~0.5 MiB of its own, against ~3.5 MiB for a writer started as a new interpreter."""
    import array
    import gc
    import signal
    import socket

    sock = socket.socket(fileno=sock_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the writers
    gc.freeze()  # what is here now is never touched by a collection in the writers
    while True:
        try:
            message, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(array.array("i", [0]).itemsize))
        except InterruptedError:
            continue
        if not message:
            return 0
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        answer = ZYGOTE_REFUSED
        args = message.decode(errors="replace").split("\0")
        if len(fds) == 1 and len(args) == 3:
            try:
                pid = os.fork()
            except OSError:
                pid = -1
            if pid == 0:
                _writer_child(sock, fds[0], args)
            if pid > 0:
                answer = ZYGOTE_FORKED
        for fd in fds:
            os.close(fd)
        sock.send(answer)


def _writer_child(sock, fd: int, args: list[str]) -> None:
    """In a forked writer: drain ``fd`` as `main` drains its stdin, then exit (never returns)."""
    import signal

    code = 1
    try:
        sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(fd, 0)
        os.close(fd)
        code = main(args)
    finally:
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
