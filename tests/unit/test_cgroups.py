"""The cgroup layer against fake v1/v2 trees in tmp dirs: no root, no real kernel.

``FakeKernel`` is a KernelIO over a tmp directory that records every mkdir/write/rmdir/kill
and mimics just enough kernel behaviour to test the logic: control files appear on mkdir,
rmdir refuses a populated group, v1 refuses memsw < memory, cgroup.kill empties the group,
cgroup.freeze sets "frozen" in cgroup.events. The real kernel is tested in
tests/root/test_cgroups_root.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal

import msgspec
import pytest

from fcrun.cgroups import KernelIO, Limits, Stats, V1Driver, V2Driver, detect
from fcrun.cgroups.kernel import parse_flat_keyed, parse_max, parse_pids, parse_psi
from fcrun.cgroups.devices import DeviceRule, assemble, program
from fcrun.cgroups.membership import parse_proc_cgroup
from fcrun.mountinfo import parse_mountinfo
from fcrun.cgroups.v2 import format_cpu_max, parse_cpu_max
from fcrun.errors import AlreadyExists, KernelError, MissingFeature, SpecError
from fakeclock import Clock

MEM_UNLIMITED = "9223372036854771712"
OWN_MEMORY = "/process_api/437ffd"  # this machine: the memory cgroup is machine-owned
DIR = object()  # template marker: make a directory instead of a file

V1_FILES = {
    "cpu": {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n",
            "cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n"},
    "cpuacct": {"cpuacct.usage": "0\n"},
    "memory": {"memory.limit_in_bytes": MEM_UNLIMITED + "\n", "memory.memsw.limit_in_bytes": MEM_UNLIMITED + "\n",
               "memory.usage_in_bytes": "0\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
    "freezer": {"freezer.state": "THAWED\n"},
    "devices": {"devices.allow": "", "devices.deny": "", "devices.list": "a *:* rwm\n"},
    "cpuset": {}, "systemd": {},
}
V2_FILES = {
    "cgroup.subtree_control": "", "cgroup.events": "populated 0\nfrozen 0\n", "cgroup.freeze": "0\n",
    "cgroup.kill": "", "cpu.max": "max 100000\n", "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    "cpu.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
                    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "memory.max": "max\n", "memory.swap.max": "max\n", "memory.current": "0\n", "pids.max": "max\n",
    "pids.current": "0\n",
}


@contextlib.contextmanager
def raises(exc_type: type[Exception], pattern: str):
    """pytest.raises(match=) on the fcrun message. (str() of an OSError subclass with errno
    set shows only "[Errno N] strerror", so match the message in args[0].)"""
    with pytest.raises(exc_type) as info:
        yield info
    assert re.search(pattern, info.value.args[0]), info.value.args[0]


class FakeKernel(KernelIO):
    def __init__(self, top: str, templates: dict[str, dict]):
        self.top = top
        self.templates = templates  # mountpoint -> {file name: content or DIR}
        self.writes: list[tuple[str, str]] = []  # (path relative to top, text), successful only
        self.mkdirs: list[str] = []
        self.rmdirs: list[str] = []
        self.kills: list[tuple[int, int]] = []
        self.fail: dict[str, int] = {}  # file name -> errno for every write to it
        self.fail_once: dict[str, int] = {}
        self.sigkill_kills = True
        self.stuck_freezing = False
        self.programs: list[bytes] = []  # device programs "loaded"; fd = 1000 + index
        self.attaches: list[tuple[str, int]] = []  # (cgroup dir relative to top, program fd)
        self.closed: list[int] = []
        self.xattrs: dict[tuple[str, str], bytes] = {}  # (path relative to top, name) -> value

    def getxattr(self, path: str, name: str) -> bytes | None:
        return self.xattrs.get((self.rel(path), name))

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.top)

    def _mountpoint(self, path: str) -> str:
        return max((m for m in self.templates if path == m or path.startswith(m + "/")), key=len)

    def populate(self, d: str) -> None:
        mountpoint = self._mountpoint(d)
        files = dict(self.templates[mountpoint], **{"cgroup.procs": ""})
        if "cgroup.subtree_control" in files:  # v2: a child is offered what its parent enables
            parent = os.path.join(os.path.dirname(d), "cgroup.subtree_control")
            files["cgroup.controllers"] = read_file(parent) if d != mountpoint else "cpu io memory pids\n"
        for name, content in files.items():
            if content is DIR:
                os.mkdir(os.path.join(d, name))
            else:
                with open(os.path.join(d, name), "w") as f:
                    f.write(content)

    def mkdir(self, path: str) -> None:
        super().mkdir(path)
        self.mkdirs.append(self.rel(path))
        self.populate(path)

    def rmdir(self, path: str) -> None:
        if not os.path.isdir(path):
            raise KernelError("remove cgroup", path, errno.ENOENT)
        children = [e for e in os.scandir(path) if os.path.exists(os.path.join(e.path, "cgroup.procs"))]
        procs_file = os.path.join(path, "cgroup.procs")
        if children or (os.path.exists(procs_file) and read_file(procs_file).strip()):
            raise KernelError("remove cgroup", path, errno.EBUSY)
        shutil.rmtree(path)
        self.rmdirs.append(self.rel(path))

    def write(self, path: str, text: str) -> None:
        name = os.path.basename(path)
        err = self.fail.get(name) or self.fail_once.pop(name, None)
        if err:
            raise KernelError(f'write "{text}" to', path, err)
        d = os.path.dirname(path)
        if name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes") and os.path.exists(
                os.path.join(d, "memory.memsw.limit_in_bytes")):
            self._check_memsw(d, name, text, path)
        if name == "freezer.state" and text == "FROZEN" and self.stuck_freezing:
            text = "FREEZING"
        self.writes.append((self.rel(path), text))
        if name == "cgroup.subtree_control":  # the file keeps the set, not the "+x -y" written
            enabled = read_file(path).split()
            for word in text.split():
                enabled = [c for c in enabled if c != word[1:]] + ([word[1:]] if word[0] == "+" else [])
            text = " ".join(enabled) + "\n"
        super().write(path, text)
        if name == "cgroup.kill":
            self._empty(d)
        if name == "cgroup.freeze" and not self.stuck_freezing:
            super().write(os.path.join(d, "cgroup.events"), f"populated 0\nfrozen {text}\n")

    def _check_memsw(self, d: str, name: str, text: str, path: str) -> None:
        def value(t: str) -> float:
            return float("inf") if int(t) < 0 or int(t) >= int(MEM_UNLIMITED) else int(t)

        mem = value(read_file(os.path.join(d, "memory.limit_in_bytes")))
        memsw = value(read_file(os.path.join(d, "memory.memsw.limit_in_bytes")))
        if name == "memory.limit_in_bytes":
            mem = value(text)
        else:
            memsw = value(text)
        if memsw < mem:  # as the kernel: memory+swap may never be below memory
            raise KernelError(f'write "{text}" to', path, errno.EINVAL)

    def _empty(self, top: str) -> None:
        for d, _, files in os.walk(top):
            if "cgroup.procs" in files:
                with open(os.path.join(d, "cgroup.procs"), "w"):
                    pass

    def load_device_program(self, code: bytes) -> int:
        err = self.fail.get("bpf_prog_load")
        if err:
            raise KernelError("load cgroup device program", f"of {len(code) // 8} instructions", err)
        self.programs.append(code)
        return 1000 + len(self.programs) - 1

    def attach_device_program(self, cgroup_dir: str, prog_fd: int) -> None:
        if not os.path.isdir(cgroup_dir):
            raise KernelError("attach device program to", cgroup_dir, errno.ENOENT)
        self.attaches.append((self.rel(cgroup_dir), prog_fd))

    def close(self, fd: int) -> None:
        self.closed.append(fd)

    def kill(self, pid: int, sig: int) -> bool:
        self.kills.append((pid, sig))
        if sig == signal.SIGKILL and self.sigkill_kills:
            for d, _, files in os.walk(self.top):
                if "cgroup.procs" in files:
                    path = os.path.join(d, "cgroup.procs")
                    pids = [p for p in parse_pids(read_file(path)) if p != pid]
                    with open(path, "w") as f:
                        f.write("".join(f"{p}\n" for p in pids))
        return True


class Host:
    """A fake host: /proc files, mountinfo and a cgroup tree under tmp_path."""

    def __init__(self, tmp_path, mountinfo: list[str], proc_cgroup: list[str], templates: dict,
                 own_dirs: list[str]):
        self.top = str(tmp_path)
        self.root = os.path.join(self.top, "cgroup")
        self.mountinfo = os.path.join(self.top, "mountinfo")
        self.proc_cgroup = os.path.join(self.top, "proc_cgroup")
        with open(self.mountinfo, "w") as f:
            f.write("\n".join(line.format(root=self.root) for line in mountinfo) + "\n")
        with open(self.proc_cgroup, "w") as f:
            f.write("\n".join(proc_cgroup) + "\n")
        self.kernel = FakeKernel(self.top, {os.path.join(self.root, k) if k else self.root: dict(v)
                                            for k, v in templates.items()})  # copies: tests edit them
        self.clock = Clock()
        os.makedirs(self.root, exist_ok=True)
        for d in own_dirs:  # the pre-existing host cgroups, made "by the machine"
            path = os.path.join(self.root, d) if d else self.root
            os.makedirs(path, exist_ok=True)
            self.kernel.populate(path)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def detect(self, parent: str = "fcrun", **kw):
        kw.setdefault("io", self.kernel)
        return detect(parent, root=self.root, mountinfo=self.mountinfo, proc_cgroup=self.proc_cgroup,
                      clock=self.clock, sleep=self.clock.sleep, **kw)

    def writes(self) -> list[tuple[str, str]]:
        """Writes as (path relative to the cgroup root, text)."""
        return [(os.path.relpath(os.path.join(self.top, p), self.root), t) for p, t in self.kernel.writes]

    def all_dirs(self) -> set[str]:
        return {os.path.relpath(d, self.root) for d, _, _ in os.walk(self.root)}

    def snapshot(self) -> "Host":
        """Remember the host's own dirs: fcrun_dirs() lists what appeared since."""
        self.baseline = self.all_dirs()
        return self

    def fcrun_dirs(self) -> list[str]:
        return sorted(self.all_dirs() - self.baseline)


