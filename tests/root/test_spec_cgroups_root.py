"""Root tests of linux.cgroupsPath and the cgroup resources beyond fcrun's own limits (cpu.cpus and
mems, blockIO, hugepageLimits, network), on this host's real cgroup tree: each value read back from
the container's cgroup file, enforced where that is cheap to see, and a field the host cannot
honour refused by its JSON path with nothing left behind.

The group names contain hostcheck.CGROUP_PARENT, so the runtime fixture's host snapshot sees a
leaked one.
"""

from __future__ import annotations

import os

import pytest

from fcrun.errors import SpecError
from fcrun.runtime.options import RunOptions, spec_from_image
from fcrun.runtime.spec import BlockIO, CpuResources, HugepageLimit, Network, PidsResources, ThrottleDevice
from hostcheck import CGROUP_PARENT, host_snapshot, settled_snapshot

pytestmark = [pytest.mark.root]


def _spec(image, name, script="sleep 60"):
    return spec_from_image(image, RunOptions(args=["sh", "-c", script], network="none"), name=name)


def _need_v1(runtime):
    if runtime.cgroups.version != 1:
        pytest.skip("the files read below are cgroup v1's; this host runs v2 (unit tests cover v2)")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _v1_dir(controller: str) -> str:
    return os.path.join("/sys/fs/cgroup", controller)


def _own_cgroup(controller: str) -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(","):
                return path
    raise AssertionError(f"no {controller} line in /proc/self/cgroup")


def test_an_absolute_cgroups_path_is_beneath_each_hierarchy_root_and_goes_on_delete(runtime, busybox):
    _need_v1(runtime)
    top = f"{CGROUP_PARENT}-abs"
    spec = _spec(busybox, "t-cgpath")
    spec.linux.cgroups_path = f"/{top}/c1"
    spec.linux.resources.pids = PidsResources(limit=77)
    container = runtime.run("t-cgpath", spec, image=busybox, detach=True)
    try:
        group = os.path.join(_v1_dir("pids"), top, "c1")
        assert _read(os.path.join(group, "pids.max")) == "77"
        assert str(container.pid) in _read(os.path.join(group, "cgroup.procs")).split()
        # The memory hierarchy too: at its root, not beneath the cgroup the tests run in.
        assert os.path.isdir(os.path.join(_v1_dir("memory"), top, "c1"))
        with open(f"/proc/{container.pid}/cgroup") as f:
            assert f"pids:/{top}/c1\n" in f.read()
    finally:
        runtime.delete("t-cgpath", force=True)
    # The leaf and the level above it were made by the create: both gone.
    for controller in ("pids", "memory", "cpu", "freezer", "devices"):
        assert not os.path.exists(os.path.join(_v1_dir(controller), top))


def test_a_relative_cgroups_path_is_beneath_the_cgroup_fcrun_runs_in(runtime, busybox):
    _need_v1(runtime)
    rel = f"{CGROUP_PARENT}-rel/c1"
    spec = _spec(busybox, "t-cgrel")
    spec.linux.cgroups_path = rel
    container = runtime.run("t-cgrel", spec, image=busybox, detach=True)
    try:
        own = _own_cgroup("memory")  # the machine puts us in a memory cgroup of its own here
        expected = os.path.join(_v1_dir("memory") + own, rel)
        assert str(container.pid) in _read(os.path.join(expected, "cgroup.procs")).split()
    finally:
        runtime.delete("t-cgrel", force=True)
    assert not os.path.exists(os.path.dirname(expected))


