"""The cgroup layer on the real kernel, as root: real groups, real processes, real limits.

Each test gets its own parent (``fcrun-test-<pid>``, beneath the cgroup pytest runs in) and a
cleanup registry that destroys every cgroup and reaps every process it started, even when the
test fails, and then checks that no dir of ours is left.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest

from fcrun.cgroups import Cgroup, CgroupDriver, KernelIO, Limits, detect
from fcrun.errors import AlreadyExists, KernelError, MissingFeature
from polling import running, wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates real cgroups"),
    pytest.mark.skipif(not os.path.isdir("/sys/fs/cgroup"), reason="no cgroup filesystem at /sys/fs/cgroup"),
]

PARENT = f"fcrun-test-{os.getpid()}"
BURN = "import sys\nwhile True:\n    pass\n"


class Registry:
    """What a test made; ``close()`` undoes all of it, in the order that cannot hang."""

    def __init__(self):
        self.drivers: list[CgroupDriver] = []
        self.cgroups: list[Cgroup] = []
        self.procs: list[subprocess.Popen] = []

    def driver(self, **kw) -> CgroupDriver:
        try:
            driver = detect(PARENT, **kw)
        except MissingFeature:
            # A v2 host that does not delegate to pytest's cgroup: build from the root instead.
            driver = detect("/" + PARENT, **kw)
        self.drivers.append(driver)
        return driver

    def create(self, driver: CgroupDriver, name: str, limits: Limits) -> Cgroup:
        cg = driver.create(name, limits)
        self.cgroups.append(cg)
        return cg

    def spawn(self, code: str, cg: Cgroup | None = None) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.procs.append(proc)
        if cg is not None:
            cg.add(proc.pid)
        return proc

    def close(self) -> None:
        errors = []
        # Destroy first: it kills and thaws; killing a v1-frozen process alone would hang wait().
        for cg in self.cgroups:
            try:
                cg.destroy()
            except Exception as exc:  # keep cleaning up; report below
                errors.append(exc)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                if stream:
                    stream.close()
        for driver in self.drivers:
            driver.remove_parent_if_empty()
        left = [p for d in self.drivers for p in d.parent_paths(d.extra_keys) if os.path.exists(p)]
        assert not errors, errors
        assert not left, f"cgroup dirs left behind: {left}"


@pytest.fixture
def reg():
    registry = Registry()
    yield registry
    registry.close()


@pytest.fixture
def driver(reg) -> CgroupDriver:
    return reg.driver()


def cpu_usage_us(cg: Cgroup) -> int:
    return cg.stats().cpu_usage_us


def measure_cpu(cg: Cgroup, seconds: float) -> float:
    """CPUs used by the group over ``seconds`` of wall time."""
    u0, t0 = cpu_usage_us(cg), time.monotonic()
    time.sleep(seconds)
    u1, t1 = cpu_usage_us(cg), time.monotonic()
    return (u1 - u0) / 1e6 / (t1 - t0)


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def test_create_places_groups_beneath_our_own_cgroup(reg, driver):
    cg = reg.create(driver, "place", Limits())
    with open("/proc/self/cgroup") as f:
        own = dict((line.split(":", 2)[1], line.split(":", 2)[2]) for line in f.read().splitlines())
    for key, path in cg.paths.items():
        assert os.path.isdir(path) and path.endswith(f"/{PARENT}/place")
        if driver.version == 1 and key in own:
            assert path.endswith(f"{own[key].rstrip('/')}/{PARENT}/place")
    with pytest.raises(AlreadyExists):
        driver.create("place", Limits())
    assert all(os.path.isdir(p) for p in cg.paths.values())


def test_limits_read_back_and_update(reg, driver):
    cg = reg.create(driver, "limits", Limits(cpu_quota_us=30_000, memory_bytes=64 << 20, pids_max=20))
    assert cg.limits() == Limits(cpu_quota_us=30_000, memory_bytes=64 << 20, pids_max=20)
    if driver.version == 1:
        assert read(os.path.join(cg.paths["cpu"], "cpu.cfs_quota_us")) == "30000"
        memsw = os.path.join(cg.paths["memory"], "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):
            assert read(memsw) == str(64 << 20)
    else:
        assert read(os.path.join(cg.paths["unified"], "cpu.max")) == "30000 100000"
    # The real kernel refuses memsw < memory at every step: raise, lower, lift.
    for memory_bytes in (256 << 20, 32 << 20, None):
        assert cg.update(Limits(memory_bytes=memory_bytes), {"memory_bytes"}).memory_bytes == memory_bytes
    now = cg.update(Limits(cpu_quota_us=20_000, cpu_period_us=50_000), {"cpu_quota_us", "cpu_period_us"})
    assert (now.cpu_quota_us, now.cpu_period_us, now.pids_max) == (20_000, 50_000, 20)
    assert cg.update(Limits(), {"cpu_quota_us", "pids_max"}) == Limits(cpu_period_us=50_000)


def test_failed_write_rolls_back_on_the_real_kernel(reg):
    class FailPidsMax(KernelIO):
        def write(self, path: str, text: str) -> None:
            if path.endswith("/pids.max"):
                raise KernelError(f'write "{text}" to', path, errno.EINVAL)
            super().write(path, text)

    driver = reg.driver(io=FailPidsMax())
    with pytest.raises(KernelError) as info:
        driver.create("rollback", Limits(cpu_quota_us=30_000, pids_max=5))
    assert "pids.max" in info.value.args[0]
    assert not any(os.path.exists(p) for p in driver.parent_paths())


@pytest.mark.slow
def test_cpu_quota_0_3_gives_about_30_percent(reg, driver):
    cg = reg.create(driver, "cpu", Limits(cpu_quota_us=30_000))
    reg.spawn(BURN, cg)
    time.sleep(0.3)  # past interpreter start-up
    used = measure_cpu(cg, 2.0)
    assert 0.2 <= used <= 0.4, used
    assert cg.stats().nr_throttled > 0


@pytest.mark.slow
def test_freeze_stops_progress_and_thaw_resumes(reg, driver):
    cg = reg.create(driver, "freeze", Limits())
    proc = reg.spawn(BURN, cg)
    time.sleep(0.3)
    cg.freeze()
    assert cg.is_frozen() and cg.stats().frozen
    assert measure_cpu(cg, 0.5) < 0.02
    assert cg.pids() == [proc.pid]
    cg.thaw()
    assert not cg.is_frozen()
    # Progress resumed. (Not a share check: other work on a 2-core machine may take most of it.)
    assert measure_cpu(cg, 0.5) > 0.05


def test_pids_max_stops_a_fork_loop(reg, driver):
    code = (
        "import os, sys, time\n"
        "sys.stdin.readline()\n"
        "kids = []\n"
        "try:\n"
        "    while len(kids) < 50:\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        kids.append(pid)\n"
        "    err = 'none'\n"
        "except BlockingIOError:\n"
        "    err = 'EAGAIN'\n"
        "print(len(kids), err, flush=True)\n"
        "sys.stdin.readline()\n"
    )
    cg = reg.create(driver, "pids", Limits(pids_max=5))
    proc = reg.spawn(code, cg)
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().split() == [b"4", b"EAGAIN"]  # itself + 4 children = 5
    assert cg.stats().pids_current == 5 and len(cg.pids()) == 5


def test_memory_limit_kills_a_hog(reg, driver):
    cg = reg.create(driver, "memory", Limits(memory_bytes=64 << 20))
    hog = reg.spawn("import sys\nsys.stdin.readline()\nchunks = [b'x' * (1 << 20) for _ in range(512)]\n", cg)
    hog.stdin.write(b"go\n")
    hog.stdin.flush()
    assert hog.wait(timeout=30) == -signal.SIGKILL  # the OOM killer of the group, no swap to escape to


def _self_joined(reg, files: list[str]) -> subprocess.Popen:
    """A process that wrote b"0" to each of `files` between fork and exec, single-threaded, as
    a container's child (and an exec's) does."""
    def join():
        for path in files:
            fd = os.open(path, os.O_WRONLY)
            os.write(fd, b"0")
            os.close(fd)

    proc = subprocess.Popen(["sleep", "60"], preexec_fn=join)
    reg.procs.append(proc)
    return proc


def test_child_joins_through_procs_files(reg, driver):
    cg = reg.create(driver, "join", Limits())
    proc = _self_joined(reg, cg.procs_files())
    assert cg.pids() == [proc.pid]
    with open(f"/proc/{proc.pid}/cgroup") as f:
        text = f.read()
    assert f"/{PARENT}/join" in text


def test_a_process_joins_itself_through_join_files_in_every_hierarchy(reg, driver):
    """On v1 the join files are the groups' `tasks` files (a self-join waits for no grace period)."""
    cg = reg.create(driver, "selfjoin", Limits())
    files = cg.join_files()
    assert [os.path.basename(f) for f in files] == ["tasks" if driver.version == 1 else "cgroup.procs"] * len(cg.dirs())
    assert driver.self_join_is_cheap == (driver.version == 1)
    proc = _self_joined(reg, files)
    for d in cg.dirs():  # each hierarchy, not only their union
        with open(os.path.join(d, "cgroup.procs")) as f:
            assert f.read().split() == [str(proc.pid)], d


