"""The fork-server process: one thread, no event loop, a poll loop over a root-only socket.

    python -m fcrun.forkserver --socket /run/fcrun/forkserver.sock [--pool apache-php=2] ...

It creates containers for the clients of its socket (`fcrun serve`, the library's `Client`,
the `fcrun run` thin client), keeps the pool of pre-warmed instances (pool.py), and reaps the
containers it forked. Pooled and app instances it forks itself (Runtime(spawner=False): no
threads, no helper). A `Run` container is forked through the library's spawner (runtime/spawner/: a
separate process with pre-namespaced children, faster to a started container; the
first Runs are forked directly while it starts), attached to its client's stdio (fds passed
with the request) and watched through its pidfd in the same poll loop; its client gets Exited
as soon as it exited, and it is removed right after (before the next request), or when its
client hangs up.

It says "ready <pid>" on stdout once it listens. It exits on Shutdown, SIGTERM/SIGINT, or when
the process named by --parent-pid exits, removing its pool (unless Shutdown said otherwise);
the app instances it made are serve's and live on. A new fork-server adopts the frozen pooled instances an earlier
one left (a crash, SIGKILL) and removes its half-made ones.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..cgroups.primer import MovePrimer
from ..errors import RUN_OWN_FAILURE, FcrunError, SpecError, command_exit_code
from ..logs.serverlog import LOG_FORMAT_ENV, configure
from ..runrequest import run_spec
from ..units import is_decimal, parse_memory
from ..paths import DEFAULT_BRIDGE, DEFAULT_CGROUP_PARENT, DEFAULT_SUBNET, Paths
from ..docroot import DEFAULT_DOCROOT_ROOTS, check_roots
from ..runtime.lifecycle import Container, Runtime
from ..runtime.process import exit_code
from ..unixsock import bind_private, peer_credentials
from . import protocol as p
from .pool import DEFAULT_MAX_AGE_S, DEFAULT_POOL_CPU, DEFAULT_POOL_MEMORY_BYTES, Pool

log = logging.getLogger("fcrun.forkserver")

LISTEN_BACKLOG = 64
SEND_TIMEOUT_S = 5.0
_FD_ANCILLARY_BYTES = socket.CMSG_SPACE(p.STDIO_FDS * array.array("i").itemsize)


@dataclass
class _Run:
    """A foreground `Run` container: its client's connection waits for its Exited."""

    name: str
    pid: int
    pidfd: int  # -1 once _end_run closed it
    conn: socket.socket
    container: Container


LOG_EXPIRY_INTERVAL_S = 60.0


