"""The container runtime: create, start, kill, delete, freeze, thaw, update, exec, list, gc.

`Runtime` is the library's entry point and what the CLI calls. Every operation loads the
container's persisted state, checks the lifecycle table (state.ALLOWED), acts, and saves, so
any fcrun process can manage a container another one created.

Resource handling: `create` registers an undo step for everything it makes (run dir, upper
dir, cgroup, child process, veth + lease) and runs them in reverse on any failure, so a
failed creation leaves nothing behind.

Who forks: from a process's second container on, a spawner (spawner.py) does, from a small
address space and ahead of time; the first is forked here, so that a one-shot `fcrun run`
does not pay for starting one. Either way the child and the handshake are spawn.py's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from . import spawner
from .. import syscalls as sc
from ..cgroups import Cgroup, CgroupDriver, Limits, detect
from ..cgroups.devices import DeviceRule
from ..docroot import DEFAULT_DOCROOT_ROOTS, attach_docroot, open_docroot
from ..errors import ContainerError, FcrunError, IncorrectStatus, KernelError, MissingFeature, NotFound, NotPermitted, SpecError
from .spec import Mount, Spec, network_mode, validate_spec
from ..paths import DEFAULT_BRIDGE, DEFAULT_CGROUP_PARENT, DEFAULT_SUBNET, Paths
from .options import ROOTFS_ANNOTATION
from .plan import build_plan
from .sealed import sealed_copy
from .child import ChildFailure, ChildPlan, _finish_and_exec, failure_to_error, fork_child, read_status
from .state import ContainerState, NetworkState, Rootfs, StateStore, check_allowed, pid_alive, proc_start_time, validate_name
from .userns import IdRanges, is_fcrun_range, make_userns, range_mappings, root_host_ids

INIT_CANDIDATES = ("/usr/bin/tini-static",)  # static: the image may have no libc
SETUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SLOT_SOURCE_LABEL = "fcrun.slot.source"  # what fill_slot mounted (a slot is filled once)
VOLATILE_ROOTFS_DEFAULT_BYTES = 512 << 20  # its size cap when the container has no memory limit
ROOTFS_MOUNTPOINT = "rootfs"  # under the run root: where every child mounts its rootfs, in its own mount ns


@dataclass
class ContainerInfo:
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

    Resource handling: the process that created a container is its parent and should `wait()`
    for it (or `Runtime.delete` it), or it stays a zombie until this process exits.
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
        """Let the created container exec its process. Raises ContainerError if exec fails."""
        check_allowed("start", self.name, self.state.status)
        if self._go_w < 0:
            raise IncorrectStatus(f"container {self.name!r} was created by another process; it cannot be started from here")
        try:
            _send(self._go_w, b"S", self._status_r)
            read_status(self._status_r, SETUP_TIMEOUT_S)  # b"" (EOF): the exec happened
        except ChildFailure as failure:
            self._close_fds()
            self.runtime._discard(self.state)
            raise failure_to_error(failure, self.name) from None
        except BaseException:
            self._close_fds()
            self.runtime._discard(self.state)
            raise
        self._close_fds()
        self.state.status = "running"
        self.state.started_at = time.time()
        self.runtime.states.save(self.state)

    def wait(self) -> int:
        """Wait for pid 1 to exit; returns its exit code (128+N when killed by signal N)."""
        if self._report_r >= 0:
            status = _wait_report(self._report_r, self.state.pid)
            self._close_report()
            if status is None:
                # The spawner died without telling. An attached container died with it
                # (PDEATHSIG=SIGKILL); a detached one lives on, re-parented: wait for it.
                _wait_exit(self.state)
                if not self.state.detached:
                    status = signal.SIGKILL
                else:
                    return self.runtime._refresh(self.state).exit_code or 0
        else:
            try:
                _, status = os.waitpid(self.state.pid, 0)
            except ChildProcessError:  # not our child (the spawner is gone): wait all the same
                _wait_exit(self.state)
                return self.runtime._refresh(self.state).exit_code or 0
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
        with contextlib.suppress(NotFound, FileNotFoundError):
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


class Runtime:
    """Creates and manages containers under one pair of state roots.

    Args:
        paths: data and run roots (default: from FCRUN_ROOT / FCRUN_RUN or /var/lib/fcrun, /run/fcrun).
        cgroup_parent: relative name created beneath fcrun's own cgroup, or an absolute cgroup path.
        bridge, subnet: the bridge network containers with network="bridge" join.
        spawner: fork containers through a small helper process (spawner.py), which makes
            them start faster. None (default, or $FCRUN_SPAWNER unset): from the process's
            second container on; True ("1"): always; False ("0"): never.
        docroot_roots: the only directories under which `fill_slot` takes a source (see
            docroot.py; serve's `docroot_roots` setting).
    """

    def __init__(
        self,
        paths: Paths | None = None,
        *,
        cgroup_parent: str = DEFAULT_CGROUP_PARENT,
        bridge: str = DEFAULT_BRIDGE,
        subnet: str = DEFAULT_SUBNET,
        spawner: bool | None = None,
        docroot_roots: Sequence[str] = DEFAULT_DOCROOT_ROOTS,
    ):
        self.paths = paths or Paths.from_env()
        if spawner is None:
            spawner = {"0": False, "1": True}.get(os.environ.get("FCRUN_SPAWNER", ""))
        self.spawner_mode = spawner
        self.docroot_roots = tuple(docroot_roots)
        self.states = StateStore(self.paths.containers)
        self.id_ranges = IdRanges(os.path.join(self.paths.run_root, "idmap"))
        self._storage_root_checked = False
        self.cgroup_parent = cgroup_parent
        self.bridge = bridge
        self.subnet = subnet
        self._cgroups: CgroupDriver | None = None
        self._network = None
        self._images = None
        self._cap_last: int | None = None
        self._loaded_cgroups: dict[tuple, Cgroup] = {}

    # ----- collaborators, made on first use -------------------------------------------------

    @property
    def cgroups(self) -> CgroupDriver:
        if self._cgroups is None:
            self._cgroups = detect(parent=self.cgroup_parent)
        return self._cgroups

    @property
    def network(self):
        if self._network is None:
            from ..network import BridgeNetwork

            self._network = BridgeNetwork(self.paths.network, bridge=self.bridge, subnet=self.subnet)
        return self._network

    @property
    def images(self):
        if self._images is None:
            from ..images import ImageStore

            self._images = ImageStore(self.paths)
        return self._images

    # ----- create / start / run -------------------------------------------------------------

    def create(
        self,
        name: str,
        spec: Spec,
        *,
        image=None,
        detach: bool = False,
        stdio: tuple[int, int, int] | None = None,
        init: bool = True,
        labels: dict[str, str] | None = None,
        slot: str | None = None,
        volatile_rootfs: bool | None = None,
        _start: bool = False,
    ) -> Container:
        """Create a container: namespaces, rootfs, cgroup and network ready; process not yet run.

        `image` (an images.Image or its name) gives the overlay lower dirs; without it,
        spec.root.path must be an existing directory used as the root as it is.

        `slot`: a directory inside the container (e.g. a web server's docroot) that stays empty
        and read-only until `fill_slot` mounts a host directory there, while the container runs.
        The pool of pre-started app servers (forkserver/pool.py) is built on it.

        `volatile_rootfs` (None: the spec's "org.fcrun.rootfs" annotation, "tmpfs" meaning
        True): the writable layer is a tmpfs the child mounts in the container's own mount
        namespace, instead of an upper dir under the data root: nothing of the rootfs is
        written to disk, and whatever the container writes there is gone when it stops. It
        holds at most the container's memory limit (else VOLATILE_ROOTFS_DEFAULT_BYTES), and
        its pages count against the container's memory cgroup.

        Raises:
            SpecError: bad name or spec. AlreadyExists: name taken. NotFound: unknown image.
            NotPermitted: not root. KernelError/ContainerError: the kernel or the child failed;
            everything made so far is undone first.
        """
        require_root()
        validate_name(name)
        validate_spec(spec)
        if isinstance(image, str):
            image = self.images.get(image)
        if image is None and not os.path.isdir(spec.root.path):
            raise SpecError(f"root filesystem {spec.root.path!r} is not a directory", "$.root.path")
        mode = network_mode(spec)
        if volatile_rootfs is None:
            volatile_rootfs = spec.annotations.get(ROOTFS_ANNOTATION, "") == "tmpfs"
        if volatile_rootfs and image is None:
            raise SpecError("a memory-backed rootfs (volatile_rootfs) needs an image", "volatile_rootfs")
        init_path = _find_init() if init else None
        userns = any(ns.type == "user" for ns in spec.linux.namespaces)

        cdir = self.states.reserve(name)
        creating = contextlib.ExitStack()
        undo = contextlib.ExitStack()
        undo.callback(self.states.remove, name)
        init_fd = status_r = userns_fd = -1
        root_ids = None
        try:
            # Held until the creation is over: `rm -f` and `gc` of another process wait for
            # it instead of taking the reserved name for the leftover of a crashed creation.
            creating.enter_context(self.states.locked(name))
            state = ContainerState(
                name=name, status="creating", spec=spec, image=image.name if image else "",
                created_at=time.time(), detached=detach, labels=dict(labels or {}),
            )
            if userns:
                if not spec.linux.uid_mappings:  # fcrun's choice: a host id range of its own
                    base = self.id_ranges.allocate(name)
                    undo.callback(self.id_ranges.release, base, name)
                    state.spec = spec = msgspec.structs.replace(spec, linux=msgspec.structs.replace(
                        spec.linux, uid_mappings=range_mappings(base), gid_mappings=range_mappings(base)))
                userns_fd = make_userns(spec.linux.uid_mappings, spec.linux.gid_mappings)
                root_ids = root_host_ids(spec.linux)
            if slot is not None:
                undo.callback(_release_slot, cdir)
                content = _make_slot(cdir)
                state.spec = spec = msgspec.structs.replace(spec, mounts=[*spec.mounts, Mount(
                    destination=slot, source=content, options=["bind", "ro", "nosuid", "nodev", "noexec"])])
            if image is not None:
                # No mount point of its own: the child mounts the rootfs on the shared, always
                # empty dir inside its own mount namespace (a mkdir and rmdir fewer per container).
                mountpoint = self._rootfs_mountpoint()
                lower = list(reversed(image.layers))
                if volatile_rootfs:
                    res = spec.linux.resources
                    state.rootfs = Rootfs(
                        mountpoint=mountpoint, lower=lower, upper=os.path.join(mountpoint, "upper"),
                        work=os.path.join(mountpoint, "work"),
                        tmpfs_bytes=(res.memory.limit if res and res.memory and (res.memory.limit or 0) > 0 else VOLATILE_ROOTFS_DEFAULT_BYTES),
                    )
                else:
                    storage = os.path.join(self._storage_root(), name)
                    # Root-only from the top: a container's files (a setuid copy of a shell,
                    # say) must be out of every host user's reach. upper itself stays 0755,
                    # since overlayfs shows it as the container's "/".
                    os.mkdir(storage, 0o700)
                    undo.callback(shutil.rmtree, storage, True)
                    os.mkdir(os.path.join(storage, "upper"))
                    os.chmod(os.path.join(storage, "upper"), 0o755)  # mkdir obeys the umask
                    if root_ids is not None:
                        os.chown(os.path.join(storage, "upper"), *root_ids)
                    os.mkdir(os.path.join(storage, "work"), 0o700)
                    state.rootfs = Rootfs(
                        mountpoint=mountpoint, lower=lower,
                        upper=os.path.join(storage, "upper"), work=os.path.join(storage, "work"),
                    )
            else:
                state.rootfs = Rootfs(mountpoint=os.path.abspath(spec.root.path))

            if detach and stdio is None:
                log_fd = os.open(os.path.join(cdir, "output.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                null_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                undo.callback(os.close, log_fd)
                if root_ids is not None:
                    # Its root may reopen it (Apache opens /dev/stderr, i.e. /proc/self/fd/2),
                    # which checks the file's owner; the 0700 container dir keeps others out.
                    os.fchown(log_fd, *root_ids)
                undo.callback(os.close, null_fd)
                stdio = (null_fd, log_fd, log_fd)
                state.log_path = os.path.join(cdir, "output.log")
            if init_path:
                # A sealed memfd copy, not the host file: pid 1's /proc/1/exe is what the
                # container can reach (sealed.py).
                init_fd = sealed_copy(init_path)
            plan = build_plan(
                spec,
                rootfs=state.rootfs.mountpoint,
                overlay_lower=state.rootfs.lower or None,
                overlay_upper=state.rootfs.upper,
                overlay_work=state.rootfs.work,
                overlay_tmpfs_bytes=state.rootfs.tmpfs_bytes,
                cgroup_procs=[],  # the parent moves the child (below), in parallel with its mounts
                cap_last=self._cap_last_cached(),
                attached=not detach,
                init_fd=init_fd,
                stdio=stdio,
                userns_fd=userns_fd,
                upper_owner=root_ids,
            )
            child = self._start_child(plan)
            undo.callback(child.abandon)
            status_r, go_w = child.status_r, child.go_w
            # While the child mounts its rootfs, make its cgroup and move it in. On cgroup v1
            # the move waits for an RCU grace period when no other move happened lately
            # (4-13 ms here): better spent now, alongside the child's mounts, than after.
            cgroup = self.cgroups.create(name, limits_from_spec(spec))
            undo.callback(cgroup.destroy)
            state.cgroup_version = self.cgroups.version
            state.cgroup_paths = dict(cgroup.paths)
            pid = child.wait_pid()
            state.pid = pid
            state.pid_start_time = proc_start_time(pid)
            cgroup.add(pid)
            state.network = NetworkState(mode=mode)
            go = b"JS" if _start else b"J"
            if mode != "bridge":
                _send(go_w, go, status_r)
            else:
                _read_ready(status_r, name)
                netns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    # A failed creation changes nothing: not even a bridge this attach made.
                    undo.callback(self._remove_bridge_quietly)
                    undo.callback(self.network.detach, name)
                    att = self.network.attach(name, netns_fd)
                finally:
                    os.close(netns_fd)
                state.network = NetworkState(
                    mode=mode, ip=att.ip, prefixlen=att.prefixlen, gateway=att.gateway,
                    host_ifname=att.host_ifname, bridge=att.bridge,
                )
                _send(go_w, go, status_r)
            # The one save of a creation, made while the child mounts its rootfs, with the
            # status it has once the handshake below completes; if it does not, the rollback
            # removes the state again. A crash before this save leaves a reserved name, which
            # `fcrun gc` cleans up by name (cgroup, storage, lease); the child dies with us or
            # at the EOF of its go pipe.
            state.status = "running" if _start else "created"
            state.started_at = time.time() if _start else 0.0
            self.states.save(state)
            if mode != "bridge":
                _read_ready(status_r, name)
            if _start:  # the child got "JS": no "C", the next news is the exec
                if read_status(status_r, SETUP_TIMEOUT_S) != b"":
                    raise ContainerError(f"container {name}: unexpected message from its setup")
            elif read_status(status_r, SETUP_TIMEOUT_S) != b"C":
                raise ContainerError(f"container {name}: setup ended before the rootfs was ready")
        except ChildFailure as failure:
            undo.close()
            raise failure_to_error(failure, name) from None
        except BaseException as exc:
            # The child may have died first and said why; its report beats our symptom of it
            # (a broken pipe, a vanished /proc/PID/ns/net).
            report = _child_report(status_r) if status_r >= 0 else None
            undo.close()
            if report is not None:
                raise failure_to_error(report, name) from None
            if isinstance(exc, OSError) and not isinstance(exc, FcrunError):
                raise KernelError.from_oserror(f"create container {name}:", exc.filename or "", exc) from None
            raise
        finally:
            if init_fd >= 0:
                os.close(init_fd)
            if userns_fd >= 0:
                os.close(userns_fd)  # the child holds the namespace now (or nobody does)
            creating.close()
        # Success: keep what was made; only the parent's copies of stdio fds go.
        undo.pop_all()
        if stdio is not None and state.log_path:
            for fd in set(stdio):
                os.close(fd)
        report_r = child.claim()  # the container exists: now the spawner may be told
        if _start:
            os.close(status_r)
            os.close(go_w)
            return Container(self, state, report_r=report_r)
        return Container(self, state, status_r, go_w, report_r)

    def _storage_root(self) -> str:
        """<data root>/containers, the writable layers' parent: made 0700, and made so again
        if an older fcrun left it open (checked once per Runtime)."""
        path = os.path.join(self.paths.data_root, "containers")
        if not self._storage_root_checked:
            os.makedirs(path, 0o700, exist_ok=True)
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, 0o700)
            self._storage_root_checked = True
        return path

    def _rootfs_mountpoint(self) -> str:
        """The run root's shared mount point for rootfs overlays, made on first use.

        Each child mounts its rootfs there inside its own mount namespace (propagation to the
        host is cut first), so the host never sees a mount on it and it stays empty.
        """
        path = os.path.join(self.paths.run_root, ROOTFS_MOUNTPOINT)
        if not os.path.isdir(path):
            os.makedirs(path, 0o755, exist_ok=True)
        return path

    def _start_child(self, plan: ChildPlan) -> "_Child":
        """Fork the container child: through the spawner when there is one, else from here."""
        for _ in range(2):
            client = spawner.for_create(self.spawner_mode)
            if client is None:
                break
            try:
                pid, status_r, go_w, report_r = client.send(plan, new_pid_ns=True)
                return _Child(status_r, go_w, report_r, pid, client if report_r < 0 else None)
            except spawner.SpawnerGone:
                spawner.discard(client)  # killed, or exited: a new one, or we fork this one
        pid, status_r, go_w = fork_child(plan, new_pid_ns=True)
        return _Child(status_r, go_w, pid=pid)

    def run(self, name: str, spec: Spec, **kwargs) -> Container:
        """create + start. Returns the running container (call .wait() for its exit code)."""
        return self.create(name, spec, _start=True, **kwargs)

    # ----- queries -------------------------------------------------------------------------

    def state(self, name: str) -> ContainerState:
        """The container's state, with its status checked against the live process and cgroup."""
        return self._refresh(self.states.load(name))

    def list(self) -> list[ContainerInfo]:
        rows = []
        for name in self.states.names():
            try:
                st = self.state(name)
            except (NotFound, msgspec.DecodeError):
                continue
            res = st.spec.linux.resources
            cpu = None
            if res and res.cpu and res.cpu.quota:
                cpu = res.cpu.quota / (res.cpu.period or 100_000)
            rows.append(ContainerInfo(
                name=st.name, status=st.status, pid=st.pid if st.status != "stopped" else 0,
                ip=st.network.ip if st.network else "",
                cpu=cpu, memory_bytes=res.memory.limit if res and res.memory else None,
                pids_max=res.pids.limit if res and res.pids else None,
                image=st.image, created_at=st.created_at, labels=st.labels,
                memory_used_bytes=self._memory_used(st),
            ))
        return rows

    def _memory_used(self, state: ContainerState) -> int | None:
        if state.status not in ("running", "frozen", "created") or not state.cgroup_paths:
            return None
        try:
            return self._cgroup(state).stats().memory_bytes
        except (FcrunError, OSError):
            return None

    def _refresh(self, state: ContainerState) -> ContainerState:
        if state.status in ("running", "frozen", "created"):
            if not pid_alive(state):
                state.status = "stopped"
                with contextlib.suppress(OSError):
                    self.states.save(state)
            elif state.cgroup_paths:
                with contextlib.suppress(OSError, FcrunError):
                    frozen = self._cgroup(state).is_frozen()
                    state.status = "frozen" if frozen else ("running" if state.status == "frozen" else state.status)
        return state

    def _cgroup(self, state: ContainerState) -> Cgroup:
        # load() re-checks persisted paths (they may come from another process's state file):
        # 0.15 ms, several times per operation. The checked result is kept: a Cgroup holds no
        # more than its driver and paths, which never change for a given set of paths.
        key = tuple(sorted(state.cgroup_paths.items()))
        cgroup = self._loaded_cgroups.get(key)
        if cgroup is None:
            if len(self._loaded_cgroups) >= 4096:
                self._loaded_cgroups.clear()
            cgroup = self._loaded_cgroups[key] = self.cgroups.load(state.cgroup_paths)
        return cgroup

    # ----- operations on existing containers -----------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Send a signal to the container's pid 1 (SIGKILL ends the whole pid namespace)."""
        with self.states.locked(name):
            state = self.state(name)
            check_allowed("kill", name, state.status)
            try:
                os.kill(state.pid, sig)
            except ProcessLookupError:
                return
            if sig == signal.SIGKILL and state.status == "frozen":
                self._cgroup(state).thaw()  # a frozen task cannot act on SIGKILL under cgroup v1

    def freeze(self, name: str) -> None:
        with self.states.locked(name):
            state = self.state(name)
            check_allowed("freeze", name, state.status)
            self._cgroup(state).freeze()
            state.status = "frozen"
            self.states.save(state)

    def thaw(self, name: str) -> None:
        with self.states.locked(name):
            state = self.state(name)
            check_allowed("thaw", name, state.status)
            self._cgroup(state).thaw()
            state.status = "running"
            self.states.save(state)

    def update(self, name: str, *, cpu: float | None = None, memory_bytes: int | None = None, pids_max: int | None = None) -> ContainerState:
        """Change limits of a live container; only the given ones change."""
        with self.states.locked(name):
            state = self.state(name)
            check_allowed("update", name, state.status)
            self._set_limits(state, cpu, memory_bytes, pids_max)
            self.states.save(state)
            return state

    def _set_limits(self, state: ContainerState, cpu: float | None, memory_bytes: int | None,
                    pids_max: int | None) -> None:
        from .spec import CpuResources, MemoryResources, PidsResources, Resources
        from ..units import CPU_PERIOD_US, cpu_to_quota_us

        res = state.spec.linux.resources or Resources()
        if cpu is not None:
            period = res.cpu.period if res.cpu and res.cpu.period else CPU_PERIOD_US
            res.cpu = CpuResources(quota=cpu_to_quota_us(cpu, period), period=period)
        if memory_bytes is not None:
            res.memory = MemoryResources(limit=memory_bytes)
        if pids_max is not None:
            res.pids = PidsResources(limit=pids_max)
        fields = []
        if cpu is not None:
            fields += ["cpu_quota_us", "cpu_period_us"]  # both known: no read of the kernel's first
        if memory_bytes is not None:
            fields.append("memory_bytes")
        if pids_max is not None:
            fields.append("pids_max")
        self._cgroup(state).update(limits_from_spec(msgspec.structs.replace(
            state.spec, linux=msgspec.structs.replace(state.spec.linux, resources=res))), fields, read_back=False)
        state.spec.linux.resources = res

    def fill_slot(self, name: str, source: str) -> None:
        """Mount host directory `source` on the container's slot (see create), live.

        `source` must follow docroot.py's rules: strictly under one of `docroot_roots`, reached
        through no symlink, clear of fcrun's own roots. It is opened once, and that directory
        is what is mounted: a recursive, detached copy made read-only, nosuid, nodev and noexec
        (every submount too) before it is attached, so the container never sees it without
        those flags; it reaches the container through mount propagation (the slot is the
        master of the container's mount). A slot is filled once: a container that served one
        app's files never gets another's.

        Raises:
            SpecError: `source` breaks a docroot rule. IncorrectStatus: no slot, already filled,
            or the container is not running or frozen. KernelError: the kernel refused.
        """
        require_root()
        self._check_slot_source(source)
        with self.states.locked(name):
            state = self.state(name)
            check_allowed("update", name, state.status)
            self._fill_slot(state, source)
            self.states.save(state)

    def _fill_slot(self, state: ContainerState, source: str) -> None:
        name = state.name
        content = os.path.join(self.states.dir(name), "slot", "content")
        if not os.path.isdir(content):
            raise IncorrectStatus(f"container {name!r} has no slot (create it with slot=...)")
        if SLOT_SOURCE_LABEL in state.labels:
            raise IncorrectStatus(f"the slot of container {name!r} is already filled from {state.labels[SLOT_SOURCE_LABEL]}")
        fd = self._open_slot_source(source)  # again: the path may have changed since any check
        try:
            attach_docroot(fd, content)
        finally:
            os.close(fd)
        state.labels[SLOT_SOURCE_LABEL] = source

    def _open_slot_source(self, source: str) -> int:
        """An O_PATH fd of `source` if it may fill a slot (docroot.open_docroot); the caller closes it."""
        return open_docroot(source, self.docroot_roots, (self.paths.data_root, self.paths.run_root), "source")

    def _check_slot_source(self, source: str) -> None:
        os.close(self._open_slot_source(source))

    def slot_dir(self, name: str) -> str:
        """The host directory behind a container's empty slot (what it shows until fill_slot).
        Files put there are visible, read-only, in the container, and hidden once it is filled."""
        return os.path.join(self.states.dir(name), "slot", "content")

    def hand_over(self, name: str, *, cpu: float | None = None, memory_bytes: int | None = None,
                  pids_max: int | None = None,
                  slot_source: str | None = None, labels: dict[str, str] | None = None,
                  thaw: bool = False) -> ContainerState:
        """update + fill_slot + label + thaw in one step (one lock, one state read and write):
        how a frozen pooled instance becomes an app's. Either everything given is applied, or
        an error is raised and the caller should discard the container (a limit or the slot
        may already be applied)."""
        if slot_source is not None:
            self._check_slot_source(slot_source)
        with self.states.locked(name):
            state = self.state(name)
            check_allowed("update", name, state.status)
            if cpu is not None or memory_bytes is not None or pids_max is not None:
                self._set_limits(state, cpu, memory_bytes, pids_max)
            if slot_source is not None:
                self._fill_slot(state, slot_source)
            state.labels.update(labels or {})
            if thaw and state.status == "frozen":
                self._cgroup(state).thaw()
                state.status = "running"
            self.states.save(state)
            return state

    def label(self, name: str, labels: dict[str, str]) -> ContainerState:
        """Add or change labels of a container (a pooled instance becomes an app's, say)."""
        with self.states.locked(name):
            state = self.state(name)
            state.labels.update(labels)
            self.states.save(state)
            return state

    def delete(self, name: str, force: bool = False, *, locked: Callable[[], object] | None = None) -> None:
        """Remove a stopped container (force: kill it first) and everything it held.

        `locked`: called once the container's lock is held, before anything is removed. The
        fork-server answers a Run's client there: from then on whoever wants the name waits
        for the removal (StateStore.reserve), so the client need not wait for it.
        """
        require_root()
        with self.states.locked(name):
            state = self.state(name)
            if state.status != "stopped" and state.status != "creating" and not force:
                raise IncorrectStatus(f"cannot remove container {name!r}: it is {state.status} (stop it first, or use rm -f)")
            if locked is not None:
                locked()
            self._teardown(state)

    def _teardown(self, state: ContainerState) -> None:
        cdir = self.states.dir(state.name)
        if os.path.lexists(os.path.join(cdir, "slot")):  # most containers have none: spare the look
            _release_slot(cdir)  # first: nothing below may reach into it
        if pid_alive(state):
            _kill_quietly(state.pid)
            if state.status == "frozen" and state.cgroup_paths:
                with contextlib.suppress(FcrunError, OSError):
                    self._cgroup(state).thaw()
            _wait_gone(state)
        _reap(state.pid)
        if state.cgroup_paths:
            self._remove_cgroup(state)
        elif state.status == "creating":
            # A creation that crashed before its state was saved: its cgroup, if it got one,
            # has the container's name under our parent.
            cgroup = self.cgroups.load(self.cgroups.paths_for(state.name))
            if cgroup.exists():
                cgroup.destroy()
        if state.network and state.network.mode == "bridge":
            # Every process is gone, so the netns is being destroyed and the kernel deletes the
            # veth with it; deleting it ourselves would wait ~15 ms for RCU.
            self.network.detach(state.name, netns_gone=True)
        if not (state.rootfs and state.rootfs.tmpfs_bytes):  # a tmpfs layer went with the mount ns
            _remove_storage(os.path.join(self.paths.data_root, "containers", state.name))
        if is_fcrun_range(state.spec.linux.uid_mappings):
            self.id_ranges.release(state.spec.linux.uid_mappings[0].host_id, state.name)
        self.states.remove(state.name)
        if not self.states.names():
            # The last container is gone: leave no empty `fcrun` cgroup parent behind either
            # (the bridge goes with its last lease). A concurrent create re-makes it.
            with contextlib.suppress(FcrunError, OSError):
                self.cgroups.remove_parent_if_empty()

    def _remove_cgroup(self, state: ContainerState) -> None:
        cgroup = self._cgroup(state)
        if state.pid > 0:
            # pid 1 is gone, and the kernel ended every other process of its pid namespace
            # before it let pid 1 exit: the groups are empty, so rmdir them (0.15 ms for five
            # v1 groups, where destroy() lists, kills and polls them first: 0.6 ms).
            try:
                for d in cgroup.dirs():
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(d)
                return
            except OSError:
                pass  # busy: a process that is not the container's, a child group, a task
                # still being released (v1): the thorough way below
        cgroup.destroy()

    def _remove_bridge_quietly(self) -> None:
        with contextlib.suppress(FcrunError, OSError):
            self.network.remove_bridge_if_unused()

    def _discard(self, state: ContainerState) -> None:
        """Undo a created container whose start failed."""
        with contextlib.suppress(FcrunError, OSError):
            with self.states.locked(state.name):
                self._teardown(state)

    def exec(
        self,
        name: str,
        args: list[str],
        *,
        env: list[str] | None = None,
        cwd: str | None = None,
        stdio: tuple[int, int, int] | None = None,
    ) -> int:
        """Run a command in a running container (its namespaces, cgroup and limits). Returns its exit code."""
        if not args:
            raise SpecError("nothing to execute", "args")
        state = self.state(name)
        check_allowed("exec", name, state.status)
        spec = msgspec.structs.replace(
            state.spec,
            process=msgspec.structs.replace(
                state.spec.process, args=list(args), env=state.spec.process.env + list(env or []),
                cwd=cwd or state.spec.process.cwd,
            ),
        )
        validate_spec(spec)
        plan = build_plan(
            spec, rootfs="/", overlay_lower=None, cgroup_procs=self._cgroup(state).procs_files(),
            cap_last=self._cap_last_cached(), attached=True, stdio=stdio,
        )
        return _exec_in(state, plan)

    def gc(self) -> list[str]:
        """Remove stopped containers and whatever crashed creations left. Returns what went."""
        require_root()
        removed = []
        live = set()
        for name in self.states.names():
            try:
                with self.states.locked(name):
                    state = self.state(name)
                    if state.status in ("stopped", "creating") and not pid_alive(state):
                        self._teardown(state)
                        removed.append(name)
                    else:
                        live.add(name)
            except (NotFound, FileNotFoundError):
                continue
        if os.path.isdir(self.paths.network):
            removed += [f"lease:{o}" for o in self.network.gc(live)]
        for base, owner in self.id_ranges.owners().items():
            if owner not in live and not os.path.exists(self.states.dir(owner)):
                self.id_ranges.release(base, owner)
                removed.append(f"idrange:{owner}")
        storage_root = os.path.join(self.paths.data_root, "containers")
        if os.path.isdir(storage_root):
            for name in os.listdir(storage_root):
                if name not in live and not os.path.exists(self.states.dir(name)):
                    shutil.rmtree(os.path.join(storage_root, name), ignore_errors=True)
                    removed.append(f"storage:{name}")
        return removed

    def _cap_last_cached(self) -> int:
        if self._cap_last is None:
            self._cap_last = sc.cap_last_cap()
        return self._cap_last


def _make_slot(cdir: str) -> str:
    """Make `cdir`/slot a mount of its own in a peer group of its own; returns its content dir.

    The container binds slot/content (rslave, like every mount it copies from the host), so
    its mount is a slave of this peer group: a mount on slot/content made here later appears
    in the container, and nothing the container mounts comes back.
    """
    slot = os.path.join(cdir, "slot")
    content = os.path.join(slot, "content")
    os.mkdir(slot, 0o700)
    os.mkdir(content, 0o755)
    path = slot.encode()
    sc.mount(path, path, None, sc.MS_BIND, None)
    sc.mount(None, path, None, sc.MS_PRIVATE, None)  # out of the run root's peer group
    sc.mount(None, path, None, sc.MS_SHARED, None)  # into one of its own
    return content


def _release_slot(cdir: str) -> None:
    """Unmount and remove a container's slot, if it has one. rmdir only, never a recursive
    delete: should an unmount fail, the app's files under it stay untouched."""
    slot = os.path.join(cdir, "slot")
    for path in (os.path.join(slot, "content"), slot):
        for _ in range(8):  # stacked mounts, one layer per call
            try:
                sc.umount2(path.encode(), sc.MNT_DETACH)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):
                    break
                raise KernelError.from_oserror("unmount slot", path, exc) from None
    content = os.path.join(slot, "content")
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == content for line in f)
    if not mounted and os.path.isdir(content):
        # Our own directory again (nothing on it): files put there for the container (a
        # warm-up script), one level, no recursion.
        for entry in os.scandir(content):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
    for path in (content, slot):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(path)


