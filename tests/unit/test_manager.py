"""The serve manager's request flow and lifecycle, with a fake backend and a fake clock.

No containers and no sleeping: starts complete when the test says so, time moves when the
test moves it.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from fcrun.cgroups import Stats
from fcrun.cmdb.models import App, Scale
from fcrun.errors import KernelError
from fcrun.cmdb.sqlite import SqliteCMDB
from fcrun.proxy.router import RouteError
from fcrun.serve.backend import Existing, StartFailed, Started
from fcrun.serve.instances import InstanceState
from fcrun.serve.manager import Manager
from fakeclock import Clock


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
        self.cgroups: dict[str, Stats] = {}  # what cgroup_stats() reads, set by the test
        self.cpu_set: list[tuple[str, float]] = []
        self.set_cpu_fails = False
        self.frozen: set[str] = set()
        self.thawed: list[str] = []
        self.freeze_gate: asyncio.Event | None = None
        self.thaw_fails = False
        self.path = "start"  # what start() says it did ("pool": claimed from the fork-server's pool)

    async def start(self, app, deadline):
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with:
            raise StartFailed(self.fail_with)
        name = f"{app.name}-{len(self.started)}"
        self.started.append(name)
        return Started(name=name, ip=f"10.0.0.{len(self.started)}", port=80, path=self.path)

    async def freeze(self, name):
        if self.freeze_gate is not None:
            await self.freeze_gate.wait()
        self.frozen.add(name)

    def thaw(self, name):
        if self.thaw_fails:
            raise KernelError("write", f"/sys/fs/cgroup/freezer/{name}/freezer.state", errno.ENOENT)
        self.frozen.discard(name)
        self.thawed.append(name)

    async def stop(self, name, app):
        self.stopped.append(name)
        return self.cpu.get(name, 0.5)

    def cpu_seconds(self, name):
        return self.cpu.get(name, 0.25)

    def cgroup_stats(self, name):
        return self.cgroups.get(name)

    async def set_cpu(self, name, cpu):
        if self.set_cpu_fails:
            raise KernelError("write", f"/sys/fs/cgroup/cpu/{name}/cpu.cfs_quota_us", errno.EINVAL)
        self.cpu_set.append((name, cpu))

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
    clock = Clock(1000.0)
    backend = FakeBackend()
    gone = []
    kw.setdefault("sample_interval_s", 0)  # no background monitor: tests call sample()
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
        assert stats.requests == 51 and stats.status["2xx"] == 51 and stats.starts == 1
        await manager.records.flush()  # written off the event loop
        events = [e.kind for e in cmdb.list_events("example.test")]
        assert "start" in events
        assert [i.id for i in cmdb.list_instances("example.test")] == ["example.test-0"]
    run(main())


def test_least_outstanding_instance_is_chosen(cmdb):
    async def main():
        manager, backend, clock, _ = make(cmdb)
        first = await manager.acquire("example.test")
        await manager.scale("example.test", Scale(instances=2))  # a second instance
        lease = manager.acquire_nowait("example.test")
        assert lease.instance_id == "example.test-1"  # the first has one outstanding request
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
        await manager.settle()
        assert backend.stopped == ["example.test-0"] and gone == ["example.test-0"]
        assert manager.apps["example.test"].instances == {}
        assert cmdb.list_instances() == []
        lease = await manager.acquire("example.test")
        assert lease.cold_start is not None and backend.started[-1] == "example.test-1"
        lease.done(200, 0, 0, False)
        stats = manager.stats()["example.test"]
        assert stats.cpu_seconds == 0.75  # 0.5 from the stopped one, 0.25 live
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
        await manager.records.flush()
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
        await manager.settle()
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


def test_reconcile_removes_only_its_own_rows_and_stamps_its_node_on_new_ones(cmdb):
    """Two serves share one CMDB (PostgreSQL): a serve starting must not delete the other's rows."""
    from fcrun.cmdb.models import Instance as Row
    from fcrun.serve.records import Recorder
    from fcrun.tasks import TaskOwner

    for name, owner in (("mine-gone", "host:/run/a"), ("legacy", ""), ("theirs", "host:/run/b")):
        cmdb.upsert_instance(Row(id=name, app="example.test", container=name, state="ready", owner=owner))

    async def main():
        tasks = TaskOwner("manager")
        manager, backend, clock, _ = make(cmdb, tasks=tasks, records=Recorder(cmdb, tasks, node="host:/run/a"))
        await manager.reconcile()
        await manager.settle()
        assert [(r.id, r.owner) for r in cmdb.list_instances()] == [("theirs", "host:/run/b")]
        (await manager.acquire("example.test")).done(200, 0, 0, False)
        await manager.settle()
        assert {r.id: r.owner for r in cmdb.list_instances()} == {"theirs": "host:/run/b",
                                                                  "example.test-0": "host:/run/a"}
        await manager.shutdown()
    run(main())


