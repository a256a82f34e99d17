"""The kernel side of the cgroup code: ``KernelIO``, its only access to the kernel, and the
parsers of the kernel's file formats.

Every kernel access goes through ``KernelIO`` so unit tests can point a driver at a tmp
directory and record (or fail) each write; the root tests run the same code on the real kernel.
"""

from __future__ import annotations

import errno
import os
import re

from ..errors import KernelError, SpecError
from .limits import Pressure


# --- parsers of kernel file formats (pure) ---------------------------------------------------


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``"usage_usec 12\\nnr_periods 3\\n"`` (cpu.stat, cgroup.events) -> {"usage_usec": 12, ...}.

    Raises:
        SpecError: a line is not ``key integer``.
    """
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise SpecError(f"malformed flat-keyed line {line!r}")
        values[parts[0]] = int(parts[1])
    return values


def parse_psi(text: str) -> Pressure:
    """``"some avg10=0.12 avg60=0.00 avg300=0.00 total=1234"`` (+ a "full" line) -> nested dict.

    Raises:
        SpecError: a line is not ``kind key=number ...``.
    """
    pressure: Pressure = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        row = {}
        for item in parts[1:]:
            key, sep, value = item.partition("=")
            try:
                row[key] = float(value)
            except ValueError:
                raise SpecError(f"malformed PSI line {line!r}") from None
            if not sep:
                raise SpecError(f"malformed PSI line {line!r}")
        pressure[parts[0]] = row
    return pressure


def parse_max(text: str) -> int | None:
    """A v2 limit file (``memory.max``, ``pids.max``): "max" -> None, "1024" -> 1024."""
    text = text.strip()
    return None if text == "max" else int(text)


def parse_pids(text: str) -> list[int]:
    """cgroup.procs -> pids (the kernel lists them unsorted, v1 possibly with repeats)."""
    return [int(line) for line in text.split()]


# --- kernel access ---------------------------------------------------------------------------


class KernelIO:
    """The only place the cgroup code touches the kernel. Errors name the op, file and errno.

    Unit tests subclass it to record writes or make one fail; the default is the real thing.
    """

    def read(self, path: str) -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError as exc:
            raise KernelError.from_oserror("read", path, exc) from None

    def write(self, path: str, text: str) -> None:
        # No O_CREAT: a missing control file means a missing controller, not a file to make.
        # O_TRUNC is ignored by cgroupfs and keeps a regular file (unit tests) exact.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise KernelError.from_oserror(f'write "{text}" to', path, exc) from None

    def mkdir(self, path: str) -> None:
        try:
            os.mkdir(path, 0o755)
        except OSError as exc:
            raise KernelError.from_oserror("create cgroup", path, exc) from None

    def rmdir(self, path: str) -> None:
        try:
            os.rmdir(path)
        except OSError as exc:
            raise KernelError.from_oserror("remove cgroup", path, exc) from None

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def getxattr(self, path: str, name: str) -> bytes | None:
        """An extended attribute's value; None when the cgroup has none by that name (or the
        filesystem keeps none: cgroupfs keeps trusted.* and, since Linux 5.7, user.*)."""
        try:
            return os.getxattr(path, name)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
                return None
            raise KernelError.from_oserror(f"read xattr {name} of", path, exc) from None

    def load_device_program(self, code: bytes) -> int:
        """Load a cgroup v2 device program (bpf.py); returns its fd, owned by the caller."""
        from . import bpf  # cgroup v2's only: not imported on a v1 host

        try:
            return bpf.load_cgroup_device(code)
        except OSError as exc:
            log = getattr(exc, "verifier_log", "")
            detail = f" (verifier: {' / '.join(log.splitlines()[-3:])})" if log else ""
            raise KernelError("load cgroup device program", f"of {len(code) // 8} instructions{detail}",
                              exc.errno or errno.EIO) from None

    def attach_device_program(self, cgroup_dir: str, prog_fd: int) -> None:
        """Attach a loaded device program to the cgroup ``cgroup_dir``; it goes with the cgroup."""
        from . import bpf

        try:
            fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                bpf.attach_cgroup_device(fd, prog_fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise KernelError.from_oserror("attach device program to", cgroup_dir, exc) from None

    def close(self, fd: int) -> None:
        os.close(fd)

    def subdirs(self, path: str) -> list[str]:
        """Names of the child cgroups of ``path``; [] when ``path`` is gone."""
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KernelError.from_oserror("list cgroup", path, exc) from None

    def kill(self, pid: int, sig: int) -> bool:
        """Send ``sig`` to ``pid``; False when it is already gone."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True
