"""Process creation: the child that becomes a container, and the handshake with its parent.

The parent computes a `ChildPlan` (plain bytes and ints, nothing to look up) and forks. The
child runs `child_main(plan)`: a flat sequence of system calls that ends in execve. It makes
no decision the plan did not make, so it stays small and allocation-light, and a fork-server
(a process with no threads and no event loop: spawner/) can drive it the same way as the
library. The spawner may also fork a child *before* it has a plan (`prepare_child`: pid,
uts, ipc and net namespaces, PDEATHSIG, session) and hand it the plan later; the child then
goes on from there.

Handshake over two pipes (status: child -> parent, close-on-exec; go: parent -> child)::

    parent                                  child (pid 1 of a new pid namespace)
    unshare(NEWPID); fork() ------------->  unshare(mount, uts, ipc, net); lo up; hostname
    setns(own pid ns)
    create cgroup, move child into it
                          <---- "R" ------  namespaces exist
    bridge: configure veth into             mount overlay rootfs, /proc, /dev, /sys, masks
    /proc/PID/ns/net (after "R")
                          ----- "J" ---->   (cgroup joined, network ready)
                                            pivot_root, unshare(cgroup), rlimits,
                                            oom_score_adj, setns(user ns)
                          <---- "C" ------  created: waits for "S"
    (container is "created")
    start():              ----- "S" ---->   user, capabilities, no_new_privs,
                                            close fds, execve
                          <---- EOF ------  exec happened (status pipe closed on exec)

`run()` sends "J" and "S" together ("JS"); the child then skips "C" and goes on to exec.

The parent's cgroup and network work overlaps the child's mount work. Without a bridge the
parent sends "J" as soon as the child is in its cgroup, before it reads "R". A container
that is started at once costs no extra round trip.
A plan with `cgroup_procs` has the child join the cgroups itself, after "J" and before it
leaves the host's root: on cgroup v1 the creation gives it the groups' `tasks` files, where a
self-join waits for no RCU grace period (cgroups/v1.py); elsewhere (v2, or hooks that must see
the container in its cgroup before "J") the list is empty and the parent moves the child while
it mounts, as drawn above.
Any failure in the child is sent as "E<step>\\0<errno>\\0<message>" and the child exits 127;
the parent then rolls back everything it made.
"""

# No `from __future__ import annotations` here: a msgspec Decoder built at import reads these
# Structs' annotations, and string ones are each compiled (~300 compiles across the runtime's
# modules: ~4-6 ms of a `fcrun run` without a fork-server).

import ctypes
import errno as _errno
import fcntl
import os
import resource
import select
import signal
import termios
import stat

import msgspec

from .. import syscalls as sc
from ..seccomp.install import install_filter
from .console import open_console
from .passwd import home_of
from .rootfs_setup import mount_cgroups, mount_rootfs, pivot_to_rootfs

# Step names reported to the parent when the child fails.
STEP_CGROUP = "join cgroup"
STEP_UNSHARE = "unshare namespaces"
STEP_ROOTFS = "prepare rootfs"
STEP_MOUNT = "mount"
STEP_PIVOT = "pivot_root"
STEP_HOSTNAME = "set hostname"
STEP_WAIT = "wait for start"
STEP_RLIMIT = "set rlimit"
STEP_USER = "switch user"
STEP_USERNS = "join user namespace"
STEP_CAPS = "set capabilities"
STEP_SECCOMP = "load seccomp filter"
STEP_EXEC = "exec"
STEP_CWD = "change to the working directory"
STEP_JOIN = "join namespace"
STEP_SYSCTL = "set sysctl"
STEP_HOOK = "run hook"
STEP_OOM = "set oom_score_adj"
STEP_CONSOLE = "set up the terminal"

_MACHINE = os.uname().machine
_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "riscv64": 274, "ppc64le": 355, "s390x": 345}
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "riscv64": 30, "ppc64le": 273, "s390x": 282}
IOPRIO_WHO_PROCESS = 1
_SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237, "riscv64": 237, "ppc64le": 261, "s390x": 270}


