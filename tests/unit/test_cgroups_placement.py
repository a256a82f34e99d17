"""Where a container's cgroup goes (linux.cgroupsPath) and the controllers it joins only when its
spec needs them (v1 cpuset, blkio...; v2 cpuset, io...), against test_cgroups.py's fake trees.
The real kernel is tested in tests/root/test_cgroups_root.py and test_spec_root.py."""

from __future__ import annotations

import os

import pytest
from test_cgroups import OWN_MEMORY, OWN_V2, read_file, raises, set_procs, v1_host, v2_host

from fcrun.cgroups import Limits
from fcrun.errors import AlreadyExists, MissingFeature, SpecError

V1_KEYS = ("cpu", "cpuacct", "memory", "pids", "freezer", "devices")


def with_cpuset(host):
    """Give the fake cpuset hierarchy the files a real one has: empty in a new group."""
    host.kernel.templates[host.path("cpuset")] = {"cpuset.cpus": "", "cpuset.mems": ""}
    with open(host.path("cpuset", "cpuset.cpus"), "w") as f:
        f.write("0-1\n")
    with open(host.path("cpuset", "cpuset.mems"), "w") as f:
        f.write("0\n")
    return host


def test_v1_absolute_path_is_beneath_each_hierarchy_root_and_all_it_made_goes(tmp_path):
    host = v1_host(tmp_path)
    driver = host.detect("fcrun")
    cg = driver.create("ignored", Limits(pids_max=10), at="/cgrouptest/c1")
    assert cg.paths["memory"] == host.path("memory/cgrouptest/c1")  # the root, not fcrun's own memory cgroup
    assert cg.paths["pids"] == host.path("pids/cgrouptest/c1")
    assert read_file(host.path("pids/cgrouptest/c1/pids.max")) == "10"
    assert sorted(host.fcrun_dirs()) == sorted(f"{k}/cgrouptest{s}" for k in V1_KEYS for s in ("", "/c1"))
    assert sorted(cg.created) == sorted(host.path(d) for d in host.fcrun_dirs())
    again = driver.load(cg.paths, cg.created)  # as another fcrun process (delete) sees it
    again.destroy()
    assert host.fcrun_dirs() == []


def test_v1_relative_path_is_beneath_the_cgroup_fcrun_runs_in(tmp_path):
    host = v1_host(tmp_path)
    cg = host.detect("fcrun").create("x", Limits(), at="testdir/cgrouptest/container")
    assert cg.paths["memory"] == host.path(f"memory{OWN_MEMORY}/testdir/cgrouptest/container")
    assert cg.paths["cpu"] == host.path("cpu/testdir/cgrouptest/container")
    assert driver_planned(host, "testdir/cgrouptest/container") == cg.paths
    cg.destroy()
    assert host.fcrun_dirs() == []


def driver_planned(host, at):
    return host.detect("fcrun").planned_paths("x", at=at)


def test_an_existing_empty_group_is_joined_written_and_left_on_destroy(tmp_path):
    host = v1_host(tmp_path)
    for key in V1_KEYS:  # an engine made /pod/c1 (and /pod) beforehand
        for d in ("pod", "pod/c1"):
            os.mkdir(host.path(key, d))
            host.kernel.populate(host.path(key, d))
    host.snapshot()
    cg = host.detect("fcrun").create("x", Limits(memory_bytes=64 << 20), at="/pod/c1")
    assert cg.created == []
    written = dict(host.writes())
    # A joined group has limits of its own: every one is written, not only those set.
    assert written["pids/pod/c1/pids.max"] == "max" and written["memory/pod/c1/memory.limit_in_bytes"] == str(64 << 20)
    set_procs(host.path("pids/pod/c1"), [4242])
    cg.destroy()
    assert host.kernel.kills == [(4242, 9)]
    assert host.fcrun_dirs() == [] and all(os.path.isdir(host.path(k, "pod/c1")) for k in V1_KEYS)


def test_an_existing_group_in_use_is_refused_and_nothing_made_stays(tmp_path):
    host = v1_host(tmp_path)
    os.makedirs(host.path("pids/a/busy"))
    host.kernel.populate(host.path("pids/a"))
    host.kernel.populate(host.path("pids/a/busy"))
    set_procs(host.path("pids/a/busy"), [77])
    host.snapshot()
    with raises(AlreadyExists, "in use"):
        host.detect("fcrun").create("x", Limits(), at="/a/busy")
    assert host.fcrun_dirs() == [] and host.kernel.kills == []


@pytest.mark.parametrize("at", [OWN_MEMORY, os.path.dirname(OWN_MEMORY), "fcrun", "/"])
def test_a_path_holding_fcruns_own_cgroups_is_refused(tmp_path, at):
    host = v1_host(tmp_path)
    with pytest.raises(SpecError) as info:
        host.detect("fcrun").create("x", Limits(), at=at)
    assert info.value.where == "$.linux.cgroupsPath"
    assert host.fcrun_dirs() == [] and host.kernel.writes == []


