"""serve's AppWatch on a real PostgreSQL (tests/pgserver.py): another writer's app changes wake
it through LISTEN/NOTIFY; with the server stopped it polls and serves what it knew; when the
server is back it listens again, re-reads, and records the outage as an event."""

from __future__ import annotations

import asyncio

import pytest

from fcrun.cmdb import App, AppUpdate, SqliteCMDB
from fcrun.cmdb.postgres import PostgresCMDB
from fcrun.serve.appwatch import AppWatch

from pgserver import pg_server, pg_url  # noqa: F401 - fixtures

DEADLINE_S = 20.0  # only against hanging: nothing here asserts how fast


class Seen:
    """What serve would do: re-read the apps (reload) and record events."""

    def __init__(self, cmdb):
        self.cmdb = cmdb
        self.apps: list[str] = []
        self.events: list[tuple] = []
        self.changed = asyncio.Event()

    async def reload(self) -> None:
        self.apps = [a.name for a in await asyncio.to_thread(self.cmdb.list_apps)]
        self.changed.set()

    def event(self, app, kind, message) -> None:
        self.events.append((app, kind, message))

    async def until(self, predicate) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def test_sqlite_is_not_watched(tmp_path):
    with SqliteCMDB(str(tmp_path / "cmdb.sqlite3")) as db:
        assert not AppWatch.wanted(db)


async def _watching(url, body, **options):
    with PostgresCMDB(url) as serve_db, PostgresCMDB(url) as other:
        assert AppWatch.wanted(serve_db)
        seen = Seen(serve_db)
        watch = AppWatch(serve_db, seen.reload, seen.event, **options)
        task = asyncio.create_task(watch.run())
        try:
            await body(seen, other, watch)
        finally:
            task.cancel()
            await asyncio.wait({task})


def test_another_writer_s_changes_wake_the_watch(pg_url):
    async def body(seen, other, watch):
        await asyncio.sleep(0.3)  # let it LISTEN (a change before that is not announced)
        other.add_app(App(name="a.test", image="x"))
        await seen.until(lambda: seen.apps == ["a.test"])
        other.update_app("a.test", AppUpdate(cpu=0.5))
        other.add_app(App(name="b.test", image="x"))
        await seen.until(lambda: seen.apps == ["a.test", "b.test"])
        other.remove_app("a.test")
        await seen.until(lambda: seen.apps == ["b.test"])
        assert seen.events == []  # no outage

    # Polling slower than the deadline: only NOTIFY can have woken it.
    asyncio.run(_watching(pg_url, body, poll_interval_s=3600.0))


def test_a_failed_write_announces_nothing(pg_url):
    async def body(seen, other, watch):
        other.add_app(App(name="a.test", image="x"))
        await seen.until(lambda: seen.apps == ["a.test"])
        before = watch.reloads
        with pytest.raises(Exception):
            other.add_app(App(name="a.test", image="y"))  # AlreadyExists: rolled back
        other.add_app(App(name="b.test", image="x"))
        await seen.until(lambda: seen.apps == ["a.test", "b.test"])
        assert watch.reloads == before + 1

    async def start(seen, other, watch):
        await asyncio.sleep(0.3)
        await body(seen, other, watch)

    asyncio.run(_watching(pg_url, start, poll_interval_s=3600.0))


def test_a_server_outage_falls_back_to_polling_and_is_reported_when_it_ends(pg_server, pg_url):
    async def body(seen, other, watch):
        await asyncio.sleep(0.3)
        other.add_app(App(name="a.test", image="x"))
        await seen.until(lambda: seen.apps == ["a.test"])
        await asyncio.to_thread(pg_server.kill)
        try:
            await asyncio.sleep(0.5)  # LISTEN breaks, polls fail: the apps known stay
            assert seen.apps == ["a.test"]
        finally:
            await asyncio.to_thread(pg_server.restart_stopped)
        other.add_app(App(name="b.test", image="x"))  # perhaps before LISTEN is back: polling or the re-read
        await seen.until(lambda: seen.apps == ["a.test", "b.test"])
        await seen.until(lambda: any(kind == "cmdb-reconnected" for _, kind, _ in seen.events))
        other.add_app(App(name="c.test", image="x"))
        await seen.until(lambda: seen.apps == ["a.test", "b.test", "c.test"])

    asyncio.run(_watching(pg_url, body, poll_interval_s=0.05, listen_retry_s=0.2))
