"""The writer zygote: one small process per library process (the fork-server, serve, `fcrun run
-d`) that forks every instance's log writer, instead of a new interpreter per instance.

Why: a writer started as a new interpreter (`python -S -E` with rotation.py) holds ~3.5 MiB of
its own memory (4.0 MiB PSS); forked from a zygote that has loaded the same module, it shares
those pages copy-on-write and holds ~0.5 MiB (1.2 MiB PSS), measured on this VM. With thousands
of pooled and frozen instances per host that is ~3 MiB each, a fifth of an instance. A fork of
the zygote also takes a fraction of a millisecond, against ~5 ms for the shell and the
interpreter's start.

What stays as it was: each instance still has a writer process of its own (one that dies
takes only its instance's output with it), in the creator's cgroup, orphaned from its creator
(the zygote is orphaned at start, as the writers were, and its writers outlive it), exiting at
its pipe's EOF. The zygote exits when its creator closes the socket (the creator exited). If the
zygote cannot be started or stops answering, `fork_writer` returns False and the caller starts
a writer the old way (writer.py); the next call starts a new zygote.

    creator                          zygote (orphaned)                writer (forked)
    socketpair(SEQPACKET) ---------- recvmsg(args, pipe read end) --> fork: drains the pipe
    sendmsg(args, read end), recv(1) <- 1 byte: forked
"""

from __future__ import annotations

import array
import atexit
import os
import socket
import subprocess
import sys
import threading

REPLY_TIMEOUT_S = 5.0  # a fork answers in microseconds; longer means the zygote is stuck
_ROTATION_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rotation.py")
_BOOT = ("import sys, importlib.util as u; s = u.spec_from_file_location('fcrun_log_rotation', sys.argv[1]); "
         "m = u.module_from_spec(s); s.loader.exec_module(m); sys.exit(m.zygote(int(sys.argv[2])))")
_FORKED = b"\x01"  # rotation.ZYGOTE_FORKED (rotation.py is not imported here: it is the zygote's)


class WriterZygote:
    """The library's handle on its zygote, started on first use. Thread-safe; a process forked
    from the library (not exec'd) starts its own rather than sharing the socket."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._owner = 0  # the pid that made _sock

    def fork_writer(self, read_fd: int, path: str, max_bytes: int, count: int) -> bool:
        """Have a writer forked that drains ``read_fd`` into ``path``; False when the zygote
        could not do it (the caller starts one itself). ``read_fd`` stays the caller's."""
        payload = f"{path}\0{max_bytes}\0{count}".encode()
        with self._lock:
            if self._owner != os.getpid():
                self._sock = None  # our parent's, inherited by a fork: not ours to use
            if self._sock is None and not self._start():
                return False
            try:
                self._sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [read_fd]))])
                answer = self._sock.recv(1)
            except OSError:  # gone (EPIPE, ECONNRESET) or stuck (timeout): a new one next time
                answer = b""
            if answer != _FORKED:
                if not answer:
                    self._close()
                return False
            return True

    def close(self) -> None:
        """Close our end: the zygote exits (its writers do not)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._sock is not None and self._owner == os.getpid():
            self._sock.close()
        self._sock = None

    def _start(self) -> bool:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [sys.executable, "-S", "-E", "-c", _BOOT, _ROTATION_PY, str(theirs.fileno())]
            # Orphaned at once, as a writer was (writer.py): a shell starts it in the background
            # and exits, so nobody has to reap it. close_fds: of ours it holds only its socket.
            launcher = subprocess.Popen(["/bin/sh", "-c", '"$0" "$@" &', *argv], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                                        pass_fds=(theirs.fileno(),), start_new_session=True,
                                        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
            if launcher.wait() != 0:
                ours.close()
                return False
        except OSError:
            ours.close()
            return False
        finally:
            theirs.close()
        ours.settimeout(REPLY_TIMEOUT_S)
        self._sock, self._owner = ours, os.getpid()
        return True


_shared = WriterZygote()
# Closed at exit, not left to the interpreter's teardown (which closes it too, but as an
# unclosed socket: a ResourceWarning where warnings show, as under pytest): the zygote exits.
atexit.register(_shared.close)


def shared() -> WriterZygote:
    """This process's zygote."""
    return _shared
