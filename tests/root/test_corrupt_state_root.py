"""Corrupt and full on-disk state, on the real kernel: a torn or garbage container state file,
leases file, CMDB row or CMDB file each gives an error naming it, and the rest keeps working
(`fcrun ps`, `fcrun gc`, the fork-server's start, serve's start and the other apps); a full
data root or run root fails writes with "no space left" naming the file, and loses nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys

import msgspec
import pytest
from hostcheck import BRIDGE, CGROUP_PARENT, SUBNET, host_snapshot, settled_snapshot
from polling import wait_until
from serving import serving

from fcrun import RunOptions, spec_from_image
from fcrun.cmdb import App, CMDBError, SqliteCMDB
from fcrun.errors import KernelError
from fcrun.forkserver import Client
from fcrun.forkserver import protocol as p
from fcrun.paths import Paths
from fcrun.runtime import Runtime
from fcrun.runtime.state import proc_start_time

pytestmark = [pytest.mark.root]


def _torn(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _mistyped(data: bytes) -> bytes:
    doc = msgspec.json.decode(data)
    doc["pid"] = "one"
    return msgspec.json.encode(doc)


CORRUPTIONS = {
    "empty": lambda data: b"",
    "garbage": lambda data: os.urandom(300),
    "torn": _torn,
    "mistyped": _mistyped,
}


@pytest.fixture
def env(runtime, data_root, run_root):
    return dict(os.environ, FCRUN_ROOT=data_root, FCRUN_RUN=run_root, FCRUN_CGROUP_PARENT=CGROUP_PARENT,
                FCRUN_BRIDGE=BRIDGE, FCRUN_SUBNET=SUBNET)


def fcrun(env, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "fcrun_cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def sleeper(rt, image, name):
    spec = spec_from_image(image, RunOptions(args=["sleep", "1000"]), name=name)
    rt.run(name, spec, image=image, detach=True)
    return rt.state(name)


def corrupt(path: str, how) -> bytes:
    with open(path, "rb") as f:
        bad = how(f.read())
    with open(path, "wb") as f:
        f.write(bad)
    return bad


def state_file(rt, name: str) -> str:
    return os.path.join(rt.states.dir(name), "state.json")


def quarantined(rt) -> dict[str, bytes]:
    """What was moved to <containers>/.quarantine; removed, so the host check sees no leftover."""
    where = os.path.join(rt.states.root, ".quarantine")
    found = {}
    for entry in sorted(os.listdir(where)) if os.path.isdir(where) else []:
        with open(os.path.join(where, entry), "rb") as f:
            found[entry] = f.read()
    shutil.rmtree(where, ignore_errors=True)
    return found


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_state_file_is_named_quarantined_and_gc_reclaims_its_container(runtime, busybox, env, kind):
    """The container is lost to fcrun (its state was all that said what it holds), so gc
    reclaims it by name: its processes (its cgroup), veth and lease go; the others stay."""
    victim = sleeper(runtime, busybox, "victim")
    other = sleeper(runtime, busybox, "other")
    bad = corrupt(state_file(runtime, "victim"), CORRUPTIONS[kind])

    ps = fcrun(env, "ps")
    assert ps.returncode == 0, ps.stderr
    assert f"container state {state_file(runtime, 'victim')} is corrupt" in ps.stderr
    rows = {line.split()[0]: line.split()[1] for line in ps.stdout.splitlines()[1:]}
    assert rows == {"other": "running", "victim": "creating"}
    [(moved, content)] = quarantined(runtime).items()
    assert moved.startswith("victim.state.json.corrupt-") and content == bad

    gc = fcrun(env, "gc")
    assert gc.returncode == 0, gc.stderr
    assert "removed victim" in gc.stdout.splitlines() and "removed lease:victim" in gc.stdout.splitlines()
    wait_until("the lost container's processes to be killed", lambda: proc_start_time(victim.pid) == 0)
    assert not any(os.path.exists(p) for p in victim.cgroup_paths.values())
    assert runtime.network.ipam.leases() == {"other": other.network.ip}
    assert [c.name for c in runtime.list()] == ["other"] and runtime.state("other").status == "running"
    runtime.kill("other", signal.SIGKILL)  # and it is still managed as before
    wait_until("other to stop", lambda: runtime.state("other").status == "stopped")


def test_the_fork_server_starts_over_a_corrupt_state_and_a_corrupt_leases_file(runtime, busybox, env, data_root,
                                                                                run_root, tmp_path):
    victim = sleeper(runtime, busybox, "victim")
    other = sleeper(runtime, busybox, "other")
    corrupt(state_file(runtime, "victim"), CORRUPTIONS["garbage"])
    leases = runtime.network.ipam.path
    corrupt(leases, _torn)
    log = open(tmp_path / "forkserver.log", "w+")
    socket_path = os.path.join(run_root, "fs-test.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcrun.forkserver", "--socket", socket_path,
         "--data-root", data_root, "--run-root", run_root, "--cgroup-parent", CGROUP_PARENT, "--bridge", BRIDGE,
         "--subnet", SUBNET],
        env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready "), (tmp_path / "forkserver.log").read_text()
        with Client(socket_path) as client:  # it answers (and its SIGTERM handler is in place)
            assert isinstance(client.request(p.Status()), p.PoolStatus)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        proc.stdout.close()
        log.close()
    text = (tmp_path / "forkserver.log").read_text()
    assert rc == 0, text
    assert f"container state {state_file(runtime, 'victim')} is corrupt" in text
    assert f"leases file {leases} is corrupt" in text and "rebuilt 1 leases from the containers' states" in text
    assert runtime.network.ipam.leases() == {"other": other.network.ip}  # rebuilt: other keeps its address
    wait_until("the lost container's processes to be killed", lambda: proc_start_time(victim.pid) == 0)
    assert [c.name for c in runtime.list()] == ["other"]
    assert any(n.startswith(os.path.basename(leases) + ".corrupt-") for n in os.listdir(os.path.dirname(leases)))
    quarantined(runtime)


@pytest.mark.slow
def test_serve_starts_over_a_garbage_app_row_state_and_leases_file_and_serves_the_other_apps(tmp_path, apache_php):
    with serving(tmp_path, apache_php, "[forkserver]\npool_size = 0\n") as srv:
        site = tmp_path / "site"
        site.mkdir()
        (site / "index.php").write_text("<?php echo 'good says hi';")
        srv.cli("app", "add", "good.test", "--image", "apache-php", "--docroot", str(site))
        srv.cli("app", "add", "bad.test", "--image", "apache-php", "--docroot", str(site))
        cmdb = os.path.join(srv.data_root, "cmdb.sqlite3")
        conn = sqlite3.connect(cmdb, isolation_level=None)
        conn.execute("UPDATE apps SET env = '[\"A=' WHERE name = 'bad.test'")
        conn.close()
        ghost = os.path.join(srv.run_root, "containers", "ghost")  # a crashed instance's torn state
        os.makedirs(ghost, mode=0o700)
        with open(os.path.join(ghost, "state.json"), "wb") as f:
            f.write(b'{"name":"ghost","status":"runn')
        leases = os.path.join(srv.run_root, "network", f"leases-{BRIDGE}.json")
        os.makedirs(os.path.dirname(leases), mode=0o700)
        with open(leases, "wb") as f:
            f.write(b"\x00" * 64)

        srv.start()
        status, _, body = srv.request("good.test")
        assert status == 200 and "good says hi" in body
        assert srv.request("bad.test")[0] == 404  # not served; named below
        show = srv.cli("app", "show", "bad.test", check=False)
        assert show.returncode != 0 and f"app 'bad.test' in CMDB {cmdb} is corrupt: column env" in show.stderr
        assert [line.split()[0] for line in srv.cli("app", "ls").stdout.splitlines()[1:]] == ["good.test"]
        log = srv.read_log()
        assert f"app 'bad.test' in CMDB {cmdb} is corrupt" in log
        assert f"container state {os.path.join(ghost, 'state.json')} is corrupt" in log
        assert f"leases file {leases} is corrupt" in log
        srv.cli("app", "rm", "bad.test")  # how the operator gets rid of it
        shutil.rmtree(os.path.join(srv.run_root, "containers", ".quarantine"), ignore_errors=True)


def test_a_corrupt_cmdb_file_stops_serve_with_an_error_naming_it(tmp_path, apache_php):
    with serving(tmp_path, apache_php, "[forkserver]\npool_size = 0\n") as srv:
        cmdb = os.path.join(srv.data_root, "cmdb.sqlite3")
        with open(cmdb, "wb") as f:
            f.write(b"not a database at all " * 500)
        r = subprocess.run([sys.executable, "-m", "fcrun_cli", "serve"], env=srv.env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0
        assert f"CMDB {cmdb}: the file is corrupt or not an SQLite database" in r.stderr + r.stdout


# ----- a full disk ----------------------------------------------------------------------------------

@contextlib.contextmanager
def small_tmpfs(path, size: str = "4m"):
    """A tmpfs of `size` at `path` (made), unmounted afterwards whatever happens."""
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "fcrun-test-full", str(path)],
                   check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: str) -> str:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = os.path.join(directory, "filler")
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\xff" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(filler, "ab", buffering=0) as f:  # the last few bytes too
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\xff" * 512)
    return filler


def test_a_full_data_root_fails_cmdb_writes_clearly_and_loses_no_row(tmp_path):
    """`db` is a connection open across the fill, as serve's is (`fcrun app` goes through serve
    when it runs); `fcrun app add` with no serve running opens the file itself."""
    before = host_snapshot(str(tmp_path / "run"))
    with small_tmpfs(tmp_path / "data") as data:
        env = dict(os.environ, FCRUN_ROOT=data, FCRUN_RUN=str(tmp_path / "run"))
        cmdb = os.path.join(data, "cmdb.sqlite3")
        for name in ("a.test", "b.test"):
            r = fcrun(env, "app", "add", name, "--image", "apache-php")
            assert r.returncode == 0, r.stderr
        with SqliteCMDB(cmdb) as db:
            filler = fill(data)
            big_env = "K=" + "v" * 100_000  # more than the few bytes a full tmpfs may still have

            r = fcrun(env, "app", "add", "c.test", "--image", "apache-php", "--env", big_env)
            assert r.returncode != 0
            assert f"CMDB {cmdb}: no space left on device" in r.stderr, r.stderr
            with pytest.raises(CMDBError, match=f"add app c.test in CMDB {cmdb}: no space left on device"):
                db.add_app(App(name="c.test", image="apache-php", env=[big_env]))
            with pytest.raises(CMDBError, match=f"record event big in CMDB {cmdb}: no space left on device"):
                db.add_event("a.test", "big", "x" * 100_000)
            assert [a.name for a in db.list_apps()] == ["a.test", "b.test"]  # every row still there

            os.unlink(filler)  # space again: everything works as before, the open connection too
            db.add_event("a.test", "big", "x" * 100_000)
            r = fcrun(env, "app", "add", "c.test", "--image", "apache-php", "--env", big_env)
            assert r.returncode == 0, r.stderr
            assert [a.name for a in db.list_apps()] == ["a.test", "b.test", "c.test"]
        conn = sqlite3.connect(cmdb)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()
    assert settled_snapshot(str(tmp_path / "run"), before) == before


def test_a_full_run_root_fails_the_state_save_and_keeps_the_whole_old_state(tmp_path, data_root, busybox):
    run_root = str(tmp_path / "run")
    before = host_snapshot(run_root)
    with small_tmpfs(run_root, "8m"):
        rt = Runtime(Paths(data_root=data_root, run_root=run_root), cgroup_parent=CGROUP_PARENT, bridge=BRIDGE,
                     subnet=SUBNET)
        spec = spec_from_image(busybox, RunOptions(args=["sleep", "1000"], memory_bytes=64 << 20, network="none"),
                               name="full")
        try:
            rt.run("full", spec, image=busybox, detach=True)
            saved = rt.states.load("full")
            filler = fill(run_root)
            with pytest.raises(KernelError, match=f"write container state {state_file(rt, 'full')}: "
                                                  r"\[Errno 28\] No space left on device"):
                rt.update("full", memory_bytes=96 << 20)
            assert rt.states.load("full") == saved  # the old state, whole
            assert [e for e in os.listdir(rt.states.dir("full")) if e.startswith(".")] == []  # no temporary left
            os.unlink(filler)
            assert rt.update("full", memory_bytes=96 << 20).spec.linux.resources.memory.limit == 96 << 20
        finally:
            with contextlib.suppress(Exception):
                os.unlink(os.path.join(run_root, "filler"))
            for name in rt.states.names():
                rt.delete(name, force=True)
            rt.cgroups.remove_parent_if_empty()
    assert settled_snapshot(run_root, before) == before
