"""The container's first process from the library's side: who forks it, the handshake with
it while it is created (child.py draws it), and the waits for its end.

Who forks. A process with more than one thread never forks Python of its own: between fork
and exec the child would run Python whose locks (the allocator's, the import lock, a
logging handler's) another thread may have held at the fork, and a deadlock there is a
container that never starts. Such a process always goes through its spawner (spawner/:
single-threaded), for the container child and for the user namespace's holder alike.
A single-threaded one follows `Runtime(spawner=...)`: by default its first container is
forked here (a one-shot `fcrun run` does not pay for starting a spawner), the next ones by
the spawner.

A child forked here is our child: we reap it. One forked by the spawner is the spawner's: it
reaps it and reports the wait status on the container's report pipe.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time

from ..errors import ContainerError, FcrunError
from .child import ChildPlan
from .fork import ChildFailure, fork_child, read_status
from .holder import new_userns
from .spawner import client as spawner
from .spawner.protocol import Exited, read_report
from .state import ContainerState, pid_alive, proc_start_time

SETUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_TASKS = "/proc/self/task"


def exit_code(wait_status: int) -> int:
    """A waitpid status as a shell shows it: the exit code, or 128+N when killed by signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def process_is_threaded() -> bool:
    """Whether this process has more than one thread (any thread: Python's, or a library's)."""
    return len(os.listdir(_TASKS)) > 1


def start_child(plan: ChildPlan, mode: bool | None) -> "ChildHandle":
    """Fork the container child: through the spawner when `mode` says so, else from here.

    Raises:
        SpawnerGone: a threaded process found no spawner to fork it (it never forks itself).
        OSError: the fork failed.
    """
    threaded = process_is_threaded()
    if threaded:
        mode = True
    elif plan.console_socket >= 0:
        mode = False  # the socket is our fd; the spawner's protocol carries no console (it refuses one)
    for _ in range(2):
        client = spawner.for_create(mode)
        if client is None:
            break
        try:
            pid, status_r, go_w, report_r = client.send(plan, new_pid_ns=plan.new_pid_ns)
            return ChildHandle(status_r, go_w, report_r, pid, client if report_r < 0 else None)
        except spawner.SpawnerGone:
            spawner.discard(client)  # killed, or exited: a new one, or we fork this one
    if threaded:
        raise spawner.SpawnerGone("the spawner died twice while forking a container; a threaded process does not fork one itself")
    pid, status_r, go_w = fork_child(plan, new_pid_ns=plan.new_pid_ns)
    return ChildHandle(status_r, go_w, pid=pid)


def make_userns(uid_map: bytes, gid_map: bytes) -> int:
    """A new user namespace with these map texts (userns.map_text), as an O_CLOEXEC fd the
    caller owns: the holder is forked here, or by the spawner in a threaded process.

    Raises:
        KernelError: the kernel refused. SpawnerGone: no spawner in a threaded process.
    """
    if process_is_threaded():
        return spawner.for_create(True).make_userns(uid_map, gid_map)
    return new_userns(uid_map, gid_map)


class ChildHandle:
    """The container's first process while it is created: forked by us, by the spawner (its
    pid comes on report_r, where its exit is reported later too), or a warm child of the
    spawner (pid known at once; claimed once the handshake is over, for the report pipe).

    Resource handling: owns status_r, go_w and report_r. On success the caller hands them on
    (to a Container); on failure abandon() kills the child, waits until it is gone and
    closes them.
    """

    def __init__(self, status_r: int, go_w: int, report_r: int = -1, pid: int = -1,
                 client: spawner.Client | None = None):
        self.status_r, self.go_w, self.report_r, self.pid = status_r, go_w, report_r, pid
        self._unclaimed = client  # a warm child's spawner, until claim()

    def wait_pid(self) -> int:
        """The child's pid (from the spawner's report, the first time). Raises ContainerError."""
        if self.pid < 0:
            self.pid = spawner.await_spawned(self.report_r)
        return self.pid

    def claim(self) -> int:
        """The report pipe of a child the spawner reaps (-1: ours, or the spawner is gone)."""
        client, self._unclaimed = self._unclaimed, None
        if client is not None:
            with contextlib.suppress(spawner.SpawnerGone, OSError):  # gone: nobody reports, wait_exit will do
                self.report_r = client.claim(self.pid)
        return self.report_r

    def abandon(self) -> None:
        """Rollback: kill the child, wait until it is gone, close the handshake fds."""
        if self.pid < 0 and self.report_r >= 0:
            with contextlib.suppress(FcrunError, OSError):
                self.pid = spawner.await_spawned(self.report_r)
            # else: the spawner refused or died, so there is no child (or it died with it)
        kill_quietly(self.pid)
        os.close(self.go_w)
        os.close(self.status_r)
        from_spawner = self._unclaimed is not None or self.report_r >= 0
        if self.claim() >= 0:
            if self.pid > 0:
                await_exit_report(self.report_r, self.pid)  # the spawner reaps it
            else:
                os.close(self.report_r)
        elif from_spawner:
            wait_gone_pid(self.pid)
        else:
            reap(self.pid)