def limits_from_spec(spec: Spec) -> Limits:
    res = spec.linux.resources
    if res is None:
        return Limits()
    return Limits(
        cpu_quota_us=res.cpu.quota if res.cpu else None,
        cpu_period_us=(res.cpu.period or 100_000) if res.cpu else 100_000,
        memory_bytes=res.memory.limit if res.memory else None,
        pids_max=res.pids.limit if res.pids else None,
        devices=tuple(DeviceRule(allow=d.allow, type=d.type, major=d.major, minor=d.minor, access=d.access)
                      for d in res.devices),
    )


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotPermitted("fcrun needs root to create namespaces, mounts and cgroups (run it with sudo)")


def _find_init() -> str:
    """A static init for pid 1: $FCRUN_INIT, else Debian's tini-static."""
    override = os.environ.get("FCRUN_INIT")
    for path in ((override,) if override else INIT_CANDIDATES):
        if os.access(path, os.X_OK):
            return path
    raise MissingFeature("a static init for pid 1 (/usr/bin/tini-static)", "apt-get install tini, or pass init=False / --no-init")


def _read_ready(status_r: int, name: str) -> None:
    """The child's "R": its namespaces exist. Raises ChildFailure with its report."""
    if read_status(status_r, SETUP_TIMEOUT_S) != b"R":
        raise ContainerError(f"container {name}: setup ended before its namespaces were made")


