"""Images for real, as root: recipes built with busybox-static and mmdebstrap, OCI layers with
real overlay whiteouts, and containers run from them with runc on an overlayfs of the layers.

runc (Debian's 1.1.5) stands in for fcrun's own runtime, which has its own end-to-end tests;
here it proves the images themselves work under the conditions fcrun runs them in: an overlay
rootfs over read-only layers, new pid/mount namespaces, docker's 14 default capabilities and
no_new_privs.

The apache-php image takes a minute or more to build from Debian's mirrors, so its test keeps
its store in ``$FCRUN_TEST_IMAGE_CACHE`` (default ``/var/cache/fcrun-test``) and reuses the
image there while the recipe's hash is unchanged (the store's own build cache). Set
``FCRUN_TEST_IMAGE_CACHE=`` (empty) to build from scratch in a temporary store.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Callable

import pytest

from fcrun.errors import KernelError
from fcrun.images import Image, ImageStore
from fcrun.images.store import LOCK_FILE, TMP_DIR
from fcrun.paths import Paths
from polling import http_get_when_up, wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: builds images, mounts overlayfs, runs runc"
    ),
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc (Debian package runc)"),
]

REPO = Path(__file__).resolve().parents[2]
RECIPES = str(REPO / "rootfs")
CACHE_ENV = "FCRUN_TEST_IMAGE_CACHE"
DEFAULT_CACHE = "/var/cache/fcrun-test"

# docker's default capability set, which fcrun also gives containers
DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]


class Cleanup:
    """Undo steps, run last-in first-out even when a test fails."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], object]] = []

    def add(self, step: Callable[[], object]) -> None:
        self._steps.append(step)

    def run(self) -> None:
        errors = []
        while self._steps:
            try:
                self._steps.pop()()
            except Exception as exc:  # keep undoing the rest
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def cleanup():
    registry = Cleanup()
    yield registry
    registry.run()


class Runc:
    """One container of an image, run by runc on an overlayfs of the image's layers."""

    def __init__(self, tmp: Path, image: Image, cleanup: Cleanup, host_net: bool = False):
        self.id = f"fcrun-test-{uuid.uuid4().hex[:12]}"
        self.bundle = tmp / "bundle"
        self.state_root = tmp / "runc-state"
        self.rootfs = self.bundle / "rootfs"
        upper, work = tmp / "upper", tmp / "work"
        for d in (self.rootfs, upper, work, self.state_root):
            d.mkdir(parents=True)
        lower = ":".join(reversed(image.layers))
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={lower},upperdir={upper},workdir={work}",
                str(self.rootfs),
            ],
            check=True,
        )
        cleanup.add(lambda: subprocess.run(["umount", str(self.rootfs)], check=True))
        cleanup.add(self._delete)
        self.image = image
        self.host_net = host_net

    def _runc(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["runc", "--root", str(self.state_root), *args], **kwargs)

    def _delete(self) -> None:
        self._runc("delete", "--force", self.id, capture_output=True)

    def write_config(self, args: list[str]) -> None:
        subprocess.run(["runc", "spec", "--bundle", str(self.bundle)], check=True)
        spec_path = self.bundle / "config.json"
        spec = json.loads(spec_path.read_text())
        config = self.image.config
        spec["root"] = {"path": "rootfs", "readonly": False}
        spec["process"].update(
            terminal=False,
            args=args,
            env=config.env,
            cwd=config.workdir,
            noNewPrivileges=True,
            capabilities={k: DEFAULT_CAPS for k in ("bounding", "effective", "permitted")},
        )
        if self.host_net:
            # Share the host's network so the test can reach the server; sysfs cannot be
            # mounted without a network namespace of its own, and the server needs none.
            spec["linux"]["namespaces"] = [
                n for n in spec["linux"]["namespaces"] if n["type"] != "network"
            ]
            spec["mounts"] = [m for m in spec["mounts"] if not m["destination"].startswith("/sys")]
        spec_path.write_text(json.dumps(spec))

    def run(self, args: list[str], timeout_s: float = 30) -> subprocess.CompletedProcess:
        self.write_config(args)
        return self._runc(
            "run",
            "--bundle",
            str(self.bundle),
            self.id,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )

    def start_detached(self, args: list[str], log: Path) -> None:
        self.write_config(args)
        with open(log, "wb") as out:
            self._runc(
                "run",
                "--detach",
                "--bundle",
                str(self.bundle),
                self.id,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                check=True,
                timeout=30,
            )

    def status(self) -> str:
        result = self._runc("state", self.id, capture_output=True, text=True)
        return json.loads(result.stdout)["status"] if result.returncode == 0 else "gone"

    def kill(self, sig: str) -> None:
        self._runc("kill", self.id, sig, check=True)


