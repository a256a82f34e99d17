"""`fcrun serve` as a subprocess on private roots, for benchmarks (bench/) and tools.

The image's layers are linked in from an existing store instead of copied, the cgroup parent,
bridge and subnet are private, and the proxy listens on a free 127.0.0.1 port.

Resource handling: `stop()` sends SIGTERM (serve drains and stops its instances);
`reap_leftovers()` then removes whatever a crashed serve left (containers, cgroup parent,
bridge). The caller owns `work` and removes it.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from ..errors import FcrunError
from ..paths import Paths
from ..runtime.lifecycle import Runtime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, work: str, image_root: str, *, cgroup_parent: str, bridge: str, subnet: str,
                 hold_timeout_s: float = 30, drain_timeout_s: float = 5, image: str = "apache-php",
                 extra_config: str = "", docroot_roots: tuple[str, ...] | None = None):
        """`docroot_roots`: where apps' docroots may lie (default: `work`, where the callers
        make their sites)."""
        self.work = work
        self.paths = Paths(data_root=os.path.join(work, "data"), run_root=os.path.join(work, "run"))
        os.makedirs(os.path.join(self.paths.data_root, "images"))
        os.symlink(os.path.join(image_root, "layers"), os.path.join(self.paths.data_root, "layers"))
        shutil.copy(os.path.join(image_root, "images", f"{image}.json"), os.path.join(self.paths.data_root, "images"))
        self.port = free_port()
        self.cgroup_parent, self.bridge, self.subnet = cgroup_parent, bridge, subnet
        self.config = os.path.join(work, "fcrun.toml")
        with open(self.config, "w") as f:
            f.write(f'listen = "127.0.0.1:{self.port}"\nhold_timeout_s = {hold_timeout_s}\n'
                    f'drain_timeout_s = {drain_timeout_s}\ndocroot_roots = {list(docroot_roots or (work,))!r}\n'
                    f'[runtime]\ncgroup_parent = "{cgroup_parent}"\n'
                    f'bridge = "{bridge}"\nsubnet = "{subnet}"\n{extra_config}')
        self.env = dict(os.environ, FCRUN_ROOT=self.paths.data_root, FCRUN_RUN=self.paths.run_root,
                        FCRUN_CONFIG=self.config, FCRUN_CGROUP_PARENT=cgroup_parent, FCRUN_BRIDGE=bridge,
                        FCRUN_SUBNET=subnet)
        self.admin_socket = os.path.join(self.paths.run_root, "admin.sock")
        self.log_path = os.path.join(work, "serve.log")
        self.runtime = Runtime(self.paths, cgroup_parent=cgroup_parent, bridge=bridge, subnet=subnet)
        self.proc: subprocess.Popen | None = None
        self.exit_codes: list[int] = []

    def cli(self, *args: str) -> str:
        """Run `fcrun ARGS` against this server; its stdout. RuntimeError with stderr on failure."""
        r = subprocess.run([sys.executable, "-m", "fcrun_cli", *args], env=self.env, capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"fcrun {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def start(self, timeout_s: float = 60) -> float:
        """Start serve; returns seconds until it listens (proxy port and admin socket)."""
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fcrun_cli", "serve"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fcrun serve exited: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if os.path.exists(self.admin_socket):
                    return time.monotonic() - t0
            except OSError:
                pass
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"fcrun serve did not start listening within {timeout_s:g} s: {self.log_tail()}")
            time.sleep(0.05)

    def pool_status(self):
        """The fork-server's PoolStatus (pooled instances per image)."""
        from ..forkserver import Client, protocol

        with Client(os.path.join(self.paths.run_root, "forkserver.sock"), timeout_s=10) as fs:
            return fs.request(protocol.Status())

    def wait_pool_ready(self, image: str = "apache-php", timeout_s: float = 60.0):
        """The pool status once the image's pool is full."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.pool_status()
            pool = status.images.get(image)
            if pool is not None and pool.size and pool.ready >= pool.size:
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pool of {image} is not full after {timeout_s:g} s: {status}")
            time.sleep(0.05)

    def log_tail(self, n_bytes: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n_bytes:].decode(errors="replace")
        except OSError:
            return ""

    def admin(self):
        from .admin_client import AdminClient

        return AdminClient(self.admin_socket)

    def request(self, host: str, path: str = "/", timeout: float = 60) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Host": host})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def wait_no_instance(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.runtime.states.names():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the idle instance was not stopped within {timeout_s:g} s")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 60) -> float:
        """SIGTERM (serve drains and stops every instance); returns seconds it took. Records the
        exit code in exit_codes; stopping a stopped server does nothing."""
        t0 = time.monotonic()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.exit_codes.append(self.proc.returncode)
            self.proc = None
        return time.monotonic() - t0

    def reap_leftovers(self) -> list[str]:
        """Remove what serve left (normally nothing); returns the container names removed."""
        left = self.runtime.states.names()
        for name in left:
            try:
                self.runtime.delete(name, force=True)
            except (FcrunError, OSError) as exc:  # best effort, reported
                print(f"could not delete {name}: {exc}", file=sys.stderr)
        try:
            self.runtime.cgroups.remove_parent_if_empty()
            self.runtime.network.remove_bridge_if_unused()
        except (FcrunError, OSError) as exc:  # best effort, reported: the caller's run goes on
            print(f"could not remove the cgroup parent or the bridge: {exc}", file=sys.stderr)
        return left