def v1_host(tmp_path, comount: bool = False) -> Host:
    """This machine's hybrid layout (or a co-mounted cpu,cpuacct as other hosts have)."""
    cpu = ["32 31 0:29 / {root}/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct"] if comount else [
        "32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu",
        "33 31 0:30 / {root}/cpuacct rw,relatime - cgroup cgroup rw,cpuacct",
    ]
    mountinfo = ["23 1 0:21 / /sys rw - sysfs sysfs rw",
                 "31 23 0:28 / {root} rw,relatime - tmpfs tmpfs rw,mode=755"] + cpu + [
        "34 31 0:31 / {root}/cpuset rw,relatime - cgroup cgroup rw,cpuset",
        "35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory",
        "36 31 0:33 / {root}/devices rw,relatime - cgroup cgroup rw,devices",
        "37 31 0:34 / {root}/freezer rw,relatime - cgroup cgroup rw,freezer",
        "39 31 0:36 / {root}/pids rw,relatime - cgroup cgroup rw,pids",
        "40 31 0:37 / {root}/systemd rw,relatime - cgroup cgroup rw,name=systemd",
        "41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw",
    ]
    cpu_lines = ["2:cpu,cpuacct:/"] if comount else ["2:cpuacct:/", "1:cpu:/"]
    proc = ["9:name=systemd:/", "8:pids:/", "6:freezer:/", "5:devices:/", f"4:memory:{OWN_MEMORY}", "3:cpuset:/"]
    proc += cpu_lines + ["0::/"]
    templates = dict(V1_FILES)
    if comount:
        templates["cpu,cpuacct"] = {**templates.pop("cpu"), **templates.pop("cpuacct")}
    templates["unified"] = V2_FILES
    own = list(templates) + [f"memory{OWN_MEMORY}"]
    return Host(tmp_path, mountinfo, proc, templates, own).snapshot()


