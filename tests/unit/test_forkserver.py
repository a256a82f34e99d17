"""The fork-server's wire format, its checks on every request, and the pool's bookkeeping
(with a fake runtime and clock: no containers, no sleeping)."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess

import pytest

from fcrun.cgroups.limits import Limits
from fcrun.errors import ContainerError, KernelError, NotFound, SpecError
from fcrun.forkserver import protocol as p
from fcrun.forkserver.pool import (DEFAULT_POOL_CPU, DEFAULT_POOL_MEMORY_BYTES, PROBE_RETRY_S, STEADY_POLLS,
                                   WARM_POLL_S, Pool)
from fcrun.forkserver.server import ForkServer, _Run, remove_leftovers
from fcrun.instance import DEFAULT_PIDS_MAX
from fcrun.paths import Paths
from fcrun.units import cpu_to_quota_us
from fakeclock import Clock

LIMITS = p.InstanceLimits(cpu=0.5, memory_bytes=256 << 20)


# ----- wire ---------------------------------------------------------------------------------------


def test_frames_round_trip_and_split_at_any_byte():
    messages = [p.Status(), p.Claim(image="apache-php", labels={"fcrun.app": "a.test"}, limits=LIMITS, docroot="/srv")]
    wire = b"".join(p.frame(m) for m in messages)
    buffer, bodies = bytearray(), []
    for i in range(len(wire)):  # one byte at a time: no message is taken before it is whole
        buffer += wire[i:i + 1]
        bodies += p.split_frames(buffer)
    assert [p.decode_request(b) for b in bodies] == messages and buffer == b""


def test_an_oversized_frame_is_refused_before_it_is_read():
    buffer = bytearray(p.HEADER.pack(p.MAX_MESSAGE_BYTES + 1) + b"x")
    with pytest.raises(SpecError, match="above the limit"):
        p.split_frames(buffer)


@pytest.mark.parametrize("body, match", [
    (b"\xc1", "undecodable"),
    (p.frame(p.Done())[4:], "bad request"),  # a reply is not a request
])
def test_undecodable_or_wrong_messages_are_spec_errors(body, match):
    with pytest.raises(SpecError, match=match):
        p.decode_request(body)


def test_unknown_fields_are_refused():
    import msgspec

    body = msgspec.msgpack.encode({"type": "Status", "extra": 1})
    with pytest.raises(SpecError, match="extra"):
        p.decode_request(body)


@pytest.mark.parametrize("request_, where", [
    (p.Claim(image="../etc", labels={}, limits=LIMITS), "$.image"),
    (p.Claim(image="apache-php", labels={"Bad Key": "x"}, limits=LIMITS), "$.labels"),
    (p.Claim(image="apache-php", labels={}, limits=p.InstanceLimits(cpu=float("nan"), memory_bytes=1 << 30)), "$.limits.cpu"),
    (p.Claim(image="apache-php", labels={}, limits=p.InstanceLimits(cpu=0.0, memory_bytes=1 << 30)), "$.limits.cpu"),
    (p.Claim(image="apache-php", labels={}, limits=p.InstanceLimits(cpu=1000.0, memory_bytes=1 << 30)), "$.limits.cpu"),
    (p.Claim(image="apache-php", labels={}, limits=p.InstanceLimits(cpu=0.5, memory_bytes=1024)), "$.limits.memory_bytes"),
    (p.Claim(image="apache-php", labels={}, limits=LIMITS, docroot="srv/site"), "$.docroot"),
    (p.Claim(image="apache-php", labels={}, limits=LIMITS, docroot="/srv/../etc"), "$.docroot"),
    (p.Claim(image="apache-php", labels={}, limits=LIMITS, docroot="/nonexistent/site"), "$.docroot"),
    (p.Start(image="apache-php", name="-bad", labels={}, limits=LIMITS), "$.name"),
    (p.Start(image="apache-php", name="ok", labels={}, limits=LIMITS, env=["NOEQUALS"]), "$.env[0]"),
    (p.Start(image="apache-php", name="ok", labels={}, limits=p.InstanceLimits(cpu=0.5, memory_bytes=1 << 30, pids_max=1)),
     "$.limits.pids_max"),
    (p.Start(image="apache-php", name="ok", labels={}, limits=LIMITS, seccomp="{not json"), "$.seccomp"),
    (p.SetPool(sizes={"apache-php": p.MAX_POOL_SIZE + 1}), "$.sizes"),
    (p.SetPool(sizes={"apache-php": -1}), "$.sizes"),
])
def test_every_request_is_rechecked(request_, where):
    with pytest.raises(SpecError) as info:
        p.check_request(request_)
    assert info.value.where.startswith(where)


def test_ranges_are_checked_as_a_request_is_decoded_and_named_in_words():
    import msgspec

    body = msgspec.msgpack.encode({"type": "Claim", "image": "apache-php", "labels": {},
                                   "limits": {"cpu": 0.5, "memory_bytes": 1 << 20}})
    with pytest.raises(SpecError) as info:
        p.decode_request(body)
    assert info.value.where == "$.limits.memory_bytes"
    assert str(info.value) == "bad request: memory_bytes must be at least 4194304 (at $.limits.memory_bytes)"
    with pytest.raises(SpecError) as info:
        p.decode_request(msgspec.msgpack.encode({"type": "Signal", "signal": 65}))
    assert info.value.where == "$.signal" and "signal must be at most 64" in str(info.value)


def test_good_requests_pass(tmp_path):
    p.check_request(p.Claim(image="apache-php", labels={"fcrun.app": "a.test"}, limits=LIMITS, docroot=str(tmp_path)))
    p.check_request(p.Start(image="apache-php", name="a-1", labels={}, limits=LIMITS, env=["A=1"]))
    p.check_request(p.SetPool(sizes={"apache-php": 2, "busybox": 0}))


# ----- the server's request handling (no socket) -------------------------------------------------


def test_a_start_wakes_the_move_primer_before_the_instance_is_made():
    runtime = FakeRuntime()
    runtime.move_primer = type("Primer", (), {"prime": lambda self: runtime.calls.append(("prime",))})()
    server = ForkServer(Pool(runtime), listener=None)
    reply = server._handle(p.frame(p.Start(image="apache-php", name="a-1", labels={}, limits=LIMITS))[4:])
    assert isinstance(reply, p.Made)
    assert runtime.calls[:2] == [("prime",), ("run", "a-1", None)]


def test_a_bad_request_gets_failed_and_changes_nothing():
    pool = Pool(FakeRuntime())
    server = ForkServer(pool, listener=None)
    reply = server._handle(p.frame(p.Claim(image="BAD", labels={}, limits=LIMITS))[4:])
    assert isinstance(reply, p.Failed) and reply.kind == "SpecError" and reply.http_status == 400
    assert "$.image" in reply.message
    reply = server._handle(p.frame(p.Start(image="missing", name="m-1", labels={}, limits=LIMITS))[4:])
    assert isinstance(reply, p.Failed) and reply.kind == "NotFound" and "missing" in reply.message
    assert pool.runtime.containers == {}


# ----- the pool -----------------------------------------------------------------------------------


class FakeImage:
    def __init__(self, name):
        self.name = name
        self.layers = []
        self.config = type("Config", (), {"exposed_ports": [80], "docroot": None, "entrypoint": [], "cmd": ["apache2"],
                                          "env": [], "workdir": "", "user": "", "stop_signal": None})()


class FakeCgroup:
    def __init__(self, runtime, name):
        self.runtime, self.name = runtime, name

    def pids(self):
        return list(range(self.runtime.procs.get(self.name, 7)))

    def stats(self):
        return type("Stats", (), {"memory_bytes": 12 << 20})()

    def limits(self):
        c = self.runtime.containers[self.name]
        return Limits(cpu_quota_us=cpu_to_quota_us(c.get("cpu", DEFAULT_POOL_CPU)),
                      memory_bytes=c.get("memory_bytes", DEFAULT_POOL_MEMORY_BYTES),
                      pids_max=c.get("pids_max", DEFAULT_PIDS_MAX))


SOURCE_FD = 1000  # the fd FakeRuntime.opened_slot_source gives for a docroot


class FakeRuntime:
    """Containers as dicts: what Pool calls of Runtime, and a record of it."""

    slots_root = ""  # set per test to its tmp_path (by the no_network fixture)

    def __init__(self, images=("apache-php",)):
        self.image_names = set(images)
        self.containers: dict[str, dict] = {}
        self.calls: list[tuple] = []
        self.procs: dict[str, int] = {}
        self.fail_run = None
        self.fail_hand_over = None
        self.fail_save = None  # hand_over's last step (after answer), as a full run root would
        self.bad_docroot = None  # a docroot opened_slot_source refuses (a docroot rule broken)
        self.images = self
        self.states = self
        self.slots = FakeRuntime.slots_root
        self.warmed: list[tuple[str, int]] = []  # send_warm_up_requests calls: (ip, requests)
        self.move_primer = None  # the fork-server's cgroups.primer.MovePrimer, when it has one

    def get(self, name):
        if name not in self.image_names:
            raise NotFound(f"image {name!r} not found")
        return FakeImage(name)

    def load(self, name):
        return name

    def cgroup(self, name):
        return FakeCgroup(self, name)

    def slot_dir(self, name):
        path = os.path.join(self.slots, name)
        os.makedirs(path, exist_ok=True)
        return path

    def run(self, name, spec, *, image, detach, labels, slot=None, slot_source=None):
        """instance.make_instance's one step: create, fill the slot, start."""
        self.calls.append(("run", name, slot))
        if self.fail_run:
            raise ContainerError(self.fail_run)
        ip = f"10.0.0.{len(self.containers) + 2}"
        self.containers[name] = {"status": "running", "labels": dict(labels), "ip": ip, "slot": slot, "spec": spec}
        if slot_source is not None:
            self.containers[name]["docroot"] = slot_source
        return type("C", (), {"ip": ip, "pid": 1000 + len(self.containers)})()

    def state(self, name):
        c = self.containers[name]
        return type("S", (), {"name": name, "status": c["status"], "log_path": "/nonexistent"})()

    def noted_app(self, name):
        return self.containers[name].get("noted_app")

    def label(self, name, labels):
        self.calls.append(("label", name, dict(labels)))
        self.containers[name]["labels"].update(labels)

    def freeze(self, name):
        self.calls.append(("freeze", name))
        self.containers[name]["status"] = "frozen"

    def thaw(self, name):
        self.calls.append(("thaw", name))
        self.containers[name]["status"] = "running"

    @contextlib.contextmanager
    def opened_slot_source(self, source):
        """Runtime's: a docroot opened and checked (SpecError for `bad_docroot`), a fake fd."""
        self.calls.append(("open_slot_source", source))
        if source is not None and source == self.bad_docroot:
            raise SpecError(f"docroot {source} passes through a symlink", "source")
        yield -1 if source is None else SOURCE_FD

    def hand_over(self, name, *, cpu, memory_bytes, pids_max, slot_source, slot_source_fd=-1, labels, thaw,
                  answer=None):
        self.calls.append(("hand_over", name, cpu, memory_bytes, slot_source))
        if self.fail_hand_over:
            raise ContainerError(self.fail_hand_over)
        c = self.containers[name]
        c["slot_source_fd"] = slot_source_fd
        c["labels"].update(labels)
        c["status"] = "running" if thaw else c["status"]
        c["cpu"], c["memory_bytes"] = cpu, memory_bytes
        if answer is not None:
            answer(c)
        if self.fail_save:
            raise KernelError("write container state", name, 28)
        self.calls.append(("saved", name))

    def delete(self, name, force=False):
        self.calls.append(("delete", name))
        del self.containers[name]

    def list(self):
        # pids_max: the state's (make_instance's default, for the pool's); the kernel's is FakeCgroup's
        return [type("Info", (), {"name": n, "status": c["status"], "labels": c["labels"], "ip": c["ip"], "pid": 1,
                                  "created_at": 0.0, "pids_max": DEFAULT_PIDS_MAX})()
                for n, c in self.containers.items()]


