"""`fcrun`: the command line. Thin: parses options, calls fcrun.Runtime, prints results.

Errors from the library are printed as one line `fcrun: <what went wrong>` and the process
exits with the error's exit code (2 bad input, 3 not found, 4 name in use, 5 wrong state,
77 not root, 125 kernel, 126 container failed to start), except `fcrun run` and `fcrun exec`,
which exit with their command's code and so use docker's and podman's codes for their own
failures: 125 for fcrun's (usage errors included), 126 for a command that cannot be invoked,
127 for one not found (`ContainerCommand`, fcrun.errors.command_exit_code).
"""

from __future__ import annotations

import json
import os
import sys
import time

import click
import msgspec

from fcrun.errors import RUN_OWN_FAILURE, AlreadyExists, FcrunError, SpecError, command_exit_code
from fcrun.paths import DEFAULT_BRIDGE, DEFAULT_CGROUP_PARENT, DEFAULT_SUBNET, Paths
from fcrun.units import format_bytes, parse_cpu, parse_memory, parse_signal

# The runtime, image store and serve modules are imported inside the commands that use them:
# a CLI call pays only for what it runs (start-up time is part of `fcrun run`'s cost).


class Context:
    """What every command needs: the state roots and a lazily built Runtime."""

    def __init__(self, paths: Paths, cgroup_parent: str, bridge: str, subnet: str, cmdb_url: str | None = None):
        self.paths = paths
        self.cmdb_url = cmdb_url  # --cmdb: the CMDB serve, app and cmdb use (None: the config's, else SQLite)
        self._runtime_args = dict(cgroup_parent=cgroup_parent, bridge=bridge, subnet=subnet)
        self._runtime = None

    @property
    def runtime(self):
        if self._runtime is None:
            from fcrun.runtime import Runtime

            self._runtime = Runtime(self.paths, **self._runtime_args)
        return self._runtime

    def image_in_use(self, image) -> list[str]:
        """Names of containers whose rootfs stacks this image (`fcrun image rm` refuses then)."""
        return [c.name for c in self.runtime.list() if c.image == image.name]


def _completion_paths(ctx: click.Context) -> Paths:
    """The roots a completion reads: shell completion runs no callback, so ctx.obj is unset."""
    params = ctx.find_root().params
    return Paths.from_env(params.get("root"), params.get("run_root"))


def complete_images(ctx: click.Context, _param, incomplete: str) -> list[str]:
    """Image names for shell completion (none when the store cannot be read: not root)."""
    from fcrun.images import ImageStore

    try:
        names = [image.name for image in ImageStore(_completion_paths(ctx)).list()]
    except (FcrunError, OSError):
        return []
    return [name for name in names if name.startswith(incomplete)]


def complete_containers(ctx: click.Context, _param, incomplete: str) -> list[str]:
    """Container names for shell completion (none when the run root cannot be read)."""
    try:
        names = sorted(os.listdir(_completion_paths(ctx).containers))
    except OSError:
        return []
    return [name for name in names if name.startswith(incomplete) and not name.startswith(".")]


# Subcommand groups living in other modules, loaded only when named.
LAZY_COMMANDS = {
    "image": ("fcrun_cli.image", "image"),
    "app": ("fcrun_cli.app", "app"),
    "events": ("fcrun_cli.app", "events"),
    "stats": ("fcrun_cli.app", "stats"),
    "bench": ("fcrun_cli.bench", "bench"),
    "cmdb": ("fcrun_cli.cmdb", "cmdb"),
    "node": ("fcrun_cli.node", "node"),
    "logs": ("fcrun_cli.logs", "logs"),
    "service": ("fcrun_cli.service", "service"),
}


class FcrunGroup(click.Group):
    """Turns library errors into one clear line and the error's exit code; loads the
    subcommand groups of LAZY_COMMANDS on first use."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS and name not in self.commands:
            import importlib

            module, attr = LAZY_COMMANDS[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FcrunError as exc:
            click.echo(f"fcrun: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # a system error the library did not wrap: still one line
            where = f" {exc.filename}" if exc.filename else ""
            click.echo(f"fcrun: {ctx.invoked_subcommand or 'fcrun'}{where}: [Errno {exc.errno}] {exc.strerror}", err=True)
            ctx.exit(125)


def _report(ctx: click.Context, exc: Exception) -> str:
    """The one line an error is reported with."""
    from fcrun_cli.run_here import error_line

    return error_line(exc, ctx.info_name or "fcrun")


class ContainerCommand(click.Command):
    """`fcrun run` and `fcrun exec`: they exit with their command's code, so their own failures
    exit 125 (a usage error too, which click would exit 2 for), 126 or 127 (command_exit_code)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            exc.exit_code = RUN_OWN_FAILURE
            raise

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (FcrunError, OSError) as exc:
            click.echo(_report(ctx, exc), err=True)
            ctx.exit(command_exit_code(exc))


