"""A container's slot: a directory filled from the host while the container runs (the pool's
docroot). Checked from inside the container, for real mounts and propagation."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from fcrun.errors import IncorrectStatus, SpecError
from fcrun.runtime.options import RunOptions, spec_from_image

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def _docroots_in_tmp(runtime, tmp_path):
    """The sites live in tmp_path: make it the docroot root, as serve's docroot_roots would."""
    runtime.docroot_roots = (str(tmp_path),)


def _exec(rt, name, script):
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        code = rt.exec(name, ["sh", "-c", script], stdio=(null, w, w))
    finally:
        os.close(w)
        os.close(null)
    with os.fdopen(r, "rb") as f:
        return code, f.read().decode()


def _start(rt, busybox, name):
    spec = spec_from_image(busybox, RunOptions(args=["sleep", "600"], network="none"), name=name)
    return rt.run(name, spec, image=busybox, detach=True, slot="/srv/site")


def test_slot_is_empty_and_read_only_until_filled_then_shows_the_host_dir(runtime, busybox, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hello from the host\n")
    _start(runtime, busybox, "slot1")

    code, out = _exec(runtime, "slot1", "ls -A /srv/site; touch /srv/site/x 2>&1; echo rc=$?")
    assert code == 0
    assert "index.html" not in out
    assert "Read-only file system" in out and "rc=1" in out

    runtime.fill_slot("slot1", str(site))
    code, out = _exec(runtime, "slot1", "cat /srv/site/index.html; grep ' /srv/site ' /proc/self/mountinfo")
    assert code == 0
    assert "hello from the host" in out
    top = [line for line in out.splitlines() if " /srv/site " in line][-1]  # the last mount is the one seen
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(top.split()[5].split(","))

    # Filled once: a container that served one site never gets another.
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(IncorrectStatus, match="already filled"):
        runtime.fill_slot("slot1", str(other))
    assert runtime.state("slot1").labels["fcrun.slot.source"] == str(site)


def test_removing_the_container_unmounts_the_slot_and_keeps_the_site(runtime, busybox, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "keep.txt").write_text("x")
    _start(runtime, busybox, "slot2")
    runtime.fill_slot("slot2", str(site))
    slot = os.path.join(runtime.states.dir("slot2"), "slot")
    with open("/proc/self/mountinfo") as f:
        assert any(slot in line for line in f)
    runtime.kill("slot2", signal.SIGKILL)
    runtime.delete("slot2", force=True)
    with open("/proc/self/mountinfo") as f:
        assert not any(slot in line for line in f)
    assert (site / "keep.txt").read_text() == "x"  # an unmount, never a recursive delete


def test_bad_fill_changes_nothing(runtime, busybox, tmp_path):
    _start(runtime, busybox, "slot3")
    with pytest.raises(SpecError, match="does not exist"):
        runtime.fill_slot("slot3", str(tmp_path / "missing"))
    with pytest.raises(SpecError, match="outside the allowed docroot roots"):
        runtime.fill_slot("slot3", "/etc")
    assert "fcrun.slot.source" not in runtime.state("slot3").labels
    plain = spec_from_image(busybox, RunOptions(args=["sleep", "600"], network="none"), name="noslot")
    runtime.run("noslot", plain, image=busybox, detach=True)
    (tmp_path / "site").mkdir()
    with pytest.raises(IncorrectStatus, match="has no slot"):
        runtime.fill_slot("noslot", str(tmp_path / "site"))
    with open("/proc/self/mountinfo") as f:
        mountpoints = [line.split()[4] for line in f]
    slot = os.path.join(runtime.states.dir("slot3"), "slot")
    assert mountpoints.count(slot) == 1  # the empty slot itself
    assert os.path.join(slot, "content") not in mountpoints  # nothing was mounted on it


def test_a_slot_filled_at_creation_is_there_for_the_first_command_read_only(runtime, busybox, tmp_path):
    """Runtime.run(slot_source=...): how serve starts an app's instance, in one step."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("there from the start\n")
    r, w = os.pipe()
    spec = spec_from_image(busybox, RunOptions(args=["sh", "-c", "cat /srv/site/index.html; touch /srv/site/x 2>&1; "
                                                     "grep ' /srv/site ' /proc/self/mountinfo"], network="none"),
                           name="slot6")
    try:
        container = runtime.run("slot6", spec, image=busybox, stdio=(w, w, w), slot="/srv/site", slot_source=str(site))
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    assert container.wait() == 0
    assert out.startswith("there from the start\n")  # the command's first read found it
    assert "Read-only file system" in out
    top = [line for line in out.splitlines() if " /srv/site " in line][-1]
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(top.split()[5].split(","))
    assert runtime.state("slot6").labels["fcrun.slot.source"] == str(site)
    runtime.delete("slot6")
    assert (site / "index.html").exists() and not (site / "x").exists()


@pytest.mark.parametrize("source, slot, error", [
    ("missing", "/srv/site", "does not exist"),
    ("/etc", "/srv/site", "outside the allowed docroot roots"),
    ("site", None, "needs a slot"),
])
def test_a_bad_slot_source_at_creation_makes_nothing(runtime, busybox, tmp_path, source, slot, error):
    (tmp_path / "site").mkdir()
    source = source if source.startswith("/") else str(tmp_path / source)
    spec = spec_from_image(busybox, RunOptions(args=["true"], network="none"), name="slot7")
    with pytest.raises(SpecError, match=error):
        runtime.run("slot7", spec, image=busybox, detach=True, slot=slot, slot_source=source)
    # Refused before the name was reserved: no state dir, so no slot, layer, cgroup or lease.
    assert "slot7" not in runtime.states.names()
    assert not os.path.exists(runtime.states.dir("slot7"))
    with open("/proc/self/mountinfo") as f:
        assert not any("slot7" in line for line in f)


def test_hand_over_applies_limits_slot_labels_and_thaws_in_one_step(runtime, busybox, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "page").write_text("for app a\n")
    _start(runtime, busybox, "slot4")
    runtime.freeze("slot4")
    state = runtime.hand_over("slot4", cpu=0.25, memory_bytes=48 << 20, slot_source=str(site),
                              labels={"fcrun.app": "a.test"}, thaw=True)
    assert state.status == "running" and runtime.state("slot4").status == "running"
    assert state.labels["fcrun.app"] == "a.test" and state.labels["fcrun.slot.source"] == str(site)
    limits = runtime.cgroup("slot4").limits()  # what the kernel has now, v1 or v2
    assert limits.cpu_quota_us == 25000 and limits.memory_bytes == 48 << 20
    row = [r for r in runtime.list() if r.name == "slot4"][0]
    assert (row.cpu, row.memory_bytes) == (0.25, 48 << 20)
    code, out = _exec(runtime, "slot4", "cat /srv/site/page")
    assert (code, out) == (0, "for app a\n")


def test_hand_over_writes_only_the_limits_that_change(runtime, busybox, tmp_path, monkeypatch):
    """A pooled instance already has the apps' default limits: a claim with them writes none,
    and a claim that changes one writes that one only (the kernel then has all of them)."""
    from fcrun.cgroups.base import Cgroup

    written = []
    real_update = Cgroup.update
    monkeypatch.setattr(Cgroup, "update", lambda self, limits, fields, **kw: (
        written.append(sorted(fields)), real_update(self, limits, fields, **kw))[1])
    site = tmp_path / "site"
    site.mkdir()
    for name in ("same", "other"):
        spec = spec_from_image(busybox, RunOptions(args=["sleep", "600"], network="none", cpu=0.5,
                                                   memory_bytes=64 << 20, pids_max=100), name=name)
        runtime.run(name, spec, image=busybox, detach=True, slot="/srv/site")
        runtime.freeze(name)
    runtime.hand_over("same", cpu=0.5, memory_bytes=64 << 20, pids_max=100, slot_source=str(site), thaw=True)
    assert written == []
    runtime.hand_over("other", cpu=0.25, memory_bytes=64 << 20, pids_max=100, slot_source=str(site), thaw=True)
    assert written == [["cpu_period_us", "cpu_quota_us"]]
    for name, quota in (("same", 50000), ("other", 25000)):
        limits = runtime.cgroup(name).limits()  # the kernel's
        assert (limits.cpu_quota_us, limits.memory_bytes, limits.pids_max) == (quota, 64 << 20, 100), name
    # `update` writes what it is given, changed or not (as `runc update` does).
    runtime.update("same", cpu=0.5)
    assert written[-1] == ["cpu_period_us", "cpu_quota_us"]


def test_a_failed_hand_over_names_the_problem(runtime, busybox, tmp_path):
    _start(runtime, busybox, "slot5")
    with pytest.raises(SpecError, match="does not exist"):
        runtime.hand_over("slot5", cpu=0.5, slot_source=str(tmp_path / "missing"), labels={"fcrun.app": "b"})
    state = runtime.state("slot5")
    assert "fcrun.app" not in state.labels  # checked before anything was changed
    assert runtime.cgroup("slot5").limits().cpu_quota_us != 50000


@pytest.mark.parametrize("how", ["hand_over", "fill_slot"])
def test_the_docroot_checked_is_the_one_mounted_whatever_is_renamed_in_between(runtime, busybox, tmp_path,
                                                                               monkeypatch, how):
    """A docroot is opened and checked once; the mount is made from that open directory. So
    a tenant that renames its docroot away after the check, and puts another directory in
    its place, does not get that other directory mounted: the container sees the files that
    were checked. (A claim used to open the path twice: both were checked, so nothing outside
    the rules got in, but the directory mounted was not the one first checked, and the walk
    was done twice.)"""
    from fcrun.runtime import lifecycle

    site, moved, swapped = tmp_path / "site", tmp_path / "site.checked", tmp_path / "swapped"
    for directory, page in ((site, "checked\n"), (swapped, "swapped in\n")):
        directory.mkdir()
        (directory / "page").write_text(page)
    _start(runtime, busybox, "slot8")
    real_fill = lifecycle.fill_slot

    def renamed_before_the_mount(*args, **kwargs):
        os.rename(site, moved)
        os.rename(swapped, site)
        return real_fill(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "fill_slot", renamed_before_the_mount)
    if how == "hand_over":
        runtime.hand_over("slot8", slot_source=str(site), labels={"fcrun.app": "a.test"})
    else:
        runtime.fill_slot("slot8", str(site))
    assert _exec(runtime, "slot8", "cat /srv/site/page") == (0, "checked\n")
    assert runtime.state("slot8").labels["fcrun.slot.source"] == str(site)


def test_a_slot_still_mounted_keeps_the_apps_files_even_under_a_path_with_a_space(tmp_path):
    """release_slot deletes files in slot/content only when nothing is mounted there: read
    from mountinfo, where the kernel writes a space as \\040. Nine stacked mounts outlast its
    eight unmounts; the app's files under them must survive."""
    from fcrun import syscalls as sc
    from fcrun.runtime.slots import release_slot, slot_content

    cdir = tmp_path / "run root with a space" / "c1"
    content = slot_content(str(cdir))
    os.makedirs(content)
    app = tmp_path / "app"
    app.mkdir()
    (app / "index.php").write_text("the app's own file\n")
    for _ in range(9):
        sc.mount(str(app).encode(), content.encode(), None, sc.MS_BIND, None)
    try:
        with pytest.raises(OSError) as busy:
            release_slot(str(cdir))  # rmdir of the still-mounted content fails
        assert busy.value.errno == errno.EBUSY
        assert (app / "index.php").read_text() == "the app's own file\n"
    finally:
        sc.umount2(content.encode(), sc.MNT_DETACH)
    release_slot(str(cdir))  # nothing mounted now: the slot's own dirs go
    assert not os.path.exists(content) and (app / "index.php").exists()
