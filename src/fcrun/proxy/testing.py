"""Test doubles for the proxy: a Router with fixed routes, leases that record, a fake transport.

Used by fcrun's tests and benchmarks (as trio ships trio.testing); nothing here runs in
``fcrun serve``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .router import RouteError


@dataclass
class RecordingLease:
    """A Lease that records how it was settled."""

    addr: tuple[str, int]
    instance_id: str = "instance-1"
    cold_start: tuple[str, float] | None = None
    max_body_bytes: int | None = None
    settled: list[tuple[int, int, int, bool]] = field(default_factory=list)

    def done(self, status: int, request_bytes: int, response_bytes: int, failed: bool) -> None:
        self.settled.append((status, request_bytes, response_bytes, failed))


class StaticRouter:
    """Routes host names to fixed upstream addresses; records every lease it hands out.

    ``errors`` maps a host to the RouteError to raise; ``delay_s`` makes acquire() wait (and
    disables acquire_nowait) like a cold start; ``cold_start`` is put on every lease.
    """

    def __init__(self, routes: dict[str, tuple[str, int]] | None = None, *,
                 errors: dict[str, RouteError] | None = None, delay_s: float = 0.0,
                 cold_start: tuple[str, float] | None = None, max_body_bytes: int | None = None,
                 nowait: bool = True):
        self.routes = dict(routes or {})
        self.errors = dict(errors or {})
        self.delay_s = delay_s
        self.cold_start = cold_start
        self.max_body_bytes = max_body_bytes
        self.nowait = nowait and not delay_s
        self.leases: list[RecordingLease] = []
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.acquired = 0

    def _lease(self, host: str) -> RecordingLease:
        if host in self.errors:
            raise self.errors[host]
        if host not in self.routes:
            raise RouteError(404, f"no app serves host {host!r}")
        self.acquired += 1
        lease = RecordingLease(self.routes[host], instance_id=f"{host}-1", cold_start=self.cold_start,
                               max_body_bytes=self.max_body_bytes)
        self.leases.append(lease)
        return lease

    def acquire_nowait(self, host: str) -> RecordingLease | None:
        if not self.nowait:
            return None
        return self._lease(host)

    async def acquire(self, host: str) -> RecordingLease:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self._lease(host)

    def connection_opened(self, host: str) -> None:
        self.opened.append(host)

    def connection_closed(self, host: str) -> None:
        self.closed.append(host)


class FakeTransport(asyncio.Transport):
    """Records what a protocol writes; tells it nothing unless the test does."""

    def __init__(self, peer: tuple[str, int] = ("192.0.2.7", 40000)):
        super().__init__()
        self.peer = peer
        self.chunks: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.reading = True

    @property
    def written(self) -> bytes:
        return b"".join(self.chunks)

    def take(self) -> bytes:
        data = self.written
        self.chunks.clear()
        return data

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        assert not self.closed and not self.eof_written, "write after close"
        self.chunks.append(bytes(data))

    def writelines(self, list_of_data) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0   # everything written counts as sent

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading
