"""Private unix sockets: a listener only its owner can reach, and who is on the other end.

Both of fcrun's local APIs listen this way: serve's admin socket and the fork-server's
socket. The file mode keeps other users out; each server still asks the kernel who connected
(SO_PEERCRED) and re-checks it, since a socket's mode is easy to loosen by accident.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import tempfile
from typing import NamedTuple

from .errors import KernelError, SpecError

log = logging.getLogger("fcrun.unixsock")

LISTEN_BACKLOG = 64
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class PeerCredentials(NamedTuple):
    """The process on the other end of a unix socket, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Who connected to `sock` (SO_PEERCRED).

    Raises:
        OSError: `sock` is not a connected unix socket.
    """
    return PeerCredentials(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


def bind_private(path: str, *, what: str = "socket", where: str | None = None,
                 backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening unix socket at `path`, mode 0600 from the moment it appears there.

    It is bound inside a fresh 0700 directory next to `path`, chmod'ed, then renamed into
    place, so no other user can connect in between; a umask change would do the same but
    races with any other thread of the process. A socket already at `path` (a stale one) is
    replaced atomically: the caller checks first whether a live server still answers there.
    The directory of `path` must exist. `what` names the socket in errors ("admin socket"),
    `where` the setting that gave `path` ("admin_socket", "--socket").

    Raises:
        SpecError: `path` exists and is not a socket.
        KernelError: creating the staging directory, binding or renaming failed.

    Resource handling: the caller owns the returned socket (blocking, close-on-exec); nothing
    else is left behind on failure.
    """
    directory = os.path.dirname(path) or "."
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise KernelError.from_oserror(f"inspect {what}", path, exc) from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SpecError(f"{what} path {path} exists and is not a socket", where)
    try:
        private = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}-", dir=directory)
    except OSError as exc:
        raise KernelError.from_oserror(f"create a staging directory for {what}", directory, exc) from None
    staging = os.path.join(private, "sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(staging)
        os.chmod(staging, 0o600)
        sock.listen(backlog)
        os.rename(staging, path)
    except OSError as exc:
        sock.close()
        raise KernelError.from_oserror(f"bind {what}", path, exc) from None
    finally:
        _remove_staging(private, staging)
    return sock


def _remove_staging(private: str, staging: str) -> None:
    # After a successful rename only the empty directory is left; after a failure, maybe the
    # socket file too. Neither is worth failing for: the directory is 0700 and holds no data.
    for remove, name in ((os.unlink, staging), (os.rmdir, private)):
        try:
            remove(name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the staging path %s: %s", name, exc)
