"""The manager on a CMDB that other serves share (claims=True): every new instance first takes a
share of its app's max_instances in the CMDB (a real SQLite database here; the PostgreSQL race
is the contract suite's and the two-serve root test's), with the fake backend and clock of
test_manager.py.
"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from fcrun.cmdb.base import CMDBUnavailable
from fcrun.cmdb.models import App, Instance as Row, Scale
from fcrun.cmdb.sqlite import SqliteCMDB
from fcrun.errors import ContainerError
from fcrun.proxy.router import RouteError
from fcrun.serve.shares import CLAIM_RETRY_S
from fcrun.serve.records import Recorder
from fcrun.tasks import TaskOwner
from test_manager import make

ME, OTHER = "host:/run/me", "host:/run/other"


@pytest.fixture
def cmdb(tmp_path):
    db = SqliteCMDB(str(tmp_path / "cmdb.sqlite3"))
    db.add_app(App(name="example.test", image="apache-php", max_instances=2, idle_timeout_s=60))
    db.heartbeat(OTHER)
    yield db
    db.close()


def make_claiming(cmdb, **kw):
    tasks = TaskOwner("test")
    return make(cmdb, claims=True, tasks=tasks, records=Recorder(cmdb, tasks, node=ME), **kw)


def other_instance(cmdb, name: str) -> None:
    cmdb.upsert_instance(Row(id=name, app="example.test", container=name, state="ready", owner=OTHER))


def test_a_cold_start_records_its_instance_as_this_serve_s_and_leaves_no_claim_row(cmdb):
    async def main():
        manager, backend, _, _ = make_claiming(cmdb)
        other_instance(cmdb, "other-1")
        lease = await manager.acquire("example.test")
        lease.done(200, 10, 100, False)
        await manager.records.flush()
        rows = {(r.id, r.owner, r.state) for r in cmdb.list_instances("example.test")}
        assert rows == {("other-1", OTHER, "ready"), ("example.test-0", ME, "ready")}
        assert backend.started == ["example.test-0"]
        await manager.shutdown()
    asyncio.run(main())


def test_a_cold_start_waits_for_a_share_that_another_serve_frees(cmdb):
    async def main():
        manager, backend, _, _ = make_claiming(cmdb)
        other_instance(cmdb, "other-1")
        other_instance(cmdb, "other-2")
        waiting = asyncio.ensure_future(manager.acquire("example.test"))
        await asyncio.sleep(CLAIM_RETRY_S * 3)
        assert not waiting.done() and backend.started == []  # at max: not started
        cmdb.remove_instance("other-2")  # the other serve stopped an idle one
        lease = await asyncio.wait_for(waiting, 5)
        assert lease.addr == ("10.0.0.1", 80) and backend.started == ["example.test-0"]
        lease.done(200, 10, 100, False)
        await manager.shutdown()
    asyncio.run(main())


def test_a_cold_start_at_max_across_serves_is_a_503_naming_the_limit_and_writes_nothing(cmdb):
    async def main():
        manager, backend, clock, _ = make_claiming(cmdb, hold_timeout_s=1.0)
        other_instance(cmdb, "other-1")
        other_instance(cmdb, "other-2")
        waiting = asyncio.ensure_future(manager.acquire("example.test"))
        await asyncio.sleep(CLAIM_RETRY_S * 2)
        clock.now += 1.0  # the hold timeout passes while every share stays taken
        with pytest.raises(RouteError) as info:
            await asyncio.wait_for(waiting, 5)
        assert info.value.status == 503 and "max of 2 instances" in info.value.message
        assert "other serves" in info.value.message
        await manager.records.flush()
        assert backend.started == []
        assert sorted(r.id for r in cmdb.list_instances()) == ["other-1", "other-2"]
        assert [e.kind for e in cmdb.list_events("example.test")] == ["start-failed"]
        await manager.shutdown()
    asyncio.run(main())


def test_a_dead_serve_s_instances_stop_counting_once_its_lease_runs_out(cmdb, tmp_path):
    async def main():
        manager, backend, _, _ = make_claiming(cmdb)
        other_instance(cmdb, "other-1")
        other_instance(cmdb, "other-2")
        conn = sqlite3.connect(str(tmp_path / "cmdb.sqlite3"))
        conn.execute("UPDATE nodes SET heartbeat_at = heartbeat_at - 60")  # the other serve died a minute ago
        conn.commit()
        conn.close()
        lease = await asyncio.wait_for(manager.acquire("example.test"), 5)
        lease.done(200, 10, 100, False)
        assert backend.started == ["example.test-0"]
        await manager.shutdown()
    asyncio.run(main())


class DownCMDB:
    """The shared CMDB while its server is down: claims cannot be answered."""

    def __init__(self, cmdb):
        self._cmdb = cmdb

    def claim_instance(self, *args):
        raise CMDBUnavailable("CMDB postgresql://db.test/fcrun: connection refused")

    def __getattr__(self, name):
        return getattr(self._cmdb, name)


def test_a_cold_start_while_the_cmdb_is_down_is_a_503_naming_the_cmdb(cmdb):
    async def main():
        down = DownCMDB(cmdb)
        manager, backend, _, _ = make(down, claims=True, tasks=(tasks := TaskOwner("test")),
                                      records=Recorder(down, tasks, node=ME))
        with pytest.raises(RouteError) as info:
            await manager.acquire("example.test")
        assert info.value.status == 503 and "the CMDB cannot record it" in info.value.message
        assert "postgresql://db.test/fcrun: connection refused" in info.value.message
        assert backend.started == []
        await manager.shutdown()
    asyncio.run(main())


def test_a_scale_out_at_max_across_serves_is_refused_at_once_and_the_instance_serving_stays(cmdb):
    async def main():
        manager, backend, _, _ = make_claiming(cmdb)
        lease = await manager.acquire("example.test")
        lease.done(200, 10, 100, False)
        other_instance(cmdb, "other-1")
        with pytest.raises(ContainerError, match="max of 2 instances"):
            await asyncio.wait_for(manager.scale("example.test", Scale(instances=2)), 5)
        assert backend.started == ["example.test-0"] and len(manager.apps["example.test"].ready()) == 1
        await manager.records.flush()
        assert sorted(r.id for r in cmdb.list_instances()) == ["example.test-0", "other-1"]
        await manager.shutdown()
    asyncio.run(main())
