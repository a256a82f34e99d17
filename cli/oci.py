"""`fcrun-oci`: runc's command line over fcrun's library, for engines (podman, containerd).

A thin front like `fcrun` (cli/main.py): it parses runc's flags and calls fcrun.runtime's
public API. The commands are oci_commands.py's; what they print (state JSON, the list
table, features, the default spec) is oci_report.py's; the process that holds a created
container until `start` is oci_holder.py's.

Engines expect runc's conventions, kept here: global flags before the command (--root,
--log, --log-format, --debug, --systemd-cgroup); every error exits 1 with one line on
stderr, and the same line in --log (a JSON object {"level","msg","time"} with
--log-format json, which engines read back). argparse, not click, and only for what
oci_fast.parse leaves to it (the plain forms of create, start, delete, state and kill are read
by hand): engines run this binary three times per container, and start-up time counts.
"""

from __future__ import annotations

import os
import sys

from fcrun_cli.oci_fast import log_line

DEFAULT_ROOT = "/run/fcrun-oci"
VERSION = "0.1.0"  # pyproject's; importlib.metadata would cost ~10 ms per call


class OciError(Exception):
    """An error the CLI itself finds (bad flags, unsupported options, unknown container)."""


class Options:
    """The global flags, and what commands share: the Runtime, made on first use."""

    def __init__(self, args):
        self.root = os.path.abspath(args.root)
        self.log_path = args.log
        self.log_format = args.log_format
        self.debug = args.debug
        self._runtime = None

    @property
    def runtime(self):
        if self._runtime is None:
            from fcrun.paths import Paths
            from fcrun.runtime import Runtime

            # --root is one world: state, locks and id ranges under it, and a cgroup parent
            # of its own, so that the same ID under two roots names two containers.
            self._runtime = Runtime(Paths(data_root=self.root, run_root=self.root),
                                    cgroup_parent=cgroup_parent_for(self.root), spawner=False)
        return self._runtime

    @property
    def holder_dir(self) -> str:
        """Where the start sockets of created containers live (oci_holder.py)."""
        return os.path.join(self.root, "oci")

    def log(self, level: str, message: str) -> None:
        """Append one line to --log, in --log-format (runc's logrus formats)."""
        log_line(self.log_path, self.log_format, level, message)


def cgroup_parent_for(root: str) -> str:
    """The cgroup parent of the containers under state root `root`: "fcrun-oci" (or
    $FCRUN_OCI_CGROUP_PARENT) for the default root, with "-<hash of root>" for any other, so
    that the same ID under two roots is two cgroups."""
    base = os.environ.get("FCRUN_OCI_CGROUP_PARENT") or "fcrun-oci"
    if root == DEFAULT_ROOT:
        return base
    try:
        from _sha256 import sha256  # hashlib would load OpenSSL first: ~2 ms of each command
    except ImportError:  # Python 3.12+: _sha2
        from hashlib import sha256

    return f"{base}-{sha256(root.encode()).hexdigest()[:12]}"