class FakeProbe:
    """A connect to a warming instance, answered as its test says (None: not answered yet)."""

    def __init__(self, ip, port, outcome):
        self.ip, self.port, self.answer, self.closed = ip, port, outcome, False

    def outcome(self):
        return self.answer

    def close(self):
        self.closed = True


class Probes:
    """Pool.connect_probe for tests: makes FakeProbes answering `accepting`, and keeps them."""

    def __init__(self, accepting=True):
        self.accepting = accepting
        self.made: list[FakeProbe] = []

    def __call__(self, ip, port):
        self.made.append(FakeProbe(ip, port, self.accepting))
        return self.made[-1]


def make_pool(**kw):
    clock = Clock(100.0)
    runtime = FakeRuntime()
    pool = Pool(runtime, clock=clock, connect_probe=Probes(), **kw)
    return pool, runtime, clock


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Pool code talks to instances' addresses; here there are none: warm-up requests are
    recorded instead of sent (make_pool's probes answer instead of instances)."""
    import fcrun.forkserver.pool as pool_module

    calls = []
    monkeypatch.setattr(FakeRuntime, "slots_root", str(tmp_path))
    monkeypatch.setattr(pool_module, "send_warm_up_requests", lambda ip, port, n: calls.append((ip, n)))
    return calls


def warm_up(pool, clock, accepting=True, steps=50):
    pool.connect_probe.accepting = accepting
    for _ in range(steps):
        clock.now += max(pool.step(clock.now), 0.01)


def test_the_pool_fills_one_at_a_time_and_freezes_settled_instances():
    pool, runtime, clock = make_pool()
    pool.set_sizes({"apache-php": 2})
    warm_up(pool, clock)
    ready = pool.ready["apache-php"]
    assert len(ready) == 2 and not pool.warming
    assert all(runtime.containers[r.name]["status"] == "frozen" for r in ready)
    assert all(runtime.containers[r.name]["slot"] == "/var/www/html" for r in ready)  # the docroot slot
    assert all(runtime.containers[r.name]["labels"] == {"fcrun.pool": "apache-php"} for r in ready)
    # Never two warming at once: each run is followed by its freeze before the next run.
    kinds = [c[0] for c in runtime.calls]
    assert kinds == ["run", "freeze", "run", "freeze"]
    status = pool.status()["apache-php"]
    assert (status.size, status.ready, status.warming, status.memory_bytes) == (2, 2, 0, [12 << 20] * 2)


def test_an_instance_is_frozen_only_once_its_worker_count_is_steady(no_network):
    pool, runtime, clock = make_pool()
    pool.set_sizes({"apache-php": 1})
    pool.step(clock.now)  # makes one
    (name,) = pool.warming
    runtime.procs[name] = 1
    for count in (2, 4, 6, 7):  # Apache forking its workers
        runtime.procs[name] = count
        clock.now += 0.01
        pool.step(clock.now)
    assert name in pool.warming and no_network == []
    for _ in range(STEADY_POLLS):
        clock.now += 0.01
        pool.step(clock.now)
    assert runtime.containers[name]["status"] == "frozen" and name not in pool.warming
    # Warmed before it was frozen: two requests per process, for a script put in its slot.
    assert no_network == [(runtime.containers[name]["ip"], 14)]
    with open(os.path.join(runtime.slot_dir(name), "fcrun-warmup.php")) as f:
        assert f.read().startswith("<?php")


def test_claim_hands_over_the_oldest_and_refills_only_after_a_quiet_moment():
    pool, runtime, clock = make_pool(refill_idle_s=0.1)
    pool.set_sizes({"apache-php": 2})
    warm_up(pool, clock)
    oldest = pool.ready["apache-php"][0].name
    made = pool.claim(p.Claim(image="apache-php", labels={"fcrun.app": "a.test"}, limits=LIMITS, docroot="/srv/a"))
    assert isinstance(made, p.Made) and made.name == oldest and made.path == "pool"
    assert ("hand_over", oldest, 0.5, 256 << 20, "/srv/a") in runtime.calls
    assert runtime.containers[oldest]["labels"] == {"fcrun.pool": "apache-php", "fcrun.app": "a.test"}
    runs = sum(1 for c in runtime.calls if c[0] == "run")
    clock.now += 0.05
    pool.step(clock.now)
    assert sum(1 for c in runtime.calls if c[0] == "run") == runs  # a request just now: not yet
    clock.now += 0.06
    pool.step(clock.now)
    assert sum(1 for c in runtime.calls if c[0] == "run") == runs + 1
    assert pool.status()["apache-php"].claimed == 1


def test_a_claim_is_answered_before_the_instances_state_is_saved():
    """The fork-server's claim: the Made goes out (answer) once the instance is the app's and
    running, before hand_over saves its state; claim then has nothing left to return."""
    pool, runtime, clock = make_pool()
    pool.set_sizes({"apache-php": 1})
    warm_up(pool, clock)
    (name,) = [r.name for r in pool.ready["apache-php"]]
    answers = []
    claim = p.Claim(image="apache-php", labels={"fcrun.app": "a.test"}, limits=LIMITS, docroot="/srv/a")
    assert pool.claim(claim, answer=lambda made: answers.append((made, list(runtime.calls)))) is None
    [(made, calls_then)] = answers
    assert isinstance(made, p.Made) and made.name == name and made.path == "pool"
    assert calls_then[-1][:2] == ("hand_over", name) and ("saved", name) in runtime.calls
    assert runtime.containers[name]["status"] == "running" and pool.status()["apache-php"].claimed == 1


def test_a_save_that_fails_after_the_answer_keeps_the_instance_the_apps():
    pool, runtime, clock = make_pool()
    pool.set_sizes({"apache-php": 1})
    warm_up(pool, clock)
    (name,) = [r.name for r in pool.ready["apache-php"]]
    runtime.fail_save = True  # ENOSPC
    answers = []
    assert pool.claim(p.Claim(image="apache-php", labels={"fcrun.app": "a.test"}, limits=LIMITS),
                      answer=answers.append) is None
    assert [m.name for m in answers] == [name]
    assert name in runtime.containers  # serving the app: not removed under it
    assert pool.status()["apache-php"].claimed == 1 and pool.status()["apache-php"].failures == 0


def test_claim_of_an_empty_pool_or_a_failed_hand_over_says_empty():
    pool, runtime, clock = make_pool()
    assert isinstance(pool.claim(p.Claim(image="apache-php", labels={}, limits=LIMITS)), p.Empty)
    pool.set_sizes({"apache-php": 1})
    warm_up(pool, clock)
    (name,) = [r.name for r in pool.ready["apache-php"]]
    runtime.fail_hand_over = "memory limit below usage"
    answers = []
    reply = pool.claim(p.Claim(image="apache-php", labels={}, limits=LIMITS), answer=answers.append)
    assert isinstance(reply, p.Empty) and "memory limit below usage" in reply.reason and answers == []
    assert name not in runtime.containers  # discarded, never half-claimed
    assert pool.status()["apache-php"].failures == 1


def test_a_claim_opens_its_docroot_once_and_hands_that_to_the_instance():
    """The docroot is opened (and checked) before an instance is taken, and hand_over mounts
    that fd: no second walk of the docroot on a claim's path."""
    pool, runtime, clock = make_pool()
    pool.set_sizes({"apache-php": 1})
    warm_up(pool, clock)
    (name,) = [r.name for r in pool.ready["apache-php"]]
    runtime.calls.clear()
    made = pool.claim(p.Claim(image="apache-php", labels={"fcrun.app": "a.test"}, limits=LIMITS, docroot="/srv/a"))
    assert isinstance(made, p.Made) and made.name == name
    assert [c[:2] for c in runtime.calls[:2]] == [("open_slot_source", "/srv/a"), ("hand_over", name)]
    assert sum(1 for c in runtime.calls if c[0] == "open_slot_source") == 1
    assert runtime.containers[name]["slot_source_fd"] == SOURCE_FD


def test_a_claim_whose_docroot_breaks_a_rule_takes_no_pooled_instance(tmp_path):
    """A tenant swaps their docroot for a symlink (the request's own check follows it): the
    claim is refused, naming the rule, and the pool, shared by every app of the image, keeps
    its instances, in their order, whatever the number of such requests."""
    import collections

    from fcrun.forkserver.pool import Pooled
    from fcrun.runtime.lifecycle import Runtime

    srv = tmp_path / "srv"
    (srv / "tenant" / "real").mkdir(parents=True)
    (srv / "tenant" / "www").symlink_to(srv / "tenant" / "real")
    runtime = Runtime(Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path / "run")),
                      docroot_roots=[str(srv)], spawner=False)
    deleted = []
    runtime.delete = lambda name, force=False, **kw: deleted.append(name)
    runtime.hand_over = lambda name, **kw: pytest.fail(f"{name} was handed over")
    pool = Pool(runtime, clock=Clock(100.0))
    names = [f"pool-{i}" for i in range(3)]
    pool.ready["apache-php"] = collections.deque(
        Pooled(name=name, image="apache-php", ip="10.0.0.2", port=80, pid=1, made=100.0) for name in names)
    claim = p.Claim(image="apache-php", labels={"fcrun.app": "evil.test"}, limits=LIMITS,
                    docroot=str(srv / "tenant" / "www"))
    p.check_request(claim)  # the fork-server's re-check follows the symlink: it passes
    for _ in range(4):
        reply = pool.claim(claim)
        assert isinstance(reply, p.Failed) and reply.kind == "SpecError" and reply.http_status == 400
        assert "symlink" in reply.message
    assert deleted == [] and [r.name for r in pool.ready["apache-php"]] == names
    assert pool.status()["apache-php"].failures == 0  # the app's fault, not the pool's


