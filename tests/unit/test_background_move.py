"""creation.BackgroundMove: the cgroup move a creation runs on a thread while it sets up the
network and saves the state. What the move raises reaches the creating thread at wait()."""

import threading

import pytest

from fcrun.errors import KernelError
from fcrun.runtime.creation import BackgroundMove


class FakeCgroup:
    """Records which thread moved which pid; can be made to block or to fail."""

    def __init__(self, error: Exception | None = None):
        self.error = error
        self.release = threading.Event()
        self.moved: list[tuple[int, str]] = []

    def add(self, pid: int) -> None:
        self.release.wait(5)
        if self.error is not None:
            raise self.error
        self.moved.append((pid, threading.current_thread().name))


def test_the_move_runs_beside_the_caller_and_wait_returns_once_it_is_done():
    cgroup = FakeCgroup()
    move = BackgroundMove(cgroup, 4242)
    assert cgroup.moved == []  # still blocked in add(): the caller went on meanwhile
    cgroup.release.set()
    move.wait()
    assert cgroup.moved == [(4242, "cgroup-move-4242")]


def test_a_failed_move_is_raised_by_wait_in_the_creating_thread():
    cgroup = FakeCgroup(KernelError("write cgroup.procs: No such process", "/sys/fs/cgroup/x/cgroup.procs", 3))
    cgroup.release.set()
    move = BackgroundMove(cgroup, 7)
    with pytest.raises(KernelError, match="No such process"):
        move.wait()
    move.wait()  # raised once: a second wait (the hooks' then go's) has nothing more to say


def test_a_rollback_waits_for_the_move_without_raising():
    cgroup = FakeCgroup(KernelError("write cgroup.procs: No such process", "/x", 3))
    move = BackgroundMove(cgroup, 8)
    done = threading.Event()

    def rollback():
        move.wait_quietly()
        done.set()

    threading.Thread(target=rollback).start()
    assert not done.wait(0.05)  # the cgroup is not destroyed under a move still in flight
    cgroup.release.set()
    assert done.wait(5)
