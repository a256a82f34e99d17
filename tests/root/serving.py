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

    def __init__(self, tmp_path, apache_php, extra_config: str = "", *, cgroup_parent: str = CGROUP_PARENT,
                 bridge: str = BRIDGE, subnet: str = SUBNET, docroot_root: str | None = None,
                 ip: str = "127.0.0.1", launcher: tuple[str, ...] = ()):
        self.cgroup_parent, self.bridge, self.subnet = cgroup_parent, bridge, subnet
        # Where the proxy listens, and what serve's command line starts with (another network
        # namespace's `nsenter --net=...`: tests/root/cluster.py's hosts); serve_args follow `serve`.
        self.ip, self.launcher, self.serve_args = ip, launcher, []
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
            f'listen = "{ip}:{self.port}"\nhold_timeout_s = 10\ndrain_timeout_s = 5\n'
            f'docroot_roots = ["{docroot_root or tmp_path}"]\n{extra_config}\n'
            f'[runtime]\ncgroup_parent = "{cgroup_parent}"\nbridge = "{bridge}"\nsubnet = "{subnet}"\n'
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
        self.proc = subprocess.Popen([*self.launcher, sys.executable, "-m", "fcrun_cli", "serve", *self.serve_args],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, self.read_log()
            try:
                socket.create_connection((self.ip, self.port), timeout=1).close()
                if self.ready():
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve did not start listening"
            time.sleep(0.05)

    def ready(self) -> bool:
        """Asked once its proxy listens: whether serve is up (its admin socket is there too)."""
        return os.path.exists(os.path.join(self.run_root, "admin.sock"))

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

        rt = Runtime(Paths(data_root=self.data_root, run_root=self.run_root), cgroup_parent=self.cgroup_parent,
                     bridge=self.bridge, subnet=self.subnet)
        left = rt.states.names()
        for name in left:
            rt.delete(name, force=True)
        rt.remove_cgroup_parent_if_unused()  # with a killed fork-server's primer group
        rt.network.remove_bridge_if_unused()
        return left

    def request(self, host, path="/", method="GET", headers=None, body=None, timeout=30):
        conn = http.client.HTTPConnection(self.ip, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read().decode(errors="replace")
        finally:
            conn.close()

    def raw(self, data: bytes) -> bytes:
        with socket.create_connection((self.ip, self.port), timeout=10) as s:
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
def serving(tmp_path, apache_php, extra_config: str, server_class: type[Server] = Server,
            **server_options) -> Iterator[Server]:
    """A Server on tmp_path's private roots (not started yet). Afterwards it is stopped and what
    it left is removed; then serve must have exited 0, left no instance and nothing on the host.
    """
    snapshot_root = str(tmp_path / "run")
    before = host_snapshot(snapshot_root)
    srv = server_class(tmp_path, apache_php, extra_config=extra_config, **server_options)
    try:
        yield srv
    finally:
        srv.stop()
        leftover = srv.reap_leftovers()
    assert srv.proc is None or srv.proc.returncode == 0, srv.read_log()
    assert leftover == [], f"serve left instances behind: {leftover}"
    assert settled_snapshot(snapshot_root, before) == before, "serve left something on the host"


# A site whose /healthz.php answers 503 to its first `warming` requests, then 200 (a counter in
# the instance's own /tmp, so each instance warms up anew); / shows what the probe saw.
HEALTHZ_PHP = """<?php
$n = (int) @file_get_contents('/tmp/healthz-count') + 1;
file_put_contents('/tmp/healthz-count', (string) $n);
file_put_contents('/tmp/healthz-host', $_SERVER['HTTP_HOST']);
http_response_code($n <= {warming} ? 503 : 200);
echo "healthz $n";
"""
HEALTHZ_INDEX_PHP = """<?php
echo 'probed ', file_get_contents('/tmp/healthz-count'), ' times, as ', file_get_contents('/tmp/healthz-host');
"""


def warming_site(directory, warming: int) -> str:
    """A docroot (made at `directory`) whose /healthz.php is ready after `warming` 503s."""
    os.makedirs(directory)
    with open(os.path.join(directory, "healthz.php"), "w") as f:
        f.write(HEALTHZ_PHP.replace("{warming}", str(warming)))
    with open(os.path.join(directory, "index.php"), "w") as f:
        f.write(HEALTHZ_INDEX_PHP)
    return str(directory)
