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
                                            pivot_root, unshare(cgroup)
                          <---- "C" ------  created: waits for "S"
    (container is "created")
    start():              ----- "S" ---->   rlimits, user, capabilities, no_new_privs,
                                            close fds, execve
                          <---- EOF ------  exec happened (status pipe closed on exec)

`run()` sends "J" and "S" together ("JS"); the child then skips "C" and goes on to exec.

The parent's cgroup and network work overlaps the child's mount work. Without a bridge the
parent sends "J" as soon as the child is in its cgroup, before it reads "R". A container
that is started at once costs no extra round trip.
(A plan with `cgroup_procs` has the child join the cgroups itself, after "J" and before it
leaves the host's root; the library leaves them empty and moves the child.)
Any failure in the child is sent as "E<step>\\0<errno>\\0<message>" and the child exits 127;
the parent then rolls back everything it made.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os
import resource
import select
import signal
import termios
from collections.abc import Callable

import msgspec

from .. import syscalls as sc
from ..errors import ContainerError, KernelError
from ..seccomp.install import install_filter

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
STEP_JOIN = "join namespace"
STEP_SYSCTL = "set sysctl"
STEP_HOOK = "run hook"
STEP_OOM = "set oom_score_adj"

MAX_SYMLINKS = 40
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
    join_namespaces: list[tuple[bytes, int]] = []
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


class ChildFailure(Exception):
    def __init__(self, step: str, err: int, message: str):
        super().__init__(step, err, message)
        self.step, self.err, self.message = step, err, message


def secure_join(root: bytes, path: bytes) -> bytes:
    """Resolve `path` as if `root` were '/': symlinks (absolute or relative) never leave root.

    Components that do not exist yet are kept as written, so the caller can create them.
    (The same idea as runc's securejoin; needed because an image may contain symlinks such
    as /proc -> /etc that would otherwise send a mount onto the host.)
    """
    parts = [p for p in path.split(b"/") if p and p != b"."]
    resolved: list[bytes] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == b"..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + b"/" + b"/".join(resolved + [part])
        try:
            target = os.readlink(candidate)
        except OSError:
            resolved.append(part)  # not a symlink, or does not exist
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(_errno.ELOOP, "too many symlinks", candidate)
        if target.startswith(b"/"):
            resolved = []
        parts = [p for p in target.split(b"/") if p and p != b"."] + parts
    return root + b"/" + b"/".join(resolved)


def _make_mountpoint(path: bytes, is_file: bool) -> None:
    if is_file:
        parent = os.path.dirname(path)
        os.makedirs(parent, 0o755, exist_ok=True)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    else:
        os.makedirs(path, 0o755, exist_ok=True)


def _mount_one(m: MountStep, target: bytes) -> None:
    try:
        sc.mount(m.source, target, m.fstype, m.flags, m.data)
        if m.remount_flags:
            sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | m.remount_flags, None)
    except OSError as exc:
        if m.fstype != b"sysfs" or exc.errno != _errno.EPERM:
            raise
        # sysfs cannot be mounted without a new network namespace (--net host):
        # bind the host's read-only instead, as runc does.
        sc.mount(b"/sys", target, None, sc.MS_BIND | sc.MS_REC, None)
        sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_REC, None)


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
        _mount_rootfs(plan)

        step = STEP_CGROUP
        go = os.read(plan.go_r, 2)  # "J", or "JS" from run(): written at once, read at once
        if not go.startswith(b"J"):
            os._exit(127)  # the parent went away or gave up on us
        # Normally empty (the parent moved us); else join now, while the files are reachable.
        for procs in plan.cgroup_procs:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

        if plan.cgroup_mount is not None:
            step = STEP_MOUNT
            _mount_cgroups(plan)

        step = STEP_HOOK
        run_child_hooks(plan, "createContainer", b"creating", host_pid)

        step = STEP_PIVOT
        _pivot_root(plan)
        if plan.unshare_flags & sc.CLONE_NEWCGROUP:
            step = STEP_CGROUP
            sc.unshare(sc.CLONE_NEWCGROUP)
        elif cgroup_ns_fd >= 0:
            step = STEP_JOIN
            sc.setns(cgroup_ns_fd, sc.CLONE_NEWCGROUP)
            os.close(cgroup_ns_fd)
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

        finish_and_exec(plan)
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


