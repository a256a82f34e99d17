"""CLI behaviour that needs no root: option parsing, messages, exit codes."""

import os

import pytest
from click.testing import CliRunner

from fcrun_cli.main import main


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("FCRUN_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("FCRUN_RUN", str(tmp_path / "run"))
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args))


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0, result.output
    for command in ("run", "ps", "kill", "rm", "freeze", "thaw", "update", "exec", "gc", "image"):
        assert f"  {command}" in result.output


def test_not_root_is_refused_before_anything_is_made(cli, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = cli("run", "--image", "busybox", "--", "true")
    assert result.exit_code == 125  # fcrun's own failure; NotPermitted's 77 is for other commands
    assert "fcrun needs root" in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("args,code,where", [
    # run and exec exit with their command's code: their own failures are 125 (docker's, podman's)
    (["run", "--image", "busybox", "--memory", "12Q", "--", "true"], 125, "--memory"),
    (["run", "--image", "busybox", "--cpu", "lots", "--", "true"], 125, "--cpu"),
    (["run", "--image", "busybox", "--pids", "0", "--", "true"], 125, "--pids"),
    (["run", "--image", "busybox", "--pids", "many", "--", "true"], 125, "'--pids'"),  # click's own check
    (["run", "--image", "busybox", "--no-such-option", "--", "true"], 125, "--no-such-option"),
    (["run", "--", "true"], 125, "'--image'"),  # click: missing option
    (["exec"], 125, "NAME"),
    (["update", "x"], 2, "nothing to update"),
    (["kill", "x", "NOTASIGNAL"], 2, "unknown signal"),
    (["kill", "--bogus", "x"], 2, "--bogus"),  # other commands keep click's 2
])
def test_bad_options_name_the_option(cli, args, code, where):
    result = cli(*args)
    assert result.exit_code == code, result.output
    assert where in result.output


def test_ps_on_an_empty_state_root(cli):
    result = cli("ps")
    assert result.exit_code == 0
    assert result.output.split() == ["NAME", "STATE", "PID", "IP", "CPU", "MEMORY", "USED", "IMAGE", "AGE", "APP"]


def test_command_exit_codes_follow_docker():
    """`fcrun run`/`exec`: 127 not found, 126 cannot be invoked, 125 anything else fcrun failed at;
    the child's report of a failed exec becomes the first two by its errno."""
    import errno

    from fcrun.errors import (CommandNotFound, CommandNotInvokable, ContainerError, KernelError, NotFound,
                              NotPermitted, SpecError, command_exit_code)
    from fcrun.runtime.child import STEP_CWD, STEP_EXEC, STEP_MOUNT
    from fcrun.runtime.fork import ChildFailure, failure_to_error

    def code(step, err):
        return command_exit_code(failure_to_error(ChildFailure(step, err, "/bin/x"), "c1"))

    assert code(STEP_EXEC, errno.ENOENT) == 127
    assert [code(STEP_EXEC, e) for e in (errno.EACCES, errno.ENOEXEC, errno.EISDIR)] == [126, 126, 126]
    assert code(STEP_EXEC, errno.EPERM) == 125  # seccomp or an LSM: not the command's fault
    assert code(STEP_CWD, errno.ENOENT) == 125  # a missing working directory is no missing command
    assert code(STEP_MOUNT, errno.ENOENT) == 125
    assert "cannot execute: [Errno 13]" in str(failure_to_error(ChildFailure(STEP_EXEC, errno.EACCES, "/x"), "c1"))
    for exc in (SpecError("bad"), NotFound("no image"), NotPermitted("root"), KernelError("write", "f", 22),
                ContainerError("hook failed"), OSError(5, "EIO")):
        assert command_exit_code(exc) == 125, exc
    assert (command_exit_code(CommandNotFound("x")), command_exit_code(CommandNotInvokable("x"))) == (127, 126)


@pytest.mark.parametrize("files, name, expected", [
    ({}, b"prog", "ENOENT"),
    ({"bin/prog": 0o644}, b"prog", "EACCES"),  # found but not executable: 126, as execvp says
    ({"bin/prog": 0o644, "sbin/prog": 0o755}, b"prog", "sbin/prog"),  # execvp goes on to the next
    ({"bin/prog/": 0}, b"prog", "EACCES"),
    ({"bin/prog/": 0}, b"/ROOT/bin/prog", "EISDIR"),
    ({"bin/prog": 0o755}, b"/ROOT/bin/prog", "bin/prog"),
    ({"bin/prog": 0o644}, b"/ROOT/bin/prog", "EACCES"),
    ({}, b"/ROOT/bin/prog", "ENOENT"),
])
def test_the_childs_command_lookup_gives_execvps_errno(tmp_path, files, name, expected):
    import errno

    from fcrun.runtime.child import _find_executable

    for rel, mode in files.items():
        path = tmp_path / rel
        if rel.endswith("/"):
            path.mkdir(parents=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"#!/bin/sh\n")
        path.chmod(mode)
    search = f"{tmp_path}/bin:{tmp_path}/sbin".encode()
    name = name.replace(b"/ROOT", str(tmp_path).encode())
    if expected.startswith("E"):
        with pytest.raises(OSError) as info:
            _find_executable(name, search)
        assert info.value.errno == getattr(errno, expected) and info.value.filename == name
    else:
        assert _find_executable(name, search) == f"{tmp_path}/{expected}".encode()


def test_an_init_is_not_handed_a_file_the_kernel_cannot_run(tmp_path):
    """tini exits 1 when its exec fails with ENOEXEC: the child refuses such a file itself."""
    import errno

    from fcrun.runtime.child import _find_executable

    for name, head in (("script", b"#!/bin/sh\n"), ("elf", b"\x7fELF\x02\x01"), ("text", b"echo hi\n")):
        (tmp_path / name).write_bytes(head)
        (tmp_path / name).chmod(0o755)
    search = str(tmp_path).encode()
    assert _find_executable(b"script", search, by_init=True) == f"{tmp_path}/script".encode()
    assert _find_executable(b"elf", search, by_init=True) == f"{tmp_path}/elf".encode()
    assert _find_executable(b"text", search) == f"{tmp_path}/text".encode()  # our execve reports it
    with pytest.raises(OSError) as info:
        _find_executable(b"text", search, by_init=True)
    assert info.value.errno == errno.ENOEXEC
