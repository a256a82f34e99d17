"""The admin API's controller when `fcrun serve` runs: CMDB changes plus their effect on
running instances (the manager's routing table, draining on removal, forced scaling, live
metering)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ..cmdb.models import AppStats, AppUpdate, NewApp, Scale
from ..docroot import DEFAULT_DOCROOT_ROOTS
from .admin import DirectController, check_scale
from .manager import Manager


class ManagedController(DirectController):
    def __init__(self, cmdb, manager: Manager, defaults=None, *,
                 docroot_roots: Sequence[str] = DEFAULT_DOCROOT_ROOTS, fcrun_roots: Sequence[str] = ()):
        super().__init__(cmdb, defaults, docroot_roots=docroot_roots, fcrun_roots=fcrun_roots)
        self.manager = manager

    async def add_app(self, spec: NewApp):
        app = await super().add_app(spec)
        self.manager.reload_apps()
        return app

    async def update_app(self, name: str, update: AppUpdate):
        app = await super().update_app(name, update)
        self.manager.reload_apps()  # new settings apply to the next instance
        return app

    async def remove_app(self, name: str):
        await self.get_app(name)  # NotFound before anything changes
        await self.manager.remove_app(name)  # 404 for new requests, drain, stop
        return await super().remove_app(name)

    async def scale(self, name: str, request: Scale) -> Scale:
        """An operator's order: instances started or drained, or a quota changed live. Works
        whether autoscale is on or off; answers once it is done."""
        app = await self.get_app(name)
        check_scale(app, request)
        return await self.manager.scale(app.name, request)

    async def stats(self, app: str | None = None) -> dict[str, AppStats]:
        if app is not None:
            await self.get_app(app)
        stats = self.manager.stats()
        if app is not None:
            stats = {app: stats.get(app, {})}
        return msgspec.convert(stats, dict[str, AppStats])
