"""Exec into a running container: a new process in its namespaces and cgroups, with its
limits, capabilities and seccomp profile (runc exec, nsenter's way).

    library                                  exec child
    setns(container's pid ns) for children
    (non-dumpable) fork ------------------>  pid N of the container's pid namespace
    setns(own pid ns)                        setsid; join its cgroups; setns ipc, uts, net,
                                             cgroup, mnt; [--tty: a pty from its /dev/ptmx,
                                             console.py]; then child.finish_and_exec: rlimits,
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
from .child import STEP_CONSOLE, ChildPlan, fail, finish_and_exec, take_console
from .fork import ChildFailure, failure_to_error, read_status
from .process import SETUP_TIMEOUT_S, exit_code, reap
from .spec import Capabilities, Process, Spec, User
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


# Fields of a whole process (exec --process) that, when left out, are the container's: runc's
# exec falls back to the container's config for them (libcontainer's initConfig takes the
# process's value only when it has one). Everything else is the given process's alone, as
# runc reads process.json: args, env (not added to the container's), cwd, user with its
# additionalGids and umask, terminal, consoleSize, noNewPrivileges (false when left out).
_INHERITED_WHEN_UNSET = ("capabilities", "oom_score_adj", "scheduler", "io_priority", "exec_cpu_affinity")


def exec_process_spec(spec: Spec, process: Process) -> Spec:
    """The container's spec with `process` as its process, as `runc exec --process` takes it:
    the given process's fields, and the container's capabilities, rlimits, oomScoreAdj,
    scheduler, ioPriority, execCPUAffinity and umask where it gives none. Checked by validate_spec
    like any spec (an apparmorProfile or selinuxLabel is refused there, by name)."""
    inherited = {field: getattr(spec.process, field) for field in _INHERITED_WHEN_UNSET
                 if getattr(process, field) is None}
    if not process.rlimits:
        inherited["rlimits"] = spec.process.rlimits
    if process.user.umask is None:
        inherited["user"] = msgspec.structs.replace(process.user, umask=spec.process.user.umask)
    return msgspec.structs.replace(spec, process=msgspec.structs.replace(process, **inherited))


def process_from_flags(container: Process, args: list[str], *, env: list[str] = (), cwd: str = "",
                       user: User | None = None, additional_gids: list[int] = (), caps: list[str] = (),
                       no_new_privileges: bool | None = None) -> Process:
    """The process of `runc exec ARGS` with its flags: the container's process with these args,
    its env plus `env`, and each flag that is given in place of (or, for --cap and
    --additional-gids, added to) the container's value, as runc's getProcess builds it. A cap
    goes into the bounding, effective, permitted and ambient sets, never the inheritable one
    (runc since CVE-2022-29162), so build_plan keeps it ambient only where the container's
    process has it inheritable already."""
    user = user if user is not None else container.user
    if additional_gids:
        user = msgspec.structs.replace(user, additional_gids=[*user.additional_gids, *additional_gids])
    capabilities = container.capabilities
    if caps:
        have = capabilities or Capabilities()
        capabilities = msgspec.structs.replace(
            have, bounding=[*have.bounding, *caps], effective=[*have.effective, *caps],
            permitted=[*have.permitted, *caps], ambient=[*have.ambient, *caps])
    return msgspec.structs.replace(
        container, args=list(args), env=[*container.env, *env], cwd=cwd or container.cwd, user=user,
        capabilities=capabilities,
        no_new_privileges=container.no_new_privileges if no_new_privileges is None else no_new_privileges)


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
        root_fd = -1
        try:
            root_fd = os.open(f"/proc/{state.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            if _differs(state.pid, "user"):
                # Joined last, by finish_and_exec: the others need host root's capabilities.
                plan.userns_fd = os.open(f"/proc/{state.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            plan.status_w = status_w
            pid = _fork_in_pid_ns(state.pid, lambda: _join_and_exec(plan, namespaces, root_fd))
        finally:
            for fd, _ in namespaces:
                os.close(fd)
            if root_fd >= 0:
                os.close(root_fd)
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


def _join_and_exec(plan: ChildPlan, namespaces: list[tuple[int, int]], root_fd: int) -> None:
    """In the exec child: join the container, then exec. Never returns."""
    try:
        os.setsid()  # a terminal given as stdio becomes its controlling one (finish_and_exec)
        for procs in plan.cgroup_procs:
            with open(procs, "wb") as f:
                f.write(b"0")
        for fd, flag in namespaces:
            sc.setns(fd, flag)
        # The container's root, which is not its mount namespace's root when that namespace
        # is not its own (joined by path, or the runtime's: rootfs_setup chroots there).
        os.fchdir(root_fd)
        os.chroot(".")
        os.chdir("/")
    except BaseException as exc:  # noqa: BLE001 - reported on the status pipe, then _exit
        fail(plan, STEP_JOIN, exc)
    if plan.console_socket >= 0:
        try:
            take_console(plan, bind_console=False)  # from the container's /dev/ptmx: we are in its mount ns
        except BaseException as exc:  # noqa: BLE001
            fail(plan, STEP_CONSOLE, exc)
    finish_and_exec(plan)