class MountStep(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One mount in the container's rootfs, resolved safely under the rootfs by the child."""

    destination: bytes  # absolute path inside the container
    source: bytes | None
    fstype: bytes | None
    flags: int
    data: bytes | None
    bind: bool = False
    file_target: bool = False  # bind of a file: the mount point must be a file
    remount_flags: int = 0  # non-zero: a bind remount with these flags follows (e.g. read-only)
    propagation: int = 0  # MS_SHARED/MS_SLAVE/MS_PRIVATE (| MS_REC), set on the mount last; 0: left as it is


class HookStep(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An OCI hook the child runs itself (createContainer, startContainer): see hooks.py."""

    stage: str  # "createContainer" or "startContainer"
    path: bytes
    argv: list[bytes]
    env: list[bytes]
    timeout_s: int = 0  # 0: none


class ChildPlan(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything the child needs, precomputed by the parent.

    A msgspec Struct because it also crosses a process boundary: the library sends it to the
    spawner (spawner/), which forks the child. The fd fields are numbers in the forking
    process; on the wire they are -1/None and the fds travel alongside (SCM_RIGHTS).
    """

    argv: list[bytes]
    env: dict[bytes, bytes]
    cwd: bytes
    rootfs: bytes
    overlay_data: bytes | None  # None: rootfs is an existing directory (bind-mounted onto itself)
    # Not None: tmpfs mount data; the overlay's upper and work dirs are made on a tmpfs mounted
    # at rootfs first (a memory-backed writable layer), which the overlay then covers.
    overlay_tmpfs: bytes | None = None
    overlay_tmpfs_dirs: list[tuple[bytes, int]] = []  # (path, mode): upper and work, on that tmpfs
    mounts: list[MountStep]
    devices: list[tuple[bytes, int, int, int]]  # (name under /dev, mode incl. S_IFCHR, major, minor)
    dev_symlinks: list[tuple[bytes, bytes]]  # (target, link name under /dev)
    masked_paths: list[bytes]
    readonly_paths: list[bytes]
    readonly_root: bool
    propagation: int
    unshare_flags: int
    new_netns: bool
    hostname: bytes | None
    cgroup_procs: list[bytes]
    rlimits: list[tuple[int, int, int]]
    uid: int
    gid: int
    groups: list[int]
    cap_bounding: int
    cap_effective: int
    cap_permitted: int
    cap_inheritable: int
    cap_ambient: list[int]
    cap_last: int
    no_new_privs: bool
    pdeathsig: int  # 0: the container may outlive its creator (detached)
    init_fd: int  # -1: run argv as pid 1 itself; else an fd of a static init (tini) to exec
    stdio: tuple[int, int, int] | None  # None: inherit the parent's
    # A user namespace to join (an fd of it; -1: none), as the last step before dropping
    # privileges: everything before runs as host root, whose mounts need it (userns.py).
    userns_fd: int = -1
    # (image layer dir, where to attach it idmapped to that namespace): the overlay's lower
    # dirs are these attach points, on a tmpfs at rootfs, so the image's root-owned files are
    # the container root's. Empty: the layers are used as they are.
    idmapped_lower: list[tuple[bytes, bytes]] = []
    upper_owner: tuple[int, int] | None = None  # (uid, gid) for a tmpfs upper dir's root
    # A compiled seccomp filter (struct sock_filter[], as libseccomp exports it), loaded as
    # the last step before execve; b"": none.
    seccomp_filter: bytes = b""
    seccomp_flags: int = 0  # SECCOMP_FILTER_FLAG_* to load it with
    # Namespaces to join instead of making them: (path of a namespace file, its CLONE_NEW* type),
    # joined right after the unshare of the others, while the host's paths are reachable.
    # Without CLONE_NEWNS in unshare_flags (the mount namespace joined, or the runtime's own),
    # the rootfs is bound privately onto itself there and entered by chroot (rootfs_setup.py).
    join_namespaces: list[tuple[bytes, int]] = []
    # The pid namespace: a new one, with the child as its pid 1; else the one at join_pid_ns (the
    # child is forked into it: fork.fork_pid1), or b"": the forking process's own.
    new_pid_ns: bool = True
    join_pid_ns: bytes = b""
    sysctl: list[tuple[bytes, bytes]] = []  # (file under /proc/sys, value), written in the new namespaces
    umask: int = 0o022  # as runc sets it when the spec gives none
    oom_score_adj: int | None = None  # None: inherited
    hooks: list[HookStep] = []
    domainname: bytes | None = None  # None: left as the uts namespace has it
    sched_attr: bytes = b""  # a struct sched_attr for sched_setattr(2); b"": inherited
    ioprio: int = -1  # ioprio_set(2)'s value (class << 13 | level); -1: inherited
    cpu_affinity: list[int] = []  # CPUs for sched_setaffinity; []: inherited
    # set_mempolicy(2): mode | flags, and the nodes as one 64-bit mask; mode -1: inherited.
    mempolicy_mode: int = -1
    mempolicy_nodes: int = 0
    personality: int = -1  # PER_*; -1: inherited
    # linux.devices: (path inside the container, mode incl. S_IFCHR/S_IFBLK/S_IFIFO, major, minor,
    # uid, gid), made after the default /dev nodes (one with the same path replaces its default).
    spec_devices: list[tuple[bytes, int, int, int, int, int]] = []
    # A mount of type cgroup: at this destination, the container's own cgroup dirs bound
    # (host dir, name under the destination; b"": the destination itself, cgroup v2) once the
    # child is in them (after "J"), then made read-only with `cgroup_mount_flags` if they say so.
    cgroup_mount: bytes | None = None
    cgroup_mount_flags: int = 0
    cgroup_binds: list[tuple[bytes, bytes]] = []
    # The hooks' state JSON, without "status" and "pid", which the child puts first.
    hook_state: bytes = b"{}"
    status_w: int = -1
    go_r: int = -1
    keep_fds: list[int] = []
    # A connected unix socket (-1: none) to send the master of a pty made in the container to
    # (process.terminal with --console-socket, as runc does: console.py); its slave then
    # replaces `stdio`. console_size: (rows, columns); (0, 0): the kernel's.
    console_socket: int = -1
    console_size: tuple[int, int] = (0, 0)
    console_owner: int = -1  # the host uid the slave is given to (the process's user); <= 0: host root keeps it


def take_console(plan: ChildPlan, bind_console: bool) -> None:
    """Make the process's terminal in the container, send its master away, and make its slave
    the plan's stdio (console.py). Raises OSError."""
    slave = open_console(plan.console_socket, *plan.console_size, bind_console=bind_console)
    plan.console_socket = -1  # closed
    if plan.console_owner > 0:
        os.fchown(slave, plan.console_owner, -1)  # the user's own terminal (runc's fixStdioPermissions)
    plan.stdio = (slave, slave, slave)


def fail(plan: ChildPlan, step: str, exc: BaseException) -> None:
    """Report a failed step to the parent on the status pipe ("E<step>\\0<errno>\\0<message>")
    and exit 127. Never returns: in a forked child, nothing may unwind into the parent's code."""
    err = getattr(exc, "errno", None) or _errno.EIO
    filename = getattr(exc, "filename", None)
    if isinstance(filename, bytes):
        filename = filename.decode(errors="replace")
    message = filename or str(exc)
    try:
        os.write(plan.status_w, b"E" + f"{step}\0{err}\0{message}".encode(errors="replace"))
    finally:
        os._exit(127)


# Namespaces a pre-forked child (spawner/) makes before it knows its plan: none of them
# depends on the plan or on the host's state at the time. The mount namespace is not among
# them: a copy made ahead of time would miss host mounts made since.
PREPARED_UNSHARE = sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET


def prepare_child(unshare_flags: int, pdeathsig: int) -> None:
    """The part of the child that needs no plan: signal dispositions, PDEATHSIG, a session of
    its own, and the namespaces in `unshare_flags` (but cgroup), with lo up in a new netns.

    Raises:
        OSError: a system call failed.
    """
    # Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored across exec.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    if pdeathsig:
        sc.prctl(sc.PR_SET_PDEATHSIG, pdeathsig)
    os.setsid()
    # The cgroup namespace waits until the parent has moved us into our cgroup ("J"),
    # so that the container's view of /proc/self/cgroup is rooted at its own group.
    sc.unshare(unshare_flags & ~sc.CLONE_NEWCGROUP)
    if unshare_flags & sc.CLONE_NEWNET:
        sc.set_loopback_up()
        # Any user may bind any port in the container's own network namespace (as Docker
        # sets it): a container in a user namespace has no CAP_NET_BIND_SERVICE there.
        fd = os.open(b"/proc/sys/net/ipv4/ip_unprivileged_port_start", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def child_main(plan: ChildPlan, prepared: int = 0) -> None:
    """Runs in the forked child. Never returns: execs or exits 127.

    `prepared`: the namespaces prepare_child made already (a pre-forked child, with
    PDEATHSIG=SIGKILL); 0 for a child forked for this plan.
    """
    step = STEP_UNSHARE
    try:
        if prepared:
            if plan.pdeathsig != signal.SIGKILL:
                sc.prctl(sc.PR_SET_PDEATHSIG, plan.pdeathsig)  # 0: detached, may outlive the spawner
            sc.unshare(plan.unshare_flags & ~prepared & ~sc.CLONE_NEWCGROUP)
        else:
            prepare_child(plan.unshare_flags, plan.pdeathsig)
        step = STEP_JOIN
        cgroup_ns_fd = -1
        for path, nstype in plan.join_namespaces:
            if nstype == sc.CLONE_NEWCGROUP:
                # Joined where a new one would be made (after pivot_root), opened while the
                # host's paths are reachable.
                cgroup_ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            else:
                _join_namespace(path, nstype)
        if plan.hostname is not None:
            step = STEP_HOSTNAME
            sc.sethostname(plan.hostname)
        if plan.domainname is not None:
            step = STEP_HOSTNAME
            _check_libc(sc.libc.setdomainname(plan.domainname, len(plan.domainname)), "setdomainname")
        step = STEP_SYSCTL
        for path, value in plan.sysctl:
            _write_file(path, value)
        # Our pid as the runtime sees it, for the hooks' state: the host's /proc is still ours.
        host_pid = int(os.readlink(b"/proc/self")) if plan.hooks else 0
        os.write(plan.status_w, b"R")

        step = STEP_ROOTFS
        mount_rootfs(plan)

        step = STEP_CGROUP
        go = os.read(plan.go_r, 2)  # "J", or "JS" from run(): written at once, read at once
        if not go.startswith(b"J"):
            os._exit(127)  # the parent went away or gave up on us
        # Empty where the parent moved us; else join now, while the files are reachable. We
        # are single-threaded, so "0" in a v1 `tasks` file moves the whole process.
        for procs in plan.cgroup_procs:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

        if plan.cgroup_mount is not None:
            step = STEP_MOUNT
            mount_cgroups(plan)

        step = STEP_HOOK
        run_child_hooks(plan, "createContainer", b"creating", host_pid)

        step = STEP_PIVOT
        pivot_to_rootfs(plan)
        if plan.console_socket >= 0:
            # In the container's root, on its own devpts, before "C": an engine waits for the
            # master during create (console.py).
            step = STEP_CONSOLE
            take_console(plan, bind_console=True)
        if plan.unshare_flags & sc.CLONE_NEWCGROUP:
            step = STEP_CGROUP
            sc.unshare(sc.CLONE_NEWCGROUP)
        elif cgroup_ns_fd >= 0:
            step = STEP_JOIN
            sc.setns(cgroup_ns_fd, sc.CLONE_NEWCGROUP)
            os.close(cgroup_ns_fd)
        # Before "C", as runc does: a created container's process is already in its user
        # namespace (what /proc/PID/ns/user shows), with its rlimits and oom_score_adj, which
        # need host root and so come first.
        set_process_attributes(plan)
        step = STEP_USERNS
        enter_user_namespace(plan)
        if go != b"JS":
            # Created: say so and wait to be started. (Told to start already, we go on: the
            # exec itself is the parent's next news, which spares it one wake-up.)
            os.write(plan.status_w, b"C")
            step = STEP_WAIT
            if os.read(plan.go_r, 1) != b"S":
                os._exit(127)  # never run the command unless told to
        os.close(plan.go_r)
        step = STEP_HOOK
        run_child_hooks(plan, "startContainer", b"created", host_pid)

        finish_and_exec(plan, attributes_set=True)
    except BaseException as exc:  # noqa: BLE001 - everything must be reported, then _exit
        fail(plan, step, exc)


def _check_libc(result: int, call: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{call}: {os.strerror(err)}")


def _join_namespace(path: bytes, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sc.setns(fd, nstype)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(fd)


def _write_file(path: bytes, value: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(fd)


def run_child_hooks(plan: ChildPlan, stage: str, status: bytes, host_pid: int) -> None:
    """Run the plan's hooks of `stage` one by one, each with the state JSON on stdin.

    Raises:
        OSError: a hook could not run, failed (EIO... its exit status in the message) or ran
            past its timeout (ETIMEDOUT; it is killed).
    """
    hooks = [h for h in plan.hooks if h.stage == stage]
    if not hooks:
        return
    state = b'{"status":"%s","pid":%d,' % (status, host_pid) + plan.hook_state[1:]
    for hook in hooks:
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(stdin_r, 0)
                os.execve(hook.path, hook.argv or [hook.path], dict(e.split(b"=", 1) for e in hook.env))
            finally:
                os._exit(127)
        os.close(stdin_r)
        try:
            os.write(stdin_w, state)  # a state is far below a pipe's buffer: never blocks
        except BrokenPipeError:
            pass  # the hook need not read it
        os.close(stdin_w)
        pidfd = os.pidfd_open(pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], hook.timeout_s or None)
        finally:
            os.close(pidfd)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise OSError(_errno.ETIMEDOUT, f"{stage} hook {hook.path.decode(errors='replace')}: still running "
                          f"after its timeout of {hook.timeout_s}s; killed")
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code != 0:
            how = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
            raise OSError(_errno.EIO, f"{stage} hook {hook.path.decode(errors='replace')} failed: {how}")


def set_process_attributes(plan: ChildPlan) -> None:
    """The process's personality, scheduling, memory policy, oom_score_adj and rlimits, while
    we are still host root (several need capabilities of the host's user namespace). Exits
    127 on failure, as `fail` does."""
    step = STEP_RLIMIT
    try:
        if plan.personality >= 0:
            _check_libc(sc.libc.personality(plan.personality), "personality")
        # Before the capabilities go: a real-time policy or class needs CAP_SYS_NICE / SYS_ADMIN.
        if plan.sched_attr:
            _check_libc(sc.libc.syscall(_SYS_SCHED_SETATTR[_MACHINE], 0, plan.sched_attr, 0), "sched_setattr")
        if plan.ioprio >= 0:
            _check_libc(sc.libc.syscall(_SYS_IOPRIO_SET[_MACHINE], IOPRIO_WHO_PROCESS, 0, plan.ioprio), "ioprio_set")
        if plan.cpu_affinity:
            os.sched_setaffinity(0, plan.cpu_affinity)
        if plan.mempolicy_mode >= 0:
            nodes = ctypes.c_ulong(plan.mempolicy_nodes)
            mask = ctypes.byref(nodes) if plan.mempolicy_nodes else None
            # maxnode: the kernel reads one bit less than it is told (set_mempolicy(2), BUGS).
            _check_libc(sc.libc.syscall(_SYS_SET_MEMPOLICY[_MACHINE], plan.mempolicy_mode, mask,
                                        65 if plan.mempolicy_nodes else 0), "set_mempolicy")
        if plan.oom_score_adj is not None:
            step = STEP_OOM  # before the capabilities go: lowering it needs CAP_SYS_RESOURCE
            _write_file(b"/proc/self/oom_score_adj", b"%d" % plan.oom_score_adj)
            step = STEP_RLIMIT
        for res, soft, hard in plan.rlimits:
            resource.setrlimit(res, (soft, hard))
    except BaseException as exc:  # noqa: BLE001
        fail(plan, step, exc)


def enter_user_namespace(plan: ChildPlan) -> None:
    """Join the plan's user namespace (if any): from here on capabilities count in it only (and
    our uid 0 is nobody there until setresuid in finish_and_exec makes us its root).
    Raises OSError."""
    if plan.userns_fd < 0:
        return
    sc.setns(plan.userns_fd, sc.CLONE_NEWUSER)
    os.close(plan.userns_fd)
    plan.userns_fd = -1
    if plan.pdeathsig:
        sc.prctl(sc.PR_SET_PDEATHSIG, plan.pdeathsig)  # as after any credential change


def finish_and_exec(plan: ChildPlan, attributes_set: bool = False) -> None:
    """Drop privileges and exec. Shared by container creation and `exec` into a container.
    `attributes_set`: set_process_attributes and enter_user_namespace ran already."""
    if not attributes_set:
        set_process_attributes(plan)
    step = STEP_EXEC
    try:
        if plan.stdio is not None:
            for target, fd in enumerate(plan.stdio):
                if fd != target:
                    os.dup2(fd, target)
            if os.isatty(0):
                # A terminal given as stdio (fcrun-oci's pty: process.terminal, exec --tty)
                # becomes the controlling terminal of our session (setsid). One that controls
                # another session (a caller's own terminal) cannot, and stays plain stdio.
                try:
                    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
                except OSError:
                    pass

        if not attributes_set:
            step = STEP_USERNS
            enter_user_namespace(plan)

        step = STEP_USER
        if not plan.env.get(b"HOME"):
            plan.env[b"HOME"] = home_of(plan.uid)  # as runc: the user's home in the container's /etc/passwd, else /

        step = STEP_CAPS
        for cap in range(plan.cap_last + 1):
            if not plan.cap_bounding & (1 << cap):
                sc.prctl(sc.PR_CAPBSET_DROP, cap)

        if plan.seccomp_filter and not plan.no_new_privs:
            # Without no_new_privs the kernel takes a filter only from a process holding
            # CAP_SYS_ADMIN, which the steps below drop: load it now, as runc does. The
            # filter must then allow those steps (setresuid, capset, prctl, chdir, execve).
            step = STEP_SECCOMP
            install_filter(plan.seccomp_filter, plan.seccomp_flags)

        step = STEP_USER
        switching = plan.uid != 0 or plan.gid != 0
        if switching:
            sc.prctl(sc.PR_SET_KEEPCAPS, 1)
        os.setgroups(plan.groups)
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
        if switching:
            sc.prctl(sc.PR_SET_KEEPCAPS, 0)
        if plan.pdeathsig:
            sc.prctl(sc.PR_SET_PDEATHSIG, plan.pdeathsig)  # a credential change clears it

        step = STEP_CAPS
        sc.capset(plan.cap_effective, plan.cap_permitted, plan.cap_inheritable)
        sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
        for cap in plan.cap_ambient:
            sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_RAISE, cap)
        if plan.no_new_privs:
            sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)

        step = STEP_CWD  # not STEP_EXEC: a missing working directory is no missing command (127)
        os.umask(plan.umask)
        os.chdir(plan.cwd)
        step = STEP_EXEC
        program = _find_executable(plan.argv[0], plan.env.get(b"PATH", b"/usr/sbin:/usr/bin:/sbin:/bin"),
                                   by_init=plan.init_fd >= 0)

        # Close every fd but stdio and the close-on-exec ones the exec itself needs.
        close_all_but({plan.status_w, *plan.keep_fds})

        if plan.seccomp_filter and plan.no_new_privs:
            # Last, so that fcrun's own steps above are not subject to the container's
            # profile; only execve (execveat for the init fd) and, on failure, write and
            # exit_group still run under it.
            step = STEP_SECCOMP
            install_filter(plan.seccomp_filter, plan.seccomp_flags)
            step = STEP_EXEC

        if plan.init_fd >= 0:
            os.execve(plan.init_fd, [b"init", b"--", program, *plan.argv[1:]], plan.env)
        os.execve(program, plan.argv, plan.env)
    except BaseException as exc:  # noqa: BLE001
        fail(plan, step, exc)


def close_all_but(keep: set[int]) -> None:
    """Close every fd above stdio except `keep` (os.closerange uses close_range(2))."""
    low = 3
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        if fd >= low:
            low = fd + 1
    os.closerange(low, 65536)


def _find_executable(name: bytes, search_path: bytes, by_init: bool = False) -> bytes:
    """PATH lookup inside the container, so that a command that is missing or cannot run fails
    here with execvp's errno (fork.py: ENOENT -> exit 127; EACCES, EISDIR, ENOEXEC -> 126), not
    in the init. `by_init`: tini will exec it, and exits 1 for ENOEXEC: a file neither ELF nor
    #! is refused here (a host binfmt_misc format too); without an init our execve says it.

    Raises:
        OSError: ENOENT, EACCES, EISDIR or ENOEXEC, naming the command.
    """
    candidates = [name] if b"/" in name else [d + b"/" + name for d in search_path.split(b":") if d]
    err = _errno.ENOENT
    for c in candidates:
        try:
            st = os.stat(c)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(c, os.X_OK):
            if by_init and not _runnable_format(c):
                raise OSError(_errno.ENOEXEC, os.strerror(_errno.ENOEXEC), name)
            return c
        # As execvp: a directory met on PATH is EACCES and the search goes on; one named by path EISDIR.
        err = _errno.EISDIR if stat.S_ISDIR(st.st_mode) and b"/" in name else _errno.EACCES
    raise OSError(err, "executable not found in the container" if err == _errno.ENOENT else os.strerror(err), name)


def _runnable_format(path: bytes) -> bool:
    """Does the file start as ELF or #!? True if it cannot be read (execute-only): exec decides."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, 4).startswith((b"\x7fELF", b"#!"))
        finally:
            os.close(fd)
    except OSError:
        return True
