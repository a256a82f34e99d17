"""The fork-server process: one thread, no event loop, a poll loop over a root-only socket.

    python -m fcrun.forkserver --socket /run/fcrun/forkserver.sock [--pool apache-php=2] ...

It creates containers (Runtime, forking them itself: no spawner, no threads) for the clients
of its socket (`fcrun serve`, or the library's `Client`), keeps the pool of pre-warmed
instances (pool.py), and reaps the containers it forked. It says "ready <pid>" on stdout once
it listens. It exits on Shutdown, SIGTERM/SIGINT, or when the process named by
--parent-pid exits, removing its pool (unless Shutdown said otherwise); the app instances it
made are serve's and live on. A new fork-server adopts the frozen pooled instances an earlier
one left (a crash, SIGKILL) and removes its half-made ones.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import sys

from ..errors import FcrunError, SpecError
from ..units import parse_memory
from ..paths import DEFAULT_BRIDGE, DEFAULT_CGROUP_PARENT, DEFAULT_SUBNET, Paths
from ..runtime import Runtime
from . import protocol as p
from .pool import DEFAULT_MAX_AGE_S, DEFAULT_POOL_CPU, DEFAULT_POOL_MEMORY_BYTES, Pool

log = logging.getLogger("fcrun.forkserver")

LISTEN_BACKLOG = 64
SEND_TIMEOUT_S = 5.0
_UCRED = struct.Struct("3i")


class ForkServer:
    def __init__(self, pool: Pool, listener: socket.socket, parent_pidfd: int = -1):
        self.pool = pool
        self.listener = listener
        self.parent_pidfd = parent_pidfd
        self.selector = selectors.DefaultSelector()
        self.buffers: dict[socket.socket, bytearray] = {}
        self.running = True
        self.remove_pool_at_exit = True

    def serve(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()  # signals wake the select through it
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select for reaping
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        if self.parent_pidfd >= 0:
            self.selector.register(self.parent_pidfd, selectors.EVENT_READ, "parent")
        timeout = 0.0
        try:
            while self.running:
                for key, _ in self.selector.select(timeout):
                    match key.data:
                        case "accept":
                            self._accept()
                        case "wake":
                            with contextlib.suppress(BlockingIOError):
                                self._wake_r.recv(4096)
                        case "parent":
                            log.info("serve exited: stopping")
                            self.running = False
                        case _:
                            self._read(key.fileobj)
                    if not self.running:
                        break
                _reap_children()
                if self.running:
                    try:
                        timeout = self.pool.step(self.pool.clock())
                    except Exception:  # noqa: BLE001 - a bug in the pool must not end the fork-server
                        log.exception("pool step failed")
                        timeout = 1.0
        finally:
            if self.remove_pool_at_exit:
                removed = self.pool.remove_all()
                if removed:
                    log.info("removed %d pooled instances", len(removed))
            _reap_children()
            for sock in list(self.buffers):
                sock.close()
            self.selector.close()
            signal.set_wakeup_fd(-1)
            self._wake_r.close()
            self._wake_w.close()

    def _stop_signal(self, signum, frame) -> None:
        self.running = False

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.warning("accept: %s", exc)  # overload: the next select tries again
            return
        pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != 0:  # the socket is 0600 under a 0700 directory; checked again all the same
            log.warning("refused a client with uid %d (pid %d)", uid, pid)
            conn.close()
            return
        conn.settimeout(SEND_TIMEOUT_S)
        self.buffers[conn] = bytearray()
        self.selector.register(conn, selectors.EVENT_READ, "client")

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buffer = self.buffers[conn]
        buffer += data
        try:
            bodies = p.split_frames(buffer)
        except SpecError as exc:
            self._reply(conn, p.Failed(kind="SpecError", message=str(exc), http_status=400))
            self._drop(conn)
            return
        for body in bodies:
            reply = self._handle(body)
            if not self._reply(conn, reply):
                return
            if not self.running:
                return

    def _handle(self, body: bytes) -> p.Reply:
        try:
            request = p.decode_request(body)
            p.check_request(request)
            match request:
                case p.Claim():
                    return self.pool.claim(request)
                case p.Start():
                    return self.pool.start(request)
                case p.SetPool():
                    self.pool.set_sizes(request.sizes)
                    return p.Done()
                case p.Status():
                    return p.PoolStatus(pid=os.getpid(), images=self.pool.status())
                case p.Shutdown():
                    self.running = False
                    self.remove_pool_at_exit = request.remove_pool
                    return p.Done()
        except FcrunError as exc:
            return p.Failed(kind=type(exc).__name__, message=str(exc), http_status=exc.http_status)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the fork-server down
            log.exception("request failed")
            return p.Failed(kind=type(exc).__name__, message=f"fork-server error: {exc}", http_status=500)
        raise AssertionError("unreachable")

    def _reply(self, conn: socket.socket, reply: p.Reply) -> bool:
        try:
            conn.sendall(p.frame(reply))
            return True
        except OSError:
            self._drop(conn)
            return False

    def _drop(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        self.buffers.pop(conn, None)
        conn.close()


def _reap_children() -> None:
    """Reap every exited container this process forked (their stop is someone else's call)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def listen(path: str) -> socket.socket:
    """A unix socket only root can use: 0600, in a directory that is root's and 0700 if we make it."""
    directory = os.path.dirname(path)
    os.makedirs(directory, 0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != 0 or st.st_mode & stat.S_IWOTH:
        raise SpecError(f"socket directory {directory} must be root's and not world-writable", "--socket")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # an earlier fork-server's; only one runs per path (serve starts it)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(LISTEN_BACKLOG)
    return sock


def _pool_size(text: str) -> tuple[str, int]:
    image, sep, n = text.partition("=")
    if not sep or not n.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not IMAGE=COUNT")
    return image, int(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcrun.forkserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="unix socket to listen on (made 0600)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--run-root", default=None)
    parser.add_argument("--cgroup-parent", default=DEFAULT_CGROUP_PARENT)
    parser.add_argument("--bridge", default=DEFAULT_BRIDGE)
    parser.add_argument("--subnet", default=DEFAULT_SUBNET)
    parser.add_argument("--pool", type=_pool_size, action="append", default=[], metavar="IMAGE=COUNT")
    parser.add_argument("--pool-cpu", type=float, default=DEFAULT_POOL_CPU)
    parser.add_argument("--pool-memory", default=str(DEFAULT_POOL_MEMORY_BYTES))
    parser.add_argument("--pool-max-age", type=float, default=DEFAULT_MAX_AGE_S, help="seconds")
    parser.add_argument("--pool-warming", type=int, default=1, help="pooled instances warming at once")
    parser.add_argument("--no-hot-spare", action="store_true", help="keep every pooled instance frozen")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process exits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("FCRUN_LOG", "INFO"), format="fcrun forkserver: %(message)s")
    if os.geteuid() != 0:
        print("fcrun forkserver: must run as root", file=sys.stderr)
        return 77
    try:
        memory = parse_memory(args.pool_memory, "--pool-memory")
        paths = Paths.from_env(args.data_root, args.run_root)
        runtime = Runtime(paths, cgroup_parent=args.cgroup_parent, bridge=args.bridge, subnet=args.subnet,
                          spawner=False)
        pool = Pool(runtime, cpu=args.pool_cpu, memory_bytes=memory, max_age_s=args.pool_max_age,
                    max_warming=max(1, args.pool_warming), hot_spare=not args.no_hot_spare)
        p.check_request(p.SetPool(sizes=dict(args.pool)))
        pool.set_sizes(dict(args.pool))
        parent_pidfd = os.pidfd_open(args.parent_pid) if args.parent_pid else -1
        # What a killed predecessor left half-made (a reserved name, its slot, cgroup, lease).
        cleaned = runtime.gc()
        if cleaned:
            log.info("removed what an earlier fork-server left: %s", ", ".join(cleaned))
        adopted, removed = pool.adopt()
        if adopted or removed:
            log.info("adopted %d pooled instances, removed %d half-made ones", len(adopted), len(removed))
        listener = listen(args.socket)
    except (FcrunError, OSError) as exc:
        print(f"fcrun forkserver: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    server = ForkServer(pool, listener, parent_pidfd)
    print(f"ready {os.getpid()}", flush=True)
    try:
        server.serve()
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
    return 0
