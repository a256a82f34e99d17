"""The spawner's wire: its messages, their framing, and the re-check of every request.

Shared by the spawner process (server.py), its warm children and the library (client.py).
Messages are msgpack-encoded msgspec Structs, one per SOCK_SEQPACKET datagram on ctrl (so
threads of the library may send concurrently without a length prefix), with fds as
SCM_RIGHTS. Reports (on a pipe per child) are length-prefixed, each below PIPE_BUF.
"""

# No `from __future__ import annotations` here: a msgspec Decoder (built at first use) reads these
# Structs' annotations, and string ones are each compiled (~300 compiles across the runtime's
# modules: ~4-6 ms of a `fcrun run` without a fork-server).

# _socket, not socket: `fcrun run` without a fork-server reads reports through this module and
# needs no socket.py (~1 ms of start-up: its enums).
import _socket
import functools
import os
import select
import signal
import stat
import struct

import msgspec

from ... import syscalls as sc
from ...errors import ContainerError, SpecError
from ...seccomp.install import BPF_INSTRUCTION_BYTES, BPF_MAXINSNS, SECCOMP_FLAGS_ALLOWED
from ..child import PREPARED_UNSHARE, ChildPlan

# The fds that come with a Spawn to the child, in this order; the init's (tini) follows when
# Spawn.init is set. A Spawn to the spawner itself has the report pipe before them.
FD_STATUS, FD_GO, FD_STDIN, FD_STDOUT, FD_STDERR = range(5)
CHILD_FDS = 5
MAX_FDS = 1 + CHILD_FDS + 2  # report pipe, the child's five, init, user namespace
MAX_MESSAGE_BYTES = 256 * 1024  # a plan is a few KB; AF_UNIX datagrams are capped by wmem anyway
MAX_MAP_LINES = 340  # the kernel's limit on uid_map/gid_map lines
MAX_MAP_BYTES = MAX_MAP_LINES * 33  # "inside outside count\n", each up to 10 digits
CTRL_FD = 3  # where the spawner finds its end of ctrl
STEP_CHECK = "check request"

ALLOWED_UNSHARE = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET | sc.CLONE_NEWCGROUP
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


