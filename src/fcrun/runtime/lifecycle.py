"""The container runtime: create, start, kill, delete, freeze, thaw, update, exec, list, gc.

`Runtime` is the library's entry point and what the CLI calls. Every operation loads the
container's persisted state, checks the lifecycle table (state.ALLOWED), acts, and saves, so
any fcrun process can manage a container another one created. The steps of a creation are
creation.py's, exec is exec.py's, slots are slots.py's; who forks is process.py's choice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence

import msgspec

from .. import syscalls as sc
from ..cgroups import Cgroup, CgroupDriver, detect
from ..cgroups.primer import remove_stale as remove_stale_primers
from ..crashpoints import crash_point
from ..docroot import DEFAULT_DOCROOT_ROOTS
from ..errors import FcrunError, NotFound, SpecError, require_root
from ..labels import APP_LABEL
from ..lazy import Logger
from ..logs.files import LogSettings, log_dir, log_root, note_app, noted_app, remove_expired
from ..paths import DEFAULT_BRIDGE, DEFAULT_CGROUP_PARENT, DEFAULT_SUBNET, Paths
from ..units import CPU_PERIOD_US, cpu_to_quota_us
from .container import Container, ContainerInfo
from .creation import Creation, shared_rootfs_mount, validate
from .exec import exec_in, exec_process_spec, exec_spec
from .hooks import oci_state, run_hooks_logged
from .plan import build_plan, limits_from_spec
from .process import kill_quietly, reap_exited, wait_gone, wait_gone_pid
from .rootfs_setup import unmount_shared_rootfs
from .slots import fill_slot, open_slot_source, release_slot, slot_content
from .spawner.client import library_gone
from .spec import CpuResources, MemoryResources, PidsResources, Process, Resources, Spec, User, validate_spec
from .state import LIVE, ContainerState, StateStore, check_allowed, is_allowed, pid_alive
from .storage import Storage
from .userns import IdRanges, is_fcrun_range

MAX_CACHED_CGROUPS = 4096
ORPHAN_EXIT_TIMEOUT_S = 5.0  # a created container whose creator died: gone at the EOF of its go pipe (2 s was
# too short on a loaded 2-core VM: the crash suite saw one still exiting)

log = Logger(__name__)


class Runtime:
    """Creates and manages containers under one pair of state roots.

    Args:
        paths: data and run roots (default: from FCRUN_ROOT / FCRUN_RUN or /var/lib/fcrun, /run/fcrun).
        cgroup_parent: relative name created beneath fcrun's own cgroup, or an absolute cgroup path.
        bridge, subnet: the bridge network containers with network="bridge" join.
        spawner: fork containers through a small helper process (spawner/), which makes
            them start faster. None (default, or $FCRUN_SPAWNER unset): from the process's
            second container on; True ("1"): always; False ("0"): never. A process with more
            than one thread always uses it, whatever this says (process.py says why).
        docroot_roots: the only directories under which `fill_slot` takes a source (see
            docroot.py; serve's `docroot_roots` setting).
        cgroups: the driver `cgroups.detect(parent=cgroup_parent)` gives, if the caller has
            one (`fcrun run` detects before it imports this module, to start a move primer:
            cli/run_here.py); else detected on first use.
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
        cgroups: CgroupDriver | None = None,
    ):
        self.paths = paths or Paths.from_env()
        if spawner is None:
            spawner = {"0": False, "1": True}.get(os.environ.get("FCRUN_SPAWNER", ""))
        self.spawner_mode = spawner
        self.move_primer = None  # a cgroups.primer.MovePrimer the fork-server (or `fcrun run`) sets: primed at each creation
        self.docroot_roots = tuple(docroot_roots)
        self.states = StateStore(self.paths.containers)
        self.storage = Storage(self.paths)
        self.id_ranges = IdRanges(os.path.join(self.paths.run_root, "idmap"))
        self.cgroup_parent = cgroup_parent
        self.bridge = bridge
        self.subnet = subnet
        self._cgroups = cgroups
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

            self._network = BridgeNetwork(self.paths.network, bridge=self.bridge, subnet=self.subnet,
                                          recover_leases=lambda: self.states.leases_on(self.bridge))
        return self._network

    @property
    def images(self):
        if self._images is None:
            from ..images import ImageStore

            self._images = ImageStore(self.paths)
        return self._images

    @property
    def cap_last(self) -> int:
        """The kernel's highest capability number (read once)."""
        if self._cap_last is None:
            self._cap_last = sc.cap_last_cap()
        return self._cap_last

    # ----- create / run ---------------------------------------------------------------------

    def create(self, name: str, spec: Spec, *, image=None, detach: bool = False,
               stdio: tuple[int, int, int] | None = None, init: bool = True, labels: dict[str, str] | None = None,
               slot: str | None = None, slot_source: str | None = None, volatile_rootfs: bool | None = None,
               console_socket: int = -1) -> Container:
        """Create a container: namespaces, rootfs, cgroup and network ready; process not yet run.

        `image` (an images.Image or its name) gives the overlay lower dirs; without it,
        spec.root.path must be an existing directory used as the root as it is.

        `slot`: a directory inside the container (e.g. a web server's docroot) that stays empty
        and read-only until `fill_slot` mounts a host directory there, while the container runs
        (slots.py). `slot_source`: that host directory, mounted there at once (fill_slot's rules
        and mount, checked before anything is made).

        `volatile_rootfs` (None: the spec's "org.fcrun.rootfs" annotation, "tmpfs" meaning
        True): the writable layer is a tmpfs the child mounts in the container's own mount
        namespace, instead of an upper dir under the data root: nothing of the rootfs is
        written to disk, and whatever the container writes there is gone when it stops. It
        holds at most the container's memory limit (else VOLATILE_ROOTFS_DEFAULT_BYTES), and
        its pages count against the container's memory cgroup.

        `console_socket` (>= 0, with spec.process.terminal): a connected unix socket; the child
        makes a pty in the container (from its /dev/ptmx, as runc does), sends the master
        there (SCM_RIGHTS) during create, and takes the slave as its stdio and controlling
        terminal (console.py). The caller closes its fd once create returns.

        Raises:
            SpecError: bad name or spec. AlreadyExists: name taken. NotFound: unknown image.
            NotPermitted: not root. KernelError/ContainerError: the kernel or the child failed;
            everything made so far is undone first.
        """
        return self._create(name, spec, image=image, detach=detach, stdio=stdio, init=init, labels=labels,
                            slot=slot, slot_source=slot_source, volatile_rootfs=volatile_rootfs, start=False,
                            console_socket=console_socket)

    def run(self, name: str, spec: Spec, **kwargs) -> Container:
        """create + start, in one handshake. Returns the running container (call .wait() for
        its exit code). Takes create's keyword arguments; raises what create and start raise."""
        return self._create(name, spec, start=True, **kwargs)

    def _create(self, name: str, spec: Spec, *, start: bool, image=None, detach: bool = False, stdio=None,
                init: bool = True, labels=None, slot=None, slot_source=None, volatile_rootfs=None,
                console_socket: int = -1) -> Container:
        require_root()
        request = validate(self, name, spec, image=image, detach=detach, stdio=stdio, init=init, labels=labels,
                           slot=slot, volatile_rootfs=volatile_rootfs, start=start, console_socket=console_socket,
                           slot_source=slot_source)
        return Creation(self, request).run()

    # ----- queries -------------------------------------------------------------------------

    def state(self, name: str) -> ContainerState:
        """The container's state, with its status checked against the live process and cgroup.

        Raises:
            NotFound: no such container.
        """
        return self.refresh(self.states.load(name))

    def list(self) -> list[ContainerInfo]:
        """Every container, as `fcrun ps` shows it."""
        rows = []
        for name in self.states.names():
            try:
                st = self.state(name)
            except (NotFound, msgspec.DecodeError):
                continue  # removed meanwhile, or a state file being written by an older fcrun
            res = st.spec.linux.resources
            cpu = None
            if res and res.cpu and res.cpu.quota:
                cpu = res.cpu.quota / (res.cpu.period or CPU_PERIOD_US)
            rows.append(ContainerInfo(
                name=st.name, status=st.status, pid=st.pid if st.status != "stopped" else 0,
                ip=st.network.ip if st.network else "",
                cpu=cpu, memory_bytes=res.memory.limit if res and res.memory else None,
                pids_max=res.pids.limit if res and res.pids else None,
                image=st.image, created_at=st.created_at, labels=st.labels,
                memory_used_bytes=self._memory_used(st),
            ))
        return rows

    def refresh(self, state: ContainerState) -> ContainerState:
        """`state` with its status made true: "stopped" once pid 1 is gone (saved), "frozen"
        while a running container's cgroup is frozen (never saved: see state.py)."""
        if state.status not in LIVE:
            return state
        if not pid_alive(state):
            state.status = "stopped"
            try:
                self.states.record_stopped(state)  # under the container's lock, if free now
            except OSError as exc:  # the run root is full or read-only: say it as it is
                log.debug("container %s: save stopped status: %s", state.name, exc)
        elif state.status in ("running", "frozen") and state.cgroup_paths:
            try:
                state.status = "frozen" if self._cgroup(state).is_frozen() else "running"
            except (OSError, FcrunError) as exc:  # a cgroup being removed: keep what was saved
                log.debug("container %s: read frozen state: %s", state.name, exc)
        return state

    def cgroup(self, name: str) -> Cgroup:
        """The container's cgroup (limits, stats, pids, freeze, thaw), a cached handle.

        Freezing or thawing through it is the same as `freeze`/`thaw`: whether a container is
        frozen is read from its cgroup, so state() stays true either way.

        Raises:
            NotFound: no such container, or it has no cgroup (a crashed creation's leftover).
        """
        state = self.states.load(name)
        if not state.cgroup_paths:
            raise NotFound(f"container {name!r} has no cgroup")
        return self._cgroup(state)

    def _cgroup(self, state: ContainerState) -> Cgroup:
        # load() re-checks persisted paths (they may come from another process's state file),
        # several times per operation. The checked result is kept: a Cgroup holds no more
        # than its driver and paths, which never change for a given set of paths.
        key = tuple(sorted(state.cgroup_paths.items()))
        cgroup = self._loaded_cgroups.get(key)
        if cgroup is None:
            if len(self._loaded_cgroups) >= MAX_CACHED_CGROUPS:
                self._loaded_cgroups.clear()
            cgroup = self._loaded_cgroups[key] = self.cgroups.load(state.cgroup_paths, state.cgroup_created)
        return cgroup

    def _memory_used(self, state: ContainerState) -> int | None:
        if state.status not in LIVE or not state.cgroup_paths:
            return None
        try:
            return self._cgroup(state).stats().memory_bytes
        except (FcrunError, OSError):
            return None  # its cgroup is being removed: no figure

    # ----- operations on existing containers -----------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Send a signal to the container's first process (SIGKILL ends the whole pid namespace
        when it is the container's own; else delete ends the others, by the cgroup)."""
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
        """Freeze every process of the container (its cgroup; state() then says "frozen")."""
        with self.states.locked(name):
            state = self.state(name)
            check_allowed("freeze", name, state.status)
            self._cgroup(state).freeze()
            crash_point("freeze.frozen")

    def thaw(self, name: str) -> None:
        """Thaw a frozen container (its cgroup; state() then says "running")."""
        with self.states.locked(name):
            state = self.state(name)
            check_allowed("thaw", name, state.status)
            self._cgroup(state).thaw()
            crash_point("thaw.thawed")

    def update(self, name: str, *, cpu: float | None = None, memory_bytes: int | None = None, pids_max: int | None = None) -> ContainerState:
        """Change limits of a live container; only the given ones change."""
        with self.states.locked(name):
            state = self.state(name)
            check_allowed("update", name, state.status)
            self._set_limits(state, cpu, memory_bytes, pids_max)
            self.states.save(state)
            return state

    def update_resources(self, name: str, resources: Resources) -> ContainerState:
        """Change a live container's linux.resources as `runc update` does: what `resources`
        sets changes, the rest stays (spec_resources.update_resources: every field creation
        writes but device rules; a controller the container lacks is joined).

        Raises:
            SpecError: a bad or unsupported field, naming its JSON path (nothing written).
            IncorrectStatus: the container is not live. KernelError: the kernel refused.
        """
        from .spec_resources import update_resources

        with self.states.locked(name):
            state = self.state(name)
            check_allowed("update", name, state.status)
            try:
                update_resources(self.cgroups, self._cgroup(state), state, resources)
            finally:
                # Saved even when a write failed: the cgroup paths may have grown (the spec
                # changes only on success), and delete must find them.
                self._loaded_cgroups.clear()
                self.states.save(state)
            return state

    def _set_limits(self, state: ContainerState, cpu: float | None, memory_bytes: int | None,
                    pids_max: int | None, *, only_changed: bool = False) -> None:
        """Set the limits given. `only_changed`: write only those that differ from what the
        state records (hand_over: a pooled instance is made with the apps' default limits, so
        most claims write nothing); `fcrun update` writes what it is given, as runc does."""
        res = state.spec.linux.resources or Resources()
        fields = []
        if cpu is not None:
            period = res.cpu.period if res.cpu and res.cpu.period else CPU_PERIOD_US
            quota = cpu_to_quota_us(cpu, period)
            if not (only_changed and res.cpu and res.cpu.quota == quota and res.cpu.period == period):
                res.cpu = CpuResources(quota=quota, period=period)
                fields += ["cpu_quota_us", "cpu_period_us"]  # both known: no read of the kernel's first
        if memory_bytes is not None and not (only_changed and res.memory and res.memory.limit == memory_bytes):
            res.memory = MemoryResources(limit=memory_bytes)
            fields.append("memory_bytes")
        if pids_max is not None and not (only_changed and res.pids and res.pids.limit == pids_max):
            res.pids = PidsResources(limit=pids_max)
            fields.append("pids_max")
        if not fields:
            return
        self._cgroup(state).update(limits_from_spec(msgspec.structs.replace(
            state.spec, linux=msgspec.structs.replace(state.spec.linux, resources=res))), fields, read_back=False)
        state.spec.linux.resources = res

    def fill_slot(self, name: str, source: str) -> None:
        """Mount host directory `source` on the container's slot (see create), live.

        `source` must follow docroot.py's rules: strictly under one of `docroot_roots`, reached
        through no symlink, clear of fcrun's own roots. See slots.fill_slot for how it is
        mounted. A slot is filled once.

        Raises:
            SpecError: `source` breaks a docroot rule. IncorrectStatus: no slot, already filled,
            or the container is not live. KernelError: the kernel refused.
        """
        require_root()
        with self.opened_slot_source(source) as source_fd, self.states.locked(name):
            state = self.state(name)
            check_allowed("fill_slot", name, state.status)
            self.mount_slot_source(state, source, source_fd)
            self.states.save(state)

    def slot_dir(self, name: str) -> str:
        """The host directory behind a container's empty slot (what it shows until fill_slot).
        Files put there are visible, read-only, in the container, and hidden once it is filled."""
        return slot_content(self.states.dir(name))

    def _own_roots(self) -> tuple[str, str]:
        return (self.paths.data_root, self.paths.run_root)

    def check_slot_source(self, source: str) -> None:
        """Raises SpecError when `source` breaks a docroot rule (fill_slot's)."""
        with self.opened_slot_source(source):
            pass

    @contextlib.contextmanager
    def opened_slot_source(self, source: str | None) -> Iterator[int]:
        """`source` opened and checked once (SpecError if it breaks a docroot rule), its fd
        closed on leaving; -1 for no source. What mount_slot_source mounts from that fd is
        the directory checked here, whatever is renamed in between, and the docroot's walk is
        done once per claim, not twice."""
        if source is None:
            yield -1
            return
        fd = open_slot_source(source, self.docroot_roots, self._own_roots())
        try:
            yield fd
        finally:
            os.close(fd)

    def mount_slot_source(self, state: ContainerState, source: str, source_fd: int) -> None:
        """Mount `source`, opened as `source_fd` by opened_slot_source, on the slot of
        `state`'s container and label the state with it; the lock and the save are the
        caller's (fill_slot, hand_over, a creation)."""
        fill_slot(state, self.states.dir(state.name), source, source_fd)

    def hand_over(self, name: str, *, cpu: float | None = None, memory_bytes: int | None = None,
                  pids_max: int | None = None,
                  slot_source: str | None = None, slot_source_fd: int = -1, labels: dict[str, str] | None = None,
                  thaw: bool = False, answer: Callable[[ContainerState], object] | None = None) -> ContainerState:
        """update + fill_slot + label + thaw in one step (one lock, one state read and write):
        how a frozen pooled instance becomes an app's. Either everything given is applied, or
        an error is raised and the caller should discard the container (a limit or the slot
        may already be applied).

        `answer(state)`: called once all of that is applied (and thawed), before the state is
        saved, the lock still held: the fork-server answers the claim there, so that the save
        is not on the request's path (~0.5 ms of a pool claim here: bench/README.md). A crash
        between the two leaves a running pool instance whose file still says pooled, with the
        app noted beside its logs (note_app, done before the thaw): the next fork-server labels
        it the app's (Pool.adopt) and serve adopts it, as after a crash once it is saved. An
        error after `answer` (the save) is raised as any other; the instance is the app's.

        `slot_source_fd`: `slot_source` opened already by opened_slot_source (the pool does,
        before it takes an instance: a docroot that breaks a rule then costs it none); -1:
        hand_over opens it.

        Resource handling: `slot_source_fd` stays the caller's."""
        if slot_source_fd >= 0:
            opened = contextlib.nullcontext(slot_source_fd)
        else:
            opened = self.opened_slot_source(slot_source)
        with opened as source_fd, self.states.locked(name):
            state = self.state(name)
            check_allowed("hand_over", name, state.status)
            if cpu is not None or memory_bytes is not None or pids_max is not None:
                self._set_limits(state, cpu, memory_bytes, pids_max, only_changed=True)
                crash_point("claim.limits")
            if slot_source is not None:
                self.mount_slot_source(state, slot_source, source_fd)
                crash_point("claim.slot")
            state.labels.update(labels or {})
            if APP_LABEL in (labels or {}):  # `fcrun app logs` finds an app's instances by this
                note_app(log_dir(self.paths, name), labels[APP_LABEL])
            if thaw and state.status == "frozen":
                self._cgroup(state).thaw()
                state.status = "running"
                crash_point("claim.thawed")
            if answer is not None:
                answer(state)
                crash_point("claim.answered")
            # Saved under the lock: whoever changes the instance next (serve's scale-up) reads it.
            self.states.save(state)
            crash_point("claim.saved")
            return state

    def noted_app(self, name: str) -> str | None:
        """The app a claim noted for `name` (hand_over, before it thaws and answers), or None."""
        return noted_app(log_dir(self.paths, name))

    def label(self, name: str, labels: dict[str, str]) -> ContainerState:
        """Add or change labels of a container (a pooled instance becomes an app's, say)."""
        with self.states.locked(name):
            state = self.state(name)
            check_allowed("label", name, state.status)
            state.labels.update(labels)
            self.states.save(state)
            return state

    def exec(self, name: str, args: list[str] | None = None, *, env: list[str] | None = None, cwd: str | None = None,
             stdio: tuple[int, int, int] | None = None, user: User | None = None, wait: bool = True,
             process: Process | None = None, console_socket: int = -1) -> int:
        """Run a command in a running container (its namespaces, cgroup and limits; exec.py).
        Returns its exit code; with wait=False its pid once it has exec'd (the caller's child).
        `user`: who it runs as (default: the container's process user).
        `process`: a whole OCI process instead of args/env/cwd/user (runc exec --process): its
        capabilities, rlimits, groups, noNewPrivileges, ... as exec.exec_process_spec merges them.
        `console_socket`: as for create; the pty comes from the container's /dev/ptmx.

        Raises:
            SpecError: no command, a bad env/cwd, a process field fcrun does not honour (named),
            or both `process` and args/env/cwd/user. IncorrectStatus: not running.
            KernelError/ContainerError: joining the container or the exec failed.
        """
        if process is not None and (args or env or cwd or user is not None):
            raise SpecError("give either a whole process or args/env/cwd/user, not both", "process")
        if process is None and not args:
            raise SpecError("nothing to execute", "args")
        state = self.state(name)
        check_allowed("exec", name, state.status)
        spec = exec_process_spec(state.spec, process) if process is not None else exec_spec(state.spec, args, env, cwd)
        if user is not None:
            spec = msgspec.structs.replace(spec, process=msgspec.structs.replace(spec.process, user=user))
        validate_spec(spec)
        plan = build_plan(spec, rootfs="/", overlay_lower=None, cgroup_procs=self._cgroup(state).join_files(),
                          seccomp_cache=self.paths.seccomp_cache,
                          cap_last=self.cap_last, attached=wait, stdio=stdio, console_socket=console_socket)
        return exec_in(state, plan, wait=wait)

    # ----- removal ----------------------------------------------------------------------------

    def delete(self, name: str, force: bool = False, *, locked: Callable[[], object] | None = None) -> None:
        """Remove a stopped container (force: kill it first) and everything it held.

        `locked`: called once the container's lock is held, before anything is removed. The
        fork-server answers a Run's client there: from then on whoever wants the name waits
        for the removal (StateStore.reserve), so the client need not wait for it.

        Raises:
            NotFound: no such container. IncorrectStatus: live, and not `force`.
        """
        require_root()
        with self.states.locked(name):
            state = self.state(name)
            check_allowed("force_delete" if force else "delete", name, state.status)
            if locked is not None:
                locked()
            crash_point("delete.locked")
            self._teardown(state)
        run_hooks_logged(state.spec, "poststop", oci_state(name, state.spec, "stopped", state.pid, state.labels), name)

    def remove_failed(self, state: ContainerState) -> None:
        """Undo a created container whose start failed (errors are logged: the start's own
        error is what the caller reports)."""
        try:
            with self.states.locked(state.name):
                self._teardown(state)
        except (FcrunError, OSError) as exc:
            log.warning("container %s: removal after a failed start: %s", state.name, exc)

    def gc(self) -> list[str]:
        """Remove stopped containers and whatever crashed creations left. Returns what went."""
        require_root()
        removed = []
        live = set()
        for name in self.states.names():
            try:
                with self.states.locked(name):
                    state = self.state(name)
                    if orphaned_created(state):
                        state = self._settle_orphan(state)
                    if is_allowed("delete", state.status) and not pid_alive(state):
                        self._teardown(state)
                        removed.append(name)
                    else:
                        live.add(name)
                        removed += [f"temp:{p}" for p in self.states.remove_stale_temps(name)]  # saves cut short
            except (NotFound, FileNotFoundError):
                continue  # removed meanwhile
            except (FcrunError, OSError) as exc:
                # One container that cannot be removed now (EBUSY, EIO, ...) must not stop
                # the gc of the others. What it holds (lease, id range, storage) is kept as a
                # live container's, for the next gc.
                log.warning("gc: container %s: %s (left for the next gc)", name, exc)
                live.add(name)
        if os.path.isdir(self.paths.network):
            removed += [f"lease:{o}" for o in self.network.gc(live)]
        removed += [f"temp:{p}" for p in self.id_ranges.remove_stale_temps()]
        for base, owner in self.id_ranges.owners().items():
            if owner not in live and not os.path.exists(self.states.dir(owner)):
                self.id_ranges.release(base, owner)
                removed.append(f"idrange:{owner}")
        for name in self.storage.names():
            if name not in live and not os.path.exists(self.states.dir(name)):
                try:
                    self.storage.remove(name)
                except (FcrunError, OSError) as exc:  # as above: the others are still removed
                    log.warning("gc: storage of %s: %s (left for the next gc)", name, exc)
                    continue
                removed.append(f"storage:{name}")
        removed += [f"logs:{name}" for name in self.expire_logs(time.time())]
        removed += [f"cgroup:{name}" for name in remove_stale_primers(self.cgroups)]  # a killed fork-server's
        if not self.states.names():
            self.remove_cgroup_parent_if_unused()
        return removed

    def remove_cgroup_parent_if_unused(self) -> None:
        """Remove the cgroup parent if nothing is in it, after the empty group a killed
        fork-server's move primer left there (a live fork-server's primer keeps its group, and
        so the parent). Never raises: what is busy stays."""
        with contextlib.suppress(FcrunError, OSError):  # busy: a concurrent create's, or a primer's; it stays
            remove_stale_primers(self.cgroups)
            self.cgroups.remove_parent_if_empty()

    def expire_logs(self, now: float) -> list[str]:
        """Remove the logs of containers gone for FCRUN_LOG_KEEP_S (fcrun.logs); their names.
        Run by gc and by the fork-server every LOG_EXPIRY_INTERVAL_S."""
        keep_s = LogSettings.from_env().keep_s
        return remove_expired(log_root(self.paths), keep_s, alive=set(self.states.names()), now=now)

    def _settle_orphan(self, state: ContainerState) -> ContainerState:
        """A created container whose creator died (orphaned_created) either exits at the EOF of
        its go pipe (then it is stopped, and gc removes it) or it was told to start just
        before the crash and has exec'd: it runs, and its state says so from now on."""
        wait_gone_pid(state.pid, ORPHAN_EXIT_TIMEOUT_S)
        if not pid_alive(state):
            return self.refresh(state)
        state.status = "running"
        self.states.save(state)
        return state

    def _teardown(self, state: ContainerState) -> None:
        cdir = self.states.dir(state.name)
        if os.path.lexists(os.path.join(cdir, "slot")):  # most containers have none: spare the look
            release_slot(cdir)  # first: nothing below may reach into it
            crash_point("delete.slot")
        if pid_alive(state):
            kill_quietly(state.pid)
            if state.status == "frozen" and state.cgroup_paths:
                try:
                    self._cgroup(state).thaw()
                except (FcrunError, OSError) as exc:  # SIGKILL may wait for a thaw on v1: say so
                    log.warning("container %s: thaw before removal: %s", state.name, exc)
            wait_gone(state)
        reap_exited(state)
        crash_point("delete.killed")
        if state.rootfs and not any(ns.type == "mount" and not ns.path for ns in state.spec.linux.namespaces):
            # No mount namespace of its own: its mounts are not gone with it (creation.py).
            try:
                unmount_shared_rootfs(*shared_rootfs_mount(state))
            except OSError as exc:
                log.warning("container %s: unmount its rootfs: %s", state.name, exc)
        if state.cgroup_paths:
            self._remove_cgroup(state)
        elif state.status == "creating":
            # A creation that crashed before its state was saved: its cgroup, if it got one,
            # has the container's name under our parent, or is at the spec's cgroupsPath.
            from .spec_resources import leftover_cgroup

            cgroup = leftover_cgroup(self.cgroups, state.name, self.states.dir(state.name))
            if cgroup.exists():
                cgroup.destroy()
        crash_point("delete.cgroup")
        if state.network and state.network.mode == "bridge":
            # Every process is gone, so the netns is being destroyed and the kernel deletes the
            # veth with it; deleting it ourselves would wait ~15 ms for RCU.
            self.network.detach(state.name, netns_gone=True)
            crash_point("delete.network")
        if not (state.rootfs and state.rootfs.tmpfs_bytes):  # a tmpfs layer went with the mount ns
            self.storage.remove(state.name)
            crash_point("delete.storage")
        if is_fcrun_range(state.spec.linux.uid_mappings):
            self.id_ranges.release(state.spec.linux.uid_mappings[0].host_id, state.name)
            crash_point("delete.idrange")
        self.states.remove(state.name)
        crash_point("delete.done")
        if not self.states.names():
            # The last container is gone: leave no empty `fcrun` cgroup parent behind either
            # (the bridge goes with its last lease). A concurrent create re-makes it.
            self.remove_cgroup_parent_if_unused()

    def _remove_cgroup(self, state: ContainerState) -> None:
        cgroup = self._cgroup(state)
        if state.pid > 0 and state.cgroup_created is None:  # else destroy() knows what to leave
            # pid 1 is gone, and the kernel ended every other process of its pid namespace
            # before it let pid 1 exit: the groups are empty, so rmdir them (where destroy()
            # lists, kills and polls them first). Without a pid namespace of its own the
            # container's other processes may live on: EBUSY, and destroy() kills them.
            try:
                for d in cgroup.dirs():
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(d)
                return
            except OSError:
                pass  # busy: a process that is not the container's, a child group, a task
                # still being released (v1): the thorough way below
        cgroup.destroy()


