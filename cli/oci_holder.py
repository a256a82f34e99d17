"""Holding a created container until `fcrun-oci start`, and its delete, in another process.

An engine runs `create`, waits for that process to exit, and runs `start` later. But only
the process that holds a created container's go pipe can start it (Container.start), and
the container gives up at the pipe's EOF. So `create` forks a holder that keeps the
Container and listens on <root>/oci/<id>.sock; `start` connects and asks:

    fcrun-oci create               holder (forked)                    fcrun-oci start / delete
    Runtime.create: child waits
    bind the socket, fork ------>  setsid, stdio to /dev/null
    write the pid file, exit 0     poll(socket, the container's pidfd)
                                   <--------------------------------- connect, "start"
                                   Container.start() (the exec)
                                   "ok" | "error MESSAGE" ----------> exit 0 | 1
                                   poll(socket, pidfd), LINGER_S at most
                                   (EXIT_LINGER_S once the container exited)
                                   <--------------------------------- connect, "delete [force]"
                                   oci_commands.delete
                                   "ok" | "error MESSAGE" ----------> exit 0 | 1
                                   unlink the socket, exit

The holder has the library loaded (it is a fork of `create`), and `delete` is mostly loading
it: `fcrun-oci delete` asks the holder first (cli/oci_fast.py, with Python's built-in modules
only), and does the delete itself when no holder answers (none, killed, or gone LINGER_S after
the start). Either way the same oci_commands.delete runs, with the same errors.

The container's process is the create command's child, not the holder's: once create
exits it belongs to the engine's subreaper (conmon, containerd-shim), which waits for it,
as with runc. The holder also leaves when the container dies before its start (delete, kill):
its pidfd says so. A holder killed meanwhile leaves its socket, which the next create of the
ID, or the delete, removes; `fcrun gc` and delete need no holder.
"""

from __future__ import annotations

import contextlib
import os
import time

# The protocol's client side is oci_fast's (`start` and `delete` run it without the library).
from fcrun_cli.oci_fast import HolderGone, REPLY_MAX_BYTES, ask_holder, socket_file  # noqa: F401

# How long a holder waits for `delete` after the start (LINGER_S), and after the container's
# exit (EXIT_LINGER_S; engines delete at once): a short container's (`podman run --rm`, a job)
# delete finds it; a long-lived one's holder is gone by then (its memory back), and that delete
# runs in its own process. Bounded, also because the holder is in the engine's cgroup (conmon's
# scope, the shim's), which it keeps from being empty meanwhile.
LINGER_S = 10.0
EXIT_LINGER_S = 2.0


def socket_path(holder_dir: str, name: str) -> str:
    return os.path.join(holder_dir, socket_file(name))


def _short(dir_fd: int, name: str) -> str:
    # sun_path holds 107 bytes; a deep --root would not fit. The same directory reached
    # through our fd of it is always short.
    return f"/proc/self/fd/{dir_fd}/{socket_file(name)}"


def hold(container, holder_dir: str, delete=None) -> int:
    """Fork the holder of created `container`; returns its pid once it listens.

    `delete(force)`: what a "delete [force]" request runs in the holder (raises the error
    to report); None: such requests go unanswered (the client then deletes itself).

    Resource handling: the holder owns the container's handshake fds from now on (our
    copies close with `container`); it removes its socket when it exits.
    """
    import socket

    os.makedirs(holder_dir, mode=0o700, exist_ok=True)
    dir_fd = os.open(holder_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    path = socket_path(holder_dir, container.name)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a holder's leftover (killed): the name is ours now
        listener.bind(_short(dir_fd, container.name))
        listener.listen(4)
        inode = os.stat(path).st_ino
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
            code = _serve(container, listener, pidfd, delete)
        finally:
            with contextlib.suppress(OSError):
                # Ours only: after a delete, a new create of the ID may have bound its own.
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            os._exit(code)
    listener.close()
    os.close(pidfd)
    return pid


def _serve(container, listener, pidfd: int, delete) -> int:
    """The holder: wait for "start" (or the container's death), start it, answer; then for
    "delete", LINGER_S at most."""
    import select
    import socket
    import struct

    os.setsid()  # out of the engine's process group: its signals are not for us
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # the engine waits for EOF on the pipes it gave create
        os.dup2(null, fd)
    os.close(null)
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    started_at = deadline = None
    while True:
        timeout_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        events = dict(poller.poll(timeout_ms))
        if not events:
            return 0  # lingered long enough: delete runs without us
        if pidfd in events:
            if started_at is None:
                return 0  # killed or deleted before its start
            poller.unregister(pidfd)  # it exited: its delete comes now, if ever
            deadline = min(deadline, time.monotonic() + EXIT_LINGER_S)
            continue
        conn, _ = listener.accept()
        with conn:
            pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != 0:
                conn.send(b"error only root may start a container")
                continue
            request = conn.recv(64)
            if request == b"start" and started_at is None:
                try:
                    container.start()
                except Exception as exc:  # noqa: BLE001 - the start command reports it
                    conn.send(_error(exc))
                    return 1
                conn.send(b"ok")
                started_at = time.monotonic()
                deadline = started_at + LINGER_S
            elif request in (b"delete", b"delete force") and delete is not None:
                reply = _delete(delete, request == b"delete force")
                conn.send(reply)
                if reply.startswith(b"ok"):
                    return 0
                # Refused (still running, and no --force): the container is as it was.
            # Anything else (a second start): no answer; the client's full command says why.


def _error(exc: BaseException) -> bytes:
    """An "error MESSAGE" reply: the message as oci.main prints it."""
    from fcrun_cli.oci import describe

    return b"error " + describe(exc).encode()[:REPLY_MAX_BYTES - 6]


def _delete(delete, force: bool) -> bytes:
    """Run a delete request; the reply: "ok", or "error MESSAGE", then what the delete logged
    (a poststop hook's failure), which the client prints on its stderr as the command would."""
    import io
    import logging

    logged = io.StringIO()
    handler = logging.StreamHandler(logged)  # as logging's last resort writes to stderr: warnings up
    handler.setLevel(logging.WARNING)
    last_resort, logging.lastResort = logging.lastResort, handler
    try:
        delete(force)
        status = b"ok"
    except Exception as exc:  # noqa: BLE001 - the delete command reports it
        status = _error(exc)
    finally:
        logging.lastResort = last_resort
    return (status + b"\n" + logged.getvalue().encode(errors="replace"))[:REPLY_MAX_BYTES]


def forget(holder_dir: str, name: str) -> None:
    """Remove a holder's socket (a killed holder's leftover) when its container goes."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path(holder_dir, name))
