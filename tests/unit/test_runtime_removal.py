"""Runtime's removals without root's kernel work: gc past a container that cannot be removed
now, and a delete whose container's pid now names another process. (A runtime whose cgroup
driver refuses everything: these containers have no cgroups; tests/root do the real thing.)"""

import errno
import os
import subprocess

import pytest

from fcrun.errors import KernelError
from fcrun.paths import Paths
from fcrun.runtime.lifecycle import Runtime
from fcrun.runtime.spec import default_spec
from fcrun.runtime.state import ContainerState, proc_start_time

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="Runtime.delete and gc check for root first")


class NoCgroups:
    """A cgroup driver whose parent (a missing directory) holds no group, as none of these
    containers has one; anything else asked of it fails."""

    self_join_is_cheap = True
    keys = ("unified",)

    def __init__(self, parent: str):
        self.parent = parent

    def paths_for(self, name: str) -> dict[str, str]:
        return {"unified": os.path.join(self.parent, name)}

    def __getattr__(self, name):
        def refuse(*args, **kwargs):
            raise OSError(f"no cgroups in this test ({name})")
        return refuse


@pytest.fixture
def runtime(tmp_path):
    return Runtime(Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path / "run")),
                   cgroups=NoCgroups(str(tmp_path / "no-cgroups")), spawner=False)


def saved(runtime: Runtime, name: str, **fields) -> ContainerState:
    state = ContainerState(name=name, spec=default_spec(["sh"]), **{"status": "stopped", **fields})
    runtime.states.reserve(name)
    runtime.states.save(state)
    return state


def test_gc_goes_past_a_container_it_cannot_remove_now(runtime, caplog):
    """One leftover whose teardown fails (EBUSY on its upper dir, EIO) is logged and kept,
    with what it holds, for the next gc; the others are removed all the same."""
    for name in ("a-stuck", "b-stopped", "c-stopped"):
        saved(runtime, name)
    remove_storage = runtime.storage.remove

    def remove(name):
        if name == "a-stuck":
            raise KernelError("remove the upper dir of", name, errno.EBUSY)
        remove_storage(name)

    runtime.storage.remove = remove
    removed = runtime.gc()
    assert {"b-stopped", "c-stopped"} <= set(removed) and "a-stuck" not in removed
    assert runtime.states.names() == ["a-stuck"]
    assert "a-stuck" in caplog.text and "Device or resource busy" in caplog.text


def test_delete_leaves_alone_our_child_that_has_the_containers_old_pid(runtime):
    """The container's pid 1 is gone and its pid now names another child of ours (in the
    fork-server: a pooled instance, a Run): delete neither waits for that child nor takes
    its exit status."""
    with subprocess.Popen(["cat"], stdin=subprocess.PIPE) as other:  # lives until its stdin closes
        saved(runtime, "old", status="running", pid=other.pid, pid_start_time=proc_start_time(other.pid) - 1)
        runtime.delete("old", force=True)  # before the fix: blocked here, in waitpid(other.pid, 0)
        assert other.poll() is None  # still ours to wait for, still running
        other.stdin.close()
        assert other.wait(10) == 0  # its own status, not one delete took
    assert runtime.states.names() == []


def test_delete_reaps_the_containers_own_exited_pid_1(runtime):
    """The other side: a pid 1 that is our child and has exited (a zombie) is reaped."""
    with subprocess.Popen(["true"]) as child:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        saved(runtime, "done", status="running", pid=child.pid,
              pid_start_time=proc_start_time(child.pid, exited_too=True))
        runtime.delete("done", force=True)
        with pytest.raises(ChildProcessError):
            os.waitpid(child.pid, os.WNOHANG)
