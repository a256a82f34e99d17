"""Private unix sockets (fcrun.unixsock): mode 0600 from the start, stale sockets replaced, other
files refused, nothing left behind; peer credentials as the kernel reports them."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile

import pytest

from fcrun.errors import KernelError, SpecError
from fcrun.unixsock import bind_private, peer_credentials


@pytest.fixture
def short_dir():
    """A short directory for unix sockets (their paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="fc-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_socket_is_0600_and_listens_and_the_staging_directory_is_gone(short_dir):
    path = os.path.join(short_dir, "api.sock")
    with bind_private(path) as listener:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert os.listdir(short_dir) == ["api.sock"]
        assert not os.get_inheritable(listener.fileno())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            conn, _ = listener.accept()
            with conn:
                assert peer_credentials(conn) == (os.getpid(), os.geteuid(), os.getegid())


def test_a_stale_socket_is_replaced(short_dir):
    path = os.path.join(short_dir, "api.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a crashed server's
    old_inode = os.stat(path).st_ino
    with bind_private(path):
        assert os.stat(path).st_ino != old_inode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)  # the new one listens there


def test_another_file_at_the_path_is_refused_and_kept(short_dir):
    path = os.path.join(short_dir, "api.sock")
    with open(path, "w") as f:
        f.write("data")
    with pytest.raises(SpecError, match="api socket path .* is not a socket") as info:
        bind_private(path, what="api socket", where="--socket")
    assert info.value.where == "--socket"
    with open(path) as f:
        assert f.read() == "data"
    assert os.listdir(short_dir) == ["api.sock"]


def test_a_missing_directory_is_a_kernel_error_naming_it(short_dir):
    missing = os.path.join(short_dir, "missing")
    with pytest.raises(KernelError, match="missing"):
        bind_private(os.path.join(missing, "api.sock"))