def test_reconcile_adopts_a_frozen_instance_frozen_and_the_next_request_thaws_it(cmdb):
    """An idle instance serve froze before it was killed: still the app's, its memory warm."""
    async def main():
        manager, backend, clock, _ = make(cmdb)
        backend.existing_list = [Existing(name="f", app="example.test", ip="10.0.0.6", port=0, running=False,
                                          started_at=1.0, frozen=True)]
        backend.frozen.add("f")
        backend.accepting_ips = set()  # a frozen server is not asked: its kernel would accept, it would not
        assert await manager.reconcile() == {"adopted": ["f"], "removed": []}
        assert manager.acquire_nowait("example.test") is None  # frozen: out of routing
        lease = await manager.acquire("example.test")
        assert lease.instance_id == "f" and lease.cold_start[0] == "thaw" and backend.thawed == ["f"]
        assert backend.started == []  # no new instance
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
        assert 'fcrun_requests_total{app="example.test",code="4xx"} 1' in text
        assert 'fcrun_request_duration_seconds_sum{app="example.test"} 0.5' in text
        assert 'fcrun_request_duration_seconds_bucket{app="example.test",le="0.5"} 1' in text
        assert 'fcrun_request_duration_seconds_bucket{app="example.test",le="0.25"} 0' in text
        assert 'fcrun_request_duration_seconds_count{app="example.test"} 1' in text
        assert 'fcrun_cold_start_duration_seconds_count{app="example.test",path="start"} 1' in text
        assert 'fcrun_instances{app="example.test",state="ready"} 1' in text
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


# ----- self-monitoring and scaling ---------------------------------------------------------------


def scaling_app(cmdb, **kw):
    from fcrun.cmdb.models import AppUpdate

    settings = dict(cpu=0.3, cpu_max=0.6, max_instances=2, cooldown_up_s=1.0, cooldown_down_s=2.0)
    settings.update(kw)
    cmdb.update_app("example.test", AppUpdate(**settings))


class Load:
    """Drives the fake cgroups: each step, every instance uses `share` of its quota and is
    throttled in `throttled` of its periods; the clock moves one sample interval."""

    def __init__(self, manager, backend, clock):
        self.manager, self.backend, self.clock = manager, backend, clock
        self.totals: dict[str, list[int]] = {}

    def step(self, share: float, throttled: float, dt: float = 0.25) -> None:
        self.clock.now += dt
        state = self.manager.apps["example.test"]
        for inst in state.instances.values():
            usage, periods, nr_throttled = self.totals.setdefault(inst.name, [0, 0, 0])
            n = round(dt / 0.1)
            self.totals[inst.name] = [usage + int(share * inst.cpu * dt * 1e6), periods + n,
                                      nr_throttled + round(throttled * n)]
            usage, periods, nr_throttled = self.totals[inst.name]
            self.backend.cgroups[inst.name] = Stats(cpu_usage_us=usage, nr_periods=periods, nr_throttled=nr_throttled,
                                                    throttled_us=0, memory_bytes=50 << 20, pids_current=5,
                                                    frozen=False)
        self.manager.sample()


def test_in_flight_and_latency_are_measured_from_the_leases(cmdb):
    from fcrun.serve.monitor import figures

    async def main():
        manager, backend, clock, _ = make(cmdb)
        first = await manager.acquire("example.test")
        inst = manager.apps["example.test"].instances["example.test-0"]
        manager.sample()
        start = inst.reading
        clock.now += 0.1
        second = manager.acquire_nowait("example.test")  # 0.1 s with one in flight
        clock.now += 0.1
        first.done(200, 0, 0, False)  # 0.1 s with two; it took 0.2 s
        clock.now += 0.05
        manager.sample()  # 0.05 s with one
        f = figures(inst.name, inst.cpu, 0.0, start, inst.reading)
        assert f.inflight == pytest.approx((0.1 + 0.2 + 0.05) / 0.25)
        assert f.requests == 1 and f.latency_ms == pytest.approx(200.0)
        second.done(200, 0, 0, False)
    run(main())