def test_v1_cpuset_is_joined_only_when_asked_and_gets_its_parents_cpus_and_mems(tmp_path):
    host = with_cpuset(v1_host(tmp_path))
    driver = host.detect("fcrun")
    plain = driver.create("plain", Limits())
    assert "cpuset" not in plain.paths and not os.path.exists(host.path("cpuset/fcrun"))
    cg = driver.create("web", Limits(), extra=("cpuset",))
    assert cg.paths["cpuset"] == host.path("cpuset/fcrun/web")
    # A new v1 cpuset group is empty and no process could join it: the parent's values first.
    assert [(p, t) for p, t in host.writes() if p.startswith("cpuset/")] == [
        ("cpuset/fcrun/cpuset.cpus", "0-1"), ("cpuset/fcrun/cpuset.mems", "0"),
        ("cpuset/fcrun/web/cpuset.cpus", "0-1"), ("cpuset/fcrun/web/cpuset.mems", "0")]
    cg.destroy()
    plain.destroy()
    driver.remove_parent_if_empty()
    assert host.fcrun_dirs() == []


def test_v1_a_hierarchy_the_host_lacks_is_missing_and_nothing_is_made(tmp_path):
    host = v1_host(tmp_path)
    with raises(MissingFeature, "hugetlb"):
        host.detect("fcrun").create("x", Limits(), extra=("hugetlb",))
    assert host.fcrun_dirs() == []


def test_v2_extra_controllers_are_enabled_on_the_way_down(tmp_path):
    host = v2_host(tmp_path, own_subtree="cpu cpuset io memory pids")
    cg = host.detect("fcrun").create("web", Limits(), extra=("cpuset", "io"))
    assert (f"{OWN_V2}/fcrun/cgroup.subtree_control", "+cpu +memory +pids +cpuset +io") in host.writes()
    assert read_file(os.path.join(cg.paths["unified"], "cgroup.controllers")).split() == [
        "cpu", "memory", "pids", "cpuset", "io"]


def test_v2_extra_controller_not_delegated_is_missing(tmp_path):
    host = v2_host(tmp_path)  # fcrun.service hands down cpu memory pids only
    with raises(MissingFeature, "cpuset"):
        host.detect("fcrun").create("web", Limits(), extra=("cpuset",))
    assert host.fcrun_dirs() == []


def test_v2_absolute_path_enables_controllers_in_the_levels_it_made(tmp_path):
    host = v2_host(tmp_path)
    cg = host.detect("fcrun").create("x", Limits(pids_max=5), at="/cgrouptest/c1")
    assert cg.paths == {"unified": host.path("cgrouptest/c1")}
    assert ("cgrouptest/cgroup.subtree_control", "+cpu +memory +pids") in host.writes()
    assert read_file(host.path("cgrouptest/c1/pids.max")) == "5"
    cg.destroy()
    assert host.fcrun_dirs() == []


def test_load_refuses_created_dirs_outside_the_hierarchies(tmp_path):
    host = v1_host(tmp_path)
    driver = host.detect("fcrun")
    cg = driver.create("x", Limits(), at="/a/b")
    with raises(SpecError, "not beneath"):
        driver.load(cg.paths, ["/etc"])
    cg.destroy()


def test_v1_add_controllers_moves_every_process_while_frozen(tmp_path):
    from fcrun.cgroups.placement import add_controllers

    host = with_cpuset(v1_host(tmp_path))
    driver = host.detect("fcrun")
    cg = driver.create("web", Limits())
    for key in ("cpu", "cpuacct", "pids", "freezer", "devices"):
        set_procs(cg.paths[key], [11, 12])
    set_procs(cg.paths["memory"], [11, 12])
    host.kernel.writes.clear()
    add_controllers(driver, cg, ["cpuset"], name="web")
    assert cg.paths["cpuset"] == host.path("cpuset/fcrun/web")
    moves = [(p, t) for p, t in host.writes() if p.endswith("cgroup.procs") or p.endswith("freezer.state")]
    assert moves == [("freezer/fcrun/web/freezer.state", "FROZEN"), ("cpuset/fcrun/web/cgroup.procs", "11"),
                     ("cpuset/fcrun/web/cgroup.procs", "12"), ("freezer/fcrun/web/freezer.state", "THAWED")]


def test_v2_add_controllers_enables_them_above_the_group_or_says_it_cannot(tmp_path):
    from fcrun.cgroups.placement import add_controllers

    host = v2_host(tmp_path, own_subtree="cpu cpuset memory pids")
    driver = host.detect("fcrun")
    cg = driver.create("web", Limits())
    add_controllers(driver, cg, ["cpuset"], name="web")
    assert "cpuset" in read_file(host.path(OWN_V2, "fcrun", "cgroup.subtree_control")).split()
    top = driver.create("x", Limits(), at="/c1")  # right beneath the root: no level of fcrun's above it
    with raises(MissingFeature, "not fcrun's to change"):
        add_controllers(driver, top, ["cpuset"], name="x", at="/c1")


def test_v2_relative_path_is_beneath_the_service_fcrun_runs_in_and_an_empty_group_is_joined(tmp_path):
    host = v2_host(tmp_path)
    os.makedirs(host.path(OWN_V2, "pod", "c1"))
    for d in ("pod", "pod/c1"):
        host.kernel.populate(host.path(OWN_V2, d))
    host.snapshot()
    driver = host.detect("fcrun")
    cg = driver.create("x", Limits(pids_max=3), at="pod/c1")
    assert cg.paths == {"unified": host.path(OWN_V2, "pod", "c1")} and cg.created == []
    # The level above is enabled (only what it lacks), never the service fcrun runs in.
    assert (f"{OWN_V2}/pod/cgroup.subtree_control", "+cpu +memory +pids") in host.writes()
    assert not any(p == f"{OWN_V2}/cgroup.subtree_control" for p, _ in host.writes())
    cg.destroy()
    assert os.path.isdir(host.path(OWN_V2, "pod", "c1"))  # joined, not ours: left
