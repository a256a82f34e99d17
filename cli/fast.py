"""The `fcrun` command's entry point, and the thin client of `fcrun run`.

`fcrun run ...` with a fork-server listening at <run root>/forkserver.sock (`fcrun daemon`,
or `fcrun serve`'s) is sent there as one `Run` request, with this process's stdin, stdout and
stderr passed along (SCM_RIGHTS); the fork-server creates the container attached to them and
answers with its exit code once it exited (and removes it right after). This process forwards the signals
the in-process CLI forwards, and exits with that code. Nothing else is imported: no click, no
msgspec, no fcrun (start-up time is most of a short `fcrun run`), so this module uses the
interpreter's built-in modules only (not even os: the `fcrun` launcher starts Python without
site, and there importing os is a visible share of the whole start-up) and speaks the little
msgpack it needs itself.

Without a fork-server (none listening, not root, or one set up with other roots, cgroup parent
or network than this command line would use), `fcrun run` runs in this process as the click
command would, but without click and, under the launcher, without site (run_here.py,
bootstrap.py). Everything else goes to the click CLI (fcrun_cli.main), in this process: other
commands, and an option or value this parser does not take as certainly valid (the click
command then gives its own error).

    fcrun run --image busybox -- true
        |  Run(image="busybox", args=["true"], ...) + [fd 0, fd 1, fd 2]  -->  fork-server
        |  Signal(n) for SIGINT, SIGTERM, ... while it runs                -->
        |  <--  Exited(code) | Detached(name) | Failed(kind, message, exit_code)
"""

import sys  # no `from __future__ import annotations`: the module __future__ is one import more

import _signal
import posix
import _socket
import _struct

# Must equal fcrun.paths' defaults (a unit test checks): importing fcrun.paths would cost more than
# the rest of the thin client.
DEFAULT_DATA_ROOT = "/var/lib/fcrun"
DEFAULT_RUN_ROOT = "/run/fcrun"
DEFAULT_CGROUP_PARENT = "fcrun"
DEFAULT_BRIDGE = "fcrun0"
DEFAULT_SUBNET = "10.88.0.0/16"
SOCKET_NAME = "forkserver.sock"
MAX_REPLY_BYTES = 1 << 20

# The signals `fcrun run` forwards to the container's pid 1 (fcrun_cli.run_here.FORWARDED_SIGNALS).
FORWARDED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1,
                     _signal.SIGUSR2, _signal.SIGWINCH)

# Options of `fcrun` itself (value, env var) and of `fcrun run` (option -> the click parameter and
# RunRequest field it sets), as in fcrun_cli/main.py. Every option of click's `fcrun run` is in
# exactly one of the three run tables, with the same name, kind and choices (test_fastcli.py checks).
GLOBAL_OPTIONS = {"--root": "FCRUN_ROOT", "--state": "FCRUN_RUN", "--cgroup-parent": "FCRUN_CGROUP_PARENT",
                  "--bridge": "FCRUN_BRIDGE", "--subnet": "FCRUN_SUBNET",
                  "--cmdb": "FCRUN_CMDB"}  # taken and unused: `fcrun run` reads no CMDB
RUN_VALUE_OPTIONS = {"--image": "image", "-i": "image", "--name": "name", "--cpu": "cpu", "--memory": "memory",
                     "-m": "memory", "--pids": "pids", "--hostname": "hostname", "--env": "env", "-e": "env",
                     "--net": "network", "--workdir": "workdir", "-w": "workdir", "--user": "user", "-u": "user",
                     "--entrypoint": "entrypoint"}
RUN_LIST_FIELDS = ("env",)  # repeatable value options
RUN_FLAGS = {"-d": "detach", "--detach": "detach", "--read-only": "read_only", "--no-init": "no_init"}
# Left to the click CLI (the command line falls back to it): --keep (the fork-server always
# removes a foreground container), --security-opt (a profile is a file to read and compile),
# --tmpfs-rootfs and --userns (rare: the in-process path), and help.
RUN_CLICK_ONLY = ("--keep", "--security-opt", "--tmpfs-rootfs", "--userns", "-h", "--help")
NETWORKS = ("bridge", "none", "host")
# What `fcrun run` exits with when it fails itself (as docker and podman): 125 fcrun's own
# failure, 126 the command cannot be invoked, 127 not found (fcrun.errors; a unit test checks).
OWN_EXIT_CODES = (125, 126, 127)


class Fallback(Exception):
    """Not for the thin client: the click CLI handles this command line."""