def _store(data_root: Path) -> ImageStore:
    return ImageStore(
        Paths(data_root=str(data_root), run_root=str(data_root / "run")), recipes_dir=RECIPES
    )


def _tree_snapshot(root: str) -> dict[str, tuple[int, int, int]]:
    snapshot = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            snapshot[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snapshot


# -- busybox --------------------------------------------------------------------------------


def test_busybox_builds_runs_and_caches(tmp_path, cleanup):
    store = _store(tmp_path / "store")
    lines: list[str] = []
    image = store.build("busybox", progress=lines.append)
    assert any("applets" in line for line in lines), lines  # the script's own output came through
    (layer,) = image.layers
    assert os.path.isfile(os.path.join(layer, "bin/busybox"))
    assert os.readlink(os.path.join(layer, "bin/sh")) == "/bin/busybox"
    assert stat.S_IMODE(os.stat(os.path.join(layer, "tmp")).st_mode) == 0o1777
    assert "www-data:x:33:33" in Path(layer, "etc/passwd").read_text()
    assert image.config.cmd == ["sh"]

    container = Runc(tmp_path / "c", image, cleanup)
    result = container.run(["/bin/busybox", "echo", "hello from busybox"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from busybox\n"
    result = Runc(tmp_path / "c2", image, cleanup).run(
        ["sh", "-c", "id -u; ls /; touch /new && echo ok"]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "0" and "ok" in result.stdout
    assert not os.path.exists(os.path.join(layer, "new"))  # the write went to the upper dir

    again: list[str] = []
    assert store.build("busybox", progress=again.append) == image
    assert len(again) == 1 and "up to date" in again[0], again
    rebuilt = store.build("busybox", rebuild=True)
    assert rebuilt.created > image.created
    assert os.listdir(tmp_path / "store" / TMP_DIR) == []


def test_concurrent_builds_wait_for_each_other(tmp_path):
    """Two builds of one recipe at once: the second waits for the lock, then finds it current."""
    env = dict(os.environ, FCRUN_ROOT=str(tmp_path / "store"), FCRUN_RECIPES=RECIPES)
    code = (
        "import sys; from fcrun.images import ImageStore; from fcrun.paths import Paths;"
        "ImageStore(Paths.from_env()).build('busybox', progress=lambda l: print(l, flush=True))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("built" in o for o in outputs) == 1, outputs
    assert sum("up to date" in o for o in outputs) == 1, outputs
    assert len(os.listdir(tmp_path / "store" / "layers")) == 1
    assert os.path.exists(tmp_path / "store" / LOCK_FILE)


# -- OCI import with real whiteouts -----------------------------------------------------------


def _tar(entries: list[tuple[str, str, bytes | str]]) -> bytes:
    """(name, kind, data): kind "f" file, "d" dir, "l" symlink (data = target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "d":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "l":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                raw = data if isinstance(data, bytes) else data.encode()
                info.size, info.mode = len(raw), 0o755 if name.endswith("busybox") else 0o644
                tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def _write_layout(root: Path, layers: list[bytes], config: dict) -> None:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    config = dict(
        config,
        rootfs={
            "type": "layers",
            "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers],
        },
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [
            blob(gzip.compress(t), "application/vnd.oci.image.layer.v1.tar+gzip") for t in layers
        ],
    }
    desc = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    desc["annotations"] = {"org.opencontainers.image.ref.name": "whiteouts:v1"}
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))


def test_oci_whiteouts_become_overlay_whiteouts_and_run(tmp_path, cleanup):
    busybox = Path("/bin/busybox").read_bytes()
    base = _tar(
        [
            ("bin", "d", b""),
            ("bin/busybox", "f", busybox),
            ("bin/sh", "l", "busybox"),
            ("etc", "d", b""),
            ("etc/keep", "f", "kept\n"),
            ("etc/gone", "f", "deleted\n"),
            ("data", "d", b""),
            ("data/old-1", "f", "1"),
            ("data/old-2", "f", "2"),
            ("tmp", "d", b""),
            ("proc", "d", b""),
            ("dev", "d", b""),
            ("sys", "d", b""),
        ]
    )
    top = _tar(
        [
            ("etc", "d", b""),
            ("etc/.wh.gone", "f", b""),
            ("data", "d", b""),
            ("data/.wh..wh..opq", "f", b""),
            ("data/new", "f", "new\n"),
        ]
    )
    layout = tmp_path / "layout"
    _write_layout(
        layout,
        [base, top],
        {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]}},
    )
    store = _store(tmp_path / "store")
    image = store.import_(str(layout))
    assert image.name == "whiteouts:v1"
    lower, upper = image.layers

    whiteout = os.lstat(os.path.join(upper, "etc", "gone"))
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == os.makedev(0, 0)
    assert os.getxattr(os.path.join(upper, "data"), "trusted.overlay.opaque") == b"y"
    assert os.path.isfile(os.path.join(lower, "etc", "gone"))  # the lower layer is untouched

    container = Runc(tmp_path / "c", image, cleanup)
    result = container.run(
        ["sh", "-c", "cat /etc/keep; test ! -e /etc/gone && echo gone; ls /data"]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["kept", "gone", "new"]


def test_import_shares_layers_between_images(tmp_path):
    base = _tar([("bin", "d", b""), ("bin/tool", "f", "x")])
    one, two = tmp_path / "one", tmp_path / "two"
    _write_layout(one, [base, _tar([("a", "f", "a")])], {"os": "linux"})
    _write_layout(two, [base, _tar([("b", "f", "b")])], {"os": "linux"})
    store = _store(tmp_path / "store")
    first, second = store.import_(str(one), "one"), store.import_(str(two), "two")
    assert first.layers[0] == second.layers[0]
    assert len(os.listdir(tmp_path / "store" / "layers")) == 3
    store.remove("one")
    assert os.path.isdir(second.layers[0]) and not os.path.exists(first.layers[1])


@pytest.mark.skipif(
    not (shutil.which("umoci") and shutil.which("skopeo")),
    reason="needs umoci and skopeo (Debian packages) to make images the way real tools do",
)
def test_import_what_umoci_and_skopeo_write(tmp_path, cleanup):
    """An OCI layout from umoci (its second layer deletes a file and a directory) and the same
    image as skopeo's oci-archive and docker-archive: all import to the same layers and run."""
    store = _store(tmp_path / "store")
    busybox = store.build("busybox")
    layout, bundle = tmp_path / "layout", tmp_path / "umoci-bundle"

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True)

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:base")
    umoci("unpack", "--image", f"{layout}:base", str(bundle))
    subprocess.run(["cp", "-a", f"{busybox.layers[0]}/.", str(bundle / "rootfs")], check=True)
    (bundle / "rootfs/srv/old").mkdir(parents=True)
    (bundle / "rootfs/srv/old/file").write_text("old")
    umoci("repack", "--image", f"{layout}:base", str(bundle))
    os.remove(bundle / "rootfs/etc/hosts")
    shutil.rmtree(bundle / "rootfs/srv/old")
    (bundle / "rootfs/srv/new").write_text("new\n")
    umoci("repack", "--image", f"{layout}:v2", str(bundle))
    umoci(
        "config",
        "--image",
        f"{layout}:v2",
        "--config.cmd",
        "sh",
        "--config.exposedports",
        "8080/tcp",
        "--config.stopsignal",
        "SIGWINCH",
        "--config.workingdir",
        "/srv",
        "--config.env",
        "PATH=/usr/bin:/bin",
    )
    shutil.rmtree(bundle)
    oci_archive, docker_archive = tmp_path / "v2.oci.tar", tmp_path / "v2.docker.tar"
    for target in (
        f"oci-archive:{oci_archive}",
        f"docker-archive:{docker_archive}:example/tool:v2",
    ):
        subprocess.run(["skopeo", "copy", "--quiet", f"oci:{layout}:v2", target], check=True)

    images = [
        store.import_(str(layout), "tool:v2"),
        store.import_(str(oci_archive)),
        store.import_(str(docker_archive)),
    ]
    assert [i.name for i in images] == ["tool:v2", "v2.oci", "tool:v2"]
    assert images[0].layers == images[1].layers == images[2].layers
    assert images[0].config.exposed_ports == [8080] and images[0].config.stop_signal == "SIGWINCH"

    result = Runc(tmp_path / "c", images[0], cleanup).run(
        ["sh", "-c", "pwd; cat new; test ! -e /etc/hosts && test ! -e /srv/old && echo deleted"]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["/srv", "new", "deleted"]


# -- apache-php -------------------------------------------------------------------------------


@pytest.fixture
def apache_image(tmp_path) -> Image:
    """The apache-php image, built in the persistent test store unless its recipe is unchanged."""
    cache = os.environ.get(CACHE_ENV, DEFAULT_CACHE)
    store = _store(Path(cache) if cache else tmp_path / "store")
    image = store.build("apache-php", progress=print)
    store.prune()  # earlier builds of a changed recipe: keep the cache at one image's size
    return image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_apache_php_serves_phpinfo(tmp_path, apache_image, cleanup):
    image = apache_image
    assert image.config.exposed_ports == [80] and image.config.stop_signal == "SIGWINCH"
    assert image.config.docroot == "/var/www/html"
    (layer,) = image.layers
    assert Path(layer, "var/www/html/index.php").read_text().strip() == "<?php phpinfo();"
    assert not os.path.exists(os.path.join(layer, "var/www/html/index.html"))
    assert os.listdir(os.path.join(layer, "var/lib/apt/lists")) == []
    assert os.path.exists(os.path.join(layer, "etc/apache2/mods-enabled/mpm_prefork.load"))
    before = _tree_snapshot(os.path.join(layer, "etc/apache2"))

    container = Runc(tmp_path / "c", image, cleanup, host_net=True)
    # In the host's network namespace port 80 may be taken: listen on a free loopback port.
    port = _free_port()
    apache = container.rootfs / "etc/apache2"
    (apache / "ports.conf").write_text(f"Listen 127.0.0.1:{port}\n")
    site = apache / "sites-available/000-default.conf"
    site.write_text(site.read_text().replace("<VirtualHost *:80>", f"<VirtualHost *:{port}>"))

    log = tmp_path / "apache.log"
    container.start_detached(image.config.entrypoint + image.config.cmd, log)
    status, _, body = http_get_when_up("127.0.0.1", "/", port=port, timeout_s=60)
    assert status == 200, body[:500]
    assert "phpinfo()" in body and "PHP Version 8." in body, body[:500]
    assert 'Server API </td><td class="v">Apache 2.0 Handler' in body

    container.kill("SIGWINCH")  # the image's stop signal: graceful stop
    wait_until("apache2 to stop on SIGWINCH", lambda: container.status() in ("stopped", "gone"),
               interval_s=0.1, detail=container.status)
    output = log.read_text()
    assert '"GET / HTTP/1.1" 200' in output, output  # access log on stdout
    assert "resuming normal operations" in output, output  # error log on stderr
    assert (
        _tree_snapshot(os.path.join(layer, "etc/apache2")) == before
    )  # config edits went to upper


# -- a full data root -------------------------------------------------------------------------


def _small_tmpfs(where: Path, cleanup: Cleanup, size: str, inodes: int) -> Path:
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes},mode=0700", "fcrun-test", str(where)],
        check=True,
    )
    cleanup.add(lambda: subprocess.run(["umount", str(where)], check=True))
    return where


@pytest.mark.parametrize(
    "layer,size,inodes",
    [
        (lambda: _tar([("big", "f", os.urandom(8 << 20))]), "4m", 1000),  # out of blocks
        (lambda: _tar([(f"f{i}", "f", "x") for i in range(200)]), "64m", 64),  # out of inodes
    ],
    ids=["blocks", "inodes"],
)
def test_a_full_data_root_fails_cleanly_and_the_store_still_works(tmp_path, cleanup, layer, size, inodes):
    data_root = _small_tmpfs(tmp_path / "small", cleanup, size, inodes)
    layout = tmp_path / "full"
    _write_layout(layout, [layer()], {"os": "linux"})
    store = _store(data_root)
    with pytest.raises(KernelError) as info:
        store.import_(str(layout), "full")
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC, message
    assert f"{data_root}/{TMP_DIR}/layer-" in message and "No space left on device" in message
    # nothing left: no record, no layer, no temporary file, and the space is free again
    assert store.list() == []
    assert os.listdir(data_root / "layers") == [] and os.listdir(data_root / TMP_DIR) == []
    assert sorted(os.listdir(data_root)) == sorted(["images", "layers", TMP_DIR, LOCK_FILE])
    usage = os.statvfs(data_root)
    assert (usage.f_blocks - usage.f_bfree) * usage.f_frsize < 64 << 10
    small = tmp_path / "small-image"
    _write_layout(small, [_tar([("bin", "d", b""), ("bin/tool", "f", "x")])], {"os": "linux"})
    image = store.import_(str(small), "small")
    assert store.list() == [image] and os.path.isfile(os.path.join(image.layers[0], "bin/tool"))
