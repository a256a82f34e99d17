"""Creating a container, step by step: `Runtime.create` and `Runtime.run` are this.

    validate   name, spec, image, options: nothing is made for a bad request
    reserve    the name (its state dir, locked until the creation is over)
    userns     a host id range and the user namespace, when the spec has one
    slot       the slot's mount (slots.py), when asked for
    rootfs     overlay dirs (storage.py) or a tmpfs layer, or the spec's root as it is
    plan       stdio, init, ChildPlan (plan.py)
    child      forked (process.py: here or by the spawner); the handshake is child.py's
    cgroup     made while the child mounts its rootfs; on v1 the child joins it itself after
               "J" (a self-join spares the move's grace period: cgroups/v1.py), else it is
               moved in on a thread meanwhile
    network    the veth into the child's netns (bridge mode); with a move to make and a move
               primer (the fork-server's), before the cgroup instead
    record     the one save of state.json; then the move is awaited, and "J" (or "JS": run)
    handshake  "R", then "C" (created) or the exec (run)

Resource handling: every step registers its undo; on any failure they run in reverse, so a
failed creation leaves nothing behind (no state dir, id range, slot mount, layer, cgroup,
veth, lease or process). A crash before `record` leaves a reserved name, which `fcrun gc`
cleans up by name; the child dies with us or at the EOF of its go pipe. A crash after it
leaves a created container whose creator is gone, which gc settles (orphaned_created in
lifecycle.py). Each step has a crash point (crashpoints.py) where the crash suite kills us.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING

import msgspec

from ..crashpoints import crash_point
from ..errors import ContainerError, FcrunError, KernelError, MissingFeature, SpecError
from ..labels import APP_LABEL
from ..lazy import Logger
from ..logs.files import CURRENT, LogSettings, log_dir
from .child import ChildPlan
from .fork import ChildFailure, failure_to_error, read_status
from .container import Container
from .hooks import child_hook_state, hooks_of, oci_state, run_hooks, run_hooks_logged
from .options import ROOTFS_ANNOTATION
from .plan import build_plan, cgroup_settings, limits_from_spec
from .process import (
    SETUP_TIMEOUT_S, ChildHandle, child_report, make_userns, read_ready, send_go, start_child,
)
from .rootfs_setup import mounts_at, unmount_shared_rootfs
from .sealed import sealed_copy
from .slots import SLOT_OPTIONS, make_slot, release_slot
from .spec import Mount, Spec, network_mode, validate_spec
from .spec_resources import check_files, check_host, note_placed, write_setting
from .state import ContainerState, NetworkState, Rootfs, proc_start_time, validate_name
from .userns import map_text, namespace_mappings, range_mappings, root_host_ids

if TYPE_CHECKING:
    from ..images import Image
    from .lifecycle import Runtime

INIT_CANDIDATES = ("/usr/bin/tini-static",)  # static: the image may have no libc
VOLATILE_ROOTFS_DEFAULT_BYTES = 512 << 20  # its size cap when the container has no memory limit

log = Logger(__name__)


class CreateRequest(msgspec.Struct):
    """A checked request to create a container (see Runtime.create for the fields)."""

    name: str
    spec: Spec
    image: "Image | None"
    detach: bool
    stdio: tuple[int, int, int] | None
    init_path: str | None
    labels: dict[str, str]
    slot: str | None
    volatile_rootfs: bool
    start: bool  # run(): exec at once, no "created" stop
    slot_source: str | None = None  # mounted on the slot before the child starts (checked by validate)
    console_socket: int = -1  # the caller's: see Runtime.create


def validate(runtime: "Runtime", name: str, spec: Spec, *, image, detach: bool, stdio, init: bool, labels,
             slot: str | None, volatile_rootfs: bool | None, start: bool, console_socket: int = -1,
             slot_source: str | None = None) -> CreateRequest:
    """Check a creation's inputs before anything is made.

    Raises:
        SpecError: bad name, spec or options. NotFound: unknown image. MissingFeature: no init.
    """
    validate_name(name)
    validate_spec(spec)
    check_namespace_paths(spec)
    # Refuses what this host's cgroup version or hierarchies lack, naming the field.
    settings = cgroup_settings(spec, runtime.cgroups.version)
    check_host(settings, runtime.cgroups)
    if runtime.cgroups.version == 1:
        check_files(settings, runtime.cgroups, {})  # no blkio.weight without CFQ/BFQ, say
    if isinstance(image, str):
        image = runtime.images.get(image)
    if image is None and not os.path.isdir(spec.root.path):
        raise SpecError(f"root filesystem {spec.root.path!r} is not a directory", "$.root.path")
    if volatile_rootfs is None:
        volatile_rootfs = spec.annotations.get(ROOTFS_ANNOTATION, "") == "tmpfs"
    if volatile_rootfs and image is None:
        raise SpecError("a memory-backed rootfs (volatile_rootfs) needs an image", "volatile_rootfs")
    if slot_source is not None:
        if slot is None:
            raise SpecError("slot_source needs a slot to fill", "slot_source")
        runtime.check_slot_source(slot_source)  # a docroot rule broken: refused before anything is made
    return CreateRequest(name=name, spec=spec, image=image, detach=detach, stdio=stdio,
                         init_path=find_init() if init else None, labels=dict(labels or {}), slot=slot,
                         volatile_rootfs=volatile_rootfs, start=start, console_socket=console_socket,
                         slot_source=slot_source)


# linux.namespaces[].type -> the name /proc/PID/ns/ and nsfs give that kind of namespace.
NSFS_NAMES = {"network": "net", "ipc": "ipc", "uts": "uts", "mount": "mnt", "pid": "pid", "cgroup": "cgroup",
              "user": "user", "time": "time"}


def check_namespace_paths(spec: Spec) -> None:
    """Each namespace to join by path must be a namespace of its type (not any file).

    Raises:
        SpecError: naming the namespace's path and what it is instead.
    """
    for i, ns in enumerate(spec.linux.namespaces):
        if not ns.path:
            continue
        where = f"$.linux.namespaces[{i}].path"
        try:
            fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SpecError(f"{ns.type} namespace {ns.path!r}: [Errno {exc.errno}] {exc.strerror}", where) from None
        try:
            what = os.readlink(f"/proc/self/fd/{fd}")  # "net:[4026531992]" for a network namespace
        finally:
            os.close(fd)
        if not what.startswith(NSFS_NAMES[ns.type] + ":["):
            raise SpecError(f"{ns.path!r} is not a {ns.type} namespace (it is {what!r})", where)


def shared_rootfs_mount(state: ContainerState) -> tuple[bytes, bytes]:
    """(rootfs, path of the mount namespace it is bound in; b"": the runtime's) of a container
    without a mount namespace of its own, for rootfs_setup.unmount_shared_rootfs."""
    path = next((ns.path for ns in state.spec.linux.namespaces if ns.type == "mount"), "")
    return state.rootfs.mountpoint.encode(), path.encode()


def find_init() -> str:
    """A static init for pid 1: $FCRUN_INIT, else Debian's tini-static.

    Raises:
        MissingFeature: there is none.
    """
    override = os.environ.get("FCRUN_INIT")
    for path in ((override,) if override else INIT_CANDIDATES):
        if os.access(path, os.X_OK):
            return path
    raise MissingFeature("a static init for pid 1 (/usr/bin/tini-static)", "apt-get install tini, or pass init=False / --no-init")


class BackgroundMove:
    """`cgroup.add(pid)` on a thread of its own, awaited with wait(): where the child does not
    join its cgroup itself (v2; hooks before "J").

    A move into a cgroup takes the kernel's cgroup_threadgroup_rwsem for writing, which waits for
    an RCU grace period unless another move happened lately (v1 and v2 alike): 10-16 ms on this
    2-core VM, most of a lone start's own time (a serve's starts are seconds apart), measured with
    `perf trace` on the fork-server. The creation goes on meanwhile (the network, unless a move
    primer made this move a fast one and the network came first; the state save). The thread
    only writes cgroup.procs files: no fork, no setns (the network's setns is per thread, and
    its own)."""

    def __init__(self, cgroup, pid: int):
        import threading  # here: a creation whose child joins its cgroup itself starts no thread

        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._move, args=(cgroup, pid), name=f"cgroup-move-{pid}", daemon=True)
        self._thread.start()

    def _move(self, cgroup, pid: int) -> None:
        try:
            cgroup.add(pid)
        except BaseException as exc:  # re-raised by wait(), in the creating thread
            self._error = exc

    def wait(self) -> None:
        """Until the move is done. Raises what cgroup.add raised (KernelError)."""
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait_quietly(self) -> None:
        """Rollback: until the move is done, whatever it did (the cgroup's destroy follows)."""
        self._thread.join()


def write_cgroup_setting(path: str, value: str, where: str) -> None:
    """Write one of cgroup_settings' values.

    Raises:
        SpecError: the host's kernel has no such file (swap accounting off, no cfs burst),
            naming the spec's field. KernelError: the kernel refused the value.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SpecError(f"this host's kernel has no {os.path.basename(path)}: not supported here", where) from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise KernelError.from_oserror(f"write {value!r} to", path, exc) from None
    finally:
        os.close(fd)


class Creation:
    """One container being created: what is made so far, and the undo of each step.

    Resource handling: `run` either returns a Container that owns the handshake fds, or
    undoes everything and raises.
    """

    def __init__(self, runtime: "Runtime", request: CreateRequest):
        self.runtime = runtime
        self.request = request
        self.name = request.name
        self.undo = contextlib.ExitStack()
        self.state: ContainerState | None = None
        self.cdir = ""
        self.userns_fd = self.init_fd = -1
        self.root_ids: tuple[int, int] | None = None
        self.stdio = request.stdio
        self.child: ChildHandle | None = None
        # Hooks that run before "J" (the spec's hooks do not change during a creation).
        self.hooks_before_go = bool(hooks_of(request.spec, "prestart") or hooks_of(request.spec, "create_runtime"))
        # The child joins its cgroup itself where that is cheap (v1), unless those hooks must
        # see it there already (then the parent moves it: BackgroundMove).
        self.self_join = runtime.cgroups.self_join_is_cheap and not self.hooks_before_go

    def run(self) -> Container:
        """Create the container (and start it, for run()).

        Raises:
            AlreadyExists: name taken. KernelError/ContainerError: the kernel or the child
            failed; everything made so far is undone first.
        """
        self.cdir = self.runtime.states.reserve(self.name)
        self.undo.callback(self.runtime.states.remove, self.name)
        creating = contextlib.ExitStack()
        try:
            # Held until the creation is over, its rollback included: `rm -f` and `gc` of
            # another process wait for it instead of taking the reserved name for the leftover
            # of a crashed creation.
            creating.enter_context(self.runtime.states.locked(self.name))
            crash_point("create.reserved")
            self._make()
        except ChildFailure as failure:
            self.undo.close()
            raise failure_to_error(failure, self.name) from None
        except BaseException as exc:
            # The child may have died first and said why; its report beats our symptom of it
            # (a broken pipe, a vanished /proc/PID/ns/net).
            report = child_report(self.child.status_r) if self.child is not None else None
            self.undo.close()
            if report is not None:
                raise failure_to_error(report, self.name) from None
            if isinstance(exc, OSError) and not isinstance(exc, FcrunError):
                raise KernelError.from_oserror(f"create container {self.name}:", exc.filename or "", exc) from None
            raise
        finally:
            for fd in (self.init_fd, self.userns_fd):  # the child holds them now (or nobody does)
                if fd >= 0:
                    os.close(fd)
            creating.close()
        container = self._keep()
        crash_point("create.done")
        return container

    def _make(self) -> None:
        primer = None if self.self_join else self.runtime.move_primer
        if primer is not None:
            primer.prime()  # its grace period passes while we work (cgroups/primer.py)
        request = self.request
        self.state = ContainerState(
            name=self.name, status="creating", spec=request.spec, image=request.image.name if request.image else "",
            created_at=time.time(), detached=request.detach, labels=request.labels,
        )
        if any(ns.type == "user" for ns in self.state.spec.linux.namespaces):
            self._user_namespace()
        if request.slot is not None:
            self._slot(request.slot)
            crash_point("create.slot")
        self._rootfs()
        crash_point("create.rootfs")
        if not any(ns.type == "mount" and not ns.path for ns in self.state.spec.linux.namespaces):
            # The child binds the rootfs in a mount namespace that outlives it (rootfs_setup).
            rootfs, mount_ns = shared_rootfs_mount(self.state)
            self.undo.callback(unmount_shared_rootfs, rootfs, mount_ns, None if mount_ns else mounts_at(rootfs))
        if request.detach and self.stdio is None:
            self._log_stdio()
        self.child = start_child(self._plan(), self.runtime.spawner_mode)
        self.undo.callback(self.child.abandon)
        crash_point("create.spawned")
        self.state.pid = self.child.wait_pid()
        self.state.pid_start_time = proc_start_time(self.state.pid)
        go = b"JS" if request.start else b"J"
        bridge = network_mode(self.state.spec) == "bridge"
        if primer is not None:
            # The network first: the primer's grace period, begun with this creation, holds the
            # kernel's cgroup mutex until it ends, so cgroup work is better done late.
            self._network(bridge)
            move = self._cgroup()
            crash_point("create.cgroup")
        else:
            # The cgroup first: a move's own grace period passes while the network is made
            # (a child that joins itself has none to wait for).
            move = self._cgroup()
            crash_point("create.cgroup")
            self._network(bridge)
        ready = bridge
        if self.hooks_before_go:
            if not ready:
                read_ready(self.child.status_r, self.name)  # the namespaces the hooks act on exist
                ready = True
            move.wait()  # hooks see the container in its cgroup, and fork no child beside a thread
            run_hooks(self.state.spec, ("prestart", "create_runtime"), self._oci_state("creating"))
        # Saved before "go": a started container's command may run (and print) right after it,
        # and whoever sees its output must find its pid in the state, as runc's state is
        # written before its process execs.
        self._record()
        crash_point("create.saved")
        if move is not None:
            move.wait()  # nothing of the container runs outside its cgroup
        send_go(self.child.go_w, go, self.child.status_r)
        if not ready:
            read_ready(self.child.status_r, self.name)
        self._handshake()
        if request.start:
            run_hooks_logged(self.state.spec, "poststart", self._oci_state("running"), self.name)

    def _oci_state(self, status: str) -> bytes:
        return oci_state(self.name, self.state.spec, status, self.state.pid, self.state.labels)

    def _user_namespace(self) -> None:
        state = self.state
        spec = state.spec
        path = next(ns.path for ns in spec.linux.namespaces if ns.type == "user")
        if path:  # joined as it is: its id maps are its own (check_namespace_paths checked it)
            self.userns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            uid_mappings, gid_mappings = namespace_mappings(self.userns_fd)  # recorded, as runc does
            state.spec = spec = msgspec.structs.replace(spec, linux=msgspec.structs.replace(
                spec.linux, uid_mappings=uid_mappings, gid_mappings=gid_mappings))
            self.root_ids = root_host_ids(spec.linux)
            return
        if not spec.linux.uid_mappings:  # fcrun's choice: a host id range of its own
            base = self.runtime.id_ranges.allocate(self.name)
            self.undo.callback(self.runtime.id_ranges.release, base, self.name)
            state.spec = spec = msgspec.structs.replace(spec, linux=msgspec.structs.replace(
                spec.linux, uid_mappings=range_mappings(base), gid_mappings=range_mappings(base)))
        self.userns_fd = make_userns(map_text(spec.linux.uid_mappings), map_text(spec.linux.gid_mappings))
        self.root_ids = root_host_ids(spec.linux)

    def _slot(self, destination: str) -> None:
        self.undo.callback(release_slot, self.cdir)
        content = make_slot(self.cdir)
        if self.request.slot_source is not None:
            # Filled now, before the child binds its mounts: what fill_slot does once the
            # container runs, without a second lock, state read and save.
            with self.runtime.opened_slot_source(self.request.slot_source) as source_fd:
                self.runtime.mount_slot_source(self.state, self.request.slot_source, source_fd)
        spec = self.state.spec
        self.state.spec = msgspec.structs.replace(spec, mounts=[
            *spec.mounts, Mount(destination=destination, source=content, options=list(SLOT_OPTIONS))])

    def _rootfs(self) -> None:
        state, image = self.state, self.request.image
        if image is None:
            state.rootfs = Rootfs(mountpoint=os.path.abspath(state.spec.root.path))
            return
        # No mount point of its own: the child mounts the rootfs on the shared, always empty
        # dir inside its own mount namespace.
        storage = self.runtime.storage
        mountpoint = storage.rootfs_mountpoint()
        lower = list(reversed(image.layers))
        if self.request.volatile_rootfs:
            res = state.spec.linux.resources
            memory = res.memory.limit if res and res.memory and (res.memory.limit or 0) > 0 else None
            state.rootfs = Rootfs(
                mountpoint=mountpoint, lower=lower, upper=os.path.join(mountpoint, "upper"),
                work=os.path.join(mountpoint, "work"), tmpfs_bytes=memory or VOLATILE_ROOTFS_DEFAULT_BYTES,
            )
            return
        upper, work = storage.make_layer(self.name, self.root_ids)
        self.undo.callback(storage.remove, self.name)
        state.rootfs = Rootfs(mountpoint=mountpoint, lower=lower, upper=upper, work=work)

    def _log_stdio(self) -> None:
        """A detached container's stdio: /dev/null in, a pipe to its log writer out.

        The writer (fcrun.logs.writer) runs in our cgroup, not the container's, and keeps
        size-rotated files on disk under the data root: a file under the run root would be
        tmpfs, charged to the container's memory, unbounded, and gone with the container.
        """
        from ..logs.writer import start_writer  # a detached container's only: `fcrun run` skips its imports

        directory = log_dir(self.runtime.paths, self.name)
        log_fd = start_writer(directory, LogSettings.from_env(), app=self.state.labels.get(APP_LABEL, ""))
        self.undo.callback(os.close, log_fd)
        log_path = os.path.join(directory, CURRENT)
        null_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.undo.callback(os.close, null_fd)
        if self.root_ids is not None:
            # Its root may reopen it (Apache opens /dev/stderr, i.e. /proc/self/fd/2), which
            # checks the file's owner; the 0700 container dir keeps others out.
            os.fchown(log_fd, *self.root_ids)
        self.stdio = (null_fd, log_fd, log_fd)
        self.state.log_path = log_path

    def _plan(self) -> ChildPlan:
        if self.request.init_path:
            # A sealed memfd copy, not the host file: pid 1's /proc/1/exe is what the
            # container can reach (sealed.py).
            self.init_fd = sealed_copy(self.request.init_path)
        rootfs = self.state.rootfs
        spec, cgroups = self.state.spec, self.runtime.cgroups
        cgroup_dirs = cgroups.planned_paths(
            self.name, at=spec.linux.cgroups_path or None, extra=check_host(cgroup_settings(spec, cgroups.version), cgroups))
        return build_plan(
            self.state.spec,
            rootfs=rootfs.mountpoint,
            overlay_lower=rootfs.lower or None,
            overlay_upper=rootfs.upper,
            overlay_work=rootfs.work,
            overlay_tmpfs_bytes=rootfs.tmpfs_bytes,
            # Joined by the child after "J", or the parent moves it (_cgroup) beside its mounts.
            cgroup_procs=cgroups.join_files(cgroup_dirs) if self.self_join else [],
            cap_last=self.runtime.cap_last,
            attached=not self.request.detach,
            init_fd=self.init_fd,
            stdio=self.stdio,
            console_socket=self.request.console_socket,
            seccomp_cache=self.runtime.paths.seccomp_cache,
            userns_fd=self.userns_fd,
            upper_owner=self.root_ids,
            hook_state=child_hook_state(self.name, self.state.spec, self.state.labels),
            cgroup_dirs=cgroup_dirs,
        )

    def _cgroup(self) -> BackgroundMove | None:
        """Make the container's cgroup, while the child mounts its rootfs, and start moving the
        child in (awaited before "go": the state is saved meanwhile), unless it joins itself
        (None).
        """
        state, cgroups = self.state, self.runtime.cgroups
        settings = cgroup_settings(state.spec, cgroups.version)
        # linux.cgroupsPath places the group (cgroups/placement.py); the extra controllers
        # (cpuset, blkio...) are joined only when a setting needs them.
        at, extra = state.spec.linux.cgroups_path or None, check_host(settings, cgroups)
        if at:  # found by its name otherwise, should we die before the state is saved
            note_placed(self.runtime.states.dir(self.name), cgroups.planned_paths(self.name, at=at, extra=extra))
        cgroup = cgroups.create(self.name, limits_from_spec(state.spec), at=at, extra=extra)
        self.undo.callback(cgroup.destroy)
        for controller, file, value, where in settings:
            write_setting(cgroup.paths[controller], file, value, where)
        state.cgroup_version = cgroups.version
        state.cgroup_paths = dict(cgroup.paths)
        state.cgroup_created = cgroup.created
        if self.self_join:
            return None
        move = BackgroundMove(cgroup, state.pid)
        self.undo.callback(move.wait_quietly)  # settled before the cgroup is destroyed
        return move

    def _network(self, bridge: bool) -> None:
        if bridge:
            self._bridge_network()
        else:
            self.state.network = NetworkState(mode=network_mode(self.state.spec))
        crash_point("create.network")

    def _bridge_network(self) -> None:
        """Once the child's namespaces exist ("R"), move a veth into its netns."""
        read_ready(self.child.status_r, self.name)
        network = self.runtime.network
        netns_fd = os.open(f"/proc/{self.state.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # A failed creation changes nothing: not even a bridge this attach made.
            self.undo.callback(self._remove_bridge_quietly)
            self.undo.callback(network.detach, self.name)
            att = network.attach(self.name, netns_fd)
        finally:
            os.close(netns_fd)
        self.state.network = NetworkState(
            mode="bridge", ip=att.ip, prefixlen=att.prefixlen, gateway=att.gateway,
            host_ifname=att.host_ifname, bridge=att.bridge,
        )

    def _remove_bridge_quietly(self) -> None:
        try:
            self.runtime.network.remove_bridge_if_unused()
        except (FcrunError, OSError) as exc:  # a rollback goes on; the next gc tries again
            log.warning("container %s: rollback: remove bridge: %s", self.name, exc)

    def _record(self) -> None:
        """The one save of a creation, made while the child may still mount its rootfs, with the
        status it has once the handshake completes; if it does not, the rollback removes it again."""
        self.state.status = "running" if self.request.start else "created"
        self.state.started_at = time.time() if self.request.start else 0.0
        self.runtime.states.save(self.state)

    def _handshake(self) -> None:
        status_r = self.child.status_r
        if self.request.start:  # the child got "JS": no "C", the next news is the exec
            if read_status(status_r, SETUP_TIMEOUT_S) != b"":
                raise ContainerError(f"container {self.name}: unexpected message from its setup")
        elif read_status(status_r, SETUP_TIMEOUT_S) != b"C":
            raise ContainerError(f"container {self.name}: setup ended before the rootfs was ready")

    def _keep(self) -> Container:
        """Success: keep what was made; only the parent's copies of the log's fds go."""
        self.undo.pop_all()
        if self.stdio is not None and self.state.log_path:
            for fd in set(self.stdio):
                os.close(fd)
        child = self.child
        report_r = child.claim()  # the container exists: now the spawner may be told
        if self.request.start:
            os.close(child.status_r)
            os.close(child.go_w)
            return Container(self.runtime, self.state, report_r=report_r)
        return Container(self.runtime, self.state, child.status_r, child.go_w, report_r)