def test_destroy_a_frozen_group_leaves_nothing(reg, driver):
    cg = reg.create(driver, "destroy", Limits(pids_max=10))
    procs = [reg.spawn("import time\ntime.sleep(60)\n", cg) for _ in range(3)]
    cg.freeze()
    cg.destroy()
    assert [p.wait(timeout=5) for p in procs] == [-signal.SIGKILL] * 3
    assert not any(os.path.exists(p) for p in cg.paths.values())
    assert not any(os.path.exists(p) for p in driver.parent_paths())  # we made the parent: gone
    cg.destroy()  # idempotent


def test_load_in_another_driver_and_remove_parent(reg, driver):
    cg = reg.create(driver, "load", Limits(pids_max=7))
    proc = reg.spawn("import time\ntime.sleep(60)\n", cg)
    paths = msgspec.json.decode(msgspec.json.encode(cg.paths))
    other = reg.driver()
    loaded = other.load(paths)
    assert loaded.pids() == [proc.pid] and loaded.limits().pids_max == 7
    loaded.destroy()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert all(os.path.isdir(p) for p in other.parent_paths())  # not made by `other`
    other.remove_parent_if_empty()
    assert not any(os.path.exists(p) for p in other.parent_paths())


def _v2_driver(reg) -> CgroupDriver:
    try:
        return reg.driver(version=2, controllers=())
    except MissingFeature as exc:
        pytest.skip(f"no usable cgroup2 mount: {exc.args[0]}")


