"""linux.resources -> cgroup files (spec_resources.py), per cgroup version: the files and values
runc writes, and a field a version has no file for refused by name."""

from __future__ import annotations

import pytest

from fcrun.errors import SpecError
from fcrun.runtime.spec import (BlockIO, CpuResources, HugepageLimit, InterfacePriority, Network, Resources,
                                ThrottleDevice, WeightDevice)
from fcrun.runtime.spec_resources import blkio_to_io_weight, cgroup_settings, extra_controllers


def _rows(res, version):
    return [(key, file, value) for key, file, value, _ in cgroup_settings(res, version)]


def test_cpuset_first_on_both_versions():
    res = Resources(cpu=CpuResources(cpus="0-1", mems="0", shares=1024))
    assert _rows(res, 1) == [("cpuset", "cpuset.cpus", "0-1"), ("cpuset", "cpuset.mems", "0"), ("cpu", "cpu.shares", "1024")]
    assert _rows(res, 2)[:2] == [("unified", "cpuset.cpus", "0-1"), ("unified", "cpuset.mems", "0")]
    assert extra_controllers(cgroup_settings(res, 1), 1) == ("cpuset", "cpu")
    assert extra_controllers(cgroup_settings(res, 2), 2) == ("cpuset", "cpu")


def test_block_io_v1_files_and_v2_io_conversions():
    res = Resources(block_io=BlockIO(
        weight=500, weight_device=[WeightDevice(major=8, minor=0, weight=10)],
        throttle_read_bps_device=[ThrottleDevice(major=8, minor=0, rate=1 << 20)],
        throttle_write_iops_device=[ThrottleDevice(major=8, minor=16, rate=0)]))
    assert _rows(res, 1) == [
        ("blkio", "blkio.weight", "500"), ("blkio", "blkio.weight_device", "8:0 10"),
        ("blkio", "blkio.throttle.read_bps_device", f"8:0 {1 << 20}"),
        ("blkio", "blkio.throttle.write_iops_device", "8:16 0")]
    assert _rows(res, 2) == [
        ("unified", "io.bfq.weight", "500"), ("unified", "io.bfq.weight", "8:0 10"),
        ("unified", "io.max", f"8:0 rbps={1 << 20}"), ("unified", "io.max", "8:16 wiops=max")]
    assert (blkio_to_io_weight(10), blkio_to_io_weight(1000)) == (1, 10000)  # runc's ends of the range
    assert extra_controllers(cgroup_settings(res, 2), 2) == ("io",)


def test_hugetlb_and_network_files():
    res = Resources(hugepage_limits=[HugepageLimit(page_size="2MB", limit=4 << 20)],
                    network=Network(class_id=0x100001, priorities=[InterfacePriority(name="eth0", priority=5)]))
    assert _rows(res, 1) == [("hugetlb", "hugetlb.2MB.limit_in_bytes", str(4 << 20)),
                             ("net_cls", "net_cls.classid", str(0x100001)), ("net_prio", "net_prio.ifpriomap", "eth0 5")]
    assert extra_controllers(cgroup_settings(res, 1), 1) == ("hugetlb", "net_cls", "net_prio")


@pytest.mark.parametrize("res,where", [
    (Resources(network=Network(class_id=1)), "$.linux.resources.network"),
    (Resources(block_io=BlockIO(leaf_weight=100)), "$.linux.resources.blockIO.leafWeight"),
    (Resources(block_io=BlockIO(weight_device=[WeightDevice(major=8, minor=0, leaf_weight=20)])),
     "$.linux.resources.blockIO.weightDevice[0].leafWeight"),
])
def test_what_cgroup_v2_has_no_file_for_is_refused_by_name(res, where):
    # runc ignores network on v2; fcrun does not drop a field in silence.
    with pytest.raises(SpecError, match="no cgroup v2 file") as info:
        cgroup_settings(res, 2)
    assert info.value.where == where


def test_v2_hugetlb_file():
    res = Resources(hugepage_limits=[HugepageLimit(page_size="1GB", limit=0)])
    assert _rows(res, 2) == [("unified", "hugetlb.1GB.max", "0")]


def test_an_update_changes_only_what_it_sets():
    from fcrun.runtime.spec import MemoryResources, PidsResources
    from fcrun.runtime.spec_resources import merge_resources

    old = Resources(memory=MemoryResources(limit=64 << 20, swap=128 << 20), cpu=CpuResources(shares=512, cpus="0-1"),
                    pids=PidsResources(limit=10), hugepage_limits=[HugepageLimit(page_size="2MB", limit=1),
                                                                   HugepageLimit(page_size="1GB", limit=2)],
                    unified={"memory.high": "1G"})
    new = Resources(memory=MemoryResources(limit=96 << 20), cpu=CpuResources(cpus="0"),
                    hugepage_limits=[HugepageLimit(page_size="2MB", limit=5)], unified={"pids.max": "3"})
    merged = merge_resources(old, new)
    assert (merged.memory.limit, merged.memory.swap) == (96 << 20, 128 << 20)
    assert (merged.cpu.shares, merged.cpu.cpus, merged.pids.limit) == (512, "0", 10)
    assert [(h.page_size, h.limit) for h in merged.hugepage_limits] == [("2MB", 5), ("1GB", 2)]
    assert merged.unified == {"memory.high": "1G", "pids.max": "3"}
    assert old.memory.limit == 64 << 20 and old.cpu.cpus == "0-1"  # the container's spec is not changed in place


def test_the_placed_file_is_removed_with_the_state_dir():
    import inspect

    from fcrun.runtime.spec_resources import PLACED_FILE
    from fcrun.runtime.state import StateStore

    assert f'"{PLACED_FILE}"' in inspect.getsource(StateStore.remove)


@pytest.mark.parametrize("bfq", [True, False])
def test_a_v2_blkio_weight_goes_to_bfq_or_converted_to_io_weight(tmp_path, bfq):
    from fcrun.runtime.spec_resources import write_setting

    (tmp_path / "io.weight").write_text("")  # (cgroup files are written without O_TRUNC)
    if bfq:
        (tmp_path / "io.bfq.weight").write_text("")
    write_setting(str(tmp_path), "io.bfq.weight", "8:0 500", "$.w")
    if bfq:
        assert (tmp_path / "io.bfq.weight").read_text() == "8:0 500"
    else:  # runc's conversion of 10..1000 to 1..10000
        assert (tmp_path / "io.weight").read_text() == f"8:0 {blkio_to_io_weight(500)}"
