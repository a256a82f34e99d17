"""The entry point of `fcrun-oci` under its launcher (cli/fcrun-oci): paths by hand, and `start`
with the interpreter's built-in modules only.

Engines run the runtime three times per container (create, start, delete), so Python's start-up
counts three times. The launcher runs `python3 -S -E` (site-packages' .pth files and an editable
install's import finder alone cost ~12-15 ms) and imports this module from its directory; then
bootstrap.py puts on sys.path by hand what the library needs (as for `fcrun run`).

`start` (no --debug, an ID and nothing else) is the holder's socket protocol only
(cli/oci_holder.py): the holder of the created container starts it and answers. Everything
else, and a `start` without a holder (the full command then says why), goes to cli/oci.py's
main, in this process. Nothing here imports os, socket or argparse: each is a visible share
of a ~10 ms command.
"""

import sys  # no `from __future__ import annotations`: one import more

import _socket
import posix

try:
    from . import bootstrap  # as fcrun_cli.oci_fast
except ImportError:  # the launcher's: imported from its directory, on sys.path while this module loads
    import bootstrap

DEFAULT_ROOT = "/run/fcrun-oci"  # oci.DEFAULT_ROOT (a unit test checks)
REPLY_MAX_BYTES = 4096
LONGEST_PLAIN_NAME = 80  # beyond it the socket is named by a hash of the ID (sun_path: 107 bytes)


class HolderGone(Exception):
    """No holder answers for a created container: it was killed, or the machine rebooted."""


class Fallback(Exception):
    """Not for the fast path: cli/oci.py's main reads this command line."""


# ----- the library's paths -------------------------------------------------------------------

# ----- the command line of the frequent commands -------------------------------------------