def test_a_throttled_instance_is_scaled_up_live_then_out_then_back(cmdb):
    scaling_app(cmdb)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        leases = [await manager.acquire("example.test") for _ in range(4)]  # 4 in flight throughout
        load = Load(manager, backend, clock)
        load.step(1.0, 0.9)  # first reading
        load.step(1.0, 0.9)  # hot
        load.step(1.0, 0.9)  # hot for a sample interval: act
        await manager.settle()
        assert backend.cpu_set == [("example.test-0", 0.6)]
        assert manager.apps["example.test"].instances["example.test-0"].cpu == 0.6
        assert cmdb.list_instances("example.test")[0].cpu == 0.6
        up = [e for e in cmdb.list_events("example.test") if e.kind == "scale-up"]
        assert len(up) == 1 and "throttled in 100% of periods" in up[0].message and "applied in" in up[0].message
        assert up[0].data["cpu_from"] == 0.3 and up[0].data["cpu_to"] == 0.6 and up[0].data["inflight"] == 4.0

        # At the ceiling and still saturated: after cooldown_up a second instance starts, while
        # requests keep going to the first; it joins the rotation once ready.
        backend.gate = asyncio.Event()
        for _ in range(4):
            load.step(1.0, 0.9)
        assert backend.started == ["example.test-0"]  # cooldown_up (1 s) not over yet
        load.step(1.0, 0.9)
        await manager.records.flush()
        assert [e.kind for e in cmdb.list_events("example.test")][-1] == "scale-out"
        assert manager.apps["example.test"].pending_starts == 1
        during = manager.acquire_nowait("example.test")
        assert during.instance_id == "example.test-0"
        backend.gate.set()
        await manager.settle()
        assert backend.started == ["example.test-0", "example.test-1"]
        fresh = manager.acquire_nowait("example.test")
        assert fresh.instance_id == "example.test-1"  # least outstanding
        for lease in [*leases, during, fresh]:
            lease.done(200, 0, 0, False)

        # The load stops: after cooldown_down of calm one instance drains, then the quota falls.
        for _ in range(9):
            load.step(0.0, 0.0)
        assert backend.stopped == []
        load.step(0.0, 0.0)
        await manager.settle()
        assert backend.stopped == ["example.test-1"]  # the newest
        for _ in range(8):
            load.step(0.0, 0.0)
        await manager.settle()
        assert backend.cpu_set[-1] == ("example.test-0", 0.3)
        kinds = [e.kind for e in cmdb.list_events("example.test")]
        assert kinds.count("scale-in") == 1 and kinds.count("scale-down") == 1
        assert all(e.message and e.data.get("reason") for e in cmdb.list_events("example.test")
                   if e.kind.startswith("scale-"))
    run(main())


def test_autoscale_off_means_no_decisions(cmdb):
    scaling_app(cmdb, autoscale=False)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        lease = await manager.acquire("example.test")
        load = Load(manager, backend, clock)
        for _ in range(40):
            load.step(1.0, 1.0)
        await manager.settle()
        assert backend.cpu_set == [] and backend.started == ["example.test-0"]
        lease.done(200, 0, 0, False)
    run(main())


def test_a_failed_quota_change_is_an_event_and_keeps_the_old_quota(cmdb):
    scaling_app(cmdb)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        leases = [await manager.acquire("example.test") for _ in range(2)]
        backend.set_cpu_fails = True
        load = Load(manager, backend, clock)
        for _ in range(3):
            load.step(1.0, 1.0)
        await manager.settle()
        assert manager.apps["example.test"].instances["example.test-0"].cpu == 0.3
        failed = [e for e in cmdb.list_events("example.test") if e.kind == "scale-failed"]
        assert len(failed) == 1 and "Invalid argument" in failed[0].message
        for lease in leases:
            lease.done(200, 0, 0, False)
    run(main())


