import json

import pytest

from fcrun.errors import SpecError
from fcrun.runtime.spec import decode_spec, default_spec, encode_spec, network_mode, validate_spec


def test_default_spec_follows_runc_defaults():
    spec = default_spec(["sh"], cpu_quota_us=30000, memory_bytes=64 << 20, pids_max=10)
    assert {ns.type for ns in spec.linux.namespaces} == {"pid", "network", "ipc", "uts", "mount", "cgroup"}
    assert "/proc/kcore" in spec.linux.masked_paths and "/sys/firmware" in spec.linux.masked_paths
    assert "/proc/sys" in spec.linux.readonly_paths and "/proc/sysrq-trigger" in spec.linux.readonly_paths
    assert spec.process.no_new_privileges
    assert "CAP_SYS_ADMIN" not in spec.process.capabilities.bounding
    assert "CAP_NET_BIND_SERVICE" in spec.process.capabilities.bounding
    assert spec.linux.resources.cpu.quota == 30000 and spec.linux.resources.cpu.period == 100000
    validate_spec(spec)


def test_host_network_drops_the_net_namespace():
    spec = default_spec(["sh"], network="host")
    assert "network" not in {ns.type for ns in spec.linux.namespaces}
    assert network_mode(spec) == "host"
    assert network_mode(default_spec(["sh"], network="none")) == "none"
    assert network_mode(default_spec(["sh"])) == "bridge"


def test_spec_round_trips_as_oci_camel_case_json():
    spec = default_spec(["sh", "-c", "true"], uid=33, gid=33)
    data = json.loads(encode_spec(spec))
    assert data["ociVersion"] == "1.0.2"
    assert data["process"]["noNewPrivileges"] is True
    assert data["linux"]["maskedPaths"]
    assert decode_spec(encode_spec(spec)) == spec


def test_decode_reports_the_json_path_of_a_bad_field():
    data = json.loads(encode_spec(default_spec(["sh"], memory_bytes=64 << 20)))
    data["linux"]["resources"]["memory"]["limit"] = "lots"
    with pytest.raises(SpecError, match=r"\$\.linux\.resources\.memory\.limit"):
        decode_spec(json.dumps(data).encode())
    with pytest.raises(SpecError, match="malformed JSON in bundle/config.json"):
        decode_spec(b"{", "bundle/config.json")


@pytest.mark.parametrize("mutate,where", [
    (lambda s: setattr(s.process, "args", []), "$.process.args"),
    (lambda s: setattr(s.process, "cwd", "relative"), "$.process.cwd"),
    (lambda s: s.process.env.append("NOEQUALS"), "$.process.env[1]"),
    (lambda s: s.process.capabilities.bounding.append("CAP_BOGUS"), "$.process.capabilities.bounding[14]"),
    (lambda s: s.linux.namespaces.append(s.linux.namespaces[0]), "$.linux.namespaces[6]"),
    (lambda s: setattr(s.mounts[0], "destination", "proc"), "$.mounts[0].destination"),
    (lambda s: setattr(s.mounts[0], "type", "nfs"), "$.mounts[0].type"),
    (lambda s: s.linux.masked_paths.append("/proc/../etc"), "$.linux.masked_paths[11]"),
    (lambda s: setattr(s, "hostname", "a/b"), "$.hostname"),
])
def test_validate_names_where_the_spec_is_wrong(mutate, where):
    spec = default_spec(["sh"])
    mutate(spec)
    with pytest.raises(SpecError) as info:
        validate_spec(spec)
    assert where in str(info.value)


def test_resource_ranges():
    with pytest.raises(SpecError, match="memory"):
        validate_spec(default_spec(["sh"], memory_bytes=1024))
    with pytest.raises(SpecError, match="quota"):
        validate_spec(default_spec(["sh"], cpu_quota_us=10))


@pytest.mark.parametrize("mutate,where,match", [
    (lambda s: s.linux.sysctl.update({"vm.swappiness": "1"}), "$.linux.sysctl['vm.swappiness']", "not namespaced"),
    (lambda s: s.linux.sysctl.update({"kernel.sem": "1 2 3 4"}) or setattr(
        s.linux, "namespaces", [n for n in s.linux.namespaces if n.type != "ipc"]), "$.linux.sysctl['kernel.sem']", "ipc namespace"),
    (lambda s: s.linux.sysctl.update({"net/../x": "1"}), "$.linux.sysctl['net/../x']", "invalid sysctl"),
    (lambda s: setattr(s.process.user, "umask", 0o1777), "$.process.user.umask", "umask"),
    (lambda s: setattr(s.process, "oom_score_adj", 1001), "$.process.oomScoreAdj", "-1000..1000"),
    (lambda s: s.process.rlimits.append(s.process.rlimits[0]), "$.process.rlimits[1].type", "twice"),
    (lambda s: setattr(s.linux.namespaces[1], "path", "relative/ns"), "$.linux.namespaces[1].path", "absolute"),
])
def test_validate_new_process_and_linux_fields(mutate, where, match):
    spec = default_spec(["sh"])
    mutate(spec)
    with pytest.raises(SpecError, match=match) as info:
        validate_spec(spec)
    assert info.value.where == where


def test_hooks_are_checked():
    from fcrun.runtime.spec import Hook, Hooks

    spec = default_spec(["sh"])
    spec.hooks = Hooks(poststop=[Hook(path="relative")])
    with pytest.raises(SpecError) as info:
        validate_spec(spec)
    assert info.value.where == "$.hooks.poststop[0].path"
    spec.hooks = Hooks(create_runtime=[Hook(path="/bin/true", timeout=0)])
    with pytest.raises(SpecError, match="timeout") as info:
        validate_spec(spec)
    assert info.value.where == "$.hooks.createRuntime[0].timeout"


