"""The manager's instance states (one table of moves), its CMDB writes (in order, never on the
event loop) and its metering as AppStats."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from fcrun.cmdb.base import CMDBError
from fcrun.cmdb.models import App, AppStats
from fcrun.cmdb.sqlite import SqliteCMDB
from fcrun.errors import IncorrectStatus
from fcrun.serve.instances import ROUTABLE, TRANSITIONS, Instance, InstanceState, least_loaded
from fcrun.serve.records import Recorder
from fcrun.tasks import TaskOwner
from test_manager import make


def instance(name="web-1", state=InstanceState.READY) -> Instance:
    inst = Instance(name=name, app="a.test", ip="10.0.0.2", port=80, started_at=0.0, started_mono=0.0,
                    last_active=0.0)
    inst.state = state  # set up directly: the moves from here are what is tested
    inst.routable = state in ROUTABLE
    return inst


@pytest.mark.parametrize("start", list(InstanceState))
def test_every_move_in_the_table_is_allowed_and_every_other_raises(start):
    for target in InstanceState:
        inst = instance(state=start)
        if target in TRANSITIONS[start]:
            inst.move_to(target)
            assert inst.state is target and inst.routable == (target in ROUTABLE)
        else:
            with pytest.raises(IncorrectStatus, match=f"no move from {start.value} to {target.value}"):
                inst.move_to(target)
            assert inst.state is start


def test_the_table_covers_every_state_and_stopped_is_final():
    assert set(TRANSITIONS) == set(InstanceState)
    assert TRANSITIONS[InstanceState.STOPPED] == frozenset()


def test_draining_an_idle_instance_is_drained_at_once_a_busy_one_at_its_last_request():
    idle = instance()
    idle.move_to(InstanceState.DRAINING)
    assert idle.drained.is_set()
    busy = instance()
    busy.request_started(1.0, 1.0)
    busy.request_started(1.0, 1.0)
    busy.move_to(InstanceState.DRAINING)
    assert not busy.drained.is_set() and least_loaded([busy]) is None  # out of routing
    busy.request_ended(2.0, 1.0)
    assert not busy.drained.is_set()
    assert busy.request_ended(3.0, 1.0) == 2.0
    assert busy.drained.is_set() and busy.latency_s == 3.0 and busy.busy_s == 2 * 1.0 + 1 * 1.0


class ThreadRecordingCMDB(SqliteCMDB):
    """Notes the thread of every write; can fail the event writes."""

    def __init__(self, path):
        super().__init__(path)
        self.writes: list[tuple[str, str]] = []
        self.fail_events = False

    def _note(self, what):
        self.writes.append((what, threading.current_thread().name))

    def add_event(self, app, kind, message, data=None, token=None):
        self._note(f"event {kind}")
        if self.fail_events:
            raise CMDBError(f"database is locked (event {kind})")
        return super().add_event(app, kind, message, data, token)

    def upsert_instance(self, instance):
        self._note(f"row {instance.id} {instance.state}")
        return super().upsert_instance(instance)

    def remove_instance(self, instance_id):
        self._note(f"no row {instance_id}")
        return super().remove_instance(instance_id)


@pytest.fixture
def cmdb(tmp_path):
    db = ThreadRecordingCMDB(str(tmp_path / "cmdb.sqlite3"))
    db.add_app(App(name="example.test", image="apache-php", idle_timeout_s=60))
    yield db
    db.close()


def test_the_managers_cmdb_writes_run_in_order_off_the_event_loop(cmdb):
    async def main():
        manager, backend, clock, _ = make(cmdb)
        (await manager.acquire("example.test")).done(200, 0, 0, False)
        clock.now += 60
        manager.tick()
        await manager.settle()
        return threading.current_thread().name

    loop_thread = run(main())
    assert [what for what, _ in cmdb.writes] == ["row example.test-0 ready", "event start",
                                                 "no row example.test-0", "event stop"]
    assert all(thread != loop_thread for _, thread in cmdb.writes), cmdb.writes
    assert [e.kind for e in cmdb.list_events("example.test")] == ["start", "stop"]


def test_a_failed_write_is_logged_naming_what_was_lost_and_later_ones_go_on(cmdb, caplog):
    async def main():
        recorder = Recorder(cmdb, TaskOwner())
        cmdb.fail_events = True
        recorder.event("example.test", "start", "started")
        await recorder.flush()
        cmdb.fail_events = False
        recorder.event("example.test", "stop", "stopped")
        await recorder.aclose()
        recorder.event("example.test", "late", "after closing")  # dropped, with a log line
        assert recorder.pending == 0

    with caplog.at_level(logging.WARNING, "fcrun.serve"):
        run(main())
    assert [e.kind for e in cmdb.list_events("example.test")] == ["stop"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot record the event start of example.test" in m and "database is locked" in m for m in messages)
    assert any("not recorded (serve is stopping): event late of example.test" in m for m in messages)


def test_stats_are_app_stats_with_live_figures(cmdb):
    async def main():
        manager, backend, clock, _ = make(cmdb)
        lease = await manager.acquire("example.test")
        clock.now += 2
        lease.done(503, 0, 0, True)
        return manager.stats()

    stats = run(main())["example.test"]
    assert isinstance(stats, AppStats)
    assert (stats.requests, stats.failed, stats.status["5xx"], stats.request_seconds) == (1, 1, 1, 2.0)
    assert (stats.instances.ready, stats.instances.total, stats.instance_seconds) == (1, 1, 2.0)
    assert stats.cpu_seconds == 0.25 and stats.cold_paths["start"] == 1


def run(coro):
    return asyncio.run(coro)