def v2_host(tmp_path, own_subtree: str = "cpu memory pids") -> Host:
    """A pure v2 host; fcrun runs in a delegated service cgroup."""
    mountinfo = ["30 23 0:26 / {root} rw,nosuid,nodev,noexec shared:4 - cgroup2 cgroup2 rw,nsdelegate"]
    proc = ["0::/system.slice/fcrun.service"]
    host = Host(tmp_path, mountinfo, proc, {"": V2_FILES}, [""])
    for d in ("system.slice", "system.slice/fcrun.service"):
        with open(host.path(os.path.dirname(d) or "", "cgroup.subtree_control"), "w") as f:
            f.write("cpu io memory pids\n")
        os.mkdir(host.path(d))
        host.kernel.populate(host.path(d))
    with open(host.path("system.slice/fcrun.service/cgroup.subtree_control"), "w") as f:
        f.write(own_subtree + "\n")
    return host.snapshot()


OWN_V2 = "system.slice/fcrun.service"


def set_procs(path: str, pids: list[int]) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("".join(f"{p}\n" for p in pids))


def read_file(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# --- parsers -------------------------------------------------------------------------------


def test_parse_mountinfo_optional_fields_and_escapes():
    text = (
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 master:2 - cgroup cgroup rw,cpu,cpuacct\n"
        "41 31 0:38 /sub /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    first, second = parse_mountinfo(text)
    assert (first.mountpoint, first.fstype) == ("/sys/fs/cgroup/cpu,cpuacct", "cgroup")
    assert first.super_options == ("rw", "cpu", "cpuacct")
    assert (second.root, second.mountpoint, second.fstype) == ("/sub", "/mnt/my cgroups", "cgroup2")


def test_parse_mountinfo_rejects_garbage():
    with pytest.raises(SpecError, match="mountinfo line 1"):
        parse_mountinfo("not a mountinfo line\n")


def test_parse_proc_cgroup():
    entries = parse_proc_cgroup("2:cpu,cpuacct:/a:b\n9:name=systemd:/\n0::/user.slice\n")
    assert [(e.hierarchy_id, e.controllers, e.path) for e in entries] == [
        (2, ("cpu", "cpuacct"), "/a:b"), (9, ("name=systemd",), "/"), (0, (), "/user.slice")]
    with pytest.raises(SpecError, match="cgroup line 1"):
        parse_proc_cgroup("x:cpu\n")


def test_parse_kernel_formats():
    assert parse_flat_keyed("usage_usec 12\nnr_periods 3\n\n") == {"usage_usec": 12, "nr_periods": 3}
    with pytest.raises(SpecError):
        parse_flat_keyed("usage_usec twelve\n")
    psi = parse_psi("some avg10=1.50 avg60=0.00 avg300=0.00 total=1234\n"
                    "full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n")
    assert psi["some"] == {"avg10": 1.5, "avg60": 0.0, "avg300": 0.0, "total": 1234.0}
    assert psi["full"]["total"] == 7.0
    with pytest.raises(SpecError):
        parse_psi("some avg10\n")
    assert parse_max("max\n") is None and parse_max("42\n") == 42
    assert parse_pids("3\n1\n3\n") == [3, 1, 3]
    assert format_cpu_max(30000, 100000) == "30000 100000" and format_cpu_max(None, 100000) == "max 100000"
    assert parse_cpu_max("max 100000\n") == (None, 100000) and parse_cpu_max("30000 100000") == (30000, 100000)


# --- Limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"cpu_quota_us": 999}, "cpu_quota_us"),
    ({"cpu_period_us": 500}, "cpu_period_us"),
    ({"cpu_period_us": 2_000_000}, "cpu_period_us"),
    ({"memory_bytes": 0}, "memory_bytes"),
    ({"pids_max": 0}, "pids_max"),
    ({"pids_max": True}, "pids_max"),
])
def test_limits_reject_out_of_range(kwargs, field):
    with pytest.raises(SpecError, match=f"at limits.{field}"):
        Limits(**kwargs)


def test_limits_roundtrip_and_decode_validation():
    limits = Limits(cpu_quota_us=30_000, memory_bytes=256 << 20, pids_max=64)
    assert msgspec.json.decode(msgspec.json.encode(limits), type=Limits) == limits
    with pytest.raises(msgspec.ValidationError, match="pids_max"):
        msgspec.json.decode(b'{"pids_max": -1}', type=Limits)
    with pytest.raises(TypeError):
        Limits(30_000)  # kw_only


# --- detect() ------------------------------------------------------------------------------


def test_detect_this_machine_v1_hybrid(tmp_path):
    host = v1_host(tmp_path)
    driver = host.detect("fcrun")
    assert isinstance(driver, V1Driver) and driver.version == 1
    assert driver.parent_paths() == [
        host.path("cpu/fcrun"), host.path("cpuacct/fcrun"), host.path(f"memory{OWN_MEMORY}/fcrun"),
        host.path("pids/fcrun"), host.path("freezer/fcrun"), host.path("devices/fcrun")]
    assert driver.paths_for("web-1") == {
        "cpu": host.path("cpu/fcrun/web-1"), "cpuacct": host.path("cpuacct/fcrun/web-1"),
        "memory": host.path(f"memory{OWN_MEMORY}/fcrun/web-1"),
        "pids": host.path("pids/fcrun/web-1"), "freezer": host.path("freezer/fcrun/web-1"),
        "devices": host.path("devices/fcrun/web-1")}
    assert host.kernel.mkdirs == [] and host.kernel.writes == []  # detect only reads


def test_detect_absolute_parent_starts_at_hierarchy_root(tmp_path):
    host = v1_host(tmp_path)
    driver = host.detect("/fcrun/apps")
    assert driver.paths_for("w")["memory"] == host.path("memory/fcrun/apps/w")


