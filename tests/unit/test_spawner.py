"""The spawner's messages, the re-check of requests, report framing and the start policy.

No root needed: nothing here forks a container. tests/root/test_spawner_root.py runs the
real thing.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import msgspec
import pytest

from fcrun.runtime.spawner import client as spawner
from fcrun.runtime.spawner import protocol
from fcrun import syscalls as sc
from fcrun.errors import ContainerError, SpecError
from fcrun.runtime.spec import default_spec
from fcrun.runtime.plan import build_plan
from fcrun.runtime.child import ChildPlan

CAP_LAST = 40


def _plan(**kw) -> ChildPlan:
    args = dict(rootfs="/run/fcrun/containers/c1/rootfs", overlay_lower=["/l/top"], overlay_upper="/u",
                overlay_work="/w", cgroup_procs=["/sys/fs/cgroup/pids/fcrun/c1/cgroup.procs"],
                cap_last=CAP_LAST, attached=True)
    args.update(kw)
    return build_plan(default_spec(["sh", "-c", "true"]), **args)


def _request(**plan_changes) -> protocol.Spawn:
    return protocol.Spawn(plan=msgspec.structs.replace(_plan(), **plan_changes), new_pid_ns=True, init=True)


def test_a_spawn_request_survives_the_wire():
    request = _request()
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(request), type=protocol.Spawn)
    assert decoded == request
    assert decoded.plan.env == request.plan.env and decoded.plan.mounts == request.plan.mounts


def test_unknown_fields_and_messages_are_refused():
    fields = msgspec.msgpack.decode(msgspec.msgpack.encode(_request()))  # a plain dict
    raw = msgspec.msgpack.encode({**fields, "extra": 1})
    with pytest.raises(msgspec.ValidationError, match="extra"):
        protocol.decode_to_spawner(raw)
    with pytest.raises(msgspec.ValidationError):
        protocol.decode_to_spawner(msgspec.msgpack.encode({"type": "Exec", "pid": 1}))
    assert protocol.decode_to_spawner(msgspec.msgpack.encode(protocol.Claim(pid=7))) == protocol.Claim(pid=7)


def test_check_spawn_accepts_what_build_plan_makes():
    protocol.check_spawn(_request(), nfds=protocol.CHILD_FDS + 1, cap_last=CAP_LAST)
    without_init = msgspec.structs.replace(_request(), init=False)
    protocol.check_spawn(without_init, nfds=protocol.CHILD_FDS, cap_last=CAP_LAST)


@pytest.mark.parametrize("changes, match", [
    (dict(argv=[]), r"argv is empty"),
    (dict(argv=[b"sh\0x"]), r"NUL.*\$\.plan\.argv"),
    (dict(env={b"A=B": b"c"}), r"\$\.plan\.env"),
    (dict(rootfs=b"relative/rootfs"), r"not an absolute path.*\$\.plan\.rootfs"),
    (dict(cwd=b"/a/../../etc"), r"'\.\.'.*\$\.plan\.cwd"),
    (dict(unshare_flags=sc.CLONE_NEWNS | sc.CLONE_NEWUSER), r"unshare flags"),
    (dict(new_netns=False), r"new_netns disagrees"),
    (dict(propagation=0), r"propagation"),
    (dict(pdeathsig=999), r"no such signal"),
    (dict(uid=-1), r"\$\.plan\.uid"),
    (dict(groups=[1 << 32]), r"\$\.plan\.groups"),
    (dict(cap_last=39), r"cap_last 39"),
    (dict(cap_effective=1 << 41), r"\$\.plan\.cap_effective"),
    (dict(cap_ambient=[41]), r"\$\.plan\.cap_ambient"),
    (dict(devices=[(b"../null", 0o20666, 1, 3)]), r"device name"),
    (dict(devices=[(b"sda", 0o60660, 8, 0)]), r"character devices"),
    (dict(cgroup_procs=[b"/etc/passwd"]), r"not a cgroup\.procs or tasks file"),
    (dict(masked_paths=[b"proc/kcore"]), r"\$\.plan\.masked_paths\[0\]"),
    (dict(status_w=5), r"fd fields must be unset"),
    (dict(stdio=(0, 1, 2)), r"fd fields must be unset"),
    (dict(join_pid_ns=b"proc/1/ns/pid"), r"not an absolute path.*\$\.plan\.join_pid_ns"),
    (dict(join_pid_ns=b"/proc/1/ns/pid"), r"a new pid namespace and one to join"),  # the request asks for a new one
    (dict(join_namespaces=[(b"/proc/1/ns/pid", sc.CLONE_NEWPID)]), r"cannot be joined"),  # only around the fork
])
def test_check_spawn_refuses(changes, match):
    with pytest.raises(SpecError, match=match):
        protocol.check_spawn(_request(**changes), nfds=protocol.CHILD_FDS + 1, cap_last=CAP_LAST)


def test_check_spawn_counts_the_fds():
    with pytest.raises(SpecError, match="5 fds came with the request, 6 expected"):
        protocol.check_spawn(_request(), nfds=protocol.CHILD_FDS, cap_last=CAP_LAST)


def test_which_requests_a_warm_child_fits():
    assert protocol.fits_warm_child(_request())
    assert not protocol.fits_warm_child(msgspec.structs.replace(_request(), new_pid_ns=False))
    host_net = build_plan(default_spec(["sh"], network="host"), rootfs="/r", overlay_lower=None,
                          cgroup_procs=[], cap_last=CAP_LAST, attached=True)
    assert not protocol.fits_warm_child(protocol.Spawn(plan=host_net))


def test_received_fds_take_their_places_in_the_plan():
    plan = protocol.plan_with_fds(_request(), [10, 11, 12, 13, 14, 15])
    assert (plan.status_w, plan.go_r, plan.stdio, plan.init_fd, plan.keep_fds) == (10, 11, (12, 13, 14), 15, [15])
    plan = protocol.plan_with_fds(msgspec.structs.replace(_request(), init=False), [10, 11, 12, 13, 14])
    assert plan.init_fd == -1 and plan.keep_fds == []


def test_reports_are_framed_and_eof_means_the_spawner_is_gone():
    r, w = os.pipe()
    try:
        os.write(w, protocol.encode_report(protocol.Spawned(pid=42)))
        os.write(w, protocol.encode_report(protocol.Exited(pid=42, wait_status=3 << 8)))
        assert protocol.read_report(r, 1.0) == protocol.Spawned(pid=42)
        assert protocol.read_report(r) == protocol.Exited(pid=42, wait_status=768)
        os.write(w, protocol.encode_report(protocol.Refused(message="no", errno=22))[:5])
        os.close(w)
        w = -1
        with pytest.raises(ContainerError, match="middle of a message"):
            protocol.read_report(r)
        assert protocol.read_report(r) is None
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_silent_spawner_times_out():
    r, w = os.pipe()
    try:
        with pytest.raises(ContainerError, match="did not answer"):
            protocol.read_report(r, 0.01)
    finally:
        os.close(r)
        os.close(w)


def test_await_spawned_turns_refusals_into_errors():
    r, w = os.pipe()
    try:
        os.write(w, protocol.encode_report(protocol.Refused(message="spawner refused the request: bad", errno=22)))
        with pytest.raises(ContainerError, match=r"bad \[Errno 22\]"):
            spawner.await_spawned(r, 1.0)
        os.close(w)
        w = -1
        with pytest.raises(ContainerError, match="died"):
            spawner.await_spawned(r, 1.0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_received_fds_are_close_on_exec():
    # socket.recv_fds of CPython 3.11 ignores MSG_CMSG_CLOEXEC: a status pipe received without
    # close-on-exec would survive the exec and hide it from the library.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        os.set_inheritable(w, True)
        socket.send_fds(a, [b"x"], [w])
        data, fds, flags = protocol.recv_with_fds(b, bytearray(64))
        assert data == b"x" and len(fds) == 1 and not flags & socket.MSG_CTRUNC
        assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.close(fds[0])
        with pytest.raises(BlockingIOError):
            protocol.recv_with_fds(b, bytearray(64), nowait=True)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


class FakeClient:
    started = 0

    def __init__(self, ready=True):
        self.pid = 12345
        self._ready = ready
        self.closed = False
        self.forgotten = False

    @classmethod
    def start(cls, warm_children=spawner.WARM_CHILDREN):
        cls.started += 1
        return cls()

    def ready(self, timeout_s=0.0):
        if self._ready is None:
            raise spawner.SpawnerGone("gone")
        return self._ready

    def close(self):
        self.closed = True

    def forget(self):
        self.forgotten = True


@pytest.fixture
def policy(monkeypatch):
    monkeypatch.setattr(FakeClient, "started", 0)
    return spawner.SharedSpawner(client_class=FakeClient)


def test_auto_mode_forks_the_first_container_itself_then_uses_a_spawner(policy):
    assert policy.for_create(None) is None  # a one-shot `fcrun run` never pays for a spawner
    assert FakeClient.started == 0
    client = policy.for_create(None)  # the second creation starts one
    assert isinstance(client, FakeClient) and FakeClient.started == 1
    assert policy.for_create(None) is client and policy.current is client
    assert policy.for_create(False) is None


def test_auto_mode_does_not_wait_for_a_spawner_that_is_not_ready(policy, monkeypatch):
    monkeypatch.setattr(FakeClient, "start", classmethod(lambda cls, n=2: FakeClient(ready=False)))
    policy.for_create(None)
    assert policy.for_create(None) is None  # not ready yet: fork directly this time
    assert policy.current is not None


def test_a_spawner_that_dies_at_start_is_given_up_after_a_few_tries(policy, monkeypatch):
    monkeypatch.setattr(FakeClient, "start", classmethod(lambda cls, n=2: FakeClient(ready=None)))
    policy.for_create(None)
    for _ in range(spawner.MAX_START_FAILURES):
        assert policy.for_create(None) is None
    assert policy.start_failures == spawner.MAX_START_FAILURES
    assert policy.for_create(None) is None and policy.current is None
    with pytest.raises(spawner.SpawnerGone):
        policy.for_create(True)  # asked for explicitly: say so


def test_shutdown_closes_the_spawner_and_a_forked_child_forgets_it(policy):
    policy.for_create(None)
    client = policy.for_create(None)
    policy.shutdown()
    assert client.closed and policy.current is None
    forgotten = policy.for_create(True)
    policy.after_fork_in_child()
    assert forgotten.forgotten and not forgotten.closed and policy.current is None


def test_the_library_pid_and_pdeathsig_go_on_the_spawner_command_line(monkeypatch):
    seen = {}

    def fake_spawn(path, argv, env, **kw):
        seen.update(argv=argv, env=env, kw=kw)
        return 999999

    monkeypatch.setattr(os, "posix_spawn", fake_spawn)
    client = spawner.Client.start(warm_children=3)
    try:
        assert client.pid == 999999
        assert seen["argv"][5:8] == [str(os.getpid()), str(int(signal.SIGKILL)), "3"]
        assert seen["env"] == {}
        assert seen["kw"]["setpgroup"] == 0
        assert (os.POSIX_SPAWN_DUP2, seen["kw"]["file_actions"][0][1], protocol.CTRL_FD) == seen["kw"]["file_actions"][0]
    finally:
        client.forget()


def test_make_userns_requests_are_rechecked():
    good = protocol.MakeUserns(uid_map=b"0 2147483648 65536\n", gid_map=b"0 2147483648 65536\n")
    protocol.check_make_userns(good, nfds=1)
    with pytest.raises(SpecError, match="1 expected"):
        protocol.check_make_userns(good, nfds=2)
    for bad in (b"", b"0 1 2", b"0 1\n", b"0 -1 2\n", b"0 1 2 3\n", b"0 1 2\n" * 400):
        with pytest.raises(SpecError, match=r"\$\.uid_map"):
            protocol.check_make_userns(msgspec.structs.replace(good, uid_map=bad), nfds=1)
    assert protocol.decode_to_spawner(protocol.encode(good)) == good


def test_a_reply_datagram_is_one_framed_report():
    report = protocol.Refused(message="write uid_map of pid 7:", obj="", errno=1)
    assert protocol.decode_report(protocol.encode_report(report)) == report
    assert protocol.decode_report(protocol.encode_report(protocol.UsernsMade())) == protocol.UsernsMade()
    with pytest.raises(ContainerError, match="malformed"):
        protocol.decode_report(protocol.encode_report(report)[:-1])


class RecordingSpawner:
    """Stands in for `client.for_create`: records the modes asked for; False means none."""

    def __init__(self):
        self.modes = []

    def for_create(self, mode):
        self.modes.append(mode)
        return None if mode is False else self

    def send(self, plan, new_pid_ns=True):
        return 4242, -1, -1, -1  # a warm child's answer: pid, status_r, go_w, no report pipe yet

    def make_userns(self, uid_map, gid_map):
        return 99


def test_a_threaded_process_never_forks_python_itself(monkeypatch):
    """serve without the fork-server creates containers from worker threads: whatever the
    Runtime's spawner setting, they and their user namespaces come from the spawner."""
    from fcrun.runtime import process

    recording = RecordingSpawner()
    forked = []
    threaded = [False]
    monkeypatch.setattr(spawner, "for_create", recording.for_create)
    monkeypatch.setattr(process, "process_is_threaded", lambda: threaded[0])
    monkeypatch.setattr(process, "fork_child", lambda plan, new_pid_ns: forked.append(plan) or (1, -1, -1))
    monkeypatch.setattr(process, "new_userns", lambda uid_map, gid_map: forked.append(uid_map) or 98)
    plan = _plan()
    assert process.start_child(plan, False).pid == 1 and forked == [plan]  # single-threaded: as asked
    assert process.make_userns(b"0 1 1\n", b"0 1 1\n") == 98
    threaded[0] = True
    for mode in (False, None, True):
        assert process.start_child(plan, mode).pid == 4242
    assert process.make_userns(b"0 1 1\n", b"0 1 1\n") == 99
    assert recording.modes == [False, True, True, True, True]
    assert len(forked) == 2  # nothing forked here once threaded


