"""Shell completion (README: "Shell completion") through the real entry points: the installed
`fcrun` launcher (cli/fcrun, which starts the thin client fast.py, then click) and
`python -m fcrun_cli`, driven by click's protocol (_FCRUN_COMPLETE, COMP_WORDS, COMP_CWORD)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

LAUNCHER = os.path.join(os.path.dirname(sys.executable), "fcrun")
ENTRY_POINTS = {"launcher": [LAUNCHER], "module": [sys.executable, "-m", "fcrun_cli"]}


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, FCRUN_ROOT=str(tmp_path / "data"), FCRUN_RUN=str(tmp_path / "run"))


def complete(entry: str, env: dict, words: str, shell: str = "bash") -> list[str]:
    """What the shell would offer after `words` (the word being completed is the last, maybe '')."""
    cword = len(words.split(" ")) - 1
    r = subprocess.run(ENTRY_POINTS[entry], env=dict(env, _FCRUN_COMPLETE=f"{shell}_complete", COMP_WORDS=words,
                                                     COMP_CWORD=str(cword)),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [line.split(",", 1)[1] for line in r.stdout.splitlines() if line]  # nothing: one empty line


def test_the_launcher_is_the_shell_script():
    with open(LAUNCHER) as f:
        assert f.readline() == "#!/bin/sh\n"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_subcommands_and_options_complete(entry, env):
    offered = complete(entry, env, "fcrun ")
    for command in ("run", "exec", "ps", "serve", "app", "image", "events"):
        assert command in offered, offered
    assert {"add", "ls", "rm", "scale", "show", "update"} <= set(complete(entry, env, "fcrun app "))
    assert "--ready-path" in complete(entry, env, "fcrun app add x --rea")
    assert complete(entry, env, "fcrun run --net ") == ["bridge", "none", "host"]


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F _fcrun_completion fcrun"),
                                           ("zsh", "#compdef fcrun"), ("fish", "complete --no-files --command fcrun")])
def test_each_shells_script_is_printed(env, shell, marker):
    r = subprocess.run([LAUNCHER], env=dict(env, _FCRUN_COMPLETE=f"{shell}_source"), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and marker in r.stdout, r.stdout + r.stderr


def test_images_and_containers_complete_from_the_roots(env, tmp_path):
    from test_images import Entry, docker_archive, layer_tar

    from fcrun.images import ImageStore
    from fcrun.paths import Paths

    paths = Paths(data_root=env["FCRUN_ROOT"], run_root=env["FCRUN_RUN"])
    for name in ("webapp", "worker"):
        ImageStore(paths).import_(str(docker_archive(tmp_path / f"{name}.tar", [layer_tar(Entry("etc", "d"))], {},
                                                     [name])))
    for name in ("web-1", "web-2", "db", ".quarantine"):
        os.makedirs(os.path.join(paths.containers, name))
    assert complete("launcher", env, "fcrun run --image w") == ["webapp", "worker"]
    assert complete("launcher", env, "fcrun exec we") == ["web-1", "web-2"]
    assert complete("launcher", env, "fcrun rm -f web-1 ") == ["db", "web-1", "web-2"]
    # Another data root on the command line is the one read.
    assert complete("launcher", env, f"fcrun --root {tmp_path}/elsewhere run --image w") == []


def test_bash_itself_completes_with_the_printed_script(env):
    """The README's `eval "$(_FCRUN_COMPLETE=bash_source fcrun)"` in a real bash, then what its
    completion function offers for `fcrun ap<TAB>` and `fcrun run --net <TAB>`."""
    script = ('eval "$(_FCRUN_COMPLETE=bash_source fcrun)"; '
              'COMP_WORDS=(fcrun ap); COMP_CWORD=1; _fcrun_completion fcrun; echo "${COMPREPLY[*]}"; '
              'COMPREPLY=(); COMP_WORDS=(fcrun run --net ""); COMP_CWORD=3; _fcrun_completion fcrun; '
              'echo "${COMPREPLY[*]}"')
    r = subprocess.run(["bash", "-c", script], env=dict(env, PATH=f"{os.path.dirname(LAUNCHER)}:{env['PATH']}"),
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "app\nbridge none host\n", "")