def orphaned_created(state: ContainerState) -> bool:
    """A created container whose creator died: only the creator can start it (it holds the
    go pipe), so it exits at the pipe's EOF, maybe just after a gc looked; unless the creator
    died after its "start" and before saving it (Container.start). Its creator (or the
    creator's spawner) was its parent: an orphan's parent is init, or a spawner whose library
    died and that has not yet followed it (a gc right after the crash saw that, and kept the
    orphan for a live container)."""
    if state.status != "created" or not pid_alive(state):
        return False
    parent = parent_pid(state.pid)
    return parent == 1 or (parent > 1 and (exiting(parent) or library_gone(parent)))


def exiting(pid: int) -> bool:
    """Whether process `pid` is on its way out: a zombie, or past the point where the kernel
    took its memory (its cmdline reads empty; no user process has an empty one). A creator or
    spawner seen there has died; its children are orphans a moment later (CI once saw a gc
    look in that moment and keep such an orphan)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if not f.read(1):
                return True
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True  # gone already
    return data[data.rindex(b")") + 2:][:1] in (b"Z", b"X")


def parent_pid(pid: int) -> int:
    """The parent of process `pid` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    return int(data[data.rindex(b")") + 2:].split()[1])  # the name may hold spaces and ')'


__all__ = ["Runtime", "require_root"]
