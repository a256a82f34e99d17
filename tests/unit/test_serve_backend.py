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


# -- an app's ready path: probed on a real loopback HTTP server --------------------------------


class ScriptedHTTP:
    """Answers each GET with the next status of `statuses` (the last one repeats); records the
    request heads. Stands in for an instance's web server on 127.0.0.1."""

    def __init__(self, statuses: list[int]):
        self.statuses = statuses
        self.requests: list[bytes] = []

    async def handle(self, reader, writer) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            status = self.statuses[min(len(self.requests), len(self.statuses)) - 1]
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()


class LoopbackForkServer:
    """Makes every instance at 127.0.0.1; answers a Claim from its 'pool' when `pooled`."""

    def __init__(self, pooled: bool):
        self.pooled = pooled
        self.requests = []

    async def request(self, message):
        self.requests.append(type(message).__name__)
        if isinstance(message, fsp.Claim):
            if not self.pooled:
                return fsp.Failed(kind="NotFound", message="no pooled instance")
            return fsp.Made(name="pooled-1", ip="127.0.0.1", pid=1, path="pool", ms=0.5)
        return fsp.Made(name=message.name, ip="127.0.0.1", pid=1, path="start", ms=1.0)


def start_with_ready_path(statuses, pooled, deadline_from_now=1000.0):
    """Start an instance of an app with ready path /healthz against a loopback server answering
    `statuses`. Returns (Started or the StartFailed raised, requests seen, runtime, fork-server)."""
    runtime, clock = FakeRuntime(), Clock(1000.0)
    forkserver = LoopbackForkServer(pooled)
    web = ScriptedHTTP(statuses)

    async def scenario():
        server = await asyncio.start_server(web.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        image = SimpleNamespace(config=SimpleNamespace(exposed_ports=[port]))
        runtime.images = SimpleNamespace(get=lambda name: image)
        backend = RuntimeBackend(runtime, forkserver=forkserver, clock=clock, poll_interval_s=0)
        app = App(name="shop.test", image="apache-php", docroot="/srv/shop", ready_path="/healthz")
        assert RuntimeBackend.poolable(app)
        try:
            return await backend.start(app, deadline=clock() + deadline_from_now)
        except StartFailed as exc:
            return exc
        finally:
            backend.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(scenario()), web.requests, runtime, forkserver


@pytest.mark.parametrize("pooled", [False, True])
def test_an_instance_is_started_only_once_its_ready_path_answers_2xx(pooled):
    started, requests, runtime, forkserver = start_with_ready_path([503, 503, 404, 200], pooled)
    assert not isinstance(started, StartFailed), started
    assert started.path == ("pool" if pooled else "start")
    assert len(requests) == 4  # polled until the 200; none after it
    assert all(r.startswith(b"GET /healthz HTTP/1.1\r\nHost: shop.test\r\n") for r in requests)
    assert forkserver.requests == (["Claim"] if pooled else ["Claim", "Start"]) and runtime.deleted == []


@pytest.mark.parametrize("pooled", [False, True])
def test_an_instance_whose_ready_path_never_answers_2xx_is_removed(pooled):
    # The deadline is past on the injected clock: one probe, then the start fails.
    failed, requests, runtime, _ = start_with_ready_path([503], pooled, deadline_from_now=-1)
    assert isinstance(failed, StartFailed)
    assert "did not answer GET /healthz with 2xx or 3xx (last answer 503) in time" in str(failed)
    assert len(requests) == 1
    [(name, force)] = runtime.deleted
    assert force and (name == "pooled-1" if pooled else name.startswith("shop.test-"))


def test_a_redirect_is_ready():
    started, requests, _, _ = start_with_ready_path([302], pooled=False)
    assert not isinstance(started, StartFailed) and len(requests) == 1
