"""What the admin API's routes do: the `Controller`.

`DirectController` works on the CMDB alone: `fcrun app` uses it when no server runs, and it
is the base of `ManagedController`, which `fcrun serve` uses to also act on running instances
(the manager's routing table, draining on removal, forced scaling, live metering).

This module imports neither the admin server nor the manager at run time, so `fcrun app`
stays light.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..cmdb.base import CMDB, CMDBError, CorruptApp
from ..cmdb.models import App, AppDefaults, AppStats, AppUpdate, Event, Instance, NewApp, Scale, new_app
from ..docroot import DEFAULT_DOCROOT_ROOTS, check_docroot
from ..errors import IncorrectStatus, SpecError
from ..units import parse_cpu
from .admin_protocol import DEFAULT_EVENT_LIMIT
from .metrics import render_metrics

log = logging.getLogger("fcrun.serve")

if TYPE_CHECKING:  # the manager pulls in the runtime; a ManagedController is handed one
    from .manager import Manager


class Controller(Protocol):
    """What the admin API's routes do. Every method may raise FcrunError subclasses."""

    async def list_apps(self) -> list[App]: ...

    async def get_app(self, name: str) -> App: ...

    async def add_app(self, spec: NewApp) -> App: ...

    async def update_app(self, name: str, update: AppUpdate) -> App: ...

    async def remove_app(self, name: str) -> Any:
        """Take the app out of routing, drain and stop its instances, delete it."""
        ...

    async def scale(self, name: str, request: Scale) -> Scale: ...

    async def list_instances(self, app: str | None = None) -> list[Instance]: ...

    async def events(self, app: str | None = None, since_id: int | None = None,
                     limit: int = DEFAULT_EVENT_LIMIT) -> list[Event]: ...

    async def stats(self, app: str | None = None) -> dict[str, AppStats]: ...

    async def metrics_text(self) -> str: ...