def test_forced_scaling_works_with_autoscale_off(cmdb):
    from fcrun.cmdb.models import Scale
    from fcrun.errors import IncorrectStatus

    scaling_app(cmdb, autoscale=False)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        with pytest.raises(IncorrectStatus):
            await manager.scale("example.test", Scale(cpu=0.6))  # nothing runs yet
        assert await manager.scale("example.test", Scale(instances=2)) == Scale(instances=2)
        assert backend.started == ["example.test-0", "example.test-1"]
        assert await manager.scale("example.test", Scale(cpu=0.6)) == Scale(cpu=0.6)
        assert sorted(backend.cpu_set) == [("example.test-0", 0.6), ("example.test-1", 0.6)]
        lease = manager.acquire_nowait("example.test")
        assert await manager.scale("example.test", Scale(instances=1)) == Scale(instances=1)
        assert backend.stopped == ["example.test-1"] or backend.stopped == ["example.test-0"]
        assert lease.instance_id not in backend.stopped  # the busy one stays
        lease.done(200, 0, 0, False)
        await manager.records.flush()
        events = [e for e in cmdb.list_events("example.test") if e.kind.startswith("scale-")]
        assert [e.kind for e in events] == ["scale-out", "scale-up", "scale-up", "scale-in"]
        assert all(e.data["forced"] for e in events) and "fcrun app scale" in events[0].message
        assert await manager.scale("example.test", Scale(instances=0)) == Scale(instances=0)
        assert manager.apps["example.test"].instances == {}
    run(main())


def test_forced_scale_out_that_cannot_start_says_why(cmdb):
    from fcrun.cmdb.models import Scale
    from fcrun.errors import ContainerError

    scaling_app(cmdb)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        backend.fail_with = "image 'apache-php' not found"
        with pytest.raises(ContainerError) as info:
            await manager.scale("example.test", Scale(instances=1))
        assert "not found" in str(info.value)
    run(main())


def test_a_forced_action_restarts_the_cooldown(cmdb):
    from fcrun.cmdb.models import Scale

    scaling_app(cmdb, cooldown_up_s=5.0)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        await manager.scale("example.test", Scale(instances=2))
        leases = [await manager.acquire("example.test") for _ in range(4)]  # two on each
        load = Load(manager, backend, clock)
        for _ in range(12):  # 3 s of saturation: within the cooldown of the forced scale-out
            load.step(1.0, 1.0)
        await manager.settle()
        assert backend.cpu_set == []
        for _ in range(10):
            load.step(1.0, 1.0)
        await manager.settle()
        assert sorted(backend.cpu_set) == [("example.test-0", 0.6), ("example.test-1", 0.6)]
        for lease in leases:
            lease.done(200, 0, 0, False)
    run(main())


def test_controller_scale_checks_the_request_and_forwards_it(cmdb):
    from fcrun.cmdb.models import Scale
    from fcrun.errors import SpecError
    from fcrun.serve.controller import ManagedController

    scaling_app(cmdb)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        controller = ManagedController(cmdb, manager)
        with pytest.raises(SpecError):
            await controller.scale("example.test", Scale(instances=3))  # above max_instances
        with pytest.raises(SpecError):
            await controller.scale("example.test", Scale(cpu=0.9))  # above cpu_max
        assert await controller.scale("example.test", Scale(instances=1)) == Scale(instances=1)
        assert await controller.scale("example.test", Scale(cpu=0.5)) == Scale(cpu=0.5)
        assert backend.cpu_set == [("example.test-0", 0.5)]
        await manager.shutdown()
    run(main())


def test_the_monitor_runs_while_instances_exist(cmdb):
    from fcrun.cmdb.models import Scale

    async def main():
        manager, backend, clock, _ = make(cmdb, sample_interval_s=0.001)
        lease = await manager.acquire("example.test")
        assert manager.monitoring
        await asyncio.sleep(0.01)
        assert manager.apps["example.test"].instances["example.test-0"].reading is not None
        lease.done(200, 0, 0, False)
        await manager.scale("example.test", Scale(instances=0))
        await asyncio.sleep(0.01)
        assert not manager.monitoring  # it ended with the last instance
        lease = await manager.acquire("example.test")
        assert manager.monitoring
        lease.done(200, 0, 0, False)
        await manager.shutdown()
        assert not manager.monitoring
    run(main())


