"""Fixtures for root tests (tests/root and tests/security): private state roots, cgroup parent and bridge per run,
a busybox image built once per session, and a check that each test leaves the host as it was.
"""

from __future__ import annotations

import pytest

from fcrun.paths import Paths
from fcrun.runtime import Runtime
from hostcheck import BRIDGE, CGROUP_PARENT, SUBNET, host_snapshot, settled_snapshot

@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def busybox(data_root):
    from fcrun.images import ImageStore

    return ImageStore(Paths(data_root=data_root, run_root="/nonexistent")).build("busybox", progress=lambda *a: None)


@pytest.fixture(scope="session")
def apache_php(tmp_path_factory):
    """The apache-php image. Built with mmdebstrap (about 30 s) into a persistent store at
    $FCRUN_TEST_IMAGE_CACHE (default /var/cache/fcrun-test) and reused while its recipe is
    unchanged; set FCRUN_TEST_IMAGE_CACHE= (empty) to build from scratch in a temporary store."""
    import os

    from fcrun.images import ImageStore

    cache = os.environ.get("FCRUN_TEST_IMAGE_CACHE", "/var/cache/fcrun-test")
    root = cache or str(tmp_path_factory.mktemp("apache-store"))
    return ImageStore(Paths(data_root=root, run_root="/nonexistent")).build("apache-php", progress=lambda *a: None)


@pytest.fixture
def run_root(tmp_path):
    return str(tmp_path / "run")


@pytest.fixture
def runtime(data_root, run_root, busybox):
    """A Runtime on private roots; afterwards every container is removed and the host compared."""
    before = host_snapshot(run_root)
    rt = Runtime(Paths(data_root=data_root, run_root=run_root), cgroup_parent=CGROUP_PARENT, bridge=BRIDGE, subnet=SUBNET)
    yield rt
    for name in rt.states.names():
        rt.delete(name, force=True)
    rt.cgroups.remove_parent_if_empty()
    rt.network.remove_bridge_if_unused()  # the bridge outlives its containers until gc
    assert settled_snapshot(run_root, before) == before, "the test left something on the host"