def parse(argv: list[str], environ: dict[str, str] | None = None) -> tuple[str, dict]:
    """`fcrun [global options] run [options] [--] COMMAND...` -> (socket path, Run fields).

    Raises:
        Fallback: anything the click command would read differently or reject (it then does).
    """
    settings: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i] != "run":
        opt, value, i = _option(argv, i)
        if opt not in GLOBAL_OPTIONS or not value:
            raise Fallback(opt)  # click reads an empty value differently from an absent one
        settings[opt] = value
    if i == len(argv):
        raise Fallback("not `fcrun run`")
    i += 1

    getenv = _getenv if environ is None else environ.get

    def setting(opt: str, default: str) -> str:
        return settings.get(opt) or getenv(GLOBAL_OPTIONS[opt]) or default

    run: dict = {"args": [], **{field: [] for field in RUN_LIST_FIELDS}}
    flags: set[str] = set()
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # click: everything after is COMMAND
            run["args"].extend(argv[i + 1:])
            break
        if not arg.startswith("-") or arg == "-":  # click intersperses: options may follow COMMAND words
            run["args"].append(arg)
            i += 1
            continue
        if arg in RUN_FLAGS:
            flags.add(RUN_FLAGS[arg])
            i += 1
            continue
        opt, value, i = _option(argv, i)
        field = RUN_VALUE_OPTIONS.get(opt)
        if field is None:
            raise Fallback(opt)  # --keep, --help, an unknown or new option, -dw combined flags
        if field in RUN_LIST_FIELDS:
            run[field].append(value)
        else:
            run[field] = value
    if "image" not in run:
        raise Fallback("--image missing")
    if "pids" in run:
        try:
            run["pids"] = int(run["pids"])  # what click's INT does
        except ValueError:
            raise Fallback("--pids") from None
    if run.get("network", "bridge") not in NETWORKS:
        raise Fallback("--net")
    if run.get("entrypoint") == "":
        del run["entrypoint"]  # the CLI reads an empty --entrypoint as none
    run["detach"] = "detach" in flags
    run["read_only"] = "read_only" in flags
    run["init"] = "no_init" not in flags
    run["data_root"] = abspath(setting("--root", DEFAULT_DATA_ROOT))
    run["cgroup_parent"] = setting("--cgroup-parent", DEFAULT_CGROUP_PARENT)
    run["bridge"] = setting("--bridge", DEFAULT_BRIDGE)
    run["subnet"] = setting("--subnet", DEFAULT_SUBNET)
    for value in (*run["args"], *(item for field in RUN_LIST_FIELDS for item in run[field])):
        _check_text(value)
    for key in ("image", "name", "cpu", "memory", "hostname", "workdir", "user", "entrypoint"):
        if key in run:
            _check_text(run[key])
    run_root = abspath(setting("--state", DEFAULT_RUN_ROOT))
    return run_root.rstrip("/") + "/" + SOCKET_NAME, run


def _getenv(name: str) -> str | None:
    """os.environ.get(name), from posix.environ (bytes), decoded as os.environ decodes it."""
    value = posix.environ.get(name.encode())
    return None if value is None else value.decode("utf-8", "surrogateescape")


def abspath(path: str) -> str:
    """os.path.abspath(path) (a unit test compares them), without os."""
    if not path.startswith("/"):
        path = posix.getcwd() + "/" + path
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return ("//" if path.startswith("//") and not path.startswith("///") else "/") + "/".join(parts)


def _option(argv: list[str], i: int) -> tuple[str, str, int]:
    """One `--opt value`, `--opt=value` or `-o value` at argv[i] -> (opt, value, next index)."""
    arg = argv[i]
    if arg.startswith("--") and "=" in arg:
        opt, _, value = arg.partition("=")
        return opt, value, i + 1
    if not arg.startswith("-") or (not arg.startswith("--") and len(arg) != 2):
        raise Fallback(arg)
    if i + 1 == len(argv) or argv[i + 1].startswith("-"):
        raise Fallback(f"{arg} without a plain value")  # click's own error (or reading) applies
    return arg, argv[i + 1], i + 2


def _check_text(value: str) -> None:
    try:
        value.encode("utf-8")  # msgpack strings are UTF-8; argv bytes that are not go the long way
    except UnicodeEncodeError:
        raise Fallback("not UTF-8") from None


# ----- the little msgpack needed (msgspec's tagged Structs are maps with a "type" key) --------

