"""What `fcrun serve` writes to the CMDB as it runs: events, and the rows of its instances.

A CMDB write blocks (SQLite's lock, an fsync, a busy database), and the manager records things
on the request path (a cold start's event, a stopped instance's row). So writes never run on
the event loop: `Recorder` queues them and a job of serve's task owner writes them, in order,
in a worker thread. A failed write is logged naming what was lost and serving goes on: a
missing event must not fail a request. While the CMDB is unavailable (a PostgreSQL server
stopped or unreachable: CMDBUnavailable), the write and those after it stay queued, in order,
and are retried with backoff (at most `MAX_QUEUED` kept; beyond that the oldest are dropped,
logged); at `aclose()` one last try is made and what still fails is logged as lost.

Readers that must see what was recorded before them (the admin API's GET /events) call
`flush()` first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

import msgspec

from ..cmdb.base import CMDB, CMDBError, CMDBUnavailable
from ..cmdb.models import Instance as InstanceRow
from ..tasks import TaskOwner

log = logging.getLogger("fcrun.serve")

RETRY_FIRST_S = 0.1  # the CMDB unavailable: first wait before writing again, doubled up to
RETRY_MAX_S = 2.0
MAX_QUEUED = 100_000  # writes kept through an outage (a few hundred bytes each)

# One write: what it is (for the log line if it fails), and the call that makes it.
_Write = tuple[str, Callable[..., Any], tuple[Any, ...]]


class Recorder:
    """Ordered, asynchronous CMDB writes for serve.

    Resource handling: its writes run as jobs of `tasks`; `aclose()` writes what is queued and
    refuses (logs and drops) what comes later. The CMDB stays the caller's.
    """

    def __init__(self, cmdb: CMDB, tasks: TaskOwner, node: str = ""):
        self.cmdb = cmdb
        self.tasks = tasks
        self.node = node  # stamped on every instance row: whose it is when serves share a CMDB
        self._queue: collections.deque[_Write] = collections.deque()
        self._writer: asyncio.Task | None = None
        self._closed = False
        self._stalled = asyncio.Event()  # set while the CMDB is unavailable and writes wait
        self._wake = asyncio.Event()  # ends a retry wait early (aclose)

    def event(self, app: str | None, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        # The token makes a retry after a break that came after the commit a no-op (CMDB.add_event).
        self._add(f"event {kind} of {app or 'serve'}", self.cmdb.add_event,
                  (app, kind, message, data or {}, secrets.token_hex(8)))

    def instance(self, row: InstanceRow) -> None:
        """Insert or update an instance's row (as this node's)."""
        if self.node and row.owner != self.node:
            row = msgspec.structs.replace(row, owner=self.node)
        self._add(f"row of instance {row.id}", self.cmdb.upsert_instance, (row,))

    def instance_gone(self, instance_id: str) -> None:
        self._add(f"removal of instance {instance_id}'s row", self.cmdb.remove_instance, (instance_id,))

    async def claim(self, row: InstanceRow, max_instances: int) -> bool:
        """Record `row` (as this node's) now, only if its app is below `max_instances` across
        every serve sharing the CMDB (CMDB.claim_instance); not queued: the caller waits for
        the answer.

        Raises:
            CMDBError: the CMDB cannot answer (CMDBUnavailable while it is down).
        """
        if self.node and row.owner != self.node:
            row = msgspec.structs.replace(row, owner=self.node)
        return await asyncio.to_thread(self.cmdb.claim_instance, row, max_instances)

    async def flush(self) -> None:
        """Return once everything recorded before the call is written (or its failure logged),
        or at once while the CMDB is unavailable (the writes wait for it)."""
        while (writer := self._writer) is not None and not self._stalled.is_set():
            # wait(), not the task itself: the caller neither gets the writer's exception (its
            # owner logs it) nor cancels it by being cancelled.
            stalled = asyncio.ensure_future(self._stalled.wait())
            try:
                await asyncio.wait({writer, stalled}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stalled.cancel()

    async def aclose(self) -> None:
        """Write what is queued (one more try if the CMDB is unavailable); later records are
        dropped with a log line."""
        self._closed = True
        self._wake.set()
        if (writer := self._writer) is not None:
            await asyncio.wait({writer})

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def stalled(self) -> bool:
        """Whether writes wait for an unavailable CMDB."""
        return self._stalled.is_set()

    def _add(self, what: str, call: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self._closed or self.tasks.closed:
            log.warning("not recorded (serve is stopping): %s", what)
            return
        self._queue.append((what, call, args))
        if self._writer is None:
            self._writer = self.tasks.spawn(self._write_queued(), name="CMDB writes")

    async def _write_queued(self) -> None:
        delay_s = RETRY_FIRST_S
        try:
            while self._queue:
                batch = list(self._queue)
                self._queue.clear()
                unwritten = await asyncio.to_thread(_write_all, batch, not self._stalled.is_set())
                if not unwritten:
                    if self._stalled.is_set():
                        log.info("the CMDB is back: the writes kept are written")
                        self._stalled.clear()
                    delay_s = RETRY_FIRST_S
                    continue
                self._queue.extendleft(reversed(unwritten))  # before anything newer: order kept
                if self._closed:
                    log.warning("serve is stopping and the CMDB is unavailable: %d writes lost (the first: %s)",
                                len(self._queue), self._queue[0][0])
                    self._queue.clear()
                    break
                while len(self._queue) > MAX_QUEUED:
                    log.warning("the CMDB is unavailable and %d writes wait: dropped the %s", MAX_QUEUED,
                                self._queue.popleft()[0])
                self._stalled.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay_s)
                delay_s = min(delay_s * 2, RETRY_MAX_S)
        finally:
            self._writer = None


def _write_all(batch: list[_Write], report_outage: bool) -> list[_Write]:
    """Write in order; returns the writes not made because the CMDB became unavailable (from
    the first that failed so, in order), else []."""
    for i, (what, call, args) in enumerate(batch):
        try:
            call(*args)
        except CMDBUnavailable as exc:
            if report_outage:
                log.warning("the CMDB is unavailable, %d writes kept to retry: %s", len(batch) - i, exc)
            return batch[i:]
        except CMDBError as exc:
            log.warning("cannot record the %s in the CMDB: %s", what, exc)
    return []
