"""The library's side of the spawner: `Client` (one spawner process) and `SharedSpawner`
(the one a library process starts on demand and shares among its threads).

See server.py for the spawner itself and the handshake, protocol.py for the wire.

`socket` is imported where a spawner is started or spoken to, not at the top: a `fcrun run`
without a fork-server loads this module but forks its one container itself, and socket.py's
import is ~1.5-2 ms of it on this VM.
"""

from __future__ import annotations

import _thread
import atexit
import errno
import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING

import msgspec

import fcrun

from ...errors import ContainerError, KernelError
from ..child import ChildPlan
from . import protocol

if TYPE_CHECKING:
    import socket

WARM_CHILDREN = 2  # kept waiting for a plan (the spawner's default too)
READY_TIMEOUT_S = 10.0
REPORT_TIMEOUT_S = 30.0
MAX_START_FAILURES = 3

BOOT = "import sys; sys.path[:0] = sys.argv[4:]; from fcrun.runtime.spawner.server import main; main()"


def library_gone(pid: int) -> bool:
    """Whether process `pid` is a spawner whose library process has died. The spawner follows
    it at once (PR_SET_PDEATHSIG or its pidfd watch), but a gc may look before it has: the
    children it forked are then orphans already. Its argv names its library (see `Client`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    try:
        library = int(argv[argv.index(BOOT.encode()) + 1])
    except (ValueError, IndexError):
        return False  # not a spawner
    return int(stat[stat.rindex(b")") + 2:].split()[1]) != library  # reparented: its library died


class SpawnerGone(ContainerError):
    """The spawner is not there (any more); the caller may fork the container itself."""


class Client:
    """The library's handle on one spawner process.

    Thread-safe: requests go out as single datagrams; what the spawner sends (Ready, Warm)
    is read under a lock.

    Resource handling: owns ctrl, the sockets of the warm children handed to it and the
    spawner process; close() ends them all. The spawner also exits by itself when this
    process exits.
    """

    def __init__(self, sock: socket.socket, pid: int):
        self._sock = sock
        self.pid = pid
        self._ready = False
        self._lock = _thread.allocate_lock()
        self._warm: list[tuple[int, socket.socket]] = []
        self._buffer = bytearray(4096)

    @classmethod
    def start(cls, warm_children: int = WARM_CHILDREN) -> "Client":
        """Start a spawner process (it becomes ready a few ms later: see ready()).

        Raises:
            OSError: the process could not be started.
        """
        import socket
        import threading

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            fd = theirs.fileno()
            if fd == protocol.CTRL_FD:  # dup2 onto itself would keep close-on-exec
                fd = os.dup(fd)
            here = os.path.dirname(os.path.dirname(os.path.abspath(fcrun.__file__)))  # where fcrun is found
            lib = os.path.dirname(os.path.dirname(os.path.abspath(msgspec.__file__)))
            # PR_SET_PDEATHSIG fires when the *thread* that forked us ends: only the main
            # thread lives as long as the process. (The pidfd watch covers the other cases.)
            pdeathsig = signal.SIGKILL if threading.current_thread() is threading.main_thread() else 0
            argv = [sys.executable, "-I", "-S", "-c", BOOT, str(os.getpid()), str(int(pdeathsig)),
                    str(warm_children), *dict.fromkeys([here, lib])]
            try:
                pid = os.posix_spawn(
                    sys.executable, argv, {},
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, fd, protocol.CTRL_FD),
                        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                    ],
                    setpgroup=0,  # not in the terminal's process group: ^C goes to the library
                    setsigmask=(),
                    setsigdef=(signal.SIGPIPE, signal.SIGINT, signal.SIGTERM),
                )
            finally:
                if fd != theirs.fileno():
                    os.close(fd)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(ours, pid)

    def ready(self, timeout_s: float = 0.0) -> bool:
        """True once the spawner said it is ready; waits up to timeout_s for that.

        Raises:
            SpawnerGone: it exited before becoming ready.
        """
        if self._ready:
            return True
        ready, _, _ = select.select([self._sock], [], [], timeout_s)
        if ready:
            with self._lock:
                self._read_ctrl()
        return self._ready

    def warm_pids(self) -> set[int]:
        """The warm children handed to us and not used yet (reads what the spawner sent).

        Raises:
            SpawnerGone: it exited.
        """
        with self._lock:
            self._read_ctrl()
            return {pid for pid, _ in self._warm}

    def _read_ctrl(self) -> None:
        """Take what the spawner sent: Ready, warm children. Call with the lock held.

        Raises:
            SpawnerGone: it exited.
        """
        import socket

        while True:
            try:
                data, fds, flags = protocol.recv_with_fds(self._sock, self._buffer, nowait=True)
            except BlockingIOError:
                return
            except ConnectionError:
                raise SpawnerGone(f"the spawner (pid {self.pid}) exited") from None
            if not data and not fds:
                raise SpawnerGone(f"the spawner (pid {self.pid}) exited")
            try:
                message = protocol.decode_to_library(data)
            except msgspec.DecodeError:
                message = None
            match message:
                case protocol.Ready(pid=pid) if pid == self.pid:
                    self._ready = True
                case protocol.Warm(pid=pid) if len(fds) == 1 and not flags & socket.MSG_CTRUNC:
                    self._warm.append((pid, socket.socket(fileno=fds.pop())))
            for fd in fds:
                os.close(fd)

    def send(self, plan: ChildPlan, new_pid_ns: bool = True) -> tuple[int, int, int, int]:
        """Have the container child forked: a warm child when one fits, else the spawner forks.

        Returns (pid, status_r, go_w, report_r). From a warm child: its pid, and report_r -1:
        claim() it once the handshake is done. From the spawner: pid -1, which comes later on
        report_r (await_spawned), so the caller can do other work meanwhile. The plan's stdio
        (or, when None, this process's 0, 1, 2), init_fd and userns_fd go along as fds.

        Raises:
            SpawnerGone: the spawner is gone; nothing was made.

        Resource handling: the caller closes the three fds. The child is the spawner's: it
        reaps it and reports the exit on report_r (read_report), so the caller waits for an
        Exited message instead of calling waitpid.
        """
        wire = msgspec.structs.replace(plan, status_w=-1, go_r=-1, init_fd=-1, stdio=None, keep_fds=[], userns_fd=-1)
        request = protocol.Spawn(plan=wire, new_pid_ns=new_pid_ns, init=plan.init_fd >= 0, userns=plan.userns_fd >= 0)
        message = protocol.encode(request)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        child_fds = [status_w, go_r, *(plan.stdio if plan.stdio is not None else (0, 1, 2))]
        if plan.init_fd >= 0:
            child_fds.append(plan.init_fd)
        if plan.userns_fd >= 0:
            child_fds.append(plan.userns_fd)
        try:
            try:
                pid = self._send_to_warm(message, child_fds) if protocol.fits_warm_child(request) else -1
                report_r = -1
                if pid < 0:
                    report_r = self._send_with_report_pipe(message, child_fds)
            finally:
                os.close(status_w)
                os.close(go_r)
        except BaseException:
            os.close(status_r)
            os.close(go_w)
            raise
        return pid, status_r, go_w, report_r

    def _send_with_report_pipe(self, message: bytes, fds: list[int]) -> int:
        """Send a request with a new report pipe first among its fds; returns its read end."""
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        try:
            self._send_ctrl(message, [report_w, *fds])
        except BaseException:
            os.close(report_r)
            raise
        finally:
            os.close(report_w)
        return report_r

    def _send_to_warm(self, message: bytes, child_fds: list[int]) -> int:
        """Give the request to a warm child: its pid, or -1 if there is none (left)."""
        import socket

        while True:
            with self._lock:
                self._read_ctrl()
                if not self._warm:
                    return -1
                pid, sock = self._warm.pop()
            try:
                socket.send_fds(sock, [message], child_fds)
                return pid
            except OSError:
                pass  # it died waiting: the next one
            finally:
                sock.close()

    def claim(self, pid: int) -> int:
        """Tell the spawner that warm child `pid` took a plan; returns the report pipe on
        which its exit will be reported.

        Raises:
            SpawnerGone: the spawner is gone.

        Resource handling: the caller closes the returned fd.
        """
        return self._send_with_report_pipe(protocol.encode(protocol.Claim(pid=pid)), [])

    def make_userns(self, uid_map: bytes, gid_map: bytes, timeout_s: float = REPORT_TIMEOUT_S) -> int:
        """A new user namespace with these map texts, made by the spawner (holder.py); its fd.

        Raises:
            SpawnerGone: the spawner is gone. KernelError: it could not make the namespace.
            ContainerError: it did not answer within timeout_s.

        Resource handling: the caller owns the returned fd (close-on-exec).
        """
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                self._send_ctrl(protocol.encode(protocol.MakeUserns(uid_map=uid_map, gid_map=gid_map)), [theirs.fileno()])
            finally:
                theirs.close()
            ready, _, _ = select.select([ours], [], [], timeout_s)
            if not ready:
                raise ContainerError(f"the spawner did not answer within {timeout_s:.0f}s")
            data, fds, _ = protocol.recv_with_fds(ours, bytearray(4096))
        finally:
            ours.close()
        try:
            if not data:
                raise SpawnerGone(f"the spawner (pid {self.pid}) is gone")
            match protocol.decode_report(data):
                case protocol.UsernsMade() if len(fds) == 1:
                    return fds.pop()
                case protocol.Refused(message=message, errno=err, obj=obj):
                    raise KernelError(message, obj, err or errno.EIO)
                case other:
                    raise ContainerError(f"unexpected answer from the spawner: {other!r}")
        finally:
            for fd in fds:
                os.close(fd)

    def _send_ctrl(self, message: bytes, fds: list[int]) -> None:
        import socket

        try:
            socket.send_fds(self._sock, [message], fds)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                raise SpawnerGone(f"the spawner (pid {self.pid}) is gone") from None
            raise

    def close(self, timeout_s: float = 2.0) -> None:
        """End the spawner: it sees EOF and exits; attached containers die with it (PDEATHSIG).

        Waits for it (it is our child); SIGKILL after timeout_s.
        """
        with self._lock:
            for _, sock in self._warm:
                sock.close()
            self._warm.clear()
        if self._sock.fileno() >= 0:
            self._sock.close()
        deadline = time.monotonic() + timeout_s
        try:
            while os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.001)
        except ChildProcessError:
            pass

    def forget(self) -> None:
        """In a forked child of the library: drop our copies without touching the spawner."""
        for _, sock in self._warm:
            os.close(sock.detach())
        self._warm.clear()
        os.close(self._sock.detach())


def await_spawned(report_r: int, timeout_s: float = REPORT_TIMEOUT_S) -> int:
    """The pid of the child the spawner forked for a send(), once it reports it.

    Raises:
        ContainerError: the spawner refused the request or failed to fork (the message says
            why), or it died first.
    """
    match protocol.read_report(report_r, timeout_s):
        case protocol.Spawned(pid=pid):
            return pid
        case protocol.Refused(message=message, errno=err):
            raise ContainerError(f"{message} [Errno {err}]" if err else message)
        case _:
            raise ContainerError("the spawner died while forking a container")


class SharedSpawner:
    """The spawner of this library process, started on demand and shared by its threads.

    `client_class` is for tests (a fake that forks nothing).
    """

    def __init__(self, client_class: type[Client] = Client):
        self.client_class = client_class
        self._lock = _thread.allocate_lock()
        self._client: Client | None = None
        self.direct_creates = 0  # containers forked without a spawner, in auto mode
        self.start_failures = 0

    @property
    def current(self) -> Client | None:
        """The spawner now in use, if any."""
        return self._client

    def for_create(self, mode: bool | None) -> Client | None:
        """The spawner a container creation should use, or None to fork directly.

        mode True: start one now if there is none, and wait until it is ready. None (auto): the
        first container of a process is forked directly (a one-shot `fcrun run` would only pay
        for starting a spawner); the second starts one in the background, used from the moment
        it is ready. False: never.

        Raises:
            SpawnerGone: mode True and the spawner could not be started.
        """
        if mode is False:
            return None
        with self._lock:
            client = self._client
            if client is None:
                if mode is None and (self.direct_creates < 1 or self.start_failures >= MAX_START_FAILURES):
                    self.direct_creates += 1
                    return None
                client = self._client = self.client_class.start()
        try:
            if client.ready(READY_TIMEOUT_S if mode else 0.0):
                return client
            if mode:
                raise SpawnerGone(f"the spawner (pid {client.pid}) did not get ready within {READY_TIMEOUT_S:.0f}s")
        except SpawnerGone:
            self.discard(client, failed_start=True)
            if mode:
                raise
        return None

    def discard(self, client: Client, failed_start: bool = False) -> None:
        """Forget a spawner that is gone (or useless) and collect its process."""
        with self._lock:
            if self._client is client:
                self._client = None
                if failed_start:
                    self.start_failures += 1
        client.close()

    def shutdown(self) -> None:
        """End the spawner, if any (attached containers it forked die with it)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def after_fork_in_child(self) -> None:
        """In a forked child: drop the parent's spawner without touching it."""
        self._lock = _thread.allocate_lock()
        if self._client is not None:
            self._client.forget()
            self._client = None


SHARED = SharedSpawner()
for_create = SHARED.for_create
discard = SHARED.discard
shutdown = SHARED.shutdown


def current() -> Client | None:
    """This process's spawner now in use, if any."""
    return SHARED.current


os.register_at_fork(after_in_child=lambda: SHARED.after_fork_in_child())
atexit.register(shutdown)
