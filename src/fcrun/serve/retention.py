"""Old events leave the CMDB: without it the events table grows by every cold start, freeze,
scaling step and stop, for ever (thousands of small sites make millions of rows a year, and
`fcrun events` and the dashboard read its newest end only).

Every serve that runs instances (roles `all` and `node`) removes the events older than
``[cmdb] events_keep_days`` (default 30; 0 keeps them all) once at start and then every
`TRIM_INTERVAL_S`, in batches of `BATCH` rows, each its own short transaction, so the writes
queued behind it (Recorder) wait one batch at most. Serves sharing a PostgreSQL database each do
it; a row goes once whoever deletes it. A CMDB that cannot answer is retried at the next round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..cmdb.base import CMDB, CMDBError

log = logging.getLogger("fcrun.serve")

TRIM_INTERVAL_S = 3600.0
BATCH = 10_000
DAY_S = 86400.0


async def trim_once(cmdb: CMDB, keep_s: float, clock: Callable[[], float] = time.time) -> int:
    """Remove every event older than `keep_s`, a batch at a time; returns how many went."""
    cutoff = clock() - keep_s
    total = 0
    while True:
        removed = await asyncio.to_thread(cmdb.trim_events, cutoff, BATCH)
        total += removed
        if removed < BATCH:
            return total


async def trim_events_forever(cmdb: CMDB, keep_days: float, *, clock: Callable[[], float] = time.time,
                              sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                              interval_s: float = TRIM_INTERVAL_S) -> None:
    """serve's service: `trim_once` now and every `interval_s`. Never raises (logged)."""
    while True:
        try:
            removed = await trim_once(cmdb, keep_days * DAY_S, clock)
            if removed:
                log.info("removed %d events older than %g days from the CMDB", removed, keep_days)
        except CMDBError as exc:
            log.warning("old events were not removed from the CMDB (next try in %g s): %s", interval_s, exc)
        except Exception:  # noqa: BLE001 - retention must never end serve; the bug is logged
            log.exception("removing old events failed")
        await sleep(interval_s)