def test_app_scale_command_through_the_admin_api(monkeypatch):
    import os
    import shutil
    import tempfile

    from click.testing import CliRunner

    from fcrun.serve.admin_server import serve_in_thread
    from fcrun.serve.controller import ManagedController
    from fcrun_cli.app import app as app_group
    from fcrun_cli.main import main

    main.add_command(app_group)  # cli/main.py adds it lazily; registering again is harmless
    base = tempfile.mkdtemp(prefix="fc-", dir="/tmp")  # a short path for the admin socket
    monkeypatch.setenv("FCRUN_ROOT", os.path.join(base, "data"))
    monkeypatch.setenv("FCRUN_RUN", os.path.join(base, "run"))
    for name in ("FCRUN_ADMIN_SOCKET", "FCRUN_ADMIN_URL", "FCRUN_ADMIN_TOKEN", "FCRUN_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    cmdb = SqliteCMDB(os.path.join(base, "cmdb.sqlite3"))
    cmdb.add_app(App(name="example.test", image="apache-php", cpu=0.3, cpu_max=0.6, max_instances=2,
                     autoscale=False))
    backend = FakeBackend()
    manager = Manager(cmdb, backend, sample_interval_s=0)
    runner = CliRunner()
    try:
        with serve_in_thread(ManagedController(cmdb, manager), os.path.join(base, "run", "admin.sock")):
            result = runner.invoke(main, ["app", "scale", "example.test", "--instances", "2"])
            assert result.exit_code == 0, result.output
            assert result.output == "example.test: 2 instances\n"
            result = runner.invoke(main, ["app", "scale", "example.test", "--cpu", "0.6"])
            assert result.exit_code == 0, result.output
            assert result.output == "example.test: cpu 0.6 per running instance\n"
            assert sorted(backend.cpu_set) == [("example.test-0", 0.6), ("example.test-1", 0.6)]
            result = runner.invoke(main, ["app", "scale", "example.test", "--cpu", "0.9"])
            assert result.exit_code == 2 and "above the app's cpu_max 0.6" in result.output
            result = runner.invoke(main, ["app", "scale", "example.test"])
            assert result.exit_code == 2 and "exactly one of --instances and --cpu" in result.output
            result = runner.invoke(main, ["app", "show", "example.test"])
            assert result.exit_code == 0 and "CPU" in result.output and " 0.6 " in result.output
        cmdb.close()
        # Without a server, forcing is refused with the reason.
        cmdb = SqliteCMDB(os.path.join(base, "data", "cmdb.sqlite3"))
        cmdb.add_app(App(name="example.test", image="apache-php"))
        cmdb.close()
        result = runner.invoke(main, ["app", "scale", "example.test", "--instances", "1"])
        assert result.exit_code == 5 and "is `fcrun serve` running?" in result.output
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_new_instance_slow_starts_while_others_can_take_the_load(cmdb):
    from fcrun.cmdb.models import Scale

    scaling_app(cmdb, autoscale=False)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        await manager.scale("example.test", Scale(instances=1))
        clock.now += 10
        manager.sample()  # the first instance is past its slow start
        await manager.scale("example.test", Scale(instances=2))
        leases = [manager.acquire_nowait("example.test") for _ in range(20)]
        per = lambda: {n: i.outstanding for n, i in manager.apps["example.test"].instances.items()}  # noqa: E731
        assert per() == {"example.test-0": 16, "example.test-1": 4}  # at most 4 at first
        clock.now += 2.5
        manager.sample()  # 2.5 s old: 4 << 2
        leases += [manager.acquire_nowait("example.test") for _ in range(16)]
        assert per() == {"example.test-0": 20, "example.test-1": 16}
        # A pre-forking server: as many as it has processes besides its first, if that is more.
        backend.cgroups["example.test-1"] = Stats(cpu_usage_us=0, nr_periods=0, nr_throttled=0, throttled_us=0,
                                                  memory_bytes=0, pids_current=31, frozen=False)
        manager.sample()
        leases += [manager.acquire_nowait("example.test") for _ in range(28)]
        assert per() == {"example.test-0": 34, "example.test-1": 30}
        clock.now += 2.5
        manager.sample()  # 5 s old: no limit any more
        leases += [manager.acquire_nowait("example.test") for _ in range(4)]
        assert per() == {"example.test-0": 34, "example.test-1": 34}
        for lease in leases:
            lease.done(200, 0, 0, False)
        # When no other instance can take it, a young one gets every request: the limit steers only.
        await manager.scale("example.test", Scale(instances=0))
        leases = [await manager.acquire("example.test") for _ in range(10)]
        assert per() == {"example.test-2": 10}
        for lease in leases:
            lease.done(200, 0, 0, False)
    run(main())


# ----- the frozen tier ----------------------------------------------------------------------------


def _freezing_app(cmdb, **changes):
    from fcrun.cmdb.models import AppUpdate

    cmdb.update_app("example.test", AppUpdate(freeze_after_s=30, idle_timeout_s=600, **changes))


def test_idle_instance_is_frozen_then_thawed_by_the_next_request(cmdb):
    _freezing_app(cmdb)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        (await manager.acquire("example.test")).done(200, 0, 0, False)
        clock.now += 29
        manager.tick()
        await asyncio.sleep(0)
        assert backend.frozen == set()
        clock.now += 1
        manager.tick()
        await manager.settle()
        inst = manager.apps["example.test"].instances["example.test-0"]
        assert backend.frozen == {"example.test-0"} and inst.state is InstanceState.FROZEN
        assert manager.acquire_nowait("example.test") is None  # not routable while frozen
        clock.now += 5
        lease = await manager.acquire("example.test")
        assert lease.cold_start[0] == "thaw" and lease.instance_id == "example.test-0"
        assert backend.thawed == ["example.test-0"] and backend.started == ["example.test-0"]
        assert inst.state is InstanceState.READY
        lease.done(200, 0, 0, False)
        stats = manager.stats()["example.test"]
        assert stats.cold_paths == {"thaw": 1, "pool": 0, "start": 1} and stats.freezes == 1
    run(main())


def test_a_frozen_instance_idle_for_the_idle_timeout_is_stopped(cmdb):
    _freezing_app(cmdb)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        (await manager.acquire("example.test")).done(200, 0, 0, False)
        clock.now += 30
        manager.tick()
        await manager.settle()
        assert manager.stats()["example.test"].instances.frozen == 1
        clock.now += 570
        manager.tick()
        await manager.settle()
        assert backend.stopped == ["example.test-0"] and manager.apps["example.test"].instances == {}
    run(main())


def test_no_freezing_when_off_or_not_before_the_idle_timeout(cmdb):
    async def main(freeze_after, idle):
        _freezing_app(cmdb)
        from fcrun.cmdb.models import AppUpdate

        cmdb.update_app("example.test", AppUpdate(freeze_after_s=freeze_after, idle_timeout_s=idle))
        manager, backend, clock, _ = make(cmdb)
        (await manager.acquire("example.test")).done(200, 0, 0, False)
        clock.now += idle - 1
        manager.tick()
        await manager.settle()
        assert backend.frozen == set() and backend.stopped == []
    run(main(None, 600))
    run(main(60, 60))  # it would be stopped first


def test_a_request_during_the_freeze_waits_for_it_then_thaws(cmdb):
    _freezing_app(cmdb)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        (await manager.acquire("example.test")).done(200, 0, 0, False)
        backend.freeze_gate = asyncio.Event()
        clock.now += 31
        manager.tick()
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(manager.acquire("example.test"))
        await asyncio.sleep(0)
        assert not waiting.done()
        backend.freeze_gate.set()
        lease = await waiting
        assert lease.cold_start[0] == "thaw" and backend.thawed == ["example.test-0"]
        assert backend.started == ["example.test-0"]  # no second instance
        lease.done(200, 0, 0, False)
    run(main())


def test_a_failed_thaw_starts_a_new_instance_and_stops_the_old(cmdb):
    _freezing_app(cmdb)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        (await manager.acquire("example.test")).done(200, 0, 0, False)
        clock.now += 31
        manager.tick()
        await manager.settle()
        backend.thaw_fails = True
        lease = await manager.acquire("example.test")
        assert lease.cold_start[0] == "start" and lease.instance_id == "example.test-1"
        await manager.settle()
        assert backend.stopped == ["example.test-0"]
        assert any(e.kind == "thaw-failed" for e in cmdb.list_events("example.test"))
        lease.done(200, 0, 0, False)
    run(main())


def test_pool_claims_are_reported_as_such_and_a_503_start_failure_stays_503(cmdb):
    async def main():
        manager, backend, clock, _ = make(cmdb)
        backend.path = "pool"
        lease = await manager.acquire("example.test")
        assert lease.cold_start[0] == "pool"
        lease.done(200, 0, 0, False)
        await manager.records.flush()
        events = [e for e in cmdb.list_events("example.test") if e.kind == "start"]
        assert events[-1].data["path"] == "pool" and "claimed from the pool" in events[-1].message

        manager2, backend2, _, _ = make(cmdb)
        backend2.start = _raise_503
        with pytest.raises(RouteError) as info:
            await manager2.acquire("example.test")
        assert info.value.status == 503 and "retry" in info.value.message
    run(main())


async def _raise_503(app, deadline):
    raise StartFailed("cannot start an instance of example.test now: the fork-server is restarting; retry", 503)