def encode(value) -> bytes:
    if value is None:
        return b"\xc0"
    if value is True:
        return b"\xc3"
    if value is False:
        return b"\xc2"
    if isinstance(value, int):
        if 0 <= value < 0x80:
            return bytes((value,))
        if -32 <= value < 0:
            return _struct.pack(">b", value)
        return b"\xd3" + _struct.pack(">q", value)
    if isinstance(value, str):
        data = value.encode("utf-8")
        n = len(data)
        if n < 32:
            return bytes((0xA0 | n,)) + data
        if n < 0x100:
            return b"\xd9" + bytes((n,)) + data
        if n < 0x10000:
            return b"\xda" + _struct.pack(">H", n) + data
        return b"\xdb" + _struct.pack(">I", n) + data
    if isinstance(value, list):
        n = len(value)
        head = bytes((0x90 | n,)) if n < 16 else b"\xdd" + _struct.pack(">I", n)
        return head + b"".join(encode(item) for item in value)
    if isinstance(value, dict):
        n = len(value)
        head = bytes((0x80 | n,)) if n < 16 else b"\xdf" + _struct.pack(">I", n)
        return head + b"".join(encode(k) + encode(v) for k, v in value.items())
    raise TypeError(f"cannot encode {type(value).__name__}")


def decode(data: bytes):
    """One msgpack value (maps, arrays, strings, ints, floats, nil, bools). Raises ValueError."""
    value, end = _decode(data, 0)
    if end != len(data):
        raise ValueError("trailing bytes after the message")
    return value


_FIXED = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
          0xCA: ">f", 0xCB: ">d"}


def _decode(data: bytes, i: int):
    if i >= len(data):
        raise ValueError("truncated message")
    b = data[i]
    i += 1
    if b < 0x80:
        return b, i
    if b >= 0xE0:
        return b - 0x100, i
    if 0x80 <= b <= 0x8F:
        return _decode_map(data, i, b & 0x0F)
    if 0x90 <= b <= 0x9F:
        return _decode_array(data, i, b & 0x0F)
    if 0xA0 <= b <= 0xBF:
        return _decode_str(data, i, b & 0x1F)
    if b == 0xC0:
        return None, i
    if b in (0xC2, 0xC3):
        return b == 0xC3, i
    if b in _FIXED:
        fmt = _FIXED[b]
        size = _struct.calcsize(fmt)
        if i + size > len(data):
            raise ValueError("truncated message")
        return _struct.unpack_from(fmt, data, i)[0], i + size
    lengths = {0xD9: (">B", "str"), 0xDA: (">H", "str"), 0xDB: (">I", "str"), 0xDC: (">H", "array"),
               0xDD: (">I", "array"), 0xDE: (">H", "map"), 0xDF: (">I", "map")}
    if b in lengths:
        fmt, kind = lengths[b]
        size = _struct.calcsize(fmt)
        if i + size > len(data):
            raise ValueError("truncated message")
        n = _struct.unpack_from(fmt, data, i)[0]
        i += size
        return {"str": _decode_str, "array": _decode_array, "map": _decode_map}[kind](data, i, n)
    raise ValueError(f"unsupported msgpack byte 0x{b:02x}")


def _decode_str(data: bytes, i: int, n: int):
    if i + n > len(data):
        raise ValueError("truncated message")
    return data[i:i + n].decode("utf-8"), i + n


def _decode_array(data: bytes, i: int, n: int):
    items = []
    for _ in range(n):
        item, i = _decode(data, i)
        items.append(item)
    return items, i


def _decode_map(data: bytes, i: int, n: int):
    result = {}
    for _ in range(n):
        key, i = _decode(data, i)
        result[key], i = _decode(data, i)
    return result, i


def frame(message: dict) -> bytes:
    body = encode(message)
    return _struct.pack(">I", len(body)) + body


# ----- the client ------------------------------------------------------------------------

