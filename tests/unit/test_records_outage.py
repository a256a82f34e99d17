"""serve's Recorder through a PostgreSQL outage (a real server, tests/pgserver.py): writes made
while the server is stopped wait, in order, and are written once it is back; nothing is lost or
written twice. At close with the server still down they are logged as lost, not waited for."""

from __future__ import annotations

import asyncio

from fcrun.cmdb import Instance
from fcrun.cmdb.base import CMDBUnavailable
from fcrun.cmdb.postgres import PostgresCMDB
from fcrun.serve.records import Recorder
from fcrun.tasks import TaskOwner

from pgserver import pg_server, pg_url  # noqa: F401 - fixtures

DEADLINE_S = 30.0  # only against hanging


def test_writes_during_an_outage_are_kept_in_order_and_written_when_the_server_is_back(pg_server, pg_url):
    async def main():
        tasks = TaskOwner("test")
        with PostgresCMDB(pg_url, pool_timeout_s=0.2) as db:
            recorder = Recorder(db, tasks)
            recorder.event(None, "before", "0")
            await recorder.flush()
            await asyncio.to_thread(pg_server.kill)
            try:
                for i in range(1, 51):
                    recorder.event("a.test", "during", str(i))
                recorder.instance(Instance(id="i-1", app="a.test", container="c", state="ready"))
                recorder.event("a.test", "during", "51")
                async with asyncio.timeout(DEADLINE_S):
                    await recorder.flush()  # returns: the writes wait for the CMDB, flush does not
                assert recorder.stalled and recorder.pending == 52
            finally:
                await asyncio.to_thread(pg_server.restart_stopped)
            recorder.event(None, "after", "52")
            async with asyncio.timeout(DEADLINE_S):
                while recorder.stalled or recorder.pending:
                    await asyncio.sleep(0.05)
                await recorder.flush()
            await recorder.aclose()
            events = db.list_events(limit=1000)
            assert [e.message for e in events] == [str(i) for i in range(53)]  # none lost, none twice, in order
            assert [i.id for i in db.list_instances()] == ["i-1"]
        await tasks.aclose()

    asyncio.run(main())


def test_closing_while_the_server_is_down_logs_what_is_lost_and_returns(pg_server, pg_url, caplog):
    async def main():
        tasks = TaskOwner("test")
        with PostgresCMDB(pg_url, pool_timeout_s=0.2) as db:
            recorder = Recorder(db, tasks)
            await asyncio.to_thread(pg_server.kill)
            try:
                recorder.event(None, "lost", "x")
                recorder.event(None, "lost", "y")
                async with asyncio.timeout(DEADLINE_S):
                    await recorder.aclose()
            finally:
                await asyncio.to_thread(pg_server.restart_stopped)
            assert db.list_events() == []
        await tasks.aclose()

    asyncio.run(main())
    assert "2 writes lost (the first: event lost of serve)" in caplog.text


class LostAnswerCMDB(PostgresCMDB):
    """The connection breaks after the server committed the first event but before its answer
    came: the write happened, the writer is told the CMDB is unavailable (what a server killed
    at that instant, or a network cut, does)."""

    lose_next_answer = True

    def add_event(self, *args, **kwargs):
        event = super().add_event(*args, **kwargs)
        if self.lose_next_answer:
            self.lose_next_answer = False
            raise CMDBUnavailable("CMDB postgresql://test: server closed the connection unexpectedly")
        return event


def test_a_write_whose_answer_was_lost_after_its_commit_is_recorded_once(pg_url):
    async def main():
        tasks = TaskOwner("test")
        with LostAnswerCMDB(pg_url) as db:
            recorder = Recorder(db, tasks)
            recorder.event("a.test", "start", "one")
            recorder.event("a.test", "start", "two")
            async with asyncio.timeout(DEADLINE_S):
                while recorder.pending or recorder.stalled or not db.list_events():
                    await asyncio.sleep(0.05)
                await recorder.flush()
            await recorder.aclose()
            assert [e.message for e in db.list_events()] == ["one", "two"]  # retried, not twice
        await tasks.aclose()

    asyncio.run(main())