def _child_report(status_r: int, timeout_s: float = 0.25) -> ChildFailure | None:
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
        pass
    return None


def _send(go_w: int, message: bytes, status_r: int) -> None:
    """Tell the child to go on. If it already died, raise the error it reported instead."""
    try:
        os.write(go_w, message)
    except BrokenPipeError:
        failure = _child_report(status_r, SETUP_TIMEOUT_S)
        if failure is not None:
            raise failure from None
        raise ContainerError("container setup ended without a report") from None


class _Child:
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
            with contextlib.suppress(spawner.SpawnerGone, OSError):
                self.report_r = client.claim(self.pid)
        return self.report_r

    def abandon(self) -> None:
        if self.pid < 0 and self.report_r >= 0:
            with contextlib.suppress(FcrunError, OSError):
                self.pid = spawner.await_spawned(self.report_r)
            # else: the spawner refused or died, so there is no child (or it died with it)
        _kill_quietly(self.pid)
        os.close(self.go_w)
        os.close(self.status_r)
        from_spawner = self._unclaimed is not None or self.report_r >= 0
        if self.claim() >= 0:
            if self.pid > 0:
                _await_exit_report(self.report_r, self.pid)  # the spawner reaps it
            else:
                os.close(self.report_r)
        elif from_spawner:
            _wait_gone_pid(self.pid)
        else:
            _reap(self.pid)


