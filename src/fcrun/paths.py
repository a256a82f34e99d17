"""Where fcrun keeps its files.

Two roots, each overridable by an environment variable (which the tests use) or a CLI option:

- the data root (``FCRUN_ROOT``, default ``/var/lib/fcrun``): images, layers, the CMDB;
- the run root (``FCRUN_RUN``, default ``/run/fcrun``): per-container state, rootfs mount
  points and upper dirs, IP leases, locks. It lives on tmpfs because everything it describes
  (processes, namespaces, veths) dies with the machine.
"""

from __future__ import annotations

import os

import msgspec

DEFAULT_DATA_ROOT = "/var/lib/fcrun"
DEFAULT_RUN_ROOT = "/run/fcrun"
DEFAULT_BRIDGE = "fcrun0"
DEFAULT_SUBNET = "10.88.0.0/16"
DEFAULT_CGROUP_PARENT = "fcrun"


class Paths(msgspec.Struct, frozen=True):
    """The directories one fcrun installation uses."""

    data_root: str = DEFAULT_DATA_ROOT
    run_root: str = DEFAULT_RUN_ROOT

    @classmethod
    def from_env(cls, data_root: str | None = None, run_root: str | None = None) -> "Paths":
        return cls(
            data_root=os.path.abspath(data_root or os.environ.get("FCRUN_ROOT") or DEFAULT_DATA_ROOT),
            run_root=os.path.abspath(run_root or os.environ.get("FCRUN_RUN") or DEFAULT_RUN_ROOT),
        )

    @property
    def images(self) -> str:
        return os.path.join(self.data_root, "images")

    @property
    def layers(self) -> str:
        return os.path.join(self.data_root, "layers")

    @property
    def containers(self) -> str:
        return os.path.join(self.run_root, "containers")

    @property
    def network(self) -> str:
        return os.path.join(self.run_root, "network")

    @property
    def seccomp_cache(self) -> str:
        """Compiled seccomp programs, shared by the processes of this run root (seccomp/compiler.py)."""
        return os.path.join(self.run_root, "seccomp")

    def container_dir(self, name: str) -> str:
        return os.path.join(self.containers, name)