@click.group(cls=FcrunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", envvar="FCRUN_ROOT", default=None, metavar="DIR",
              help="Data root: images, layers, container upper dirs. [env FCRUN_ROOT; default /var/lib/fcrun]")
@click.option("--state", "run_root", envvar="FCRUN_RUN", default=None, metavar="DIR",
              help="Run root: container state, IP leases. [env FCRUN_RUN; default /run/fcrun]")
@click.option("--cgroup-parent", envvar="FCRUN_CGROUP_PARENT", default=DEFAULT_CGROUP_PARENT, show_default=True,
              help="Cgroup holding all containers: a name beneath fcrun's own cgroup, or an absolute path.")
@click.option("--bridge", envvar="FCRUN_BRIDGE", default=DEFAULT_BRIDGE, show_default=True, help="Bridge for --net bridge.")
@click.option("--subnet", envvar="FCRUN_SUBNET", default=DEFAULT_SUBNET, show_default=True, help="Subnet of the bridge.")
@click.option("--cmdb", "cmdb_url", envvar="FCRUN_CMDB", default=None, metavar="URL",
              help="The CMDB of serve, app and cmdb: postgresql://USER:PASSWORD@HOST/DB or sqlite:///PATH. "
                   "[env FCRUN_CMDB; default: the config's [cmdb] url, else <root>/cmdb.sqlite3]")
@click.version_option(package_name="fcrun")
@click.pass_context
def main(ctx: click.Context, root, run_root, cgroup_parent, bridge, subnet, cmdb_url):
    """fcrun: a reactive container runtime for web applications.

    \b
    Quick start (as root):
      fcrun image build busybox
      fcrun run --image busybox -- sh -c 'echo hello'
      fcrun run -d --name web --image busybox --cpu 0.3 --memory 64M -- httpd -f -p 80
      fcrun ps
      fcrun rm -f web
    """
    ctx.obj = Context(Paths.from_env(root, run_root), cgroup_parent, bridge, subnet, cmdb_url)


@main.command(cls=ContainerCommand, context_settings={"ignore_unknown_options": False})
@click.option("--image", "-i", required=True, shell_complete=complete_images, help="Image to run (see `fcrun image ls`).")
@click.option("--name", default=None, help="Container name (default: a random one).")
@click.option("-d", "--detach", is_flag=True, help="Leave the container running in the background; output goes to its log.")
@click.option("--cpu", default=None, help="CPU limit as a fraction of one CPU (0.3 = cpu.max \"30000 100000\").")
@click.option("--memory", "-m", default=None, help="Memory limit, e.g. 512M or 1G.")
@click.option("--pids", type=int, default=None, help="Maximum number of processes.")
@click.option("--hostname", default="", help="Hostname inside the container (default: the name).")
@click.option("--env", "-e", multiple=True, help="KEY=VALUE to set in the environment (repeatable).")
@click.option("--net", "network", type=click.Choice(["bridge", "none", "host"]), default="bridge", show_default=True,
              help="bridge: own netns with an IP on the bridge; none: own netns with only lo; host: the host's network.")
@click.option("--workdir", "-w", default="", help="Working directory inside the container.")
@click.option("--user", "-u", default="", help="uid[:gid] or name[:group] from the image.")
@click.option("--read-only", is_flag=True, help="Mount the container's root filesystem read-only.")
@click.option("--tmpfs-rootfs", is_flag=True,
              help="Keep the container's writable layer in memory (a tmpfs in its own mount namespace, "
                   "at most --memory or 512M, counted against its memory limit) instead of on disk. "
                   "Files it writes vanish when the container stops.")
@click.option("--entrypoint", default=None, help="Override the image's entrypoint (a single program).")
@click.option("--no-init", is_flag=True, help="Run the command as pid 1 itself instead of under a zombie-reaping init.")
@click.option("--keep", is_flag=True, help="Keep a foreground container after it exits (it is removed by default).")
@click.option("--security-opt", "security_opts", multiple=True, metavar="seccomp=PROFILE",
              help="seccomp=unconfined (no filter) or seccomp=PROFILE.json (an OCI/Docker profile) instead of "
                   "the default profile (Docker's).")
