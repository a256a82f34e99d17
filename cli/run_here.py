"""`fcrun run` in this process: the container made, started, waited for and removed here.

Two callers, one behaviour: the click command (main.py's `run`), and the thin client (fast.py)
when no fork-server listens. The thin client skips click and site-packages' start-up (~25 ms
of a ~130 ms `fcrun run`), so this module imports neither click nor anything the library does
not need for a run; its errors are the lines and exit codes click's ContainerCommand gives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from fcrun.errors import FcrunError, command_exit_code
from fcrun.runrequest import RunRequest, run_spec

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                     signal.SIGWINCH)


def error_line(exc: Exception, command: str) -> str:
    """The one line an error of `command` (run, exec) is reported with."""
    if isinstance(exc, FcrunError):
        return f"fcrun: {exc}"
    where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
    return f"fcrun: {command}{where}: [Errno {exc.errno}] {exc.strerror}"


def run(runtime, request: RunRequest, *, keep: bool = False) -> int:
    """Run `request` with `runtime`; the exit code `fcrun run` exits with (0 when detached,
    after printing the name).

    Raises:
        FcrunError, OSError: before the command ran (a bad option, not root, no such image, ...).
    """
    from fcrun.images.catalog import get_image  # not runtime.images: the store's build code is not needed
    from fcrun.runtime import require_root

    def image_as_root(image_name: str):
        require_root()  # after the options' own checks, so that a bad option is reported to anyone
        return get_image(runtime.paths, image_name)

    plan = run_spec(request, image_as_root)
    name = plan.name
    container = runtime.create(name, plan.spec, image=plan.image, detach=plan.detach, init=plan.init)
    if plan.detach:
        container.start()
        sys.stdout.write(name + "\n")
        sys.stdout.flush()
        return 0

    # Foreground: pass signals on to the container's pid 1 (an init forwards them to the command).
    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(container.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        container.start()
        return container.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not keep:
            with contextlib.suppress(FcrunError):
                runtime.delete(name, force=True)


def run_fields(run_root: str, fields: dict) -> int:
    """The thin client's command line (fast.parse's Run fields) run here: `fcrun run`'s exit
    code, an error reported as click's `fcrun run` reports it."""
    from fcrun.paths import Paths
    from fcrun.runtime.lifecycle import Runtime

    fields = dict(fields)
    runtime = Runtime(Paths(data_root=fields.pop("data_root"), run_root=run_root),
                      cgroup_parent=fields.pop("cgroup_parent"), bridge=fields.pop("bridge"),
                      subnet=fields.pop("subnet"))
    try:
        return run(runtime, RunRequest(**fields))
    except (FcrunError, OSError) as exc:
        sys.stderr.write(error_line(exc, "run") + "\n")
        return command_exit_code(exc)