def _mount_rootfs(plan: ChildPlan) -> None:
    """Mount the container's rootfs and everything in it (still in the host's root)."""
    root = plan.rootfs
    # Stop our mounts from propagating back to the host, and the host's from reaching us.
    sc.mount(None, b"/", None, sc.MS_REC | plan.propagation, None)
    if plan.overlay_tmpfs is not None:
        # The writable layer lives in this mount namespace only: nothing of it on the host's
        # disk, gone when the namespace goes. Its pages are charged to whoever writes them,
        # i.e. the container's memory cgroup, and the tmpfs size caps it.
        sc.mount(b"tmpfs", root, b"tmpfs", 0, plan.overlay_tmpfs)
        for path, mode in plan.overlay_tmpfs_dirs:
            os.mkdir(path, mode)
        if plan.upper_owner is not None:
            os.chown(plan.overlay_tmpfs_dirs[0][0], *plan.upper_owner)
    elif plan.idmapped_lower:
        sc.mount(b"tmpfs", root, b"tmpfs", 0, b"size=64k,mode=700")  # only attach points
    for layer, attach_point in plan.idmapped_lower:
        # A copy of the layer's mount that shows its files through the container's id mapping
        # (host root's files as the container root's), in this mount namespace only.
        os.mkdir(attach_point, 0o700)
        fd = sc.open_tree(layer, sc.OPEN_TREE_CLONE)
        try:
            sc.mount_setattr(fd, sc.MOUNT_ATTR_IDMAP, userns_fd=plan.userns_fd)
            sc.move_mount(fd, attach_point)
        finally:
            os.close(fd)
    if plan.overlay_data is not None:
        sc.mount(b"overlay", root, b"overlay", 0, plan.overlay_data)
    else:
        # pivot_root needs the new root to be a mount point.
        sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC, None)

    for m in plan.mounts:
        try:
            target = secure_join(root, m.destination)
            _make_mountpoint(target, m.file_target)
            _mount_one(m, target)
            if m.propagation:
                sc.mount(None, target, None, m.propagation, None)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, b"mount " + m.destination) from None

    # Inside the rootfs, whatever the image made of /dev (a symlink to a host directory must
    # not get our device nodes there). mknod and symlink never follow a final symlink; the
    # mode is given whole (umask 0), so no chmod, which would follow one.
    dev = secure_join(root, b"/dev")
    umask = os.umask(0)
    try:
        for name, mode, major, minor in plan.devices:
            os.mknod(dev + b"/" + name, mode, os.makedev(major, minor))
    finally:
        os.umask(umask)
    for target, name in plan.dev_symlinks:
        os.symlink(target, dev + b"/" + name)
    if plan.spec_devices:
        umask = os.umask(0)
        try:
            for path, mode, major, minor, uid, gid in plan.spec_devices:
                target = secure_join(root, path)
                os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                if os.path.lexists(target):
                    os.unlink(target)  # one of the defaults above: the spec's says otherwise
                os.mknod(target, mode, os.makedev(major, minor))
                os.lchown(target, uid, gid)
        finally:
            os.umask(umask)

    for p in plan.masked_paths:
        target = secure_join(root, p)
        if os.path.isdir(target):
            sc.mount(b"tmpfs", target, b"tmpfs", sc.MS_RDONLY, None)
        elif os.path.exists(target):
            sc.mount(b"/dev/null", target, None, sc.MS_BIND, None)
    for p in plan.readonly_paths:
        target = secure_join(root, p)
        if os.path.exists(target):
            sc.mount(target, target, None, sc.MS_BIND | sc.MS_REC, None)
            sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_REC, None)


