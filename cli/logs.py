"""`fcrun logs NAME` and `fcrun app logs APP`: an instance's output, from fcrun.logs' files.

Logs are kept after an instance is gone (FCRUN_LOG_KEEP_S), so neither command needs the
instance to exist: only its log directory under <data root>/logs.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time

import click

from fcrun.errors import NotFound, SpecError
from fcrun.logs.files import app_instances, log_dir, log_root
from fcrun.logs.reader import STAMP_LEN, end_offset, follow, merge, read_lines, select, since_stamp
from fcrun.paths import Paths
from fcrun.runtime.state import validate_name


def _paths(ctx: click.Context) -> Paths:
    return getattr(ctx.obj, "paths", None) or Paths.from_env()


def _since(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return since_stamp(text, time.time())
    except ValueError as exc:
        raise SpecError(str(exc), "--since") from None


def _emit(line: str, timestamps: bool) -> None:
    out = line if timestamps else line[STAMP_LEN + 1:]
    sys.stdout.write(out + "\n")


def _options(command):
    for option in reversed([
        click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (across rotations) until Ctrl-C."),
        click.option("--tail", type=int, default=None, metavar="N", help="Only the last N lines."),
        click.option("--since", default=None, metavar="DURATION|TIME",
                     help="Only lines from this long ago (90s, 10m, 2h, 1d) or this time (2026-12-05T10:30:00Z)."),
        click.option("-t", "--timestamps", is_flag=True, help="Show each line's RFC3339 timestamp."),
    ]):
        command = option(command)
    return command


@click.command("logs")
@click.argument("name")
@_options
@click.pass_context
def logs(ctx: click.Context, name: str, **opts):
    """Print a detached container's (an instance's) output, kept after it is gone."""
    validate_name(name)  # the name becomes a path: only fcrun's names
    directory = log_dir(_paths(ctx), name)
    if not os.path.isdir(directory):
        raise NotFound(f"no logs for container {name!r} (in {log_root(_paths(ctx))})")
    start = end_offset(directory)  # taken before the tail: a line written in between is followed
    try:
        for line in select(read_lines(directory), opts["tail"], _since(opts["since"])):
            _emit(line, opts["timestamps"])
        sys.stdout.flush()
        if opts["follow"]:
            for line in follow(directory, start=start):
                _emit(line, opts["timestamps"])
                sys.stdout.flush()
    except (KeyboardInterrupt, BrokenPipeError):
        pass


@click.command("logs")
@click.argument("app")
@_options
@click.pass_context
def app_logs(ctx: click.Context, app: str, **opts):
    """Print the output of all an app's instances (alive or gone), merged by time, each line
    with its instance's name (-f: then follow the instances that have logs now)."""
    root = log_root(_paths(ctx))
    names = app_instances(root, app)
    if not names:
        raise NotFound(f"no logs for app {app!r} (in {root})")
    since = _since(opts["since"])
    starts = {n: end_offset(os.path.join(root, n)) for n in names}
    try:
        lines = merge({n: select(read_lines(os.path.join(root, n)), since=since) for n in names})
        for line in select(lines, opts["tail"]):
            _emit(line, opts["timestamps"])
        sys.stdout.flush()
        if opts["follow"]:
            _follow_instances(root, starts, opts["timestamps"])
    except (KeyboardInterrupt, BrokenPipeError):
        pass


def _follow_instances(root: str, starts: dict[str, tuple[int, int]], timestamps: bool) -> None:
    """Follow each instance in a thread of its own; lines in the order they are read (not
    re-sorted), each with its instance's name. Instances started later are not picked up."""
    lines: queue.Queue[str] = queue.Queue()

    def one(name: str) -> None:
        for line in follow(os.path.join(root, name), start=starts[name]):
            lines.put(f"{line[:STAMP_LEN]} {name} {line[STAMP_LEN + 1:]}")

    for name in starts:  # daemon threads: Ctrl-C ends the command with them
        threading.Thread(target=one, args=(name,), name=f"follow {name}", daemon=True).start()
    while True:
        _emit(lines.get(), timestamps)
        sys.stdout.flush()