def test_failures_back_off_and_are_reported():
    pool, runtime, clock = make_pool()
    runtime.fail_run = "apache2: not found"
    pool.set_sizes({"apache-php": 1})
    pool.step(clock.now)
    status = pool.status()["apache-php"]
    assert status.failures == 1 and "apache2: not found" in status.last_error
    clock.now += 0.5
    pool.step(clock.now)
    assert pool.status()["apache-php"].failures == 1  # backing off (1 s)
    clock.now += 1.0
    pool.step(clock.now)
    assert pool.status()["apache-php"].failures == 2
    pool.set_sizes({"missing": 1})
    clock.now += 10
    pool.step(clock.now)
    assert "not found" in pool.status()["missing"].last_error


def test_a_server_that_never_accepts_is_removed_after_the_warm_timeout():
    pool, runtime, clock = make_pool(warm_timeout_s=1.0)
    pool.set_sizes({"apache-php": 1})
    warm_up(pool, clock, accepting=False, steps=300)
    assert pool.status()["apache-php"].failures >= 1
    assert "not accepting" in pool.status()["apache-php"].last_error
    assert all(c["status"] != "frozen" for c in runtime.containers.values())


def test_readiness_is_probed_without_waiting_and_a_silent_connect_is_started_again():
    pool, runtime, clock = make_pool()
    probes = pool.connect_probe
    probes.accepting = None  # connects that get no answer (a lost SYN)
    pool.set_sizes({"apache-php": 1})
    pool.step(clock.now)  # makes one
    (name,) = pool.warming
    clock.now += WARM_POLL_S
    pool.step(clock.now)
    assert len(probes.made) == 1 and not probes.made[0].closed  # started; its answer read at later polls
    clock.now += WARM_POLL_S
    pool.step(clock.now)
    assert len(probes.made) == 1  # still waiting for that one
    clock.now += PROBE_RETRY_S
    pool.step(clock.now)
    assert len(probes.made) == 2 and probes.made[0].closed  # given up on, and a new one started
    probes.made[-1].answer = False  # refused: closed, and the next poll tries again
    clock.now += WARM_POLL_S
    pool.step(clock.now)
    assert probes.made[1].closed and name in pool.warming
    probes.accepting = True
    warm_up(pool, clock)
    assert name not in pool.warming and runtime.containers[name]["status"] == "frozen"
    assert all(probe.closed for probe in probes.made)
    assert len(probes.made) == 3  # once accepted, only its worker count is polled
    assert all((probe.ip, probe.port) == (runtime.containers[name]["ip"], 80) for probe in probes.made)