# ----- the handshake (child.py draws it) --------------------------------------------------------


def read_ready(status_r: int, name: str) -> None:
    """The child's "R": its namespaces exist. Raises ChildFailure with its report."""
    if read_status(status_r, SETUP_TIMEOUT_S) != b"R":
        raise ContainerError(f"container {name}: setup ended before its namespaces were made")


def child_report(status_r: int, timeout_s: float = 0.25) -> ChildFailure | None:
    """The child's error report if it sent one (waits briefly for a dying child to finish it).

    Progress messages not read yet ("R", "C") are skipped: a child can get to its failure
    before the parent reads them.
    """
    deadline = time.monotonic() + timeout_s
    try:
        while read_status(status_r, max(0.0, deadline - time.monotonic())):
            pass
    except ChildFailure as failure:
        return failure
    except (OSError, FcrunError):
        pass  # no report (a timeout, a closed pipe): the caller's own error stands
    return None


def send_go(go_w: int, message: bytes, status_r: int) -> None:
    """Tell the child to go on. If it already died, raise the error it reported instead.

    Raises:
        ChildFailure: the child's report. ContainerError: it died without one.
    """
    try:
        os.write(go_w, message)
    except BrokenPipeError:
        failure = child_report(status_r, SETUP_TIMEOUT_S)
        if failure is not None:
            raise failure from None
        raise ContainerError("container setup ended without a report") from None


# ----- waits for the end --------------------------------------------------------------------------


def wait_report(report_r: int, pid: int) -> int | None:
    """The wait status of the spawner's child `pid`, from its report pipe; None if the spawner
    closed the pipe without one (it died: attached containers died with it)."""
    while True:
        report = read_report(report_r)
        if report is None:
            return None
        if isinstance(report, Exited) and report.pid == pid:
            return report.wait_status


def wait_gone_pid(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Wait (bounded) until process `pid`, which is not our child, has exited."""
    if pid <= 0:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)


def wait_exit(state: ContainerState) -> None:
    """Wait until pid 1 of a container that is not our child has exited."""
    try:
        pidfd = os.pidfd_open(state.pid)
    except ProcessLookupError:
        return
    try:
        if pid_alive(state):  # the pidfd is of our process, not of one that reused its pid
            select.select([pidfd], [], [])
    finally:
        os.close(pidfd)


def await_exit_report(report_r: int, pid: int) -> None:
    """Rollback: wait (bounded) until the spawner has reaped `pid`, then close the pipe."""
    try:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            report = read_report(report_r, left)
            if report is None or isinstance(report, Exited) and report.pid == pid:
                break
    except FcrunError:
        pass  # no report in time: the child was SIGKILLed, the spawner reaps it later
    finally:
        os.close(report_r)


def kill_quietly(pid: int) -> None:
    """SIGKILL `pid` if there is such a process (0 and -1 are never signalled)."""
    if pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def reap(pid: int) -> None:
    """Collect our child's exit status if it is our child; otherwise nothing to do."""
    if pid <= 0:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def reap_exited(state: ContainerState) -> None:
    """Collect the exit status of the container's pid 1 if it is our child and has exited.

    Never waits, and leaves alone a process that merely has its pid now: the pid may have
    been reused by another child of ours (in the fork-server: a pooled instance, a Run, the
    spawner), whose exit status is for whoever waits for that one. A zombie's start time is
    still in /proc: it tells the container's from another.
    """
    if state.pid <= 0 or proc_start_time(state.pid, exited_too=True) != state.pid_start_time:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(state.pid, os.WNOHANG)


def wait_gone(state: ContainerState, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Wait until the container's pid 1 has exited (reaping it if it is our child).

    Raises:
        ContainerError: it is still there after timeout_s.
    """
    deadline = time.monotonic() + timeout_s
    while pid_alive(state):
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(state.pid, os.WNOHANG)[0]:
                return
        if time.monotonic() > deadline:
            raise ContainerError(f"container {state.name}: pid {state.pid} did not exit within {timeout_s:.0f}s of SIGKILL")
        time.sleep(0.005)
