"""User namespaces for containers: host id ranges, and the namespace a container joins.

A container with a "user" namespace runs as root and www-data *inside* while, on the host, its
processes and the files it writes belong to ids no host user has: `[base, base + 65536)`, a
range of its own. When the spec gives no mappings, fcrun picks the range itself from a lease
table (like /etc/subuid, but allocated per container and recorded as one file per range under
the run root), so no two live containers ever share host ids: a tenant's root cannot signal,
ptrace or read another tenant's processes or files, and is nobody to the host.

How a container gets into its namespace (creation.py, holder.py, child.py):

    parent (host root)                       container child (host root until the end)
    holder.new_userns(maps): fork a holder
      that unshares CLONE_NEWUSER; write its
      uid_map/gid_map; keep /proc/H/ns/user
      open; the holder exits (a threaded
      library has its spawner do this)
    fork child with the fd --------------->  mounts, with image layers presented through
                                             idmapped mounts of that namespace (files owned
                                             by host root show as the container's root)
                                             pivot_root
                                             setns(userns_fd): capabilities now only there
                                             setresuid(0) = host `base`, exec

The other namespaces stay owned by the host's user namespace, so container root can never
mount, change its network or hostname (it holds no capability over them); the one thing that
needs one, binding ports below 1024, is opened by `net.ipv4.ip_unprivileged_port_start=0` in
the container's own network namespace (child.prepare_child), as Docker does.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

from .. import syscalls as sc
from ..atomicfile import TEMP_SUFFIX, create_temp, fsync_dir
from ..errors import ContainerError, SpecError
from .process import process_is_threaded
from .spec import IDMapping

RANGE_SIZE = 65536  # ids 0..65535 inside, as a distribution expects (nobody = 65534)
# Host ids handed out: [FIRST_HOST_ID, FIRST_HOST_ID + RANGES * RANGE_SIZE). Above every
# /etc/subuid range tools allocate by default (100000 + n * 65536) and below 2^32 - 1 (-1).
FIRST_HOST_ID = 1 << 31
RANGES = ((1 << 32) - FIRST_HOST_ID) // RANGE_SIZE - 1  # 32767
_LEASE_TRIES = 64
_TEMP_PREFIX = ".lease."  # never all digits: owners() skips it


def _candidates() -> Iterator[int]:
    """Range indexes to try, made as they are tried (a list of all 32767 cost 0.3 ms a start).
    Random probing: O(1) while the table is far from full (32767 ranges, a host runs a few
    thousand containers); then a full scan finds the last free ones."""
    for _ in range(_LEASE_TRIES):
        # os.urandom, not the random module (its import is ~1 ms of a `fcrun run`); the modulo's
        # bias (2^32 is no multiple of RANGES) is below 1e-5 and only orders the probes.
        yield int.from_bytes(os.urandom(4), "little") % RANGES
    yield from range(RANGES)


class IdRanges:
    """Leases of host id ranges, one file per range (`<dir>/<index>` holding the container's
    name), taken with O_EXCL so concurrent fcrun processes never hand out one range twice.

    The lease lives under the run root (tmpfs): after a reboot no container runs, and the files
    containers wrote with these ids are gone with their writable layers.
    """

    def __init__(self, directory: str):
        self.directory = directory

    def allocate(self, owner: str) -> int:
        """Lease a free range for container `owner`; returns its first host id.

        Raises:
            ContainerError: no free range was found.
        """
        os.makedirs(self.directory, 0o700, exist_ok=True)
        for index in _candidates():
            if self._take(index, owner):
                return FIRST_HOST_ID + index * RANGE_SIZE
        raise ContainerError(f"no free user namespace id range left in {self.directory} ({RANGES} in use)")

    def _take(self, index: int, owner: str) -> bool:
        """Lease range `index` for `owner`, or False when someone holds it.

        The lease appears whole or not at all: the owner is written and fsynced to a temporary
        first, then link(2)ed to the range's name (which, like O_EXCL, fails when it exists).
        Creating the name first and writing the owner after would leave an ownerless lease, never
        released by gc, to a crash in between.
        """
        final = os.path.join(self.directory, str(index))
        if os.path.exists(final):
            return False
        tmp = self._temporary(owner)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        fsync_dir(self.directory, what="user namespace id range lease")
        return True

    def _temporary(self, owner: str) -> str:
        fd, tmp = create_temp(self.directory, _TEMP_PREFIX)
        try:
            os.write(fd, owner.encode())
            os.fsync(fd)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return tmp

    def remove_stale_temps(self, min_age_s: float = 60.0) -> list[str]:
        """Delete temporaries older than `min_age_s` (their writer was killed before unlinking
        them; a live writer unlinks its own within microseconds). Returns their paths."""
        removed = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(self.directory):
                path = os.path.join(self.directory, entry)
                if entry.startswith(_TEMP_PREFIX) and entry.endswith(TEMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if time.time() - os.lstat(path).st_mtime >= min_age_s:
                            os.unlink(path)
                            removed.append(path)
        return removed

    def release(self, base: int, owner: str) -> None:
        """Give the range starting at `base` back, if `owner` holds it."""
        path = os.path.join(self.directory, str((base - FIRST_HOST_ID) // RANGE_SIZE))
        with contextlib.suppress(FileNotFoundError):
            with open(path, "rb") as f:
                if f.read().decode(errors="replace") != owner:
                    return
            os.unlink(path)

    def owners(self) -> dict[int, str]:
        """base -> container name of every lease."""
        out = {}
        if not os.path.isdir(self.directory):
            return out
        for entry in os.listdir(self.directory):
            if entry.isdigit():
                with contextlib.suppress(FileNotFoundError), open(os.path.join(self.directory, entry), "rb") as f:
                    out[FIRST_HOST_ID + int(entry) * RANGE_SIZE] = f.read().decode(errors="replace")
        return out


def is_fcrun_range(mappings: list[IDMapping]) -> bool:
    """Whether the mappings are one range fcrun leased (so it releases it on delete)."""
    return (len(mappings) == 1 and mappings[0].container_id == 0 and mappings[0].size == RANGE_SIZE
            and mappings[0].host_id >= FIRST_HOST_ID and (mappings[0].host_id - FIRST_HOST_ID) % RANGE_SIZE == 0)


def range_mappings(base: int) -> list[IDMapping]:
    return [IDMapping(container_id=0, host_id=base, size=RANGE_SIZE)]


def root_host_ids(spec_linux) -> tuple[int, int]:
    """The host uid and gid that the container's root (0) maps to; (0, 0) without a user ns."""
    uid = next((m.host_id for m in spec_linux.uid_mappings if m.container_id == 0), 0)
    gid = next((m.host_id for m in spec_linux.gid_mappings if m.container_id == 0), 0)
    return uid, gid


