"""The manager's instances: their states and the one table of moves between them, their request
counters, the lease a request holds on one, and the choice of instance for a request.

States (an instance enters the table once it accepts connections)::

    ready -> draining -> stopped
      | ^ |   (routing)   (no new requests; in-flight ones finish, then stop)
      | | `-> replacing -> draining   (max-lifetime: serves until its successor is ready)
      | `--- frozen <- freezing   (idle for freeze-after: cgroup freezer; the next
      `----------------^           request thaws it; idle for idle-timeout: stopped)

`TRANSITIONS` is the only place that says which state may follow which; `Instance.move_to`
checks it, so a move the manager never meant to make fails loudly instead of routing to (or
stopping) the wrong instance.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..cmdb.models import Instance as InstanceRow
from ..errors import IncorrectStatus
from . import monitor

if TYPE_CHECKING:
    from .backend import Existing


class InstanceState(enum.Enum):
    READY = "ready"
    REPLACING = "replacing"  # max-lifetime reached: serves until its successor is ready
    FREEZING = "freezing"  # out of routing; the cgroup freezer is being applied
    FROZEN = "frozen"
    DRAINING = "draining"  # out of routing; in-flight requests finish, then it stops
    STOPPED = "stopped"


READY, REPLACING, FREEZING, FROZEN, DRAINING, STOPPED = InstanceState

TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    READY: frozenset({REPLACING, FREEZING, DRAINING}),
    REPLACING: frozenset({READY, DRAINING}),  # READY: its successor did not start
    FREEZING: frozenset({FROZEN, READY, DRAINING}),  # READY: the freeze failed
    FROZEN: frozenset({READY, DRAINING}),  # READY: thawed by a request
    DRAINING: frozenset({STOPPED}),
    STOPPED: frozenset(),
}
ROUTABLE = frozenset({READY, REPLACING})  # an instance being replaced serves until its successor is ready
IDLE_CANDIDATES = frozenset({READY, FROZEN})  # what the idle timer may stop

# What the CMDB's instance rows say (its vocabulary has no replacing or freezing).
RECORDED_STATE: dict[InstanceState, str] = {
    READY: "ready", REPLACING: "ready", FREEZING: "frozen", FROZEN: "frozen", DRAINING: "draining",
    STOPPED: "stopped",
}

# Slow start: a new instance accepts connections before it can serve many at once. A
# pre-forking server forks its workers after it listens (the apache-php image forks 128); a
# connection beyond the workers forked so far waits in the kernel's accept queue, with
# keep-alive until a worker's connection closes (seconds). So while other instances can take
# the load, a new one gets at most as many requests in flight as it has processes besides the
# first (its cgroup's pids, read at each sample), or SLOW_START_FIRST twice over every
# SLOW_START_STEP_S if that is more (a server that does not fork), and no limit once it is
# SLOW_START_S old. When every instance is at its limit the least loaded still gets the
# request: the limit only steers, it never refuses.
SLOW_START_FIRST = 4
SLOW_START_STEP_S = 1.0
SLOW_START_S = 5.0
UNCAPPED = 1 << 62


def slow_start_cap(age_s: float, processes: int) -> int:
    """The most requests in flight on an instance `age_s` old with `processes` in its cgroup."""
    if age_s >= SLOW_START_S:
        return UNCAPPED
    return max(SLOW_START_FIRST << int(max(0.0, age_s) / SLOW_START_STEP_S), processes - 1)


@dataclass(slots=True)  # slots: attribute access on the request path is a little faster
class Instance:
    """One instance of an app, as the manager knows it. Times are the manager's clock unless
    named otherwise."""

    name: str
    app: str
    ip: str
    port: int
    started_at: float  # wall clock, for display
    started_mono: float
    last_active: float  # last request start or end
    state: InstanceState = READY
    routable: bool = True  # state in ROUTABLE, kept by move_to: read for every request
    cpu: float = 0.0  # its CPU quota now (the app's cpu, until scaled up or down)
    outstanding: int = 0
    cap: int = UNCAPPED  # most requests in flight while other instances can take more (slow start)
    requests: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    start_path: str = "start"  # how it came to be: "start" or "pool"
    freezing: asyncio.Task | None = None
    # Request counters for the monitor, kept where `outstanding` changes anyway.
    busy_s: float = 0.0  # integral of `outstanding` over time, up to busy_at
    busy_at: float = 0.0
    latency_s: float = 0.0  # sum of response times of completed requests (requests - outstanding)
    reading: monitor.Reading | None = None  # the last sample

    def move_to(self, state: InstanceState) -> None:
        """Raises IncorrectStatus: TRANSITIONS has no move from the current state to `state`."""
        if state not in TRANSITIONS[self.state]:
            raise IncorrectStatus(f"instance {self.name}: no move from {self.state.value} to {state.value}")
        self.state = state
        self.routable = state in ROUTABLE
        if state is DRAINING and self.outstanding == 0:
            self.drained.set()

    def request_started(self, now: float, began: float) -> None:
        """A request is in flight on it from `now`; it began (maybe waiting) at `began`."""
        outstanding = self.outstanding
        self.busy_s += outstanding * (now - self.busy_at)
        self.busy_at = now
        self.outstanding = outstanding + 1
        self.requests += 1
        self.last_active = began

    def request_ended(self, now: float, began: float) -> float:
        """A request that began at `began` is over; returns how long it took."""
        outstanding = self.outstanding
        self.busy_s += outstanding * (now - self.busy_at)
        self.busy_at = self.last_active = now
        self.outstanding = outstanding - 1
        elapsed = now - began
        self.latency_s += elapsed
        if outstanding == 1 and self.state is DRAINING:
            self.drained.set()
        return elapsed

    def row(self) -> InstanceRow:
        """Its CMDB row now."""
        return InstanceRow(id=self.name, app=self.app, container=self.name, state=RECORDED_STATE[self.state],
                           ip=self.ip, port=self.port, cpu=self.cpu or None, started_at=self.started_at)

    def busy_until(self, now: float) -> float:
        """`busy_s` brought up to `now`."""
        return self.busy_s + self.outstanding * (now - self.busy_at)


def adopted_instance(found: "Existing", port: int, cpu: float, now: float) -> Instance:
    """An instance an earlier serve left, taken over at start-up (Manager.reconcile): a frozen
    one stays frozen, out of routing, until a request thaws it."""
    return Instance(name=found.name, app=found.app, ip=found.ip, port=port, started_at=found.started_at,
                    started_mono=now, last_active=now, cpu=cpu, busy_at=now, state=FROZEN if found.frozen else READY,
                    routable=not found.frozen)


def least_loaded(instances: Iterable[Instance]) -> Instance | None:
    """The routable instance with the fewest requests in flight, preferring those under their
    slow-start cap; None when none is routable."""
    best = capped = None
    for inst in instances:
        if inst.routable:
            if inst.outstanding >= inst.cap:  # slow start: only if no other can take it
                if capped is None or inst.outstanding < capped.outstanding:
                    capped = inst
            elif best is None or inst.outstanding < best.outstanding:
                best = inst
    return best or capped


# The manager's end of a lease: (its per-app record, the instance, status, began, failed).
Release = Callable[[Any, Instance, int, float, bool], None]


class InstanceLease:
    """One request's hold on one instance (the proxy's Lease)."""

    __slots__ = ("addr", "cold_start", "max_body_bytes", "instance_id", "_release", "_owner", "_instance",
                 "_began", "_open")

    def __init__(self, release: Release, owner: Any, instance: Instance, cold_start: tuple[str, float] | None,
                 began: float, max_body_bytes: int | None):
        self.addr = (instance.ip, instance.port)
        self.cold_start = cold_start
        self.max_body_bytes = max_body_bytes
        self.instance_id = instance.name
        self._release = release
        self._owner = owner
        self._instance = instance
        self._began = began
        self._open = True

    def done(self, status: int, request_bytes: int = 0, response_bytes: int = 0, failed: bool = False) -> None:
        if not self._open:
            return
        self._open = False
        self._release(self._owner, self._instance, status, self._began, failed)