@pytest.mark.slow
def test_v2_freeze_thaw_kill(reg):
    """On a hybrid host: the controller-less cgroup2 tree still freezes, kills and accounts."""
    driver = _v2_driver(reg)
    cg = reg.create(driver, "v2", Limits())
    proc = reg.spawn(BURN, cg)
    time.sleep(0.3)
    cg.freeze()
    assert cg.is_frozen()
    assert measure_cpu(cg, 0.5) < 0.02
    cg.thaw()
    # Progress resumed. (Not a share check: other work on a 2-core machine may take most of it.)
    assert measure_cpu(cg, 0.5) > 0.05
    stats = cg.stats()
    if os.path.exists(os.path.join(cg.paths["unified"], "cpu.pressure")):
        assert set(stats.cpu_pressure) >= {"some"}
    cg.kill()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert cg.pids() == []
    cg.destroy()
    assert not any(os.path.exists(p) for p in driver.parent_paths())


def test_v2_destroy_frozen(reg):
    driver = _v2_driver(reg)
    cg = reg.create(driver, "v2frozen", Limits())
    proc = reg.spawn("import time\ntime.sleep(60)\n", cg)
    cg.freeze()
    cg.destroy()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert not os.path.exists(cg.paths["unified"])


# --- linux.cgroupsPath and the hierarchies a group joins only when asked (placement.py) ---------

def _v1_only(driver: CgroupDriver) -> None:
    if driver.version != 1 or "cpuset" not in driver.keys:
        pytest.skip("a cgroup v1 cpuset hierarchy (this host's layout)")


def test_v1_cpuset_group_gets_its_parents_cpus_and_mems_so_a_process_can_join(reg, driver):
    _v1_only(driver)
    cg = driver.create("cs", Limits(), extra=("cpuset",))
    reg.cgroups.append(cg)
    parent = os.path.dirname(cg.paths["cpuset"])
    for name in ("cpuset.cpus", "cpuset.mems"):
        assert read(os.path.join(cg.paths["cpuset"], name)) == read(os.path.join(parent, name)) != ""
    proc = reg.spawn("import time; time.sleep(60)", cg)  # ENOSPC here if cpus or mems were empty
    assert str(proc.pid) in read(os.path.join(cg.paths["cpuset"], "cgroup.procs")).split()


