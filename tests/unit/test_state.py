import fcntl
import os
import threading
import types

import pytest

from fcrun.errors import AlreadyExists, IncorrectStatus, NotFound, SpecError
from fcrun.runtime import state
from fcrun.runtime.spec import default_spec
from fcrun.runtime.state import ContainerState, StateStore, check_allowed, pid_alive, proc_start_time


def test_lifecycle_table():
    check_allowed("start", "c", "created")
    check_allowed("freeze", "c", "running")
    check_allowed("thaw", "c", "frozen")
    for op, status in [("start", "running"), ("freeze", "frozen"), ("thaw", "running"), ("exec", "stopped"),
                       ("kill", "stopped"), ("delete", "running")]:
        with pytest.raises(IncorrectStatus, match=f"cannot {op} container 'c': it is {status}"):
            check_allowed(op, "c", status)


def test_every_operation_is_in_the_one_table():
    for op in ("update", "fill_slot", "hand_over"):
        check_allowed(op, "c", "frozen")
        with pytest.raises(IncorrectStatus, match=f"cannot {op.replace('_', ' ')} container 'c': it is stopped"):
            check_allowed(op, "c", "stopped")
    for status in state.ALL_STATUSES:
        check_allowed("label", "c", status)
        check_allowed("force_delete", "c", status)
    with pytest.raises(IncorrectStatus, match=r"it is running \(must be creating/stopped; stop it first, or use rm -f\)"):
        check_allowed("delete", "c", "running")
    assert state.is_allowed("delete", "creating") and not state.is_allowed("delete", "frozen")


def test_frozen_is_never_written_and_old_files_saying_it_read_as_running(tmp_path):
    """Whether a container is frozen is its cgroup's to say (Runtime.refresh reads it): a thaw
    that writes the cgroup directly leaves no state file saying "frozen"."""
    store = StateStore(str(tmp_path / "containers"))
    store.reserve("f")
    frozen = ContainerState(name="f", status="frozen", spec=default_spec(["sh"]), pid=7)
    store.save(frozen)
    assert frozen.status == "frozen"  # the caller's copy is left as it was
    with open(os.path.join(store.dir("f"), "state.json"), "rb") as f:
        raw = f.read()
    assert b'"status":"running"' in raw
    with open(os.path.join(store.dir("f"), "state.json"), "wb") as f:
        f.write(raw.replace(b'"status":"running"', b'"status":"frozen"'))  # an older fcrun's file
    assert store.load("f").status == "running"


def test_store_round_trip_and_names(tmp_path):
    store = StateStore(str(tmp_path / "containers"))
    store.reserve("web-1")
    state = ContainerState(name="web-1", status="running", spec=default_spec(["sh"]), pid=123)
    store.save(state)
    assert store.load("web-1") == state
    assert store.names() == ["web-1"]
    with pytest.raises(AlreadyExists, match="web-1"):
        store.reserve("web-1")
    store.remove("web-1")
    assert store.names() == []
    with pytest.raises(NotFound, match="no such container: 'web-1'"):
        store.load("web-1")


def test_a_name_being_removed_is_reserved_once_its_removal_ends(tmp_path, monkeypatch):
    """Whoever removes a container holds its lock until the directory is gone (the fork-server
    has answered `fcrun run` by then): reserve waits for that instead of failing.

    The interleaving is forced, not hoped for: the remover takes the lock, and removes only
    once reserve's flock has found the lock taken (a non-blocking try that failed), so reserve
    has met the existing directory and is waiting for the removal, as in the race it guards.
    """
    store = StateStore(str(tmp_path))
    store.reserve("again")
    holding, reserve_blocked = threading.Event(), threading.Event()

    def flock(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                reserve_blocked.set()  # only reserve can meet the lock taken: the remover holds it
        fcntl.flock(fd, operation)

    monkeypatch.setattr(state, "fcntl", types.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX))
    removed = []

    def remove_under_the_lock():
        with store.locked("again"):
            holding.set()
            if reserve_blocked.wait(10):
                store.remove("again")
                removed.append(not os.path.exists(store.dir("again")))

    remover = threading.Thread(target=remove_under_the_lock)
    remover.start()
    try:
        assert holding.wait(10), "the remover never took the lock"
        assert store.reserve("again") == store.dir("again")
    finally:
        reserve_blocked.set()  # a failed reserve must not leave the remover waiting
        remover.join(10)
    assert removed == [True], "reserve did not wait on the lock while the name was being removed"
    assert os.path.isdir(store.dir("again"))
    with pytest.raises(AlreadyExists, match="again"):  # a live one: the lock is free, the name is not
        store.reserve("again")


def test_reserved_but_never_saved_reads_as_creating(tmp_path):
    store = StateStore(str(tmp_path))
    store.reserve("crashed")
    assert store.load("crashed").status == "creating"


@pytest.mark.parametrize("bad", ["", "-x", "a/b", "..", "x" * 64, "a b"])
def test_bad_names(tmp_path, bad):
    with pytest.raises(SpecError, match="invalid container name"):
        StateStore(str(tmp_path)).reserve(bad)
    assert os.listdir(tmp_path) == []


def test_pid_alive_detects_reuse():
    me = os.getpid()
    start = proc_start_time(me)
    assert start > 0
    spec = default_spec(["sh"])
    assert pid_alive(ContainerState(name="x", status="running", spec=spec, pid=me, pid_start_time=start))
    assert not pid_alive(ContainerState(name="x", status="running", spec=spec, pid=me, pid_start_time=start + 1))
    assert not pid_alive(ContainerState(name="x", status="running", spec=spec, pid=0))


def test_a_memory_backed_rootfs_is_recorded(tmp_path):
    from fcrun.runtime.state import Rootfs

    store = StateStore(str(tmp_path / "containers"))
    store.reserve("vol")
    rootfs = Rootfs(mountpoint="/run/fcrun/rootfs", lower=["/l"], upper="/run/fcrun/rootfs/upper",
                    work="/run/fcrun/rootfs/work", tmpfs_bytes=64 << 20)
    store.save(ContainerState(name="vol", status="running", spec=default_spec(["sh"]), rootfs=rootfs))
    assert store.load("vol").rootfs.tmpfs_bytes == 64 << 20
    # State written before the field existed reads as a layer on disk.
    assert Rootfs(mountpoint="/m").tmpfs_bytes == 0