def build_parser():
    """The whole command line (oci_fast.parse reads the frequent commands' plain forms without
    it: importing and building this costs more than some commands' work)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        """argparse, with a usage error as one line and exit 1 (runc's "flag provided but not
        defined"), logged like any other error, instead of usage text and exit 2."""

        def error(self, message: str):
            raise OciError(f"{self.prog}: {message}")

    parser = Parser(prog="fcrun-oci", description="An OCI runtime with runc's command line, on fcrun.")
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"state directory (default {DEFAULT_ROOT})")
    parser.add_argument("--log", default="", help="append errors (and --debug messages) to this file")
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="format of --log")
    parser.add_argument("--debug", action="store_true", help="log debug messages too")
    parser.add_argument("--systemd-cgroup", action="store_true", help="not supported: refused")
    parser.add_argument("--rootless", dest="global_rootless", default="false", help="only 'false' (or 'auto' as root) is supported")
    parser.add_argument("-v", "--version", action="store_true", help="print the version")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, func_name, help_text):
        # The function's name only: oci_commands (and the library) are imported once the
        # command is known; `start` mostly needs neither (run_command).
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func_name=func_name)
        return p

    p = command("create", "create", "create a container from a bundle (stopped before its process runs)")
    p.add_argument("id")
    p.add_argument("-b", "--bundle", default=".", help="bundle directory (default: the current one)")
    p.add_argument("--pid-file", default="", help="write the container's pid here")
    p.add_argument("--console-socket", default="", help="unix socket to send the pty master to (terminal: true)")
    p.add_argument("--no-pivot", action="store_true", help="accepted (fcrun always pivots)")
    p.add_argument("--no-new-keyring", action="store_true", help="accepted")
    p.add_argument("--preserve-fds", type=int, default=0, help="only 0 is supported")

    p = command("run", "run", "create and start a container, and wait for it (its exit code)")
    p.add_argument("id")
    p.add_argument("-b", "--bundle", default=".")
    p.add_argument("--pid-file", default="")
    p.add_argument("--console-socket", default="")
    p.add_argument("-d", "--detach", action="store_true")
    p.add_argument("--no-pivot", action="store_true")
    p.add_argument("--no-new-keyring", action="store_true")
    p.add_argument("--preserve-fds", type=int, default=0)

    command("start", "start", "run the user process of a created container").add_argument("id")
    command("state", "state", "print a container's OCI state as JSON").add_argument("id")

    p = command("kill", "kill", "send a signal (default TERM) to a container's process")
    p.add_argument("-a", "--all", action="store_true", help="to every process of the container")
    p.add_argument("id")
    p.add_argument("signal", nargs="?", default="SIGTERM")

    p = command("delete", "delete", "remove a stopped (or, with --force, any) container")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("id")

    p = command("list", "list_", "list containers")
    p.add_argument("-f", "--format", default="table", choices=["table", "json"])
    p.add_argument("-q", "--quiet", action="store_true")

    p = command("ps", "ps", "processes of a container")
    p.add_argument("-f", "--format", default="table", choices=["table", "json"])
    p.add_argument("id")
    p.add_argument("ps_args", nargs=argparse.REMAINDER)

    command("pause", "pause", "freeze every process of a container").add_argument("id")
    command("resume", "resume", "thaw a paused container").add_argument("id")

    p = command("exec", "exec_", "run a process in a running container")
    p.add_argument("-p", "--process", default="", help="process.json (OCI process) instead of ARGS")
    p.add_argument("-d", "--detach", action="store_true")
    p.add_argument("--pid-file", default="")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("--console-socket", default="")
    p.add_argument("-e", "--env", action="append", default=[])
    p.add_argument("--cwd", default="")
    p.add_argument("-u", "--user", default="", help="uid[:gid]")
    p.add_argument("-g", "--additional-gids", action="append", type=int, default=[], help="add a supplementary group")
    p.add_argument("-c", "--cap", action="append", default=[], help="add a capability")
    p.add_argument("--no-new-privs", action="store_true", default=None, help="set no_new_privs")
    p.add_argument("--apparmor", default="", help="not supported: refused")
    p.add_argument("--process-label", default="", help="not supported: refused")
    p.add_argument("--cgroup", action="append", default=[], help="not supported: refused")
    p.add_argument("--preserve-fds", type=int, default=0)
    p.add_argument("id")
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = command("update", "update", "change a live container's resource limits")
    p.add_argument("-r", "--resources", default="", help="LinuxResources JSON file ('-': stdin)")
    for flag in ("--memory", "--memory-swap", "--memory-reservation", "--kernel-memory", "--kernel-memory-tcp",
                 "--cpuset-cpus", "--cpuset-mems"):
        p.add_argument(flag, default=None)
    for flag in ("--cpu-shares", "--cpu-period", "--cpu-quota", "--cpu-rt-period", "--cpu-rt-runtime",
                 "--pids-limit", "--blkio-weight"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument("id")

    p = command("events", "events", "container statistics (--stats: one JSON object)")
    p.add_argument("--stats", action="store_true")
    p.add_argument("--interval", default="5s")
    p.add_argument("id")

    command("features", "features", "print the features this runtime supports (JSON)")

    p = command("spec", "spec", "write a default config.json")
    p.add_argument("-b", "--bundle", default="")
    p.add_argument("--rootless", action="store_true")
    return parser


def main(argv: list[str] | None = None, args=None) -> int:
    """`args`: argv already parsed (by oci_fast.parse, as build_parser's parser would)."""
    argv = sys.argv[1:] if argv is None else argv
    if args is None:
        try:
            args = build_parser().parse_args(argv)
        except OciError as exc:  # --log may not be parsed yet: stderr only
            print(exc, file=sys.stderr)
            return 1
    options = Options(args)
    try:
        if args.version:
            from fcrun.runtime.spec import OCI_VERSION

            print(f"fcrun-oci version {VERSION}\nspec: {OCI_VERSION}")
            return 0
        if args.systemd_cgroup:
            raise OciError("--systemd-cgroup is not supported: fcrun-oci manages cgroupfs directly "
                           "(configure the engine's cgroup manager as cgroupfs)")
        if args.global_rootless not in ("false", "auto") or (args.global_rootless == "auto" and os.geteuid() != 0):
            raise OciError("rootless mode is not supported: run fcrun-oci as root")
        if args.command is None:
            build_parser().print_help()
            return 0
        if options.debug:
            options.log("debug", f"fcrun-oci {' '.join(argv)}")
        return run_command(options, args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - every error is one line and exit 1, as runc
        if isinstance(exc, SystemExit):
            raise
        message = describe(exc)
        if options.debug:
            import traceback

            options.log("debug", "".join(traceback.format_exception(exc)))
        options.log("error", message)
        print(message, file=sys.stderr)
        return 1


def run_command(options: Options, args) -> int:
    if args.func_name == "start":
        # Engines run `start` right after `create`: ask the holder at once, with the standard
        # library only. Without a holder (not created, or gone), the full command says why.
        from fcrun_cli.oci_fast import HolderGone, ask_holder

        try:
            ask_holder(options.holder_dir, args.id)
            return 0
        except HolderGone:
            pass
        except RuntimeError as exc:  # the start itself failed: the holder's message
            raise OciError(str(exc)) from None
    from fcrun_cli import oci_commands

    return getattr(oci_commands, args.func_name)(options, args) or 0


def describe(exc: BaseException) -> str:
    """One line for an error: the library's own message (it names what and where), else the
    OS error with its file."""
    from fcrun.errors import FcrunError

    if isinstance(exc, OSError) and not isinstance(exc, FcrunError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
