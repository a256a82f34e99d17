"""Paths resolved inside the rootfs, and limits a hostile tenant cannot get past.

- An image whose /dev is a symlink to a host directory: fcrun's device nodes land inside the
  container's rootfs, never in the host directory.
- A fork bomb in an app instance stops at the instance's pids limit.
"""

from __future__ import annotations

import os

import msgspec
import pytest

from secutil import probe_mount, run_captured
from fcrun.instance import DEFAULT_PIDS_MAX, instance_spec
from fcrun.runtime.options import RunOptions, spec_from_image

pytestmark = [pytest.mark.root]


def test_an_image_whose_dev_points_at_a_host_directory_gets_no_nodes_there(runtime, busybox, tmp_path):
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    evil_layer = tmp_path / "evil-layer"
    evil_layer.mkdir()
    os.symlink(str(host_dir), evil_layer / "dev")  # the image's /dev -> an absolute host path
    image = msgspec.structs.replace(busybox, layers=[*busybox.layers, str(evil_layer)])
    spec = spec_from_image(image, RunOptions(args=["sh", "-c", "readlink /dev; echo hi > /dev/null && echo null-ok"],
                                             network="none"))
    code, out = run_captured(runtime, "evil-dev", spec, image)
    assert code == 0, out
    assert out.split() == [str(host_dir), "null-ok"], out  # the link is followed inside the rootfs
    assert os.listdir(host_dir) == []  # and nothing was made on the host


def test_a_fork_bomb_stops_at_the_instances_pids_limit(runtime, busybox, probe):
    def bomb(pids_max):
        spec = instance_spec(busybox, name="bomb", cpu=None, memory_bytes=64 << 20, pids_max=pids_max)
        spec = msgspec.structs.replace(spec, process=msgspec.structs.replace(spec.process, args=["/probe", "fork", "200"]))
        spec.mounts.append(probe_mount(probe))
        code, out = run_captured(runtime, "bomb", spec, busybox)
        assert code == 0, out
        forked, answer = out.splitlines()
        return int(forked.split()[1]), answer

    forked, answer = bomb(64)
    assert forked < 64 and answer.startswith("denied EAGAIN"), (forked, answer)
    # Control: with a limit above the bomb, every fork succeeds (bounded: 200 sleepers, 5 s).
    forked, answer = bomb(1000)
    assert forked == 200 and answer == "ok", (forked, answer)


def test_an_instance_without_its_own_limit_gets_the_default(busybox):
    spec = instance_spec(busybox, name="x", cpu=None, memory_bytes=None)
    assert spec.linux.resources.pids.limit == DEFAULT_PIDS_MAX
