"""`fcrun run`'s options -> a container (runrequest.run_spec), the one rule the click CLI and the
fork-server share (tests/root/test_cli_root.py and test_daemon_root.py run it for real)."""

from __future__ import annotations

import json

import pytest

from fcrun.errors import NotFound, SpecError
from fcrun.runrequest import RunRequest, run_spec
from fcrun.runtime.options import ROOTFS_ANNOTATION


class FakeImage:
    name = "busybox"
    layers: list[str] = []
    config = type("Config", (), {"entrypoint": [], "cmd": ["sh"], "env": ["FROM_IMAGE=1"], "workdir": "", "user": "",
                                 "exposed_ports": [], "docroot": None})()


class Images:
    def __init__(self):
        self.asked: list[str] = []

    def get(self, name):
        self.asked.append(name)
        if name != "busybox":
            raise NotFound(f"image {name!r} not found")
        return FakeImage()


def test_every_option_reaches_the_spec():
    images = Images()
    plan = run_spec(RunRequest(image="busybox", args=["echo", "hi"], name="web", detach=True, cpu="0.3",
                               memory="64M", pids=20, hostname="h", env=["A=1"], network="none", workdir="/tmp",
                               user="1:2", read_only=True, tmpfs_rootfs=True, init=False, userns=True,
                               security_opts=["seccomp=unconfined"]), images.get)
    assert (plan.name, plan.detach, plan.init, images.asked) == ("web", True, False, ["busybox"])
    spec = plan.spec
    assert spec.process.args == ["echo", "hi"] and spec.process.cwd == "/tmp" and spec.hostname == "h"
    assert (spec.process.user.uid, spec.process.user.gid) == (1, 2)
    assert "A=1" in spec.process.env and "FROM_IMAGE=1" in spec.process.env
    resources = spec.linux.resources
    assert (resources.cpu.quota, resources.memory.limit, resources.pids.limit) == (30000, 64 << 20, 20)
    assert spec.root.readonly and spec.annotations[ROOTFS_ANNOTATION] == "tmpfs"
    namespaces = {ns.type for ns in spec.linux.namespaces}
    assert "user" in namespaces and "network" in namespaces  # none: a netns of its own with only lo
    assert spec.linux.seccomp is None  # unconfined


def test_the_defaults_are_the_images_command_under_the_default_profile():
    plan = run_spec(RunRequest(image="busybox"), Images().get)
    assert plan.name.startswith("fc-") and plan.spec.hostname == plan.name
    assert plan.spec.process.args == ["sh"] and plan.spec.linux.seccomp is not None
    assert (plan.detach, plan.init) == (False, True)
    assert plan.spec.linux.resources.cpu is None and plan.spec.linux.resources.memory is None


def test_a_profile_file_is_read(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}))
    plan = run_spec(RunRequest(image="busybox", security_opts=[f"seccomp={profile}"]), Images().get)
    assert plan.spec.linux.seccomp.default_action == "SCMP_ACT_ALLOW"


@pytest.mark.parametrize("fields, where", [
    ({"cpu": "lots"}, "--cpu"),
    ({"memory": "12Q"}, "--memory"),
    ({"pids": 0}, "--pids"),
    ({"network": "wifi"}, "--net"),
    ({"security_opts": ["apparmor=x"]}, "--security-opt"),
    ({"cpu": "lots", "memory": "12Q"}, "--cpu"),  # one order: the first bad option is reported
])
def test_a_bad_option_names_its_flag_before_the_image_is_looked_up(fields, where):
    images = Images()
    with pytest.raises(SpecError) as info:
        run_spec(RunRequest(image="busybox", **fields), images.get)
    assert info.value.where == where and images.asked == []


@pytest.mark.parametrize("fields, where", [
    ({"env": ["NOEQUALS"]}, "--env"),
    ({"workdir": "relative"}, "--workdir"),
    ({"entrypoint": "", "args": []}, None),  # "" is no entrypoint: the image's cmd runs
])
def test_what_needs_the_image_is_checked_with_it(fields, where):
    if where is None:
        assert run_spec(RunRequest(image="busybox", **fields), Images().get).spec.process.args == ["sh"]
        return
    with pytest.raises(SpecError) as info:
        run_spec(RunRequest(image="busybox", **fields), Images().get)
    assert info.value.where == where


def test_a_missing_image_is_not_found():
    with pytest.raises(NotFound, match="'nope' not found"):
        run_spec(RunRequest(image="nope"), Images().get)