def test_stopping_closes_the_probes_of_warming_instances():
    pool, runtime, clock = make_pool()
    pool.connect_probe.accepting = None
    pool.set_sizes({"apache-php": 1})
    for _ in range(3):
        pool.step(clock.now)
        clock.now += WARM_POLL_S
    assert pool.warming and pool.connect_probe.made
    pool.remove_all()
    assert all(probe.closed for probe in pool.connect_probe.made) and not runtime.containers


def test_old_instances_are_recycled_and_shrinking_removes_extras():
    pool, runtime, clock = make_pool(max_age_s=60)
    pool.set_sizes({"apache-php": 2})
    warm_up(pool, clock)
    first = {r.name for r in pool.ready["apache-php"]}
    clock.now += 61
    warm_up(pool, clock)
    assert not first & {r.name for r in pool.ready["apache-php"]} and len(pool.ready["apache-php"]) == 2
    assert pool.status()["apache-php"].recycled == 2
    pool.set_sizes({"apache-php": 1})
    assert len(pool.ready["apache-php"]) == 1 and len(runtime.containers) == 1


def test_adopt_takes_frozen_unclaimed_instances_and_removes_half_made_ones():
    runtime = FakeRuntime()
    runtime.containers = {
        "pool-a": {"status": "frozen", "labels": {"fcrun.pool": "apache-php"}, "ip": "10.0.0.2", "slot": "/x"},
        "pool-b": {"status": "running", "labels": {"fcrun.pool": "apache-php"}, "ip": "10.0.0.3", "slot": "/x"},
        "pool-c": {"status": "running", "labels": {"fcrun.pool": "apache-php", "fcrun.app": "a.test"}, "ip": "10.0.0.4",
                   "slot": "/x"},
        "other": {"status": "running", "labels": {}, "ip": "10.0.0.5", "slot": None},
    }
    pool = Pool(runtime, clock=Clock(100.0))
    adopted, removed = pool.adopt()
    assert adopted == ["pool-a"] and removed == ["pool-b"]
    assert set(runtime.containers) == {"pool-a", "pool-c", "other"}  # claimed and foreign ones untouched
    assert [r.name for r in pool.ready["apache-php"]] == ["pool-a"]
    assert pool.remove_all() == ["pool-a"] and set(runtime.containers) == {"pool-c", "other"}


