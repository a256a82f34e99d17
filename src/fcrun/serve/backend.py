"""How `fcrun serve` makes and removes app instances: fcrun containers, driven from asyncio.

The manager sees only the `InstanceBackend` protocol, so its lifecycle logic is unit-tested
with a fake backend and a fake clock; `RuntimeBackend` is the real one.

Runtime calls block (fork, mount, cgroup writes), so they run in a small thread pool;
readiness is checked on the event loop by connecting to the instance's port ("ready" means
accepting, not just "process started": readiness.py) and, for an app with a ready path, by
GETting it until it answers 2xx or 3xx; a pooled instance, accepting when claimed, is probed
on its ready path before it is routed too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

from .. import readiness
from ..cgroups.base import Cgroup
from ..cgroups.limits import Stats
from ..cmdb.models import App
from ..errors import FcrunError, NotFound
from ..forkserver import protocol as fsp
from ..forkserver.client import ForkServerGone, Supervisor
from ..images.image import Image
from ..instance import make_instance, seccomp_from_setting
from ..labels import APP_LABEL
from ..runtime.lifecycle import Runtime
from ..runtime.state import last_output_line

_SLUG = re.compile(r"[^a-z0-9.-]+")
log = logging.getLogger("fcrun.serve")
LIVENESS_INTERVAL_S = 0.05  # while waiting for a port: how often to check the process is still there


class StartFailed(Exception):
    """An instance could not be started; the message names the reason (shown in a 502, or a
    503 when the fork-server went away: retrying is then the client's best move)."""

    def __init__(self, message: str, http_status: int = 502):
        super().__init__(message)
        self.http_status = http_status


@dataclass
class Started:
    name: str
    ip: str
    port: int
    path: str = "start"  # "pool": a pre-warmed instance claimed from the fork-server's pool
    forkserver_ms: float | None = None  # the fork-server's own time for it


@dataclass
class Existing:
    """A container found at start-up that belongs to an app (for reconciling)."""

    name: str
    app: str
    ip: str
    port: int
    running: bool
    started_at: float
    cpu: float | None = None  # its CPU quota now (it may have been scaled up)
    frozen: bool = False  # its cgroup is frozen (an idle instance): adopted frozen


class InstanceBackend(Protocol):
    async def start(self, app: App, deadline: float) -> Started: ...  # deadline: the manager's clock
    async def stop(self, name: str, app: App | None) -> float: ...  # returns CPU seconds the instance used
    def cpu_seconds(self, name: str) -> float: ...
    def cgroup_stats(self, name: str) -> Stats | None: ...  # cheap, called on the event loop
    async def set_cpu(self, name: str, cpu: float) -> None: ...  # live, no restart
    async def existing(self) -> list[Existing]: ...
    async def accepting(self, ip: str, port: int) -> bool: ...
    async def freeze(self, name: str) -> None: ...
    def thaw(self, name: str) -> None: ...  # on the event loop: a request is waiting for it
    def close(self) -> None: ...


def instance_name(app_name: str) -> str:
    """A container name for a new instance of an app: readable, unique, within 63 chars."""
    slug = _SLUG.sub("-", app_name.lower()).strip(".-")[:48] or "app"
    return f"{slug}-{secrets.token_hex(4)}"


class RuntimeBackend:
    """Instances as fcrun containers on the bridge network.

    With a fork-server (`forkserver`, serve's Supervisor), instances are made there: claimed
    from its pool of pre-warmed instances when the app can use one (see `poolable`), else
    started by it. Without one, this process makes them through the Runtime.

    `clock` is the one the manager reads: start deadlines come from it.
    """

    def __init__(self, runtime: Runtime, workers: int = 4, poll_interval_s: float = 0.002,
                 forkserver: Supervisor | None = None, clock: Callable[[], float] = time.monotonic):
        self.runtime = runtime
        self.forkserver = forkserver
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fcrun-runtime")
        self._poll_s = poll_interval_s
        self._cgroups: dict[str, Cgroup] = {}  # so sampling skips the state file
        self._images: dict[str, Image] = {}  # re-read when a start fails

    @staticmethod
    def poolable(app: App) -> bool:
        """Can a pooled instance serve this app? Pooled instances run the image as it is, with
        its default environment and port, and get the app's files through their docroot slot:
        so the app must bring a docroot and no environment or port of its own."""
        return bool(app.docroot) and not app.env and app.port is None and app.seccomp == "default"

    async def _call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def start(self, app: App, deadline: float) -> Started:
        """Create and start a container for `app`, then wait until its port accepts.

        Raises:
            StartFailed: image missing, container failed, or not accepting by `deadline`
                (on `clock`). Whatever was made is removed first.
        """
        if self.forkserver is not None:
            return await self._start_through_forkserver(app, deadline)
        try:
            image = await self._call(self.runtime.images.get, app.image)
        except NotFound as exc:
            raise StartFailed(str(exc)) from None
        name = instance_name(app.name)
        try:
            container = await self._call(
                make_instance, self.runtime, image, name=name, cpu=app.cpu, memory_bytes=app.memory_bytes,
                pids_max=app.pids_max, labels={APP_LABEL: app.name}, env=app.env,
                docroot=app.docroot or None, seccomp=seccomp_from_setting(app.seccomp, app.name),
            )
        except FcrunError as exc:
            raise StartFailed(f"cannot start an instance of {app.name}: {exc}") from None
        port = app.port_for(image.config.exposed_ports)
        await self._wait_ready_or_remove(name, container.ip, port, deadline, app)
        return Started(name=name, ip=container.ip, port=port)

    async def _start_through_forkserver(self, app: App, deadline: float) -> Started:
        image = self._images.get(app.image)
        if image is None:
            try:
                image = self._images[app.image] = await self._call(self.runtime.images.get, app.image)
            except NotFound as exc:
                raise StartFailed(str(exc)) from None
        port = app.port_for(image.config.exposed_ports)
        limits = fsp.InstanceLimits(cpu=app.cpu, memory_bytes=app.memory_bytes, pids_max=app.pids_max)
        labels = {APP_LABEL: app.name}
        try:
            if self.poolable(app):
                reply = await self.forkserver.request(fsp.Claim(image=app.image, labels=labels, limits=limits,
                                                                docroot=app.docroot))
                if isinstance(reply, fsp.Made):
                    if app.ready_path:  # the pool knows no app: its instances only accept connections
                        await self._wait_ready_or_remove(reply.name, reply.ip, port, deadline, app)
                    return Started(name=reply.name, ip=reply.ip, port=port, path="pool", forkserver_ms=reply.ms)
                if isinstance(reply, fsp.Failed):
                    log.warning("claiming a pooled instance for %s: %s", app.name, reply.message)
            name = instance_name(app.name)
            reply = await self.forkserver.request(fsp.Start(image=app.image, name=name, labels=labels, limits=limits,
                                                            env=list(app.env), docroot=app.docroot,
                                                            seccomp=app.seccomp))
        except ForkServerGone as exc:
            raise StartFailed(f"cannot start an instance of {app.name} now: {exc}; retry", 503) from None
        if isinstance(reply, fsp.Failed):
            self._images.pop(app.image, None)
            raise StartFailed(f"cannot start an instance of {app.name}: {reply.message}")
        await self._wait_ready_or_remove(reply.name, reply.ip, port, deadline, app)
        return Started(name=reply.name, ip=reply.ip, port=port, path="start", forkserver_ms=reply.ms)

    async def freeze(self, name: str) -> None:
        await self._call(self.runtime.freeze, name)

    def thaw(self, name: str) -> None:
        """Thaw an instance: a request waits on it, so one cgroup write on the event loop, no
        thread hop and no state file (a container's frozen/running status is read from its
        cgroup, so the state file needs no update: Runtime.state stays true).

        Raises:
            FcrunError: the instance is gone, or the kernel refused.
        """
        self._cgroup(name).thaw()

    async def _wait_ready_or_remove(self, name: str, ip: str, port: int, deadline: float, app: App) -> None:
        """Wait until the new instance is ready; if it never is (or the wait is cancelled),
        remove it before raising."""
        try:
            await self._wait_ready(name, ip, port, deadline, app.name, app.ready_path)
        except BaseException:
            try:
                await self._call(self.runtime.delete, name, True)
            except (FcrunError, OSError) as exc:  # gc removes it later; the start's error matters more
                log.warning("cannot remove instance %s after its failed start: %s", name, exc)
            raise

    async def _wait_ready(self, name: str, ip: str, port: int, deadline: float, host: str,
                          ready_path: str | None) -> None:
        """Poll until the instance accepts connections on `port` and then, with a `ready_path`,
        answers GET on it (Host: `host`) with 2xx or 3xx; check meanwhile that it still runs.

        Raises:
            StartFailed: it exited, or was not ready by `deadline` (the message says which step).
        """
        delay = self._poll_s
        next_liveness = 0.0
        accepted = False
        waiting_for = f"accept connections on port {port}"
        while True:
            if not accepted:
                accepted = await self.accepting(ip, port)
            if accepted:
                if not ready_path:
                    return
                status = await readiness.ready_status(ip, port, host, ready_path)
                if readiness.is_ready(status):
                    return
                waiting_for = (f"answer GET {ready_path} with 2xx or 3xx "
                               f"({'last answer ' + str(status) if status else 'no answer'})")
            now = self.clock()
            if now >= next_liveness:
                next_liveness = now + LIVENESS_INTERVAL_S
                state = await self._call(self.runtime.state, name)
                if state.status == "stopped":
                    line = last_output_line(state)
                    raise StartFailed(f"instance {name} exited during start{': ' + line if line else ''}")
            if now >= deadline:
                raise StartFailed(f"instance {name} did not {waiting_for} in time")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.02)

    async def accepting(self, ip: str, port: int) -> bool:
        return await readiness.accepting(ip, port)

    async def stop(self, name: str, app: App | None) -> float:
        """Kill and remove an instance; returns the CPU seconds it used. The manager drains an
        instance of requests before stopping it, and instances are disposable (FastContainer's
        immutability), so there is nothing left for a graceful stop to finish.

        Raises:
            FcrunError: the runtime could not remove it.
        """
        cpu = self.cpu_seconds(name)
        self._cgroups.pop(name, None)
        try:
            state = await self._call(self.runtime.state, name)
        except NotFound:
            return cpu
        if state.status in ("running", "frozen"):
            try:
                if state.status == "frozen":
                    await self._call(self.runtime.thaw, name)
                await self._call(self.runtime.kill, name, signal.SIGKILL)
            except (FcrunError, OSError) as exc:  # it exited meanwhile; the forced delete kills what is left
                log.debug("killing instance %s: %s", name, exc)
        await self._call(self.runtime.delete, name, True)
        return cpu

    def cpu_seconds(self, name: str) -> float:
        stats = self.cgroup_stats(name)
        return stats.cpu_usage_us / 1e6 if stats is not None else 0.0

    def cgroup_stats(self, name: str) -> Stats | None:
        """The instance's cgroup figures (a few small kernel-file reads), None once it is gone."""
        try:
            return self._cgroup(name).stats()
        except (FcrunError, OSError):  # gone, or its cgroup is being removed: no figures
            self._cgroups.pop(name, None)
            return None

    def _cgroup(self, name: str) -> Cgroup:
        """The instance's Cgroup, cached: sampling and thawing skip the state file.

        Raises:
            NotFound: the instance is gone.
        """
        cgroup = self._cgroups.get(name)
        if cgroup is None:
            cgroup = self._cgroups[name] = self.runtime.cgroup(name)
        return cgroup

    async def set_cpu(self, name: str, cpu: float) -> None:
        """Change an instance's CPU quota live (cpu.max, or cfs_quota_us on v1).

        Raises:
            FcrunError: the instance is gone or the kernel refused the value.
        """
        await self._call(self.runtime.update, name, cpu=cpu)

    async def existing(self) -> list[Existing]:
        rows = await self._call(self.runtime.list)
        found = []
        for row in rows:
            app = row.labels.get(APP_LABEL)
            if app:
                found.append(Existing(name=row.name, app=app, ip=row.ip, port=0, running=row.status == "running", frozen=row.status == "frozen",
                                      started_at=row.created_at, cpu=row.cpu))
        return found

    def close(self) -> None:
        self._pool.shutdown(wait=True)
