"""serve's RuntimeBackend without containers: start deadlines on the injected clock (the
manager's), a failed start removes what was made, cgroups through Runtime.cgroup."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from fcrun.cmdb.models import App
from fcrun.errors import NotFound
from fcrun.forkserver import protocol as fsp
from fcrun.serve.backend import RuntimeBackend, StartFailed
from fakeclock import Clock


@dataclass
class FakeRuntime:
    status: str = "running"
    deleted: list[tuple[str, bool]] = field(default_factory=list)
    cgroups: dict[str, object] = field(default_factory=dict)
    images: object = None

    def __post_init__(self):
        image = SimpleNamespace(config=SimpleNamespace(exposed_ports=[80]))
        self.images = SimpleNamespace(get=lambda name: image)

    def state(self, name):
        return SimpleNamespace(name=name, status=self.status, log_path="/nonexistent")

    def delete(self, name, force):
        self.deleted.append((name, force))

    def cgroup(self, name):
        try:
            return self.cgroups[name]
        except KeyError:
            raise NotFound(f"container {name!r} does not exist") from None


class FakeForkServer:
    async def request(self, message):
        assert isinstance(message, fsp.Start)
        return fsp.Made(name=message.name, ip="10.0.0.2", pid=1, path="start", ms=1.0)


def backend_with(runtime: FakeRuntime, clock: Clock) -> RuntimeBackend:
    backend = RuntimeBackend(runtime, forkserver=FakeForkServer(), clock=clock, poll_interval_s=0)

    probes = []

    async def never_accepting(ip, port):
        probes.append((ip, port))
        assert len(probes) < 10, "still probing past the deadline: the backend does not read the injected clock"
        return False

    backend.accepting = never_accepting
    return backend


def test_the_start_deadline_is_read_on_the_injected_clock_and_the_instance_removed():
    runtime, clock = FakeRuntime(), Clock(1e12)
    backend = backend_with(runtime, clock)
    try:
        with pytest.raises(StartFailed, match="did not accept connections on port 80 in time"):
            # Past on the injected clock, far ahead on time.monotonic().
            asyncio.run(backend.start(App(name="a.test", image="apache-php"), deadline=1e12 - 1))
        [(name, force)] = runtime.deleted
        assert name.startswith("a.test-") and force
    finally:
        backend.close()


def test_an_instance_that_exits_during_its_start_fails_it_at_once():
    runtime, clock = FakeRuntime(status="stopped"), Clock(1000.0)
    backend = backend_with(runtime, clock)
    try:
        with pytest.raises(StartFailed, match="exited during start"):
            asyncio.run(backend.start(App(name="a.test", image="apache-php"), deadline=2000.0))
        assert len(runtime.deleted) == 1
    finally:
        backend.close()


def test_thaw_and_stats_go_through_the_runtimes_public_cgroup():
    thawed = []
    cgroup = SimpleNamespace(thaw=lambda: thawed.append(True), stats=lambda: "figures")
    runtime = FakeRuntime(cgroups={"web-1": cgroup})
    backend = RuntimeBackend(runtime)
    try:
        backend.thaw("web-1")
        assert thawed == [True] and backend.cgroup_stats("web-1") == "figures"
        assert backend.cgroup_stats("gone") is None
        with pytest.raises(NotFound):
            backend.thaw("gone")
    finally:
        backend.close()