def test_detect_comounted_cpu_cpuacct_share_a_dir(tmp_path):
    host = v1_host(tmp_path, comount=True)
    driver = host.detect()
    paths = driver.paths_for("w")
    assert paths["cpu"] == paths["cpuacct"] == host.path("cpu,cpuacct/fcrun/w")
    cg = driver.create("w", Limits(cpu_quota_us=30_000))
    assert cg.procs_files() == [os.path.join(host.path(d), "cgroup.procs") for d in (
        "cpu,cpuacct/fcrun/w", f"memory{OWN_MEMORY}/fcrun/w", "pids/fcrun/w", "freezer/fcrun/w", "devices/fcrun/w")]
    assert cg.limits().cpu_quota_us == 30_000
    cg.destroy()
    assert host.fcrun_dirs() == []


def test_detect_hybrid_v2_needs_no_controllers_flag(tmp_path):
    host = v1_host(tmp_path)
    with raises(MissingFeature, "Delegate=yes"):
        host.detect(version=2)
    driver = host.detect("fcrun", version=2, controllers=())
    assert isinstance(driver, V2Driver) and driver.parent_paths() == [host.path("unified/fcrun")]


def test_detect_pure_v2(tmp_path):
    host = v2_host(tmp_path)
    driver = host.detect("fcrun")
    assert isinstance(driver, V2Driver) and driver.version == 2
    assert driver.paths_for("w") == {"unified": host.path(OWN_V2, "fcrun/w")}
    assert host.detect("/fcrun").paths_for("w") == {"unified": host.path("fcrun/w")}


def test_detect_v2_not_delegated(tmp_path):
    host = v2_host(tmp_path, own_subtree="memory")
    with raises(MissingFeature, r"cpu pids delegated to .*fcrun.service/cgroup.subtree_control"):
        host.detect("fcrun")
    assert host.detect("/fcrun").version == 2  # the root enables all of them


def test_detect_refusals(tmp_path):
    host = v1_host(tmp_path)
    for parent in ("", "/", "../x", "a/../b", ".hidden"):
        with pytest.raises(SpecError, match="cgroup_parent"):
            host.detect(parent)
    with pytest.raises(SpecError, match="version"):
        host.detect(version=3)
    with pytest.raises(SpecError, match="controllers"):
        host.detect(controllers=["cpu", "net_cls"])
    with raises(MissingFeature, "v2 only"):
        os.mkdir(tmp_path / "v2")
        v2_host(tmp_path / "v2").detect(version=1)


def test_detect_missing_v1_hierarchy(tmp_path):
    host = v1_host(tmp_path)
    lines = [line for line in read_file(host.mountinfo).splitlines(True) if "rw,pids" not in line]
    write_file(host.mountinfo, "".join(lines))
    with raises(MissingFeature, "pids controller"):
        host.detect()


def test_detect_bind_mounted_subtree(tmp_path):
    """A hierarchy mounted from a sub-tree (mount root /process_api) maps paths beneath it."""
    host = v1_host(tmp_path)
    text = read_file(host.mountinfo).replace(f" / {host.root}/memory ", f" /process_api {host.root}/memory ")
    write_file(host.mountinfo, text)
    assert host.detect().paths_for("w")["memory"] == host.path("memory/437ffd/fcrun/w")
    with raises(MissingFeature, "shows only /process_api"):
        host.detect("/fcrun")


# --- create --------------------------------------------------------------------------------


def test_v1_create_writes_exactly(tmp_path):
    host = v1_host(tmp_path)
    cg = host.detect().create("web-1", Limits(cpu_quota_us=30_000, memory_bytes=256 << 20, pids_max=50))
    mem = f"memory{OWN_MEMORY}"
    assert host.kernel.mkdirs == [os.path.relpath(host.path(d), host.top) for d in (
        "cpu/fcrun", "cpuacct/fcrun", f"{mem}/fcrun", "pids/fcrun", "freezer/fcrun", "devices/fcrun",
        "cpu/fcrun/web-1", "cpuacct/fcrun/web-1", f"{mem}/fcrun/web-1", "pids/fcrun/web-1", "freezer/fcrun/web-1",
        "devices/fcrun/web-1")]
    assert host.writes() == [
        ("cpu/fcrun/web-1/cpu.cfs_period_us", "100000"),
        ("cpu/fcrun/web-1/cpu.cfs_quota_us", "30000"),
        (f"{mem}/fcrun/web-1/memory.limit_in_bytes", str(256 << 20)),  # lowering: memory first
        (f"{mem}/fcrun/web-1/memory.memsw.limit_in_bytes", str(256 << 20)),
        ("pids/fcrun/web-1/pids.max", "50"),
    ]
    assert cg.limits() == Limits(cpu_quota_us=30_000, memory_bytes=256 << 20, pids_max=50)
    assert msgspec.json.decode(msgspec.json.encode(cg.paths)) == cg.paths


def test_v1_create_without_limits_only_makes_dirs(tmp_path):
    host = v1_host(tmp_path)
    cg = host.detect().create("w", Limits())
    assert host.kernel.writes == []
    assert cg.limits() == Limits()


def test_v1_create_without_memsw_file(tmp_path):
    host = v1_host(tmp_path)
    del host.kernel.templates[host.path("memory")]["memory.memsw.limit_in_bytes"]
    host.detect().create("w", Limits(memory_bytes=64 << 20))
    assert host.writes() == [(f"memory{OWN_MEMORY}/fcrun/w/memory.limit_in_bytes", str(64 << 20))]


def test_v2_create_enables_controllers_in_the_parent_it_made(tmp_path):
    host = v2_host(tmp_path)
    driver = host.detect()
    cg = driver.create("web-1", Limits(cpu_quota_us=30_000, memory_bytes=256 << 20, pids_max=50))
    parent = f"{OWN_V2}/fcrun"
    assert host.writes() == [
        (f"{parent}/cgroup.subtree_control", "+cpu +memory +pids"),
        (f"{parent}/web-1/cpu.max", "30000 100000"),
        (f"{parent}/web-1/memory.max", str(256 << 20)),
        (f"{parent}/web-1/memory.swap.max", "0"),
        (f"{parent}/web-1/pids.max", "50"),
    ]
    assert cg.limits() == Limits(cpu_quota_us=30_000, memory_bytes=256 << 20, pids_max=50)
    # The fcrun service's own cgroup was only read, never written.
    assert not any(p.startswith(f"{OWN_V2}/cgroup.") for p, _ in host.writes())
    host.kernel.writes.clear()
    driver.create("web-2", Limits())
    assert host.kernel.writes == []  # the parent already hands the controllers down