def test_threads_are_counted_from_the_kernel():
    from fcrun.runtime import process

    fresh = subprocess.run([sys.executable, "-c", "from fcrun.runtime.process import process_is_threaded as t; print(t())"],
                           capture_output=True, text=True, check=True)
    assert fresh.stdout == "False\n", fresh.stderr
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert process.process_is_threaded()
    finally:
        stop.set()
        thread.join()


def test_library_gone_tells_a_spawner_whose_library_died_from_a_live_one_and_from_other_processes():
    """gc's orphan check (lifecycle.orphaned_created): a spawner names its library in its argv;
    one whose parent is no longer that library has lost it (and is about to follow it)."""
    from fcrun.runtime.spawner.client import BOOT, library_gone

    sleeper = "import time; time.sleep(30)"
    procs = {
        "live": subprocess.Popen([sys.executable, "-c", sleeper, BOOT, str(os.getpid())]),
        "orphaned": subprocess.Popen([sys.executable, "-c", sleeper, BOOT, "1"]),  # its library is not its parent
        "not a spawner": subprocess.Popen([sys.executable, "-c", sleeper]),
    }
    try:
        # Popen returns once exec has begun; the kernel sets the new argv a moment later.
        for p in procs.values():
            for _ in range(1000):  # 10 s at most: a broken build must not hang the suite
                with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                    if f.read().startswith(sys.executable.encode()):
                        break
                time.sleep(0.01)
        assert {k: library_gone(p.pid) for k, p in procs.items()} == {
            "live": False, "orphaned": True, "not a spawner": False}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    assert library_gone(procs["orphaned"].pid) is False  # gone altogether: not a spawner any more


def test_a_zombie_or_a_gone_process_is_exiting_and_a_live_one_is_not():
    """gc's orphan check also counts a creator that is dying (lifecycle.exiting): a zombie, or
    one whose memory the kernel already took, has children that are orphans a moment later."""
    from fcrun.runtime.lifecycle import exiting

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    zombie = subprocess.Popen(["true"])
    try:
        for _ in range(1000):  # 10 s at most
            with open(f"/proc/{zombie.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.01)
        assert (exiting(os.getpid()), exiting(live.pid), exiting(zombie.pid)) == (False, False, True)
    finally:
        live.kill()
        live.wait()
        zombie.wait()
    assert exiting(zombie.pid) is True  # reaped: gone altogether