def check_mappings(mappings: list[IDMapping], where: str) -> None:
    """The kernel's rules, checked first so the error names the spec field."""
    if not mappings:
        return
    if len(mappings) > 340:
        raise SpecError("at most 340 id mappings", where)
    for i, m in enumerate(mappings):
        if m.size < 1 or m.container_id < 0 or m.host_id < 0 or m.container_id + m.size > 1 << 32 or m.host_id + m.size > 1 << 32:
            raise SpecError(f"id mapping {m.container_id}:{m.host_id}:{m.size} is out of range", f"{where}[{i}]")
    spans = sorted((m.container_id, m.container_id + m.size) for m in mappings)
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise SpecError("id mappings overlap inside the container", where)


def map_text(mappings: list[IDMapping]) -> bytes:
    """The mappings as /proc/PID/uid_map (or gid_map) takes them: "inside outside count" lines."""
    return "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in mappings).encode()


def parse_map_text(text: bytes) -> list[IDMapping]:
    """/proc/PID/uid_map (or gid_map) text -> mappings; the inverse of map_text."""
    mappings = []
    for line in text.splitlines():
        inside, outside, count = (int(f) for f in line.split())
        mappings.append(IDMapping(container_id=inside, host_id=outside, size=count))
    return mappings


# The helper a threaded caller runs instead of forking Python (setns into a user namespace wants
# a single-threaded caller; a fresh interpreter with -S is one). ctypes: os.setns is 3.12+.
_READ_MAPS = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.setns(int(sys.argv[1]), 0x10000000) != 0:\n"
    "    sys.exit('setns: ' + os.strerror(ctypes.get_errno()))\n"
    "for name in ('uid_map', 'gid_map'):\n"
    "    with open('/proc/self/' + name, 'rb') as f:\n"
    "        sys.stdout.buffer.write(f.read() + b'\\0')\n"
)


def namespace_mappings(userns_fd: int) -> tuple[list[IDMapping], list[IDMapping]]:
    """The (uid, gid) mappings of the user namespace `userns_fd`, to our own namespace's ids (a
    spec's user namespace joined by path keeps them: fcrun records them as runc does).

    A process that joined it reads its own /proc/self/{uid,gid}_map: read from inside, they map
    to the parent namespace's ids. That process is a fork of this one when it is single-threaded
    (about 1 ms), else a fresh interpreter (tens of ms, but safe beside other threads).

    Raises:
        ContainerError: the namespace could not be joined or its maps read (the reason said).
    """
    data = _maps_by_helper(userns_fd) if process_is_threaded() else _maps_by_fork(userns_fd)
    if data.startswith(b"E") or data.count(b"\0") != 2:
        raise ContainerError(f"read the id maps of the user namespace to join: {data[1:].decode(errors='replace')}")
    uid_map, gid_map, _ = data.split(b"\0")
    return parse_map_text(uid_map), parse_map_text(gid_map)


def _maps_by_fork(userns_fd: int) -> bytes:
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # single-threaded here: setns into a user namespace requires it
        code = 0
        try:
            os.close(r)
            sc.setns(userns_fd, sc.CLONE_NEWUSER)
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/self/{name}", "rb") as f:
                    os.write(w, f.read() + b"\0")
        except BaseException as exc:  # noqa: BLE001 - a forked child reports, then _exits
            os.write(w, f"E{exc}".encode(errors="replace"))
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks)


def _maps_by_helper(userns_fd: int) -> bytes:
    import subprocess  # noqa: PLC0415 - rare, and fcrun-oci create keeps its imports few

    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _READ_MAPS, str(userns_fd)],
                              pass_fds=(userns_fd,), capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"E{exc}".encode()
    if done.returncode != 0:
        return b"E" + (done.stderr.strip() or f"exit {done.returncode}".encode())
    return done.stdout


__all__ = ["IdRanges", "RANGE_SIZE", "FIRST_HOST_ID", "map_text", "range_mappings", "root_host_ids",
           "is_fcrun_range", "check_mappings", "parse_map_text", "namespace_mappings"]
