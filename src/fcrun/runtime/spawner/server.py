"""The spawner process: a small single-threaded process that forks containers for the library.

Why: the cost of fork and exec grows with the forking process's address space, and a child
also pays a copy-on-write fault for every page it writes. The library process has msgspec, the
cgroup, network and image code and whatever its user loaded; the spawner is a fresh Python
that imports only child.py (with rootfs_setup.py and fork.py) and this package, and it forks
ahead of time: it keeps a few *warm children*, each already pid 1 of a new pid namespace with
new uts, ipc and net namespaces (lo up), PR_SET_PDEATHSIG and a session of its own, waiting
for a plan. Making a network namespace is the dearest part of unsharing; a warm child has done
it while nothing else was running. And it has a single thread, so the Python that runs
between its forks and the children's execs is safe, which it is not in a threaded library
(`fcrun serve`).

It is also the seed of the fork-server (forkserver/): a process with no threads and no event
loop that creates containers on request, and that re-checks every request it receives.

Wire (protocol.py). The library and the spawner share one SOCK_SEQPACKET socketpair
("ctrl"). The spawner hands each warm child's socket to the library, so that a container
start goes from the library straight to a warm child, without waking the spawner first::

    library                                   spawner                  warm child
                    <-- Ready(pid) ----------  started
                    <-- Warm(pid) + sock ----  fork --------------------> prepare, wait on sock
    create():
    Spawn(plan) + [status_w, go_r, stdin, stdout, stderr, init?, userns?] -> check_spawn, go on:
    status_r / go_w  <---->  the child's handshake, as with a direct fork (see child.py)
    (exec done)
    Claim(pid) + report_w --------------------> report_w is now pid's
    report_r   <-- Exited(pid, wait_status) --  its pidfd is readable: waitpid;
                                               then another warm child

The Claim comes only once the container runs: the spawner is not woken while the container
is being set up (on two CPUs it would take one from the child). Should the child exit
before its Claim arrives, the spawner keeps its wait status until it does.

Without a warm child (all taken, or a plan they do not fit: no new network namespace, say),
the library sends the Spawn to the spawner itself, with report_w first among the fds; the
spawner forks a child for it and answers Spawned(pid) on the report pipe. A MakeUserns
comes with a reply socket: the spawner forks the namespace's holder (holder.py) and sends
the namespace's fd back on it.

Lifetime: the library starts the spawner (client.py); the spawner exits when the library
process exits (it polls a pidfd of it, and has PR_SET_PDEATHSIG when the main thread
started it) or closes ctrl. Warm children and attached containers have
PR_SET_PDEATHSIG=SIGKILL towards the spawner, so the chain library -> spawner -> container
holds: when the library dies, so does the spawner, and with it every attached container.
Detached containers survive (they are re-parented, as when the library forks them itself).

Only the parent can reap, so the spawner reaps and reports the wait status; the library
reads it from the report pipe (`Container.wait`).

Imports: `python -c "from fcrun.runtime.spawner.server import main"` starts it, so this
module imports only what the spawner needs (not lifecycle, not the client).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import stat
import sys

import msgspec

from ... import syscalls as sc
from ...errors import KernelError, SpecError
from ..child import PREPARED_UNSHARE, ChildPlan, MountStep, child_main, close_all_but, fail, prepare_child
from ..fork import fork_pid1, fork_plan
from ..holder import new_userns
from . import protocol

WARM_CHILDREN = 2  # kept waiting for a plan
WARM_REFILL_DELAY_MS = 2  # fork a new one after this long without any event (or at a reap)
MAX_UNCLAIMED_EXITS = 1024  # wait statuses kept for Claims still to come


class Server:
    """The spawner's loop: messages on ctrl, children's pidfds, the library's pidfd.

    Resource handling: owns every fd it receives. A report pipe is kept until its child is
    reaped; every other received fd is closed once the child is forked.
    """

    def __init__(self, sock: socket.socket, library_pidfd: int, warm_size: int = WARM_CHILDREN):
        self.sock = sock
        self.sock.setblocking(False)
        self.library_pidfd = library_pidfd
        self.cap_last = sc.cap_last_cap()
        self.warm_size = warm_size
        self.warm: dict[int, int] = {}  # pid -> pidfd of a warm child not claimed yet
        self.children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, report_w), report_w -1: unclaimed
        self.unclaimed_exits: dict[int, int] = {}  # pid -> wait status of a warm child not claimed yet
        self.buffer = bytearray(protocol.MAX_MESSAGE_BYTES)
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self.poller.register(library_pidfd, select.POLLIN)

    def serve(self) -> None:
        """Run until the library exits or closes its end of ctrl."""
        self.sock.send(protocol.encode(protocol.Ready(pid=os.getpid())))
        ctrl = self.sock.fileno()
        while True:
            # Warm children are forked only after a quiet moment: forking right after a
            # hand-off would compete for the CPUs with the container being set up.
            wanted = len(self.warm) < self.warm_size
            events = self.poller.poll(WARM_REFILL_DELAY_MS if wanted else None)
            if not events:
                self._fork_warm()
                continue
            fds = {fd for fd, _ in events}
            if self.library_pidfd in fds:
                return
            if ctrl in fds and not self._handle_ctrl():
                return
            reaped_claimed = False
            for fd in fds - {ctrl}:
                reaped_claimed |= self._reap(fd)
            if reaped_claimed and len(self.warm) < self.warm_size:
                # A container just ended: the library is busy removing it, not starting one.
                self._fork_warm()

    def _handle_ctrl(self) -> bool:
        """Handle every message queued on ctrl. False when the library closed it."""
        while True:
            try:
                data, fds, flags = protocol.recv_with_fds(self.sock, self.buffer)
            except BlockingIOError:
                return True
            if not data and not fds:
                return False
            self._handle_message(data, fds, flags)

    def _handle_message(self, data: bytes, fds: list[int], flags: int) -> None:
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise SpecError("message or its fds truncated", "message")
            message = protocol.decode_to_spawner(data)
            if not fds:
                raise SpecError("no report pipe came with the message", "fds")
            if isinstance(message, protocol.Spawn):
                protocol.check_spawn(message, len(fds) - 1, self.cap_last)
            elif isinstance(message, protocol.MakeUserns):
                protocol.check_make_userns(message, len(fds))
        except (msgspec.DecodeError, SpecError) as exc:
            if fds:
                protocol.write_report(fds[0], protocol.Refused(message=f"spawner refused the request: {exc}", errno=errno.EINVAL))
            for fd in fds:
                os.close(fd)
            return
        match message:
            case protocol.Claim(pid=pid):
                self._claim(pid, fds[0])
            case protocol.Spawn():
                self._spawn(message, fds[0], fds[1:])
            case protocol.MakeUserns(uid_map=uid_map, gid_map=gid_map):
                self._make_userns(uid_map, gid_map, fds[0])

    def _claim(self, pid: int, report_w: int) -> None:
        pidfd = self.warm.pop(pid, -1)
        if pidfd >= 0:
            self.children[pidfd] = (pid, report_w)
            return
        if pid in self.unclaimed_exits:  # it ran and exited before the Claim came
            protocol.write_report(report_w, protocol.Exited(pid=pid, wait_status=self.unclaimed_exits.pop(pid)))
        else:
            protocol.write_report(report_w, protocol.Refused(message=f"no warm child {pid}", errno=errno.ESRCH))
        os.close(report_w)

    def _spawn(self, request: Spawn, report_w: int, fds: list[int]) -> None:
        try:
            pid = fork_plan(protocol.plan_with_fds(request, fds), request.new_pid_ns, close_others=True)
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            protocol.write_report(report_w, protocol.Refused(message=f"fork container: {exc.strerror}", errno=exc.errno or errno.EIO))
            os.close(report_w)
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.children[pidfd] = (pid, report_w)
        self.poller.register(pidfd, select.POLLIN)
        protocol.write_report(report_w, protocol.Spawned(pid=pid))

    def _make_userns(self, uid_map: bytes, gid_map: bytes, reply_fd: int) -> None:
        """Make the namespace here, single-threaded, and send its fd back on the reply socket."""
        reply = socket.socket(fileno=reply_fd)
        try:
            try:
                userns_fd = new_userns(uid_map, gid_map)
            except KernelError as exc:
                reply.send(protocol.encode_report(protocol.Refused(message=exc.operation, obj=exc.obj, errno=exc.errno)))
                return
            try:
                socket.send_fds(reply, [protocol.encode_report(protocol.UsernsMade())], [userns_fd])
            finally:
                os.close(userns_fd)
        except OSError:
            pass  # the library gave up waiting: nothing to undo, the namespace went with its fd
        finally:
            reply.close()

    def _fork_warm(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            child_fd, cap_last = theirs.fileno(), self.cap_last
            pid = fork_pid1(lambda: _warmchild_main(child_fd, cap_last), new_pid_ns=True)
            pidfd = os.pidfd_open(pid)
        except OSError:
            ours.close()
            self.warm_size = len(self.warm)  # cannot make them here: fork for each request instead
            return
        finally:
            theirs.close()
        self.poller.register(pidfd, select.POLLIN)
        self.warm[pid] = pidfd
        self.children[pidfd] = (pid, -1)
        try:
            socket.send_fds(self.sock, [protocol.encode(protocol.Warm(pid=pid))], [ours.fileno()])
        except BlockingIOError:
            pass  # the library does not read ctrl for now: this one is never claimed, it waits
        finally:
            ours.close()

    def _reap(self, pidfd: int) -> bool:
        """Reap a child and report its exit. True when it was claimed (a container ended)."""
        pid, report_w = self.children.pop(pidfd)
        self.warm.pop(pid, None)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)  # readable pidfd: it has exited, this returns at once
        except ChildProcessError:
            status = 0xFF00  # not ours any more (cannot happen): report exit code 255
        if report_w < 0:
            # Its Claim may be on the way (or it died waiting, and no Claim ever comes).
            if len(self.unclaimed_exits) >= MAX_UNCLAIMED_EXITS:
                del self.unclaimed_exits[next(iter(self.unclaimed_exits))]
            self.unclaimed_exits[pid] = status
            return False
        protocol.write_report(report_w, protocol.Exited(pid=pid, wait_status=status))
        os.close(report_w)
        return True

    def close(self) -> None:
        """Close every report pipe; children die with the spawner (PDEATHSIG) or live on detached."""
        for _, report_w in self.children.values():
            if report_w >= 0:
                os.close(report_w)
        self.children.clear()


def _rehearse(cap_last: int) -> None:
    """Decode and check a made-up request, as a real one will be: the pages that touches
    (Python writes reference counts everywhere) are copied from the spawner now, in the
    background, instead of one fault at a time when the real request comes."""
    plan = ChildPlan(
        argv=[b"/bin/true"], env={b"PATH": b"/bin"}, cwd=b"/", rootfs=b"/r", overlay_data=b"lowerdir=/l",
        mounts=[MountStep(destination=b"/proc", source=b"proc", fstype=b"proc", flags=0, data=None)] * 6,
        devices=[(b"null", stat.S_IFCHR | 0o666, 1, 3)] * 6, dev_symlinks=[(b"/proc/self/fd", b"fd")] * 5,
        masked_paths=[b"/proc/kcore"] * 11, readonly_paths=[b"/proc/sys"] * 5, readonly_root=False,
        propagation=sc.MS_SLAVE, unshare_flags=protocol.ALLOWED_UNSHARE, new_netns=True, hostname=b"h",
        cgroup_procs=[], rlimits=[(7, 1024, 1024)], uid=0, gid=0, groups=[], cap_bounding=0,
        cap_effective=0, cap_permitted=0, cap_inheritable=0, cap_ambient=[], cap_last=cap_last,
        no_new_privs=True, pdeathsig=0, init_fd=-1, stdio=None,
    )
    request = protocol.decode_spawn(protocol.encode(protocol.Spawn(plan=plan, init=True)))
    protocol.check_spawn(request, protocol.CHILD_FDS + 1, cap_last)


def _warmchild_main(sock_fd: int, cap_last: int) -> None:
    """A warm child: prepare what needs no plan, then wait for one from the library, check
    it, and become that container. Never returns."""
    try:
        # Preparing is background work: let anything else run first.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        prepare_child(PREPARED_UNSHARE, signal.SIGKILL)
        close_all_but({sock_fd})
        _rehearse(cap_last)
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        sock = socket.socket(fileno=sock_fd)
        data, fds, flags = protocol.recv_with_fds(sock, bytearray(protocol.MAX_MESSAGE_BYTES))
        if not data:
            os._exit(0)  # the library (or the spawner, before handing us on) is gone
        os.close(sock.detach())
        request = protocol.decode_spawn(data)
    except BaseException:  # noqa: BLE001 - never unwind into the spawner's code
        os._exit(127)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise SpecError("message or its fds truncated", "message")
        protocol.check_spawn(request, len(fds), cap_last)
    except BaseException as exc:  # noqa: BLE001 - reported on the status pipe, if there is one
        request.plan.status_w = fds[protocol.FD_STATUS] if fds else -1
        fail(request.plan, protocol.STEP_CHECK, exc)
    child_main(protocol.plan_with_fds(request, fds), prepared=PREPARED_UNSHARE)


def main() -> None:
    """Entry point of the spawner process: argv = [library pid, pdeathsig, warm children]."""
    library_pid, pdeathsig, warm_size = (int(a) for a in sys.argv[1:4])
    if pdeathsig:
        sc.prctl(sc.PR_SET_PDEATHSIG, pdeathsig)
    try:
        library_pidfd = os.pidfd_open(library_pid)
    except ProcessLookupError:
        return
    if os.getppid() != library_pid:
        return  # the library died before we could watch it
    os.chdir("/")  # pin no directory of the library's (it could be on a mount someone unmounts)
    protocol.build_spawner_decoders()
    sock = socket.socket(fileno=protocol.CTRL_FD)
    server = Server(sock, library_pidfd, warm_size)
    try:
        server.serve()
    except ConnectionError:
        pass  # the library went away (EPIPE, ECONNRESET): so do we
    finally:
        server.close()
        sock.close()
        os.close(library_pidfd)