class DirectController:
    """The controller on the CMDB alone: used when no instance manager is attached (and by
    `fcrun app` when no server runs). Records an event for every change.

    CMDB calls run in worker threads, so a busy database never stalls the event loop.

    A docroot is accepted only under `docroot_roots` and clear of `fcrun_roots` (the data and
    run roots), reached through no symlink (docroot.py); the runtime checks it again each time
    it mounts it, since the path may change in between.
    """

    def __init__(self, cmdb: CMDB, defaults: AppDefaults | None = None, clock: Callable[[], float] = time.time,
                 *, docroot_roots: Sequence[str] = DEFAULT_DOCROOT_ROOTS, fcrun_roots: Sequence[str] = ()):
        self.cmdb = cmdb
        self.defaults = defaults or AppDefaults()
        self.clock = clock  # wall clock: an app's created_at
        self.docroot_roots = tuple(docroot_roots)
        self.fcrun_roots = tuple(fcrun_roots)

    async def list_apps(self) -> list[App]:
        return await asyncio.to_thread(self.cmdb.list_apps)

    async def get_app(self, name: str) -> App:
        return await asyncio.to_thread(self.cmdb.get_app, name)

    async def add_app(self, spec: NewApp) -> App:
        return await asyncio.to_thread(self._add_app, spec)

    def _add_app(self, spec: NewApp) -> App:
        app = new_app(spec, self.defaults, self.clock())
        self._check_docroot(app.docroot)
        app = self.cmdb.add_app(app)
        self._event(app.name, "app-added", f"added {app.name} (image {app.image})",
                    {"hostnames": app.all_hostnames, "image": app.image})
        return app

    async def update_app(self, name: str, update: AppUpdate) -> App:
        return await asyncio.to_thread(self._update_app, name, update)

    def _update_app(self, name: str, update: AppUpdate) -> App:
        if isinstance(update.docroot, str):
            self._check_docroot(update.docroot)
        app = self.cmdb.update_app(name, update)
        changed = sorted(update.changes())  # names only: env values may be secrets
        message = f"updated {', '.join(changed) or 'nothing'} (generation {app.generation})"
        self._event(name, "app-updated", message, {"changed": changed, "generation": app.generation})
        return app

    def _event(self, app: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Record the event of a change already committed: a failure is logged, not raised, so
        that the caller is not told the change failed (a retry would then be refused: 409)."""
        try:
            self.cmdb.add_event(app, kind, message, data)
        except CMDBError as exc:
            log.warning("%s: done, but its event could not be recorded: %s", message, exc)

    def _check_docroot(self, docroot: str | None) -> None:
        if docroot is not None:
            check_docroot(docroot, self.docroot_roots, self.fcrun_roots, "docroot")

    async def remove_app(self, name: str) -> App:
        return await asyncio.to_thread(self._remove_app, name)

    def _remove_app(self, name: str) -> App:
        app = self.cmdb.remove_app(name)
        # No manager runs instances here, so any rows left are from a server that is gone.
        for instance in self.cmdb.list_instances(name):
            self.cmdb.remove_instance(instance.id)
        self._event(name, "app-removed", f"removed {name}")
        return app

    async def scale(self, name: str, request: Scale) -> Scale:
        app = await self.get_app(name)
        check_scale(app, request)
        raise IncorrectStatus(f"cannot scale {name!r}: no instance manager is attached (is `fcrun serve` running?)")

    async def list_instances(self, app: str | None = None) -> list[Instance]:
        return await asyncio.to_thread(self.cmdb.list_instances, app)

    async def events(self, app: str | None = None, since_id: int | None = None,
                     limit: int = DEFAULT_EVENT_LIMIT) -> list[Event]:
        return await asyncio.to_thread(self.cmdb.list_events, app, limit, since_id)

    async def stats(self, app: str | None = None) -> dict[str, AppStats]:
        return await asyncio.to_thread(self._stats, app)

    def _stats(self, app: str | None) -> dict[str, AppStats]:
        """What the CMDB knows: instance rows. Metering lives in the manager."""
        names = [self.cmdb.get_app(app).name] if app is not None else [a.name for a in self.cmdb.list_apps()]
        out = {name: AppStats() for name in names}
        for instance in self.cmdb.list_instances(app):
            stats = out.get(instance.app)
            if stats is None or instance.state == "stopped":
                continue
            if instance.state == "starting":  # a claimed share (shared CMDB): not an instance yet
                stats.instances.starting += 1
                continue
            stats.instances.total += 1
            stats.instances.ready += instance.state == "ready"
            stats.instances.frozen += instance.state == "frozen"
            stats.instances.draining += instance.state == "draining"
            stats.requests += instance.requests
        return out

    async def metrics_text(self) -> str:
        return render_metrics(await self.stats())


class ManagedController(DirectController):
    """The controller of a running `fcrun serve`: CMDB changes plus their effect on running
    instances.

    What the manager records (events, instance rows) is written in the background; the reads
    here wait for what was recorded before them, so a client sees its own changes.
    """

    def __init__(self, cmdb: CMDB, manager: Manager, defaults: AppDefaults | None = None, *,
                 docroot_roots: Sequence[str] = DEFAULT_DOCROOT_ROOTS, fcrun_roots: Sequence[str] = ()):
        super().__init__(cmdb, defaults, docroot_roots=docroot_roots, fcrun_roots=fcrun_roots)
        self.manager = manager

    async def add_app(self, spec: NewApp) -> App:
        app = await super().add_app(spec)
        await self.manager.reload_apps()
        return app

    async def update_app(self, name: str, update: AppUpdate) -> App:
        app = await super().update_app(name, update)
        await self.manager.reload_apps()  # new settings apply to the next instance
        return app

    async def remove_app(self, name: str) -> App:
        try:
            await self.get_app(name)  # NotFound before anything changes
        except CorruptApp:
            pass  # a row that cannot be read back is removed all the same (how it is fixed)
        await self.manager.remove_app(name)  # 404 for new requests, drain, stop
        await self.manager.records.flush()  # its instance rows are gone before the app is
        return await super().remove_app(name)

    async def scale(self, name: str, request: Scale) -> Scale:
        """An operator's order: instances started or drained, or a quota changed live. Works
        whether autoscale is on or off; answers once it is done."""
        app = await self.get_app(name)
        check_scale(app, request)
        return await self.manager.scale(app.name, request)

    async def list_instances(self, app: str | None = None) -> list[Instance]:
        await self.manager.records.flush()
        return await super().list_instances(app)

    async def events(self, app: str | None = None, since_id: int | None = None,
                     limit: int = DEFAULT_EVENT_LIMIT) -> list[Event]:
        await self.manager.records.flush()
        return await super().events(app, since_id, limit)

    async def stats(self, app: str | None = None) -> dict[str, AppStats]:
        if app is not None:
            await self.get_app(app)
        stats = self.manager.stats()
        if app is not None:
            return {app: stats.get(app, AppStats())}
        return stats


def check_scale(app: App, request: Scale) -> None:
    """Raises SpecError unless `request` names exactly one of instances (0..max_instances)
    and cpu (up to the app's cpu_max)."""
    if (request.instances is None) == (request.cpu is None):
        raise SpecError('give exactly one of "instances" and "cpu"', "$")
    if request.instances is not None and not 0 <= request.instances <= app.max_instances:
        raise SpecError(f"instances must be in 0..{app.max_instances} (the app's max_instances), "
                        f"not {request.instances}", "$.instances")
    if request.cpu is not None:
        parse_cpu(request.cpu, "$.cpu")
        if request.cpu > app.cpu_ceiling:
            raise SpecError(f"cpu {request.cpu:g} is above the app's cpu_max {app.cpu_ceiling:g}", "$.cpu")