@click.option("--userns", is_flag=True,
              help="Run in a user namespace: root inside is an unprivileged host id range of its own "
                   "(what every `fcrun serve` instance gets).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def run(obj: Context, image, name, detach, cpu, memory, pids, hostname, env, network, workdir, user, read_only,
        tmpfs_rootfs, entrypoint, no_init, keep, security_opts, userns, command):
    """Run COMMAND in a new container (default: the image's entrypoint and cmd).

    Exits with the command's exit code (128+N if it was killed by signal N); as docker and
    podman, 125 if fcrun failed before the command ran, 126 if the command cannot be invoked,
    127 if it was not found.
    """
    from fcrun.runrequest import RunRequest

    from fcrun_cli import run_here

    request = RunRequest(
        image=image, args=list(command), name=name, detach=detach, cpu=cpu, memory=memory, pids=pids,
        hostname=hostname, env=list(env), network=network, workdir=workdir, user=user, read_only=read_only,
        tmpfs_rootfs=tmpfs_rootfs, entrypoint=entrypoint, init=not no_init, security_opts=list(security_opts),
        userns=userns,
    )
    sys.exit(run_here.run(obj.runtime, request, keep=keep))


def _age(created: float) -> str:
    seconds = max(0, int(time.time() - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="Print names only.")
@click.pass_obj
def ps(obj: Context, as_json, quiet):
    """List containers: name, state, pid, IP, CPU quota, memory limit, memory in use, image, age, app."""
    rows = obj.runtime.list()
    if as_json:
        click.echo(json.dumps([msgspec.structs.asdict(row) for row in rows], indent=2))
        return
    if quiet:
        for row in rows:
            click.echo(row.name)
        return
    table = [("NAME", "STATE", "PID", "IP", "CPU", "MEMORY", "USED", "IMAGE", "AGE", "APP")]
    for r in rows:
        table.append((
            r.name, r.status, str(r.pid or "-"), r.ip or "-",
            f"{r.cpu:g}" if r.cpu else "-", format_bytes(r.memory_bytes),
            format_bytes(r.memory_used_bytes) if r.memory_used_bytes else "-", r.image or "-", _age(r.created_at),
            r.labels.get("fcrun.app", "-"),  # the app of a `fcrun serve` instance
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@main.command()
@click.argument("name", shell_complete=complete_containers)
@click.argument("sig", metavar="[SIGNAL]", default="TERM")
@click.pass_obj
def kill(obj: Context, name, sig):
    """Send SIGNAL (default TERM) to the container's pid 1."""
    obj.runtime.kill(name, parse_signal(sig))


@main.command()
@click.option("-f", "--force", is_flag=True, help="Kill the container first if it is running.")
@click.argument("names", nargs=-1, required=True, shell_complete=complete_containers)
@click.pass_obj
def rm(obj: Context, force, names):
    """Remove containers and everything they hold (cgroup, IP, upper dir)."""
    for name in names:
        obj.runtime.delete(name, force=force)


@main.command()
@click.argument("name", shell_complete=complete_containers)
@click.pass_obj
def freeze(obj: Context, name):
    """Freeze every process of a container (cgroup freezer)."""
    obj.runtime.freeze(name)


@main.command()
@click.argument("name", shell_complete=complete_containers)
@click.pass_obj
def thaw(obj: Context, name):
    """Resume a frozen container."""
    obj.runtime.thaw(name)


@main.command()
@click.argument("name", shell_complete=complete_containers)
@click.option("--cpu", default=None, help="New CPU limit (fraction of one CPU).")
@click.option("--memory", "-m", default=None, help="New memory limit (512M, 1G).")
@click.option("--pids", type=int, default=None, help="New process limit.")
@click.pass_obj
def update(obj: Context, name, cpu, memory, pids):
    """Change a running container's limits live, without a restart."""
    if cpu is None and memory is None and pids is None:
        raise SpecError("nothing to update: give --cpu, --memory or --pids", "fcrun update")
    obj.runtime.update(
        name,
        cpu=parse_cpu(cpu) if cpu is not None else None,
        memory_bytes=parse_memory(memory) if memory is not None else None,
        pids_max=pids,
    )


@main.command(name="exec", cls=ContainerCommand)
@click.argument("name", shell_complete=complete_containers)
@click.option("--env", "-e", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--workdir", "-w", default=None, help="Working directory inside the container.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_(obj: Context, name, env, workdir, command):
    """Run COMMAND inside a running container (its namespaces, cgroup and limits).

    Exits with the command's exit code; 125, 126 and 127 as `fcrun run`.
    """
    from fcrun.runtime.options import parse_env

    code = obj.runtime.exec(name, list(command), env=parse_env(env), cwd=workdir)
    sys.exit(code)


@main.command()
@click.option("--listen", default=None, metavar="HOST:PORT", help="Where the HTTP proxy listens. [default: 0.0.0.0:8080]")
@click.option("--config", "config_path", envvar="FCRUN_CONFIG", default=None, metavar="FILE",
              help="TOML configuration (every key has a default). [env FCRUN_CONFIG]")
@click.option("--log-format", type=click.Choice(["text", "json"]), envvar="FCRUN_LOG_FORMAT", default=None,
              help="serve's log lines: text or one JSON object a line. [env FCRUN_LOG_FORMAT; default text]")
@click.option("--access-log", is_flag=True, default=False,
              help="Log one line per request (app, instance, status, duration, cold start). [config: [proxy] access_log]")
@click.option("--role", type=click.Choice(["all", "node", "front"]), envvar="FCRUN_ROLE", default=None,
              help="all: one host; node: a compute host of a cluster; front: a proxy in front of the nodes "
                   "(node and front need a postgresql:// CMDB; docs/cluster.md). [config: [cluster] role; default all]")
@click.option("--node-name", default=None, metavar="NAME",
              help="This serve's name in the cluster. [config: [cluster] node_name; default HOSTNAME:RUN_ROOT]")
@click.option("--advertise", default=None, metavar="HOST:PORT",
              help="A node's address that fronts forward to. [config: [cluster] advertise; default --listen]")
@click.pass_obj
def serve(obj: Context, listen, config_path, log_format, access_log, role, node_name, advertise):
    """Run the reactive HTTP proxy, container manager and admin API.

    A request for an app with no running instance starts one and is held until it accepts
    connections; instances idle for the app's idle timeout are stopped. Manage apps with
    `fcrun app` (it talks to this server's admin socket). SIGTERM drains and stops
    everything; SIGHUP reloads the apps and the config file.

    Several hosts (--role node on each compute host, --role front on the proxies, one
    PostgreSQL CMDB): docs/cluster.md. A front runs no containers and needs no root.
    """
    from fcrun.serve import server

    if role != "front":
        from fcrun.runtime import require_root

        require_root()
    server.run(config_path, listen, obj.paths, runtime_overrides=obj._runtime_args, cmdb_url=obj.cmdb_url,
               log_format=log_format, access_log=access_log,
               cluster_overrides={"role": role, "node_name": node_name, "advertise": advertise})


@main.command()
@click.pass_obj
def gc(obj: Context):
    """Remove stopped containers and whatever a crashed fcrun left behind."""
    for item in obj.runtime.gc():
        click.echo(f"removed {item}")


@main.command(name="daemon")
@click.option("--pool", multiple=True, metavar="IMAGE=COUNT", help="Keep COUNT pre-warmed instances of IMAGE (repeatable).")
@click.pass_obj
def daemon(obj: Context, pool):
    """Run the fork-server in the foreground at <state>/forkserver.sock.

    While it runs, `fcrun run` is a thin client: the fork-server creates the container,
    attached to the client's stdin, stdout and stderr, and the command skips the CLI's
    imports and the container set-up in a fresh process (on par with `runc run`: see
    bench/README.md). `fcrun serve` starts one of its own (at the same socket); run one or the
    other. SIGTERM or Ctrl-C stops it (foreground containers it runs are killed; detached ones
    live on).
    """
    import socket as socket_

    from fcrun.forkserver import server
    from fcrun.runtime import require_root

    require_root()
    path = os.path.join(obj.paths.run_root, "forkserver.sock")
    probe = socket_.socket(socket_.AF_UNIX, socket_.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        pass  # none there, or a stale socket that the fork-server replaces
    else:
        raise AlreadyExists(f"a fork-server already listens at {path} (`fcrun serve`'s, or another `fcrun daemon`)")
    finally:
        probe.close()
    args = ["--socket", path, "--data-root", obj.paths.data_root, "--run-root", obj.paths.run_root,
            "--cgroup-parent", obj._runtime_args["cgroup_parent"], "--bridge", obj._runtime_args["bridge"],
            "--subnet", obj._runtime_args["subnet"]]
    for item in pool:
        args += ["--pool", item]
    sys.exit(server.main(args))
