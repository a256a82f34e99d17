"""fcrun serve in a cgroup systemd delegated on a pure v2 host (cgroups/delegation.py): it
moves into a supervisor leaf and builds its groups beside it, enabling the controllers in the
delegated cgroup itself; anywhere else it moves nothing and writes nothing above its groups.
Against test_cgroups.py's fake trees; the real kernel (the move, the layout) is tested in
tests/root/test_cgroups_root.py on this host's cgroup2 mount."""

from __future__ import annotations

import errno
import os

import pytest
from test_cgroups import OWN_V2, raises, read_file, set_procs, v1_host, v2_host

from fcrun.cgroups import Limits, enter_supervisor
from fcrun.errors import KernelError, MissingFeature

SERVE_PID = 4242
SUPERVISOR = f"{OWN_V2}/supervisor"


def unit_host(tmp_path, *, mark: str = "trusted.delegate", procs=(SERVE_PID,)):
    """systemd's layout for fcrun.service with Delegate=yes: the controllers reach the unit's
    cgroup (cgroup.controllers) but none is enabled beneath it, and serve runs in it."""
    host = v2_host(tmp_path, own_subtree="")
    if mark:
        host.kernel.xattrs[(host.kernel.rel(host.path(OWN_V2)), mark)] = b"1"
    set_procs(host.path(OWN_V2), list(procs))
    return host


def enter(host, **kw):
    return enter_supervisor(root=host.root, mountinfo=host.mountinfo, proc_cgroup=host.proc_cgroup,
                            pid=SERVE_PID, io=host.kernel, **kw)


def now_in(host, cgroup: str) -> None:
    """What the kernel does on the move: /proc/self/cgroup and the procs files follow."""
    with open(host.proc_cgroup, "w") as f:
        f.write(f"0::/{cgroup}\n")
    set_procs(host.path(OWN_V2), [])
    set_procs(host.path(cgroup), [SERVE_PID])


def test_serve_moves_into_a_supervisor_leaf_and_its_groups_go_beside_it(tmp_path):
    host = unit_host(tmp_path)
    with raises(MissingFeature, r"cpu memory pids delegated to .*fcrun.service/cgroup.subtree_control"):
        host.detect()  # the problem: nothing is handed down while serve is in the unit's cgroup
    assert enter(host) == host.path(SUPERVISOR)
    assert host.writes() == [(f"{SUPERVISOR}/cgroup.procs", str(SERVE_PID))]
    now_in(host, SUPERVISOR)
    host.kernel.writes.clear()

    driver = host.detect()
    assert driver.paths_for("web-1") == {"unified": host.path(OWN_V2, "fcrun/web-1")}
    driver.create("web-1", Limits(cpu_quota_us=30_000, pids_max=50))
    assert host.writes() == [
        (f"{OWN_V2}/cgroup.subtree_control", "+cpu +memory +pids"),  # the delegated cgroup, now an inner node
        (f"{OWN_V2}/fcrun/cgroup.subtree_control", "+cpu +memory +pids"),
        (f"{OWN_V2}/fcrun/web-1/cpu.max", "30000 100000"),
        (f"{OWN_V2}/fcrun/web-1/pids.max", "50"),
    ]
    host.kernel.writes.clear()
    driver.create("web-2", Limits())
    assert host.kernel.writes == []  # enabled once; each create only reads
    # The fork-server, started by serve, is in the supervisor too: the same layout for it.
    assert host.detect().paths_for("w") == {"unified": host.path(OWN_V2, "fcrun/w")}
    assert enter(host) is None  # already there: a second call moves nothing


def test_a_user_manager_s_delegation_counts_too(tmp_path):
    host = unit_host(tmp_path, mark="user.delegate")
    assert enter(host) == host.path(SUPERVISOR)


def test_a_cgroup_not_marked_delegated_or_shared_or_on_hybrid_is_left_alone(tmp_path):
    for sub in "abc":
        (tmp_path / sub).mkdir()
    for name, host in (("not delegated", unit_host(tmp_path / "a", mark="")),
                       ("shared", unit_host(tmp_path / "b", procs=(SERVE_PID, 77)))):
        assert enter(host) is None, name
        assert host.kernel.mkdirs == [] and host.kernel.writes == [], name
    hybrid = v1_host(tmp_path / "c")
    assert enter(hybrid) is None and hybrid.kernel.writes == []


def test_a_leaf_named_supervisor_in_a_cgroup_not_delegated_is_an_ordinary_own_cgroup(tmp_path):
    host = unit_host(tmp_path, mark="")
    os.mkdir(host.path(SUPERVISOR))
    host.kernel.populate(host.path(SUPERVISOR))
    now_in(host, SUPERVISOR)
    with raises(MissingFeature, r"delegated to .*supervisor/cgroup.subtree_control"):
        host.detect()


def test_a_failed_move_leaves_no_supervisor_behind(tmp_path):
    host = unit_host(tmp_path)
    host.kernel.fail_once["cgroup.procs"] = errno.EBUSY
    with pytest.raises(KernelError):
        enter(host)
    assert not os.path.exists(host.path(SUPERVISOR))


def test_controllers_the_delegated_cgroup_is_not_offered_are_named(tmp_path):
    host = unit_host(tmp_path)
    enter(host)
    now_in(host, SUPERVISOR)
    with open(host.path(OWN_V2, "cgroup.controllers"), "w") as f:
        f.write("memory\n")  # e.g. Delegate=memory
    with raises(MissingFeature, r"cpu pids delegated to .*fcrun.service/cgroup.controllers"):
        host.detect()
    assert read_file(host.path(OWN_V2, "cgroup.subtree_control")).split() == []
