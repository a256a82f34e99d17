import fcntl
import re
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


def note_a_blocked_flock(monkeypatch) -> threading.Event:
    """state.py's blocking flocks made to set the returned event when they find the lock taken
    (a non-blocking try that failed), then wait as before: a test forces its interleaving on it."""
    blocked = threading.Event()

    def flock(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                blocked.set()
        fcntl.flock(fd, operation)

    monkeypatch.setattr(state, "fcntl", types.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX,
                                                              LOCK_NB=fcntl.LOCK_NB))
    return blocked


def test_a_name_being_removed_is_reserved_once_its_removal_ends(tmp_path, monkeypatch):
    """Whoever removes a container holds its lock until the directory is gone (the fork-server
    has answered `fcrun run` by then): reserve waits for that instead of failing.

    The interleaving is forced, not hoped for: the remover takes the lock, and removes only
    once reserve's flock has found the lock taken (a non-blocking try that failed), so reserve
    has met the existing directory and is waiting for the removal, as in the race it guards.
    """
    store = StateStore(str(tmp_path))
    store.reserve("again")
    holding = threading.Event()
    reserve_blocked = note_a_blocked_flock(monkeypatch)  # only reserve can meet the lock taken
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


@pytest.mark.parametrize("made_again", [False, True], ids=["removed", "removed-and-made-again"])
def test_a_waiter_for_a_lock_whose_container_is_removed_meanwhile_gets_not_found(tmp_path, monkeypatch, made_again):
    """`rm -f`, gc or a wait blocked on a container's lock wakes once its remover is done:
    the directory it locked is gone, and the name may already be a new creation's, whose lock
    this is not. It must not act as if it held that container: NotFound, as if it had come
    after the removal, and the new container's lock stays its creator's to take.

    The interleaving is forced: the remover removes only once the waiter's flock has found
    the lock taken (a non-blocking try that failed)."""
    store = StateStore(str(tmp_path))
    store.reserve("x")
    waiter_blocked = note_a_blocked_flock(monkeypatch)  # only the waiter can meet the lock taken
    outcome = []

    def waiter():
        try:
            with store.locked("x"):
                outcome.append("held")
        except NotFound:
            outcome.append("NotFound")

    thread = threading.Thread(target=waiter)
    with store.locked("x"):
        thread.start()
        assert waiter_blocked.wait(10), "the waiter never waited for the lock"
        store.remove("x")
        if made_again:
            store.reserve("x")  # a new `fcrun run --name x`
    thread.join(10)
    assert outcome == ["NotFound"]
    if made_again:
        with store.try_locked("x") as held:
            assert held


def test_reserved_but_never_saved_reads_as_creating(tmp_path):
    store = StateStore(str(tmp_path))
    store.reserve("crashed")
    assert store.load("crashed").status == "creating"


@pytest.mark.parametrize("bad", ["", "-x", "a/b", "..", "x" * 129, "a b"])  # 128: engines' 64-hex IDs fit
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


# ----- crash safety and corrupt files ------------------------------------------------------------

def _saved(store: StateStore, name: str = "c", **fields) -> ContainerState:
    store.reserve(name)
    st = ContainerState(name=name, status="running", spec=default_spec(["sh"]), pid=123, **fields)
    with store.locked(name):
        store.save(st)
    return st


def _state_file(store: StateStore, name: str = "c") -> str:
    return os.path.join(store.dir(name), "state.json")


def _file(store: StateStore) -> bytes:
    with open(_state_file(store), "rb") as f:
        return f.read()