def test_adopt_removes_a_frozen_instance_whose_claim_crashed_half_way():
    """A kill -9 inside hand_over may leave an app's limits or docroot applied, the instance
    still frozen and its app label unsaved: it must never be pooled (and claimed) again."""
    runtime = FakeRuntime()
    pooled = {"status": "frozen", "ip": "10.0.0.2", "slot": "/x"}
    runtime.containers = {
        "pool-limits": {**pooled, "labels": {"fcrun.pool": "apache-php"}, "cpu": 0.3, "memory_bytes": 32 << 20},
        "pool-docroot": {**pooled, "labels": {"fcrun.pool": "apache-php", "fcrun.slot.source": "/srv/a"}},
        "pool-untouched": {**pooled, "labels": {"fcrun.pool": "apache-php"}},
    }
    adopted, removed = Pool(runtime, clock=Clock(100.0)).adopt()
    assert adopted == ["pool-untouched"] and sorted(removed) == ["pool-docroot", "pool-limits"]
    assert set(runtime.containers) == {"pool-untouched"}


def test_adopt_removes_a_frozen_instance_left_with_an_apps_pids_limit():
    """A claim killed after it set an app's limits where only pids_max differs from the pool's:
    pooled again, that limit would stay on another app's instance (a claim without pids_max,
    or with the one the state records, writes none)."""
    runtime = FakeRuntime()
    runtime.containers = {
        name: {"status": "frozen", "ip": "10.0.0.2", "slot": "/x", "labels": {"fcrun.pool": "apache-php"}}
        for name in ("pool-pids", "pool-untouched")
    }
    runtime.containers["pool-pids"]["pids_max"] = 64  # the pool's cpu and memory: only this tells
    adopted, removed = Pool(runtime, clock=Clock(100.0)).adopt()
    assert adopted == ["pool-untouched"] and removed == ["pool-pids"]


