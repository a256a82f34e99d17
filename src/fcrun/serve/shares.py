"""An app's instances across serves that share a CMDB: each new one first takes a share.

Serves on one PostgreSQL never run more than an app's max_instances together: before one starts
an instance, it records a 'starting' row in the CMDB only if the app is below its max, counting
every serve's live rows (CMDB.claim_instance, one transaction under a per-app advisory lock).
The instance's own row replaces that claim row once it runs (Manager._start_instance).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

from ..cmdb.base import CMDBError
from ..cmdb.models import App
from ..cmdb.models import Instance as InstanceRow
from .backend import StartFailed
from .records import Recorder

CLAIM_RETRY_S = 0.1  # a cold start waiting for a share of its app's max: how often it asks


async def claim_share(records: Recorder, app: App, deadline: float, clock: Callable[[], float], *,
                      has_ready: Callable[[], bool], removing: Callable[[], bool], surge: int = 0) -> str:
    """A share of `app`'s max_instances, as a 'starting' row of ours; returns its id. A request's
    cold start (no ready instance here: `has_ready()` false) waits for one until `deadline` on
    `clock`, since other serves stop theirs when idle; a scale-out is refused at once. `surge`:
    how many shares over the max it may take (a move onto another node: Manager.start_surge).

    Raises:
        StartFailed (503): the CMDB cannot answer, the app is being removed, or every share
            stayed taken.
    """
    row = InstanceRow(id=f"{app.name}~claim-{secrets.token_hex(4)}", app=app.name, container="",
                      state="starting", started_at=time.time())
    while True:
        try:
            if await records.claim(row, app.max_instances + surge):
                return row.id
        except CMDBError as exc:
            raise StartFailed(f"cannot start an instance of {app.name}: the CMDB cannot record it: {exc}; retry",
                              503) from None
        if removing():
            raise StartFailed(f"{app.name} is being removed", 503)
        if has_ready() or clock() + CLAIM_RETRY_S > deadline:
            raise StartFailed(f"cannot start an instance of {app.name}: it already runs its max of "
                              f"{app.max_instances} instances, counting those of the other serves sharing the CMDB",
                              503)
        await asyncio.sleep(CLAIM_RETRY_S)
