"""A real `fcrun serve` for root tests: the Server harness, and `serving`, what every serve
fixture does around it (test_serve_root.py, test_pool_root.py, test_scaling_root.py)."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

from hostcheck import BRIDGE, CGROUP_PARENT, SUBNET, host_snapshot, settled_snapshot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `fcrun serve` subprocess on private roots, with the apache-php image linked in."""

    def __init__(self, tmp_path, apache_php, extra_config: str = ""):
        self.data_root = str(tmp_path / "data")
        self.run_root = str(tmp_path / "run")
        os.makedirs(os.path.join(self.data_root, "images"))
        # Share the (large) cached image's layers instead of copying them.
        store = os.path.dirname(os.path.dirname(apache_php.layers[0]))
        os.symlink(os.path.join(store, "layers"), os.path.join(self.data_root, "layers"))
        shutil.copy(os.path.join(store, "images", "apache-php.json"), os.path.join(self.data_root, "images"))
        self.port = _free_port()
        self.config = tmp_path / "fcrun.toml"
        # The tests' sites live in tmp_path: the docroot root (the defaults are /srv, /var/www).
        self.config.write_text(
            f'listen = "127.0.0.1:{self.port}"\nhold_timeout_s = 10\ndrain_timeout_s = 5\n'
            f'docroot_roots = ["{tmp_path}"]\n{extra_config}\n'
            f'[runtime]\ncgroup_parent = "{CGROUP_PARENT}"\nbridge = "{BRIDGE}"\nsubnet = "{SUBNET}"\n'
        )
        self.env = dict(os.environ, FCRUN_ROOT=self.data_root, FCRUN_RUN=self.run_root, FCRUN_CONFIG=str(self.config))
        self.proc = None

    def cli(self, *args, check=True):
        r = subprocess.run([sys.executable, "-m", "fcrun_cli", *args], env=self.env, capture_output=True, text=True,
                           timeout=60)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    def start(self):
        self.log = open(os.path.join(os.path.dirname(self.config), "serve.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "fcrun_cli", "serve"], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, self.read_log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if os.path.exists(os.path.join(self.run_root, "admin.sock")):
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve did not start listening"
            time.sleep(0.05)

    def read_log(self) -> str:
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    def reap_leftovers(self) -> list[str]:
        """Remove whatever serve left (a failed test must not leak); returns the container names."""
        from fcrun.paths import Paths
        from fcrun.runtime import Runtime

        rt = Runtime(Paths(data_root=self.data_root, run_root=self.run_root), cgroup_parent=CGROUP_PARENT,
                     bridge=BRIDGE, subnet=SUBNET)
        left = rt.states.names()
        for name in left:
            rt.delete(name, force=True)
        rt.cgroups.remove_parent_if_empty()
        rt.network.remove_bridge_if_unused()
        return left

    def request(self, host, path="/", method="GET", headers=None, body=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read().decode(errors="replace")
        finally:
            conn.close()

    def raw(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    def events(self, kind):
        return [line for line in self.cli("events").stdout.splitlines() if f"  {kind}  " in line]

    def containers(self):
        return [line.split()[0] for line in self.cli("ps").stdout.splitlines()[1:]]


@contextlib.contextmanager
def serving(tmp_path, apache_php, extra_config: str, server_class: type[Server] = Server) -> Iterator[Server]:
    """A Server on tmp_path's private roots (not started yet). Afterwards it is stopped and what
    it left is removed; then serve must have exited 0, left no instance and nothing on the host.
    """
    snapshot_root = str(tmp_path / "run")
    before = host_snapshot(snapshot_root)
    srv = server_class(tmp_path, apache_php, extra_config=extra_config)
    try:
        yield srv
    finally:
        srv.stop()
        leftover = srv.reap_leftovers()
    assert srv.proc is None or srv.proc.returncode == 0, srv.read_log()
    assert leftover == [], f"serve left instances behind: {leftover}"
    assert settled_snapshot(snapshot_root, before) == before, "serve left something on the host"