def test_an_existing_empty_group_is_joined_and_left_in_place(runtime, busybox):
    _need_v1(runtime)
    top = f"{CGROUP_PARENT}-pre"
    made = []
    for controller in ("cpu", "cpuacct", "memory", "pids", "freezer", "devices"):
        for d in (top, f"{top}/c1"):  # as an engine makes them before it calls the runtime
            path = os.path.join(_v1_dir(controller), d)
            os.mkdir(path)
            made.append(path)
    try:
        spec = _spec(busybox, "t-cgpre")
        spec.linux.cgroups_path = f"/{top}/c1"
        spec.linux.resources.pids = PidsResources(limit=33)
        container = runtime.run("t-cgpre", spec, image=busybox, detach=True)
        assert str(container.pid) in _read(os.path.join(_v1_dir("pids"), top, "c1", "cgroup.procs")).split()
        assert _read(os.path.join(_v1_dir("pids"), top, "c1", "pids.max")) == "33"
        runtime.delete("t-cgpre", force=True)
        assert all(os.path.isdir(p) for p in made)  # not ours: left, empty
        assert _read(os.path.join(_v1_dir("pids"), top, "c1", "cgroup.procs")) == ""
    finally:
        for path in reversed(made):
            if os.path.isdir(path):
                os.rmdir(path)


def test_cpus_and_mems_reach_the_cpuset_cgroup_and_bind_the_process(runtime, busybox):
    _need_v1(runtime)
    spec = _spec(busybox, "t-cpuset", "grep Cpus_allowed_list /proc/self/status; sleep 60")
    spec.linux.resources.cpu = CpuResources(cpus="0", mems="0")
    container = runtime.run("t-cpuset", spec, image=busybox, detach=True)
    try:
        paths = runtime.state("t-cpuset").cgroup_paths
        assert _read(os.path.join(paths["cpuset"], "cpuset.cpus")) == "0"
        assert _read(os.path.join(paths["cpuset"], "cpuset.mems")) == "0"
        # Enforced: the kernel narrows the process's affinity to the cpuset.
        with open(f"/proc/{container.pid}/status") as f:
            assert "Cpus_allowed_list:\t0\n" in f.read()
    finally:
        runtime.delete("t-cpuset", force=True)


def test_a_container_without_cpuset_settings_stays_out_of_the_cpuset_hierarchy(runtime, busybox):
    _need_v1(runtime)
    runtime.run("t-nocpuset", _spec(busybox, "t-nocpuset"), image=busybox, detach=True)
    try:
        assert "cpuset" not in runtime.state("t-nocpuset").cgroup_paths
    finally:
        runtime.delete("t-nocpuset", force=True)


def _a_block_device() -> tuple[int, int]:
    """major:minor of a whole disk of this host (throttle rules name a disk, not a partition)."""
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith(("loop", "zram", "ram")):
            major, minor = _read(f"/sys/block/{name}/dev").split(":")
            return int(major), int(minor)
    pytest.skip("no disk in /sys/block")


def test_block_io_throttles_reach_the_blkio_cgroup(runtime, busybox):
    _need_v1(runtime)
    major, minor = _a_block_device()
    spec = _spec(busybox, "t-blkio")
    spec.linux.resources.block_io = BlockIO(
        throttle_read_bps_device=[ThrottleDevice(major=major, minor=minor, rate=1 << 20)],
        throttle_write_iops_device=[ThrottleDevice(major=major, minor=minor, rate=100)])
    runtime.run("t-blkio", spec, image=busybox, detach=True)
    try:
        blkio = runtime.state("t-blkio").cgroup_paths["blkio"]
        assert _read(os.path.join(blkio, "blkio.throttle.read_bps_device")) == f"{major}:{minor} {1 << 20}"
        assert _read(os.path.join(blkio, "blkio.throttle.write_iops_device")) == f"{major}:{minor} 100"
    finally:
        runtime.delete("t-blkio", force=True)


