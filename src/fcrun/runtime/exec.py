"""Exec into a running container: a new process in its namespaces and cgroups, with its
limits, capabilities and seccomp profile (runc exec, nsenter's way).

    library                                  exec child
    setns(container's pid ns) for children
    (non-dumpable) fork ------------------>  pid N of the container's pid namespace
    setns(own pid ns)                        setsid; join its cgroups; setns ipc, uts, net,
                                             cgroup, mnt; then child.finish_and_exec: rlimits,
                                             user ns (last), user, capabilities, exec
                      <---- EOF -----------  exec happened (or "E..." and exit 127)
    waitpid: its exit code

The child is forked from this process (not the spawner): it must be our child for waitpid,
and the namespaces it joins are opened here.
"""

from __future__ import annotations

import os

import msgspec

from .. import syscalls as sc
from ..errors import KernelError
from .child import ChildFailure, ChildPlan, fail, failure_to_error, finish_and_exec, read_status
from .process import SETUP_TIMEOUT_S, exit_code, reap
from .spec import Spec
from .state import ContainerState

STEP_JOIN = "join container"
# The namespaces an exec joins besides pid (entered for the fork) and user (joined last).
_JOINED = (("ipc", sc.CLONE_NEWIPC), ("uts", sc.CLONE_NEWUTS), ("net", sc.CLONE_NEWNET),
           ("cgroup", sc.CLONE_NEWCGROUP), ("mnt", sc.CLONE_NEWNS))


def exec_spec(spec: Spec, args: list[str], env: list[str] | None, cwd: str | None) -> Spec:
    """The container's spec with the exec's process: its args, the container's env plus
    `env`, and `cwd` (default: the container's)."""
    process = msgspec.structs.replace(spec.process, args=list(args), env=spec.process.env + list(env or []),
                                      cwd=cwd or spec.process.cwd)
    return msgspec.structs.replace(spec, process=process)


def exec_in(state: ContainerState, plan: ChildPlan, *, wait: bool = True) -> int:
    """Fork a process into the container's namespaces and cgroup, exec the plan, wait for it.

    Returns its exit code (128+N when killed by signal N); with wait=False, its pid as soon
    as it has exec'd (our child: the caller waits for it, or exits and leaves it to its
    subreaper, as `runc exec --detach` does).

    Raises:
        KernelError: a namespace could not be opened or joined, or the fork failed.
        ContainerError: the exec failed (e.g. no such executable).
    """
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        namespaces = _open_namespaces(state.pid)
        try:
            if _differs(state.pid, "user"):
                # Joined last, by finish_and_exec: the others need host root's capabilities.
                plan.userns_fd = os.open(f"/proc/{state.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            plan.status_w = status_w
            pid = _fork_in_pid_ns(state.pid, lambda: _join_and_exec(plan, namespaces))
        finally:
            for fd, _ in namespaces:
                os.close(fd)
            if plan.userns_fd >= 0:
                os.close(plan.userns_fd)
    except OSError as exc:
        os.close(status_r)
        raise KernelError.from_oserror(f"exec in container {state.name}:", exc.filename or "", exc) from None
    finally:
        os.close(status_w)
    try:
        read_status(status_r, SETUP_TIMEOUT_S)
    except ChildFailure as failure:
        reap(pid)
        raise failure_to_error(failure, state.name) from None
    finally:
        os.close(status_r)
    if not wait:
        return pid
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return exit_code(status)
        except InterruptedError:
            continue


def _differs(pid: int, ns: str) -> bool:
    return os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")


def _open_namespaces(pid: int) -> list[tuple[int, int]]:
    """(fd, CLONE_NEW*) of each of the container's namespaces that is not ours already.

    Resource handling: the caller closes the fds; none is left open on failure.
    """
    fds: list[tuple[int, int]] = []
    try:
        for name, flag in _JOINED:
            if _differs(pid, name):
                fds.append((os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag))
    except BaseException:
        for fd, _ in fds:
            os.close(fd)
        raise
    return fds


def _fork_in_pid_ns(target: int, child) -> int:
    """Fork a child born in process `target`'s pid namespace, which runs `child()`; its pid."""
    own_pid = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    target_pid = os.open(f"/proc/{target}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sc.setns(target_pid, sc.CLONE_NEWPID)  # our next child is born in the container's pid ns
        pid = -1
        # Until its execve the child is this host python, in the container's pid namespace.
        # Once it has dropped to the container's capabilities (finish_and_exec), only being
        # non-dumpable keeps the container's processes (no CAP_SYS_PTRACE) out of its
        # /proc/PID/exe, mem and fd/; runc keeps itself so. Made so before the fork, as a
        # prctl in the child would leave a window; its execve makes it dumpable again.
        dumpable = sc.prctl(sc.PR_GET_DUMPABLE) == 1  # 0 and 2 (root only) keep them out as well
        try:
            if dumpable:
                sc.prctl(sc.PR_SET_DUMPABLE, 0)
            pid = os.fork()
        finally:
            if pid != 0:
                sc.setns(own_pid, sc.CLONE_NEWPID)
                if dumpable:
                    sc.prctl(sc.PR_SET_DUMPABLE, 1)
        if pid == 0:
            try:
                child()
            finally:
                os._exit(127)  # never unwind into the caller
        return pid
    finally:
        os.close(own_pid)
        os.close(target_pid)


def _join_and_exec(plan: ChildPlan, namespaces: list[tuple[int, int]]) -> None:
    """In the exec child: join the container, then exec. Never returns."""
    try:
        os.setsid()  # a terminal given as stdio becomes its controlling one (finish_and_exec)
        for procs in plan.cgroup_procs:
            with open(procs, "wb") as f:
                f.write(b"0")
        for fd, flag in namespaces:
            sc.setns(fd, flag)
    except BaseException as exc:  # noqa: BLE001 - reported on the status pipe, then _exit
        fail(plan, STEP_JOIN, exc)
    finish_and_exec(plan)
