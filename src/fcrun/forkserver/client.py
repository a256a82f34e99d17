"""Talking to a fork-server: a blocking Client (the library), an asyncio one, and the
Supervisor with which `fcrun serve` starts it, restarts it when it dies, and stops it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Callable

from ..errors import ContainerError
from ..tasks import TaskOwner
from . import protocol as p

log = logging.getLogger("fcrun.serve")

READY_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 60.0  # a fork-server that takes longer to answer is deemed stuck: killed, restarted
RESTART_DELAYS_S = (0.05, 0.2, 1.0, 5.0)  # after repeated deaths, wait longer


class ForkServerGone(ContainerError):
    """The fork-server exited (or its connection broke) before it replied."""

    http_status = 503


class Client:
    """Blocking client: one request at a time on one connection."""

    def __init__(self, path: str, timeout_s: float = 60.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise ForkServerGone(f"cannot reach the fork-server at {path}: {exc}") from None

    def request(self, message: p.Command) -> p.Reply:
        try:
            self.sock.sendall(p.frame(message))
            header = self._read(p.HEADER.size)
            return p.decode_reply(self._read(p.HEADER.unpack(header)[0]))
        except OSError as exc:
            raise ForkServerGone(f"fork-server connection lost: {exc}") from None

    def _read(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ForkServerGone("the fork-server closed the connection before it replied")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client; requests are sent one at a time (the fork-server handles them in order)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self.broken = False

    @classmethod
    async def connect(cls, path: str) -> "AsyncClient":
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def request(self, message: p.Command) -> p.Reply:
        async with self._lock:
            if self.broken:
                raise ForkServerGone("the fork-server connection is closed")
            try:
                self._writer.write(p.frame(message))
                header = await self._reader.readexactly(p.HEADER.size)
                body = await self._reader.readexactly(p.HEADER.unpack(header)[0])
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.broken = True
                raise ForkServerGone(f"the fork-server went away before it replied ({exc.__class__.__name__})") from None
            return p.decode_reply(body)

    def close(self) -> None:
        self.broken = True
        self._writer.close()


class Supervisor:
    """Runs the fork-server as serve's child: starts it, restarts it whenever it exits, stops it.

    Requests made while it is down (or that it never answered) raise ForkServerGone; serve
    turns them into 503s. `on_restart` runs after each restart (serve reconciles there).
    """

    def __init__(self, socket_path: str, args: list[str], pool_sizes: dict[str, int] | None = None,
                 on_restart: Callable[[], object] | None = None, on_event: Callable[[str, str], None] | None = None,
                 tasks: TaskOwner | None = None):
        self.socket_path = socket_path
        self.tasks = tasks if tasks is not None else TaskOwner("forkserver")  # serve gives a scope of its own
        self.args = args
        self.pool_sizes = dict(pool_sizes or {})
        self.on_restart = on_restart
        self.on_event = on_event or (lambda kind, message: None)
        self.process: asyncio.subprocess.Process | None = None
        self.client: AsyncClient | None = None
        self.restarts = 0
        self._closing = False
        self._watcher: asyncio.Task | None = None
        self._up = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None

    async def start(self) -> None:
        """Start the fork-server and connect. Raises ContainerError if it does not come up."""
        await self._launch()
        self._watcher = self.tasks.spawn_service(self._watch(), name="fork-server watcher")

    async def _launch(self) -> None:
        cmd = [sys.executable, "-m", "fcrun.forkserver", "--socket", self.socket_path,
               "--parent-pid", str(os.getpid()), *self.args]
        for image, n in self.pool_sizes.items():
            cmd += ["--pool", f"{image}={n}"]
        self.process = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            line = b""
        if not line.startswith(b"ready "):
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            code = await self.process.wait()
            raise ContainerError(f"the fork-server did not start (exit status {code}; its log is serve's stderr)")
        self.client = await AsyncClient.connect(self.socket_path)
        self._up.set()

    async def _watch(self) -> None:
        failures = 0
        while not self._closing:
            code = await self.process.wait()
            self._up.clear()
            if self.client is not None:
                self.client.close()
            if self._closing:
                return
            self.restarts += 1
            message = f"fork-server {self.process.pid} exited with status {code}; restarting"
            log.warning("%s", message)
            self.on_event("forkserver-exit", message)
            while not self._closing:
                await asyncio.sleep(RESTART_DELAYS_S[min(failures, len(RESTART_DELAYS_S) - 1)])
                try:
                    await self._launch()
                    failures = 0
                    break
                except (ContainerError, OSError) as exc:
                    failures += 1
                    log.error("restarting the fork-server: %s", exc)
            if self.on_restart is not None and not self._closing:
                try:
                    result = self.on_restart()
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:  # noqa: BLE001 - logged; serving goes on
                    log.exception("reconciling after a fork-server restart")

    async def request(self, message: p.Command, timeout_s: float = REQUEST_TIMEOUT_S) -> p.Reply:
        """One request. Raises ForkServerGone when it is down, dies before replying, or is stuck
        (no reply within timeout_s: it is then killed, and restarted like after a crash)."""
        client = self.client
        if client is None or client.broken or not self._up.is_set():
            raise ForkServerGone("the fork-server is restarting")
        try:
            return await asyncio.wait_for(client.request(message), timeout_s)
        except asyncio.TimeoutError:
            client.broken = True  # a reply may still come: this connection is out of step
            log.error("the fork-server did not answer within %gs: killing it", timeout_s)
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            raise ForkServerGone(f"the fork-server did not answer within {timeout_s:g}s") from None

    async def set_pool(self, sizes: dict[str, int]) -> None:
        self.pool_sizes = dict(sizes)
        with contextlib.suppress(ForkServerGone):
            await self.request(p.SetPool(sizes=self.pool_sizes))  # a restarted one gets them on its command line

    async def close(self, remove_pool: bool = True, timeout_s: float = 30.0) -> None:
        """Ask it to stop (removing its pool), then wait; kill it if it does not."""
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ForkServerGone):
            if self.client is not None and not self.client.broken:
                await self.client.request(p.Shutdown(remove_pool=remove_pool))
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.error("the fork-server did not stop in %gs: killing it", timeout_s)
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
        if self.client is not None:
            self.client.close()


def wait_for_socket(path: str, timeout_s: float = 5.0) -> None:
    """For library users who start `python -m fcrun.forkserver` themselves."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ForkServerGone(f"no fork-server socket at {path} after {timeout_s:g}s")
        time.sleep(0.01)
