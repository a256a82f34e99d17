"""The serve manager's request flow and lifecycle, with a fake backend and a fake clock.

No containers and no sleeping: starts complete when the test says so, time moves when the
test moves it.
"""

from __future__ import annotations

import asyncio

import pytest

from fcrun.cmdb.models import App
from fcrun.cmdb.sqlite import SqliteCMDB
from fcrun.proxy.router import RouteError
from fcrun.serve.backend import Existing, StartFailed, Started
from fcrun.serve.manager import Manager


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeBackend:
    """Starts 'instances' on demand; each start waits for the test to release it (gate)."""

    def __init__(self):
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.gate: asyncio.Event | None = None
        self.fail_with: str | None = None
        self.existing_list: list[Existing] = []
        self.accepting_ips: set[str] = set()
        self.cpu = {}

    async def start(self, app, deadline):
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with:
            raise StartFailed(self.fail_with)
        name = f"{app.name}-{len(self.started)}"
        self.started.append(name)
        return Started(name=name, ip=f"10.0.0.{len(self.started)}", port=80)

    async def stop(self, name, app):
        self.stopped.append(name)
        return self.cpu.get(name, 0.5)

    def cpu_seconds(self, name):
        return self.cpu.get(name, 0.25)

    async def existing(self):
        return list(self.existing_list)

    async def accepting(self, ip, port):
        return ip in self.accepting_ips

    def close(self):
        pass


@pytest.fixture
def cmdb(tmp_path):
    db = SqliteCMDB(str(tmp_path / "cmdb.sqlite3"))
    db.add_app(App(name="example.test", image="apache-php", hostnames=["www.example.test"], idle_timeout_s=60,
                   max_body_bytes=1000))
    yield db
    db.close()


def make(cmdb, **kw):
    clock = Clock()
    backend = FakeBackend()
    gone = []
    manager = Manager(cmdb, backend, clock=clock, on_instance_gone=gone.append, **kw)
    return manager, backend, clock, gone


def run(coro):
    return asyncio.run(coro)


def test_unknown_host_is_404_naming_the_host(cmdb):
    async def main():
        manager, *_ = make(cmdb)
        with pytest.raises(RouteError) as info:
            await manager.acquire("nope.test")
        assert info.value.status == 404 and "nope.test" in info.value.message
        with pytest.raises(RouteError):
            manager.acquire_nowait("nope.test")
    run(main())


def test_concurrent_requests_to_a_cold_app_share_one_start(cmdb):
    async def main():
        manager, backend, clock, _ = make(cmdb)
        assert manager.acquire_nowait("example.test") is None
        backend.gate = asyncio.Event()
        waiting = [asyncio.ensure_future(manager.acquire(h)) for h in ["example.test", "www.example.test"] * 25]
        await asyncio.sleep(0)
        clock.now += 0.25
        backend.gate.set()
        leases = await asyncio.gather(*waiting)
        assert backend.started == ["example.test-0"]
        assert {lease.addr for lease in leases} == {("10.0.0.1", 80)}
        assert all(lease.cold_start == ("start", 250.0) for lease in leases)
        assert leases[0].max_body_bytes == 1000
        for lease in leases:
            lease.done(200, 10, 100, False)
        hot = manager.acquire_nowait("example.test")
        assert hot is not None and hot.cold_start is None
        hot.done(200, 0, 0, False)
        hot.done(500, 0, 0, True)  # a second done() is ignored
        stats = manager.stats()["example.test"]
        assert stats["requests"] == 51 and stats["status"]["2xx"] == 51 and stats["starts"] == 1
        events = [e.kind for e in cmdb.list_events("example.test")]
        assert "start" in events
        assert [i.id for i in cmdb.list_instances("example.test")] == ["example.test-0"]
    run(main())


def test_least_outstanding_instance_is_chosen(cmdb):
    async def main():
        manager, backend, clock, _ = make(cmdb)
        first = await manager.acquire("example.test")
        # a second instance, as scale-out will add
        state = manager.apps["example.test"]
        second = await manager._start_instance(state, deadline=0)
        lease = manager.acquire_nowait("example.test")
        assert lease.instance_id == second.name  # first has one outstanding request
        first.done(200, 0, 0, False)
        lease.done(200, 0, 0, False)
    run(main())


def test_idle_instance_is_stopped_and_the_next_request_starts_again(cmdb):
    async def main():
        manager, backend, clock, gone = make(cmdb)
        lease = await manager.acquire("example.test")
        clock.now += 120
        manager.tick()  # a request in flight: not idle
        await asyncio.sleep(0)
        assert backend.stopped == []
        lease.done(200, 0, 0, False)
        clock.now += 59
        manager.tick()
        await asyncio.sleep(0)
        assert backend.stopped == []
        clock.now += 1
        manager.connection_opened("example.test")
        manager.tick()  # an open client connection keeps the last instance
        await asyncio.sleep(0)
        assert backend.stopped == []
        manager.connection_closed("example.test")
        clock.now += 60
        manager.tick()
        await asyncio.gather(*manager._tasks)
        assert backend.stopped == ["example.test-0"] and gone == ["example.test-0"]
        assert manager.apps["example.test"].instances == {}
        assert cmdb.list_instances() == []
        lease = await manager.acquire("example.test")
        assert lease.cold_start is not None and backend.started[-1] == "example.test-1"
        lease.done(200, 0, 0, False)
        stats = manager.stats()["example.test"]
        assert stats["cpu_seconds"] == 0.75  # 0.5 from the stopped one, 0.25 live
    run(main())


