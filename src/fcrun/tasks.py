"""One owner for every task `fcrun serve` and its proxy start (trio's nursery, in asyncio).

Serve's tasks outlive the callbacks that start them (a cold start outlives the request that
asked for it, an instance's drain outlives the tick that decided it), so they cannot live in
one ``async with asyncio.TaskGroup()`` block. A `TaskOwner` is that scope instead: it keeps
each task until it ends, sees how it ended, and `aclose()` cancels and awaits whatever is left.

Serve makes one root owner and gives each part a scope of it (`scope()`): the proxy, the
manager, the admin API. A part closes its own scope when it shuts down, in serve's order (stop
accepting, drain, stop instances); closing the root closes every scope left.

Two kinds of task, told apart by how they start:

- a *job* (`spawn`) is one piece of work: an instance's drain and stop, a cold start, an admin
  connection. Whoever needs its outcome awaits it; an exception nobody expected is logged
  with its traceback, and serve goes on (the job is over, and what it did is recorded);
- a *service* (`spawn_service`) is a part of serve that must keep running: the lifecycle
  ticker, the monitor. If one ends with an exception, serve cannot do its work any more: the
  failure is logged and handed to the root's `on_failure` (serve stops and exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Callable

log = logging.getLogger("fcrun.tasks")


class TaskOwner:
    """Owns tasks: none is fire-and-forget, none ends unseen.

    Args:
        name: names the scope in log lines ("serve", "serve/manager").
        on_failure: called with the exception when a service of this owner or of any of its
            scopes fails (only on the root; scopes pass failures up).

    Resource handling: `aclose()` cancels and awaits every task of this owner and its scopes;
    a task started once it began is cancelled before it runs (a callback that fired late, such
    as a proxy connection's last read, gets a cancelled task rather than an error).
    """

    def __init__(self, name: str = "serve", on_failure: Callable[[BaseException], None] | None = None,
                 *, parent: TaskOwner | None = None):
        self.name = name
        self.on_failure = on_failure
        self.failure: BaseException | None = None  # the first service failure, on the root
        self._parent = parent
        self._tasks: dict[asyncio.Task, tuple[bool, tuple[type[BaseException], ...]]] = {}
        self._scopes: set[TaskOwner] = set()
        self._closed = False

    def scope(self, name: str) -> TaskOwner:
        """A child owner for one part of serve, closed with this one if not before.

        Raises:
            RuntimeError: this owner is closed.
        """
        if self._closed:
            raise RuntimeError(f"task owner {self.name} is closed")
        child = TaskOwner(f"{self.name}/{name}", parent=self)
        self._scopes.add(child)
        return child

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None,
              expected: tuple[type[BaseException], ...] = ()) -> asyncio.Task:
        """Start a job. An exception of an `expected` type is the business of whoever awaits
        the task (not logged here); any other is logged when the task ends."""
        return self._start(coro, name, service=False, expected=expected)

    def spawn_service(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task:
        """Start a service: ending normally is fine; ending with an exception stops serve."""
        return self._start(coro, name, service=True, expected=())

    async def join(self) -> None:
        """Wait until this owner and its scopes have no task left (new ones included)."""
        while pending := self._pending():
            # Each task's failure is handled where it ends (_ended): here only the waiting.
            await _wait_ended(pending)

    async def aclose(self) -> None:
        """Cancel every task of this owner and its scopes, and wait for all of them to end."""
        self._closed = True
        for child in list(self._scopes):
            await child.aclose()
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await _wait_ended(tasks)
        if self._parent is not None:
            self._parent._scopes.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._tasks) + sum(len(child) for child in self._scopes)

    def _pending(self) -> list[asyncio.Task]:
        return [*self._tasks, *(task for child in self._scopes for task in child._pending())]

    def _start(self, coro: Coroutine[Any, Any, Any], name: str | None, *, service: bool,
               expected: tuple[type[BaseException], ...]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = (service, expected)
        task.add_done_callback(self._ended)
        if self._closed:
            log.debug("%s: task %s started while closing: cancelled", self.name, task.get_name())
            task.cancel()  # before its first step: its body never runs
        return task

    def _ended(self, task: asyncio.Task) -> None:
        service, expected = self._tasks.pop(task)
        if task.cancelled():
            return
        exc = task.exception()  # also marks it retrieved: asyncio logs nothing more
        if exc is None or isinstance(exc, expected):
            return
        if not service:
            log.error("%s: task %s failed", self.name, task.get_name(), exc_info=exc)
            return
        log.error("%s: service %s failed; serve stops", self.name, task.get_name(), exc_info=exc)
        self._root()._service_failed(exc)

    def _root(self) -> TaskOwner:
        owner = self
        while owner._parent is not None:
            owner = owner._parent
        return owner

    def _service_failed(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        if self.on_failure is not None:
            self.on_failure(exc)


async def _wait_ended(tasks: list[asyncio.Task]) -> None:
    """Wait until the tasks have ended and their done callbacks (`_ended`) have run.

    A task that has ended leaves the owner only in `_ended`, which the loop runs soon after
    (call_soon), not at once. Since Python 3.12, `gather()` of tasks that have all ended returns
    a future that is already done, and awaiting it does not yield to the loop: a caller looping
    until `_ended` ran would spin for ever. So wait only for the running ones, and yield once
    when none is left running, which lets the pending callbacks run.
    """
    running = [task for task in tasks if not task.done()]
    if running:
        await asyncio.gather(*running, return_exceptions=True)
    else:
        await asyncio.sleep(0)
