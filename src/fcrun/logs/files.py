"""Where instance logs live and what bounds them.

Logs go under ``<data root>/logs/<container name>/`` (``/var/lib/fcrun/logs`` by default): on
disk, not the run root's tmpfs, whose pages would be charged as shmem to whoever wrote them and
would vanish on reboot. The directory name is the container's name, which fcrun chose and
validated (``validate_name``): nothing the app writes decides a path, and the writer runs on
the host, outside the container's mount namespace, so the container cannot reach these files.

Files: ``output.log`` (current), ``output.log.1`` (newest rotated) ... ``output.log.<count>``;
``app`` holds the app's name when the instance serves one (``fcrun app logs``).
"""

from __future__ import annotations

import contextlib
import os

import msgspec

from ..paths import Paths
from .rotation import rotated

CURRENT = "output.log"
APP_FILE = "app"

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_COUNT = 3
DEFAULT_KEEP_S = 7 * 24 * 3600.0

# The environment a writer's bounds come from (a serve config may set them for its instances).
ENV_MAX_BYTES = "FCRUN_LOG_MAX_BYTES"
ENV_COUNT = "FCRUN_LOG_COUNT"
ENV_KEEP_S = "FCRUN_LOG_KEEP_S"


class LogSettings(msgspec.Struct, frozen=True):
    """Per-instance bound: at most ``(count + 1) * max_bytes`` on disk (plus one line)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    count: int = DEFAULT_COUNT  # rotated files kept besides the current one
    keep_s: float = DEFAULT_KEEP_S  # how long a gone instance's logs are kept

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "LogSettings":
        """Settings from FCRUN_LOG_MAX_BYTES / FCRUN_LOG_COUNT / FCRUN_LOG_KEEP_S.

        Raises:
            ValueError: a value is not a number, or out of range (naming the variable).
        """
        env = os.environ if env is None else env

        def number(name: str, default, kind, low):
            text = env.get(name)
            if not text:
                return default
            try:
                value = kind(text)
            except ValueError:
                raise ValueError(f"{name}={text!r}: not a number") from None
            if value < low:
                raise ValueError(f"{name}={text!r}: must be at least {low}")
            return value

        return cls(max_bytes=number(ENV_MAX_BYTES, DEFAULT_MAX_BYTES, int, 4096),
                   count=number(ENV_COUNT, DEFAULT_COUNT, int, 0),
                   keep_s=number(ENV_KEEP_S, DEFAULT_KEEP_S, float, 0.0))


def log_root(paths: Paths) -> str:
    return os.path.join(paths.data_root, "logs")


def log_dir(paths: Paths, name: str) -> str:
    return os.path.join(log_root(paths), name)


def log_files(directory: str) -> list[str]:
    """The existing log files of one instance, oldest first."""
    current = os.path.join(directory, CURRENT)
    found = []
    index = 1
    while os.path.exists(rotated(current, index)):
        found.append(rotated(current, index))
        index += 1
    found.reverse()
    if os.path.exists(current):
        found.append(current)
    return found


def note_app(directory: str, app: str) -> None:
    """Record which app an instance serves (a pooled instance learns it when claimed)."""
    with contextlib.suppress(FileNotFoundError):  # no log dir: the instance is attached, no logs
        with open(os.path.join(directory, APP_FILE), "w") as f:
            f.write(app + "\n")


def noted_app(directory: str) -> str | None:
    """The app note_app recorded in an instance's log directory, or None (no note, or unreadable)."""
    try:
        with open(os.path.join(directory, APP_FILE)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def app_instances(root: str, app: str) -> list[str]:
    """Names of the instances (alive or gone) whose logs say they served ``app``."""
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [name for name in entries if noted_app(os.path.join(root, name)) == app]


def remove_expired(root: str, keep_s: float, alive: set[str], now: float) -> list[str]:
    """Remove the logs of instances not in ``alive`` untouched for ``keep_s``; their names.

    Called by serve's tick and `fcrun logs --prune`; a live instance's logs are never removed
    (its writer holds them open).
    """
    removed = []
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return []
    for name in entries:
        if name in alive:
            continue
        directory = os.path.join(root, name)
        try:
            newest = max((os.stat(p).st_mtime for p in log_files(directory)), default=os.stat(directory).st_mtime)
        except OSError:
            continue
        if now - newest >= keep_s:
            import shutil  # here: its import (bz2, lzma, fnmatch) is ~1.5 ms of every `fcrun run`

            shutil.rmtree(directory, ignore_errors=True)
            removed.append(name)
    return sorted(removed)