def test_adopt_labels_a_running_instance_whose_claim_was_answered_but_not_saved():
    """A kill -9 between hand_over's answer and its save: limits, docroot, the app's note and
    the thaw are done, serve sends it requests; the next fork-server labels it the app's (serve
    then adopts it) instead of removing it under those requests."""
    runtime = FakeRuntime()
    runtime.containers = {
        "pool-answered": {"status": "running", "labels": {"fcrun.pool": "apache-php"}, "ip": "10.0.0.2", "slot": "/x",
                          "noted_app": "a.test"},
        "pool-warming": {"status": "running", "labels": {"fcrun.pool": "apache-php"}, "ip": "10.0.0.3", "slot": "/x"},
        "pool-noted-frozen": {"status": "frozen", "labels": {"fcrun.pool": "apache-php"}, "ip": "10.0.0.4",
                              "slot": "/x", "noted_app": "a.test", "cpu": 0.3},
    }
    adopted, removed = Pool(runtime, clock=Clock(100.0)).adopt()
    assert adopted == [] and sorted(removed) == ["pool-noted-frozen", "pool-warming"]
    assert runtime.containers["pool-answered"]["labels"] == {"fcrun.pool": "apache-php", "fcrun.app": "a.test"}
    assert set(runtime.containers) == {"pool-answered"}


