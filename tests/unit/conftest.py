"""Fixtures several unit test files share."""

from __future__ import annotations

import shutil
import socket
import tempfile

import pytest

from fcrun.paths import Paths


@pytest.fixture
def paths(tmp_path):
    return Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path / "run"))


@pytest.fixture
def write(tmp_path):
    """write(text) -> the path of a fcrun.toml holding it."""
    def write(text: str) -> str:
        path = tmp_path / "fcrun.toml"
        path.write_text(text)
        return str(path)
    return write


@pytest.fixture
def short_dir():
    """A short directory for unix sockets (their paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="fc-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def closed_port():
    """A loopback port bound and never listened on: connects to it are refused, and nothing else
    in the test (a server, a proxy on port 0) can be given it, as it could the port of a server
    that was closed (then the "refused" upstream was the test's own proxy or another server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
