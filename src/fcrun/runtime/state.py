"""Persisted container state and the lifecycle table.

Each container has a directory under the run root holding `state.json` (a ContainerState,
written atomically); the directory itself is what `locked` locks. Any fcrun process can
list, kill and remove a container another one started, because everything needed to find
its processes, cgroups, network lease and rootfs is in that file.

The lifecycle is checked here and only here (youki's `can_start()`, h11's `_state.py`):

    creating -> created -> running <-> frozen
        \\          \\          \\          \\
         `----------`----------`----------`--> stopped -> (deleted)

"frozen" is never written to state.json: a frozen container is a running one whose cgroup
is frozen, and that is read from the cgroup (as runc reads "paused" from the freezer), so a
thaw by any route (Runtime.thaw, or a write to the cgroup itself) leaves the state true.
`StateStore.save` writes a frozen container as running; `load` reads the "frozen" of an
older fcrun's file as running.

Every save is atomic (atomicfile.write_atomic) and made under the container's lock, and none
is fsync'd: the file describes processes, mounts and cgroups that a power loss ends anyway, and
whatever it names that outlives them (the upper dir, id range, lease, logs) gc finds by the
container's name, as it does for a container whose file is lost. A save a power loss cuts
short leaves the file before it, or one that is empty or torn: quarantined and reclaimed by
name, as below (tests/root/test_corrupt_state_root.py). Two fsyncs (file and directory) were
1.7-3.5 ms of every creation on this VM's ext4 run root (bench/README.md, "Issue 17: the child
joins its cgroup itself"); on a tmpfs /run they cost nothing and bought nothing.

A state file that cannot be read back (garbage, empty, torn, wrong types, another
container's name) is reported by path and reason, moved to ``<containers>/.quarantine/``
for the operator, and the container is then what a creation that crashed before its first
save leaves: "creating", with nothing known but its name. `fcrun gc` and `rm -f` remove that
by name (its cgroup, upper dir, lease, slot), so one bad file stops neither them, `fcrun ps`,
the fork-server nor serve.
"""

# No `from __future__ import annotations` here: a msgspec Decoder built at import reads these
# Structs' annotations, and string ones are each compiled (~300 compiles across the runtime's
# modules: ~4-6 ms of a `fcrun run` without a fork-server).

import contextlib
import fcntl
import os
import re
import _thread  # get_ident: not threading (~1 ms of fcrun run to import)
from typing import Iterator, Literal

import msgspec

from ..atomicfile import quarantine, remove_stale_temps, write_atomic
from ..errors import AlreadyExists, FcrunError, IncorrectStatus, NotFound, SpecError
from ..lazy import Logger
from .spec import Process, Root, Spec

log = Logger(__name__)

STATE_FILE = "state.json"
QUARANTINE_DIR = ".quarantine"  # under the containers dir; NAME_RE never matches it

Status = Literal["creating", "created", "running", "frozen", "stopped"]

# Up to 128 characters: engines name containers by 64 hex digits (podman, Docker), containerd
# by up to 76; a name is one path component (state dir, cgroup) and never an interface name.
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")

ALL_STATUSES = frozenset({"creating", "created", "running", "frozen", "stopped"})
LIVE = frozenset({"created", "running", "frozen"})  # a process that may be signalled, changed

# operation -> statuses it is allowed in
ALLOWED: dict[str, frozenset[str]] = {
    "start": frozenset({"created"}),
    "kill": LIVE,
    "freeze": frozenset({"running"}),
    "thaw": frozenset({"frozen"}),
    "update": LIVE,
    "fill_slot": LIVE,
    "hand_over": LIVE,
    "label": ALL_STATUSES,
    "exec": frozenset({"running"}),
    "delete": frozenset({"stopped", "creating"}),  # "creating": the leftover of a crashed creation
    "force_delete": ALL_STATUSES,  # `rm -f`: a live container is killed first
}
# What the user is told to do instead, where there is something to do.
_HINTS = {"delete": "stop it first, or use rm -f"}


def is_allowed(operation: str, status: str) -> bool:
    """Whether `operation` is allowed for a container in `status` (see ALLOWED)."""
    return status in ALLOWED[operation]


def check_allowed(operation: str, name: str, status: str) -> None:
    """Raises IncorrectStatus unless `operation` is allowed for a container in `status`."""
    if status not in ALLOWED[operation]:
        allowed = "/".join(sorted(ALLOWED[operation]))
        hint = f"; {_HINTS[operation]}" if operation in _HINTS else ""
        raise IncorrectStatus(f"cannot {operation.replace('_', ' ')} container {name!r}: it is {status} (must be {allowed}{hint})")


def validate_name(name: str, where: str = "--name") -> str:
    if not NAME_RE.fullmatch(name):
        raise SpecError(
            f"invalid container name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            where,
        )
    return name


class Rootfs(msgspec.Struct, kw_only=True):
    mountpoint: str
    lower: list[str] = []  # overlay lower dirs, top first; empty: mountpoint is a plain directory
    upper: str = ""
    work: str = ""
    tmpfs_bytes: int = 0  # > 0: upper and work are on a tmpfs of this size in the container's mount ns