def test_min_instances_are_kept(cmdb):
    from fcrun.cmdb.models import AppUpdate

    cmdb.update_app("example.test", AppUpdate(min_instances=1))

    async def main():
        manager, backend, clock, _ = make(cmdb)
        (await manager.acquire("example.test")).done(200, 0, 0, False)
        clock.now += 1000
        manager.tick()
        await asyncio.sleep(0)
        assert backend.stopped == []
    run(main())


def test_removing_an_app_drains_in_flight_requests_first(cmdb):
    async def main():
        manager, backend, clock, _ = make(cmdb)
        lease = await manager.acquire("example.test")
        removal = asyncio.ensure_future(manager.remove_app("example.test"))
        await asyncio.sleep(0)
        with pytest.raises(RouteError) as info:
            await manager.acquire("example.test")
        assert info.value.status == 404
        assert backend.stopped == []  # still draining
        lease.done(200, 0, 0, False)
        await removal
        assert backend.stopped == ["example.test-0"]
    run(main())


def test_failed_start_is_502_with_the_reason_and_is_retried(cmdb):
    async def main():
        manager, backend, clock, _ = make(cmdb)
        backend.fail_with = "image 'apache-php' not found"
        with pytest.raises(RouteError) as info:
            await manager.acquire("example.test")
        assert info.value.status == 502 and "not found" in info.value.message
        assert [e.kind for e in cmdb.list_events("example.test")] == ["start-failed"]
        backend.fail_with = None
        lease = await manager.acquire("example.test")
        lease.done(200, 0, 0, False)
    run(main())


def test_start_that_never_becomes_ready_is_504(cmdb):
    async def main():
        manager, backend, clock, _ = make(cmdb, hold_timeout_s=0.01)
        backend.gate = asyncio.Event()  # never set
        with pytest.raises(RouteError) as info:
            await manager.acquire("example.test")
        assert info.value.status == 504
        manager.apps["example.test"].starting.cancel()
    run(main())


def test_max_lifetime_replaces_without_a_gap(cmdb):
    from fcrun.cmdb.models import AppUpdate

    cmdb.update_app("example.test", AppUpdate(max_lifetime_s=3600))

    async def main():
        manager, backend, clock, _ = make(cmdb)
        old = await manager.acquire("example.test")
        clock.now += 3600
        backend.gate = asyncio.Event()
        manager.tick()
        await asyncio.sleep(0)
        during = manager.acquire_nowait("example.test")  # the old one still serves meanwhile
        assert during is not None and during.instance_id == "example.test-0"
        backend.gate.set()
        old.done(200, 0, 0, False)
        during.done(200, 0, 0, False)
        await asyncio.gather(*list(manager._tasks))
        assert backend.stopped == ["example.test-0"]
        assert manager.acquire_nowait("example.test").instance_id == "example.test-1"
    run(main())


def test_reconcile_adopts_reachable_instances_and_removes_the_rest(cmdb):
    async def main():
        manager, backend, clock, _ = make(cmdb)
        backend.existing_list = [
            Existing(name="a", app="example.test", ip="10.0.0.9", port=0, running=True, started_at=1.0),
            Existing(name="b", app="example.test", ip="10.0.0.8", port=0, running=True, started_at=1.0),
            Existing(name="c", app="gone.test", ip="10.0.0.7", port=0, running=True, started_at=1.0),
        ]
        backend.accepting_ips = {"10.0.0.9", "10.0.0.7"}
        result = await manager.reconcile()
        assert result == {"adopted": ["a"], "removed": ["b", "c"]}
        assert manager.acquire_nowait("example.test").instance_id == "a"
    run(main())


def test_metrics_are_prometheus_text_through_the_controller(cmdb):
    from fcrun.serve.controller import ManagedController

    async def main():
        manager, backend, clock, _ = make(cmdb)
        lease = await manager.acquire("example.test")
        clock.now += 0.5
        lease.done(404, 0, 0, False)
        text = await ManagedController(cmdb, manager).metrics_text()
        assert "# TYPE fcrun_requests_total counter" in text
        assert 'fcrun_requests_total{app="example.test",class="4xx"} 1' in text
        assert 'fcrun_request_seconds_total{app="example.test"} 0.5' in text
        assert 'fcrun_instances{app="example.test"} 1' in text
    run(main())


def test_controller_removal_drains_then_forgets_the_app(cmdb):
    from fcrun.serve.controller import ManagedController

    async def main():
        manager, backend, clock, _ = make(cmdb)
        controller = ManagedController(cmdb, manager)
        (await manager.acquire("example.test")).done(200, 0, 0, False)
        await controller.remove_app("example.test")
        assert backend.stopped == ["example.test-0"]
        assert cmdb.list_apps() == []
        with pytest.raises(RouteError):
            await manager.acquire("www.example.test")
    run(main())
