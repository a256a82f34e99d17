"""serve's removal of old events (serve/retention.py) against a real CMDB (SQLite), with the
clock and the sleep between rounds given."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from fcrun import Paths
from fcrun.cmdb import open_cmdb
from fcrun.cmdb.base import CMDBUnavailable
from fcrun.serve import retention
from fcrun.serve.config import ServeConfig, CMDBConfig, check_config
from fcrun.errors import SpecError

DAY = 86400.0


@pytest.fixture
def cmdb(tmp_path):
    db = open_cmdb(Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path / "run")), None)
    yield db
    db.close()


def ages(db, now: float) -> list[float]:
    return [round((now - e.ts) / DAY, 1) for e in db.list_events(limit=100_000)]


def test_events_older_than_the_kept_days_go_in_batches_and_the_rest_stay(cmdb, tmp_path, monkeypatch):
    db_path = str(tmp_path / "data" / "cmdb.sqlite3")
    now = 10_000 * DAY
    for age_days in (40, 31, 29, 1):
        cmdb.add_event("a.test", "kind", f"{age_days} days old")
    raw = sqlite3.connect(db_path, isolation_level=None)  # add_event stamps now: back-date them
    try:
        for event_id, age_days in zip((1, 2, 3, 4), (40, 31, 29, 1)):
            raw.execute("UPDATE events SET ts = ? WHERE id = ?", (now - age_days * DAY, event_id))
    finally:
        raw.close()
    monkeypatch.setattr(retention, "BATCH", 1)  # every batch full but the last: the loop goes on
    removed = asyncio.run(retention.trim_once(cmdb, 30 * DAY, clock=lambda: now))
    assert removed == 2
    assert ages(cmdb, now) == [29.0, 1.0]


def test_the_service_rounds_at_its_interval_and_an_unavailable_cmdb_does_not_end_it(cmdb):
    calls: list[float] = []
    slept: list[float] = []

    class Flaky:
        def trim_events(self, before_ts: float, limit: int) -> int:
            calls.append(before_ts)
            if len(calls) == 1:
                raise CMDBUnavailable("the server is down")
            return cmdb.trim_events(before_ts, limit)

    async def sleep(s: float) -> None:
        slept.append(s)
        if len(slept) == 3:
            raise asyncio.CancelledError  # as serve's stop cancels it

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(retention.trim_events_forever(Flaky(), 30, clock=lambda: 100 * DAY, sleep=sleep,
                                                  interval_s=3600))
    assert calls == [70 * DAY] * 3 and slept == [3600] * 3


def test_a_negative_or_nan_number_of_days_is_refused_naming_the_key():
    for bad in (-1.0, float("nan")):
        with pytest.raises(SpecError, match="events_keep_days") as info:
            check_config(ServeConfig(cmdb=CMDBConfig(events_keep_days=bad)))
        assert info.value.where == "$.cmdb.events_keep_days"
    check_config(ServeConfig(cmdb=CMDBConfig(events_keep_days=0)))  # 0: keep them all
