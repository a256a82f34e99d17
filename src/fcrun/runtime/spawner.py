"""The spawner: a small single-threaded process that forks containers for the library.

Why: the cost of fork and exec grows with the forking process's address space, and a child
also pays a copy-on-write fault for every page it writes. The library process has msgspec,
pyroute2 and the rest of fcrun loaded (about 37 MB resident): its fork takes 0.7 ms and its
child needs 1-2 ms more to reach unshare. The spawner is a fresh Python that imports only
spawn.py (11 MB), and it forks ahead of time: it keeps a few *warm children*, each already
pid 1 of a new pid namespace with new uts, ipc and net namespaces (lo up), PR_SET_PDEATHSIG
and a session of its own, waiting for a plan. Making a network namespace is the dearest
part of unsharing (0.4 ms); a warm child has done it while nothing else was running.

It is also the seed of issue 6's fork-server: a process with no threads and no event loop
that creates containers on request, and that re-checks every request it receives.

Wire. The library and the spawner share one SOCK_SEQPACKET socketpair ("ctrl"). Each
message is one datagram (no length prefix needed; threads of the library may send
concurrently), fds travel as SCM_RIGHTS. The spawner hands each warm child's socket to the
library, so that a container start goes from the library straight to a warm child, without
waking the spawner first::

    library                                   spawner                  warm child
                    <-- Ready(pid) ----------  started
                    <-- Warm(pid) + sock ----  fork --------------------> prepare, wait on sock
    create():
    Spawn(plan) + [status_w, go_r, stdin, stdout, stderr, init?] --------> check_spawn, go on:
    status_r / go_w  <---->  the child's handshake, as with a direct fork (see spawn.py)
    (exec done)
    Claim(pid) + report_w --------------------> report_w is now pid's
    report_r   <-- Exited(pid, wait_status) --  its pidfd is readable: waitpid;
                                               then another warm child

The Claim comes only once the container runs: the spawner is not woken while the container
is being set up (on two CPUs it would take one from the child). Should the child exit
before its Claim arrives, the spawner keeps its wait status until it does.

Without a warm child (all taken, or a plan they do not fit: no new network namespace, say),
the library sends the Spawn to the spawner itself, with report_w first among the fds; the
spawner forks a child for it and answers Spawned(pid) on the report pipe.

Lifetime: the library starts the spawner (`Client.start`); the spawner exits when the
library process exits (it polls a pidfd of it, and has PR_SET_PDEATHSIG when the main thread
started it) or closes ctrl. Warm children and attached containers have
PR_SET_PDEATHSIG=SIGKILL towards the spawner, so the chain library -> spawner -> container
holds: when the library dies, so does the spawner, and with it every attached container.
Detached containers survive (they are re-parented, as when the library forks them itself).

Only the parent can reap, so the spawner reaps and reports the wait status; the library
reads it from the report pipe (`Container.wait`).
"""

from __future__ import annotations

import _thread
import atexit
import errno
import os
import select
import signal
import socket
import stat
import struct
import sys
import time

import msgspec

from .. import syscalls as sc
from ..errors import ContainerError, SpecError
from ..seccomp.install import BPF_INSTRUCTION_BYTES, BPF_MAXINSNS, SECCOMP_FLAGS_ALLOWED
from .child import (
    PREPARED_UNSHARE, ChildPlan, MountStep, _child_main, _close_all_but, _fail, fork_pid1, fork_plan, prepare_child,
)

# The fds that come with a Spawn to the child, in this order; the init's (tini) follows when
# Spawn.init is set. A Spawn to the spawner itself has the report pipe before them.
FD_STATUS, FD_GO, FD_STDIN, FD_STDOUT, FD_STDERR = range(5)
CHILD_FDS = 5
MAX_FDS = 1 + CHILD_FDS + 1
MAX_MESSAGE_BYTES = 256 * 1024  # a plan is a few KB; AF_UNIX datagrams are capped by wmem anyway
CTRL_FD = 3  # where the spawner finds its end of ctrl
READY_TIMEOUT_S = 10.0
REPORT_TIMEOUT_S = 30.0
WARM_CHILDREN = 2  # kept waiting for a plan
WARM_REFILL_DELAY_MS = 2  # fork a new one after this long without any event (or at a reap)
MAX_UNCLAIMED_EXITS = 1024  # wait statuses kept for Claims still to come
STEP_CHECK = "check request"