def test_v2_existing_parent_gets_only_missing_controllers(tmp_path):
    host = v2_host(tmp_path)
    os.mkdir(host.path("fcrun"))
    host.kernel.populate(host.path("fcrun"))
    write_file(host.path("fcrun/cgroup.subtree_control"), "memory\n")
    host.detect("/fcrun").create("w", Limits())
    assert host.writes() == [("fcrun/cgroup.subtree_control", "+cpu +pids")]


def test_v2_controller_not_offered_by_parent(tmp_path):
    host = v2_host(tmp_path)
    os.mkdir(host.path("fcrun"))
    host.kernel.populate(host.path("fcrun"))
    write_file(host.path("fcrun/cgroup.controllers"), "memory\n")
    with raises(MissingFeature, "cpu pids in"):
        host.detect("/fcrun").create("w", Limits())
    assert os.listdir(host.path("fcrun")) and not os.path.exists(host.path("fcrun/w"))


def test_v2_limit_without_its_controller_writes_nothing(tmp_path):
    host = v1_host(tmp_path)
    driver = host.detect(version=2, controllers=())
    with raises(MissingFeature, "memory"):
        driver.create("w", Limits(memory_bytes=64 << 20))
    assert host.kernel.mkdirs == [] and host.fcrun_dirs() == []


def test_create_existing_name_is_already_exists(tmp_path):
    host = v1_host(tmp_path)
    driver = host.detect()
    first = driver.create("w", Limits(pids_max=5))
    with pytest.raises(AlreadyExists, match="already exists"):
        driver.create("w", Limits())
    assert first.exists() and first.limits().pids_max == 5


def test_create_partly_existing_name_removes_only_its_own_dirs(tmp_path):
    host = v1_host(tmp_path)
    driver = host.detect()
    os.makedirs(host.path("pids/fcrun/w"))  # a leftover in one hierarchy
    with pytest.raises(AlreadyExists):
        driver.create("w", Limits())
    assert host.fcrun_dirs() == ["pids/fcrun", "pids/fcrun/w"]


@pytest.mark.parametrize("name", ["", "a/b", "..", ".x", "x" * 300, "a b", "cgroup procs\n"])
def test_create_bad_name_changes_nothing(tmp_path, name):
    host = v1_host(tmp_path)
    with pytest.raises(SpecError, match="at name"):
        host.detect().create(name, Limits())
    assert host.kernel.mkdirs == []


def test_create_rolls_back_on_failed_write(tmp_path):
    host = v1_host(tmp_path)
    host.kernel.fail["pids.max"] = errno.EINVAL
    with raises(KernelError, "") as info:
        host.detect().create("w", Limits(cpu_quota_us=30_000, pids_max=5))
    assert info.value.args[0] == f'write "5" to {host.path("pids/fcrun/w/pids.max")}: [Errno 22] Invalid argument'
    assert info.value.errno == errno.EINVAL
    assert host.fcrun_dirs() == []  # the group dirs and the parents this call made


def test_create_rolls_back_when_a_limit_file_is_a_directory(tmp_path):
    host = v2_host(tmp_path)
    host.kernel.templates[host.root] = dict(V2_FILES, **{"memory.max": DIR})
    os.mkdir(host.path(OWN_V2, "fcrun"))  # a parent fcrun did not make in this call
    host.kernel.populate(host.path(OWN_V2, "fcrun"))
    with raises(KernelError, r"memory.max: \[Errno 21\] Is a directory"):
        host.detect().create("w", Limits(memory_bytes=64 << 20))
    assert host.fcrun_dirs() == [f"{OWN_V2}/fcrun", f"{OWN_V2}/fcrun/memory.max"]  # kept: not ours


def test_create_rolls_back_with_the_real_kernel_io(tmp_path):
    """Plain KernelIO on a plain tmp tree: mkdir gives no control files, so the write fails."""
    host = v1_host(tmp_path)
    driver = host.detect(io=KernelIO())
    with raises(KernelError, r"cpu.cfs_period_us: \[Errno 2\]"):
        driver.create("w", Limits(cpu_quota_us=30_000))
    assert host.fcrun_dirs() == []


# --- device rules ----------------------------------------------------------------------------

DENY_ALL_BUT_NULL = (DeviceRule(allow=False), DeviceRule(allow=True, type="c", major=1, minor=3),
                     DeviceRule(allow=True, type="c", major=136, access="rw"))


def test_v1_create_writes_device_rules_in_order(tmp_path):
    host = v1_host(tmp_path)
    cg = host.detect().create("web-1", Limits(pids_max=5, devices=DENY_ALL_BUT_NULL))
    assert host.writes() == [
        ("pids/fcrun/web-1/pids.max", "5"),
        ("devices/fcrun/web-1/devices.deny", "a"),  # first: "a" resets, and only a childless group takes it
        ("devices/fcrun/web-1/devices.allow", "c 1:3 rwm"),
        ("devices/fcrun/web-1/devices.allow", "c 136:* rw"),
    ]
    assert host.kernel.programs == []
    cg.destroy()
    assert host.fcrun_dirs() == []


def test_v1_without_the_devices_hierarchy(tmp_path):
    host = v1_host(tmp_path)
    driver = host.detect(controllers=("cpu", "cpuacct", "memory", "pids", "freezer"))
    driver.create("plain", Limits())  # no rules: the devices hierarchy is not needed
    with raises(MissingFeature, "devices"):
        driver.create("w", Limits(devices=DENY_ALL_BUT_NULL))
    assert host.fcrun_dirs() == sorted(f"{d}/fcrun{n}" for d in ("cpu", "cpuacct", f"memory{OWN_MEMORY}", "pids",
                                                                  "freezer") for n in ("", "/plain"))