class NetworkState(msgspec.Struct, kw_only=True):
    mode: str
    ip: str = ""
    prefixlen: int = 0
    gateway: str = ""
    host_ifname: str = ""
    bridge: str = ""


class ContainerState(msgspec.Struct, kw_only=True):
    name: str
    status: Status
    spec: Spec
    image: str = ""
    pid: int = 0
    pid_start_time: int = 0  # /proc/PID/stat field 22: tells our pid from a reused one
    created_at: float = 0.0
    started_at: float = 0.0
    exit_code: int | None = None
    cgroup_version: int = 0
    cgroup_paths: dict[str, str] = {}
    # The cgroup dirs the creation made when the spec placed its group (linux.cgroupsPath):
    # the only ones delete removes. None: the default group, every dir of cgroup_paths is ours.
    cgroup_created: list[str] | None = None
    rootfs: Rootfs | None = None
    network: NetworkState | None = None
    detached: bool = False
    log_path: str = ""
    labels: dict[str, str] = {}


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ContainerState)


class CorruptState(FcrunError):
    """A container's state file cannot be read back; the message names the file and why."""


def decode_state(path: str, name: str, data: bytes) -> ContainerState:
    """The ContainerState in `data`, read from `path`, the file of container `name`.

    Raises:
        CorruptState: not JSON, torn, a field of the wrong type, or another container's state.
    """
    try:
        state = _decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included: wrong types, missing fields
        what = "empty file" if not data else str(exc)
        raise CorruptState(f"container state {path} is corrupt: {what}") from None
    if state.name != name:
        # Acting on it would kill, unmount and release another container's things.
        raise CorruptState(f"container state {path} is corrupt: it names container {state.name!r}")
    if state.pid < 0:
        raise CorruptState(f"container state {path} is corrupt: pid {state.pid}")
    return state


# The containers each thread holds the lock of, so that a thread that holds one can take it
# again (flock excludes every other open file description, this process's own included):
# (pid, thread, container dir) -> depth. The pid: a child forked while its parent held a lock
# does not hold it. An entry goes when its lock is released, so a later thread with a reused
# ident finds none. (A dict, not a threading.local: importing threading is ~1 ms of fcrun run.)
_held: dict[tuple[int, int, str], int] = {}


