"""The thin `fcrun run` client (fcrun_cli/fast.py): its parser, its msgpack, and the fork-server's
`Run`/`Signal` messages it speaks. The real thing (a fork-server, containers) is in
tests/root/test_daemon_root.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import click
import msgspec
import pytest

from fcrun import paths
from fcrun.errors import NotFound, SpecError
from fcrun.forkserver import protocol as p
from fcrun.forkserver.server import ForkServer
from fcrun.images.image import Image, ImageConfig
from fcrun.runrequest import NETWORKS, RunRequest
from fcrun_cli import fast
from fcrun_cli.main import main as click_main

NO_ENV: dict[str, str] = {}


def parse(*argv: str, environ=NO_ENV):
    return fast.parse(list(argv), environ)


def test_defaults_are_fcruns():
    assert (fast.DEFAULT_DATA_ROOT, fast.DEFAULT_RUN_ROOT, fast.DEFAULT_CGROUP_PARENT, fast.DEFAULT_BRIDGE,
            fast.DEFAULT_SUBNET) == (paths.DEFAULT_DATA_ROOT, paths.DEFAULT_RUN_ROOT, paths.DEFAULT_CGROUP_PARENT,
                                     paths.DEFAULT_BRIDGE, paths.DEFAULT_SUBNET)


def test_the_run_command_line_becomes_run_fields():
    path, run = parse("run", "-i", "busybox", "--name=web", "-d", "--cpu", "0.3", "-m", "64M", "--pids", "20",
                      "--hostname", "h", "-e", "A=1", "--env", "B=2", "--net", "none", "-w", "/tmp", "-u", "1:2",
                      "--read-only", "--no-init", "--entrypoint", "sh", "--", "-c", "echo --name")
    assert path == "/run/fcrun/forkserver.sock"
    assert run == {
        "image": "busybox", "name": "web", "detach": True, "cpu": "0.3", "memory": "64M", "pids": 20,
        "hostname": "h", "env": ["A=1", "B=2"], "network": "none", "workdir": "/tmp", "user": "1:2",
        "read_only": True, "init": False, "entrypoint": "sh", "args": ["-c", "echo --name"],
        "data_root": "/var/lib/fcrun", "cgroup_parent": "fcrun", "bridge": "fcrun0", "subnet": "10.88.0.0/16",
    }


def click_options(command) -> dict[str, click.Option]:
    """Every option string of a click command (help included) -> its parameter."""
    top = click.Context(click_main, **click_main.context_settings)  # -h/--help, as `fcrun` sets them
    params = command.get_params(top if command is click_main else click.Context(command, parent=top))
    return {opt: param for param in params if isinstance(param, click.Option)
            for opt in (*param.opts, *param.secondary_opts)}


def test_the_run_option_tables_are_clicks_run_options():
    options = click_options(click_main.commands["run"])
    tables = (fast.RUN_VALUE_OPTIONS, fast.RUN_FLAGS, fast.RUN_CLICK_ONLY)
    for opt in options:  # a new click option must be placed in a table, deliberately
        assert sum(opt in table for table in tables) == 1, f"{opt} is in {sum(opt in t for t in tables)} tables"
    assert {opt for table in tables for opt in table} == set(options), "a table names an option click has not"
    defaults = {f.name: f.default for f in msgspec.structs.fields(RunRequest)}  # what fast.py leaves out
    for opt, field in fast.RUN_VALUE_OPTIONS.items():
        param = options[opt]
        assert not param.is_flag and param.name == field and field in defaults, opt
        assert param.multiple == (field in fast.RUN_LIST_FIELDS), opt
        if not param.multiple and not param.required:
            assert param.default == defaults[field], opt  # absent from the command line: the same value
    for opt, flag in fast.RUN_FLAGS.items():
        assert options[opt].is_flag and options[opt].name == flag, opt
        assert defaults.get(flag) is False or flag == "no_init" and defaults["init"] is True, opt
    assert options["--pids"].type is click.INT  # fast.py converts --pids with int() as click's INT does
    assert tuple(options["--net"].type.choices) == fast.NETWORKS == NETWORKS == p.RUN_NETWORKS


def test_the_global_options_are_clicks():
    options = click_options(click_main)
    for opt, envvar in fast.GLOBAL_OPTIONS.items():
        assert not options[opt].is_flag and options[opt].envvar == envvar, opt
    assert {opt for opt, param in options.items() if param.envvar} == set(fast.GLOBAL_OPTIONS)


def test_options_may_follow_command_words_as_click_reads_them():
    _, run = parse("run", "--image", "busybox", "echo", "hi", "-d")
    assert run["args"] == ["echo", "hi"] and run["detach"] is True


def test_roots_and_network_come_from_global_options_then_the_environment():
    env = {"FCRUN_ROOT": "/d", "FCRUN_RUN": "/r", "FCRUN_CGROUP_PARENT": "cg", "FCRUN_BRIDGE": "br0",
           "FCRUN_SUBNET": "10.1.0.0/24"}
    path, run = parse("run", "--image", "busybox", environ=env)
    assert path == "/r/forkserver.sock"
    assert (run["data_root"], run["cgroup_parent"], run["bridge"], run["subnet"]) == ("/d", "cg", "br0", "10.1.0.0/24")
    path, run = parse("--state", "/s", "--root=/x", "--bridge", "b1", "run", "--image", "busybox", environ=env)
    assert path == "/s/forkserver.sock" and run["data_root"] == "/x" and run["bridge"] == "b1"


@pytest.mark.parametrize("argv", [
    ["ps"], [], ["--version"], ["--help"], ["run", "--help"], ["run", "-h"],
    ["run"],                                            # --image missing: click's error
    ["run", "--image", "busybox", "--keep", "true"],    # not in the thin path
    ["run", "--image", "busybox", "--security-opt", "seccomp=unconfined", "true"],  # profiles: in-process only
    ["run", "--image", "busybox", "--nope"],            # unknown option: click's error
    ["run", "--image", "busybox", "sh", "-c", "x"],     # -c is an option to click too: its error
    ["run", "--image", "busybox", "--pids", "x"],       # click's "not a valid integer"
    ["run", "--image", "busybox", "--net", "wifi"],     # click's choice error
    ["run", "--image", "busybox", "--name"],            # a value missing
    ["run", "--image", "busybox", "--cpu", "-1"],       # a value that looks like an option
    ["run", "-dibusybox"],                              # combined short options
    ["run", "--detach=1", "--image", "busybox"],
    ["--cgroup-parent", "", "run", "--image", "busybox"],
    ["--debug", "run", "--image", "busybox"],
    ["run", "--image", "busybox", "--", "\udcff"],       # argv that is not UTF-8
])
def test_anything_else_falls_back_to_click(argv):
    with pytest.raises(fast.Fallback):
        fast.parse(argv, NO_ENV)


def test_no_fork_server_falls_back(tmp_path):
    with pytest.raises(fast.Fallback):
        fast.connect(str(tmp_path / "forkserver.sock"))


def test_without_a_fork_server_the_cli_is_clicks(tmp_path):
    env = dict(os.environ, FCRUN_RUN=str(tmp_path / "run"), FCRUN_ROOT=str(tmp_path / "data"))
    r = subprocess.run([sys.executable, "-m", "fcrun_cli", "run", "--image", "busybox", "--net", "wifi"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 125 and "Invalid value for '--net'" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "fcrun_cli", "--version"], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "fcrun, version" in r.stdout


def test_the_fast_path_imports_neither_click_nor_msgspec_nor_fcrun():
    code = ("import sys, fcrun_cli.fast as f; f.parse(['run', '--image', 'busybox', 'true'], {}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('click', 'msgspec', 'fcrun')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("path", ["/var/lib/fcrun", "/x/y/", "/a/b/../c", "x/./y/", "/", "//a//b/", "///x", "..",
                                  "/..", "a/../../b", ".", "run"])
def test_abspath_is_os_paths(path):
    assert fast.abspath(path) == os.path.abspath(path)


def test_the_environment_is_read_as_os_environ_reads_it(monkeypatch):
    monkeypatch.setenv("FCRUN_STATE_TEST", "/r\udcffun")  # not UTF-8: surrogate-escaped, as os.environ has it
    assert fast._getenv("FCRUN_STATE_TEST") == os.environ["FCRUN_STATE_TEST"]
    assert fast._getenv("FCRUN_NOT_SET_EVER") is None
    monkeypatch.setenv("FCRUN_RUN", "/elsewhere/run")
    assert fast.parse(["run", "--image", "busybox", "true"])[0] == "/elsewhere/run/forkserver.sock"


# ----- the `fcrun` launcher (cli/fcrun) ----------------------------------------------------------

LAUNCHER = os.path.join(os.path.dirname(__file__), "..", "..", "cli", "fcrun")  # pyproject: script-files
# Says how it was started: without site? ignoring PYTHON* variables? its directory on sys.path?
# the site-packages directory it was given? argv.
STUB = ("import os, sys\n"
        "def launch():\n"
        "    site = sys.argv.pop(1)\n"
        "    print(sys.flags.no_site, sys.flags.ignore_environment, os.path.dirname(__file__) in sys.path,\n"
        "          os.path.basename(site), sys.argv[1:])\n")


def _prefix(tmp_path, fast_dir: str | None = None):
    """A prefix as pip makes one: bin/fcrun (the launcher), bin/python3, lib/python3.X/site-packages."""
    bin_dir = tmp_path / "prefix" / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy(LAUNCHER, bin_dir / "fcrun")
    # This interpreter, as this venv has it (a symlink would lose the venv: no fcrun_cli there).
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    site_packages = tmp_path / "prefix" / "lib" / "python3.99" / "site-packages"
    site_packages.mkdir(parents=True)
    return str(bin_dir / "fcrun"), site_packages


def test_the_launcher_runs_fast_py_from_site_packages_without_site(tmp_path):
    launcher, site_packages = _prefix(tmp_path)
    (site_packages / "fcrun_cli").mkdir()
    (site_packages / "fcrun_cli" / "fast.py").write_text(STUB)
    r = subprocess.run([launcher, "run", "--image", "a b", "--", "x"], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "1 1 False site-packages ['run', '--image', 'a b', '--', 'x']\n", "")


def test_the_launcher_finds_an_editable_installs_project_by_pep_610(tmp_path):
    launcher, site_packages = _prefix(tmp_path)
    project = tmp_path / "my project"
    (project / "cli").mkdir(parents=True)
    (project / "cli" / "fast.py").write_text(STUB)
    (site_packages / "fcrun-0.1.0.dist-info").mkdir()
    (site_packages / "fcrun-0.1.0.dist-info" / "direct_url.json").write_text(
        '{"dir_info": {"editable": true}, "url": "file://%s"}' % project)  # as pip writes it: one line, no newline
    r = subprocess.run([launcher, "ps"], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "1 1 False site-packages ['ps']\n", "")


def test_without_fast_py_the_launcher_runs_the_package_with_site(tmp_path):
    launcher, _ = _prefix(tmp_path)  # python3 beside it is this interpreter: fcrun_cli is installed there
    r = subprocess.run([launcher, "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "fcrun, version" in r.stdout, r.stderr


# ----- the msgpack of fast.py against msgspec's -------------------------------------------------


def test_a_fast_run_frame_is_a_protocol_run():
    _, fields = parse("run", "--image", "busybox", "--cpu", "0.5", "--pids", "300", "-e", "K=" + "v" * 300,
                      "--", *[f"a{i}" for i in range(20)])
    body = fast.frame({"type": "Run", **fields})[4:]
    request = p.decode_request(body)
    assert isinstance(request, p.Run)
    assert request.args == [f"a{i}" for i in range(20)] and request.env == ["K=" + "v" * 300]
    assert (request.cpu, request.pids, request.detach, request.init) == ("0.5", 300, False, True)
    assert p.decode_request(fast.frame({"type": "Signal", "signal": 15})[4:]) == p.Signal(signal=15)


@pytest.mark.parametrize("value", [None, True, False, 0, 127, 128, -1, -33, 1 << 40, -(1 << 40), 0.5, "", "x" * 31,
                                   "é" * 40, "y" * 70000, [], list(range(20)), {"a": [1, {"b": None}]},
                                   {str(i): i for i in range(20)}])
def test_fast_msgpack_round_trips_with_msgspec(value):
    assert fast.decode(msgspec.msgpack.encode(value)) == value
    if not isinstance(value, float):
        assert msgspec.msgpack.decode(fast.encode(value)) == value


def test_replies_decode_in_the_thin_client():
    assert fast.decode(p.frame(p.Exited(code=143))[4:]) == {"type": "Exited", "code": 143}
    assert fast.decode(p.frame(p.Detached(name="web"))[4:]) == {"type": "Detached", "name": "web"}
    failed = fast.decode(p.frame(p.Failed(kind="NotFound", message="image 'x' not found", http_status=404,
                                          exit_code=3))[4:])
    assert failed == {"type": "Failed", "kind": "NotFound", "message": "image 'x' not found", "http_status": 404,
                      "exit_code": 3}


@pytest.mark.parametrize("data", [b"", b"\x81", b"\xa5abc", b"\xc1", b"\x01\x02"])
def test_bad_msgpack_is_a_value_error(data):
    with pytest.raises(ValueError):
        fast.decode(data)


# ----- Run and Signal in the protocol and the server (no socket, no containers) -------------------


@pytest.mark.parametrize("request_, where", [
    (p.Run(image="busybox", name="bad name"), "--name"),
    (p.Run(image="busybox", network="wifi"), "$.network"),
    (p.Run(image="busybox", args=["a\0b"]), "$.args[0]"),
    (p.Signal(signal=0), "$.signal"),
    (p.Signal(signal=65), "$.signal"),
])
def test_run_and_signal_are_rechecked(request_, where):
    with pytest.raises(SpecError, match=f"at {where.replace('$', '[$]').replace('[0]', '.0.')}"):
        p.check_request(request_)


def test_unknown_run_fields_are_refused():
    with pytest.raises(SpecError, match="privileged"):
        p.decode_request(msgspec.msgpack.encode({"type": "Run", "image": "busybox", "privileged": True}))


class FakeImages:
    def get(self, name):
        raise NotFound(f"image {name!r} not found")


class FakeRuntime:
    def __init__(self):
        self.paths = paths.Paths(data_root="/var/lib/fcrun", run_root="/run/fcrun")
        self.cgroup_parent, self.bridge, self.subnet = "fcrun", "fcrun0", "10.88.0.0/16"
        self.images = FakeImages()
        self.runs = []

    def run(self, *args, **kwargs):
        self.runs.append((args, kwargs))
        raise AssertionError("nothing should be created")


class FakePool:
    def __init__(self):
        self.runtime = FakeRuntime()


def _server_and_fds():
    server = ForkServer(FakePool(), listener=None)
    conn = object()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    server.fds[conn] = list(fds)
    return server, conn, fds


def _is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_a_fork_server_set_up_differently_refuses_and_closes_the_fds():
    server, conn, fds = _server_and_fds()
    body = p.frame(p.Run(image="busybox", bridge="other0"))[4:]
    reply = server._handle(body, conn)
    assert isinstance(reply, p.Failed) and reply.kind == "Mismatch" and "other0" in reply.message
    assert all(_is_closed(fd) for fd in fds) and server.fds == {}
    assert server.runtime.runs == []


@pytest.mark.parametrize("fields, option", [
    ({"security_opts": ["seccomp=unconfined"]}, "--security-opt"),
    ({"tmpfs_rootfs": True}, "--tmpfs-rootfs"),
    ({"userns": True}, "--userns"),
])
def test_options_left_to_the_cli_are_a_mismatch(fields, option):
    server, conn, fds = _server_and_fds()
    reply = server._handle(p.frame(p.Run(image="busybox", **fields))[4:], conn)
    assert isinstance(reply, p.Failed) and reply.kind == "Mismatch" and option in reply.message  # the client falls back
    assert all(_is_closed(fd) for fd in fds) and server.runtime.runs == []


@pytest.mark.parametrize("run, kind, code, text", [
    (p.Run(image="missing"), "NotFound", 125, "image 'missing' not found"),  # `fcrun run`'s codes
    (p.Run(image="busybox", cpu="abc"), "SpecError", 125, "(at --cpu)"),
    (p.Run(image="busybox", memory="lots"), "SpecError", 125, "(at --memory)"),
    (p.Run(image="busybox", pids=0), "SpecError", 125, "invalid --pids 0: must be >= 1 (at --pids)"),
])
def test_bad_run_input_gets_the_clis_error_and_exit_code(run, kind, code, text):
    server, conn, fds = _server_and_fds()
    reply = server._handle(p.frame(run)[4:], conn)
    assert isinstance(reply, p.Failed) and (reply.kind, reply.exit_code) == (kind, code), reply
    assert text in reply.message
    assert all(_is_closed(fd) for fd in fds)
    assert server.runtime.runs == [] and server.runs == {}


def test_a_foreground_run_needs_the_three_stdio_fds():
    server = ForkServer(FakePool(), listener=None)
    reply = server._handle(p.frame(p.Run(image="busybox"))[4:], object())
    assert isinstance(reply, p.Failed) and reply.exit_code == 125 and "3 fds" in reply.message


def test_a_signal_without_a_run_is_ignored():
    server = ForkServer(FakePool(), listener=None)
    assert server._handle(p.frame(p.Signal(signal=15))[4:], object()) is None


def test_the_thin_clients_own_exit_codes_are_the_libraries():
    from fcrun.errors import RUN_OWN_FAILURE, CommandNotFound, CommandNotInvokable

    assert fast.OWN_EXIT_CODES == (RUN_OWN_FAILURE, CommandNotInvokable.exit_code, CommandNotFound.exit_code)


# ----- no fork-server: `fcrun run` in the launcher's own process (run_here.py) -----------------

CLI_DIR = os.path.dirname(fast.__file__)
LAUNCH = "import sys; sys.path[0] = sys.argv.pop(1); import fast; del sys.path[0]; fast.launch()"  # cli/fcrun's


def _as_launched(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    """`fcrun ARGV` as the launcher starts it (python -S -E, fast.py by path, site-packages
    given), on roots of its own with no fork-server; -X importtime lists what it imported."""
    import sysconfig

    roots = ["--root", str(tmp_path / "data"), "--state", str(tmp_path / "run")]
    return subprocess.run([sys.executable, "-S", "-E", "-X", "importtime", "-c", LAUNCH, CLI_DIR,
                           sysconfig.get_paths()["purelib"], *roots, *argv], capture_output=True, text=True, timeout=60)


def _imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args, text", [
    (["--pids", "0"], "fcrun: invalid --pids 0: must be >= 1 (at --pids)"),
    (["--cpu", "abc"], "(at --cpu)"),
    (["--memory", "lots"], "(at --memory)"),
])
def test_without_a_fork_server_run_needs_neither_click_nor_site_and_errs_as_click(tmp_path, args, text):
    here = _as_launched(tmp_path, "run", "--image", "busybox", *args, "--", "true")
    errors = [line for line in here.stderr.splitlines() if not line.startswith("import time:")]
    assert here.returncode == 125 and len(errors) == 1 and text in errors[0], here.stderr[-2000:]
    imported = _imported(here.stderr)
    assert "fcrun_cli.run_here" in imported and not {"click", "site", "fcrun_cli.main"} & imported
    # --keep is the click command's only (fast.py falls back): it reports the same line and code.
    clicked = subprocess.run([sys.executable, "-m", "fcrun_cli", "--root", str(tmp_path / "data"), "--state",
                              str(tmp_path / "run"), "run", "--keep", "--image", "busybox", *args, "--", "true"],
                             capture_output=True, text=True, timeout=60)
    assert (clicked.returncode, clicked.stderr) == (125, errors[0] + "\n")
    assert not os.path.exists(tmp_path / "run" / "containers") or os.listdir(tmp_path / "run" / "containers") == []


# What a run without a fork-server no longer imports (issue 17: 96 -> 78 ms p50 on this VM): the
# runtime's records are msgspec Structs (dataclasses loads inspect, ast, dis, tokenize), its
# loggers import logging at their first message (lazy.Logger), its temporaries are made without
# tempfile and random, shutil waits for a tree to remove, socket for a spawner to speak to;
# msgspec's import gets stand-ins for platform, textwrap and msgspec.inspect (bootstrap.import_msgspec); locks and
# thread-locals come from _thread (a thread only where the parent moves the child); of the
# cgroup drivers, detect() imports the host's (neither is imported here, where it is not called).
NOT_FOR_A_RUN = {"dataclasses", "inspect", "logging", "tempfile", "random", "shutil", "socket", "platform", "textwrap",
                 "msgspec.inspect", "threading", "fcrun.cgroups.v1", "fcrun.cgroups.v2", "fcrun.cgroups.bpf"}


def test_a_run_without_a_fork_server_loads_the_runtime_without_the_modules_it_does_not_need():
    """What run_here.run_fields imports, loaded as the launcher loads it (python -S -E, msgspec
    without typing_extensions): none of NOT_FOR_A_RUN."""
    import sysconfig

    code = (f"import sys; sys.path.insert(0, {CLI_DIR!r}); import bootstrap; "
            f"bootstrap.setup_paths({CLI_DIR!r}, {sysconfig.get_paths()['purelib']!r}); "
            "bootstrap.import_msgspec(); "
            "import fcrun_cli.run_here, fcrun.paths, fcrun.runrequest, fcrun.images.catalog, fcrun.cgroups, "
            "fcrun.cgroups.primer, fcrun.runtime.lifecycle; "
            "import fcrun.runtime.spec as spec; "
            "print('fcrun.runtime.creation' in sys.modules, sorted(set(sys.modules) & set(sys.argv[1:])), "
            "spec._spec_decoder.cache_info().currsize)")
    r = subprocess.run([sys.executable, "-S", "-E", "-c", code, *sorted(NOT_FOR_A_RUN)], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout == "True [] 0\n", r.stderr[-2000:]   # 0: the spec's decoder is not built either


STAND_IN_CHECK = '''
import sys
sys.path.insert(0, sys.argv[1])
import bootstrap
bootstrap.setup_paths(sys.argv[1], sys.argv[2])
bootstrap.import_msgspec()
import msgspec, uuid
print(sorted({"platform", "textwrap", "typing_extensions", "msgspec.inspect"} & set(sys.modules)))
print(uuid._LINUX, msgspec.json.decode(msgspec.json.encode(uuid.UUID(int=7)), type=uuid.UUID).int)

class S(msgspec.Struct):
    """  A struct.

      Indented."""
    x: int

info = msgspec.inspect.type_info(S)  # the real module, imported now, replaces the stand-in everywhere
print(type(info).__name__, info.fields[0].name, type(msgspec.inspect).__name__, msgspec.inspect is sys.modules["msgspec.inspect"])
print(repr(msgspec.json.schema(S)["$defs"]["S"]["description"]))  # its JSON Schema module held the stand-in
import platform, textwrap
print(type(platform).__name__, platform.system(), platform.python_implementation(), textwrap.dedent("  a"))
'''


def test_msgspec_imported_with_stand_ins_works_whole_and_leaves_the_real_modules_importable():
    """After bootstrap.import_msgspec (python -S -E, as the launcher): uuid, msgspec.json's
    schema and msgspec.inspect work (the stand-ins import the real platform, textwrap and
    msgspec.inspect when used), none is left in sys.modules, and `import platform` gives the
    real module."""
    import sysconfig

    r = subprocess.run([sys.executable, "-S", "-E", "-c", STAND_IN_CHECK, CLI_DIR, sysconfig.get_paths()["purelib"]],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines() == ["[]", "True 7", "StructType x module True", repr("A struct.\n\nIndented."),
                                     "module Linux CPython a"], r.stderr[-2000:]


@pytest.mark.parametrize("module", ["fcrun.runtime.spec", "fcrun.runtime.state", "fcrun.runtime.spawner.protocol",
                                    "fcrun.runtime.child", "fcrun.images.image"])
def test_the_structs_decoded_at_import_have_annotations_that_need_no_compiling(module):
    """These modules build msgspec Decoders (at import; spec.py's at its first decode); with
    `from __future__ import annotations` msgspec would compile each annotation string (~300 in
    all: ~4-6 ms of a run)."""
    import importlib

    loaded = importlib.import_module(module)
    assert "annotations" not in vars(loaded)  # the __future__ import binds this name


def test_reading_an_image_loads_no_image_builder(tmp_path):
    """What `fcrun run` reads of an image (catalog.py) loads none of the store's build and import
    modules (~11 ms of a run without a fork-server)."""
    layer = "sha256:" + "ab" * 32
    (tmp_path / "layers" / ("ab" * 32)).mkdir(parents=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "app.json").write_bytes(msgspec.json.encode(Image(
        name="app", id=layer, layers=[], diff_ids=[layer], config=ImageConfig(), created=0.0, source="test",
        size_bytes=0)))
    code = ("import sys; from fcrun.paths import Paths; from fcrun.images.catalog import get_image; "
            f"image = get_image(Paths(data_root={str(tmp_path)!r}), 'app'); print(image.layers); "
            "print(sorted({'fcrun.images.store', 'tarfile', 'hashlib', 'tomllib'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout.splitlines() == [repr([str(tmp_path / "layers" / ("ab" * 32))]), "[]"], r.stderr