class ForkServer:
    def __init__(self, pool: Pool, listener: socket.socket, parent_pidfd: int = -1,
                 run_runtime: Runtime | None = None):
        self.pool = pool
        self.run_runtime = run_runtime if run_runtime is not None else pool.runtime  # for Run requests
        self.listener = listener
        self.parent_pidfd = parent_pidfd
        self.selector = selectors.DefaultSelector()
        self.buffers: dict[socket.socket, bytearray] = {}
        self.running = True
        self.remove_pool_at_exit = True
        self.fds: dict[socket.socket, list[int]] = {}  # SCM_RIGHTS fds not yet taken by a Run
        self.runs: dict[socket.socket, _Run] = {}
        self.run_pids: dict[int, _Run] = {}
        self.next_log_expiry = 0.0  # pool clock; the first step after start expires old logs

    @property
    def runtime(self):
        return self.pool.runtime

    def _expire_logs(self) -> None:
        """Gone instances' logs past FCRUN_LOG_KEEP_S go, once a LOG_EXPIRY_INTERVAL_S."""
        now = self.pool.clock()
        if now < self.next_log_expiry:
            return
        self.next_log_expiry = now + LOG_EXPIRY_INTERVAL_S
        try:
            removed = self.runtime.expire_logs(time.time())
        except (OSError, ValueError) as exc:
            log.warning("expiring instance logs: %s", exc)
            return
        if removed:
            log.info("removed the logs of %d gone instance(s): %s", len(removed), " ".join(removed[:10]))

    def serve(self, on_ready: Callable[[], None] = lambda: None) -> None:
        """Serve until stopped; `on_ready` runs once the signal handlers are in place (so that a
        SIGTERM right after "ready" stops the server cleanly instead of killing it)."""
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
        on_ready()
        timeout = 0.0
        try:
            while self.running:
                for key, _ in self.selector.select(timeout):
                    self._dispatch(key)
                    if not self.running:
                        break
                self._reap()
                if self.running:
                    try:
                        timeout = self.pool.step(self.pool.clock())
                    except Exception:  # noqa: BLE001 - a bug in the pool must not end the fork-server
                        log.exception("pool step failed")
                        timeout = 1.0
                    self._expire_logs()
        finally:
            for run in list(self.runs.values()):  # attached to us: they would die with us anyway
                self._end_run(run)
            if self.remove_pool_at_exit:
                removed = self.pool.remove_all()
                if removed:
                    log.info("removed %d pooled instances", len(removed))
            _reap_children()
            for sock in list(self.buffers):
                sock.close()
            for fds in self.fds.values():
                for fd in fds:
                    os.close(fd)
            self.selector.close()
            signal.set_wakeup_fd(-1)
            self._wake_r.close()
            self._wake_w.close()

    def _dispatch(self, key: selectors.SelectorKey) -> None:
        """Handle one event of a select's batch.

        An earlier event of the same batch may have unregistered this one's file (a client
        that hung up ends its Run: that Run's pidfd is closed), and its number may even be
        registered again for another file (an accept): such a stale event is skipped, or it
        would act on a closed or unrelated fd. An event whose handling fails is logged: one
        bad event must not end the fork-server, its pool and every other client's Run.
        """
        if self.selector.get_map().get(key.fd) is not key:
            return
        try:
            match key.data:
                case "accept":
                    self._accept()
                case "wake":
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                case "parent":
                    log.info("serve exited: stopping")
                    self.running = False
                case _Run() as run:
                    self._collect(run)
                case _:
                    self._read(key.fileobj)
        except Exception:  # noqa: BLE001 - a bug in one event's handling must not end the fork-server
            log.exception("handling an event of fd %d failed", key.fd)

    def _stop_signal(self, signum, frame) -> None:
        self.running = False

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.warning("accept: %s", exc)  # overload: the next select tries again
            return
        pid, uid, _gid = peer_credentials(conn)
        if uid != 0:  # the socket is 0600 under a 0700 directory; checked again all the same
            log.warning("refused a client with uid %d (pid %d)", uid, pid)
            conn.close()
            return
        conn.settimeout(SEND_TIMEOUT_S)
        self.buffers[conn] = bytearray()
        self.selector.register(conn, selectors.EVENT_READ, "client")

    def _read(self, conn: socket.socket) -> None:
        try:
            data, ancillary, flags, _ = conn.recvmsg(65536, _FD_ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
        except OSError:
            data, ancillary, flags = b"", [], 0
        fds = self.fds.setdefault(conn, [])
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                passed = array.array("i")
                passed.frombytes(payload[:len(payload) - len(payload) % passed.itemsize])
                fds.extend(passed)
        if not data:
            self._drop(conn)
            return
        if flags & socket.MSG_CTRUNC or len(fds) > p.STDIO_FDS:
            self._reply(conn, p.Failed(kind="SpecError", message=f"more than {p.STDIO_FDS} file descriptors passed",
                                       http_status=400, exit_code=2))
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
            reply = self._handle(body, conn)
            if reply is not None and not self._reply(conn, reply):
                return
            if not self.running or conn not in self.buffers:
                return

    def _handle(self, body: bytes, conn: socket.socket | None = None) -> p.Reply | None:
        """The reply to one request; None: none now (a Run's comes when it exits, a Signal's never)."""
        try:
            request = p.decode_request(body)
            p.check_request(request)
            match request:
                case p.Run():
                    try:
                        return self._run(request, conn)
                    except FcrunError as exc:  # the exit code of `fcrun run`, not of other commands
                        return p.Failed(kind=type(exc).__name__, message=str(exc), http_status=exc.http_status,
                                        exit_code=command_exit_code(exc))
                case p.Signal():
                    run = self.runs.get(conn)
                    if run is not None:
                        # By pidfd, not pid: once the container has exited and been reaped
                        # (the spawner reaps at once), its pid may be another process's.
                        with contextlib.suppress(ProcessLookupError):
                            signal.pidfd_send_signal(run.pidfd, request.signal)
                    return None
                case p.Claim():
                    # Answered from inside the claim, before the instance's state is saved.
                    return self.pool.claim(request, answer=lambda made: self._reply(conn, made))
                case p.Start():
                    if (primer := self.pool.runtime.move_primer) is not None:
                        primer.prime()  # before the image and spec are read: its grace period ends the sooner
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
            return p.Failed(kind=type(exc).__name__, message=str(exc), http_status=exc.http_status,
                            exit_code=exc.exit_code)
        except OSError as exc:  # as the CLI reports a system error the library did not wrap
            where = f" {exc.filename}" if exc.filename else ""
            return p.Failed(kind="OSError", message=f"run{where}: [Errno {exc.errno}] {exc.strerror}", exit_code=125)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the fork-server down
            log.exception("request failed")
            return p.Failed(kind=type(exc).__name__, message=f"fork-server error: {exc}", http_status=500)
        raise AssertionError("unreachable")

    def _run(self, request: p.Run, conn: socket.socket | None) -> p.Reply | None:
        """Create and start a Run's container; foreground: watch it, reply when it exits.

        The options become a container through run_spec, as `fcrun run` in one process
        (fcrun_cli/main.py) makes it, so that errors read the same.

        Resource handling: the client's fds are closed here whatever happens (the container
        holds its own copies); the container is this connection's until _end_run.
        """
        fds = self.fds.pop(conn, []) if conn is not None else []
        try:
            mismatch = self._mismatch(request)
            if mismatch:
                return p.Failed(kind="Mismatch", message=mismatch, http_status=400, exit_code=2)
            if conn is None or conn in self.runs:
                raise SpecError("one Run a connection, on a connection of this fork-server's socket", "$")
            if not request.detach and len(fds) != p.STDIO_FDS:
                raise SpecError(f"a foreground Run passes stdin, stdout and stderr ({p.STDIO_FDS} fds, SCM_RIGHTS);"
                                f" got {len(fds)}", "$")
            rt = self.run_runtime
            plan = run_spec(request, rt.images.get)
            name = plan.name
            if plan.detach:
                rt.run(name, plan.spec, image=plan.image, detach=True, init=plan.init)
                return p.Detached(name=name)
            container = rt.run(name, plan.spec, image=plan.image, stdio=(fds[0], fds[1], fds[2]), init=plan.init)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            pidfd = os.pidfd_open(container.pid)  # a zombie has one too: an early exit is seen
        except ProcessLookupError:
            # Exited and already reaped: the spawner forked it and reaps at once (a container
            # that exits right after its exec, while the creation still saves its state).
            # The spawner's report says how it ended; "stopped" is not saved (record=False):
            # the container is removed next. A report that cannot be read is _handle's Failed.
            try:
                return p.Exited(code=container.wait(record=False))
            finally:
                with contextlib.suppress(FcrunError, OSError):
                    rt.delete(name, force=True)
        except OSError:
            with contextlib.suppress(FcrunError, OSError):
                rt.delete(name, force=True)
            raise
        run = _Run(name=name, pid=container.pid, pidfd=pidfd, conn=conn, container=container)
        self.runs[conn] = run
        self.run_pids[run.pid] = run
        self.selector.register(pidfd, selectors.EVENT_READ, run)
        return None

    def _mismatch(self, request: p.Run) -> str:
        """Why this fork-server cannot run it as the client's CLI would ("" if it can): other
        roots or network, or an option it leaves to the CLI in the client's process."""
        for option, given in (("--security-opt", request.security_opts), ("--tmpfs-rootfs", request.tmpfs_rootfs),
                              ("--userns", request.userns)):
            if given:  # a profile is a file the client names; the others are rare: the CLI's own path
                return f"this fork-server leaves {option} to the fcrun command itself"
        rt = self.run_runtime
        ours = {"data_root": rt.paths.data_root, "cgroup_parent": rt.cgroup_parent, "bridge": rt.bridge,
                "subnet": rt.subnet}
        for field, value in ours.items():
            theirs = getattr(request, field)
            if theirs is not None and theirs != value:
                return f"this fork-server's {field} is {value!r}, the client's {theirs!r}"
        return ""

    def _collect(self, run: _Run) -> None:
        """The pidfd of a Run's container is readable: it exited.

        _reap finishes the runs this process forked (after the events of a select), so one
        that is not our child here is the spawner's: it reaps it and reports the exit status
        on the container's report pipe, which Container.wait reads (at once: the spawner
        reaps on SIGCHLD; EOF if the spawner died).
        """
        try:
            pid, status = os.waitpid(run.pid, os.WNOHANG)
        except ChildProcessError:
            self._finish(run, None)
            return
        if pid:
            self._finish(run, status)

    def _reap(self) -> None:
        for pid, status in _reap_children():
            run = self.run_pids.get(pid)
            if run is not None:
                self._finish(run, status)

    def _finish(self, run: _Run, status: int | None) -> None:
        """Reply Exited (from the wait status, or the spawner's report if None) and remove it;
        Failed (exit code 125) when its exit status cannot be had."""
        reply = self._exit_reply(run, status)
        # The client needs only the exit code: it gets it as soon as the container's lock is
        # held, and the container is removed after that, before the next request. Whoever
        # wants the name meanwhile waits for that lock (StateStore.reserve, rm, ...), so a
        # `fcrun run --name X` right after this one's reply still finds X free.
        replied = []
        self._end_run(run, locked=lambda: replied.append(self._reply(run.conn, reply)))
        if not replied:  # the removal failed before it took the lock: answer all the same
            self._reply(run.conn, reply)

    def _exit_reply(self, run: _Run, status: int | None) -> p.Exited | p.Failed:
        """Exited with the code of wait status `status`, or of the spawner's report if None.

        The report is read without saving "stopped" (record=False): the container is removed
        right after, and a save that fails (a full or read-only run root) must not keep the
        client from its answer. Neither must a report the spawner garbled: the client then
        gets Failed, with `fcrun run`'s own exit code, and the fork-server goes on.
        """
        if status is not None:
            return p.Exited(code=exit_code(status))
        try:
            return p.Exited(code=run.container.wait(record=False))
        except (FcrunError, OSError) as exc:
            log.warning("container %s: reading its exit status: %s", run.name, exc)
            return p.Failed(kind=type(exc).__name__, message=f"container {run.name}: its exit status is unknown: {exc}",
                            exit_code=RUN_OWN_FAILURE)

    def _end_run(self, run: _Run, locked=None) -> None:
        """Forget a Run and remove its container (killing it first if it still runs). Once
        only: a Run ended already (its client hung up, then its pidfd's event came in the same
        batch) is left alone, as its pidfd's number may be another file's by now.

        `locked`: called with the container's lock held, before it is removed (Runtime.delete).
        """
        if run.pidfd < 0:
            return
        self.runs.pop(run.conn, None)
        self.run_pids.pop(run.pid, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(run.pidfd)
        os.close(run.pidfd)
        run.pidfd = -1
        try:
            self.run_runtime.delete(run.name, force=True, locked=locked)
        except (FcrunError, OSError) as exc:
            log.warning("remove container %s: %s", run.name, exc)

    def _reply(self, conn: socket.socket, reply: p.Reply) -> bool:
        try:
            conn.sendall(p.frame(reply))
            return True
        except OSError:
            self._drop(conn)
            return False

    def _drop(self, conn: socket.socket) -> None:
        run = self.runs.get(conn)
        if run is not None:  # the client went first (killed, or it hung up): so does its container
            log.info("client of %s hung up: removing it", run.name)
            self._end_run(run)
        for fd in self.fds.pop(conn, []):
            os.close(fd)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        self.buffers.pop(conn, None)
        conn.close()


def _reap_children() -> list[tuple[int, int]]:
    """Reap every exited child this process forked; returns their (pid, wait status)."""
    reaped = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, status))


