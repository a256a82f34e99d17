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
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from typing import Iterator, Literal

import msgspec

from ..errors import AlreadyExists, IncorrectStatus, NotFound, SpecError
from .spec import Process, Root, Spec

Status = Literal["creating", "created", "running", "frozen", "stopped"]

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")

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
    if not NAME_RE.match(name):
        raise SpecError(
            f"invalid container name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
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
    rootfs: Rootfs | None = None
    network: NetworkState | None = None
    detached: bool = False
    log_path: str = ""
    labels: dict[str, str] = {}


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ContainerState)


def proc_start_time(pid: int) -> int:
    """Start time of a process in clock ticks since boot, or 0 if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    state = fields[0]
    if state in (b"Z", b"X"):
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
        """Write the state atomically; a frozen container as running (frozen is the cgroup's)."""
        if state.status == "frozen":
            state = msgspec.structs.replace(state, status="running")
        path = os.path.join(self.dir(state.name), "state.json")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_encoder.encode(state))
        os.replace(tmp, path)

    def load(self, name: str) -> ContainerState:
        validate_name(name, "container name")
        try:
            with open(os.path.join(self.dir(name), "state.json"), "rb") as f:
                state = _decoder.decode(f.read())
        except FileNotFoundError:
            if os.path.isdir(self.dir(name)):
                # Reserved but never saved: a creation that crashed early. `rm -f`/gc clean it.
                return ContainerState(name=name, status="creating", spec=_EMPTY_SPEC)
            raise NotFound(f"no such container: {name!r}") from None
        if state.status == "frozen":  # written by an older fcrun: whether it is, its cgroup says
            state.status = "running"
        return state

    def names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root) if NAME_RE.match(n))
        except FileNotFoundError:
            return []

    def remove(self, name: str) -> None:
        path = self.dir(name)
        for entry in ("state.json", "state.json.tmp", "lock", "output.log"):  # "lock": older fcrun
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, entry))
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(os.path.join(path, "rootfs"))
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(path)

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Serialise changes to one container across fcrun processes. NotFound if it is gone.

        The lock is on the container's directory itself (flock works on any open file): no
        lock file to create and remove for every container.
        """
        validate_name(name, "container name")
        try:
            fd = os.open(self.dir(name), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"no such container: {name!r}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# Placeholder spec for a container whose creation crashed before its state was first saved.
_EMPTY_SPEC = Spec(process=Process(args=["?"]), root=Root(path=""))