def test_removing_all_leaves_app_instances_alone():
    pool, runtime, clock = make_pool()
    pool.set_sizes({"apache-php": 2})
    warm_up(pool, clock)
    pool.claim(p.Claim(image="apache-php", labels={"fcrun.app": "a.test"}, limits=LIMITS))
    pool.step(clock.now)  # a refill starts warming
    pool.remove_all()
    assert [c["labels"].get("fcrun.app") for c in runtime.containers.values()] == ["a.test"]
    assert not pool.warming and not any(pool.ready.values())



# ----- the server's poll loop and its Runs (real sockets and processes, a fake runtime) -----------


NO_SUCH_PID = 1 << 23  # above the kernel's largest pid_max: never a process, never our child


class RunRuntime:
    """What the fork-server asks of the runtime of its Runs once they run: their removal
    (recorded; `locked` called as Runtime.delete calls it), and the expiry of logs."""

    def __init__(self, states=None):
        self.states = states
        self.deleted: list[str] = []

    def delete(self, name, force=False, *, locked=None):
        self.deleted.append(name)
        if locked is not None:
            locked()

    def expire_logs(self, now):
        return []


class ExitedContainer:
    def wait(self, *, record=True):
        return 0


@pytest.fixture
def signals_restored():
    """serve() installs its own signal handlers: the test process gets its own back."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def listening_socket() -> socket.socket:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("")  # an abstract address of the kernel's choosing
    listener.listen()
    return listener


@contextlib.contextmanager
def serving_a_run(runtime, container, pid: int, pidfd: int):
    """A ForkServer with one Run, `pid` watched through `pidfd`, attached to a client's
    connection: (server, run, the client's end); the sockets closed on leaving."""
    server = ForkServer(Pool(runtime), listening_socket(), run_runtime=runtime)
    ours, theirs = socket.socketpair()
    server.buffers[ours] = bytearray()
    server.selector.register(ours, selectors.EVENT_READ, "client")
    run = _Run(name="r1", pid=pid, pidfd=pidfd, conn=ours, container=container)
    server.runs[ours] = run
    server.run_pids[pid] = run
    server.selector.register(pidfd, selectors.EVENT_READ, run)
    try:
        yield server, run, theirs
    finally:
        for sock in (server.listener, ours, theirs):
            sock.close()
        if run.pidfd >= 0:
            os.close(run.pidfd)


def serve_one_batch(server: ForkServer) -> None:
    """serve() for the events ready now: the pool's step, which follows the first batch, stops it."""
    def step(now):
        server.running = False
        return 0.0

    server.pool.step = step
    server.serve()


def replies(client: socket.socket) -> list:
    client.settimeout(5)
    buffer = bytearray(client.recv(65536))
    return [p.decode_reply(body) for body in p.split_frames(buffer)]


def test_a_run_whose_client_hangs_up_as_it_exits_is_ended_once(signals_restored):
    """The client hangs up and then the container exits, before the next select: one batch
    holds both events. The hang-up ends the Run and closes its pidfd; the pidfd's event, stale
    by then, must not end it again (closing that fd number twice killed the fork-server with
    EBADF, or closed whatever file had been given the number meanwhile)."""
    runtime = RunRuntime()
    with (subprocess.Popen(["cat"], stdin=subprocess.PIPE) as child,  # it exits when its stdin closes
          serving_a_run(runtime, ExitedContainer(), child.pid, os.pidfd_open(child.pid)) as (server, run, client)):
        client.close()
        child.stdin.close()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: its pidfd reads ready
        serve_one_batch(server)
    assert runtime.deleted == ["r1"] and run.pidfd == -1 and not server.runs


def test_a_signal_for_a_run_goes_to_its_process_never_to_one_that_got_its_pid(signals_restored):
    """The Run's process has exited and been reaped (the spawner reaps at once); its pid is
    another process's now (here: `stand_in`, given the Run's pid). A Signal for the Run must
    reach nobody: it went by pid, and killed the stand-in, as root."""
    runtime = RunRuntime()
    gone = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(gone.pid)
    gone.wait()
    with (subprocess.Popen(["sleep", "30"]) as stand_in,
          serving_a_run(runtime, ExitedContainer(), stand_in.pid, pidfd) as (server, run, client)):
        try:
            assert server._handle(p.frame(p.Signal(signal=9))[4:], run.conn) is None
            with pytest.raises(subprocess.TimeoutExpired):  # SIGKILL by pid ended it at once
                stand_in.wait(timeout=0.5)
        finally:
            stand_in.kill()


def test_an_event_whose_handling_fails_is_logged_and_the_server_goes_on(signals_restored, caplog):
    def accept():
        raise RuntimeError("a bug in accept")

    with listening_socket() as listener, socket.socket(socket.AF_UNIX) as client:
        server = ForkServer(Pool(RunRuntime()), listener)
        server._accept = accept
        client.connect(listener.getsockname())
        serve_one_batch(server)  # does not raise
    assert "handling an event" in caplog.text and "a bug in accept" in caplog.text


def spawners_run(tmp_path, report: bytes):
    """(runtime, container) of a Run the spawner forked: not our child, its wait status told
    on a report pipe, where the spawner wrote `report` and closed it."""
    from fcrun.runtime.container import Container
    from fcrun.runtime.spec import default_spec
    from fcrun.runtime.state import ContainerState, StateStore

    store = StateStore(str(tmp_path / "containers"))
    store.reserve("r1")
    state = ContainerState(name="r1", status="running", spec=default_spec(["true"]), pid=NO_SUCH_PID,
                           pid_start_time=1)
    store.save(state)
    report_r, report_w = os.pipe()
    os.write(report_w, report)
    os.close(report_w)
    runtime = RunRuntime(states=store)
    return runtime, Container(runtime, state, report_r=report_r)


def test_a_run_the_spawner_reaped_gets_its_exit_code_when_the_run_root_is_full(tmp_path, monkeypatch):
    """Its "stopped" is not saved (it is removed next): a save that would fail (ENOSPC) can
    neither keep the client from its exit code nor end the fork-server."""
    import errno

    from fcrun.runtime import state as state_module
    from fcrun.runtime.spawner.protocol import Exited, encode_report

    runtime, container = spawners_run(tmp_path, encode_report(Exited(pid=NO_SUCH_PID, wait_status=7 << 8)))

    def full(path, data, **kw):
        raise KernelError("write container state", path, errno.ENOSPC)

    monkeypatch.setattr(state_module, "write_atomic", full)
    with serving_a_run(runtime, container, NO_SUCH_PID, os.pidfd_open(os.getpid())) as (server, run, client):
        server._collect(run)  # its pidfd read ready; not our child: the spawner's report says how it ended
        assert replies(client) == [p.Exited(code=7)]
    assert runtime.deleted == ["r1"] and not server.runs


def test_a_run_whose_spawner_report_is_garbled_gets_failed_not_a_dead_fork_server(tmp_path):
    runtime, container = spawners_run(tmp_path, p.HEADER.pack(3) + b"\xc1\xc1\xc1")
    with serving_a_run(runtime, container, NO_SUCH_PID, os.pidfd_open(os.getpid())) as (server, run, client):
        server._collect(run)
        [reply] = replies(client)
    assert isinstance(reply, p.Failed) and reply.exit_code == 125 and "malformed report" in reply.message
    assert runtime.deleted == ["r1"] and not server.runs


def test_a_gc_that_fails_at_start_up_is_a_warning_not_a_fork_server_that_never_starts(caplog):
    import errno

    class StuckRuntime:
        def gc(self):
            raise KernelError("remove", "/var/lib/fcrun/storage/web-1", errno.EBUSY)

    remove_leftovers(StuckRuntime())
    assert "Device or resource busy" in caplog.text


# ----- serve's side: the asyncio client and the supervisor ----------------------------------------


def test_a_stuck_forkserver_is_killed_and_its_requests_fail_clearly():
    import asyncio
    import socket

    from fcrun.forkserver.client import AsyncClient, ForkServerGone, Supervisor

    class FakeProcess:
        pid, returncode = 4242, None

        def __init__(self):
            self.signals = []

        def send_signal(self, sig):
            self.signals.append(sig)

    async def main():
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        sup = Supervisor("/nonexistent.sock", [])
        sup.client, sup.process = AsyncClient(reader, writer), FakeProcess()
        sup._up.set()
        with pytest.raises(ForkServerGone, match="did not answer within 0.05s"):
            await sup.request(p.Status(), timeout_s=0.05)  # `theirs` reads nothing, answers nothing
        assert sup.process.signals == [9] and sup.client.broken
        with pytest.raises(ForkServerGone, match="restarting"):
            await sup.request(p.Status())  # until a new one is up
        sup.client.close()
        theirs.close()

        # A fork-server that dies mid-request: the request fails, it does not hang.
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        client = AsyncClient(reader, writer)
        asyncio.get_running_loop().call_later(0.02, theirs.close)
        with pytest.raises(ForkServerGone, match="went away"):
            await client.request(p.Status())
        client.close()

    asyncio.run(main())
