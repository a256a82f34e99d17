"""Image recipes: ``rootfs/<name>/`` directories that say how to build an image.

A recipe directory holds

- ``build.sh``: a POSIX shell script, run as root on the host with ``sh -e``, that fills the
  empty directory ``$ROOTFS`` with the image's root filesystem. ``$RECIPE_DIR`` is the recipe
  directory (for files the script copies in). Its output is the build's progress.
- ``image.toml``: the image's run config, the fields of ``ImageConfig`` (entrypoint, cmd,
  env, workdir, user, exposed_ports, stop_signal, docroot);
- any other files the script uses.

The recipe's hash (every file's path, exec bit and content) is the build cache key: building
an unchanged recipe again does nothing.
"""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import stat
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import msgspec

from ..errors import FcrunError, NotFound, SpecError
from .image import ImageConfig, parse_name

RECIPES_ENV = "FCRUN_RECIPES"
BUILD_SCRIPT = "build.sh"
CONFIG_FILE = "image.toml"
_OUTPUT_TAIL_LINES = 20
_MAX_SYMLINKS = 40

Progress = Callable[[str], None]


class BuildFailed(FcrunError):
    """A recipe's build script failed; the message ends with the last lines it printed."""

    exit_code = 1
    http_status = 500


@dataclass(frozen=True)
class Recipe:
    name: str
    directory: str

    @property
    def script(self) -> str:
        return os.path.join(self.directory, BUILD_SCRIPT)

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, CONFIG_FILE)


def default_recipes_dir() -> str:
    """``$FCRUN_RECIPES``, else ``rootfs/`` of the source tree this package runs from."""
    env = os.environ.get(RECIPES_ENV)
    if env:
        return os.path.abspath(env)
    return str(Path(__file__).resolve().parents[3] / "rootfs")


def list_recipes(recipes_dir: str) -> list[str]:
    try:
        names = sorted(os.listdir(recipes_dir))
    except FileNotFoundError:
        return []
    return [n for n in names if os.path.isfile(os.path.join(recipes_dir, n, BUILD_SCRIPT))]


def find_recipe(recipes_dir: str, name: str) -> Recipe:
    """The recipe called ``name``.

    Raises:
        SpecError: ``name`` is not a valid image name without a tag.
        NotFound: no ``<recipes_dir>/<name>/build.sh``.
    """
    if parse_name(name, "RECIPE") != name or ":" in name:
        raise SpecError(f"recipe name {name!r} must be an image name without a tag", "RECIPE")
    directory = os.path.join(recipes_dir, name)
    if not os.path.isfile(os.path.join(directory, BUILD_SCRIPT)):
        known = ", ".join(list_recipes(recipes_dir)) or "none"
        raise NotFound(f"no recipe {name!r} in {recipes_dir} (recipes: {known})")
    return Recipe(name=name, directory=directory)


def recipe_hash(recipe: Recipe) -> str:
    """sha256 over every file of the recipe: relative path, kind, exec bit, content."""
    sha = hashlib.sha256(b"fcrun-recipe-v1\0")
    for dirpath, dirnames, filenames in os.walk(recipe.directory):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, recipe.directory)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                kind, data = b"l", os.readlink(path).encode()
            else:
                kind = b"x" if st.st_mode & 0o111 else b"f"
                with open(path, "rb") as f:
                    data = f.read()
            sha.update(b"%s\0%s\0%d\0" % (rel.encode(), kind, len(data)))
            sha.update(data)
    return "sha256:" + sha.hexdigest()


def load_config(recipe: Recipe) -> ImageConfig:
    """Parse the recipe's ``image.toml``; a missing file means the defaults.

    Raises:
        SpecError: bad TOML, an unknown field or a bad value, located in the file.
    """
    try:
        with open(recipe.config_path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return ImageConfig()
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"invalid TOML: {exc}", recipe.config_path) from None
    try:
        return msgspec.convert(data, ImageConfig)
    except msgspec.ValidationError as exc:
        raise SpecError(str(exc), recipe.config_path) from None


def run_build(recipe: Recipe, rootfs: str, progress: Progress) -> None:
    """Run the recipe's script to fill ``rootfs``, passing each output line to ``progress``.

    Raises:
        BuildFailed: the script exited non-zero.

    Resource handling: the script runs in its own session; if this function is interrupted
    (Ctrl-C, an exception from ``progress``), the whole process group is killed and reaped.
    """
    env = dict(os.environ, ROOTFS=rootfs, RECIPE_DIR=recipe.directory, FCRUN_RECIPE=recipe.name)
    tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
    proc = subprocess.Popen(
        ["/bin/sh", "-e", recipe.script],
        cwd=recipe.directory,
        env=env,
        stdin=subprocess.DEVNULL,  # mmdebstrap reads sources from a non-tty stdin
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            progress(f"[{recipe.name}] {line}")
        status = proc.wait()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    if status != 0:
        last = "\n".join(tail)
        raise BuildFailed(
            f"build recipe {recipe.name!r}: {recipe.script} exited with status {status}; "
            f"last output:\n{last}"
        )


def check_rootfs(recipe: Recipe, rootfs: str, config: ImageConfig) -> None:
    """Catch a recipe that built something unusable before it becomes an image.

    Raises:
        BuildFailed: the rootfs is empty, or the program the config runs is not in it.
    """
    if not os.listdir(rootfs):
        raise BuildFailed(f"build recipe {recipe.name!r}: {recipe.script} left $ROOTFS empty")
    argv = config.entrypoint or config.cmd
    if argv and argv[0].startswith("/") and not exists_in_root(rootfs, argv[0]):
        raise BuildFailed(
            f"build recipe {recipe.name!r}: {argv[0]} (from {CONFIG_FILE}) is not in the image"
        )


def exists_in_root(root: str, path: str) -> bool:
    """Whether ``path`` exists inside ``root``, resolving symlinks as the container would.

    An absolute symlink target is taken relative to ``root``, never to the host's ``/``.
    """
    todo = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        host_path = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(host_path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_SYMLINKS:
                return False
            target = os.readlink(host_path)
            if target.startswith("/"):
                resolved = []
            todo = [p for p in target.split("/") if p] + todo
        else:
            resolved.append(part)
    return True
