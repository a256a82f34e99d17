"""exec --process (runc's merge of a whole process with the container's) and runc's default
device rules for fcrun-oci bundles: pure spec transformations."""

import msgspec
import pytest

from fcrun.cgroups.devices import decide
from fcrun.errors import SpecError
from fcrun.runtime.exec import exec_process_spec
from fcrun.runtime.plan import build_plan, limits_from_spec
from fcrun.runtime.spec import (
    Capabilities, DeviceRule, IOPriority, Process, Rlimit, User, default_spec, validate_spec, with_runc_device_rules,
)


def container_spec():
    spec = default_spec(["sleep", "300"], env=["PATH=/bin", "FROM=container"], cwd="/srv")
    process = msgspec.structs.replace(spec.process, oom_score_adj=100, io_priority=IOPriority(class_="IOPRIO_CLASS_BE", priority=4),
                                      user=User(uid=0, gid=0, umask=0o027))
    return msgspec.structs.replace(spec, process=process)


def test_a_whole_process_replaces_args_env_cwd_user_and_no_new_privileges():
    spec = container_spec()
    process = Process(args=["id"], env=["ONLY=this"], cwd="/tmp", user=User(uid=1000, gid=1000, additional_gids=[10, 20]))
    merged = exec_process_spec(spec, process).process
    assert (merged.args, merged.env, merged.cwd) == (["id"], ["ONLY=this"], "/tmp")
    assert (merged.user.uid, merged.user.gid, merged.user.additional_gids) == (1000, 1000, [10, 20])
    assert merged.no_new_privileges is False  # runc: process.json's value, false when left out
    plan = build_plan(exec_process_spec(spec, process), rootfs="/", overlay_lower=None, cgroup_procs=[], cap_last=40,
                      attached=True)
    assert (plan.uid, plan.gid, plan.groups, plan.no_new_privs) == (1000, 1000, [10, 20], False)


def test_what_the_process_leaves_out_is_the_containers():
    spec = container_spec()
    merged = exec_process_spec(spec, Process(args=["true"])).process
    assert merged.capabilities == spec.process.capabilities
    assert merged.rlimits == spec.process.rlimits
    assert (merged.oom_score_adj, merged.io_priority, merged.user.umask) == (100, spec.process.io_priority, 0o027)


def test_the_process_capabilities_and_rlimits_win():
    spec = container_spec()
    caps = Capabilities(bounding=["CAP_KILL"], effective=["CAP_KILL"], permitted=["CAP_KILL"])
    process = Process(args=["true"], capabilities=caps, rlimits=[Rlimit(type="RLIMIT_NOFILE", soft=77, hard=88)],
                      oom_score_adj=-5, user=User(umask=0o077))
    merged = exec_process_spec(spec, process)
    plan = build_plan(merged, rootfs="/", overlay_lower=None, cgroup_procs=[], cap_last=40, attached=True)
    kill = 1 << 5
    assert (plan.cap_bounding, plan.cap_effective, plan.cap_permitted, plan.cap_inheritable) == (kill, kill, kill, 0)
    assert [(soft, hard) for _, soft, hard in plan.rlimits] == [(77, 88)]
    assert (plan.oom_score_adj, plan.umask) == (-5, 0o077)


@pytest.mark.parametrize("field, value, where", [
    ("apparmor_profile", "docker-default", "$.process.apparmorProfile"),
    ("selinux_label", "system_u:system_r:container_t:s0", "$.process.selinuxLabel"),
])
def test_what_fcrun_cannot_honour_is_refused_by_name(field, value, where):
    merged = exec_process_spec(container_spec(), Process(args=["true"], **{field: value}))
    with pytest.raises(SpecError) as info:
        validate_spec(merged)
    assert info.value.where == where


def with_devices(rules):
    spec = default_spec(["true"])
    res = msgspec.structs.replace(spec.linux.resources, devices=rules)
    return msgspec.structs.replace(spec, linux=msgspec.structs.replace(spec.linux, resources=res))


def test_runc_default_device_rules_follow_a_lone_deny_all():
    rules = limits_from_spec(with_runc_device_rules(with_devices([DeviceRule(allow=False, access="rwm")]))).devices
    for major, minor in ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2), (136, 4), (10, 200)):
        assert decide(rules, "c", major, minor, "rw"), (major, minor)
    assert not decide(rules, "b", 8, 0, "r") and not decide(rules, "c", 4, 1, "w")  # a disk, a host tty
    assert decide(rules, "b", 8, 0, "m")  # runc lets any node be made; opening it is what is refused


def test_runc_default_device_rules_come_after_the_bundles_own():
    deny_null = DeviceRule(allow=False, type="c", major=1, minor=3, access="rwm")
    spec = with_runc_device_rules(with_devices([DeviceRule(allow=False, access="rwm"), deny_null]))
    assert spec.linux.resources.devices[:2] == [DeviceRule(allow=False, access="rwm"), deny_null]
    assert decide(limits_from_spec(spec).devices, "c", 1, 3, "rw")  # as under runc: its rule is last


def test_a_bundle_without_device_rules_is_left_as_it_is():
    spec = with_devices([])
    assert with_runc_device_rules(spec) is spec


def test_runc_exec_flags_apply_to_the_containers_process():
    from fcrun.runtime.exec import process_from_flags

    container = container_spec().process
    process = process_from_flags(container, ["id"], env=["EXTRA=1"], additional_gids=[33], caps=["CAP_SYS_ADMIN"],
                                 no_new_privileges=False)
    assert process.args == ["id"] and process.env == [*container.env, "EXTRA=1"] and process.cwd == "/srv"
    assert process.user.additional_gids == [33] and process.no_new_privileges is False
    for field in ("bounding", "effective", "permitted", "ambient"):
        assert getattr(process.capabilities, field) == [*getattr(container.capabilities, field), "CAP_SYS_ADMIN"]
    assert process.capabilities.inheritable == container.capabilities.inheritable  # never added there
    plan = build_plan(msgspec.structs.replace(container_spec(), process=process), rootfs="/", overlay_lower=None,
                      cgroup_procs=[], cap_last=40, attached=True)
    assert plan.cap_effective & (1 << 21) and plan.cap_ambient == []  # not inheritable: not ambient either
    untouched = process_from_flags(container, ["true"], user=User(uid=5, gid=6))
    assert (untouched.user.uid, untouched.user.gid, untouched.capabilities) == (5, 6, container.capabilities)
    assert untouched.no_new_privileges is container.no_new_privileges
