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
from typing import TYPE_CHECKING

from fcrun.errors import FcrunError, command_exit_code

if TYPE_CHECKING:
    from collections.abc import Callable

    from fcrun.runrequest import RunRequest

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
    from fcrun.runrequest import run_spec

    return run_plan(runtime, run_spec(request, lambda image_name: image_as_root(runtime.paths, image_name)), keep=keep)


def image_as_root(paths, image_name: str):
    """The image to run, read once the options are checked: a bad option is reported to anyone,
    then root is required.

    Raises:
        NotPermitted: not root. NotFound: no such image.
    """
    from fcrun.errors import require_root
    from fcrun.images.catalog import get_image  # not runtime.images: the store's build code is not needed

    require_root()
    return get_image(paths, image_name)


def run_plan(runtime, plan, *, keep: bool = False, running: Callable[[], object] | None = None) -> int:
    """Run the container of `plan` (runrequest.RunPlan), wait for it and remove it (unless
    `keep`); run's exit code. Raises what run() raises, before the command ran.

    Created and started in one step (Runtime.run: one handshake and one state save, where
    create + start made two of each). `running()`, if given, is called once the container
    runs (run_fields ends its move primer there, while the command runs)."""
    name = plan.name
    options = dict(image=plan.image, detach=plan.detach, init=plan.init)
    if plan.detach:
        runtime.run(name, plan.spec, **options)
        if running is not None:
            running()
        sys.stdout.write(name + "\n")
        sys.stdout.flush()
        return 0

    # Foreground: pass signals on to the container's pid 1 (an init forwards them to the
    # command); one that comes while the container is made is passed on once it runs.
    container = None
    early: list[int] = []

    def forward(signum, _frame):
        if container is None:
            early.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(container.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        container = runtime.run(name, plan.spec, **options)
        for signum in early:
            forward(signum, None)
        if running is not None:
            running()
        return container.wait(record=keep)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if container is not None and not keep:
            with contextlib.suppress(FcrunError):
                runtime.delete(name, force=True)


def run_fields(run_root: str, fields: dict) -> int:
    """The thin client's command line (fast.parse's Run fields) run here: `fcrun run`'s exit
    code, an error reported as click's `fcrun run` reports it.

    Once the options are checked, root is known and the image found, the cgroup driver is
    detected and, where the container cannot join its cgroup itself cheaply (v2: the parent
    moves it), a move primer starts (cgroups/primer.py), before the runtime's modules are
    imported: that move would otherwise wait on the command's path for an RCU grace period
    (~12 ms on this VM); the primer's first write waits for it meanwhile. On v1 the child joins
    through the groups' `tasks` files, which waits for none (cgroups/v1.py): no primer.
    """
    from fcrun.paths import Paths
    from fcrun.runrequest import RunRequest, run_spec

    fields = dict(fields)
    paths = Paths(data_root=fields.pop("data_root"), run_root=run_root)
    cgroup_parent, bridge, subnet = fields.pop("cgroup_parent"), fields.pop("bridge"), fields.pop("subnet")
    cgroups = primer = None

    def image_then_primer(image_name: str):
        nonlocal cgroups, primer
        image = image_as_root(paths, image_name)
        cgroups, primer = _primed_cgroups(cgroup_parent)
        return image

    def end_primer() -> None:
        """Its work is done once the container is in its cgroup: ended while the command runs."""
        nonlocal primer
        if primer is not None:
            with contextlib.suppress(FcrunError, OSError):  # its group is left to `fcrun gc`
                primer.close()  # and the cgroup parent, if it made it and nothing is left there
            primer = None

    try:
        plan = run_spec(RunRequest(**fields), image_then_primer)
        from fcrun.runtime.lifecycle import Runtime

        runtime = Runtime(paths, cgroup_parent=cgroup_parent, bridge=bridge, subnet=subnet, cgroups=cgroups)
        runtime.move_primer = primer
        return run_plan(runtime, plan, running=end_primer)
    except (FcrunError, OSError) as exc:
        sys.stderr.write(error_line(exc, "run") + "\n")
        return command_exit_code(exc)
    finally:
        end_primer()  # if the run failed before its container ran


def _primed_cgroups(cgroup_parent: str):
    """The cgroup driver and a primed MovePrimer (None where the child joins itself cheaply), or
    (None, None) where they could not be made (the run then reports whatever is wrong with the
    cgroup parent)."""
    from fcrun.cgroups import detect

    try:
        cgroups = detect(parent=cgroup_parent)
        if cgroups.self_join_is_cheap:
            return cgroups, None
        from fcrun.cgroups.primer import MovePrimer

        return cgroups, MovePrimer(cgroups, primed=True)
    except (FcrunError, OSError):
        return None, None