class Namespace:
    """argparse.Namespace's stand-in: the parsed flags as attributes."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __eq__(self, other):
        return vars(self) == vars(other)


# What engines run per container, as oci.build_parser defines them: command -> (func_name,
# {flag: dest} of flags that take a value, {flag: dest} of switches, positionals (a trailing "?":
# optional), defaults). Any other command or form goes to argparse (oci.main).
GLOBAL_VALUES = {"--root": "root", "--log": "log", "--log-format": "log_format", "--rootless": "global_rootless"}
GLOBAL_SWITCHES = {"--debug": "debug"}
GLOBAL_DEFAULTS = {"root": DEFAULT_ROOT, "log": "", "log_format": "text", "debug": False, "systemd_cgroup": False,
                   "global_rootless": "false", "version": False}
COMMANDS = {
    "create": ("create", {"-b": "bundle", "--bundle": "bundle", "--pid-file": "pid_file",
                          "--console-socket": "console_socket", "--preserve-fds": "preserve_fds"},
               {"--no-pivot": "no_pivot", "--no-new-keyring": "no_new_keyring"}, ("id",),
               {"bundle": ".", "pid_file": "", "console_socket": "", "no_pivot": False, "no_new_keyring": False,
                "preserve_fds": 0}),
    "start": ("start", {}, {}, ("id",), {}),
    "state": ("state", {}, {}, ("id",), {}),
    "delete": ("delete", {}, {"-f": "force", "--force": "force"}, ("id",), {"force": False}),
    "kill": ("kill", {}, {"-a": "all", "--all": "all"}, ("id", "signal?"), {"all": False, "signal": "SIGTERM"}),
}
INT_DESTS = ("preserve_fds",)


def _flags(argv: list[str], i: int, values: dict, switches: dict, out: dict, positionals: list | None) -> int:
    """Read flags (and, given a list, positionals) from argv[i:] into `out`; returns where it
    stopped: at the first positional when `positionals` is None.

    Raises:
        Fallback: a flag not in the tables (argparse's abbreviations too), a value that starts
            with "-" or is missing, "--", or an int flag's value not an int.
    """
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            if positionals is None:
                return i
            positionals.append(arg)
            i += 1
            continue
        flag, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if flag in switches and not eq:
            out[switches[flag]] = True
        elif flag in values:
            if not eq:
                i += 1
                if i == len(argv) or argv[i].startswith("-"):
                    raise Fallback(flag)  # argparse's "expected one argument", or a negative number
                value = argv[i]
            dest = values[flag]
            if dest in INT_DESTS:
                if not value.isdigit() or not value.isascii():
                    raise Fallback(flag)
                value = int(value)
            out[dest] = value
        else:
            raise Fallback(flag)
        i += 1
    return i


def parse(argv: list[str]) -> Namespace:
    """The Namespace oci.build_parser's parser would give for `[global flags] COMMAND ...` of
    one of COMMANDS, with its plain forms.

    Raises:
        Fallback: anything else (argparse then reads it, with its own messages).
    """
    out = dict(GLOBAL_DEFAULTS)
    i = _flags(argv, 0, GLOBAL_VALUES, GLOBAL_SWITCHES, out, None)
    if i == len(argv) or argv[i] not in COMMANDS:
        raise Fallback("not a command this parser reads")
    command = argv[i]
    func_name, values, switches, names, defaults = COMMANDS[command]
    out.update(defaults, command=command, func_name=func_name)
    positionals: list[str] = []
    _flags(argv, i + 1, values, switches, out, positionals)
    required = [n for n in names if not n.endswith("?")]
    if not len(required) <= len(positionals) <= len(names):
        raise Fallback("positionals")
    for name, value in zip(names, positionals):
        out[name.rstrip("?")] = value
    return Namespace(**out)


# ----- start, and delete through the holder ------------------------------------------------

def holder_dir(args: Namespace) -> str | None:
    """Where the holder's socket is (oci.Options.holder_dir), or None where oci.main must see
    the flags first (it may refuse them, or --debug logs the command line)."""
    root = args.root
    if args.debug or args.global_rootless != "false" or args.log_format not in ("text", "json") or \
            not root.startswith("/") or "/." in root or "//" in root:
        return None
    return root.rstrip("/") + "/oci"


def socket_file(name: str) -> str:
    """The socket's file name in the holder dir: the ID's, or its hash's for a long ID."""
    if len(name) > LONGEST_PLAIN_NAME:
        import hashlib

        name = hashlib.sha256(name.encode()).hexdigest()[:40]
    return name + ".sock"


def ask_holder(holder_dir: str, name: str, request: str = "start") -> None:
    """Send `request` ("start", "delete", "delete force") to the holder of container `name`
    (oci_holder.py's protocol); what the command logged there goes to our stderr.

    Raises:
        HolderGone: no holder answers. RuntimeError: the command failed (its message).
    """
    try:
        # sun_path holds 107 bytes; a deep --root would not fit. The same directory reached
        # through our fd of it is always short.
        dir_fd = posix.open(holder_dir, posix.O_PATH | posix.O_DIRECTORY | posix.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise HolderGone(name) from None
    try:
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        try:
            conn.connect(f"/proc/self/fd/{dir_fd}/{socket_file(name)}")
            conn.send(request.encode())
            reply = conn.recv(REPLY_MAX_BYTES)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
            # None there, or it left (another start's, or the container's death) while we
            # waited in its queue.
            raise HolderGone(name) from None
        finally:
            conn.close()
    finally:
        posix.close(dir_fd)
    status, _, logged = reply.partition(b"\n")
    if logged:
        sys.stderr.write(logged.decode(errors="replace"))
    if status == b"ok":
        return
    if not status:
        raise HolderGone(name)
    raise RuntimeError(status.removeprefix(b"error ").decode(errors="replace"))


# ----- errors as runc reports them -----------------------------------------------------------

def log_line(path: str, log_format: str, level: str, message: str) -> None:
    """Append one line to --log `path`, in --log-format (runc's logrus formats)."""
    if not path:
        return
    import datetime
    import json

    now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    if log_format == "json":
        line = json.dumps({"level": level, "msg": message, "time": now}, separators=(",", ":"))
    else:
        line = f"time={json.dumps(now)} level={level} msg={json.dumps(message)}"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as exc:  # the error itself still reaches stderr
        print(f"fcrun-oci: write log {path}: {exc}", file=sys.stderr)


def through_holder(args: Namespace) -> int | None:
    """`start ID` and `delete [--force] ID` by the created container's holder (oci_holder.py),
    which has the library loaded; its exit code, or None where the full command runs (no
    holder answers: never created, started long ago, or its holder is gone)."""
    directory = holder_dir(args)
    if directory is None:
        return None
    request = "start" if args.command == "start" else ("delete force" if args.force else "delete")
    try:
        ask_holder(directory, args.id, request)
    except HolderGone:
        return None
    except RuntimeError as exc:  # the command failed: the holder's message, as oci.main says it
        message = " ".join(str(exc).split()) or "OciError"
        log_line(args.log, args.log_format, "error", message)
        print(message, file=sys.stderr)
        return 1
    return 0


def delete_of_nothing(args: Namespace) -> int | None:
    """`delete` of a container that does not exist (no state directory, no holder socket): what
    oci_commands.delete says of it (--force: nothing to do, exit 0; else "container does not
    exist"), without loading the library; None where it may exist (the full command then runs).
    Engines delete twice at times (podman's cleanup process, then its own)."""
    directory = holder_dir(args)
    name = args.id
    if directory is None or not name or "/" in name or name.startswith("."):
        return None
    for path in (directory[:-len("/oci")] + "/containers/" + name, directory + "/" + socket_file(name)):
        try:
            posix.stat(path)
            return None
        except FileNotFoundError:
            continue
        except OSError:
            return None
    if args.force:
        return 0
    log_line(args.log, args.log_format, "error", "container does not exist")
    print("container does not exist", file=sys.stderr)
    return 1


def main() -> None:
    """The launcher's entry: sys.argv is [-c, SITE_PACKAGES, ARG...]."""
    site_packages = sys.argv.pop(1)
    argv = sys.argv[1:]
    try:
        args = parse(argv)
    except Fallback:
        args = None
    if args is not None and args.command in ("start", "delete"):
        code = through_holder(args)
        if code is None and args.command == "delete":
            code = delete_of_nothing(args)
        if code is not None:
            sys.exit(code)
    bootstrap.setup_paths(bootstrap.dirname(bootstrap.absolute(__file__)), bootstrap.absolute(site_packages))
    sys.modules.setdefault("fcrun_cli.oci_fast", sys.modules[__name__])  # one copy: HolderGone is one class

    def oci_main() -> int:
        bootstrap.import_msgspec()
        from fcrun_cli.oci import main

        return main(argv, args)

    bootstrap.exit_with(oci_main)