def test_a_joined_network_namespace_is_not_bridged():
    spec = default_spec(["sh"])
    for ns in spec.linux.namespaces:
        if ns.type == "network":
            ns.path = "/run/netns/x"
    assert network_mode(spec) == "none"


def test_devices_personality_and_domainname_are_checked_and_planned():
    from fcrun.runtime.plan import build_plan
    from fcrun.runtime.spec import LinuxDevice, Personality
    import stat

    spec = default_spec(["sh"])
    spec.domainname = "example.org"
    spec.linux.personality = Personality(domain="LINUX32")
    spec.linux.devices = [LinuxDevice(path="/dev/fuse", type="c", major=10, minor=229, file_mode=0o600, uid=0, gid=5),
                          LinuxDevice(path="/dev/net/fifo", type="p")]
    validate_spec(spec)
    plan = build_plan(spec, rootfs="/r", overlay_lower=None, cgroup_procs=[], cap_last=40, attached=True)
    assert plan.domainname == b"example.org" and plan.personality == 0x0008
    assert plan.spec_devices == [(b"/dev/fuse", stat.S_IFCHR | 0o600, 10, 229, 0, 5),
                                 (b"/dev/net/fifo", stat.S_IFIFO | 0o666, 0, 0, 0, 0)]
    for mutate, where in (
        (lambda s: setattr(s.linux.personality, "domain", "BSD"), "$.linux.personality.domain"),
        (lambda s: setattr(s.linux.personality, "flags", ["SHORT_INODE"]), "$.linux.personality.flags"),
        (lambda s: setattr(s.linux.devices[0], "path", "/etc/passwd"), "$.linux.devices[0].path"),
        (lambda s: setattr(s.linux.devices[0], "type", "x"), "$.linux.devices[0].type"),
        (lambda s: setattr(s, "domainname", "a/b"), "$.domainname"),
    ):
        bad = decode_spec(encode_spec(spec))
        mutate(bad)
        with pytest.raises(SpecError) as info:
            validate_spec(bad)
        assert info.value.where == where


def test_scheduler_and_io_priority_are_checked_and_planned():
    import struct

    from fcrun.runtime.plan import build_plan
    from fcrun.runtime.spec import IOPriority, Scheduler

    spec = default_spec(["sh"])
    spec.process.scheduler = Scheduler(policy="SCHED_FIFO", priority=10, flags=["SCHED_FLAG_RESET_ON_FORK"])
    spec.process.io_priority = IOPriority(class_="IOPRIO_CLASS_BE", priority=3)
    validate_spec(spec)
    plan = build_plan(spec, rootfs="/r", overlay_lower=None, cgroup_procs=[], cap_last=40, attached=True)
    assert struct.unpack("=IIQiIQQQ", plan.sched_attr) == (48, 1, 1, 0, 10, 0, 0, 0)
    assert plan.ioprio == 2 << 13 | 3
    assert json.loads(encode_spec(spec))["process"]["ioPriority"] == {"class": "IOPRIO_CLASS_BE", "priority": 3}
    for mutate, where in (
        (lambda s: setattr(s.process.scheduler, "policy", "SCHED_FAST"), "$.process.scheduler.policy"),
        (lambda s: setattr(s.process.scheduler, "priority", 0), "$.process.scheduler.priority"),
        (lambda s: setattr(s.process.scheduler, "flags", ["X"]), "$.process.scheduler.flags[0]"),
        (lambda s: setattr(s.process.io_priority, "class_", "IOPRIO_CLASS_X"), "$.process.ioPriority.class"),
        (lambda s: setattr(s.process.io_priority, "priority", 8), "$.process.ioPriority.priority"),
    ):
        bad = decode_spec(encode_spec(spec))
        mutate(bad)
        with pytest.raises(SpecError) as info:
            validate_spec(bad)
        assert info.value.where == where


def test_cpu_affinity_and_memory_policy_are_checked_and_planned():
    from fcrun.runtime.plan import build_plan
    from fcrun.runtime.spec import CPUAffinity, MemoryPolicy, parse_id_list

    assert parse_id_list("0-2,5", "w", 8) == [0, 1, 2, 5]
    spec = default_spec(["sh"])
    spec.process.exec_cpu_affinity = CPUAffinity(initial="0", final="0")
    spec.linux.memory_policy = MemoryPolicy(mode="MPOL_BIND", nodes="0", flags=["MPOL_F_STATIC_NODES"])
    validate_spec(spec)
    plan = build_plan(spec, rootfs="/r", overlay_lower=None, cgroup_procs=[], cap_last=40, attached=True)
    assert plan.cpu_affinity == [0]
    assert (plan.mempolicy_mode, plan.mempolicy_nodes) == (2 | 1 << 15, 1)
    assert json.loads(encode_spec(spec))["process"]["execCPUAffinity"] == {"initial": "0", "final": "0"}
    for mutate, where in (
        (lambda s: setattr(s.process.exec_cpu_affinity, "final", "0-x"), "$.process.execCPUAffinity.final"),
        (lambda s: setattr(s.process.exec_cpu_affinity, "initial", "100000"), "$.process.execCPUAffinity.initial"),
        (lambda s: setattr(s.linux.memory_policy, "mode", "MPOL_X"), "$.linux.memoryPolicy.mode"),
        (lambda s: setattr(s.linux.memory_policy, "nodes", ""), "$.linux.memoryPolicy.nodes"),
        (lambda s: setattr(s.linux.memory_policy, "flags", ["Y"]), "$.linux.memoryPolicy.flags[0]"),
    ):
        bad = decode_spec(encode_spec(spec))
        mutate(bad)
        with pytest.raises(SpecError) as info:
            validate_spec(bad)
        assert info.value.where == where
