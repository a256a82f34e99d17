"""What `Runtime` hands out: a `Container` it created (start, wait) and `ContainerInfo`, one
row of `fcrun ps`."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING

import msgspec

from ..crashpoints import crash_point
from ..errors import IncorrectStatus, NotFound
from .fork import ChildFailure, failure_to_error, read_status
from .hooks import oci_state, run_hooks_logged
from .process import SETUP_TIMEOUT_S, exit_code, send_go, wait_exit, wait_report
from .state import ContainerState, check_allowed

if TYPE_CHECKING:
    from .lifecycle import Runtime


class ContainerInfo(msgspec.Struct):
    """One row of `fcrun ps`."""

    name: str
    status: str
    pid: int
    ip: str
    cpu: float | None
    memory_bytes: int | None
    pids_max: int | None
    image: str
    created_at: float
    labels: dict[str, str]
    memory_used_bytes: int | None = None  # cgroup memory use now (frozen instances hold theirs)


class Container:
    """A container created by this process: holds the handshake fds until it is started.

    Resource handling: the process that created a container is its parent (or its spawner
    is) and should `wait()` for it (or `Runtime.delete` it), or it stays a zombie until this
    process exits. Owns status_r and go_w until start(), report_r until wait().
    """

    def __init__(self, runtime: "Runtime", state: ContainerState, status_r: int = -1, go_w: int = -1, report_r: int = -1):
        self.runtime = runtime
        self.state = state
        self._status_r = status_r
        self._go_w = go_w
        self._report_r = report_r  # >= 0: the spawner forked it and reports its exit here

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def pid(self) -> int:
        return self.state.pid

    @property
    def ip(self) -> str:
        return self.state.network.ip if self.state.network else ""

    def start(self) -> None:
        """Let the created container exec its process.

        Raises:
            IncorrectStatus: not created, or created by another process.
            ContainerError/KernelError: the exec failed; the container is removed.
        """
        check_allowed("start", self.name, self.state.status)
        if self._go_w < 0:
            raise IncorrectStatus(f"container {self.name!r} was created by another process; it cannot be started from here")
        try:
            send_go(self._go_w, b"S", self._status_r)
            read_status(self._status_r, SETUP_TIMEOUT_S)  # b"" (EOF): the exec happened
        except ChildFailure as failure:
            self._close_fds()
            self.runtime.remove_failed(self.state)
            raise failure_to_error(failure, self.name) from None
        except BaseException:
            self._close_fds()
            self.runtime.remove_failed(self.state)
            raise
        self._close_fds()
        crash_point("start.go")
        with self.runtime.states.locked(self.name):  # NotFound: removed meanwhile (rm -f)
            state = self.runtime.states.load(self.name)  # keeps what others changed (labels)
            state.status = "running"
            state.started_at = time.time()
            self.runtime.states.save(state)
            self.state = state
        crash_point("start.saved")
        run_hooks_logged(state.spec, "poststart", oci_state(self.name, state.spec, "running", state.pid, state.labels),
                         self.name)

    def wait(self, *, record: bool = True) -> int:
        """Wait for pid 1 to exit; returns its exit code (128+N when killed by signal N).

        `record`: save "stopped" and the exit code in the state. False for a container removed
        right after (`fcrun run` without --keep): even unsynced (state.py), a state replaced on
        disk costs ~0.4 ms on this VM's ext4 run root, and a state left "running" by a crash in
        between reads as stopped (its pid is gone) and is removed by gc all the same.
        """
        if self._report_r >= 0:
            status = wait_report(self._report_r, self.state.pid)
            self._close_report()
            if status is None:
                # The spawner died without telling. An attached container died with it
                # (PDEATHSIG=SIGKILL); a detached one lives on, re-parented: wait for it.
                wait_exit(self.state)
                if not self.state.detached:
                    status = signal.SIGKILL
                else:
                    return self.runtime.refresh(self.state).exit_code or 0
        else:
            try:
                _, status = os.waitpid(self.state.pid, 0)
            except ChildProcessError:  # not our child (the spawner is gone): wait all the same
                wait_exit(self.state)
                return self.runtime.refresh(self.state).exit_code or 0
        code = exit_code(status)
        if not record:
            return code
        with contextlib.suppress(NotFound, FileNotFoundError):  # removed meanwhile: nothing to record
            with self.runtime.states.locked(self.name):
                state = self.runtime.states.load(self.name)
                state.status = "stopped"
                state.exit_code = code
                self.runtime.states.save(state)
                self.state = state
        return code

    def _close_fds(self) -> None:
        for fd in (self._status_r, self._go_w):
            if fd >= 0:
                os.close(fd)
        self._status_r = self._go_w = -1

    def _close_report(self) -> None:
        if self._report_r >= 0:
            os.close(self._report_r)
            self._report_r = -1

    def __del__(self) -> None:
        self._close_fds()
        self._close_report()
