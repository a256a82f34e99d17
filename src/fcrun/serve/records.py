"""What `fcrun serve` writes to the CMDB as it runs: events, and the rows of its instances.

A CMDB write blocks (SQLite's lock, an fsync, a busy database), and the manager records things
on the request path (a cold start's event, a stopped instance's row). So writes never run on
the event loop: `Recorder` queues them and a job of serve's task owner writes them, in order,
in a worker thread. A failed write is logged naming what was lost and serving goes on: a
missing event must not fail a request.

Readers that must see what was recorded before them (the admin API's GET /events) call
`flush()` first.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

from ..cmdb.base import CMDB, CMDBError
from ..cmdb.models import Instance as InstanceRow
from ..tasks import TaskOwner

log = logging.getLogger("fcrun.serve")

# One write: what it is (for the log line if it fails), and the call that makes it.
_Write = tuple[str, Callable[..., Any], tuple[Any, ...]]


class Recorder:
    """Ordered, asynchronous CMDB writes for serve.

    Resource handling: its writes run as jobs of `tasks`; `aclose()` writes what is queued and
    refuses (logs and drops) what comes later. The CMDB stays the caller's.
    """

    def __init__(self, cmdb: CMDB, tasks: TaskOwner):
        self.cmdb = cmdb
        self.tasks = tasks
        self._queue: collections.deque[_Write] = collections.deque()
        self._writer: asyncio.Task | None = None
        self._closed = False

    def event(self, app: str | None, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._add(f"event {kind} of {app or 'serve'}", self.cmdb.add_event, (app, kind, message, data or {}))

    def instance(self, row: InstanceRow) -> None:
        """Insert or update an instance's row."""
        self._add(f"row of instance {row.id}", self.cmdb.upsert_instance, (row,))

    def instance_gone(self, instance_id: str) -> None:
        self._add(f"removal of instance {instance_id}'s row", self.cmdb.remove_instance, (instance_id,))

    async def flush(self) -> None:
        """Return once everything recorded before the call is written (or its failure logged)."""
        while (writer := self._writer) is not None:
            # wait(), not the task itself: the caller neither gets the writer's exception (its
            # owner logs it) nor cancels it by being cancelled.
            await asyncio.wait({writer})

    async def aclose(self) -> None:
        """Write what is queued; later records are dropped with a log line."""
        self._closed = True
        await self.flush()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _add(self, what: str, call: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self._closed or self.tasks.closed:
            log.warning("not recorded (serve is stopping): %s", what)
            return
        self._queue.append((what, call, args))
        if self._writer is None:
            self._writer = self.tasks.spawn(self._write_queued(), name="CMDB writes")

    async def _write_queued(self) -> None:
        try:
            while self._queue:
                batch = list(self._queue)
                self._queue.clear()
                await asyncio.to_thread(_write_all, batch)
        finally:
            self._writer = None


def _write_all(batch: list[_Write]) -> None:
    for what, call, args in batch:
        try:
            call(*args)
        except CMDBError as exc:
            log.warning("cannot record the %s in the CMDB: %s", what, exc)