def listen(path: str) -> socket.socket:
    """A unix socket only root can use: 0600, in a directory that is root's and 0700 if we make it."""
    directory = os.path.dirname(path)
    os.makedirs(directory, 0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != 0 or st.st_mode & stat.S_IWOTH:
        raise SpecError(f"socket directory {directory} must be root's and not world-writable", "--socket")
    # A socket left at `path` is an earlier fork-server's and is replaced: only one runs per
    # path (serve starts it).
    return bind_private(path, what="fork-server socket", where="--socket", backlog=LISTEN_BACKLOG)


def _pool_size(text: str) -> tuple[str, int]:
    image, sep, n = text.partition("=")
    if not sep or not is_decimal(n, 4):
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
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process exits")
    parser.add_argument("--docroot-root", action="append", default=None, metavar="DIR",
                        help="a directory apps' docroots may lie under (repeatable; default: "
                             f"{', '.join(DEFAULT_DOCROOT_ROOTS)}); every docroot is checked again here")
    args = parser.parse_args(argv)
    configure(os.environ.get(LOG_FORMAT_ENV) or "text", "fcrun forkserver", os.environ.get("FCRUN_LOG", "INFO"))
    if os.geteuid() != 0:
        print("fcrun forkserver: must run as root", file=sys.stderr)
        return 77
    try:
        memory = parse_memory(args.pool_memory, "--pool-memory")
        docroot_roots = tuple(args.docroot_root or DEFAULT_DOCROOT_ROOTS)
        check_roots(docroot_roots, "--docroot-root")
        paths = Paths.from_env(args.data_root, args.run_root)
        runtime = Runtime(paths, cgroup_parent=args.cgroup_parent, bridge=args.bridge, subnet=args.subnet,
                          spawner=False, docroot_roots=docroot_roots)
        # Run containers through the spawner (None: from the second on, or as $FCRUN_SPAWNER says).
        run_runtime = Runtime(paths, cgroup_parent=args.cgroup_parent, bridge=args.bridge, subnet=args.subnet,
                              spawner=None)
        pool = Pool(runtime, cpu=args.pool_cpu, memory_bytes=memory, max_age_s=args.pool_max_age,
                    max_warming=max(1, args.pool_warming))
        p.check_request(p.SetPool(sizes=dict(args.pool)))
        pool.set_sizes(dict(args.pool))
        parent_pidfd = os.pidfd_open(args.parent_pid) if args.parent_pid else -1
        remove_leftovers(runtime)
        adopted, removed = pool.adopt()
        if adopted or removed:
            log.info("adopted %d pooled instances, removed %d half-made ones", len(adopted), len(removed))
        primer = start_primer(runtime, run_runtime)  # forks: before any thread or listener
        listener = listen(args.socket)
    except (FcrunError, OSError) as exc:
        print(f"fcrun forkserver: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    server = ForkServer(pool, listener, parent_pidfd, run_runtime)
    try:
        server.serve(on_ready=lambda: print(f"ready {os.getpid()}", flush=True))
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
        if primer is not None:
            stop_primer(primer, runtime)
    return 0


def remove_leftovers(runtime: Runtime) -> None:
    """Remove what a killed predecessor left half-made (a reserved name, its slot, cgroup,
    lease). A failure is a warning, not a reason not to start: what cannot be removed now (a
    busy mount, an I/O error) would otherwise keep the fork-server down on every restart,
    and the next gc tries again."""
    try:
        cleaned = runtime.gc()
    except (FcrunError, OSError) as exc:
        log.warning("removing what an earlier fork-server left: %s", exc)
        return
    if cleaned:
        log.info("removed what an earlier fork-server left: %s", ", ".join(cleaned))


def start_primer(*runtimes: Runtime) -> MovePrimer | None:
    """The cgroup move primer every creation of these runtimes wakes (cgroups/primer.py); None
    where their children join their cgroups themselves cheaply (v1: nothing to prime), or when
    it cannot be made (creations are then as fast as the kernel lets a lone move be)."""
    if runtimes[0].cgroups.self_join_is_cheap:
        return None
    try:
        primer = MovePrimer(runtimes[0].cgroups)
    except (FcrunError, OSError) as exc:
        log.warning("no cgroup move primer (a start's cgroup move will wait for the kernel): %s", exc)
        return None
    for runtime in runtimes:
        runtime.move_primer = primer
    return primer


def stop_primer(primer: MovePrimer, runtime: Runtime) -> None:
    try:
        primer.close()
    except (FcrunError, OSError) as exc:
        log.warning("cannot remove the cgroup move primer's group (fcrun gc will): %s", exc)
        return
    if not runtime.states.names():  # the cgroup parent held only the primer's group
        with contextlib.suppress(FcrunError, OSError):
            runtime.cgroups.remove_parent_if_empty()
