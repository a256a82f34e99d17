"""How `fcrun serve` makes and removes app instances: fcrun containers, driven from asyncio.

The manager sees only the `InstanceBackend` protocol, so its lifecycle logic is unit-tested
with a fake backend and a fake clock; `RuntimeBackend` is the real one.

Runtime calls block (fork, mount, cgroup writes: ~10 ms), so they run in a small thread pool;
readiness is checked on the event loop by connecting to the instance's port ("ready" means
accepting, not just "process started").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import re
import secrets
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from ..cgroups.base import Stats
from ..errors import FcrunError, NotFound
from ..forkserver import protocol as fsp
from ..forkserver.client import ForkServerGone, Supervisor
from ..instance import make_instance, seccomp_from_setting
from ..labels import APP_LABEL
from ..runtime.lifecycle import Runtime
from ..runtime.state import last_output_line
_SLUG = re.compile(r"[^a-z0-9.-]+")
log = logging.getLogger("fcrun.serve")


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


class InstanceBackend(Protocol):
    async def start(self, app, deadline: float) -> Started: ...
    async def stop(self, name: str, app) -> float: ...  # returns CPU seconds the instance used
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
    """

    def __init__(self, runtime: Runtime, workers: int = 4, poll_interval_s: float = 0.002,
                 forkserver: Supervisor | None = None):
        self.runtime = runtime
        self.forkserver = forkserver
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fcrun-runtime")
        self._poll_s = poll_interval_s
        self._cgroups: dict[str, object] = {}  # name -> Cgroup, so sampling skips the state file
        self._images: dict[str, object] = {}  # name -> Image, re-read when a start fails

    @staticmethod
    def poolable(app) -> bool:
        """Can a pooled instance serve this app? Pooled instances run the image as it is, with
        its default environment and port, and get the app's files through their docroot slot:
        so the app must bring a docroot and no environment or port of its own."""
        return bool(app.docroot) and not app.env and app.port is None and app.seccomp == "default"

    async def _call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def start(self, app, deadline: float) -> Started:
        """Create and start a container for `app`, then wait until its port accepts.

        Raises:
            StartFailed: image missing, container failed, or not accepting by `deadline`
                (time.monotonic()). Whatever was made is removed first.
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
        try:
            await self._wait_accepting(name, container.ip, port, deadline)
        except BaseException:
            with contextlib.suppress(FcrunError, OSError):
                await self._call(self.runtime.delete, name, True)
            raise
        return Started(name=name, ip=container.ip, port=port)

    async def _start_through_forkserver(self, app, deadline: float) -> Started:
        image = self._images.get(app.image)
        if image is None:
            try:
                image = self._images[app.image] = await self._call(self.runtime.images.get, app.image)
            except NotFound as exc:
                raise StartFailed(str(exc)) from None
        port = app.port_for(image.config.exposed_ports)
        limits = fsp.Limits(cpu=app.cpu, memory_bytes=app.memory_bytes, pids_max=app.pids_max)
        labels = {APP_LABEL: app.name}
        try:
            if self.poolable(app):
                reply = await self.forkserver.request(fsp.Claim(image=app.image, labels=labels, limits=limits,
                                                                docroot=app.docroot))
                if isinstance(reply, fsp.Made):
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
        try:
            await self._wait_accepting(reply.name, reply.ip, port, deadline)
        except BaseException:
            with contextlib.suppress(FcrunError, OSError):
                await self._call(self.runtime.delete, reply.name, True)
            raise
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
        cgroup = self._cgroup(name)
        if cgroup is None:
            raise NotFound(f"instance {name} is gone")
        cgroup.thaw()

    async def _wait_accepting(self, name: str, ip: str, port: int, deadline: float) -> None:
        delay = self._poll_s
        next_liveness = 0.0
        while True:
            if await self.accepting(ip, port):
                return
            now = time.monotonic()
            if now >= next_liveness:
                next_liveness = now + 0.05
                state = await self._call(self.runtime.state, name)
                if state.status == "stopped":
                    line = last_output_line(state)
                    raise StartFailed(f"instance {name} exited during start{': ' + line if line else ''}")
            if now >= deadline:
                raise StartFailed(f"instance {name} did not accept connections on port {port} in time")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.02)

    async def accepting(self, ip: str, port: int) -> bool:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), 1.0)
            return True
        except (OSError, asyncio.TimeoutError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, None):
                return False
            return False
        finally:
            sock.close()

    async def stop(self, name: str, app) -> float:
        """Kill and remove an instance; returns the CPU seconds it used. The manager drains an
        instance of requests before stopping it, and instances are disposable (FastContainer's
        immutability), so there is nothing left for a graceful stop to finish."""
        cpu = self.cpu_seconds(name)
        self._cgroups.pop(name, None)
        try:
            state = await self._call(self.runtime.state, name)
        except NotFound:
            return cpu
        if state.status in ("running", "frozen"):
            with contextlib.suppress(FcrunError, OSError):
                if state.status == "frozen":
                    await self._call(self.runtime.thaw, name)
                await self._call(self.runtime.kill, name, signal.SIGKILL)
        await self._call(self.runtime.delete, name, True)
        return cpu

    def cpu_seconds(self, name: str) -> float:
        stats = self.cgroup_stats(name)
        return stats.cpu_usage_us / 1e6 if stats is not None else 0.0

    def cgroup_stats(self, name: str) -> Stats | None:
        """The instance's cgroup figures (a few small kernel-file reads), None once it is gone."""
        try:
            cgroup = self._cgroup(name)
            return cgroup.stats() if cgroup is not None else None
        except (FcrunError, OSError):
            self._cgroups.pop(name, None)
            return None

    def _cgroup(self, name: str):
        """The instance's Cgroup, cached (sampling and thawing skip the state file); None if gone."""
        cgroup = self._cgroups.get(name)
        if cgroup is None:
            try:
                cgroup = self._cgroups[name] = self.runtime._cgroup(self.runtime.states.load(name))
            except (FcrunError, OSError):
                return None
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
                found.append(Existing(name=row.name, app=app, ip=row.ip, port=0, running=row.status == "running",
                                      started_at=row.created_at, cpu=row.cpu))
        return found

    def close(self) -> None:
        self._pool.shutdown(wait=True)