def _wait_report(report_r: int, pid: int) -> int | None:
    """The wait status of the spawner's child `pid`, from its report pipe; None if the spawner
    closed the pipe without one (it died: attached containers died with it)."""
    while True:
        report = spawner.read_report(report_r)
        if report is None:
            return None
        if isinstance(report, spawner.Exited) and report.pid == pid:
            return report.wait_status


def _wait_gone_pid(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
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


def _wait_exit(state: ContainerState) -> None:
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


def _await_exit_report(report_r: int, pid: int) -> None:
    """Rollback: wait (bounded) until the spawner has reaped `pid`, then close the pipe."""
    try:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            report = spawner.read_report(report_r, left)
            if report is None or isinstance(report, spawner.Exited) and report.pid == pid:
                break
    except FcrunError:
        pass
    finally:
        os.close(report_r)


# What a container that wrote nothing leaves in its storage dir, deepest first: an empty upper
# dir, and what overlayfs made in the work dir (with "volatile", a marker of unsynced data).
_OVERLAY_LEFTOVER_FILE = "work/work/incompat/volatile/dirty"
_OVERLAY_LEFTOVER_DIRS = ("work/work/incompat/volatile", "work/work/incompat", "work/work", "work", "upper", "")


def _remove_storage(storage: str) -> None:
    """Remove a container's upper and work dirs: by name when they hold only what overlayfs
    leaves (7 system calls where a tree walk makes some 30), else by walking the tree."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(storage, _OVERLAY_LEFTOVER_FILE))
        for d in _OVERLAY_LEFTOVER_DIRS:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(os.path.join(storage, d))
    except OSError:  # ENOTEMPTY: the container wrote something
        shutil.rmtree(storage, ignore_errors=True)


def _kill_quietly(pid: int) -> None:
    if pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _reap(pid: int) -> None:
    """Collect our child's exit status if it is our child; otherwise nothing to do."""
    if pid <= 0:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _wait_gone(state: ContainerState, timeout_s: float = STOP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while pid_alive(state):
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(state.pid, os.WNOHANG)[0]:
                return
        if time.monotonic() > deadline:
            raise ContainerError(f"container {state.name}: pid {state.pid} did not exit within {timeout_s:.0f}s of SIGKILL")
        time.sleep(0.005)


def _exec_in(state: ContainerState, plan: ChildPlan) -> int:
    """Fork a process into the container's namespaces and cgroup, exec the plan, wait for it."""
    ns_files = [("ipc", sc.CLONE_NEWIPC), ("uts", sc.CLONE_NEWUTS), ("net", sc.CLONE_NEWNET),
                ("cgroup", sc.CLONE_NEWCGROUP), ("mnt", sc.CLONE_NEWNS)]
    fds: list[tuple[int, int]] = []
    own_pid = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    target_pid = os.open(f"/proc/{state.pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        for fname, flag in ns_files:
            path = f"/proc/{state.pid}/ns/{fname}"
            if os.readlink(path) != os.readlink(f"/proc/self/ns/{fname}"):
                fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), flag))
        user_ns = f"/proc/{state.pid}/ns/user"
        if os.readlink(user_ns) != os.readlink("/proc/self/ns/user"):
            # Joined last, by _finish_and_exec: the others need host root's capabilities.
            plan.userns_fd = os.open(user_ns, os.O_RDONLY | os.O_CLOEXEC)
        plan.status_w = status_w
        sc.setns(target_pid, sc.CLONE_NEWPID)  # our next child is born in the container's pid ns
        pid = -1
        # Until its execve the child is this host python, in the container's pid namespace.
        # Once it has dropped to the container's capabilities (_finish_and_exec), only being
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
                os.setsid()
                for procs in plan.cgroup_procs:
                    with open(procs, "wb") as f:
                        f.write(b"0")
                for fd, flag in fds:
                    sc.setns(fd, flag)
            except BaseException as exc:  # noqa: BLE001
                from .child import _fail

                _fail(plan, "join container", exc)
            _finish_and_exec(plan)
    except OSError as exc:
        raise KernelError.from_oserror(f"exec in container {state.name}:", exc.filename or "", exc) from None
    finally:
        os.close(status_w)
        for fd, _ in fds:
            os.close(fd)
        if plan.userns_fd >= 0:
            os.close(plan.userns_fd)
        os.close(own_pid)
        os.close(target_pid)
    try:
        read_status(status_r, SETUP_TIMEOUT_S)
    except ChildFailure as failure:
        _reap(pid)
        raise failure_to_error(failure, state.name) from None
    finally:
        os.close(status_r)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


__all__ = ["Runtime", "Container", "ContainerInfo", "limits_from_spec"]