class MakeUserns(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """Library -> spawner: make a user namespace with these /proc/PID/uid_map and gid_map
    texts, and send its fd back (UsernsMade) on the socket that comes with this message."""

    uid_map: bytes
    gid_map: bytes


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


class UsernsMade(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """On a MakeUserns reply socket: the namespace's fd comes with this message."""


class Refused(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """On a report pipe: the request was not carried out (bad request, or fork failed).
    For a failed system call, `message` is the operation and `obj` what it acted on."""

    message: str
    errno: int = 0
    obj: str = ""


ToSpawner = Spawn | Claim | MakeUserns
ToLibrary = Ready | Warm
Report = Spawned | Exited | UsernsMade | Refused

_encoder = msgspec.msgpack.Encoder()


@functools.cache
def _decoder(message_type) -> msgspec.msgpack.Decoder:
    """The decoder of a message type, built at its first use: building all four at import was
    ~0.6 ms of every `fcrun run`, whose one container is forked without a spawner. The
    spawner builds its own before it forks warm children (build_spawner_decoders)."""
    return msgspec.msgpack.Decoder(message_type)


def build_spawner_decoders() -> None:
    """Build what the spawner and its warm children decode, so that the children inherit them."""
    _decoder(Spawn)
    _decoder(ToSpawner)


def encode(message: ToSpawner | ToLibrary) -> bytes:
    """One ctrl datagram's bytes."""
    return _encoder.encode(message)


def decode_spawn(data: bytes) -> Spawn:
    """A warm child's request. Raises msgspec.DecodeError (ValidationError) if it is not a Spawn."""
    return _decoder(Spawn).decode(data)


def decode_to_spawner(data: bytes) -> ToSpawner:
    """A request on ctrl. Raises msgspec.DecodeError (ValidationError) for anything else."""
    return _decoder(ToSpawner).decode(data)


def decode_to_library(data: bytes) -> ToLibrary:
    """What the spawner sends on ctrl. Raises msgspec.DecodeError for anything else."""
    return _decoder(ToLibrary).decode(data)


def encode_report(report: Report) -> bytes:
    body = _encoder.encode(report)
    return _LENGTH.pack(len(body)) + body


def decode_report(data: bytes) -> Report:
    """One whole framed report (as a reply datagram carries it).

    Raises:
        ContainerError: it is malformed.
    """
    try:
        (length,) = _LENGTH.unpack_from(data)
        if length != len(data) - _LENGTH.size:
            raise ValueError(f"{len(data) - _LENGTH.size} bytes where the header says {length}")
        return _decoder(Report).decode(data[_LENGTH.size:])
    except (struct.error, ValueError, msgspec.DecodeError) as exc:
        raise ContainerError(f"malformed report from the spawner: {exc}") from None


def read_report(fd: int, timeout_s: float | None = None) -> Report | None:
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
        return _decoder(Report).decode(body)
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


def write_report(fd: int, report: Report) -> None:
    """Write a report; a reader that is gone is no error (the child is reaped all the same)."""
    try:
        os.write(fd, encode_report(report))
    except OSError:
        pass  # nobody is listening (the library dropped the Container)


def recv_with_fds(sock: _socket.socket, buffer: bytearray, nowait: bool = False) -> tuple[bytes, list[int], int]:
    """One datagram, its fds (each close-on-exec from the start) and the recvmsg flags.

    Not socket.recv_fds: it drops its flags argument (CPython 3.11), and a received status
    pipe without close-on-exec would stay open across the exec, so the library would see
    the exec only when the container exits.

    Raises:
        BlockingIOError: nothing there (nowait, or a non-blocking socket).
    """
    flags = _socket.MSG_CMSG_CLOEXEC | (_socket.MSG_DONTWAIT if nowait else 0)
    nbytes, ancdata, flags, _ = sock.recvmsg_into([buffer], _socket.CMSG_SPACE(MAX_FDS * _FD_SIZE), flags)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
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
            or plan.userns_fd != -1 or plan.console_socket != -1):
        raise SpecError("fd fields must be unset: fds travel as SCM_RIGHTS", "$.plan")
    if not plan.argv:
        raise SpecError("argv is empty", "$.plan.argv")
    for where, values in (("argv", plan.argv), ("env", [*plan.env, *plan.env.values()])):
        if any(b"\0" in v for v in values):
            raise SpecError("a NUL byte", f"$.plan.{where}")
    if any(b"=" in key or not key for key in plan.env):
        raise SpecError("an empty name or one with '='", "$.plan.env")
    check_path(plan.rootfs, "$.plan.rootfs")
    check_path(plan.cwd, "$.plan.cwd")
    _check_namespaces_and_ids(plan, cap_last)
    _check_paths_and_devices(request)
    # The kernel checks the program itself when the child loads it; a filter can only take
    # syscalls away from the container, never give it anything.
    if len(plan.seccomp_filter) % BPF_INSTRUCTION_BYTES or len(plan.seccomp_filter) > BPF_MAXINSNS * BPF_INSTRUCTION_BYTES:
        raise SpecError(f"{len(plan.seccomp_filter)} bytes is not a BPF program", "$.plan.seccomp_filter")
    if plan.seccomp_flags & ~SECCOMP_FLAGS_ALLOWED:
        raise SpecError(f"seccomp flags {plan.seccomp_flags:#x}", "$.plan.seccomp_flags")


def _check_namespaces_and_ids(plan: ChildPlan, cap_last: int) -> None:
    if plan.unshare_flags & ~ALLOWED_UNSHARE:
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


def _check_paths_and_devices(request: Spawn) -> None:
    plan = request.plan
    for i, m in enumerate(plan.mounts):
        check_path(m.destination, f"$.plan.mounts[{i}].destination")
    if plan.idmapped_lower and not request.userns:
        raise SpecError("idmapped layers need a user namespace", "$.plan.idmapped_lower")
    for i, (layer, point) in enumerate(plan.idmapped_lower):
        check_path(layer, f"$.plan.idmapped_lower[{i}]")
        check_path(point, f"$.plan.idmapped_lower[{i}]")
    for i, (name, mode, _major, _minor) in enumerate(plan.devices):
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise SpecError(f"device name {name!r}", f"$.plan.devices[{i}]")
        if not stat.S_ISCHR(mode):
            raise SpecError("only character devices are made", f"$.plan.devices[{i}]")
    for i, path in enumerate(plan.cgroup_procs):
        check_path(path, f"$.plan.cgroup_procs[{i}]")
        if not path.startswith(_CGROUP_ROOT) or not path.endswith((b"/cgroup.procs", b"/tasks")):
            raise SpecError(f"{path!r} is not a cgroup.procs or tasks file", f"$.plan.cgroup_procs[{i}]")
    for where, paths in (("masked_paths", plan.masked_paths), ("readonly_paths", plan.readonly_paths)):
        for i, path in enumerate(paths):
            check_path(path, f"$.plan.{where}[{i}]")
    for i, (path, nstype) in enumerate(plan.join_namespaces):  # the OCI spec's namespaces with a path
        check_path(path, f"$.plan.join_namespaces[{i}]")
        if nstype not in (sc.CLONE_NEWNET, sc.CLONE_NEWIPC, sc.CLONE_NEWUTS, sc.CLONE_NEWCGROUP, sc.CLONE_NEWNS):
            raise SpecError(f"namespace type {nstype:#x} cannot be joined", f"$.plan.join_namespaces[{i}]")
    if plan.join_pid_ns:
        check_path(plan.join_pid_ns, "$.plan.join_pid_ns")
        if request.new_pid_ns:
            raise SpecError("a new pid namespace and one to join", "$.plan.join_pid_ns")
    for i, (path, _value) in enumerate(plan.sysctl):
        check_path(path, f"$.plan.sysctl[{i}]")
        if not path.startswith(b"/proc/sys/"):
            raise SpecError(f"{path!r} is not under /proc/sys", f"$.plan.sysctl[{i}]")
    for i, hook in enumerate(plan.hooks):
        check_path(hook.path, f"$.plan.hooks[{i}].path")
    for i, (path, name) in enumerate(plan.cgroup_binds):  # a mount of type cgroup: the container's own groups
        check_path(path, f"$.plan.cgroup_binds[{i}]")
        if not path.startswith(_CGROUP_ROOT) or b"/" in name or name in (b".", b".."):
            raise SpecError(f"{path!r} is not a cgroup dir, or {name!r} a name", f"$.plan.cgroup_binds[{i}]")
    for i, (path, mode, *_numbers) in enumerate(plan.spec_devices):  # the OCI spec's linux.devices
        check_path(path, f"$.plan.spec_devices[{i}]")
        if not path.startswith(b"/dev/") or not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
            raise SpecError("a device node under /dev", f"$.plan.spec_devices[{i}]")


def check_path(path: bytes, where: str) -> None:
    """An absolute path with no NUL and no '..' component. Raises SpecError naming `where`."""
    if not path.startswith(b"/") or b"\0" in path:
        raise SpecError(f"{path!r} is not an absolute path", where)
    if b".." in path.split(b"/"):
        raise SpecError(f"{path!r} has a '..' component", where)


def check_make_userns(request: MakeUserns, nfds: int) -> None:
    """Re-check a MakeUserns: one reply socket, and maps of at most 340 "a b c" lines of ids.
    (The kernel checks the ranges themselves when they are written.)

    Raises:
        SpecError: naming the offending field.
    """
    if nfds != 1:
        raise SpecError(f"{nfds} fds came with the request, 1 expected", "fds")
    for where, text in (("uid_map", request.uid_map), ("gid_map", request.gid_map)):
        lines = text.splitlines()
        if not lines or len(lines) > MAX_MAP_LINES or len(text) > MAX_MAP_BYTES or not text.endswith(b"\n"):
            raise SpecError("1 to 340 lines, each ending in a newline", f"$.{where}")
        if any(len(line.split()) != 3 or not all(f.isdigit() for f in line.split()) for line in lines):
            raise SpecError("a line that is not three ids", f"$.{where}")


def fits_warm_child(request: Spawn) -> bool:
    """Whether a warm child (new pid, uts, ipc and net namespaces made) can run the request."""
    return request.new_pid_ns and request.plan.unshare_flags & PREPARED_UNSHARE == PREPARED_UNSHARE


def plan_with_fds(request: Spawn, fds: list[int]) -> ChildPlan:
    """The request's plan with the child's received fds (FD_STATUS onwards) in its fd fields."""
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