def test_an_absolute_cgroups_path_is_made_at_each_root_and_removed_whole(reg, driver):
    _v1_only(driver)
    top = f"{PARENT}-abs"
    cg = driver.create("ignored", Limits(pids_max=7), at=f"/{top}/c1")
    reg.cgroups.append(cg)
    assert cg.paths["pids"] == f"/sys/fs/cgroup/pids/{top}/c1" and read(os.path.join(cg.paths["pids"], "pids.max")) == "7"
    reg.spawn("import time; time.sleep(60)", cg)
    again = driver.load(cg.paths, cg.created)  # as a delete in another process loads it
    again.destroy()
    assert not any(os.path.exists(f"/sys/fs/cgroup/{k}/{top}") for k in ("cpu", "memory", "pids", "freezer", "devices"))


def test_add_controllers_moves_every_process_of_a_live_group(reg, driver):
    _v1_only(driver)
    from fcrun.cgroups.placement import add_controllers

    cg = reg.create(driver, "live", Limits())
    procs = [reg.spawn("import time; time.sleep(60)", cg) for _ in range(2)]
    add_controllers(driver, cg, ["cpuset"], name="live")
    assert sorted(read(os.path.join(cg.paths["cpuset"], "cgroup.procs")).split()) == sorted(str(p.pid) for p in procs)
    assert not cg.is_frozen()


# --- a cgroup systemd delegated: serve moves into a supervisor leaf (delegation.py) -----------

# As `fcrun serve` under a Delegate=yes unit: started in the unit's cgroup, it moves into a
# supervisor leaf, then makes a container group (beside the leaf) and removes it again.
DELEGATED_CHILD = """
import json, os, sys
from fcrun.cgroups import Limits, detect, enter_supervisor
unit, root = sys.argv[1], sys.argv[2]
with open(os.path.join(unit, "cgroup.procs"), "w") as f:  # systemd starts the service in its cgroup
    f.write(str(os.getpid()))
leaf = enter_supervisor(root=root)
with open("/proc/self/cgroup") as f:
    own = [line.split(":", 2)[2].strip() for line in f if line.startswith("0::")][0]
driver = detect("fcrun", root=root, controllers=())
cg = driver.create("c1", Limits())
made = {"leaf": leaf, "own": own, "group": cg.paths["unified"], "exists": os.path.isdir(cg.paths["unified"])}
cg.destroy()
driver.remove_parent_if_empty()
print(json.dumps(made))
"""


def _cgroup2_root() -> str:
    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if os.path.exists(os.path.join(root, "cgroup.procs")) and os.path.exists(os.path.join(root, "cgroup.subtree_control")):
            return root
    pytest.skip("no cgroup2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified")


@pytest.mark.parametrize("delegated", [True, False], ids=["delegated", "not-delegated"])
def test_serve_in_a_delegated_cgroup_moves_into_a_supervisor_leaf_and_builds_beside_it(delegated):
    """The real move on this host's cgroup2 tree (the hybrid host's has no controllers, so the
    "no internal processes" rule itself is not met here; tests/unit/test_cgroups_delegation.py
    checks what is enabled where)."""
    root = _cgroup2_root()
    with open("/proc/self/cgroup") as f:
        own = [line.split(":", 2)[2].strip() for line in f if line.startswith("0::")][0]
    unit = os.path.join(root, own.lstrip("/"), f"{PARENT}-unit")
    os.mkdir(unit)
    child = None
    try:
        if delegated:
            os.setxattr(unit, "trusted.delegate", b"1")  # what systemd >= 251 marks a Delegate=yes unit with
        child = subprocess.run([sys.executable, "-c", DELEGATED_CHILD, unit, root], capture_output=True,
                               text=True, timeout=60)
        assert child.returncode == 0, child.stderr
        made = msgspec.json.decode(child.stdout)
        unit_path = "/" + os.path.relpath(unit, root)
        if delegated:
            assert made["leaf"] == os.path.join(unit, "supervisor")
            assert made["own"] == unit_path + "/supervisor"
        else:
            assert made["leaf"] is None and made["own"] == unit_path  # not delegated: not moved
        assert made["group"] == os.path.join(unit, "fcrun", "c1") and made["exists"]
        assert not os.path.exists(os.path.join(unit, "fcrun"))  # the driver removed what it made
    finally:
        supervisor = os.path.join(unit, "supervisor")
        if os.path.exists(supervisor):
            os.rmdir(supervisor)  # the child has exited: empty
        for d in (os.path.join(unit, "fcrun", "c1"), os.path.join(unit, "fcrun")):
            if os.path.exists(d):
                os.rmdir(d)
        os.rmdir(unit)


