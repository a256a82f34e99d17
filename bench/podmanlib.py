"""A podman of its own: everything it keeps under one directory, for bench/oci_cli.py and tests/root/test_podman_root.py.

Storage (vfs: no mounts to leak), run root, tmp dir, file locks (no /dev/shm/libpod_lock), events log and CNI
config dir live under `home`; the cgroup manager is cgroupfs (no systemd); no registry is configured, so
nothing is ever pulled. What stays outside: containers/image's blob-info cache, which `podman import` writes
to BLOB_INFO_CACHE whatever the storage root (no setting moves it for root); the callers remove it if they
made it. Containers get `--network none` from the callers: nothing leaves the host.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil

BLOB_INFO_CACHE = "/var/lib/containers/cache"


def private_podman(home: str) -> tuple[list[str], dict[str, str]]:
    """Write the configuration of a podman living under `home` (an existing directory); its argv and environment.

    The argv is `podman` with the global flags; add `--runtime PATH` (and a runtime --root through
    `--runtime-flag root=DIR`) per call.
    """
    for d in ("root", "run", "tmp", "static", "volumes", "cni"):
        os.makedirs(os.path.join(home, d), 0o700, exist_ok=True)
    conf = os.path.join(home, "containers.conf")
    with open(conf, "w") as f:
        f.write(f"""[containers]
# podman's defaults (nofile 1048576) are above this host's hard limits, which root cannot raise without
# CAP_SYS_RESOURCE: runc refuses them with EPERM
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{home}/events.log"
lock_type = "file"
static_dir = "{home}/static"
tmp_dir = "{home}/tmp"
volume_path = "{home}/volumes"
# podman passes --log-format=json only to runtimes named here; fcrun-oci speaks it as runc does
runtime_supports_json = ["crun", "runc", "kata", "runsc", "krun", "fcrun-oci"]
[network]
network_backend = "cni"
network_config_dir = "{home}/cni"
""")
    registries = os.path.join(home, "registries.conf")
    open(registries, "w").close()
    storage = os.path.join(home, "storage.conf")
    with open(storage, "w") as f:
        f.write(f'[storage]\ndriver = "vfs"\ngraphroot = "{home}/root"\nrunroot = "{home}/run"\n')
    env = dict(os.environ, CONTAINERS_CONF=conf, CONTAINERS_REGISTRIES_CONF=registries, CONTAINERS_STORAGE_CONF=storage)
    argv = ["podman", "--root", f"{home}/root", "--runroot", f"{home}/run", "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--tmpdir", f"{home}/tmp",
            "--network-config-dir", f"{home}/cni"]
    return argv, env


def remove_cgroup_tree(parent: str) -> list[str]:
    """rmdir the cgroup `parent` (as given to --cgroup-parent) and what podman made beneath it (conmon's, the
    containers'), in every hierarchy; the ones that still hold processes are kept and returned."""
    busy = []
    name = parent.strip("/")
    for top in glob.glob(f"/sys/fs/cgroup/*/{name}") + glob.glob(f"/sys/fs/cgroup/{name}"):
        for dirpath, _, _ in sorted(os.walk(top), key=lambda entry: -entry[0].count("/")):
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    if f.read().strip():
                        busy.append(dirpath)
                        continue
            except FileNotFoundError:  # removed meanwhile (podman cleaning up a container's)
                continue
            with contextlib.suppress(OSError):  # a parent of a busy one: reported through the child
                os.rmdir(dirpath)
    return busy


def remove_blob_info_cache(existed_before: bool) -> None:
    """Remove BLOB_INFO_CACHE (and /var/lib/containers if then empty) unless it existed before we used podman."""
    if existed_before:
        return
    shutil.rmtree(BLOB_INFO_CACHE, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(BLOB_INFO_CACHE))
