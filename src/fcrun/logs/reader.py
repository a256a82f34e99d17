"""Reading instance logs: tail, since, follow across rotation, merge by time.

Lines are read as the writer stamped them (rotation.stamp): ``<RFC3339 UTC> <text>``. The
stamps are fixed width, so comparing them as strings compares times.
"""

from __future__ import annotations

import collections
import heapq
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone

from .files import CURRENT, log_files

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
STAMP_LEN = len("2026-12-05T10:30:00.123456Z")


def since_stamp(text: str, now: float) -> str:
    """The stamp a ``--since`` value means: a duration back from now (90s, 10m, 2h, 1d) or a
    timestamp (RFC3339, ISO 8601; no zone means UTC).

    Raises:
        ValueError: neither, naming the value.
    """
    match = _DURATION.match(text.strip())
    if match:
        when = now - float(match.group(1)) * _UNIT_S[match.group(2)]
    else:
        try:
            parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"--since {text!r}: not a duration (90s, 10m, 2h, 1d) nor a timestamp "
                             "(2026-12-05T10:30:00Z)") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        when = parsed.timestamp()
    dt = datetime.fromtimestamp(when, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def read_lines(directory: str) -> Iterator[str]:
    """Every line of one instance's logs, oldest first (without the newline)."""
    for path in log_files(directory):
        try:
            with open(path, "rb") as f:
                for raw in f:
                    yield raw.rstrip(b"\n").decode(errors="replace")
        except FileNotFoundError:  # rotated away while we read: its lines moved to the next name
            continue


def select(lines: Iterable[str], tail: int | None = None, since: str | None = None) -> list[str]:
    """The lines at or after ``since`` (a stamp), then the last ``tail`` of them."""
    if since is not None:
        lines = (line for line in lines if line[:STAMP_LEN] >= since)
    if tail is None:
        return list(lines)
    if tail <= 0:
        return []
    return list(collections.deque(lines, maxlen=tail))


def merge(named: dict[str, Iterable[str]]) -> Iterator[str]:
    """Lines of several instances in time order, each as ``<stamp> <name> <text>``."""
    def prefixed(name: str, lines: Iterable[str]) -> Iterator[tuple[str, str]]:
        for line in lines:
            yield line[:STAMP_LEN], f"{line[:STAMP_LEN]} {name} {line[STAMP_LEN + 1:]}"

    for _, line in heapq.merge(*(prefixed(n, ls) for n, ls in sorted(named.items())), key=lambda item: item[0]):
        yield line


def follow(directory: str, start: tuple[int, int] = (0, 0), stop: Callable[[], bool] = lambda: False,
           poll_s: float = 0.2, sleep: Callable[[float], None] = time.sleep) -> Iterator[str]:
    """Lines written to the current file after ``start`` (end_offset()), across rotations,
    until ``stop()``.

    A rotation renames the current file. The reader drains the file it holds open (renamed,
    or even removed), then goes on with the next newer file still on disk (``.k``, found by
    the inode it held), so a reader that fell several rotations behind loses only files the
    writer already removed (more than ``count`` rotations behind).
    """
    path = os.path.join(directory, CURRENT)
    f = None
    pending = b""
    try:
        while True:
            if f is None:
                f = _open_first(path, start)
                if f is None:
                    if stop():
                        return
                    sleep(poll_s)
                    continue
            data = f.read()
            if data:
                data = pending + data
                *complete, pending = data.split(b"\n")
                for raw in complete:
                    yield raw.decode(errors="replace")
                continue
            held = os.fstat(f.fileno()).st_ino
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current is not None and current != held:
                following = _next_file(directory, held)
                if following is not None:
                    f.close()
                    f = following
                    continue
            if stop():
                return
            sleep(poll_s)
    finally:
        if f is not None:
            f.close()


def _open_first(path: str, start: tuple[int, int]):
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    if os.fstat(f.fileno()).st_ino == start[0]:
        f.seek(start[1])
    return f


def _next_file(directory: str, held_ino: int):
    """The file after the one with inode ``held_ino``, opened: the oldest on disk if that one
    is gone (every file left is newer). None when a rename raced the listing: try again."""
    files = log_files(directory)
    inodes = []
    for p in files:
        try:
            inodes.append(os.stat(p).st_ino)
        except FileNotFoundError:
            return None
    index = inodes.index(held_ino) + 1 if held_ino in inodes else 0
    if index >= len(files):
        return None
    try:
        f = open(files[index], "rb")
    except FileNotFoundError:
        return None
    if os.fstat(f.fileno()).st_ino != inodes[index]:
        f.close()
        return None
    return f


def end_offset(directory: str) -> tuple[int, int]:
    """The (inode, size) of the current file: where a follow after a tail starts."""
    try:
        st = os.stat(os.path.join(directory, CURRENT))
    except FileNotFoundError:
        return 0, 0
    return st.st_ino, st.st_size
