"""Strict decoding of config.json: every field of the runtime-spec is either honoured or refused
by name, and a field the spec does not have is refused with its JSON path."""

import json

import pytest

from fcrun.errors import SpecError
from fcrun.runtime.spec import decode_spec, default_spec, encode_spec


def _default_json() -> dict:
    return json.loads(encode_spec(default_spec(["sh"], memory_bytes=64 << 20, cpu_quota_us=50000)))


def _decode(mutate) -> None:
    data = _default_json()
    mutate(data)
    decode_spec(json.dumps(data).encode())


@pytest.mark.parametrize("mutate,where", [
    (lambda d: d.__setitem__("bogus", 1), "$.bogus"),
    (lambda d: d["process"].__setitem__("foo", 1), "$.process.foo"),
    (lambda d: d["process"]["user"].__setitem__("name", "x"), "$.process.user.name"),
    (lambda d: d["root"].__setitem__("propagation", "x"), "$.root.propagation"),
    (lambda d: d["mounts"][2].__setitem__("opts", []), "$.mounts[2].opts"),
    (lambda d: d["linux"]["resources"]["memory"].__setitem__("limitt", 1), "$.linux.resources.memory.limitt"),
    (lambda d: d["linux"]["resources"]["devices"][0].__setitem__("path", "/dev/x"), "$.linux.resources.devices[0].path"),
    (lambda d: d["linux"]["seccomp"]["syscalls"][0].__setitem__("comment", "x"), "$.linux.seccomp.syscalls[0].comment"),
    (lambda d: d["linux"]["namespaces"][0].__setitem__("fd", 3), "$.linux.namespaces[0].fd"),
    (lambda d: d.__setitem__("hooks", {"prestart": [{"path": "/bin/true", "argv": []}]}), "$.hooks.prestart[0].argv"),
])
def test_a_field_unknown_to_the_spec_is_refused_with_its_path(mutate, where):
    with pytest.raises(SpecError, match="unknown field") as info:
        _decode(mutate)
    assert info.value.where == where


@pytest.mark.parametrize("mutate,where,why", [
    (lambda d: d["linux"].__setitem__("intelRdt", {"closID": "a"}), "$.linux.intelRdt", "Intel RDT"),
    (lambda d: d["linux"].__setitem__("netDevices", {"eth1": {}}), "$.linux.netDevices", "network devices"),
    (lambda d: d["linux"].__setitem__("timeOffsets", {"monotonic": {"secs": 1}}), "$.linux.timeOffsets", "time namespaces"),
    (lambda d: d["linux"].__setitem__("mountLabel", "system_u:object_r:x"), "$.linux.mountLabel", "SELinux"),
    (lambda d: d["process"].__setitem__("apparmorProfile", "docker-default"), "$.process.apparmorProfile", "AppArmor"),
    (lambda d: d["process"].__setitem__("selinuxLabel", "x"), "$.process.selinuxLabel", "SELinux"),
    (lambda d: d["linux"]["resources"].__setitem__("rdma", {"mlx": {}}), "$.linux.resources.rdma", "not supported"),
    (lambda d: d["mounts"][0].__setitem__("uidMappings", []), "$.mounts[0].uidMappings", "idmapped"),
    (lambda d: d["linux"]["resources"]["memory"].__setitem__("kernel", 5), "$.linux.resources.memory.kernel", "not enforced"),
    (lambda d: d["linux"]["seccomp"].__setitem__("listenerPath", "/run/x.sock"), "$.linux.seccomp.listenerPath", "listener"),
    (lambda d: d.__setitem__("windows", {}), "$.windows", "not a Linux field"),
])
def test_a_spec_field_fcrun_does_not_honour_is_refused_by_name(mutate, where, why):
    with pytest.raises(SpecError, match=why) as info:
        _decode(mutate)
    assert info.value.where == where
    assert where[2:] in str(info.value)


def test_null_means_absent_and_annotations_are_free_form():
    data = _default_json()
    data["linux"]["intelRdt"] = None
    data["annotations"]["io.example/anything.goes"] = "yes"
    spec = decode_spec(json.dumps(data).encode())
    assert spec.annotations["io.example/anything.goes"] == "yes"


def test_what_fcrun_builds_itself_decodes_strictly():
    for spec in (default_spec(["sh"]), default_spec(["sh"], network="host", uid=33, gid=33, pids_max=5)):
        assert decode_spec(encode_spec(spec)) == spec


def test_a_wrong_type_names_its_path():
    with pytest.raises(SpecError) as info:
        _decode(lambda d: d["process"]["user"].__setitem__("uid", "root"))
    assert info.value.where == "$.process.user.uid"