# --- the move primer (cgroups/primer.py) ---------------------------------------------------------

def test_the_move_primer_lives_in_a_group_of_its_own_and_close_leaves_nothing(reg, driver):
    from fcrun.cgroups.primer import MovePrimer, is_group_name

    primer = MovePrimer(driver)
    try:
        group = primer.cgroup
        assert is_group_name(group.name) and group.pids() == [primer.pid]
        with open(f"/proc/{primer.pid}/cgroup") as f:
            assert f"/{group.name}\n" in f.read()  # in it in the hierarchies, beneath our parent
        primer.prime()
        primer.prime()  # while it primes: never blocks, never raises
        time.sleep(0.1)  # past PRIME_FOR_S: it moved itself where it was, and is there still
        assert group.pids() == [primer.pid] and running(primer.pid)
    finally:
        primer.close()
    assert not running(primer.pid)
    assert not any(os.path.exists(d) for d in group.dirs())


def test_a_primed_primer_moves_itself_in_and_holds_none_of_its_owners_stdio(reg, driver):
    """`fcrun run`'s primer (primed=True): its own first write moves it into its group (the
    owner moves nobody, so waits for no grace period), it holds none of the owner's stdio (a
    reader of `fcrun run`'s output sees EOF when fcrun exits), and close() leaves nothing."""
    from fcrun.cgroups.primer import MovePrimer

    primer = MovePrimer(driver, primed=True)
    try:
        group = primer.cgroup
        wait_until("the primer in its group", lambda: group.pids() == [primer.pid])
        assert os.getpid() not in group.pids()
        assert {os.readlink(f"/proc/{primer.pid}/fd/{n}") for n in (0, 1, 2)} == {os.devnull}
    finally:
        primer.close()
    assert not running(primer.pid)
    assert not any(os.path.exists(d) for d in group.dirs())


def test_a_dead_primers_group_is_stale_and_a_live_ones_is_not(reg, driver):
    from fcrun.cgroups.primer import MovePrimer, remove_stale

    dead = MovePrimer(driver)
    try:
        os.kill(dead.pid, signal.SIGKILL)  # as when its fork-server is killed (PDEATHSIG)
        os.waitpid(dead.pid, 0)
        dead.prime()  # it is gone: the write fails once, is logged, and priming stops
        dead.prime()
        assert remove_stale(driver) == [dead.cgroup.name]  # `fcrun gc` and a new fork-server do this
        assert not any(os.path.exists(d) for d in dead.cgroup.dirs())
    finally:
        dead.close()  # its group is gone already, its process reaped: nothing more to do
    live = MovePrimer(driver)
    try:
        assert remove_stale(driver) == []  # another fork-server's primer, alive: left alone
        assert live.cgroup.pids() == [live.pid]
    finally:
        live.close()


def test_gc_removes_a_dead_primers_group_and_then_the_unused_parent(runtime):
    """What `fcrun gc` does after a fork-server was killed and nothing else is left (the
    runtime fixture then checks that the host holds nothing of ours, the parent included)."""
    from fcrun.cgroups.primer import MovePrimer

    primer = MovePrimer(runtime.cgroups)
    os.kill(primer.pid, signal.SIGKILL)
    os.waitpid(primer.pid, 0)
    assert runtime.gc() == [f"cgroup:{primer.cgroup.name}"]
    assert not any(os.path.exists(d) for d in primer.cgroup.dirs())
    assert not any(os.path.exists(p) for p in runtime.cgroups.parent_paths())
    primer.close()  # nothing left to wait for or remove