def proc_start_time(pid: int, *, exited_too: bool = False) -> int:
    """Start time of a process in clock ticks since boot, or 0 if it does not exist or has
    exited (a zombie); `exited_too`: a zombie's too (which process it is, not whether it runs)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    state = fields[0]
    if state in (b"Z", b"X") and not exited_too:
        return 0  # a zombie has exited: it is not running
    return int(fields[19])


def last_output_line(state: ContainerState, tail_bytes: int = 300) -> str:
    """The last line a detached container wrote to its log ("" if none): why it exited, often."""
    with contextlib.suppress(OSError):
        with open(state.log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - tail_bytes))
            lines = f.read().decode(errors="replace").strip().splitlines()
        if lines:
            return lines[-1]
    return ""


def pid_alive(state: ContainerState) -> bool:
    return state.pid > 0 and proc_start_time(state.pid) == state.pid_start_time


class StateStore:
    """The directory of container states under the run root."""

    def __init__(self, containers_dir: str):
        self.root = containers_dir

    def dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def reserve(self, name: str) -> str:
        """Create the container's directory; the name is taken atomically (mkdir)."""
        validate_name(name)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        path = self.dir(name)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            # A container being removed holds its lock until it is gone, and may already have
            # told its owner it ended (the fork-server answers `fcrun run` before it removes
            # the container): wait for the removal, then the name may be free.
            with contextlib.suppress(NotFound):
                with self.locked(name):
                    pass
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                raise AlreadyExists(f"container name {name!r} is already in use (see `fcrun ps`; `fcrun rm -f {name}` removes it)") from None
        return path

    def save(self, state: ContainerState) -> None:
        """Write the state atomically, not fsync'd (the module's docstring says why); a frozen
        container as running (frozen is the cgroup's). The caller holds the container's lock
        (`locked`).

        Raises:
            KernelError: it could not be written (a full disk, say); the file on disk is then
                the one before, whole.
        """
        if state.status == "frozen":
            state = msgspec.structs.replace(state, status="running")
        path = os.path.join(self.dir(state.name), STATE_FILE)
        write_atomic(path, _encoder.encode(state), what="container state", durable=False)

    def load(self, name: str) -> ContainerState:
        """The container's saved state.

        A file that cannot be read back is reported (logged, naming it and what is wrong),
        quarantined once its lock can be had, and read as a creation's leftover ("creating").

        Raises:
            NotFound: no such container.
        """
        validate_name(name, "container name")
        path = os.path.join(self.dir(name), STATE_FILE)
        try:
            with open(path, "rb") as f:
                data = f.read()
                identity = _identity(os.fstat(f.fileno()))
        except FileNotFoundError:
            if os.path.isdir(self.dir(name)):
                # Reserved but never saved: a creation that crashed early. `rm -f`/gc clean it.
                return ContainerState(name=name, status="creating", spec=_EMPTY_SPEC)
            raise NotFound(f"no such container: {name!r}") from None
        try:
            state = decode_state(path, name, data)
        except CorruptState as exc:
            self._quarantine(name, path, identity, exc)
            return ContainerState(name=name, status="creating", spec=_EMPTY_SPEC)
        if state.status == "frozen":  # written by an older fcrun: whether it is, its cgroup says
            state.status = "running"
        return state

    def _quarantine(self, name: str, path: str, identity: tuple[int, int, int], problem: CorruptState) -> None:
        """Move a corrupt state file aside, if it is still the file that was read and its
        lock can be had at once (whoever holds it will find the file and do it)."""
        with self.try_locked(name) as held:
            if not held:
                log.warning("%s; left for whoever holds the lock of container %r", problem, name)
                return
            try:
                if _identity(os.stat(path)) != identity:
                    return  # replaced meanwhile by a good save
                moved = quarantine(path, into=os.path.join(self.root, QUARANTINE_DIR), prefix=f"{name}.")
            except FileNotFoundError:
                return  # moved or removed meanwhile
            except OSError as exc:
                log.warning("%s; it could not be moved aside: %s", problem, exc)
                return
        log.warning("%s; moved to %s, and container %r is treated as lost (gc or rm -f removes"
                    " what is left of it)", problem, moved, name)

    def record_stopped(self, state: ContainerState) -> bool:
        """Save that `state`'s pid 1 has exited, if the container's lock can be had at once
        (its holder is acting on it and will find out itself) and the file still describes
        that process. Returns whether it was saved.

        Raises:
            KernelError: the file could not be written.
        """
        with self.try_locked(state.name) as held:
            if not held:
                return False
            try:
                current = self.load(state.name)
            except NotFound:
                return False
            if (current.status not in LIVE or current.pid != state.pid
                    or current.pid_start_time != state.pid_start_time):
                return False
            current.status = "stopped"
            self.save(current)
            return True

    def leases_on(self, bridge: str) -> dict[str, str]:
        """container -> IP of every container whose state says it has an address on `bridge`:
        what the IPAM rebuilds a corrupt leases file from. Reads without locks, skips what
        cannot be read (this runs under the IPAM lock, which creations take under theirs)."""
        leases = {}
        for name in self.names():
            path = os.path.join(self.dir(name), STATE_FILE)
            try:
                with open(path, "rb") as f:
                    state = decode_state(path, name, f.read())
            except (OSError, CorruptState):
                continue
            net = state.network
            if net is not None and net.mode == "bridge" and net.bridge == bridge and net.ip:
                leases[name] = net.ip
        return leases

    def names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root) if NAME_RE.fullmatch(n))
        except FileNotFoundError:
            return []

    def remove_stale_temps(self, name: str) -> list[str]:
        """Delete what saves killed mid-write left in the container's directory; returns the
        paths. The caller holds the container's lock (so no save is in progress)."""
        return remove_stale_temps(self.dir(name), STATE_FILE)

    def remove(self, name: str) -> None:
        path = self.dir(name)
        self.remove_stale_temps(name)
        # ".tmp", "lock": older fcrun; cgroup-placed.json: spec_resources.PLACED_FILE
        for entry in (STATE_FILE, "state.json.tmp", "lock", "output.log", "cgroup-placed.json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, entry))
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(os.path.join(path, "rootfs"))
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(path)

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Serialise changes to one container across fcrun processes. NotFound if it is gone,
        or was removed while this waited for its lock (a new container of that name is another).

        The lock is on the container's directory itself (flock works on any open file): no
        lock file to create and remove for every container. A thread that holds it may take
        it again (Runtime.refresh saves under it, inside and outside locked operations).
        """
        with self._lock(name, blocking=True) as held:
            if not held:
                raise NotFound(f"no such container: {name!r}")
            yield

    @contextlib.contextmanager
    def try_locked(self, name: str) -> Iterator[bool]:
        """The container's lock if it can be had at once: yields True holding it, or False
        when another process or thread holds it, or the container is gone."""
        with self._lock(name, blocking=False) as held:
            yield held

    @contextlib.contextmanager
    def _lock(self, name: str, *, blocking: bool) -> Iterator[bool]:
        validate_name(name, "container name")
        path = self.dir(name)
        key = (os.getpid(), _thread.get_ident(), path)
        held = _held
        if held.get(key):  # this thread's already
            held[key] += 1
            try:
                yield os.path.isdir(path)
            finally:
                held[key] -= 1
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            if not _still_named(fd, path):
                # Removed while we waited for its lock (its remover held it), and maybe made
                # again by a new creation of that name, whose lock this is not: the container
                # we came for is gone.
                yield False
                return
            held[key] = 1
            try:
                yield True
            finally:
                del held[key]
        finally:
            os.close(fd)


def _still_named(fd: int, path: str) -> bool:
    """Whether `path` still names the directory open as `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


# Placeholder spec for a container whose creation crashed before its state was first saved.
_EMPTY_SPEC = Spec(process=Process(args=["?"]), root=Root(path=""))