def connect(path: str):
    """A connection to the fork-server at `path`. Raises Fallback when none answers there."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except (OSError, ValueError):  # none there, a stale socket, not root (0600), a path too long
        sock.close()
        raise Fallback(f"no fork-server at {path}") from None
    return sock


def read_reply(sock) -> dict | None:
    """The next reply, or None if the fork-server closed the connection first."""
    buffer = b""
    while len(buffer) < 4:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buffer += chunk
    (length,) = _struct.unpack_from(">I", buffer)
    if length > MAX_REPLY_BYTES:
        raise ValueError(f"reply of {length} bytes")
    while len(buffer) < 4 + length:
        chunk = sock.recv(max(4096, 4 + length - len(buffer)))
        if not chunk:
            return None
        buffer += chunk
    reply = decode(buffer[4:4 + length])
    if not isinstance(reply, dict):
        raise ValueError("a reply that is not a map")
    return reply


def run(path: str, fields: dict) -> int:
    """Send Run, relay signals, return the exit code `fcrun run` exits with.

    Raises:
        Fallback: no fork-server, or one that cannot run it as this command line would (it
            made nothing then).
    """
    detach = fields["detach"]
    if not detach:
        for fd in (0, 1, 2):
            try:
                posix.fstat(fd)
            except OSError:
                raise Fallback(f"fd {fd} is not open") from None
    sock = connect(path)
    try:
        message = frame({"type": "Run", **fields})
        if detach:
            sock.sendall(message)
        else:
            # The frame and the three fds in one sendmsg: they arrive together.
            sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _struct.pack("3i", 0, 1, 2))])

            def forward(signum, _frame):
                try:
                    sock.sendall(frame({"type": "Signal", "signal": signum}))
                except OSError:
                    pass  # the fork-server is gone: the reply loop below says so

            for sig in FORWARDED_SIGNALS:
                _signal.signal(sig, forward)
        reply = read_reply(sock)
    except OSError as exc:
        print(f"fcrun: fork-server at {path}: [Errno {exc.errno}] {exc.strerror}", file=sys.stderr)
        return OWN_EXIT_CODES[0]
    except ValueError as exc:
        print(f"fcrun: fork-server at {path}: bad reply: {exc}", file=sys.stderr)
        return OWN_EXIT_CODES[0]
    finally:
        sock.close()  # a signal from here on finds it closed: forward() ignores that
    match reply:
        case None:
            print(f"fcrun: the fork-server at {path} closed the connection before the container exited",
                  file=sys.stderr)
            return 125
        case {"type": "Exited", "code": int(code)}:
            return code
        case {"type": "Detached", "name": str(name)}:
            sys.stdout.write(name + "\n")
            sys.stdout.flush()
            return 0
        case {"type": "Failed", "kind": "Mismatch"}:
            raise Fallback("the fork-server is set up differently")
        case {"type": "Failed", "message": str(text)}:
            print(f"fcrun: {text}", file=sys.stderr)
            # The fork-server gives `fcrun run`'s code (fcrun.errors.command_exit_code); one that
            # could be the command's own (an older fork-server's 2 or 3) reads as 125.
            code = reply.get("exit_code")
            return code if code in OWN_EXIT_CODES else OWN_EXIT_CODES[0]
    print(f"fcrun: fork-server at {path}: unexpected reply {reply.get('type')!r}", file=sys.stderr)
    return 125


def main(argv: list[str] | None = None, site_packages: str = "") -> None:
    """The `fcrun` command: `fcrun run` through a fork-server if one runs, else in this process
    without click (run_here.py); every other command line to click.

    `site_packages`: where the launcher found the install's site-packages ("" when it did not
    say: site, if loaded, has put it on sys.path)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        path, fields = parse(argv)
    except Fallback:
        fields = None
    # The other paths run outside the handlers: inside one, every exception raised later (all
    # of `fcrun serve`) would chain to the Fallback as its __context__.
    if fields is None:
        _click_main(argv)
        return
    try:
        code = run(path, fields)
    except Fallback:
        code = None
    if code is None:
        _run_here(path[:-len(SOCKET_NAME) - 1], fields, site_packages)
        return
    sys.exit(code)


def launch() -> None:
    """The launcher's entry (cli/fcrun): sys.argv is [-c, SITE_PACKAGES, ARG...]."""
    main(site_packages=sys.argv.pop(1))


def _bootstrap():
    """bootstrap.py, beside this module (imported only when this process loads the library)."""
    if __package__:
        from . import bootstrap
    else:  # the launcher's: this module was imported from its directory, no longer on sys.path
        sys.path.insert(0, __file__.rpartition("/")[0] or ".")
        try:
            import bootstrap
        finally:
            del sys.path[0]
    return bootstrap


def _run_here(run_root: str, fields: dict, site_packages: str) -> None:
    """`fcrun run` in this process, without click (and without site, when started without it)."""
    bootstrap = _bootstrap()
    if sys.flags.no_site:
        here = bootstrap.dirname(bootstrap.absolute(__file__))
        bootstrap.setup_paths(here, bootstrap.absolute(site_packages))

    def run_fields() -> int:
        bootstrap.import_msgspec()
        from fcrun_cli.run_here import run_fields

        return run_fields(run_root, fields)

    bootstrap.exit_with(run_fields)


def _click_main(argv: list[str]) -> None:
    if sys.flags.no_site:  # started with -S for speed: the click CLI needs site-packages
        import site

        site.main()
    from fcrun_cli.main import main as click_main

    click_main(args=argv, prog_name="fcrun")