def _torn(store: StateStore) -> bytes:
    whole = _file(store)
    return whole[: len(whole) // 2]


CORRUPTIONS = {
    "empty": (lambda store: b"", "empty file"),
    "garbage": (lambda store: b"\x00\xffnot json at all", "malformed"),
    "torn": (_torn, "truncated"),
    "wrong type": (lambda store: _file(store).replace(b'"pid":123', b'"pid":"x"'),
                   r"Expected `int`, got `str` - at `\$.pid`"),
    "unknown status": (lambda store: _file(store).replace(b'"running"', b'"exploded"'), r"at `\$.status`"),
    "another container's": (lambda store: _encoded(ContainerState(name="other", status="running",
                                                                    spec=default_spec(["sh"]))),
                            "it names container 'other'"),
}


def _encoded(st: ContainerState) -> bytes:
    import msgspec

    return msgspec.json.encode(st)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_state_file_is_named_quarantined_and_read_as_lost(tmp_path, caplog, kind):
    store = StateStore(str(tmp_path / "containers"))
    _saved(store)
    _saved(store, "good")
    make, reason = CORRUPTIONS[kind]
    bad = make(store)
    with open(_state_file(store), "wb") as f:
        f.write(bad)
    caplog.set_level("WARNING", logger="fcrun.runtime.state")

    st = store.load("c")

    assert st.status == "creating" and st.name == "c" and st.pid == 0  # what gc and rm -f remove by name
    [record] = caplog.records
    assert f"container state {_state_file(store)} is corrupt" in record.getMessage()
    assert re.search(reason, record.getMessage())
    quarantined = os.listdir(os.path.join(store.root, ".quarantine"))
    assert len(quarantined) == 1 and quarantined[0].startswith("c.state.json.corrupt-")
    assert f"moved to {os.path.join(store.root, '.quarantine', quarantined[0])}" in record.getMessage()
    with open(os.path.join(store.root, ".quarantine", quarantined[0]), "rb") as f:
        assert f.read() == bad  # kept for the operator as it was
    assert store.names() == ["c", "good"]  # the quarantine is no container
    assert store.load("good").status == "running"  # the others are untouched
    caplog.clear()
    assert store.load("c").status == "creating" and caplog.records == []  # reported once
    store.remove("c")
    assert store.names() == ["good"]


def test_a_corrupt_file_whose_lock_is_held_elsewhere_is_reported_and_left_to_the_holder(tmp_path, caplog):
    store = StateStore(str(tmp_path / "containers"))
    _saved(store)
    with open(_state_file(store), "wb") as f:
        f.write(b"{")
    holding, done = threading.Event(), threading.Event()

    def holder():
        with store.locked("c"):
            holding.set()
            done.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert holding.wait(10)
        assert store.load("c").status == "creating"
    finally:
        done.set()
        t.join(10)
    assert "left for whoever holds the lock of container 'c'" in caplog.text
    assert os.path.exists(_state_file(store)) and not os.path.exists(os.path.join(store.root, ".quarantine"))
    with store.locked("c"):  # the holder (gc, rm -f) loads it under the lock: moved then
        assert store.load("c").status == "creating"
    assert not os.path.exists(_state_file(store))


def test_save_leaves_no_temporary_and_a_stale_one_is_removed_with_the_container(tmp_path):
    store = StateStore(str(tmp_path / "containers"))
    _saved(store)
    assert os.listdir(store.dir("c")) == ["state.json"]
    stale = os.path.join(store.dir("c"), ".state.json.x1y2z3.tmp")  # a save killed mid-way
    with open(stale, "wb") as f:
        f.write(b'{"na')
    assert store.load("c").pid == 123
    with store.locked("c"):
        assert store.remove_stale_temps("c") == [stale]
    with open(stale, "wb") as f:
        f.write(b'{"na')
    store.remove("c")
    assert not os.path.exists(store.dir("c"))


def test_a_failed_save_names_the_file_and_keeps_the_old_state(tmp_path, monkeypatch):
    from fcrun import atomicfile
    from fcrun.errors import KernelError

    store = StateStore(str(tmp_path / "containers"))
    _saved(store)

    real_fdopen = atomicfile.os.fdopen

    class Full:  # the temporary's writes fail as on a full disk
        def __init__(self, fd, mode):
            self._f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomicfile.os, "fdopen", Full)
    with store.locked("c"):
        with pytest.raises(KernelError, match=f"write container state {_state_file(store)}: .*No space left on device"):
            store.save(ContainerState(name="c", status="stopped", spec=default_spec(["sh"]), pid=123))
    monkeypatch.undo()
    assert store.load("c").status == "running"
    assert os.listdir(store.dir("c")) == ["state.json"]


def test_a_thread_may_take_a_lock_it_holds_and_others_wait(tmp_path):
    store = StateStore(str(tmp_path / "containers"))
    _saved(store)
    seen = []
    with store.locked("c"):
        with store.locked("c"):  # refresh saving inside a locked operation
            with store.try_locked("c") as held:
                seen.append(held)
        t = threading.Thread(target=lambda: seen.append(store.try_locked("c").__enter__()))
        t.start()
        t.join(10)
    with store.try_locked("c") as held:
        seen.append(held)
    with store.try_locked("gone") as held:
        seen.append(held)
    assert seen == [True, False, True, False]


def test_record_stopped_saves_under_the_lock_only_for_the_same_process(tmp_path):
    store = StateStore(str(tmp_path / "containers"))
    st = _saved(store, pid_start_time=5)
    other_process = ContainerState(name="c", status="running", spec=st.spec, pid=123, pid_start_time=6)
    assert not store.record_stopped(other_process)  # a reused pid: not this container's
    assert store.load("c").status == "running"
    with store.locked("c"):
        store.save(ContainerState(name="c", status="running", spec=st.spec, pid=123, pid_start_time=5,
                                  labels={"set": "meanwhile"}))
    assert store.record_stopped(st)
    saved = store.load("c")
    assert saved.status == "stopped" and saved.labels == {"set": "meanwhile"}  # nothing else lost


def test_record_stopped_leaves_a_container_whose_lock_is_held_to_its_holder(tmp_path):
    store = StateStore(str(tmp_path / "containers"))
    st = _saved(store)
    results = []
    with store.locked("c"):
        t = threading.Thread(target=lambda: results.append(store.record_stopped(st)))
        t.start()
        t.join(10)
    assert results == [False] and store.load("c").status == "running"


def test_leases_on_reads_the_addresses_of_a_bridge(tmp_path):
    from fcrun.runtime.state import NetworkState

    store = StateStore(str(tmp_path / "containers"))
    _saved(store, "a", network=NetworkState(mode="bridge", ip="10.88.0.5", prefixlen=16, bridge="fcrun0"))
    _saved(store, "b", network=NetworkState(mode="bridge", ip="10.89.0.5", prefixlen=16, bridge="other"))
    _saved(store, "n", network=NetworkState(mode="none"))
    _saved(store, "bad", network=NetworkState(mode="bridge", ip="10.88.0.6", prefixlen=16, bridge="fcrun0"))
    with open(_state_file(store, "bad"), "wb") as f:
        f.write(b"garbage")
    store.reserve("creating")
    assert store.leases_on("fcrun0") == {"a": "10.88.0.5"}