_ALLOWED_UNSHARE = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET | sc.CLONE_NEWCGROUP
_PROPAGATIONS = (sc.MS_SLAVE, sc.MS_PRIVATE, sc.MS_SHARED)
_MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to the kernel
_CGROUP_ROOT = b"/sys/fs/cgroup/"
_LENGTH = struct.Struct(">I")
_FD_SIZE = struct.calcsize("i")


# ----- messages -------------------------------------------------------------------------------


class Spawn(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """Fork (spawner) or become (warm child) a container child that runs `plan`.

    The plan's fd fields are unset (-1, None, []): the fds travel as SCM_RIGHTS, in the
    order FD_STATUS .. FD_STDERR, then the init's when `init` is set, then the user
    namespace's when `userns` is set.
    """

    plan: ChildPlan
    new_pid_ns: bool = True
    init: bool = False
    userns: bool = False


class Claim(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """Library -> spawner: I gave warm child `pid` a plan; report its exit on the pipe that
    comes with this message."""

    pid: int


class Ready(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """Spawner -> library, first: imports done, requests welcome."""

    pid: int


class Warm(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """Spawner -> library: warm child `pid` waits for a plan on the socket that comes along."""

    pid: int


class Spawned(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """On a report pipe: the child exists (pid in the spawner's, i.e. the host's, pid namespace)."""

    pid: int


class Exited(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """On a report pipe: the child was reaped; `wait_status` as waitpid returns it."""

    pid: int
    wait_status: int


class Refused(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """On a report pipe: the request was not carried out (bad request, or fork failed)."""

    message: str
    errno: int = 0


_encoder = msgspec.msgpack.Encoder()
_spawn_decoder = msgspec.msgpack.Decoder(Spawn)
_to_spawner_decoder = msgspec.msgpack.Decoder(Spawn | Claim)
_to_library_decoder = msgspec.msgpack.Decoder(Ready | Warm)
_report_decoder = msgspec.msgpack.Decoder(Spawned | Exited | Refused)


def encode_report(report: Spawned | Exited | Refused) -> bytes:
    body = _encoder.encode(report)
    return _LENGTH.pack(len(body)) + body


def read_report(fd: int, timeout_s: float | None = None) -> Spawned | Exited | Refused | None:
    """The next message on a report pipe; None at EOF (the spawner closed it, or died).

    Raises:
        ContainerError: nothing arrived within timeout_s, or the message is malformed.
    """
    if timeout_s is not None:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        if not ready:
            raise ContainerError(f"the spawner did not answer within {timeout_s:.0f}s")
    header = _read_exactly(fd, _LENGTH.size)
    if not header:
        return None
    body = _read_exactly(fd, _LENGTH.unpack(header)[0])
    try:
        return _report_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ContainerError(f"malformed report from the spawner: {exc}") from None


def _read_exactly(fd: int, n: int) -> bytes:
    # Reports are written in one write() below PIPE_BUF, so they arrive whole; the loop only
    # guards against a spawner that died mid-way.
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            if data:
                raise ContainerError("the spawner closed a report pipe in the middle of a message")
            return b""
        data += chunk
    return data


def _write_report(fd: int, report: Spawned | Exited | Refused) -> None:
    try:
        os.write(fd, encode_report(report))
    except OSError:
        pass  # nobody is listening (the library dropped the Container): the child is still reaped


def _recv_with_fds(sock: socket.socket, buffer: bytearray, nowait: bool = False) -> tuple[bytes, list[int], int]:
    """One datagram and its fds, each fd close-on-exec from the start.

    Not socket.recv_fds: it drops its flags argument (CPython 3.11), and a received status
    pipe without close-on-exec would stay open across the exec, so the library would see
    the exec only when the container exits.

    Raises:
        BlockingIOError: nothing there (nowait, or a non-blocking socket).
    """
    flags = socket.MSG_CMSG_CLOEXEC | (socket.MSG_DONTWAIT if nowait else 0)
    nbytes, ancdata, flags, _ = sock.recvmsg_into([buffer], socket.CMSG_SPACE(MAX_FDS * _FD_SIZE), flags)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(struct.unpack(f"{usable // _FD_SIZE}i", payload[:usable]))
    return bytes(buffer[:nbytes]), fds, flags


# ----- the re-check of every request ----------------------------------------------------------


def check_spawn(request: Spawn, nfds: int, cap_last: int) -> None:
    """Re-check a request where it is carried out, as bubblewrap's privileged half does.

    msgspec has checked the types; this checks what the types cannot say. `nfds` counts the
    fds for the child (the report pipe of a Spawn to the spawner is not among them).

    Raises:
        SpecError: naming the offending field.
    """
    plan = request.plan
    expected = CHILD_FDS + (1 if request.init else 0) + (1 if request.userns else 0)
    if nfds != expected:
        raise SpecError(f"{nfds} fds came with the request, {expected} expected", "fds")
    if (plan.status_w != -1 or plan.go_r != -1 or plan.init_fd != -1 or plan.stdio is not None or plan.keep_fds
            or plan.userns_fd != -1):
        raise SpecError("fd fields must be unset: fds travel as SCM_RIGHTS", "$.plan")
    if not plan.argv:
        raise SpecError("argv is empty", "$.plan.argv")
    for where, values in (("argv", plan.argv), ("env", [*plan.env, *plan.env.values()])):
        if any(b"\0" in v for v in values):
            raise SpecError("a NUL byte", f"$.plan.{where}")
    if any(b"=" in key or not key for key in plan.env):
        raise SpecError("an empty name or one with '='", "$.plan.env")
    _check_path(plan.rootfs, "$.plan.rootfs")
    _check_path(plan.cwd, "$.plan.cwd")
    if plan.unshare_flags & ~_ALLOWED_UNSHARE:
        raise SpecError(f"unshare flags {plan.unshare_flags:#x} name more than mount/uts/ipc/net/cgroup",
                        "$.plan.unshare_flags")
    if plan.new_netns != bool(plan.unshare_flags & sc.CLONE_NEWNET):
        raise SpecError("new_netns disagrees with the unshare flags", "$.plan.new_netns")
    if plan.propagation not in _PROPAGATIONS:
        raise SpecError(f"propagation {plan.propagation:#x} is none of slave/private/shared", "$.plan.propagation")
    if not 0 <= plan.pdeathsig < signal.NSIG:
        raise SpecError(f"no such signal {plan.pdeathsig}", "$.plan.pdeathsig")
    for where, value in (("uid", plan.uid), ("gid", plan.gid), *(("groups", g) for g in plan.groups)):
        if not 0 <= value <= _MAX_ID:
            raise SpecError(f"id {value} out of range", f"$.plan.{where}")
    if plan.cap_last != cap_last:
        raise SpecError(f"cap_last {plan.cap_last} is not this kernel's {cap_last}", "$.plan.cap_last")
    for where in ("cap_bounding", "cap_effective", "cap_permitted", "cap_inheritable"):
        if not 0 <= getattr(plan, where) < 1 << (cap_last + 1):
            raise SpecError("a capability beyond cap_last", f"$.plan.{where}")
    if any(not 0 <= cap <= cap_last for cap in plan.cap_ambient):
        raise SpecError("a capability beyond cap_last", "$.plan.cap_ambient")
    for i, m in enumerate(plan.mounts):
        _check_path(m.destination, f"$.plan.mounts[{i}].destination")
    if plan.idmapped_lower and not request.userns:
        raise SpecError("idmapped layers need a user namespace", "$.plan.idmapped_lower")
    for i, (layer, point) in enumerate(plan.idmapped_lower):
        _check_path(layer, f"$.plan.idmapped_lower[{i}]")
        _check_path(point, f"$.plan.idmapped_lower[{i}]")
    for i, (name, mode, _major, _minor) in enumerate(plan.devices):
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise SpecError(f"device name {name!r}", f"$.plan.devices[{i}]")
        if not stat.S_ISCHR(mode):
            raise SpecError("only character devices are made", f"$.plan.devices[{i}]")
    for i, path in enumerate(plan.cgroup_procs):
        _check_path(path, f"$.plan.cgroup_procs[{i}]")
        if not path.startswith(_CGROUP_ROOT) or not path.endswith(b"/cgroup.procs"):
            raise SpecError(f"{path!r} is not a cgroup.procs file", f"$.plan.cgroup_procs[{i}]")
    for where, paths in (("masked_paths", plan.masked_paths), ("readonly_paths", plan.readonly_paths)):
        for i, path in enumerate(paths):
            _check_path(path, f"$.plan.{where}[{i}]")
    # The kernel checks the program itself when the child loads it; a filter can only take
    # syscalls away from the container, never give it anything.
    if len(plan.seccomp_filter) % BPF_INSTRUCTION_BYTES or len(plan.seccomp_filter) > BPF_MAXINSNS * BPF_INSTRUCTION_BYTES:
        raise SpecError(f"{len(plan.seccomp_filter)} bytes is not a BPF program", "$.plan.seccomp_filter")
    if plan.seccomp_flags & ~SECCOMP_FLAGS_ALLOWED:
        raise SpecError(f"seccomp flags {plan.seccomp_flags:#x}", "$.plan.seccomp_flags")


def _check_path(path: bytes, where: str) -> None:
    if not path.startswith(b"/") or b"\0" in path:
        raise SpecError(f"{path!r} is not an absolute path", where)
    if b".." in path.split(b"/"):
        raise SpecError(f"{path!r} has a '..' component", where)


def fits_warm_child(request: Spawn) -> bool:
    """Whether a warm child (new pid, uts, ipc and net namespaces made) can run the request."""
    return request.new_pid_ns and request.plan.unshare_flags & PREPARED_UNSHARE == PREPARED_UNSHARE


def _plan_with_fds(request: Spawn, fds: list[int]) -> ChildPlan:
    """The request's plan with the child's fds (FD_STATUS onwards) in its fd fields."""
    plan = request.plan
    plan.status_w, plan.go_r = fds[FD_STATUS], fds[FD_GO]
    plan.stdio = (fds[FD_STDIN], fds[FD_STDOUT], fds[FD_STDERR])
    extra = fds[CHILD_FDS:]
    if request.init:
        plan.init_fd = extra.pop(0)
        plan.keep_fds = [plan.init_fd]
    if request.userns:
        plan.userns_fd = extra.pop(0)
    return plan


# ----- the spawner process --------------------------------------------------------------------


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
        self.buffer = bytearray(MAX_MESSAGE_BYTES)
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self.poller.register(library_pidfd, select.POLLIN)

    def serve(self) -> None:
        """Run until the library exits or closes its end of ctrl."""
        self.sock.send(_encoder.encode(Ready(pid=os.getpid())))
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
                data, fds, flags = _recv_with_fds(self.sock, self.buffer)
            except BlockingIOError:
                return True
            if not data and not fds:
                return False
            self._handle_message(data, fds, flags)

    def _handle_message(self, data: bytes, fds: list[int], flags: int) -> None:
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise SpecError("message or its fds truncated", "message")
            message = _to_spawner_decoder.decode(data)
            if not fds:
                raise SpecError("no report pipe came with the message", "fds")
            if isinstance(message, Spawn):
                check_spawn(message, len(fds) - 1, self.cap_last)
        except (msgspec.DecodeError, SpecError) as exc:
            if fds:
                _write_report(fds[0], Refused(message=f"spawner refused the request: {exc}", errno=errno.EINVAL))
            for fd in fds:
                os.close(fd)
            return
        match message:
            case Claim(pid=pid):
                self._claim(pid, fds[0])
            case Spawn():
                self._spawn(message, fds[0], fds[1:])

    def _claim(self, pid: int, report_w: int) -> None:
        pidfd = self.warm.pop(pid, -1)
        if pidfd >= 0:
            self.children[pidfd] = (pid, report_w)
            return
        if pid in self.unclaimed_exits:  # it ran and exited before the Claim came
            _write_report(report_w, Exited(pid=pid, wait_status=self.unclaimed_exits.pop(pid)))
        else:
            _write_report(report_w, Refused(message=f"no warm child {pid}", errno=errno.ESRCH))
        os.close(report_w)

    def _spawn(self, request: Spawn, report_w: int, fds: list[int]) -> None:
        try:
            pid = fork_plan(_plan_with_fds(request, fds), request.new_pid_ns, close_others=True)
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            _write_report(report_w, Refused(message=f"fork container: {exc.strerror}", errno=exc.errno or errno.EIO))
            os.close(report_w)
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.children[pidfd] = (pid, report_w)
        self.poller.register(pidfd, select.POLLIN)
        _write_report(report_w, Spawned(pid=pid))

    def _fork_warm(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            child_fd, cap_last = theirs.fileno(), self.cap_last
            pid = fork_pid1(lambda: _warm_child_main(child_fd, cap_last), new_pid_ns=True)
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
            socket.send_fds(self.sock, [_encoder.encode(Warm(pid=pid))], [ours.fileno()])
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
        _write_report(report_w, Exited(pid=pid, wait_status=status))
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
        propagation=sc.MS_SLAVE, unshare_flags=_ALLOWED_UNSHARE, new_netns=True, hostname=b"h",
        cgroup_procs=[], rlimits=[(7, 1024, 1024)], uid=0, gid=0, groups=[], cap_bounding=0,
        cap_effective=0, cap_permitted=0, cap_inheritable=0, cap_ambient=[], cap_last=cap_last,
        no_new_privs=True, pdeathsig=0, init_fd=-1, stdio=None,
    )
    request = _spawn_decoder.decode(_encoder.encode(Spawn(plan=plan, init=True)))
    check_spawn(request, CHILD_FDS + 1, cap_last)


def _warm_child_main(sock_fd: int, cap_last: int) -> None:
    """A warm child: prepare what needs no plan, then wait for one from the library, check
    it, and become that container. Never returns."""
    try:
        # Preparing is background work: let anything else run first.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        prepare_child(PREPARED_UNSHARE, signal.SIGKILL)
        _close_all_but({sock_fd})
        _rehearse(cap_last)
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        sock = socket.socket(fileno=sock_fd)
        data, fds, flags = _recv_with_fds(sock, bytearray(MAX_MESSAGE_BYTES))
        if not data:
            os._exit(0)  # the library (or the spawner, before handing us on) is gone
        os.close(sock.detach())
        request = _spawn_decoder.decode(data)
    except BaseException:  # noqa: BLE001 - never unwind into the spawner's code
        os._exit(127)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise SpecError("message or its fds truncated", "message")
        check_spawn(request, len(fds), cap_last)
    except BaseException as exc:  # noqa: BLE001 - reported on the status pipe, if there is one
        request.plan.status_w = fds[FD_STATUS] if fds else -1
        _fail(request.plan, STEP_CHECK, exc)
    _child_main(_plan_with_fds(request, fds), prepared=PREPARED_UNSHARE)


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
    sock = socket.socket(fileno=CTRL_FD)
    server = Server(sock, library_pidfd, warm_size)
    try:
        server.serve()
    except ConnectionError:
        pass  # the library went away (EPIPE, ECONNRESET): so do we
    finally:
        server.close()
        sock.close()
        os.close(library_pidfd)


# ----- the library's side ---------------------------------------------------------------------

_BOOT = "import sys; sys.path[:0] = sys.argv[4:]; from fcrun.runtime.spawner import main; main()"


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
        import threading

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            fd = theirs.fileno()
            if fd == CTRL_FD:  # dup2 onto itself would keep close-on-exec
                fd = os.dup(fd)
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            lib = os.path.dirname(os.path.dirname(os.path.abspath(msgspec.__file__)))
            # PR_SET_PDEATHSIG fires when the *thread* that forked us ends: only the main
            # thread lives as long as the process. (The pidfd watch covers the other cases.)
            pdeathsig = signal.SIGKILL if threading.current_thread() is threading.main_thread() else 0
            argv = [sys.executable, "-I", "-S", "-c", _BOOT, str(os.getpid()), str(int(pdeathsig)),
                    str(warm_children), *dict.fromkeys([here, lib])]
            try:
                pid = os.posix_spawn(
                    sys.executable, argv, {},
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, fd, CTRL_FD),
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

    def _read_ctrl(self) -> None:
        """Take what the spawner sent: Ready, warm children. Call with the lock held.

        Raises:
            SpawnerGone: it exited.
        """
        while True:
            try:
                data, fds, flags = _recv_with_fds(self._sock, self._buffer, nowait=True)
            except BlockingIOError:
                return
            except ConnectionError:
                raise SpawnerGone(f"the spawner (pid {self.pid}) exited") from None
            if not data and not fds:
                raise SpawnerGone(f"the spawner (pid {self.pid}) exited")
            try:
                message = _to_library_decoder.decode(data)
            except msgspec.DecodeError:
                message = None
            match message:
                case Ready(pid=pid) if pid == self.pid:
                    self._ready = True
                case Warm(pid=pid) if len(fds) == 1 and not flags & socket.MSG_CTRUNC:
                    self._warm.append((pid, socket.socket(fileno=fds.pop())))
            for fd in fds:
                os.close(fd)

    def send(self, plan: ChildPlan, new_pid_ns: bool = True) -> tuple[int, int, int, int]:
        """Have the container child forked: a warm child when one fits, else the spawner forks.

        Returns (pid, status_r, go_w, report_r). From a warm child: its pid, and report_r -1:
        claim() it once the handshake is done. From the spawner: pid -1, which comes later on
        report_r (await_spawned), so the caller can do other work meanwhile. The plan's stdio
        (or, when None, this process's 0, 1, 2) and init_fd go along as fds.

        Raises:
            SpawnerGone: the spawner is gone; nothing was made.

        Resource handling: the caller closes the three fds. The child is the spawner's: it
        reaps it and reports the exit on report_r (read_report), so the caller waits for an
        Exited message instead of calling waitpid.
        """
        wire = msgspec.structs.replace(plan, status_w=-1, go_r=-1, init_fd=-1, stdio=None, keep_fds=[], userns_fd=-1)
        request = Spawn(plan=wire, new_pid_ns=new_pid_ns, init=plan.init_fd >= 0, userns=plan.userns_fd >= 0)
        message = _encoder.encode(request)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        child_fds = [status_w, go_r, *(plan.stdio if plan.stdio is not None else (0, 1, 2))]
        if plan.init_fd >= 0:
            child_fds.append(plan.init_fd)
        if plan.userns_fd >= 0:
            child_fds.append(plan.userns_fd)
        try:
            try:
                pid = self._send_to_warm(message, child_fds) if fits_warm_child(request) else -1
                report_r = -1
                if pid < 0:
                    report_r, report_w = os.pipe2(os.O_CLOEXEC)
                    try:
                        self._send_ctrl(message, [report_w, *child_fds])
                    except BaseException:
                        os.close(report_r)
                        raise
                    finally:
                        os.close(report_w)
            finally:
                os.close(status_w)
                os.close(go_r)
        except BaseException:
            os.close(status_r)
            os.close(go_w)
            raise
        return pid, status_r, go_w, report_r

    def _send_to_warm(self, message: bytes, child_fds: list[int]) -> int:
        """Give the request to a warm child: its pid, or -1 if there is none (left)."""
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
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        try:
            self._send_ctrl(_encoder.encode(Claim(pid=pid)), [report_w])
        except BaseException:
            os.close(report_r)
            raise
        finally:
            os.close(report_w)
        return report_r

    def _send_ctrl(self, message: bytes, fds: list[int]) -> None:
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
    match read_report(report_r, timeout_s):
        case Spawned(pid=pid):
            return pid
        case Refused(message=message, errno=err):
            raise ContainerError(f"{message} [Errno {err}]" if err else message)
        case _:
            raise ContainerError("the spawner died while forking a container")


# ----- one spawner per library process ---------------------------------------------------------

MAX_START_FAILURES = 3

_lock = _thread.allocate_lock()
_shared: Client | None = None
_direct_creates = 0
_start_failures = 0


def for_create(mode: bool | None) -> Client | None:
    """The spawner a container creation should use, or None to fork directly.

    mode True: start one now if there is none, and wait until it is ready. None (auto): the
    first container of a process is forked directly (a one-shot `fcrun run` would only pay
    for starting a spawner); the second starts one in the background, used from the moment
    it is ready. False: never.

    Raises:
        SpawnerGone: mode True and the spawner could not be started.
    """
    global _shared, _direct_creates
    if mode is False:
        return None
    with _lock:
        client = _shared
        if client is None:
            if mode is None and (_direct_creates < 1 or _start_failures >= MAX_START_FAILURES):
                _direct_creates += 1
                return None
            client = _shared = Client.start()
    try:
        if client.ready(READY_TIMEOUT_S if mode else 0.0):
            return client
        if mode:
            raise SpawnerGone(f"the spawner (pid {client.pid}) did not get ready within {READY_TIMEOUT_S:.0f}s")
    except SpawnerGone:
        discard(client, failed_start=True)
        if mode:
            raise
    return None


def discard(client: Client, failed_start: bool = False) -> None:
    """Forget a spawner that is gone (or useless) and collect its process."""
    global _shared, _start_failures
    with _lock:
        if _shared is client:
            _shared = None
            if failed_start:
                _start_failures += 1
    client.close()


def shutdown() -> None:
    """End this process's spawner, if any (attached containers it forked die with it)."""
    global _shared
    with _lock:
        client, _shared = _shared, None
    if client is not None:
        client.close()


def _after_fork_in_child() -> None:
    global _shared, _lock
    _lock = _thread.allocate_lock()
    if _shared is not None:
        _shared.forget()
        _shared = None


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(shutdown)