def test_v1_failed_device_write_rolls_back(tmp_path):
    host = v1_host(tmp_path)
    host.kernel.fail["devices.allow"] = errno.EPERM  # as beneath a parent that denies it
    with raises(KernelError, r'write "c 1:3 rwm" to .*devices/fcrun/w/devices.allow: \[Errno 1\]'):
        host.detect().create("w", Limits(devices=DENY_ALL_BUT_NULL))
    assert host.fcrun_dirs() == []


def test_v2_loads_one_program_per_rule_set_and_attaches_it_to_each_group(tmp_path):
    host = v2_host(tmp_path)
    driver = host.detect()
    a = driver.create("a", Limits(devices=DENY_ALL_BUT_NULL))
    b = driver.create("b", Limits(devices=DENY_ALL_BUT_NULL))
    driver.create("c", Limits())  # no rules: no program
    assert host.kernel.programs == [assemble(program(DENY_ALL_BUT_NULL))]
    assert host.kernel.attaches == [(host.kernel.rel(a.dir), 1000), (host.kernel.rel(b.dir), 1000)]
    other = (DeviceRule(allow=False, type="b"),)
    driver.create("d", Limits(devices=other))
    assert len(host.kernel.programs) == 2 and host.kernel.attaches[-1][1] == 1001
    assert not any(name.startswith("devices.") for name in os.listdir(a.dir))  # v2 has no device files


def test_v2_device_program_cache_is_bounded(tmp_path):
    from fcrun.cgroups.v2 import DEVICE_PROGRAMS_KEPT

    host = v2_host(tmp_path)
    driver = host.detect()
    for minor in range(DEVICE_PROGRAMS_KEPT + 1):
        driver.create(f"w{minor}", Limits(devices=(DeviceRule(allow=False, type="c", major=1, minor=minor),)))
    assert host.kernel.closed == list(range(1000, 1000 + DEVICE_PROGRAMS_KEPT))  # closing detaches nothing
    assert len(host.kernel.attaches) == DEVICE_PROGRAMS_KEPT + 1


def test_v2_hybrid_controllerless_driver_attaches_too(tmp_path):
    # This machine: /sys/fs/cgroup/unified has no controllers, yet takes device programs.
    host = v1_host(tmp_path)
    driver = host.detect(version=2, controllers=())
    cg = driver.create("w", Limits(devices=DENY_ALL_BUT_NULL))
    assert host.kernel.attaches == [(host.kernel.rel(cg.dir), 1000)]


def test_v2_refused_program_rolls_back(tmp_path):
    host = v2_host(tmp_path)
    host.kernel.fail["bpf_prog_load"] = errno.EPERM
    with raises(KernelError, r"load cgroup device program of \d+ instructions: \[Errno 1\]"):
        host.detect().create("w", Limits(devices=DENY_ALL_BUT_NULL))
    assert host.fcrun_dirs() == []


def test_limits_devices_are_checked_and_hashable():
    assert hash(Limits(devices=DENY_ALL_BUT_NULL)) == hash(Limits(devices=DENY_ALL_BUT_NULL))
    with raises(SpecError, "at limits.devices"):
        Limits(devices=(DeviceRule(allow=True, type="x"),))


def test_load_accepts_paths_saved_before_the_devices_hierarchy(tmp_path):
    host = v1_host(tmp_path)
    driver = host.detect()
    old = {k: v for k, v in driver.paths_for("w").items() if k != "devices"}
    driver.create("w", Limits())
    shutil.rmtree(driver.paths_for("w")["devices"])  # as an older fcrun made it: no group there
    cg = driver.load(old)
    assert "devices" not in cg.paths and cg.pids() == []
    cg.destroy()
    assert host.fcrun_dirs() == []  # the parents too, devices/fcrun included: this driver made them


# --- update --------------------------------------------------------------------------------


def test_v1_update_memory_orders_memsw(tmp_path):
    host = v1_host(tmp_path)
    cg = host.detect().create("w", Limits(memory_bytes=256 << 20))
    mem = f"memory{OWN_MEMORY}/fcrun/w"
    host.kernel.writes.clear()
    cg.update(Limits(memory_bytes=512 << 20), {"memory_bytes"})  # raising: memsw first
    cg.update(Limits(memory_bytes=128 << 20), {"memory_bytes"})  # lowering: memory first
    cg.update(Limits(), {"memory_bytes"})  # unlimited: memsw first
    assert host.writes() == [
        (f"{mem}/memory.memsw.limit_in_bytes", str(512 << 20)), (f"{mem}/memory.limit_in_bytes", str(512 << 20)),
        (f"{mem}/memory.limit_in_bytes", str(128 << 20)), (f"{mem}/memory.memsw.limit_in_bytes", str(128 << 20)),
        (f"{mem}/memory.memsw.limit_in_bytes", "-1"), (f"{mem}/memory.limit_in_bytes", "-1"),
    ]


def test_v1_update_cpu(tmp_path):
    host = v1_host(tmp_path)
    cg = host.detect().create("w", Limits(cpu_quota_us=50_000, cpu_period_us=200_000))
    host.kernel.writes.clear()
    assert cg.update(Limits(cpu_quota_us=30_000), {"cpu_quota_us"}).cpu_period_us == 200_000  # period kept
    # The kernel refuses the period while the old quota does not fit it: quota goes first.
    host.kernel.fail_once["cpu.cfs_period_us"] = errno.EINVAL
    cg.update(Limits(cpu_quota_us=20_000, cpu_period_us=100_000), {"cpu_quota_us", "cpu_period_us"})
    cg.update(Limits(), {"cpu_quota_us"})  # unlimited: quota -1 first
    assert host.writes() == [
        ("cpu/fcrun/w/cpu.cfs_period_us", "200000"), ("cpu/fcrun/w/cpu.cfs_quota_us", "30000"),
        ("cpu/fcrun/w/cpu.cfs_quota_us", "20000"), ("cpu/fcrun/w/cpu.cfs_period_us", "100000"),
        ("cpu/fcrun/w/cpu.cfs_quota_us", "-1"), ("cpu/fcrun/w/cpu.cfs_period_us", "100000"),
    ]
    assert cg.limits() == Limits()


