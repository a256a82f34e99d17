"""User namespaces and files: a container's root is nobody to the host, its files are out of
every host user's reach, and two tenants share no host id.

Attacks run for real: a setuid copy of a binary written by container root, run by an
unprivileged host user; a container writing where another tenant's container reads.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile

import msgspec
import pytest

from polling import wait_until
from secutil import as_host_user, probe_mount, run_captured
from fcrun.instance import instance_spec
from fcrun.runtime.spec import Mount, Namespace
from fcrun.runtime.options import RunOptions, spec_from_image
from fcrun.paths import Paths
from fcrun.runtime import Runtime
from fcrun.runtime.userns import FIRST_HOST_ID, RANGE_SIZE

pytestmark = [pytest.mark.root]

NOBODY = 65533  # a host uid with no account: the curious local user


def busybox_spec(image, args, *, userns: bool, probe: str | None = None, **opts):
    spec = spec_from_image(image, RunOptions(args=args, network="none", **opts))
    if userns:
        spec.linux.namespaces.append(Namespace(type="user"))
    if probe:
        spec.mounts.append(probe_mount(probe))
    return spec


def test_container_root_is_an_unprivileged_host_id_of_its_own(runtime, busybox, probe):
    spec = busybox_spec(busybox, ["/probe", "ids"], userns=True, probe=probe)
    code, out = run_captured(runtime, "u1", spec, busybox)
    assert code == 0, out
    fields = out.split()  # uid=0 gid=0 map= INSIDE HOST SIZE
    assert fields[:3] == ["uid=0", "gid=0", "map="], out  # root inside...
    inside, host, size = (int(x) for x in fields[3:6])
    assert inside == 0 and size == RANGE_SIZE
    assert host >= FIRST_HOST_ID and (host - FIRST_HOST_ID) % RANGE_SIZE == 0  # ...nobody outside
    # Control: without a user namespace the same probe is the host's root.
    code, out = run_captured(runtime, "u2", busybox_spec(busybox, ["/probe", "ids"], userns=False, probe=probe), busybox)
    assert out.split() == ["uid=0", "gid=0", "map=", "0", "0", "4294967295"], out


def test_two_containers_never_share_host_ids_and_the_range_is_released(runtime, busybox):
    a = runtime.create("ua", busybox_spec(busybox, ["sleep", "30"], userns=True), image=busybox, detach=True)
    b = runtime.create("ub", busybox_spec(busybox, ["sleep", "30"], userns=True), image=busybox, detach=True)
    base_a = a.state.spec.linux.uid_mappings[0].host_id
    base_b = b.state.spec.linux.uid_mappings[0].host_id
    assert abs(base_a - base_b) >= RANGE_SIZE
    assert runtime.id_ranges.owners() == {base_a: "ua", base_b: "ub"}
    a.start()
    with open(f"/proc/{a.pid}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert uids == [str(base_a)] * 4  # pid 1 (the init) runs as the range's root on the host
    runtime.delete("ua", force=True)
    runtime.delete("ub", force=True)
    assert runtime.id_ranges.owners() == {}


@pytest.fixture
def host_visible_runtime(runtime):
    """The runtime fixture's roots, but a data root every host user can traverse up to, as
    /var/lib/fcrun (0711) is: pytest's own tmp dirs are 0700 and would hide the attack."""
    data_root = tempfile.mkdtemp(prefix="fcrun-sec-", dir="/var/tmp")
    os.chmod(data_root, 0o711)
    rt = Runtime(Paths(data_root=data_root, run_root=runtime.paths.run_root), cgroup_parent=runtime.cgroup_parent,
                 bridge=runtime.bridge, subnet=runtime.subnet)
    yield rt
    for name in rt.states.names():
        rt.delete(name, force=True)
    shutil.rmtree(data_root)