@pytest.mark.parametrize("field,value,where,why", [
    ("hugepage_limits", [HugepageLimit(page_size="2MB", limit=4 << 20)], "$.linux.resources.hugepageLimits[0]",
     "hugetlb hierarchy"),
    ("network", Network(class_id=0x100001), "$.linux.resources.network.classID", "net_cls hierarchy"),
    ("block_io", BlockIO(weight=500), "$.linux.resources.blockIO.weight", "blkio.weight"),
])
def test_what_this_host_lacks_is_refused_by_its_path_and_leaves_nothing(runtime, busybox, run_root, field, value,
                                                                         where, why):
    """This VM mounts no hugetlb or net_cls hierarchy and its disks have no blkio.weight (no CFQ/BFQ)."""
    _need_v1(runtime)
    wanted = {"hugepage_limits": "hugetlb", "network": "net_cls", "block_io": "blkio"}[field]
    present = os.path.exists(os.path.join(_v1_dir(wanted), "blkio.weight" if field == "block_io" else ""))
    if present:
        pytest.skip(f"this host has what {where} needs")
    before = host_snapshot(run_root)
    spec = _spec(busybox, "t-lacks", "true")
    spec.linux.cgroups_path = f"/{CGROUP_PARENT}-lacks/c1"  # would be made first if the check came late
    setattr(spec.linux.resources, field, value)
    with pytest.raises(SpecError, match=why) as info:
        runtime.create("t-lacks", spec, image=busybox)
    assert info.value.where == where
    assert settled_snapshot(run_root, before) == before
    assert not os.path.exists(os.path.join(_v1_dir("pids"), f"{CGROUP_PARENT}-lacks"))


def test_update_changes_only_what_it_sets_and_keeps_the_v1_swap_setting(runtime, busybox):
    _need_v1(runtime)
    from fcrun.runtime.spec import MemoryResources, Resources

    spec = _spec(busybox, "t-upd")
    spec.linux.resources.memory = MemoryResources(limit=64 << 20, swap=128 << 20)
    spec.linux.resources.pids = PidsResources(limit=50)
    runtime.run("t-upd", spec, image=busybox, detach=True)
    try:
        memory = runtime.state("t-upd").cgroup_paths["memory"]
        state = runtime.update_resources("t-upd", Resources(memory=MemoryResources(limit=96 << 20),
                                                            cpu=CpuResources(shares=256)))
        assert _read(os.path.join(memory, "memory.limit_in_bytes")) == str(96 << 20)
        # memory + swap as the spec has it, not reset to the new memory limit
        assert _read(os.path.join(memory, "memory.memsw.limit_in_bytes")) == str(128 << 20)
        paths = state.cgroup_paths
        assert _read(os.path.join(paths["cpu"], "cpu.shares")) == "256"
        assert _read(os.path.join(paths["pids"], "pids.max")) == "50"  # not given: unchanged
        saved = runtime.state("t-upd").spec.linux.resources
        assert (saved.memory.limit, saved.memory.swap, saved.cpu.shares, saved.pids.limit) == (
            96 << 20, 128 << 20, 256, 50)
    finally:
        runtime.delete("t-upd", force=True)


def test_update_of_cpus_joins_the_cpuset_hierarchy_live(runtime, busybox):
    _need_v1(runtime)
    from fcrun.runtime.spec import Resources

    container = runtime.run("t-updcpus", _spec(busybox, "t-updcpus", "sleep 60 & sleep 60"), image=busybox, detach=True)
    try:
        assert "cpuset" not in runtime.state("t-updcpus").cgroup_paths
        state = runtime.update_resources("t-updcpus", Resources(cpu=CpuResources(cpus="0")))
        cpuset = state.cgroup_paths["cpuset"]
        assert _read(os.path.join(cpuset, "cpuset.cpus")) == "0"
        pids = _read(os.path.join(cpuset, "cgroup.procs")).split()
        assert str(container.pid) in pids and len(pids) >= 2  # every process moved, not only pid 1
        for pid in pids:
            with open(f"/proc/{pid}/status") as f:
                assert "Cpus_allowed_list:\t0\n" in f.read()
        assert runtime.state("t-updcpus").status == "running"  # thawed again after the move
    finally:
        runtime.delete("t-updcpus", force=True)