def _set_resource(field, value):
    return lambda d: d["linux"]["resources"].__setitem__(field, value)


@pytest.mark.parametrize("mutate,where,why", [
    (lambda d: d["linux"]["resources"]["cpu"].__setitem__("cpus", "0-2x"), "$.linux.resources.cpu.cpus", "not a list"),
    (lambda d: d["linux"]["resources"]["cpu"].__setitem__("cpus", "0-4095"), "$.linux.resources.cpu.cpus", "below"),
    (lambda d: d["linux"]["resources"]["cpu"].__setitem__("mems", "70"), "$.linux.resources.cpu.mems", "below 64"),
    (_set_resource("blockIO", {"weight": 5}), "$.linux.resources.blockIO.weight", "10..1000"),
    (_set_resource("blockIO", {"leafWeight": 1001}), "$.linux.resources.blockIO.leafWeight", "10..1000"),
    (_set_resource("blockIO", {"weightDevice": [{"major": 8, "minor": 0}]}), "$.linux.resources.blockIO.weightDevice[0]",
     "needs a weight"),
    (_set_resource("blockIO", {"throttleReadIOPSDevice": [{"major": 8, "minor": 0, "rate": -1}]}),
     "$.linux.resources.blockIO.throttleReadIOPSDevice[0].rate", ">= 0"),
    (_set_resource("blockIO", {"throttleWriteBpsDevice": [{"major": 1 << 13, "minor": 0, "rate": 1}]}),
     "$.linux.resources.blockIO.throttleWriteBpsDevice[0]", "out of range"),
    (_set_resource("hugepageLimits", [{"pageSize": "2M", "limit": 1}]), "$.linux.resources.hugepageLimits[0].pageSize",
     "like 2MB"),
    (_set_resource("hugepageLimits", [{"pageSize": "2MB", "limit": 1}, {"pageSize": "2MB", "limit": 2}]),
     "$.linux.resources.hugepageLimits[1].pageSize", "twice"),
    (_set_resource("network", {"classID": 1 << 32}), "$.linux.resources.network.classID", "32-bit"),
    (_set_resource("network", {"priorities": [{"name": "a b", "priority": 1}]}),
     "$.linux.resources.network.priorities[0].name", "interface name"),
    (lambda d: d["linux"].__setitem__("cgroupsPath", "system.slice:docker:abc"), "$.linux.cgroupsPath", "systemd"),
    (lambda d: d["linux"].__setitem__("cgroupsPath", "/a/../b"), "$.linux.cgroupsPath", "'..'"),
    (lambda d: d["linux"].__setitem__("cgroupsPath", "/"), "$.linux.cgroupsPath", "names no cgroup"),
    (lambda d: d["linux"].__setitem__("cgroupsPath", "/a/.hidden"), "$.linux.cgroupsPath", "invalid cgroup name"),
])
def test_a_bad_cgroup_resource_or_path_is_refused_with_its_path(mutate, where, why):
    with pytest.raises(SpecError, match=why) as info:
        _decode(mutate)
    assert info.value.where == where


def test_the_cgroup_resources_runc_applies_decode():
    def mutate(d):
        d["linux"]["cgroupsPath"] = "/docker/web-1"
        d["linux"]["resources"]["cpu"].update(cpus="0", mems="0")
        d["linux"]["resources"].update(
            blockIO={"weight": 500, "leafWeight": 300, "weightDevice": [{"major": 8, "minor": 0, "weight": 600}],
                     "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1 << 20}],
                     "throttleWriteIOPSDevice": [{"major": 8, "minor": 0, "rate": 100}]},
            hugepageLimits=[{"pageSize": "2MB", "limit": 4 << 20}],
            network={"classID": 0x100001, "priorities": [{"name": "eth0", "priority": 5}]})
    data = _default_json()
    mutate(data)
    spec = decode_spec(json.dumps(data).encode())
    res = spec.linux.resources
    assert (res.cpu.cpus, res.cpu.mems, spec.linux.cgroups_path) == ("0", "0", "/docker/web-1")
    assert res.block_io.throttle_write_iops_device[0].rate == 100
    assert res.hugepage_limits[0].page_size == "2MB" and res.network.class_id == 0x100001
    # and back: the wire names are the spec's
    again = json.loads(encode_spec(spec))["linux"]["resources"]
    assert set(again["blockIO"]) == {"weight", "leafWeight", "weightDevice", "throttleReadBpsDevice",
                                     "throttleWriteIOPSDevice"}
