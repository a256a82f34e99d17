"""console.py without a container: a pty from this host's /dev/ptmx, its master sent over a
socketpair as an engine's --console-socket gets it; and the plan fields that carry it."""

import array
import fcntl
import os
import socket
import struct
import signal
import termios

import msgspec
import pytest

from fcrun.runtime.console import open_console
from fcrun.runtime.plan import build_plan
from fcrun.runtime.spec import ConsoleSize, default_spec


def receive_master(sock: socket.socket) -> tuple[bytes, int]:
    data, ancillary, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(4))
    (level, kind, fds), = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    return data, array.array("i", fds[:4])[0]


def test_the_master_goes_over_the_socket_and_the_slave_is_returned():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    slave = open_console(theirs.detach(), 24, 81, bind_console=False)  # closes the socket's fd
    try:
        data, master = receive_master(ours)
        try:
            assert data == b"/dev/ptmx"
            assert os.isatty(slave) and os.ttyname(slave).startswith("/dev/pts/")
            assert struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))[:2] == (24, 81)
            os.write(master, b"hi\n")
            assert os.read(slave, 16) == b"hi\n"
        finally:
            os.close(master)
    finally:
        os.close(slave)
        ours.close()


def test_a_dead_console_socket_is_an_error_naming_it_and_leaves_no_fd():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as in the child (prepare_child): must not kill us
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.close()
    before = set(os.listdir("/proc/self/fd"))
    fd = theirs.detach()
    try:
        with pytest.raises(OSError, match="console socket"):
            open_console(fd, 0, 0, bind_console=False)
    finally:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's own setting
    assert set(os.listdir("/proc/self/fd")) <= before  # socket, master and slave all closed


def test_the_plan_carries_the_socket_and_the_console_size():
    spec = default_spec(["sh"])
    spec = msgspec.structs.replace(spec, process=msgspec.structs.replace(
        spec.process, terminal=True, console_size=ConsoleSize(height=40, width=100)))
    plan = build_plan(spec, rootfs="/r", overlay_lower=None, cgroup_procs=[], cap_last=40, attached=True,
                      console_socket=9)
    assert (plan.console_socket, plan.console_size) == (9, (40, 100))
    plain = build_plan(default_spec(["sh"]), rootfs="/r", overlay_lower=None, cgroup_procs=[], cap_last=40,
                       attached=True)
    assert (plain.console_socket, plain.console_size) == (-1, (0, 0))


def test_the_terminal_goes_to_the_processs_user_where_it_maps_on_the_host():
    from fcrun.runtime.spec import IDMapping, Namespace, User

    def owner(uid, userns):
        spec = default_spec(["sh"])
        linux = spec.linux
        if userns:
            linux = msgspec.structs.replace(linux, namespaces=[*linux.namespaces, Namespace(type="user")],
                                            uid_mappings=[IDMapping(container_id=0, host_id=200000, size=1000)],
                                            gid_mappings=[IDMapping(container_id=0, host_id=200000, size=1000)])
        spec = msgspec.structs.replace(spec, linux=linux, process=msgspec.structs.replace(spec.process, user=User(uid=uid)))
        return build_plan(spec, rootfs="/r", overlay_lower=None, cgroup_procs=[], cap_last=40, attached=True,
                          console_socket=9).console_owner

    assert (owner(0, False), owner(1000, False)) == (0, 1000)  # host root keeps a root process's terminal
    assert (owner(0, True), owner(7, True), owner(5000, True)) == (200000, 200007, -1)  # unmapped: left as made
