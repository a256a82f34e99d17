"""Holding a created container until `fcrun-oci start`, in another process.

An engine runs `create`, waits for that process to exit, and runs `start` later. But only
the process that holds a created container's go pipe can start it (Container.start), and
the container gives up at the pipe's EOF. So `create` forks a holder that keeps the
Container and listens on <root>/oci/<id>.sock; `start` connects and asks:

    fcrun-oci create               holder (forked)                    fcrun-oci start
    Runtime.create: child waits
    bind the socket, fork ------>  setsid, stdio to /dev/null
    write the pid file, exit 0     poll(socket, the container's pidfd)
                                   <--------------------------------- connect, "start"
                                   Container.start() (the exec)
                                   "ok" | "error MESSAGE" ----------> exit 0 | 1
                                   unlink the socket, exit

The container's process is the create command's child, not the holder's: once create
exits it belongs to the engine's subreaper (conmon, containerd-shim), which waits for it,
as with runc. The holder also leaves when the container dies first (delete, kill): its
pidfd says so.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct

REPLY_MAX_BYTES = 4096


class HolderGone(Exception):
    """No holder answers for a created container: it was killed, or the machine rebooted."""


LONGEST_PLAIN_NAME = 80  # beyond it the socket is named by a hash of the ID (sun_path: 107 bytes)


def socket_file(name: str) -> str:
    """The socket's file name in the holder dir: the ID's, or its hash's for a long ID."""
    if len(name) > LONGEST_PLAIN_NAME:
        import hashlib

        name = hashlib.sha256(name.encode()).hexdigest()[:40]
    return f"{name}.sock"


def socket_path(holder_dir: str, name: str) -> str:
    return os.path.join(holder_dir, socket_file(name))


def _short(dir_fd: int, name: str) -> str:
    # sun_path holds 107 bytes; a deep --root would not fit. The same directory reached
    # through our fd of it is always short.
    return f"/proc/self/fd/{dir_fd}/{socket_file(name)}"


def hold(container, holder_dir: str) -> int:
    """Fork the holder of created `container`; returns its pid once it listens.

    Resource handling: the holder owns the container's handshake fds from now on (our
    copies close with `container`); it removes its socket when it exits.
    """
    os.makedirs(holder_dir, mode=0o700, exist_ok=True)
    dir_fd = os.open(holder_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    path = socket_path(holder_dir, container.name)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a holder's leftover (killed): the name is ours now
        listener.bind(_short(dir_fd, container.name))
        listener.listen(4)
        pidfd = os.pidfd_open(container.pid)
    except BaseException:
        listener.close()
        os.close(dir_fd)
        raise
    os.close(dir_fd)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _serve(container, listener, pidfd)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os._exit(code)
    listener.close()
    os.close(pidfd)
    return pid


def _serve(container, listener: socket.socket, pidfd: int) -> int:
    """The holder: wait for "start" (or the container's death), start it, answer."""
    os.setsid()  # out of the engine's process group: its signals are not for us
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # the engine waits for EOF on the pipes it gave create
        os.dup2(null, fd)
    os.close(null)
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while True:
        events = dict(poller.poll())
        if pidfd in events:
            return 0  # killed or deleted before its start
        conn, _ = listener.accept()
        with conn:
            pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != 0:
                conn.send(b"error only root may start a container")
                continue
            if conn.recv(64) != b"start":
                conn.send(b"error unknown request")
                continue
            try:
                container.start()
            except Exception as exc:  # noqa: BLE001 - the start command reports it
                conn.send(b"error " + str(exc).encode()[:REPLY_MAX_BYTES - 6])
                return 1
            conn.send(b"ok")
            return 0


def request_start(holder_dir: str, name: str) -> None:
    """Ask the holder of created container `name` to start it.

    Raises:
        HolderGone: no holder listens. RuntimeError: the start failed (its message).
    """
    dir_fd = os.open(holder_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if os.path.isdir(holder_dir) else -1
    if dir_fd < 0:
        raise HolderGone(name)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
            try:
                conn.connect(_short(dir_fd, name))
                conn.send(b"start")
                reply = conn.recv(REPLY_MAX_BYTES)
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
                # None there, or it left (another start's, or the container's death) while
                # we waited in its queue.
                raise HolderGone(name) from None
    finally:
        os.close(dir_fd)
    if reply == b"ok":
        return
    if not reply:
        raise HolderGone(name)
    raise RuntimeError(reply.removeprefix(b"error ").decode(errors="replace"))


def forget(holder_dir: str, name: str) -> None:
    """Remove a holder's socket (a killed holder's leftover) when its container goes."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path(holder_dir, name))
