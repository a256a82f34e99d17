"""One error tree for fcrun, split by who is at fault.

Every error carries the process exit code and the HTTP status it maps to, so the CLI and the
admin API report failures the same way (h11's ``error_status_hint``, httpie's ``ExitStatus``).
Messages name the operation, the object and, for kernel errors, the errno.
"""

from __future__ import annotations

import errno as _errno
import os


class FcrunError(Exception):
    """Base of every error fcrun raises on purpose."""

    exit_code = 1
    http_status = 500


class SpecError(FcrunError, ValueError):
    """The user's input is wrong: a bad option, spec field, name or image reference.

    ``where`` locates the bad value (``$.linux.resources.memory.limit``, ``--memory``);
    ``message`` is the text without that location (to put it in a larger context).
    """

    exit_code = 2
    http_status = 400

    def __init__(self, message: str, where: str | None = None):
        self.message = message
        self.where = where
        super().__init__(f"{message} (at {where})" if where else message)


class NotFound(FcrunError, LookupError):
    """A named object (container, image, app) does not exist."""

    exit_code = 3
    http_status = 404


class AlreadyExists(FcrunError):
    """A name is already taken."""

    exit_code = 4
    http_status = 409


class IncorrectStatus(FcrunError):
    """The operation is not allowed in the object's current lifecycle state."""

    exit_code = 5
    http_status = 409


class NotPermitted(FcrunError, PermissionError):
    """fcrun needs privileges (root) that the caller lacks."""

    exit_code = 77
    http_status = 403


def require_root() -> None:
    """Raises NotPermitted unless this process runs as root. (Here, not in the runtime: `fcrun
    run` checks before it imports the runtime's modules, cli/run_here.py.)"""
    if os.geteuid() != 0:
        raise NotPermitted("fcrun needs root to create namespaces, mounts and cgroups (run it with sudo)")


class KernelError(FcrunError, OSError):
    """A system call or kernel file write failed. Keeps the errno.

    The message reads ``<operation> <object>: [Errno N] <strerror>``.
    """

    exit_code = 125
    http_status = 500

    def __init__(self, operation: str, obj: str, err: int):
        self.operation = operation
        self.obj = obj
        self.errno = err
        self.strerror = os.strerror(err)
        FcrunError.__init__(self, f"{operation} {obj}: [Errno {err}] {self.strerror}")

    def __str__(self) -> str:
        # OSError.__str__ would print only "[Errno N] strerror", dropping what failed where.
        return self.args[0]

    @classmethod
    def from_oserror(cls, operation: str, obj: str, exc: OSError) -> "KernelError":
        return cls(operation, obj, exc.errno or _errno.EIO)


class MissingFeature(KernelError):
    """The kernel or host lacks something fcrun needs (a cgroup controller, overlayfs)."""

    def __init__(self, what: str, hint: str = ""):
        self.operation = "need"
        self.obj = what
        self.errno = _errno.ENOSYS
        self.strerror = hint
        FcrunError.__init__(self, f"missing kernel/host feature: {what}" + (f" ({hint})" if hint else ""))


class ContainerError(FcrunError):
    """The container itself failed: its command could not be executed, it crashed on start."""

    exit_code = 126
    http_status = 502


class CommandNotFound(ContainerError):
    """The container's command does not exist there (a shell's 127, as docker and podman exit)."""

    exit_code = 127


class CommandNotInvokable(ContainerError):
    """The container's command exists but cannot be run: not executable, a directory, or not a
    format the kernel runs (a shell's 126, as docker and podman exit)."""

    exit_code = 126


# `fcrun run` and `fcrun exec` exit with the command's own code, so their own failures take
# the codes docker and podman use, which a command seldom does: 125 whatever fcrun's fault
# (bad option, missing image, a kernel or runtime failure before the command ran), 126 and
# 127 when the command could not be invoked or found. Other subcommands keep exit_code.
RUN_OWN_FAILURE = 125


def command_exit_code(exc: BaseException) -> int:
    """What `fcrun run` / `fcrun exec` exit with when `exc` stopped them before the command ran."""
    if isinstance(exc, (CommandNotFound, CommandNotInvokable)):
        return exc.exit_code
    return RUN_OWN_FAILURE