def _mount_cgroups(plan: ChildPlan) -> None:
    """The spec's cgroup mount: the container's own groups only (as runc does without a
    cgroup namespace on v1), never the host's hierarchy."""
    target = secure_join(plan.rootfs, plan.cgroup_mount)
    os.makedirs(target, 0o755, exist_ok=True)
    flags = plan.cgroup_mount_flags & (sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    try:
        if any(name for _, name in plan.cgroup_binds):  # v1: a tmpfs holding one dir per hierarchy
            sc.mount(b"tmpfs", target, b"tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, b"mode=755")
        for source, name in plan.cgroup_binds:
            point = target + b"/" + name if name else target
            os.makedirs(point, 0o755, exist_ok=True)
            sc.mount(source, point, None, sc.MS_BIND | sc.MS_REC, None)
            sc.mount(None, point, None, sc.MS_BIND | sc.MS_REMOUNT | flags, None)
        if any(name for _, name in plan.cgroup_binds) and flags & sc.MS_RDONLY:
            sc.mount(None, target, None, sc.MS_REMOUNT | flags, None)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, b"mount " + plan.cgroup_mount) from None


def _pivot_root(plan: ChildPlan) -> None:
    # pivot_root(".", ".") stacks the old root on top of the new one; detaching it then leaves
    # nothing of the host's filesystem reachable (no put_old directory needed, as in runc).
    os.chdir(plan.rootfs)
    sc.pivot_root(b".", b".")
    sc.umount2(b".", sc.MNT_DETACH)
    os.chdir(b"/")
    if plan.readonly_root:
        sc.mount(None, b"/", None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY, None)


def finish_and_exec(plan: ChildPlan) -> None:
    """Drop privileges and exec. Shared by container creation and `exec` into a container."""
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

        if plan.userns_fd >= 0:
            # From here on capabilities count in the container's user namespace only (and
            # our uid 0 is nobody there until setresuid below makes us its root).
            step = STEP_USERNS
            sc.setns(plan.userns_fd, sc.CLONE_NEWUSER)
            os.close(plan.userns_fd)

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
        if (switching or plan.userns_fd >= 0) and plan.pdeathsig:
            sc.prctl(sc.PR_SET_PDEATHSIG, plan.pdeathsig)  # a credential change clears it

        step = STEP_CAPS
        sc.capset(plan.cap_effective, plan.cap_permitted, plan.cap_inheritable)
        sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
        for cap in plan.cap_ambient:
            sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_RAISE, cap)
        if plan.no_new_privs:
            sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)

        step = STEP_EXEC
        os.umask(plan.umask)
        os.chdir(plan.cwd)
        program = _find_executable(plan.argv[0], plan.env.get(b"PATH", b"/usr/sbin:/usr/bin:/sbin:/bin"))

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


def _find_executable(name: bytes, search_path: bytes) -> bytes:
    """PATH lookup inside the container, so a missing binary fails before exec, not in init."""
    candidates = [name] if b"/" in name else [d + b"/" + name for d in search_path.split(b":") if d]
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise OSError(_errno.ENOENT, "executable not found in the container", name)


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
        return ContainerError(f"container {name}: {failure.message}: executable not found in the container")
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
            close_all_but({plan.status_w, plan.go_r, *plan.keep_fds, *(plan.stdio or ()), plan.userns_fd})
        child_main(plan)

    return fork_pid1(child, new_pid_ns)


def fork_pid1(child: Callable[[], None], new_pid_ns: bool) -> int:
    """Fork; the child runs `child()` (which must exec or _exit) as pid 1 of a new pid
    namespace when `new_pid_ns`. Returns the child's pid.

    The pid namespace is entered by unsharing CLONE_NEWPID in this thread just for the fork,
    so the child is pid 1 of the new namespace and our direct child (waitpid works); the
    thread's pid_for_children is restored right after.
    """
    own_pid_ns = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC) if new_pid_ns else -1
    try:
        if new_pid_ns:
            sc.unshare(sc.CLONE_NEWPID)
        pid = -1
        try:
            pid = os.fork()
        finally:
            if new_pid_ns and pid != 0:
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