def test_v2_update_only_given_fields(tmp_path):
    host = v2_host(tmp_path)
    cg = host.detect().create("w", Limits(cpu_quota_us=50_000, cpu_period_us=200_000, pids_max=10))
    host.kernel.writes.clear()
    now = cg.update(Limits(cpu_quota_us=30_000, pids_max=99), {"cpu_quota_us"})
    assert host.writes() == [(f"{OWN_V2}/fcrun/w/cpu.max", "30000 200000")]
    assert now == Limits(cpu_quota_us=30_000, cpu_period_us=200_000, pids_max=10)
    cg.update(Limits(memory_bytes=None, pids_max=None), {"memory_bytes", "pids_max"})
    assert host.writes()[1:] == [(f"{OWN_V2}/fcrun/w/memory.max", "max"),
                                 (f"{OWN_V2}/fcrun/w/memory.swap.max", "max"),
                                 (f"{OWN_V2}/fcrun/w/pids.max", "max")]


def test_update_unknown_field_writes_nothing(tmp_path):
    host = v2_host(tmp_path)
    cg = host.detect().create("w", Limits())
    host.kernel.writes.clear()
    with pytest.raises(SpecError, match="cpu_shares"):
        cg.update(Limits(), {"cpu_shares"})
    assert host.kernel.writes == []


# --- stats, pids, kill, freeze ---------------------------------------------------------------


def test_v1_stats(tmp_path):
    host = v1_host(tmp_path)
    cg = host.detect().create("w", Limits())
    write_file(os.path.join(cg.paths["cpuacct"], "cpuacct.usage"), "2500000\n")
    write_file(os.path.join(cg.paths["cpu"], "cpu.stat"),
               "nr_periods 10\nnr_throttled 4\nthrottled_time 7000\nnr_bursts 0\nburst_time 0\n")
    write_file(os.path.join(cg.paths["memory"], "memory.usage_in_bytes"), "4096\n")
    write_file(os.path.join(cg.paths["pids"], "pids.current"), "3\n")
    write_file(os.path.join(cg.paths["freezer"], "freezer.state"), "FROZEN\n")
    assert cg.stats() == Stats(cpu_usage_us=2500, nr_periods=10, nr_throttled=4, throttled_us=7, memory_bytes=4096,
                               pids_current=3, frozen=True, cpu_pressure=None, memory_pressure=None)


def test_v2_stats(tmp_path):
    host = v2_host(tmp_path)
    cg = host.detect().create("w", Limits())
    d = cg.paths["unified"]
    write_file(os.path.join(d, "cpu.stat"), "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"
               "nr_periods 8\nnr_throttled 2\nthrottled_usec 300\n")
    write_file(os.path.join(d, "memory.current"), "8192\n")
    os.remove(os.path.join(d, "pids.current"))
    stats = cg.stats()
    assert (stats.cpu_usage_us, stats.nr_periods, stats.nr_throttled, stats.throttled_us) == (1500, 8, 2, 300)
    assert (stats.memory_bytes, stats.pids_current, stats.frozen) == (8192, 0, False)
    assert stats.cpu_pressure["some"]["avg10"] == 0.0 and stats.memory_pressure is None  # no such file here
    assert msgspec.json.decode(msgspec.json.encode(stats), type=Stats) == stats


def test_pids_union_of_hierarchies_and_child_groups(tmp_path):
    host = v1_host(tmp_path)
    cg = host.detect().create("w", Limits())
    set_procs(cg.paths["cpu"], [30, 10])
    set_procs(cg.paths["memory"], [10, 20])
    os.mkdir(os.path.join(cg.paths["pids"], "inner"))
    set_procs(os.path.join(cg.paths["pids"], "inner"), [40])
    assert cg.pids() == [10, 20, 30, 40]


def test_add_writes_every_procs_file(tmp_path):
    host = v1_host(tmp_path)
    cg = host.detect().create("w", Limits())
    cg.add(1234)
    assert [t for _, t in host.kernel.writes] == ["1234"] * 6  # cpu cpuacct memory pids freezer devices
    assert [host.path(p) for p, _ in host.writes()] == cg.procs_files()


def test_v2_kill(tmp_path):
    host = v2_host(tmp_path)
    cg = host.detect().create("w", Limits())
    set_procs(cg.paths["unified"], [7, 8])
    cg.kill(signal.SIGTERM)
    assert host.kernel.kills == [(7, signal.SIGTERM), (8, signal.SIGTERM)]
    cg.kill()
    assert host.writes()[-1] == (f"{OWN_V2}/fcrun/w/cgroup.kill", "1") and len(host.kernel.kills) == 2
    assert cg.pids() == []
    os.remove(os.path.join(cg.paths["unified"], "cgroup.kill"))  # kernel < 5.14
    set_procs(cg.paths["unified"], [9])
    cg.kill()
    assert host.kernel.kills[-1] == (9, signal.SIGKILL)


def test_v1_freeze_waits_for_frozen(tmp_path):
    host = v1_host(tmp_path)
    cg = host.detect().create("w", Limits())
    state = os.path.join(cg.paths["freezer"], "freezer.state")
    host.kernel.stuck_freezing = True
    ticks = []

    def settle():  # the kernel finishes freezing after a few polls
        ticks.append(1)
        if len(ticks) == 3:
            write_file(state, "FROZEN\n")

    host.clock.on_sleep = settle
    cg.freeze(timeout_s=1)
    assert cg.is_frozen() and len(ticks) == 3
    assert [t for p, t in host.writes()] == ["FREEZING"] * 4  # FROZEN, and again on each FREEZING poll
    cg.thaw()
    assert not cg.is_frozen()


