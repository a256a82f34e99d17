"""An app's own seccomp setting (as stored in the CMDB) reaches its instances through the one
instance recipe."""

from __future__ import annotations

import msgspec
import pytest

from secutil import probe_mount, run_captured
from fcrun.instance import instance_spec, seccomp_from_setting

pytestmark = [pytest.mark.root]

# What `fcrun app add --security-opt seccomp=FILE` stores: the profile's JSON. This one lets
# everything through but keyctl, refused with a distinctive errno.
STORED_PROFILE = ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["keyctl"], '
                  '"action": "SCMP_ACT_ERRNO", "errnoRet": 131}]}')


def probe_in_instance(runtime, busybox, probe, setting: str) -> list[str]:
    spec = instance_spec(busybox, name="app-1", cpu=None, memory_bytes=None, pids_max=32,
                         seccomp=seccomp_from_setting(setting, "app.test"))
    script = "/probe status Seccomp; /probe syscall keyctl"
    spec = msgspec.structs.replace(spec, process=msgspec.structs.replace(spec.process, args=["sh", "-c", script]))
    spec.mounts.append(probe_mount(probe))
    code, out = run_captured(runtime, "app-1", spec, busybox)
    assert code == 0, out
    return out.splitlines()


def test_an_apps_stored_profile_and_unconfined_setting_reach_its_instance(runtime, busybox, probe):
    custom = probe_in_instance(runtime, busybox, probe, STORED_PROFILE)
    assert custom[0].split() == ["Seccomp:", "2"] and custom[1].startswith("denied ENOTRECOVERABLE 131"), custom
    default = probe_in_instance(runtime, busybox, probe, "default")
    assert default[0].split() == ["Seccomp:", "2"] and default[1].startswith("denied EPERM"), default
    unconfined = probe_in_instance(runtime, busybox, probe, "unconfined")
    assert unconfined[0].split() == ["Seccomp:", "0"] and unconfined[1] == "ok", unconfined