@pytest.mark.parametrize("resources,where", [
    ({"devices": [{"allow": True, "access": "rwm"}]}, "$.linux.resources.devices"),
    ({"memory": {"kernel": 1 << 20}}, "$.linux.resources.memory.kernel"),
    ({"memory": {"swap": 1 << 20}}, "$.linux.resources.memory.swap"),  # below the memory limit
    ({"network": {"classID": 1}}, "$.linux.resources.network.classID"),  # no net_cls hierarchy here
])
def test_update_refuses_by_path_and_changes_nothing(runtime, busybox, resources, where):
    _need_v1(runtime)
    import msgspec

    from fcrun.runtime.spec import MemoryResources, Resources

    spec = _spec(busybox, "t-updbad")
    spec.linux.resources.memory = MemoryResources(limit=64 << 20)
    runtime.run("t-updbad", spec, image=busybox, detach=True)
    try:
        before = runtime.state("t-updbad")
        with pytest.raises(SpecError) as info:
            runtime.update_resources("t-updbad", msgspec.convert(resources, Resources))
        assert info.value.where == where
        after = runtime.state("t-updbad")
        assert after.spec.linux.resources == before.spec.linux.resources and after.cgroup_paths == before.cgroup_paths
        assert _read(os.path.join(after.cgroup_paths["memory"], "memory.limit_in_bytes")) == str(64 << 20)
    finally:
        runtime.delete("t-updbad", force=True)


CRASHING_CREATE = """
import sys
from fcrun.paths import Paths
from fcrun.runtime import Runtime
from fcrun.runtime.options import RunOptions, spec_from_image
data_root, run_root, parent, bridge, subnet, at = sys.argv[1:]
rt = Runtime(Paths(data_root=data_root, run_root=run_root), cgroup_parent=parent, bridge=bridge, subnet=subnet)
image = rt.images.get("busybox")
spec = spec_from_image(image, RunOptions(args=["sleep", "60"], network="none"), name="t-crash")
spec.linux.cgroups_path = at
rt.create("t-crash", spec, image=image)
"""


def test_a_creation_killed_after_its_cgroup_at_a_cgroups_path_is_cleaned_by_delete(runtime, busybox, data_root,
                                                                                  run_root):
    """kill -9 right after the group was made, before the state was saved: delete finds the
    group at the spec's cgroupsPath, ends its processes and removes it."""
    _need_v1(runtime)
    import subprocess
    import sys

    from hostcheck import BRIDGE, SUBNET

    top = f"{CGROUP_PARENT}-crash"
    env = dict(os.environ, FCRUN_CRASH_AT="create.cgroup")
    proc = subprocess.run([sys.executable, "-c", CRASHING_CREATE, data_root, run_root, CGROUP_PARENT, BRIDGE, SUBNET,
                           f"/{top}/c1"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    leaf = os.path.join(_v1_dir("pids"), top, "c1")
    assert os.path.isdir(leaf) and runtime.state("t-crash").status == "creating"
    runtime.delete("t-crash", force=True)
    levels = [os.path.join(_v1_dir(c), top) for c in ("cpu", "cpuacct", "memory", "pids", "freezer", "devices")]
    assert not any(os.path.exists(os.path.join(level, "c1")) for level in levels)
    # The level above the group stays (this process cannot tell it from an engine's): empty.
    for level in levels:
        os.rmdir(level)


def test_a_value_the_kernel_refuses_names_its_field_and_leaves_nothing(runtime, busybox, run_root):
    """mems names a NUMA node this host lacks: the write fails after the group was made (the
    value's validity is the kernel's to say), and the creation is undone."""
    _need_v1(runtime)
    online = _read("/sys/devices/system/node/online") if os.path.exists("/sys/devices/system/node/online") else "0"
    if online != "0":
        pytest.skip(f"this host has NUMA nodes {online}")
    before = host_snapshot(run_root)
    spec = _spec(busybox, "t-mems", "true")
    spec.linux.cgroups_path = f"/{CGROUP_PARENT}-mems/c1"
    spec.linux.resources.cpu = CpuResources(cpus="0", mems="1")
    with pytest.raises(SpecError, match="refused '1' for cpuset.mems") as info:
        runtime.create("t-mems", spec, image=busybox)
    assert info.value.where == "$.linux.resources.cpu.mems"
    assert settled_snapshot(run_root, before) == before
    assert not os.path.exists(os.path.join(_v1_dir("cpuset"), f"{CGROUP_PARENT}-mems"))