def test_v1_freeze_timeout_thaws_again(tmp_path):
    host = v1_host(tmp_path)
    cg = host.detect().create("w", Limits())
    host.kernel.stuck_freezing = True
    with raises(KernelError, r"freeze .*freezer/fcrun/w: \[Errno 110\]"):
        cg.freeze(timeout_s=2)
    assert host.clock.now >= 2 and host.writes()[-1] == ("freezer/fcrun/w/freezer.state", "THAWED")


def test_v2_freeze_and_timeout(tmp_path):
    host = v2_host(tmp_path)
    cg = host.detect().create("w", Limits())
    cg.freeze()
    assert cg.is_frozen() and cg.stats().frozen and host.clock.now == 0
    cg.thaw()
    assert not cg.is_frozen()
    host.kernel.stuck_freezing = True
    with raises(KernelError, r"\[Errno 110\]"):
        cg.freeze(timeout_s=0.5)
    assert host.writes()[-1] == (f"{OWN_V2}/fcrun/w/cgroup.freeze", "0")


# --- destroy, load, parent -----------------------------------------------------------------


def test_v1_destroy_kills_then_thaws_then_removes(tmp_path):
    host = v1_host(tmp_path)
    driver = host.detect()
    cg = driver.create("w", Limits())
    for d in cg.dirs():
        set_procs(d, [11, 12])
    inner = os.path.join(cg.paths["freezer"], "inner")
    os.mkdir(inner)
    host.kernel.populate(inner)
    write_file(os.path.join(cg.paths["freezer"], "freezer.state"), "FROZEN\n")
    host.kernel.writes.clear()
    cg.destroy()
    assert host.kernel.kills == [(11, signal.SIGKILL), (12, signal.SIGKILL)]
    assert host.writes() == [("freezer/fcrun/w/freezer.state", "THAWED")]
    assert host.kernel.rmdirs.index(os.path.relpath(inner, host.top)) < host.kernel.rmdirs.index(
        os.path.relpath(cg.paths["freezer"], host.top))
    assert host.fcrun_dirs() == [] and not cg.exists()
    cg.destroy()  # idempotent


def test_destroy_keeps_a_parent_it_did_not_make_or_that_is_in_use(tmp_path):
    host = v2_host(tmp_path)
    driver = host.detect()
    a, b = driver.create("a", Limits()), driver.create("b", Limits())
    a.destroy()
    assert host.fcrun_dirs() == [f"{OWN_V2}/fcrun", f"{OWN_V2}/fcrun/b"]
    b.destroy()
    assert host.fcrun_dirs() == []
    os.mkdir(host.path(OWN_V2, "fcrun"))  # now made by someone else
    host.kernel.populate(host.path(OWN_V2, "fcrun"))
    other = host.detect()
    other.create("c", Limits()).destroy()
    assert host.fcrun_dirs() == [f"{OWN_V2}/fcrun"]


def test_destroy_timeout_when_processes_survive(tmp_path):
    host = v2_host(tmp_path)
    cg = host.detect().create("w", Limits())
    os.remove(os.path.join(cg.paths["unified"], "cgroup.kill"))
    set_procs(cg.paths["unified"], [5])
    host.kernel.sigkill_kills = False
    with raises(KernelError, r"destroy: 1 process\(es\) survive SIGKILL in .*\[Errno 16\]"):
        cg.destroy(timeout_s=1)
    assert len(host.kernel.kills) > 2 and cg.exists()  # re-killed while waiting


def test_load_roundtrip_and_parent_cleanup(tmp_path):
    host = v1_host(tmp_path)
    paths = msgspec.json.encode(host.detect().create("w", Limits(pids_max=7)).paths)
    other = host.detect()  # another fcrun process
    cg = other.load(msgspec.json.decode(paths))
    assert cg.limits().pids_max == 7 and cg.name == "w"
    cg.destroy()
    # This driver did not make the parents, so destroy() leaves them; the explicit call removes them.
    assert host.fcrun_dirs() == sorted(["cpu/fcrun", "cpuacct/fcrun", f"memory{OWN_MEMORY}/fcrun", "freezer/fcrun",
                                        "pids/fcrun", "devices/fcrun"])
    assert len(other.remove_parent_if_empty()) == 6
    assert host.fcrun_dirs() == []


def test_remove_parent_if_empty_keeps_a_used_parent(tmp_path):
    host = v2_host(tmp_path)
    driver = host.detect("a/b")
    cg = driver.create("w", Limits())
    assert driver.remove_parent_if_empty() == []
    cg.destroy()
    assert host.fcrun_dirs() == [] and not os.path.exists(host.path(OWN_V2, "a"))


@pytest.mark.parametrize("change", [
    lambda p: {k: v for k, v in p.items() if k != "pids"},
    lambda p: dict(p, memory=p["memory"].replace("/w", "/../w")),
    lambda p: dict(p, memory="/etc/w"),
    lambda p: dict(p, memory=os.path.dirname(os.path.dirname(p["memory"]))),  # fcrun's own cgroup
    lambda p: dict(p, pids=p["pids"].replace("/w", "/x")),
    lambda p: dict(p, cpu="relative/w"),
])
def test_load_rejects_foreign_paths(tmp_path, change):
    host = v1_host(tmp_path)
    driver = host.detect()
    with pytest.raises(SpecError, match="cgroup.paths"):
        driver.load(change(driver.paths_for("w")))


def test_update_without_read_back_writes_and_returns_none(tmp_path):
    # The fork-server's claim path: both cpu fields given, nothing read back from the kernel.
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    for host in (v1_host(tmp_path / "v1"), v2_host(tmp_path / "v2")):
        cg = host.detect().create("w", Limits(cpu_quota_us=100_000, cpu_period_us=100_000, memory_bytes=512 << 20))
        host.kernel.writes.clear()
        assert cg.update(Limits(cpu_quota_us=30_000, cpu_period_us=100_000, memory_bytes=256 << 20),
                         {"cpu_quota_us", "cpu_period_us", "memory_bytes"}, read_back=False) is None
        assert host.writes()
        assert cg.limits() == Limits(cpu_quota_us=30_000, cpu_period_us=100_000, memory_bytes=256 << 20)
