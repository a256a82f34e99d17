"""Docroots cannot be turned against the host (docroot.py, Runtime.fill_slot).

The attacker is a tenant who can write its own docroot's parent directory (and so swap the
docroot for a symlink at any time), or whoever holds the admin token (and so picks any path).
Each attack is refused, or reaches the container defused; where it is safe, a control shows
the same step succeeding without the defence: the old way of mounting (open_tree of the path,
or an `rbind` OCI mount) with the same files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time

import pytest

from secutil import probe_mount
from fcrun import syscalls as sc
from fcrun.cmdb import NewApp, SqliteCMDB
from fcrun.docroot import attach_docroot, open_docroot
from fcrun.errors import SpecError
from fcrun.runtime.spec import Mount
from fcrun.runtime.options import RunOptions, spec_from_image
from fcrun.serve.admin_client import LocalAdmin

pytestmark = [pytest.mark.root]

SLOT = "/var/www/html"  # where apache-php serves from; any directory will do for busybox
SLOT_LABEL = "fcrun.slot.source"
DOCROOT_FLAGS = {"ro", "nosuid", "nodev", "noexec"}


@pytest.fixture
def host_mounts(runtime):
    """Mount points the test makes on the host, unmounted (last first) before the runtime
    fixture compares the host with what it was."""
    made: list[str] = []
    yield made
    for path in reversed(made):
        with contextlib.suppress(OSError):
            sc.umount2(path.encode(), sc.MNT_DETACH)


@pytest.fixture
def sites(runtime, tmp_path):
    """The docroot root of a test: tmp_path/sites, the runtime told so (serve's docroot_roots)."""
    root = tmp_path / "sites"
    root.mkdir()
    runtime.docroot_roots = (str(root),)
    return root


def _mount(made: list[str], *args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)
    made.append(args[-1])


def _start(rt, busybox, probe, name, extra_mounts=()):
    spec = spec_from_image(busybox, RunOptions(args=["sleep", "600"], network="none"), name=name)
    spec.mounts += [probe_mount(probe), *extra_mounts]
    rt.run(name, spec, image=busybox, detach=True, slot=SLOT)


def _exec(rt, name, script) -> str:
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        rt.exec(name, ["sh", "-c", script], stdio=(null, w, w))
    finally:
        os.close(w)
        os.close(null)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


def _mount_options(rt, name, mountpoint) -> set[str]:
    """The per-mount options the container sees on `mountpoint` (its topmost mount there)."""
    lines = [line.split() for line in _exec(rt, name, "cat /proc/self/mountinfo").splitlines()]
    options = [fields[5] for fields in lines if fields[4] == mountpoint]
    assert options, f"nothing is mounted on {mountpoint} in {name}"
    return set(options[-1].split(","))


def _assert_nothing_filled(rt, name) -> None:
    content = rt.slot_dir(name)
    with open("/proc/self/mountinfo") as f:
        assert content not in [line.split()[4] for line in f]
    assert SLOT_LABEL not in rt.state(name).labels
    assert _exec(rt, name, f"ls -A {SLOT}") == ""


def test_a_docroot_that_is_or_passes_through_a_symlink_is_refused(runtime, busybox, probe, sites, tmp_path,
                                                                  host_mounts):
    real = sites / "real" / "site"
    real.mkdir(parents=True)
    (real / "index.html").write_text("the site\n")
    (sites / "etc").symlink_to("/etc")  # the docroot itself a link
    (sites / "alias").symlink_to(sites / "real")  # a parent component a link, to a good place even
    _start(runtime, busybox, probe, "dr-link")

    # Control: the old fill (open_tree of the path) follows the link and clones the host's /etc.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fd = sc.open_tree(str(sites / "etc").encode(), sc.OPEN_TREE_CLONE)
    try:
        sc.move_mount(fd, str(scratch).encode())
    finally:
        os.close(fd)
    host_mounts.append(str(scratch))
    assert "passwd" in os.listdir(scratch)

    for docroot in (sites / "etc", sites / "alias" / "site", sites / "etc" / "default"):
        with pytest.raises(SpecError, match="symlink"):
            runtime.fill_slot("dr-link", str(docroot))
        with pytest.raises(SpecError, match="symlink"):
            runtime.hand_over("dr-link", slot_source=str(docroot), labels={"fcrun.app": "evil.test"})
        _assert_nothing_filled(runtime, "dr-link")
    assert "fcrun.app" not in runtime.state("dr-link").labels

    runtime.fill_slot("dr-link", str(real))  # the same directory by a path without links
    assert _exec(runtime, "dr-link", f"cat {SLOT}/index.html") == "the site\n"


def test_host_directories_and_fcrun_state_are_refused_as_docroots(runtime, busybox, probe, tmp_path):
    _start(runtime, busybox, probe, "dr-host")
    run_root, data_root = runtime.paths.run_root, runtime.paths.data_root
    # The tests' run root lies in tmp_path: a root that holds fcrun's own state, as a careless
    # docroot_roots = ["/var"] would hold /var/lib/fcrun.
    runtime.docroot_roots = (str(tmp_path),)
    refused = [
        ("/", "outside the allowed docroot roots"),
        ("/etc", "outside the allowed docroot roots"),
        ("/tmp", "outside the allowed docroot roots"),
        (str(tmp_path), "a docroot root itself"),
        (run_root, "fcrun's own"),
        (runtime.states.dir("dr-host"), "fcrun's own"),
        (runtime.slot_dir("dr-host"), "fcrun's own"),  # the slot filled with itself
    ]
    for docroot, words in refused:
        with pytest.raises(SpecError, match=words):
            runtime.fill_slot("dr-host", docroot)
        _assert_nothing_filled(runtime, "dr-host")

    runtime.docroot_roots = (os.path.dirname(str(tmp_path)),)  # where the data root lies too
    for docroot, words in [(str(tmp_path), f"holds fcrun's own {run_root}"), (data_root, "fcrun's own"),
                           (os.path.join(data_root, "images"), "fcrun's own")]:
        with pytest.raises(SpecError, match=words):
            runtime.fill_slot("dr-host", docroot)
        _assert_nothing_filled(runtime, "dr-host")

    runtime.docroot_roots = ("/srv", "/var/www")  # the defaults refuse them all as well
    for docroot in ("/srv", "/", "/etc", run_root, str(tmp_path)):
        with pytest.raises(SpecError):
            runtime.fill_slot("dr-host", docroot)
    _assert_nothing_filled(runtime, "dr-host")

    runtime.docroot_roots = (str(tmp_path),)
    (tmp_path / "site").mkdir()
    runtime.fill_slot("dr-host", str(tmp_path / "site"))  # control: a plain directory under the root


def test_submounts_come_along_with_every_flag(runtime, busybox, probe, sites, host_mounts):
    site = sites / "site"
    sub = site / "sub"
    sub.mkdir(parents=True)
    _mount(host_mounts, "-t", "tmpfs", "-o", "size=16m,mode=755", "tenant-sub", str(sub))
    for directory in (site, sub):  # a setuid-root program and a device node, on disk and on the submount
        shutil.copy(probe, directory / "suid")
        os.chmod(directory / "suid", 0o4755)
        os.mknod(directory / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (directory / "data").write_text("readable\n")

    # Control: the old `rbind` OCI mount (nosuid, nodev on its top mount only).
    _start(runtime, busybox, probe, "dr-old", [Mount(destination="/old", source=str(site),
                                                     options=["rbind", "nosuid", "nodev"])])
    assert not {"nosuid", "nodev", "noexec"} & _mount_options(runtime, "dr-old", "/old/sub")
    assert _exec(runtime, "dr-old", "/old/sub/suid open /old/sub/null r") == "ok\n"  # exec'd, device opened

    _start(runtime, busybox, probe, "dr-sub")
    runtime.fill_slot("dr-sub", str(site))
    assert DOCROOT_FLAGS <= _mount_options(runtime, "dr-sub", SLOT)
    assert DOCROOT_FLAGS <= _mount_options(runtime, "dr-sub", f"{SLOT}/sub")  # recursive, with the flags
    for directory in (SLOT, f"{SLOT}/sub"):
        assert _exec(runtime, "dr-sub", f"cat {directory}/data") == "readable\n"
        out = _exec(runtime, "dr-sub", f"{directory}/suid ids; echo rc=$?")
        assert "Permission denied" in out and "rc=126" in out, out
        assert _exec(runtime, "dr-sub", f"/probe open {directory}/null r") == "denied EACCES 13\n"
        assert _exec(runtime, "dr-sub", f"/probe open {directory}/data w") == "denied EROFS 30\n"
        out = _exec(runtime, "dr-sub", f"touch {directory}/new; echo rc=$?")
        assert "Read-only file system" in out and "rc=1" in out, out


def test_a_docroot_swapped_for_a_symlink_after_app_add_is_refused_when_mounted(runtime, busybox, probe, sites,
                                                                               tmp_path):
    tenant = sites / "tenant"
    (tenant / "share").mkdir(parents=True)
    (tenant / "share" / "index.html").write_text("tenant's\n")
    other = sites / "other"
    (other / "www").mkdir(parents=True)
    admin = LocalAdmin(SqliteCMDB(str(tmp_path / "cmdb.sqlite3")), docroot_roots=runtime.docroot_roots,
                       fcrun_roots=(runtime.paths.data_root, runtime.paths.run_root))
    try:
        app = admin.add_app(NewApp(name="t.test", image="busybox", docroot=str(tenant / "share")))
        other_app = admin.add_app(NewApp(name="o.test", image="busybox", docroot=str(other / "www")))
    finally:
        admin.close()
    _start(runtime, busybox, probe, "dr-swap")

    # The tenant swaps its docroot for a link to the host's /etc ...
    os.rename(tenant / "share", tenant / "share.old")
    (tenant / "share").symlink_to("/etc")
    with pytest.raises(SpecError, match="symlink"):
        runtime.fill_slot("dr-swap", app.docroot)
    _assert_nothing_filled(runtime, "dr-swap")
    # ... or its own directory (the docroot's parent) for a link to /usr: share is /usr/share then.
    (tenant / "share").unlink()
    os.rename(tenant / "share.old", tenant / "share")
    os.rename(tenant, sites / "tenant.old")
    (sites / "tenant").symlink_to("/usr")
    with pytest.raises(SpecError, match="symlink"):
        runtime.hand_over("dr-swap", slot_source=app.docroot, labels={"fcrun.app": app.name})
    _assert_nothing_filled(runtime, "dr-swap")

    runtime.fill_slot("dr-swap", other_app.docroot)  # control: an untouched docroot still mounts


def test_host_mounts_made_later_under_a_shared_docroot_stay_out(runtime, busybox, probe, sites, tmp_path,
                                                                 host_mounts):
    site = sites / "shared"
    (site / "late").mkdir(parents=True)
    _mount(host_mounts, "--bind", str(site), str(site))
    subprocess.run(["mount", "--make-shared", str(site)], check=True)  # as systemd makes every mount
    _start(runtime, busybox, probe, "dr-prop")
    runtime.fill_slot("dr-prop", str(site))

    # Control: a copy made the old way (open_tree, propagation left as it was) stays a peer.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fd = sc.open_tree(str(site).encode(), sc.OPEN_TREE_CLONE)
    try:
        sc.move_mount(fd, str(scratch).encode())
    finally:
        os.close(fd)
    host_mounts.append(str(scratch))

    _mount(host_mounts, "-t", "tmpfs", "-o", "size=1m", "late", str(site / "late"))  # exec, suid, dev, rw
    (site / "late" / "file").write_text("late\n")
    assert os.listdir(scratch / "late") == ["file"]  # the old copy got it, with its flags
    assert _exec(runtime, "dr-prop", f"ls -A {SLOT}/late; grep -c ' {SLOT}/late ' /proc/self/mountinfo") == "0\n"


def test_an_idmapped_docroot_shows_its_files_through_the_user_namespace(runtime, sites, tmp_path, host_mounts):
    site = sites / "site"
    site.mkdir()
    (site / "root-owned").write_text("x")
    (site / "user-owned").write_text("x")
    os.chown(site / "user-owned", 1000, 1000)
    holder = subprocess.Popen(["unshare", "--user", "sleep", "60"])
    try:
        ns = f"/proc/{holder.pid}/ns/user"
        deadline = time.monotonic() + 5
        while os.readlink(ns) == os.readlink("/proc/self/ns/user"):  # until unshare has run
            assert time.monotonic() < deadline, "unshare --user did not make a user namespace"
            time.sleep(0.01)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{name}", "w") as f:
                f.write("0 100000 65536\n")
        userns_fd = os.open(ns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fd = open_docroot(str(site), runtime.docroot_roots)
            try:
                for view, userns in (("plain", -1), ("mapped", userns_fd)):
                    (tmp_path / view).mkdir()
                    attach_docroot(fd, str(tmp_path / view), userns)
                    host_mounts.append(str(tmp_path / view))
            finally:
                os.close(fd)
        finally:
            os.close(userns_fd)
    finally:
        holder.kill()
        holder.wait()
    owners = {view: (os.stat(tmp_path / view / "root-owned").st_uid, os.stat(tmp_path / view / "user-owned").st_uid)
              for view in ("plain", "mapped")}
    assert owners == {"plain": (0, 1000), "mapped": (100000, 101000)}
    with open("/proc/self/mountinfo") as f:
        mapped = [line.split() for line in f if line.split()[4] == str(tmp_path / "mapped")][0]
    assert DOCROOT_FLAGS | {"idmapped"} <= set(mapped[5].split(","))
