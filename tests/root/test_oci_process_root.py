"""`fcrun-oci` as runc gives a process its world: a terminal made inside the container, runc's
default device rules, and `exec --process` with every field of the process honoured.

Real containers through cli/fcrun-oci, with test_oci_cli_root.py's runner, bundles and console
socket; what is checked is read from inside the container.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess

import pytest
from polling import wait_until
from test_oci_cli_root import ConsoleSocket, make_bundle, oci, read_until  # noqa: F401 (oci: a fixture)
from test_podman_root import IMAGE, busybox_archive, podman, read_terminal  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.root]


CONSOLE = "<console socket>"  # master_from puts the socket's path here


def master_from(oci, socket_path: str, *args: str) -> int:
    """Run `fcrun-oci ARGS` (CONSOLE among them: the console socket's path) and return the pty
    master it sent over the socket, as an engine receives it."""
    console = ConsoleSocket(socket_path)
    try:
        r = oci.with_files(*(console.path if a == CONSOLE else a for a in args))
        assert r.returncode == 0, r.stderr
        return console.receive_master()
    finally:
        console.close()


def edit_config(bundle: str, change) -> None:
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        document = json.load(f)
    change(document)
    with open(path, "w") as f:
        json.dump(document, f)


# ----- default devices -----------------------------------------------------------------------

DEVICE_PROBE = (
    "echo x > /dev/null && echo null-ok; "
    "[ $(busybox head -c 4 /dev/zero | busybox wc -c) = 4 ] && echo zero-ok; "
    "[ $(busybox head -c 4 /dev/urandom | busybox wc -c) = 4 ] && echo urandom-ok; "
    "[ -c /dev/full ] && [ -c /dev/tty ] && [ -c /dev/random ] && echo nodes-ok; "
    "[ $(busybox readlink /dev/ptmx) = pts/ptmx ] && [ $(busybox readlink /dev/fd) = /proc/self/fd ] && echo links-ok; "
    # A loop device's node: runc lets it be made (c/b *:* m), never opened.
    "busybox mknod /tmp/loop b 7 0 && echo mknod-ok; "
    "cat /tmp/loop > /dev/null 2>&1 && echo loop-opened || echo loop-refused; "
    # The host's own node, bound in: the cgroup, not the node, decides.
    "[ -b /dev/hostloop ] && echo hostloop-node; "
    "busybox head -c 1 /dev/hostloop > /dev/null 2>&1 && echo hostloop-opened || echo hostloop-refused"
)


HOST_LOOP = "/dev/loop0" if os.path.exists("/dev/loop0") else ""  # a host block device to bind in, if any


def test_a_lone_deny_all_still_lets_the_default_devices_be_used(oci, tmp_path):
    """podman's and `runc spec`'s linux.resources.devices is a single deny-all; runc's own rules
    (null, zero, full, random, urandom, tty, ptys, tun, mknod) follow it."""
    bundle = make_bundle(str(tmp_path / "devices"), ["sh", "-c", DEVICE_PROBE])

    def deny_all(document):
        document["linux"]["resources"] = {"devices": [{"allow": False, "access": "rwm"}]}
        document["linux"].pop("devices", None)
        if HOST_LOOP:
            document["mounts"].append({"destination": "/dev/hostloop", "type": "bind", "source": HOST_LOOP,
                                       "options": ["bind"]})

    edit_config(bundle, deny_all)
    r = oci.with_files("run", "--bundle", bundle, "d1")
    out = oci.output()
    assert r.returncode == 0, (r.stderr, out)
    host_loop = ("hostloop-node", "hostloop-refused") if HOST_LOOP else ()
    for line in ("null-ok", "zero-ok", "urandom-ok", "nodes-ok", "links-ok", "mknod-ok", "loop-refused", *host_loop):
        assert line in out.split(), out


# ----- exec --process ------------------------------------------------------------------------

EXEC_PROBE = "grep -E '^(Cap|Groups|NoNewPrivs)' /proc/self/status; echo nofile=$(ulimit -n); id; umask; pwd; echo $ONLY"


def status_fields(out: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if _}


def test_exec_process_json_honours_capabilities_rlimits_groups(oci, tmp_path):
    bundle = make_bundle(str(tmp_path / "sleeper"), ["sleep", "300"])
    assert oci.with_files("run", "--detach", "--bundle", bundle, "e1").returncode == 0
    only_kill = ["CAP_KILL"]
    process = {
        "args": ["sh", "-c", EXEC_PROBE], "env": ["PATH=/bin", "ONLY=from-process-json"], "cwd": "/tmp",
        "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 0o077},
        "capabilities": {s: only_kill for s in ("bounding", "effective", "permitted", "inheritable", "ambient")},
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}],
        "noNewPrivileges": True,
    }
    path = str(tmp_path / "process.json")
    with open(path, "w") as f:
        json.dump(process, f)
    r = oci.with_files("exec", "--process", path, "e1")
    out = oci.output()
    assert r.returncode == 0, (r.stderr, out)
    fields = status_fields(out)
    kill = f"{1 << 5:016x}"
    assert {k: fields[k] for k in ("CapBnd", "CapEff", "CapPrm", "CapInh", "CapAmb")} == dict.fromkeys(
        ("CapBnd", "CapEff", "CapPrm", "CapInh", "CapAmb"), kill), out
    assert fields["Groups"].split() == ["10", "20"] and fields["NoNewPrivs"] == "1", out
    lines = out.split()
    assert "nofile=123" in lines and "uid=1000" in out and "gid=1000" in out, out
    assert "0077" in lines and "/tmp" in lines and "from-process-json" in lines, out

    # Fields it leaves out are the container's (runc's fallback): its capabilities, rlimits.
    with open(path, "w") as f:
        json.dump({"args": ["sh", "-c", EXEC_PROBE], "cwd": "/", "env": ["PATH=/bin"]}, f)
    r = oci.with_files("exec", "--process", path, "e1")
    fields = status_fields(oci.output())
    assert r.returncode == 0 and fields["CapBnd"] != kill and fields["CapEff"] != "0" * 16, (r.stderr, fields)
    assert "nofile=1024" in oci.output().split() and fields["NoNewPrivs"] == "0"  # not in the file: false, as runc

    # What fcrun cannot honour is refused by name, nothing run.
    with open(path, "w") as f:
        json.dump({"args": ["sh", "-c", "echo ran"], "cwd": "/", "apparmorProfile": "docker-default"}, f)
    r = oci.with_files("exec", "--process", path, "e1")
    assert r.returncode == 1 and "apparmorProfile" in r.stderr and path in r.stderr, r.stderr
    assert "ran" not in oci.output()


def test_exec_flags_as_runc_takes_them(oci, tmp_path):
    """--cap, --additional-gids and --user on top of the container's process; what fcrun-oci
    cannot honour (--apparmor, --process-label, --cgroup) is refused by name, nothing run."""
    bundle = make_bundle(str(tmp_path / "sleeper"), ["sleep", "300"])
    assert oci.with_files("run", "--detach", "--bundle", bundle, "f1").returncode == 0
    r = oci.with_files("exec", "--cap", "CAP_SYS_ADMIN", "-g", "33", "-g", "44", "f1", "sh", "-c", EXEC_PROBE)
    out = oci.output()
    assert r.returncode == 0, (r.stderr, out)
    fields = status_fields(out)
    sys_admin = 1 << 21
    assert int(fields["CapEff"], 16) & sys_admin and int(fields["CapBnd"], 16) & sys_admin, out
    assert fields["Groups"].split() == ["33", "44"], out
    # Another user keeps the bounding cap only: not inheritable, it is no ambient one (runc's rule).
    r = oci.with_files("exec", "--cap", "CAP_SYS_ADMIN", "-g", "33", "--user", "1000:1000", "f1", "sh", "-c", EXEC_PROBE)
    out = oci.output()
    fields = status_fields(out)
    assert r.returncode == 0 and "uid=1000" in out and fields["Groups"].split() == ["33"], (r.stderr, out)
    assert int(fields["CapBnd"], 16) & sys_admin and not int(fields["CapEff"], 16) & sys_admin, out
    r = oci.with_files("exec", "f1", "sh", "-c", EXEC_PROBE)
    assert not int(status_fields(oci.output())["CapEff"], 16) & sys_admin  # the container's own set
    for flag, value in (("--apparmor", "docker-default"), ("--process-label", "system_u:system_r:spc_t:s0"),
                        ("--cgroup", "memory:/elsewhere")):
        r = oci.with_files("exec", flag, value, "f1", "sh", "-c", "echo ran")
        assert r.returncode == 1 and flag in r.stderr and "ran" not in oci.output(), (flag, r.stderr)


# ----- terminal ------------------------------------------------------------------------------

TERMINAL_PROBE = ("echo fd0=$(busybox readlink /proc/self/fd/0); echo tty=$(busybox tty); "
                  "echo owner=$(busybox stat -L -c %u /proc/self/fd/0); "
                  "echo size=$(busybox stty size); busybox grep -q devpts /proc/self/mountinfo && echo devpts-ok; "
                  "read line; echo got:$line")


def test_the_terminal_is_the_containers_own_pty(oci, tmp_path):
    """runc's way: the pty comes from the container's /dev/ptmx, so inside it is /dev/pts/0, and
    its master reaches the engine over --console-socket; exec --tty gets the next one."""
    bundle = make_bundle(str(tmp_path / "tty"), ["sh", "-c", TERMINAL_PROBE + "; exec sleep 300"])

    def with_terminal(document):
        document["process"]["terminal"] = True
        document["process"]["consoleSize"] = {"height": 33, "width": 99}

    edit_config(bundle, with_terminal)
    master = master_from(oci, str(tmp_path / "console.sock"), "create", "--bundle", bundle, "--console-socket",
                         CONSOLE, "p1")
    try:
        assert oci("start", "p1").returncode == 0
        seen = read_until(master, "devpts-ok")
        assert "fd0=/dev/pts/0" in seen and "tty=/dev/pts/0" in seen and "size=33 99" in seen, seen
        assert "owner=0" in seen, seen
        os.write(master, b"byte-round-trip\n")
        read_until(master, "got:byte-round-trip")

        exec_master = master_from(oci, str(tmp_path / "exec.sock"), "exec", "--tty", "--detach", "--console-socket",
                                  CONSOLE, "--user", "1000:1000", "p1", "sh", "-c", TERMINAL_PROBE)
        try:
            seen = read_until(exec_master, "devpts-ok")
            assert "fd0=/dev/pts/1" in seen and "tty=/dev/pts/1" in seen and "owner=1000" in seen, seen
            os.write(exec_master, b"again\n")
            read_until(exec_master, "got:again")
        finally:
            os.close(exec_master)

        # As conmon asks for it: a process.json with terminal and consoleSize, and --console-socket.
        process = {"args": ["sh", "-c", TERMINAL_PROBE], "cwd": "/", "env": ["PATH=/bin"], "terminal": True,
                   "consoleSize": {"height": 12, "width": 34}}
        path = str(tmp_path / "process.json")
        with open(path, "w") as f:
            json.dump(process, f)
        exec_master = master_from(oci, str(tmp_path / "exec2.sock"), "exec", "--process", path, "--detach",
                                  "--console-socket", CONSOLE, "p1")
        try:
            seen = read_until(exec_master, "devpts-ok")
            assert "tty=/dev/pts/" in seen and "size=12 34" in seen and "owner=0" in seen, seen
        finally:
            os.close(exec_master)
    finally:
        os.close(master)


def test_the_terminal_in_a_user_namespace(oci, tmp_path):
    """The same with a user namespace: the pty is still the container's /dev/pts/0, owned by
    the namespace's root (host uid 200000), not by an unmapped host root."""
    bundle = make_bundle(str(tmp_path / "userns-tty"), ["sh", "-c", TERMINAL_PROBE + "; exec sleep 300"])

    def in_userns(document):
        document["process"]["terminal"] = True
        document["linux"]["namespaces"].append({"type": "user"})
        document["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
        document["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]

    edit_config(bundle, in_userns)
    master = master_from(oci, str(tmp_path / "console.sock"), "create", "--bundle", bundle, "--console-socket",
                         CONSOLE, "u1")
    try:
        assert oci("start", "u1").returncode == 0
        seen = read_until(master, "devpts-ok")
        assert "fd0=/dev/pts/0" in seen and "tty=/dev/pts/0" in seen, seen
        assert "owner=0" in seen, f"the namespace's root owns its terminal: {seen}"
        os.write(master, b"in-userns\n")
        read_until(master, "got:in-userns")

        exec_master = master_from(oci, str(tmp_path / "exec.sock"), "exec", "--tty", "--detach", "--console-socket",
                                  CONSOLE, "--user", "7:7", "u1", "sh", "-c", TERMINAL_PROBE)
        try:
            seen = read_until(exec_master, "devpts-ok")
            assert "tty=/dev/pts/1" in seen and "owner=7" in seen, seen
            os.write(exec_master, b"exec-in-userns\n")
            read_until(exec_master, "got:exec-in-userns")
        finally:
            os.close(exec_master)
    finally:
        os.close(master)


def test_home_is_set_from_the_containers_passwd_as_runc_does(oci, tmp_path):
    """A process whose environment has no HOME gets its user's home from the container's
    /etc/passwd (else /); one that has it keeps it."""
    bundle = make_bundle(str(tmp_path / "home"), ["sh", "-c", "echo home=$HOME; exec sleep 300"])
    os.makedirs(os.path.join(bundle, "rootfs", "etc"))
    with open(os.path.join(bundle, "rootfs", "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")

    def as_app(document):
        document["process"]["user"] = {"uid": 1000, "gid": 1000}
        document["process"]["env"] = ["PATH=/bin"]

    edit_config(bundle, as_app)
    assert oci.with_files("run", "--detach", "--bundle", bundle, "h1").returncode == 0
    wait_until("the container's first line", lambda: "home=" in oci.output(), detail=oci.output)
    assert "home=/home/app" in oci.output().split(), oci.output()
    path = str(tmp_path / "process.json")
    for env, uid, expected in ((["PATH=/bin"], 0, "/root"), (["PATH=/bin", "HOME=/given"], 0, "/given"),
                               (["PATH=/bin"], 4242, "/")):
        with open(path, "w") as f:
            json.dump({"args": ["sh", "-c", "echo home=$HOME"], "cwd": "/", "env": env, "user": {"uid": uid}}, f)
        r = oci.with_files("exec", "--process", path, "h1")
        assert r.returncode == 0 and f"home={expected}" in oci.output().split(), (r.stderr, oci.output())


def test_podman_exec_it_through_a_terminal(podman):
    """`podman exec -it` (conmon: exec --process with terminal, --console-socket): the same
    results with runc and fcrun-oci, the exec's terminal the container's /dev/pts/N."""
    cid = podman.run("-d", IMAGE, "sleep", "600").stdout.strip()
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*podman.argv, "exec", "-it", cid, "sh", "-c",
                                 "tty; [ -t 0 ] && echo stdin-tty; read line; echo got-$line; exit 4"],
                                env=podman.env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        slave = -1
        os.write(master, b"typed\n")
        out = read_terminal(master, proc)
        assert proc.wait(timeout=30) == 4, out
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert b"/dev/pts/" in out and b"stdin-tty" in out and b"got-typed" in out and b"not a tty" not in out, out
    podman("rm", "-f", "-t", "0", cid)


def test_a_terminal_without_a_devpts_is_one_clear_error(oci, tmp_path):
    """No /dev/pts mount: no pty can be the container's; create says so and leaves nothing."""
    bundle = make_bundle(str(tmp_path / "nopts"), ["sh", "-c", "tty"])

    def without_devpts(document):
        document["process"]["terminal"] = True
        document["mounts"] = [m for m in document["mounts"] if m["destination"] != "/dev/pts"]

    edit_config(bundle, without_devpts)
    console = ConsoleSocket(str(tmp_path / "console.sock"))
    try:
        r = oci.with_files("create", "--bundle", bundle, "--console-socket", console.path, "n1")
    finally:
        console.close()
    assert r.returncode == 1 and "/dev/ptmx" in r.stderr and "No such file" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert oci("list", "-q").stdout == ""
