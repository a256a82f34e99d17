"""A clock that tests set: the manager, the pool and the cgroup driver take one instead of time's."""

from __future__ import annotations

from typing import Callable


class Clock:
    """Call it for the time; move it by assigning `now` (seconds) or by `sleep`, which also calls
    `on_sleep` (a test's hook to change the world "meanwhile")."""

    def __init__(self, now: float = 0.0):
        self.now = now
        self.on_sleep: Callable[[], None] | None = None

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()
