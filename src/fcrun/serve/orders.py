"""What the manager does when told rather than when it sees load: an operator's `fcrun app
scale`, and a cluster node's moves (cluster/node.py: start one instance here for a move in,
stop every instance here for a move out).

A mixin of `Manager` (manager.py), on its apps, instances and start/stop steps.
"""

from __future__ import annotations

import asyncio

from ..cmdb.models import Scale
from ..crashpoints import crash_point
from ..errors import ContainerError, FcrunError, IncorrectStatus, NotFound
from .instances import DRAINING, STOPPED
from .policy import History


class Orders:
    """`Manager`'s orders (see the module docstring)."""

    async def scale(self, name: str, request: Scale) -> Scale:
        """An operator's order (`fcrun app scale`): a number of instances, or a CPU quota for
        every ready instance. Works with autoscale on or off; the policy's cooldowns count it.
        Returns once done: new instances accept connections, removed ones have drained.

        Raises:
            NotFound: no such app.
            IncorrectStatus: a CPU change for an app with no ready instance.
            ContainerError: an instance could not be started (the message says why).
            FcrunError: the kernel refused the new quota.
        """
        state = self.apps.get(name)
        if state is None or state.removing:
            raise NotFound(f"no app named {name!r} is served")
        app = state.app
        ready = state.ready()
        now = self.clock()
        if request.cpu is not None:
            if not ready:
                raise IncorrectStatus(f"cannot set the cpu of {name}: it has no running instance "
                                      f"(new instances start with its --cpu {app.cpu:g})")
            cpu = request.cpu
            for inst in ready:
                before, inst.cpu = inst.cpu, cpu
                try:
                    await self.backend.set_cpu(inst.name, cpu)
                    crash_point("serve.scale-up.written")
                except FcrunError:
                    inst.cpu = before
                    raise
                self._record(inst)
                action = "scale-up" if cpu > before else "scale-down"
                self.records.event(name, action, f"forced: {inst.name} cpu {before:g} -> {cpu:g} (fcrun app scale)",
                                   {"instance": inst.name, "cpu_from": before, "cpu_to": cpu, "forced": True})
                self._count_forced(state, action, now)
            return Scale(cpu=cpu)
        wanted = request.instances
        have = len(ready) + state.pending_starts
        if wanted > have:
            self.records.event(name, "scale-out", f"forced: {have} -> {wanted} instances (fcrun app scale)",
                               {"instances_from": have, "instances_to": wanted, "forced": True})
            self._count_forced(state, "scale-out", now)
            starts = [self._start_soon(state) for _ in range(wanted - have)]
            state.starting = starts[-1]
            results = await asyncio.gather(*starts, return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise ContainerError(f"cannot scale {name} out to {wanted} instances: {failed[0]}")
        elif wanted < len(ready):
            self.records.event(name, "scale-in", f"forced: {len(ready)} -> {wanted} instances (fcrun app scale)",
                               {"instances_from": len(ready), "instances_to": wanted, "forced": True})
            self._count_forced(state, "scale-in", now)
            # Drain the least busy first; among equals the newest.
            victims = sorted(ready, key=lambda i: (i.outstanding, -i.started_mono))[:len(ready) - wanted]
            await asyncio.gather(*(self._stop(state, i, "scaled in (forced)") for i in victims))
        return Scale(instances=len(state.ready()) + state.pending_starts)

    @staticmethod
    def _count_forced(state: AppState, action: str, now: float) -> None:
        """A forced action restarts the policy's cooldown of its family."""
        up = action in ("scale-up", "scale-out")
        state.history = History(last_up_s=now if up else state.history.last_up_s,
                                last_down_s=state.history.last_down_s if up else now)

    async def start_surge(self, name: str, surge: int = 1) -> None:
        """Start one instance of `name` here while others elsewhere serve it (a move, a drain or
        a scale-out onto this node, cluster/node.py). `surge`: shares it may take over the app's
        max (1 for a move: the instances it replaces stop only once it is ready; 0 for a
        scale-out). Returns once it accepts connections.

        Raises: NotFound (no such app), StartFailed (it could not start; recorded).
        """
        state = self.apps.get(name)
        if state is None or state.removing:
            raise NotFound(f"no app named {name!r} is served")
        task = self._start_soon(state, surge=surge)
        if not state.start_in_progress():
            state.starting = task  # requests arriving meanwhile wait for it rather than start another
        await asyncio.shield(task)

    async def evacuate(self, name: str, reason: str) -> int:
        """Drain and stop every instance of `name` here, keeping the app (a move or a drain away
        from this node, once another node serves it); how many were stopped."""
        state = self.apps.get(name)
        if state is None:
            return 0
        victims = [i for i in state.instances.values() if i.state not in (DRAINING, STOPPED)]
        await asyncio.gather(*(self._stop(state, i, reason) for i in victims))
        return len(victims)