def test_a_setuid_file_written_by_container_root_is_out_of_host_users_reach(host_visible_runtime, busybox, probe):
    runtime = host_visible_runtime
    # The attack: container root (no user namespace: `fcrun run`'s default) plants a setuid-root
    # copy of a binary in its writable layer; a local user runs it from the data root.
    spec = busybox_spec(busybox, ["sh", "-c", "/probe setuidfile /bin/rootprobe && sleep 30"], userns=False, probe=probe)
    container = runtime.run("planter", spec, image=busybox, detach=True)
    upper = container.state.rootfs.upper
    planted = os.path.join(upper, "bin", "rootprobe")
    wait_until("the planted file", lambda: os.path.exists(planted) and os.stat(planted).st_mode & stat.S_ISUID)
    st = os.stat(planted)
    assert st.st_uid == 0 and st.st_mode & stat.S_ISUID  # the setuid-root file is there...
    result = as_host_user(NOBODY, planted, "ids")
    assert result.returncode != 0 and "Permission denied" in result.stderr, result  # ...out of reach
    storage_root = os.path.dirname(os.path.dirname(upper))
    assert stat.S_IMODE(os.stat(storage_root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.dirname(upper)).st_mode) == 0o700
    # Control: with the two directories opened as before, the same user reaches the file.
    os.chmod(storage_root, 0o755)
    os.chmod(os.path.dirname(upper), 0o755)
    try:
        reached = as_host_user(NOBODY, "stat", "-c", "%a %u", planted)
        assert reached.returncode == 0 and reached.stdout.split() == ["4755", "0"], reached
    finally:
        os.chmod(os.path.dirname(upper), 0o700)
        os.chmod(storage_root, 0o700)
    runtime.delete("planter", force=True)


def test_in_a_user_namespace_a_planted_setuid_file_belongs_to_nobody_on_the_host(runtime, busybox, probe):
    spec = busybox_spec(busybox, ["sh", "-c", "/probe setuidfile /bin/rootprobe && sleep 30"], userns=True, probe=probe)
    container = runtime.run("planter2", spec, image=busybox, detach=True)
    planted = os.path.join(container.state.rootfs.upper, "bin", "rootprobe")
    wait_until("the planted file", lambda: os.path.exists(planted) and os.stat(planted).st_mode & stat.S_ISUID)
    st = os.stat(planted)
    assert st.st_mode & stat.S_ISUID
    assert st.st_uid == container.state.spec.linux.uid_mappings[0].host_id != 0  # setuid to nobody
    runtime.delete("planter2", force=True)


def test_tenant_a_cannot_read_signal_or_reach_tenant_b(runtime, busybox, probe, tmp_path):
    shared = tmp_path / "shared"  # a host dir both tenants can write: the worst case
    shared.mkdir()
    os.chmod(shared, 0o1777)
    tmp_path.chmod(0o755)
    specs = {}
    for name, cmd in (("tb", "echo secret > /shared/b-secret; chmod 600 /shared/b-secret; httpd -f -p 8080 -h /"),):
        spec = instance_spec(busybox, name=name, cpu=None, memory_bytes=None)
        spec = msgspec.structs.replace(spec, process=msgspec.structs.replace(spec.process, args=["sh", "-c", cmd]))
        spec.mounts += [probe_mount(probe), Mount(destination="/shared", source=str(shared), options=["bind", "rw"])]
        specs[name] = spec
    b = runtime.run("tb", specs["tb"], image=busybox, detach=True)
    secret = shared / "b-secret"
    wait_until("B's secret file", lambda: secret.exists() and stat.S_IMODE(secret.stat().st_mode) == 0o600)
    b_host_uid = (shared / "b-secret").stat().st_uid
    assert b_host_uid == b.state.spec.linux.uid_mappings[0].host_id

    script = (f"echo read $(/probe open /shared/b-secret r); echo kill $(/probe kill {b.pid} 9); "
              f"echo connect $(/probe connect {b.ip} 8080); "
              "echo b-procs $(for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done | grep -c 'http[d] -f'); "
              "echo cgroup $(cat /proc/self/cgroup)")
    spec_a = instance_spec(busybox, name="ta", cpu=None, memory_bytes=None)
    spec_a = msgspec.structs.replace(spec_a, process=msgspec.structs.replace(spec_a.process, args=["sh", "-c", script]))
    spec_a.mounts += [probe_mount(probe), Mount(destination="/shared", source=str(shared), options=["bind", "rw"])]
    code, out = run_captured(runtime, "ta", spec_a, busybox)
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert lines["read"].startswith("denied EACCES"), out  # B's file: another uid to A's root
    assert lines["kill"].startswith("denied ESRCH"), out  # B's processes: not in A's pid namespace
    assert lines["connect"].startswith("denied"), out  # B's port: the bridge isolates ports
    assert lines["b-procs"] == "0", out  # no process of B in A's /proc
    assert lines["cgroup"].strip().endswith(":/"), out  # A sees its own cgroup as the root
    # Control: the host (root) reads B's file and reaches B's port.
    assert (shared / "b-secret").read_text() == "secret\n"
    with socket.socket() as sock:  # through this run's bridge (another run may use the subnet)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, runtime.bridge.encode())
        sock.settimeout(2)
        sock.connect((b.ip, 8080))
    runtime.delete("tb", force=True)
