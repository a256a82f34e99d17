"""The commands of `fcrun-oci` (runc's), each a call or two into fcrun.runtime's public API.

Each takes the global Options (cli/oci.py) and its parsed arguments and returns an exit
code; errors are raised and oci.main prints them as runc does.
"""

from __future__ import annotations

import os
import signal
import sys

from fcrun_cli import oci_holder, oci_report
from fcrun_cli.oci import OciError

CONFIG_FILE = "config.json"


# ----- helpers -------------------------------------------------------------------------------

def load_state(options, name: str):
    """The container's ContainerState; "container does not exist" (runc's words) if none."""
    from fcrun.errors import NotFound

    try:
        return options.runtime.state(name)
    except NotFound:
        raise OciError("container does not exist") from None


def load_bundle(bundle: str):
    """The bundle's config.json as a Spec, with root.path made absolute (it is relative to
    the bundle, not to our working directory).

    Raises:
        OciError: no config.json. SpecError: what decode_spec refuses (bad JSON, a field it
        does not know), naming the file and the field.
    """
    import msgspec

    from fcrun.runtime.spec import decode_spec, with_runc_device_rules

    bundle = os.path.abspath(bundle)
    path = os.path.join(bundle, CONFIG_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise OciError(f"JSON specification file {path} not found") from None
    # runc's default device rules follow the bundle's (podman's lone deny-all still lets /dev/null be used).
    spec = with_runc_device_rules(decode_spec(data, path))
    root = os.path.join(bundle, spec.root.path)  # an absolute root.path stays as it is
    return bundle, msgspec.structs.replace(spec, root=msgspec.structs.replace(spec.root, path=root))


def write_pid_file(path: str, pid: int) -> None:
    from fcrun.atomicfile import write_atomic

    write_atomic(os.path.abspath(path), str(pid).encode(), mode=0o644, what="pid file")


def refuse_unsupported(args) -> None:
    """Flags fcrun-oci cannot honour, refused by name before anything is made."""
    if getattr(args, "preserve_fds", 0):
        raise OciError("--preserve-fds is not supported by fcrun-oci (the container gets stdin, stdout and stderr only)")


# ----- lifecycle -----------------------------------------------------------------------------

def _create(options, args):
    """Create the container from --bundle, its terminal sent to the engine; returns the
    Container (its go pipe ours)."""
    from fcrun.errors import AlreadyExists
    from fcrun_cli.oci_console import Stdio

    refuse_unsupported(args)
    bundle, spec = load_bundle(args.bundle)
    stdio = Stdio(spec.process.terminal, args.console_socket, spec.process.console_size)
    try:
        try:
            # With a terminal, the child sends its master to --console-socket during create.
            return options.runtime.create(args.id, spec, detach=True, stdio=stdio.fds, init=False,
                                          labels={oci_report.BUNDLE_LABEL: bundle},
                                          console_socket=stdio.console_socket)
        except AlreadyExists:
            raise OciError(f"container with id exists: {args.id}") from None
    finally:
        stdio.close()


def discard(options, name: str) -> None:
    """Remove a container whose create or start failed, leaving nothing; the failure is
    what gets reported (a failed start has removed it already)."""
    from fcrun.errors import NotFound

    try:
        options.runtime.delete(name, force=True)
    except NotFound:
        pass


def create(options, args) -> int:
    container = _create(options, args)
    try:
        if args.pid_file:
            write_pid_file(args.pid_file, container.pid)
        # The holder also runs this container's `delete` while it lingers (oci_holder.py).
        oci_holder.hold(container, options.holder_dir,
                        delete=lambda force: delete(options, type(args)(id=args.id, force=force)))
    except BaseException:
        discard(options, args.id)
        raise
    return 0


def run(options, args) -> int:
    container = _create(options, args)
    try:
        if args.pid_file:
            write_pid_file(args.pid_file, container.pid)
        container.start()
    except BaseException:
        discard(options, args.id)
        raise
    if args.detach:
        return 0
    try:
        return container.wait()
    finally:
        discard(options, args.id)


def start(options, args) -> int:
    status = load_state(options, args.id).status
    if status != "created":
        what = {"stopped": "a container that has stopped"}.get(status, "an already running container")
        raise OciError(f"cannot start {what}")
    try:
        oci_holder.ask_holder(options.holder_dir, args.id)
    except oci_holder.HolderGone:
        raise OciError(f"cannot start container {args.id}: the process holding it since create is gone") from None
    return 0


def state(options, args) -> int:
    st = load_state(options, args.id)
    print(oci_report.pretty(oci_report.state_json(st.name, st.status, st.pid, st.created_at, st.labels, st.spec)))
    return 0


def kill(options, args) -> int:
    from fcrun.units import parse_signal

    sig = parse_signal(args.signal)
    st = load_state(options, args.id)
    # --all reaches a stopped container's other processes too, as runc's: without a pid
    # namespace of its own, they outlive its first one (in its cgroup, until delete).
    if st.status not in ("created", "running", "frozen") and not (args.all and st.status == "stopped"):
        raise OciError("container not running")
    if args.all:
        options.runtime.cgroup(args.id).kill(sig)
        if sig == signal.SIGKILL and st.status == "frozen":
            options.runtime.thaw(args.id)  # a frozen task acts on SIGKILL only once thawed (v1)
    else:
        options.runtime.kill(args.id, sig)
    return 0


def delete(options, args) -> int:
    from fcrun.errors import NotFound

    try:
        st = options.runtime.state(args.id)
    except NotFound:
        if args.force:
            oci_holder.forget(options.holder_dir, args.id)
            return 0  # runc: deleting what is not there, by force, succeeds
        raise OciError("container does not exist") from None
    if st.status in ("running", "frozen") and not args.force:
        raise OciError(f"cannot delete container {args.id} that is not stopped: {oci_report.OCI_STATUS[st.status]}")
    # A created container goes without --force, as with runc: its process never ran.
    options.runtime.delete(args.id, force=True)
    oci_holder.forget(options.holder_dir, args.id)
    return 0


def pause(options, args) -> int:
    load_state(options, args.id)
    options.runtime.freeze(args.id)
    return 0


def resume(options, args) -> int:
    load_state(options, args.id)
    options.runtime.thaw(args.id)
    return 0


# ----- queries -------------------------------------------------------------------------------

def list_(options, args) -> int:
    import json

    from fcrun.errors import FcrunError

    states = []
    rt = options.runtime
    for name in rt.states.names():
        try:
            st = rt.state(name)
        except FcrunError:
            continue  # removed meanwhile, or a creation's leftover being written
        states.append(oci_report.state_json(st.name, st.status, st.pid, st.created_at, st.labels, st.spec))
    if args.quiet:
        sys.stdout.write("".join(s["id"] + "\n" for s in states))
    elif args.format == "json":
        print(json.dumps(states))
    else:
        sys.stdout.write(oci_report.list_table(states))
    return 0


def ps(options, args) -> int:
    import json
    import subprocess

    st = load_state(options, args.id)
    pids = options.runtime.cgroup(args.id).pids() if st.status != "stopped" else []
    if args.format == "json":
        print(json.dumps(pids))
        return 0
    out = subprocess.run(["ps", *(args.ps_args or ["-ef"])], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise OciError(f"ps {' '.join(args.ps_args or ['-ef'])}: {out.stderr.strip()}")
    sys.stdout.write(oci_report.ps_table(out.stdout, set(pids)))
    return 0


def events(options, args) -> int:
    """--stats: one stats event. Without it: a stats event every --interval until the
    container stops (runc also streams OOM events; fcrun-oci does not)."""
    import json
    import time

    from fcrun.units import parse_duration

    interval_s = parse_duration(args.interval, "--interval")
    if interval_s <= 0:
        raise OciError(f"--interval {args.interval!r} must be above 0")
    while True:
        st = load_state(options, args.id)
        if st.status == "stopped":
            if args.stats:
                raise OciError("container not running")
            return 0
        stats = options.runtime.cgroup(args.id).stats()
        res = st.spec.linux.resources
        memory_limit = res.memory.limit if res and res.memory else None
        pids_limit = res.pids.limit if res and res.pids else None
        print(json.dumps(oci_report.stats_event(args.id, stats, memory_limit, pids_limit)), flush=True)
        if args.stats:
            return 0
        time.sleep(interval_s)


# ----- changes -------------------------------------------------------------------------------

def update(options, args) -> int:
    """runc update: --resources (a LinuxResources JSON), then runc's flags over it; only what is
    given changes (Runtime.update_resources: every field creation writes, but device rules)."""
    from fcrun.runtime.spec import BlockIO, CpuResources, MemoryResources, PidsResources, Resources
    from fcrun.units import parse_size

    res = resources_file(args.resources) if args.resources else Resources()

    def size(flag: str, text):  # runc's sizes: bytes with an optional unit; -1 is "unlimited"
        return -1 if text.strip() == "-1" else parse_size(text, flag, "memory size", "512M")

    memory = {field: size(flag, getattr(args, attr)) for field, flag, attr in UPDATE_MEMORY_FLAGS
              if getattr(args, attr) is not None}
    cpu = {field: getattr(args, attr) for field, attr in UPDATE_CPU_FLAGS if getattr(args, attr) is not None}
    if memory:
        res.memory = msgspec_replace(res.memory or MemoryResources(), memory)
    if cpu:
        res.cpu = msgspec_replace(res.cpu or CpuResources(), cpu)
    if args.pids_limit is not None:
        res.pids = PidsResources(limit=args.pids_limit)
    if args.blkio_weight is not None:
        res.block_io = msgspec_replace(res.block_io or BlockIO(), {"weight": args.blkio_weight})
    if res == Resources():
        raise OciError("nothing to update: give --resources or a flag (see fcrun-oci update --help)")
    options.runtime.update_resources(args.id, res)
    return 0


# runc update's flags -> linux.resources fields.
UPDATE_MEMORY_FLAGS = (("limit", "--memory", "memory"), ("swap", "--memory-swap", "memory_swap"),
                       ("reservation", "--memory-reservation", "memory_reservation"),
                       ("kernel", "--kernel-memory", "kernel_memory"), ("kernel_tcp", "--kernel-memory-tcp", "kernel_memory_tcp"))
UPDATE_CPU_FLAGS = (("shares", "cpu_shares"), ("period", "cpu_period"), ("quota", "cpu_quota"),
                    ("realtime_period", "cpu_rt_period"), ("realtime_runtime", "cpu_rt_runtime"),
                    ("cpus", "cpuset_cpus"), ("mems", "cpuset_mems"))


def msgspec_replace(struct, changes: dict):
    import msgspec

    return msgspec.structs.replace(struct, **changes)


def resources_file(path: str):
    """--resources: a LinuxResources JSON (file, or '-' for stdin), decoded strictly (an unknown
    field is refused with its path)."""
    from fcrun.runtime.spec import decode_resources

    return decode_resources(sys.stdin.buffer.read() if path == "-" else open(path, "rb").read(),
                            "--resources " + path)


def exec_(options, args) -> int:
    import msgspec

    from fcrun.errors import SpecError
    from fcrun.runtime.spec import Process, User
    from fcrun_cli.oci_console import Stdio

    refuse_unsupported(args)
    st = load_state(options, args.id)
    if st.status != "running":
        raise OciError(f"cannot exec in a {oci_report.OCI_STATUS.get(st.status, st.status)} container")
    env, cwd, user, terminal, size, process = list(args.env), args.cwd or None, None, args.tty, None, None
    if args.process:
        # The whole process, as runc takes it: the flags that set its parts (-e, --cwd, --user)
        # do not apply; the library merges it with the container's (exec_process_spec).
        with open(args.process, "rb") as f:
            try:
                process = msgspec.json.decode(f.read(), type=Process)
            except msgspec.DecodeError as exc:
                raise OciError(f"invalid process {args.process}: {exc}") from None
        argv, env, cwd = [], None, None
        terminal, size = process.terminal or terminal, process.console_size
    else:
        argv = [a for a in args.args if a != "--"] if args.args[:1] == ["--"] else list(args.args)
        if not argv:
            raise OciError("exec needs ARGS or --process")
        if args.user:
            from fcrun.units import is_decimal

            uid, _, gid = args.user.partition(":")
            if not is_decimal(uid, 10) or (gid and not is_decimal(gid, 10)):
                raise OciError(f"--user {args.user!r}: give uid[:gid] as numbers")
            user = User(uid=int(uid), gid=int(gid or 0))
        for flag, value, why in (("--cgroup", args.cgroup, "an exec joins the container's own cgroups"),
                                 ("--apparmor", args.apparmor, "this host has no AppArmor policy for it"),
                                 ("--process-label", args.process_label, "fcrun has no SELinux support")):
            if value:
                raise OciError(f"{flag} is not supported by fcrun-oci ({why})")
        if args.additional_gids or args.cap or args.no_new_privs is not None:
            # runc's flags for the rest of the process: the container's, with them applied.
            from fcrun.runtime.exec import process_from_flags

            process = process_from_flags(st.spec.process, argv, env=env, cwd=cwd or "", user=user,
                                         additional_gids=args.additional_gids, caps=args.cap,
                                         no_new_privileges=args.no_new_privs)
            argv, env, cwd, user = [], None, None, None
    stdio = Stdio(terminal, args.console_socket, size)
    try:
        try:
            pid = options.runtime.exec(args.id, argv, env=env, cwd=cwd, user=user, stdio=stdio.fds, wait=False,
                                       process=process, console_socket=stdio.console_socket)
        except SpecError as exc:
            if not args.process:
                raise
            raise OciError(f"process {args.process}: {exc}") from None  # its $.process.X is in that file
    finally:
        stdio.close()
    if args.pid_file:
        write_pid_file(args.pid_file, pid)
    if args.detach:
        return 0  # our child until we exit; then the engine's subreaper's, as with runc
    from fcrun.runtime.process import exit_code

    return exit_code(os.waitpid(pid, 0)[1])


# ----- documents -----------------------------------------------------------------------------

def features(options, args) -> int:
    from fcrun.runtime.capabilities import CAPABILITY_NUMBERS
    from fcrun.runtime.spec import OCI_VERSION, SUPPORTED_MOUNT_TYPES, SUPPORTED_NAMESPACES

    print(oci_report.pretty(oci_report.features(
        OCI_VERSION, SUPPORTED_NAMESPACES, sorted(CAPABILITY_NUMBERS, key=CAPABILITY_NUMBERS.get),
        SUPPORTED_MOUNT_TYPES, hook_names(), SECCOMP_ACTIONS)))
    return 0


SECCOMP_ACTIONS = ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
                   "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP")


def hook_names() -> list[str]:
    """The hooks the spec decoder takes (spec.Hooks' fields, in the spec's names)."""
    import msgspec

    from fcrun.runtime import spec

    hooks = getattr(spec, "Hooks", None)
    if hooks is None:
        return []
    return [f.encode_name for f in msgspec.structs.fields(hooks)]


def spec(options, args) -> int:
    import json

    from fcrun.runtime.spec import default_spec, encode_spec

    if args.rootless:
        raise OciError("rootless containers are not supported by fcrun-oci")
    directory = os.path.abspath(args.bundle or ".")
    path = os.path.join(directory, CONFIG_FILE)
    if os.path.lexists(path):
        raise OciError(f"File {path} exists. Remove it first")
    config = default_spec(["sh"], rootfs="rootfs", network="none", readonly_rootfs=True)
    document = json.loads(encode_spec(config))
    # The encoder leaves out fields at their default; other runtimes want these spelled out
    # (runc refuses a process without cwd).
    process = document["process"]
    process.update(terminal=config.process.terminal, cwd=config.process.cwd,
                   user={"uid": config.process.user.uid, "gid": config.process.user.gid, **process.get("user", {})})
    document = json.dumps(document, indent="\t") + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)  # never over one
    with os.fdopen(fd, "w") as f:
        f.write(document)
    return 0
