"""The parent's side of the container child: forking it (as pid 1 of a new pid namespace or
not) and reading its handshake messages (the protocol is drawn in child.py).
"""

from __future__ import annotations

import errno as _errno
import os
import select
import signal
from collections.abc import Callable

from .. import syscalls as sc
from ..errors import CommandNotFound, CommandNotInvokable, ContainerError, KernelError
from .child import STEP_EXEC, STEP_HOOK, ChildPlan, child_main, close_all_but

# execve's errnos that say the command itself cannot be run (`fcrun run` exits 126 for them).
NOT_INVOKABLE_ERRNOS = frozenset({_errno.EACCES, _errno.ENOEXEC, _errno.EISDIR})


class ChildFailure(Exception):
    def __init__(self, step: str, err: int, message: str):
        super().__init__(step, err, message)
        self.step, self.err, self.message = step, err, message


def read_status(fd: int, timeout_s: float) -> bytes:
    """Read the next handshake message: one byte, b"" at EOF (the exec happened).

    Raises ChildFailure when the child reported an error ("E..." up to EOF).
    """
    ready, _, _ = select.select([fd], [], [], timeout_s)
    if not ready:
        raise ContainerError(f"container setup did not answer within {timeout_s:.0f}s")
    data = os.read(fd, 1)
    if data == b"E":
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        step, err, message = b"".join(chunks).decode(errors="replace").split("\0", 2)
        raise ChildFailure(step, int(err), message)
    return data


def failure_to_error(failure: ChildFailure, name: str) -> Exception:
    """Turn a child's report into the error the user sees."""
    if failure.step == STEP_EXEC and failure.err == _errno.ENOENT:
        return CommandNotFound(f"container {name}: {failure.message}: executable not found in the container")
    if failure.step == STEP_EXEC and failure.err in NOT_INVOKABLE_ERRNOS:
        return CommandNotInvokable(
            f"container {name}: {failure.message}: cannot execute: [Errno {failure.err}] {os.strerror(failure.err)}")
    if failure.step == STEP_HOOK:
        return ContainerError(f"container {name}: {failure.message}")
    return KernelError(f"container {name}: {failure.step}", failure.message, failure.err)


def fork_child(plan: ChildPlan, new_pid_ns: bool) -> tuple[int, int, int]:
    """Fork the container child from this process. Returns (pid, status_r, go_w).

    Resource handling: the caller must close status_r and go_w, and reap pid.
    """
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    plan.status_w, plan.go_r = status_w, go_r
    try:
        # Our copies of the parent's ends must go in the child, or a dead parent would never
        # read EOF. Every other fd goes too: among them the lock on this very container
        # (StateStore.locked), whose flock a created child would otherwise hold until its
        # exec, so that the creator's next step on it (fill_slot before start) waited forever.
        pid = fork_plan(plan, new_pid_ns, close_in_child=(status_r, go_w), close_others=True)
    except BaseException:
        os.close(status_r)
        os.close(go_w)
        raise
    finally:
        os.close(status_w)
        os.close(go_r)
    return pid, status_r, go_w


def fork_plan(plan: ChildPlan, new_pid_ns: bool, close_in_child: tuple[int, ...] = (), close_others: bool = False) -> int:
    """Fork a child that runs `plan` (its status_w and go_r already set). Returns its pid.

    `close_in_child`: fds the child closes first. `close_others`: the child closes every fd
    but stdio and the plan's own (the spawner: its socket and other children's pipes must not
    live on in a container that waits, possibly long, to be started).

    Resource handling: the plan's fds stay the caller's (close them after the fork); the
    caller reaps pid.
    """

    def child() -> None:
        for fd in close_in_child:
            os.close(fd)
        if close_others:
            close_all_but({plan.status_w, plan.go_r, *plan.keep_fds, *(plan.stdio or ()), plan.userns_fd,
                           plan.console_socket})
        child_main(plan)

    return fork_pid1(child, new_pid_ns, plan.join_pid_ns)


def fork_pid1(child: Callable[[], None], new_pid_ns: bool, join_pid_ns: bytes = b"") -> int:
    """Fork; the child runs `child()` (which must exec or _exit) as pid 1 of a new pid
    namespace when `new_pid_ns`, else in the pid namespace at `join_pid_ns` (a path; b"": ours).
    Returns the child's pid, as we see it.

    The pid namespace is entered by unsharing CLONE_NEWPID (or setns to the one to join) in
    this thread just for the fork: it applies to the children we fork from then on, never to
    us, so the child is born in it and is our direct child (waitpid works); the thread's
    pid_for_children is restored right after.

    Raises:
        OSError: the namespace at `join_pid_ns` cannot be opened or joined (setns: EINVAL for
            one that is not a descendant of ours), or the fork failed.
    """
    switching = new_pid_ns or bool(join_pid_ns)
    own_pid_ns = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC) if switching else -1
    try:
        if new_pid_ns:
            sc.unshare(sc.CLONE_NEWPID)
        elif join_pid_ns:
            target = os.open(join_pid_ns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                sc.setns(target, sc.CLONE_NEWPID)
            except OSError as exc:
                raise OSError(exc.errno, f"join pid namespace: {exc.strerror}", join_pid_ns) from None
            finally:
                os.close(target)
        pid = -1
        try:
            pid = os.fork()
        finally:
            if switching and pid != 0:
                sc.setns(own_pid_ns, sc.CLONE_NEWPID)
        if pid == 0:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                child()
            finally:
                os._exit(127)  # not reached unless child() failed: never unwind into the caller
    finally:
        if own_pid_ns >= 0:
            os.close(own_pid_ns)
    return pid
